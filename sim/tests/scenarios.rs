//! Every scenario under `scenarios/` passes its checks on a fixed seed set, and replays to the same trace hash.
//!
//! Checks named by the scenarios: single placement (safety), Property 5 (registry matches agents),
//! Properties 12, 13 and 14 (facts match agents after crashes, partitions and control-plane restarts).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // tests may panic

use std::path::Path;

use factum_sim::scenario;

fn scenarios() -> Vec<(String, scenario::Scenario)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios");
    let all = scenario::load_dir(&dir).unwrap_or_else(|e| panic!("{e}"));
    assert!(all.len() >= 4, "expected the scenario files, found {}", all.len());
    all
}

/// Feature: wasm-orchestrator, Property 13: Execution Facts Recording
/// Feature: wasm-orchestrator, Property 12: Node Failure Resilience
#[test]
fn every_scenario_passes_on_the_fixed_seeds() {
    for (path, scenario) in scenarios() {
        for seed in 1..=3 {
            if let Err(e) = scenario::run(&scenario, seed) {
                panic!("{e}\n  replay: cargo run -p factum-sim -- replay {path} --seed {seed}");
            }
        }
    }
}

#[test]
fn every_scenario_replays_bit_for_bit() {
    for (path, scenario) in scenarios() {
        let first = scenario::run(&scenario, 11).unwrap_or_else(|e| panic!("{e}"));
        let second = scenario::run(&scenario, 11).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(first.trace_hash, second.trace_hash, "{path} did not replay");
        assert_eq!(first.timeline, second.timeline);
    }
}

#[test]
fn bad_scenarios_are_refused_with_a_reason() {
    let unknown_check = "name='x'\nagents=1\nduration='5s'\n[[always]]\ncheck='frobnicate'\n";
    let refused = scenario::Scenario::parse(unknown_check).unwrap_err();
    assert!(refused.contains("unknown check"), "{refused}");
    // The hint lists every check, from the one table the checks are run from.
    for known in ["none_running", "restarts:<n>", "node_unknown:<node>", "always_running"] {
        assert!(refused.contains(known), "{refused} lacks {known}");
    }
    let bad_node = "name='x'\nagents=1\nduration='5s'\n[[step]]\nat='1s'\ndo='crash'\nnode='agent-9'\n";
    assert!(scenario::Scenario::parse(bad_node).unwrap_err().contains("node"));
    let late = "name='x'\nagents=1\nduration='5s'\n[[step]]\nat='9s'\ndo='heal'\n";
    assert!(scenario::Scenario::parse(late).unwrap_err().contains("after the end"));
    assert!(scenario::Scenario::parse("name='x'\nagents=0\nduration='5s'\n").is_err());
    // A field the action does not take is refused, not ignored.
    let stray = "name='x'\nagents=1\nduration='5s'\n[[step]]\nat='1s'\ndo='crash'\nnode='agent-1'\ninstances=3\n";
    assert!(scenario::Scenario::parse(stray).unwrap_err().contains("does not take `instances`"));
    let bad_duration = "name='x'\nagents=1\nduration='5 sekunds'\n";
    assert!(scenario::Scenario::parse(bad_duration).unwrap_err().contains("expected a duration"));
}

/// Found while building the registry: a host crash drops its tasks, and tasks made with a bare `tokio::spawn`
/// were dropped in an order set by process-global task ids, so another thread creating tasks changed a run.
/// Every product task now goes through the env's spawner (a `LocalSet` in simulation).
#[test]
fn replays_bit_for_bit_while_other_threads_create_tasks() {
    let path = format!("{}/../scenarios/agent_restart_during_starts.toml", env!("CARGO_MANIFEST_DIR"));
    let scenario = scenario::Scenario::load(std::path::Path::new(&path)).unwrap();
    let first = scenario::run(&scenario, 11).unwrap_or_else(|e| panic!("{e}"));
    let churn = std::thread::spawn(|| {
        for _ in 0..2_000 {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            rt.block_on(async {
                for _ in 0..50 {
                    tokio::spawn(async {}).await.unwrap();
                }
            });
        }
    });
    let second = scenario::run(&scenario, 11).unwrap_or_else(|e| panic!("{e}"));
    churn.join().unwrap();
    assert_eq!(first.timeline, second.timeline);
    assert_eq!(first.trace_hash, second.trace_hash);
}

/// Swarm seeds that once failed, kept as regressions. 20314: random message loss left the scenario client's
/// connection stuck (a lost segment, so a response that never completes); every later call timed out after
/// 5 s and the script overran the run. The client now dials anew after a timeout, as the product's clients do.
/// 777175: like the scenario seeds below, a false P4 alarm from a check that sampled grants. 7100006: the
/// liveness check's first find, an `always` instance lost with its agent's process (no registry) and never
/// run again; the control plane now starts again on the node what its fresh snapshot lacks. 10698383: the same,
/// hidden by the simulator: a restarted host's wall clock started over from the run's origin, so the new
/// agent's snapshots looked older than the instances they lacked.
/// 50001006: an `always` instance lost with its agent after the control plane restarted (no registry): the
/// restarted control plane had learned the instance from a heartbeat but never fetched its module bytes, so it
/// could not run it again; it now fetches them from the agent that reports it. (Seeds name scenarios of the
/// swarm generator as of the commit that added them.)
const SWARM_REGRESSIONS: &[u64] = &[20314, 777175, 7100006, 10698383, 50001006];

/// (scenario, seed) pairs that once failed. `agent_restart_during_starts` 43 … 86: an instance started, made a
/// KV call under a grant it held, and its agent restarted within one 50 ms sample, so no sample ever showed
/// the grant and the sampled P4 check cried wolf. P4 now follows the agents' own grant events.
const SCENARIO_REGRESSIONS: &[(&str, u64)] = &[
    ("agent_restart_during_starts.toml", 43),
    ("agent_restart_during_starts.toml", 49),
    ("agent_restart_during_starts.toml", 54),
    ("agent_restart_during_starts.toml", 72),
    ("agent_restart_during_starts.toml", 74),
    ("agent_restart_during_starts.toml", 75),
    ("agent_restart_during_starts.toml", 80),
    ("agent_restart_during_starts.toml", 85),
    ("agent_restart_during_starts.toml", 86),
    // A heartbeat snapshot taken just before a start landed arrived after the start's answer, and a control
    // plane that started lost instances again took it for a loss; the agent then replaced the instance while
    // it waited out a restart backoff, and two supervisors restarted it past max_retries (P8). Snapshots now
    // carry when they were taken, and a supervised instance is never replaced.
    ("backoff_storm.toml", 8997755),
    ("backoff_storm.toml", 8997761),
    // When etcd thawed, every node left and rejoined at once. A reschedule pass started when a node left went
    // on awaiting starts while the node rejoined and one of its instances was started there again under the
    // new lease; the pass then moved that instance too, and it ran on two nodes. A placement under the node's
    // live lease is no longer a lost one.
    ("agent_pause.toml", 300000040),
    ("agent_pause.toml", 300000120),
    // A start's answer was lost in a partition after the agent had already reported the run crashed: the
    // control plane turned the reported `crashed` into `unknown` (P14). Facts of the placement mean it took.
    ("backoff_storm.toml", 696011724),
    ("lossy_network_skewed_clocks.toml", 696011609),
    // Without a registry, a placement retry on a node that had only missed its heartbeats (message loss)
    // rescheduled every instance there as if the node had left; nothing had fenced it, and one ran on two
    // nodes. Without a registry no node leaves: only placements that did not take go elsewhere.
    ("drain_remove_lossy.toml", 23000735),
    // Both nodes came back after an outage and the control plane rescheduled its four instances one at a time,
    // each awaiting its start; three slow starts (1.5 s each) in a row missed the settle deadline. A pass now
    // sends its starts together.
    ("nodes_return.toml", 28000596),
];

#[test]
fn scenario_regressions_stay_fixed() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios");
    for &(file, seed) in SCENARIO_REGRESSIONS {
        let scenario = scenario::Scenario::load(&dir.join(file)).unwrap();
        if let Err(e) = scenario::run(&scenario, seed) {
            panic!("{e}\n  replay: cargo run -p factum-sim -- replay scenarios/{file} --seed {seed}");
        }
    }
}

#[test]
fn swarm_regressions_stay_fixed() {
    // Shrunk swarm failures, stored as scenario files named by their seed: unlike a swarm seed, a file does not
    // change meaning when the swarm's generator changes.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/regressions");
    for (path, scenario) in scenario::load_dir(&dir).unwrap_or_else(|e| panic!("{e}")) {
        let stem = Path::new(&path).file_stem().and_then(|s| s.to_str()).unwrap_or_default();
        let seed: u64 = stem.parse().unwrap_or_else(|_| panic!("{path}: the file name must be the seed"));
        if let Err(e) = scenario::run(&scenario, seed) {
            panic!("{e}\n  replay: cargo run -p factum-sim -- replay {path} --seed {seed}");
        }
    }
    for &seed in SWARM_REGRESSIONS {
        let swarm = scenario::Scenario::swarm(seed, 3, std::time::Duration::from_secs(40));
        if let Err(e) = scenario::run(&swarm, seed) {
            panic!("{e}\n  replay: cargo run -p factum-sim -- swarm --seeds 1 --start {seed}");
        }
    }
}

#[test]
fn swarm_starts_spend_their_restarts_well_before_the_deadline() {
    // A swarm's API steps can finish late (a start waits out the faults, a revoke queues behind it), and an
    // instance with retries left must have run or spent them by the eventual deadline: every start's whole
    // backoff chain, with the most jitter (10 %), fits in a second. (Seed 659275694 failed CI when the subscribers'
    // 1 s base started doubling: 1 + 2 + 4 s after a revoke at 30.8 s did not settle by 39 s.)
    use factum_proto::types::{PolicyType, RestartPolicy};
    for seed in 0..500 {
        let swarm = scenario::Scenario::swarm(seed, 3, std::time::Duration::from_secs(40));
        for step in swarm.steps.iter().filter(|s| s.action == scenario::Action::Start) {
            let policy_type: PolicyType = step.policy.as_deref().unwrap_or("never").parse().expect("policy");
            let policy = RestartPolicy { policy_type, max_retries: step.max_retries, backoff_seconds: step.backoff };
            let Some(max) = policy.max_retries.filter(|_| policy_type != PolicyType::Never) else {
                continue;
            };
            let chain: std::time::Duration = (1..=max).map(|streak| policy.backoff(streak, 100)).sum();
            assert!(chain <= std::time::Duration::from_secs(1), "seed {seed}: {policy} waits {chain:?} in all");
        }
    }
}
