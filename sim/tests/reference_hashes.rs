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
    ("agent_crash.toml", 7, "bb1d0fd440202b5412140a060ca0b2feab42d07f33af79244a3448b5855b1920"),
    ("lease_expiry.toml", 3, "c0c2b9f1c9710f747d870978bad714d73ea2bed51d4a87fc5e08c748ca1eb0e1"),
    ("revoke_during_kv_use.toml", 5, "3e51c76c35423c1c6eb18ec5b5368d22794682ef5cd9b29456f27c65a19052ef"),
    ("reschedule_in_doubt.toml", 2, "ba83169ddab86b80990d750fd3303d0a4e060017d56e5ea27634f0be966ff078"),
    ("agent_pause.toml", 4, "8ca7895d3e32251affaa35e65ac28f91169627b10eb2b28f9ec27b5344b7da5b"),
    ("clock_drift.toml", 2, "476e93c64ea5577b1e02463afd9fc8a076a0431b7c79fd0f8306a2d1ad02136c"),
    ("control_plane_restart.toml", 11, "25112c118eee7b7a5830e204e871bf312ecdee77035b49d9b4983a1634e14bf3"),
    ("messaging.toml", 3, "49baa0fc046194e726d958fd982123db6c2b46f9863b82266fc6163a8c0c6540"),
    ("http.toml", 2, "5d1a68481ed19b0dd3782b91c6a2a16987163c71763e4b6ad7895b5390b9196e"),
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
