//! Node agent lifecycle, restart policies, reports and capability enforcement, on virtual (paused tokio) time.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // tests may panic

use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use factum_env::{Env, SeededRng, TokioClock, TokioNet, TokioSpawn, Trace};
use factum_node_agent::{Agent, AgentConfig, StatusReports};
use factum_proto::{ErrorCode, InstanceStatus, PolicyType, RestartPolicy, StatusReport};
use factum_providers::MemoryKv;
use factum_wasm::fixtures;
use factum_wasm::{WasmEngine, WasmiEngine, WasmtimeEngine};
use proptest::prelude::*;

mod common;
use common::request;

/// An env on tokio's (paused) clock with wall time starting at the epoch, so report timestamps are virtual.
fn test_env() -> Env {
    Env {
        clock: Arc::new(TokioClock::with_wall_origin(UNIX_EPOCH)),
        net: Arc::new(TokioNet),
        spawner: Arc::new(TokioSpawn),
        rng: Arc::new(SeededRng::new(1)),
        trace: None,
        faults: None,
        credentials: factum_env::rpc::Credentials::default(),
    }
}

fn new_agent(engine: Arc<dyn WasmEngine>, max_instances: u32) -> (Agent, StatusReports, Arc<MemoryKv>) {
    new_agent_in(test_env(), engine, max_instances)
}

fn new_agent_in(env: Env, engine: Arc<dyn WasmEngine>, max_instances: u32) -> (Agent, StatusReports, Arc<MemoryKv>) {
    let kv = Arc::new(MemoryKv::new());
    let mut config = AgentConfig::new("node-1", "127.0.0.1:0");
    config.max_instances = max_instances;
    let (agent, reports) = Agent::new(env, config, engine, kv.clone());
    (agent, reports, kv)
}

/// Every status fact the agent records (its `status …` trace events), with the virtual instant it was recorded:
/// the agent's own history, whatever its report queue coalesced.
#[derive(Default)]
struct Facts(Mutex<Vec<(tokio::time::Instant, InstanceStatus, u64)>>);

impl Trace for Facts {
    fn record(&self, _component: &str, event: String) {
        let mut words = event.split(' ');
        if words.next() != Some("status") {
            return;
        }
        let status = match words.nth(1) {
            Some("starting") => InstanceStatus::Starting,
            Some("running") => InstanceStatus::Running,
            Some("stopped") => InstanceStatus::Stopped,
            Some("crashed") => InstanceStatus::Crashed,
            other => panic!("unexpected status in {other:?}"),
        };
        let seq = words.next().and_then(|w| w.strip_prefix("seq=")).unwrap().parse().unwrap();
        self.0.lock().unwrap().push((tokio::time::Instant::now(), status, seq));
    }
}

/// Polls (on virtual time) until the instance reaches a terminal status, for at most `limit`.
async fn wait_terminal(agent: &Agent, id: &str, limit: Duration) -> InstanceStatus {
    wait_until(agent, id, limit, |_| true).await
}

/// Polls (on virtual time) until the instance is in a terminal status and `settled` holds, for at most `limit`.
async fn wait_until(agent: &Agent, id: &str, limit: Duration, settled: impl Fn(u32) -> bool) -> InstanceStatus {
    let start = tokio::time::Instant::now();
    loop {
        let meta = agent.metadata(id).unwrap();
        if (meta.status.is_terminal() && settled(meta.restarts)) || start.elapsed() > limit {
            return meta.status;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap()
}

fn arb_policy() -> impl Strategy<Value = RestartPolicy> {
    (
        prop_oneof![Just(PolicyType::Never), Just(PolicyType::Always), Just(PolicyType::OnFailure)],
        0u32..4,
        prop::option::of(0u32..3),
    )
        .prop_map(|(policy_type, max, backoff)| RestartPolicy {
            policy_type,
            max_retries: Some(max),
            backoff_seconds: backoff,
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(100))]

    /// Feature: wasm-orchestrator, Property 8: Node Agent Crash Detection and Restart Policy Enforcement
    /// Feature: wasm-orchestrator, Property 9: Node Agent Status Reporting
    /// For any guest ending (clean exit, trap, non-zero exit) under any policy, the agent restarts exactly as the
    /// policy says, waits the policy's backoff before each restart, ends in the right status, and reports every
    /// transition in order with increasing sequence numbers.
    #[test]
    fn restart_policies_are_applied_and_reported(
        guest in prop_oneof![Just(fixtures::EXIT_CLEAN), Just(fixtures::TRAP), Just(fixtures::EXIT_CODE)],
        policy in arb_policy(),
    ) {
        let rt = paused_runtime();
        rt.block_on(async {
            let facts = Arc::new(Facts::default());
            let env = test_env().with_trace("agent", facts.clone());
            let (agent, mut reports, _) = new_agent_in(env, Arc::new(WasmiEngine::new()), 10);
            // The link's side: what it receives while the instance runs.
            let received = tokio::spawn(async move {
                let mut received = Vec::new();
                while let Some(report) = reports.recv().await {
                    received.push(report);
                }
                received
            });
            agent.start_instance(request("i-1", guest, policy, &[])).await.unwrap();
            let crashed = guest != fixtures::EXIT_CLEAN;
            let wants = match policy.policy_type {
                PolicyType::Never => false,
                PolicyType::Always => true,
                PolicyType::OnFailure => crashed,
            };
            let expected_restarts = if wants { policy.max_retries.unwrap() } else { 0 };
            let status = wait_until(&agent, "i-1", Duration::from_secs(600), |r| r == expected_restarts).await;
            // Nothing more happens once the policy is exhausted.
            tokio::time::sleep(Duration::from_secs(60)).await;
            let end = if crashed { InstanceStatus::Crashed } else { InstanceStatus::Stopped };
            prop_assert_eq!(status, end);
            prop_assert_eq!(agent.metadata("i-1").unwrap().restarts, expected_restarts);

            let facts = std::mem::take(&mut *facts.0.lock().unwrap());
            let mut expected = vec![InstanceStatus::Starting, InstanceStatus::Running];
            for _ in 0..expected_restarts {
                expected.extend([end, InstanceStatus::Starting, InstanceStatus::Running]);
            }
            expected.push(end);
            prop_assert_eq!(facts.iter().map(|f| f.1).collect::<Vec<_>>(), expected);
            prop_assert!(facts.windows(2).all(|w| w[0].2 < w[1].2));
            // Backoff: the gap between an end and the next start is the policy's wait for that restart (each run
            // here is short, so the streak is the restart number), with at most 10 % jitter on top.
            let mut restart = 0;
            for w in facts.windows(2) {
                if w[0].1 == end && w[1].1 == InstanceStatus::Starting {
                    restart += 1;
                    let gap = w[1].0 - w[0].0;
                    let (least, most) = (policy.backoff(restart, 0), policy.backoff(restart, 100));
                    prop_assert!(least <= gap && gap <= most, "restart {}: waited {:?}", restart, gap);
                }
            }
            // The link received facts in order, and the last one it received is the last fact.
            drop(agent);
            let received: Vec<StatusReport> = received.await.unwrap();
            prop_assert!(received.windows(2).all(|w| w[0].seq < w[1].seq));
            let last = received.last().unwrap();
            prop_assert_eq!((last.status, last.seq), (end, facts.last().unwrap().2));
            Ok(())
        })?;
    }

    /// Feature: wasm-orchestrator, Property 1: Instance Statelessness Across Restarts
    /// A guest that would notice surviving memory (it exits 7 if its marker is still set) only ever sees fresh
    /// memory, however often it is restarted.
    #[test]
    fn restarts_get_fresh_memory(retries in 1u32..6, always in any::<bool>()) {
        let rt = paused_runtime();
        rt.block_on(async {
            let (agent, _reports, _) = new_agent(Arc::new(WasmiEngine::new()), 10);
            let policy_type = if always { PolicyType::Always } else { PolicyType::OnFailure };
            let policy = RestartPolicy { policy_type, max_retries: Some(retries), backoff_seconds: None };
            agent.start_instance(request("probe", fixtures::REMEMBER, policy, &[])).await.unwrap();
            let status = wait_until(&agent, "probe", Duration::from_secs(60), |r| r == retries).await;
            prop_assert_eq!(status, InstanceStatus::Crashed);
            let meta = agent.metadata("probe").unwrap();
            prop_assert_eq!(meta.restarts, retries);
            let reason = meta.last_error.unwrap();
            prop_assert!(reason.contains("unreachable"), "memory survived a restart: {}", reason);
            Ok(())
        })?;
    }

    /// Feature: wasm-orchestrator, Property 4: Runtime Permission Enforcement
    /// Feature: wasm-orchestrator, Property 3: Capability-Mediated Side Effects
    /// The KV greeter's write lands, and it keeps running, exactly when its capability `kv` carries `kv:write`;
    /// otherwise the call is refused, nothing is written, and the guest's own error handling ends it.
    #[test]
    fn kv_writes_need_kv_write(
        perms in prop::sample::subsequence(vec!["kv:read", "kv:write", "kv:delete"], 1..=3),
        cap_id in prop_oneof![Just("kv"), Just("other")],
    ) {
        let rt = paused_runtime();
        rt.block_on(async {
            let (agent, _reports, kv) = new_agent(Arc::new(WasmiEngine::new()), 10);
            let policy = RestartPolicy::default();
            agent.start_instance(request("g", fixtures::KV_GREETER, policy, &[(cap_id, &perms)])).await.unwrap();
            tokio::time::sleep(Duration::from_millis(2500)).await;
            let allowed = cap_id == "kv" && perms.contains(&"kv:write");
            let status = agent.status("g").unwrap();
            prop_assert_eq!(status, if allowed { InstanceStatus::Running } else { InstanceStatus::Crashed });
            prop_assert_eq!(!kv.inspect("kv", "greeting").await.unwrap().is_empty(), allowed);
            agent.stop_instance("g").unwrap();
            Ok(())
        })?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(100))]

    /// Feature: wasm-orchestrator, Property 2: System State Preservation During Instance Crashes
    /// Whatever mix of instances crash (trap, non-zero exit, running out of fuel is covered by the engines), the
    /// agent keeps every instance's metadata and capability assignments, and the instances that did not crash
    /// keep running untouched.
    #[test]
    fn crashes_preserve_system_state(kinds in prop::collection::vec(0u8..3, 1..8)) {
        let rt = paused_runtime();
        rt.block_on(async {
            let (agent, _reports, kv) = new_agent(Arc::new(WasmiEngine::new()), 20);
            for (i, kind) in kinds.iter().enumerate() {
                let wat = [fixtures::KV_GREETER, fixtures::TRAP, fixtures::EXIT_CODE][*kind as usize];
                agent.start_instance(request(&format!("i{i}"), wat, RestartPolicy::default(), &[("kv", &["kv:write"])])).await.unwrap();
            }
            tokio::time::sleep(Duration::from_secs(3)).await;
            let snapshot = agent.snapshot();
            prop_assert_eq!(snapshot.len(), kinds.len());
            for (facts, kind) in snapshot.iter().zip(&kinds) {
                let want = if *kind == 0 { InstanceStatus::Running } else { InstanceStatus::Crashed };
                prop_assert_eq!(facts.metadata.status, want);
                prop_assert_eq!(facts.capabilities.len(), 1);
                prop_assert_eq!(&facts.capabilities[0].permissions, &vec!["kv:write".to_string()]);
                prop_assert_eq!(facts.metadata.last_error.is_some(), *kind != 0);
            }
            prop_assert_eq!(!kv.inspect("kv", "greeting").await.unwrap().is_empty(), kinds.contains(&0));
            agent.stop_all();
            Ok(())
        })?;
    }
}

#[tokio::test(start_paused = true)]
async fn revoke_takes_effect_on_the_next_call() {
    let (agent, _reports, kv) = new_agent(Arc::new(WasmtimeEngine::new().unwrap()), 10);
    agent
        .start_instance(request("g", fixtures::KV_GREETER, RestartPolicy::default(), &[("kv", &["kv:write"])]))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(agent.status("g").unwrap(), InstanceStatus::Running);
    assert_eq!(kv.inspect("kv", "").await.unwrap()[0].1, b"hello from factum");
    agent.revoke_capability("g", "kv").unwrap();
    // The greeter calls again within a second; that call is denied and the guest exits 1.
    assert_eq!(wait_terminal(&agent, "g", Duration::from_secs(5)).await, InstanceStatus::Crashed);
    assert_eq!(agent.metadata("g").unwrap().last_error.as_deref(), Some("exited with code 1"));
    let err = agent.revoke_capability("g", "kv").unwrap_err();
    assert_eq!(err.error_code, ErrorCode::InvalidRequest);
}

// Real time: a spinning guest keeps the runtime busy, so paused time would never advance.
#[tokio::test]
async fn stop_ends_a_runaway_loop_on_both_engines() {
    let engines: [Arc<dyn WasmEngine>; 2] = [Arc::new(WasmiEngine::new()), Arc::new(WasmtimeEngine::new().unwrap())];
    for engine in engines {
        eprintln!("engine {}", engine.name());
        let (agent, _reports, _) = new_agent(engine, 10);
        agent.start_instance(request("spin", fixtures::LOOP_FOREVER, RestartPolicy::default(), &[])).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(agent.status("spin").unwrap(), InstanceStatus::Running);
        agent.stop_instance("spin").unwrap();
        assert_eq!(agent.status("spin").unwrap(), InstanceStatus::Stopped);
        // Stopping again is fine and changes nothing.
        agent.stop_instance("spin").unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(agent.status("spin").unwrap(), InstanceStatus::Stopped);
    }
}

/// Runs 12 s (a WASI clock sleep), then traps: a crash after a stable run.
const SLOW_TRAP: &str = r#"(module
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 272) "\01\00\00\00")
  (data (i32.const 280) "\00\78\41\cb\02\00\00\00")
  (func (export "_start")
    (drop (call $poll (i32.const 256) (i32.const 512) (i32.const 1) (i32.const 600)))
    unreachable))"#;

/// A guest that crashes at once under `always` with no backoff waits 100 ms doubling per restart in a row (no
/// hot loop) and shows as a crash loop; one that crashes after each stable run waits only the floor every time.
#[tokio::test(start_paused = true)]
async fn a_crash_loop_backs_off_and_a_stable_run_resets_it() {
    let (agent, _reports, _) = new_agent(Arc::new(WasmiEngine::new()), 10);
    let always = RestartPolicy { policy_type: PolicyType::Always, max_retries: None, backoff_seconds: None };
    agent.start_instance(request("looping", fixtures::TRAP, always, &[])).await.unwrap();
    agent.start_instance(request("steady", SLOW_TRAP, always, &[])).await.unwrap();
    tokio::time::sleep(Duration::from_secs(60)).await;

    // Waits of 0.1, 0.2, … 25.6 s (+ ≤ 10 %) sum to 51.1–56.2 s: nine restarts began; the tenth waits 51.2 s.
    let looping = agent.metadata("looping").unwrap();
    assert_eq!((looping.status, looping.restarts, looping.restart_streak), (InstanceStatus::Crashed, 9, 10));
    assert!(looping.in_crash_loop());
    let wait = looping.backoff_ms.unwrap();
    assert!((51_200..=56_320).contains(&wait), "{wait}");

    // Crashes at 12 s, 24.1 s, 36.2 s and 48.3 s, each after a stable run: the streak never grows.
    let steady = agent.metadata("steady").unwrap();
    assert_eq!((steady.status, steady.restarts, steady.restart_streak), (InstanceStatus::Running, 4, 1));
    assert!(!steady.in_crash_loop());
    assert_eq!(steady.backoff_ms, None);
}

#[tokio::test(start_paused = true)]
async fn stop_during_backoff_cancels_the_restart() {
    let (agent, _reports, _) = new_agent(Arc::new(WasmiEngine::new()), 10);
    let policy = RestartPolicy { policy_type: PolicyType::Always, max_retries: None, backoff_seconds: Some(10) };
    agent.start_instance(request("t", fixtures::TRAP, policy, &[])).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(agent.status("t").unwrap(), InstanceStatus::Crashed);
    agent.stop_instance("t").unwrap();
    tokio::time::sleep(Duration::from_secs(60)).await;
    let meta = agent.metadata("t").unwrap();
    // The restart never began, so it is not counted.
    assert_eq!((meta.status, meta.restarts), (InstanceStatus::Stopped, 0));
}

#[tokio::test(start_paused = true)]
async fn start_is_idempotent_by_instance_id() {
    let (agent, _reports, _) = new_agent(Arc::new(WasmiEngine::new()), 10);
    let first = agent.start_instance(request("a", fixtures::SLEEPER, RestartPolicy::default(), &[])).await.unwrap();
    let again = agent.start_instance(request("a", fixtures::SLEEPER, RestartPolicy::default(), &[])).await.unwrap();
    assert_eq!(first.metadata.module_hash, again.metadata.module_hash);
    assert_eq!(agent.snapshot().len(), 1);
    let other = agent.start_instance(request("a", fixtures::TRAP, RestartPolicy::default(), &[])).await.unwrap_err();
    assert_eq!(other.error_code, ErrorCode::InvalidRequest);
}

/// A start by module hash alone runs a module the node holds, and is INSTANCE_NOT_FOUND with detail
/// `module_hash` for one it does not (the control plane then sends the bytes); bytes that do not match the
/// hash the start names are refused.
#[tokio::test(start_paused = true)]
async fn a_start_by_hash_runs_a_held_module_and_asks_for_one_not_held() {
    let (agent, _reports, _) = new_agent(Arc::new(WasmiEngine::new()), 10);
    let hash = factum_proto::module_hash(&fixtures::module(fixtures::SLEEPER));
    let by_hash = |id: &str| factum_proto::StartInstanceRequest {
        module_bytes: Vec::new(),
        module_hash: hash.clone(),
        ..request(id, fixtures::SLEEPER, RestartPolicy::default(), &[])
    };
    let missing = agent.start_instance(by_hash("a")).await.unwrap_err();
    assert_eq!(missing.error_code, ErrorCode::InstanceNotFound);
    assert_eq!(missing.details.unwrap().get("module_hash"), Some(&hash));
    assert!(agent.snapshot().is_empty(), "a start that lacked its module leaves nothing behind");

    agent.start_instance(request("a", fixtures::SLEEPER, RestartPolicy::default(), &[])).await.unwrap();
    let b = agent.start_instance(by_hash("b")).await.unwrap();
    assert_eq!(b.metadata.module_hash, hash);
    for _ in 0..50 {
        if agent.metadata("b").unwrap().status == InstanceStatus::Running {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(agent.metadata("b").unwrap().status, InstanceStatus::Running);

    let lying = factum_proto::StartInstanceRequest {
        module_hash: hash,
        ..request("c", fixtures::TRAP, RestartPolicy::default(), &[])
    };
    let refused = agent.start_instance(lying).await.unwrap_err();
    assert_eq!(refused.error_code, ErrorCode::InvalidRequest);
    assert!(refused.message.contains("not to the module_hash"), "{}", refused.message);
}

#[tokio::test(start_paused = true)]
async fn bad_input_gets_the_right_error_code_and_leaves_no_trace() {
    let (agent, _reports, _) = new_agent(Arc::new(WasmtimeEngine::new().unwrap()), 1);
    let mut garbage = request("bad", fixtures::SLEEPER, RestartPolicy::default(), &[]);
    garbage.module_bytes = b"\0asm\x01\0\0\0garbage".to_vec();
    assert_eq!(agent.start_instance(garbage).await.unwrap_err().error_code, ErrorCode::InvalidRequest);
    let mut bad_id = request("bad", fixtures::SLEEPER, RestartPolicy::default(), &[]);
    bad_id.instance_id = "no spaces allowed".into();
    assert_eq!(agent.start_instance(bad_id).await.unwrap_err().error_code, ErrorCode::InvalidRequest);
    let mut bad_perm = request("bad", fixtures::SLEEPER, RestartPolicy::default(), &[("kv", &["kv:write"])]);
    bad_perm.capabilities[0].permissions = vec!["kv:everything".into()];
    assert_eq!(agent.start_instance(bad_perm).await.unwrap_err().error_code, ErrorCode::InvalidRequest);
    let huge = r#"(module (memory (export "memory") 2000) (func (export "_start")))"#;
    let too_big = request("big", huge, RestartPolicy::default(), &[]);
    assert_eq!(agent.start_instance(too_big).await.unwrap_err().error_code, ErrorCode::ResourceExhausted);
    assert!(agent.snapshot().is_empty(), "failed starts must leave nothing behind");
    assert_eq!(agent.stop_instance("nope").unwrap_err().error_code, ErrorCode::InstanceNotFound);
    assert_eq!(agent.status("nope").unwrap_err().error_code, ErrorCode::InstanceNotFound);

    agent.start_instance(request("one", fixtures::SLEEPER, RestartPolicy::default(), &[])).await.unwrap();
    let full =
        agent.start_instance(request("two", fixtures::SLEEPER, RestartPolicy::default(), &[])).await.unwrap_err();
    assert_eq!(full.error_code, ErrorCode::ResourceExhausted);
    // A stopped instance frees its slot.
    agent.stop_instance("one").unwrap();
    agent.start_instance(request("two", fixtures::SLEEPER, RestartPolicy::default(), &[])).await.unwrap();
}
