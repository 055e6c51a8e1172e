//! End to end: the real `factum` binary. `factum up` on free ports, the example guest started with a KV
//! capability, its write visible, then stopped; bad input gets the design's error codes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // tests may panic

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::*;

#[test]
fn up_start_kv_stop() {
    let up = up();
    let started: serde_json::Value =
        serde_json::from_str(&ok(&up, &["start", &fixture("kv_greeter"), "--cap", "kv=kv:write", "-o", "json"]))
            .unwrap();
    let id = started["instance_id"].as_str().unwrap().to_string();
    wait_for_status(&up, &id, "running");

    let ps: serde_json::Value = serde_json::from_str(&ok(&up, &["ps", "-o", "json"])).unwrap();
    assert_eq!(ps.as_array().unwrap().len(), 1);
    assert_eq!(ps[0]["instance_id"], id.as_str());

    let kv: serde_json::Value = serde_json::from_str(&ok(&up, &["kv", "kv", "-o", "json"])).unwrap();
    assert_eq!(kv[0]["key"], "greeting");
    assert_eq!(kv[0]["value"], "hello from factum");

    let inspect: serde_json::Value = serde_json::from_str(&ok(&up, &["inspect", &id, "-o", "json"])).unwrap();
    assert_eq!(inspect["capabilities"][0]["permissions"][0], "kv:write");

    ok(&up, &["stop", &id]);
    assert_eq!(status_of(&up, &id), "stopped");
    let nodes: serde_json::Value = serde_json::from_str(&ok(&up, &["nodes", "-o", "json"])).unwrap();
    assert_eq!(nodes[0]["available"], true);
}

#[test]
fn revoking_mid_run_crashes_the_greeter_through_its_own_error_path() {
    let up = up();
    let id = ok(&up, &["start", &fixture("kv_greeter"), "--cap", "kv=kv:write"]).trim().to_string();
    wait_for_status(&up, &id, "running");
    ok(&up, &["revoke", &id, "kv"]);
    wait_for_status(&up, &id, "crashed");
    let inspect: serde_json::Value = serde_json::from_str(&ok(&up, &["inspect", &id, "-o", "json"])).unwrap();
    assert_eq!(inspect["metadata"]["last_error"], "exited with code 1");
    assert!(inspect["capabilities"].as_array().unwrap().is_empty());
}

#[test]
fn bad_input_gets_error_codes_and_the_orchestrator_survives() {
    let up = up();
    let garbage = std::env::temp_dir().join(format!("factum-garbage-{}.wasm", std::process::id()));
    std::fs::write(&garbage, b"\0asm\x01\0\0\0\xff\xff\xff").unwrap();
    fails_with(&up, &["start", garbage.to_str().unwrap()], "INVALID_REQUEST");
    std::fs::remove_file(&garbage).unwrap();
    fails_with(&up, &["start", &fixture("sleeper"), "--cap", "kv=kv:sideways"], "INVALID_REQUEST");
    fails_with(&up, &["start", &fixture("sleeper"), "--restart", "sometimes"], "INVALID_REQUEST");
    fails_with(&up, &["inspect", "no-such-instance"], "INSTANCE_NOT_FOUND");
    fails_with(&up, &["stop", "no-such-instance"], "INSTANCE_NOT_FOUND");
    fails_with(&up, &["grant", "no-such-instance", "kv", "kv:read"], "INSTANCE_NOT_FOUND");
    // Still serving after all that.
    let id = ok(&up, &["start", &fixture("exit_clean")]).trim().to_string();
    wait_for_status(&up, &id, "stopped");
    let trap =
        ok(&up, &["start", &fixture("trap"), "--restart", "on_failure", "--max-retries", "2"]).trim().to_string();
    wait_for_status(&up, &trap, "crashed");
    let inspect: serde_json::Value = serde_json::from_str(&ok(&up, &["inspect", &trap, "-o", "json"])).unwrap();
    assert_eq!(inspect["metadata"]["restarts"], 2);
    // A start sent again under its id is answered, not run twice; another start under that id is refused.
    let sleeper = fixture("sleeper");
    for _ in 0..2 {
        assert_eq!(ok(&up, &["start", &sleeper, "--id", "web-1", "--cap", "kv=kv:read"]).trim(), "web-1");
    }
    fails_with(&up, &["start", &sleeper, "--id", "web-1", "--cap", "kv=kv:write"], "already used by another start");
    let human = ok(&up, &["inspect", &trap]);
    assert!(human.contains("restart policy: on_failure, at most 2 restarts, no backoff"), "{human}");
}

#[test]
fn client_without_a_control_plane_is_communication_failure() {
    let out = Command::new(FACTUM).args(["ps", "--control-plane", "127.0.0.1:1"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("COMMUNICATION_FAILURE"));
}

/// The example guest's KV write lands in a real Redis when the agent is told to keep KV there.
#[test]
fn kv_in_redis() {
    if Command::new("redis-server").arg("--version").output().is_err() {
        assert!(std::env::var("CI").is_err(), "redis-server is not installed, but CI must run the Redis tests");
        eprintln!("skipping: no redis-server (apt install redis-server)");
        return;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut redis = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "redis-server did not come up");
        std::thread::sleep(Duration::from_millis(20));
    }
    let url = format!("redis://127.0.0.1:{port}");
    {
        let up = up_with(&["--kv-redis", &url, "--kv-namespace", "clitest"]);
        let id = ok(&up, &["start", &fixture("kv_greeter"), "--cap", "kv=kv:write"]).trim().to_string();
        wait_for_status(&up, &id, "running");
        let kv: serde_json::Value = serde_json::from_str(&ok(&up, &["kv", "kv", "-o", "json"])).unwrap();
        assert_eq!(kv[0]["value"], "hello from factum");
    }
    let stored = Command::new("redis-cli")
        .args(["-p", &port.to_string(), "HGET", "clitest:kv:kv", "greeting"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&stored.stdout).trim(), "hello from factum", "the value is in Redis itself");
    let _ = redis.kill();
    let _ = redis.wait();
}
