//! The tester is tested: deliberately injected bugs must be caught by a sweep of the scenarios within a few
//! seeds, each failure naming the seed to replay.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // tests may panic

use std::path::Path;

use factum_control_plane::InjectedBug;
use factum_node_agent::AgentBug;
use factum_providers::remote::HostBug;
use factum_providers::HttpBug;
use factum_sim::scenario::{self, Scenario};
use factum_sim::ClusterConfig;
use factum_wasm::EngineBug;

fn load(file: &str) -> Scenario {
    Scenario::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios").join(file)).unwrap()
}

/// The first seed in 1..=100 at which scenario `file` fails with a bug that `inject` puts into the cluster's
/// configuration, with the failure. The same seed must pass without the bug: the check fired on the bug, not
/// on the seed.
fn first_failure_with(file: &str, inject: impl Fn(&mut ClusterConfig)) -> Option<(u64, String)> {
    first_failure_of(&load(file), inject)
}

/// [`first_failure_with`] on `file` with `check` as its only check and the always-on monitor off: the check
/// catches the bug by itself, not only after the monitor has.
fn first_failure_of_check(file: &str, check: &str, inject: impl Fn(&mut ClusterConfig)) -> Option<(u64, String)> {
    let mut scenario = load(file);
    scenario.always.retain(|a| a.check.starts_with(check));
    scenario.eventually.retain(|e| e.check.starts_with(check));
    assert_eq!(scenario.always.len() + scenario.eventually.len(), 1, "{file} names {check} once");
    first_failure_of(&scenario, |config| {
        config.monitor = false;
        inject(config);
    })
}

fn first_failure_of(scenario: &Scenario, inject: impl Fn(&mut ClusterConfig)) -> Option<(u64, String)> {
    let file = &scenario.name;
    let found = (1..=100).find_map(|seed| {
        let mut config = ClusterConfig::new(seed, scenario.agents);
        inject(&mut config);
        scenario::run_with(scenario, config).err().map(|e| (seed, e.message))
    });
    if let Some((seed, _)) = &found {
        if let Err(e) = scenario::run(scenario, *seed) {
            panic!("{file} seed {seed} fails without the bug too: {e}");
        }
    }
    found
}

/// Injects a control-plane bug.
fn cp(bug: InjectedBug) -> impl Fn(&mut ClusterConfig) {
    move |config| config.control_plane.injected_bug = Some(bug)
}

/// Injects an agent bug.
fn agent(bug: AgentBug) -> impl Fn(&mut ClusterConfig) {
    move |config| config.agent_bug = Some(bug)
}

/// Injects an engine bug.
fn engine(bug: EngineBug) -> impl Fn(&mut ClusterConfig) {
    move |config| config.engine_bug = Some(bug)
}

/// Injects a provider host bug.
fn host(bug: HostBug) -> impl Fn(&mut ClusterConfig) {
    move |config| config.host_bug = Some(bug)
}

/// Injects an HTTP provider bug.
fn http(bug: HttpBug) -> impl Fn(&mut ClusterConfig) {
    move |config| config.http_bug = Some(bug)
}

/// One test per injected bug: `test name: scenario file, injection => [what the failure must name, any of]`.
/// The scenario must fail within 100 seeds with the bug, and that seed must pass without it.
macro_rules! caught {
    ($($(#[$attr:meta])* $name:ident: $file:literal, $inject:expr => [$($check:literal),+];)+) => {$(
        #[test]
        $(#[$attr])*
        fn $name() {
            let (seed, failure) = first_failure_with($file, $inject).expect("bug not caught");
            assert!([$($check),+].iter().any(|check| failure.contains(check)), "seed {seed}: {failure}");
        }
    )+};
}

caught! {
    a_control_plane_that_does_not_rebuild_is_caught:
        "control_plane_restart.toml", cp(InjectedBug::NoRebuildFromSnapshots)
        => ["facts_match_agents", "registry_matches_agents"];
    a_missing_failure_detector_is_caught:
        "agent_crash.toml", cp(InjectedBug::NoFailureDetection) => ["node_unknown:agent-2"];
    an_agent_that_restarts_past_max_retries_is_caught_by_the_always_on_monitor:
        "backoff_storm.toml", agent(AgentBug::IgnoreMaxRetries) => ["P8 restart_policies_are_respected"];
    an_agent_whose_delta_heartbeats_leave_out_removals_is_caught:
        "remove_ended.toml", agent(AgentBug::DeltaWithoutRemovals) => ["removed_instances_stay_removed"];
    an_agent_that_caches_grants_per_run_is_caught_by_the_always_on_monitor:
        "revoke_during_kv_use.toml", agent(AgentBug::StaleGrants) => ["P4 calls_were_granted"];
    a_control_plane_that_reports_intentions_is_caught_by_the_always_on_monitor:
        "agent_crash.toml", cp(InjectedBug::OptimisticRunning) => ["P9 statuses_come_from_agents"];
    an_agent_that_restarts_the_count_on_every_reschedule_is_caught_by_the_always_on_monitor:
        "lease_expiry.toml", agent(AgentBug::ForgetRestartCount) => ["P8 restart_policies_are_respected"];
    a_control_plane_that_forgets_failed_reschedules_is_caught_by_the_always_on_monitor:
        "reschedule_in_doubt.toml", cp(InjectedBug::ForgetFailedReschedules) => ["P13 confirmed_instances_stay_listed"];
    an_agent_that_does_not_fence_is_caught_by_single_placement:
        "lease_expiry.toml", agent(AgentBug::NoFencing) => ["single_placement"];
    an_agent_that_files_a_grant_on_every_instance_is_caught_by_the_always_on_monitor:
        "revoke_during_kv_use.toml", agent(AgentBug::SharedGrants) => ["P19 capabilities_are_scoped_to_their_instance"];
    an_agent_that_writes_instances_into_the_registry_is_caught_by_registry_only_membership:
        "lease_expiry.toml", agent(AgentBug::InstancesInRegistry) => ["registry_only_membership"];
    an_agent_that_puts_call_parameters_in_its_facts_is_caught_by_the_always_on_monitor:
        "revoke_during_kv_use.toml", agent(AgentBug::CallsInFacts) => ["P7 no_application_data_in_the_control_plane"];
    a_control_plane_that_forgets_lost_nodes_is_caught_by_the_always_on_monitor:
        "lease_expiry.toml", cp(InjectedBug::ForgetLostNodes) => ["P6 instances_live_on_known_nodes"];
    a_control_plane_that_ignores_capability_facts_is_caught_by_registry_matches_agents:
        "revoke_during_kv_use.toml", cp(InjectedBug::FrozenCapabilities) => ["registry_matches_agents"];
    // madsim's TCP retries a clogged segment until it passes, so the start held on its way to agent-1 lands
    // after the release and the instance runs without the retry the bug leaves out.
    #[cfg_attr(madsim, ignore = "madsim delivers the held start after the release: no retry is needed")]
    a_control_plane_that_never_retries_a_placement_is_caught_by_always_running:
        "reschedule_in_doubt.toml", cp(InjectedBug::NoPlacementRetries) => ["always_running"];
    a_control_plane_that_keeps_a_replaced_running_status_is_caught_by_the_always_on_monitor:
        "revoke_during_kv_use.toml", cp(InjectedBug::StickyRunning) => ["P9 statuses_come_from_agents"];
    an_agent_that_fences_only_on_its_timer_is_caught_by_the_always_on_monitor:
        "agent_pause.toml", agent(AgentBug::FenceOnTimerOnly) => ["P12 nodes_act_only_under_their_lease"];
    a_control_plane_that_keeps_no_tombstones_is_caught_by_the_always_on_monitor:
        "remove_ended.toml", cp(InjectedBug::NoTombstones) => ["removed_instances_stay_removed"];
    an_engine_that_recycles_memory_is_caught_by_the_always_on_monitor:
        "probes.toml", engine(EngineBug::RecycledMemory) => ["P1 no_memory_survives_a_restart"];
    an_engine_that_opens_fd_3_is_caught_by_the_always_on_monitor:
        "probes.toml", engine(EngineBug::OpenFds) => ["P3 no_side_effect_bypasses_capabilities"];
    an_agent_that_restamps_a_restarted_instance_is_caught_by_the_always_on_monitor:
        "probes.toml", agent(AgentBug::RestartRestamps) => ["P2 crashes_preserve_system_state"];
    a_control_plane_that_makes_ended_runs_unknown_is_caught_by_the_always_on_monitor:
        "backoff_storm.toml", cp(InjectedBug::UnknownEndedRuns) => ["P14 facts_only_move_forward"];
    an_http_provider_that_follows_redirects_unchecked_is_caught_by_the_always_on_monitor:
        "http.toml", http(HttpBug::UncheckedRedirects) => ["no grant ever named intranet"];
    a_provider_host_that_skips_the_seal_check_is_caught_by_the_always_on_monitor:
        "provider_host.toml", host(HostBug::UncheckedSeals) => ["P17 provider_hosts_check_grants"];
    a_provider_host_that_ignores_sealed_permissions_is_caught_by_the_always_on_monitor:
        "provider_host.toml", host(HostBug::IgnoredPermissions) => ["P17 provider_hosts_check_grants"];
    a_provider_host_that_ignores_seal_expiry_is_caught_by_the_always_on_monitor:
        "grant_renewal.toml", host(HostBug::IgnoredExpiry) => ["P17 provider_hosts_check_grants"];
    a_routing_that_retries_writes_on_another_host_is_caught_by_the_always_on_monitor:
        "provider_discovery.toml", host(HostBug::RetriedWrites) => ["P17 provider_hosts_check_grants"];
    // The copy is left only when loss fails its discard; madsim's lossy network delays messages, never loses one.
    #[cfg_attr(madsim, ignore = "madsim's loss delays the discard but never fails it: no copy is left")]
    a_removal_that_forgets_copies_left_elsewhere_is_caught_by_the_always_on_monitor:
        "drain_remove_lossy.toml", cp(InjectedBug::TombstoneOnlyWhereRemoved) => ["removed_instances_stay_removed"];
    a_drain_that_starts_before_it_stops_is_caught_by_single_placement:
        "drain.toml", cp(InjectedBug::DrainStartsFirst) => ["single_placement"];
    a_control_plane_that_reschedules_without_constraints_is_caught_by_the_always_on_monitor:
        "constraints.toml", cp(InjectedBug::RescheduleIgnoresConstraints) => ["placements_satisfy_constraints"];
    // Either the node acted after its lease expired, or a sample saw it still running what moved elsewhere.
    an_agent_that_fences_at_the_full_ttl_is_caught_under_clock_drift:
        "clock_drift.toml", agent(AgentBug::FenceAtTtl) => ["P12 nodes_act_only_under_their_lease", "single_placement"];
}

#[test]
fn swarm_finds_the_rebuild_bug_and_shrinks_it() {
    let bugged = |seed: u64| {
        let mut config = ClusterConfig::new(seed, 3);
        config.control_plane.injected_bug = Some(InjectedBug::NoRebuildFromSnapshots);
        config
    };
    let duration = std::time::Duration::from_secs(30);
    let (seed, swarm) = (1..=200)
        .map(|seed| (seed, Scenario::swarm(seed, 3, duration)))
        .find(|(seed, swarm)| scenario::run_with(swarm, bugged(*seed)).is_err())
        .expect("no swarm seed caught the bug");
    let shrunk = swarm.shrink_with(&|| bugged(seed));
    assert!(shrunk.steps.len() <= swarm.steps.len());
    assert!(scenario::run_with(&shrunk, bugged(seed)).is_err(), "the shrunk scenario must still fail");
    if let Err(e) = scenario::run(&shrunk, seed) {
        panic!(
            "seed {seed}: shrunk scenario fails without the bug too: {e}\n{}\n{}",
            shrunk.to_toml(),
            e.timeline.join("\n")
        );
    }
    // The shrunk scenario prints as a scenario file that parses back to the same steps.
    let reparsed = Scenario::parse(&shrunk.to_toml()).unwrap();
    assert_eq!(reparsed.steps.len(), shrunk.steps.len());
}

/// Puts a bug into a cluster's configuration.
type Inject = Box<dyn Fn(&mut ClusterConfig)>;

/// Scenario checks that the always-on monitor would beat to a bug, each shown to catch one by itself.
#[test]
fn every_scenario_check_catches_a_bug_by_itself() {
    let cases: [(&str, &str, Inject); 10] = [
        ("revoke_during_kv_use.toml", "none_running", Box::new(agent(AgentBug::StaleGrants))),
        ("backoff_storm.toml", "restarts", Box::new(agent(AgentBug::IgnoreMaxRetries))),
        ("agent_crash.toml", "dead_nodes_unknown", Box::new(cp(InjectedBug::NoFailureDetection))),
        ("partition_heal.toml", "no_unknown", Box::new(cp(InjectedBug::StickyUnknown))),
        ("partition_heal.toml", "all_running", Box::new(cp(InjectedBug::StickyUnknown))),
        ("agent_crash.toml", "node_unknown", Box::new(cp(InjectedBug::NoFailureDetection))),
        ("messaging.toml", "messages_flow", Box::new(agent(AgentBug::LostWakeups))),
        ("http.toml", "requests_flow", Box::new(http(HttpBug::LatchedFailure))),
        ("provider_host.toml", "provider_host_answers", Box::new(host(HostBug::LatchedClient))),
        ("grant_renewal.toml", "provider_host_answers", Box::new(cp(InjectedBug::NoSealRenewal))),
    ];
    for (file, check, inject) in cases {
        let (seed, failure) =
            first_failure_of_check(file, check, inject).unwrap_or_else(|| panic!("{check} did not catch its bug"));
        assert!(failure.contains(check), "{check}, seed {seed}: {failure}");
    }
}

#[test]
fn a_control_plane_that_applies_late_snapshots_is_caught() {
    // Late snapshots are rare under BUGGIFY's 5%: this test makes every heartbeat send one.
    let scenario = load("backoff_storm.toml");
    let config = |seed: u64, bug: Option<InjectedBug>| {
        let mut config = ClusterConfig::new(seed, scenario.agents);
        config.control_plane.injected_bug = bug;
        let faults = factum_sim::buggify::Buggify::new(seed).always("agent.replay_snapshot");
        config.faults = Some(std::sync::Arc::new(faults));
        config
    };
    let (seed, failure) = (1..=100)
        .find_map(|seed| {
            let run = scenario::run_with(&scenario, config(seed, Some(InjectedBug::AcceptStaleSnapshots)));
            run.err().map(|e| (seed, e.message))
        })
        .expect("bug not caught");
    assert!(failure.contains("P8") || failure.contains("facts_match_agents"), "seed {seed}: {failure}");
    if let Err(e) = scenario::run_with(&scenario, config(seed, None)) {
        panic!("seed {seed} fails without the bug too: {e}");
    }
}

#[test]
fn a_control_plane_that_keeps_its_outage_backoff_after_nodes_join_is_caught() {
    // Found by swarm seed 1201401228 (etcd down for 10 s, then every node joins again); that run's timing no
    // longer reaches a long backoff since connections open with a hello, so the scenario made for it is used:
    // every node lost for 18 s, then back.
    let (seed, failure) = first_failure_with("nodes_return.toml", |config| {
        config.control_plane.injected_bug = Some(InjectedBug::BackoffAcrossJoins)
    })
    .expect("bug not caught");
    assert!(failure.contains("never settled"), "seed {seed}: {failure}");
}

/// The bug a release sweep found (seed 23000735 of drain_remove_lossy): without a registry, a placement retry
/// on a node that had only missed heartbeats rescheduled everything there, and an instance ran on two nodes.
/// Too rare for the 1..=100 search, so shown on its seed: with the bug put back, `single_placement` fires.
#[test]
#[cfg_attr(madsim, ignore = "a turmoil seed: madsim runs another timeline from it")]
fn rescheduling_off_a_node_nothing_fenced_is_caught_by_single_placement() {
    let (file, seed) = ("drain_remove_lossy.toml", 23000735);
    let scenario = load(file);
    let mut config = ClusterConfig::new(seed, scenario.agents);
    cp(InjectedBug::RescheduleLiveNodes)(&mut config);
    let failure = scenario::run_with(&scenario, config).expect_err("the bug must be caught");
    assert!(failure.message.contains("single_placement"), "{}", failure.message);
    scenario::run(&scenario, seed).unwrap_or_else(|e| panic!("{file} seed {seed} fails without the bug: {e}"));
}
