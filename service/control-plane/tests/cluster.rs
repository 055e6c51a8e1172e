//! The control plane against real agents over real tarpc on loopback TCP: validation, lifecycle, the
//! capability registry, and rebuilding every map from agent snapshots after a restart.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // tests may panic

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use factum_control_plane::{ControlPlane, ControlPlaneConfig};
use factum_env::Env;
use factum_node_agent::{Agent, AgentConfig};
use factum_proto::{CapabilityGrant, ErrorCode, InstanceStatus, RestartPolicy, StartRequest};
use factum_providers::MemoryKv;
use factum_wasm::fixtures::{self, module};
use factum_wasm::WasmiEngine;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

struct Cluster {
    cp: ControlPlane,
    agents: Vec<Agent>,
}

/// A control plane and `n` agents in this process, talking tarpc over loopback TCP. No etcd, no registry:
/// everything is in memory.
async fn cluster(n: usize) -> Cluster {
    let env = Env::tokio();
    let listener = env.net.bind("127.0.0.1:0").await.unwrap();
    let cp_addr = listener.local_addr().unwrap();
    let cp = ControlPlane::new(env.clone(), ControlPlaneConfig::default());
    env.spawn(factum_control_plane::serve(cp.clone(), listener));
    let mut agents = Vec::new();
    for i in 1..=n {
        let listener = env.net.bind("127.0.0.1:0").await.unwrap();
        let mut config = AgentConfig::new(format!("node-{i}"), listener.local_addr().unwrap());
        config.heartbeat_interval = Duration::from_millis(100);
        let (agent, reports) = Agent::new(env.clone(), config, Arc::new(WasmiEngine::new()), Arc::new(MemoryKv::new()));
        env.spawn(factum_node_agent::serve(agent.clone(), listener));
        env.spawn(factum_node_agent::run_control_plane_link(agent.clone(), cp_addr.clone(), reports));
        agents.push(agent);
    }
    eventually("all nodes registered", || cp.list_nodes().iter().filter(|n| n.available).count() == n).await;
    Cluster { cp, agents }
}

/// Polls `check` until it holds; fails the test after 10 s.
async fn eventually(what: &str, check: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn start_request(id: Option<&str>, bytes: Vec<u8>, caps: Vec<CapabilityGrant>) -> StartRequest {
    StartRequest {
        instance_id: id.map(String::from),
        module_bytes: bytes,
        capabilities: caps,
        restart_policy: RestartPolicy::default(),
    }
}

/// A grant of capability `kv` with `perms`.
fn kv(perms: &[&str]) -> Vec<CapabilityGrant> {
    vec![CapabilityGrant { capability_id: "kv".into(), permissions: perms.iter().map(|p| p.to_string()).collect() }]
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// An invalid start request and the code it must get.
#[derive(Debug, Clone)]
enum Invalid {
    NotWasm(Vec<u8>),
    BrokenWasm(Vec<u8>),
    BadPermission(String),
    BadInstanceId(String),
    MixedProviders,
}

fn arb_invalid() -> impl Strategy<Value = Invalid> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..64)
            .prop_filter("not a wasm header", |b| !b.starts_with(b"\0asm"))
            .prop_map(Invalid::NotWasm),
        prop::collection::vec(any::<u8>(), 1..64).prop_map(|tail| {
            let mut bytes = b"\0asm\x01\0\0\0".to_vec();
            bytes.extend(tail);
            Invalid::BrokenWasm(bytes)
        }),
        "[a-z:]{0,12}"
            .prop_filter("not a valid permission", |p| p.parse::<factum_proto::Permission>().is_err())
            .prop_map(Invalid::BadPermission),
        "[ /!@#$%^&*()]{1,8}".prop_map(Invalid::BadInstanceId),
        Just(Invalid::MixedProviders),
    ]
}

/// Feature: wasm-orchestrator, Property 18: API Request Validation
/// Any malformed StartInstance (not Wasm, broken Wasm, bad permission, bad id, mixed providers) is refused
/// with INVALID_REQUEST and a message, and leaves no instance behind.
#[test]
fn invalid_starts_are_refused_with_invalid_request() {
    let rt = runtime();
    let cluster = rt.block_on(cluster(1));
    let mut runner = TestRunner::new(Config::with_cases(100));
    runner
        .run(&arb_invalid(), |invalid| {
            rt.block_on(async {
                let sleeper = module(fixtures::SLEEPER);
                let grant = |perms: &[&str]| CapabilityGrant {
                    capability_id: "kv".into(),
                    permissions: perms.iter().map(|p| p.to_string()).collect(),
                };
                let req = match invalid {
                    Invalid::NotWasm(bytes) | Invalid::BrokenWasm(bytes) => start_request(None, bytes, vec![]),
                    Invalid::BadPermission(p) => start_request(None, sleeper, vec![grant(&[&p])]),
                    Invalid::BadInstanceId(id) => start_request(Some(&id), sleeper, vec![]),
                    Invalid::MixedProviders => start_request(None, sleeper, vec![grant(&["kv:read", "http:request"])]),
                };
                let err = cluster.cp.start_instance(req).await.unwrap_err();
                prop_assert_eq!(err.error_code, ErrorCode::InvalidRequest);
                prop_assert!(!err.message.is_empty());
                prop_assert!(err.timestamp > 0);
                prop_assert!(cluster.cp.list_instances().is_empty());
                prop_assert!(cluster.agents[0].snapshot().is_empty());
                Ok(())
            })
        })
        .unwrap();
}

#[derive(Debug, Clone)]
enum Op {
    Start { long_running: bool },
    Stop(usize),
    Grant { instance: usize, cap: &'static str, perms: Vec<&'static str> },
    Revoke { instance: usize, cap: &'static str },
    Query(usize),
}

fn arb_op() -> impl Strategy<Value = Op> {
    let cap = prop_oneof![Just("kv"), Just("cache")];
    let perms = prop::sample::subsequence(vec!["kv:read", "kv:write", "kv:delete"], 1..=3);
    prop_oneof![
        any::<bool>().prop_map(|long_running| Op::Start { long_running }),
        (0usize..8).prop_map(Op::Stop),
        (0usize..8, cap.clone(), perms).prop_map(|(instance, cap, perms)| Op::Grant { instance, cap, perms }),
        (0usize..8, cap).prop_map(|(instance, cap)| Op::Revoke { instance, cap }),
        (0usize..8).prop_map(Op::Query),
    ]
}

/// Feature: wasm-orchestrator, Property 6: Control Plane Instance Lifecycle Operations
/// Feature: wasm-orchestrator, Property 5: Capability Assignment Registry Completeness
/// Feature: wasm-orchestrator, Property 15: In-Memory Instance Management
/// Over random sequences of start / stop / grant / revoke / query against a two-node cluster with no etcd:
/// every started instance is created on a node and listed, every stopped one is `stopped`, and the registry
/// holds exactly the assignments granted and not revoked, the same on the control plane and on the agent
/// that enforces them. Unknown ids are INSTANCE_NOT_FOUND.
#[test]
fn lifecycle_and_registry_follow_a_model() {
    let rt = runtime();
    let cluster = rt.block_on(cluster(2));
    let mut runner = TestRunner::new(Config::with_cases(100));
    runner
        .run(&prop::collection::vec(arb_op(), 1..12), |ops| {
            rt.block_on(async {
                let mut ids: Vec<String> = Vec::new();
                let mut model: BTreeMap<String, BTreeMap<String, Vec<String>>> = BTreeMap::new();
                for op in ops {
                    match op {
                        Op::Start { long_running } => {
                            let wat = if long_running { fixtures::SLEEPER } else { fixtures::EXIT_CLEAN };
                            let id = cluster.cp.start_instance(start_request(None, module(wat), vec![])).await.unwrap();
                            let meta = cluster.cp.query_instance(&id).unwrap().metadata;
                            prop_assert!(cluster
                                .agents
                                .iter()
                                .any(|a| a.node_id() == meta.node_id && a.status(&id).is_ok()));
                            model.insert(id.clone(), BTreeMap::new());
                            ids.push(id);
                        }
                        Op::Stop(i) => match ids.get(i) {
                            Some(id) => {
                                cluster.cp.stop_instance(id).await.unwrap();
                                prop_assert_eq!(
                                    cluster.cp.query_instance(id).unwrap().metadata.status,
                                    InstanceStatus::Stopped
                                );
                            }
                            None => {
                                let err = cluster.cp.stop_instance("missing").await.unwrap_err();
                                prop_assert_eq!(err.error_code, ErrorCode::InstanceNotFound);
                            }
                        },
                        Op::Grant { instance, cap, perms } => {
                            let Some(id) = ids.get(instance) else { continue };
                            let perms: Vec<String> = perms.iter().map(|p| p.to_string()).collect();
                            cluster.cp.assign_capability(id, cap, &perms).await.unwrap();
                            model.entry(id.clone()).or_default().insert(cap.to_string(), perms);
                        }
                        Op::Revoke { instance, cap } => {
                            let Some(id) = ids.get(instance) else { continue };
                            let held = model.get_mut(id).and_then(|caps| caps.remove(cap)).is_some();
                            let result = cluster.cp.revoke_capability(id, cap).await;
                            prop_assert_eq!(result.is_ok(), held);
                        }
                        Op::Query(i) => {
                            if ids.get(i).is_none() {
                                prop_assert_eq!(
                                    cluster.cp.query_instance("missing").unwrap_err().error_code,
                                    ErrorCode::InstanceNotFound
                                );
                            }
                        }
                    }
                    for (id, caps) in &model {
                        let registry: BTreeMap<String, Vec<String>> =
                            cluster.cp.capabilities(id).into_iter().map(|c| (c.capability_id, c.permissions)).collect();
                        prop_assert_eq!(&registry, caps);
                        let node = cluster.cp.query_instance(id).unwrap().metadata.node_id;
                        let agent = cluster.agents.iter().find(|a| a.node_id() == node).unwrap();
                        let enforced: BTreeMap<String, Vec<String>> = agent
                            .snapshot()
                            .into_iter()
                            .find(|f| f.metadata.instance_id == *id)
                            .unwrap()
                            .capabilities
                            .into_iter()
                            .map(|c| (c.capability_id, c.permissions))
                            .collect();
                        prop_assert_eq!(&enforced, caps);
                    }
                }
                for id in &ids {
                    let _ = cluster.cp.stop_instance(id).await;
                }
                Ok(())
            })
        })
        .unwrap();
}

/// Feature: wasm-orchestrator, Property 13: Execution Facts Recording
/// A fresh control plane rebuilds exactly the same instance list and registry from the agents' snapshots:
/// nothing else was needed, because nothing else was kept.
#[test]
fn a_restarted_control_plane_rebuilds_from_agent_snapshots() {
    let rt = runtime();
    rt.block_on(async {
        let cluster = cluster(2).await;
        let a = cluster
            .cp
            .start_instance(start_request(None, module(fixtures::KV_GREETER), kv(&["kv:write"])))
            .await
            .unwrap();
        let b =
            cluster.cp.start_instance(start_request(None, module(fixtures::SLEEPER), kv(&["kv:read"]))).await.unwrap();
        let c = cluster.cp.start_instance(start_request(None, module(fixtures::TRAP), vec![])).await.unwrap();
        eventually("facts settled", || {
            let all = cluster.cp.list_instances();
            let want = |m: &factum_proto::InstanceMetadata| {
                if m.instance_id == c {
                    InstanceStatus::Crashed
                } else {
                    InstanceStatus::Running
                }
            };
            all.len() == 3 && all.iter().all(|m| m.status == want(m))
        })
        .await;
        let fresh = ControlPlane::new(Env::tokio(), ControlPlaneConfig::default());
        assert!(fresh.list_instances().is_empty());
        for agent in &cluster.agents {
            fresh.report_node(agent.node_report()).unwrap();
        }
        assert_eq!(fresh.list_instances(), cluster.cp.list_instances());
        for id in [&a, &b, &c] {
            assert_eq!(fresh.capabilities(id), cluster.cp.capabilities(id));
        }
        for id in [a, b, c] {
            cluster.cp.stop_instance(&id).await.unwrap();
        }
    });
}

#[test]
fn an_agent_speaking_another_protocol_version_is_refused() {
    let cp = ControlPlane::new(Env::tokio(), ControlPlaneConfig::default());
    let report = factum_proto::NodeReport {
        protocol_version: factum_proto::PROTOCOL_VERSION + 1,
        node_id: "n".into(),
        agent_addr: "127.0.0.1:1".into(),
        max_instances: 1,
        instances: vec![],
        taken_at: 0,
        boot: 1,
        sequence: 1,
    };
    assert_eq!(cp.report_node(report).unwrap_err().error_code, ErrorCode::InvalidRequest);
    assert!(cp.list_nodes().is_empty());
}

#[test]
fn starts_without_nodes_are_resource_exhausted() {
    let rt = runtime();
    rt.block_on(async {
        let cp = ControlPlane::new(Env::tokio(), ControlPlaneConfig::default());
        let err = cp.start_instance(start_request(None, module(fixtures::SLEEPER), vec![])).await.unwrap_err();
        assert_eq!(err.error_code, ErrorCode::ResourceExhausted);
    });
}

#[test]
fn a_retried_start_gets_the_same_answer_and_a_different_one_under_its_id_is_refused() {
    let rt = runtime();
    rt.block_on(async {
        let cluster = cluster(1).await;
        let start = || start_request(Some("web-1"), module(fixtures::SLEEPER), kv(&["kv:read"]));
        assert_eq!(cluster.cp.start_instance(start()).await.unwrap(), "web-1");
        assert_eq!(cluster.cp.start_instance(start()).await.unwrap(), "web-1", "a retry is answered, not refused");
        assert_eq!(cluster.cp.list_instances().len(), 1, "and starts nothing more");
        let mut other_policy = start();
        other_policy.restart_policy.policy_type = factum_proto::PolicyType::Always;
        let other_caps = start_request(Some("web-1"), module(fixtures::SLEEPER), kv(&["kv:write"]));
        let other_module = start_request(Some("web-1"), module(fixtures::EXIT_CLEAN), kv(&["kv:read"]));
        for (what, req) in [("policy", other_policy), ("capabilities", other_caps), ("module", other_module)] {
            let err = cluster.cp.start_instance(req).await.unwrap_err();
            assert_eq!(err.error_code, ErrorCode::InvalidRequest, "{what}");
            assert!(err.message.contains("already used by another start"), "{what}: {}", err.message);
        }
        cluster.cp.stop_instance("web-1").await.unwrap();
    });
}
