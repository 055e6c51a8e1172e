//! The control plane: validates API requests, places instances on nodes, and answers queries from an
//! in-memory cache of execution facts reported by node agents (P7, P13, P14, P15).
//!
//! It keeps no state of its own worth persisting: after a restart it starts empty and rebuilds every map from
//! the next [`NodeReport`] of each agent. What it holds is exactly the design's two maps
//! (instance id → metadata, instance id → capability assignments) plus the node list and, per instance, the
//! sequence number of the newest fact so reordered reports cannot roll a fact back.

mod drain;
mod events;
mod facts;
mod grants;
mod membership;
mod metrics;
mod node_index;
mod removal;
mod reschedule;
mod seal;
mod server;
mod snapshots;
mod tracked;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use factum_env::{rpc, Env};
use factum_proto::{
    CapabilityAssignment, ErrorCode, ErrorResponse, GrantKey, InstanceDetails, InstanceFacts, InstanceMetadata,
    InstanceStatus, KvEntry, NodeAck, NodeAgentClient, NodeInfo, NodeReport, RestartPolicy, StartInstanceRequest,
    StartRequest, StatusReport, StopInstanceRequest, MAX_MODULE_BYTES, PROTOCOL_VERSION,
};

use crate::snapshots::Snapshots;
use crate::tracked::Tracked;

pub use removal::DEFAULT_RETENTION;
pub use seal::PlacementKey;
pub use server::serve;

/// Control plane settings.
#[derive(Debug, Clone)]
pub struct ControlPlaneConfig {
    /// A node whose last report is older than this is unavailable; its instances' status becomes `unknown`.
    pub node_timeout: Duration,
    /// How often the failure detector looks.
    pub check_interval: Duration,
    /// Deadline of one call to an agent.
    pub rpc_timeout: Duration,
    /// With a registry: when a node's lease expires, start its instances whose restart policy is `always` or
    /// `on_failure` (and whose retries are not used up) on another node, under the next placement epoch. Safe
    /// because an agent fences its reschedulable instances before its lease can expire.
    pub reschedule: bool,
    /// Longest wait of one registry watch call; the membership is re-read at least this often.
    pub watch_wait: Duration,
    /// How long an instance that ended for good (stopped, or crashed with no restart pending) is kept before it
    /// is removed, here and on its node.
    pub retention: Duration,
    /// Seals every placement this control plane issues; facts about a placement whose seal does not match are
    /// refused (see [`PlacementKey`]). The plaintext default is public.
    pub placement_key: PlacementKey,
    /// Seals every grant this control plane sends a node, for providers on other hosts to check (P17, see
    /// [`factum_proto::GrantKey`]). The plaintext default is public; a TLS cluster uses
    /// [`PlacementKey::grant_key`].
    pub grant_key: GrantKey,
    /// How long a grant's seal lasts (see [`factum_proto::GrantKey`]): a node's seals are renewed in answer to
    /// its reports once half of this is gone, so it is also how long a node cut off from the control plane
    /// keeps its providers on other hosts, and how long a grant no longer held stays usable there at most.
    pub grant_ttl: Duration,
    /// A deliberate bug, for proving that the simulator catches it (`sim/tests/injected_bugs.rs`). Compiled
    /// only with the `injected-bugs` feature, which the simulator turns on and the `factum` binary does not.
    #[cfg(feature = "injected-bugs")]
    pub injected_bug: Option<InjectedBug>,
}

impl ControlPlaneConfig {
    /// Whether `bug` is injected.
    fn has_bug(&self, bug: InjectedBug) -> bool {
        self.injected() == Some(bug)
    }

    /// The injected bug.
    #[cfg(feature = "injected-bugs")]
    fn injected(&self) -> Option<InjectedBug> {
        self.injected_bug
    }

    /// None: built without the `injected-bugs` feature.
    #[cfg(not(feature = "injected-bugs"))]
    fn injected(&self) -> Option<InjectedBug> {
        None
    }
}

/// Bugs the simulator must catch; see [`ControlPlaneConfig::injected_bug`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InjectedBug {
    /// Snapshots only update instances already known: a restarted control plane never rebuilds (breaks P13).
    NoRebuildFromSnapshots,
    /// The failure detector never fires: a dead node's instances stay `running` (breaks P12, P14).
    NoFailureDetection,
    /// A placed instance is listed `running` before its node says anything: an intention shown as a fact
    /// (breaks P9, P14).
    OptimisticRunning,
    /// A reschedule whose start fails is handled like a first start that fails: the record is dropped, so an
    /// instance that ran for days vanishes from the list (breaks P13; the kind of bug c11b795 fixed).
    ForgetFailedReschedules,
    /// A node whose lease ends is forgotten while its instances stay listed (breaks P6).
    ForgetLostNodes,
    /// Capability facts from agents are never applied: the registry keeps what the start said (breaks P5).
    FrozenCapabilities,
    /// Placements that did not take are never tried again (breaks P12 liveness: `always_running`).
    NoPlacementRetries,
    /// A report that an instance stopped running is taken in (its sequence number) but its status is not:
    /// the list keeps saying `running` (breaks P9: the status is not the one the agent reported).
    StickyRunning,
    /// Once the control plane has marked an instance `unknown` (its node went silent), later facts from the
    /// node update everything but the status: the instance stays `unknown` after the node is back (breaks P14:
    /// `no_unknown`, `all_running`).
    StickyUnknown,
    /// A node that goes silent makes every instance on it `unknown`, also those that had already stopped or
    /// crashed for good (breaks P14: an ended run's status is a fact the node's silence does not change).
    UnknownEndedRuns,
    /// A snapshot is applied whenever it arrives, even after a newer one from the same node, and judges losses
    /// as if it were taken last, listings too: any can come late and make instances started since look lost
    /// (breaks P8 and P13; the listing half was a real bug, found at swarm seed 1403002923, and so was judging a
    /// heartbeat older than a placement, found at agent_crash seed 7).
    AcceptStaleSnapshots,
    /// A placement keeps the backoff it built up during an outage when nodes join again, so it may wait up to
    /// 10 s after the cluster healed (breaks the swarm's settle deadlines: found at swarm seed 1201401228).
    BackoffAcrossJoins,
    /// A removed instance leaves no tombstone, so a snapshot its agent took before the removal, arriving after
    /// it, brings the instance back (breaks removed_instances_stay_removed).
    NoTombstones,
    /// A removal's tombstone covers only the node the instance was removed from, and a drain leaves its stopped
    /// copies for a snapshot to show: a copy whose discard was lost brings a removed instance back (breaks
    /// removed_instances_stay_removed; a real bug, found at swarm seed 9402395).
    TombstoneOnlyWhereRemoved,
    /// A drain starts an instance on its new node before it has stopped on the drained one, so for a while it
    /// runs twice (breaks `single_placement`).
    DrainStartsFirst,
    /// A rescheduled instance goes to any node, whatever its placement constraints say (breaks
    /// `placements_satisfy_constraints`).
    RescheduleIgnoresConstraints,
    /// Grant seals are never renewed: once the first ones expire, providers on other hosts refuse every call
    /// (breaks `provider_host_answers`).
    NoSealRenewal,
    /// Without a registry, a placement retry on a node reschedules everything reschedulable there, as if the
    /// node had left, though nothing fenced it (breaks `single_placement`; the bug seed 23000735 found).
    RescheduleLiveNodes,
}

impl Default for ControlPlaneConfig {
    fn default() -> Self {
        Self {
            node_timeout: Duration::from_secs(5),
            check_interval: Duration::from_millis(500),
            rpc_timeout: Duration::from_secs(10),
            reschedule: true,
            watch_wait: Duration::from_secs(5),
            retention: DEFAULT_RETENTION,
            placement_key: PlacementKey::plaintext(),
            grant_key: GrantKey::plaintext(),
            grant_ttl: DEFAULT_GRANT_TTL,
            #[cfg(feature = "injected-bugs")]
            injected_bug: None,
        }
    }
}

/// The default [`ControlPlaneConfig::grant_ttl`]: long beside a control plane's restart and clock skew.
pub const DEFAULT_GRANT_TTL: Duration = Duration::from_secs(600);

/// Per-instance bookkeeping beside the metadata.
#[derive(Debug, Clone)]
struct InstanceRecord {
    metadata: InstanceMetadata,
    restart_policy: RestartPolicy,
    /// Arguments and environment, sent again with every placement.
    config: factum_proto::GuestConfig,
    /// Placement constraints, honoured by every placement of it.
    constraints: factum_proto::Labels,
    /// Sequence number of the newest applied status fact from `metadata.node_id`.
    seq: u64,
    /// Sequence number of the newest applied capability fact (the agent is the authority on assignments).
    caps_seq: u64,
    /// Placement epoch: facts from an older one are ignored.
    epoch: u64,
    /// Registry lease of the node under which this placement was made (none without a registry).
    lease: Option<i64>,
    /// Set when a (re)scheduled placement did not take: when to try again (env clock), and how.
    retry: Option<(Duration, reschedule::Retry)>,
    /// Placement attempts that failed in a row, for the backoff.
    placement_failures: u32,
    /// Where the agent's acceptance of this placement falls among its snapshots, once its facts said so.
    accepted_after: Option<factum_proto::SnapshotMark>,
    /// A status report of this placement was applied. The agent sends reports and snapshots from one task, each
    /// after the last was answered, so any snapshot applied after it was taken after the agent accepted.
    reported: bool,
    /// Since when (env clock) the retention passes have seen it ended for good.
    ended_since: Option<Duration>,
}

#[derive(Debug, Clone)]
struct NodeRecord {
    agent_addr: String,
    max_instances: u32,
    /// As its last applied snapshot said.
    labels: factum_proto::Labels,
    /// Drained: it takes no new instances. The agent holds the mark; this is what it last said (or answered).
    drained: bool,
    last_seen: Duration,
    available: bool,
    /// Whether the registry lists the node (always true without a registry). Only registered nodes get new
    /// instances: an unregistered one may be fencing.
    registered: bool,
    /// Its current registry lease, as last seen in the registry.
    lease: Option<i64>,
    client: Option<NodeAgentClient>,
    /// Which snapshots of the node are still news: see [`Snapshots`].
    snapshots: Snapshots,
    /// Wall-clock milliseconds from which its grant seals are due to be renewed (0: at its next report).
    seals_due_ms: u64,
    /// Hashes of modules a start on it took, so the next start of one sends only the hash. A belief, not a fact:
    /// a start that finds the module gone sends the bytes after all.
    modules: BTreeSet<String>,
}

impl NodeRecord {
    /// A node first heard of at `now`: available, not (yet) registered, no labels, not drained.
    fn new(agent_addr: String, max_instances: u32, now: Duration) -> Self {
        NodeRecord {
            agent_addr,
            max_instances,
            labels: Default::default(),
            drained: false,
            last_seen: now,
            available: true,
            registered: false,
            lease: None,
            client: None,
            snapshots: Snapshots::default(),
            seals_due_ms: 0,
            modules: BTreeSet::new(),
        }
    }
}

#[derive(Default)]
struct State {
    /// instance id → metadata (design map 1).
    instances: Tracked<InstanceRecord>,
    /// instance id → capability id → assignment (design map 2).
    capabilities: Tracked<BTreeMap<String, CapabilityAssignment>>,
    nodes: BTreeMap<String, NodeRecord>,
    /// Instances per node: for placement, snapshots and failure detection.
    by_node: node_index::NodeIndex,
    /// Starts sent to an agent and not yet answered: a snapshot that lacks them is not evidence of loss.
    pending_starts: BTreeSet<String>,
    /// Module bytes by hash, kept for rescheduling; refilled from agents after a restart.
    modules: BTreeMap<String, Arc<Vec<u8>>>,
    /// Module hashes being fetched from agents now.
    fetching: BTreeSet<String>,
    /// Instances a drain has stopped on their node and is about to start elsewhere; a stop by a user takes an
    /// instance out, so the drain does not start it again.
    moving: BTreeSet<String>,
    /// (node, instance) → whether its removal is in flight: ended copies of instances that now run elsewhere.
    stale_copies: BTreeMap<(String, String), bool>,
    /// Removed instances → where copies of them may still show up in snapshots (see [`removal::Tombstone`]).
    removed: BTreeMap<String, removal::Tombstone>,
    /// Whether a registry decides membership (set when [`ControlPlane::run_membership`] starts).
    registry_mode: bool,
    /// The injected bug, for the fact-merging code that has no config (always `None` in real deployments).
    injected: Option<InjectedBug>,
    /// What facts must be sealed with (the config's).
    placement_key: PlacementKey,
    /// Seals grants (from the config's key and TTL).
    grants: grants::GrantSealer,
    /// What changed, for `factum events`: fed as each [`Locked`] guard is released.
    events: events::Announcer,
}

/// The state, locked. Releasing it announces what changed under it (see [`events`]).
struct Locked<'a> {
    state: MutexGuard<'a, State>,
    env: &'a Env,
    metrics: &'a metrics::ControlPlaneMetrics,
}

impl std::ops::Deref for Locked<'_> {
    type Target = State;
    fn deref(&self) -> &State {
        &self.state
    }
}

impl std::ops::DerefMut for Locked<'_> {
    fn deref_mut(&mut self) -> &mut State {
        &mut self.state
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        let State { instances, capabilities, nodes, events, .. } = &mut *self.state;
        events.publish(instances, capabilities, nodes, || self.env.wall_ms(), |kind| self.metrics.event(kind));
    }
}

struct Inner {
    env: Env,
    config: ControlPlaneConfig,
    state: Mutex<State>,
    /// Set while a pass of [`ControlPlane::retry_reschedules`] runs.
    retrying: std::sync::atomic::AtomicBool,
    metrics: metrics::ControlPlaneMetrics,
}

/// The module map as [`ControlPlane::held_state`] returns it: (hash, bytes).
pub type HeldModules = Vec<(String, Arc<Vec<u8>>)>;

/// The control plane. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct ControlPlane {
    inner: Arc<Inner>,
}

/// The 8-byte header every Wasm binary module starts with.
const WASM_HEADER: [u8; 8] = [0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00];

impl ControlPlane {
    /// An empty control plane. Start [`ControlPlane::run_failure_detector`] beside it.
    pub fn new(env: Env, config: ControlPlaneConfig) -> Self {
        let env = env.with_principal(factum_proto::Principal::ControlPlane);
        let state = State {
            injected: config.injected(),
            placement_key: config.placement_key.clone(),
            grants: grants::GrantSealer::new(config.grant_key.clone(), config.grant_ttl),
            ..State::default()
        };
        let inner =
            Inner { env, config, state: Mutex::new(state), retrying: Default::default(), metrics: Default::default() };
        ControlPlane { inner: Arc::new(inner) }
    }

    fn lock(&self) -> Locked<'_> {
        let state = self.inner.state.lock().unwrap_or_else(|p| p.into_inner());
        Locked { state, env: &self.inner.env, metrics: &self.inner.metrics }
    }

    /// Registers the control plane's metrics (API calls and their latency, events by kind, instances by status,
    /// nodes by state) in `registry`, under `control_plane_`.
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        self.inner.metrics.register(registry, Arc::downgrade(&self.inner));
    }

    fn error(&self, e: ErrorResponse) -> ErrorResponse {
        e.at(self.inner.env.wall_ms())
    }

    /// StartInstance (P6, P18): validates everything before any node is asked, places the instance on the
    /// available node with the fewest active instances (ties: lowest node id), and starts it there.
    /// Idempotent by instance id.
    ///
    /// The work runs on its own task: a caller that goes away (a client timing out, its request cancelled)
    /// must not leave a start half done, its placement pending forever.
    pub async fn start_instance(&self, req: StartRequest) -> Result<String, ErrorResponse> {
        let cp = self.clone();
        let result = self.inner.env.uncancellable(async move { cp.start_inner(req).await }).await;
        let result = result.unwrap_or_else(|| Err(ErrorResponse::internal("the start task ended early")));
        result.map_err(|e| self.error(e))
    }

    async fn start_inner(&self, mut req: StartRequest) -> Result<String, ErrorResponse> {
        let module_hash = module_hash_of(&req)?;
        let by_hash = req.module_bytes.is_empty();
        req.restart_policy.validate()?;
        req.config.validate()?;
        factum_proto::labels::validate("constraints", &req.constraints)?;
        let instance_id = match req.instance_id {
            Some(id) => id,
            None => self.inner.env.random_id("i-"),
        };
        factum_proto::validate_id("instance_id", &instance_id)?;
        let mut capabilities = BTreeMap::new();
        for grant in &req.capabilities {
            let assignment = CapabilityAssignment::new(&instance_id, &grant.capability_id, &grant.permissions)?;
            if capabilities.insert(grant.capability_id.clone(), assignment).is_some() {
                return Err(ErrorResponse::invalid(format!("capability {:?} granted twice", grant.capability_id)));
            }
        }
        let (node_id, client, node_lease, grant_seals) = {
            let mut state = self.lock();
            if let Some(existing) = state.instances.get(&instance_id) {
                // A retry of the same start (a client that timed out) gets the same answer; a different start
                // under a taken id is refused rather than answered as if it had happened.
                let same = existing.metadata.module_hash == module_hash
                    && existing.restart_policy == req.restart_policy
                    && existing.config == req.config
                    && existing.constraints == req.constraints
                    && state.capabilities.get(&instance_id).is_some_and(|held| *held == capabilities);
                return if same {
                    Ok(instance_id)
                } else {
                    Err(ErrorResponse::invalid(format!(
                        "instance id {instance_id} is already used by another start (its module, restart policy, \
                         capabilities, arguments, environment or constraints differ)"
                    )))
                };
            }
            if by_hash && !state.modules.contains_key(&module_hash) {
                return Err(ErrorResponse::module_not_held(&module_hash, "the control plane"));
            }
            let node_id = place(&mut state, &req.constraints)?;
            let node_lease = state.nodes.get(&node_id).and_then(|n| n.lease);
            let record = InstanceRecord {
                metadata: InstanceMetadata {
                    instance_id: instance_id.clone(),
                    node_id: node_id.clone(),
                    module_hash: module_hash.clone(),
                    created_at: self.inner.env.wall_ms(),
                    status: if self.inner.config.has_bug(InjectedBug::OptimisticRunning) {
                        InstanceStatus::Running
                    } else {
                        InstanceStatus::Starting
                    },
                    restarts: 0,
                    last_error: None,
                    restart_streak: 0,
                    backoff_ms: None,
                },
                restart_policy: req.restart_policy,
                config: req.config.clone(),
                constraints: req.constraints.clone(),
                seq: 0,
                caps_seq: 0,
                epoch: 1,
                lease: node_lease,
                retry: None,
                placement_failures: 0,
                accepted_after: None,
                reported: false,
                ended_since: None,
            };
            state.removed.remove(&instance_id); // a new instance under a removed one's id
            state.instances.insert(instance_id.clone(), record);
            state.capabilities.insert(instance_id.clone(), capabilities.clone());
            state.pending_starts.insert(instance_id.clone());
            let client = state.nodes.get(&node_id).and_then(|n| n.client.clone());
            // Kept while an instance uses it: to run it again should its node lose it (rescheduling, a
            // restarted agent), and for later starts by hash. `call_start` sends a node the bytes it lacks.
            let bytes = std::mem::take(&mut req.module_bytes);
            state.modules.entry(module_hash.clone()).or_insert_with(|| Arc::new(bytes));
            let grant_seals = state.grants.seals(&node_id, capabilities.values(), self.inner.env.wall_ms());
            (node_id, client, node_lease, grant_seals)
        };
        let request = StartInstanceRequest {
            instance_id: instance_id.clone(),
            module_bytes: req.module_bytes,
            module_hash: module_hash.clone(),
            grant_seals,
            capabilities: capabilities.into_values().collect(),
            restart_policy: req.restart_policy,
            config: req.config,
            constraints: req.constraints,
            epoch: 1,
            node_lease,
            restarts: 0,
            seal: self.inner.config.placement_key.seal(&instance_id, &node_id, 1),
        };
        let result = self.call_start(&node_id, client, request).await;
        let mut state = self.lock();
        state.pending_starts.remove(&instance_id);
        // Meanwhile the node may have been lost and the instance rescheduled: then the record is no longer
        // this placement's to touch.
        let placement = state.instances.get_mut(&instance_id).filter(|r| r.epoch == 1 && r.metadata.node_id == node_id);
        match result {
            Ok(facts) => {
                facts::apply_facts(&mut state, &node_id, &facts, true, true);
                tracing::info!(%instance_id, node = %node_id, "instance started");
                Ok(instance_id)
            }
            Err(e) if e.error_code == ErrorCode::CommunicationFailure => {
                // The agent may or may not run it; say so, and let its next snapshot settle the fact. Unless it
                // has already reported facts of this placement: then it took, and only the answer was lost.
                if let Some(record) = placement.filter(|r| r.seq == 0) {
                    record.metadata.status = InstanceStatus::Unknown;
                }
                Err(e)
            }
            Err(e) => {
                if placement.is_some() {
                    removal::forget(&mut state, &instance_id); // with its module, if no other instance uses it
                }
                Err(e)
            }
        }
    }

    /// Sends `request` to `node_id`: content-addressed, without the module's bytes, when the node is known to
    /// hold the module, and with them (the request's, or else the module map's) if it turns out not to (its
    /// cache evicted the module, or it restarted).
    async fn call_start(
        &self,
        node_id: &str,
        client: Option<NodeAgentClient>,
        mut request: StartInstanceRequest,
    ) -> Result<InstanceFacts, ErrorResponse> {
        let hash = request.module_hash.clone();
        let (held, kept) = {
            let state = self.lock();
            (state.nodes.get(node_id).is_some_and(|n| n.modules.contains(&hash)), state.modules.get(&hash).cloned())
        };
        let mut own = Some(std::mem::take(&mut request.module_bytes));
        let mut with_bytes = |request: &mut StartInstanceRequest| {
            let own = own.take().unwrap_or_default();
            request.module_bytes = if own.is_empty() { kept.as_deref().cloned().unwrap_or_default() } else { own };
        };
        if !held {
            with_bytes(&mut request);
        }
        let mut result = self.send_start(node_id, client.clone(), &request).await;
        let not_held = ErrorResponse::is_module_not_held;
        if held && result.as_ref().is_err_and(not_held) {
            self.inner.env.trace(|| format!("module {hash} not held by {node_id}: sending its bytes"));
            with_bytes(&mut request);
            result = self.send_start(node_id, client, &request).await;
        }
        let mut state = self.lock();
        if let Some(node) = state.nodes.get_mut(node_id) {
            match &result {
                Ok(_) => node.modules.insert(hash),
                Err(e) if not_held(e) => node.modules.remove(&hash),
                Err(_) => false,
            };
        }
        result
    }

    async fn send_start(
        &self,
        node_id: &str,
        client: Option<NodeAgentClient>,
        request: &StartInstanceRequest,
    ) -> Result<InstanceFacts, ErrorResponse> {
        // Idempotent by instance id and epoch: safe to retry.
        let call = |c: NodeAgentClient| {
            let request = request.clone();
            async move { c.start_instance_local(rpc::rpc_context(), request).await }
        };
        let resp = self.call_agent_retrying(node_id, client, "start", call).await?;
        if resp.success {
            resp.facts.ok_or_else(|| ErrorResponse::internal("agent accepted a start but sent no facts"))
        } else {
            Err(resp.error.unwrap_or_else(|| ErrorResponse::internal("agent refused without a reason")))
        }
    }

    /// StopInstance. Stopping a stopped instance succeeds.
    pub async fn stop_instance(&self, instance_id: &str) -> Result<(), ErrorResponse> {
        self.lock().moving.remove(instance_id);
        let result = async {
            let (node_id, client) = self.route(instance_id)?;
            if let Some(facts) = self.stop_on(instance_id, &node_id, client, "stop").await? {
                facts::apply_facts(&mut self.lock(), &node_id, &facts, false, true);
            }
            Ok(())
        }
        .await;
        result.map_err(|e| self.error(e))
    }

    /// Stops the instance on `node_id` as a user's stop does (no local restart follows); its facts after, if the
    /// agent holds it. `what` names the call in logs.
    async fn stop_on(
        &self,
        instance_id: &str,
        node_id: &str,
        client: Option<NodeAgentClient>,
        what: &str,
    ) -> Result<Option<InstanceFacts>, ErrorResponse> {
        let req = StopInstanceRequest { instance_id: instance_id.to_string() };
        let call = |c: NodeAgentClient| {
            let req = req.clone();
            async move { c.stop_instance_local(rpc::rpc_context(), req).await }
        };
        let resp = self.call_agent_retrying(node_id, client, what, call).await?;
        match resp.success {
            true => Ok(resp.facts),
            false => Err(resp.error.unwrap_or_else(|| ErrorResponse::internal("agent refused without a reason"))),
        }
    }

    /// RestartInstance: the node holding the instance ends its current run, if any, and starts a new one with
    /// fresh memory. Sent once, not retried: a restart is not idempotent (each one counts). The new facts
    /// (starting, then running) arrive as the agent's reports, like any other.
    pub async fn restart_instance(&self, instance_id: &str) -> Result<(), ErrorResponse> {
        let result = async {
            let (node_id, client) = self.route(instance_id)?;
            let id = instance_id.to_string();
            let call = |c: NodeAgentClient| async move { c.restart_instance(rpc::rpc_context(), id).await };
            self.call_agent(&node_id, client, "restart", call).await?
        }
        .await;
        result.map_err(|e| self.error(e))
    }

    /// QueryInstance: the latest fact, never an intention (P14).
    pub fn query_instance(&self, instance_id: &str) -> Result<InstanceDetails, ErrorResponse> {
        let state = self.lock();
        let record = state
            .instances
            .get(instance_id)
            .ok_or_else(|| self.error(ErrorResponse::instance_not_found(instance_id)))?;
        Ok(InstanceDetails {
            metadata: record.metadata.clone(),
            capabilities: state
                .capabilities
                .get(instance_id)
                .map(|c| c.values().cloned().collect())
                .unwrap_or_default(),
            restart_policy: record.restart_policy,
            config: record.config.clone(),
            constraints: record.constraints.clone(),
        })
    }

    /// Where the instance's facts stand: its placement epoch and the sequence number of the agent fact its
    /// status comes from (0: none applied yet). For observers such as the simulator's monitor, which checks the
    /// status against what the agent said then, and that facts only ever move forward.
    pub fn fact_position(&self, instance_id: &str) -> Option<(u64, u64)> {
        self.lock().instances.get(instance_id).map(|r| (r.epoch, r.seq))
    }

    /// ListInstances, ordered by id.
    pub fn list_instances(&self) -> Vec<InstanceMetadata> {
        self.lock().instances.values().map(|r| r.metadata.clone()).collect()
    }

    /// Capability assignments of one instance, from the registry (P5).
    pub fn capabilities(&self, instance_id: &str) -> Vec<CapabilityAssignment> {
        self.lock().capabilities.get(instance_id).map(|c| c.values().cloned().collect()).unwrap_or_default()
    }

    /// AssignCapability: validated here, enforced by the agent from its next call on.
    pub async fn assign_capability(
        &self,
        instance_id: &str,
        capability_id: &str,
        permissions: &[String],
    ) -> Result<(), ErrorResponse> {
        let result = async {
            let assignment = CapabilityAssignment::new(instance_id, capability_id, permissions)?;
            let (node_id, client) = self.route(instance_id)?;
            // Assigning replaces: safe to retry. (Revoking is not retried: a second revoke of an applied one
            // would report that the capability is not held.)
            let seal = self.lock().grants.seal(&assignment, &node_id, self.inner.env.wall_ms());
            let call = |c: NodeAgentClient| {
                let assignment = assignment.clone();
                async move { c.assign_capability(rpc::rpc_context(), assignment, seal).await }
            };
            let facts = self.call_agent_retrying(&node_id, client, "assign", call).await??;
            facts::apply_facts(&mut self.lock(), &node_id, &facts, false, true);
            Ok(())
        }
        .await;
        result.map_err(|e| self.error(e))
    }

    /// RevokeCapability: the instance's next call on it is PERMISSION_DENIED.
    pub async fn revoke_capability(&self, instance_id: &str, capability_id: &str) -> Result<(), ErrorResponse> {
        let result = async {
            factum_proto::validate_id("capability_id", capability_id)?;
            let (node_id, client) = self.route(instance_id)?;
            let (instance, capability) = (instance_id.to_string(), capability_id.to_string());
            let call =
                |c: NodeAgentClient| async move { c.revoke_capability(rpc::rpc_context(), instance, capability).await };
            let facts = self.call_agent(&node_id, client, "revoke", call).await??;
            facts::apply_facts(&mut self.lock(), &node_id, &facts, false, true);
            Ok(())
        }
        .await;
        result.map_err(|e| self.error(e))
    }

    /// Everything the control plane holds, rendered for checkers (P7: no application data in it), module
    /// bytes included: user code, so it may carry any string, but nothing else may hide among it.
    /// Returns the maps rendered with `Debug` (byte strings as lists of numbers), and the module map.
    pub fn held_state(&self) -> (String, HeldModules) {
        let state = self.lock();
        let maps = format!(
            "{:?} {:?} {:?} {:?} {:?}",
            state.instances, state.capabilities, state.nodes, state.pending_starts, state.fetching
        );
        (maps, Self::modules_of(&state))
    }

    /// The module map of [`ControlPlane::held_state`] alone, without rendering the other maps (cheap).
    pub fn held_modules(&self) -> HeldModules {
        Self::modules_of(&self.lock())
    }

    fn modules_of(state: &State) -> HeldModules {
        state.modules.iter().map(|(hash, bytes)| (hash.clone(), bytes.clone())).collect()
    }

    /// What changed in the maps after event `after` (0: from the oldest held), oldest first.
    pub fn events(&self, after: u64) -> factum_proto::events::EventPage {
        self.lock().events.page(after)
    }

    /// Nodes and their availability.
    pub fn list_nodes(&self) -> Vec<NodeInfo> {
        let state = self.lock();
        state
            .nodes
            .iter()
            .map(|(node_id, n)| NodeInfo {
                node_id: node_id.clone(),
                agent_addr: n.agent_addr.clone(),
                // With a registry, a node whose lease is gone is not available even while it still reports.
                available: n.available && n.registered,
                instances: state.instances.values().filter(|r| r.metadata.node_id == *node_id).count() as u32,
                max_instances: n.max_instances,
                labels: n.labels.clone(),
                drained: n.drained,
            })
            .collect()
    }

    /// An instance's output after line `after`, from the buffer on the node that holds it (what an earlier
    /// placement's node kept is not moved with it).
    pub async fn instance_logs(
        &self,
        instance_id: &str,
        after: u64,
    ) -> Result<factum_proto::logs::LogPage, ErrorResponse> {
        let result = async {
            let (node_id, client) = self.route(instance_id)?;
            let id = instance_id.to_string();
            let call = |c: NodeAgentClient| {
                let id = id.clone();
                async move { c.instance_logs(rpc::rpc_context(), id, after).await }
            };
            self.call_agent_retrying(&node_id, client, "logs", call).await?
        }
        .await;
        result.map_err(|e| self.error(e))
    }

    /// Operator view of KV store `capability_id` on every available node.
    pub async fn inspect_kv(&self, capability_id: &str, prefix: &str) -> Result<Vec<KvEntry>, ErrorResponse> {
        factum_proto::validate_id("capability_id", capability_id).map_err(|e| self.error(e))?;
        let nodes: Vec<(String, Option<NodeAgentClient>)> = {
            let state = self.lock();
            state.nodes.iter().filter(|(_, n)| n.available).map(|(id, n)| (id.clone(), n.client.clone())).collect()
        };
        let mut entries = Vec::new();
        for (node_id, client) in nodes {
            let (capability, prefix) = (capability_id.to_string(), prefix.to_string());
            let call = |c: NodeAgentClient| async move { c.inspect_kv(rpc::rpc_context(), capability, prefix).await };
            let mut found = self
                .call_agent(&node_id, client, "kv inspection", call)
                .await
                .and_then(|r| r)
                .map_err(|e| self.error(e))?;
            entries.append(&mut found);
        }
        Ok(entries)
    }

    /// An agent's registration / heartbeat: record the node as alive and merge its facts (rebuilds the maps
    /// after a control-plane restart). The answer renews the node's grant seals when they are due.
    pub fn report_node(&self, mut report: NodeReport) -> Result<NodeAck, ErrorResponse> {
        if report.protocol_version != PROTOCOL_VERSION {
            return Err(self.error(ErrorResponse::invalid(format!(
                "node {} speaks protocol {}, this control plane speaks {PROTOCOL_VERSION}",
                report.node_id, report.protocol_version
            ))));
        }
        factum_proto::validate_id("node_id", &report.node_id).map_err(|e| self.error(e))?;
        factum_proto::labels::validate("node labels", &report.labels).map_err(|e| self.error(e))?;
        let now = self.inner.env.clock.now();
        let mut state = self.lock();
        if let Some(base) = report
            .base
            .filter(|base| !state.nodes.get(&report.node_id).is_some_and(|n| n.snapshots.holds(report.boot, *base)))
        {
            // A delta means nothing without its base (this control plane restarted, or a report was lost, or it
            // is late): the agent sends a full snapshot when the answer does not say the report was held.
            self.inner.env.trace(|| {
                format!("delta {} boot={} seq={} base={base} not held", report.node_id, report.boot, report.sequence)
            });
            return Ok(NodeAck::default());
        }
        let registry_mode = state.registry_mode;
        let node = state.nodes.entry(report.node_id.clone()).or_insert_with(|| {
            tracing::info!(node = %report.node_id, addr = %report.agent_addr, "node registered");
            NodeRecord::new(report.agent_addr.clone(), report.max_instances, now)
        });
        let stale_ok = self.inner.config.has_bug(InjectedBug::AcceptStaleSnapshots);
        let taken = node.snapshots.take_in(&mut report);
        let admitted = taken.is_some();
        if !admitted && !stale_ok {
            self.inner.env.trace(|| {
                format!("stale snapshot {} boot={} seq={} ignored", report.node_id, report.boot, report.sequence)
            });
            return Ok(NodeAck::default());
        }
        // The stale one the injected bug lets through is merged as it came.
        let stale = std::mem::take(&mut report.instances);
        if !registry_mode {
            node.registered = true;
        }
        // In registry mode the address is the registry's (written under the node's lease), not what a report
        // says: a report cannot redirect the node's traffic.
        if !registry_mode && node.agent_addr != report.agent_addr {
            node.agent_addr = report.agent_addr.clone();
            node.client = None;
        }
        if !node.available {
            tracing::info!(node = %report.node_id, "node available again");
        }
        node.available = true;
        node.last_seen = now;
        node.max_instances = report.max_instances;
        node.labels = report.labels;
        node.drained = report.drained;
        let snapshot: Vec<&InstanceFacts> = match &taken {
            Some(facts) => facts.values().collect(),
            None => stale.iter().collect(),
        };
        let count = snapshot.len();
        let learn = !self.inner.config.has_bug(InjectedBug::NoRebuildFromSnapshots);
        let mark = if stale_ok {
            factum_proto::SnapshotMark { boot: 0, sequence: u64::MAX } // predates nothing
        } else {
            factum_proto::SnapshotMark { boot: report.boot, sequence: report.sequence }
        };
        facts::merge_snapshot(&mut state, &report.node_id, &snapshot, learn, facts::Source::Heartbeat(mark));
        drop(snapshot);
        if let (Some(facts), Some(node)) = (taken, state.nodes.get_mut(&report.node_id)) {
            node.snapshots.keep(facts);
        }
        // Instances learned here (after a restart of this control plane) can only be run again with their bytes.
        let missing = membership::missing_modules(&mut state, &report.node_id);
        if !missing.is_empty() {
            self.inner.env.spawn(self.clone().fetch_modules(report.node_id.clone(), missing));
        }
        self.inner.env.trace(|| format!("snapshot {} instances={count}", report.node_id));
        let renewed = self.renew_seals(&mut state, &report.node_id);
        drop(state);
        self.discard_stale_copies(&report.node_id);
        Ok(NodeAck { renewed, holding: admitted.then_some(report.sequence) })
    }

    /// Fresh seals of every grant held for `node_id`'s instances, if its seals are due.
    fn renew_seals(&self, state: &mut State, node_id: &str) -> Vec<(CapabilityAssignment, factum_proto::GrantSeal)> {
        if self.inner.config.has_bug(InjectedBug::NoSealRenewal) {
            return Vec::new();
        }
        state.by_node.refresh(&mut state.instances);
        let State { by_node, capabilities, nodes, grants, .. } = state;
        let Some(node) = nodes.get_mut(node_id) else { return Vec::new() };
        let held = by_node.held_by(node_id).filter_map(|id| capabilities.get(id)).flat_map(|caps| caps.values());
        let renewed = grants.renewal(node_id, held, &mut node.seals_due_ms, self.inner.env.wall_ms());
        if !renewed.is_empty() {
            self.inner.env.trace(|| format!("renew seals {node_id} grants={}", renewed.len()));
        }
        renewed
    }

    /// One status change from an agent.
    pub fn report_status(&self, report: StatusReport) {
        if self.inner.env.buggify("cp.drop_status_report") {
            return; // the agent's next snapshot must repair it
        }
        let mut state = self.lock();
        facts::apply_report(&mut state, report.clone());
        self.inner.env.trace(|| {
            let now = state.instances.get(&report.instance_id).map(|r| (r.metadata.status, r.seq));
            format!("report {} {} seq={} -> {now:?}", report.instance_id, report.status, report.seq)
        });
    }

    /// Marks nodes unavailable once their reports stop, and their instances `unknown`. Runs until the runtime
    /// ends.
    pub async fn run_failure_detector(self) {
        loop {
            self.inner.env.clock.sleep(self.inner.config.check_interval).await;
            self.detect_failures();
            self.expire_ended();
            if self.inner.config.reschedule {
                self.inner.env.spawn(self.clone().retry_reschedules());
            }
        }
    }

    /// One pass of the failure detector.
    pub fn detect_failures(&self) {
        if self.inner.config.has_bug(InjectedBug::NoFailureDetection) {
            return;
        }
        let now = self.inner.env.clock.now();
        let timeout = self.inner.config.node_timeout;
        let mut state = self.lock();
        let expired: Vec<String> = state
            .nodes
            .iter()
            .filter(|(_, n)| n.available && now.saturating_sub(n.last_seen) > timeout)
            .map(|(id, _)| id.clone())
            .collect();
        for node_id in expired {
            tracing::warn!(node = %node_id, "node missed its heartbeats; marking it unavailable");
            if let Some(node) = state.nodes.get_mut(&node_id) {
                node.available = false;
                node.client = None;
            }
            facts::mark_node_unknown(&mut state, &node_id);
            self.inner.env.trace(|| format!("node {node_id} unavailable"));
        }
    }

    fn route(&self, instance_id: &str) -> Result<(String, Option<NodeAgentClient>), ErrorResponse> {
        let state = self.lock();
        let record = state.instances.get(instance_id).ok_or_else(|| ErrorResponse::instance_not_found(instance_id))?;
        let node_id = record.metadata.node_id.clone();
        let node = state.nodes.get(&node_id);
        if !node.is_some_and(|n| n.available) {
            return Err(ErrorResponse::communication(format!("node {node_id} running {instance_id} is unavailable")));
        }
        Ok((node_id, node.and_then(|n| n.client.clone())))
    }

    /// The cached client of a node, connecting if there is none.
    async fn client(&self, node_id: &str, cached: Option<NodeAgentClient>) -> Result<NodeAgentClient, ErrorResponse> {
        if let Some(client) = cached {
            return Ok(client);
        }
        let addr = self.lock().nodes.get(node_id).map(|n| n.agent_addr.clone());
        let addr = addr.ok_or_else(|| ErrorResponse::communication(format!("unknown node {node_id}")))?;
        let env = &self.inner.env;
        let stream = match env
            .timeout(
                self.inner.config.rpc_timeout,
                rpc::dial(env, &addr, &factum_proto::Principal::Node(node_id.to_string())),
            )
            .await
        {
            Some(Ok(stream)) => stream,
            Some(Err(e)) => {
                return Err(ErrorResponse::communication(format!("cannot reach node {node_id} at {addr}: {e}")))
            }
            None => {
                return Err(ErrorResponse::communication(format!("connecting to node {node_id} at {addr} timed out")))
            }
        };
        let new = NodeAgentClient::new(tarpc::client::Config::default(), rpc::transport(stream));
        let client = rpc::start_client(env, new);
        if let Some(node) = self.lock().nodes.get_mut(node_id) {
            node.client = Some(client.clone());
        }
        Ok(client)
    }

    /// The one way the control plane calls an agent: through the node's cached client (connecting if needed),
    /// under the RPC deadline on the env clock. A transport failure or a timeout drops the cached client and is
    /// COMMUNICATION_FAILURE naming `what` and the node.
    async fn call_agent<T, F, Fut>(
        &self,
        node_id: &str,
        cached: Option<NodeAgentClient>,
        what: &str,
        call: F,
    ) -> Result<T, ErrorResponse>
    where
        F: FnOnce(NodeAgentClient) -> Fut,
        Fut: std::future::Future<Output = Result<T, tarpc::client::RpcError>>,
    {
        let client = self.client(node_id, cached).await?;
        let timeout = self.inner.config.rpc_timeout;
        match self.inner.env.timeout(timeout, call(client)).await {
            Some(Ok(value)) => Ok(value),
            Some(Err(e)) => {
                Err(self.drop_client(node_id, format!("{what} on node {node_id} failed: {}", rpc::describe(&e))))
            }
            None => Err(self.drop_client(node_id, format!("{what} on node {node_id} timed out after {timeout:?}"))),
        }
    }

    /// [`Self::call_agent`] for idempotent calls: a COMMUNICATION_FAILURE is retried with exponential backoff
    /// (from 50 ms, doubling) on the env clock while the node is still available, within one RPC timeout in
    /// all; the last failure is returned.
    async fn call_agent_retrying<T, F, Fut>(
        &self,
        node_id: &str,
        cached: Option<NodeAgentClient>,
        what: &str,
        call: F,
    ) -> Result<T, ErrorResponse>
    where
        F: Fn(NodeAgentClient) -> Fut,
        Fut: std::future::Future<Output = Result<T, tarpc::client::RpcError>>,
    {
        let env = &self.inner.env;
        let give_up_at = env.clock.now() + self.inner.config.rpc_timeout;
        let mut backoff = Duration::from_millis(50);
        let mut cached = cached;
        loop {
            match self.call_agent(node_id, cached, what, &call).await {
                Err(e) if e.error_code == ErrorCode::CommunicationFailure => {
                    let available = self.lock().nodes.get(node_id).is_some_and(|n| n.available);
                    if !available || env.clock.now() + backoff >= give_up_at {
                        return Err(e);
                    }
                    tracing::debug!(node = node_id, ?backoff, "{what} failed; retrying");
                    env.clock.sleep(backoff).await;
                    backoff *= 2;
                    cached = self.lock().nodes.get(node_id).and_then(|n| n.client.clone());
                }
                other => return other,
            }
        }
    }

    fn drop_client(&self, node_id: &str, message: String) -> ErrorResponse {
        tracing::warn!(node = node_id, "{message}");
        if let Some(node) = self.lock().nodes.get_mut(node_id) {
            node.client = None;
        }
        ErrorResponse::communication(message).with_detail("node_id", node_id)
    }
}

/// The hash of the module `req` starts: its bytes' (checked against the hash it names, if any), or, with no
/// bytes, the hash it names (a start by hash).
fn module_hash_of(req: &StartRequest) -> Result<String, ErrorResponse> {
    if !req.module_bytes.is_empty() || req.module_hash.is_none() {
        validate_module_bytes(&req.module_bytes)?;
    }
    factum_proto::start_module_hash(&req.module_bytes, req.module_hash.as_deref())
}

fn validate_module_bytes(bytes: &[u8]) -> Result<(), ErrorResponse> {
    if bytes.len() > MAX_MODULE_BYTES {
        return Err(ErrorResponse::new(
            ErrorCode::ResourceExhausted,
            format!("module of {} bytes is above the {MAX_MODULE_BYTES}-byte limit", bytes.len()),
        ));
    }
    if !bytes.starts_with(&WASM_HEADER) {
        return Err(ErrorResponse::invalid(
            "module_bytes is not a WebAssembly binary module (no \\0asm version 1 header); compile .wat first",
        ));
    }
    Ok(())
}

/// Placement: among the available nodes whose labels satisfy `constraints`, the one with the fewest active
/// (starting/running) instances below its quota; ties go to the lowest node id, so placement is deterministic.
fn place(state: &mut State, constraints: &factum_proto::Labels) -> Result<String, ErrorResponse> {
    // The instances written since the last placement, then one pass over the nodes.
    state.by_node.refresh(&mut state.instances);
    let by_node = &state.by_node;
    let up = |n: &&NodeRecord| n.available && n.registered && !n.drained;
    let fits = |n: &&NodeRecord| factum_proto::labels::satisfies(&n.labels, constraints);
    state
        .nodes
        .iter()
        .filter(|(_, n)| up(n) && fits(n))
        .map(|(id, n)| (by_node.active_on(id), id, n.max_instances as usize))
        .filter(|(count, _, max)| count < max)
        .min_by_key(|(count, id, _)| (*count, (*id).clone()))
        .map(|(_, id, _)| id.clone())
        .ok_or_else(|| {
            let wanted = factum_proto::labels::display(constraints);
            let why =
                match (state.nodes.values().filter(up).count(), state.nodes.values().filter(up).filter(fits).count()) {
                    (0, _) if state.nodes.values().any(|n| n.drained) => {
                        "no node is available (drained nodes take no new instances)".to_string()
                    }
                    (0, _) => "no node is available".to_string(),
                    (_, 0) => format!("no available node satisfies the constraints {wanted}"),
                    _ if constraints.is_empty() => "every available node is full".to_string(),
                    _ => format!("every available node that satisfies the constraints {wanted} is full"),
                };
            let error = ErrorResponse::new(ErrorCode::ResourceExhausted, format!("cannot place instance: {why}"));
            if constraints.is_empty() {
                error
            } else {
                error.with_detail("constraints", wanted)
            }
        })
}
