//! A tarpc server under `serve_tarpc!` keeps its limits against real TCP peers: a connection flood from one
//! peer is refused while the connections already open keep working, requests past the in-flight limit are
//! answered "throttled", and a silent connection is closed after the idle timeout.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // tests may panic

use std::time::Duration;

use factum_env::rpc::{self, ServerLimits};
use factum_env::Env;
use tarpc::context::Context;
use tokio::io::AsyncReadExt;

#[tarpc::service]
trait Probe {
    /// Answers `x`.
    async fn echo(x: u32) -> u32;
    /// Answers after `ms` milliseconds on the env clock.
    async fn hold(ms: u64) -> u32;
}

#[derive(Clone)]
struct Server(Env);

impl Probe for Server {
    async fn echo(self, _: Context, x: u32) -> u32 {
        x
    }
    async fn hold(self, _: Context, ms: u64) -> u32 {
        self.0.clock.sleep(Duration::from_millis(ms)).await;
        0
    }
}

const LIMITS: ServerLimits = ServerLimits {
    max_connections: 8,
    max_connections_per_peer: 3,
    max_in_flight_per_connection: 2,
    idle_timeout: Duration::from_secs(30),
};

async fn server(env: &Env) -> String {
    let listener = env.net.bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let serving = env.clone();
    env.spawn(async move {
        let server = Server(serving.clone());
        factum_env::serve_tarpc!(serving, listener, "probe", move |_: &rpc::Peer| Ok(server.clone().serve()), LIMITS)
    });
    addr
}

async fn client(env: &Env, addr: &str) -> ProbeClient {
    let stream = rpc::dial(env, addr, &factum_proto::Principal::Anonymous).await.unwrap();
    rpc::start_client(env, ProbeClient::new(tarpc::client::Config::default(), rpc::transport(stream)))
}

/// Whether the server closed `stream` (EOF or reset) within a second.
async fn closed(stream: &mut factum_env::BoxStream) -> bool {
    let mut byte = [0u8; 1];
    matches!(tokio::time::timeout(Duration::from_secs(1), stream.read(&mut byte)).await, Ok(Ok(0) | Err(_)))
}

#[tokio::test]
async fn a_connection_flood_from_one_peer_is_refused_and_the_open_connections_keep_working() {
    let env = Env::tokio();
    let addr = server(&env).await;
    let mut clients = Vec::new();
    for _ in 0..LIMITS.max_connections_per_peer {
        clients.push(client(&env, &addr).await);
    }
    for c in &clients {
        assert_eq!(c.echo(rpc::rpc_context(), 7).await.unwrap(), 7);
    }
    // The next connection from the same address is closed at once, every time.
    for _ in 0..5 {
        let mut extra = env.net.connect(&addr).await.unwrap();
        assert!(closed(&mut extra).await, "a connection past the per-peer limit stays open");
    }
    for c in &clients {
        assert_eq!(c.echo(rpc::rpc_context(), 8).await.unwrap(), 8, "an admitted connection was hurt");
    }
    // Closing one makes room for one.
    drop(clients.pop());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let again = client(&env, &addr).await;
    assert_eq!(again.echo(rpc::rpc_context(), 9).await.unwrap(), 9);
}

#[tokio::test]
async fn requests_past_the_in_flight_limit_are_throttled_not_queued() {
    let env = Env::tokio();
    let addr = server(&env).await;
    let c = client(&env, &addr).await;
    let held: Vec<_> = (0..LIMITS.max_in_flight_per_connection)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move { c.hold(rpc::rpc_context(), 500).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let refused = rpc::describe(&c.echo(rpc::rpc_context(), 1).await.unwrap_err());
    assert!(refused.contains("throttled"), "{refused}");
    for h in held {
        assert_eq!(h.await.unwrap().unwrap(), 0);
    }
    assert_eq!(c.echo(rpc::rpc_context(), 2).await.unwrap(), 2, "room again once the held calls are answered");
}

#[tokio::test(start_paused = true)]
async fn a_silent_connection_is_closed_after_the_idle_timeout() {
    let env = Env::tokio();
    let addr = server(&env).await;
    let mut silent = rpc::dial(&env, &addr, &factum_proto::Principal::Anonymous).await.unwrap(); // introduced, then silent
    let talking = client(&env, &addr).await;
    for _ in 0..4 {
        tokio::time::sleep(LIMITS.idle_timeout / 3).await;
        assert_eq!(talking.echo(rpc::rpc_context(), 1).await.unwrap(), 1, "a connection in use stays open");
    }
    assert!(closed(&mut silent).await, "a connection silent past the idle timeout stays open");
}
