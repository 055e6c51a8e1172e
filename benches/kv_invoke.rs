//! Per-invocation overhead of a KV `get` (memory backend), from the cheapest to the full guest path:
//! a direct `BTreeMap` lookup, the provider alone (MessagePack decode, permission check, encode), and a guest
//! calling `factum.invoke` + `factum.response_read` in a loop on each engine (ABI, assignment lookup at call
//! time, async host call), and the same provider on a provider host over loopback tarpc (P17: the sealed grant
//! travels with the call and the host checks it), one call at a time and 32 at once on one connection. Run with
//! `cargo bench --bench kv_invoke`; `FACTUM_BENCH_CALLS` sets the count (a twentieth of it for the remote rows).

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use factum_env::Env;
use factum_node_agent::{Agent, AgentConfig};
use factum_proto::{
    CapabilityAssignment, CapabilityInvocation, GrantKey, InstanceStatus, KvOperation, Permission, Principal,
    ProviderType, RestartPolicy, StartInstanceRequest,
};
use factum_providers::{remote, HostEntry, KvProvider, Provider, ProviderHosts, RemoteProvider};
use factum_wasm::{WasmEngine, WasmiEngine, WasmtimeEngine};

fn calls() -> usize {
    std::env::var("FACTUM_BENCH_CALLS").ok().and_then(|s| s.parse().ok()).unwrap_or(200_000)
}

/// Calls kv `get` {"key": "k"} `$n` times (the count is patched in), then returns.
fn guest(n: usize) -> Vec<u8> {
    let wat = format!(
        r#"(module
  (import "factum" "invoke" (func $invoke (param i32 i32 i32 i32 i32 i32) (result i32)))
  (import "factum" "response_read" (func $response_read (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "kv")
  (data (i32.const 16) "get")
  (data (i32.const 32) "\81\a3key\a1k")
  (func (export "_start") (local $left i32)
    (local.set $left (i32.const {n}))
    (loop $again
      (drop (call $invoke (i32.const 0) (i32.const 2) (i32.const 16) (i32.const 3) (i32.const 32) (i32.const 7)))
      (drop (call $response_read (i32.const 1024) (i32.const 1024)))
      (local.set $left (i32.sub (local.get $left) (i32.const 1)))
      (br_if $again (local.get $left)))))"#
    );
    wat::parse_str(&wat).expect("wat")
}

fn per_call(name: &str, started: Instant, n: usize) {
    let ns = started.elapsed().as_nanos() as f64 / n as f64;
    println!("{name:<44} {ns:>9.0} ns/call  {:>10.0} calls/s", 1e9 / ns);
}

async fn through_guest(name: &str, engine: Arc<dyn WasmEngine>, n: usize) {
    let env = Env::tokio();
    let kv = Arc::new(KvProvider::new());
    let (agent, mut reports) = Agent::new(env, AgentConfig::new("node-1", "127.0.0.1:0"), engine, kv);
    let request = StartInstanceRequest {
        module_hash: String::new(),
        grant_seals: Default::default(),
        instance_id: "bench".into(),
        module_bytes: guest(n),
        capabilities: vec![CapabilityAssignment::new("bench", "kv", &["kv:read".to_string()]).expect("assignment")],
        restart_policy: RestartPolicy::default(),
        config: Default::default(),
        constraints: Default::default(),
        epoch: 1,
        node_lease: None,
        restarts: 0,
        seal: Default::default(),
    };
    let started = Instant::now();
    agent.start_instance(request).await.expect("start");
    while let Some(report) = reports.recv().await {
        if report.status.is_terminal() {
            assert_eq!(report.status, InstanceStatus::Stopped, "{:?}", report.last_error);
            break;
        }
    }
    per_call(name, started, n);
}

async fn run() {
    let n = calls();
    let mut map = BTreeMap::new();
    map.insert("k".to_string(), b"v".to_vec());
    let started = Instant::now();
    for _ in 0..n {
        black_box(map.get(black_box("k")).cloned());
    }
    per_call("direct BTreeMap get (clone of the value)", started, n);

    let kv = KvProvider::new();
    let (operation, params) = KvOperation::Get { key: "k".into() }.encode();
    let invocation = CapabilityInvocation { instance_id: "i".into(), capability_id: "kv".into(), operation, params };
    let granted = [Permission::KvRead];
    let started = Instant::now();
    for _ in 0..n {
        black_box(kv.invoke(black_box(&invocation), &granted).await.encode());
    }
    per_call("provider invoke + response encode", started, n);

    // The same get on a provider host: the local row above is its baseline from this run.
    let key = GrantKey::derive(&[7; 32]);
    let host_env = Env::tokio().with_principal(Principal::Provider("kv-1".into()));
    let listener = host_env.net.bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let provider: Arc<dyn Provider> = Arc::new(KvProvider::new());
    tokio::spawn(remote::serve(host_env, provider, key.clone(), listener));
    let node = Env::tokio().with_principal(Principal::Node("node-1".into()));
    let client =
        Arc::new(RemoteProvider::new(node.clone(), &addr, Principal::Provider("kv-1".into()), Duration::from_secs(5)));
    let assignment = CapabilityAssignment::new("i", "kv", &["kv:read".to_string()]).expect("assignment");
    let grant = key.seal(&assignment, "node-1", u64::MAX);
    let remote_n = (n / 20).max(1);
    let started = Instant::now();
    for _ in 0..remote_n {
        let response = client.invoke(invocation.clone(), grant.clone()).await;
        assert!(response.error.is_none(), "{response:?}");
    }
    per_call("provider host over loopback tarpc, 1 at a time", started, remote_n);
    let started = Instant::now();
    let workers: Vec<_> = (0..32)
        .map(|_| {
            let (client, invocation, grant) = (client.clone(), invocation.clone(), grant.clone());
            tokio::spawn(async move {
                for _ in 0..remote_n / 32 {
                    let response = client.invoke(invocation.clone(), grant.clone()).await;
                    assert!(response.error.is_none(), "{response:?}");
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.expect("worker");
    }
    per_call("provider host over loopback tarpc, 32 at once", started, remote_n / 32 * 32);

    // The same get routed among three hosts (this node's own ranks first): what routing adds to the row above.
    let routed = ProviderHosts::new(ProviderType::Kv, node, "node-1", Duration::from_secs(5));
    routed.set([
        HostEntry { id: "kv-1".into(), node: "node-1".into(), addr },
        HostEntry { id: "kv-2".into(), node: "node-2".into(), addr: "127.0.0.1:9".into() },
        HostEntry { id: "kv-3".into(), node: "node-3".into(), addr: "127.0.0.1:9".into() },
    ]);
    let started = Instant::now();
    for _ in 0..remote_n {
        let response = routed.invoke(invocation.clone(), grant.clone()).await;
        assert!(response.error.is_none(), "{response:?}");
    }
    per_call("provider host over loopback tarpc, routed among 3 hosts, 1 at a time", started, remote_n);
    let started = Instant::now();
    for _ in 0..n {
        black_box(routed.order(black_box("kv")));
    }
    per_call("routing order alone, 3 hosts", started, n);

    through_guest("guest → agent → provider, wasmtime", Arc::new(WasmtimeEngine::new().expect("wasmtime")), n).await;
    through_guest("guest → agent → provider, wasmi", Arc::new(WasmiEngine::new()), n).await;
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    runtime.block_on(run());
}
