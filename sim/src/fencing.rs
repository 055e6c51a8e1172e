//! Property 12's fencing rule, checked on the trace: once the registry has expired a node's lease, the control
//! plane may run that node's reschedulable instances elsewhere, so the node must not act on them any more: no
//! capability call let through, no message delivered, no start or restart, until it registers under a new
//! lease. Instances with policy `never` are never rescheduled and may go on.
//!
//! It is checked on events, not samples, because the window it guards is short: a process that wakes from a
//! pause past its deadline acts within the same instant, before any sample could see it.

use std::collections::{BTreeMap, BTreeSet};

use factum_node_agent::trace_events::{AUTH, BOOT, DELIVER, FORGET};

/// What the trace has said so far about leases and the instances acting under them.
#[derive(Debug, Default)]
pub struct LeaseWatch {
    /// Node → the lease it registered under and has not given up (by fencing or restarting).
    held: BTreeMap<String, i64>,
    /// Leases the registry has expired.
    expired: BTreeSet<i64>,
    /// (node, instance) → whether its policy lets the control plane reschedule it.
    reschedulable: BTreeMap<(String, String), bool>,
}

impl LeaseWatch {
    /// Applies one trace line; an error names an action a node took on a reschedulable instance after the
    /// registry expired the lease it held.
    pub fn apply(&mut self, line: &str) -> Result<(), String> {
        let Some((component, event, args)) = crate::trace::event_words(line) else { return Ok(()) };
        let node = component.to_string();
        let action = match (event, args.as_slice()) {
            ("registry", ["lease", lease, "expired"]) => {
                if let Ok(lease) = lease.parse() {
                    self.expired.insert(lease);
                }
                return Ok(());
            }
            ("registered", [_, lease]) => {
                if let Some(lease) = lease.strip_prefix("lease=").and_then(|l| l.parse().ok()) {
                    self.held.insert(node, lease);
                }
                return Ok(());
            }
            (BOOT, []) => {
                self.held.remove(&node);
                self.reschedulable.retain(|(n, _), _| *n != node);
                return Ok(());
            }
            ("fence", _) => {
                self.held.remove(&node);
                return Ok(());
            }
            (FORGET, [instance]) => {
                self.reschedulable.remove(&(node, instance.to_string()));
                return Ok(());
            }
            ("status", [instance, status, .., policy]) => {
                let Some(policy) = policy.strip_prefix("policy=") else { return Ok(()) };
                self.reschedulable.insert((node.clone(), instance.to_string()), policy != "never");
                if !matches!(*status, "starting" | "running") {
                    return Ok(());
                }
                (instance.to_string(), format!("went {status}"))
            }
            (AUTH, [_, instance, cap, operation, _]) => {
                (instance.to_string(), format!("was let call {cap} {operation}"))
            }
            (DELIVER, [instance, _, topic]) => (instance.to_string(), format!("was handed a message on {topic}")),
            _ => return Ok(()),
        };
        let (instance, what) = action;
        let Some(lease) = self.held.get(&node) else { return Ok(()) };
        let reschedulable = self.reschedulable.get(&(node.clone(), instance.clone())).copied().unwrap_or(false);
        if reschedulable && self.expired.contains(lease) {
            return Err(format!(
                "{instance} on {node} {what} after the registry expired the node's lease {lease} (it may run \
                 elsewhere now): {line}"
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(watch: &mut LeaseWatch, lines: &[&str]) -> Result<(), String> {
        lines.iter().try_for_each(|l| watch.apply(l))
    }

    const START: [&str; 3] = [
        "0.100s agent-1        registered agent-1 lease=3",
        "0.200s agent-1        status i starting seq=1 restarts=0 policy=always",
        "0.300s agent-1        status i running seq=2 restarts=0 policy=always",
    ];

    #[test]
    fn a_call_after_expiry_without_a_fence_fails() {
        let mut watch = LeaseWatch::default();
        feed(&mut watch, &START).unwrap();
        watch.apply("2.000s etcd           registry lease 3 expired").unwrap();
        let err = watch.apply("2.001s agent-1        auth 7 i kv set -").unwrap_err();
        assert!(err.contains("lease 3"), "{err}");
    }

    #[test]
    fn fencing_first_or_a_never_policy_is_fine() {
        let mut watch = LeaseWatch::default();
        feed(&mut watch, &START).unwrap();
        watch.apply("0.300s agent-1        status n running seq=1 restarts=0 policy=never").unwrap();
        watch.apply("1.600s agent-1        fence agent-1 dropped=1").unwrap();
        watch.apply("2.000s etcd           registry lease 3 expired").unwrap();
        watch.apply("2.001s agent-1        auth 8 n kv get -").unwrap();
        let mut unfenced = LeaseWatch::default();
        feed(&mut unfenced, &START).unwrap();
        unfenced.apply("0.300s agent-1        status n running seq=1 restarts=0 policy=never").unwrap();
        unfenced.apply("2.000s etcd           registry lease 3 expired").unwrap();
        unfenced.apply("2.001s agent-1        auth 8 n kv get -").unwrap();
    }

    #[test]
    fn a_new_lease_acts_again() {
        let mut watch = LeaseWatch::default();
        feed(&mut watch, &START).unwrap();
        watch.apply("2.000s etcd           registry lease 3 expired").unwrap();
        watch.apply("2.100s agent-1        registered agent-1 lease=4").unwrap();
        watch.apply("2.200s agent-1        status i starting seq=3 restarts=1 policy=always").unwrap();
    }
}
