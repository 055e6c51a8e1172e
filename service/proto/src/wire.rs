//! Messages between components (design §Communication Protocol) and the tarpc services that carry them.
//!
//! Client → control plane and control plane → agent use tarpc over a length-delimited bincode transport
//! ([`crate::transport`]). Guest → provider invocations are MessagePack ([`crate::capability`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::ErrorResponse;
use crate::events::EventPage;
use crate::grant::GrantSeal;
use crate::guest_config::GuestConfig;
use crate::labels::Labels;
use crate::logs::LogPage;
use crate::types::{CapabilityAssignment, InstanceMetadata, InstanceStatus, RestartPolicy};

/// Version of the protocol every factum connection speaks. Each connection opens with a hello carrying it
/// (`factum_env::rpc::hello`), and a peer of another version is refused there, with both versions named, so
/// mixed versions fail loudly instead of misreading each other. Agents also repeat it in every
/// [`NodeReport`]. 4: the hello, with the peer's identity; list calls answer errors. 5: placement seals. 6: guest
/// arguments and environment ([`GuestConfig`]) in starts and facts; restart and logs calls. 7: the events call.
/// 8: node labels in reports and listings, placement constraints in starts and facts; draining nodes. 9: grant
/// seals in starts and grants, for providers on other hosts ([`crate::SealedGrant`]). 10: grant seals expire,
/// and the answer to a node's report renews them ([`NodeAck`]); content-addressed starts
/// ([`StartInstanceRequest::module_hash`]). 11: heartbeats as deltas ([`NodeReport::base`], [`NodeAck::holding`]).
pub const PROTOCOL_VERSION: u32 = 11;

/// Largest accepted module, in bytes.
pub const MAX_MODULE_BYTES: usize = 32 * 1024 * 1024;

/// Largest tarpc frame; a module plus its envelope must fit.
pub const MAX_FRAME_BYTES: usize = MAX_MODULE_BYTES + 1024 * 1024;

/// A capability requested at start: id plus permission strings. The instance id is filled in by the
/// control plane.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapabilityGrant {
    /// Which store / bus / client.
    pub capability_id: String,
    /// Permission strings such as `kv:read`.
    pub permissions: Vec<String>,
}

/// Client → control plane: StartInstance(module_bytes, capabilities, restart_policy).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartRequest {
    /// Makes the call idempotent: a retry with the same id and module returns the same instance. `None` lets
    /// the control plane choose a fresh id.
    pub instance_id: Option<String>,
    /// The Wasm module; may be empty if `module_hash` names it.
    #[serde(with = "serde_bytes")]
    pub module_bytes: Vec<u8>,
    /// The module's hash ([`crate::module_hash`]). With no bytes the start is by hash: the control plane runs the
    /// module it holds under that hash (one that an instance of it uses), or answers INSTANCE_NOT_FOUND with
    /// detail `module_hash` ([`crate::ErrorResponse::is_module_not_held`]), and the caller sends the bytes. With
    /// bytes, they must have this hash.
    pub module_hash: Option<String>,
    /// Capabilities granted from the start.
    pub capabilities: Vec<CapabilityGrant>,
    /// Restart policy.
    pub restart_policy: RestartPolicy,
    /// The guest's arguments and environment.
    pub config: GuestConfig,
    /// Placement constraints: only a node whose labels hold every one may run it ([`crate::labels`]).
    pub constraints: Labels,
}

/// Control plane → agent (design §StartInstanceRequest).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartInstanceRequest {
    /// Id chosen by the control plane.
    pub instance_id: String,
    /// The Wasm module; empty when the control plane believes the node holds it already (see `module_hash`).
    #[serde(with = "serde_bytes")]
    pub module_bytes: Vec<u8>,
    /// The module's hash ([`crate::module_hash`]). With `module_bytes` empty the start is content-addressed: the
    /// agent runs the module it holds under that hash, or answers INSTANCE_NOT_FOUND with detail `module_hash`
    /// if it holds none, and the control plane sends the bytes. With bytes, they must have this hash (empty:
    /// not checked).
    pub module_hash: String,
    /// Validated assignments.
    pub capabilities: Vec<CapabilityAssignment>,
    /// The control plane's seal of each assignment for this node, by capability id: what a provider on another
    /// host checks before it serves the instance ([`crate::SealedGrant`]). A capability without one is served
    /// only by providers on the node itself.
    pub grant_seals: BTreeMap<String, GrantSeal>,
    /// Restart policy, applied by the agent.
    pub restart_policy: RestartPolicy,
    /// The guest's arguments and environment.
    pub config: GuestConfig,
    /// Its placement constraints, kept by the agent and reported back in its facts.
    pub constraints: Labels,
    /// Placement epoch: 1 for the first placement, one more for every rescheduling onto another node. Facts
    /// carry it back, so facts from an older placement can never overwrite those of a newer one.
    pub epoch: u64,
    /// The registry lease the control plane saw the node holding when it placed the instance (none without a
    /// registry). The agent refuses the start under any other lease: once the control plane has seen that lease
    /// end, nothing placed under it can start, which is what makes rescheduling safe (a fencing token).
    pub node_lease: Option<i64>,
    /// Restarts so far, over every placement: 0 for a first start. A rescheduled instance carries its count to
    /// the new node, so `max_retries` bounds restarts across the cluster, not per node.
    pub restarts: u32,
    /// The control plane's seal over (instance, node, epoch). The agent keeps it and sends it back with every
    /// fact of this placement, which is how the control plane knows the placement is one it issued.
    pub seal: PlacementSeal,
}

/// A message authentication code the control plane computes over a placement (instance id, node id, epoch) with
/// a key only it holds. A node can only send back seals it was given, so it cannot claim a placement epoch the
/// control plane never issued (an epoch of `u64::MAX` would otherwise freeze an instance's facts), nor claim
/// another node's placement, even after a control-plane restart, when the maps are rebuilt from what nodes say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PlacementSeal(pub [u8; 16]);

/// Agent → control plane (design §StartInstanceResponse); `error` carries a code, not only text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartInstanceResponse {
    /// Whether the instance was accepted (or already existed with the same module).
    pub success: bool,
    /// Why not.
    pub error: Option<ErrorResponse>,
    /// The instance's facts as the agent holds them after acceptance.
    pub facts: Option<InstanceFacts>,
}

/// Control plane → agent (design §StopInstanceRequest).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StopInstanceRequest {
    /// Which instance.
    pub instance_id: String,
}

/// Agent → control plane (design §StopInstanceResponse).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StopInstanceResponse {
    /// Whether the instance is now stopped.
    pub success: bool,
    /// Why not.
    pub error: Option<ErrorResponse>,
    /// The instance's facts after the stop.
    pub facts: Option<InstanceFacts>,
}

/// Agent → control plane: one execution fact (design §StatusReport).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    /// Which instance.
    pub instance_id: String,
    /// The node that observed the fact.
    pub node_id: String,
    /// The fact.
    pub status: InstanceStatus,
    /// Wall-clock milliseconds since the Unix epoch, from the agent's env clock.
    pub timestamp: u64,
    /// Per-instance counter on that node; the control plane ignores a report older than what it holds,
    /// so reordered or duplicated reports cannot roll a fact back.
    pub seq: u64,
    /// Restarts so far.
    pub restarts: u32,
    /// Crash reason, if any.
    pub last_error: Option<String>,
    /// Placement epoch of the instance on that node (see [`StartInstanceRequest::epoch`]).
    pub epoch: u64,
    /// See [`InstanceMetadata::restart_streak`].
    pub restart_streak: u32,
    /// See [`InstanceMetadata::backoff_ms`].
    pub backoff_ms: Option<u64>,
    /// The placement's seal (see [`StartInstanceRequest::seal`]).
    pub seal: PlacementSeal,
}

/// Everything an agent knows about one of its instances: the facts the control plane rebuilds from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceFacts {
    /// Metadata, with the current status.
    pub metadata: InstanceMetadata,
    /// Assignments the agent enforces for it.
    pub capabilities: Vec<CapabilityAssignment>,
    /// Restart policy the agent applies.
    pub restart_policy: RestartPolicy,
    /// The guest's arguments and environment.
    pub config: GuestConfig,
    /// Its placement constraints (see [`StartRequest::constraints`]).
    pub constraints: Labels,
    /// Sequence number of the latest fact about the instance (a status change or a capability change).
    pub seq: u64,
    /// Placement epoch (see [`StartInstanceRequest::epoch`]); facts order by `(epoch, seq)`.
    pub epoch: u64,
    /// The registry lease the agent held when it accepted the instance (none without a registry).
    pub lease: Option<i64>,
    /// The agent's last snapshot before it accepted this placement: that snapshot and older ones of the same
    /// run could not hold the instance, so their lacking it proves nothing.
    pub accepted_after: SnapshotMark,
    /// The placement's seal (see [`StartInstanceRequest::seal`]).
    pub seal: PlacementSeal,
}

/// One snapshot of one run of an agent: `sequence` numbers the snapshots of run `boot` in the order they were
/// taken (see [`NodeReport::sequence`]). Ordering by these numbers needs no clock: wall clocks jump, and a
/// snapshot and a start's answer travel on different connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SnapshotMark {
    /// The agent process run.
    pub boot: u64,
    /// The snapshot's number in that run (0: before the first).
    pub sequence: u64,
}

impl SnapshotMark {
    /// Whether this snapshot was taken before the placement accepted at `accepted` existed on its agent.
    pub fn predates(self, accepted: SnapshotMark) -> bool {
        self.boot == accepted.boot && self.sequence <= accepted.sequence
    }
}

/// Agent → control plane, periodically and at start-up: who I am, where I listen, what I run. Idempotent;
/// it is both registration and heartbeat, and after a control-plane restart it is what the control plane
/// rebuilds its maps from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeReport {
    /// Must equal [`PROTOCOL_VERSION`].
    pub protocol_version: u32,
    /// Node id, unique in the cluster.
    pub node_id: String,
    /// Address at which the agent serves [`NodeAgent`].
    pub agent_addr: String,
    /// Most instances this node accepts.
    pub max_instances: u32,
    /// The node's labels, which placement constraints are matched against.
    pub labels: Labels,
    /// Whether the node is drained: it takes no new instances (see [`ControlPlane::drain_node`]).
    pub drained: bool,
    /// Every instance the agent holds; in a delta (`base` set), only those whose facts changed since.
    pub instances: Vec<InstanceFacts>,
    /// Identifies this run of the agent process (drawn when it starts): a snapshot of an earlier run is stale.
    pub boot: u64,
    /// Numbers this run's snapshots from 1, in the order they were taken: one older than a snapshot already
    /// applied is stale (it may arrive late, on a connection given up for dead) and is ignored.
    pub sequence: u64,
    /// `None`: a full snapshot. `Some(b)`: a delta against this run's snapshot `b`, which the control plane said
    /// it holds ([`NodeAck::holding`]); see [`crate::delta`]. A control plane that does not hold `b` applies
    /// nothing and answers `holding: None`, and the agent sends a full snapshot next.
    pub base: Option<u64>,
    /// In a delta, the instances snapshot `base` held and this one does not.
    pub removed: Vec<String>,
}

/// A node as the control plane sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Node id.
    pub node_id: String,
    /// Agent address.
    pub agent_addr: String,
    /// Whether it gets new instances: its heartbeats arrive and, with a registry, its lease is alive.
    pub available: bool,
    /// Instances it holds (all statuses).
    pub instances: u32,
    /// Its quota.
    pub max_instances: u32,
    /// Its labels.
    pub labels: Labels,
    /// Whether it is drained: available, but placing nothing new there.
    pub drained: bool,
}

/// What a drain did: which instances moved where, and which stayed and why.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainReport {
    /// (instance, the node it now runs on), in instance order.
    pub moved: Vec<(String, String)>,
    /// (instance, why it was not moved): a `never` instance runs on where it is until it ends; one whose
    /// placement is in flight, or that no node can take, is left for a later drain.
    pub stayed: Vec<(String, String)>,
}

/// Control plane answer to QueryInstance: metadata plus assignments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceDetails {
    /// Metadata with the current fact.
    pub metadata: InstanceMetadata,
    /// Capability assignments.
    pub capabilities: Vec<CapabilityAssignment>,
    /// Restart policy.
    pub restart_policy: RestartPolicy,
    /// The guest's arguments and environment.
    pub config: GuestConfig,
    /// Placement constraints.
    pub constraints: Labels,
}

/// One key-value pair read by the operator-facing KV inspection call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvEntry {
    /// Node whose store holds it.
    pub node_id: String,
    /// Key.
    pub key: String,
    /// Value.
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
}

/// The control plane's answer to a node's report: fresh seals of the grants it holds for the node's instances,
/// when the ones the node has are due to be renewed (empty otherwise).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAck {
    /// One seal per grant, each with the assignment it covers: the agent takes a seal only for a grant it holds
    /// in exactly that form (a grant changed since keeps the seal it came with).
    pub renewed: Vec<(CapabilityAssignment, GrantSeal)>,
    /// The node's snapshot the control plane holds now (the report's own `sequence` when it was applied): the
    /// next report may be a delta against it. `None`: send a full one.
    pub holding: Option<u64>,
}

/// The control plane's API: the design's six client calls, plus the two calls agents make.
#[tarpc::service]
pub trait ControlPlane {
    /// StartInstance: validate, place on a node, start there; returns the instance id.
    async fn start_instance(request: StartRequest) -> Result<String, ErrorResponse>;
    /// StopInstance.
    async fn stop_instance(instance_id: String) -> Result<(), ErrorResponse>;
    /// RestartInstance: end the instance's current run, if any, and start a new one from its module with fresh
    /// memory on the node that holds it (a stopped or crashed instance runs again). Counts as a restart.
    async fn restart_instance(instance_id: String) -> Result<(), ErrorResponse>;
    /// QueryInstance.
    async fn query_instance(instance_id: String) -> Result<InstanceDetails, ErrorResponse>;
    /// ListInstances, ordered by instance id.
    async fn list_instances() -> Result<Vec<InstanceMetadata>, ErrorResponse>;
    /// AssignCapability: add or replace one capability of an instance; takes effect on its next call.
    async fn assign_capability(
        instance_id: String,
        capability_id: String,
        permissions: Vec<String>,
    ) -> Result<(), ErrorResponse>;
    /// RevokeCapability: takes effect on the instance's next call.
    async fn revoke_capability(instance_id: String, capability_id: String) -> Result<(), ErrorResponse>;
    /// RemoveInstance: forget an ended instance (stopped, or crashed for good) on its node and here, with its
    /// grants, and its module's bytes once no instance uses them. INVALID_REQUEST while it runs or waits to
    /// restart: stop it first.
    async fn remove_instance(instance_id: String) -> Result<(), ErrorResponse>;
    /// An instance's output after line `after` (0: from the oldest held), from the buffer on its node
    /// ([`LogPage`]).
    async fn instance_logs(instance_id: String, after: u64) -> Result<LogPage, ErrorResponse>;
    /// What changed in the control plane's maps after event `after` (0: from the oldest held), from the journal
    /// it keeps in memory ([`EventPage`]).
    async fn events(after: u64) -> Result<EventPage, ErrorResponse>;
    /// Nodes known to the control plane.
    async fn list_nodes() -> Result<Vec<NodeInfo>, ErrorResponse>;
    /// DrainNode: the node takes no new instances, and each of its instances whose restart policy would run it
    /// again after a failure is moved: stopped there first, then started on another node under the next
    /// placement epoch (never two runs at once). `drained: false` undoes it. Safe to repeat. The agent keeps the
    /// mark, and reports it, until it is undrained or restarts.
    async fn drain_node(node_id: String, drained: bool) -> Result<DrainReport, ErrorResponse>;
    /// Operator view of a KV store (capability id) on every node, keys starting with `prefix`.
    async fn inspect_kv(capability_id: String, prefix: String) -> Result<Vec<KvEntry>, ErrorResponse>;
    /// Agent → control plane: registration and heartbeat with a full snapshot of its facts.
    async fn report_node(report: NodeReport) -> Result<NodeAck, ErrorResponse>;
    /// Agent → control plane: one status change, sent as it happens.
    async fn report_status(report: StatusReport) -> Result<(), ErrorResponse>;
}

/// The node agent's API, called by the control plane (design §Node Agent interface).
#[tarpc::service]
pub trait NodeAgent {
    /// StartInstanceLocal; idempotent by instance id.
    async fn start_instance_local(request: StartInstanceRequest) -> StartInstanceResponse;
    /// StopInstanceLocal; stopping a stopped instance succeeds.
    async fn stop_instance_local(request: StopInstanceRequest) -> StopInstanceResponse;
    /// RestartInstance: stop if running, then start again from the module (fresh memory).
    async fn restart_instance(instance_id: String) -> Result<(), ErrorResponse>;
    /// GetInstanceStatus.
    async fn get_instance_status(instance_id: String) -> Result<InstanceStatus, ErrorResponse>;
    /// Every instance this agent holds, as a numbered snapshot (the same message as its heartbeat).
    async fn list_local_instances() -> NodeReport;
    /// Replace (or add) one capability assignment of a local instance, with the control plane's seal of it for
    /// this node (see [`StartInstanceRequest::grant_seals`]); returns its facts after the change.
    async fn assign_capability(
        assignment: CapabilityAssignment,
        seal: GrantSeal,
    ) -> Result<InstanceFacts, ErrorResponse>;
    /// Remove one capability assignment of a local instance; returns its facts after the change.
    async fn revoke_capability(instance_id: String, capability_id: String) -> Result<InstanceFacts, ErrorResponse>;
    /// Operator view of the local KV store `capability_id`.
    async fn inspect_kv(capability_id: String, prefix: String) -> Result<Vec<KvEntry>, ErrorResponse>;
    /// A local instance's output after line `after`.
    async fn instance_logs(instance_id: String, after: u64) -> Result<LogPage, ErrorResponse>;
    /// Marks the node drained (new starts are refused with RESOURCE_EXHAUSTED) or not; reported in every
    /// snapshot from then on.
    async fn set_drained(drained: bool);
    /// RemoveInstance: forget an ended instance (stopped, or crashed with no restart pending), its grants and
    /// mailbox. Answers the agent's snapshot number at removal: snapshots numbered up to it may still hold the
    /// instance. INVALID_REQUEST while it runs or waits to restart.
    async fn remove_instance_local(instance_id: String) -> Result<SnapshotMark, ErrorResponse>;
    /// The bytes of a module this agent runs, by module hash: how a restarted control plane recovers what it
    /// needs to reschedule an instance elsewhere. INSTANCE_NOT_FOUND if the agent no longer holds them.
    async fn module_bytes(module_hash: String) -> Result<Vec<u8>, ErrorResponse>;
}
