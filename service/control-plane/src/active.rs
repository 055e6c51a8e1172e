//! How many instances each node has starting or running, kept beside the instance map so that placing one
//! costs what changed since the last placement, not a pass over every instance (a run of starts was quadratic).

use std::collections::BTreeMap;

use factum_proto::InstanceStatus;

use crate::tracked::Tracked;
use crate::InstanceRecord;

/// Active instances per node, brought up to date from the instance map's written keys.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct ActiveIndex {
    /// Instance → the node it is counted on (only active instances).
    on: BTreeMap<String, String>,
    /// Node → its active instances.
    per_node: BTreeMap<String, usize>,
}

/// Whether `record` counts against its node's capacity.
pub(crate) fn is_active(record: &InstanceRecord) -> bool {
    matches!(record.metadata.status, InstanceStatus::Starting | InstanceStatus::Running)
}

impl ActiveIndex {
    /// Recounts the instances written since the last refresh.
    pub(crate) fn refresh(&mut self, instances: &mut Tracked<InstanceRecord>) {
        for id in instances.take_unindexed() {
            if let Some(node) = self.on.remove(&id) {
                if let Some(count) = self.per_node.get_mut(&node) {
                    *count = count.saturating_sub(1);
                    if *count == 0 {
                        self.per_node.remove(&node);
                    }
                }
            }
            if let Some(record) = instances.get(&id).filter(|r| is_active(r)) {
                let node = record.metadata.node_id.clone();
                *self.per_node.entry(node.clone()).or_default() += 1;
                self.on.insert(id, node);
            }
        }
    }

    /// Active instances on `node_id` as of the last refresh.
    pub(crate) fn on_node(&self, node_id: &str) -> usize {
        self.per_node.get(node_id).copied().unwrap_or(0)
    }

    /// The counts a pass over every instance gives: what the index must always equal (checked in debug builds).
    pub(crate) fn scan(instances: &BTreeMap<String, InstanceRecord>) -> BTreeMap<String, usize> {
        let mut per_node = BTreeMap::new();
        for record in instances.values().filter(|r| is_active(r)) {
            *per_node.entry(record.metadata.node_id.clone()).or_default() += 1;
        }
        per_node
    }

    /// The per-node counts.
    pub(crate) fn counts(&self) -> &BTreeMap<String, usize> {
        &self.per_node
    }
}
