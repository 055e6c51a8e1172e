//! The simulated world a cluster runs in: hosts that crash and restart, a network that partitions, holds and
//! loses, and virtual time. The cluster, the scenarios and their checks are written against [`World`]; two
//! simulators implement it, turmoil ([`TurmoilWorld`]) and, in builds with `RUSTFLAGS="--cfg madsim"`, madsim
//! (`MadsimWorld`), so the same scenario runs on either ([`Backend`]).

#[cfg(madsim)]
mod madsim_world;
mod turmoil_world;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use factum_env::Env;

use crate::{sim_epoch, ClusterConfig, SimError};

#[cfg(madsim)]
pub use madsim_world::MadsimWorld;
pub use turmoil_world::TurmoilWorld;

/// What a host runs: a process that returns when it exits, with an error if it failed.
pub type HostFuture = Pin<Box<dyn Future<Output = Result<(), SimError>>>>;

/// Makes a host's process; called again each time the host restarts.
pub type HostFactory = Box<dyn Fn() -> HostFuture + Send + Sync>;

/// A client's one run: the world is done when every client has returned.
pub type ClientFuture = Pin<Box<dyn Future<Output = Result<(), SimError>> + Send>>;

/// A simulator running hosts and clients on one virtual network and clock.
pub trait World {
    /// Adds host `name`, running `factory`'s process now and again after each restart.
    fn host(&mut self, name: &str, factory: HostFactory);
    /// Adds client `name`, running `future` once.
    fn client(&mut self, name: &str, future: ClientFuture);
    /// Runs one step of simulated time; `Ok(true)` once every client has returned. An error when a host or
    /// client failed, or the run went past its duration with clients still running.
    fn step(&mut self) -> Result<bool, String>;
    /// Simulated time since the world began.
    fn elapsed(&self) -> Duration;
    /// Kills host `name`: its process stops where it is, its connections break.
    fn crash(&mut self, name: &str);
    /// Restarts host `name` (crashed or not) with a fresh process from its factory.
    fn bounce(&mut self, name: &str);
    /// Cuts the link between `a` and `b` both ways.
    fn partition(&mut self, a: &str, b: &str);
    /// Undoes [`World::partition`].
    fn repair(&mut self, a: &str, b: &str);
    /// Holds the messages between `a` and `b` both ways until [`World::release`].
    fn hold(&mut self, a: &str, b: &str);
    /// Delivers what [`World::hold`] held and lets messages pass again.
    fn release(&mut self, a: &str, b: &str);
    /// Loses each message with probability `rate` (0: reliable).
    fn set_fail_rate(&mut self, rate: f64);
}

/// Which simulator runs a world. The default is the build's own: madsim in a build with `--cfg madsim` (so the
/// same tests and sweeps run there on madsim), turmoil otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// turmoil: fixed ticks of simulated time, every host stepped each tick.
    Turmoil,
    /// madsim: time jumps to the next event and ready tasks run in a seeded order; only in builds with
    /// `RUSTFLAGS="--cfg madsim"`.
    Madsim,
}

impl Default for Backend {
    fn default() -> Self {
        if cfg!(madsim) {
            Backend::Madsim
        } else {
            Backend::Turmoil
        }
    }
}

impl Backend {
    /// Whether this build can run the backend; the error says how to get one that can.
    pub fn check(self) -> Result<(), String> {
        match self {
            Backend::Madsim if !cfg!(madsim) => Err(NO_MADSIM.to_string()),
            _ => Ok(()),
        }
    }

    /// Its name, as `--backend` takes it.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Turmoil => "turmoil",
            Backend::Madsim => "madsim",
        }
    }

    /// Runs `run` (one simulation, start to end) where a run on this backend is a function of its seed alone.
    /// madsim seeds std's `HashMap` keys only if its runtime makes a thread's first `RandomState`, so a madsim
    /// run gets a fresh thread; otherwise what ran before on the thread would change the run.
    pub fn isolated<T: Send>(self, run: impl FnOnce() -> T + Send) -> T {
        match self {
            Backend::Turmoil => run(),
            Backend::Madsim => std::thread::scope(|s| match s.spawn(run).join() {
                Ok(out) => out,
                Err(panic) => std::panic::resume_unwind(panic),
            }),
        }
    }

    /// A new, empty world on this backend for a cluster configured as `config`.
    pub fn world(self, config: &ClusterConfig) -> Result<Box<dyn World>, String> {
        match self {
            Backend::Turmoil => Ok(Box::new(TurmoilWorld::new(config))),
            #[cfg(madsim)]
            Backend::Madsim => Ok(Box::new(MadsimWorld::new(config))),
            #[cfg(not(madsim))]
            Backend::Madsim => Err(NO_MADSIM.to_string()),
        }
    }
}

/// Why a build cannot run madsim.
const NO_MADSIM: &str = "this factum-sim was built without madsim; build it with \
    RUSTFLAGS=\"--cfg madsim\" CARGO_TARGET_DIR=target/madsim (see CI.md)";

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The env of a simulated process, on whichever simulator runs this thread: call it inside the host, as the
/// process starts. Randomness comes from `seed`, wall time from [`sim_epoch`].
pub fn process_env(seed: u64) -> Env {
    #[cfg(madsim)]
    if madsim::runtime::Handle::try_current().is_ok() {
        return Env::madsim(seed, sim_epoch());
    }
    Env::turmoil(seed, sim_epoch())
}
