//! The example guests of `guests/examples`, written with the guest SDK and built for wasm32-wasip1, run under
//! `factum up`: the KV counter counts, the HTTP fetcher stores what a local server answered, the publisher's
//! messages reach the subscriber. Denied and revoked capabilities show up as the design's error codes and as
//! the guests' own error paths. The build needs the `wasm32-wasip1` target (`rustup target add
//! wasm32-wasip1`; `.ci/run` adds it): without it these tests are skipped, except under `CI=true`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // tests may panic

mod common;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::*;

const BODY: &str = "hello from the test server";

/// A one-route HTTP server on a free port, answering every request with [`BODY`]; returns its port.
fn http_server() -> u16 {
    static PORT: OnceLock<u16> = OnceLock::new();
    *PORT.get_or_init(|| {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for mut stream in listener.incoming().flatten() {
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let response =
                    format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{BODY}", BODY.len());
                let _ = stream.write_all(response.as_bytes());
            }
        });
        port
    })
}

/// Whether the `wasm32-wasip1` target is installed; without it the test is skipped (a failure under CI).
fn wasm_target_installed() -> bool {
    let out = Command::new("rustc").args(["--print", "target-libdir", "--target", "wasm32-wasip1"]).output();
    let libdir = out.ok().filter(|o| o.status.success()).map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    let installed = libdir.is_some_and(|dir| PathBuf::from(dir).is_dir());
    if !installed {
        assert!(
            std::env::var("CI").is_err(),
            "the wasm32-wasip1 target is not installed, but CI must run the guest tests"
        );
        eprintln!("skipping: no wasm32-wasip1 target (rustup target add wasm32-wasip1)");
    }
    installed
}

/// Builds the example guests once (the fetcher aimed at [`http_server`]) into their own target dir; returns
/// the directory holding the `.wasm` files.
fn guests() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let target_dir = root.join("target/guests");
        let status = Command::new(option_env!("CARGO").unwrap_or("cargo"))
            .args(["build", "--release", "--target", "wasm32-wasip1", "--manifest-path"])
            .arg(root.join("guests/Cargo.toml"))
            .arg("--target-dir")
            .arg(&target_dir)
            .env("FETCH_URL", format!("http://127.0.0.1:{}/hello", http_server()))
            .status()
            .unwrap();
        assert!(
            status.success(),
            "building the guests failed (is the target installed? rustup target add wasm32-wasip1)"
        );
        target_dir.join("wasm32-wasip1/release")
    })
}

fn guest(name: &str) -> String {
    guests().join(format!("{name}.wasm")).to_string_lossy().into_owned()
}

/// The KV entries of capability `cap`, as key → value text.
fn kv(up: &impl ControlPlane, cap: &str) -> std::collections::BTreeMap<String, String> {
    let entries: serde_json::Value = serde_json::from_str(&ok(up, &["kv", cap, "-o", "json"])).unwrap();
    entries
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["key"].as_str().unwrap().to_string(), e["value"].as_str().unwrap_or_default().to_string()))
        .collect()
}

/// Waits until `cap`'s KV entries satisfy `done`; returns them.
fn wait_kv(
    up: &impl ControlPlane,
    cap: &str,
    done: impl Fn(&std::collections::BTreeMap<String, String>) -> bool,
) -> std::collections::BTreeMap<String, String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let entries = kv(up, cap);
        if done(&entries) {
            return entries;
        }
        assert!(Instant::now() < deadline, "KV {cap} never got there: {entries:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn count(entries: &std::collections::BTreeMap<String, String>, key: &str) -> u64 {
    entries.get(key).and_then(|v| v.parse().ok()).unwrap_or(0)
}

fn start(up: &impl ControlPlane, name: &str, caps: &[&str]) -> String {
    let mut args = vec!["start", name];
    for cap in caps {
        args.extend(["--cap", cap]);
    }
    ok(up, &args).trim().to_string()
}

#[test]
fn kv_counter_counts_and_a_denied_call_is_audited() {
    if !wasm_target_installed() {
        return;
    }
    let log_path = std::env::temp_dir().join(format!("factum-guests-{}.log", std::process::id()));
    let up = up_logging(&[], std::fs::File::create(&log_path).unwrap());
    let id = start(&up, &guest("kv-counter"), &["counter=kv:read,kv:write"]);
    wait_kv(&up, "counter", |kv| count(kv, "count") >= 2);
    // Without kv:read its first get is refused: the guest's error path ends it as a crash, and the agent's
    // log has an audit line naming the instance.
    let denied = start(&up, &guest("kv-counter"), &["counter=kv:write"]);
    wait_for_status(&up, &denied, "crashed");
    assert_eq!(status_of(&up, &id), "running");
    let log = std::fs::read_to_string(&log_path).unwrap();
    let _ = std::fs::remove_file(&log_path);
    let audit = log.lines().find(|l| l.contains("factum::audit") && l.contains(&denied));
    let audit = audit.unwrap_or_else(|| panic!("no audit line for {denied} in:\n{log}"));
    assert!(audit.contains("capability call denied") && audit.contains("kv:read"), "{audit}");
}

/// A nats-server on a free port, killed on drop; `None` (a skip) when it is not installed, outside CI.
fn nats_server() -> Option<(Proc, String)> {
    if Command::new("nats-server").arg("--version").output().is_err() {
        assert!(std::env::var("CI").is_err(), "nats-server is not installed, but CI must run the NATS tests");
        eprintln!("skipping: no nats-server (apt install nats-server)");
        return None;
    }
    let port = free_port();
    let child = Command::new("nats-server")
        .args(["-a", "127.0.0.1", "-p", &port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nats-server did not come up");
        std::thread::sleep(Duration::from_millis(20));
    }
    Some((Proc::new(child), format!("nats://127.0.0.1:{port}")))
}

#[test]
fn messages_cross_nodes_through_nats() {
    if !wasm_target_installed() {
        return;
    }
    let Some((_nats, url)) = nats_server() else { return };
    let (_control_plane, cp) = control_plane();
    let _agents = [agent("n1", &cp, &["--msg-nats", &url]), agent("n2", &cp, &["--msg-nats", &url])];
    wait_for_nodes(&cp, 2);
    let subscriber = start(&cp, &guest("subscriber"), &["in=msg:subscribe:greetings.*", "store=kv:read,kv:write"]);
    wait_for_status(&cp, &subscriber, "running");
    let publisher = start(&cp, &guest("publisher"), &["out=msg:publish:greetings.>"]);
    let node_of = |id: &str| {
        let inspect: serde_json::Value = serde_json::from_str(&ok(&cp, &["inspect", id, "-o", "json"])).unwrap();
        inspect["metadata"]["node_id"].as_str().unwrap().to_string()
    };
    assert_ne!(node_of(&subscriber), node_of(&publisher), "placement puts them on different nodes");
    let got = wait_kv(&cp, "store", |kv| count(kv, "received") >= 2);
    assert!(got["last"].starts_with("hello "), "{got:?}");
}

#[test]
fn http_fetcher_stores_the_response() {
    if !wasm_target_installed() {
        return;
    }
    let up = up();
    let id = start(&up, &guest("http-fetcher"), &["web=http:request,http:domain:127.0.0.1", "store=kv:write"]);
    let stored = wait_kv(&up, "store", |kv| kv.contains_key("body"));
    assert_eq!(stored["status"], "200");
    assert_eq!(stored["body"], BODY);
    wait_for_status(&up, &id, "stopped");

    // A domain it was not granted: PERMISSION_DENIED reaches the guest, which records it (in the same store,
    // the capability id being the same) and crashes.
    let denied = start(&up, &guest("http-fetcher"), &["web=http:request,http:domain:example.com", "store=kv:write"]);
    wait_for_status(&up, &denied, "crashed");
    let stored = wait_kv(&up, "store", |kv| kv.contains_key("error"));
    assert!(stored["error"].contains("PermissionDenied"), "{stored:?}");
}

#[test]
fn published_messages_reach_the_subscriber_until_revoked() {
    if !wasm_target_installed() {
        return;
    }
    let up = up();
    let subscriber = start(&up, &guest("subscriber"), &["in=msg:subscribe:greetings.*", "store=kv:read,kv:write"]);
    wait_for_status(&up, &subscriber, "running");
    let publisher = start(&up, &guest("publisher"), &["out=msg:publish:greetings.>"]);
    let got = wait_kv(&up, "store", |kv| count(kv, "received") >= 2);
    assert!(got["last"].starts_with("hello "), "{got:?}");

    // Revoked mid-run: the subscriber has nothing left to serve and stops; the count no longer moves.
    ok(&up, &["revoke", &subscriber, "in"]);
    wait_for_status(&up, &subscriber, "stopped");
    let frozen = count(&kv(&up, "store"), "received");
    std::thread::sleep(Duration::from_millis(1500)); // at least one more publish happens meanwhile
    assert_eq!(count(&kv(&up, "store"), "received"), frozen);

    // The publisher's publish is refused once its capability is revoked: its error path crashes it.
    ok(&up, &["revoke", &publisher, "out"]);
    wait_for_status(&up, &publisher, "crashed");
}
