//! Node labels and placement constraints. An agent carries labels (`agent --label zone=a`) and reports them with
//! every snapshot; a start may carry constraints (`start --constraint zone=a`), and is placed only on a node
//! whose labels hold every one of them. Constraints travel with the instance (in its start and in its facts),
//! so a rescheduled instance, or one rebuilt after a control-plane restart, keeps them.

use std::collections::BTreeMap;

use crate::error::ErrorResponse;

/// Labels of a node, or constraints of an instance: names to values. Ordered, so every listing of them is
/// deterministic.
pub type Labels = BTreeMap<String, String>;

/// Most labels a node, or constraints an instance, may have.
pub const MAX_LABELS: usize = 32;

/// Longest label name or value, in bytes.
pub const MAX_LABEL_LEN: usize = 63;

/// Parses `name=value` (the CLI's `--label` and `--constraint`); `what` names the flag in the error.
pub fn parse_label(what: &str, s: &str) -> Result<(String, String), ErrorResponse> {
    let Some((name, value)) = s.split_once('=') else {
        return Err(ErrorResponse::invalid(format!("{what} {s:?} is not name=value")));
    };
    check(what, name, value)?;
    Ok((name.to_string(), value.to_string()))
}

/// Parses several `name=value` strings into one set; a name given twice is refused.
pub fn parse_labels<'a>(what: &str, items: impl IntoIterator<Item = &'a str>) -> Result<Labels, ErrorResponse> {
    let mut labels = Labels::new();
    for item in items {
        let (name, value) = parse_label(what, item)?;
        if labels.insert(name.clone(), value).is_some() {
            return Err(ErrorResponse::invalid(format!("{what} {name:?} is given twice")));
        }
    }
    validate(what, &labels)?;
    Ok(labels)
}

/// Checks labels (or constraints) that arrived over the wire: names and values from `[A-Za-z0-9._/-]` (names
/// non-empty), each at most [`MAX_LABEL_LEN`] bytes, at most [`MAX_LABELS`] of them.
pub fn validate(what: &str, labels: &Labels) -> Result<(), ErrorResponse> {
    if labels.len() > MAX_LABELS {
        return Err(ErrorResponse::invalid(format!(
            "at most {MAX_LABELS} of {what} are allowed, got {}",
            labels.len()
        )));
    }
    labels.iter().try_for_each(|(name, value)| check(what, name, value))
}

/// Whether a node with `labels` satisfies every one of `constraints`.
pub fn satisfies(labels: &Labels, constraints: &Labels) -> bool {
    constraints.iter().all(|(name, value)| labels.get(name) == Some(value))
}

/// `name=value,name=value`, for messages and tables (`-` when empty).
pub fn display(labels: &Labels) -> String {
    if labels.is_empty() {
        return "-".into();
    }
    labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

fn check(what: &str, name: &str, value: &str) -> Result<(), ErrorResponse> {
    let ok = |s: &str| {
        s.len() <= MAX_LABEL_LEN
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/'))
    };
    if name.is_empty() || !ok(name) || !ok(value) {
        return Err(ErrorResponse::invalid(format!(
            "bad {what} {name:?}={value:?}: a name (non-empty) and a value of at most {MAX_LABEL_LEN} characters \
             from [A-Za-z0-9._/-]"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn labels_parse_as_name_equals_value_and_bad_ones_say_why() {
        let labels = parse_labels("label", ["zone=a", "disk=ssd", "empty="]).unwrap();
        assert_eq!(display(&labels), "disk=ssd,empty=,zone=a");
        for (bad, why) in [
            (vec!["zone"], "not name=value"),
            (vec!["=a"], "bad label"),
            (vec!["zone=a b"], "bad label"),
            (vec!["zone=a", "zone=b"], "given twice"),
        ] {
            let err = parse_labels("label", bad.iter().copied()).unwrap_err();
            assert_eq!(err.error_code, crate::ErrorCode::InvalidRequest);
            assert!(err.message.contains(why), "{why}: {}", err.message);
        }
        let many: Labels = (0..=MAX_LABELS).map(|i| (format!("k{i}"), String::new())).collect();
        assert!(validate("label", &many).unwrap_err().message.contains("at most"));
        let long: Labels = [("k".to_string(), "v".repeat(MAX_LABEL_LEN + 1))].into();
        assert!(validate("label", &long).is_err());
    }

    #[test]
    fn a_node_satisfies_constraints_when_it_has_every_one() {
        let node = parse_labels("label", ["zone=a", "disk=ssd"]).unwrap();
        assert!(satisfies(&node, &Labels::new()));
        assert!(satisfies(&node, &parse_labels("c", ["zone=a"]).unwrap()));
        assert!(satisfies(&node, &node));
        assert!(!satisfies(&node, &parse_labels("c", ["zone=b"]).unwrap()));
        assert!(!satisfies(&node, &parse_labels("c", ["zone=a", "gpu=1"]).unwrap()));
        assert!(!satisfies(&Labels::new(), &parse_labels("c", ["zone="]).unwrap()));
    }
}
