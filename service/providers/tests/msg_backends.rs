//! The same behaviour tests against every message bus: in process, and a real `nats-server` started on a free
//! port (apt `nats-server`; `.ci/run` installs it). Without nats-server the NATS half says so and is skipped,
//! except under `CI=true`, where that is a failure.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // tests may panic

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use factum_proto::permissions::{pattern_covers, topic_matches};
use factum_proto::{CapabilityInvocation, ErrorCode, MsgOperation, Permission};
use factum_providers::{
    Delivery, MemoryBus, MessageBus, MessageSink, MessagingProvider, NatsBus, Provider, MAX_SUBSCRIPTIONS_PER_INSTANCE,
};
use proptest::prelude::*;
use tokio::sync::mpsc;

/// One nats-server for the whole test binary.
struct Nats {
    url: String,
    _child: Child,
}

fn nats() -> Option<&'static Nats> {
    static NATS: OnceLock<Option<Nats>> = OnceLock::new();
    NATS.get_or_init(|| {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        if Command::new("nats-server").arg("--version").output().is_err() {
            assert!(std::env::var("CI").is_err(), "nats-server is not installed, but CI must run the NATS tests");
            eprintln!("skipping the NATS bus: no `nats-server` on PATH (apt install nats-server)");
            return None;
        }
        // A static is never dropped, so a watchdog ends nats-server when this test process is gone.
        let script = format!(
            "nats-server -a 127.0.0.1 -p {port} & n=$!; while kill -0 {} 2>/dev/null; do sleep 0.2; done; kill $n",
            std::process::id()
        );
        let child =
            Command::new("sh").args(["-c", &script]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(Nats { url: format!("nats://127.0.0.1:{port}"), _child: child })
    })
    .as_ref()
}

/// Every bus, each NATS one under a prefix of its own so test cases never hear each other.
async fn buses() -> Vec<Arc<dyn MessageBus>> {
    static PREFIX: AtomicU64 = AtomicU64::new(0);
    let mut buses: Vec<Arc<dyn MessageBus>> = vec![Arc::new(MemoryBus::new())];
    if let Some(nats) = nats() {
        let prefix = format!("test{}_{}", std::process::id(), PREFIX.fetch_add(1, Ordering::SeqCst));
        let env = factum_env::Env::tokio();
        buses.push(Arc::new(NatsBus::connect(&nats.url, &prefix, Duration::from_secs(5), env).await.unwrap()));
    }
    buses
}

/// A provider over `bus` whose deliveries land in the returned channel.
fn provider(bus: Arc<dyn MessageBus>) -> (MessagingProvider, mpsc::UnboundedReceiver<Delivery>) {
    let provider = MessagingProvider::new(bus);
    let (tx, rx) = mpsc::unbounded_channel();
    provider.connect(Arc::new(move |d| {
        let _ = tx.send(d);
    }));
    (provider, rx)
}

fn inv(instance: &str, cap: &str, op: &MsgOperation) -> CapabilityInvocation {
    let (operation, params) = op.encode();
    CapabilityInvocation { instance_id: instance.into(), capability_id: cap.into(), operation, params }
}

fn everything() -> Vec<Permission> {
    vec![Permission::MsgPublish(">".into()), Permission::MsgSubscribe(">".into())]
}

fn publish(topic: &str, payload: &[u8]) -> MsgOperation {
    MsgOperation::Publish { topic: topic.into(), payload: payload.to_vec() }
}

fn subscribe(topic: &str) -> MsgOperation {
    MsgOperation::Subscribe { topic: topic.into() }
}

/// Receives until `n` deliveries arrived, sorted; a bus that loses one fails here after a generous deadline.
async fn receive(rx: &mut mpsc::UnboundedReceiver<Delivery>, n: usize) -> Vec<(String, String, String, Vec<u8>)> {
    let mut got = Vec::new();
    while got.len() < n {
        match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
            Ok(Some(d)) => got.push((d.instance_id, d.capability_id, d.topic, d.payload)),
            _ => panic!("only {} of {n} deliveries arrived: {got:?}", got.len()),
        }
    }
    got.sort();
    got
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// A topic every message of a pattern's subscription is matched by: wildcards filled with `z`.
fn literal(pattern: &str) -> String {
    pattern.split('.').map(|t| if t == "*" || t == ">" { "z" } else { t }).collect::<Vec<_>>().join(".")
}

fn arb_pattern() -> impl Strategy<Value = String> {
    let token = prop_oneof![Just("a"), Just("b"), Just("*")];
    (prop::collection::vec(token, 1..3), any::<bool>()).prop_map(|(tokens, tail)| {
        let mut tokens: Vec<String> = tokens.into_iter().map(String::from).collect();
        if tail {
            tokens.push(">".into());
        }
        tokens.join(".")
    })
}

#[test]
fn wildcards_unsubscribe_and_release_on_every_bus() {
    runtime().block_on(async {
        for bus in buses().await {
            let name = bus.name();
            let (provider, mut rx) = provider(bus);
            let all = everything();
            for (instance, pattern) in [("i1", "orders.*"), ("i2", "orders.>"), ("i3", "orders.eu")] {
                assert!(provider.invoke(&inv(instance, "bus", &subscribe(pattern)), &all).await.success, "{name}");
            }
            // Subscribing twice to one pattern is one subscription.
            assert!(provider.invoke(&inv("i1", "bus", &subscribe("orders.*")), &all).await.success);
            for topic in ["orders.eu", "orders.eu.paris", "invoices.eu"] {
                assert!(provider.invoke(&inv("p", "bus", &publish(topic, b"x")), &all).await.success, "{name}");
            }
            let got: Vec<(String, String)> = receive(&mut rx, 4).await.into_iter().map(|d| (d.0, d.2)).collect();
            let want = [("i1", "orders.eu"), ("i2", "orders.eu"), ("i2", "orders.eu.paris"), ("i3", "orders.eu")];
            assert_eq!(got, want.map(|(a, b)| (a.to_string(), b.to_string())), "{name}");

            // Unsubscribe ends one subscription; release ends an instance's; what is left still hears.
            let off =
                provider.invoke(&inv("i1", "bus", &MsgOperation::Unsubscribe { topic: "orders.*".into() }), &[]).await;
            assert!(off.result_as::<bool>().unwrap(), "{name}");
            assert_eq!(provider.release("i2", None), 1, "{name}");
            assert!(provider.invoke(&inv("p", "bus", &publish("orders.eu", b"y")), &all).await.success);
            let got = receive(&mut rx, 1).await;
            assert_eq!((got[0].0.as_str(), got[0].3.as_slice()), ("i3", &b"y"[..]), "{name}");
            assert_eq!(provider.subscriptions_of("i3"), vec![("bus".to_string(), "orders.eu".to_string())]);

            // Shutdown (P20): subscriptions end, new calls are refused.
            provider.shutdown().await.unwrap();
            assert!(provider.subscriptions_of("i3").is_empty());
            let refused = provider.invoke(&inv("p", "bus", &publish("orders.eu", b"z")), &all).await;
            assert_eq!(refused.error_code(), Some(ErrorCode::ProviderUnavailable), "{name}");
        }
    });
}

#[test]
fn an_unreachable_nats_is_provider_unavailable_not_a_hang() {
    runtime().block_on(async {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let env = factum_env::Env::tokio();
        let url = format!("nats://127.0.0.1:{port}");
        let err = NatsBus::connect(&url, "x", Duration::from_secs(1), env.clone()).await.err().unwrap();
        assert_eq!(err.error_code, ErrorCode::ProviderUnavailable, "{err}");
        let bad = NatsBus::connect(&url, "bad prefix", Duration::from_secs(1), env).await.err().unwrap();
        assert_eq!(bad.error_code, ErrorCode::InvalidRequest, "{bad}");
    });
}

#[test]
fn an_instance_holds_a_bounded_number_of_subscriptions() {
    runtime().block_on(async {
        for bus in buses().await {
            let name = bus.name();
            let (provider, _rx) = provider(bus);
            let all = everything();
            for n in 0..MAX_SUBSCRIPTIONS_PER_INSTANCE {
                let answer = provider.invoke(&inv("greedy", "bus", &subscribe(&format!("t{n}"))), &all).await;
                assert_eq!(answer.error_code(), None, "{name}: subscription {n}");
            }
            let over = provider.invoke(&inv("greedy", "bus", &subscribe("one.more")), &all).await;
            assert_eq!(over.error_code(), Some(ErrorCode::ResourceExhausted), "{name}");
            // Repeating a held one is no new subscription; another instance has its own allowance.
            assert_eq!(provider.invoke(&inv("greedy", "bus", &subscribe("t0")), &all).await.error_code(), None);
            assert_eq!(provider.invoke(&inv("other", "bus", &subscribe("t0")), &all).await.error_code(), None);
            // Letting one go makes room.
            let unsubscribe = MsgOperation::Unsubscribe { topic: "t0".into() };
            provider.invoke(&inv("greedy", "bus", &unsubscribe), &all).await;
            assert_eq!(provider.invoke(&inv("greedy", "bus", &subscribe("one.more")), &all).await.error_code(), None);
        }
    });
}

/// A nats-server of its own, frozen with SIGSTOP (as a paused or partitioned server looks to a client) and
/// killed on drop.
struct Frozen(Child);

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-CONT", &self.0.id().to_string()]).status();
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_nats_server_that_stops_answering_is_provider_unavailable_not_a_hang() {
    if nats().is_none() {
        return; // said why above
    }
    runtime().block_on(async {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let server = Frozen(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
        let url = format!("nats://127.0.0.1:{port}");
        let bus = NatsBus::connect(&url, "stall", Duration::from_millis(500), factum_env::Env::tokio()).await.unwrap();
        assert!(Command::new("kill").args(["-STOP", &server.0.id().to_string()]).status().unwrap().success());
        // Publishes fill the socket buffers and then the client's command queue; unbounded, the next call would
        // wait for the server for ever.
        let payload = vec![7u8; 64 * 1024];
        let calls = async {
            for _ in 0..2_000 {
                if let Err(e) = bus.publish("orders.eu", &payload).await {
                    return e;
                }
            }
            panic!("128 MiB published to a frozen server without a refusal");
        };
        let err = tokio::time::timeout(Duration::from_secs(20), calls).await.expect("a call to a frozen server hung");
        assert_eq!(err.error_code, ErrorCode::ProviderUnavailable, "{err}");
        assert!(err.message.contains("no answer from the NATS server within 500ms"), "{err}");
        // And a subscribe, queued behind them, is refused the same way.
        let sink: MessageSink = Arc::new(|_: &str, _: &[u8]| {});
        let refused = tokio::time::timeout(Duration::from_secs(5), bus.subscribe("orders.>", sink)).await.unwrap();
        assert_eq!(refused.err().map(|e| e.error_code), Some(ErrorCode::ProviderUnavailable));
    });
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(100))]

    /// Feature: wasm-orchestrator, Property 10: Capability Provider Invocation Execution
    /// On every bus each subscription receives exactly the messages published on topics its pattern matches:
    /// compared with a model, as a multiset, after a closing message on each subscription's own topic.
    #[test]
    fn every_bus_delivers_what_the_model_says(
        subscriptions in prop::collection::btree_set(("i[12]", "c[12]", arb_pattern()), 1..5),
        topics in prop::collection::vec("[ab](\\.[abz]){0,2}", 0..8),
    ) {
        runtime().block_on(async {
            for bus in buses().await {
                let (provider, mut rx) = provider(bus);
                for (instance, cap, pattern) in &subscriptions {
                    prop_assert!(provider.invoke(&inv(instance, cap, &subscribe(pattern)), &everything()).await.success);
                }
                // Each subscription's own closing topic comes last, so per-subscription FIFO order means every
                // delivery (expected or not) has arrived once the expected count has.
                let closing = subscriptions.iter().map(|(_, _, p)| literal(p));
                let all_topics: Vec<String> = topics.iter().cloned().chain(closing).collect();
                let mut want = Vec::new();
                for (n, topic) in all_topics.iter().enumerate() {
                    let payload = n.to_le_bytes().to_vec();
                    prop_assert!(provider.invoke(&inv("p", "c1", &publish(topic, &payload)), &everything()).await.success);
                    for (instance, cap, pattern) in &subscriptions {
                        if topic_matches(pattern, topic) {
                            want.push((instance.clone(), cap.clone(), topic.clone(), payload.clone()));
                        }
                    }
                }
                want.sort();
                prop_assert_eq!(receive(&mut rx, want.len()).await, want);
            }
            Ok(())
        })?;
    }

    /// Feature: wasm-orchestrator, Property 4: Runtime Permission Enforcement
    /// A publish or subscribe succeeds exactly when a granted pattern covers its topic; a refused one is
    /// PERMISSION_DENIED and subscribes nothing. Unsubscribing needs no permission.
    #[test]
    fn messaging_enforces_topic_permissions(
        publish_grants in prop::collection::vec(arb_pattern(), 0..3),
        subscribe_grants in prop::collection::vec(arb_pattern(), 0..3),
        requests in prop::collection::vec((any::<bool>(), arb_pattern()), 1..10),
    ) {
        runtime().block_on(async {
            let (provider, _rx) = provider(Arc::new(MemoryBus::new()));
            let granted: Vec<Permission> = publish_grants.iter().cloned().map(Permission::MsgPublish)
                .chain(subscribe_grants.iter().cloned().map(Permission::MsgSubscribe)).collect();
            for (is_publish, pattern) in &requests {
                let before = provider.subscriptions_of("i");
                let (op, grants, topic) = if *is_publish {
                    let topic = literal(pattern);
                    (publish(&topic, b"m"), &publish_grants, topic)
                } else {
                    (subscribe(pattern), &subscribe_grants, pattern.clone())
                };
                let allowed = grants.iter().any(|g| pattern_covers(g, &topic));
                let resp = provider.invoke(&inv("i", "c", &op), &granted).await;
                prop_assert_eq!(resp.success, allowed, "{:?} with {:?}", op, granted);
                if !allowed {
                    prop_assert_eq!(resp.error_code(), Some(ErrorCode::PermissionDenied));
                    prop_assert_eq!(provider.subscriptions_of("i"), before);
                }
                let off = provider.invoke(&inv("i", "c", &MsgOperation::Unsubscribe { topic: pattern.clone() }), &[]).await;
                prop_assert!(off.success);
            }
            Ok(())
        })?;
    }

    /// Feature: wasm-orchestrator, Property 20: Graceful Provider Shutdown Handling
    /// On every bus, calls racing with shutdown either complete or get PROVIDER_UNAVAILABLE; shutdown returns;
    /// afterwards no subscription is left (not even one whose subscribe was in flight) and every call is
    /// refused.
    #[test]
    fn shutdown_races_end_cleanly_on_every_bus(calls in prop::collection::vec((any::<bool>(), arb_pattern()), 1..12)) {
        runtime().block_on(async {
            for bus in buses().await {
                let (provider, _rx) = provider(bus);
                let provider = Arc::new(provider);
                let mut tasks = Vec::new();
                for (n, (is_publish, pattern)) in calls.iter().enumerate() {
                    let op = if *is_publish { publish(&literal(pattern), b"m") } else { subscribe(pattern) };
                    let provider = provider.clone();
                    let instance = format!("i{n}");
                    tasks.push(tokio::spawn(async move { provider.invoke(&inv(&instance, "c", &op), &everything()).await }));
                }
                tokio::task::yield_now().await;
                tokio::time::timeout(Duration::from_secs(10), provider.shutdown()).await.expect("shutdown hung").unwrap();
                for task in tasks {
                    let response = task.await.unwrap();
                    prop_assert!(response.success || response.error_code() == Some(ErrorCode::ProviderUnavailable), "{:?}", response.error);
                }
                let left: Vec<_> = (0..calls.len()).flat_map(|n| provider.subscriptions_of(&format!("i{}", n))).collect();
                prop_assert!(left.is_empty(), "{:?}", left);
                let refused = provider.invoke(&inv("late", "c", &subscribe("a")), &everything()).await;
                prop_assert_eq!(refused.error_code(), Some(ErrorCode::ProviderUnavailable));
            }
            Ok(())
        })?;
    }

    /// Feature: wasm-orchestrator, Property 21: Provider and Instance Metadata Separation
    /// The messaging provider's metadata (type, name, version, operations) is its own: no invocation from any
    /// instance changes it or puts anything about instances, topics or subscriptions into it.
    #[test]
    fn messaging_metadata_is_independent_of_instances(calls in prop::collection::vec(("inst-[a-z]{1,6}", any::<bool>(), arb_pattern()), 0..12)) {
        runtime().block_on(async {
            let (provider, _rx) = provider(Arc::new(MemoryBus::new()));
            let before = provider.metadata();
            prop_assert_eq!(before.provider_type, factum_proto::ProviderType::Messaging);
            for (instance, is_publish, pattern) in &calls {
                let op = if *is_publish { publish(&literal(pattern), b"m") } else { subscribe(pattern) };
                provider.invoke(&inv(instance, "c", &op), &everything()).await;
            }
            let after = provider.metadata();
            prop_assert_eq!(&after, &before);
            let text = format!("{after:?}");
            prop_assert!(calls.iter().all(|(instance, _, _)| !text.contains(instance.as_str())));
            Ok(())
        })?;
    }
}
