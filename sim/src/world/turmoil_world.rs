//! [`World`] on turmoil.

use std::time::Duration;

use super::{ClientFuture, HostFactory, World};
use crate::{sim_epoch, ClusterConfig};

/// A turmoil simulation: every host is stepped each tick of simulated time ([`ClusterConfig::tick`]).
pub struct TurmoilWorld {
    sim: turmoil::Sim<'static>,
}

impl TurmoilWorld {
    /// An empty world with `config`'s seed, duration, tick and message latencies.
    pub fn new(config: &ClusterConfig) -> Self {
        let sim = turmoil::Builder::new()
            .simulation_duration(config.duration)
            .tick_duration(config.tick)
            .epoch(sim_epoch())
            .rng_seed(config.seed)
            .min_message_latency(config.latency.0)
            .max_message_latency(config.latency.1)
            .build();
        Self { sim }
    }
}

impl World for TurmoilWorld {
    fn host(&mut self, name: &str, factory: HostFactory) {
        self.sim.host(name, move || {
            let process = factory();
            async move { process.await.map_err(|e| e as Box<dyn std::error::Error>) }
        });
    }

    fn client(&mut self, name: &str, future: ClientFuture) {
        self.sim.client(name, async move { future.await.map_err(|e| e as Box<dyn std::error::Error>) });
    }

    fn step(&mut self) -> Result<bool, String> {
        self.sim.step().map_err(|e| e.to_string())
    }

    fn elapsed(&self) -> Duration {
        self.sim.elapsed()
    }

    fn crash(&mut self, name: &str) {
        self.sim.crash(name);
    }

    fn bounce(&mut self, name: &str) {
        self.sim.bounce(name);
    }

    fn partition(&mut self, a: &str, b: &str) {
        self.sim.partition(a, b);
    }

    fn repair(&mut self, a: &str, b: &str) {
        self.sim.repair(a, b);
    }

    fn hold(&mut self, a: &str, b: &str) {
        self.sim.hold(a, b);
    }

    fn release(&mut self, a: &str, b: &str) {
        self.sim.release(a, b);
    }

    fn set_fail_rate(&mut self, rate: f64) {
        self.sim.set_fail_rate(rate);
    }
}
