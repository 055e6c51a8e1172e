//! The madsim backend checked from outside (built with `RUSTFLAGS="--cfg madsim"`, see CI.md): every scenario,
//! run in two fresh `factum-sim` processes from the same seed, gives one trace hash, the second time with the
//! machine's cores kept busy; and other seeds give other hashes, so the comparison can fail. The injected-bug
//! and scenario tests run on madsim in this build too, since it is the build's default backend.
#![cfg(madsim)]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // tests may panic

mod common;

use std::path::{Path, PathBuf};

use common::Busy;

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
    common::trace_hash(&["--backend", "madsim"], file, seed)
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
