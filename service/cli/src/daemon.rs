//! The long-running commands: `up`, `control-plane`, `agent`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use factum_control_plane::{ControlPlane, ControlPlaneConfig};
use factum_env::Env;
use factum_node_agent::{Agent, AgentConfig, Providers};
use factum_providers::{
    HttpLimits, HttpProvider, KvProvider, MessagingProvider, NatsBus, RedisStore, DEFAULT_MAX_KEYS_PER_STORE,
};
use factum_wasm::{Limits, WasmEngine, WasmiEngine, WasmtimeEngine};

use factum_registry::{EtcdRegistry, Registry};

use crate::{AgentOpts, EngineKind, RegistryOpts};

/// Prints a status line; a closed stdout (e.g. `factum up | head -1`) must not take the daemon down.
fn say(line: String) {
    use std::io::Write;
    let mut out = std::io::stdout();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    // Colour only for a person at a terminal: escape codes garble a log file or a journal.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).try_init();
}

/// Connects to etcd if endpoints are given.
async fn connect_registry(env: &Env, opts: &RegistryOpts) -> Result<Option<Arc<dyn Registry>>> {
    if opts.etcd.is_empty() {
        return Ok(None);
    }
    let registry = EtcdRegistry::connect(env.clone(), &opts.etcd, &opts.etcd_prefix, Duration::from_secs(5))
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
) -> Result<(ControlPlane, String)> {
    let listener = env.net.bind(listen).await.with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    let cp = ControlPlane::new(env.clone(), config);
    env.spawn(cp.clone().run_failure_detector());
    if let Some(registry) = registry {
        env.spawn(cp.clone().run_membership(registry));
    }
    env.spawn(factum_control_plane::serve(cp.clone(), listener));
    Ok((cp, addr))
}

/// Binds and serves an agent linked to `control_plane`; returns the address it listens on.
async fn start_agent(
    env: &Env,
    control_plane: String,
    opts: AgentOpts,
    registry: Option<Arc<dyn Registry>>,
) -> Result<(Agent, String)> {
    let listener =
        env.net.bind(&opts.agent_listen).await.with_context(|| format!("cannot listen on {}", opts.agent_listen))?;
    let addr = listener.local_addr()?;
    let engine: Arc<dyn WasmEngine> = match opts.engine {
        EngineKind::Wasmtime => Arc::new(WasmtimeEngine::new()?),
        EngineKind::Wasmi => Arc::new(WasmiEngine::new()),
    };
    let mut config = AgentConfig::new(opts.node_id, addr.clone());
    config.max_instances = opts.max_instances;
    config.lease_ttl = opts.lease_ttl;
    config.limits = Limits {
        max_memory_bytes: opts.max_memory_mib.saturating_mul(1024 * 1024),
        max_table_elements: opts.max_table_elements,
        fuel: opts.fuel,
        ..Limits::default()
    };
    let kv = match &opts.kv_redis {
        None => KvProvider::new(),
        Some(url) => {
            let store =
                RedisStore::connect(url, &opts.kv_namespace, DEFAULT_MAX_KEYS_PER_STORE, Duration::from_secs(5))
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))
                    .with_context(|| format!("cannot use Redis at {url} for KV"))?;
            say(format!("kv: redis at {url} (namespace {})", opts.kv_namespace));
            KvProvider::with_backend(Arc::new(store))
        }
    };
    let http = HttpProvider::new(HttpLimits::default()).map_err(|e| anyhow::anyhow!("{e}"))?;
    let messaging = match &opts.msg_nats {
        None => MessagingProvider::in_memory(),
        Some(url) => {
            let bus = NatsBus::connect(url, &opts.msg_prefix, Duration::from_secs(5), env.spawner.clone())
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))
                .with_context(|| format!("cannot use NATS at {url} for messaging"))?;
            say(format!("msg: nats at {url} (subjects {}.>)", opts.msg_prefix));
            MessagingProvider::new(Arc::new(bus))
        }
    };
    let providers = Providers { kv: Arc::new(kv), http: Some(Arc::new(http)), messaging: Some(Arc::new(messaging)) };
    let (agent, reports) = Agent::new(env.clone(), config, engine, providers);
    if let Some(registry) = registry {
        env.spawn(factum_node_agent::run_registry_link(agent.clone(), registry));
    }
    env.spawn(factum_node_agent::serve(agent.clone(), listener));
    env.spawn(factum_node_agent::run_control_plane_link(agent.clone(), control_plane, reports));
    Ok((agent, addr))
}

/// Waits for Ctrl-C or, on Unix, SIGTERM (what `kill`, systemd and container runtimes send to stop a daemon).
async fn wait_for_shutdown() -> Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("cannot wait for SIGTERM")?;
        tokio::select! {
            biased;
            ctrl_c = tokio::signal::ctrl_c() => ctrl_c.context("cannot wait for Ctrl-C")?,
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c().await.context("cannot wait for Ctrl-C")?;
    tracing::info!("shutting down");
    Ok(())
}

/// `factum up`: control plane + one agent + in-memory KV in this process.
pub async fn up(listen: String, agent_opts: AgentOpts) -> Result<()> {
    init_logging();
    let env = Env::tokio();
    let (cp, cp_addr) = start_control_plane(&env, &listen, ControlPlaneConfig::default(), None).await?;
    let engine = agent_opts.engine;
    let (agent, agent_addr) = start_agent(&env, cp_addr.clone(), agent_opts, None).await?;
    // Say "up" only once the node can take instances, so a `factum start` right after it is placed.
    for _ in 0..200 {
        if cp.list_nodes().iter().any(|n| n.available) {
            break;
        }
        env.clock.sleep(Duration::from_millis(25)).await;
    }
    say(format!("factum is up: control plane listening on {cp_addr}"));
    say(format!("node {} ({engine:?}) listening on {agent_addr}", agent.node_id()));
    say(format!("try: factum start guests/fixtures/kv_greeter.wat --cap kv=kv:write --control-plane {cp_addr}"));
    let result = wait_for_shutdown().await;
    agent.stop_all();
    agent.shutdown_providers().await;
    result
}

/// `factum control-plane`.
pub async fn control_plane(listen: String, reschedule: bool, registry: RegistryOpts) -> Result<()> {
    init_logging();
    let env = Env::tokio();
    let registry = connect_registry(&env, &registry).await?;
    let config = ControlPlaneConfig { reschedule, ..ControlPlaneConfig::default() };
    let (_, addr) = start_control_plane(&env, &listen, config, registry).await?;
    say(format!("control plane listening on {addr}"));
    wait_for_shutdown().await
}

/// `factum agent`.
pub async fn agent(control_plane: String, opts: AgentOpts, registry: RegistryOpts) -> Result<()> {
    init_logging();
    let env = Env::tokio();
    let registry = connect_registry(&env, &registry).await?;
    let (agent, addr) = start_agent(&env, control_plane.clone(), opts, registry).await?;
    say(format!("node {} listening on {addr}, reporting to {control_plane}", agent.node_id()));
    let result = wait_for_shutdown().await;
    agent.stop_all();
    agent.shutdown_providers().await;
    result
}
