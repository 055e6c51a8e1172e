//! Backends over TLS with certificates from `factum certs`: a real etcd, `redis-server` and `nats-server`, each
//! verifying its clients, serve a node that trusts the cluster's CA and shows a certificate of it, and refuse
//! one that shows none or speaks plaintext. Needs the three servers (`.ci/run` installs them); without one its
//! test says so and passes, except under `CI=true`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // tests may panic

mod common;

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{free_port, Proc};
use factum_cli::certs;
use factum_proto::Principal;
use factum_providers::{BackendTls, KvBackend, MessageBus, NatsBus, RedisStore};

fn available(server: &str) -> bool {
    let found = Command::new(server).arg("--version").output().is_ok_and(|o| o.status.success());
    if !found {
        assert!(std::env::var("CI").is_err(), "{server} is not installed, but CI must run the backend tests");
        eprintln!("skipping: no `{server}` on PATH (apt install {server})");
    }
    found
}

/// A CA with node n1's certificate and a server certificate for 127.0.0.1 named `host`, in a fresh directory.
fn certificates(host: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("factum-backend-tls-{}-{host}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    certs::init(&dir, &[Principal::Node("n1".into())]).unwrap();
    certs::issue_host(&dir, host, &["127.0.0.1".into(), "localhost".into()]).unwrap();
    dir
}

/// Runs `command` until dropped, once it accepts connections on `port`.
fn serve(mut command: Command, port: u16) -> Proc {
    let child = command.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let server = Proc::new(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{command:?} did not come up");
        std::thread::sleep(Duration::from_millis(20));
    }
    server
}

/// Node n1's side: the cluster's CA and its certificate.
fn node_tls(dir: &std::path::Path) -> BackendTls {
    BackendTls { ca: Some(dir.join("ca.pem")), client: Some((dir.join("node-n1.pem"), dir.join("node-n1.key"))) }
}

#[tokio::test]
async fn nats_over_mutual_tls_with_the_clusters_certificates() {
    if !available("nats-server") {
        return;
    }
    let dir = certificates("nats");
    let port = free_port();
    let mut command = Command::new("nats-server");
    command.args(["-a", "127.0.0.1", "-p", &port.to_string(), "--tlsverify", "--tlscert"]);
    command.arg(dir.join("host-nats.pem")).arg("--tlskey").arg(dir.join("host-nats.key"));
    command.arg("--tlscacert").arg(dir.join("ca.pem"));
    let _nats = serve(command, port);
    let url = format!("nats://127.0.0.1:{port}");
    let timeout = Duration::from_secs(3);
    let env = factum_env::Env::tokio;
    let tls = node_tls(&dir);

    let bus = NatsBus::connect_with(&url, "t", timeout, env(), &tls).await.unwrap();
    let heard = Arc::new(Mutex::new(Vec::new()));
    let sink = heard.clone();
    let _subscription = bus
        .subscribe(
            "greetings.*",
            Arc::new(move |topic: &str, payload: &[u8]| {
                sink.lock().unwrap().push((topic.to_string(), payload.to_vec()));
            }),
        )
        .await
        .unwrap();
    bus.publish("greetings.hi", b"over tls").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while heard.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "no message over TLS");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(heard.lock().unwrap()[0], ("greetings.hi".to_string(), b"over tls".to_vec()));

    let no_client_cert = BackendTls { ca: Some(dir.join("ca.pem")), client: None };
    let refused = NatsBus::connect_with(&url, "t", timeout, env(), &no_client_cert).await.err().unwrap();
    assert_eq!(refused.error_code, factum_proto::ErrorCode::ProviderUnavailable, "{refused}");
    assert!(NatsBus::connect(&url, "t", timeout, env()).await.is_err(), "plaintext to a TLS-only server");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn redis_over_mutual_tls_with_the_clusters_certificates() {
    if !available("redis-server") {
        return;
    }
    let dir = certificates("redis");
    let port = free_port();
    let mut command = Command::new("redis-server");
    command.args(["--port", "0", "--tls-port", &port.to_string(), "--save", "", "--appendonly", "no"]);
    command.arg("--tls-cert-file").arg(dir.join("host-redis.pem"));
    command.arg("--tls-key-file").arg(dir.join("host-redis.key"));
    command.arg("--tls-ca-cert-file").arg(dir.join("ca.pem"));
    let _redis = serve(command, port);
    let url = format!("rediss://127.0.0.1:{port}");
    let timeout = Duration::from_secs(3);

    let store = RedisStore::connect_with(&url, "t", 100, timeout, &node_tls(&dir)).await.unwrap();
    store.set("kv", "greeting", b"over tls").await.unwrap();
    assert_eq!(store.get("kv", "greeting").await.unwrap(), Some(b"over tls".to_vec()));

    let no_client_cert = BackendTls { ca: Some(dir.join("ca.pem")), client: None };
    let refused = RedisStore::connect_with(&url, "t", 100, timeout, &no_client_cert).await.err().unwrap();
    assert_eq!(refused.error_code, factum_proto::ErrorCode::ProviderUnavailable, "{refused}");
    let plaintext = format!("redis://127.0.0.1:{port}");
    assert!(RedisStore::connect(&plaintext, "t", 100, timeout).await.is_err(), "plaintext to a TLS-only server");
    let wrong_scheme = RedisStore::connect_with(&plaintext, "t", 100, timeout, &node_tls(&dir)).await.err().unwrap();
    assert!(wrong_scheme.message.contains("needs a rediss:// URL"), "{wrong_scheme}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn etcd_over_mutual_tls_with_the_clusters_certificates() {
    use factum_registry::{EtcdRegistry, Registry as _};
    if !available("etcd") {
        return;
    }
    let dir = certificates("etcd");
    let (port, peer) = (free_port(), free_port());
    let mut command = Command::new("etcd");
    command.args(["--name", "t", "--data-dir"]).arg(dir.join("data"));
    command.arg(format!("--listen-client-urls=https://127.0.0.1:{port}"));
    command.arg(format!("--advertise-client-urls=https://127.0.0.1:{port}"));
    command.arg(format!("--listen-peer-urls=http://127.0.0.1:{peer}"));
    command.arg(format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer}"));
    command.arg(format!("--initial-cluster=t=http://127.0.0.1:{peer}"));
    command.arg("--cert-file").arg(dir.join("host-etcd.pem")).arg("--key-file").arg(dir.join("host-etcd.key"));
    command.arg("--client-cert-auth").arg("--trusted-ca-file").arg(dir.join("ca.pem"));
    let _etcd = serve(command, port);
    let endpoints = [format!("127.0.0.1:{port}")];
    let timeout = Duration::from_secs(5);
    let env = factum_env::Env::tokio;

    let registry = EtcdRegistry::connect_with(env(), &endpoints, "/t", timeout, &node_tls(&dir), None).await.unwrap();
    let lease = registry.grant_lease(Duration::from_secs(5)).await.unwrap();
    let node = factum_registry::NodeRegistration {
        node_id: "n1".into(),
        agent_addr: "127.0.0.1:1".into(),
        lease,
        max_instances: 1,
        protocol_version: factum_proto::PROTOCOL_VERSION,
    };
    registry.register_node(&node, lease).await.unwrap();
    assert_eq!(registry.keys().await.unwrap(), vec!["/t/nodes/n1".to_string()]);

    // etcd-client dials lazily, so a refusal shows on connecting or on the first call.
    let refused = |connected: Result<EtcdRegistry, factum_registry::RegistryError>| async move {
        match connected {
            Ok(registry) => registry.keys().await.err(),
            Err(e) => Some(e),
        }
    };
    let no_client_cert = BackendTls { ca: Some(dir.join("ca.pem")), client: None };
    let unsigned = refused(EtcdRegistry::connect_with(env(), &endpoints, "/t", timeout, &no_client_cert, None).await);
    assert!(unsigned.await.is_some(), "an etcd that verifies clients served one without a certificate");
    let plaintext = refused(EtcdRegistry::connect(env(), &endpoints, "/t", timeout).await).await;
    assert!(plaintext.is_some(), "plaintext to a TLS-only etcd");
    let _ = std::fs::remove_dir_all(&dir);
}
