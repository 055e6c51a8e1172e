//! Hostile guests on one agent, on both engines: each limit refuses or stops the guest that hits it, with the
//! design's error code or a crash reason naming the limit, while a neighbour instance keeps making progress.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // tests may panic

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use factum_env::Env;
use factum_node_agent::{Agent, AgentConfig};
use factum_proto::{ErrorCode, ErrorResponse, InstanceStatus, StartInstanceRequest};
use factum_providers::{KvBackend, KvProvider, MemoryStore};
use factum_registry::{MemoryRegistry, Registry};
use factum_wasm::fixtures;
use factum_wasm::{Limits, NodeMemory, WasmEngine, WasmiEngine, WasmtimeEngine};

mod common;

fn request(id: &str, wat: &str, caps: &[(&str, &[&str])]) -> StartInstanceRequest {
    common::request(id, wat, common::NEVER, caps)
}

/// An in-memory KV store that counts writes, to see a neighbour make progress.
struct CountingStore {
    inner: MemoryStore,
    sets: AtomicU64,
}

#[async_trait]
impl KvBackend for CountingStore {
    fn name(&self) -> &'static str {
        "kv-counting"
    }
    async fn get(&self, store: &str, key: &str) -> Result<Option<Vec<u8>>, ErrorResponse> {
        self.inner.get(store, key).await
    }
    async fn set(&self, store: &str, key: &str, value: &[u8]) -> Result<(), ErrorResponse> {
        self.sets.fetch_add(1, Ordering::SeqCst);
        self.inner.set(store, key, value).await
    }
    async fn delete(&self, store: &str, key: &str) -> Result<bool, ErrorResponse> {
        self.inner.delete(store, key).await
    }
    async fn list(
        &self,
        store: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, ErrorResponse> {
        self.inner.list(store, prefix, after, limit).await
    }
    async fn entries(&self, store: &str, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, ErrorResponse> {
        self.inner.entries(store, prefix).await
    }
}

fn repeat(decl: &str, n: usize) -> String {
    format!(r#"(module {} (func (export "_start")))"#, decl.repeat(n))
}

/// Modules refused at start, each with the words its refusal must contain.
fn refused_at_start(limits: &Limits) -> Vec<(&'static str, String, &'static str)> {
    vec![
        ("many-tables", repeat("(table 0 funcref)", limits.max_tables + 1), "more tables"),
        ("many-memories", repeat("(memory 0)", limits.max_memories + 1), "more memories"),
        ("huge-table", repeat(&format!("(table {} funcref)", limits.max_table_elements + 1), 1), "table budget"),
        ("memories-add-up", repeat("(memory 600)", 2), "memory budget"),
        (
            "spins-in-start",
            r#"(module (func $spin (loop $l (br $l))) (start $spin) (func (export "_start")))"#.into(),
            "start section",
        ),
    ]
}

// Real time: the spinning guest keeps the runtime busy, so paused time would never advance. The node holds a
// registry lease of 1 s throughout: hostile guests must not starve its renewals into fencing it.
#[tokio::test]
async fn hostile_guests_are_stopped_or_refused_while_a_neighbour_keeps_running_and_the_node_its_lease() {
    let engines: [Arc<dyn WasmEngine>; 2] = [Arc::new(WasmiEngine::new()), Arc::new(WasmtimeEngine::new().unwrap())];
    for engine in engines {
        let name = engine.name();
        let store = Arc::new(CountingStore { inner: MemoryStore::new(100), sets: AtomicU64::new(0) });
        let kv = Arc::new(KvProvider::with_backend(store.clone()));
        let mut config = AgentConfig::new("node-1", "127.0.0.1:0");
        config.limits = Limits { max_memory_bytes: 1000 * 65536, start_fuel: 1_000_000, ..Limits::default() };
        let limits = config.limits;
        config.lease_ttl = Duration::from_secs(1);
        let (agent, _reports) = Agent::new(Env::tokio(), config, engine, kv);
        let registry = Arc::new(MemoryRegistry::new(Env::tokio(), "/factum"));
        tokio::spawn(factum_node_agent::run_registry_link(agent.clone(), registry.clone()));
        let lease = async {
            loop {
                if let Some(node) = registry.membership().await.unwrap().nodes.first() {
                    return node.lease;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        let lease = tokio::time::timeout(Duration::from_secs(5), lease).await.expect("the node never registered");
        let greeter = request("neighbour", fixtures::KV_GREETER, &[("kv", &["kv:write"])]);
        agent.start_instance(StartInstanceRequest { node_lease: Some(lease), ..greeter }).await.unwrap();

        // Placed as the control plane places on a registered node: under its lease.
        let placed = |id: &str, wat: &str| StartInstanceRequest { node_lease: Some(lease), ..request(id, wat, &[]) };
        for (id, wat, says) in refused_at_start(&limits) {
            let err = agent.start_instance(placed(id, &wat)).await.unwrap_err();
            assert_eq!(err.error_code, ErrorCode::ResourceExhausted, "{name} {id}: {err:?}");
            assert!(err.message.contains(says), "{name} {id}: {}", err.message);
            assert!(agent.metadata(id).is_none(), "{name} {id}: a refused start left a record");
        }

        agent.start_instance(placed("hog", fixtures::MEMORY_HOG)).await.unwrap();
        agent.start_instance(placed("spin", fixtures::LOOP_FOREVER)).await.unwrap();
        let before = store.sets.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(2_500)).await;

        let hog = agent.metadata("hog").unwrap();
        assert_eq!(hog.status, InstanceStatus::Crashed, "{name}");
        let why = hog.last_error.unwrap_or_default();
        assert!(why.contains("memory budget of 65536000 bytes"), "{name}: {why}");
        // The spinner is time-sliced, not stopped: it runs, and so does its neighbour.
        assert_eq!(agent.status("spin").unwrap(), InstanceStatus::Running, "{name}");
        assert_eq!(agent.status("neighbour").unwrap(), InstanceStatus::Running, "{name}");
        let writes = store.sets.load(Ordering::SeqCst) - before;
        assert!(writes >= 2, "{name}: the neighbour wrote {writes} times in 2.5 s beside a spinning guest");
        // Still registered under the same lease, and not fenced: a start placed under it is taken.
        let nodes = registry.membership().await.unwrap().nodes;
        assert_eq!(nodes.iter().map(|n| n.lease).collect::<Vec<_>>(), [lease], "{name}: the lease lapsed");
        agent.start_instance(placed("after", fixtures::SLEEPER)).await.unwrap();
        agent.stop_instance("after").unwrap();
        agent.stop_instance("spin").unwrap();
        agent.stop_instance("neighbour").unwrap();
    }
}

/// The node's memory bounds its instances together: a start whose memory fits its own budget but not beside
/// the running instances is RESOURCE_EXHAUSTED and leaves no record; once one of them stops, its memory is
/// free for the next start.
#[tokio::test]
async fn a_start_that_does_not_fit_the_nodes_memory_is_refused_until_memory_is_freed() {
    let node = || Arc::new(NodeMemory::new(10 * 65536));
    let engines: [Arc<dyn WasmEngine>; 2] = [
        Arc::new(WasmiEngine::new().with_node_memory(node())),
        Arc::new(WasmtimeEngine::new().unwrap().with_node_memory(node())),
    ];
    // Six pages, well within the default instance budget; two do not fit in ten.
    let six_pages = r#"(module (memory 6) (func (export "_start") (loop $l (br $l))))"#;
    for engine in engines {
        let name = engine.name();
        let config = AgentConfig::new("node-1", "127.0.0.1:0");
        let (agent, _reports) = Agent::new(Env::tokio(), config, engine, Arc::new(factum_providers::MemoryKv::new()));
        agent.start_instance(request("first", six_pages, &[])).await.unwrap();
        let err = agent.start_instance(request("second", six_pages, &[])).await.unwrap_err();
        assert_eq!(err.error_code, ErrorCode::ResourceExhausted, "{name}: {err:?}");
        assert!(err.message.contains("the node's memory budget of 655360 bytes"), "{name}: {}", err.message);
        assert!(agent.metadata("second").is_none(), "{name}: a refused start left a record");
        assert_eq!(agent.status("first").unwrap(), InstanceStatus::Running, "{name}");
        agent.stop_instance("first").unwrap();
        // The stopped run gives its memory back when its task ends, at its next yield point.
        let started = async {
            loop {
                match agent.start_instance(request("second", six_pages, &[])).await {
                    Ok(_) => return,
                    Err(e) if e.error_code == ErrorCode::ResourceExhausted => {
                        tokio::time::sleep(Duration::from_millis(10)).await
                    }
                    Err(e) => panic!("{name}: {e:?}"),
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(5), started).await.expect("the stopped run's memory was never freed");
        agent.stop_instance("second").unwrap();
    }
}
