//! turmoil implementations of the env seam.

use std::io;
use std::sync::Arc;
use std::time::SystemTime;

use futures::future::BoxFuture;

use crate::{BoxStream, Env, Listener, Net, SeededRng, Spawn, TokioClock};

/// turmoil's simulated TCP: partitions, holds and host crashes apply to it.
pub struct TurmoilNet;

struct TurmoilListener(turmoil::net::TcpListener);

impl Listener for TurmoilListener {
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

impl Net for TurmoilNet {
    fn connect(&self, addr: &str) -> BoxFuture<'static, io::Result<BoxStream>> {
        let addr = addr.to_string();
        Box::pin(async move {
            let stream = turmoil::net::TcpStream::connect(addr.as_str()).await?;
            Ok(Box::pin(stream) as BoxStream)
        })
    }

    fn bind(&self, addr: &str) -> BoxFuture<'static, io::Result<Box<dyn Listener>>> {
        let addr = addr.to_string();
        Box::pin(async move {
            let listener = turmoil::net::TcpListener::bind(addr.as_str()).await?;
            Ok(Box::new(TurmoilListener(listener)) as Box<dyn Listener>)
        })
    }
}

/// Spawns onto the simulated host's `LocalSet`. Tasks spawned with `tokio::spawn` live in tokio's task list,
/// sharded by a process-global task id, and a crashed host's runtime drops them in shard order: with another
/// simulation running on another thread the ids interleave differently, so the order of the messages those
/// drops send (TCP FINs) changed the run. `LocalSet` tasks are dropped in spawn order.
pub struct TurmoilSpawn;

impl Spawn for TurmoilSpawn {
    fn spawn(&self, f: BoxFuture<'static, ()>) {
        tokio::task::spawn_local(f);
    }
}

impl Env {
    /// Simulation: virtual tokio time with a fixed wall-clock origin, turmoil's network, and randomness from
    /// `seed`. Build one per simulated host, inside that host.
    pub fn turmoil(seed: u64, wall_origin: SystemTime) -> Self {
        Env {
            clock: Arc::new(TokioClock::with_wall_origin(wall_origin)),
            net: Arc::new(TurmoilNet),
            spawner: Arc::new(TurmoilSpawn),
            rng: Arc::new(SeededRng::new(seed)),
            trace: None,
            faults: None,
            credentials: crate::rpc::Credentials::default(),
        }
    }
}
