//! The madsim backend checked from outside (built with `RUSTFLAGS="--cfg madsim"`, see CI.md): every scenario,
//! run in two fresh `factum-sim` processes from the same seed, gives one trace hash, the second time with the
//! machine's cores kept busy; and other seeds give other hashes, so the comparison can fail. The injected-bug
//! and scenario tests run on madsim in this build too, since it is the build's default backend.
#![cfg(madsim)]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // tests may panic

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

fn scenarios() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios");
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
}

/// The trace hash of one madsim run of `file` at `seed`, in a fresh `factum-sim` process.
fn trace_hash(file: &Path, seed: u64) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_factum-sim"))
        .args(["--backend", "madsim", "run", file.to_str().unwrap(), "--seed", &seed.to_string()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let name = file.display();
    assert!(out.status.success(), "{name} seed {seed} failed:\n{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let hash = stdout.split("trace hash ").nth(1).and_then(|rest| rest.split_whitespace().next()).unwrap_or("");
    assert_eq!(hash.len(), 64, "{name} seed {seed} printed no trace hash:\n{stdout}");
    hash.to_string()
}

/// Keeps two threads spinning until dropped: a busy machine must not change what happens in a run.
struct Busy(Arc<AtomicBool>, Vec<std::thread::JoinHandle<()>>);

impl Busy {
    fn start() -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let spinners = (0..2)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut x = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                    }
                })
            })
            .collect();
        Busy(stop, spinners)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
        for spinner in self.1.drain(..) {
            let _ = spinner.join();
        }
    }
}

#[test]
fn every_scenario_gives_one_trace_hash_per_seed_in_fresh_processes() {
    let files = scenarios();
    assert!(files.len() >= 20, "scenarios/ holds {} files", files.len());
    let first: Vec<String> = files.iter().map(|f| trace_hash(f, 1)).collect();
    let busy = Busy::start();
    let second: Vec<String> = files.iter().map(|f| trace_hash(f, 1)).collect();
    drop(busy);
    let differ: Vec<String> = (files.iter().zip(first.iter().zip(&second)))
        .filter(|(_, (a, b))| a != b)
        .map(|(f, (a, b))| format!("{}: {a} then {b}", f.display()))
        .collect();
    assert!(differ.is_empty(), "seed 1 replayed differently:\n{}", differ.join("\n"));
    // The hash tells runs apart: another seed is another run.
    let other: Vec<String> = files.iter().map(|f| trace_hash(f, 2)).collect();
    let same = first.iter().zip(&other).filter(|(a, b)| a == b).count();
    assert_eq!(same, 0, "{same} scenarios gave seed 1's hash at seed 2");
}
