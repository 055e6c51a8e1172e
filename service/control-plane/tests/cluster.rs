//! The control plane against real agents over real tarpc on loopback TCP: validation, lifecycle, the
//! capability registry, and rebuilding every map from agent snapshots after a restart.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // tests may panic

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use factum_control_plane::{ControlPlane, ControlPlaneConfig};
use factum_env::rpc::{self, Credentials};
use factum_env::Env;
use factum_node_agent::{Agent, AgentConfig};
use factum_proto::{
    CapabilityGrant, ControlPlaneClient, ErrorCode, InstanceStatus, Principal, RestartPolicy, StartRequest,
};
use factum_providers::MemoryKv;
use factum_registry::MemoryRegistry;
use factum_wasm::fixtures::{self, module};
use factum_wasm::WasmiEngine;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

struct Cluster {
    cp: ControlPlane,
    cp_addr: String,
    agents: Vec<Agent>,
    agent_addrs: Vec<String>,
}

/// A control plane and `n` agents in this process, talking tarpc over loopback TCP. No etcd, no registry:
/// everything is in memory.
async fn cluster(n: usize) -> Cluster {
    cluster_with(n, ControlPlaneConfig::default()).await
}

async fn cluster_with(n: usize, config: ControlPlaneConfig) -> Cluster {
    let env = Env::tokio();
    let listener = env.net.bind("127.0.0.1:0").await.unwrap();
    let cp_addr = listener.local_addr().unwrap();
    let cp = ControlPlane::new(env.clone(), config);
    env.spawn(factum_control_plane::serve(cp.clone(), listener));
    let (mut agents, mut agent_addrs) = (Vec::new(), Vec::new());
    for i in 1..=n {
        let listener = env.net.bind("127.0.0.1:0").await.unwrap();
        agent_addrs.push(listener.local_addr().unwrap());
        let mut config = AgentConfig::new(format!("node-{i}"), listener.local_addr().unwrap());
        config.heartbeat_interval = Duration::from_millis(100);
        let (agent, reports) = Agent::new(env.clone(), config, Arc::new(WasmiEngine::new()), Arc::new(MemoryKv::new()));
        env.spawn(factum_node_agent::serve(agent.clone(), listener));
        env.spawn(factum_node_agent::run_control_plane_link(agent.clone(), cp_addr.clone(), reports));
        agents.push(agent);
    }
    eventually("all nodes registered", || cp.list_nodes().iter().filter(|n| n.available).count() == n).await;
    Cluster { cp, cp_addr, agents, agent_addrs }
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
        module_hash: None,
        capabilities: caps,
        restart_policy: RestartPolicy::default(),
        config: Default::default(),
        constraints: Default::default(),
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

/// A start by module hash alone runs a module the control plane holds (an instance of it runs), asks for the
/// bytes of one it does not hold, and refuses a hash that is malformed or does not match the bytes sent with it.
#[test]
fn a_start_by_hash_runs_a_held_module_and_asks_for_the_bytes_of_another() {
    runtime().block_on(async {
        let cluster = cluster(1).await;
        let bytes = module(fixtures::SLEEPER);
        let hash = factum_proto::module_hash(&bytes);
        let by_hash = |hash: &str| StartRequest {
            module_bytes: Vec::new(),
            module_hash: Some(hash.to_string()),
            ..start_request(None, Vec::new(), vec![])
        };
        let missing = cluster.cp.start_instance(by_hash(&hash)).await.unwrap_err();
        assert!(missing.is_module_not_held(), "{missing:?}");
        assert!(cluster.cp.list_instances().is_empty(), "nothing placed for it");

        let first = cluster.cp.start_instance(start_request(None, bytes.clone(), vec![])).await.unwrap();
        let second = cluster.cp.start_instance(by_hash(&hash)).await.unwrap();
        eventually("both running", || {
            let all = cluster.cp.list_instances();
            all.len() == 2 && all.iter().all(|m| m.status == InstanceStatus::Running && m.module_hash == hash)
        })
        .await;

        let malformed = cluster.cp.start_instance(by_hash("not-a-hash")).await.unwrap_err();
        assert_eq!(malformed.error_code, ErrorCode::InvalidRequest);
        let lying =
            StartRequest { module_hash: Some(hash.clone()), ..start_request(None, module(fixtures::TRAP), vec![]) };
        let refused = cluster.cp.start_instance(lying).await.unwrap_err();
        assert_eq!(refused.error_code, ErrorCode::InvalidRequest);
        assert!(refused.message.contains("not to the module_hash"), "{refused}");
        for id in [first, second] {
            cluster.cp.stop_instance(&id).await.unwrap();
        }
    });
}

/// A node's report is answered with fresh seals of every grant the control plane holds for its instances, once
/// half their life is gone (at once, for a control plane that just met the node); a revoked grant gets none, so
/// the seal its node kept expires at the provider host.
#[test]
fn reports_renew_the_seals_of_held_grants_only() {
    runtime().block_on(async {
        let cluster = cluster(1).await;
        let mut caps = kv(&["kv:read"]);
        caps.push(CapabilityGrant { capability_id: "audit".into(), permissions: vec!["kv:read".into()] });
        let id = cluster.cp.start_instance(start_request(None, module(fixtures::SLEEPER), caps)).await.unwrap();
        eventually("running", || cluster.cp.list_instances().iter().any(|m| m.status == InstanceStatus::Running)).await;
        let ttl = Duration::from_secs(60);
        let renewed = |cp: &ControlPlane| {
            let ack = cp.report_node(cluster.agents[0].node_report()).unwrap();
            ack.renewed.into_iter().map(|(a, seal)| (a.capability_id.clone(), (a, seal))).collect::<BTreeMap<_, _>>()
        };
        let fresh = ControlPlane::new(Env::tokio(), ControlPlaneConfig { grant_ttl: ttl, ..Default::default() });
        let before = Env::tokio().wall_ms();
        let first = renewed(&fresh);
        assert_eq!(first.keys().collect::<Vec<_>>(), ["audit", "kv"]);
        let key = factum_proto::GrantKey::plaintext();
        for (assignment, seal) in first.values() {
            assert!(seal.expires_ms >= before + 60_000 && seal.expires_ms <= Env::tokio().wall_ms() + 60_000);
            let mut grant = key.seal(assignment, "node-1", seal.expires_ms);
            assert_eq!(grant.seal, *seal, "the seal is the control plane's for node-1");
            grant.seal.expires_ms += 1;
            let call = factum_proto::CapabilityInvocation {
                instance_id: id.clone(),
                capability_id: assignment.capability_id.clone(),
                operation: "get".into(),
                params: vec![],
            };
            assert!(key.check(&grant, &call, "node-1", before).is_err(), "an extended seal is not the control plane's");
        }
        assert!(renewed(&fresh).is_empty(), "not due again before half the TTL is gone");

        cluster.cp.revoke_capability(&id, "audit").await.unwrap();
        let after_revoke = ControlPlane::new(Env::tokio(), ControlPlaneConfig { grant_ttl: ttl, ..Default::default() });
        assert_eq!(renewed(&after_revoke).keys().collect::<Vec<_>>(), ["kv"]);
        cluster.cp.stop_instance(&id).await.unwrap();
    });
}

/// In registry mode a node's address is the one it registered under its lease: a report naming another one (a
/// confused or forged agent) does not redirect the control plane's calls to that node.
#[test]
fn in_registry_mode_node_addresses_come_from_the_registry() {
    runtime().block_on(async {
        let env = Env::tokio();
        let registry = Arc::new(MemoryRegistry::new(env.clone(), "/factum"));
        let cp = ControlPlane::new(env.clone(), ControlPlaneConfig::default());
        env.spawn(cp.clone().run_membership(registry.clone()));
        let config = AgentConfig::new("node-1", "127.0.0.1:7001");
        let (agent, _reports) =
            Agent::new(env.clone(), config, Arc::new(WasmiEngine::new()), Arc::new(MemoryKv::new()));
        env.spawn(factum_node_agent::run_registry_link(agent.clone(), registry));
        let registered = |addr: &str| cp.list_nodes().iter().any(|n| n.agent_addr == addr && n.available);
        eventually("node-1 registered", || registered("127.0.0.1:7001")).await;
        let mut report = agent.node_report();
        report.agent_addr = "127.0.0.1:1".into();
        cp.report_node(report).unwrap();
        assert!(registered("127.0.0.1:7001"), "a report moved the node: {:?}", cp.list_nodes());
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
        labels: Default::default(),
        drained: false,
        instances: vec![],
        boot: 1,
        sequence: 1,
        base: None,
        removed: vec![],
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

/// RemoveInstance takes an ended instance off its node and the control plane for good (heartbeats taken before
/// the removal do not bring it back); a running one must be stopped first; the id can then be used again.
#[test]
fn an_ended_instance_is_removed_everywhere_and_stays_removed() {
    runtime().block_on(async {
        let c = cluster(1).await;
        let id = c.cp.start_instance(start_request(Some("web"), module(fixtures::SLEEPER), kv(&["kv:read"]))).await;
        let id = id.unwrap();
        let refused = c.cp.remove_instance(&id).await.unwrap_err();
        assert_eq!(refused.error_code, ErrorCode::InvalidRequest);
        assert!(refused.message.contains("stop it before removing it"), "{}", refused.message);
        c.cp.stop_instance(&id).await.unwrap();
        c.cp.remove_instance(&id).await.unwrap();
        assert!(c.agents[0].metadata(&id).is_none(), "still on its node");
        // Ten heartbeats later, it has not been learned back from one taken before the removal.
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        assert!(c.cp.list_instances().is_empty(), "{:?}", c.cp.list_instances());
        let gone = c.cp.remove_instance(&id).await.unwrap_err();
        assert_eq!(gone.error_code, ErrorCode::InstanceNotFound);
        // The id is free, and a new start under it is a new instance.
        c.cp.start_instance(start_request(Some("web"), module(fixtures::EXIT_CLEAN), vec![])).await.unwrap();
        eventually("the new web stopped", || {
            c.cp.query_instance("web").unwrap().metadata.status == InstanceStatus::Stopped
        })
        .await;
        assert!(c.cp.query_instance("web").unwrap().capabilities.is_empty(), "the old grants came back");
    });
}

/// After the retention, ended instances are removed by themselves; running ones stay.
#[test]
fn ended_instances_are_removed_after_the_retention() {
    runtime().block_on(async {
        let config = ControlPlaneConfig {
            retention: Duration::from_millis(300),
            check_interval: Duration::from_millis(50),
            ..ControlPlaneConfig::default()
        };
        let c = cluster_with(1, config).await;
        tokio::spawn(c.cp.clone().run_failure_detector());
        c.cp.start_instance(start_request(Some("done"), module(fixtures::EXIT_CLEAN), vec![])).await.unwrap();
        c.cp.start_instance(start_request(Some("busy"), module(fixtures::SLEEPER), vec![])).await.unwrap();
        eventually("done removed", || c.cp.query_instance("done").is_err() && c.agents[0].metadata("done").is_none())
            .await;
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(c.cp.query_instance("busy").unwrap().metadata.status, InstanceStatus::Running);
        assert!(c.cp.query_instance("done").is_err(), "learned back after its removal");
    });
}

/// A control-plane client calling as `principal` over plaintext (where the claim is taken as it is).
async fn client_as(addr: &str, principal: Principal) -> ControlPlaneClient {
    let env = Env::tokio().with_credentials(Credentials::claim(principal));
    let stream = rpc::dial(&env, addr, &Principal::ControlPlane).await.unwrap();
    rpc::start_client(&env, ControlPlaneClient::new(Default::default(), rpc::transport(stream)))
}

#[test]
fn every_call_is_checked_against_the_callers_identity() {
    let rt = runtime();
    rt.block_on(async {
        let cluster = cluster(1).await;
        let ctx = rpc::rpc_context;
        let operator = client_as(&cluster.cp_addr, Principal::Operator("alice".into())).await;
        let reader = client_as(&cluster.cp_addr, Principal::Reader("bob".into())).await;
        let node = client_as(&cluster.cp_addr, Principal::Node("node-1".into())).await;
        let anonymous = client_as(&cluster.cp_addr, Principal::Anonymous).await;
        let start = || start_request(Some("web-1"), module(fixtures::SLEEPER), vec![]);

        for (who, client) in [("reader", &reader), ("node", &node), ("anonymous", &anonymous)] {
            let refused = client.start_instance(ctx(), start()).await.unwrap().unwrap_err();
            assert_eq!(refused.error_code, ErrorCode::PermissionDenied, "{who}");
            assert!(refused.message.starts_with("start_instance needs an operator identity"), "{refused}");
            let refused = client.inspect_kv(ctx(), "kv".into(), String::new()).await.unwrap().unwrap_err();
            assert_eq!(refused.error_code, ErrorCode::PermissionDenied, "{who}");
        }
        assert!(cluster.cp.list_instances().is_empty(), "a refused start started nothing");
        assert_eq!(operator.start_instance(ctx(), start()).await.unwrap().unwrap(), "web-1");
        for client in [&node, &anonymous] {
            let refused = client.list_instances(ctx()).await.unwrap().unwrap_err();
            assert!(refused.message.contains("needs an operator or reader identity"), "{refused}");
        }
        assert_eq!(reader.list_instances(ctx()).await.unwrap().unwrap().len(), 1);
        assert_eq!(reader.list_nodes(ctx()).await.unwrap().unwrap().len(), 1);
        assert!(reader.query_instance(ctx(), "web-1".into()).await.unwrap().is_ok());
        let refused = reader.stop_instance(ctx(), "web-1".into()).await.unwrap().unwrap_err();
        assert_eq!(refused.error_code, ErrorCode::PermissionDenied);
        assert!(matches!(cluster.cp.list_instances()[0].status, InstanceStatus::Running | InstanceStatus::Starting));
    });
}

#[test]
fn a_node_cannot_report_for_another_node() {
    let rt = runtime();
    rt.block_on(async {
        let cluster = cluster(1).await;
        cluster.cp.start_instance(start_request(Some("web-1"), module(fixtures::SLEEPER), vec![])).await.unwrap();
        eventually("web-1 runs", || cluster.cp.list_instances()[0].status == InstanceStatus::Running).await;
        let before = cluster.cp.list_nodes();
        let impostor = client_as(&cluster.cp_addr, Principal::Node("node-2".into())).await;
        // node-2 says it is node-1 and lives elsewhere, with nothing running: the redirect and the mass crash a
        // forged snapshot would cause.
        let mut forged = cluster.agents[0].node_report();
        forged.agent_addr = "127.0.0.1:1".into();
        forged.instances.clear();
        forged.sequence = u64::MAX;
        let refused = impostor.report_node(rpc::rpc_context(), forged).await.unwrap().unwrap_err();
        assert_eq!(refused.error_code, ErrorCode::PermissionDenied);
        assert!(
            refused.message.contains("needs the identity of node node-1; this connection is node/node-2"),
            "{refused}"
        );
        let status = factum_proto::StatusReport {
            instance_id: "web-1".into(),
            node_id: "node-1".into(),
            status: InstanceStatus::Crashed,
            timestamp: 1,
            seq: u64::MAX,
            restarts: 0,
            last_error: Some("forged".into()),
            epoch: u64::MAX,
            restart_streak: 0,
            backoff_ms: None,
            seal: Default::default(),
        };
        assert!(impostor.report_status(rpc::rpc_context(), status).await.unwrap().is_err());
        tokio::time::sleep(Duration::from_millis(300)).await; // heartbeats of the real node-1 go on
        let after = cluster.cp.list_nodes();
        assert_eq!(after.len(), 1);
        assert_eq!((&after[0].node_id, &after[0].agent_addr), (&before[0].node_id, &before[0].agent_addr));
        assert_eq!(cluster.cp.list_instances()[0].status, InstanceStatus::Running, "the forged crash was not applied");
    });
}

#[test]
fn a_node_cannot_claim_a_placement_epoch_the_control_plane_did_not_issue() {
    let rt = runtime();
    rt.block_on(async {
        let cluster = cluster(1).await;
        cluster.cp.start_instance(start_request(Some("web-1"), module(fixtures::SLEEPER), vec![])).await.unwrap();
        eventually("web-1 runs", || cluster.cp.list_instances()[0].status == InstanceStatus::Running).await;
        let held = cluster.cp.fact_position("web-1").unwrap();
        // The node itself, with its own identity: it may report for node-1, but only about placements it was
        // given. Epoch u64::MAX would have frozen web-1's facts (and overflowed the next reschedule's epoch).
        let node = client_as(&cluster.cp_addr, Principal::Node("node-1".into())).await;
        let forged = factum_proto::StatusReport {
            instance_id: "web-1".into(),
            node_id: "node-1".into(),
            status: InstanceStatus::Crashed,
            timestamp: 1,
            seq: 1,
            restarts: 0,
            last_error: Some("forged".into()),
            epoch: u64::MAX,
            restart_streak: 0,
            backoff_ms: None,
            seal: factum_proto::PlacementSeal([0xAB; 16]),
        };
        node.report_status(rpc::rpc_context(), forged.clone()).await.unwrap().unwrap();
        // The seal of epoch 1, replayed for an epoch it was not made for.
        let mut snapshot = cluster.agents[0].node_report();
        let replayed = snapshot.instances[0].seal;
        node.report_status(rpc::rpc_context(), factum_proto::StatusReport { epoch: 2, seal: replayed, ..forged })
            .await
            .unwrap()
            .unwrap();
        snapshot.instances[0].epoch = u64::MAX;
        snapshot.instances[0].metadata.status = InstanceStatus::Crashed;
        snapshot.sequence += 1_000;
        node.report_node(rpc::rpc_context(), snapshot).await.unwrap().unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(cluster.cp.fact_position("web-1"), Some(held), "epoch and sequence stay those issued");
        assert_eq!(cluster.cp.list_instances()[0].status, InstanceStatus::Running, "no forged fact was applied");
    });
}

#[test]
fn agents_serve_only_the_control_plane() {
    let rt = runtime();
    rt.block_on(async {
        let cluster = cluster(1).await;
        for principal in [Principal::Operator("alice".into()), Principal::Node("node-2".into()), Principal::Anonymous] {
            let env = Env::tokio().with_credentials(Credentials::claim(principal.clone()));
            let refused =
                rpc::dial(&env, &cluster.agent_addrs[0], &Principal::Node("node-1".into())).await.err().unwrap();
            assert_eq!(refused.kind(), std::io::ErrorKind::PermissionDenied);
            let expected =
                format!("calling a node agent needs the control plane's identity; this connection is {principal}");
            assert!(refused.to_string().contains(&expected), "{refused}");
        }
    });
}

/// Every change to the maps is journaled once, in order, as the facts that made it: a node joins, an instance
/// is placed, runs, gets and loses grants, ends and is removed. A reader may follow; a node may not.
#[test]
fn events_tell_what_changed_in_the_order_it_changed() {
    use factum_proto::events::EventKind;
    runtime().block_on(async {
        let c = cluster(1).await;
        let id = c.cp.start_instance(start_request(Some("web"), module(fixtures::SLEEPER), kv(&["kv:read"]))).await;
        let id = id.unwrap();
        eventually("web runs", || c.cp.query_instance(&id).unwrap().metadata.status == InstanceStatus::Running).await;
        c.cp.assign_capability(&id, "kv", &["kv:read".into(), "kv:write".into()]).await.unwrap();
        c.cp.revoke_capability(&id, "kv").await.unwrap();
        c.cp.stop_instance(&id).await.unwrap();
        c.cp.remove_instance(&id).await.unwrap();

        let page = c.cp.events(0);
        assert_eq!(page.evicted, 0);
        let seqs: Vec<u64> = page.entries.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "numbered from 1 without gaps");
        let said: Vec<String> = page.entries.iter().map(|e| e.kind.to_string()).collect();
        let expected = [
            format!("node node-1 joined at {}", c.agent_addrs[0]),
            "instance web starting on node-1".into(),
            "granted kv to web: kv:read".into(),
            "instance web running on node-1".into(),
            "granted kv to web: kv:read,kv:write".into(),
            "revoked kv from web".into(),
            "instance web stopped on node-1".into(),
            "instance web removed".into(),
        ];
        assert_eq!(said, expected);
        assert!(matches!(&page.entries[1].kind, EventKind::Instance { status: InstanceStatus::Starting, .. }));
        assert!(c.cp.events(page.next).entries.is_empty(), "nothing new after the last one");
        assert_eq!(c.cp.events(3).entries.len(), expected.len() - 3);

        let reader = client_as(&c.cp_addr, Principal::Reader("bob".into())).await;
        let followed = reader.events(rpc::rpc_context(), 0).await.unwrap().unwrap();
        assert_eq!(followed, page);
        let node = client_as(&c.cp_addr, Principal::Node("node-1".into())).await;
        let refused = node.events(rpc::rpc_context(), 0).await.unwrap().unwrap_err();
        assert_eq!(refused.error_code, ErrorCode::PermissionDenied);
    });
}
