//! The agent's link to the control plane: status reports as they happen (P9), and a periodic snapshot that
//! doubles as registration and heartbeat. A control plane that restarted rebuilds its maps from the next
//! snapshot; a report lost to a network fault is repaired by the next snapshot too. A snapshot goes whole once,
//! then as changes against the last one the control plane said it holds ([`factum_proto::delta`]).

use std::time::Duration;

use factum_env::rpc;
use factum_proto::{delta, ControlPlaneClient, Principal};

use crate::{Agent, StatusReports};

/// Keeps the agent connected to the control plane at `control_plane_addr`: sends every status report and a
/// snapshot each heartbeat interval, reconnecting after failures. Runs until the agent's runtime ends.
pub async fn run_control_plane_link(agent: Agent, control_plane_addr: String, mut reports: StatusReports) {
    let env = agent.inner.env.clone();
    let interval = agent.inner.config.heartbeat_interval;
    let timeout = agent.inner.config.rpc_timeout;
    let mut client: Option<ControlPlaneClient> = None;
    let mut next_heartbeat = Duration::ZERO;
    let mut previous: Option<factum_proto::NodeReport> = None;
    // The snapshot the control plane holds (its number and facts): the base of the next delta.
    let mut base: Option<(u64, delta::SnapshotFacts)> = None;
    loop {
        if client.is_none() {
            match env.timeout(timeout, rpc::dial(&env, &control_plane_addr, &Principal::ControlPlane)).await {
                Some(Ok(stream)) => {
                    let new = ControlPlaneClient::new(tarpc::client::Config::default(), rpc::transport(stream));
                    client = Some(rpc::start_client(&env, new));
                    next_heartbeat = Duration::ZERO;
                    base = None; // the other end may be another control plane now
                    tracing::info!(node = agent.node_id(), control_plane = %control_plane_addr, "connected to control plane");
                }
                _ => {
                    tracing::debug!(node = agent.node_id(), control_plane = %control_plane_addr, "control plane unreachable");
                    env.clock.sleep(interval).await;
                    continue;
                }
            }
        }
        let Some(cp) = client.clone() else { continue };
        let now = env.clock.now();
        if now >= next_heartbeat {
            let mut report = agent.node_report();
            let (sequence, facts) = (report.sequence, delta::facts_of(&report));
            if let Some(stale) = previous.take().filter(|_| env.buggify("agent.replay_snapshot")) {
                // A snapshot that arrives late, after newer ones: as one sent on a connection given up for dead
                // may, when another connection has already carried its successors.
                let (late, env2, cp2) = (stale, env.clone(), cp.clone());
                env.spawn(async move {
                    env2.clock.sleep(Duration::from_millis(env2.rng.next_u64() % 3_000)).await;
                    let _ = env2.timeout(Duration::from_secs(5), cp2.report_node(rpc::rpc_context(), late)).await;
                });
            }
            previous = Some(report.clone());
            if let Some((base_sequence, base_facts)) = base.take() {
                delta::into_delta(&mut report, base_sequence, &base_facts);
                if agent.inner.config.has_bug(crate::AgentBug::DeltaWithoutRemovals) {
                    report.removed.clear();
                }
            }
            let report_was_delta = report.base.is_some();
            match env.timeout(timeout, cp.report_node(rpc::rpc_context(), report)).await {
                Some(Ok(Ok(ack))) => {
                    let holds = ack.holding == Some(sequence);
                    agent.renew_seals(ack.renewed);
                    if holds {
                        base = Some((sequence, facts));
                    } else if report_was_delta {
                        continue; // it lacks the base (it restarted, or lost a report): send it all now
                    }
                }
                Some(Ok(Err(refused))) => tracing::error!(error = %refused, "control plane refused this node"),
                _ => {
                    client = None;
                    continue;
                }
            }
            next_heartbeat = env.clock.now() + interval;
        }
        let wait = next_heartbeat.saturating_sub(env.clock.now());
        let report = tokio::select! {
            biased; // tokio's unbiased select draws from an unseeded RNG: keep simulated runs deterministic
            report = reports.recv() => report,
            () = env.clock.sleep(wait) => continue,
        };
        let Some(report) = report else {
            return; // the agent is gone
        };
        if !matches!(env.timeout(timeout, cp.report_status(rpc::rpc_context(), report)).await, Some(Ok(Ok(())))) {
            client = None; // the next snapshot carries what this report said
        }
    }
}
