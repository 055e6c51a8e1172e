//! The no-filesystem wasm32-wasip1 programs of the public WASI test suite (`tests/wasi-testsuite/`), each run on
//! both engines with the arguments and environment its `.json` gives, must exit with the expected code and print
//! the expected stdout: real toolchains' output (AssemblyScript, wasi-libc), not hand-written fixtures.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // tests may panic

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use factum_wasm::{ExitReason, GuestHost, Limits, WasmEngine, WasmiEngine, WasmtimeEngine};
use futures::future::BoxFuture;

/// A host with a command line, an environment, a clock that moves and a stdout that is kept.
struct SuiteHost {
    argv: Vec<String>,
    environ: Vec<String>,
    stdout: Mutex<Vec<u8>>,
    ticks: Mutex<u64>,
}

impl GuestHost for SuiteHost {
    fn invoke(&self, _: String, _: String, _: Vec<u8>) -> BoxFuture<'static, Vec<u8>> {
        Box::pin(async { Vec::new() })
    }
    fn sleep(&self, _: Duration) -> BoxFuture<'static, ()> {
        Box::pin(async {})
    }
    fn wall_nanos(&self) -> u64 {
        1_700_000_000_000_000_000 + self.monotonic_nanos()
    }
    fn monotonic_nanos(&self) -> u64 {
        let mut ticks = self.ticks.lock().unwrap();
        *ticks += 1_000;
        *ticks
    }
    fn fill_random(&self, buf: &mut [u8]) {
        buf.fill(7);
    }
    fn write_output(&self, fd: u32, bytes: &[u8]) {
        if fd == 1 {
            self.stdout.lock().unwrap().extend_from_slice(bytes);
        }
    }
    fn argv(&self) -> Vec<String> {
        self.argv.clone()
    }
    fn environ(&self) -> Vec<String> {
        self.environ.clone()
    }
}

#[tokio::test]
async fn wasi_testsuite_programs_exit_as_the_suite_expects_on_both_engines() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/wasi-testsuite");
    let mut programs: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "wasm"))
        .collect();
    programs.sort();
    assert!(programs.len() >= 16, "the suite's programs are missing from {}", dir.display());
    let engines: Vec<Arc<dyn WasmEngine>> =
        vec![Arc::new(WasmtimeEngine::new().unwrap()), Arc::new(WasmiEngine::new())];
    let mut failures = Vec::new();
    for program in &programs {
        let name = program.file_name().unwrap().to_string_lossy().into_owned();
        let spec: serde_json::Value = std::fs::read(program.with_extension("json"))
            .map(|b| serde_json::from_slice(&b).unwrap())
            .unwrap_or_else(|_| serde_json::json!({}));
        let args = spec["args"].as_array().into_iter().flatten().map(|a| a.as_str().unwrap().to_string());
        let environ =
            spec["env"].as_object().into_iter().flatten().map(|(k, v)| format!("{k}={}", v.as_str().unwrap()));
        let want_code = spec["exit_code"].as_i64().unwrap_or(0);
        let bytes = std::fs::read(program).unwrap();
        for engine in &engines {
            let host = Arc::new(SuiteHost {
                argv: std::iter::once(name.clone()).chain(args.clone()).collect(),
                environ: environ.clone().collect(),
                stdout: Mutex::default(),
                ticks: Mutex::default(),
            });
            let compiled = match engine.compile(&bytes) {
                Ok(c) => c,
                Err(e) => {
                    failures.push(format!("{name} on {}: refused: {e}", engine.name()));
                    continue;
                }
            };
            let instance = engine.instantiate(&compiled, host.clone(), Limits::default()).await.unwrap();
            let exit = instance.run().await;
            if exit != ExitReason::Exited(i32::try_from(want_code).unwrap()) {
                failures.push(format!(
                    "{name} on {}: {} (expected exit code {want_code})",
                    engine.name(),
                    exit.describe()
                ));
            }
            let stdout = String::from_utf8_lossy(&host.stdout.lock().unwrap()).into_owned();
            if let Some(want) = spec["stdout"].as_str().filter(|want| stdout != *want) {
                failures.push(format!("{name} on {}: stdout {stdout:?}, expected {want:?}", engine.name()));
            }
        }
    }
    assert!(failures.is_empty(), "{} of {} runs failed:\n{}", failures.len(), programs.len() * 2, failures.join("\n"));
}
