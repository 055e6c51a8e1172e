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
