//! A real cluster: etcd (the `etcd` binary), one control plane and three agents as separate `factum`
//! processes. An agent is killed with SIGKILL: its instances turn `unknown` once its lease expires and are
//! rescheduled onto the survivors. The control plane is killed and restarted: it rebuilds the same instances
//! from etcd membership and the agents' facts. etcd never holds anything but nodes and providers (P11). Every
//! factum connection is mutual TLS, with certificates from `factum certs`.
//!
//! Needs `etcd` on PATH (see [`common::etcd_available`]).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // tests may panic

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{etcd_available, factum_daemon, free_port, start_etcd, Proc, FACTUM};

/// A CA and certificates for the control plane, operator/local and nodes n1, n2 and n3, in `dir/certs`.
fn certificates(dir: &std::path::Path) -> String {
    let certs = dir.join("certs").to_string_lossy().into_owned();
    for args in [
        vec!["certs", "init", "--dir", &certs],
        vec!["certs", "issue", "node/n1", "node/n2", "node/n3", "--dir", &certs],
    ] {
        let out = Command::new(FACTUM).args(&args).output().unwrap();
        assert!(out.status.success(), "factum {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    certs
}

fn control_plane(addr: &str, etcd: &str, prefix: &str, tls: &str) -> Proc {
    factum_daemon(
        &["control-plane", "--listen", addr, "--etcd", etcd, "--etcd-prefix", prefix, "--tls", tls],
        "control plane listening",
    )
}

fn agent(node: &str, cp: &str, etcd: &str, prefix: &str, tls: &str) -> Proc {
    factum_daemon(
        &[
            "agent",
            "--tls",
            tls,
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

fn json(cp: &str, tls: &str, args: &[&str]) -> serde_json::Value {
    let out =
        Command::new(FACTUM).args(args).args(["--control-plane", cp, "-o", "json", "--tls", tls]).output().unwrap();
    assert!(out.status.success(), "factum {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn start(cp: &str, tls: &str, id: &str) {
    let sleeper = format!("{}/guests/fixtures/sleeper.wat", env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(FACTUM)
        .args(["start", &sleeper, "--restart", "always", "--id", id, "--cap", "kv=kv:read", "--control-plane", cp])
        .args(["--tls", tls])
        .output()
        .unwrap();
    assert!(out.status.success(), "start {id}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Polls until `check` holds on `factum ps`, returning how long it took.
fn wait_until(cp: &str, tls: &str, what: &str, check: impl Fn(&[serde_json::Value]) -> bool) -> Duration {
    let began = Instant::now();
    loop {
        let out =
            Command::new(FACTUM).args(["ps", "-o", "json", "--control-plane", cp, "--tls", tls]).output().unwrap();
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
    let (_etcd, etcd, dir) = start_etcd();
    let tls = &certificates(dir.path());
    let prefix = "/factum-test";
    let cp_addr = format!("127.0.0.1:{}", free_port());
    let mut cp = control_plane(&cp_addr, &etcd, prefix, tls);
    let mut agents: Vec<(String, Proc)> =
        ["n1", "n2", "n3"].iter().map(|n| (n.to_string(), agent(n, &cp_addr, &etcd, prefix, tls))).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let nodes = json(&cp_addr, tls, &["nodes"]);
        if nodes.as_array().unwrap().iter().filter(|n| n["available"] == true).count() == 3 {
            break;
        }
        assert!(Instant::now() < deadline, "3 nodes never became available: {nodes}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let ids = ["web-1", "web-2", "web-3", "web-4", "web-5", "web-6"];
    for id in ids {
        start(&cp_addr, tls, id);
    }
    wait_until(&cp_addr, tls, "all running", |l| ids.iter().all(|id| field(l, id, "status") == Some("running")));

    // P11: etcd holds the three nodes and their providers, nothing about instances.
    let keys = etcd_keys(&etcd, prefix);
    assert!(keys.iter().all(|k| k.starts_with("/factum-test/nodes/") || k.starts_with("/factum-test/providers/")));
    assert_eq!(keys.iter().filter(|k| k.contains("/nodes/")).count(), 3, "{keys:?}");
    assert!(keys.iter().all(|k| !ids.iter().any(|id| k.contains(id))), "instance data in etcd: {keys:?}");

    // SIGKILL the node running web-1.
    let before = json(&cp_addr, tls, &["ps"]);
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
    wait_until(&cp_addr, tls, "facts updated", |l| {
        lost.iter().all(|id| field(l, id, "status") != Some("running") || field(l, id, "node_id") != Some(&victim))
    });
    let facts_updated = killed_at.elapsed();
    wait_until(&cp_addr, tls, "rescheduled", |l| {
        lost.iter().all(|id| field(l, id, "status") == Some("running") && field(l, id, "node_id") != Some(&victim))
    });
    let rescheduled = killed_at.elapsed();
    eprintln!("agent SIGKILL -> facts updated: {facts_updated:?}; -> instances running elsewhere: {rescheduled:?}");
    let survivors = json(&cp_addr, tls, &["ps"]);
    for id in ids {
        assert_eq!(field(survivors.as_array().unwrap(), id, "status"), Some("running"), "{survivors}");
    }

    // Kill the control plane and start a new, empty one on the same address: it rebuilds from etcd + agents.
    cp.kill();
    let restarted_at = Instant::now();
    let _cp = control_plane(&cp_addr, &etcd, prefix, tls);
    let rebuilt = wait_until(&cp_addr, tls, "rebuild", |l| {
        ids.iter().all(|id| field(l, id, "status") == field(survivors.as_array().unwrap(), id, "status"))
            && ids.iter().all(|id| field(l, id, "node_id") == field(survivors.as_array().unwrap(), id, "node_id"))
    });
    eprintln!("control plane restart -> same instances listed: {:?} (poll {rebuilt:?})", restarted_at.elapsed());
    let after = json(&cp_addr, tls, &["inspect", "web-1"]);
    assert_eq!(after["capabilities"][0]["capability_id"], "kv", "assignments rebuilt from the agent: {after}");
}

/// A node id is held by one live lease at a time, in etcd as in the in-memory registry: a registration under
/// another lease is `Taken` (a second agent under the same id cannot take over the entry, nor a restarted node
/// before its old lease ends); the holder may write its entry again; once the lease ends, the id is free.
#[test]
fn node_registration_is_create_if_absent_in_etcd_and_in_memory() {
    use factum_registry::{EtcdRegistry, MemoryRegistry, NodeRegistration, Registry, RegistryError};
    if !etcd_available() {
        return;
    }
    let (_etcd, endpoint, _dir) = start_etcd();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let env = factum_env::Env::tokio();
        let etcd = EtcdRegistry::connect(env.clone(), &[endpoint], "/taken", Duration::from_secs(5)).await.unwrap();
        let memory = MemoryRegistry::new(env, "/taken");
        for registry in [&etcd as &dyn Registry, &memory] {
            let node = |lease| NodeRegistration {
                node_id: "n1".into(),
                agent_addr: "127.0.0.1:1".into(),
                max_instances: 1,
                protocol_version: 1,
                lease,
            };
            let first = registry.grant_lease(Duration::from_secs(30)).await.unwrap();
            let second = registry.grant_lease(Duration::from_secs(30)).await.unwrap();
            registry.register_node(&node(first), first).await.unwrap();
            registry.register_node(&node(first), first).await.unwrap();
            let taken = registry.register_node(&node(second), second).await;
            assert_eq!(taken, Err(RegistryError::Taken { node_id: "n1".into(), lease: first }));
            assert_eq!(registry.membership().await.unwrap().nodes, [node(first)], "the holder's entry stays");
            registry.revoke_lease(first).await.unwrap();
            registry.register_node(&node(second), second).await.unwrap();
            assert_eq!(registry.membership().await.unwrap().nodes, [node(second)]);
        }
    });
}
