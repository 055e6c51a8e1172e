//! [`World`] on madsim (builds with `RUSTFLAGS="--cfg madsim"` only).

use core::net::{IpAddr, Ipv4Addr}; // addresses only; sockets come from madsim
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use madsim::net::NetSim;
use madsim::runtime::Runtime;
use madsim::task::NodeId;

use super::{ClientFuture, HostFactory, World};
use crate::ClusterConfig;

/// A madsim simulation. A step runs the runtime until [`ClusterConfig::tick`] more of simulated time has passed;
/// inside it, time jumps from one event to the next and ready tasks run in an order drawn from the seed.
///
/// madsim's TCP never loses a segment: a partitioned, held or lossy link delays its segments (retried with
/// backoff up to 10 s) until they pass. So a partition here is a long hold, where on turmoil it drops.
pub struct MadsimWorld {
    rt: Runtime,
    net: Arc<NetSim>,
    nodes: BTreeMap<String, NodeId>,
    /// How many faults cut each directed link: it is clogged while any does.
    cuts: BTreeMap<(NodeId, NodeId), u32>,
    tick: Duration,
    duration: Duration,
    now: Duration,
    /// What failed in a host or client, for the next step to report.
    failures: Arc<Mutex<Vec<String>>>,
    clients_running: Arc<AtomicUsize>,
}

impl MadsimWorld {
    /// An empty world with `config`'s seed, duration, tick and message latencies.
    pub fn new(config: &ClusterConfig) -> Self {
        let (lo, hi) = config.latency;
        let mut sim_config = madsim::Config::default();
        // madsim draws a latency uniformly from its range; turmoil draws lo + (hi - lo) * Exp(5), mean a fifth
        // of the range. The first two fifths of the range, drawn uniformly, have the same mean, so a scenario's
        // deadlines mean the same on both.
        let mean_matched = lo + (hi - lo) * 2 / 5;
        sim_config.net.send_latency = lo..mean_matched.max(lo + Duration::from_nanos(1));
        let rt = Runtime::with_seed_and_config(config.seed, sim_config);
        let net = rt.block_on(async { NetSim::current() });
        Self {
            rt,
            net,
            nodes: BTreeMap::new(),
            cuts: BTreeMap::new(),
            tick: config.tick,
            duration: config.duration,
            now: Duration::ZERO,
            failures: Arc::default(),
            clients_running: Arc::default(),
        }
    }

    /// A node named `name`, reachable by that name at an address of its own.
    fn node(&mut self, name: &str) -> madsim::runtime::NodeBuilder<'_> {
        let n = u32::try_from(self.nodes.len() + 1).unwrap_or(u32::MAX);
        let ip = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | n));
        self.net.add_dns_record(name, ip);
        self.rt.create_node().name(name).ip(ip)
    }

    fn id(&self, name: &str) -> Option<NodeId> {
        self.nodes.get(name).copied()
    }

    fn cut(&mut self, a: &str, b: &str) {
        let (Some(a), Some(b)) = (self.id(a), self.id(b)) else { return };
        for link in [(a, b), (b, a)] {
            let count = self.cuts.entry(link).or_default();
            *count += 1;
            if *count == 1 {
                self.net.clog_link(link.0, link.1);
            }
        }
    }

    fn uncut(&mut self, a: &str, b: &str) {
        let (Some(a), Some(b)) = (self.id(a), self.id(b)) else { return };
        for link in [(a, b), (b, a)] {
            if let Some(count) = self.cuts.get_mut(&link) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    self.cuts.remove(&link);
                    self.net.unclog_link(link.0, link.1);
                }
            }
        }
    }
}

impl World for MadsimWorld {
    fn host(&mut self, name: &str, factory: HostFactory) {
        let failures = self.failures.clone();
        let host = name.to_string();
        let factory: Arc<HostFactory> = Arc::new(factory);
        let node = self
            .node(name)
            .init(move || {
                let (factory, failures, host) = (factory.clone(), failures.clone(), host.clone());
                // Made on the first poll, inside the node: its env must see the madsim runtime (madsim calls
                // `init` from `build` and `restart`, outside any node).
                async move {
                    if let Err(e) = factory().await {
                        failures.lock().unwrap_or_else(|p| p.into_inner()).push(format!("host {host}: {e}"));
                    }
                }
            })
            .build();
        self.nodes.insert(name.to_string(), node.id());
    }

    fn client(&mut self, name: &str, future: ClientFuture) {
        let node = self.node(name).build();
        self.nodes.insert(name.to_string(), node.id());
        let (failures, running, client) = (self.failures.clone(), self.clients_running.clone(), name.to_string());
        running.fetch_add(1, Ordering::SeqCst);
        node.spawn(async move {
            let result = future.await.map_err(|e| e.to_string());
            if let Err(e) = result {
                failures.lock().unwrap_or_else(|p| p.into_inner()).push(format!("client {client}: {e}"));
            }
            running.fetch_sub(1, Ordering::SeqCst);
        });
    }

    fn step(&mut self) -> Result<bool, String> {
        let tick = self.tick;
        self.now = self.rt.block_on(async move {
            madsim::time::sleep(tick).await;
            madsim::time::TimeHandle::current().elapsed()
        });
        if let Some(failure) = self.failures.lock().unwrap_or_else(|p| p.into_inner()).first() {
            return Err(failure.clone());
        }
        let done = self.clients_running.load(Ordering::SeqCst) == 0;
        if !done && self.now > self.duration {
            return Err(format!("ran for {:?} without completing", self.duration));
        }
        Ok(done)
    }

    fn elapsed(&self) -> Duration {
        self.now
    }

    fn crash(&mut self, name: &str) {
        if let Some(id) = self.id(name) {
            self.rt.handle().kill(id);
        }
    }

    fn bounce(&mut self, name: &str) {
        if let Some(id) = self.id(name) {
            // Killing first frees its ports: madsim's `restart` alone keeps the old process's sockets bound,
            // so the new one could not listen.
            self.rt.handle().kill(id);
            self.rt.handle().restart(id);
        }
    }

    fn partition(&mut self, a: &str, b: &str) {
        self.cut(a, b);
    }

    fn repair(&mut self, a: &str, b: &str) {
        self.uncut(a, b);
    }

    fn hold(&mut self, a: &str, b: &str) {
        self.cut(a, b);
    }

    fn release(&mut self, a: &str, b: &str) {
        self.uncut(a, b);
    }

    fn set_fail_rate(&mut self, rate: f64) {
        self.net.update_config(|c| c.packet_loss_rate = rate.clamp(0.0, 1.0));
    }
}

impl Drop for MadsimWorld {
    /// madsim's runtime frees nothing when dropped: a task still waiting holds the timer that holds its waker,
    /// so each run leaked its cluster (about 2 MB; a 1,000-seed sweep filled 24 GB). Killing every node and
    /// running the executor once drops their tasks, which breaks those cycles.
    fn drop(&mut self) {
        for id in self.nodes.values() {
            self.rt.handle().kill(*id);
        }
        self.rt.block_on(async {});
    }
}
