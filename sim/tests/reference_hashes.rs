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
    ("agent_crash.toml", 7, "44db4acbf8c8cff7061868b1c14889aa15e84dc7d6c1cfaabf16b49be3d73597"),
    ("lease_expiry.toml", 3, "e3affc632fc038c7b2e650f7474645ca177c174f10fff26269bff860d0510c60"),
    ("revoke_during_kv_use.toml", 5, "ee5c542b7f86adb5d5f7bbebdd77eac98a8072cb95bb320dd0cd0136de6ccc4b"),
    ("reschedule_in_doubt.toml", 2, "63e58fef30c2c326f522f5721ab74b1fa9b9fc3d3ba64dc2875f555004d31e26"),
    ("agent_pause.toml", 4, "6b9c576d07ea2c225aa0da9c79cb77f5eb0598dce39b3f6979f32db66b935087"),
    ("clock_drift.toml", 2, "3856264bf4147c9230df584e3cb7da6b2da31fb58d3ace6a6598425e911cee2c"),
    ("control_plane_restart.toml", 11, "cb131e62240805cbc7ec162a498792d739cdd1c9146958a5b87127f46b275b77"),
    ("messaging.toml", 3, "f07683b27a379ab61b98ae3edee437e7470337c6799e0cda672a58052a6a76c2"),
    ("http.toml", 2, "28804edf9b556fcce3f35b6ca2244d9463b3b8583f2af63c6fcf9125ce56a2d6"),
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
