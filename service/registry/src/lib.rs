//! The registry: which nodes exist (each under a lease that expires when its node stops renewing it) and which
//! capability providers exist. Nothing else: no instance, status, assignment or desired state is ever written
//! here (P11). With no etcd configured the in-memory [`MemoryRegistry`] serves one process (P15); in a cluster
//! [`EtcdRegistry`] keeps the same data in etcd; in simulation a [`MemoryRegistry`] served over the network by
//! [`serve`] and reached through [`RemoteRegistry`] plays etcd.
//!
//! Keys (under a configurable prefix, `/factum` by default):
//! - `<prefix>/nodes/<node_id>`: a [`NodeRegistration`] as JSON, attached to the node's lease.
//! - `<prefix>/providers/<provider_id>`: a [`ProviderRecord`] as JSON, optionally attached to a lease.

mod memory;
mod provider_lease;
mod remote;

#[cfg(feature = "etcd")]
mod etcd;

use std::time::Duration;

use async_trait::async_trait;
use factum_proto::{ErrorCode, ErrorResponse, ProviderMetadata};
use serde::{Deserialize, Serialize};

#[cfg(feature = "etcd")]
pub use etcd::EtcdRegistry;
pub use memory::MemoryRegistry;
pub use provider_lease::hold_provider;
pub use remote::{serve, RegistryApi, RemoteRegistry};

/// Id of a lease, as etcd numbers them.
pub type LeaseId = i64;

/// Default key prefix.
pub const DEFAULT_PREFIX: &str = "/factum";

/// A node's entry: enough for the control plane to reach its agent.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NodeRegistration {
    /// Node id, unique in the cluster.
    pub node_id: String,
    /// Where its agent serves the `NodeAgent` API.
    pub agent_addr: String,
    /// Its instance quota.
    pub max_instances: u32,
    /// Control plane ↔ agent protocol version it speaks.
    pub protocol_version: u32,
    /// The lease the entry lives under: a new value means the node lost its lease and registered again (and
    /// fenced in between), even if the control plane never saw the entry disappear.
    pub lease: LeaseId,
}

/// A provider's entry: its metadata and where it runs, so an invocation can be routed to it (P17, P21).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderRecord {
    /// Unique id, e.g. `kv-memory@node-1`.
    pub provider_id: String,
    /// Node hosting it.
    pub node_id: String,
    /// What it is.
    pub metadata: ProviderMetadata,
    /// Where a provider host (`factum provider`) serves agents; none for a provider inside an agent, which
    /// serves that agent's instances only. (Not skipped when absent: the simulator's registry speaks bincode,
    /// which needs every field; `default` reads entries written before the field existed.)
    #[serde(default)]
    pub addr: Option<String>,
}

/// The registered nodes at one registry revision.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Membership {
    /// Store revision the list was read at; it grows with every write, so a watcher asks for "newer than".
    pub revision: u64,
    /// Registered nodes, ordered by node id.
    pub nodes: Vec<NodeRegistration>,
}

/// Why a registry call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum RegistryError {
    /// The registry could not be reached or answered with an error; the call may be retried.
    #[error("registry unavailable: {0}")]
    Unavailable(String),
    /// The lease does not exist (it expired or was revoked): its keys are gone.
    #[error("lease {0} has expired")]
    LeaseExpired(LeaseId),
    /// The request itself is wrong (bad id, TTL out of range, undecodable entry).
    #[error("invalid registry request: {0}")]
    Invalid(String),
    /// A node id is registered under another live lease: another agent runs under that id, or this node's
    /// previous run, whose lease has not expired yet. Free again once that lease ends.
    #[error("node {node_id} is registered under another live lease ({lease}): another agent with this id, or this node's previous run until its lease expires")]
    Taken {
        /// The node id asked for.
        node_id: String,
        /// The lease that holds it.
        lease: LeaseId,
    },
}

impl From<RegistryError> for ErrorResponse {
    fn from(e: RegistryError) -> Self {
        let code = match e {
            RegistryError::Unavailable(_) | RegistryError::LeaseExpired(_) | RegistryError::Taken { .. } => {
                ErrorCode::CommunicationFailure
            }
            RegistryError::Invalid(_) => ErrorCode::InvalidRequest,
        };
        ErrorResponse::new(code, e.to_string())
    }
}

/// The registry seam. Every implementation has etcd's semantics: leases with a TTL that expire unless kept
/// alive, keys attached to a lease deleted with it, a store revision that grows with every write.
#[async_trait]
pub trait Registry: Send + Sync + 'static {
    /// A new lease that lives `ttl` unless kept alive.
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, RegistryError>;
    /// Renews a lease for its full TTL; [`RegistryError::LeaseExpired`] if it is already gone.
    async fn keep_alive(&self, lease: LeaseId) -> Result<(), RegistryError>;
    /// Ends a lease now, deleting its keys (a node leaving on purpose).
    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), RegistryError>;
    /// Writes the node's entry under `lease` if no other live lease holds that node id (create-if-absent, so
    /// a second agent under the same id cannot take over the first one's entry); [`RegistryError::Taken`] if
    /// one does. Writing it again under the same lease is allowed.
    async fn register_node(&self, node: &NodeRegistration, lease: LeaseId) -> Result<(), RegistryError>;
    /// The registered nodes now.
    async fn membership(&self) -> Result<Membership, RegistryError>;
    /// Waits until the store revision passes `after_revision` (a node joined or left, or any other write) or
    /// `max_wait` passes, then returns the membership. Level-triggered: callers diff against what they hold.
    async fn watch_membership(&self, after_revision: u64, max_wait: Duration) -> Result<Membership, RegistryError>;
    /// Writes a provider's entry, under `lease` if given.
    async fn put_provider(&self, provider: &ProviderRecord, lease: Option<LeaseId>) -> Result<(), RegistryError>;
    /// Every provider entry, ordered by provider id.
    async fn providers(&self) -> Result<Vec<ProviderRecord>, RegistryError>;
    /// Every key the registry holds under its prefix: how tests prove nothing else is stored (P11).
    async fn keys(&self) -> Result<Vec<String>, RegistryError>;
}

/// Key layout shared by every implementation.
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    prefix: String,
}

impl Keys {
    pub(crate) fn new(prefix: &str) -> Self {
        Keys { prefix: prefix.trim_end_matches('/').to_string() }
    }

    pub(crate) fn root(&self) -> String {
        format!("{}/", self.prefix)
    }

    pub(crate) fn nodes(&self) -> String {
        format!("{}/nodes/", self.prefix)
    }

    pub(crate) fn node(&self, node_id: &str) -> Result<String, RegistryError> {
        factum_proto::validate_id("node_id", node_id).map_err(|e| RegistryError::Invalid(e.message))?;
        Ok(format!("{}{node_id}", self.nodes()))
    }

    pub(crate) fn providers(&self) -> String {
        format!("{}/providers/", self.prefix)
    }

    pub(crate) fn provider(&self, provider_id: &str) -> Result<String, RegistryError> {
        let ok = !provider_id.is_empty()
            && provider_id.len() <= factum_proto::types::MAX_ID_LEN
            && provider_id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.@:".contains(&b));
        if !ok {
            return Err(RegistryError::Invalid(format!("bad provider id {provider_id:?}")));
        }
        Ok(format!("{}{provider_id}", self.providers()))
    }
}

/// Decodes a JSON entry; a corrupt entry is reported, never a panic.
pub(crate) fn decode<T: for<'de> Deserialize<'de>>(key: &str, value: &[u8]) -> Result<T, RegistryError> {
    serde_json::from_slice(value).map_err(|e| RegistryError::Invalid(format!("entry {key} is not valid: {e}")))
}

/// Encodes an entry as JSON (readable with `etcdctl get`).
pub(crate) fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, RegistryError> {
    serde_json::to_vec(value).map_err(|e| RegistryError::Invalid(format!("cannot encode entry: {e}")))
}

/// Shortest TTL accepted (etcd's own minimum is about 1.5 s with default timing).
pub const MIN_LEASE_TTL: Duration = Duration::from_secs(1);

pub(crate) fn check_ttl(ttl: Duration) -> Result<(), RegistryError> {
    if ttl < MIN_LEASE_TTL || ttl > Duration::from_secs(3600) {
        return Err(RegistryError::Invalid(format!("lease TTL {ttl:?} is outside 1 s ..= 1 h")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_provider_entry_without_an_address_still_reads() {
        let old = br#"{"provider_id":"kv-memory@n1","node_id":"n1","metadata":{"provider_type":"kv","name":"kv-memory","version":"1","operations":["get"]}}"#;
        let record: ProviderRecord = decode("k", old).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(record.addr, None);
        let host = ProviderRecord { addr: Some("10.0.0.5:7801".into()), ..record };
        let again: ProviderRecord = decode("k", &encode(&host).unwrap_or_default()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(again, host);
    }
}
