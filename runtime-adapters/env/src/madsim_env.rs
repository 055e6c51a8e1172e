//! madsim implementations of the env seam (built with `RUSTFLAGS="--cfg madsim"`): madsim's virtual time, its
//! simulated TCP and its executor, which runs a node's tasks in a seeded order and jumps time to the next event.

use std::io;
use std::sync::Arc;
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
            Ok((Box::pin(stream) as BoxStream, peer.to_string()))
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
            Ok(Box::pin(stream) as BoxStream)
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
