//! What factum's guest limits cost, against the same engine with none, in one run (these machines are noisy,
//! so only ratios within a run mean anything). Two costs:
//! - **CPU slicing**: fuel metering with a yield every `fuel_yield_interval` units, paid on every instruction.
//!   A spin loop runs on the bare engine (no fuel), the bare engine with factum's fuel settings, and factum's
//!   engine (fuel, memory/table budget, ABI linker).
//! - **Instantiation**: a fresh store per start, with the resource limiter and the start-section fuel budget,
//!   against a bare store.
//!
//! Run with `cargo bench --bench limits`; `FACTUM_BENCH_SPIN` sets the loop count, `FACTUM_BENCH_STARTS` the
//! instantiations.

use std::sync::Arc;
use std::time::{Duration, Instant};

use factum_wasm::fixtures::IdleHost;
use factum_wasm::{GuestHost, Limits, WasmEngine, WasmiEngine, WasmtimeEngine};

fn count(var: &str, default: u64) -> u64 {
    std::env::var(var).ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

/// `_start` counts down from `n`: four instructions per turn, no calls, no memory traffic.
fn spinner(n: u64) -> Vec<u8> {
    let wat = format!(
        r#"(module
  (memory (export "memory") 1)
  (func (export "_start") (local $left i64)
    (local.set $left (i64.const {n}))
    (loop $again
      (local.set $left (i64.sub (local.get $left) (i64.const 1)))
      (br_if $again (i64.ne (local.get $left) (i64.const 0))))))"#
    );
    wat::parse_str(&wat).expect("wat")
}

/// Nanoseconds per one of `n`, as a float: a metered loop turn is well under a nanosecond.
fn per(total: Duration, n: u64) -> f64 {
    total.as_secs_f64() * 1e9 / n as f64
}

fn line(name: &str, what: &str, ns: f64, baseline: f64) {
    println!("{name:<52} {ns:>10.3} ns/{what}  {:>5.2}× the bare engine", ns / baseline);
}

fn wasmtime_bare(fuel: bool) -> wasmtime::Engine {
    let mut config = wasmtime::Config::new();
    config.consume_fuel(fuel);
    wasmtime::Engine::new(&config).expect("wasmtime")
}

/// One run of `_start` on a bare wasmtime store; with `fuel`, metered and yielding as factum's engine is.
async fn wasmtime_spin(engine: &wasmtime::Engine, module: &wasmtime::Module, fuel: bool) -> Duration {
    let mut store = wasmtime::Store::new(engine, ());
    if fuel {
        store.set_fuel(u64::MAX).expect("fuel");
        store.fuel_async_yield_interval(Some(Limits::default().fuel_yield_interval)).expect("yield");
    }
    let instance = wasmtime::Instance::new_async(&mut store, module, &[]).await.expect("instantiate");
    let start = instance.get_typed_func::<(), ()>(&mut store, "_start").expect("_start");
    let began = Instant::now();
    start.call_async(&mut store, ()).await.expect("run");
    began.elapsed()
}

/// The alternative to fuel: a yield when a ticker thread bumps the engine's epoch, every 10 ms of real time
/// (cheaper per instruction, but the slices follow the OS clock, so simulated runs could not replay it).
async fn wasmtime_epoch_spin(bytes: &[u8]) -> Duration {
    let mut config = wasmtime::Config::new();
    config.epoch_interruption(true);
    let engine = wasmtime::Engine::new(&config).expect("wasmtime");
    let module = wasmtime::Module::new(&engine, bytes).expect("module");
    let mut store = wasmtime::Store::new(&engine, ());
    store.epoch_deadline_async_yield_and_update(1);
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ticker = {
        let (engine, done) = (engine.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(10));
                engine.increment_epoch();
            }
        })
    };
    let instance = wasmtime::Instance::new_async(&mut store, &module, &[]).await.expect("instantiate");
    let start = instance.get_typed_func::<(), ()>(&mut store, "_start").expect("_start");
    let began = Instant::now();
    start.call_async(&mut store, ()).await.expect("run");
    let took = began.elapsed();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    ticker.join().expect("ticker");
    took
}

fn wasmi_spin(bytes: &[u8]) -> Duration {
    let engine = wasmi::Engine::default();
    let module = wasmi::Module::new(&engine, bytes).expect("module");
    let mut store = wasmi::Store::new(&engine, ());
    let instance = wasmi::Linker::<()>::new(&engine).instantiate_and_start(&mut store, &module).expect("instantiate");
    let start = instance.get_typed_func::<(), ()>(&store, "_start").expect("_start");
    let began = Instant::now();
    start.call(&mut store, ()).expect("run");
    began.elapsed()
}

/// One run of `_start` through factum's engine with its default limits.
async fn factum_spin(engine: &dyn WasmEngine, bytes: &[u8]) -> Duration {
    let module = engine.compile(bytes).expect("compile");
    let instance = engine.instantiate(&module, Arc::new(IdleHost), Limits::default()).await.expect("instantiate");
    let began = Instant::now();
    let exit = instance.run().await;
    assert!(!exit.is_crash(), "{}", exit.describe());
    began.elapsed()
}

async fn cpu(n: u64) {
    let bytes = spinner(n);
    let per = |d: Duration| per(d, n);
    let unmetered = wasmtime_bare(false);
    let module = wasmtime::Module::new(&unmetered, &bytes).expect("module");
    let bare = per(wasmtime_spin(&unmetered, &module, false).await);
    line("wasmtime spin, bare engine (no fuel)", "turn", bare, bare);
    let metered = wasmtime_bare(true);
    let module = wasmtime::Module::new(&metered, &bytes).expect("module");
    line(
        "wasmtime spin, bare engine with factum's fuel slicing",
        "turn",
        per(wasmtime_spin(&metered, &module, true).await),
        bare,
    );
    line("wasmtime spin, bare engine with epoch slicing (10 ms)", "turn", per(wasmtime_epoch_spin(&bytes).await), bare);
    let engine = WasmtimeEngine::new().expect("wasmtime");
    line("wasmtime spin, factum engine (default limits)", "turn", per(factum_spin(&engine, &bytes).await), bare);

    let bare = per(wasmi_spin(&bytes));
    line("wasmi spin, bare engine (no fuel)", "turn", bare, bare);
    line(
        "wasmi spin, factum engine (default limits)",
        "turn",
        per(factum_spin(&WasmiEngine::new(), &bytes).await),
        bare,
    );
}

async fn instantiation(n: u64) {
    let bytes = spinner(1);
    let engine = wasmtime_bare(false);
    let module = wasmtime::Module::new(&engine, &bytes).expect("module");
    let pre = wasmtime::Linker::<()>::new(&engine).instantiate_pre(&module).expect("pre");
    let began = Instant::now();
    for _ in 0..n {
        let mut store = wasmtime::Store::new(&engine, ());
        std::hint::black_box(pre.instantiate_async(&mut store).await.expect("instantiate"));
    }
    let bare = per(began.elapsed(), n);
    line("wasmtime instantiate, bare store", "start", bare, bare);
    let factum = WasmtimeEngine::new().expect("wasmtime");
    line(
        "wasmtime instantiate, factum engine (limiter, fuel)",
        "start",
        factum_instantiate(&factum, &bytes, n).await,
        bare,
    );

    let engine = wasmi::Engine::default();
    let module = wasmi::Module::new(&engine, &bytes).expect("module");
    let linker = wasmi::Linker::<()>::new(&engine);
    let began = Instant::now();
    for _ in 0..n {
        let mut store = wasmi::Store::new(&engine, ());
        std::hint::black_box(linker.instantiate_and_start(&mut store, &module).expect("instantiate"));
    }
    let bare = per(began.elapsed(), n);
    line("wasmi instantiate, bare store", "start", bare, bare);
    line(
        "wasmi instantiate, factum engine (limiter, fuel)",
        "start",
        factum_instantiate(&WasmiEngine::new(), &bytes, n).await,
        bare,
    );
}

async fn factum_instantiate(engine: &dyn WasmEngine, bytes: &[u8], n: u64) -> f64 {
    let module = engine.compile(bytes).expect("compile");
    let host: Arc<dyn GuestHost> = Arc::new(IdleHost);
    let began = Instant::now();
    for _ in 0..n {
        std::hint::black_box(engine.instantiate(&module, host.clone(), Limits::default()).await.expect("instantiate"));
    }
    per(began.elapsed(), n)
}

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        cpu(count("FACTUM_BENCH_SPIN", 200_000_000)).await;
        instantiation(count("FACTUM_BENCH_STARTS", 20_000)).await;
    });
}
