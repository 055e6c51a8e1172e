//! The remote provider protocol (P17) over real loopback TCP: a provider served from its own runtime (its own
//! "process": dropping the runtime closes every socket it had), called through [`RemoteProvider`] as an agent
//! would. Calls carry grants sealed with a [`GrantKey`]; the provider host checks them itself.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // tests may panic

use std::sync::Arc;
use std::time::{Duration, Instant};

use factum_env::Env;
use factum_proto::{
    CapabilityAssignment, CapabilityInvocation, CapabilityResponse, ErrorCode, GrantKey, KvOperation, Permission,
    Principal, SealedGrant,
};
use factum_providers::{remote, HostEntry, KvProvider, Provider, ProviderHosts, RemoteProvider};
use proptest::prelude::*;

const TIMEOUT: Duration = Duration::from_secs(2);

/// A KV provider host on a runtime of its own thread; dropping it ends the host as a killed process ends.
struct ProviderHost {
    addr: String,
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ProviderHost {
    /// Starts a host on `addr` (`127.0.0.1:0` for any port).
    fn start(addr: &str, key: GrantKey) -> Self {
        let (bound, ready) = std::sync::mpsc::channel();
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let addr = addr.to_string();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let env = Env::tokio().with_principal(Principal::Provider("kv-1".into()));
                let listener = env.net.bind(&addr).await.unwrap();
                bound.send(listener.local_addr().unwrap()).unwrap();
                let provider: Arc<dyn Provider> = Arc::new(KvProvider::new());
                tokio::spawn(remote::serve(env, provider, key, listener));
                // Wait for the stop without blocking the runtime's only thread.
                while stopped.try_recv() == Err(std::sync::mpsc::TryRecvError::Empty) {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            });
            drop(rt); // every task and socket of the host goes here
        });
        ProviderHost { addr: ready.recv().unwrap(), stop: Some(stop), thread: Some(thread) }
    }
}

impl Drop for ProviderHost {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn node_env(node: &str) -> Env {
    Env::tokio().with_principal(Principal::Node(node.into()))
}

fn call(instance: &str, capability: &str, op: &KvOperation) -> CapabilityInvocation {
    let (operation, params) = op.encode();
    CapabilityInvocation { instance_id: instance.into(), capability_id: capability.into(), operation, params }
}

/// A grant sealed for an hour from now.
fn grant(key: &GrantKey, instance: &str, capability: &str, permissions: &[Permission], node: &str) -> SealedGrant {
    sealed_until(key, instance, capability, permissions, node, Env::tokio().wall_ms() + 3_600_000)
}

fn sealed_until(
    key: &GrantKey,
    instance: &str,
    capability: &str,
    permissions: &[Permission],
    node: &str,
    expires_ms: u64,
) -> SealedGrant {
    let permissions: Vec<String> = permissions.iter().map(Permission::to_string).collect();
    key.seal(&CapabilityAssignment::new(instance, capability, &permissions).unwrap(), node, expires_ms)
}

fn set(key: &str, value: &[u8]) -> KvOperation {
    KvOperation::Set { key: key.into(), value: value.to_vec() }
}

fn get(key: &str) -> KvOperation {
    KvOperation::Get { key: key.into() }
}

fn code(response: &CapabilityResponse) -> Option<ErrorCode> {
    response.error_code()
}

#[tokio::test]
async fn a_remote_call_runs_only_under_a_grant_the_control_plane_sealed() {
    let key = GrantKey::derive(&[7; 32]);
    let host = ProviderHost::start("127.0.0.1:0", key.clone());
    let n1 = RemoteProvider::new(node_env("n1"), &host.addr, Principal::Provider("kv-1".into()), TIMEOUT);
    let rw = grant(&key, "i1", "store", &[Permission::KvRead, Permission::KvWrite], "n1");

    let wrote = n1.invoke(call("i1", "store", &set("k", b"v")), rw.clone()).await;
    assert!(wrote.success, "{wrote:?}");
    let read = n1.invoke(call("i1", "store", &get("k")), rw.clone()).await;
    let local = KvProvider::new();
    let rw_local = [Permission::KvRead, Permission::KvWrite];
    local.invoke(&call("i1", "store", &set("k", b"v")), &rw_local).await;
    assert_eq!(read, local.invoke(&call("i1", "store", &get("k")), &rw_local).await, "remote and local agree");

    // The provider applies the sealed permissions, not more: a read-only grant cannot write.
    let ro = grant(&key, "i1", "store", &[Permission::KvRead], "n1");
    assert_eq!(code(&n1.invoke(call("i1", "store", &set("k", b"w")), ro).await), Some(ErrorCode::PermissionDenied));

    // An agent cannot widen a grant, use one sealed for another node or instance, or seal its own.
    let mut widened = grant(&key, "i1", "store", &[Permission::KvRead], "n1");
    widened.permissions.push(Permission::KvWrite.to_string());
    let n2 = RemoteProvider::new(node_env("n2"), &host.addr, Principal::Provider("kv-1".into()), TIMEOUT);
    let forged = grant(&GrantKey::derive(&[8; 32]), "i1", "store", &[Permission::KvWrite], "n1");
    // Nor use a seal past its expiry (a grant the control plane stopped renewing).
    let expired = sealed_until(&key, "i1", "store", &[Permission::KvWrite], "n1", Env::tokio().wall_ms() - 1);
    for (who, call, grant) in [
        (&n1, call("i1", "store", &set("k", b"w")), expired),
        (&n1, call("i1", "store", &set("k", b"w")), widened),
        (&n2, call("i1", "store", &set("k", b"w")), rw.clone()),
        (&n1, call("i2", "store", &set("k", b"w")), rw.clone()),
        (&n1, call("i1", "store", &set("k", b"w")), forged),
    ] {
        let refused = who.invoke(call, grant).await;
        assert_eq!(code(&refused), Some(ErrorCode::PermissionDenied), "{refused:?}");
    }
    let after = n1.invoke(call("i1", "store", &get("k")), rw).await;
    assert_eq!(after, read, "no refused call changed the store");

    // Only node agents are served: any other identity is refused at its hello.
    let operator = Env::tokio().with_principal(Principal::Operator("alice".into()));
    let stranger = RemoteProvider::new(operator, &host.addr, Principal::Provider("kv-1".into()), TIMEOUT);
    let refused = stranger.metadata().await.unwrap_err();
    assert_eq!(refused.error_code, ErrorCode::ProviderUnavailable);
    assert!(refused.message.contains("serves node agents only"), "{refused}");
    assert_eq!(n1.metadata().await.unwrap().provider_type, factum_proto::ProviderType::Kv);
}

#[tokio::test]
async fn a_dead_provider_is_unavailable_at_once_and_serves_again_once_restarted() {
    let key = GrantKey::plaintext();
    let host = ProviderHost::start("127.0.0.1:0", key.clone());
    let addr = host.addr.clone();
    let n1 = RemoteProvider::new(node_env("n1"), &addr, Principal::Provider("kv-1".into()), TIMEOUT);
    let rw = grant(&key, "i1", "store", &[Permission::KvRead, Permission::KvWrite], "n1");
    assert!(n1.invoke(call("i1", "store", &set("k", b"v")), rw.clone()).await.success);

    drop(host); // killed: its sockets close
    for _ in 0..2 {
        let began = Instant::now();
        let failed = n1.invoke(call("i1", "store", &get("k")), rw.clone()).await;
        assert_eq!(code(&failed), Some(ErrorCode::ProviderUnavailable), "{failed:?}");
        assert!(began.elapsed() < TIMEOUT, "a closed connection fails fast, not by timeout");
    }

    // Restarted on the same address: the same client dials again. Its memory store started empty.
    let _host = ProviderHost::start(&addr, key);
    let read = n1.invoke(call("i1", "store", &get("k")), rw).await;
    assert!(read.success, "{read:?}");
    let value: Option<serde_bytes::ByteBuf> = rmp_serde::from_slice(read.result.as_deref().unwrap()).unwrap();
    assert_eq!(value, None);
}

#[tokio::test]
async fn a_read_goes_on_to_the_next_host_when_the_first_is_down_and_a_write_does_not() {
    let key = GrantKey::plaintext();
    let dead = ProviderHost::start("127.0.0.1:0", key.clone());
    let dead_addr = dead.addr.clone();
    drop(dead);
    let live = ProviderHost::start("127.0.0.1:0", key.clone());
    let hosts = ProviderHosts::new(factum_proto::ProviderType::Kv, node_env("n1"), "n1", TIMEOUT);
    // The dead host is on the caller's own node, so every call tries it first.
    hosts.set([
        HostEntry { id: "kv-1".into(), node: "n1".into(), addr: dead_addr },
        HostEntry { id: "kv-1".into(), node: "n2".into(), addr: live.addr.clone() },
    ]);
    assert_eq!(hosts.order("store")[0].entry.node, "n1");
    let rw = grant(&key, "i1", "store", &[Permission::KvRead, Permission::KvWrite], "n1");

    let read = hosts.invoke(call("i1", "store", &get("k")), rw.clone()).await;
    assert!(read.success, "a get is idempotent, so the live host answers it: {read:?}");
    let wrote = hosts.invoke(call("i1", "store", &set("k", b"v")), rw.clone()).await;
    assert_eq!(code(&wrote), Some(ErrorCode::ProviderUnavailable), "a set goes to its first host only: {wrote:?}");

    hosts.set([]);
    let none = hosts.invoke(call("i1", "store", &get("k")), rw).await;
    assert_eq!(code(&none), Some(ErrorCode::ProviderUnavailable), "{none:?}");
    assert!(none.error.unwrap().message.contains("no kv provider host"));
}

#[tokio::test]
async fn a_provider_that_never_answers_is_unavailable_after_the_timeout_not_a_hang() {
    // Accepts connections and never says a word.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap().to_string();
    let _held = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = silent.accept().await {
            held.push(stream);
        }
    });
    let timeout = Duration::from_millis(300);
    let n1 = RemoteProvider::new(node_env("n1"), &addr, Principal::Provider("kv-1".into()), timeout);
    let key = GrantKey::plaintext();
    let began = Instant::now();
    let failed =
        n1.invoke(call("i1", "store", &get("k")), grant(&key, "i1", "store", &[Permission::KvRead], "n1")).await;
    assert_eq!(code(&failed), Some(ErrorCode::ProviderUnavailable), "{failed:?}");
    assert!(began.elapsed() < timeout * 4, "bounded by the timeout: {:?}", began.elapsed());
}

fn op() -> impl Strategy<Value = KvOperation> {
    let key = prop::sample::select(vec!["a", "b", "a/1", ""]).prop_map(String::from);
    prop_oneof![
        key.clone().prop_map(|key| KvOperation::Get { key }),
        (key.clone(), prop::collection::vec(any::<u8>(), 0..8))
            .prop_map(|(key, value)| KvOperation::Set { key, value }),
        key.clone().prop_map(|key| KvOperation::Delete { key }),
        (key, prop::option::of(Just("a".to_string())), prop::option::of(1u32..3))
            .prop_map(|(prefix, after, limit)| KvOperation::List { prefix, after, limit }),
    ]
}

fn permissions() -> impl Strategy<Value = Vec<Permission>> {
    prop::sample::subsequence(vec![Permission::KvRead, Permission::KvWrite, Permission::KvDelete], 1..=3)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(100))]

    /// Feature: wasm-orchestrator, Property 17: Distributed Capability Provider Invocation Routing
    ///
    /// The same calls under the same grant give the same answers, successes and denials alike, whether the
    /// provider runs beside the instance or on another host behind a sealed grant.
    #[test]
    fn remote_calls_answer_as_local_calls_do(calls in prop::collection::vec((op(), permissions()), 1..12)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let (local, remote) = rt.block_on(async {
            let key = GrantKey::derive(&[17; 32]);
            let host = ProviderHost::start("127.0.0.1:0", key.clone());
            let agent = RemoteProvider::new(node_env("n1"), &host.addr, Principal::Provider("kv-1".into()), TIMEOUT);
            let beside = KvProvider::new();
            let (mut local, mut remote) = (Vec::new(), Vec::new());
            for (op, granted) in &calls {
                let invocation = call("i1", "store", op);
                local.push(beside.invoke(&invocation, granted).await);
                remote.push(agent.invoke(invocation, grant(&key, "i1", "store", granted, "n1")).await);
            }
            (local, remote)
        });
        prop_assert_eq!(local, remote);
    }
}
