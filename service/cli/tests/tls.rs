//! Mutual TLS between real components on loopback TCP, with certificates from `factum certs`: each way in
//! without the right certificate is refused with its reason, and a certificate only counts for the identity
//! it names.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // tests may panic

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use factum_cli::certs;
use factum_control_plane::{ControlPlane, ControlPlaneConfig};
use factum_env::rpc::{self, tls::Tls, Credentials};
use factum_env::Env;
use factum_node_agent::{Agent, AgentConfig};
use factum_proto::{ControlPlaneClient, ErrorCode, Principal, RestartPolicy, StartRequest};
use factum_providers::MemoryKv;
use factum_wasm::fixtures::{self, module};
use factum_wasm::WasmiEngine;

/// A fresh directory under the system's temporary directory.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("factum-tls-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn alice() -> Principal {
    Principal::Operator("alice".into())
}

fn node(id: &str) -> Principal {
    Principal::Node(id.into())
}

/// The env of `principal` with its certificate from `dir`.
fn tls_env(dir: &Path, principal: Principal) -> Env {
    let tls = Tls::from_dir(dir, &principal).unwrap();
    Env::tokio().with_credentials(Credentials::tls(principal, tls))
}

struct Cluster {
    dir: PathBuf,
    cp: ControlPlane,
    cp_addr: String,
    agent: Agent,
    agent_addr: String,
}

/// A CA with certificates for a control plane, node-1, node-2, alice and bob (reader); a control plane and
/// node-1 running over TLS.
async fn cluster(name: &str) -> Cluster {
    let dir = scratch(name);
    let identities =
        [Principal::ControlPlane, node("node-1"), node("node-2"), alice(), Principal::Reader("bob".into())];
    certs::init(&dir, &identities).unwrap();

    let cp_env = tls_env(&dir, Principal::ControlPlane);
    let listener = cp_env.net.bind("127.0.0.1:0").await.unwrap();
    let cp_addr = listener.local_addr().unwrap();
    let cp = ControlPlane::new(cp_env.clone(), ControlPlaneConfig::default());
    cp_env.spawn(factum_control_plane::serve(cp.clone(), listener));

    let agent_env = tls_env(&dir, node("node-1"));
    let listener = agent_env.net.bind("127.0.0.1:0").await.unwrap();
    let agent_addr = listener.local_addr().unwrap();
    let mut config = AgentConfig::new("node-1", agent_addr.clone());
    config.heartbeat_interval = Duration::from_millis(100);
    let (agent, reports) =
        Agent::new(agent_env.clone(), config, Arc::new(WasmiEngine::new()), Arc::new(MemoryKv::new()));
    agent_env.spawn(factum_node_agent::serve(agent.clone(), listener));
    agent_env.spawn(factum_node_agent::run_control_plane_link(agent.clone(), cp_addr.clone(), reports));
    for _ in 0..500 {
        if cp.list_nodes().iter().any(|n| n.available) {
            return Cluster { dir, cp, cp_addr, agent, agent_addr };
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("node-1 never registered over TLS");
}

async fn client(env: &Env, addr: &str) -> Result<ControlPlaneClient, std::io::Error> {
    let stream = rpc::dial(env, addr, &Principal::ControlPlane).await?;
    Ok(rpc::start_client(env, ControlPlaneClient::new(Default::default(), rpc::transport(stream))))
}

fn sleeper(id: &str) -> StartRequest {
    StartRequest {
        instance_id: Some(id.into()),
        module_bytes: module(fixtures::SLEEPER),
        module_hash: None,
        capabilities: vec![],
        restart_policy: RestartPolicy::default(),
        config: Default::default(),
        constraints: Default::default(),
    }
}

#[tokio::test]
async fn an_operator_with_a_certificate_runs_the_cluster_over_tls() {
    let cluster = cluster("operator").await;
    let alice = client(&tls_env(&cluster.dir, alice()), &cluster.cp_addr).await.unwrap();
    let id = alice.start_instance(rpc::rpc_context(), sleeper("web-1")).await.unwrap().unwrap();
    assert_eq!(id, "web-1");
    assert_eq!(cluster.agent.node_report().instances.len(), 1, "the control plane reached the agent over TLS");
    let bob = client(&tls_env(&cluster.dir, Principal::Reader("bob".into())), &cluster.cp_addr).await.unwrap();
    assert_eq!(bob.list_instances(rpc::rpc_context()).await.unwrap().unwrap().len(), 1);
    let refused = bob.stop_instance(rpc::rpc_context(), id).await.unwrap().unwrap_err();
    assert_eq!(refused.error_code, ErrorCode::PermissionDenied);
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused() {
    let cluster = cluster("plaintext").await;
    let plaintext = Env::tokio().with_credentials(Credentials::claim(alice()));
    let refused = client(&plaintext, &cluster.cp_addr).await.err().unwrap();
    assert!(refused.to_string().contains("the peer speaks TLS and this side plaintext"), "{refused}");
    assert!(cluster.cp.list_instances().is_empty());
}

#[tokio::test]
async fn a_certificate_of_another_ca_is_refused() {
    let cluster = cluster("wrong-ca").await;
    let other = scratch("other-ca");
    certs::init(&other, &[alice()]).unwrap();
    // Its own CA trusts nothing of this cluster's; with this cluster's CA trusted, its certificate still fails.
    let refused = client(&tls_env(&other, alice()), &cluster.cp_addr).await.err().unwrap();
    assert!(refused.to_string().contains("TLS handshake failed: invalid peer certificate"), "{refused}");
    std::fs::copy(cluster.dir.join("ca.pem"), other.join("ca.pem")).unwrap();
    assert!(client(&tls_env(&other, alice()), &cluster.cp_addr).await.is_err());
}

#[tokio::test]
async fn a_certificate_counts_only_for_the_identity_it_names() {
    let cluster = cluster("claims").await;
    // node-2's certificate and key under alice's file names: a node claiming to be an operator.
    let forged = scratch("forged");
    std::fs::create_dir_all(&forged).unwrap();
    std::fs::copy(cluster.dir.join("ca.pem"), forged.join("ca.pem")).unwrap();
    std::fs::copy(cluster.dir.join("node-node-2.pem"), forged.join("operator-alice.pem")).unwrap();
    std::fs::copy(cluster.dir.join("node-node-2.key"), forged.join("operator-alice.key")).unwrap();
    let refused = client(&tls_env(&forged, alice()), &cluster.cp_addr).await.err().unwrap();
    assert_eq!(refused.kind(), std::io::ErrorKind::PermissionDenied);
    assert!(refused.to_string().contains("the client's certificate does not name operator/alice"), "{refused}");

    // As itself, node-2 may not operate, nor report for node-1.
    let node2 = client(&tls_env(&cluster.dir, node("node-2")), &cluster.cp_addr).await.unwrap();
    let refused = node2.start_instance(rpc::rpc_context(), sleeper("x")).await.unwrap().unwrap_err();
    assert_eq!(refused.error_code, ErrorCode::PermissionDenied);
    let mut forged_report = cluster.agent.node_report();
    forged_report.agent_addr = "127.0.0.1:1".into();
    let refused = node2.report_node(rpc::rpc_context(), forged_report).await.unwrap().unwrap_err();
    assert!(refused.message.contains("needs the identity of node node-1"), "{refused}");
    assert_eq!(cluster.cp.list_nodes()[0].agent_addr, cluster.agent_addr, "the forged address was not taken");
}

#[tokio::test]
async fn an_agent_serves_only_the_control_plane_and_shows_its_own_name() {
    let cluster = cluster("agent").await;
    let alice_env = tls_env(&cluster.dir, alice());
    let refused = rpc::dial(&alice_env, &cluster.agent_addr, &node("node-1")).await.err().unwrap();
    assert!(refused.to_string().contains("needs the control plane's identity; this connection is operator/alice"));
    // A client that means to call the control plane and is sent to the agent stops at the agent's certificate,
    // which names node-1: a redirected address cannot pass for the control plane.
    let misdirected = rpc::dial(&alice_env, &cluster.agent_addr, &Principal::ControlPlane).await.err().unwrap();
    assert!(misdirected.to_string().contains("TLS handshake failed: invalid peer certificate"), "{misdirected}");
}
