//! The control plane's event journal (`factum events`): what changed in its maps, announced when the lock under
//! which it changed is released, so every path that writes the maps is covered without each saying so. Events
//! are for operators: nothing in the control plane reads them back, and they are not traced.

use std::collections::BTreeMap;

use factum_proto::events::{Event, EventKind, EventPage, MAX_EVENT_PAGE};
use factum_proto::journal::Journal;
use factum_proto::{CapabilityAssignment, InstanceStatus};

use crate::tracked::Tracked;
use crate::{InstanceRecord, NodeRecord};

/// What was last announced of each instance and node, and the journal the announcements went to.
pub(crate) struct Announcer {
    journal: Journal<Event>,
    instances: BTreeMap<String, Announced>,
    nodes: BTreeMap<String, NodeSeen>,
}

/// An instance as last announced.
#[derive(Default)]
struct Announced {
    /// (node, status, restarts, error of a crash): an event when any differs.
    shown: Option<(String, InstanceStatus, u32, Option<String>)>,
    epoch: u64,
    /// Capability id → permissions.
    capabilities: BTreeMap<String, Vec<String>>,
}

/// A node as last announced: (registered, available, drained).
type NodeSeen = (bool, bool, bool);

impl Default for Announcer {
    fn default() -> Self {
        Announcer { journal: factum_proto::events::journal(), instances: BTreeMap::new(), nodes: BTreeMap::new() }
    }
}

impl Announcer {
    /// Announces what changed since the last call: the instances and capabilities written since (as the maps
    /// noted them), and every node (there are few). `now_ms` stamps them; it is read only when there is news.
    /// `counted` sees each event as it is journaled.
    pub(crate) fn publish(
        &mut self,
        instances: &mut Tracked<InstanceRecord>,
        capabilities: &mut Tracked<BTreeMap<String, CapabilityAssignment>>,
        nodes: &BTreeMap<String, NodeRecord>,
        now_ms: impl FnOnce() -> u64,
        mut counted: impl FnMut(&EventKind),
    ) {
        let mut news = Vec::new();
        self.nodes_changed(nodes, &mut news);
        let mut touched = instances.take_touched();
        touched.append(&mut capabilities.take_touched());
        for id in touched {
            self.instance_changed(&id, instances.get(&id), capabilities.get(&id), &mut news);
        }
        if news.is_empty() {
            return;
        }
        let time_ms = now_ms();
        for kind in news {
            counted(&kind);
            self.journal.push(|seq| Event { seq, time_ms, kind });
        }
    }

    /// Events after number `after` (0: from the oldest held).
    pub(crate) fn page(&self, after: u64) -> EventPage {
        self.journal.page(after, MAX_EVENT_PAGE)
    }

    fn instance_changed(
        &mut self,
        id: &str,
        record: Option<&InstanceRecord>,
        granted: Option<&BTreeMap<String, CapabilityAssignment>>,
        news: &mut Vec<EventKind>,
    ) {
        let instance_id = id.to_string();
        let Some(record) = record else {
            if self.instances.remove(id).is_some() {
                news.push(EventKind::Removed { instance_id });
            }
            return;
        };
        let was = self.instances.entry(instance_id.clone()).or_default();
        let m = &record.metadata;
        if let Some((from, ..)) = &was.shown {
            if *from != m.node_id && record.epoch > was.epoch {
                let (from, to) = (from.clone(), m.node_id.clone());
                news.push(EventKind::Rescheduled { instance_id: instance_id.clone(), from, to });
            }
        }
        was.epoch = record.epoch;
        let error = m.last_error.clone().filter(|_| m.status == InstanceStatus::Crashed);
        let shown = (m.node_id.clone(), m.status, m.restarts, error.clone());
        if was.shown.as_ref() != Some(&shown) {
            news.push(EventKind::Instance {
                instance_id: instance_id.clone(),
                node_id: m.node_id.clone(),
                status: m.status,
                restarts: m.restarts,
                error,
            });
            was.shown = Some(shown);
        }
        let now: BTreeMap<&String, &Vec<String>> =
            granted.into_iter().flatten().map(|(cap, a)| (cap, &a.permissions)).collect();
        for (capability_id, permissions) in &now {
            if was.capabilities.get(*capability_id) != Some(*permissions) {
                news.push(EventKind::Granted {
                    instance_id: instance_id.clone(),
                    capability_id: capability_id.to_string(),
                    permissions: permissions.to_vec(),
                });
            }
        }
        for capability_id in was.capabilities.keys().filter(|cap| !now.contains_key(cap)) {
            news.push(EventKind::Revoked { instance_id: instance_id.clone(), capability_id: capability_id.clone() });
        }
        was.capabilities = now.into_iter().map(|(cap, perms)| (cap.clone(), perms.clone())).collect();
    }

    fn nodes_changed(&mut self, nodes: &BTreeMap<String, NodeRecord>, news: &mut Vec<EventKind>) {
        for (node_id, node) in nodes {
            let seen = (node.registered, node.available, node.drained);
            // Runs at every release of the lock: the common case, nothing new, must not allocate.
            let was = self.nodes.get(node_id).copied().unwrap_or_default();
            if was == seen {
                continue;
            }
            let (was_registered, was_available, was_drained) = was;
            let node_id = node_id.clone();
            if node.registered && !was_registered {
                news.push(EventKind::NodeJoined { node_id: node_id.clone(), agent_addr: node.agent_addr.clone() });
            } else if !node.registered && was_registered {
                news.push(EventKind::NodeLeft { node_id: node_id.clone() });
            } else if node.registered && node.available != was_available {
                news.push(if node.available {
                    EventKind::NodeAvailable { node_id: node_id.clone() }
                } else {
                    EventKind::NodeUnavailable { node_id: node_id.clone() }
                });
            }
            if node.drained != was_drained {
                news.push(EventKind::NodeDrained { node_id: node_id.clone(), drained: node.drained });
            }
            self.nodes.insert(node_id, seen);
        }
        let gone: Vec<String> = self.nodes.keys().filter(|id| !nodes.contains_key(*id)).cloned().collect();
        for node_id in gone {
            if self.nodes.remove(&node_id).is_some_and(|(registered, ..)| registered) {
                news.push(EventKind::NodeLeft { node_id });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(registered: bool, available: bool, drained: bool) -> NodeRecord {
        NodeRecord { drained, available, registered, ..NodeRecord::new("10.0.0.1:7700".into(), 8, Default::default()) }
    }

    #[test]
    fn a_node_is_announced_as_its_membership_and_availability_change() {
        let mut announcer = Announcer::default();
        let mut said = Vec::new();
        for (registered, available, drained) in [
            (false, true, false),
            (true, true, false),
            (true, true, false),
            (true, true, true),
            (true, true, false),
            (true, false, false),
            (true, true, false),
            (false, false, false),
        ] {
            let nodes = [("n1".to_string(), node(registered, available, drained))].into();
            announcer.publish(&mut Tracked::default(), &mut Tracked::default(), &nodes, || 7, |_| {});
        }
        announcer.publish(&mut Tracked::default(), &mut Tracked::default(), &BTreeMap::new(), || 7, |_| {});
        said.extend(announcer.page(0).entries.iter().map(|e| e.kind.to_string()));
        assert_eq!(
            said,
            [
                "node n1 joined at 10.0.0.1:7700",
                "node n1 drained",
                "node n1 takes instances again",
                "node n1 unavailable (missed its heartbeats)",
                "node n1 available again",
                "node n1 left (its registry lease ended)",
            ]
        );
        assert!(announcer.page(0).entries.iter().all(|e| e.time_ms == 7));
    }
}
