//! Control-plane rebuild: how long a fresh, empty control plane takes to list every instance again, learning
//! the nodes from the registry and asking each agent what it runs (no heartbeat wait, nothing persisted).
//! Run with `cargo bench --bench rebuild`; `FACTUM_BENCH_INSTANCES` sets the instance count (default 1000).

use std::sync::Arc;
use std::time::{Duration, Instant};

use factum_control_plane::{ControlPlane, ControlPlaneConfig};
use factum_env::Env;
use factum_node_agent::{Agent, AgentConfig};
use factum_proto::{PolicyType, RestartPolicy, StartRequest};
use factum_providers::MemoryKv;
use factum_registry::{MemoryRegistry, Registry};
use factum_wasm::fixtures::{self, module};
use factum_wasm::WasmtimeEngine;

const AGENTS: usize = 3;

fn instances() -> usize {
    std::env::var("FACTUM_BENCH_INSTANCES").ok().and_then(|s| s.parse().ok()).unwrap_or(1_000)
}

async fn wait_for(what: &str, check: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !check() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

async fn control_plane(env: &Env, registry: Arc<dyn Registry>) -> ControlPlane {
    let listener = env.net.bind("127.0.0.1:0").await.expect("bind");
    let cp = ControlPlane::new(env.clone(), ControlPlaneConfig::default());
    env.spawn(factum_control_plane::serve(cp.clone(), listener));
    env.spawn(cp.clone().run_membership(registry));
    cp
}

async fn run() {
    let env = Env::tokio();
    let registry: Arc<dyn Registry> = Arc::new(MemoryRegistry::new(env.clone(), "/factum"));
    let first = control_plane(&env, registry.clone()).await;
    let engine = Arc::new(WasmtimeEngine::new().expect("wasmtime"));
    for i in 1..=AGENTS {
        let listener = env.net.bind("127.0.0.1:0").await.expect("bind");
        let mut config = AgentConfig::new(format!("node-{i}"), listener.local_addr().expect("addr"));
        config.max_instances = 100_000;
        let (agent, mut reports) = Agent::new(env.clone(), config, engine.clone(), Arc::new(MemoryKv::new()));
        env.spawn(factum_node_agent::run_registry_link(agent.clone(), registry.clone()));
        env.spawn(factum_node_agent::serve(agent.clone(), listener));
        // No control-plane link: the rebuild below must come from the registry and the agents alone.
        env.spawn(async move { while reports.recv().await.is_some() {} });
        let _: Agent = agent;
    }
    wait_for("nodes registered", || first.list_nodes().iter().filter(|n| n.available).count() == AGENTS).await;
    let n = instances();
    let bytes = module(fixtures::SLEEPER);
    let policy = RestartPolicy { policy_type: PolicyType::Always, max_retries: None, backoff_seconds: None };
    for i in 0..n {
        let req = StartRequest {
            instance_id: Some(format!("i-{i}")),
            module_bytes: bytes.clone(),
            module_hash: None,
            capabilities: vec![],
            restart_policy: policy,
            config: Default::default(),
            constraints: Default::default(),
        };
        first.start_instance(req).await.expect("start");
    }
    let began = Instant::now();
    let fresh = control_plane(&env, registry).await;
    wait_for("rebuild", || fresh.list_instances().len() == n).await;
    let listed = began.elapsed();
    let running = fresh.list_instances().iter().filter(|m| m.status == factum_proto::InstanceStatus::Running).count();
    println!(
        "control-plane rebuild: {n} instances on {AGENTS} nodes listed again after {:.1} ms ({running} running)",
        listed.as_secs_f64() * 1e3
    );
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    runtime.block_on(run());
}
