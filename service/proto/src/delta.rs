//! Heartbeats as changes: an agent sends its full snapshot once, then only what changed against the last
//! snapshot the control plane said it holds ([`NodeAck::holding`]). The control plane rebuilds the full snapshot
//! from the one it holds and judges it exactly as it would the full one, so a delta means what a full snapshot
//! means, in a fraction of the bytes.

use std::collections::{BTreeMap, BTreeSet};

use crate::{InstanceFacts, NodeReport};

/// A snapshot's facts by instance id, as both ends keep the last one the control plane holds.
pub type SnapshotFacts = BTreeMap<String, InstanceFacts>;

/// The facts of `report`'s snapshot, keyed by instance, to keep as the base of later deltas.
pub fn facts_of(report: &NodeReport) -> SnapshotFacts {
    report.instances.iter().map(|f| (f.metadata.instance_id.clone(), f.clone())).collect()
}

/// Turns full snapshot `report` into a delta against snapshot `base_sequence` of the same run, whose facts were
/// `base`: only the facts that differ stay, and the instances `base` had and `report` lacks are listed removed.
pub fn into_delta(report: &mut NodeReport, base_sequence: u64, base: &SnapshotFacts) {
    let now: BTreeSet<&str> = report.instances.iter().map(|f| f.metadata.instance_id.as_str()).collect();
    report.removed = base.keys().filter(|id| !now.contains(id.as_str())).cloned().collect();
    report.instances.retain(|f| base.get(&f.metadata.instance_id) != Some(f));
    report.base = Some(base_sequence);
}

/// Applies delta `report` to `base` (the facts of the snapshot it is a delta against), which becomes the facts
/// of `report`'s own snapshot; a full report replaces `base` whole. The report's facts move into `base`.
pub fn apply(base: &mut SnapshotFacts, report: &mut NodeReport) {
    if report.base.is_none() {
        base.clear();
    }
    for id in &report.removed {
        base.remove(id);
    }
    for facts in report.instances.drain(..) {
        base.insert(facts.metadata.instance_id.clone(), facts);
    }
}
