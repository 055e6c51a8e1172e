//! Cost of one message from publish to a guest's `factum_on_message` handler on one node (in-process bus):
//! provider publish (decode, permission check), the subscription sink, the instance's mailbox, and the
//! handler call on each engine. The guest subscribes in `_start`, counts messages in its handler and exits
//! after the last one, so the clock stops when every message has been handled. Run with
//! `cargo bench --bench msg_deliver`; `FACTUM_BENCH_MESSAGES` sets the count.

use std::sync::Arc;
use std::time::Instant;

use factum_env::Env;
use factum_node_agent::{Agent, AgentConfig, Providers};
use factum_proto::{
    CapabilityAssignment, CapabilityInvocation, InstanceStatus, MsgOperation, Permission, RestartPolicy,
    StartInstanceRequest,
};
use factum_providers::{KvProvider, MessagingProvider, Provider};
use factum_wasm::{WasmEngine, WasmiEngine, WasmtimeEngine};

fn messages() -> usize {
    std::env::var("FACTUM_BENCH_MESSAGES").ok().and_then(|s| s.parse().ok()).unwrap_or(100_000)
}

/// Subscribes to `bench` on capability `bus`, then handles `$n` messages (the count is patched in) and exits.
fn guest(n: usize) -> Vec<u8> {
    let wat = format!(
        r#"(module
  (import "factum" "invoke" (func $invoke (param i32 i32 i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 1)
  (global $left (mut i32) (i32.const {n}))
  (data (i32.const 0) "bus")
  (data (i32.const 16) "subscribe")
  (data (i32.const 32) "\81\a5topic\a5bench")
  (func (export "_start")
    (drop (call $invoke (i32.const 0) (i32.const 3) (i32.const 16) (i32.const 9) (i32.const 32) (i32.const 13))))
  (func (export "factum_on_message") (param $len i32) (result i32)
    (global.set $left (i32.sub (global.get $left) (i32.const 1)))
    (if (i32.eqz (global.get $left)) (then (call $proc_exit (i32.const 0))))
    (i32.const 0)))"#
    );
    wat::parse_str(&wat).expect("wat")
}

async fn through_guest(name: &str, engine: Arc<dyn WasmEngine>, n: usize) {
    let messaging = Arc::new(MessagingProvider::in_memory());
    let providers = Providers {
        kv: Arc::new(KvProvider::new()),
        http: None,
        messaging: Some(messaging.clone()),
        remote: Default::default(),
    };
    let (agent, mut reports) = Agent::new(Env::tokio(), AgentConfig::new("node-1", "127.0.0.1:0"), engine, providers);
    let request = StartInstanceRequest {
        module_hash: String::new(),
        grant_seals: Default::default(),
        instance_id: "bench".into(),
        module_bytes: guest(n),
        capabilities: vec![
            CapabilityAssignment::new("bench", "bus", &["msg:subscribe:bench".to_string()]).expect("assignment")
        ],
        restart_policy: RestartPolicy::default(),
        config: Default::default(),
        constraints: Default::default(),
        epoch: 1,
        node_lease: None,
        restarts: 0,
        seal: Default::default(),
    };
    agent.start_instance(request).await.expect("start");
    while messaging.subscriptions_of("bench").is_empty() {
        tokio::task::yield_now().await;
    }
    let (operation, params) = MsgOperation::Publish { topic: "bench".into(), payload: b"m".to_vec() }.encode();
    let invocation = CapabilityInvocation { instance_id: "pub".into(), capability_id: "out".into(), operation, params };
    let granted = [Permission::MsgPublish("bench".into())];
    let started = Instant::now();
    for sent in 0..n {
        assert!(messaging.invoke(&invocation, &granted).await.success);
        if sent % 256 == 255 {
            // One thread: the guest drains its mailbox while we yield, so it never nears its 1024-message cap.
            tokio::task::yield_now().await;
        }
    }
    while let Some(report) = reports.recv().await {
        if report.status.is_terminal() {
            assert_eq!(report.status, InstanceStatus::Stopped, "{:?}", report.last_error);
            break;
        }
    }
    let ns = started.elapsed().as_nanos() as f64 / n as f64;
    println!("{name:<44} {ns:>9.0} ns/message  {:>10.0} messages/s", 1e9 / ns);
}

async fn run() {
    let n = messages();
    through_guest("publish → mailbox → handler, wasmtime", Arc::new(WasmtimeEngine::new().expect("wasmtime")), n).await;
    through_guest("publish → mailbox → handler, wasmi", Arc::new(WasmiEngine::new()), n).await;
}

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    runtime.block_on(run());
}
