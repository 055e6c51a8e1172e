//! Messaging end to end on one agent: a guest subscribes in `_start`, receives through its `factum_on_message`
//! export, loses its messages when the capability is revoked, and gets the message it crashed on again after
//! a restart (bounded), on both engines and virtual time.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // tests may panic

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use factum_env::{Env, SeededRng, TokioClock, TokioNet, TokioSpawn};
use factum_node_agent::{Agent, AgentConfig, Providers};
use factum_proto::{
    CapabilityAssignment, CapabilityInvocation, InstanceStatus, MessageEnvelope, MsgOperation, Permission, PolicyType,
    RestartPolicy, StartInstanceRequest,
};
use factum_providers::{MemoryKv, MessagingProvider, Provider};
use factum_wasm::fixtures::{module, SUBSCRIBER};
use factum_wasm::{WasmEngine, WasmiEngine, WasmtimeEngine};

fn engines() -> Vec<Arc<dyn WasmEngine>> {
    vec![Arc::new(WasmiEngine::new()), Arc::new(WasmtimeEngine::new().unwrap())]
}

struct Node {
    agent: Agent,
    kv: Arc<MemoryKv>,
    messaging: Arc<MessagingProvider>,
}

fn node(engine: Arc<dyn WasmEngine>) -> Node {
    node_with(engine, AgentConfig::new("n", "127.0.0.1:0"))
}

fn node_with(engine: Arc<dyn WasmEngine>, config: AgentConfig) -> Node {
    let env = Env {
        clock: Arc::new(TokioClock::with_wall_origin(UNIX_EPOCH)),
        net: Arc::new(TokioNet),
        spawner: Arc::new(TokioSpawn),
        rng: Arc::new(SeededRng::new(1)),
        trace: None,
        faults: None,
        credentials: factum_env::rpc::Credentials::default(),
    };
    let kv = Arc::new(MemoryKv::new());
    let messaging = Arc::new(MessagingProvider::in_memory());
    let providers =
        Providers { kv: kv.clone(), http: None, messaging: Some(messaging.clone()), remote: Default::default() };
    let (agent, _reports) = Agent::new(env, config, engine, providers);
    Node { agent, kv, messaging }
}

fn subscriber(id: &str, subscribe: &str, policy: RestartPolicy) -> StartInstanceRequest {
    subscriber_of(SUBSCRIBER, id, subscribe, policy)
}

/// The subscriber fixture with its handler starting with `first` instead of its length check.
fn hostile_subscriber(first: &str) -> String {
    SUBSCRIBER
        .replace(
            r#"(import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))"#,
            r#"(import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))"#,
        )
        .replace(
            r#"(memory (export "memory") 1)"#,
            // A monotonic clock subscription of 120 s at 4096.
            r#"(memory (export "memory") 1)
  (data (i32.const 4112) "\01\00\00\00")
  (data (i32.const 4120) "\00\b0\8e\f0\1b\00\00\00")"#,
        )
        .replace("(if (i32.gt_u (local.get $len) (i32.const 255)) (then (return (i32.const 2))))", first)
}

fn subscriber_of(wat: &str, id: &str, subscribe: &str, policy: RestartPolicy) -> StartInstanceRequest {
    let cap = |name: &str, perms: &[String]| CapabilityAssignment::new(id, name, perms).unwrap();
    StartInstanceRequest {
        module_hash: String::new(),
        grant_seals: Default::default(),
        instance_id: id.into(),
        module_bytes: module(wat),
        capabilities: vec![cap("bus", &[format!("msg:subscribe:{subscribe}")]), cap("kv", &["kv:write".into()])],
        restart_policy: policy,
        config: Default::default(),
        constraints: Default::default(),
        epoch: 1,
        node_lease: None,
        restarts: 0,
        seal: Default::default(),
    }
}

impl Node {
    /// Publishes as some other instance allowed to publish anywhere.
    async fn publish(&self, topic: &str, payload: &str) {
        let (operation, params) = MsgOperation::Publish { topic: topic.into(), payload: payload.into() }.encode();
        let invocation =
            CapabilityInvocation { instance_id: "publisher".into(), capability_id: "out".into(), operation, params };
        let resp = self.messaging.invoke(&invocation, &[Permission::MsgPublish(">".into())]).await;
        assert!(resp.success, "{:?}", resp.error);
    }

    /// The envelope the subscriber stored last.
    async fn last(&self) -> Option<MessageEnvelope> {
        let entries = self.kv.inspect("kv", "last").await.unwrap();
        entries.first().map(|(_, v)| MessageEnvelope::decode(v).unwrap())
    }

    /// Waits (virtual time) until `done` holds.
    async fn wait(&self, what: &str, done: impl AsyncFnMut() -> bool) {
        let mut done = done;
        for _ in 0..600 {
            if done().await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("timed out waiting for {what}");
    }

    async fn wait_subscribed(&self, id: &str) {
        self.wait("the subscription", async || !self.messaging.subscriptions_of(id).is_empty()).await;
    }

    async fn wait_payload(&self, payload: &str) {
        self.wait(payload, async || self.last().await.is_some_and(|e| e.payload == payload.as_bytes())).await;
    }
}

fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap()
}

#[test]
fn handler_receives_what_matches_until_the_capability_is_revoked() {
    paused_runtime().block_on(async {
        for engine in engines() {
            let name = engine.name();
            let n = node(engine);
            n.agent.start_instance(subscriber("s", "greetings.*", RestartPolicy::default())).await.unwrap();
            n.wait_subscribed("s").await;
            n.publish("weather.today", "not for s").await;
            n.publish("greetings.en", "hello").await;
            n.wait_payload("hello").await;
            let envelope = n.last().await.unwrap();
            assert_eq!((envelope.capability_id.as_str(), envelope.topic.as_str()), ("bus", "greetings.en"), "{name}");
            assert_eq!(n.agent.status("s").unwrap(), InstanceStatus::Running, "{name}: it keeps serving");

            // Revoked mid-run: the subscription ends, the run has nothing left to serve and ends cleanly.
            n.agent.revoke_capability("s", "bus").unwrap();
            n.publish("greetings.en", "after revoke").await;
            n.wait("the run to end", async || n.agent.status("s").unwrap() == InstanceStatus::Stopped).await;
            assert_eq!(n.last().await.unwrap().payload, b"hello", "{name}: nothing delivered after the revoke");
        }
    });
}

#[test]
fn a_subscribe_without_permission_is_refused_and_the_guest_sees_it() {
    paused_runtime().block_on(async {
        for engine in engines() {
            let n = node(engine);
            // Granted only `greetings.en`, which does not cover the guest's `greetings.*`.
            n.agent.start_instance(subscriber("s", "greetings.en", RestartPolicy::default())).await.unwrap();
            n.wait("the crash", async || n.agent.status("s").unwrap() == InstanceStatus::Crashed).await;
            assert!(n.messaging.subscriptions_of("s").is_empty());
            let reason = n.agent.metadata("s").unwrap().last_error.unwrap();
            assert!(reason.contains("code 1"), "{reason}");
        }
    });
}

#[test]
fn a_message_that_crashes_its_handler_is_retried_then_dropped_and_the_queue_goes_on() {
    paused_runtime().block_on(async {
        for engine in engines() {
            let name = engine.name();
            let n = node(engine);
            let policy =
                RestartPolicy { policy_type: PolicyType::OnFailure, max_retries: Some(10), backoff_seconds: Some(1) };
            n.agent.start_instance(subscriber("s", "greetings.>", policy)).await.unwrap();
            n.wait_subscribed("s").await;
            // Queued behind the poison message, and published while the instance is down between restarts:
            // kept in its mailbox and handled once the poison message has used up its attempts.
            n.publish("greetings.en", "poison!").await;
            n.publish("greetings.en", "after").await;
            n.wait_payload("after").await;
            let meta = n.agent.metadata("s").unwrap();
            assert_eq!(meta.restarts, 3, "{name}: one restart per attempt on the poison message");
            assert_eq!(meta.status, InstanceStatus::Running, "{name}");

            // Stopping ends the subscriptions; later messages go nowhere.
            n.agent.stop_instance("s").unwrap();
            assert!(n.messaging.subscriptions_of("s").is_empty(), "{name}");
        }
    });
}

/// A handler that holds its message past the deadline (asleep in a host call, or spinning) crashes with a reason
/// naming the deadline; a neighbour subscriber keeps receiving meanwhile. Both engines.
#[test]
fn a_handler_past_its_deadline_crashes_and_the_neighbour_goes_on() {
    let sleeping =
        hostile_subscriber("(drop (call $poll (i32.const 4096) (i32.const 4600) (i32.const 1) (i32.const 4700)))");
    assert!(sleeping.contains("$poll (i32.const 4096)"), "the fixture changed: {sleeping}");
    // Asleep for 120 s against the default 60 s deadline, on virtual time.
    paused_runtime().block_on(async {
        for engine in engines() {
            let name = engine.name();
            let n = node(engine);
            n.agent
                .start_instance(subscriber_of(&sleeping, "slow", "greetings.*", RestartPolicy::default()))
                .await
                .unwrap();
            // The fixture subscribes to greetings.* whatever it is granted.
            n.agent.start_instance(subscriber("s", "greetings.*", RestartPolicy::default())).await.unwrap();
            n.wait_subscribed("slow").await;
            n.wait_subscribed("s").await;
            n.publish("greetings.en", "hold this").await;
            n.publish("greetings.fr", "meanwhile").await;
            n.wait_payload("meanwhile").await;
            assert_eq!(n.agent.status("slow").unwrap(), InstanceStatus::Running, "{name}: asleep on its message");
            tokio::time::sleep(Duration::from_secs(61)).await;
            assert_eq!(n.agent.status("slow").unwrap(), InstanceStatus::Crashed, "{name}");
            let reason = n.agent.metadata("slow").unwrap().last_error.unwrap();
            assert!(reason.contains("factum_on_message ran past its deadline of 60s"), "{name}: {reason}");
            n.publish("greetings.de", "after").await;
            n.wait_payload("after").await;
            assert_eq!(n.agent.status("s").unwrap(), InstanceStatus::Running, "{name}");
        }
    });
    // Spinning, on real time, against a deadline of 300 ms: fuel yields let the deadline's timer fire.
    let spinning = hostile_subscriber("(loop $spin (br $spin))");
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap().block_on(async {
        for engine in engines() {
            let name = engine.name();
            let mut config = AgentConfig::new("n", "127.0.0.1:0");
            config.limits.handler_deadline = Duration::from_millis(300);
            let n = node_with(engine, config);
            n.agent
                .start_instance(subscriber_of(&spinning, "spin", "greetings.*", RestartPolicy::default()))
                .await
                .unwrap();
            n.wait_subscribed("spin").await;
            n.publish("greetings.en", "spin on this").await;
            n.wait("the crash", async || n.agent.status("spin").unwrap() == InstanceStatus::Crashed).await;
            let reason = n.agent.metadata("spin").unwrap().last_error.unwrap();
            assert!(reason.contains("ran past its deadline of 300ms"), "{name}: {reason}");
        }
    });
}
