//! The capability permission model (design §Capability Permission Model): parsing, validation and the
//! check that maps an operation to the permission it needs.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::ErrorResponse;
use crate::types::ProviderType;

/// Longest accepted domain or topic in a permission string.
pub const MAX_PERMISSION_ARG_LEN: usize = 253;

/// One permission, parsed from its string form (`kv:read`, `http:domain:example.com`, `msg:publish:orders`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Permission {
    /// `kv:read`: Get and List.
    KvRead,
    /// `kv:write`: Set.
    KvWrite,
    /// `kv:delete`: Delete.
    KvDelete,
    /// `http:request`: outbound requests at all.
    HttpRequest,
    /// `http:domain:<d>`: restricts requests to this domain (lower-cased).
    HttpDomain(String),
    /// `msg:publish:<topic>`.
    MsgPublish(String),
    /// `msg:subscribe:<topic>`.
    MsgSubscribe(String),
}

impl Permission {
    /// The provider this permission belongs to.
    pub fn provider_type(&self) -> ProviderType {
        match self {
            Permission::KvRead | Permission::KvWrite | Permission::KvDelete => ProviderType::Kv,
            Permission::HttpRequest | Permission::HttpDomain(_) => ProviderType::Http,
            Permission::MsgPublish(_) | Permission::MsgSubscribe(_) => ProviderType::Messaging,
        }
    }
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Permission::KvRead => f.write_str("kv:read"),
            Permission::KvWrite => f.write_str("kv:write"),
            Permission::KvDelete => f.write_str("kv:delete"),
            Permission::HttpRequest => f.write_str("http:request"),
            Permission::HttpDomain(d) => write!(f, "http:domain:{d}"),
            Permission::MsgPublish(t) => write!(f, "msg:publish:{t}"),
            Permission::MsgSubscribe(t) => write!(f, "msg:subscribe:{t}"),
        }
    }
}

impl FromStr for Permission {
    type Err = ErrorResponse;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad =
            |why: &str| ErrorResponse::invalid(format!("bad permission {s:?}: {why}")).with_detail("permission", s);
        match s {
            "kv:read" => return Ok(Permission::KvRead),
            "kv:write" => return Ok(Permission::KvWrite),
            "kv:delete" => return Ok(Permission::KvDelete),
            "http:request" => return Ok(Permission::HttpRequest),
            _ => {}
        }
        if let Some(domain) = s.strip_prefix("http:domain:") {
            return validate_domain(domain).map(Permission::HttpDomain).map_err(|why| bad(&why));
        }
        if let Some(topic) = s.strip_prefix("msg:publish:") {
            return validate_topic(topic).map(Permission::MsgPublish).map_err(|why| bad(&why));
        }
        if let Some(topic) = s.strip_prefix("msg:subscribe:") {
            return validate_topic(topic).map(Permission::MsgSubscribe).map_err(|why| bad(&why));
        }
        Err(bad("expected one of kv:read, kv:write, kv:delete, http:request, http:domain:<domain>, \
             msg:publish:<topic>, msg:subscribe:<topic>"))
    }
}

impl Serialize for Permission {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Permission {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(|e: ErrorResponse| serde::de::Error::custom(e.message))
    }
}

/// A DNS name: labels of `[a-z0-9-]`, not starting or ending with `-`; stored lower-case so checks are
/// case-insensitive. A leading `*.` allows every subdomain of a parent of at least two labels whose last is
/// not numeric: `*.com` would grant a whole top-level domain, and `*.0.0.1` would match IP literals.
fn validate_domain(domain: &str) -> Result<String, String> {
    if domain.is_empty() {
        return Err("empty domain".into());
    }
    if domain.len() > MAX_PERMISSION_ARG_LEN {
        return Err(format!("domain longer than {MAX_PERMISSION_ARG_LEN} bytes"));
    }
    let lower = domain.to_ascii_lowercase();
    let body = lower.strip_prefix("*.").unwrap_or(&lower);
    for label in body.split('.') {
        let ok_chars = label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if label.is_empty() || label.len() > 63 || !ok_chars || label.starts_with('-') || label.ends_with('-') {
            return Err(format!("invalid domain label {label:?}"));
        }
    }
    if body.len() != lower.len() {
        let numeric_tld = body.rsplit('.').next().is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit()));
        if !body.contains('.') || numeric_tld {
            return Err(format!(
                "a wildcard needs a parent of two or more labels, the last not numeric (not {body:?})"
            ));
        }
    }
    Ok(lower)
}

/// A topic: dot-separated tokens of `[A-Za-z0-9_-]`; a token may be `*` (one token) and the last may be `>`
/// (the rest), the NATS wildcard rules.
fn validate_topic(topic: &str) -> Result<String, String> {
    if topic.is_empty() {
        return Err("empty topic".into());
    }
    if topic.len() > MAX_PERMISSION_ARG_LEN {
        return Err(format!("topic longer than {MAX_PERMISSION_ARG_LEN} bytes"));
    }
    let tokens: Vec<&str> = topic.split('.').collect();
    for (i, token) in tokens.iter().enumerate() {
        let last = i + 1 == tokens.len();
        let ok = *token == "*"
            || (*token == ">" && last)
            || (!token.is_empty() && token.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'));
        if !ok {
            return Err(format!("invalid topic token {token:?}"));
        }
    }
    Ok(topic.to_string())
}

/// Parses and validates a list of permission strings for one capability: every string must parse and all
/// must belong to the same provider type, which is returned.
pub fn parse_permissions(perms: &[String]) -> Result<(ProviderType, Vec<Permission>), ErrorResponse> {
    let parsed: Vec<Permission> = perms.iter().map(|p| p.parse()).collect::<Result<_, _>>()?;
    let Some(first) = parsed.first() else {
        return Err(ErrorResponse::invalid("a capability needs at least one permission"));
    };
    let provider_type = first.provider_type();
    if let Some(other) = parsed.iter().find(|p| p.provider_type() != provider_type) {
        return Err(ErrorResponse::invalid(format!(
            "permissions of one capability must be for one provider: {first} is {provider_type}, {other} is {}",
            other.provider_type()
        )));
    }
    Ok((provider_type, parsed))
}

/// Whether `granted` allows `needed`. Exact match, except that topic permissions honour `*` and `>`: a needed
/// topic (or subscription pattern) is allowed when a granted pattern covers every topic it can match.
pub fn allows(granted: &[Permission], needed: &Permission) -> bool {
    granted.iter().any(|g| match (g, needed) {
        (Permission::MsgPublish(pattern), Permission::MsgPublish(topic))
        | (Permission::MsgSubscribe(pattern), Permission::MsgSubscribe(topic)) => pattern_covers(pattern, topic),
        _ => g == needed,
    })
}

/// Checks a topic or subscription pattern a guest sent (same rules as in permission strings); with
/// `allow_wildcards` false, `*` and `>` are refused, as they are for publishing.
pub fn validate_topic_arg(topic: &str, allow_wildcards: bool) -> Result<(), ErrorResponse> {
    validate_topic(topic).map_err(|why| ErrorResponse::invalid(format!("bad topic {topic:?}: {why}")))?;
    if !allow_wildcards && topic.split('.').any(|t| t == "*" || t == ">") {
        return Err(ErrorResponse::invalid(format!("cannot publish to wildcard topic {topic:?}")));
    }
    Ok(())
}

/// Whether pattern `granted` matches every topic that pattern `requested` can match (`a.>` covers `a.*.c` and
/// `a.b`; `a.*` does not cover `a.>`). For a literal `requested` this is [`topic_matches`].
pub fn pattern_covers(granted: &str, requested: &str) -> bool {
    let mut granted_tokens = granted.split('.');
    let mut requested_tokens = requested.split('.');
    loop {
        match (granted_tokens.next(), requested_tokens.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(r)) if r != ">" => {}
            (Some(g), Some(r)) if g == r && g != "*" && g != ">" => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether `granted` lets a request reach `host`: it needs `http:request` and an `http:domain` that is `host`
/// exactly, or `*.parent` for a host strictly below `parent`. `host` must come from a parsed URL (never from
/// the raw string, where userinfo, ports or case could disguise it); it is compared lower-cased and without a
/// trailing dot. IP literals match only an identical `http:domain:<ip>`, never a wildcard; IPv6 literals never
/// match.
pub fn http_host_allowed(granted: &[Permission], host: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    if host.is_empty() || !granted.contains(&Permission::HttpRequest) {
        return false;
    }
    let ip_literal = host.parse::<core::net::IpAddr>().is_ok();
    granted.iter().any(|g| match g {
        Permission::HttpDomain(domain) => match domain.strip_prefix("*.") {
            Some(parent) => {
                !ip_literal && host.strip_suffix(parent).is_some_and(|sub| sub.len() > 1 && sub.ends_with('.'))
            }
            None => *domain == host,
        },
        _ => false,
    })
}

/// Whether `granted` names `ip` itself (`http:domain:10.0.0.5`): the only way a request may reach a loopback,
/// private, link-local or other internal address, whatever name led there.
pub fn http_ip_granted(granted: &[Permission], ip: core::net::IpAddr) -> bool {
    let ip = ip.to_canonical().to_string();
    granted.iter().any(|g| matches!(g, Permission::HttpDomain(domain) if *domain == ip))
}

/// NATS-style subject matching: `*` matches one token, a trailing `>` matches one or more.
pub fn topic_matches(pattern: &str, topic: &str) -> bool {
    let mut pattern_tokens = pattern.split('.');
    let mut topic_tokens = topic.split('.');
    loop {
        match (pattern_tokens.next(), topic_tokens.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(p), Some(t)) if p == t => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_every_documented_form() {
        for s in [
            "kv:read",
            "kv:write",
            "kv:delete",
            "http:request",
            "http:domain:example.com",
            "msg:publish:orders",
            "msg:subscribe:orders.*",
        ] {
            let p: Permission = s.parse().unwrap();
            assert_eq!(p.to_string(), s);
        }
    }

    #[test]
    fn rejects_bad_strings_with_invalid_request() {
        for s in [
            "",
            "kv",
            "kv:",
            "kv:READ",
            "kv:read ",
            "http:domain:",
            "http:domain:-bad.com",
            "http:domain:a..b",
            "http:domain:ex ample.com",
            "http:domain:*.com",
            "http:domain:*.0.0.1",
            "http:domain:*.168.1.10",
            "msg:publish:",
            "msg:publish:a..b",
            "msg:publish:a.>.b",
            "msg:subscribe:a b",
            "fs:read",
        ] {
            let err = s.parse::<Permission>().unwrap_err();
            assert_eq!(err.error_code, crate::ErrorCode::InvalidRequest, "{s:?}");
        }
    }

    #[test]
    fn wildcards_never_reach_ip_literals_and_internal_ips_need_their_own_grant() {
        // Even a wildcard that got past parsing (an older grant) cannot match an IP literal.
        let granted = [Permission::HttpRequest, Permission::HttpDomain("*.0.0.1".into())];
        assert!(!http_host_allowed(&granted, "127.0.0.1"));
        assert!(http_host_allowed(&granted, "a.0.0.1.example.0.0.1"));
        assert!("http:domain:*.example.co.uk".parse::<Permission>().is_ok());
        let granted: Vec<Permission> = vec!["http:request".parse().unwrap(), "http:domain:10.0.0.5".parse().unwrap()];
        assert!(http_ip_granted(&granted, "10.0.0.5".parse().unwrap()));
        assert!(http_ip_granted(&granted, "::ffff:10.0.0.5".parse().unwrap()), "IPv4-mapped is the same address");
        assert!(!http_ip_granted(&granted, "10.0.0.6".parse().unwrap()));
    }

    #[test]
    fn mixed_provider_permissions_are_rejected() {
        let err = parse_permissions(&["kv:read".into(), "http:request".into()]).unwrap_err();
        assert_eq!(err.error_code, crate::ErrorCode::InvalidRequest);
        assert!(parse_permissions(&[]).is_err());
    }

    #[test]
    fn domains_compare_case_insensitively() {
        let p: Permission = "http:domain:Example.COM".parse().unwrap();
        assert_eq!(p, Permission::HttpDomain("example.com".into()));
    }

    #[test]
    fn topic_wildcards() {
        assert!(topic_matches("a.*", "a.b"));
        assert!(!topic_matches("a.*", "a.b.c"));
        assert!(topic_matches("a.>", "a.b.c"));
        assert!(!topic_matches("a.>", "a"));
        assert!(!topic_matches("a", "a.b"));
        assert!(topic_matches("a.b", "a.b"));
    }

    #[test]
    fn pattern_coverage() {
        assert!(pattern_covers("a.>", "a.*.c"));
        assert!(pattern_covers("a.>", "a.>"));
        assert!(pattern_covers("a.*", "a.*"));
        assert!(pattern_covers("a.*", "a.b"));
        assert!(!pattern_covers("a.*", "a.>"));
        assert!(!pattern_covers("a.b", "a.*"));
        assert!(!pattern_covers("a.>", "a"));
        assert!(pattern_covers(">", "a"));
    }

    fn arb_permission() -> impl Strategy<Value = Permission> {
        let token = "[a-z0-9_-]{1,8}";
        prop_oneof![
            Just(Permission::KvRead),
            Just(Permission::KvWrite),
            Just(Permission::KvDelete),
            Just(Permission::HttpRequest),
            "[a-z0-9]{1,10}(\\.[a-z0-9]{1,10}){0,3}".prop_map(Permission::HttpDomain),
            prop::collection::vec(token, 1..4).prop_map(|t| Permission::MsgPublish(t.join("."))),
            prop::collection::vec(token, 1..4).prop_map(|t| Permission::MsgSubscribe(t.join("."))),
        ]
    }

    fn arb_pattern() -> impl Strategy<Value = String> {
        let token = prop_oneof![Just("a".to_string()), Just("b".to_string()), Just("*".to_string())];
        (prop::collection::vec(token, 1..4), any::<bool>()).prop_map(|(mut tokens, tail)| {
            if tail {
                tokens.push(">".into());
            }
            tokens.join(".")
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Feature: wasm-orchestrator, Property 4: Runtime Permission Enforcement
        /// A subscription pattern is allowed only if the granted pattern matches every topic the requested one
        /// matches: checked over every topic of up to five tokens from a small alphabet.
        #[test]
        fn covered_patterns_never_widen_a_grant(granted in arb_pattern(), requested in arb_pattern()) {
            let mut topics = vec![Vec::<&str>::new()];
            let mut all = Vec::new();
            for _ in 0..5 {
                topics = topics.iter().flat_map(|t| ["a", "b", "c"].map(|x| { let mut t = t.clone(); t.push(x); t })).collect();
                all.extend(topics.iter().map(|t| t.join(".")));
            }
            let matched_by_requested: Vec<&String> = all.iter().filter(|t| topic_matches(&requested, t)).collect();
            if pattern_covers(&granted, &requested) {
                for topic in &matched_by_requested {
                    prop_assert!(topic_matches(&granted, topic), "{} covers {} but not {}", granted, requested, topic);
                }
            } else if !requested.contains('*') && !requested.contains('>') {
                prop_assert!(!topic_matches(&granted, &requested));
            }
        }

        /// Feature: wasm-orchestrator, Property 18: API Request Validation
        /// Any string either parses to a permission that prints back to itself (modulo domain case) or is
        /// rejected with INVALID_REQUEST; parsing never panics.
        #[test]
        fn any_string_parses_or_is_invalid_request(s in "\\PC{0,40}") {
            match s.parse::<Permission>() {
                Ok(p) => prop_assert_eq!(p.to_string().to_ascii_lowercase(), s.to_ascii_lowercase()),
                Err(e) => prop_assert_eq!(e.error_code, crate::ErrorCode::InvalidRequest),
            }
        }

        /// Feature: wasm-orchestrator, Property 4: Runtime Permission Enforcement
        /// A permission set allows exactly what it contains (exact topics, no wildcards generated here).
        #[test]
        fn allows_is_membership(granted in prop::collection::vec(arb_permission(), 0..6), needed in arb_permission()) {
            prop_assert_eq!(allows(&granted, &needed), granted.contains(&needed));
        }

        /// Permissions survive their string round trip.
        #[test]
        fn display_parse_round_trip(p in arb_permission()) {
            prop_assert_eq!(p.to_string().parse::<Permission>().unwrap(), p);
        }

        /// Feature: wasm-orchestrator, Property 18: API Request Validation
        /// Fuzzing permission strings: anything parses to a permission that prints back as the same string
        /// (lower-cased domain) or is INVALID_REQUEST, never a panic.
        #[test]
        fn any_permission_string_parses_or_is_invalid(
            s in prop_oneof!["\\PC{0,40}", "(kv|http|msg):(read|write|request|domain|publish|subscribe):[a-z0-9.*>-]{0,20}"],
        ) {
            match s.parse::<Permission>() {
                Ok(p) => prop_assert_eq!(p.to_string().parse::<Permission>().unwrap(), p),
                Err(e) => prop_assert_eq!(e.error_code, crate::ErrorCode::InvalidRequest),
            }
        }

        /// Feature: wasm-orchestrator, Property 4: Runtime Permission Enforcement
        /// A host is reachable exactly when `http:request` is granted and a granted domain names it, exactly
        /// or as `*.parent` strictly above it; case and a trailing dot never change the answer, and a host
        /// that merely ends with an allowed name's characters (`evilexample.com`) is not below it.
        #[test]
        fn http_hosts_follow_the_allowlist(
            host in "[a-c]{1,2}(\\.[a-c]{1,2}){0,2}",
            domains in prop::collection::vec(("[a-c]{1,2}(\\.[a-c]{1,2}){0,2}", any::<bool>()), 0..4),
            request in any::<bool>(),
            upper in any::<bool>(), dot in any::<bool>(),
        ) {
            let mut granted: Vec<Permission> =
                domains.iter().map(|(d, wild)| Permission::HttpDomain(if *wild { format!("*.{d}") } else { d.clone() })).collect();
            if request {
                granted.push(Permission::HttpRequest);
            }
            let model = request && domains.iter().any(|(d, wild)| {
                if *wild { host.ends_with(&format!(".{d}")) } else { host == *d }
            });
            let mut asked = if upper { host.to_ascii_uppercase() } else { host.clone() };
            if dot {
                asked.push('.');
            }
            prop_assert_eq!(http_host_allowed(&granted, &asked), model);
        }
    }
}
