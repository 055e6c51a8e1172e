//! The typed client against a control plane and an agent in this process, over loopback TCP: every call, the
//! followers, and the design's error codes for what goes wrong.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // tests may panic

use std::sync::Arc;
use std::time::Duration;

use factum_client::proto::{CapabilityGrant, ErrorCode, InstanceStatus, Principal, StartRequest};
use factum_client::{Client, Credentials};
use factum_control_plane::{ControlPlane, ControlPlaneConfig};
use factum_env::Env;
use factum_node_agent::{Agent, AgentConfig};
use factum_providers::MemoryKv;
use factum_wasm::fixtures::{self, module};
use factum_wasm::WasmiEngine;
use futures::StreamExt as _;

/// A control plane and one agent; the control plane's address.
async fn cluster() -> String {
    let env = Env::tokio();
    let listener = env.net.bind("127.0.0.1:0").await.unwrap();
    let cp_addr = listener.local_addr().unwrap();
    let cp = ControlPlane::new(env.clone(), ControlPlaneConfig::default());
    env.spawn(factum_control_plane::serve(cp.clone(), listener));
    let listener = env.net.bind("127.0.0.1:0").await.unwrap();
    let mut config = AgentConfig::new("node-1", listener.local_addr().unwrap());
    config.heartbeat_interval = Duration::from_millis(100);
    let (agent, reports) = Agent::new(env.clone(), config, Arc::new(WasmiEngine::new()), Arc::new(MemoryKv::new()));
    env.spawn(factum_node_agent::serve(agent.clone(), listener));
    env.spawn(factum_node_agent::run_control_plane_link(agent, cp_addr.clone(), reports));
    while cp.list_nodes().is_empty() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cp_addr
}

async fn connect(addr: &str, principal: Principal) -> Client {
    Client::connect(addr, Credentials::claim(principal)).await.unwrap()
}

fn kv_greeter() -> StartRequest {
    let grant = CapabilityGrant { capability_id: "kv".into(), permissions: vec!["kv:write".into()] };
    StartRequest { module_bytes: module(fixtures::KV_GREETER), capabilities: vec![grant], ..StartRequest::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_works_and_says_what_went_wrong() {
    let addr = cluster().await;
    let client = connect(&addr, Principal::Operator("alice".into())).await;
    assert_eq!(client.nodes().await.unwrap()[0].node_id, "node-1");

    // A start without an id gets one drawn by the client, and repeating it is answered, not run twice.
    let id = client.start(kv_greeter()).await.unwrap();
    assert!(id.starts_with("i-"), "{id}");
    let again = StartRequest { instance_id: Some(id.clone()), ..kv_greeter() };
    assert_eq!(client.start(again).await.unwrap(), id);
    assert_eq!(client.list().await.unwrap().len(), 1);
    // It writes its greeting once a second, and crashes on its first call after the revoke.
    let mut kv = Vec::new();
    for _ in 0..500 {
        kv = client.inspect_kv("kv", "").await.unwrap();
        if !kv.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(kv[0].value, b"hello from factum");
    client.assign(&id, "bus", &["msg:publish:news".into()]).await.unwrap();
    client.revoke(&id, "kv").await.unwrap();
    let mut status = InstanceStatus::Running;
    for _ in 0..500 {
        status = client.query(&id).await.unwrap().metadata.status;
        if status.is_terminal() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(status, InstanceStatus::Crashed);
    assert!(client.logs(&id, 0).await.unwrap().entries.is_empty(), "the greeter prints nothing");

    // Following without `follow` ends once caught up; the events tell the instance's story in order.
    let pages: Vec<_> = client.follow_events(0, false).collect().await;
    let said: Vec<String> = pages.into_iter().flat_map(|p| p.unwrap().entries).map(|e| e.kind.to_string()).collect();
    let story: Vec<&String> = said.iter().filter(|e| e.contains(&id)).collect();
    assert_eq!(
        story[..3],
        [
            &format!("instance {id} starting on node-1"),
            &format!("granted kv to {id}: kv:write"),
            &format!("instance {id} running on node-1")
        ],
        "{said:?}"
    );
    assert_eq!(
        story[3..5],
        [&format!("granted bus to {id}: msg:publish:news"), &format!("revoked kv from {id}")],
        "{said:?}"
    );
    assert!(story[5].starts_with(&format!("instance {id} crashed on node-1: ")), "{said:?}");

    let last = client.last_event().await.unwrap();
    assert_eq!(last, said.len() as u64);
    assert_eq!(client.follow_events(last, false).count().await, 0, "nothing after the newest");
    client.remove(&id).await.unwrap();
    let gone = client.query(&id).await.unwrap_err();
    assert_eq!(gone.error_code, ErrorCode::InstanceNotFound);
    let logs: Vec<_> = client.follow_logs(&id, 0, true).collect().await;
    assert_eq!(logs.len(), 1, "a follower ends after its first error");
    assert_eq!(logs[0].as_ref().unwrap_err().error_code, ErrorCode::InstanceNotFound);

    let reader = connect(&addr, Principal::Reader("bob".into())).await;
    assert!(reader.list().await.unwrap().is_empty());
    let refused = reader.start(kv_greeter()).await.unwrap_err();
    assert_eq!(refused.error_code, ErrorCode::PermissionDenied);
    let bad = client.start(StartRequest { module_bytes: b"not wasm".to_vec(), ..StartRequest::default() }).await;
    assert_eq!(bad.unwrap_err().error_code, ErrorCode::InvalidRequest);
}

#[tokio::test]
async fn a_control_plane_that_is_not_there_is_communication_failure() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = closed.local_addr().unwrap().to_string();
    drop(closed);
    let refused = Client::connect(addr, Credentials::claim(Principal::Operator("alice".into()))).await;
    let e = refused.err().unwrap();
    assert_eq!(e.error_code, ErrorCode::CommunicationFailure);
    assert!(e.message.contains("cannot reach the control plane"), "{e}");
}
