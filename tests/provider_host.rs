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
