//! What factum's guest limits cost, against the same engine with none, in one run (these machines are noisy,
//! so only ratios within a run mean anything). Two costs:
//! - **CPU slicing**: fuel metering with a yield every `fuel_yield_interval` units, paid on every instruction,
//!   or epoch interruption, paid at every loop header and function entry. Two guests: a spin loop (four
//!   instructions a turn: the worst case for either) and a hash loop (xxHash64's stripe round over a 64 KiB
//!   buffer: a realistic compute kernel). Each runs on the bare engine (no fuel), the bare engine with factum's
//!   fuel settings, with epoch slicing, and factum's engine (fuel, memory/table budget, ABI linker), also with
//!   [`Reservation::Budget`] (`--compact-memory`: explicit bounds checks on every load and store).
//!   Each setting runs [`ROUNDS`] times, taking turns with the others, and reports its fastest run. The spin
//!   loop's rows move with code layout (epoch slicing has measured faster than the bare engine there), so
//!   read the hash rows for what a guest pays.
//! - **Instantiation**: a fresh store per start, with the resource limiter and the start-section fuel budget,
//!   against a bare store.
//!
//! Run with `cargo bench --bench limits`; `FACTUM_BENCH_SPIN` sets the loop count, `FACTUM_BENCH_HASH` the
//! hash loop's passes over its buffer, `FACTUM_BENCH_STARTS` the instantiations.

use std::sync::Arc;
use std::time::{Duration, Instant};

use factum_wasm::fixtures::IdleHost;
use factum_wasm::{GuestHost, Limits, Reservation, WasmEngine, WasmiEngine, WasmtimeEngine};

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

/// Bytes the hash guest hashes per pass: one page.
const HASH_BUFFER: u64 = 65536;

/// `_start` fills one page, then hashes it `passes` times with xxHash64's stripe round (four lanes of
/// `acc = rotl(acc + load * P2, 31) * P1` per 32 bytes) and stores the digest, so no pass is dead code.
fn hasher(passes: u64) -> Vec<u8> {
    const P1: i64 = 0x9E37_79B1_85EB_CA87_u64 as i64;
    const P2: i64 = 0xC2B2_AE3D_27D4_EB4F_u64 as i64;
    let lane = |acc: &str, offset: u32| {
        format!(
            "(local.set {acc} (i64.mul (i64.rotl (i64.add (local.get {acc}) (i64.mul (i64.load offset={offset} \
             (local.get $p)) (i64.const {P2}))) (i64.const 31)) (i64.const {P1})))"
        )
    };
    let lanes = [lane("$a", 0), lane("$b", 8), lane("$c", 16), lane("$d", 24)].join("\n        ");
    let wat = format!(
        r#"(module
  (memory (export "memory") 1)
  (func (export "_start") (local $left i64) (local $p i32) (local $a i64) (local $b i64) (local $c i64) (local $d i64)
    (loop $fill
      (i64.store (local.get $p) (i64.mul (i64.extend_i32_u (local.get $p)) (i64.const {P1})))
      (local.set $p (i32.add (local.get $p) (i32.const 8)))
      (br_if $fill (i32.lt_u (local.get $p) (i32.const {HASH_BUFFER}))))
    (local.set $left (i64.const {passes}))
    (loop $pass
      (local.set $p (i32.const 0))
      (loop $stripe
        {lanes}
        (local.set $p (i32.add (local.get $p) (i32.const 32)))
        (br_if $stripe (i32.lt_u (local.get $p) (i32.const {HASH_BUFFER}))))
      (local.set $left (i64.sub (local.get $left) (i64.const 1)))
      (br_if $pass (i64.ne (local.get $left) (i64.const 0))))
    (i64.store (i32.const 0) (i64.xor (i64.xor (local.get $a) (local.get $b)) (i64.xor (local.get $c) (local.get $d))))))"#
    );
    wat::parse_str(&wat).expect("wat")
}

/// Nanoseconds per one of `n`, as a float: a metered loop turn is well under a nanosecond.
fn per(total: Duration, n: u64) -> f64 {
    total.as_secs_f64() * 1e9 / n as f64
}

fn line(name: &str, what: &str, ns: f64, baseline: f64) {
    println!("{name:<56} {ns:>10.3} ns/{what}  {:>5.2}× the bare engine", ns / baseline);
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

/// Runs per setting; each row reports its fastest. The settings take turns, so a burst of noise from another
/// process lands on one run of each rather than on every run of one.
const ROUNDS: usize = 5;

/// One guest on every engine setting: `n` units (`what`) of work per run.
async fn cpu(guest: &str, bytes: &[u8], what: &str, n: u64) {
    let unmetered = wasmtime_bare(false);
    let unmetered_module = wasmtime::Module::new(&unmetered, bytes).expect("module");
    let metered = wasmtime_bare(true);
    let metered_module = wasmtime::Module::new(&metered, bytes).expect("module");
    let factum = WasmtimeEngine::new().expect("wasmtime");
    let compact = WasmtimeEngine::on_demand(Reservation::Budget, &Limits::default()).expect("wasmtime");
    let wasmi = WasmiEngine::new();
    let mut best = [Duration::MAX; 7];
    for _ in 0..ROUNDS {
        let runs = [
            wasmtime_spin(&unmetered, &unmetered_module, false).await,
            wasmtime_spin(&metered, &metered_module, true).await,
            wasmtime_epoch_spin(bytes).await,
            factum_spin(&factum, bytes).await,
            factum_spin(&compact, bytes).await,
            wasmi_spin(bytes),
            factum_spin(&wasmi, bytes).await,
        ];
        for (best, run) in best.iter_mut().zip(runs) {
            *best = (*best).min(run);
        }
    }
    let [bare, fuel, epoch, factum, compact, wasmi_bare, wasmi_factum] = best.map(|d| per(d, n));
    line(&format!("wasmtime {guest}, bare engine (no fuel)"), what, bare, bare);
    line(&format!("wasmtime {guest}, bare engine with factum's fuel slicing"), what, fuel, bare);
    line(&format!("wasmtime {guest}, bare engine with epoch slicing (10 ms)"), what, epoch, bare);
    line(&format!("wasmtime {guest}, factum engine (default limits)"), what, factum, bare);
    line(&format!("wasmtime {guest}, factum engine, budget reservation"), what, compact, bare);
    line(&format!("wasmi {guest}, bare engine (no fuel)"), what, wasmi_bare, wasmi_bare);
    line(&format!("wasmi {guest}, factum engine (default limits)"), what, wasmi_factum, wasmi_bare);
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
        let turns = count("FACTUM_BENCH_SPIN", 100_000_000);
        cpu("spin", &spinner(turns), "turn", turns).await;
        let passes = count("FACTUM_BENCH_HASH", 5_000);
        cpu("hash", &hasher(passes), "byte", passes * HASH_BUFFER).await;
        instantiation(count("FACTUM_BENCH_STARTS", 20_000)).await;
    });
}
