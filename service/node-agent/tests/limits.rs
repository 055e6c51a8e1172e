//! Hostile guests on one agent, on both engines: each limit refuses or stops the guest that hits it, with the
//! design's error code or a crash reason naming the limit, while a neighbour instance keeps making progress.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // tests may panic

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use factum_env::Env;
use factum_node_agent::{Agent, AgentConfig};
use factum_proto::{
    CapabilityAssignment, ErrorCode, ErrorResponse, InstanceStatus, PolicyType, RestartPolicy, StartInstanceRequest,
};
use factum_providers::{KvBackend, KvProvider, MemoryStore};
use factum_wasm::fixtures::{self, module};
use factum_wasm::{Limits, WasmEngine, WasmiEngine, WasmtimeEngine};

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
    async fn list(&self, store: &str, prefix: &str) -> Result<Vec<String>, ErrorResponse> {
        self.inner.list(store, prefix).await
    }
    async fn entries(&self, store: &str, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, ErrorResponse> {
        self.inner.entries(store, prefix).await
    }
}

fn request(id: &str, wat: &str, caps: &[(&str, &[&str])]) -> StartInstanceRequest {
    StartInstanceRequest {
        instance_id: id.into(),
        module_bytes: module(wat),
        capabilities: caps
            .iter()
            .map(|(cap, perms)| {
                let perms: Vec<String> = perms.iter().map(|p| p.to_string()).collect();
                CapabilityAssignment::new(id, cap, &perms).unwrap()
            })
            .collect(),
        restart_policy: RestartPolicy { policy_type: PolicyType::Never, max_retries: None, backoff_seconds: None },
        epoch: 1,
        node_lease: None,
        restarts: 0,
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

// Real time: the spinning guest keeps the runtime busy, so paused time would never advance.
#[tokio::test]
async fn hostile_guests_are_stopped_or_refused_while_a_neighbour_keeps_running() {
    let engines: [Arc<dyn WasmEngine>; 2] = [Arc::new(WasmiEngine::new()), Arc::new(WasmtimeEngine::new().unwrap())];
    for engine in engines {
        let name = engine.name();
        let store = Arc::new(CountingStore { inner: MemoryStore::new(100), sets: AtomicU64::new(0) });
        let kv = Arc::new(KvProvider::with_backend(store.clone()));
        let mut config = AgentConfig::new("node-1", "127.0.0.1:0");
        config.limits = Limits { max_memory_bytes: 1000 * 65536, start_fuel: 1_000_000, ..Limits::default() };
        let limits = config.limits;
        let (agent, _reports) = Agent::new(Env::tokio(), config, engine, kv);
        let greeter = request("neighbour", fixtures::KV_GREETER, &[("kv", &["kv:write"])]);
        agent.start_instance(greeter).await.unwrap();

        for (id, wat, says) in refused_at_start(&limits) {
            let err = agent.start_instance(request(id, &wat, &[])).await.unwrap_err();
            assert_eq!(err.error_code, ErrorCode::ResourceExhausted, "{name} {id}: {err:?}");
            assert!(err.message.contains(says), "{name} {id}: {}", err.message);
            assert!(agent.metadata(id).is_none(), "{name} {id}: a refused start left a record");
        }

        agent.start_instance(request("hog", fixtures::MEMORY_HOG, &[])).await.unwrap();
        agent.start_instance(request("spin", fixtures::LOOP_FOREVER, &[])).await.unwrap();
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
        agent.stop_instance("spin").unwrap();
        agent.stop_instance("neighbour").unwrap();
    }
}
