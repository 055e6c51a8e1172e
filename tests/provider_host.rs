//! A capability provider as a process of its own (P17), with real processes: `factum provider kv` on its own
//! port, a control plane, and agents on two nodes that send their KV calls there (`--provider-host`). Guests on
//! both nodes use the one store; killing the provider makes their calls PROVIDER_UNAVAILABLE, and they recover
//! once it is back.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // tests may panic

use std::time::{Duration, Instant};

mod common;

use common::*;

/// The count of `node`'s KV calls that ended with `outcome`, from its `/metrics` at `addr`.
fn kv_calls(addr: &str, node: &str, outcome: &str) -> f64 {
    let (_, metrics) = http_get(addr, "/metrics");
    let (node, outcome) = (format!(r#"node="{node}""#), format!(r#"outcome="{outcome}""#));
    sample(&metrics, "factum_agent_capability_calls_total", &[&node, r#"provider="kv""#, &outcome]).unwrap_or(0.0)
}

/// Waits until `what` holds, for at most 20 s.
fn eventually(what: &str, mut holds: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !holds() {
        assert!(Instant::now() < deadline, "never: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn guests_on_two_nodes_share_a_provider_host_that_is_unavailable_while_killed() {
    let addr = format!("127.0.0.1:{}", free_port());
    let provider = || factum_daemon(&["provider", "kv", "--id", "kv-1", "--listen", &addr], "listening on");
    let mut host = provider();
    let (_control_plane, cp) = control_plane();
    let route = format!("kv=kv-1@{addr}");
    let metrics = [format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port())];
    let _agents = [("n1", &metrics[0]), ("n2", &metrics[1])]
        .map(|(node, m)| agent(node, &cp, &["--provider-host", &route, "--metrics-listen", m]));
    wait_for_nodes(&cp, 2);

    // One greeter per node; each writes through the provider host once a second, and exits 1 on any failure.
    ok(
        &cp,
        &[
            "start",
            &fixture("kv_greeter"),
            "--replicas",
            "2",
            "--id",
            "g",
            "--cap",
            "kv=kv:write",
            "--restart",
            "always",
        ],
    );
    let nodes: Vec<String> = ["g-0", "g-1"]
        .iter()
        .map(|id| {
            let inspect: serde_json::Value = serde_json::from_str(&ok(&cp, &["inspect", id, "-o", "json"])).unwrap();
            inspect["metadata"]["node_id"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(nodes, ["n1", "n2"]);
    for ((node, m), id) in ["n1", "n2"].iter().zip(&metrics).zip(["g-0", "g-1"]) {
        wait_for_status(&cp, id, "running");
        eventually(&format!("{node} writes through the provider host"), || kv_calls(m, node, "ok") >= 1.0);
    }

    // The provider host checks permissions itself: a write under a read-only grant is refused there (the
    // greeter then exits 1), and the agent counts the denial as a KV call's.
    ok(&cp, &["start", &fixture("kv_greeter"), "--id", "reader", "--cap", "kv=kv:read"]);
    wait_for_status(&cp, "reader", "crashed");
    let denied: f64 = ["n1", "n2"].iter().zip(&metrics).map(|(node, m)| kv_calls(m, node, "PERMISSION_DENIED")).sum();
    assert_eq!(denied, 1.0);

    host.kill();
    for (node, m) in ["n1", "n2"].iter().zip(&metrics) {
        eventually(&format!("{node}'s calls are unavailable"), || kv_calls(m, node, "PROVIDER_UNAVAILABLE") >= 1.0);
    }

    let _host = provider(); // restarted on the same address: the agents dial it again
    let before: Vec<f64> = ["n1", "n2"].iter().zip(&metrics).map(|(node, m)| kv_calls(m, node, "ok")).collect();
    for ((node, m), was) in ["n1", "n2"].iter().zip(&metrics).zip(before) {
        eventually(&format!("{node} writes again"), || kv_calls(m, node, "ok") > was);
    }
    for id in ["g-0", "g-1"] {
        wait_for_status(&cp, id, "running");
    }
}

/// The pids of live processes whose command line holds `needle` as one argument.
fn pids_with_arg(needle: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            // A killed child stays a zombie (empty cmdline) until its parent reaps it.
            cmdline.split(|b| *b == 0).any(|arg| arg == needle.as_bytes())
        })
        .collect()
}

#[test]
fn an_agent_restarts_the_provider_host_it_runs_and_the_host_ends_with_the_agent() {
    let (_control_plane, cp) = control_plane();
    let id = format!("kv-sup-{}", free_port()); // unique: the test finds its process by this id
    let route = format!("kv={id}@127.0.0.1:{}", free_port());
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut agent = agent("n1", &cp, &["--run-provider", &route, "--metrics-listen", &metrics]);
    wait_for_nodes(&cp, 1);
    eventually("the agent runs its provider host", || pids_with_arg(&id).len() == 1);
    let first = pids_with_arg(&id)[0];

    ok(&cp, &["start", &fixture("kv_greeter"), "--id", "g", "--cap", "kv=kv:write", "--restart", "always"]);
    wait_for_status(&cp, "g", "running");
    eventually("the greeter writes through the agent's provider host", || kv_calls(&metrics, "n1", "ok") >= 1.0);

    let killed = std::process::Command::new("kill").args(["-9", &first.to_string()]).status().unwrap();
    assert!(killed.success());
    eventually("calls are unavailable while it is down", || kv_calls(&metrics, "n1", "PROVIDER_UNAVAILABLE") >= 1.0);
    eventually("the agent started it again", || pids_with_arg(&id).iter().any(|pid| *pid != first));
    let was = kv_calls(&metrics, "n1", "ok");
    eventually("the greeter writes again", || kv_calls(&metrics, "n1", "ok") > was);
    wait_for_status(&cp, "g", "running");

    agent.kill(); // SIGKILL: no clean shutdown, yet its child's stdin closes
    eventually("the provider host ends with its agent", || pids_with_arg(&id).is_empty());
}

#[test]
fn agents_find_provider_hosts_in_etcd_and_drop_one_whose_lease_expired() {
    if !etcd_available() {
        return;
    }
    let (_etcd, etcd, _dir) = start_etcd();
    let prefix = format!("/factum-discovery-{}", free_port());
    let registry = ["--etcd", &etcd, "--etcd-prefix", &prefix];
    let host = |id: &str, node: &str| {
        let addr = format!("127.0.0.1:{}", free_port());
        let args = ["provider", "kv", "--id", id, "--listen", &addr, "--node", node, "--lease-ttl", "2s"];
        factum_daemon(&[&args[..], &registry[..]].concat(), "registers as")
    };
    // One host on each node: each node's calls go to its own.
    let mut kv_a = host("kv-a", "n1");
    let _kv_b = host("kv-b", "n2");
    let cp = format!("127.0.0.1:{}", free_port());
    let _control_plane =
        factum_daemon(&[&["control-plane", "--listen", &cp][..], &registry[..]].concat(), "control plane listening");
    let metrics = [format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port())];
    let _agents = [("n1", &metrics[0]), ("n2", &metrics[1])].map(|(node, m)| {
        let label = format!("node={node}");
        let flags = ["--provider-from-registry", "kv", "--metrics-listen", m, "--lease-ttl", "4s", "--label", &label];
        agent(node, &cp, &[&flags[..], &registry[..]].concat())
    });
    wait_for_nodes(&cp, 2);

    for node in ["n1", "n2"] {
        let (id, on) = (format!("g-{node}"), format!("node={node}"));
        let start = ["start", &fixture("kv_greeter"), "--id", &id, "--cap", "kv=kv:write", "--constraint", &on];
        ok(&cp, &[&start[..], &["--restart", "always"]].concat());
    }
    for (node, m) in ["n1", "n2"].iter().zip(&metrics) {
        eventually(&format!("{node} writes through a provider host it found"), || kv_calls(m, node, "ok") >= 1.0);
    }

    // n1's own host dies: n1's writes fail until its lease expires, then go to n2's host. Nobody restarts it.
    let n2_unavailable = kv_calls(&metrics[1], "n2", "PROVIDER_UNAVAILABLE");
    kv_a.kill();
    eventually("n1's writes are unavailable", || kv_calls(&metrics[0], "n1", "PROVIDER_UNAVAILABLE") >= 1.0);
    let was = kv_calls(&metrics[0], "n1", "ok");
    eventually("n1 writes through n2's host", || kv_calls(&metrics[0], "n1", "ok") > was);
    let n2_ok = kv_calls(&metrics[1], "n2", "ok");
    eventually("n2 writes on", || kv_calls(&metrics[1], "n2", "ok") > n2_ok);
    let unavailable = kv_calls(&metrics[1], "n2", "PROVIDER_UNAVAILABLE");
    assert_eq!(unavailable, n2_unavailable, "n2 never used the dead host");
}
