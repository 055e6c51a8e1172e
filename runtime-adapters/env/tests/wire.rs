//! Protocol messages through the real RPC framing.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // tests may panic

use factum_env::rpc;
use factum_proto::{
    CapabilityAssignment, InstanceFacts, InstanceMetadata, InstanceStatus, NodeReport, PolicyType, RestartPolicy,
    StartInstanceRequest, StatusReport, PROTOCOL_VERSION,
};
use futures::{SinkExt, StreamExt};
use proptest::prelude::*;
use serde::{de::DeserializeOwned, Serialize};

fn arb_status() -> impl Strategy<Value = InstanceStatus> {
    prop_oneof![
        Just(InstanceStatus::Starting),
        Just(InstanceStatus::Running),
        Just(InstanceStatus::Stopped),
        Just(InstanceStatus::Crashed),
        Just(InstanceStatus::Unknown),
    ]
}

fn arb_policy() -> impl Strategy<Value = RestartPolicy> {
    (
        prop_oneof![Just(PolicyType::Never), Just(PolicyType::Always), Just(PolicyType::OnFailure)],
        prop::option::of(any::<u32>()),
        prop::option::of(any::<u32>()),
    )
        .prop_map(|(policy_type, max_retries, backoff_seconds)| RestartPolicy {
            policy_type,
            max_retries,
            backoff_seconds,
        })
}

fn arb_assignment(instance_id: String) -> impl Strategy<Value = CapabilityAssignment> {
    ("[a-z]{1,8}", prop::sample::subsequence(vec!["kv:read", "kv:write", "kv:delete"], 1..=3)).prop_map(
        move |(cap, perms)| {
            let perms: Vec<String> = perms.into_iter().map(String::from).collect();
            CapabilityAssignment::new(&instance_id, &cap, &perms).unwrap()
        },
    )
}

fn arb_metadata() -> impl Strategy<Value = InstanceMetadata> {
    (
        "[a-z0-9-]{1,20}",
        "[a-z0-9-]{1,10}",
        "[0-9a-f]{64}",
        any::<u64>(),
        arb_status(),
        any::<u32>(),
        prop::option::of("\\PC{0,30}"),
        any::<u32>(),
        prop::option::of(any::<u64>()),
    )
        .prop_map(
            |(
                instance_id,
                node_id,
                module_hash,
                created_at,
                status,
                restarts,
                last_error,
                restart_streak,
                backoff_ms,
            )| {
                InstanceMetadata {
                    instance_id,
                    node_id,
                    module_hash,
                    created_at,
                    status,
                    restarts,
                    last_error,
                    restart_streak,
                    backoff_ms,
                }
            },
        )
}

fn arb_config() -> impl Strategy<Value = factum_proto::GuestConfig> {
    (".{0,8}", prop::collection::vec(".{0,8}", 0..3), prop::collection::vec(("[A-Z]{1,4}", ".{0,8}"), 0..3))
        .prop_map(|(program, args, env)| factum_proto::GuestConfig { program, args, env })
}

fn arb_labels() -> impl Strategy<Value = factum_proto::Labels> {
    prop::collection::btree_map("[a-z/.]{1,6}", "[a-z0-9-]{0,6}", 0..3)
}

fn arb_facts() -> impl Strategy<Value = InstanceFacts> {
    arb_metadata().prop_flat_map(|metadata| {
        let id = metadata.instance_id.clone();
        let state = (arb_policy(), (arb_config(), arb_labels()), any::<(u64, u64, u64)>());
        (Just(metadata), prop::collection::vec(arb_assignment(id), 0..3), state).prop_map(
            |(metadata, capabilities, (restart_policy, (config, constraints), (seq, epoch, boot)))| InstanceFacts {
                metadata,
                capabilities,
                restart_policy,
                config,
                constraints,
                seq,
                epoch,
                lease: Some(7),
                accepted_after: factum_proto::SnapshotMark { boot, sequence: seq / 2 },
                seal: Default::default(),
            },
        )
    })
}

/// Sends `msg` through one end of the RPC framing and reads it back from the other.
fn round_trip<T: Serialize + DeserializeOwned + Unpin + Send + 'static>(msg: T) -> T {
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    rt.block_on(async move {
        let (a, b) = tokio::io::duplex(1 << 16);
        let mut tx = rpc::transport::<_, T, T>(a);
        let mut rx = rpc::transport::<_, T, T>(b);
        let send = tokio::spawn(async move { tx.send(msg).await.unwrap() });
        let back = rx.next().await.unwrap().unwrap();
        send.await.unwrap();
        back
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Feature: wasm-orchestrator, Property 16: Control Plane and Node Agent Protocol Communication
    /// Every StatusReport survives the control plane ↔ agent framing unchanged.
    #[test]
    fn status_reports_round_trip(
        (instance_id, node_id) in ("[a-z0-9-]{1,20}", "[a-z0-9-]{1,10}"),
        status in arb_status(), timestamp in any::<u64>(), seq in any::<u64>(), restarts in any::<u32>(),
        last_error in prop::option::of("\\PC{0,40}"), epoch in any::<u64>(),
        (restart_streak, backoff_ms) in (any::<u32>(), prop::option::of(any::<u64>())),
    ) {
        let report = StatusReport {
            instance_id, node_id, status, timestamp, seq, restarts, last_error, epoch, restart_streak, backoff_ms,
            seal: Default::default(),
        };
        prop_assert_eq!(round_trip(report.clone()), report);
    }

    /// Feature: wasm-orchestrator, Property 16: Control Plane and Node Agent Protocol Communication
    /// Every StartInstanceRequest (module bytes, assignments, policy) and every NodeReport survives the framing.
    #[test]
    fn start_requests_and_node_reports_round_trip(
        module_bytes in prop::collection::vec(any::<u8>(), 0..512),
        policy in arb_policy(),
        epoch in any::<u64>(),
        facts in prop::collection::vec(arb_facts(), 0..4),
    ) {
        let capabilities = facts.iter().flat_map(|f| f.capabilities.clone()).collect();
        let start = StartInstanceRequest { module_hash: String::new(), instance_id: "i-1".into(), module_bytes, capabilities, grant_seals: Default::default(), restart_policy: policy, config: Default::default(), constraints: Default::default(), epoch, node_lease: Some(3), restarts: 2, seal: factum_proto::PlacementSeal([9; 16]) };
        prop_assert_eq!(round_trip(start.clone()), start);
        let report = NodeReport { protocol_version: PROTOCOL_VERSION, node_id: "n".into(), agent_addr: "h:1".into(), max_instances: 9, labels: Default::default(), drained: false, instances: facts, boot: 11, sequence: 5, base: None, removed: vec![] };
        prop_assert_eq!(round_trip(report.clone()), report);
    }
}

/// A node's snapshot: `facts` under distinct ids (a later duplicate id is dropped).
fn snapshot_of(facts: Vec<InstanceFacts>, sequence: u64) -> NodeReport {
    let mut seen = std::collections::BTreeSet::new();
    let instances = facts.into_iter().filter(|f| seen.insert(f.metadata.instance_id.clone())).collect();
    NodeReport {
        protocol_version: PROTOCOL_VERSION,
        node_id: "n".into(),
        agent_addr: "h:1".into(),
        max_instances: 9,
        labels: Default::default(),
        drained: false,
        instances,
        boot: 11,
        sequence,
        base: None,
        removed: vec![],
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Feature: wasm-orchestrator, Property 9: Node Agent Status Reporting
    /// A heartbeat sent as a delta carries every change: the control plane, applying it through the framing to
    /// the snapshot it holds, has exactly the agent's full snapshot, whatever was added, changed or removed.
    #[test]
    fn a_delta_heartbeat_rebuilds_the_full_snapshot(
        before in prop::collection::vec(arb_facts(), 0..6),
        kept in prop::collection::vec(any::<(bool, bool)>(), 6),
        added in prop::collection::vec(arb_facts(), 0..4),
    ) {
        use factum_proto::delta;
        let base = snapshot_of(before, 4);
        // The next snapshot: each earlier instance kept as it was, kept with a new fact, or gone; plus new ones.
        let mut next = Vec::new();
        for (facts, (keep, change)) in base.instances.iter().zip(kept.iter().chain(std::iter::repeat(&(true, false)))) {
            let mut facts = facts.clone();
            if *change {
                facts.seq = facts.seq.wrapping_add(1);
                facts.metadata.status = InstanceStatus::Crashed;
            }
            if *keep {
                next.push(facts);
            }
        }
        next.extend(added);
        let full = snapshot_of(next, 5);
        let mut held = delta::facts_of(&base);
        let mut sent = full.clone();
        delta::into_delta(&mut sent, base.sequence, &held);
        prop_assert!(sent.instances.len() <= full.instances.len());
        delta::apply(&mut held, &mut round_trip(sent));
        prop_assert_eq!(held, delta::facts_of(&full));
    }
}

/// Feeds raw bytes to a server-side transport of request type `T`, as a peer would send them, and reads
/// what it decodes; an `Err` item is a refused frame, never a panic.
fn decode_raw<T: DeserializeOwned + Serialize + Unpin + Send + 'static>(bytes: Vec<u8>) -> usize {
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    rt.block_on(async move {
        let (mut a, b) = tokio::io::duplex(1 << 20);
        let mut rx = rpc::transport::<_, T, T>(b);
        tokio::io::AsyncWriteExt::write_all(&mut a, &bytes).await.unwrap();
        drop(a);
        let mut decoded = 0;
        while let Some(item) = rx.next().await {
            if item.is_err() {
                break;
            }
            decoded += 1;
        }
        decoded
    })
}

/// A well-formed frame holding a start request for either service.
fn valid_frames(module_bytes: Vec<u8>) -> (Vec<u8>, Vec<u8>) {
    let start = StartInstanceRequest {
        module_hash: String::new(),
        grant_seals: Default::default(),
        instance_id: "i-1".into(),
        module_bytes,
        capabilities: vec![],
        restart_policy: RestartPolicy::default(),
        config: Default::default(),
        constraints: Default::default(),
        epoch: 1,
        node_lease: Some(3),
        restarts: 0,
        seal: Default::default(),
    };
    let agent = tarpc::ClientMessage::Request(tarpc::Request {
        context: rpc::rpc_context(),
        id: 1,
        message: factum_proto::NodeAgentRequest::StartInstanceLocal { request: start },
    });
    let cp = tarpc::ClientMessage::Request(tarpc::Request {
        context: rpc::rpc_context(),
        id: 1,
        message: factum_proto::ControlPlaneRequest::StopInstance { instance_id: "i-1".into() },
    });
    (encode_frame(agent), encode_frame(cp))
}

/// The bytes the RPC framing puts on the wire for `msg`.
fn encode_frame<T: Serialize + DeserializeOwned + Unpin + Send + 'static>(msg: T) -> Vec<u8> {
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    rt.block_on(async move {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let mut tx = rpc::transport::<_, T, T>(a);
        tx.send(msg).await.unwrap();
        drop(tx);
        let mut bytes = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut b, &mut bytes).await.unwrap();
        bytes
    })
}

type AgentMessage = tarpc::ClientMessage<factum_proto::NodeAgentRequest>;
type ControlPlaneMessage = tarpc::ClientMessage<factum_proto::ControlPlaneRequest>;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Fuzzing the RPC frames of both services: random bytes, and well-formed requests with bytes flipped,
    /// truncated or extended, decode to a request or an error, never a panic or a runaway allocation.
    #[test]
    fn garbage_and_mutated_frames_never_panic_either_service(
        garbage in prop::collection::vec(any::<u8>(), 0..256),
        module_bytes in prop::collection::vec(any::<u8>(), 0..64),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
    ) {
        decode_raw::<AgentMessage>(garbage.clone());
        decode_raw::<ControlPlaneMessage>(garbage);
        let (agent, cp) = valid_frames(module_bytes);
        prop_assert_eq!(decode_raw::<AgentMessage>(agent.clone()), 1);
        prop_assert_eq!(decode_raw::<ControlPlaneMessage>(cp.clone()), 1);
        for frame in [agent, cp] {
            let mut flipped = frame.clone();
            for (at, byte) in &flips {
                let i = at.index(flipped.len());
                flipped[i] ^= byte;
            }
            decode_raw::<AgentMessage>(flipped.clone());
            decode_raw::<ControlPlaneMessage>(flipped);
            let truncated = frame[..cut.index(frame.len())].to_vec();
            prop_assert_eq!(decode_raw::<AgentMessage>(truncated.clone()) + decode_raw::<ControlPlaneMessage>(truncated), 0);
        }
    }
}
