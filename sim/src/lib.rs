//! Deterministic simulation of a factum cluster on turmoil or madsim ([`world`]).
//!
//! The real control plane and real node agents (on the wasmi engine, fuel-metered) run as simulated hosts and
//! talk tarpc over the simulator's TCP. Time is virtual, randomness comes from the seed, and every status
//! transition and applied fact is recorded in a [`TraceLog`] whose hash identifies the run: the same seed on
//! the same commit gives the same hash.

pub mod buggify;
pub mod bus;
pub mod convergence;
pub mod fencing;
pub mod invariants;
pub mod ledger;
pub mod monitor;
pub mod rogue;
pub mod scenario;
pub mod sometimes;
mod trace;
pub mod web;
pub mod world;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use factum_control_plane::{ControlPlane, ControlPlaneConfig};
use factum_env::{rpc, Env, MachineClock, Pause};
use factum_node_agent::{Agent, AgentConfig};
use factum_proto::{
    CapabilityGrant, ControlPlaneClient, InstanceMetadata, InstanceStatus, NodeInfo, Principal, RestartPolicy,
    StartRequest,
};
use factum_providers::{HostEntry, HttpLimits, HttpProvider, MemoryKv, MessagingProvider, ProviderHosts};
use factum_registry::{MemoryRegistry, RemoteRegistry};
use factum_wasm::{fixtures, Limits, WasmiEngine, WasmtimeEngine};

pub use trace::TraceLog;
pub use world::{Backend, World};

/// Port every simulated component listens on.
pub const PORT: u16 = 7700;
/// Host name of the control plane.
pub const CONTROL_PLANE: &str = "control-plane";
/// Host name of the simulated etcd (a [`MemoryRegistry`] served over the simulated network).
pub const REGISTRY: &str = "etcd";
/// Host name of the simulated message bus ([`bus`]), when the cluster runs one.
pub const BUS: &str = "nats";
/// Host name of the first KV provider host, when the cluster has one (see [`kv_host`]).
pub const KV_HOST: &str = "kv-host";
/// The provider id the first KV provider host answers as (see [`kv_provider`]).
pub const KV_PROVIDER: &str = "kv-1";
/// How often agents read the provider hosts in the registry.
pub const DISCOVERY: Duration = Duration::from_millis(500);

/// Host name of KV provider host `n` (from 1): [`KV_HOST`], then `kv-host-2`, ….
pub fn kv_host(n: usize) -> String {
    if n == 1 {
        KV_HOST.to_string()
    } else {
        format!("{KV_HOST}-{n}")
    }
}

/// The provider id KV provider host `n` (from 1) answers as: `kv-1`, `kv-2`, ….
pub fn kv_provider(n: usize) -> String {
    format!("kv-{n}")
}
/// Host name of the rogue caller of the KV provider host ([`rogue`]).
pub const ROGUE: &str = "rogue";
/// Key prefix of the simulated registry.
pub const REGISTRY_PREFIX: &str = "/factum";

/// Wall-clock origin of every simulated run, so timestamps do not depend on when the test runs.
pub fn sim_epoch() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_767_225_600) // 2026-01-01T00:00:00Z
}

/// Boxed error of simulated hosts.
pub type SimError = Box<dyn std::error::Error + Send + Sync>;

/// The step of simulated time. 10 ms is a tenth of the largest message latency and a twenty-fifth of the
/// shortest protocol period (the control plane's 250 ms check), so every protocol timing still spans many steps,
/// while a run takes a quarter of the wall time it took at 1 ms (profiled: turmoil's per-host, per-step
/// runtime ticking dominated).
pub const DEFAULT_TICK: Duration = Duration::from_millis(10);

/// Settings of one simulated cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// Seed of every random choice: the simulator's network and scheduling, and each component's env.
    pub seed: u64,
    /// Which simulator runs the cluster.
    pub backend: Backend,
    /// Number of node agents, named `agent-1`, `agent-2`, ...
    pub agents: usize,
    /// Control plane settings.
    pub control_plane: ControlPlaneConfig,
    /// Heartbeat interval of agents.
    pub heartbeat_interval: Duration,
    /// Longest simulated time a run may take.
    pub duration: Duration,
    /// Fault points in product code fire (BUGGIFY); `None` keeps them all off.
    pub faults: Option<Arc<buggify::Buggify>>,
    /// Network latency range of every message.
    pub latency: (Duration, Duration),
    /// How far simulated time moves per step: every host runs once per step, and timers and message
    /// deliveries land on step boundaries. Most of a run's cost is per step, not per event (see
    /// [`DEFAULT_TICK`]).
    pub tick: Duration,
    /// Run a registry host ([`REGISTRY`]): agents hold leases, the control plane follows membership and
    /// reschedules the instances of nodes whose lease expires.
    pub registry: bool,
    /// TTL of agents' registry leases.
    pub lease_ttl: Duration,
    /// Largest wall-clock skew between a host and true simulated time; each host draws its own from the seed.
    pub clock_skew: Duration,
    /// Largest relative error of a host's clock rate: each host's clock runs at a seeded rate within
    /// 1 ± this of true time (0: exact). Lease fencing assumes rates within 20% of each other.
    pub clock_drift: f64,
    /// A bug injected into every agent, to prove the simulator catches it.
    pub agent_bug: Option<factum_node_agent::AgentBug>,
    /// A bug injected into every agent's wasmi engine, to prove the simulator catches it.
    pub engine_bug: Option<factum_wasm::EngineBug>,
    /// Even-numbered agents run wasmtime (fuel-metered, like wasmi) instead of wasmi.
    pub wasmtime: bool,
    /// Run a message bus host ([`BUS`]): every agent gets a messaging provider on it, so instances on
    /// different nodes exchange messages across the simulated network.
    pub messaging: bool,
    /// Run web hosts ([`web::WEB`], [`web::INTRANET`]): every agent gets an HTTP provider whose requests cross
    /// the simulated network.
    pub http: bool,
    /// A bug injected into every agent's HTTP provider, to prove the simulator catches it.
    pub http_bug: Option<factum_providers::HttpBug>,
    /// Run this many KV provider hosts ([`kv_host`], one store behind them all) that every agent sends its KV
    /// calls to with the sealed grant, and, when there is one at least, a rogue caller ([`ROGUE`]) that tries
    /// bent grants on the first (P17). With a registry the hosts register there and agents find them.
    pub provider_hosts: usize,
    /// A bug injected into the KV provider host, to prove the simulator catches it.
    pub host_bug: Option<factum_providers::remote::HostBug>,
    /// Check the always-on monitor at every sample (default). Off only to show that a scenario's own check
    /// catches a bug by itself, without the monitor catching it first.
    pub monitor: bool,
}

impl ClusterConfig {
    /// A cluster of `agents` agents driven by `seed`, with short timeouts so failures show within seconds.
    pub fn new(seed: u64, agents: usize) -> Self {
        Self {
            seed,
            backend: Backend::default(),
            agents,
            control_plane: ControlPlaneConfig {
                node_timeout: Duration::from_secs(3),
                check_interval: Duration::from_millis(250),
                rpc_timeout: Duration::from_secs(2),
                reschedule: true,
                watch_wait: Duration::from_secs(2),
                // Longer than any run: scenario checks read ended instances to the end.
                retention: factum_control_plane::DEFAULT_RETENTION,
                // Every control-plane life of a run holds it, as a key file beside the binary would be.
                placement_key: factum_control_plane::PlacementKey::plaintext(),
                // Secret from everything but the control plane and the provider host: the rogue must not seal.
                grant_key: factum_proto::GrantKey::derive(&{
                    let mut secret = [0u8; 32];
                    for (i, chunk) in secret.chunks_mut(8).enumerate() {
                        chunk.copy_from_slice(&(seed ^ 0x9a17 ^ ((i as u64) << 40)).to_le_bytes());
                    }
                    secret
                }),
                grant_ttl: factum_control_plane::DEFAULT_GRANT_TTL,
                injected_bug: None,
            },
            heartbeat_interval: Duration::from_millis(500),
            duration: Duration::from_secs(120),
            faults: None,
            latency: (Duration::ZERO, Duration::from_millis(100)),
            tick: DEFAULT_TICK,
            registry: false,
            lease_ttl: Duration::from_secs(2),
            clock_skew: Duration::ZERO,
            clock_drift: 0.0,
            agent_bug: None,
            engine_bug: None,
            wasmtime: false,
            messaging: false,
            http: false,
            http_bug: None,
            provider_hosts: 0,
            host_bug: None,
            monitor: true,
        }
    }

    /// The wall-clock origin of host number `host` (0 is the control plane, `i` agent `i`): the simulation's
    /// epoch, off by a seeded amount within ±`clock_skew`.
    pub fn wall_origin(&self, host: u64) -> SystemTime {
        use rand_core::{RngCore, SeedableRng};
        let span = u64::try_from(self.clock_skew.as_millis()).unwrap_or(u64::MAX / 4);
        if span == 0 {
            return sim_epoch();
        }
        let draw =
            rand_chacha::ChaCha8Rng::seed_from_u64(self.seed ^ 0x5c3e ^ (host << 16)).next_u64() % (2 * span + 1);
        let origin = sim_epoch() + self.clock_skew;
        origin - Duration::from_millis(draw)
    }

    /// The rate of host number `host`'s clock (numbered as in [`wall_origin`](Self::wall_origin)): within
    /// 1 ± `clock_drift`, drawn from the seed.
    pub fn clock_rate(&self, host: u64) -> f64 {
        use rand_core::{RngCore, SeedableRng};
        if self.clock_drift <= 0.0 {
            return 1.0;
        }
        let draw = rand_chacha::ChaCha8Rng::seed_from_u64(self.seed ^ 0xd41f7 ^ (host << 16)).next_u64();
        let unit = (draw % 2_001) as f64 / 1_000.0 - 1.0; // in [-1, 1]
        1.0 + unit * self.clock_drift
    }
}

/// Name of agent `i` (1-based).
pub fn agent_name(i: usize) -> String {
    format!("agent-{i}")
}

/// Handles on the components currently running in a simulation, for invariant checkers: they read the real
/// state of the control plane and of every agent directly, not over the (faulty) network. A host's entry is
/// replaced when it restarts and removed when the driver crashes it.
#[derive(Default)]
pub struct Observed {
    control_plane: Mutex<Option<ControlPlane>>,
    /// Bumped each time a control plane starts, so checks can tell a restart even between two samples.
    control_plane_incarnation: AtomicU64,
    agents: Mutex<BTreeMap<String, Agent>>,
    registry: Mutex<Option<Arc<MemoryRegistry>>>,
    /// Each host's pause switch, kept across its restarts.
    pauses: Mutex<BTreeMap<String, Arc<Pause>>>,
    /// Each host's machine clock, kept across its restarts.
    clocks: Mutex<BTreeMap<String, Arc<MachineClock>>>,
}

impl Observed {
    fn set_control_plane(&self, cp: Option<ControlPlane>) {
        if cp.is_some() {
            self.control_plane_incarnation.fetch_add(1, Ordering::SeqCst);
        }
        *self.control_plane.lock().unwrap_or_else(|p| p.into_inner()) = cp;
    }

    fn set_agent(&self, name: &str, agent: Option<Agent>) {
        let mut agents = self.agents.lock().unwrap_or_else(|p| p.into_inner());
        match agent {
            Some(agent) => agents.insert(name.to_string(), agent),
            None => agents.remove(name),
        };
    }

    /// Forgets whatever ran on host `name` (it crashed).
    pub fn crashed(&self, name: &str) {
        if name == CONTROL_PLANE {
            self.set_control_plane(None);
        } else if name == REGISTRY {
            *self.registry.lock().unwrap_or_else(|p| p.into_inner()) = None;
        } else {
            self.set_agent(name, None);
        }
    }

    /// The pause switch of host `name`, made on first use.
    pub fn pause(&self, name: &str, seed: u64) -> Arc<Pause> {
        let mut pauses = self.pauses.lock().unwrap_or_else(|p| p.into_inner());
        let salt = pauses.len() as u64;
        pauses.entry(name.to_string()).or_insert_with(|| Pause::new(seed ^ 0x9a05e ^ (salt << 24))).clone()
    }

    /// The machine clock of host `name`, if the cluster has that host.
    pub fn clock(&self, name: &str) -> Option<Arc<MachineClock>> {
        self.clocks.lock().unwrap_or_else(|p| p.into_inner()).get(name).cloned()
    }

    fn machine(&self, name: &str, config: &ClusterConfig, host: u64) -> Arc<MachineClock> {
        let machine = MachineClock::new(config.wall_origin(host), config.clock_rate(host));
        self.clocks.lock().unwrap_or_else(|p| p.into_inner()).insert(name.to_string(), machine.clone());
        machine
    }

    /// A consistent picture of the cluster now.
    pub fn view(&self) -> invariants::View {
        self.view_of(Render::Maps)
    }

    /// [`Observed::view`], rendering the control plane's maps for P7 only if `render` says so: rendering them
    /// costs more than the rest of the view together.
    pub fn view_of(&self, render: Render) -> invariants::View {
        let cp = self.control_plane.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let agents = self.agents.lock().unwrap_or_else(|p| p.into_inner());
        invariants::View {
            control_plane_incarnation: self.control_plane_incarnation.load(Ordering::SeqCst),
            control_plane: cp.map(|cp| {
                let instances = cp.list_instances();
                invariants::ControlPlaneView {
                    capabilities: instances
                        .iter()
                        .map(|m| (m.instance_id.clone(), cp.capabilities(&m.instance_id)))
                        .collect(),
                    policies: instances
                        .iter()
                        .filter_map(|m| cp.query_instance(&m.instance_id).ok())
                        .map(|d| (d.metadata.instance_id, d.restart_policy))
                        .collect(),
                    held: match render {
                        Render::Maps => {
                            let (maps, modules) = cp.held_state();
                            (Some(maps), modules)
                        }
                        Render::ModulesOnly => (None, cp.held_modules()),
                    },
                    fact_positions: instances
                        .iter()
                        .filter_map(|m| cp.fact_position(&m.instance_id).map(|at| (m.instance_id.clone(), at)))
                        .collect(),
                    instances,
                    nodes: cp.list_nodes(),
                }
            }),
            agents: agents.iter().map(|(name, agent)| (name.clone(), agent.snapshot())).collect(),
            labels: agents.iter().map(|(name, agent)| (name.clone(), agent.labels().clone())).collect(),
            registry_entries: self.registry.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(|r| r.entries_now()),
            paused: self
                .pauses
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .filter(|(_, pause)| pause.is_paused())
                .map(|(name, _)| name.clone())
                .collect(),
            ago: BTreeMap::new(),
        }
    }
}

/// What [`Observed::view_of`] renders of the control plane's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Render {
    /// Its maps as text (for P7) and its module map.
    Maps,
    /// Its module map only.
    ModulesOnly,
}

/// Builds a simulated world (on `config.backend`) running a control plane and `config.agents` agents, all
/// recording into `trace`.
pub fn build_cluster(config: &ClusterConfig, trace: Arc<TraceLog>) -> Result<Box<dyn World>, String> {
    build_observed_cluster(config, trace, Arc::new(Observed::default()))
}

/// [`build_cluster`], registering every component that starts in `observed`.
pub fn build_observed_cluster(
    config: &ClusterConfig,
    trace: Arc<TraceLog>,
    observed: Arc<Observed>,
) -> Result<Box<dyn World>, String> {
    let mut world = config.backend.world(config)?;
    let faults = config.faults.clone();
    let cp_config = config.control_plane.clone();
    let cp_trace = trace.clone();
    let seed = config.seed;
    // Each incarnation of a host draws from its own stream, as a restarted process would.
    let incarnations = Arc::new(AtomicU64::new(0));
    let cp_observed = observed.clone();
    let cp_incarnations = incarnations.clone();
    let cp_faults = faults.clone();
    let with_registry = config.registry;
    let cp_machine = observed.machine(CONTROL_PLANE, config, 0);
    let cp_pause = observed.pause(CONTROL_PLANE, seed);
    if with_registry {
        let registry_observed = observed.clone();
        let registry_trace = trace.clone();
        let pause = observed.pause(REGISTRY, seed);
        let machine = observed.machine(REGISTRY, config, 0xe7cd);
        // etcd's data directory: what a crashed etcd had acknowledged is there when it restarts.
        let disk: Arc<Mutex<Option<Arc<MemoryRegistry>>>> = Arc::default();
        world.host(
            REGISTRY,
            Box::new(move || {
                let disk = disk.clone();
                let env = world::process_env(seed ^ 0xe7cd)
                    .with_machine_clock(&machine)
                    .with_trace(REGISTRY, registry_trace.clone())
                    .with_pause(pause.clone());
                let observed = registry_observed.clone();
                Box::pin(pause.gate(async move {
                    let listener = env.net.bind(&format!("0.0.0.0:{PORT}")).await?;
                    let registry = {
                        let mut disk = disk.lock().unwrap_or_else(|p| p.into_inner());
                        let registry = Arc::new(match disk.as_ref() {
                            Some(before) => before.restarted(env.clone()),
                            None => MemoryRegistry::new(env.clone(), REGISTRY_PREFIX),
                        });
                        *disk = Some(registry.clone());
                        registry
                    };
                    *observed.registry.lock().unwrap_or_else(|p| p.into_inner()) = Some(registry.clone());
                    factum_registry::serve(env, registry, listener).await;
                    Ok(())
                }))
            }),
        );
    }
    if config.messaging {
        let pause = observed.pause(BUS, seed);
        let machine = observed.machine(BUS, config, 0xb05);
        world.host(
            BUS,
            Box::new(move || {
                let env = world::process_env(seed ^ 0xb05).with_machine_clock(&machine).with_pause(pause.clone());
                Box::pin(pause.gate(async move {
                    let listener = env.net.bind(&format!("0.0.0.0:{PORT}")).await?;
                    let bus = bus::Bus::new(env.clone());
                    env.spawn(bus.clone().run_reaper());
                    bus::serve(bus, listener).await;
                    Ok(())
                }))
            }),
        );
    }
    let messaging = config.messaging;
    if config.http {
        for (n, name) in [web::WEB, web::INTRANET].into_iter().enumerate() {
            let pause = observed.pause(name, seed);
            let host_trace = trace.clone();
            world.host(
                name,
                Box::new(move || {
                    let env = world::process_env(seed ^ 0x3eb ^ ((n as u64) << 12))
                        .with_trace(name, host_trace.clone())
                        .with_pause(pause.clone());
                    Box::pin(pause.gate(async move {
                        let listener = env.net.bind(&format!("0.0.0.0:{}", web::HTTP_PORT)).await?;
                        web::serve(env, listener).await;
                        Ok(())
                    }))
                }),
            );
        }
    }
    let provider_hosts = config.provider_hosts;
    let lease_ttl = config.lease_ttl;
    // The store outlives a crash of any host and every host serves it, as a Redis behind them would.
    let store = Arc::new(MemoryKv::new());
    for n in 1..=provider_hosts {
        let name = kv_host(n);
        let salt = 0x4b05 ^ (((n - 1) as u64) << 16);
        let pause = observed.pause(&name, seed);
        let machine = observed.machine(&name, config, salt);
        let host_trace = trace.clone();
        let key = config.control_plane.grant_key.clone();
        let bug = config.host_bug;
        let store = store.clone();
        let host_name = name.clone();
        world.host(
            &name.clone(),
            Box::new(move || {
                let env = world::process_env(seed ^ salt)
                    .with_machine_clock(&machine)
                    .with_principal(Principal::Provider(kv_provider(n)))
                    .with_trace(host_name.clone(), host_trace.clone())
                    .with_pause(pause.clone());
                let (key, provider) = (key.clone(), store.clone() as Arc<dyn factum_providers::Provider>);
                let record = factum_registry::ProviderRecord {
                    provider_id: kv_provider(n),
                    node_id: host_name.clone(),
                    metadata: provider.metadata(),
                    addr: Some(format!("{host_name}:{PORT}")),
                };
                Box::pin(pause.gate(async move {
                    let listener = env.net.bind(&format!("0.0.0.0:{PORT}")).await?;
                    if with_registry {
                        env.spawn(factum_registry::hold_provider(
                            env.clone(),
                            remote_registry(&env),
                            record,
                            lease_ttl,
                        ));
                    }
                    match bug {
                        Some(bug) => factum_providers::remote::serve_with_bug(env, provider, key, bug, listener).await,
                        None => factum_providers::remote::serve(env, provider, key, listener).await,
                    }
                    Ok(())
                }))
            }),
        );
    }
    if let Some(host_clock) = observed.clock(KV_HOST).filter(|_| provider_hosts > 0) {
        let rogue_trace = trace.clone();
        let rogue_observed = observed.clone();
        let key = config.control_plane.grant_key.clone();
        let ttl = config.control_plane.grant_ttl;
        world.host(
            ROGUE,
            Box::new(move || {
                let env = world::process_env(seed ^ 0x7063).with_trace(ROGUE, rogue_trace.clone());
                let observed = rogue_observed.clone();
                let loot = rogue::Loot { key: key.clone(), ttl, host_clock: host_clock.clone() };
                Box::pin(async move {
                    let addr = format!("{KV_HOST}:{PORT}");
                    rogue::run(env, observed, loot, addr, Principal::Provider(KV_PROVIDER.into())).await;
                    Ok(())
                })
            }),
        );
    }
    let (http, http_bug) = (config.http, config.http_bug);
    world.host(
        CONTROL_PLANE,
        Box::new(move || {
            let incarnation = cp_incarnations.fetch_add(1, Ordering::SeqCst);
            let env = with_faults(
                world::process_env(seed ^ 0xc0 ^ (incarnation << 32))
                    .with_machine_clock(&cp_machine)
                    .with_trace(CONTROL_PLANE, cp_trace.clone())
                    .with_pause(cp_pause.clone()),
                &cp_faults,
            );
            let cp_config = cp_config.clone();
            let observed = cp_observed.clone();
            Box::pin(cp_pause.gate(async move {
                let listener = env.net.bind(&format!("0.0.0.0:{PORT}")).await?;
                let cp = ControlPlane::new(env.clone(), cp_config);
                observed.set_control_plane(Some(cp.clone()));
                env.spawn(cp.clone().run_failure_detector());
                if with_registry {
                    env.spawn(cp.clone().run_membership(remote_registry(&env)));
                }
                factum_control_plane::serve(cp, listener).await;
                Ok(())
            }))
        }),
    );
    for i in 1..=config.agents {
        let name = agent_name(i);
        let agent_trace = trace.clone();
        let heartbeat = config.heartbeat_interval;
        let agent_observed = observed.clone();
        let agent_incarnations = incarnations.clone();
        let agent_faults = faults.clone();
        let lease_ttl = config.lease_ttl;
        let machine = observed.machine(&name, config, i as u64);
        let agent_bug = config.agent_bug;
        let host_bug = config.host_bug;
        let engine_bug = config.engine_bug;
        let wasmtime = config.wasmtime && i % 2 == 0;
        let pause = observed.pause(&name, seed);
        world.host(
            &name.clone(),
            Box::new(move || {
                let incarnation = agent_incarnations.fetch_add(1, Ordering::SeqCst);
                let env = with_faults(
                    world::process_env(seed ^ ((i as u64) << 8) ^ (incarnation << 32))
                        .with_machine_clock(&machine)
                        .with_trace(name.clone(), agent_trace.clone())
                        .with_pause(pause.clone()),
                    &agent_faults,
                );
                let observed = agent_observed.clone();
                let name = name.clone();
                let mut agent_config = AgentConfig::new(name.clone(), format!("{name}:{PORT}"));
                agent_config.heartbeat_interval = heartbeat;
                agent_config.rpc_timeout = Duration::from_secs(2);
                agent_config.lease_ttl = lease_ttl;
                agent_config.labels = agent_labels(i);
                agent_config.injected_bug = agent_bug;
                // Fuel makes guest execution and its yield points a function of the module alone.
                agent_config.limits = Limits { fuel_yield_interval: 10_000, ..Limits::default() };
                Box::pin(pause.gate(async move {
                    let listener = env.net.bind(&format!("0.0.0.0:{PORT}")).await?;
                    let engine: Arc<dyn factum_wasm::WasmEngine> = match (wasmtime, engine_bug) {
                        (true, _) => Arc::new(WasmtimeEngine::new()?),
                        (false, Some(bug)) => Arc::new(WasmiEngine::with_injected_bug(bug)),
                        (false, None) => Arc::new(WasmiEngine::new()),
                    };
                    let providers = factum_node_agent::Providers {
                        kv: Arc::new(MemoryKv::new()),
                        http: http.then(|| {
                            let limits = HttpLimits { timeout: Duration::from_secs(2), ..HttpLimits::default() };
                            let provider = HttpProvider::with_transport(
                                limits,
                                Arc::new(web::SimHttp::new(env.clone())),
                                env.clock.clone(),
                            );
                            let provider = match http_bug {
                                Some(bug) => provider.with_injected_bug(bug),
                                None => provider,
                            };
                            Arc::new(provider) as Arc<dyn factum_providers::Provider>
                        }),
                        messaging: messaging.then(|| {
                            let bus = bus::RemoteBus::new(env.clone(), format!("{BUS}:{PORT}"));
                            Arc::new(MessagingProvider::new(Arc::new(bus)))
                        }),
                        remote: if provider_hosts > 0 {
                            let as_node = env.clone().with_principal(Principal::Node(name.clone()));
                            let kind = factum_proto::ProviderType::Kv;
                            let kv = ProviderHosts::new(kind, as_node, name.clone(), Duration::from_secs(2));
                            let kv = match host_bug {
                                Some(bug) => kv.with_injected_bug(bug),
                                None => kv,
                            };
                            // With a registry the agent finds the hosts there; without one it is told them.
                            if !with_registry {
                                kv.set((1..=provider_hosts).map(|n| {
                                    let addr = format!("{}:{PORT}", kv_host(n));
                                    HostEntry { id: kv_provider(n), node: kv_host(n), addr }
                                }));
                            }
                            [(kind, Arc::new(kv))].into()
                        } else {
                            Default::default()
                        },
                    };
                    let routes = providers.remote.clone();
                    let (agent, reports) = Agent::new(env.clone(), agent_config, engine, providers);
                    observed.set_agent(&name, Some(agent.clone()));
                    if with_registry {
                        if !routes.is_empty() {
                            let registry = remote_registry(&env);
                            env.spawn(factum_node_agent::run_provider_discovery(
                                env.clone(),
                                registry,
                                routes,
                                DISCOVERY,
                            ));
                        }
                        env.spawn(factum_node_agent::run_registry_link(agent.clone(), remote_registry(&env)));
                    }
                    env.spawn(factum_node_agent::serve(agent.clone(), listener));
                    factum_node_agent::run_control_plane_link(agent, format!("{CONTROL_PLANE}:{PORT}"), reports).await;
                    Ok(())
                }))
            }),
        );
    }
    Ok(world)
}

/// The labels of agent `i` (from 1): `zone=a` when odd, `zone=b` when even, so a scenario can constrain starts
/// to a zone that one crash does not empty.
pub fn agent_labels(i: usize) -> factum_proto::Labels {
    [("zone".to_string(), if i % 2 == 1 { "a" } else { "b" }.to_string())].into()
}

fn remote_registry(env: &Env) -> Arc<dyn factum_registry::Registry> {
    Arc::new(RemoteRegistry::new(env.clone(), format!("{REGISTRY}:{PORT}"), Duration::from_secs(2)))
}

fn with_faults(env: Env, faults: &Option<Arc<buggify::Buggify>>) -> Env {
    match faults {
        Some(f) => env.with_faults(f.clone()),
        None => env,
    }
}

/// A client of the simulated control plane, for scenario scripts running as simulated clients.
pub struct SimClient {
    env: Env,
    cp: ControlPlaneClient,
    /// Set when a call timed out or its transport failed: like a real client, the caller then dials anew
    /// rather than keep using a connection that may be stuck (a lost segment leaves a stream that never ends).
    broken: std::sync::atomic::AtomicBool,
}

impl SimClient {
    /// Connects to the control plane, retrying until it listens.
    pub async fn connect(seed: u64) -> Result<Self, SimError> {
        let env = world::process_env(seed ^ 0xc1)
            .with_credentials(rpc::Credentials::claim(Principal::Operator("driver".into())));
        let addr = format!("{CONTROL_PLANE}:{PORT}");
        // Bounded by simulated time, not attempts: turmoil lets a connect to a crashed host hang until the
        // timeout (1.1 s an attempt), madsim refuses it at once, and a control plane down for 24 s must still
        // be waited for on both.
        let give_up = env.clock.now() + Duration::from_secs(110);
        while env.clock.now() < give_up {
            // A connect into a partition never answers: bound it like every other call.
            let connect = env.timeout(Duration::from_secs(1), rpc::dial(&env, &addr, &Principal::ControlPlane));
            if let Some(Ok(stream)) = connect.await {
                let new = ControlPlaneClient::new(tarpc::client::Config::default(), rpc::transport(stream));
                let cp = rpc::start_client(&env, new);
                return Ok(Self { env, cp, broken: std::sync::atomic::AtomicBool::new(false) });
            }
            env.clock.sleep(Duration::from_millis(100)).await;
        }
        Err("control plane never listened".into())
    }

    /// Awaits one call with a 5 s deadline on simulated time: a call into a crashed or partitioned control plane
    /// must fail like it would for a real client, not hang the scenario.
    pub async fn call<T, E>(&self, fut: impl std::future::Future<Output = Result<T, E>>) -> Result<T, SimError>
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        let result = match self.env.timeout(Duration::from_secs(5), fut).await {
            Some(Ok(v)) => return Ok(v),
            Some(Err(e)) => Err(Box::new(e) as SimError),
            None => Err("control plane call timed out".into()),
        };
        self.broken.store(true, Ordering::SeqCst);
        result
    }

    /// Whether a call on this connection timed out or failed in transport; dial a new client then.
    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::SeqCst)
    }

    /// Sleeps on simulated time.
    pub async fn sleep(&self, d: Duration) {
        self.env.clock.sleep(d).await;
    }

    /// ListInstances.
    pub async fn instances(&self) -> Result<Vec<InstanceMetadata>, SimError> {
        Ok(self.call(self.cp.list_instances(rpc::rpc_context())).await??)
    }

    /// Nodes.
    pub async fn nodes(&self) -> Result<Vec<NodeInfo>, SimError> {
        Ok(self.call(self.cp.list_nodes(rpc::rpc_context())).await??)
    }

    /// StartInstance of a fixture with an explicit id.
    pub async fn start(&self, id: &str, wat: &str, policy: RestartPolicy) -> Result<String, SimError> {
        self.start_with(id, wat, policy, Vec::new(), Default::default()).await
    }

    /// StartInstance of a fixture with an explicit id, capabilities and placement constraints.
    pub async fn start_with(
        &self,
        id: &str,
        wat: &str,
        policy: RestartPolicy,
        capabilities: Vec<CapabilityGrant>,
        constraints: factum_proto::Labels,
    ) -> Result<String, SimError> {
        let request = StartRequest {
            instance_id: Some(id.to_string()),
            module_bytes: fixtures::module(wat),
            module_hash: None,
            capabilities,
            restart_policy: policy,
            config: Default::default(),
            constraints,
        };
        Ok(self.call(self.cp.start_instance(rpc::rpc_context(), request)).await??)
    }

    /// StopInstance.
    pub async fn stop(&self, id: &str) -> Result<(), SimError> {
        Ok(self.call(self.cp.stop_instance(rpc::rpc_context(), id.to_string())).await??)
    }

    /// Polls `check` every 100 ms of simulated time until it holds, for at most `deadline`.
    pub async fn eventually<F>(
        &self,
        what: &str,
        deadline: Duration,
        mut check: F,
    ) -> Result<Vec<InstanceMetadata>, SimError>
    where
        F: FnMut(&[InstanceMetadata]) -> bool,
    {
        let start = self.env.clock.now();
        loop {
            let instances = self.instances().await?;
            if check(&instances) {
                return Ok(instances);
            }
            if self.env.clock.now().saturating_sub(start) > deadline {
                return Err(format!("not within {deadline:?}: {what}; instances: {instances:?}").into());
            }
            self.sleep(Duration::from_millis(100)).await;
        }
    }
}

/// What a scenario run produced.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Hash of the trace: the run's identity.
    pub trace_hash: String,
    /// Number of trace events.
    pub events: usize,
    /// The control plane's instance list at the end.
    pub final_instances: Vec<InstanceMetadata>,
    /// The readable trace.
    pub timeline: Vec<String>,
    /// Fault points reached and fired (empty when faults were off).
    pub coverage: BTreeMap<String, buggify::PointCoverage>,
}

/// Scenario: 1 control plane + 2 agents; six long-running instances are placed across both agents; `agent-2`
/// crashes. Checks that the control plane marks agent-2's instances `unknown` (P12, P14) while agent-1's keep
/// running (P12), and that every invariant holds at the end.
pub fn agent_crash(seed: u64) -> Result<Outcome, String> {
    agent_crash_with(ClusterConfig::new(seed, 2))
}

/// [`agent_crash`] on the cluster `config` (its backend, seed and faults).
pub fn agent_crash_with(config: ClusterConfig) -> Result<Outcome, String> {
    config.backend.isolated(|| agent_crash_here(config))
}

fn agent_crash_here(config: ClusterConfig) -> Result<Outcome, String> {
    let seed = config.seed;
    let trace = Arc::new(TraceLog::default());
    let mut sim = build_cluster(&config, trace.clone())?;
    let phase = Arc::new(AtomicU8::new(0));
    let result: Arc<Mutex<Vec<InstanceMetadata>>> = Arc::default();
    let (client_phase, client_result) = (phase.clone(), result.clone());
    sim.client(
        "client",
        Box::pin(async move {
            let client = SimClient::connect(seed).await?;
            for _ in 0..100 {
                if client.nodes().await?.iter().filter(|n| n.available).count() == 2 {
                    break;
                }
                client.sleep(Duration::from_millis(100)).await;
            }
            for i in 0..6 {
                client.start(&format!("inst-{i}"), fixtures::SLEEPER, RestartPolicy::default()).await?;
            }
            let running = client
                .eventually("all six running", Duration::from_secs(10), |all| {
                    all.len() == 6 && all.iter().all(|m| m.status == InstanceStatus::Running)
                })
                .await?;
            invariants::placement_is_balanced(&running, 2).map_err(SimError::from)?;
            client_phase.store(1, Ordering::SeqCst); // the driver crashes agent-2 now
            let after = client
                .eventually("agent-2's instances unknown, agent-1's running", Duration::from_secs(15), |all| {
                    invariants::crashed_node_is_unknown(all, "agent-2").is_ok()
                        && invariants::node_keeps_running(all, "agent-1").is_ok()
                })
                .await?;
            *client_result.lock().map_err(|_| "poisoned")? = after;
            Ok(())
        }),
    );
    let mut crashed = false;
    loop {
        let done = sim.step().map_err(|e| format!("seed {seed}: {e}"))?;
        if !crashed && phase.load(Ordering::SeqCst) == 1 {
            sim.crash("agent-2");
            trace.record_driver(sim.elapsed(), "crash agent-2");
            crashed = true;
        }
        if done {
            break;
        }
    }
    let final_instances = result.lock().map_err(|_| "poisoned")?.clone();
    invariants::crashed_node_is_unknown(&final_instances, "agent-2").map_err(|e| format!("seed {seed}: {e}"))?;
    invariants::node_keeps_running(&final_instances, "agent-1").map_err(|e| format!("seed {seed}: {e}"))?;
    Ok(Outcome {
        trace_hash: trace.hash(),
        events: trace.len(),
        final_instances,
        timeline: trace.lines(),
        coverage: BTreeMap::new(),
    })
}
