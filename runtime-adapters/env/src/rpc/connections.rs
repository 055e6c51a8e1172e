//! What one RPC server lets its peers hold: connections in all and per peer address, requests in flight per
//! connection, and how long a connection may stay silent. A flood from one peer is refused at the door (and
//! logged), so it cannot take the file descriptors, memory or tasks that the cluster's own links need.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::{BoxStream, Clock};

/// Bounds of one server (see [`crate::rpc::accept_loop`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLimits {
    /// Connections open at once, from everyone; more are closed as soon as accepted.
    pub max_connections: usize,
    /// Connections open at once from one peer address (its IP; the port changes per connection).
    pub max_connections_per_peer: usize,
    /// Requests one connection may have in flight; more are answered with a "throttled" error.
    pub max_in_flight_per_connection: usize,
    /// A connection that sends nothing for this long is closed (the cluster's own links speak every second).
    pub idle_timeout: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            max_connections: 1024,
            max_connections_per_peer: 256,
            max_in_flight_per_connection: 1024,
            idle_timeout: Duration::from_secs(15 * 60),
        }
    }
}

/// The connections a server holds, counted per peer address.
#[derive(Debug, Default)]
pub struct Connections {
    limits: ServerLimits,
    open: Mutex<Open>,
}

/// Connections open now: per peer address, and in all (kept, not summed, since every accept asks).
#[derive(Debug, Default)]
struct Open {
    per_peer: BTreeMap<String, usize>,
    total: usize,
}

/// Why a connection was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// The server holds its most connections.
    Full(usize),
    /// This peer holds its most connections.
    PeerFull(usize),
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::Full(max) => write!(f, "the server holds its limit of {max} connections"),
            Refused::PeerFull(max) => write!(f, "the peer holds its limit of {max} connections"),
        }
    }
}

impl Connections {
    /// A count under `limits`.
    pub fn new(limits: ServerLimits) -> Arc<Self> {
        Arc::new(Connections { limits, open: Mutex::default() })
    }

    /// The limits counted against.
    pub fn limits(&self) -> ServerLimits {
        self.limits
    }

    /// Counts a connection from `peer` (`ip:port`) in, or says why it may not be; the guard counts it out.
    pub fn admit(self: &Arc<Self>, peer: &str) -> Result<Admitted, Refused> {
        let key = peer_key(peer);
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if open.total >= self.limits.max_connections {
            return Err(Refused::Full(self.limits.max_connections));
        }
        let held = open.per_peer.entry(key.clone()).or_insert(0);
        if *held >= self.limits.max_connections_per_peer {
            return Err(Refused::PeerFull(self.limits.max_connections_per_peer));
        }
        *held += 1;
        open.total += 1;
        Ok(Admitted { connections: self.clone(), key })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).total
    }
}

/// The address part of `ip:port` (`[v6]:port` too); a name without a port is its own key.
fn peer_key(peer: &str) -> String {
    match peer.rsplit_once(':') {
        Some((host, port)) if port.chars().all(|c| c.is_ascii_digit()) => host.to_string(),
        _ => peer.to_string(),
    }
}

/// One admitted connection; dropping it (when the connection's task ends) counts it out.
#[derive(Debug)]
pub struct Admitted {
    connections: Arc<Connections>,
    key: String,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut open = self.connections.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(held) = open.per_peer.get_mut(&self.key) {
            *held -= 1;
            if *held == 0 {
                open.per_peer.remove(&self.key);
            }
            open.total -= 1;
        }
    }
}

/// A stream that notes when its peer last sent anything, on the env clock.
pub struct Watched {
    inner: BoxStream,
    clock: Arc<dyn Clock>,
    last_read: Arc<AtomicU64>,
}

/// Wraps `stream` to note its reads; the returned closure ends when `idle` passes with nothing read.
pub fn watch(stream: BoxStream, clock: Arc<dyn Clock>, idle: Duration) -> (Watched, impl Future<Output = ()>) {
    let last_read = Arc::new(AtomicU64::new(millis(clock.now())));
    let watched = Watched { inner: stream, clock: clock.clone(), last_read: last_read.clone() };
    let silent = async move {
        loop {
            let quiet = clock.now().saturating_sub(Duration::from_millis(last_read.load(Ordering::Relaxed)));
            if quiet >= idle {
                return;
            }
            clock.sleep(idle - quiet).await;
        }
    };
    (watched, silent)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl AsyncRead for Watched {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = self.inner.as_mut().poll_read(cx, buf);
        if buf.filled().len() > before {
            self.last_read.store(millis(self.clock.now()), Ordering::Relaxed);
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.inner.as_mut().poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.inner.as_mut().poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.inner.as_mut().poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_are_counted_by_address_and_counted_out_on_drop() {
        let limits = ServerLimits { max_connections: 3, max_connections_per_peer: 2, ..ServerLimits::default() };
        let connections = Connections::new(limits);
        let a1 = connections.admit("10.0.0.1:5000").unwrap();
        let _a2 = connections.admit("10.0.0.1:5001").unwrap();
        assert_eq!(connections.admit("10.0.0.1:5002").unwrap_err(), Refused::PeerFull(2));
        let _b = connections.admit("[::1]:7000").unwrap();
        assert_eq!(connections.admit("10.0.0.2:1").unwrap_err(), Refused::Full(3));
        drop(a1);
        assert_eq!(connections.open(), 2);
        let _a3 = connections.admit("10.0.0.1:5003").unwrap();
        assert_eq!(peer_key("[::1]:7000"), "[::1]");
        assert_eq!(peer_key("agent-1"), "agent-1");
    }
}
