//! The first exchange on every factum connection, before any RPC: the client says which protocol version it
//! speaks and who it is; the server answers whether it serves that peer. A peer of another version, or one the
//! server does not serve, learns why from the answer instead of from a dropped connection. Both frames are read
//! under a small limit, so a peer that has not introduced itself cannot make a server buffer megabytes.
//!
//! A frame is a 4-byte big-endian length, then `FCTM`, the sender's protocol version (4 bytes, big-endian) and
//! a MessagePack body. Magic and version come before the body so that a peer of any version can read them.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use factum_proto::{Principal, PROTOCOL_VERSION};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::tls::{self, Tls};
use crate::{BoxStream, Env};

/// Largest hello or answer, in bytes: what a server reads from a peer that has not introduced itself.
pub const HELLO_MAX_BYTES: u32 = 1024;

/// How long a server waits for a new connection's hello before closing it.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// The `tracing` target of audit events: rejected connections and, in the services, refused and operator
/// calls. One target, so an operator can route them to their own sink.
pub const AUDIT: &str = "factum::audit";

const MAGIC: &[u8; 4] = b"FCTM";

/// Who this process is to its peers, and how it proves it.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// The identity it claims.
    pub principal: Principal,
    /// Mutual TLS on every connection it makes and accepts; none is plaintext.
    pub tls: Option<Arc<Tls>>,
}

impl Credentials {
    /// Claims `principal` over plaintext, where the server takes the claim as it is: only a network that admits
    /// nobody else (loopback, the simulator) makes that safe.
    pub fn claim(principal: Principal) -> Self {
        Credentials { principal, tls: None }
    }

    /// Claims `principal` over mutual TLS: a server takes the claim only if this certificate names it.
    pub fn tls(principal: Principal, tls: Tls) -> Self {
        Credentials { principal, tls: Some(Arc::new(tls)) }
    }
}

impl Default for Credentials {
    fn default() -> Self {
        Credentials::claim(Principal::Anonymous)
    }
}

/// The other end of an accepted connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Its address, `ip:port`.
    pub addr: String,
    /// Who it is.
    pub principal: Principal,
}

#[derive(Serialize, Deserialize)]
struct Hello {
    principal: Principal,
}

/// The server's answer: `None` welcomes the peer, `Some(why)` refuses it.
#[derive(Serialize, Deserialize)]
struct Answer {
    refused: Option<String>,
}

/// Connects to `addr`, where `server` is expected, and introduces this process with `env`'s credentials (over
/// TLS, `server`'s certificate must name it). A refusal is an error of kind `PermissionDenied` saying why.
/// Bound it with a timeout: a server that never answers holds it.
pub async fn dial(env: &Env, addr: &str, server: &Principal) -> io::Result<BoxStream> {
    let stream = env.net.connect(addr).await?;
    let mut stream = match &env.credentials.tls {
        Some(tls) => tls.connect(stream, server).await.map_err(|e| io::Error::new(e.kind(), format!("{addr}: {e}")))?,
        None => stream,
    };
    let hello = Hello { principal: env.credentials.principal.clone() };
    write_frame(&mut stream, &hello).await?;
    let (version, answer) = read_frame::<Answer>(&mut stream).await.map_err(|e| {
        let hint = match &env.credentials.tls {
            None if e.kind() == io::ErrorKind::UnexpectedEof => " (a server that requires TLS closes plaintext)",
            _ => "",
        };
        io::Error::new(e.kind(), format!("{addr} did not answer this client's hello as a factum server: {e}{hint}"))
    })?;
    let refused = match answer {
        Ok(Answer { refused: None }) if version == PROTOCOL_VERSION => return Ok(stream),
        Ok(Answer { refused: Some(why) }) => why,
        _ => mismatch("this client", version),
    };
    Err(io::Error::new(io::ErrorKind::PermissionDenied, format!("{addr} refused this client: {refused}")))
}

/// Takes a new connection: the TLS handshake if `env` has TLS, then its hello (both within [`HELLO_TIMEOUT`]);
/// asks `serve` what to serve that peer; welcomes it with `serve`'s answer or refuses it with the reason (a
/// failed handshake, a hello of another version or none, a claim its certificate does not name, or `serve`'s
/// refusal), which is also logged under [`AUDIT`]. `what` names this server in messages.
pub async fn accept<T>(
    env: &Env,
    stream: BoxStream,
    addr: String,
    what: &str,
    serve: impl FnOnce(&Peer) -> Result<T, String>,
) -> Option<(BoxStream, Peer, T)> {
    let (mut stream, cert) = match &env.credentials.tls {
        None => (stream, None),
        Some(tls) => match env.timeout(HELLO_TIMEOUT, tls.accept(stream)).await {
            Some(Ok((stream, cert))) => (stream, Some(cert)),
            failed => {
                let why = failed.map_or_else(
                    || format!("no TLS handshake within {HELLO_TIMEOUT:?}"),
                    |e| e.err().map(|e| e.to_string()).unwrap_or_default(),
                );
                tracing::warn!(target: AUDIT, peer = %addr, server = what, result = "refused", "connection refused: {why}");
                return None;
            }
        },
    };
    let hello = match env.timeout(HELLO_TIMEOUT, read_frame::<Hello>(&mut stream)).await {
        Some(Ok((version, Ok(hello)))) if version == PROTOCOL_VERSION => match &cert {
            Some(cert) if !tls::names(cert, &hello.principal) => {
                Err(format!("the client's certificate does not name {}", hello.principal))
            }
            _ => Ok(hello),
        },
        Some(Ok((PROTOCOL_VERSION, Err(e)))) => Err(format!("a hello that cannot be read: {e}")),
        Some(Ok((version, _))) => Err(mismatch(&format!("this {what}"), version)),
        Some(Err(e)) => Err(format!("no factum hello: {e}")),
        None => Err(format!("no hello within {HELLO_TIMEOUT:?}")),
    };
    let peer = hello.map(|hello| Peer { addr: addr.clone(), principal: hello.principal });
    let served = peer.and_then(|peer| serve(&peer).map(|served| (peer, served)));
    let refused = served.as_ref().err().cloned();
    if let Some(why) = &refused {
        tracing::warn!(target: AUDIT, peer = %addr, server = what, result = "refused", "connection refused: {why}");
    }
    // A peer gone before the answer changes nothing: its connection ends either way.
    let _ = write_frame(&mut stream, &Answer { refused }).await;
    served.ok().map(|(peer, served)| (stream, peer, served))
}

/// Both versions of a mismatch, named from `us`'s side.
fn mismatch(us: &str, theirs: u32) -> String {
    format!("{us} speaks factum protocol {PROTOCOL_VERSION}, the peer speaks {theirs}")
}

async fn write_frame(stream: &mut BoxStream, body: &impl Serialize) -> io::Result<()> {
    let body = rmp_serde::to_vec_named(body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let mut frame = Vec::with_capacity(12 + body.len());
    frame.extend_from_slice(&u32::try_from(8 + body.len()).unwrap_or(u32::MAX).to_be_bytes());
    frame.extend_from_slice(MAGIC);
    frame.extend_from_slice(&PROTOCOL_VERSION.to_be_bytes());
    frame.extend_from_slice(&body);
    stream.write_all(&frame).await?;
    stream.flush().await
}

/// The sender's version and its body; the body is decoded only as far as this version's type allows, so a
/// peer of another version still gets its version read.
async fn read_frame<T: for<'de> Deserialize<'de>>(
    stream: &mut BoxStream,
) -> io::Result<(u32, Result<T, rmp_serde::decode::Error>)> {
    let len = stream.read_u32().await?;
    // A TLS record (alert 0x15 or handshake 0x16, then version 3.x) where a hello was due.
    if matches!(len.to_be_bytes(), [0x15 | 0x16, 0x03, ..]) {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "the peer speaks TLS and this side plaintext"));
    }
    if !(8..=HELLO_MAX_BYTES).contains(&len) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a first frame of {len} bytes (a hello has 8 to {HELLO_MAX_BYTES})"),
        ));
    }
    let mut magic = [0; 4];
    stream.read_exact(&mut magic).await?;
    if &magic != MAGIC {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "the first frame is not a factum hello"));
    }
    let version = stream.read_u32().await?;
    let mut body = vec![0; len as usize - 8];
    stream.read_exact(&mut body).await?;
    Ok((version, rmp_serde::from_slice(&body)))
}
