//! How execution facts from agents update the control plane's maps. Facts only move forward: a fact is applied
//! when its `(epoch, seq)` is newer than the one held (or equal, for full snapshots, which restate the truth),
//! so duplicated or reordered reports never roll a status back (P13, P14), and facts from a node that ran an
//! older placement of a rescheduled instance never overwrite those of its new node. A fact counts only with
//! its placement's seal (see [`crate::seal`]): the epochs that order facts are the ones this control plane
//! issued.

use std::collections::BTreeSet;

use factum_env::rpc::hello::AUDIT;
use factum_proto::{InstanceFacts, InstanceStatus, PlacementSeal, SnapshotMark, StatusReport};

use crate::reschedule::{restartable, Retry};
use crate::{InstanceRecord, State};

/// Applies one instance's facts from `node_id`. Unknown instances are added with their assignments: this is
/// how the maps are rebuilt after a control-plane restart (unless `learn` is off). `restating` accepts an equal
/// sequence number.
pub(crate) fn apply_facts(state: &mut State, node_id: &str, facts: &InstanceFacts, restating: bool, learn: bool) {
    let id = facts.metadata.instance_id.clone();
    if state.instances.get(&id).is_some_and(|r| restates(r, state.capabilities.get(&id), node_id, facts)) {
        // Writing it again would change nothing, but would still count as a write: every heartbeat would make
        // the event feed and the node index look at every instance of its node. Nor is its seal checked (most
        // of a heartbeat's cost): whatever the seal, applying it changes nothing.
        return;
    }
    if !sealed(state, node_id, &id, facts.epoch, facts.seal) {
        return;
    }
    match state.instances.get_mut(&id) {
        Some(record) => {
            if facts.epoch < record.epoch || (facts.epoch == record.epoch && record.metadata.node_id != node_id) {
                return; // an older placement, or a node that does not hold this one
            }
            let moved = facts.epoch > record.epoch;
            let newer = |held: u64| moved || facts.seq > held || (restating && facts.seq == held);
            // Assignments have their own watermark: a status report may overtake the answer to a grant, and
            // the grant must still land. The agent enforces them, so its word wins.
            if newer(record.caps_seq) && state.injected != Some(crate::InjectedBug::FrozenCapabilities) {
                let capabilities = facts.capabilities.iter().map(|c| (c.capability_id.clone(), c.clone())).collect();
                state.capabilities.insert(id.clone(), capabilities);
                record.caps_seq = facts.seq;
            }
            if newer(record.seq) {
                // An agent holds this placement: it is placed, and no longer in doubt.
                if record.retry.take().is_some_and(|(_, why)| why == Retry::Resend) {
                    state.pending_starts.remove(&id);
                }
                let stuck = state.injected == Some(crate::InjectedBug::StickyUnknown)
                    && record.metadata.status == InstanceStatus::Unknown;
                record.metadata = facts.metadata.clone();
                record.accepted_after = Some(facts.accepted_after);
                if stuck {
                    record.metadata.status = InstanceStatus::Unknown;
                }
                record.seq = facts.seq;
                record.lease = facts.lease;
            } else {
                // An older status, but when the agent accepted this placement never changes: take its word,
                // so the answer to a start still replaces the control plane's own guess even when the
                // instance's later reports overtook it.
                record.metadata.created_at = facts.metadata.created_at;
                record.accepted_after = Some(facts.accepted_after);
            }
            record.epoch = facts.epoch;
        }
        None if !learn => {}
        None => {
            tracing::info!(instance_id = %id, node = node_id, status = %facts.metadata.status, "instance learned from agent");
            let capabilities = facts.capabilities.iter().map(|c| (c.capability_id.clone(), c.clone())).collect();
            state.capabilities.insert(id.clone(), capabilities);
            let record = InstanceRecord {
                metadata: facts.metadata.clone(),
                restart_policy: facts.restart_policy,
                config: facts.config.clone(),
                constraints: facts.constraints.clone(),
                seq: facts.seq,
                caps_seq: facts.seq,
                epoch: facts.epoch,
                lease: facts.lease,
                retry: None,
                placement_failures: 0,
                accepted_after: Some(facts.accepted_after),
                reported: false,
                ended_since: None,
            };
            state.instances.insert(id, record);
        }
    }
}

/// Whether `facts` say exactly what the control plane holds of that placement (a heartbeat's usual content),
/// so that applying them would write only what is there.
fn restates(
    record: &InstanceRecord,
    held: Option<&std::collections::BTreeMap<String, factum_proto::CapabilityAssignment>>,
    node_id: &str,
    facts: &InstanceFacts,
) -> bool {
    let same_capabilities = match held {
        Some(held) => {
            held.len() == facts.capabilities.len()
                && facts.capabilities.iter().all(|c| held.get(&c.capability_id) == Some(c))
        }
        None => false, // applying them would add an (empty) entry
    };
    record.epoch == facts.epoch
        && record.metadata.node_id == node_id
        && record.seq == facts.seq
        && record.caps_seq == facts.seq
        && record.retry.is_none()
        && record.lease == facts.lease
        && record.accepted_after == Some(facts.accepted_after)
        && record.metadata == facts.metadata
        && same_capabilities
}

/// Applies one status report. Reports about instances the control plane does not know are dropped: the
/// agent's next snapshot carries them with their assignments.
pub(crate) fn apply_report(state: &mut State, report: StatusReport) {
    let sticky = state.injected == Some(crate::InjectedBug::StickyRunning);
    let stuck = state.injected == Some(crate::InjectedBug::StickyUnknown);
    if !sealed(state, &report.node_id, &report.instance_id, report.epoch, report.seal) {
        return;
    }
    let Some(record) = state.instances.get_mut(&report.instance_id) else { return };
    let same_placement = report.epoch == record.epoch && record.metadata.node_id == report.node_id;
    if report.epoch < record.epoch || (report.epoch == record.epoch && !same_placement) {
        return; // from an older placement
    }
    if report.epoch > record.epoch {
        record.accepted_after = None; // what is held is an older placement's
    }
    record.reported = true; // even if stale: what matters is that the agent had accepted this placement
    if same_placement && report.seq <= record.seq {
        return;
    }
    record.epoch = report.epoch;
    record.metadata.node_id = report.node_id;
    let held = record.metadata.status;
    if !(sticky && held == InstanceStatus::Running || stuck && held == InstanceStatus::Unknown) {
        record.metadata.status = report.status;
    }
    record.metadata.restarts = report.restarts;
    record.metadata.last_error = report.last_error;
    record.metadata.restart_streak = report.restart_streak;
    record.metadata.backoff_ms = report.backoff_ms;
    record.seq = report.seq;
}

/// Whether a fact from `node_id` about placement `epoch` of `instance_id` carries the seal this control plane
/// gave that placement. One that does not is refused, and audited: no node sends one by mistake.
fn sealed(state: &State, node_id: &str, instance_id: &str, epoch: u64, seal: PlacementSeal) -> bool {
    let sealed = state.placement_key.verifies(instance_id, node_id, epoch, seal);
    if !sealed {
        tracing::warn!(target: AUDIT, node = node_id, instance_id, epoch, result = "PERMISSION_DENIED",
            "fact refused: its placement (instance, node, epoch) was not issued by this control plane");
    }
    sealed
}

/// Where a snapshot came from, which decides what its lacking an instance means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// The agent's own heartbeat, numbered by `mark`. The agent sends heartbeats and status reports from one
    /// task, each after the last was answered, so they arrive in the order they were taken: a heartbeat judges.
    Heartbeat(SnapshotMark),
    /// A listing the control plane asked for (`sync_node`). It is answered beside that task: taken just before
    /// a start landed, it can arrive after that run's reports and would make the run look lost (swarm seed
    /// 1403002923: a second restart on top of the agent's own, past `max_retries`). What it holds is applied;
    /// what it lacks waits for the next heartbeat.
    Listing(SnapshotMark),
}

/// Merges a node's full snapshot. Instances the control plane placed on that node which a heartbeat lacks
/// (and whose start is not in flight) were lost with the node's previous life: a first placement no agent ever
/// confirmed is forgotten (its start never happened, so the id is free again); anything else becomes `crashed`
/// with the reason, and is marked to run again if its policy calls for it. A rescheduled instance whose new
/// start failed is not forgotten: it existed before.
///
/// A heartbeat taken before the agent accepted the placement (its number is at most the placement's
/// [`InstanceFacts::accepted_after`]) says nothing about it: the start's answer travels on another connection
/// and can overtake it (agent_crash seed 7, once reports were coalesced: a running instance shown `crashed`,
/// and the next start placed beside it). Snapshot numbers order this, not wall clocks, which jump (seed
/// 1602005656).
pub(crate) fn merge_snapshot(
    state: &mut State,
    node_id: &str,
    snapshot: &[&InstanceFacts],
    learn: bool,
    source: Source,
) {
    let (Source::Heartbeat(numbered) | Source::Listing(numbered)) = source;
    let snapshot = crate::removal::screen(state, node_id, numbered, snapshot);
    crate::removal::note_stale_copies(state, node_id, &snapshot);
    let present: BTreeSet<&str> = snapshot.iter().map(|f| f.metadata.instance_id.as_str()).collect();
    for facts in snapshot {
        apply_facts(state, node_id, facts, true, learn);
    }
    let mark = match source {
        Source::Heartbeat(mark) => mark,
        // The injected bug lets a listing judge as if it were the newest heartbeat.
        Source::Listing(_) if state.injected == Some(crate::InjectedBug::AcceptStaleSnapshots) => {
            SnapshotMark { boot: 0, sequence: u64::MAX }
        }
        Source::Listing(_) => return,
    };
    state.by_node.refresh(&mut state.instances);
    let missing: Vec<String> = state
        .by_node
        .held_by(node_id)
        .filter(|id| !present.contains(id.as_str()) && !state.pending_starts.contains(*id))
        .filter(|id| !state.instances.get(*id).is_some_and(|r| r.accepted_after.is_some_and(|a| mark.predates(a))))
        .cloned()
        .collect();
    for id in missing {
        let forget = state.instances.get(&id).is_some_and(|r| r.seq == 0 && r.epoch == 1);
        if forget {
            state.instances.remove(&id);
            state.capabilities.remove(&id);
        } else if let Some(record) = state.instances.get_mut(&id) {
            if record.metadata.status != InstanceStatus::Crashed {
                tracing::warn!(instance_id = %id, node = node_id, "instance lost: its node no longer runs it");
                record.metadata.status = InstanceStatus::Crashed;
                record.metadata.last_error = Some(format!("lost: node {node_id} no longer runs it"));
            }
            // Nothing runs it now; its policy may call for another run, once an agent is known to have held it.
            let held = record.reported || record.accepted_after.is_some();
            if held && record.retry.is_none() && restartable(record) {
                record.retry = Some((std::time::Duration::ZERO, Retry::Restart));
            }
        }
    }
}

/// The node stopped reporting: what it runs is no longer known.
pub(crate) fn mark_node_unknown(state: &mut State, node_id: &str) {
    let ended_too = state.injected == Some(crate::InjectedBug::UnknownEndedRuns);
    state.by_node.refresh(&mut state.instances);
    let State { by_node, instances, .. } = state;
    for id in by_node.held_by(node_id) {
        let unknown = instances.get(id).is_some_and(|r| {
            r.metadata.status != InstanceStatus::Unknown && (ended_too || !r.metadata.status.is_terminal())
        });
        if let Some(record) = instances.get_mut(id).filter(|_| unknown) {
            record.metadata.status = InstanceStatus::Unknown;
        }
    }
}

#[cfg(test)]
mod tests {
    use factum_proto::{InstanceMetadata, PolicyType, RestartPolicy};

    use super::*;

    /// `s1`, rescheduled onto `n1` at epoch 3 and not yet answered, with an `always` policy.
    fn placed() -> State {
        let mut state = State::default();
        let metadata = InstanceMetadata {
            instance_id: "s1".into(),
            node_id: "n1".into(),
            module_hash: "h".into(),
            created_at: 0,
            status: InstanceStatus::Starting,
            restarts: 1,
            last_error: None,
            restart_streak: 0,
            backoff_ms: None,
        };
        let record = InstanceRecord {
            metadata,
            restart_policy: RestartPolicy { policy_type: PolicyType::Always, ..RestartPolicy::default() },
            config: Default::default(),
            constraints: Default::default(),
            seq: 0,
            caps_seq: 0,
            epoch: 3,
            lease: None,
            retry: None,
            placement_failures: 0,
            accepted_after: None,
            reported: false,
            ended_since: None,
        };
        state.instances.insert("s1".into(), record);
        state
    }

    fn report(status: InstanceStatus, seq: u64) -> StatusReport {
        StatusReport {
            instance_id: "s1".into(),
            node_id: "n1".into(),
            status,
            timestamp: 1005,
            seq,
            restarts: 1,
            last_error: None,
            epoch: 3,
            restart_streak: 0,
            backoff_ms: None,
            seal: crate::PlacementKey::plaintext().seal("s1", "n1", 3),
        }
    }

    const HEARTBEAT: Source = Source::Heartbeat(SnapshotMark { boot: 9, sequence: 20 });

    #[test]
    fn a_heartbeat_that_restates_what_is_held_writes_nothing() {
        let mut state = placed();
        let record = &state.instances["s1"];
        let facts = InstanceFacts {
            metadata: InstanceMetadata { status: InstanceStatus::Running, ..record.metadata.clone() },
            capabilities: Vec::new(),
            restart_policy: record.restart_policy,
            config: Default::default(),
            constraints: Default::default(),
            seq: 2,
            epoch: 3,
            lease: None,
            accepted_after: SnapshotMark { boot: 9, sequence: 5 },
            seal: crate::PlacementKey::plaintext().seal("s1", "n1", 3),
        };
        apply_facts(&mut state, "n1", &facts, true, true);
        assert_eq!(state.instances["s1"].metadata.status, InstanceStatus::Running);
        state.instances.take_touched();
        state.capabilities.take_touched();
        apply_facts(&mut state, "n1", &facts, true, true);
        assert!(state.instances.take_touched().is_empty(), "nothing new: nothing written");
        assert!(state.capabilities.take_touched().is_empty());
        // What the control plane changed on its own (the node went silent) is not a restatement: written back.
        mark_node_unknown(&mut state, "n1");
        assert_eq!(state.instances["s1"].metadata.status, InstanceStatus::Unknown);
        apply_facts(&mut state, "n1", &facts, true, true);
        assert_eq!(state.instances["s1"].metadata.status, InstanceStatus::Running);
    }

    #[test]
    fn a_listing_that_lacks_a_reported_run_changes_nothing() {
        // Seed 1403002923: a listing taken just before the start arrives after the run's reports.
        let mut state = placed();
        apply_report(&mut state, report(InstanceStatus::Running, 2));
        merge_snapshot(&mut state, "n1", &[], true, Source::Listing(SnapshotMark { boot: 9, sequence: 20 }));
        let record = &state.instances["s1"];
        assert_eq!(record.metadata.status, InstanceStatus::Running);
        assert_eq!(record.retry, None, "the agent applies its own policy; no second restart");
    }

    #[test]
    fn a_heartbeat_that_lacks_a_reported_run_restarts_it() {
        let mut state = placed();
        apply_report(&mut state, report(InstanceStatus::Running, 2));
        merge_snapshot(&mut state, "n1", &[], true, HEARTBEAT);
        let record = &state.instances["s1"];
        assert_eq!(record.metadata.status, InstanceStatus::Crashed);
        assert_eq!(record.retry, Some((std::time::Duration::ZERO, Retry::Restart)));
    }

    #[test]
    fn a_heartbeat_taken_before_the_agent_accepted_says_nothing() {
        // Agent_crash seed 7: the start's answer overtook a heartbeat taken before the start landed.
        for (boot, sequence, lost) in [(9, 20, false), (9, 19, true), (8, 20, true)] {
            let mut state = placed();
            let record = state.instances.get_mut("s1").unwrap();
            record.metadata.status = InstanceStatus::Running;
            record.accepted_after = Some(SnapshotMark { boot, sequence });
            merge_snapshot(&mut state, "n1", &[], true, HEARTBEAT);
            let record = &state.instances["s1"];
            let status = if lost { InstanceStatus::Crashed } else { InstanceStatus::Running };
            assert_eq!(record.metadata.status, status, "accepted after snapshot {sequence} of boot {boot}");
            assert_eq!(record.retry.is_some(), lost);
        }
    }

    #[test]
    fn a_snapshot_taken_before_a_removal_does_not_bring_the_instance_back() {
        let mut state = placed();
        let held = state.instances.remove("s1").unwrap();
        let removed_at = SnapshotMark { boot: 9, sequence: 20 };
        let nodes = [("n1".to_string(), Some(removed_at))].into();
        state.removed.insert("s1".into(), crate::removal::Tombstone { epoch: 3, nodes });
        let facts = InstanceFacts {
            metadata: held.metadata.clone(),
            capabilities: vec![],
            restart_policy: held.restart_policy,
            config: Default::default(),
            constraints: Default::default(),
            seq: 4,
            epoch: 3,
            lease: None,
            accepted_after: SnapshotMark { boot: 9, sequence: 2 },
            seal: crate::PlacementKey::plaintext().seal("s1", "n1", 3),
        };
        // Another node's snapshot neither learns it (it is not that node's) nor clears the tombstone.
        merge_snapshot(&mut state, "n2", &[], true, Source::Heartbeat(SnapshotMark { boot: 5, sequence: 99 }));
        assert!(state.removed.contains_key("s1"));
        // Taken before the removal (number 20 or less): it still holds s1, which stays removed.
        for source in [Source::Listing(removed_at), Source::Heartbeat(SnapshotMark { boot: 9, sequence: 19 })] {
            merge_snapshot(&mut state, "n1", &[&facts], true, source);
            assert!(!state.instances.contains_key("s1"), "learned back from {source:?}");
        }
        // Any later snapshot of that node cannot hold it: its entry goes. The tombstone stays (epoch 3: an
        // earlier placement's node may still send a copy nobody has heard of).
        merge_snapshot(&mut state, "n1", &[], true, Source::Heartbeat(SnapshotMark { boot: 9, sequence: 21 }));
        assert!(state.removed.get("s1").is_some_and(|t| t.nodes.is_empty()));
        // As a node that crashed behind a partition and left does, with its snapshot from before (swarm seed
        // 41004357): that copy is of an older placement, so it is not learned back but noted for discard.
        let old_copy = InstanceFacts { epoch: 2, seal: crate::PlacementKey::plaintext().seal("s1", "n3", 2), ..facts };
        merge_snapshot(&mut state, "n3", &[&old_copy], true, Source::Heartbeat(SnapshotMark { boot: 4, sequence: 7 }));
        assert!(!state.instances.contains_key("s1"), "learned back from a node that held an earlier placement");
        assert!(state.stale_copies.contains_key(&("n3".to_string(), "s1".to_string())));
        // A first placement (epoch 1) has no earlier copies: once its last entry goes, so does its tombstone.
        let first = crate::removal::Tombstone { epoch: 1, nodes: std::collections::BTreeMap::new() };
        assert!(!first.kept());
    }

    #[test]
    fn a_stale_copy_elsewhere_of_a_removed_instance_is_not_learned_back_but_discarded() {
        let mut state = placed();
        let held = state.instances.remove("s1").unwrap();
        let nodes = [("n1".to_string(), Some(SnapshotMark { boot: 9, sequence: 20 }))].into();
        state.removed.insert("s1".into(), crate::removal::Tombstone { epoch: 3, nodes });
        let copy = |epoch| InstanceFacts {
            metadata: InstanceMetadata {
                node_id: "n2".into(),
                status: InstanceStatus::Stopped,
                ..held.metadata.clone()
            },
            capabilities: vec![],
            restart_policy: held.restart_policy,
            config: Default::default(),
            constraints: Default::default(),
            seq: 4,
            epoch,
            lease: None,
            accepted_after: SnapshotMark { boot: 5, sequence: 2 },
            seal: crate::PlacementKey::plaintext().seal("s1", "n2", epoch),
        };
        // n2 kept the copy of placement 2 (a drain moved it on, its discard was lost): screened, to discard.
        merge_snapshot(&mut state, "n2", &[&copy(2)], true, Source::Heartbeat(SnapshotMark { boot: 5, sequence: 7 }));
        assert!(!state.instances.contains_key("s1"), "a stale copy brought the removed instance back");
        assert!(state.stale_copies.contains_key(&("n2".to_string(), "s1".to_string())));
        assert_eq!(state.removed["s1"].nodes["n2"], None);
        // Until discarded, n2's later snapshots still hold it: screened still.
        merge_snapshot(&mut state, "n2", &[&copy(2)], true, Source::Heartbeat(SnapshotMark { boot: 5, sequence: 8 }));
        assert!(!state.instances.contains_key("s1"));
        // Discarded there, answered with n2's snapshot number 8: a snapshot after that cannot hold it.
        state.removed.get_mut("s1").unwrap().nodes.insert("n2".into(), Some(SnapshotMark { boot: 5, sequence: 8 }));
        merge_snapshot(&mut state, "n2", &[], true, Source::Heartbeat(SnapshotMark { boot: 5, sequence: 9 }));
        assert_eq!(state.removed["s1"].nodes.len(), 1, "n2's entry goes once a snapshot postdates its discard");
    }

    #[test]
    fn facts_of_a_placement_the_control_plane_did_not_issue_are_refused() {
        let mut state = placed();
        apply_report(&mut state, report(InstanceStatus::Running, 2));
        // A node that claims a later epoch, to take the instance over or freeze its facts: the seal it holds is
        // epoch 3's, and it cannot make another.
        let forged = StatusReport { epoch: u64::MAX, ..report(InstanceStatus::Crashed, 9) };
        apply_report(&mut state, forged);
        // Another node sending the seal it saw on the wire (it was not made for that node).
        apply_report(&mut state, StatusReport { node_id: "n2".into(), epoch: 4, ..report(InstanceStatus::Stopped, 1) });
        let record = &state.instances["s1"];
        assert_eq!((record.epoch, record.seq, record.metadata.status), (3, 2, InstanceStatus::Running));
        assert_eq!(record.metadata.node_id, "n1");

        // A snapshot learning an instance under a forged seal, as after a control-plane restart: not learned.
        let held = record.clone();
        let facts = InstanceFacts {
            metadata: InstanceMetadata { instance_id: "s2".into(), ..held.metadata },
            capabilities: vec![],
            restart_policy: held.restart_policy,
            config: Default::default(),
            constraints: Default::default(),
            seq: 1,
            epoch: 1,
            lease: None,
            accepted_after: SnapshotMark::default(),
            seal: PlacementSeal([1; 16]),
        };
        merge_snapshot(&mut state, "n1", &[&facts], true, HEARTBEAT);
        assert!(!state.instances.contains_key("s2"));
        // With the seal its placement was given, it is.
        let seal = crate::PlacementKey::plaintext().seal("s2", "n1", 1);
        merge_snapshot(&mut state, "n1", &[&InstanceFacts { seal, ..facts }], true, HEARTBEAT);
        assert!(state.instances.contains_key("s2"));
    }
}
