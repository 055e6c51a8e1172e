//! madsim implementations of the env seam (built with `RUSTFLAGS="--cfg madsim"`): madsim's virtual time, its
//! simulated TCP and its executor, which runs a node's tasks in a seeded order and jumps time to the next event.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use futures::future::BoxFuture;

use crate::{BoxStream, Clock, Env, Listener, Net, SeededRng, Spawn};

/// madsim's clock. Inside a madsim runtime `Instant` is the simulation's (madsim answers the OS clock calls);
/// wall time is a fixed origin plus elapsed simulated time.
pub struct MadsimClock {
    start: Instant,
    wall_origin: SystemTime,
}

impl MadsimClock {
    /// A clock starting now, whose wall time is `origin` then.
    pub fn new(origin: SystemTime) -> Self {
        Self { start: madsim::time::Instant::now(), wall_origin: origin }
    }
}

impl Clock for MadsimClock {
    fn now(&self) -> Duration {
        self.start.elapsed()
    }

    fn wall(&self) -> SystemTime {
        self.wall_origin + self.start.elapsed()
    }

    fn sleep(&self, d: Duration) -> BoxFuture<'static, ()> {
        Box::pin(madsim::time::sleep(d))
    }
}

/// madsim's simulated TCP: clogged links and lossy links delay its segments until they pass (madsim's TCP is
/// reliable), and a killed node's connections close.
pub struct MadsimNet;

struct MadsimListener(madsim::net::TcpListener);

impl Listener for MadsimListener {
    fn accept(&self) -> BoxFuture<'_, io::Result<(BoxStream, String)>> {
        Box::pin(async move {
            let (stream, peer) = self.0.accept().await?;
            Ok((Box::pin(MadsimStream::new(stream)) as BoxStream, peer.to_string()))
        })
    }

    fn local_addr(&self) -> io::Result<String> {
        Ok(self.0.local_addr()?.to_string())
    }
}

impl Net for MadsimNet {
    fn connect(&self, addr: &str) -> BoxFuture<'static, io::Result<BoxStream>> {
        let addr = addr.to_string();
        Box::pin(async move {
            let stream = madsim::net::TcpStream::connect(addr.as_str()).await?;
            Ok(Box::pin(MadsimStream::new(stream)) as BoxStream)
        })
    }

    fn bind(&self, addr: &str) -> BoxFuture<'static, io::Result<Box<dyn Listener>>> {
        let addr = addr.to_string();
        Box::pin(async move {
            let listener = madsim::net::TcpListener::bind(addr.as_str()).await?;
            Ok(Box::new(MadsimListener(listener)) as Box<dyn Listener>)
        })
    }
}

/// A madsim TCP stream that sends a segment only when there are bytes to send. madsim's own `poll_flush` sends
/// a payload on every call, written bytes or not, and its receiver spends at least 1 ms of simulated time on
/// each payload in order; tarpc flushes whenever its dispatch task runs, so empty payloads echoed between two
/// peers queued up behind each other and a connection's latency grew without bound (4 ms more per heartbeat).
struct MadsimStream {
    inner: madsim::net::TcpStream,
    unflushed: bool,
}

impl MadsimStream {
    fn new(inner: madsim::net::TcpStream) -> Self {
        Self { inner, unflushed: false }
    }
}

impl tokio::io::AsyncRead for MadsimStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for MadsimStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(written, Poll::Ready(Ok(n)) if n > 0) {
            self.unflushed = true;
        }
        written
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.unflushed {
            return Poll::Ready(Ok(()));
        }
        let flushed = Pin::new(&mut self.inner).poll_flush(cx);
        if flushed.is_ready() {
            self.unflushed = false;
        }
        flushed
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let flushed = self.as_mut().poll_flush(cx);
        if flushed.is_pending() {
            return flushed;
        }
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Spawns onto the current madsim node: its tasks die with it when the node is killed.
pub struct MadsimSpawn;

impl Spawn for MadsimSpawn {
    fn spawn(&self, f: BoxFuture<'static, ()>) {
        madsim::task::spawn(f);
    }
}

impl Env {
    /// Simulation on madsim: its virtual time with a fixed wall-clock origin, its network, and randomness from
    /// `seed`. Build one per simulated node, inside that node.
    pub fn madsim(seed: u64, wall_origin: SystemTime) -> Self {
        Env {
            clock: Arc::new(MadsimClock::new(wall_origin)),
            net: Arc::new(MadsimNet),
            spawner: Arc::new(MadsimSpawn),
            rng: Arc::new(SeededRng::new(seed)),
            trace: None,
            faults: None,
            credentials: crate::rpc::Credentials::default(),
        }
    }
}

/// Simulated time since the madsim runtime started, if this thread runs one.
pub(crate) fn elapsed() -> Option<Duration> {
    madsim::time::TimeHandle::try_current().map(|time| time.elapsed())
}
