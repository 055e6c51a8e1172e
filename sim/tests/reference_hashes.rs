//! Determinism checked from outside: a handful of (scenario, seed) runs, each in a fresh `factum-sim` process,
//! must give the trace hashes stored here. The same hashes hold in debug and release builds (CI runs this in
//! debug; `cargo test --release -p factum-sim --test reference_hashes` checks release).
//!
//! A change to what the product or the simulator does changes these hashes, and that is the point: update them
//! in the same commit, after reading the new timeline (`factum-sim replay scenarios/<file> --seed <n>`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // tests may panic

use std::process::Command;

/// (scenario file, seed, trace hash).
const REFERENCE: &[(&str, u64, &str)] = &[
    ("agent_crash.toml", 7, "cfad26582cd39d379a6a8c2c174a7c7bc1cdeaee5ca28f34428c82e51b30e7ba"),
    ("lease_expiry.toml", 3, "7027cd2689ae1c3927730119e8a8a7e4975df5866a5f01825d55d07b91ca26ff"),
    ("revoke_during_kv_use.toml", 5, "7a18d50a6142bd5091bb112209e1909ae314d4e45c9d622956e3b976d51b3553"),
    ("reschedule_in_doubt.toml", 2, "ae11082524ca78dd75bbf19abfd5c2d274c213cacf148a798a3021b6de41d5f1"),
    ("control_plane_restart.toml", 11, "4134c0d5002a32ddb106b548a1a5f0dd001949b58ae684d7d3013555cb7b05e5"),
];

#[test]
fn reference_runs_give_their_stored_trace_hashes_in_a_fresh_process() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios");
    let mut wrong = Vec::new();
    for (file, seed, want) in REFERENCE {
        let out = Command::new(env!("CARGO_BIN_EXE_factum-sim"))
            .args(["run", &dir.join(file).display().to_string(), "--seed", &seed.to_string()])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{file} seed {seed} failed:\n{stdout}{}", String::from_utf8_lossy(&out.stderr));
        let got = stdout.split("trace hash ").nth(1).and_then(|rest| rest.split_whitespace().next()).unwrap_or("");
        if got != *want {
            wrong.push(format!("{file} seed {seed}: stored {want}, got {got}"));
        }
    }
    assert!(wrong.is_empty(), "trace hashes changed (update them if the change is intended):\n{}", wrong.join("\n"));
}
