//! Which snapshots of a node are still news. A node's snapshots are numbered per run of its agent process
//! (boot); one that arrives after a newer one (sent on a connection given up for dead, say) would make the
//! instances started since look lost, so it is not applied. The newest one's facts are kept, so the node's next
//! heartbeat can be a delta against it ([`factum_proto::delta`]).

use std::collections::VecDeque;

use factum_proto::{delta, NodeReport};

/// Boots retired per node: a snapshot from one of them is stale. A few suffice: a late snapshot outlives its
/// connection by seconds, not by many agent restarts.
const RETIRED_BOOTS: usize = 8;

/// The newest snapshot applied from one node, so a late one is not applied after it (its missing instances
/// would look lost).
#[derive(Debug, Clone, Default)]
pub(crate) struct Snapshots {
    /// (boot, sequence) of the newest snapshot applied.
    newest: Option<(u64, u64)>,
    /// Boots of the node's earlier runs, newest last.
    retired: VecDeque<u64>,
    /// The facts of the newest snapshot applied; `None` while lent out to be merged ([`Snapshots::take_in`]).
    facts: Option<delta::SnapshotFacts>,
}

impl Snapshots {
    /// Whether snapshot `sequence` of run `boot` is newer than every one applied; if so it becomes the newest.
    fn admit(&mut self, boot: u64, sequence: u64) -> bool {
        if self.retired.contains(&boot) {
            return false;
        }
        match self.newest {
            Some((b, s)) if b == boot && sequence <= s => return false,
            Some((b, _)) if b != boot => {
                self.retired.push_back(b);
                if self.retired.len() > RETIRED_BOOTS {
                    self.retired.pop_front();
                }
            }
            _ => {}
        }
        self.newest = Some((boot, sequence));
        true
    }

    /// Whether snapshot `sequence` of run `boot` is the newest applied, and its facts are held: a delta may be
    /// taken against it.
    pub(crate) fn holds(&self, boot: u64, sequence: u64) -> bool {
        self.newest == Some((boot, sequence)) && self.facts.is_some()
    }

    /// The whole of `report`'s snapshot if it is newer than every one applied (see [`Snapshots::admit`]): a full
    /// one as it is, a delta applied to the facts held (the caller checked that they are its base, see
    /// [`Snapshots::holds`]); the report's facts move out of it. The facts are lent out, to be merged without
    /// a copy: give them back with [`Snapshots::keep`], or the next delta finds no base and the node sends a
    /// full snapshot.
    pub(crate) fn take_in(&mut self, report: &mut NodeReport) -> Option<delta::SnapshotFacts> {
        if !self.admit(report.boot, report.sequence) {
            return None;
        }
        let mut facts = self.facts.take().unwrap_or_default();
        delta::apply(&mut facts, report);
        Some(facts)
    }

    /// Holds `facts`, lent out by [`Snapshots::take_in`], again.
    pub(crate) fn keep(&mut self, facts: delta::SnapshotFacts) {
        self.facts = Some(facts);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_newer_snapshots_of_the_current_run_are_admitted() {
        let mut snapshots = Snapshots::default();
        assert!(snapshots.admit(7, 1));
        assert!(snapshots.admit(7, 3));
        assert!(!snapshots.admit(7, 2), "older than one applied");
        assert!(!snapshots.admit(7, 3), "the same one again");
        assert!(snapshots.admit(9, 1), "the node restarted");
        assert!(!snapshots.admit(7, 4), "a run that has ended");
        assert!(snapshots.admit(9, 2));
    }

    #[test]
    fn a_delta_applies_to_the_snapshot_held() {
        let facts = |id: &str| factum_proto::InstanceFacts {
            metadata: factum_proto::InstanceMetadata {
                instance_id: id.into(),
                node_id: "n".into(),
                module_hash: "h".into(),
                created_at: 0,
                status: factum_proto::InstanceStatus::Running,
                restarts: 0,
                last_error: None,
                restart_streak: 0,
                backoff_ms: None,
            },
            capabilities: Vec::new(),
            restart_policy: Default::default(),
            config: Default::default(),
            constraints: Default::default(),
            seq: 1,
            epoch: 1,
            lease: None,
            accepted_after: Default::default(),
            seal: Default::default(),
        };
        let report = |sequence, base, instances: Vec<factum_proto::InstanceFacts>, removed: &[&str]| NodeReport {
            protocol_version: factum_proto::PROTOCOL_VERSION,
            node_id: "n".into(),
            agent_addr: "h:1".into(),
            max_instances: 9,
            labels: Default::default(),
            drained: false,
            instances,
            boot: 7,
            sequence,
            base,
            removed: removed.iter().map(|s| s.to_string()).collect(),
        };
        let ids = |v: delta::SnapshotFacts| v.into_keys().collect::<Vec<_>>();
        let mut snapshots = Snapshots::default();
        let full = snapshots.take_in(&mut report(1, None, vec![facts("a"), facts("b")], &[])).unwrap();
        assert!(!snapshots.holds(7, 1), "lent out");
        snapshots.keep(full.clone());
        assert_eq!(ids(full), ["a", "b"]);
        assert!(snapshots.holds(7, 1) && !snapshots.holds(7, 0));
        let mut delta = report(2, Some(1), vec![facts("c")], &["a"]);
        let applied = snapshots.take_in(&mut delta).unwrap();
        snapshots.keep(applied.clone());
        assert_eq!(ids(applied), ["b", "c"]);
        assert_eq!(snapshots.take_in(&mut delta), None, "the same one again");
        assert!(snapshots.holds(7, 2));
    }

    #[test]
    fn retired_runs_are_bounded() {
        let mut snapshots = Snapshots::default();
        for boot in 0..=RETIRED_BOOTS as u64 + 1 {
            assert!(snapshots.admit(boot, 1));
        }
        assert_eq!(snapshots.retired.len(), RETIRED_BOOTS);
        assert!(snapshots.admit(0, 2), "forgotten after RETIRED_BOOTS newer runs");
    }
}
