//! Both engines run the same fixtures through the same ABI and must agree on every outcome.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // tests may panic

use std::sync::{Arc, Mutex};
use std::time::Duration;

use factum_proto::{CapabilityResponse, ErrorCode, KvOperation};
use factum_wasm::fixtures::{self, module};
use factum_wasm::{EngineError, ExitReason, GuestHost, Limits, Reservation, WasmEngine, WasmiEngine, WasmtimeEngine};
use futures::future::BoxFuture;

/// A host that records invocations and answers every `set` with success.
#[derive(Default)]
struct RecordingHost {
    calls: Mutex<Vec<(String, String, Vec<u8>)>>,
    sleeps: Mutex<Vec<Duration>>,
    output: Mutex<Vec<u8>>,
}

impl GuestHost for RecordingHost {
    fn invoke(&self, capability_id: String, operation: String, params: Vec<u8>) -> BoxFuture<'static, Vec<u8>> {
        self.calls.lock().unwrap().push((capability_id, operation, params));
        Box::pin(async { CapabilityResponse::ok(&()).encode() })
    }
    fn sleep(&self, d: Duration) -> BoxFuture<'static, ()> {
        self.sleeps.lock().unwrap().push(d);
        Box::pin(tokio::time::sleep(d))
    }
    fn wall_nanos(&self) -> u64 {
        0
    }
    fn monotonic_nanos(&self) -> u64 {
        0
    }
    fn fill_random(&self, buf: &mut [u8]) {
        buf.fill(4);
    }
    fn write_output(&self, _fd: u32, bytes: &[u8]) {
        self.output.lock().unwrap().extend_from_slice(bytes);
    }
}

/// Every engine, wasmtime three times: mapping each instance's memory on demand (with 4 GiB of guarded address
/// space, and with only its budget, so guest code checks bounds), and from a pool of slots.
fn engines() -> Vec<Arc<dyn WasmEngine>> {
    vec![
        Arc::new(WasmtimeEngine::new().unwrap()),
        Arc::new(WasmtimeEngine::on_demand(Reservation::Budget, &Limits::default()).unwrap()),
        Arc::new(WasmtimeEngine::pooled(64, &Limits::default(), Reservation::Guarded).unwrap()),
        Arc::new(WasmiEngine::new()),
    ]
}

async fn run(engine: &Arc<dyn WasmEngine>, wat: &str, host: Arc<RecordingHost>, limits: Limits) -> ExitReason {
    let compiled = engine.compile(&module(wat)).unwrap();
    let instance = engine.instantiate(&compiled, host, limits).await.unwrap();
    instance.run().await
}

#[tokio::test]
async fn clean_exit_exit_code_and_trap() {
    for engine in engines() {
        let host = Arc::new(RecordingHost::default());
        assert_eq!(run(&engine, fixtures::EXIT_CLEAN, host.clone(), Limits::default()).await, ExitReason::Exited(0));
        assert_eq!(run(&engine, fixtures::EXIT_CODE, host.clone(), Limits::default()).await, ExitReason::Exited(3));
        let trap = run(&engine, fixtures::TRAP, host, Limits::default()).await;
        assert!(matches!(&trap, ExitReason::Trapped(_)), "{}: {trap:?}", engine.name());
        assert!(trap.is_crash());
    }
}

#[tokio::test]
async fn fuel_budget_stops_a_runaway_loop() {
    for engine in engines() {
        let limits = Limits { fuel: Some(1_000_000), fuel_yield_interval: 10_000, ..Limits::default() };
        let exit = run(&engine, fixtures::LOOP_FOREVER, Arc::new(RecordingHost::default()), limits).await;
        assert_eq!(exit, ExitReason::OutOfFuel, "{}", engine.name());
    }
}

#[tokio::test]
async fn dropping_the_run_future_stops_an_endless_loop() {
    for engine in engines() {
        let limits = Limits { fuel_yield_interval: 10_000, ..Limits::default() };
        let compiled = engine.compile(&module(fixtures::LOOP_FOREVER)).unwrap();
        let instance = engine.instantiate(&compiled, Arc::new(RecordingHost::default()), limits).await.unwrap();
        let mut run = tokio::spawn(instance.run());
        // The loop yields every 10k fuel, so the runtime gets control back and can cancel it.
        tokio::select! {
            _ = &mut run => panic!("{}: an endless loop ended", engine.name()),
            () = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
        run.abort();
        assert!(run.await.unwrap_err().is_cancelled());
    }
}

#[tokio::test]
async fn memory_limit_makes_growth_fail() {
    for engine in engines() {
        let limits = Limits { max_memory_bytes: 4 * 65536, ..Limits::default() };
        let exit = run(&engine, fixtures::MEMORY_HOG, Arc::new(RecordingHost::default()), limits).await;
        assert!(matches!(exit, ExitReason::Trapped(_)), "{}: {exit:?}", engine.name());
    }
}

#[tokio::test]
async fn a_module_needing_more_memory_than_allowed_is_resource_exhausted() {
    let wat = r#"(module (memory (export "memory") 100) (func (export "_start")))"#;
    for engine in engines() {
        let compiled = engine.compile(&module(wat)).unwrap();
        let limits = Limits { max_memory_bytes: 65536, ..Limits::default() };
        let err = engine.instantiate(&compiled, Arc::new(RecordingHost::default()), limits).await.err().unwrap();
        assert!(matches!(err, EngineError::ResourceExhausted(_)), "{}: {err:?}", engine.name());
    }
}

/// Refused at instantiation, on every engine, with RESOURCE_EXHAUSTED naming the limit.
async fn refused(engine: &Arc<dyn WasmEngine>, wat: &str, limits: Limits) -> String {
    let compiled = engine.compile(&module(wat)).unwrap();
    match engine.instantiate(&compiled, Arc::new(RecordingHost::default()), limits).await {
        Err(EngineError::ResourceExhausted(why)) => why,
        Err(other) => panic!("{}: expected RESOURCE_EXHAUSTED, got {other:?}", engine.name()),
        Ok(_) => panic!("{}: a module over its limits was instantiated", engine.name()),
    }
}

#[tokio::test]
async fn all_memories_of_an_instance_share_one_budget() {
    // Two memories of 2 pages each: each fits a 3-page limit alone, not both together.
    let two_big = r#"(module (memory (export "memory") 2) (memory 2) (func (export "_start")))"#;
    // Two 1-page memories fit; growing the second by 2 pages does not, and the guest traps on the refusal.
    let grows_second = r#"(module (memory (export "memory") 1) (memory $b 1)
        (func (export "_start")
          (if (i32.eq (memory.grow $b (i32.const 2)) (i32.const -1)) (then unreachable))))"#;
    let limits = Limits { max_memory_bytes: 3 * 65536, ..Limits::default() };
    for engine in engines() {
        refused(&engine, two_big, limits).await;
        let exit = run(&engine, grows_second, Arc::new(RecordingHost::default()), limits).await;
        let ExitReason::Trapped(why) = &exit else { panic!("{}: {exit:?}", engine.name()) };
        assert!(why.contains("memory budget of 196608 bytes"), "{}: {why}", engine.name());
        // The same module with room for the growth ends cleanly: the budget, not the module, refused.
        let roomy = Limits { max_memory_bytes: 4 * 65536, ..Limits::default() };
        let exit = run(&engine, grows_second, Arc::new(RecordingHost::default()), roomy).await;
        assert_eq!(exit, ExitReason::Exited(0), "{}", engine.name());
    }
}

#[tokio::test]
async fn tables_count_against_the_budget_and_their_own_cap() {
    let table_of = |n: u32| format!(r#"(module (table {n} funcref) (func (export "_start")))"#);
    let grows_table = r#"(module (table $t 10 funcref)
        (func (export "_start")
          (if (i32.eq (table.grow $t (ref.null func) (i32.const 1000)) (i32.const -1)) (then unreachable))))"#;
    for engine in engines() {
        let capped = Limits { max_table_elements: 500, ..Limits::default() };
        let why = refused(&engine, &table_of(501), capped).await;
        assert!(!why.is_empty());
        let exit = run(&engine, grows_table, Arc::new(RecordingHost::default()), capped).await;
        let ExitReason::Trapped(why) = &exit else { panic!("{}: {exit:?}", engine.name()) };
        assert!(why.contains("table budget of 500 elements"), "{}: {why}", engine.name());
        // 1,000 elements are 8,000 bytes of a memory budget: a table can exhaust it too.
        let small = Limits { max_memory_bytes: 4_000, ..Limits::default() };
        refused(&engine, &table_of(1_000), small).await;
        assert_eq!(
            run(&engine, &table_of(400), Arc::new(RecordingHost::default()), small).await,
            ExitReason::Exited(0),
            "{}",
            engine.name()
        );
    }
}

#[tokio::test]
async fn too_many_memories_or_tables_are_refused() {
    let memories = |n: usize| {
        let decls: String = (0..n).map(|_| "(memory 0)").collect();
        format!(r#"(module {decls} (func (export "_start")))"#)
    };
    let tables = |n: usize| {
        let decls: String = (0..n).map(|_| "(table 0 funcref)").collect();
        format!(r#"(module {decls} (func (export "_start")))"#)
    };
    let limits = Limits::default();
    for engine in engines() {
        let why = refused(&engine, &memories(limits.max_memories + 1), limits).await;
        assert!(why.contains("more memories than the 4"), "{}: {why}", engine.name());
        let why = refused(&engine, &tables(limits.max_tables + 1), limits).await;
        assert!(why.contains("more tables than the 16"), "{}: {why}", engine.name());
        let host = Arc::new(RecordingHost::default());
        assert_eq!(run(&engine, &memories(limits.max_memories), host.clone(), limits).await, ExitReason::Exited(0));
        assert_eq!(run(&engine, &tables(limits.max_tables), host, limits).await, ExitReason::Exited(0));
    }
}

#[tokio::test]
async fn a_start_section_that_spins_is_refused_on_every_engine() {
    let spins = r#"(module (func $spin (loop $l (br $l))) (start $spin) (func (export "_start")))"#;
    let counts = r#"(module (global $n (mut i32) (i32.const 0))
        (func $count (loop $l (global.set $n (i32.add (global.get $n) (i32.const 1)))
                              (br_if $l (i32.lt_u (global.get $n) (i32.const 1000)))))
        (start $count) (func (export "_start")))"#;
    let limits = Limits { start_fuel: 100_000, fuel_yield_interval: 10_000, ..Limits::default() };
    for engine in engines() {
        let why = refused(&engine, spins, limits).await;
        assert!(why.contains("start section") && why.contains("100000"), "{}: {why}", engine.name());
        // A start section that ends within the budget is fine.
        let exit = run(&engine, counts, Arc::new(RecordingHost::default()), limits).await;
        assert_eq!(exit, ExitReason::Exited(0), "{}", engine.name());
    }
}

#[tokio::test(start_paused = true)]
async fn kv_greeter_invokes_and_sleeps_through_the_host() {
    for engine in engines() {
        let host = Arc::new(RecordingHost::default());
        let compiled = engine.compile(&module(fixtures::KV_GREETER)).unwrap();
        let instance = engine.instantiate(&compiled, host.clone(), Limits::default()).await.unwrap();
        let run = tokio::spawn(instance.run());
        tokio::time::sleep(Duration::from_millis(3500)).await;
        assert!(!run.is_finished(), "{}: the greeter should keep running", engine.name());
        run.abort();
        let calls = host.calls.lock().unwrap().clone();
        // One call at t=0, 1, 2 and 3 s.
        assert_eq!(calls.len(), 4, "{}", engine.name());
        for (cap, op, params) in &calls {
            assert_eq!((cap.as_str(), op.as_str()), ("kv", "set"));
            assert_eq!(
                KvOperation::decode(op, params).unwrap(),
                KvOperation::Set { key: "greeting".into(), value: b"hello from factum".to_vec() }
            );
        }
        let sleeps = host.sleeps.lock().unwrap().clone();
        assert!(sleeps.len() >= 3, "{}: {sleeps:?}", engine.name());
        assert!(sleeps.iter().all(|d| *d == Duration::from_secs(1)));
    }
}

#[tokio::test]
async fn kv_greeter_exits_1_when_refused() {
    struct Refusing;
    impl GuestHost for Refusing {
        fn invoke(&self, _: String, _: String, _: Vec<u8>) -> BoxFuture<'static, Vec<u8>> {
            let denied = factum_proto::ErrorResponse::permission_denied("no kv:write");
            Box::pin(async move { CapabilityResponse::err(&denied).encode() })
        }
        fn sleep(&self, d: Duration) -> BoxFuture<'static, ()> {
            Box::pin(tokio::time::sleep(d))
        }
        fn wall_nanos(&self) -> u64 {
            0
        }
        fn monotonic_nanos(&self) -> u64 {
            0
        }
        fn fill_random(&self, _: &mut [u8]) {}
        fn write_output(&self, _: u32, _: &[u8]) {}
    }
    for engine in engines() {
        let compiled = engine.compile(&module(fixtures::KV_GREETER)).unwrap();
        let instance = engine.instantiate(&compiled, Arc::new(Refusing), Limits::default()).await.unwrap();
        assert_eq!(instance.run().await, ExitReason::Exited(1), "{}", engine.name());
    }
}

#[test]
fn the_greeter_reads_success_at_byte_18() {
    // kv_greeter.wat checks byte 18 of the response; this pins the encoding it relies on.
    assert_eq!(CapabilityResponse::ok(&()).encode()[18], 0xc3);
    assert_eq!(CapabilityResponse::err(&factum_proto::ErrorResponse::internal("x")).encode()[18], 0xc2);
}

#[test]
fn bad_modules_are_invalid() {
    let missing_start = module(r#"(module (func (export "main")))"#);
    let foreign_import = module(r#"(module (import "env" "abort" (func)) (func (export "_start")))"#);
    for engine in engines() {
        for bytes in [
            b"not wasm".to_vec(),
            vec![0, 0x61, 0x73, 0x6d, 1, 0, 0, 0, 0xff],
            missing_start.clone(),
            foreign_import.clone(),
        ] {
            let err = engine.compile(&bytes).err().unwrap();
            assert!(matches!(err, EngineError::InvalidModule(_)), "{}: {err:?}", engine.name());
            assert_eq!(factum_proto::ErrorResponse::from(err).error_code, ErrorCode::InvalidRequest);
        }
    }
}

#[test]
fn every_fixture_compiles_on_both_engines() {
    for (name, src) in fixtures::ALL {
        for engine in engines() {
            assert!(engine.compile(&module(src)).is_ok(), "{name} on {}", engine.name());
        }
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(100))]

    /// Fuzzing module bytes into both engines: every fixture with bytes flipped, cut or appended compiles or
    /// is INVALID_REQUEST, instantiates or is refused with a code, and runs to an end within its fuel; never a
    /// panic. (Flipped bytes mostly break the encoding; those that do not reach validation, linking and the
    /// ABI.)
    #[test]
    fn mutated_modules_never_panic_either_engine(
        fixture in proptest::sample::select(fixtures::ALL.to_vec()),
        flips in proptest::collection::vec((proptest::prelude::any::<proptest::sample::Index>(), 0u8..=255), 0..3),
        cut in proptest::option::weighted(0.1, proptest::prelude::any::<proptest::sample::Index>()),
        tail in proptest::option::weighted(0.1, proptest::collection::vec(proptest::prelude::any::<u8>(), 1..8)),
    ) {
        let mut bytes = module(fixture.1);
        for (at, byte) in &flips {
            let i = at.index(bytes.len());
            bytes[i] ^= byte;
        }
        if let Some(cut) = cut {
            bytes.truncate(cut.index(bytes.len()));
        }
        bytes.extend(tail.unwrap_or_default());
        // Fuel bounds computing, not waiting: a guest that sleeps in a loop may outlive the timeout.
        let sleeps = ["sleeper", "kv_greeter", "kv_reader", "http_getter", "publisher", "os_probe", "random_trap"];
        for (engine, end) in fuzz_through_engines(&bytes)? {
            proptest::prop_assert!(end.is_some() || sleeps.contains(&fixture.0), "{engine}: {} ran past its fuel", fixture.0);
        }
    }
}

#[tokio::test]
async fn a_host_function_imported_twice_is_linked_once_and_serves_both() {
    // Legal Wasm that AssemblyScript emits (wasi-testsuite); it used to be refused as "defined twice".
    let wat = r#"(module
        (import "wasi_snapshot_preview1" "fd_write" (func $a (param i32 i32 i32 i32) (result i32)))
        (import "wasi_snapshot_preview1" "fd_write" (func $b (param i32 i32 i32 i32) (result i32)))
        (memory (export "memory") 1)
        (data (i32.const 8) "hi\n")
        (func (export "_start")
            (i32.store (i32.const 0) (i32.const 8))
            (i32.store (i32.const 4) (i32.const 3))
            (drop (call $a (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 16)))
            (drop (call $b (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 16)))))"#;
    for engine in engines() {
        let host = Arc::new(RecordingHost::default());
        assert_eq!(
            run(&engine, wat, host.clone(), Limits::default()).await,
            ExitReason::Exited(0),
            "{}",
            engine.name()
        );
        assert_eq!(host.output.lock().unwrap().as_slice(), b"hi\nhi\n", "{}", engine.name());
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]

    /// Valid modules of every shape (wasm-smith: many memories, tables, globals, element and data segments,
    /// start functions, loops, recursion) go through both engines: refused with INVALID_REQUEST (a feature
    /// factum does not offer) or RESOURCE_EXHAUSTED (a limit), or compiled, instantiated and run under fuel.
    /// Never a panic, an internal error or a run past its fuel; and where both engines run a module to its end
    /// (neither out of fuel nor out of stack, whose bounds differ by engine), they end it the same way.
    #[test]
    fn generated_modules_never_panic_either_engine(seed in proptest::collection::vec(proptest::prelude::any::<u8>(), 64..2048)) {
        // The features both engines take (no GC, exceptions, threads, memory64, SIMD or wide arithmetic:
        // INVALID_REQUEST would be all they showed), and a `_start: () -> ()` export, so most modules run.
        let config = wasm_smith::Config {
            exports: Some(wat::parse_str(r#"(module (func (export "_start")))"#).unwrap()),
            max_imports: 0,
            max_memories: 6,
            max_tables: 20,
            gc_enabled: false,
            reference_types_enabled: false,
            exceptions_enabled: false,
            threads_enabled: false,
            memory64_enabled: false,
            simd_enabled: false,
            relaxed_simd_enabled: false,
            wide_arithmetic_enabled: false,
            ..wasm_smith::Config::default()
        };
        let Ok(module) = wasm_smith::Module::new(config, &mut arbitrary::Unstructured::new(&seed)) else {
            return Ok(()); // too few bytes for a module
        };
        let bytes = module.to_bytes();
        let mut ends = Vec::new();
        for (engine, end) in fuzz_through_engines(&bytes)? {
            proptest::prop_assert!(end.is_some(), "{engine}: a generated module ran past its fuel");
            ends.extend(end);
        }
        let bounded = |end: &ExitReason| {
            matches!(end, ExitReason::OutOfFuel)
                || matches!(end, ExitReason::Trapped(why) if why.contains("call stack exhausted"))
        };
        if let [a, b] = ends.as_slice() {
            if !bounded(a) && !bounded(b) {
                let same = match (a, b) {
                    (ExitReason::Exited(x), ExitReason::Exited(y)) => x == y,
                    (ExitReason::Trapped(_), ExitReason::Trapped(_)) => true,
                    _ => false,
                };
                proptest::prop_assert!(same, "the engines disagree: {a:?} and {b:?}");
            }
        }
    }
}

/// Compiles `bytes` on both engines and, where that works, instantiates and runs it under a small fuel budget
/// (virtual time): a refusal must carry the right code. Answers each engine that got to run it, with its end
/// (`None`: still running after 60 s).
fn fuzz_through_engines(
    bytes: &[u8],
) -> Result<Vec<(&'static str, Option<ExitReason>)>, proptest::test_runner::TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap();
    rt.block_on(async {
        let mut ran = Vec::new();
        for engine in engines() {
            let compiled = match engine.compile(bytes) {
                Ok(compiled) => compiled,
                Err(e) => {
                    // A pooled engine refuses a memory bigger than its slots when it compiles: over a limit.
                    let right = matches!(e, EngineError::InvalidModule(_) | EngineError::ResourceExhausted(_));
                    proptest::prop_assert!(right, "{}: {e:?}", engine.name());
                    continue;
                }
            };
            let limits =
                Limits { fuel: Some(200_000), fuel_yield_interval: 10_000, start_fuel: 200_000, ..Limits::default() };
            match engine.instantiate(&compiled, Arc::new(RecordingHost::default()), limits).await {
                Ok(instance) => {
                    let end = tokio::time::timeout(Duration::from_secs(60), instance.run()).await.ok();
                    ran.push((engine.name(), end));
                }
                Err(e) => proptest::prop_assert!(!matches!(e, EngineError::Internal(_)), "{}: {e:?}", engine.name()),
            }
        }
        Ok(ran)
    })
}

/// A pooled engine holds at most its slots' worth of instances: one more is RESOURCE_EXHAUSTED, not a crash,
/// and the slot an instance frees serves the next start.
#[tokio::test]
async fn a_full_pool_refuses_a_start_until_a_slot_is_freed() {
    let engine: Arc<dyn WasmEngine> =
        Arc::new(WasmtimeEngine::pooled(2, &Limits::default(), Reservation::Guarded).unwrap());
    let compiled = engine.compile(&module(fixtures::SLEEPER)).unwrap();
    let start = || engine.instantiate(&compiled, Arc::new(RecordingHost::default()), Limits::default());
    let first = start().await.unwrap();
    let _second = start().await.unwrap();
    let err = start().await.err().unwrap();
    assert!(matches!(err, EngineError::ResourceExhausted(_)), "{err:?}");
    drop(first);
    assert!(start().await.is_ok(), "the freed slot is taken again");
}
