//! What the trace-hash tests share: a run of `factum-sim` in a fresh process, and a machine kept busy.
#![allow(dead_code)] // each test crate uses its own part of this

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// `scenarios/<file>` in this repository.
pub fn scenario(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios").join(file)
}

/// The trace hash of one run of `file` at `seed` in a fresh `factum-sim` process, passing `args` first (e.g.
/// `--backend madsim`). Panics, with the run's output, if the run fails or prints no hash.
pub fn trace_hash(args: &[&str], file: &Path, seed: u64) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_factum-sim"))
        .args(args)
        .args(["run", file.to_str().expect("utf-8 path"), "--seed", &seed.to_string()])
        .output()
        .expect("factum-sim");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let name = file.display();
    assert!(out.status.success(), "{name} seed {seed} failed:\n{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let hash = stdout.split("trace hash ").nth(1).and_then(|rest| rest.split_whitespace().next()).unwrap_or("");
    assert_eq!(hash.len(), 64, "{name} seed {seed} printed no trace hash:\n{stdout}");
    hash.to_string()
}

/// Keeps two threads spinning until dropped: a busy machine must not change what happens in a run.
pub struct Busy(Arc<AtomicBool>, Vec<std::thread::JoinHandle<()>>);

impl Busy {
    pub fn start() -> Self {
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
