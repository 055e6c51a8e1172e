//! The `factum-sim` binary as tooling uses it: a sweep's summary as JSON, and the exit code on failure.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // tests may panic

use std::process::Command;

fn sim(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_factum-sim")).args(args).output().unwrap()
}

#[test]
fn a_sweep_prints_a_json_summary() {
    let dir = std::env::temp_dir().join(format!("factum-sim-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let scenarios = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios");
    std::fs::copy(scenarios.join("agent_crash.toml"), dir.join("agent_crash.toml")).unwrap();
    let out = sim(&["sweep", dir.to_str().unwrap(), "--seeds", "2", "-o", "json"]);
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["runs"], 2);
    assert_eq!(summary["failed"], 0);
    assert_eq!(summary["failures"].as_array().unwrap().len(), 0);
    assert!(summary["sometimes"]["fault: crash"].as_u64().unwrap() >= 1, "{summary}");
}

#[test]
fn a_bad_scenario_is_refused_with_exit_code_2() {
    let dir = std::env::temp_dir().join(format!("factum-sim-cli-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("bad.toml"), "name='x'\nagents=1\nduration='5s'\n[[always]]\ncheck='nope'\n").unwrap();
    let out = sim(&["sweep", dir.to_str().unwrap(), "--seeds", "1"]);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown check"));
}

/// A build without madsim says how to get one that has it, rather than running turmoil under another name.
#[cfg(not(madsim))]
#[test]
fn madsim_in_a_build_without_it_is_refused_with_exit_code_2() {
    let scenario = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios/agent_crash.toml");
    let out = sim(&["--backend", "madsim", "run", scenario.to_str().unwrap(), "--seed", "1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--cfg madsim"), "{}", String::from_utf8_lossy(&out.stderr));
}
