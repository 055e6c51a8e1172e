//! Control-plane scale: what one node's heartbeat (a full snapshot, and the delta an agent sends once the
//! control plane holds one), `ps` and a rebuild after a restart cost as a cluster grows from 1,000 to 100,000
//! instances over 10 nodes. The nodes are stand-ins: their snapshots are built here, sealed
//! as the control plane seals its placements, so only the control plane's own work is timed (plus, for `ps`, a
//! real tarpc client over loopback). The baseline of every row is its own 1,000-instance figure: per-instance
//! costs that stay flat are linear, ones that grow are not.
//!
//! Run with `cargo bench --bench cp_scale`; `FACTUM_BENCH_SCALES` overrides the sizes (e.g. `1000,10000`).

use std::pin::Pin;
use std::time::{Duration, Instant};

use factum_control_plane::{ControlPlane, ControlPlaneConfig, PlacementKey};
use factum_env::{rpc, Env};
use factum_proto::{
    ControlPlaneClient, InstanceFacts, InstanceMetadata, InstanceStatus, NodeReport, PolicyType, Principal,
    RestartPolicy, SnapshotMark, PROTOCOL_VERSION,
};

const NODES: usize = 10;
const BOOT: u64 = 7;

fn scales() -> Vec<usize> {
    std::env::var("FACTUM_BENCH_SCALES")
        .ok()
        .map(|s| s.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1_000, 10_000, 100_000])
}

/// Node `node`'s snapshot number `sequence`, holding `per_node` running instances.
fn snapshot(node: usize, per_node: usize, sequence: u64) -> NodeReport {
    let node_id = format!("node-{node}");
    let key = PlacementKey::plaintext();
    let instances = (0..per_node)
        .map(|i| {
            let instance_id = format!("i-{node}-{i}");
            InstanceFacts {
                seal: key.seal(&instance_id, &node_id, 1),
                metadata: InstanceMetadata {
                    instance_id,
                    node_id: node_id.clone(),
                    module_hash: "0".repeat(64),
                    created_at: 1_700_000_000_000,
                    status: InstanceStatus::Running,
                    restarts: 0,
                    last_error: None,
                    restart_streak: 0,
                    backoff_ms: None,
                },
                capabilities: Vec::new(),
                restart_policy: RestartPolicy { policy_type: PolicyType::Always, ..RestartPolicy::default() },
                config: Default::default(),
                constraints: Default::default(),
                seq: 2,
                epoch: 1,
                lease: None,
                accepted_after: SnapshotMark { boot: BOOT, sequence: 0 },
            }
        })
        .collect();
    NodeReport {
        protocol_version: PROTOCOL_VERSION,
        node_id: node_id.clone(),
        agent_addr: format!("127.0.0.1:{}", 20_000 + node),
        max_instances: u32::MAX,
        labels: Default::default(),
        drained: false,
        instances,
        boot: BOOT,
        sequence,
        base: None,
        removed: Vec::new(),
    }
}

/// Bytes of `report` as the wire's bincode frames it.
fn wire_bytes(report: &NodeReport) -> usize {
    let mut codec = tarpc::tokio_serde::formats::Bincode::<(), NodeReport>::default();
    tarpc::tokio_serde::Serializer::serialize(Pin::new(&mut codec), report).map(|b| b.len()).unwrap_or(0)
}

/// Median of `runs` timings of `f`.
fn median(runs: usize, mut f: impl FnMut() -> Duration) -> Duration {
    let mut times: Vec<Duration> = (0..runs).map(|_| f()).collect();
    times.sort();
    times[times.len() / 2]
}

struct Row {
    total: usize,
    rebuild: Duration,
    heartbeat: Duration,
    heartbeat_bytes: usize,
    delta: Duration,
    delta_bytes: usize,
    list: Duration,
    ps: Duration,
}

async fn measure(total: usize) -> Row {
    let per_node = total / NODES;
    let env = Env::tokio();
    let reports: Vec<NodeReport> = (0..NODES).map(|n| snapshot(n, per_node, 1)).collect();
    let heartbeat_bytes = wire_bytes(&reports[0]);

    // Rebuild: a fresh control plane learns every instance from one snapshot of each node.
    let mut cp = ControlPlane::new(env.clone(), ControlPlaneConfig::default());
    let rebuild = median(3, || {
        cp = ControlPlane::new(env.clone(), ControlPlaneConfig::default());
        let copies = reports.clone();
        let began = Instant::now();
        for report in copies {
            cp.report_node(report).expect("report");
        }
        began.elapsed()
    });
    assert_eq!(cp.list_instances().len(), per_node * NODES, "every instance learned");

    // Steady state: one node's next heartbeat, nothing changed.
    let mut sequence = 1;
    let heartbeat = median(9, || {
        sequence += 1;
        let report = snapshot(0, per_node, sequence);
        let began = Instant::now();
        cp.report_node(report).expect("heartbeat");
        began.elapsed()
    });

    // The same heartbeat as a delta against the snapshot the control plane holds: what an agent sends.
    let mut held = factum_proto::delta::facts_of(&snapshot(0, per_node, sequence));
    let mut delta_bytes = 0;
    let delta = median(9, || {
        sequence += 1;
        let full = snapshot(0, per_node, sequence);
        let mut report = full.clone();
        factum_proto::delta::into_delta(&mut report, sequence - 1, &held);
        delta_bytes = wire_bytes(&report);
        held = factum_proto::delta::facts_of(&full);
        let began = Instant::now();
        let ack = cp.report_node(report).expect("heartbeat");
        let took = began.elapsed();
        assert_eq!(ack.holding, Some(sequence), "the delta was applied");
        took
    });

    let list = median(9, || {
        let began = Instant::now();
        std::hint::black_box(cp.list_instances());
        began.elapsed()
    });

    // `ps`: an operator's tarpc client over loopback, decoding every row.
    let listener = env.net.bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    env.spawn(factum_control_plane::serve(cp.clone(), listener));
    let client_env = env.clone().with_principal(Principal::Operator("bench".into()));
    let stream = rpc::dial(&client_env, &addr, &Principal::ControlPlane).await.expect("dial");
    let client = rpc::start_client(&client_env, ControlPlaneClient::new(Default::default(), rpc::transport(stream)));
    let mut ps = Vec::new();
    for _ in 0..5 {
        let began = Instant::now();
        let rows = client.list_instances(rpc::rpc_context()).await.expect("rpc").expect("list");
        ps.push(began.elapsed());
        assert_eq!(rows.len(), per_node * NODES);
    }
    ps.sort();
    Row { total: per_node * NODES, rebuild, heartbeat, heartbeat_bytes, delta, delta_bytes, list, ps: ps[ps.len() / 2] }
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let rows: Vec<Row> = scales().into_iter().map(|n| runtime.block_on(measure(n))).collect();
    let Some(base) = rows.first() else { return };
    let per = |d: Duration, n: usize| d.as_secs_f64() * 1e9 / n as f64;
    println!("control plane at scale, {NODES} nodes (ns per instance; x = per-instance cost over the first row's)");
    println!(
        "{:>9} {:>22} {:>22} {:>22} {:>22} {:>22} {:>18}",
        "instances",
        "rebuild (10 snapshots)",
        "heartbeat, full",
        "heartbeat, delta",
        "list in-process",
        "ps over tarpc",
        "bytes full/delta"
    );
    for r in &rows {
        let per_node = r.total / NODES;
        // Time, ns per instance, and that per-instance cost over the first row's (`bn` its instances).
        let cell = |d: Duration, n: usize, b: Duration, bn: usize| {
            format!("{:>8.1} ms {:>5.0} {:>4.2}x", d.as_secs_f64() * 1e3, per(d, n), per(d, n) / per(b, bn))
        };
        println!(
            "{:>9} {:>22} {:>22} {:>22} {:>22} {:>22} {:>9} KiB/{:>4} B",
            r.total,
            cell(r.rebuild, r.total, base.rebuild, base.total),
            cell(r.heartbeat, per_node, base.heartbeat, base.total / NODES),
            cell(r.delta, per_node, base.delta, base.total / NODES),
            cell(r.list, r.total, base.list, base.total),
            cell(r.ps, r.total, base.ps, base.total),
            r.heartbeat_bytes / 1024,
            r.delta_bytes,
        );
    }
}
