//! Simulation with a registry: whichever agent dies and whenever, its lease expires, its `never` instances are
//! reported `unknown`, its `always` instances run again on the survivors, and no instance ever runs on two
//! nodes. A replay of the same seed gives the same trace hash.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // tests may panic

use factum_sim::scenario::{self, Scenario};
use proptest::prelude::*;

fn scenario(victim: usize, crash_at_ms: u64, partition_registry: bool) -> Scenario {
    let partition = if partition_registry {
        format!(
            "[[step]]\nat = \"{}ms\"\ndo = \"partition\"\na = \"etcd\"\nb = \"agent-{}\"\n",
            crash_at_ms + 500,
            victim % 3 + 1
        )
    } else {
        String::new()
    };
    Scenario::parse(&format!(
        r#"
name = "lease expiry (generated)"
agents = 3
duration = "20s"
registry = true
[[step]]
at = "1s"
do = "start"
instances = 4
policy = "always"
[[step]]
at = "1500ms"
do = "start"
instances = 2
policy = "never"
[[step]]
at = "{crash_at_ms}ms"
do = "crash"
node = "agent-{victim}"
{partition}
[[always]]
check = "single_placement"
[[always]]
check = "registry_only_membership"
[[eventually]]
check = "always_running"
by = "19s"
[[eventually]]
check = "dead_nodes_unknown"
by = "19s"
"#
    ))
    .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(100))]

    /// Feature: wasm-orchestrator, Property 12: Node Failure Resilience
    /// Feature: wasm-orchestrator, Property 14: Actual Status Reporting
    /// Feature: wasm-orchestrator, Property 11: etcd Limited Usage When Enabled
    #[test]
    fn a_lost_node_is_reported_and_its_reschedulable_instances_run_elsewhere(
        seed in any::<u64>(), victim in 1usize..=3, crash_at_ms in 2_500u64..8_000, partition_registry in any::<bool>(),
    ) {
        let s = scenario(victim, crash_at_ms, partition_registry);
        if let Err(failure) = scenario::run(&s, seed) {
            prop_assert!(false, "{}\n{}", failure.message, failure.timeline.join("\n"));
        }
    }
}

#[test]
fn same_seed_same_trace_hash_with_a_registry() {
    let s = scenario(2, 4_000, true);
    let first = scenario::run(&s, 11).unwrap_or_else(|f| panic!("{}", f.message));
    let second = scenario::run(&s, 11).unwrap_or_else(|f| panic!("{}", f.message));
    assert_eq!(first.trace_hash, second.trace_hash);
    assert!(first.timeline.iter().any(|line| line.contains("reschedule")), "the crash must cause rescheduling");
}
