//! The node agent: runs Wasm instances on one node, applies their restart policies, enforces their
//! capabilities at call time, and reports what happened (execution facts) to the control plane.
//!
//! State is in memory only (design §Node Agent): instances with their assignments, policies and crash
//! counters. The agent is the authority on what runs here; the control plane's maps are a cache of the
//! agent's facts and are rebuilt from [`Agent::snapshot`] after a control-plane restart.

mod compiler;
mod discovery;
mod host;
mod link;
mod log_budget;
mod mailbox;
mod metrics;
mod registry_link;
mod reports;
mod server;
pub mod trace_events;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use factum_env::Env;
use factum_proto::{
    CapabilityAssignment, ErrorCode, ErrorResponse, GrantSeal, InstanceFacts, InstanceMetadata, InstanceStatus,
    KvEntry, NodeReport, PlacementSeal, RestartPolicy, SealedGrant, SnapshotMark, StartInstanceRequest, StatusReport,
    PROTOCOL_VERSION,
};
use factum_providers::{Delivery, KvProvider, MessagingProvider, Provider, ProviderHosts};
use factum_wasm::{CachedModule, ExitReason, Instance, Limits, ModuleCache, WasmEngine};
use futures::future::AbortHandle;

pub use compiler::CompileLimits;
pub use discovery::{hosts_of, run_provider_discovery, ROUTING};
pub use link::run_control_plane_link;
pub use log_budget::{LogLimits, MAX_LINE_BYTES};
pub use registry_link::run_registry_link;
pub use reports::StatusReports;
pub use server::serve;

/// The capability providers a node's instances call: its own KV always, its own HTTP and messaging when
/// configured, and providers on other hosts (P17). A kind served by a provider host goes there; the agent's own
/// provider of that kind, if any, serves nothing but operator reads. A call for a kind served nowhere is
/// PROVIDER_UNAVAILABLE.
#[derive(Clone)]
pub struct Providers {
    /// Key-value.
    pub kv: Arc<KvProvider>,
    /// Outbound HTTP.
    pub http: Option<Arc<dyn Provider>>,
    /// Publish/subscribe messaging.
    pub messaging: Option<Arc<MessagingProvider>>,
    /// Provider hosts, by kind (KV and HTTP: calls that answer once; messaging delivers to its subscribers and
    /// runs beside them). A kind listed here goes to its hosts even while it has none (PROVIDER_UNAVAILABLE),
    /// never quietly to this agent's own provider.
    pub remote: Routes,
}

/// The provider hosts of each kind that goes to provider hosts.
pub type Routes = BTreeMap<factum_proto::ProviderType, Arc<ProviderHosts>>;

/// Where a capability call goes.
pub(crate) enum Route {
    /// A provider in this agent.
    Local(Arc<dyn Provider>),
    /// Provider hosts, which check the grant's seal themselves.
    Remote(Arc<ProviderHosts>),
}

impl Providers {
    /// Every provider, KV first.
    pub fn all(&self) -> Vec<Arc<dyn Provider>> {
        let kv: Arc<dyn Provider> = self.kv.clone();
        let messaging = self.messaging.clone().map(|m| m as Arc<dyn Provider>);
        std::iter::once(kv).chain(self.http.clone()).chain(messaging).collect()
    }

    /// Where calls of `kind` go, if anywhere.
    pub(crate) fn route(&self, kind: factum_proto::ProviderType) -> Option<Route> {
        match self.remote.get(&kind) {
            Some(remote) => Some(Route::Remote(remote.clone())),
            None => self.get(kind).map(Route::Local),
        }
    }

    /// The provider of `kind`, if hosted here.
    pub fn get(&self, kind: factum_proto::ProviderType) -> Option<Arc<dyn Provider>> {
        match kind {
            factum_proto::ProviderType::Kv => Some(self.kv.clone()),
            factum_proto::ProviderType::Http => self.http.clone(),
            factum_proto::ProviderType::Messaging => self.messaging.clone().map(|m| m as Arc<dyn Provider>),
        }
    }
}

impl From<Arc<KvProvider>> for Providers {
    fn from(kv: Arc<KvProvider>) -> Self {
        Providers { kv, http: None, messaging: None, remote: BTreeMap::new() }
    }
}

/// Agent settings; defaults suit one node on a laptop.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Unique node id.
    pub node_id: String,
    /// Address the control plane reaches this agent at.
    pub advertise_addr: String,
    /// Most instances in `starting` or `running` at once; more is RESOURCE_EXHAUSTED.
    pub max_instances: u32,
    /// The node's labels, reported with every snapshot; placement constraints are matched against them.
    pub labels: factum_proto::Labels,
    /// Per-instance limits.
    pub limits: Limits,
    /// Per-instance log limits: guest output and audit lines.
    pub log_limits: LogLimits,
    /// Compiled modules kept.
    pub module_cache_capacity: usize,
    /// How many compiles run at once, and how long one may take.
    pub compile_limits: CompileLimits,
    /// How often the agent sends its full snapshot to the control plane.
    pub heartbeat_interval: Duration,
    /// Deadline of one call to the control plane.
    pub rpc_timeout: Duration,
    /// TTL of this node's registry lease; it is renewed every third of it.
    pub lease_ttl: Duration,
    /// A deliberate bug, for proving that the simulator catches it (`sim/tests/injected_bugs.rs`). Compiled
    /// only with the `injected-bugs` feature, which the simulator turns on and the `factum` binary does not.
    #[cfg(feature = "injected-bugs")]
    pub injected_bug: Option<AgentBug>,
}

impl AgentConfig {
    /// Whether `bug` is injected.
    #[cfg(feature = "injected-bugs")]
    fn has_bug(&self, bug: AgentBug) -> bool {
        self.injected_bug == Some(bug)
    }

    /// Never: built without the `injected-bugs` feature.
    #[cfg(not(feature = "injected-bugs"))]
    fn has_bug(&self, _bug: AgentBug) -> bool {
        false
    }
}

/// Bugs the simulator must catch; see [`AgentConfig::injected_bug`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentBug {
    /// Crashed instances under `always`/`on_failure` restart forever, past `max_retries` (breaks P8).
    IgnoreMaxRetries,
    /// A run looks each capability up once and keeps using it: a revoke never reaches it (breaks P4).
    StaleGrants,
    /// A rescheduled instance starts counting restarts from 0 on its new node, so `max_retries` is not
    /// enforced across node losses (breaks P8 cluster-wide).
    ForgetRestartCount,
    /// Losing the registry lease stops nothing: the node keeps running what the control plane reschedules
    /// elsewhere (breaks single placement).
    NoFencing,
    /// A grant is filed on every local instance, not only the one it was assigned to (breaks P19).
    SharedGrants,
    /// On registering, the agent also records each instance it runs in the registry, as if it were a provider
    /// (breaks P11: etcd holds membership and provider metadata only).
    InstancesInRegistry,
    /// A successful capability call's parameters go into the instance's facts, so application data reaches
    /// the control plane (breaks P7).
    CallsInFacts,
    /// Only the registry link's timer fences the node, so a process that wakes from a pause past its lease
    /// deadline may serve calls and starts before that timer runs (breaks P12's fencing).
    FenceOnTimerOnly,
    /// The node fences a whole TTL after its last renewal was sent instead of 4/5 of it: right only if its clock
    /// runs exactly as fast as the registry's (breaks P12's fencing under clock drift).
    FenceAtTtl,
    /// A restart by policy stamps a new creation time, as if the instance were new: a crash changes more
    /// than status, error and restart count (breaks P2).
    RestartRestamps,
    /// A message queued for an instance does not wake its run (a lost wake-up): messages pile up unhandled
    /// (breaks messaging liveness).
    LostWakeups,
    /// A heartbeat sent as a delta leaves out the instances gone since its base: the control plane keeps facts
    /// of instances the node no longer holds, and relists an instance removed for good.
    DeltaWithoutRemovals,
}

impl AgentConfig {
    /// Defaults for node `node_id` reachable at `advertise_addr`.
    pub fn new(node_id: impl Into<String>, advertise_addr: impl Into<String>) -> Self {
        Self {
            node_id: node_id.into(),
            advertise_addr: advertise_addr.into(),
            max_instances: 1000,
            labels: Default::default(),
            limits: Limits::default(),
            log_limits: LogLimits::default(),
            module_cache_capacity: 256,
            compile_limits: CompileLimits::default(),
            heartbeat_interval: Duration::from_secs(1),
            rpc_timeout: Duration::from_secs(5),
            lease_ttl: Duration::from_secs(5),
            #[cfg(feature = "injected-bugs")]
            injected_bug: None,
        }
    }
}

/// One capability as an instance holds it: the assignment as granted, and its permissions parsed once, so a
/// capability call only clones an `Arc` under the agent's lock.
struct Grant {
    assignment: CapabilityAssignment,
    permissions: Arc<[factum_proto::Permission]>,
    /// The control plane's seal of it for this node, which a provider on another host checks.
    seal: GrantSeal,
}

impl Grant {
    /// Validates `assignment` (it may come off the wire) and parses its permissions.
    fn new(assignment: CapabilityAssignment, seal: GrantSeal) -> Result<Self, ErrorResponse> {
        let permissions = assignment.parsed_permissions()?.into();
        Ok(Grant { assignment, permissions, seal })
    }

    /// The grant as a provider on another host checks it: on `node_id`, under the control plane's seal.
    fn sealed(&self, node_id: &str) -> SealedGrant {
        SealedGrant {
            instance_id: self.assignment.instance_id.clone(),
            capability_id: self.assignment.capability_id.clone(),
            node_id: node_id.to_string(),
            provider_type: self.assignment.provider_type,
            permissions: self.assignment.permissions.clone(),
            seal: self.seal,
        }
    }

    /// `capability=perm,perm` for the trace (see [`trace_events`]).
    fn describe(&self) -> String {
        let perms: Vec<String> = self.permissions.iter().map(ToString::to_string).collect();
        format!("{}={}", self.assignment.capability_id, perms.join(","))
    }
}

/// One instance as the agent holds it.
struct LocalInstance {
    metadata: InstanceMetadata,
    capabilities: BTreeMap<String, Grant>,
    policy: RestartPolicy,
    /// Arguments and environment of every run.
    config: factum_proto::GuestConfig,
    /// Placement constraints, kept only to report them back (the control plane rebuilds from facts).
    constraints: factum_proto::Labels,
    module: CachedModule,
    /// Placement epoch given by the control plane; orders facts across nodes.
    epoch: u64,
    /// The control plane's seal over this placement, sent back with its facts.
    seal: PlacementSeal,
    /// Registry lease held when the instance was accepted.
    lease: Option<i64>,
    /// The last snapshot taken before it was accepted.
    accepted_after: SnapshotMark,
    /// Bumped on every status change; orders facts at the control plane.
    seq: u64,
    /// Bumped whenever a run is replaced or stopped, so a stale supervisor can tell it lost ownership.
    generation: u64,
    abort: Option<AbortHandle>,
    /// Messages for its subscriptions, kept across restarts.
    mailbox: mailbox::Mailbox,
    /// Its last lines of output, kept across restarts.
    logs: factum_proto::journal::Journal<factum_proto::logs::LogLine>,
}

impl LocalInstance {
    fn facts(&self) -> InstanceFacts {
        InstanceFacts {
            metadata: self.metadata.clone(),
            capabilities: self.capabilities.values().map(|grant| grant.assignment.clone()).collect(),
            restart_policy: self.policy,
            config: self.config.clone(),
            constraints: self.constraints.clone(),
            seq: self.seq,
            epoch: self.epoch,
            lease: self.lease,
            accepted_after: self.accepted_after,
            seal: self.seal,
        }
    }
}

pub(crate) struct Inner {
    env: Env,
    config: AgentConfig,
    cache: Arc<ModuleCache>,
    compiler: compiler::Compiler,
    providers: Providers,
    instances: Mutex<BTreeMap<String, LocalInstance>>,
    reports: reports::ReportSender,
    /// Set while the node has lost its registry lease and not yet re-registered: starts are refused, since the
    /// control plane may be rescheduling elsewhere what would run here.
    fenced: std::sync::atomic::AtomicBool,
    /// Drained by the control plane: new starts are refused (see [`Agent::set_drained`]).
    drained: std::sync::atomic::AtomicBool,
    /// Instances in a non-terminal status, kept beside the map (changed only under its lock) so the
    /// `max_instances` check costs the same on an empty node and on one holding 100,000.
    active: std::sync::atomic::AtomicUsize,
    /// While registered: the env-clock instant by which the lease must have been renewed. Whoever takes the
    /// instance lock after it fences the node first (see [`Inner::lock`]).
    lease_deadline: Mutex<Option<Duration>>,
    /// The registry lease this node holds (0: none yet, or no registry).
    lease: std::sync::atomic::AtomicI64,
    /// Numbers capability calls in the trace, pairing each authorization with its outcome.
    calls: std::sync::atomic::AtomicU64,
    /// This run of the agent process, as its snapshots name it.
    boot: u64,
    /// The last snapshot's number in this run.
    snapshots: std::sync::atomic::AtomicU64,
    metrics: metrics::AgentMetrics,
}

/// A node agent. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct Agent {
    inner: Arc<Inner>,
}

impl Agent {
    /// A new agent with no instances, running modules on `engine`, with `providers` (an `Arc<KvProvider>`
    /// alone converts into a set with only KV).
    pub fn new(
        env: Env,
        config: AgentConfig,
        engine: Arc<dyn WasmEngine>,
        providers: impl Into<Providers>,
    ) -> (Self, StatusReports) {
        let providers = providers.into();
        let env = env.with_principal(factum_proto::Principal::Node(config.node_id.clone()));
        let (tx, rx) = reports::queue();
        let cache = Arc::new(ModuleCache::new(engine, config.module_cache_capacity));
        let compiler = compiler::Compiler::new(cache.clone(), config.compile_limits);
        let boot = env.rng.next_u64();
        let inner = Inner {
            env,
            config,
            cache,
            compiler,
            providers,
            instances: Mutex::new(BTreeMap::new()),
            reports: tx,
            fenced: std::sync::atomic::AtomicBool::new(false),
            drained: std::sync::atomic::AtomicBool::new(false),
            active: std::sync::atomic::AtomicUsize::new(0),
            lease_deadline: Mutex::new(None),
            lease: std::sync::atomic::AtomicI64::new(0),
            calls: std::sync::atomic::AtomicU64::new(0),
            boot,
            snapshots: std::sync::atomic::AtomicU64::new(0),
            metrics: metrics::AgentMetrics::default(),
        };
        let inner = Arc::new(inner);
        inner.env.trace(|| trace_events::BOOT.to_string());
        if let Some(messaging) = &inner.providers.messaging {
            let agent = Arc::downgrade(&inner);
            messaging.connect(Arc::new(move |delivery| {
                if let Some(agent) = agent.upgrade() {
                    agent.deliver(delivery);
                }
            }));
        }
        (Agent { inner }, rx)
    }

    /// This agent's node id.
    pub fn node_id(&self) -> &str {
        &self.inner.config.node_id
    }

    /// Registers the agent's metrics (instances by status, status changes, restarts, capability calls and
    /// their latency, lease renewals, fencing) in `registry`, under `agent_` with a `node` label.
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        self.inner.metrics.register(registry, &self.inner.config.node_id, Arc::downgrade(&self.inner));
    }

    /// StartInstanceLocal: compile (cached by hash), instantiate with fresh memory, run under the restart
    /// policy. Idempotent by instance id: starting an id that exists with the same module returns its
    /// metadata; with another module it is INVALID_REQUEST.
    ///
    /// The work runs on its own task: a control plane that gives up on the call (its request cancelled) must
    /// not leave the instance recorded `starting` and never run.
    pub async fn start_instance(&self, req: StartInstanceRequest) -> Result<InstanceFacts, ErrorResponse> {
        let agent = self.clone();
        let result = self.inner.env.uncancellable(async move { agent.start_inner(req).await }).await;
        result.unwrap_or_else(|| Err(ErrorResponse::internal("the start task ended early")))
    }

    async fn start_inner(&self, req: StartInstanceRequest) -> Result<InstanceFacts, ErrorResponse> {
        let inner = &self.inner;
        factum_proto::validate_id("instance_id", &req.instance_id)?;
        req.restart_policy.validate()?;
        req.config.validate()?;
        factum_proto::labels::validate("constraints", &req.constraints)?;
        let mut capabilities = BTreeMap::new();
        for assignment in req.capabilities {
            if assignment.instance_id != req.instance_id {
                return Err(ErrorResponse::invalid("capability assigned to another instance"));
            }
            let seal = req.grant_seals.get(&assignment.capability_id).copied().unwrap_or_default();
            capabilities.insert(assignment.capability_id.clone(), Grant::new(assignment, seal)?);
        }
        // Content-addressed (no bytes): the hash names the module; else the bytes do.
        let named = (!req.module_hash.is_empty()).then_some(req.module_hash.as_str());
        let hash = factum_proto::start_module_hash(&req.module_bytes, named)?;
        let by_hash = req.module_bytes.is_empty() && named.is_some();
        {
            let mut instances = inner.lock();
            // An ended run of an older placement; one still supervised (waiting out a restart backoff) is alive.
            let superseded = instances
                .get(&req.instance_id)
                .is_some_and(|i| i.epoch < req.epoch && i.metadata.status.is_terminal() && i.abort.is_none());
            if superseded {
                // An ended run of an older placement; the control plane placed the instance here anew.
                inner.forget(&mut instances, &req.instance_id);
            }
            if let Some(existing) = instances.get_mut(&req.instance_id) {
                return if existing.metadata.module_hash == hash && existing.config == req.config {
                    if existing.epoch < req.epoch {
                        existing.epoch = req.epoch;
                        existing.seal = req.seal;
                        existing.metadata.restarts = existing.metadata.restarts.max(req.restarts);
                        existing.seq += 1;
                    }
                    Ok(existing.facts())
                } else {
                    Err(ErrorResponse::invalid(format!(
                        "instance id {} is already used by another module or configuration",
                        req.instance_id
                    )))
                };
            }
            let active = inner.active.load(std::sync::atomic::Ordering::SeqCst);
            debug_assert_eq!(active, instances.values().filter(|i| !i.metadata.status.is_terminal()).count());
            if active >= inner.config.max_instances as usize {
                return Err(ErrorResponse::new(
                    ErrorCode::ResourceExhausted,
                    format!(
                        "node {} runs its maximum of {} instances",
                        inner.config.node_id, inner.config.max_instances
                    ),
                ));
            }
        }
        let module = if by_hash {
            self.held_module(&hash)
                .ok_or_else(|| ErrorResponse::module_not_held(&hash, &format!("node {}", inner.config.node_id)))?
        } else {
            inner.compiler.get_or_compile(&inner.env, &hash, &req.module_bytes).await.map_err(ErrorResponse::from)?
        };
        let metadata = InstanceMetadata {
            instance_id: req.instance_id.clone(),
            node_id: inner.config.node_id.clone(),
            module_hash: hash,
            created_at: inner.env.wall_ms(),
            status: InstanceStatus::Starting,
            restarts: if inner.config.has_bug(AgentBug::ForgetRestartCount) { 0 } else { req.restarts },
            last_error: None,
            restart_streak: 0,
            backoff_ms: None,
        };
        {
            let mut instances = inner.lock();
            if let Some(existing) = instances.get(&req.instance_id) {
                // A concurrent start of the same id won the race while we compiled.
                return Ok(existing.facts());
            }
            if inner.fenced.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(ErrorResponse::communication(format!(
                    "node {} holds no registry lease and accepts no instances until it has registered",
                    inner.config.node_id
                )));
            }
            if inner.drained.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(ErrorResponse::new(
                    factum_proto::ErrorCode::ResourceExhausted,
                    format!("node {} is drained and takes no new instances", inner.config.node_id),
                ));
            }
            let held = inner.lease();
            if let (None, Some(held)) = (req.node_lease, held) {
                // A node in a registry takes only placements made under its lease: without one, a start would
                // skip the fencing check.
                return Err(ErrorResponse::invalid(format!(
                    "node {} is registered under lease {held}: a start must name the lease it was placed under",
                    inner.config.node_id
                )));
            }
            if let Some(wanted) = req.node_lease.filter(|wanted| Some(*wanted) != held) {
                return Err(ErrorResponse::communication(format!(
                    "placed under registry lease {wanted}, but node {} holds {held:?}: the placement is stale",
                    inner.config.node_id
                )));
            }
            let metadata = InstanceMetadata { created_at: inner.env.wall_ms(), ..metadata };
            // Read under the lock that numbers snapshots: any snapshot numbered up to this one lacks the instance.
            let accepted_after = inner.snapshot_mark();
            let local = LocalInstance {
                metadata,
                capabilities,
                policy: req.restart_policy,
                config: req.config,
                constraints: req.constraints,
                module,
                epoch: req.epoch,
                seal: req.seal,
                lease: inner.lease(),
                accepted_after,
                seq: 0,
                generation: 0,
                abort: None,
                mailbox: mailbox::Mailbox::default(),
                logs: factum_proto::logs::journal(),
            };
            inner.env.trace(|| {
                let grants: Vec<String> = local.capabilities.values().map(Grant::describe).collect();
                format!("{} {} {}", trace_events::GRANTS, req.instance_id, grants.join(" ")).trim_end().to_string()
            });
            inner.count_active(None, Some(local.metadata.status));
            instances.insert(req.instance_id.clone(), local);
            inner.set_status(&mut instances, &req.instance_id, InstanceStatus::Starting, None);
        }
        match inner.instantiate(&req.instance_id).await {
            Ok(instance) => {
                inner.launch(&req.instance_id, 0, instance);
                self.facts(&req.instance_id).ok_or_else(|| ErrorResponse::instance_not_found(&req.instance_id))
            }
            Err(e) => {
                // Nothing ran: forget the instance so the id can be used again, but report the fact first.
                let mut instances = inner.lock();
                inner.set_status(&mut instances, &req.instance_id, InstanceStatus::Crashed, Some(e.message.clone()));
                inner.forget(&mut instances, &req.instance_id);
                Err(e)
            }
        }
    }

    /// StopInstanceLocal: ends the run (at its next yield point) and records `stopped`. Stopping a stopped
    /// or crashed instance succeeds and changes nothing.
    pub fn stop_instance(&self, instance_id: &str) -> Result<InstanceFacts, ErrorResponse> {
        let inner = &self.inner;
        let mut instances = inner.lock();
        let local = instances.get_mut(instance_id).ok_or_else(|| ErrorResponse::instance_not_found(instance_id))?;
        local.generation += 1;
        // A supervisor still holds the instance while it runs or waits out a restart backoff: cancel it.
        let supervised = local.abort.take().map(|abort| abort.abort()).is_some();
        inner.end_messaging(local, "stopped");
        if supervised || !local.metadata.status.is_terminal() {
            inner.set_status(&mut instances, instance_id, InstanceStatus::Stopped, None);
        }
        tracing::info!(instance_id, node = %inner.config.node_id, "instance stopped on request");
        instances
            .get(instance_id)
            .map(LocalInstance::facts)
            .ok_or_else(|| ErrorResponse::instance_not_found(instance_id))
    }

    /// RemoveInstance: forgets an ended instance (stopped, or crashed with no restart pending) with its grants
    /// and mailbox, so its id can be used again. Returns the snapshot number at removal: snapshots numbered up
    /// to it were taken while the agent still held the instance.
    pub fn remove_instance(&self, instance_id: &str) -> Result<SnapshotMark, ErrorResponse> {
        let inner = &self.inner;
        let mut instances = inner.lock();
        let local = instances.get(instance_id).ok_or_else(|| ErrorResponse::instance_not_found(instance_id))?;
        if !local.metadata.status.is_terminal() || local.abort.is_some() {
            let status = local.metadata.status;
            let why = if local.abort.is_some() && status.is_terminal() { "waits to restart" } else { "is running" };
            return Err(ErrorResponse::invalid(format!(
                "instance {instance_id} {why} ({status}): stop it before removing it"
            )));
        }
        if let Some(mut local) = inner.forget(&mut instances, instance_id) {
            inner.end_messaging(&mut local, "removed");
        }
        tracing::info!(instance_id, node = %inner.config.node_id, "instance removed");
        Ok(inner.snapshot_mark())
    }

    /// RestartInstance: ends the current run if any and starts a new one with fresh memory.
    pub async fn restart_instance(&self, instance_id: &str) -> Result<(), ErrorResponse> {
        let inner = &self.inner;
        let generation = {
            let mut instances = inner.lock();
            let local = instances.get_mut(instance_id).ok_or_else(|| ErrorResponse::instance_not_found(instance_id))?;
            if inner.fenced.load(std::sync::atomic::Ordering::SeqCst) {
                // Its lease is gone, so the control plane may already run the instance elsewhere.
                return Err(ErrorResponse::communication(format!(
                    "node {} holds no registry lease and runs nothing until it has registered",
                    inner.config.node_id
                )));
            }
            local.generation += 1;
            if let Some(abort) = local.abort.take() {
                abort.abort();
            }
            local.mailbox.run_crashed();
            local.metadata.restarts = local.metadata.restarts.saturating_add(1);
            // Asked for, not a crash loop: the streak ends here (and `set_status` ends any backoff wait).
            local.metadata.restart_streak = 0;
            let generation = local.generation;
            inner.set_status(&mut instances, instance_id, InstanceStatus::Starting, None);
            generation
        };
        match inner.instantiate(instance_id).await {
            Ok(instance) => {
                inner.launch(instance_id, generation, instance);
                Ok(())
            }
            Err(e) => {
                let mut instances = inner.lock();
                inner.set_status(&mut instances, instance_id, InstanceStatus::Crashed, Some(e.message.clone()));
                Err(e)
            }
        }
    }

    /// GetInstanceStatus.
    pub fn status(&self, instance_id: &str) -> Result<InstanceStatus, ErrorResponse> {
        self.metadata(instance_id).map(|m| m.status).ok_or_else(|| ErrorResponse::instance_not_found(instance_id))
    }

    // Reads take the lock without the lease check: they report, they do not act, and an observer outside the
    // agent's runtime (the simulator's) must not change what the agent does by looking.

    /// Metadata of one instance.
    pub fn metadata(&self, instance_id: &str) -> Option<InstanceMetadata> {
        self.inner.lock_unfenced().get(instance_id).map(|i| i.metadata.clone())
    }

    /// An instance's output after line `after` ([`factum_proto::logs::LogPage`]).
    pub fn logs(&self, instance_id: &str, after: u64) -> Result<factum_proto::logs::LogPage, ErrorResponse> {
        let instances = self.inner.lock_unfenced();
        let local = instances.get(instance_id).ok_or_else(|| ErrorResponse::instance_not_found(instance_id))?;
        Ok(local.logs.page(after, factum_proto::logs::MAX_LOG_PAGE))
    }

    /// Facts of one instance.
    pub fn facts(&self, instance_id: &str) -> Option<InstanceFacts> {
        self.inner.lock_unfenced().get(instance_id).map(LocalInstance::facts)
    }

    /// Facts of every local instance, by id.
    pub fn snapshot(&self) -> Vec<InstanceFacts> {
        self.inner.lock_unfenced().values().map(LocalInstance::facts).collect()
    }

    /// Marks the node drained (new starts are refused) or not; every snapshot from now on says so. What runs
    /// here goes on running: moving it is the control plane's work.
    pub fn set_drained(&self, drained: bool) {
        self.inner.drained.store(drained, std::sync::atomic::Ordering::SeqCst);
        self.inner.env.trace(|| format!("drained {drained}"));
    }

    /// The node's labels.
    pub fn labels(&self) -> &factum_proto::Labels {
        &self.inner.config.labels
    }

    /// The registration / heartbeat message for the control plane: a full snapshot (the link may send it as a
    /// delta, see [`factum_proto::delta`]).
    pub fn node_report(&self) -> NodeReport {
        let (instances, sequence) = {
            // Under the lock that inserts instances, which also stamps their `created_at`; numbered under it
            // too, so numbers follow the order snapshots were taken in.
            let instances = self.inner.lock();
            let sequence = self.inner.snapshots.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            (instances.values().map(LocalInstance::facts).collect(), sequence)
        };
        NodeReport {
            protocol_version: PROTOCOL_VERSION,
            node_id: self.inner.config.node_id.clone(),
            agent_addr: self.inner.config.advertise_addr.clone(),
            max_instances: self.inner.config.max_instances,
            labels: self.inner.config.labels.clone(),
            drained: self.inner.drained.load(std::sync::atomic::Ordering::SeqCst),
            instances,
            boot: self.inner.boot,
            sequence,
            base: None,
            removed: Vec::new(),
        }
    }

    /// Adds or replaces one assignment, with the control plane's `seal` of it for this node; the instance's next
    /// capability call sees it. A capability change is a fact like a status change: it takes the next sequence
    /// number, so the control plane can order it.
    pub fn assign_capability(
        &self,
        assignment: CapabilityAssignment,
        seal: GrantSeal,
    ) -> Result<InstanceFacts, ErrorResponse> {
        let grant = Grant::new(assignment, seal)?;
        let (instance_id, capability_id) =
            (grant.assignment.instance_id.clone(), grant.assignment.capability_id.clone());
        let mut instances = self.inner.lock();
        if !instances.contains_key(&instance_id) {
            return Err(ErrorResponse::instance_not_found(&instance_id));
        }
        tracing::info!(%instance_id, capability = %capability_id, permissions = ?grant.assignment.permissions,
            "capability granted");
        self.inner.env.trace(|| format!("{} {instance_id} {}", trace_events::GRANT, grant.describe()));
        if self.inner.config.has_bug(AgentBug::SharedGrants) {
            for other in instances.values_mut() {
                let copy = Grant {
                    assignment: grant.assignment.clone(),
                    permissions: grant.permissions.clone(),
                    seal: grant.seal,
                };
                other.capabilities.entry(capability_id.clone()).or_insert(copy);
            }
        }
        let local = instances.get_mut(&instance_id).ok_or_else(|| ErrorResponse::instance_not_found(&instance_id))?;
        local.capabilities.insert(capability_id, grant);
        local.seq += 1;
        Ok(local.facts())
    }

    /// Takes the control plane's fresh seals of grants (see [`factum_proto::NodeAck`]): each replaces the seal
    /// of the grant it covers, if this agent holds that grant in exactly that form. A grant assigned anew since
    /// keeps the seal it came with, and one revoked since gets none.
    pub fn renew_seals(&self, renewed: Vec<(CapabilityAssignment, GrantSeal)>) {
        if renewed.is_empty() {
            return;
        }
        let mut instances = self.inner.lock();
        for (assignment, seal) in renewed {
            let held = instances
                .get_mut(&assignment.instance_id)
                .and_then(|i| i.capabilities.get_mut(&assignment.capability_id));
            if let Some(grant) = held.filter(|g| g.assignment == assignment) {
                grant.seal = seal;
            }
        }
    }

    /// Removes one assignment; the instance's next call on it is PERMISSION_DENIED.
    pub fn revoke_capability(&self, instance_id: &str, capability_id: &str) -> Result<InstanceFacts, ErrorResponse> {
        let mut instances = self.inner.lock();
        let local = instances.get_mut(instance_id).ok_or_else(|| ErrorResponse::instance_not_found(instance_id))?;
        local.capabilities.remove(capability_id).ok_or_else(|| {
            ErrorResponse::invalid(format!("instance {instance_id} holds no capability {capability_id:?}"))
                .with_detail("capability_id", capability_id)
        })?;
        tracing::info!(instance_id, capability = capability_id, "capability revoked");
        self.inner.env.trace(|| format!("{} {instance_id} {capability_id}", trace_events::REVOKE));
        if let Some(messaging) = &self.inner.providers.messaging {
            if messaging.release(instance_id, Some(capability_id)) > 0 {
                local.mailbox.poke(); // a run serving messages may have nothing left to wait for
            }
        }
        local.seq += 1;
        Ok(local.facts())
    }

    /// Operator view of the local KV store `capability_id`.
    pub async fn inspect_kv(&self, capability_id: &str, prefix: &str) -> Result<Vec<KvEntry>, ErrorResponse> {
        let entries = self.inner.providers.kv.inspect(capability_id, prefix).await?;
        let node_id = &self.inner.config.node_id;
        Ok(entries.into_iter().map(|(key, value)| KvEntry { node_id: node_id.clone(), key, value }).collect())
    }

    /// Shuts every provider down gracefully (P20): new capability calls get PROVIDER_UNAVAILABLE, calls in
    /// flight finish first.
    pub async fn shutdown_providers(&self) {
        for provider in self.inner.providers.all() {
            let name = provider.metadata().name;
            if let Err(e) = provider.shutdown().await {
                tracing::warn!(provider = %name, error = %e, "provider shutdown failed");
            }
        }
    }

    /// The bytes of a module some local instance runs, or the cache still holds, by hash. The cache matters
    /// after a fence: the instances are forgotten, but a restarted control plane may have no other copy of
    /// their module, and without one it could never run them again.
    pub fn module_bytes(&self, module_hash: &str) -> Result<Vec<u8>, ErrorResponse> {
        self.held_module(module_hash)
            .map(|m| m.bytes.to_vec())
            .ok_or_else(|| ErrorResponse::module_not_held(module_hash, &format!("node {}", self.inner.config.node_id)))
    }

    /// The compiled module of hash `module_hash`, from the cache or from a local instance that runs it.
    fn held_module(&self, module_hash: &str) -> Option<factum_wasm::CachedModule> {
        self.inner.cache.get(module_hash).or_else(|| {
            let instances = self.inner.lock();
            instances.values().find(|i| i.metadata.module_hash == module_hash).map(|i| i.module.clone())
        })
    }

    /// Fencing after the node lost its registry lease: the control plane may already be rescheduling every
    /// instance whose restart policy is `always` or `on_failure` onto another node, so those runs end here and
    /// are forgotten (not reported as stopped: the newer placement's facts must not be contradicted). Instances
    /// with policy `never` are never rescheduled, so they keep running. Returns how many were dropped.
    pub fn fence(&self) -> usize {
        let mut instances = self.inner.lock_unfenced();
        self.inner.fence_locked(&mut instances)
    }

    /// Metadata of the capability providers this node hosts.
    pub fn providers(&self) -> Vec<factum_proto::ProviderMetadata> {
        self.inner.providers.all().iter().map(|p| p.metadata()).collect()
    }

    /// Called once the node holds `lease`, which it must renew by `deadline` (env clock): starts placed under
    /// it are accepted until then.
    pub fn registered(&self, lease: i64, deadline: Duration) {
        let _guard = self.inner.lock_unfenced(); // ordered with starts, which check all three under the lock
        self.inner.lease.store(lease, std::sync::atomic::Ordering::SeqCst);
        self.inner.fenced.store(false, std::sync::atomic::Ordering::SeqCst);
        *self.inner.lease_deadline.lock().unwrap_or_else(|p| p.into_inner()) = Some(deadline);
    }

    /// The lease was renewed: it now runs until `deadline`. False when the node fenced itself meanwhile (a
    /// deadline passed before the renewal's answer came): it must register anew.
    pub fn renewed(&self, deadline: Duration) -> bool {
        let _guard = self.inner.lock();
        if self.inner.fenced.load(std::sync::atomic::Ordering::SeqCst) {
            return false;
        }
        *self.inner.lease_deadline.lock().unwrap_or_else(|p| p.into_inner()) = Some(deadline);
        true
    }

    /// This node's registry entry (the lease is filled in when it registers).
    pub fn registration(&self) -> factum_registry::NodeRegistration {
        factum_registry::NodeRegistration {
            node_id: self.inner.config.node_id.clone(),
            agent_addr: self.inner.config.advertise_addr.clone(),
            max_instances: self.inner.config.max_instances,
            protocol_version: PROTOCOL_VERSION,
            lease: 0,
        }
    }

    /// Stops every instance (used on shutdown).
    pub fn stop_all(&self) {
        let ids: Vec<String> = self.inner.lock().keys().cloned().collect();
        for id in ids {
            let _ = self.stop_instance(&id);
        }
    }
}

impl Inner {
    /// A message for a subscribed instance: queued while the instance is supervised (running, or crashed and
    /// waiting to restart); otherwise dropped with a warning.
    fn deliver(&self, delivery: Delivery) {
        let mut instances = self.lock();
        match instances.get_mut(&delivery.instance_id) {
            Some(local) if local.abort.is_some() => {
                local.mailbox.push(delivery, !self.config.has_bug(AgentBug::LostWakeups))
            }
            _ => tracing::warn!(target: "factum::msg", instance_id = %delivery.instance_id, topic = %delivery.topic,
                "message dropped: the instance no longer runs here"),
        }
    }

    /// The instance ended for good: its subscriptions end and whatever its mailbox holds is dropped (logged).
    fn end_messaging(&self, local: &mut LocalInstance, why: &str) {
        let instance_id = &local.metadata.instance_id;
        if let Some(messaging) = &self.providers.messaging {
            messaging.release(instance_id, None);
        }
        local.mailbox.close(instance_id, why);
    }

    /// Keeps [`Inner::active`] in step with one instance's status going from `was` to `now` (`None`: absent).
    /// Called under the instance lock.
    fn count_active(&self, was: Option<InstanceStatus>, now: Option<InstanceStatus>) {
        use std::sync::atomic::Ordering::SeqCst;
        let active = |s: Option<InstanceStatus>| s.is_some_and(|s| !s.is_terminal());
        match (active(was), active(now)) {
            (false, true) => {
                self.active.fetch_add(1, SeqCst);
            }
            (true, false) => {
                self.active.fetch_sub(1, SeqCst);
            }
            _ => {}
        }
    }

    /// Removes an instance and everything it held, traced so the simulator's grant ledger forgets it too.
    fn forget(&self, instances: &mut BTreeMap<String, LocalInstance>, instance_id: &str) -> Option<LocalInstance> {
        let mut local = instances.remove(instance_id)?;
        self.count_active(Some(local.metadata.status), None);
        if let Some(abort) = local.abort.take() {
            abort.abort(); // its supervisor must not go on with whatever takes this id next
        }
        self.env.trace(|| format!("{} {instance_id}", trace_events::FORGET));
        Some(local)
    }

    /// The instance lock, after fencing the node if its lease deadline has passed. Every start, restart,
    /// capability call and status change takes it, so none of them can act on an instance the lost lease
    /// covered, however late the registry link's own timer fires (a paused process wakes with every timer
    /// overdue, in no particular order).
    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, LocalInstance>> {
        let mut instances = self.lock_unfenced();
        if self.lease_lapsed() {
            self.fence_locked(&mut instances);
        }
        instances
    }

    fn lock_unfenced(&self) -> MutexGuard<'_, BTreeMap<String, LocalInstance>> {
        self.instances.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lease_lapsed(&self) -> bool {
        if self.config.has_bug(AgentBug::FenceOnTimerOnly) {
            return false;
        }
        let deadline = *self.lease_deadline.lock().unwrap_or_else(|p| p.into_inner());
        deadline.is_some_and(|d| self.env.clock.now() >= d)
    }

    /// Fences the node under the instance lock (see [`Agent::fence`]); returns how many instances it dropped.
    fn fence_locked(&self, instances: &mut BTreeMap<String, LocalInstance>) -> usize {
        let was_fenced = self.fenced.swap(true, std::sync::atomic::Ordering::SeqCst);
        *self.lease_deadline.lock().unwrap_or_else(|p| p.into_inner()) = None;
        let fenced: Vec<String> = instances
            .iter()
            .filter(|(_, i)| i.policy.policy_type != factum_proto::PolicyType::Never)
            .filter(|_| !self.config.has_bug(AgentBug::NoFencing))
            .map(|(id, _)| id.clone())
            .collect();
        for id in &fenced {
            if let Some(mut local) = self.forget(instances, id) {
                self.end_messaging(&mut local, "fenced: the node lost its registry lease");
            }
        }
        let dropped = fenced.len();
        if !was_fenced || dropped > 0 {
            self.metrics.fenced(dropped);
            tracing::warn!(node = %self.config.node_id, dropped, "registry lease lost: fenced reschedulable instances");
            self.env.trace(|| format!("fence {} dropped={dropped}", self.config.node_id));
        }
        dropped
    }

    fn lease(&self) -> Option<i64> {
        Some(self.lease.load(std::sync::atomic::Ordering::SeqCst)).filter(|l| *l != 0)
    }

    /// Where the snapshot numbering stands: a snapshot numbered up to this one was taken before now.
    fn snapshot_mark(&self) -> SnapshotMark {
        SnapshotMark { boot: self.boot, sequence: self.snapshots.load(std::sync::atomic::Ordering::SeqCst) }
    }

    /// Records a status fact and queues its report (P9).
    fn set_status(
        &self,
        instances: &mut BTreeMap<String, LocalInstance>,
        instance_id: &str,
        status: InstanceStatus,
        error: Option<String>,
    ) {
        let Some(local) = instances.get_mut(instance_id) else { return };
        local.seq += 1;
        self.count_active(Some(local.metadata.status), Some(status));
        local.metadata.status = status;
        if status != InstanceStatus::Crashed {
            local.metadata.backoff_ms = None; // only a crash waits out a backoff (a stop during one ends it)
        }
        if error.is_some() {
            local.metadata.last_error = error;
        }
        let report = StatusReport {
            instance_id: instance_id.to_string(),
            node_id: self.config.node_id.clone(),
            status,
            timestamp: self.env.wall_ms(),
            seq: local.seq,
            restarts: local.metadata.restarts,
            last_error: local.metadata.last_error.clone(),
            epoch: local.epoch,
            restart_streak: local.metadata.restart_streak,
            backoff_ms: local.metadata.backoff_ms,
            seal: local.seal,
        };
        tracing::debug!(instance_id, %status, seq = local.seq, "status");
        self.metrics.transition(status);
        self.env.trace(|| {
            let (seq, restarts, policy) = (local.seq, local.metadata.restarts, local.policy.policy_type);
            format!("status {instance_id} {status} seq={seq} restarts={restarts} policy={policy}")
        });
        if self.env.buggify("agent.drop_status_report") {
            return; // the next snapshot must repair the control plane's view
        }
        // Replaces an unsent older fact of this instance: the queue holds one per instance.
        self.reports.send(report);
    }

    async fn instantiate(self: &Arc<Self>, instance_id: &str) -> Result<Box<dyn Instance>, ErrorResponse> {
        let module = {
            let instances = self.lock();
            let local = instances.get(instance_id).ok_or_else(|| ErrorResponse::instance_not_found(instance_id))?;
            local.module.compiled.clone()
        };
        if self.env.buggify("agent.slow_instantiate") {
            self.env.clock.sleep(Duration::from_millis(1500)).await;
        }
        let host = Arc::new(host::InstanceHost::new(Arc::downgrade(self), instance_id.to_string()));
        self.cache.engine().instantiate(&module, host, self.config.limits).await.map_err(ErrorResponse::from)
    }

    /// Marks the instance running and supervises its run on the env's spawner.
    fn launch(self: &Arc<Self>, instance_id: &str, generation: u64, instance: Box<dyn Instance>) {
        let (abort, registration) = AbortHandle::new_pair();
        {
            let mut instances = self.lock();
            let Some(local) = instances.get_mut(instance_id) else { return };
            if local.generation != generation {
                return; // stopped while instantiating
            }
            local.abort = Some(abort);
            self.set_status(&mut instances, instance_id, InstanceStatus::Running, None);
        }
        let inner = self.clone();
        let id = instance_id.to_string();
        let supervised = futures::future::Abortable::new(
            async move { inner.supervise(id, generation, instance).await },
            registration,
        );
        self.env.spawn(async move {
            let _ = supervised.await;
        });
    }

    /// Runs one instance, and after each end applies its restart policy (P8): crash → counter, backoff on the
    /// env clock, fresh instantiation.
    async fn supervise(self: Arc<Self>, instance_id: String, generation: u64, mut instance: Box<dyn Instance>) {
        loop {
            let began = self.env.clock.now();
            let exit = instance.run().await;
            let stable = self.env.clock.now().saturating_sub(began) >= factum_proto::STABLE_RUN;
            let delay = {
                let mut instances = self.lock();
                let Some(local) = instances.get_mut(&instance_id) else { return };
                if local.generation != generation {
                    return;
                }
                let crashed = exit.is_crash();
                if crashed {
                    local.mailbox.run_crashed();
                }
                let restart = if self.config.has_bug(AgentBug::IgnoreMaxRetries) {
                    local.policy.should_restart(crashed, 0)
                } else {
                    local.policy.should_restart(crashed, local.metadata.restarts)
                };
                let status = if crashed { InstanceStatus::Crashed } else { InstanceStatus::Stopped };
                let error = crashed.then(|| exit.describe());
                log_exit(&instance_id, &exit, restart);
                if stable {
                    local.metadata.restart_streak = 0;
                }
                if !restart {
                    local.abort = None;
                    self.end_messaging(local, if crashed { "crashed, not restarted" } else { "exited" });
                    self.set_status(&mut instances, &instance_id, status, error);
                    return;
                }
                // The count says how many restarts began: while this one waits out its backoff, the fact is the
                // crash, and an observer cannot mistake the wait for the end of the instance's retries.
                local.metadata.restart_streak = local.metadata.restart_streak.saturating_add(1);
                let delay = local.policy.backoff(local.metadata.restart_streak, self.env.rng.next_u64());
                local.metadata.backoff_ms = Some(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX));
                self.set_status(&mut instances, &instance_id, status, error);
                delay
            };
            self.env.clock.sleep(delay).await;
            {
                let mut instances = self.lock();
                match instances.get_mut(&instance_id) {
                    Some(local) if local.generation == generation => {
                        local.metadata.restarts = local.metadata.restarts.saturating_add(1);
                        self.metrics.restarted();
                        if self.config.has_bug(AgentBug::RestartRestamps) {
                            local.metadata.created_at = self.env.wall_ms();
                        }
                    }
                    _ => return,
                }
                self.set_status(&mut instances, &instance_id, InstanceStatus::Starting, None);
            }
            instance = match self.instantiate(&instance_id).await {
                Ok(instance) => instance,
                Err(e) => {
                    let mut instances = self.lock();
                    if let Some(local) = instances.get_mut(&instance_id).filter(|l| l.generation == generation) {
                        local.abort = None; // this supervisor ends here; nothing is left to cancel
                        self.end_messaging(local, "could not be restarted");
                        self.set_status(&mut instances, &instance_id, InstanceStatus::Crashed, Some(e.message));
                    }
                    return;
                }
            };
            let mut instances = self.lock();
            if instances.get(&instance_id).is_none_or(|l| l.generation != generation) {
                return;
            }
            self.set_status(&mut instances, &instance_id, InstanceStatus::Running, None);
        }
    }
}

fn log_exit(instance_id: &str, exit: &ExitReason, restart: bool) {
    if exit.is_crash() {
        tracing::warn!(instance_id, reason = %exit.describe(), restart, "instance crashed");
    } else {
        tracing::info!(instance_id, restart, "instance exited cleanly");
    }
}
