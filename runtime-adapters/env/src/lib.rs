//! The env seam: everything nondeterministic that factum's components touch (time, network, task spawning,
//! randomness) goes through these traits. Production uses [`Env::tokio`]; the simulator uses
//! [`Env::turmoil`] (feature `turmoil`) or `Env::madsim` (built with `RUSTFLAGS="--cfg madsim"`), where time is
//! virtual, the network is the simulator's and randomness is seeded, so a run is a function of its seed.

mod backend_tls;
mod pause;
pub mod rpc;

pub use backend_tls::BackendTls;
pub use pause::{Gated, Pause};

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng, TryRngCore};
use tokio::io::{AsyncRead, AsyncWrite};

/// A byte stream the tarpc transport can run over.
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Stream for T {}

/// A boxed [`Stream`].
pub type BoxStream = Pin<Box<dyn Stream>>;

/// Time. `now` is monotonic since the component started; `wall` is for timestamps in facts and logs.
pub trait Clock: Send + Sync + 'static {
    /// Monotonic time since this clock's start.
    fn now(&self) -> Duration;
    /// Wall-clock time, for timestamps only (never for ordering or timeouts).
    fn wall(&self) -> SystemTime;
    /// Completes after `d` of this clock's time.
    fn sleep(&self, d: Duration) -> BoxFuture<'static, ()>;
}

/// A listening socket.
pub trait Listener: Send + Sync + 'static {
    /// Waits for the next connection; returns it with the peer's address.
    fn accept(&self) -> BoxFuture<'_, io::Result<(BoxStream, String)>>;
    /// The address it listens on, as `host:port`.
    fn local_addr(&self) -> io::Result<String>;
}

/// Network: TCP-like connect and bind by `host:port`.
pub trait Net: Send + Sync + 'static {
    /// Opens a connection.
    fn connect(&self, addr: &str) -> BoxFuture<'static, io::Result<BoxStream>>;
    /// Listens.
    fn bind(&self, addr: &str) -> BoxFuture<'static, io::Result<Box<dyn Listener>>>;
}

/// Runs background tasks.
pub trait Spawn: Send + Sync + 'static {
    /// Spawns `f`; it runs until it completes or the runtime (the simulated host) goes away.
    fn spawn(&self, f: BoxFuture<'static, ()>);

    /// Runs CPU-bound work (compiling a module) where it cannot hold up the async tasks. The default runs it
    /// at once, on the caller's thread: what a simulation needs, so that runs stay deterministic.
    fn offload(&self, work: Box<dyn FnOnce() + Send>) {
        work();
    }
}

/// Randomness.
pub trait Rng: Send + Sync + 'static {
    /// A uniformly random `u64`.
    fn next_u64(&self) -> u64;
}

/// Receives the events that define a run: status transitions and the facts the control plane applies. The
/// simulator hashes them (same seed ⇒ same hash) and checks invariants on them; production records nothing.
pub trait Trace: Send + Sync + 'static {
    /// Records one event from `component` (e.g. `agent-1`, `control-plane`).
    fn record(&self, component: &str, event: String);
}

/// Fault injection at named points in product code (FoundationDB's BUGGIFY): only a simulation installs
/// one, so in production every point is a no-op.
pub trait Faults: Send + Sync + 'static {
    /// Whether the fault at `point` happens this time.
    fn fire(&self, point: &'static str) -> bool;
}

/// The bundle every component is built from.
#[derive(Clone)]
pub struct Env {
    /// Time.
    pub clock: Arc<dyn Clock>,
    /// Network.
    pub net: Arc<dyn Net>,
    /// Task spawning.
    pub spawner: Arc<dyn Spawn>,
    /// Randomness.
    pub rng: Arc<dyn Rng>,
    /// Event trace, if anyone listens: `(component name, sink)`.
    pub trace: Option<(String, Arc<dyn Trace>)>,
    /// Fault injection, in simulation only.
    pub faults: Option<Arc<dyn Faults>>,
    /// Who this component is to the peers it calls ([`rpc::dial`]).
    pub credentials: rpc::Credentials,
}

impl Env {
    /// Production: tokio time, tokio TCP, `tokio::spawn`, a ChaCha generator seeded from the OS.
    pub fn tokio() -> Self {
        Env {
            clock: Arc::new(TokioClock::new()),
            net: Arc::new(TokioNet),
            spawner: Arc::new(TokioSpawn),
            rng: Arc::new(SeededRng::from_os()),
            trace: None,
            faults: None,
            credentials: rpc::Credentials::default(),
        }
    }

    /// The same env, introducing itself to peers with `credentials`.
    pub fn with_credentials(mut self, credentials: rpc::Credentials) -> Self {
        self.credentials = credentials;
        self
    }

    /// The same env, introducing itself to peers as `principal` (and keeping whatever else its credentials
    /// hold): how a component that knows who it is (an agent is its node) says so.
    pub fn with_principal(mut self, principal: factum_proto::Principal) -> Self {
        self.credentials.principal = principal;
        self
    }

    /// The same env, injecting faults from `faults`.
    pub fn with_faults(mut self, faults: Arc<dyn Faults>) -> Self {
        self.faults = Some(faults);
        self
    }

    /// Whether the fault at `point` fires now; always false outside simulation.
    pub fn buggify(&self, point: &'static str) -> bool {
        self.faults.as_ref().is_some_and(|f| f.fire(point))
    }

    /// The same env, recording events as `component` into `sink`.
    pub fn with_trace(mut self, component: impl Into<String>, sink: Arc<dyn Trace>) -> Self {
        self.trace = Some((component.into(), sink));
        self
    }

    /// Records an event if a trace sink is attached; `event` is only built when one is.
    pub fn trace(&self, event: impl FnOnce() -> String) {
        if let Some((component, sink)) = &self.trace {
            sink.record(component, event());
        }
    }

    /// Spawns a future through the env's spawner.
    pub fn spawn(&self, f: impl Future<Output = ()> + Send + 'static) {
        self.spawner.spawn(Box::pin(f));
    }

    /// Runs `work` on a task of its own and waits for its output, so a caller that goes away (an RPC its client
    /// cancelled, a timeout) cannot stop the work halfway and leave what it began half done. `None` if the task
    /// ended without finishing (its runtime shut down).
    pub async fn uncancellable<T: Send + 'static>(&self, work: impl Future<Output = T> + Send + 'static) -> Option<T> {
        let (done, output) = tokio::sync::oneshot::channel();
        self.spawn(async move {
            let _ = done.send(work.await); // the caller may be gone: the work is done anyway
        });
        output.await.ok()
    }

    /// Runs CPU-bound `work` through [`Spawn::offload`] and waits for its output; `None` if it panicked
    /// or its runtime shut down first.
    pub async fn blocking<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        let (done, output) = tokio::sync::oneshot::channel();
        self.spawner.offload(Box::new(move || {
            let _ = done.send(work()); // the caller may have given up waiting: the work is done anyway
        }));
        output.await.ok()
    }

    /// Wall-clock milliseconds since the Unix epoch.
    pub fn wall_ms(&self) -> u64 {
        let since = self.clock.wall().duration_since(UNIX_EPOCH).unwrap_or_default();
        u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
    }

    /// Runs `f` with a timeout on the env clock; `None` when the time ran out first.
    pub async fn timeout<F: Future>(&self, d: Duration, f: F) -> Option<F::Output> {
        let sleep = self.clock.sleep(d);
        tokio::select! {
            biased;
            out = f => Some(out),
            () = sleep => None,
        }
    }

    /// A fresh random id: `prefix` + 16 hex digits from the env's randomness.
    pub fn random_id(&self, prefix: &str) -> String {
        format!("{prefix}{:016x}", self.rng.next_u64())
    }
}

/// tokio's clock. Under turmoil, tokio time is the simulation's virtual time, so this serves both; only
/// the wall-clock origin differs.
pub struct TokioClock {
    start: tokio::time::Instant,
    wall_origin: Option<SystemTime>,
}

impl TokioClock {
    /// A clock whose wall time is the OS's.
    pub fn new() -> Self {
        Self { start: tokio::time::Instant::now(), wall_origin: None }
    }

    /// A clock whose wall time is `origin` plus elapsed tokio time: deterministic under simulated time.
    pub fn with_wall_origin(origin: SystemTime) -> Self {
        Self { start: tokio::time::Instant::now(), wall_origin: Some(origin) }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for TokioClock {
    fn now(&self) -> Duration {
        self.start.elapsed()
    }

    fn wall(&self) -> SystemTime {
        match self.wall_origin {
            Some(origin) => origin + self.start.elapsed(),
            None => SystemTime::now(),
        }
    }

    fn sleep(&self, d: Duration) -> BoxFuture<'static, ()> {
        Box::pin(tokio::time::sleep(d))
    }
}

/// tokio TCP.
pub struct TokioNet;

struct TokioListener(tokio::net::TcpListener);

impl Listener for TokioListener {
    fn accept(&self) -> BoxFuture<'_, io::Result<(BoxStream, String)>> {
        Box::pin(async move {
            let (stream, peer) = self.0.accept().await?;
            stream.set_nodelay(true)?;
            Ok((Box::pin(stream) as BoxStream, peer.to_string()))
        })
    }

    fn local_addr(&self) -> io::Result<String> {
        Ok(self.0.local_addr()?.to_string())
    }
}

impl Net for TokioNet {
    fn connect(&self, addr: &str) -> BoxFuture<'static, io::Result<BoxStream>> {
        let addr = addr.to_string();
        Box::pin(async move {
            let stream = tokio::net::TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            Ok(Box::pin(stream) as BoxStream)
        })
    }

    fn bind(&self, addr: &str) -> BoxFuture<'static, io::Result<Box<dyn Listener>>> {
        let addr = addr.to_string();
        Box::pin(async move {
            let listener = tokio::net::TcpListener::bind(addr).await?;
            Ok(Box::new(TokioListener(listener)) as Box<dyn Listener>)
        })
    }
}

/// `tokio::spawn`. Inside a turmoil host this spawns on that host's runtime, which turmoil drives
/// deterministically, so it serves the simulation too.
pub struct TokioSpawn;

impl Spawn for TokioSpawn {
    fn spawn(&self, f: BoxFuture<'static, ()>) {
        tokio::spawn(f);
    }

    /// tokio's blocking pool, so a long compile never stalls a worker (and the heartbeats on it).
    fn offload(&self, work: Box<dyn FnOnce() + Send>) {
        tokio::task::spawn_blocking(work);
    }
}

/// A ChaCha8 generator behind a mutex; seeded from the OS in production and from the run's seed in
/// simulation.
pub struct SeededRng(Mutex<ChaCha8Rng>);

impl SeededRng {
    /// Seeded from `seed`: the same seed gives the same sequence.
    pub fn new(seed: u64) -> Self {
        Self(Mutex::new(ChaCha8Rng::seed_from_u64(seed)))
    }

    /// Seeded from the operating system.
    pub fn from_os() -> Self {
        let mut seed = [0u8; 32];
        let filled = rand_core::OsRng.try_fill_bytes(&mut seed).is_ok();
        let rng = if filled {
            ChaCha8Rng::from_seed(seed)
        } else {
            // No OS randomness: fall back to the clock, which still makes ids unique per process start.
            let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos();
            ChaCha8Rng::seed_from_u64(nanos as u64 ^ u64::from(std::process::id()))
        };
        Self(Mutex::new(rng))
    }
}

impl Rng for SeededRng {
    fn next_u64(&self) -> u64 {
        match self.0.lock() {
            Ok(mut rng) => rng.next_u64(),
            Err(poisoned) => poisoned.into_inner().next_u64(),
        }
    }
}

#[cfg(feature = "turmoil")]
mod sim;
#[cfg(feature = "turmoil")]
pub use sim::TurmoilNet;

#[cfg(madsim)]
mod madsim_env;
#[cfg(madsim)]
pub use madsim_env::{MadsimClock, MadsimNet, MadsimSpawn};

#[cfg(any(feature = "turmoil", madsim))]
mod machine_clock;
#[cfg(any(feature = "turmoil", madsim))]
pub use machine_clock::MachineClock;

/// Simulated time since the run began, read from whichever simulator runs on this thread (turmoil or madsim);
/// `None` outside a simulation.
pub fn sim_elapsed() -> Option<Duration> {
    #[cfg(feature = "turmoil")]
    if let Some(elapsed) = turmoil::sim_elapsed() {
        return Some(elapsed);
    }
    #[cfg(madsim)]
    if let Some(elapsed) = madsim_env::elapsed() {
        return Some(elapsed);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_rng_replays() {
        let a = SeededRng::new(7);
        let b = SeededRng::new(7);
        let xs: Vec<u64> = (0..8).map(|_| a.next_u64()).collect();
        let ys: Vec<u64> = (0..8).map(|_| b.next_u64()).collect();
        assert_eq!(xs, ys);
        assert_ne!(SeededRng::new(8).next_u64(), xs[0]);
    }

    #[tokio::test(start_paused = true)]
    async fn timeout_uses_the_env_clock() {
        let env = Env::tokio();
        let slow = env.clock.sleep(Duration::from_secs(10));
        assert_eq!(env.timeout(Duration::from_secs(1), slow).await, None);
        assert_eq!(env.timeout(Duration::from_secs(1), async { 5 }).await, Some(5));
    }

    /// The blocking work waits for a message only another task on the same (single) runtime thread can send:
    /// run inline, it would wait its full 10 s and report false.
    #[tokio::test(flavor = "current_thread")]
    async fn blocking_work_leaves_the_runtime_free_in_production() {
        let env = Env::tokio();
        let (tx, rx) = std::sync::mpsc::channel();
        tokio::spawn(async move { tx.send(()).unwrap() });
        let heard = env.blocking(move || rx.recv_timeout(Duration::from_secs(10)).is_ok()).await;
        assert_eq!(heard, Some(true));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn blocking_work_runs_inline_by_default() {
        struct Inline;
        impl Spawn for Inline {
            fn spawn(&self, f: BoxFuture<'static, ()>) {
                tokio::spawn(f);
            }
        }
        let env = Env { spawner: Arc::new(Inline), ..Env::tokio() };
        let caller = std::thread::current().id();
        assert_eq!(env.blocking(move || std::thread::current().id() == caller).await, Some(true));
    }

    #[tokio::test(start_paused = true)]
    async fn wall_origin_advances_with_virtual_time() {
        let origin = UNIX_EPOCH + Duration::from_secs(1_000);
        let clock = TokioClock::with_wall_origin(origin);
        clock.sleep(Duration::from_secs(5)).await;
        assert_eq!(clock.wall(), origin + Duration::from_secs(5));
    }
}
