//! Which instances each node holds, and how many of them are starting or running, kept beside the instance map
//! so that placing one, merging a node's snapshot or marking a silent node's instances costs what that node
//! holds and what changed since, not a pass over every instance (a run of starts was quadratic, and so was a
//! round of heartbeats from every node).

use std::collections::{BTreeMap, BTreeSet};

use factum_proto::InstanceStatus;

use crate::tracked::Tracked;
use crate::InstanceRecord;

/// Instances per node, brought up to date from the instance map's written keys.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct NodeIndex {
    /// Instance → the node its record names, and whether it counts there as active.
    on: BTreeMap<String, (String, bool)>,
    /// Node → its instances.
    held: BTreeMap<String, BTreeSet<String>>,
    /// Node → its active instances.
    active: BTreeMap<String, usize>,
}

/// Whether `record` counts against its node's capacity.
pub(crate) fn is_active(record: &InstanceRecord) -> bool {
    matches!(record.metadata.status, InstanceStatus::Starting | InstanceStatus::Running)
}

impl NodeIndex {
    /// Re-files the instances written since the last refresh.
    pub(crate) fn refresh(&mut self, instances: &mut Tracked<InstanceRecord>) {
        for id in instances.take_unindexed() {
            if let Some((node, active)) = self.on.remove(&id) {
                if let Some(ids) = self.held.get_mut(&node) {
                    ids.remove(&id);
                    if ids.is_empty() {
                        self.held.remove(&node);
                    }
                }
                if let Some(count) = self.active.get_mut(&node).filter(|_| active) {
                    *count = count.saturating_sub(1);
                    if *count == 0 {
                        self.active.remove(&node);
                    }
                }
            }
            if let Some(record) = instances.get(&id) {
                let node = record.metadata.node_id.clone();
                let active = is_active(record);
                if active {
                    *self.active.entry(node.clone()).or_default() += 1;
                }
                self.held.entry(node.clone()).or_default().insert(id.clone());
                self.on.insert(id, (node, active));
            }
        }
        debug_assert_eq!(*self, Self::scan(instances), "the node index drifted from the instance map");
    }

    /// Active instances on `node_id` as of the last refresh.
    pub(crate) fn active_on(&self, node_id: &str) -> usize {
        self.active.get(node_id).copied().unwrap_or(0)
    }

    /// The instances whose records named `node_id` at the last refresh.
    pub(crate) fn held_by(&self, node_id: &str) -> impl Iterator<Item = &String> {
        self.held.get(node_id).into_iter().flatten()
    }

    /// The index a pass over every instance builds: what a refreshed one must equal (checked in debug builds).
    pub(crate) fn scan(instances: &BTreeMap<String, InstanceRecord>) -> Self {
        let mut index = NodeIndex::default();
        for (id, record) in instances {
            let node = record.metadata.node_id.clone();
            let active = is_active(record);
            if active {
                *index.active.entry(node.clone()).or_default() += 1;
            }
            index.held.entry(node.clone()).or_default().insert(id.clone());
            index.on.insert(id.clone(), (node, active));
        }
        index
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refreshed_index_follows_moves_status_changes_and_removals() {
        let mut instances: Tracked<InstanceRecord> = Tracked::default();
        let mut index = NodeIndex::default();
        let record = |node: &str, status| InstanceRecord {
            metadata: factum_proto::InstanceMetadata {
                instance_id: "x".into(),
                node_id: node.into(),
                module_hash: "h".into(),
                created_at: 0,
                status,
                restarts: 0,
                last_error: None,
                restart_streak: 0,
                backoff_ms: None,
            },
            restart_policy: Default::default(),
            config: Default::default(),
            constraints: Default::default(),
            seq: 0,
            caps_seq: 0,
            epoch: 1,
            lease: None,
            retry: None,
            placement_failures: 0,
            accepted_after: None,
            reported: false,
            ended_since: None,
        };
        instances.insert("a".into(), record("n1", InstanceStatus::Running));
        instances.insert("b".into(), record("n1", InstanceStatus::Stopped));
        index.refresh(&mut instances);
        assert_eq!((index.active_on("n1"), index.held_by("n1").count()), (1, 2));
        instances.insert("a".into(), record("n2", InstanceStatus::Starting));
        instances.remove("b");
        index.refresh(&mut instances);
        assert_eq!((index.active_on("n1"), index.held_by("n1").count()), (0, 0));
        assert_eq!(index.held_by("n2").collect::<Vec<_>>(), ["a"]);
        assert_eq!(index, NodeIndex::scan(&instances));
    }
}
