//! Simulation: an agent host crashes under a running cluster.
//!
//! Checks Property 12 (Node Failure Resilience), Property 14 (Actual Status Reporting) and Property 6
//! (placement across nodes), and that a seed replays bit-for-bit.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // tests may panic

/// Feature: wasm-orchestrator, Property 12: Node Failure Resilience
/// Feature: wasm-orchestrator, Property 14: Actual Status Reporting
#[test]
fn agent_crash_marks_its_instances_unknown_and_spares_the_rest() {
    for seed in [1, 2, 3, 42] {
        let outcome = factum_sim::agent_crash(seed).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(outcome.final_instances.len(), 6);
        assert!(outcome.events > 0);
    }
}

#[test]
fn same_seed_same_trace_hash() {
    let first = factum_sim::agent_crash(7).unwrap_or_else(|e| panic!("{e}"));
    let second = factum_sim::agent_crash(7).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(first.trace_hash, second.trace_hash, "seed 7 did not replay");
    assert_eq!(first.events, second.events);
}
