//! Density: idle instances on one node. Starts `FACTUM_BENCH_DENSITY` (default 100,000) instances of an idle
//! guest (the sleeper, waiting an hour at a time in `poll_oneoff`) on one in-process agent, per engine, and
//! reports what each holds: resident memory per instance (the process's RSS growth over the instance count), the
//! memory maps each adds, and the p50 start latency of the last 1,000 starts against the first 1,000's (the
//! empty node's, same run).
//!
//! Engines (`FACTUM_BENCH_ENGINES`, comma-separated; default all four): `wasmtime` (on demand, 4 GiB of guarded
//! address space per memory: the address space runs out near 32,000 instances, and the refused start says so),
//! `wasmtime-compact` (on demand, reserving only the memory budget: `factum agent --compact-memory`),
//! `wasmtime-pooled` (a pool of as many slots, budget-sized: `--pooled --compact-memory`) and `wasmi`. wasmtime
//! maps 3 to 6 regions per instance, so past ~10,000 instances it needs `vm.max_map_count` above Linux's default
//! 65,530; the bench stops an engine short of the limit, and says so, rather than fail a start.
//!
//! Run with `cargo bench --bench density`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use factum_env::Env;
use factum_node_agent::{Agent, AgentConfig};
use factum_proto::{RestartPolicy, StartInstanceRequest};
use factum_providers::MemoryKv;
use factum_wasm::fixtures::{self, module};
use factum_wasm::{Limits, Reservation, WasmEngine, WasmiEngine, WasmtimeEngine};

/// Starts timed at each end of the fill, for the empty-node and full-node p50s.
const WINDOW: usize = 1000;

fn count() -> usize {
    std::env::var("FACTUM_BENCH_DENSITY").ok().and_then(|s| s.parse().ok()).unwrap_or(100_000)
}

/// The sleeper, waiting an hour per `poll_oneoff` instead of a second: idle for the whole bench.
fn idle_guest() -> Vec<u8> {
    let second = r#"\00\ca\9a\3b\00\00\00\00"#;
    let hour = r#"\00\a0\b8\30\46\03\00\00"#;
    assert!(fixtures::SLEEPER.contains(second), "the sleeper's timeout moved");
    module(&fixtures::SLEEPER.replace(second, hour))
}

/// Resident bytes of this process (`/proc/self/statm`).
fn resident() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
    pages * 4096
}

fn max_map_count() -> u64 {
    std::fs::read_to_string("/proc/sys/vm/max_map_count").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0)
}

fn maps() -> usize {
    std::fs::read_to_string("/proc/self/maps").map(|m| m.lines().count()).unwrap_or(0)
}

fn p50(samples: &mut [Duration]) -> Duration {
    samples.sort();
    samples.get(samples.len() / 2).copied().unwrap_or_default()
}

async fn fill(name: &str, engine: Arc<dyn WasmEngine>, n: usize) {
    let mut config = AgentConfig::new("node-1", "127.0.0.1:0");
    config.max_instances = u32::try_from(n).unwrap_or(u32::MAX);
    let (agent, mut reports) = Agent::new(Env::tokio(), config, engine, Arc::new(MemoryKv::new()));
    let bytes = idle_guest();
    let (maps_before, rss_before) = (maps(), resident());
    let (mut empty, mut full) = (Vec::with_capacity(WINDOW), std::collections::VecDeque::with_capacity(WINDOW));
    let began = Instant::now();
    let mut started = 0;
    for i in 0..n {
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
        if let Err(e) = agent.start_instance(req).await {
            println!("{name}: start {i} refused: {e:?}");
            break;
        }
        let took = t.elapsed();
        if i < WINDOW {
            empty.push(took);
        }
        if full.len() == WINDOW {
            full.pop_front();
        }
        full.push_back(took);
        reports.drain();
        started += 1;
        // Each instance maps a few regions; stop short of the kernel's limit rather than fail a start.
        if i % 1000 == 999 && maps() + 10_000 > max_map_count() as usize {
            println!(
                "{name}: stopped at {started} instances: {} memory maps, vm.max_map_count is {} (raise it, e.g. \
                 `sysctl -w vm.max_map_count=1048576`)",
                maps(),
                max_map_count()
            );
            break;
        }
    }
    let secs = began.elapsed().as_secs_f64();
    // Let every instance reach its first `poll_oneoff`, so its stack and memory are what an idle one holds.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let per_instance = resident().saturating_sub(rss_before) / started.max(1) as u64;
    let maps_each = maps().saturating_sub(maps_before) as f64 / started.max(1) as f64;
    let (empty, full) = (p50(&mut empty), p50(full.make_contiguous()));
    println!(
        "{name:<18} {started:>7} idle instances in {secs:>5.1} s  {:>6.1} KiB resident each  {maps_each:>4.1} maps each  \
         start p50 {:>6.1} µs empty, {:>6.1} µs full ({:.2}×)",
        per_instance as f64 / 1024.0,
        empty.as_secs_f64() * 1e6,
        full.as_secs_f64() * 1e6,
        full.as_secs_f64() / empty.as_secs_f64().max(1e-9),
    );
    agent.stop_all();
    drop(agent);
    tokio::time::sleep(Duration::from_millis(500)).await;
}

fn main() {
    let n = count();
    let chosen = std::env::var("FACTUM_BENCH_ENGINES")
        .unwrap_or_else(|_| "wasmtime,wasmtime-compact,wasmtime-pooled,wasmi".into());
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let slots = u32::try_from(n).unwrap_or(u32::MAX);
    println!("{n} idle instances per engine; vm.max_map_count {}", max_map_count());
    for name in chosen.split(',') {
        let engine: Arc<dyn WasmEngine> = match name {
            "wasmtime" => Arc::new(WasmtimeEngine::new().expect("wasmtime")),
            "wasmtime-compact" => {
                Arc::new(WasmtimeEngine::on_demand(Reservation::Budget, &Limits::default()).expect("wasmtime"))
            }
            "wasmtime-pooled" => match WasmtimeEngine::pooled(slots, &Limits::default(), Reservation::Budget) {
                Ok(engine) => Arc::new(engine),
                Err(e) => {
                    println!("{name}: no pool of {n} slots: {e}");
                    continue;
                }
            },
            "wasmi" => Arc::new(WasmiEngine::new()),
            other => {
                println!("unknown engine {other}: wasmtime, wasmtime-compact, wasmtime-pooled or wasmi");
                continue;
            }
        };
        // On a worker, as a served start runs.
        let name = name.to_string();
        rt.block_on(rt.spawn(async move { fill(&name, engine, n).await })).expect("bench task");
    }
}
