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
    ("agent_crash.toml", 7, "e426e9b56f72fcb5be26f17bc452d1680f48c8ff31b4ef1ed34669da0dc87156"),
    ("lease_expiry.toml", 3, "267759220a80f1ff13347212f47efb04edbc7fae093e39512b0f5ce0ea0eca40"),
    ("revoke_during_kv_use.toml", 5, "0af32965127719ae2efdcaaca06b68ca71baba7689b9d0abfe6dbb5d0beb1229"),
    ("reschedule_in_doubt.toml", 2, "8d6ab73b2f54125e06b3fa5e602252bd24b79c590adfc93755492c447505b010"),
    ("agent_pause.toml", 4, "433f5bc5671ce8ab243286716e8db87fb5ca46f48abbed667173776071939d99"),
    ("clock_drift.toml", 2, "ee6face9c605b80b82412b26fc72afc795cecb6af2b687807d0ef39cb79646ea"),
    ("control_plane_restart.toml", 11, "066f1ef990180c7e92e59c7b3d48dbef5cab5bbc9e52bc3bef01999ac5e69c31"),
    ("messaging.toml", 3, "5207d08934922561a63d42bb49432c556ea8b196c60beed4143757a752aea51e"),
    ("http.toml", 2, "46c3a0c79dc24114b7e51e9b166af885d4bd9bcfc614ae8ec1871077083dffac"),
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
