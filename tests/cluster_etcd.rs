//! A real cluster: etcd (the `etcd` binary), one control plane and three agents as separate `factum`
//! processes. An agent is killed with SIGKILL: its instances turn `unknown` once its lease expires and are
//! rescheduled onto the survivors. The control plane is killed and restarted: it rebuilds the same instances
//! from etcd membership and the agents' facts. etcd never holds anything but nodes and providers (P11).
//!
//! Needs `etcd` on PATH (apt `etcd-server`; `.ci/run` installs it). Without it the tests say so and pass,
//! except under `CI=true`, where a missing etcd is a failure.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // tests may panic

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{factum_daemon, free_port, Proc, FACTUM};

fn etcd_available() -> bool {
    let found = Command::new("etcd").arg("--version").output().is_ok_and(|o| o.status.success());
    if !found {
        assert!(std::env::var("CI").is_err(), "etcd is not installed, but CI must run the etcd tests");
        eprintln!("skipping: no `etcd` binary on PATH (apt install etcd-server)");
    }
    found
}

/// A single-member etcd on free ports, with its data in a fresh temporary directory.
fn start_etcd() -> (Proc, String, tempdir::Dir) {
    let dir = tempdir::Dir::new("factum-etcd");
    let (client, peer) = (free_port(), free_port());
    let child = Command::new("etcd")
        .args(["--name", "t", "--data-dir"])
        .arg(dir.path())
        .arg(format!("--listen-client-urls=http://127.0.0.1:{client}"))
        .arg(format!("--advertise-client-urls=http://127.0.0.1:{client}"))
        .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer}"))
        .arg(format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer}"))
        .arg(format!("--initial-cluster=t=http://127.0.0.1:{peer}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start etcd");
    let endpoint = format!("127.0.0.1:{client}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(&endpoint).is_err() {
        assert!(Instant::now() < deadline, "etcd did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
    (Proc::new(child), endpoint, dir)
}

fn control_plane(addr: &str, etcd: &str, prefix: &str) -> Proc {
    factum_daemon(
        &["control-plane", "--listen", addr, "--etcd", etcd, "--etcd-prefix", prefix],
        "control plane listening",
    )
}

fn agent(node: &str, cp: &str, etcd: &str, prefix: &str) -> Proc {
    factum_daemon(
        &[
            "agent",
            "--node-id",
            node,
            "--control-plane",
            cp,
            "--agent-listen",
            "127.0.0.1:0",
            "--etcd",
            etcd,
            "--etcd-prefix",
            prefix,
            "--lease-ttl",
            // Long enough that a loaded CI machine (etcd fsyncs, two cores) does not expire live leases.
            "4s",
        ],
        "listening",
    )
}

fn json(cp: &str, args: &[&str]) -> serde_json::Value {
    let out = Command::new(FACTUM).args(args).args(["--control-plane", cp, "-o", "json"]).output().unwrap();
    assert!(out.status.success(), "factum {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn start(cp: &str, id: &str) {
    let sleeper = format!("{}/guests/fixtures/sleeper.wat", env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(FACTUM)
        .args(["start", &sleeper, "--restart", "always", "--id", id, "--cap", "kv=kv:read", "--control-plane", cp])
        .output()
        .unwrap();
    assert!(out.status.success(), "start {id}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Polls until `check` holds on `factum ps`, returning how long it took.
fn wait_until(cp: &str, what: &str, check: impl Fn(&[serde_json::Value]) -> bool) -> Duration {
    let began = Instant::now();
    loop {
        let out = Command::new(FACTUM).args(["ps", "-o", "json", "--control-plane", cp]).output().unwrap();
        if out.status.success() {
            let list: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
            if check(&list) {
                return began.elapsed();
            }
        }
        assert!(began.elapsed() < Duration::from_secs(30), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn field<'a>(list: &'a [serde_json::Value], id: &str, key: &str) -> Option<&'a str> {
    list.iter().find(|m| m["instance_id"] == id).and_then(|m| m[key].as_str())
}

fn etcd_keys(etcd: &str, prefix: &str) -> Vec<String> {
    use factum_registry::Registry as _;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let env = factum_env::Env::tokio();
        let registry =
            factum_registry::EtcdRegistry::connect(env, &[etcd.to_string()], prefix, Duration::from_secs(5)).await;
        registry.unwrap().keys().await.unwrap()
    })
}

#[test]
fn agent_killed_instances_rescheduled_and_control_plane_rebuilds() {
    if !etcd_available() {
        return;
    }
    let (_etcd, etcd, _dir) = start_etcd();
    let prefix = "/factum-test";
    let cp_addr = format!("127.0.0.1:{}", free_port());
    let mut cp = control_plane(&cp_addr, &etcd, prefix);
    let mut agents: Vec<(String, Proc)> =
        ["n1", "n2", "n3"].iter().map(|n| (n.to_string(), agent(n, &cp_addr, &etcd, prefix))).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let nodes = json(&cp_addr, &["nodes"]);
        if nodes.as_array().unwrap().iter().filter(|n| n["available"] == true).count() == 3 {
            break;
        }
        assert!(Instant::now() < deadline, "3 nodes never became available: {nodes}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let ids = ["web-1", "web-2", "web-3", "web-4", "web-5", "web-6"];
    for id in ids {
        start(&cp_addr, id);
    }
    wait_until(&cp_addr, "all running", |l| ids.iter().all(|id| field(l, id, "status") == Some("running")));

    // P11: etcd holds the three nodes and their providers, nothing about instances.
    let keys = etcd_keys(&etcd, prefix);
    assert!(keys.iter().all(|k| k.starts_with("/factum-test/nodes/") || k.starts_with("/factum-test/providers/")));
    assert_eq!(keys.iter().filter(|k| k.contains("/nodes/")).count(), 3, "{keys:?}");
    assert!(keys.iter().all(|k| !ids.iter().any(|id| k.contains(id))), "instance data in etcd: {keys:?}");

    // SIGKILL the node running web-1.
    let before = json(&cp_addr, &["ps"]);
    let victim = field(before.as_array().unwrap(), "web-1", "node_id").unwrap().to_string();
    let lost: Vec<String> = before
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["node_id"] == victim.as_str())
        .map(|m| m["instance_id"].as_str().unwrap().to_string())
        .collect();
    let killed_at = Instant::now();
    agents.iter_mut().find(|(n, _)| *n == victim).unwrap().1.kill();
    wait_until(&cp_addr, "facts updated", |l| {
        lost.iter().all(|id| field(l, id, "status") != Some("running") || field(l, id, "node_id") != Some(&victim))
    });
    let facts_updated = killed_at.elapsed();
    wait_until(&cp_addr, "rescheduled", |l| {
        lost.iter().all(|id| field(l, id, "status") == Some("running") && field(l, id, "node_id") != Some(&victim))
    });
    let rescheduled = killed_at.elapsed();
    eprintln!("agent SIGKILL -> facts updated: {facts_updated:?}; -> instances running elsewhere: {rescheduled:?}");
    let survivors = json(&cp_addr, &["ps"]);
    for id in ids {
        assert_eq!(field(survivors.as_array().unwrap(), id, "status"), Some("running"), "{survivors}");
    }

    // Kill the control plane and start a new, empty one on the same address: it rebuilds from etcd + agents.
    cp.kill();
    let restarted_at = Instant::now();
    let _cp = control_plane(&cp_addr, &etcd, prefix);
    let rebuilt = wait_until(&cp_addr, "rebuild", |l| {
        ids.iter().all(|id| field(l, id, "status") == field(survivors.as_array().unwrap(), id, "status"))
            && ids.iter().all(|id| field(l, id, "node_id") == field(survivors.as_array().unwrap(), id, "node_id"))
    });
    eprintln!("control plane restart -> same instances listed: {:?} (poll {rebuilt:?})", restarted_at.elapsed());
    let after = json(&cp_addr, &["inspect", "web-1"]);
    assert_eq!(after["capabilities"][0]["capability_id"], "kv", "assignments rebuilt from the agent: {after}");
}

/// Minimal temporary directory (removed on drop), to avoid a dependency for one use.
mod tempdir {
    pub struct Dir(std::path::PathBuf);

    impl Dir {
        pub fn new(prefix: &str) -> Self {
            let unique = format!("{prefix}-{}-{}", std::process::id(), super::free_port());
            let path = std::env::temp_dir().join(unique);
            std::fs::create_dir_all(&path).unwrap();
            Dir(path)
        }

        pub fn path(&self) -> &std::path::Path {
            &self.0
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
