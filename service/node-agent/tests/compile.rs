//! Compiling modules off the runtime (issue 13, item 3): a long compile leaves the agent's tasks running, runs
//! once per module however many starts want it, at most `concurrency` at a time, and within its budget.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // tests may panic

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use factum_env::Env;
use factum_node_agent::{Agent, AgentConfig, CompileLimits};
use factum_proto::{ErrorCode, InstanceStatus};
use factum_providers::MemoryKv;
use factum_wasm::fixtures::{self, module};
use factum_wasm::{CompiledModule, EngineError, GuestHost, Instance, Limits, WasmEngine, WasmtimeEngine};
use futures::future::BoxFuture;

mod common;
use common::{request, request_bytes, NEVER};

/// Wasmtime, counting compiles and the most that ran at once.
#[derive(Default)]
struct Counting {
    engine: Option<WasmtimeEngine>,
    compiles: AtomicUsize,
    running: AtomicUsize,
    most_at_once: AtomicUsize,
}

impl WasmEngine for Counting {
    fn name(&self) -> &'static str {
        "counting-wasmtime"
    }

    fn compile(&self, bytes: &[u8]) -> Result<Arc<dyn CompiledModule>, EngineError> {
        self.compiles.fetch_add(1, Ordering::SeqCst);
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_at_once.fetch_max(now, Ordering::SeqCst);
        let compiled = self.engine.as_ref().unwrap().compile(bytes);
        self.running.fetch_sub(1, Ordering::SeqCst);
        compiled
    }

    fn instantiate<'a>(
        &'a self,
        module: &'a Arc<dyn CompiledModule>,
        host: Arc<dyn GuestHost>,
        limits: Limits,
    ) -> BoxFuture<'a, Result<Box<dyn Instance>, EngineError>> {
        self.engine.as_ref().unwrap().instantiate(module, host, limits)
    }
}

fn counting() -> Arc<Counting> {
    Arc::new(Counting { engine: Some(WasmtimeEngine::new().unwrap()), ..Counting::default() })
}

fn agent(engine: Arc<dyn WasmEngine>, compile_limits: CompileLimits) -> Agent {
    let mut config = AgentConfig::new("node-1", "127.0.0.1:0");
    config.compile_limits = compile_limits;
    Agent::new(Env::tokio(), config, engine, Arc::new(MemoryKv::new())).0
}

/// A module Cranelift needs a while for: `functions` functions of arithmetic, and a `_start` that returns.
/// `salt` makes modules of the same size differ.
fn big_module(functions: usize, salt: u32) -> Vec<u8> {
    let body = "local.get 0 i32.const 7 i32.mul i32.const 3 i32.xor local.set 0 ".repeat(40);
    let mut wat = format!("(module (func (export \"_start\")) (global i32 (i32.const {salt}))");
    for _ in 0..functions {
        wat.push_str(&format!("(func (param i32) (result i32) {body} local.get 0)"));
    }
    wat.push(')');
    module(&wat)
}

/// On a single-threaded runtime, a start compiling a big module lets other tasks run: it is still compiling
/// after the runtime went round ten times. Compiled inline (as before), the start would have finished before
/// the first `yield_now` returned, the thread being busy compiling.
#[tokio::test(flavor = "current_thread")]
async fn a_long_compile_leaves_the_runtime_free() {
    let agent = agent(counting(), CompileLimits::default());
    let starting = {
        let agent = agent.clone();
        tokio::spawn(async move { agent.start_instance(request_bytes("big", big_module(3_000, 1), NEVER, &[])).await })
    };
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert!(!starting.is_finished(), "the start ran to its end while this task could not run");
    // The agent answers meanwhile: a snapshot (the heartbeat's content) does not wait for the compile.
    assert!(agent.node_report().instances.is_empty());
    starting.await.unwrap().unwrap();
}

/// Two starts of one module compile it once; different modules compile at most `concurrency` at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_compiles_once_and_compiles_queue_for_their_slots() {
    let engine = counting();
    let agent = agent(engine.clone(), CompileLimits { concurrency: 1, ..CompileLimits::default() });
    let module = big_module(1_000, 1);
    let starts = (0..2).map(|i| {
        let (agent, module) = (agent.clone(), module.clone());
        tokio::spawn(async move { agent.start_instance(request_bytes(&format!("same-{i}"), module, NEVER, &[])).await })
    });
    for start in starts.collect::<Vec<_>>() {
        start.await.unwrap().unwrap();
    }
    assert_eq!(engine.compiles.load(Ordering::SeqCst), 1, "one module, one compile");

    let starts = (0..3).map(|i| {
        let agent = agent.clone();
        let module = big_module(1_000, 10 + i);
        tokio::spawn(
            async move { agent.start_instance(request_bytes(&format!("other-{i}"), module, NEVER, &[])).await },
        )
    });
    for start in starts.collect::<Vec<_>>() {
        start.await.unwrap().unwrap();
    }
    assert_eq!(engine.compiles.load(Ordering::SeqCst), 4);
    assert_eq!(engine.most_at_once.load(Ordering::SeqCst), 1, "a compile ran outside its slot");
}

/// A compile past the node's budget is RESOURCE_EXHAUSTED naming the budget; the node goes on running its
/// instances and starting others (the refused compile's thread holds one of the two slots until it ends).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compile_past_its_budget_is_refused_and_the_node_carries_on() {
    // Small modules compile in milliseconds; the big one takes about a second here (debug build).
    let agent = agent(counting(), CompileLimits { concurrency: 2, budget: Duration::from_millis(100) });
    agent.start_instance(request("neighbour", fixtures::SLEEPER, NEVER, &[])).await.unwrap();
    let err = agent.start_instance(request_bytes("big", big_module(3_000, 1), NEVER, &[])).await.unwrap_err();
    assert_eq!(err.error_code, ErrorCode::ResourceExhausted, "{err:?}");
    assert!(err.message.contains("compile budget of 100ms"), "{}", err.message);
    assert!(agent.metadata("big").is_none(), "a refused start leaves no instance");
    // Another module (so it is compiled, not found in the cache) starts in the free slot.
    agent.start_instance(request("after", fixtures::EXIT_CLEAN, NEVER, &[])).await.unwrap();
    assert_eq!(agent.metadata("neighbour").unwrap().status, InstanceStatus::Running);
}
