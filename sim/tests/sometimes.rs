//! Sometimes-assertions: a swarm of 30 seeds must reach every goal of [`factum_sim::sometimes::GOALS`] (every
//! kind of fault, crashes and restarts by policy, fencing, lease expiry, rescheduling) at least once, and pass.
//! A fault kind the swarm stopped drawing, or a path the faults stopped reaching, fails here instead of
//! silently shrinking what the simulator tests.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // tests may panic

use std::collections::BTreeMap;
use std::time::Duration;

use factum_sim::scenario::{self, Scenario};
use factum_sim::sometimes;

#[test]
fn a_small_swarm_reaches_every_goal() {
    let mut reached: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for seed in 1..=30 {
        let swarm = Scenario::swarm(seed, 3, Duration::from_secs(40));
        let outcome = scenario::run(&swarm, seed).unwrap_or_else(|e| panic!("swarm seed {seed}: {e}"));
        for goal in sometimes::reached(&outcome.timeline) {
            reached.entry(goal).or_default().push(seed);
        }
    }
    let missing: Vec<&str> = sometimes::GOALS.iter().map(|g| g.name).filter(|g| !reached.contains_key(g)).collect();
    assert!(missing.is_empty(), "never reached in 30 swarm seeds: {missing:?}; reached: {reached:?}");
}

/// The provider discovery scenario reaches what it is for: a crashed host leaves every agent's routing once its
/// lease expires and comes back when it registers again, and reads go on to the other host while a crashed one
/// is still routed to. A routing rule that never changed, or reads that were never retried, fail here.
#[test]
fn provider_discovery_routes_around_dead_hosts_and_reroutes_reads() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios/provider_discovery.toml");
    let discovery = Scenario::load(&path).unwrap();
    for seed in 1..=2 {
        let outcome = scenario::run(&discovery, seed).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        let routed = |what: &str| {
            outcome.timeline.iter().any(|l| l.split_whitespace().skip(2).collect::<Vec<_>>().join(" ") == what)
        };
        let routing = factum_node_agent::ROUTING;
        assert!(routed(&format!("{routing} kv kv-2")), "seed {seed}: kv-1 never left routing");
        assert!(routed(&format!("{routing} kv kv-1")), "seed {seed}: kv-2 never left routing");
        assert!(routed(&format!("{routing} kv kv-1,kv-2")), "seed {seed}: the hosts were never routed to together");
        let rerouted = format!(" {} kv get ", factum_providers::REROUTED);
        assert!(outcome.timeline.iter().any(|l| l.contains(&rerouted)), "seed {seed}: no read went on");
        assert!(outcome.timeline.iter().all(|l| !l.contains(" rerouted kv set ")), "seed {seed}: a write was retried");
    }
}
