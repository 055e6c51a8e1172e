//! The same behaviour tests against every KV backend: in memory, and a real `redis-server` started on a free
//! port (apt `redis-server`; `.ci/run` installs it). Without redis-server the Redis half says so and is
//! skipped, except under `CI=true`, where that is a failure.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // tests may panic

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use factum_proto::{CapabilityInvocation, ErrorCode, KvOperation, Permission};
use factum_providers::{KvBackend, KvProvider, MemoryStore, Provider, RedisStore};
use proptest::prelude::*;
use serde_bytes::ByteBuf;

const ALL: [Permission; 3] = [Permission::KvRead, Permission::KvWrite, Permission::KvDelete];

/// One redis-server for the whole test binary.
struct Redis {
    url: String,
    _child: Child,
}

fn redis() -> Option<&'static Redis> {
    static REDIS: OnceLock<Option<Redis>> = OnceLock::new();
    REDIS
        .get_or_init(|| {
            let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            if Command::new("redis-server").arg("--version").output().is_err() {
                assert!(std::env::var("CI").is_err(), "redis-server is not installed, but CI must run the Redis tests");
                eprintln!("skipping the Redis backend: no `redis-server` on PATH (apt install redis-server)");
                return None;
            }
            // A static is never dropped, so a watchdog ends redis-server when this test process is gone.
            let script = format!(
                "redis-server --port {port} --bind 127.0.0.1 --save '' --appendonly no & r=$!; \
                 while kill -0 {} 2>/dev/null; do sleep 0.2; done; kill $r",
                std::process::id()
            );
            let child =
                Command::new("sh").args(["-c", &script]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                assert!(Instant::now() < deadline, "redis-server did not come up");
                std::thread::sleep(Duration::from_millis(20));
            }
            Some(Redis { url: format!("redis://127.0.0.1:{port}"), _child: child })
        })
        .as_ref()
}

/// Every backend, each in a namespace of its own, so test cases never see each other's data.
async fn backends(max_keys: usize) -> Vec<Arc<dyn KvBackend>> {
    static NAMESPACE: AtomicU64 = AtomicU64::new(0);
    let mut backends: Vec<Arc<dyn KvBackend>> = vec![Arc::new(MemoryStore::new(max_keys))];
    if let Some(redis) = redis() {
        let namespace = format!("test{}-{}", std::process::id(), NAMESPACE.fetch_add(1, Ordering::SeqCst));
        let store = RedisStore::connect(&redis.url, &namespace, max_keys, Duration::from_secs(5)).await.unwrap();
        backends.push(Arc::new(store));
    }
    backends
}

fn inv(cap: &str, op: &KvOperation) -> CapabilityInvocation {
    let (operation, params) = op.encode();
    CapabilityInvocation { instance_id: "i".into(), capability_id: cap.into(), operation, params }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// Keys include glob characters, which a SCAN/KEYS-based backend would get wrong.
fn arb_op() -> impl Strategy<Value = KvOperation> {
    prop_oneof![
        "[a-c*?\\[]{1,2}".prop_map(|key| KvOperation::Get { key }),
        ("[a-c*?\\[]{1,2}", prop::collection::vec(any::<u8>(), 0..4))
            .prop_map(|(key, value)| KvOperation::Set { key, value }),
        "[a-c*?\\[]{1,2}".prop_map(|key| KvOperation::Delete { key }),
        ("[a-c*?\\[]{0,1}", prop::option::of("[a-c]{0,2}"), prop::option::of(1u32..4))
            .prop_map(|(prefix, after, limit)| KvOperation::List { prefix, after, limit }),
    ]
}

#[test]
fn full_stores_are_resource_exhausted_on_every_backend() {
    runtime().block_on(async {
        for backend in backends(2).await {
            let name = backend.name();
            let kv = KvProvider::with_backend(backend);
            let set = |k: &str| KvOperation::Set { key: k.into(), value: b"v".to_vec() };
            assert!(kv.invoke(&inv("s", &set("a")), &ALL).await.success, "{name}");
            assert!(kv.invoke(&inv("s", &set("b")), &ALL).await.success, "{name}");
            assert!(kv.invoke(&inv("s", &set("a")), &ALL).await.success, "{name}: overwriting is not a new key");
            let full = kv.invoke(&inv("s", &set("c")), &ALL).await;
            assert_eq!(full.error_code(), Some(ErrorCode::ResourceExhausted), "{name}");
            assert!(kv.invoke(&inv("other", &set("c")), &ALL).await.success, "{name}: the limit is per store");
        }
    });
}

/// Stores are bounded in bytes (keys and values) per store and all together, on every backend: overwriting
/// counts the difference only, and a delete gives its bytes back.
#[test]
fn stores_are_bounded_in_bytes_per_store_and_together_on_every_backend() {
    runtime().block_on(async {
        let mut bounded: Vec<Arc<dyn KvBackend>> = vec![Arc::new(MemoryStore::with_limits(100, 100, 150))];
        if let Some(redis) = redis() {
            let namespace = format!("bytes{}", std::process::id());
            let store = RedisStore::connect(&redis.url, &namespace, 100, Duration::from_secs(5)).await.unwrap();
            bounded.push(Arc::new(store.with_byte_limits(100, 150)));
        }
        for kv in bounded {
            let name = kv.name();
            kv.set("a", "k1", &[0; 48]).await.unwrap(); // 50 bytes with its key
            kv.set("a", "k2", &[0; 48]).await.unwrap();
            let full = kv.set("a", "k3", &[0; 1]).await.unwrap_err();
            assert_eq!(full.error_code, ErrorCode::ResourceExhausted, "{name}");
            assert!(full.message.contains("100 bytes"), "{name}: {}", full.message);
            // Overwriting counts the difference only; shrinking a value makes room.
            kv.set("a", "k2", &[0; 10]).await.unwrap();
            kv.set("a", "k3", &[0; 30]).await.unwrap();
            // 50 + 12 + 32 = 94 in store a; 150 are allowed together.
            let all_full = kv.set("b", "k", &[0; 60]).await.unwrap_err();
            assert!(all_full.message.contains("150 bytes together"), "{name}: {}", all_full.message);
            assert!(kv.delete("a", "k1").await.unwrap(), "{name}");
            kv.set("b", "k", &[0; 60]).await.unwrap();
            assert!(!kv.delete("a", "k1").await.unwrap(), "{name}");
            assert!(!kv.delete("nope", "k1").await.unwrap(), "{name}");
        }
    });
}

/// A list answers at most 1,000 keys; a guest pages through a bigger store with `after`, each page picking up
/// after the last key of the one before, until a short page. Bad page arguments are INVALID_REQUEST.
#[test]
fn listings_are_paged_on_every_backend() {
    runtime().block_on(async {
        for backend in backends(10_000).await {
            let name = backend.name();
            let kv = KvProvider::with_backend(backend);
            for i in 0..2_500 {
                let set = KvOperation::Set { key: format!("k/{i:05}"), value: vec![1] };
                assert!(kv.invoke(&inv("paged", &set), &ALL).await.success, "{name}");
            }
            assert!(
                kv.invoke(&inv("paged", &KvOperation::Set { key: "other".into(), value: vec![1] }), &ALL).await.success
            );
            let mut seen = Vec::new();
            let mut pages = Vec::new();
            let mut after: Option<String> = None;
            loop {
                let op = KvOperation::List { prefix: "k/".into(), after: after.clone(), limit: None };
                let page: Vec<String> = kv.invoke(&inv("paged", &op), &ALL).await.result_as().unwrap();
                pages.push(page.len());
                after = page.last().cloned();
                let last_page = page.len() < factum_proto::MAX_LIST_KEYS as usize;
                seen.extend(page);
                if last_page {
                    break;
                }
            }
            assert_eq!(pages, [1_000, 1_000, 500], "{name}");
            let want: Vec<String> = (0..2_500).map(|i| format!("k/{i:05}")).collect();
            assert_eq!(seen, want, "{name}: every key once, in order");
            let small = KvOperation::List { prefix: String::new(), after: Some("k/02497".into()), limit: Some(2) };
            let page: Vec<String> = kv.invoke(&inv("paged", &small), &ALL).await.result_as().unwrap();
            assert_eq!(page, ["k/02498", "k/02499"], "{name}");
            for limit in [0, factum_proto::MAX_LIST_KEYS + 1] {
                let bad = KvOperation::List { prefix: String::new(), after: None, limit: Some(limit) };
                let (operation, params) = bad.encode();
                let invocation =
                    CapabilityInvocation { instance_id: "i".into(), capability_id: "paged".into(), operation, params };
                assert_eq!(
                    kv.invoke(&invocation, &ALL).await.error_code(),
                    Some(factum_proto::ErrorCode::InvalidRequest)
                );
            }
        }
    });
}

#[test]
fn an_unreachable_redis_is_provider_unavailable_not_a_hang() {
    runtime().block_on(async {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let err = RedisStore::connect(&format!("redis://127.0.0.1:{port}"), "x", 10, Duration::from_secs(1))
            .await
            .err()
            .unwrap();
        assert_eq!(err.error_code, ErrorCode::ProviderUnavailable, "{err}");
        let bad = RedisStore::connect("not a url", "x", 10, Duration::from_secs(1)).await.err().unwrap();
        assert_eq!(bad.error_code, ErrorCode::InvalidRequest, "{bad}");
    });
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(100))]

    /// Feature: wasm-orchestrator, Property 10: Capability Provider Invocation Execution
    /// Every backend behaves like the same sorted map: each operation returns what a model BTreeMap says.
    #[test]
    fn every_backend_matches_the_model(ops in prop::collection::vec(arb_op(), 1..30)) {
        runtime().block_on(async {
            for backend in backends(1000).await {
                let name = backend.name();
                let kv = KvProvider::with_backend(backend);
                let mut model: BTreeMap<String, Vec<u8>> = BTreeMap::new();
                for op in &ops {
                    let resp = kv.invoke(&inv("s", op), &ALL).await;
                    prop_assert!(resp.success, "{}: {:?}", name, resp.error);
                    match op.clone() {
                        KvOperation::Get { key } => prop_assert_eq!(
                            resp.result_as::<Option<ByteBuf>>().unwrap().map(|b| b.into_vec()),
                            model.get(&key).cloned()
                        ),
                        KvOperation::Set { key, value } => { model.insert(key, value); }
                        KvOperation::Delete { key } => {
                            prop_assert_eq!(resp.result_as::<bool>().unwrap(), model.remove(&key).is_some());
                        }
                        KvOperation::List { prefix, after, limit } => {
                            let want: Vec<String> = model
                                .keys()
                                .filter(|k| k.starts_with(&prefix) && after.as_ref().is_none_or(|a| *k > a))
                                .take(limit.unwrap_or(factum_proto::MAX_LIST_KEYS) as usize)
                                .cloned()
                                .collect();
                            prop_assert_eq!(resp.result_as::<Vec<String>>().unwrap(), want);
                        }
                    }
                }
            }
            Ok(())
        })?;
    }

    /// Feature: wasm-orchestrator, Property 19: Instance Isolation
    /// On every backend, what is written through one capability id is invisible through every other: two
    /// stores never share a key, a listing, or an entry.
    #[test]
    fn stores_are_isolated_on_every_backend(
        writes in prop::collection::vec(("[ab]", "[a-c:]{1,3}", prop::collection::vec(any::<u8>(), 1..3)), 1..20),
    ) {
        runtime().block_on(async {
            for backend in backends(1000).await {
                let kv = KvProvider::with_backend(backend);
                let mut model: BTreeMap<(String, String), Vec<u8>> = BTreeMap::new();
                for (store, key, value) in &writes {
                    let op = KvOperation::Set { key: key.clone(), value: value.clone() };
                    prop_assert!(kv.invoke(&inv(store, &op), &ALL).await.success);
                    model.insert((store.clone(), key.clone()), value.clone());
                }
                for store in ["a", "b"] {
                    let listed = kv.invoke(&inv(store, &KvOperation::list("")), &ALL).await;
                    let want: Vec<String> = model.keys().filter(|(s, _)| s == store).map(|(_, k)| k.clone()).collect();
                    prop_assert_eq!(listed.result_as::<Vec<String>>().unwrap(), want);
                    let seen = kv.inspect(store, "").await.unwrap();
                    let want: Vec<(String, Vec<u8>)> =
                        model.iter().filter(|((s, _), _)| s == store).map(|((_, k), v)| (k.clone(), v.clone())).collect();
                    prop_assert_eq!(seen, want);
                }
            }
            Ok(())
        })?;
    }

    /// Feature: wasm-orchestrator, Property 4: Runtime Permission Enforcement
    /// On every backend an operation succeeds exactly when its permission was granted, and a refused one
    /// changes nothing.
    #[test]
    fn every_backend_enforces_permissions(
        granted in prop::sample::subsequence(ALL.to_vec(), 0..=3),
        ops in prop::collection::vec(arb_op(), 1..15),
    ) {
        runtime().block_on(async {
            for backend in backends(1000).await {
                let kv = KvProvider::with_backend(backend);
                for op in &ops {
                    let before = kv.inspect("s", "").await.unwrap();
                    let resp = kv.invoke(&inv("s", op), &granted).await;
                    let allowed = granted.contains(&op.required_permission());
                    prop_assert_eq!(resp.success, allowed);
                    if !allowed {
                        prop_assert_eq!(resp.error_code(), Some(ErrorCode::PermissionDenied));
                        prop_assert_eq!(kv.inspect("s", "").await.unwrap(), before);
                    }
                }
            }
            Ok(())
        })?;
    }
}

/// A backend whose reads wait for a signal, to hold an invocation in flight.
struct Gated {
    inner: MemoryStore,
    open: tokio::sync::Notify,
}

#[async_trait::async_trait]
impl KvBackend for Gated {
    fn name(&self) -> &'static str {
        "kv-gated"
    }
    async fn get(&self, store: &str, key: &str) -> Result<Option<Vec<u8>>, factum_proto::ErrorResponse> {
        self.open.notified().await;
        self.inner.get(store, key).await
    }
    async fn set(&self, store: &str, key: &str, value: &[u8]) -> Result<(), factum_proto::ErrorResponse> {
        self.inner.set(store, key, value).await
    }
    async fn delete(&self, store: &str, key: &str) -> Result<bool, factum_proto::ErrorResponse> {
        self.inner.delete(store, key).await
    }
    async fn list(
        &self,
        store: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, factum_proto::ErrorResponse> {
        self.inner.list(store, prefix, after, limit).await
    }
    async fn entries(&self, store: &str, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, factum_proto::ErrorResponse> {
        self.inner.entries(store, prefix).await
    }
}

/// Feature: wasm-orchestrator, Property 20: Graceful Provider Shutdown Handling
/// Shutdown waits for the invocation in flight, which completes normally; invocations arriving meanwhile are
/// PROVIDER_UNAVAILABLE at once.
#[test]
fn shutdown_lets_in_flight_calls_finish_and_refuses_new_ones() {
    runtime().block_on(async {
        let backend = Arc::new(Gated { inner: MemoryStore::new(10), open: tokio::sync::Notify::new() });
        let kv = Arc::new(KvProvider::with_backend(backend.clone()));
        let set = KvOperation::Set { key: "k".into(), value: b"v".to_vec() };
        assert!(kv.invoke(&inv("s", &set), &ALL).await.success);
        let in_flight = tokio::spawn({
            let kv = kv.clone();
            async move { kv.invoke(&inv("s", &KvOperation::Get { key: "k".into() }), &ALL).await }
        });
        tokio::task::yield_now().await;
        let shutdown = tokio::spawn({
            let kv = kv.clone();
            async move { kv.shutdown().await }
        });
        tokio::task::yield_now().await;
        assert!(!shutdown.is_finished(), "shutdown must wait for the call in flight");
        let refused = kv.invoke(&inv("s", &set), &ALL).await;
        assert_eq!(refused.error_code(), Some(ErrorCode::ProviderUnavailable));
        backend.open.notify_waiters();
        let answered = in_flight.await.unwrap();
        assert_eq!(answered.result_as::<Option<ByteBuf>>().unwrap().unwrap().as_ref(), b"v");
        shutdown.await.unwrap().unwrap();
        kv.initialize().await.unwrap();
        assert!(kv.invoke(&inv("s", &set), &ALL).await.success, "initialize starts it again");
    });
}
