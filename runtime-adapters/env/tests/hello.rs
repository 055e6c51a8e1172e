//! Every connection opens with a hello (`rpc::hello`), against a real TCP server: a peer of another protocol
//! version, one that sends something else first, one that sends an oversized first frame, one that says nothing,
//! and one the server does not serve are each refused with the reason; a welcomed peer is served as who it said.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // tests may panic

use std::time::Duration;

use factum_env::rpc::{self, hello::HELLO_TIMEOUT, Credentials, Peer};
use factum_env::{BoxStream, Env};
use factum_proto::{Principal, PROTOCOL_VERSION};
use tarpc::context::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tarpc::service]
trait Whoami {
    /// The principal the server sees.
    async fn whoami() -> String;
}

#[derive(Clone)]
struct Server(Peer);

impl Whoami for Server {
    async fn whoami(self, _: Context) -> String {
        self.0.principal.to_string()
    }
}

/// A server that serves operators and refuses everyone else.
async fn server(env: &Env) -> String {
    let listener = env.net.bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let serving = env.clone();
    env.spawn(async move {
        factum_env::serve_tarpc!(serving, listener, "probe", |peer: &Peer| match peer.principal {
            Principal::Operator(_) => Ok(Server(peer.clone()).serve()),
            _ => Err(format!("{} is not an operator", peer.principal)),
        })
    });
    addr
}

fn as_(principal: Principal) -> Env {
    Env::tokio().with_credentials(Credentials::claim(principal))
}

/// Sends `frame` raw and reads the server's answer frame: its refusal, if any.
async fn answer_to(addr: &str, frame: &[u8]) -> Option<String> {
    let mut stream: BoxStream = Env::tokio().net.connect(addr).await.unwrap();
    stream.write_all(frame).await.unwrap();
    let len = stream.read_u32().await.unwrap();
    let mut body = vec![0; len as usize];
    stream.read_exact(&mut body).await.unwrap();
    assert_eq!(&body[..4], b"FCTM");
    assert_eq!(u32::from_be_bytes(body[4..8].try_into().unwrap()), PROTOCOL_VERSION);
    #[derive(serde::Deserialize)]
    struct Answer {
        refused: Option<String>,
    }
    rmp_serde::from_slice::<Answer>(&body[8..]).unwrap().refused
}

fn frame(version: u32, body: &[u8]) -> Vec<u8> {
    let mut f = u32::try_from(8 + body.len()).unwrap().to_be_bytes().to_vec();
    f.extend_from_slice(b"FCTM");
    f.extend_from_slice(&version.to_be_bytes());
    f.extend_from_slice(body);
    f
}

#[tokio::test]
async fn a_welcomed_peer_is_served_as_who_it_said() {
    let env = as_(Principal::Operator("alice".into()));
    let addr = server(&env).await;
    let stream = rpc::dial(&env, &addr, &Principal::Anonymous).await.unwrap();
    let client = rpc::start_client(&env, WhoamiClient::new(Default::default(), rpc::transport(stream)));
    assert_eq!(client.whoami(rpc::rpc_context()).await.unwrap(), "operator/alice");
}

#[tokio::test]
async fn a_peer_the_server_does_not_serve_is_told_why() {
    let addr = server(&Env::tokio()).await;
    let refused = rpc::dial(&as_(Principal::Node("n1".into())), &addr, &Principal::Anonymous).await.err().unwrap();
    assert_eq!(refused.kind(), std::io::ErrorKind::PermissionDenied);
    assert!(refused.to_string().contains("refused this client: node/n1 is not an operator"), "{refused}");
}

#[tokio::test]
async fn another_protocol_version_is_refused_naming_both() {
    let addr = server(&Env::tokio()).await;
    let hello = rmp_serde::to_vec_named(&serde_json::json!({"principal": {"Operator": "alice"}})).unwrap();
    let refused = answer_to(&addr, &frame(PROTOCOL_VERSION - 1, &hello)).await.unwrap();
    let expected =
        format!("this probe speaks factum protocol {PROTOCOL_VERSION}, the peer speaks {}", PROTOCOL_VERSION - 1);
    assert_eq!(refused, expected);
    // The body of another version is not read as this version's: a future hello may look different.
    let refused = answer_to(&addr, &frame(PROTOCOL_VERSION + 1, b"\xc1 not msgpack")).await.unwrap();
    assert!(refused.contains(&format!("the peer speaks {}", PROTOCOL_VERSION + 1)), "{refused}");
    // This version's hello that does not decode is not called a version mismatch.
    let refused = answer_to(&addr, &frame(PROTOCOL_VERSION, b"\xc1 not msgpack")).await.unwrap();
    assert!(refused.starts_with("a hello that cannot be read"), "{refused}");
}

#[tokio::test]
async fn a_first_frame_that_is_not_a_hello_is_refused() {
    let addr = server(&Env::tokio()).await;
    // What a client older than the hello sends first: a tarpc request frame.
    let mut tarpc_frame = 40u32.to_be_bytes().to_vec();
    tarpc_frame.extend_from_slice(&[0; 40]);
    let refused = answer_to(&addr, &tarpc_frame).await.unwrap();
    assert!(refused.contains("not a factum hello"), "{refused}");
}

#[tokio::test]
async fn an_oversized_first_frame_is_refused_unread() {
    let addr = server(&Env::tokio()).await;
    // Announces 32 MiB and sends none of it: the server answers at once instead of waiting to buffer it.
    let refused = answer_to(&addr, &(32u32 << 20).to_be_bytes()).await.unwrap();
    assert!(refused.contains("a first frame of 33554432 bytes (a hello has 8 to 1024)"), "{refused}");
}

#[tokio::test(start_paused = true)]
async fn a_peer_that_says_nothing_is_closed_after_the_hello_timeout() {
    let addr = server(&Env::tokio()).await;
    let mut silent: BoxStream = Env::tokio().net.connect(&addr).await.unwrap();
    let mut sink = Vec::new();
    let read = tokio::time::timeout(HELLO_TIMEOUT + Duration::from_secs(1), silent.read_to_end(&mut sink)).await;
    assert!(read.is_ok(), "still open past the hello timeout");
    assert!(String::from_utf8_lossy(&sink).contains("no hello within"), "the reason is sent");
}
