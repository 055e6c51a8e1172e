//! The monitor's own ledger of grants, kept from the agents' trace events (`factum_node_agent::trace_events`),
//! and the Property 4 oracle over it: every capability call that succeeded, and every message delivered, was
//! allowed by the grant in force at the instant the agent let it through; and its counterpart at the far end of
//! HTTP: a web host serves nothing that no grant ever named (the provider checks every redirect hop too).
//!
//! Property 17 at a provider host: every call it answered `ok` came from a node that held that very grant (the
//! same instance, capability and permissions) at some time, and the grant allows the operation. "At some
//! time", not "now": a host checks the seal, not the control plane's current registry, so a call let through
//! before a revoke may land after it. And no rogue call (`crate::rogue`) ever succeeds.
//!
//! The oracle is written apart from the product's permission code on purpose (its own topic matcher, its own
//! operation → permission table): a change to the product's rules must disagree with it, not follow it.

use std::collections::BTreeMap;

use factum_node_agent::trace_events::{AUTH, BOOT, CALL, DELIVER, FORGET, GRANT, GRANTS, REVOKE};
use factum_providers::remote::PROVIDED;
use factum_providers::REROUTED;

use crate::rogue::ROGUE;

/// The name of the ledger's P17 check; its other failures are P4's.
pub const P17: &str = "P17 provider_hosts_check_grants";

/// (node, instance) → capability → permission strings, as the agent applied them.
type Held = BTreeMap<(String, String), BTreeMap<String, Vec<String>>>;

/// Grants in force on every node, and the verdict on every call let through and not yet finished.
#[derive(Debug, Default)]
pub struct GrantLedger {
    held: Held,
    /// (node, call number) → why the call was not allowed when it was let through, if it was not.
    pending: BTreeMap<(String, String), Option<String>>,
    /// Every `http:domain:` a grant has named so far, on any node.
    domains_ever: std::collections::BTreeSet<String>,
    /// (node, instance, capability) → every permission set a grant of it has had on that node, sorted.
    grants_ever: BTreeMap<(String, String, String), std::collections::BTreeSet<Vec<String>>>,
}

impl GrantLedger {
    /// Applies one trace line; an error names a call that succeeded, or a message delivered, without the
    /// grant that allows it. Lines that are not agent capability events are ignored.
    pub fn apply(&mut self, line: &str) -> Result<(), String> {
        let Some((node, event, args)) = crate::trace::event_words(line) else { return Ok(()) };
        let node = node.to_string();
        match (event, args.as_slice()) {
            (BOOT, []) => self.held.retain(|(n, _), _| *n != node),
            (GRANTS, [instance, grants @ ..]) => {
                let set: BTreeMap<String, Vec<String>> = grants.iter().filter_map(|g| parse_grant(g)).collect();
                self.note_domains(set.values().flatten());
                for (cap, perms) in &set {
                    self.note_grant(&node, instance, cap, perms);
                }
                self.held.insert((node, instance.to_string()), set);
            }
            (GRANT, [instance, grant]) => {
                if let Some((cap, perms)) = parse_grant(grant) {
                    self.note_domains(perms.iter());
                    self.note_grant(&node, instance, &cap, &perms);
                    self.held.entry((node, instance.to_string())).or_default().insert(cap, perms);
                }
            }
            (REVOKE, [instance, cap]) => {
                if let Some(caps) = self.held.get_mut(&(node, instance.to_string())) {
                    caps.remove(*cap);
                }
            }
            (FORGET, [instance]) => {
                self.held.remove(&(node, instance.to_string()));
            }
            (AUTH, [call, instance, cap, operation, target]) => {
                let verdict = self.allowed(&node, instance, cap, operation, target).err();
                self.pending.insert((node, call.to_string()), verdict);
            }
            (CALL, [call, instance, cap, outcome]) => {
                let verdict = self.pending.remove(&(node.clone(), call.to_string()));
                if *outcome == "ok" {
                    match verdict {
                        Some(None) => {}
                        Some(Some(why)) => {
                            return Err(format!("{instance} on {node} called {cap} successfully but {why}: {line}"))
                        }
                        None => {
                            return Err(format!("{instance} on {node} called {cap} successfully unchecked: {line}"))
                        }
                    }
                }
            }
            (DELIVER, [instance, cap, topic]) => {
                self.allowed(&node, instance, cap, "deliver", topic)
                    .map_err(|why| format!("{instance} on {node} was handed a message on {topic} but {why}"))?;
            }
            (crate::web::SERVED, [method, path]) => {
                let named = |d: &String| match d.strip_prefix("*.") {
                    Some(parent) => node.ends_with(&format!(".{parent}")),
                    None => d.eq_ignore_ascii_case(&node),
                };
                if !self.domains_ever.iter().any(named) {
                    return Err(format!("{node} served {method} {path}, but no grant ever named {node}"));
                }
            }
            (PROVIDED, [caller, "ok", instance, cap, operation, perms]) => {
                let perms = sorted_perms(perms);
                let key = (caller.to_string(), instance.to_string(), cap.to_string());
                if !self.grants_ever.get(&key).is_some_and(|sets| sets.contains(&perms)) {
                    return Err(format!(
                        "{P17}: {node} answered {operation} for {instance} from {caller}, which never held {cap} \
                         as [{}]: {line}",
                        perms.join(",")
                    ));
                }
                if let Err(why) = permits(&perms, operation, "-") {
                    return Err(format!("{P17}: {node} answered {operation} for {instance} from {caller} but {why}"));
                }
            }
            (REROUTED, [_, operation, from, "->", to]) if !matches!(*operation, "get" | "list") => {
                return Err(format!(
                    "{P17}: {node} sent {operation} on to {to} after {from} did not answer; it may have taken \
                     effect at {from}, so it must not run again: {line}"
                ));
            }
            (ROGUE, [how, claimed, "ok"]) => {
                return Err(format!("{P17}: a rogue call claiming {claimed} succeeded with a {how} grant: {line}"));
            }
            _ => {}
        }
        Ok(())
    }

    fn note_grant(&mut self, node: &str, instance: &str, cap: &str, perms: &[String]) {
        let mut perms = perms.to_vec();
        perms.sort();
        self.grants_ever.entry((node.to_string(), instance.to_string(), cap.to_string())).or_default().insert(perms);
    }

    fn note_domains<'a>(&mut self, perms: impl Iterator<Item = &'a String>) {
        let domains = perms.filter_map(|p| p.strip_prefix("http:domain:"));
        self.domains_ever.extend(domains.map(str::to_string));
    }

    /// Whether the ledger lets `instance` on `node` do `operation` on `target` through `cap` now.
    fn allowed(&self, node: &str, instance: &str, cap: &str, operation: &str, target: &str) -> Result<(), String> {
        let perms = self
            .held
            .get(&(node.to_string(), instance.to_string()))
            .and_then(|caps| caps.get(cap))
            .ok_or_else(|| format!("it held no {cap} then"))?;
        permits(perms, operation, target).map_err(|why| format!("its {cap} grant {why}"))
    }
}

/// Whether permission strings `perms` allow `operation` on `target`.
fn permits(perms: &[String], operation: &str, target: &str) -> Result<(), String> {
    let has = |p: &str| perms.iter().any(|g| g == p);
    let pattern_of = |kind: &str| {
        let prefix = format!("msg:{kind}:");
        perms.iter().filter_map(move |g| g.strip_prefix(&prefix).map(str::to_string)).collect::<Vec<_>>()
    };
    let ok = match operation {
        "get" | "list" => has("kv:read"),
        "set" => has("kv:write"),
        "delete" => has("kv:delete"),
        "request" => has("http:request"),
        "publish" => pattern_of("publish").iter().any(|p| covers(p, target)),
        "subscribe" => pattern_of("subscribe").iter().any(|p| covers(p, target)),
        "deliver" => pattern_of("subscribe").iter().any(|p| covers(p, target)),
        "unsubscribe" => true,
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(format!("[{}] does not allow {operation} {target}", perms.join(",")))
    }
}

/// A `provided` event's permissions (`-`: none), sorted.
fn sorted_perms(word: &str) -> Vec<String> {
    let mut perms: Vec<String> = word.split(',').filter(|p| !p.is_empty() && *p != "-").map(str::to_string).collect();
    perms.sort();
    perms
}

/// `cap=perm,perm` (no permissions: `cap=`).
fn parse_grant(word: &str) -> Option<(String, Vec<String>)> {
    let (cap, perms) = word.split_once('=')?;
    Some((cap.to_string(), perms.split(',').filter(|p| !p.is_empty()).map(str::to_string).collect()))
}

/// Whether NATS-style `pattern` matches everything `requested` (a topic or a pattern) can: `*` is one token
/// of anything but `>`, a final `>` one or more tokens.
fn covers(pattern: &str, requested: &str) -> bool {
    let p: Vec<&str> = pattern.split('.').collect();
    let r: Vec<&str> = requested.split('.').collect();
    for (i, token) in p.iter().enumerate() {
        let Some(other) = r.get(i) else { return false };
        match *token {
            ">" => return i + 1 == p.len(),
            "*" if *other != ">" => {}
            literal if literal == *other && literal != "*" => {}
            _ => return false,
        }
    }
    p.len() == r.len()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn run(lines: &[&str]) -> Result<(), String> {
        let mut ledger = GrantLedger::default();
        lines.iter().try_for_each(|l| ledger.apply(&format!("  1.000s {l}")))
    }

    #[test]
    fn a_web_host_no_grant_named_must_serve_nothing() {
        let e = run(&["n grants i web=http:request,http:domain:web", "intranet served GET /secret"]).unwrap_err();
        assert!(e.contains("no grant ever named intranet"), "{e}");
        run(&["n grants i web=http:request,http:domain:web", "web served GET /hello"]).unwrap();
        // Revoked since, but it was named: a request authorised before the revoke may arrive after it.
        run(&["n grant i w=http:request,http:domain:*.corp", "n revoke i w", "api.corp served GET /"]).unwrap();
    }

    #[test]
    fn a_provider_host_answers_only_grants_their_node_held() {
        let held = "n grants i kv=kv:write,kv:read";
        // Permissions in any order; a revoke since does not matter (the host checks the seal, not the registry).
        run(&[held, "n revoke i kv", "kv-host provided n ok i kv set kv:read,kv:write"]).unwrap();
        run(&[held, "kv-host provided m PermissionDenied i kv set kv:write,kv:read"]).unwrap();
        for (bent, why) in [
            ("kv-host provided m ok i kv set kv:write,kv:read", "which never held kv"),
            ("kv-host provided n ok j kv set kv:write,kv:read", "which never held kv"),
            ("kv-host provided n ok i kv set kv:write,kv:read,kv:delete", "which never held kv"),
            ("kv-host provided n ok i kv delete kv:write,kv:read", "does not allow delete"),
        ] {
            let e = run(&[held, bent]).unwrap_err();
            assert!(e.starts_with(P17) && e.contains(why), "{bent}: {e}");
        }
        let e = run(&["rogue rogue widened n ok"]).unwrap_err();
        assert!(e.starts_with(P17), "{e}");
        run(&["rogue rogue widened n PermissionDenied"]).unwrap();
    }

    #[test]
    fn only_reads_go_on_to_another_provider_host() {
        run(&["n rerouted kv get kv-1 -> kv-2", "n rerouted kv list kv-2 -> kv-1"]).unwrap();
        for write in ["n rerouted kv set kv-1 -> kv-2", "n rerouted kv delete kv-1 -> kv-2"] {
            let e = run(&[write]).unwrap_err();
            assert!(e.starts_with(P17) && e.contains("must not run again"), "{write}: {e}");
        }
    }

    #[test]
    fn a_call_under_its_grant_passes_even_if_revoked_before_it_finishes() {
        run(&["n grants i kv=kv:read,kv:write", "n auth 0 i kv set -", "n revoke i kv", "n call 0 i kv ok"]).unwrap();
    }

    #[test]
    fn a_call_let_through_after_a_revoke_is_caught() {
        let e = run(&["n grants i kv=kv:write", "n revoke i kv", "n auth 0 i kv set -", "n call 0 i kv ok"]);
        assert!(e.unwrap_err().contains("held no kv"));
    }

    #[test]
    fn the_operation_needs_its_own_permission() {
        let e = run(&["n grants i kv=kv:read", "n auth 3 i kv set -", "n call 3 i kv ok"]).unwrap_err();
        assert!(e.contains("does not allow set"), "{e}");
        run(&["n grants i kv=kv:read", "n auth 3 i kv set -", "n call 3 i kv PERMISSION_DENIED"]).unwrap();
    }

    #[test]
    fn a_reboot_or_a_forget_drops_everything_held() {
        let after_boot = run(&["n grants i kv=kv:read", "n boot", "n auth 0 i kv get -", "n call 0 i kv ok"]);
        assert!(after_boot.is_err());
        let after_forget = run(&["n grants i kv=kv:read", "n forget i", "n auth 0 i kv get -", "n call 0 i kv ok"]);
        assert!(after_forget.is_err());
        // Another node's reboot changes nothing here.
        run(&["n grants i kv=kv:read", "m boot", "n auth 0 i kv get -", "n call 0 i kv ok"]).unwrap();
    }

    #[test]
    fn a_success_with_no_authorization_is_caught() {
        assert!(run(&["n grants i kv=kv:read", "n call 9 i kv ok"]).is_err());
    }

    #[test]
    fn topics_follow_nats_rules() {
        assert!(covers("orders.>", "orders.eu.1"));
        assert!(covers("orders.>", "orders.*.eu"));
        assert!(!covers("orders.>", "orders"));
        assert!(covers("orders.*", "orders.eu"));
        assert!(!covers("orders.*", "orders.>"));
        assert!(!covers("orders.*", "orders.eu.1"));
        assert!(covers("a.b", "a.b"));
        assert!(!covers("a.b", "a.*"));
        let e = run(&["n grants i m=msg:publish:a.*", "n auth 0 i m publish b.c", "n call 0 i m ok"]);
        assert!(e.is_err());
        let e = run(&["n grants i m=msg:subscribe:a.*", "n deliver i m a.b.c"]);
        assert!(e.is_err());
        run(&["n grants i m=msg:subscribe:a.>", "n deliver i m a.b.c"]).unwrap();
    }
}
