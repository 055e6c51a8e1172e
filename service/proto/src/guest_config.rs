//! What a guest sees of the world it was started in: its command line and environment variables (WASI's
//! `args_get` and `environ_get`). Carried in every start and in the facts an agent reports, so a rescheduled or
//! rebuilt instance starts with the same configuration.

use serde::{Deserialize, Serialize};

use crate::error::ErrorResponse;

/// Most bytes a configuration may hold, all strings together. Agents send every instance's configuration in
/// each heartbeat, so it is meant for settings, not data.
pub const MAX_GUEST_CONFIG_BYTES: usize = 16 * 1024;

/// Most arguments, and most environment variables.
pub const MAX_GUEST_CONFIG_ENTRIES: usize = 256;

/// A guest's command line and environment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestConfig {
    /// `argv[0]`: the program's name (the CLI sends the module file's name). Empty: the instance id.
    pub program: String,
    /// The arguments after `argv[0]`.
    pub args: Vec<String>,
    /// Environment variables, in the order the guest sees them; names are unique.
    pub env: Vec<(String, String)>,
}

impl GuestConfig {
    /// Checks what a guest cannot be given: a NUL inside a string (WASI passes C strings), an environment
    /// name that is empty, holds `=` or appears twice, and more than the limits above.
    pub fn validate(&self) -> Result<(), ErrorResponse> {
        if self.args.len() > MAX_GUEST_CONFIG_ENTRIES || self.env.len() > MAX_GUEST_CONFIG_ENTRIES {
            return Err(ErrorResponse::invalid(format!(
                "a guest takes at most {MAX_GUEST_CONFIG_ENTRIES} arguments and {MAX_GUEST_CONFIG_ENTRIES} environment \
                 variables (got {} and {})",
                self.args.len(),
                self.env.len()
            )));
        }
        let strings = std::iter::once(&self.program).chain(&self.args).chain(self.env.iter().flat_map(|(k, v)| [k, v]));
        let mut total = 0usize;
        for s in strings {
            if s.contains('\0') {
                return Err(ErrorResponse::invalid(format!("guest argument or environment {s:?} contains a NUL byte")));
            }
            total = total.saturating_add(s.len());
        }
        if total > MAX_GUEST_CONFIG_BYTES {
            return Err(ErrorResponse::invalid(format!(
                "guest arguments and environment hold {total} bytes; at most {MAX_GUEST_CONFIG_BYTES} are allowed"
            )));
        }
        let mut names = std::collections::BTreeSet::new();
        for (name, _) in &self.env {
            if name.is_empty() || name.contains('=') {
                return Err(ErrorResponse::invalid(format!(
                    "environment variable name {name:?} must be non-empty and hold no '='"
                )));
            }
            if !names.insert(name.as_str()) {
                return Err(ErrorResponse::invalid(format!("environment variable {name:?} is set twice")));
            }
        }
        Ok(())
    }

    /// The guest's `argv`, `argv[0]` first (`instance_id` when no program name was given).
    pub fn argv<'a>(&'a self, instance_id: &'a str) -> impl Iterator<Item = &'a str> {
        let program = if self.program.is_empty() { instance_id } else { &self.program };
        std::iter::once(program).chain(self.args.iter().map(String::as_str))
    }

    /// The guest's environment as `NAME=value` strings.
    pub fn environ(&self) -> impl Iterator<Item = String> + '_ {
        self.env.iter().map(|(k, v)| format!("{k}={v}"))
    }
}

/// Parses `NAME=value` (the CLI's `--env`); the value may hold `=`.
pub fn parse_env_var(s: &str) -> Result<(String, String), ErrorResponse> {
    match s.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_string(), value.to_string())),
        _ => Err(ErrorResponse::invalid(format!("{s:?} is not NAME=value"))),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn config(args: &[&str], env: &[(&str, &str)]) -> GuestConfig {
        GuestConfig {
            program: "app.wasm".into(),
            args: args.iter().map(|s| s.to_string()).collect(),
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        }
    }

    #[test]
    fn what_a_guest_cannot_be_given_is_refused_with_the_reason() {
        assert!(config(&["a", "b c"], &[("A", "x=y"), ("B", "")]).validate().is_ok());
        let cases = [
            (config(&["a\0b"], &[]), "NUL"),
            (config(&[], &[("", "x")]), "non-empty"),
            (config(&[], &[("A=B", "x")]), "no '='"),
            (config(&[], &[("A", "1"), ("A", "2")]), "set twice"),
            (config(&["x"; MAX_GUEST_CONFIG_ENTRIES + 1], &[]), "at most"),
            (config(&[&"x".repeat(MAX_GUEST_CONFIG_BYTES)], &[]), "bytes"),
        ];
        for (bad, why) in cases {
            let err = bad.validate().unwrap_err();
            assert_eq!(err.error_code, crate::ErrorCode::InvalidRequest);
            assert!(err.message.contains(why), "{why}: {}", err.message);
        }
    }

    #[test]
    fn argv_starts_with_the_program_or_the_instance_id() {
        let c = config(&["--port", "80"], &[("A", "1")]);
        assert_eq!(c.argv("i-1").collect::<Vec<_>>(), ["app.wasm", "--port", "80"]);
        let unnamed = GuestConfig { program: String::new(), ..c.clone() };
        assert_eq!(unnamed.argv("i-1").collect::<Vec<_>>(), ["i-1", "--port", "80"]);
        assert_eq!(c.environ().collect::<Vec<_>>(), ["A=1"]);
    }

    #[test]
    fn env_vars_parse_as_name_equals_value() {
        assert_eq!(parse_env_var("A=b=c").unwrap(), ("A".into(), "b=c".into()));
        assert_eq!(parse_env_var("A=").unwrap(), ("A".into(), String::new()));
        assert!(parse_env_var("=x").is_err());
        assert!(parse_env_var("A").is_err());
    }
}
