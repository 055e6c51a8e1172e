//! What `factum events` streams: the control plane's facts as they change, numbered in a bounded journal it
//! keeps in memory (a restarted control plane starts a new one, numbered from 1, as it rebuilds its maps).

use serde::{Deserialize, Serialize};

use crate::InstanceStatus;

/// One change the control plane saw.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Numbers the control plane's events from 1.
    pub seq: u64,
    /// Wall-clock milliseconds since the Unix epoch (the control plane's env clock) when it saw the change.
    pub time_ms: u64,
    /// What changed.
    pub kind: EventKind,
}

/// What changed. Facts, as the control plane learned them: an instance's status is its agent's word (or
/// `unknown` when its node went silent), never an intention.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
// Externally tagged: bincode, the wire format, cannot read internally tagged enums.
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// An instance's status or restart count changed (or the control plane learned of it).
    Instance {
        /// The instance.
        instance_id: String,
        /// The node holding it.
        node_id: String,
        /// Its status now.
        status: InstanceStatus,
        /// Restarts so far.
        restarts: u32,
        /// Why its last run ended, if it crashed.
        error: Option<String>,
    },
    /// An instance now runs under a new placement on another node (its old node was lost).
    Rescheduled {
        /// The instance.
        instance_id: String,
        /// The node it left.
        from: String,
        /// The node it was placed on.
        to: String,
    },
    /// A capability was granted to an instance, or its permissions changed.
    Granted {
        /// The instance.
        instance_id: String,
        /// The capability.
        capability_id: String,
        /// The permissions now in force.
        permissions: Vec<String>,
    },
    /// A capability was revoked.
    Revoked {
        /// The instance.
        instance_id: String,
        /// The capability.
        capability_id: String,
    },
    /// An ended instance was removed.
    Removed {
        /// The instance.
        instance_id: String,
    },
    /// A node joined (registered, or, without a registry, first reported).
    NodeJoined {
        /// The node.
        node_id: String,
        /// Where its agent listens.
        agent_addr: String,
    },
    /// A node that was unavailable reports again.
    NodeAvailable {
        /// The node.
        node_id: String,
    },
    /// A node missed its heartbeats: what it runs is unknown until it reports again.
    NodeUnavailable {
        /// The node.
        node_id: String,
    },
    /// A node left the registry (its lease ended): its agent has fenced itself, or will before it could matter,
    /// so what it ran may be rescheduled elsewhere.
    NodeLeft {
        /// The node.
        node_id: String,
    },
    /// A node was drained (it takes no new instances), or undrained (it takes them again).
    NodeDrained {
        /// The node.
        node_id: String,
        /// Drained now, or no longer.
        drained: bool,
    },
}

impl crate::journal::Entry for Event {
    fn seq(&self) -> u64 {
        self.seq
    }
    fn weight(&self) -> usize {
        // The strings dominate; the fixed part is about this.
        64 + match &self.kind {
            EventKind::Instance { instance_id, node_id, error, .. } => {
                instance_id.len() + node_id.len() + error.as_ref().map_or(0, String::len)
            }
            EventKind::Rescheduled { instance_id, from, to } => instance_id.len() + from.len() + to.len(),
            EventKind::Granted { instance_id, capability_id, permissions } => {
                instance_id.len() + capability_id.len() + permissions.iter().map(String::len).sum::<usize>()
            }
            EventKind::Revoked { instance_id, capability_id } => instance_id.len() + capability_id.len(),
            EventKind::Removed { instance_id } => instance_id.len(),
            EventKind::NodeJoined { node_id, agent_addr } => node_id.len() + agent_addr.len(),
            EventKind::NodeAvailable { node_id }
            | EventKind::NodeUnavailable { node_id }
            | EventKind::NodeLeft { node_id }
            | EventKind::NodeDrained { node_id, .. } => node_id.len(),
        }
    }
}

impl EventKind {
    /// The instance it is about, if any.
    pub fn instance_id(&self) -> Option<&str> {
        match self {
            EventKind::Instance { instance_id, .. }
            | EventKind::Rescheduled { instance_id, .. }
            | EventKind::Granted { instance_id, .. }
            | EventKind::Revoked { instance_id, .. }
            | EventKind::Removed { instance_id } => Some(instance_id),
            EventKind::NodeJoined { .. }
            | EventKind::NodeAvailable { .. }
            | EventKind::NodeUnavailable { .. }
            | EventKind::NodeLeft { .. }
            | EventKind::NodeDrained { .. } => None,
        }
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EventKind::Instance { instance_id, node_id, status, restarts, error } => {
                write!(f, "instance {instance_id} {status} on {node_id}")?;
                if *restarts > 0 {
                    write!(f, " (restarts {restarts})")?;
                }
                match error {
                    Some(e) if *status == InstanceStatus::Crashed => write!(f, ": {e}"),
                    _ => Ok(()),
                }
            }
            EventKind::Rescheduled { instance_id, from, to } => {
                write!(f, "instance {instance_id} rescheduled from {from} to {to}")
            }
            EventKind::Granted { instance_id, capability_id, permissions } => {
                write!(f, "granted {capability_id} to {instance_id}: {}", permissions.join(","))
            }
            EventKind::Revoked { instance_id, capability_id } => {
                write!(f, "revoked {capability_id} from {instance_id}")
            }
            EventKind::Removed { instance_id } => write!(f, "instance {instance_id} removed"),
            EventKind::NodeJoined { node_id, agent_addr } => write!(f, "node {node_id} joined at {agent_addr}"),
            EventKind::NodeAvailable { node_id } => write!(f, "node {node_id} available again"),
            EventKind::NodeUnavailable { node_id } => write!(f, "node {node_id} unavailable (missed its heartbeats)"),
            EventKind::NodeLeft { node_id } => write!(f, "node {node_id} left (its registry lease ended)"),
            EventKind::NodeDrained { node_id, drained: true } => write!(f, "node {node_id} drained"),
            EventKind::NodeDrained { node_id, drained: false } => write!(f, "node {node_id} takes instances again"),
        }
    }
}

/// Events after a sequence number, oldest first, at most [`MAX_EVENT_PAGE`].
pub type EventPage = crate::journal::Page<Event>;

/// Most events in one [`EventPage`].
pub const MAX_EVENT_PAGE: usize = 1_000;

/// Most events the control plane keeps.
pub const EVENT_JOURNAL_ENTRIES: usize = 10_000;

/// Most bytes of events the control plane keeps (roughly: see [`crate::journal::Entry::weight`]).
pub const EVENT_JOURNAL_BYTES: usize = 4 * 1024 * 1024;

/// An empty journal with the bounds the control plane keeps.
pub fn journal() -> crate::journal::Journal<Event> {
    crate::journal::Journal::new(EVENT_JOURNAL_ENTRIES, EVENT_JOURNAL_BYTES)
}
