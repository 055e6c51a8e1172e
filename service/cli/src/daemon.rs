//! The long-running commands: `up`, `control-plane`, `agent`, `provider`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use factum_control_plane::{ControlPlane, ControlPlaneConfig};
use factum_env::rpc::{self, tls::Tls};
use factum_env::Env;
use factum_node_agent::{Agent, AgentConfig, CompileLimits, Providers, Routes};
use factum_proto::{GrantKey, Principal, ProviderType};
use factum_providers::{
    BackendTls, HostEntry, HttpLimits, HttpProvider, KvProvider, MessagingProvider, NatsBus, Provider, ProviderHosts,
    RedisStore, DEFAULT_MAX_KEYS_PER_STORE,
};
use factum_wasm::{Limits, NodeMemory, Reservation, WasmEngine, WasmiEngine, WasmtimeEngine};

use factum_registry::{EtcdRegistry, ProviderRecord, Registry};

use crate::supervisor;
use crate::{AgentOpts, EngineKind, KvOpts, LogFormat, MetricsOpts, ProviderKind, ProviderOpts, RegistryOpts, TlsOpts};

/// Prints a status line; a closed stdout (e.g. `factum up | head -1`) must not take the daemon down.
pub(crate) fn say(line: String) {
    use std::io::Write;
    let mut out = std::io::stdout();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Logs to stderr in `format`, at `RUST_LOG`'s levels (info by default).
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let log = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        // Colour only for a person at a terminal: escape codes garble a log file or a journal.
        LogFormat::Text => log.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).try_init(),
        LogFormat::Json => log.json().try_init(),
    };
}

/// `env` with mutual TLS as `principal` when `tls` names a certificate directory; as it is (plaintext) if not.
fn secured(env: &Env, tls: &TlsOpts, principal: Principal) -> Result<Env> {
    let Some(dir) = &tls.tls else { return Ok(env.clone()) };
    let certificates = Tls::from_dir(dir, &principal)?;
    say(format!("{principal}: mutual TLS with the certificates in {}", dir.display()));
    Ok(env.clone().with_credentials(rpc::Credentials::tls(principal, certificates)))
}

/// Warns when a plaintext listener is reachable from other machines: over plaintext a peer is whoever it
/// claims to be in its hello, which only a loopback address makes safe.
fn warn_if_exposed(env: &Env, what: &str, addr: &str) {
    // Parsing an address, not opening a socket: `core::net` keeps the network seam lint meaningful.
    let loopback = addr.parse::<core::net::SocketAddr>().is_ok_and(|a| a.ip().is_loopback());
    if !loopback && env.credentials.tls.is_none() {
        tracing::warn!("the {what} listens on {addr} in plaintext: any peer that reaches it can claim any identity");
    }
}

/// Three quarters of the host's memory (`MemTotal` in `/proc/meminfo`), leaving the rest to the agent itself
/// and the host; `None` where that cannot be read.
fn default_node_memory_mib() -> Option<usize> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: usize =
        meminfo.lines().find_map(|l| l.strip_prefix("MemTotal:"))?.trim().strip_suffix("kB")?.trim().parse().ok()?;
    Some(kib / 1024 * 3 / 4)
}

/// Serves `/metrics` where `opts` says, with what `register` puts in the registry (under `factum_`).
async fn serve_metrics(
    env: &Env,
    opts: &MetricsOpts,
    register: impl FnOnce(&mut prometheus_client::registry::Registry),
) -> Result<()> {
    let Some(listen) = &opts.metrics_listen else { return Ok(()) };
    let listener = env.net.bind(listen).await.with_context(|| format!("cannot serve metrics on {listen}"))?;
    let addr = listener.local_addr()?;
    let mut registry = prometheus_client::registry::Registry::with_prefix("factum");
    register(&mut registry);
    env.spawn(crate::metrics::serve(env.clone(), listener, Arc::new(registry)));
    say(format!("metrics: http://{addr}/metrics"));
    Ok(())
}

/// Connects to etcd if endpoints are given.
async fn connect_registry(env: &Env, opts: &RegistryOpts) -> Result<Option<Arc<dyn Registry>>> {
    if opts.etcd.is_empty() {
        return Ok(None);
    }
    let tls = BackendTls::from_files(&opts.etcd_ca, &opts.etcd_cert, &opts.etcd_key);
    let user = match &opts.etcd_user {
        Some(name) => {
            let password = std::env::var("FACTUM_ETCD_PASSWORD")
                .with_context(|| format!("--etcd-user {name} needs its password in FACTUM_ETCD_PASSWORD"))?;
            Some((name.clone(), password))
        }
        None => None,
    };
    let timeout = Duration::from_secs(5);
    let registry = EtcdRegistry::connect_with(env.clone(), &opts.etcd, &opts.etcd_prefix, timeout, &tls, user)
        .await
        .with_context(|| format!("cannot use etcd at {}", opts.etcd.join(",")))?;
    say(format!("registry: etcd at {} (prefix {})", opts.etcd.join(","), opts.etcd_prefix));
    Ok(Some(Arc::new(registry)))
}

/// Binds and serves a control plane; returns it and the address it listens on.
async fn start_control_plane(
    env: &Env,
    listen: &str,
    config: ControlPlaneConfig,
    registry: Option<Arc<dyn Registry>>,
    tls: &TlsOpts,
) -> Result<(ControlPlane, String)> {
    let env = &secured(env, tls, Principal::ControlPlane)?;
    let mut config = config;
    if let Some(dir) = &tls.tls {
        config.placement_key = crate::certs::placement_key(dir)?;
        config.grant_key = config.placement_key.grant_key();
    }
    let listener = env.net.bind(listen).await.with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    warn_if_exposed(env, "control plane", &addr);
    let cp = ControlPlane::new(env.clone(), config);
    env.spawn(cp.clone().run_failure_detector());
    if let Some(registry) = registry {
        env.spawn(cp.clone().run_membership(registry));
    }
    env.spawn(factum_control_plane::serve(cp.clone(), listener));
    Ok((cp, addr))
}

/// A KV provider keeping its data where `opts` says.
async fn kv_provider(opts: &KvOpts) -> Result<KvProvider> {
    let Some(url) = &opts.kv_redis else { return Ok(KvProvider::new()) };
    let tls = BackendTls::from_files(&opts.kv_redis_ca, &opts.kv_redis_cert, &opts.kv_redis_key);
    let store =
        RedisStore::connect_with(url, &opts.kv_namespace, DEFAULT_MAX_KEYS_PER_STORE, Duration::from_secs(5), &tls)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| format!("cannot use Redis at {url} for KV"))?;
    say(format!("kv: redis at {url} (namespace {})", opts.kv_namespace));
    Ok(KvProvider::with_backend(Arc::new(store)))
}

/// How long an agent waits for a provider host: to connect, and for one call's answer.
const PROVIDER_HOST_TIMEOUT: Duration = Duration::from_secs(5);

/// A `KIND=ID@ADDR` flag (`--provider-host`, `--run-provider`): the kind, the host's id and its address.
fn host_flag(name: &str, flag: &str) -> Result<(ProviderKind, String, String)> {
    let bad = |why: &str| anyhow::anyhow!("{name} {flag:?}: {why} (expected KIND=ID@ADDR, e.g. kv=kv-1@10.0.0.5:7801)");
    let (kind, rest) = flag.split_once('=').ok_or_else(|| bad("no `=`"))?;
    let (id, addr) = rest.split_once('@').ok_or_else(|| bad("no `@`"))?;
    let kind = match kind {
        "kv" => ProviderKind::Kv,
        "http" => ProviderKind::Http,
        _ => return Err(bad("KIND is kv or http")),
    };
    format!("provider/{id}").parse::<Principal>().map_err(|e| bad(&e.message))?;
    if addr.is_empty() {
        return Err(bad("no address after `@`"));
    }
    Ok((kind, id.to_string(), addr.to_string()))
}

fn provider_type(kind: ProviderKind) -> ProviderType {
    match kind {
        ProviderKind::Kv => ProviderType::Kv,
        ProviderKind::Http => ProviderType::Http,
    }
}

/// Where the agent's calls of each kind go: the hosts of its `--provider-host` and `--run-provider` flags
/// (the latter on its own node), and empty routes for the kinds it finds in the registry. `env` introduces
/// itself as the node. Also the children to run.
fn provider_routes(
    env: &Env,
    node: &str,
    opts: &AgentOpts,
    with_registry: bool,
) -> Result<(Routes, Vec<supervisor::Child>)> {
    let mut entries: BTreeMap<ProviderType, Vec<HostEntry>> = BTreeMap::new();
    let mut children = Vec::new();
    for flag in &opts.provider_hosts {
        let (kind, id, addr) = host_flag("--provider-host", flag)?;
        say(format!("{} calls go to provider/{id} at {addr}", provider_type(kind)));
        entries.entry(provider_type(kind)).or_default().push(HostEntry { id, node: String::new(), addr });
    }
    for flag in &opts.run_providers {
        let (kind, id, addr) = host_flag("--run-provider", flag)?;
        if addr.ends_with(":0") {
            return Err(anyhow::anyhow!("--run-provider {flag:?}: the agent must know the port; port 0 picks one"));
        }
        let entry = HostEntry { id: id.clone(), node: node.to_string(), addr: addr.clone() };
        entries.entry(provider_type(kind)).or_default().push(entry);
        children.push(supervisor::Child { kind, id, addr });
    }
    for kind in &opts.provider_from_registry {
        let kind = provider_type(*kind);
        if !with_registry {
            return Err(anyhow::anyhow!("--provider-from-registry {kind} needs a registry: add --etcd"));
        }
        if entries.contains_key(&kind) {
            return Err(anyhow::anyhow!(
                "{kind} calls have hosts from flags and from the registry; the registry's would replace them: pick one"
            ));
        }
        say(format!("{kind} calls go to the provider hosts in the registry"));
        entries.insert(kind, Vec::new());
    }
    let routes = entries
        .into_iter()
        .map(|(kind, hosts)| {
            let routes = ProviderHosts::new(kind, env.clone(), node, PROVIDER_HOST_TIMEOUT);
            routes.set(hosts);
            (kind, Arc::new(routes))
        })
        .collect();
    Ok((routes, children))
}

/// How often an agent reads the provider hosts in the registry.
const DISCOVERY_INTERVAL: Duration = Duration::from_secs(1);

/// Binds and serves an agent linked to `control_plane`; returns the address it listens on.
async fn start_agent(
    env: &Env,
    control_plane: String,
    opts: AgentOpts,
    registry: Option<Arc<dyn Registry>>,
    tls: &TlsOpts,
) -> Result<(Agent, String)> {
    let env = &secured(env, tls, Principal::Node(opts.node_id.clone()))?;
    let listener =
        env.net.bind(&opts.agent_listen).await.with_context(|| format!("cannot listen on {}", opts.agent_listen))?;
    let addr = listener.local_addr()?;
    warn_if_exposed(env, "agent", &addr);
    let node_memory = match opts.node_memory_mib.or_else(default_node_memory_mib) {
        Some(mib) => {
            say(format!("node memory budget: {mib} MiB for all instances together"));
            NodeMemory::new(mib.saturating_mul(1024 * 1024))
        }
        None => NodeMemory::unlimited(),
    };
    let node_memory = Arc::new(node_memory);
    let mut config = AgentConfig::new(opts.node_id.clone(), addr.clone());
    config.max_instances = opts.max_instances;
    config.labels = factum_proto::labels::parse_labels("label", opts.labels.iter().map(String::as_str))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    config.lease_ttl = opts.lease_ttl;
    config.compile_limits = CompileLimits { concurrency: opts.compile_concurrency, budget: opts.compile_budget };
    config.limits = Limits {
        max_memory_bytes: opts.max_memory_mib.saturating_mul(1024 * 1024),
        max_table_elements: opts.max_table_elements,
        fuel: opts.fuel,
        ..Limits::default()
    };
    let reservation = if opts.compact_memory { Reservation::Budget } else { Reservation::Guarded };
    let engine: Arc<dyn WasmEngine> = match (opts.engine, opts.pooled) {
        (EngineKind::Wasmtime, false) => {
            Arc::new(WasmtimeEngine::on_demand(reservation, &config.limits)?.with_node_memory(node_memory))
        }
        (EngineKind::Wasmtime, true) => {
            say(format!("wasmtime pooling allocator: {} slots", opts.max_instances));
            let engine = WasmtimeEngine::pooled(opts.max_instances, &config.limits, reservation)?;
            Arc::new(engine.with_node_memory(node_memory))
        }
        (EngineKind::Wasmi, false) if opts.compact_memory => {
            anyhow::bail!("--compact-memory sizes wasmtime's reservations: not with --engine wasmi")
        }
        (EngineKind::Wasmi, false) => Arc::new(WasmiEngine::new().with_node_memory(node_memory)),
        (EngineKind::Wasmi, true) => anyhow::bail!("--pooled is wasmtime's pooling allocator: not with --engine wasmi"),
    };
    let kv = kv_provider(&opts.kv).await?;
    // The agent's own env says who it is only once the agent exists; its provider hosts must hear it first.
    let as_node = env.clone().with_principal(Principal::Node(config.node_id.clone()));
    let (remote, children) = provider_routes(&as_node, &config.node_id, &opts, registry.is_some())?;
    for child in children {
        env.spawn(supervisor::supervise(env.clone(), child, opts.kv.clone(), tls.clone()));
    }
    let http = HttpProvider::new(HttpLimits::default()).map_err(|e| anyhow::anyhow!("{e}"))?;
    let messaging = match &opts.msg_nats {
        None => MessagingProvider::in_memory(),
        Some(url) => {
            let tls = BackendTls::from_files(&opts.msg_nats_ca, &opts.msg_nats_cert, &opts.msg_nats_key);
            let bus = NatsBus::connect_with(url, &opts.msg_prefix, Duration::from_secs(5), env.clone(), &tls)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))
                .with_context(|| format!("cannot use NATS at {url} for messaging"))?;
            say(format!("msg: nats at {url} (subjects {}.>)", opts.msg_prefix));
            MessagingProvider::new(Arc::new(bus))
        }
    };
    let providers =
        Providers { kv: Arc::new(kv), http: Some(Arc::new(http)), messaging: Some(Arc::new(messaging)), remote };
    let discovered: BTreeMap<_, _> = opts
        .provider_from_registry
        .iter()
        .filter_map(|kind| providers.remote.get_key_value(&provider_type(*kind)))
        .map(|(kind, hosts)| (*kind, hosts.clone()))
        .collect();
    let (agent, reports) = Agent::new(env.clone(), config, engine, providers);
    if let Some(registry) = registry {
        if !discovered.is_empty() {
            let discovery = factum_node_agent::run_provider_discovery(
                env.clone(),
                registry.clone(),
                discovered,
                DISCOVERY_INTERVAL,
            );
            env.spawn(discovery);
        }
        env.spawn(factum_node_agent::run_registry_link(agent.clone(), registry));
    }
    env.spawn(factum_node_agent::serve(agent.clone(), listener));
    env.spawn(factum_node_agent::run_control_plane_link(agent.clone(), control_plane, reports));
    Ok((agent, addr))
}

/// Ctrl-C and, on Unix, SIGTERM (what `kill`, systemd and container runtimes send to stop a daemon), taken
/// when a daemon starts: until a handler exists the default action kills the process with status 143, so a
/// stop sent while the daemon is still starting (CI saw it) would skip the clean shutdown.
struct Shutdown {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
}

impl Shutdown {
    fn listen() -> Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Self {
                term: signal(SignalKind::terminate()).context("cannot wait for SIGTERM")?,
                interrupt: signal(SignalKind::interrupt()).context("cannot wait for Ctrl-C")?,
            })
        }
        #[cfg(not(unix))]
        Ok(Self {})
    }

    /// Waits for either signal; one that came while the daemon was starting counts.
    async fn wait(mut self) -> Result<()> {
        #[cfg(unix)]
        tokio::select! {
            biased;
            _ = self.interrupt.recv() => {}
            _ = self.term.recv() => {}
        }
        #[cfg(not(unix))]
        tokio::signal::ctrl_c().await.context("cannot wait for Ctrl-C")?;
        tracing::info!("shutting down");
        Ok(())
    }
}

/// `factum up`: control plane + one agent + in-memory KV in this process.
pub async fn up(
    listen: String,
    retention: Duration,
    agent_opts: AgentOpts,
    tls: TlsOpts,
    metrics: MetricsOpts,
) -> Result<()> {
    let shutdown = Shutdown::listen()?;
    let env = Env::tokio();
    let config = ControlPlaneConfig { retention, ..ControlPlaneConfig::default() };
    let (cp, cp_addr) = start_control_plane(&env, &listen, config, None, &tls).await?;
    let engine = agent_opts.engine;
    let (agent, agent_addr) = start_agent(&env, cp_addr.clone(), agent_opts, None, &tls).await?;
    serve_metrics(&env, &metrics, |registry| {
        cp.register_metrics(registry);
        agent.register_metrics(registry);
    })
    .await?;
    // Say "up" only once the node can take instances, so a `factum start` right after it is placed.
    for _ in 0..200 {
        if cp.list_nodes().iter().any(|n| n.available) {
            break;
        }
        env.clock.sleep(Duration::from_millis(25)).await;
    }
    say(format!("factum is up: control plane listening on {cp_addr}"));
    say(format!("node {} ({engine:?}) listening on {agent_addr}", agent.node_id()));
    let tls_flag = tls.tls.as_ref().map(|d| format!(" --tls {}", d.display())).unwrap_or_default();
    say(format!(
        "try: factum start guests/fixtures/kv_greeter.wat --cap kv=kv:write --control-plane {cp_addr}{tls_flag}"
    ));
    let result = shutdown.wait().await;
    agent.stop_all();
    agent.shutdown_providers().await;
    result
}

/// How long the control plane keeps what it keeps for a while.
#[derive(Debug, Clone, Copy)]
pub struct Lifetimes {
    /// Of instances that ended for good.
    pub retention: Duration,
    /// Of grant seals.
    pub grant_ttl: Duration,
}

/// `factum control-plane`.
pub async fn control_plane(
    listen: String,
    reschedule: bool,
    lifetimes: Lifetimes,
    registry: RegistryOpts,
    tls: TlsOpts,
    metrics: MetricsOpts,
) -> Result<()> {
    let shutdown = Shutdown::listen()?;
    let env = Env::tokio();
    let registry = connect_registry(&env, &registry).await?;
    let Lifetimes { retention, grant_ttl } = lifetimes;
    let config = ControlPlaneConfig { reschedule, retention, grant_ttl, ..ControlPlaneConfig::default() };
    let (cp, addr) = start_control_plane(&env, &listen, config, registry, &tls).await?;
    serve_metrics(&env, &metrics, |registry| cp.register_metrics(registry)).await?;
    say(format!("control plane listening on {addr}"));
    shutdown.wait().await
}

/// `factum agent`.
pub async fn agent(
    control_plane: String,
    opts: AgentOpts,
    registry: RegistryOpts,
    tls: TlsOpts,
    metrics: MetricsOpts,
) -> Result<()> {
    let shutdown = Shutdown::listen()?;
    let env = Env::tokio();
    let registry = connect_registry(&env, &registry).await?;
    let (agent, addr) = start_agent(&env, control_plane.clone(), opts, registry, &tls).await?;
    serve_metrics(&env, &metrics, |registry| agent.register_metrics(registry)).await?;
    say(format!("node {} listening on {addr}, reporting to {control_plane}", agent.node_id()));
    let result = shutdown.wait().await;
    agent.stop_all();
    agent.shutdown_providers().await;
    result
}

/// `factum provider`: one capability provider as a process of its own, serving node agents; with `--etcd`,
/// registered under a lease of its own so agents find it.
pub async fn provider(opts: ProviderOpts, kv: KvOpts, registry: RegistryOpts, tls: TlsOpts) -> Result<()> {
    let shutdown = Shutdown::listen()?;
    let principal: Principal = format!("provider/{}", opts.id)
        .parse()
        .map_err(|e: factum_proto::ErrorResponse| anyhow::anyhow!("--id: {}", e.message))?;
    let env = &secured(&Env::tokio(), &tls, principal.clone())?;
    let key = match &tls.tls {
        Some(dir) => crate::certs::grant_key(dir)?,
        None => GrantKey::plaintext(),
    };
    let registry = connect_registry(env, &registry).await?;
    let provider: Arc<dyn Provider> = match opts.kind {
        ProviderKind::Kv => Arc::new(kv_provider(&kv).await?),
        ProviderKind::Http => Arc::new(HttpProvider::new(HttpLimits::default()).map_err(|e| anyhow::anyhow!("{e}"))?),
    };
    let listen = &opts.listen;
    let listener = env.net.bind(listen).await.with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    warn_if_exposed(env, "provider", &addr);
    let metadata = provider.metadata();
    env.spawn(factum_providers::remote::serve(env.clone(), provider.clone(), key, listener));
    say(format!("{principal} ({}) listening on {addr}", metadata.name));
    if let Some(registry) = registry {
        let advertised = opts.advertise.clone().unwrap_or_else(|| addr.clone());
        let node_id = opts.node.clone().unwrap_or_default();
        let record = ProviderRecord { provider_id: opts.id.clone(), node_id, metadata, addr: Some(advertised.clone()) };
        say(format!("{principal} registers as {advertised} (lease TTL {:?})", opts.lease_ttl));
        env.spawn(factum_registry::hold_provider(env.clone(), registry, record, opts.lease_ttl));
    }
    let result = if opts.exit_with_stdin {
        tokio::select! {
            biased;
            result = shutdown.wait() => result,
            () = stdin_closed() => {
                tracing::info!("standard input closed (the supervising agent ended): shutting down");
                Ok(())
            }
        }
    } else {
        shutdown.wait().await
    };
    let _ = provider.shutdown().await; // calls in flight finish first (P20)
    result
}

/// Returns once standard input reaches its end or fails.
async fn stdin_closed() {
    use tokio::io::AsyncReadExt;
    let mut stdin = tokio::io::stdin();
    let mut buf = [0u8; 64];
    while matches!(stdin.read(&mut buf).await, Ok(n) if n > 0) {}
}
