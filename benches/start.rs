//! StartInstance → `running` latency and throughput, in-process and through the control plane over loopback
//! tarpc, for both engines, and from an operator's client through the control plane to the agent in plaintext
//! and over mutual TLS (the cost of TLS, against its plaintext baseline from the same run), and of a 5 MiB module
//! whose later starts reach the agent by hash only (against the tiny module's in the same cluster). Run with
//! `cargo bench --bench start`. Prints p50 / p99 / mean and starts per second.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use factum_control_plane::{ControlPlane, ControlPlaneConfig};
use factum_env::rpc::{self, tls::Tls, Credentials};
use factum_env::Env;
use factum_node_agent::{Agent, AgentConfig};
use factum_proto::{ControlPlaneClient, Principal, RestartPolicy, StartInstanceRequest, StartRequest};
use factum_providers::MemoryKv;
use factum_wasm::fixtures::{self, module};
use factum_wasm::{WasmEngine, WasmiEngine, WasmtimeEngine};

/// Starts per measurement; `FACTUM_BENCH_STARTS` overrides (e.g. 10000 to check a node holds that many idle instances).
fn iterations() -> usize {
    std::env::var("FACTUM_BENCH_STARTS").ok().and_then(|s| s.parse().ok()).unwrap_or(2_000)
}

/// The p50 of [`raw_wasmtime`], once measured: every later row prints its ratio to it.
static BASELINE: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();

/// Prints one row, with its p50's ratio to the baseline; returns the p50.
fn report(name: &str, mut samples: Vec<Duration>, total: Duration) -> Duration {
    samples.sort();
    let pct = |p: f64| samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)];
    let mean = total / samples.len() as u32;
    let ratio = BASELINE.get().map(|b| pct(0.5).as_secs_f64() / b.as_secs_f64()).unwrap_or(1.0);
    println!(
        "{name:<62} p50 {:>8.1} µs  p99 {:>8.1} µs  mean {:>8.1} µs  {:>8.0} starts/s  {ratio:>6.2}× raw",
        pct(0.5).as_secs_f64() * 1e6,
        pct(0.99).as_secs_f64() * 1e6,
        mean.as_secs_f64() * 1e6,
        samples.len() as f64 / total.as_secs_f64()
    );
    pct(0.5)
}

/// The engines to measure: all three, or those `FACTUM_BENCH_ENGINES` names (`wasmtime,pooled,wasmi`).
fn engines() -> Vec<(&'static str, Arc<dyn WasmEngine>)> {
    let chosen = std::env::var("FACTUM_BENCH_ENGINES").unwrap_or_else(|_| "wasmtime,pooled,wasmi".into());
    let chosen: Vec<&str> = chosen.split(',').collect();
    let mut engines: Vec<(&'static str, Arc<dyn WasmEngine>)> = Vec::new();
    if chosen.contains(&"wasmtime") {
        engines.push(("wasmtime", Arc::new(WasmtimeEngine::new().expect("wasmtime"))));
    }
    if chosen.contains(&"pooled") {
        let limits = factum_wasm::Limits::default();
        let pooled = WasmtimeEngine::pooled(4096, &limits, factum_wasm::Reservation::Guarded).expect("wasmtime pool");
        engines.push(("wasmtime, pooled", Arc::new(pooled)));
    }
    if chosen.contains(&"wasmi") {
        engines.push(("wasmi", Arc::new(WasmiEngine::new())));
    }
    engines
}

fn new_agent(env: &Env, engine: Arc<dyn WasmEngine>, addr: String) -> (Agent, factum_node_agent::StatusReports) {
    let mut config = AgentConfig::new("node-1", addr);
    config.max_instances = 100_000;
    Agent::new(env.clone(), config, engine, Arc::new(MemoryKv::new()))
}

/// The baseline of every start row: bare wasmtime (default config and allocator) instantiating the sleeper from
/// an `InstancePre` into a fresh store, its import defined as a trap. Returns the p50.
fn raw_wasmtime() -> Duration {
    let engine = wasmtime::Engine::default();
    let module = wasmtime::Module::new(&engine, module(fixtures::SLEEPER)).expect("compile");
    let mut linker = wasmtime::Linker::new(&engine);
    linker.define_unknown_imports_as_traps(&module).expect("imports");
    let pre = linker.instantiate_pre(&module).expect("pre");
    let mut samples = Vec::with_capacity(iterations());
    let started = Instant::now();
    for _ in 0..iterations() {
        let t = Instant::now();
        let mut store = wasmtime::Store::new(&engine, ());
        std::hint::black_box(pre.instantiate(&mut store).expect("instantiate"));
        samples.push(t.elapsed());
    }
    report("raw wasmtime instantiate (baseline)", samples, started.elapsed())
}

async fn agent_local(name: &str, engine: Arc<dyn WasmEngine>) {
    let env = Env::tokio();
    let (agent, mut reports) = new_agent(&env, engine, "127.0.0.1:0".into());
    let bytes = module(fixtures::SLEEPER);
    let mut samples = Vec::with_capacity(iterations());
    let started = Instant::now();
    for i in 0..iterations() {
        let req = StartInstanceRequest {
            module_hash: String::new(),
            grant_seals: Default::default(),
            instance_id: format!("i-{i}"),
            module_bytes: bytes.clone(),
            capabilities: vec![],
            restart_policy: RestartPolicy::default(),
            config: Default::default(),
            constraints: Default::default(),
            epoch: 1,
            node_lease: None,
            restarts: 0,
            seal: Default::default(),
        };
        let t = Instant::now();
        agent.start_instance(req).await.expect("start");
        samples.push(t.elapsed());
        reports.drain();
    }
    report(&format!("agent.start_instance ({name})"), samples, started.elapsed());
    agent.stop_all();
}

/// An env that calls as `principal`: plaintext, or mutual TLS with the certificates in `tls`.
fn env_as(principal: Principal, tls: Option<&Path>) -> Env {
    let credentials = match tls {
        None => Credentials::claim(principal),
        Some(dir) => {
            let certificates = Tls::from_dir(dir, &principal).expect("certificates");
            Credentials::tls(principal, certificates)
        }
    };
    Env::tokio().with_credentials(credentials)
}

/// A control plane and one agent over loopback TCP (with mutual TLS if `tls`); returns both and the control
/// plane's address once the agent has registered.
async fn cluster(engine: Arc<dyn WasmEngine>, tls: Option<&Path>) -> (ControlPlane, Agent, String) {
    let cp_env = env_as(Principal::ControlPlane, tls);
    let cp_listener = cp_env.net.bind("127.0.0.1:0").await.expect("bind");
    let cp_addr = cp_listener.local_addr().expect("addr");
    let cp = ControlPlane::new(cp_env.clone(), ControlPlaneConfig::default());
    cp_env.spawn(factum_control_plane::serve(cp.clone(), cp_listener));
    let agent_env = env_as(Principal::Node("node-1".into()), tls);
    let listener = agent_env.net.bind("127.0.0.1:0").await.expect("bind");
    let (agent, reports) = new_agent(&agent_env, engine, listener.local_addr().expect("addr"));
    agent_env.spawn(factum_node_agent::serve(agent.clone(), listener));
    agent_env.spawn(factum_node_agent::run_control_plane_link(agent.clone(), cp_addr.clone(), reports));
    while cp.list_nodes().is_empty() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    (cp, agent, cp_addr)
}

/// Times [`iterations`] starts of the sleeper, each through `start`, and reports them under `label`.
async fn measure<F, Fut>(label: &str, start: F)
where
    F: FnMut(StartRequest) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    measure_module(label, module(fixtures::SLEEPER), iterations(), start).await;
}

/// A client's start of module `bytes`, with nothing else asked for.
fn start_request(module_bytes: Vec<u8>) -> StartRequest {
    StartRequest {
        instance_id: None,
        module_bytes,
        module_hash: None,
        capabilities: vec![],
        restart_policy: RestartPolicy::default(),
        config: Default::default(),
        constraints: Default::default(),
    }
}

/// Times `n` starts of module `bytes`, each through `start`, and reports them under `label`.
async fn measure_module<F, Fut>(label: &str, bytes: Vec<u8>, n: usize, mut start: F)
where
    F: FnMut(StartRequest) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut samples = Vec::with_capacity(n);
    let started = Instant::now();
    for _ in 0..n {
        let req = start_request(bytes.clone());
        let t = Instant::now();
        start(req).await;
        samples.push(t.elapsed());
    }
    report(label, samples, started.elapsed());
}

async fn through_control_plane(name: &str, engine: Arc<dyn WasmEngine>) {
    let (cp, agent, _) = cluster(engine, None).await;
    measure(&format!("control plane → agent over tarpc ({name})"), |req| {
        let cp = cp.clone();
        async move {
            cp.start_instance(req).await.expect("start");
        }
    })
    .await;
    agent.stop_all();
}

/// The sleeper with a custom section that makes it `size` bytes: as big as a real application's module to ship
/// and hash, with nothing more to compile.
fn big_sleeper(size: usize) -> Vec<u8> {
    let mut bytes = module(fixtures::SLEEPER);
    let name = b"padding";
    let payload = size.saturating_sub(bytes.len() + name.len() + 8);
    let mut section = leb128(name.len());
    section.extend_from_slice(name);
    section.resize(section.len() + payload, 0);
    bytes.push(0); // custom section
    bytes.extend(leb128(section.len()));
    bytes.extend(section);
    bytes
}

fn leb128(mut n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return out;
        }
        out.push(byte | 0x80);
    }
}

/// Starts of a 5 MiB module through the control plane, beside the tiny sleeper's in the same cluster: the first
/// (shipped to the agent and compiled) alone, then later ones with the bytes (which the control plane hashes;
/// they reach the agent by hash only), and later ones by hash alone, as a client sends them.
async fn big_module(name: &str, engine: Arc<dyn WasmEngine>) {
    let (cp, agent, _) = cluster(engine, None).await;
    let start = |req: StartRequest| {
        let cp = cp.clone();
        async move {
            cp.start_instance(req).await.expect("start");
        }
    };
    let big = big_sleeper(5 << 20);
    let n = (iterations() / 10).max(1);
    measure_module(&format!("5 MiB module, first start ({name})"), big.clone(), 1, start).await;
    measure_module(&format!("5 MiB module, later starts ({name})"), big.clone(), n, start).await;
    let hash = factum_proto::module_hash(&big);
    let by_hash = |mut req: StartRequest| {
        req.module_bytes = Vec::new(); // as `factum_client::Client::start` sends it first
        req.module_hash = Some(hash.clone());
        start(req)
    };
    measure_module(&format!("5 MiB module, later starts by hash ({name})"), big.clone(), n, by_hash).await;
    measure_module(&format!("tiny module, same cluster ({name})"), module(fixtures::SLEEPER), n, start).await;
    let t = Instant::now();
    for _ in 0..n {
        std::hint::black_box(factum_proto::module_hash(&big));
    }
    println!(
        "{:<40} {:>8.1} µs  (the control plane hashes what a client sends: {hash:.8}…)",
        "  of which SHA-256 of 5 MiB",
        t.elapsed().as_secs_f64() * 1e6 / n as f64
    );
    agent.stop_all();
}

/// An operator's tarpc client → control plane → agent, every hop over loopback TCP: plaintext, or mutual TLS with
/// the certificates in `tls`.
async fn from_a_client(name: &str, engine: Arc<dyn WasmEngine>, tls: Option<&Path>) {
    let (_cp, agent, cp_addr) = cluster(engine, tls).await;
    let client_env = env_as(Principal::Operator("bench".into()), tls);
    let connect = || async {
        let stream = rpc::dial(&client_env, &cp_addr, &Principal::ControlPlane).await.expect("dial");
        rpc::start_client(&client_env, ControlPlaneClient::new(Default::default(), rpc::transport(stream)))
    };
    let client = connect().await;
    let how = if tls.is_some() { "mutual TLS" } else { "plaintext" };
    measure(&format!("client → control plane → agent, {how} ({name})"), |req| {
        let client = client.clone();
        async move {
            client.start_instance(rpc::rpc_context(), req).await.expect("rpc").expect("start");
        }
    })
    .await;
    let mut clients = Vec::with_capacity(CLIENTS);
    for _ in 0..CLIENTS {
        clients.push(connect().await);
    }
    concurrent(&format!("  {CLIENTS} clients at once, {how} ({name})"), clients).await;
    agent.stop_all();
}

/// Concurrent clients of [`concurrent`]: each its own connection, one start in flight at a time.
const CLIENTS: usize = 32;

/// [`iterations`] starts of the sleeper spread over `clients`, all running at once: p50/p99 of one start while
/// the others are in flight, and starts per second over the whole.
async fn concurrent(label: &str, clients: Vec<ControlPlaneClient>) {
    let per_client = (iterations() / clients.len()).max(1);
    let bytes = module(fixtures::SLEEPER);
    let started = Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|client| {
            let bytes = bytes.clone();
            tokio::spawn(async move {
                let mut samples = Vec::with_capacity(per_client);
                for _ in 0..per_client {
                    let req = start_request(bytes.clone());
                    let t = Instant::now();
                    client.start_instance(rpc::rpc_context(), req).await.expect("rpc").expect("start");
                    samples.push(t.elapsed());
                }
                samples
            })
        })
        .collect();
    let mut samples = Vec::with_capacity(per_client * CLIENTS);
    for task in tasks {
        samples.extend(task.await.expect("client task"));
    }
    report(label, samples, started.elapsed());
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let certs = std::env::temp_dir().join(format!("factum-bench-certs-{}", std::process::id()));
    let identities = [Principal::ControlPlane, Principal::Node("node-1".into()), Principal::Operator("bench".into())];
    factum_cli::certs::init(&certs, &identities).expect("certificates");
    let _ = BASELINE.set(raw_wasmtime());
    // `FACTUM_BENCH_ONLY=agent|control-plane|big|client|tls` runs one part (e.g. under a profiler), and
    // `FACTUM_BENCH_ENGINES` some engines.
    let only = std::env::var("FACTUM_BENCH_ONLY").ok();
    let runs = |part: &str| only.as_deref().is_none_or(|o| o == part);
    rt.block_on(async {
        for (name, engine) in engines() {
            if runs("agent") {
                // On a worker, as the agent's server runs it: `block_on` polls on the main thread, and every task
                // the start spawns would cost a hand-off between threads that a served start does not pay.
                tokio::spawn(agent_local(name, engine.clone())).await.expect("bench task");
            }
            if runs("control-plane") {
                through_control_plane(name, engine.clone()).await;
            }
            if runs("big") {
                big_module(name, engine.clone()).await;
            }
            if runs("client") {
                from_a_client(name, engine.clone(), None).await;
            }
            if runs("tls") {
                from_a_client(name, engine, Some(&certs)).await;
            }
        }
    });
    let _ = std::fs::remove_dir_all(&certs);
}
