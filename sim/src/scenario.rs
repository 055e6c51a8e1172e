//! Chaos scenarios: TOML scripts of timed steps (API calls and faults) with `always` and `eventually` checks,
//! run against a simulated cluster from a seed.
//!
//! ```toml
//! name = "agent crash"
//! agents = 2
//! duration = "30s"
//!
//! [[step]]
//! at = "1s"
//! do = "start"        # start | stop_all | grant | revoke | crash | restart | recover | pause
//!                     # | resume | partition | hold | release | lossy | reliable | heal
//! instances = 6
//! guest = "sleeper"   # a fixture name
//!
//! [[step]]
//! at = "5s"
//! do = "crash"
//! node = "agent-2"
//!
//! [[always]]
//! check = "single_placement"
//!
//! [[eventually]]
//! check = "node_unknown:agent-2"
//! by = "15s"
//! ```
//!
//! `always` checks run every 50 ms of simulated time. Once the last step is done, an `eventually` check must hold
//! for a whole second without a break no later than `by`, and from then on never stay broken for more than two
//! seconds (see [`crate::convergence`]).

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use factum_env::rpc;
use factum_proto::{CapabilityGrant, PolicyType, RestartPolicy};
use factum_providers::remote::PROVIDED;
use factum_wasm::fixtures;
use serde::{Deserialize, Serialize};

use crate::convergence::Convergence;
use crate::{
    build_observed_cluster, invariants, Backend, ClusterConfig, Observed, Outcome, Render, SimClient, SimError,
    TraceLog,
};

/// Attempts a `must_succeed` start gets, a second apart.
const START_ATTEMPTS: u32 = 3;

/// How often checks sample the cluster, in simulated time.
const SAMPLE_EVERY: Duration = Duration::from_millis(50);
/// Every how many samples the control plane's maps are rendered for P7 (every 500 ms): application data that
/// reached them would stay there, so a slower look loses nothing, and rendering is most of a view's cost.
const RENDER_MAPS_EVERY: u64 = 10;

/// A parsed scenario file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Title.
    pub name: String,
    /// Number of agents (`agent-1` …).
    pub agents: usize,
    /// Simulated time the run lasts.
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
    /// Timed steps, in any order.
    #[serde(default, rename = "step")]
    pub steps: Vec<Step>,
    /// Checks that must hold at every sample.
    #[serde(default)]
    pub always: Vec<Always>,
    /// Checks that must come to hold.
    #[serde(default)]
    pub eventually: Vec<Eventually>,
    /// Whether BUGGIFY fault points in product code may fire (default true).
    #[serde(default = "yes")]
    pub buggify: bool,
    /// Longest network latency of a message (default 100ms); each message takes a random time up to it.
    #[serde(default, with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub max_latency: Option<Duration>,
    /// Run a simulated etcd (host `etcd`): leases, membership, rescheduling (default false).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub registry: bool,
    /// Largest wall-clock skew of a host: each host's wall clock is off by a seeded amount in ±this (default 0).
    /// Timestamps then disagree between hosts; nothing may depend on them for ordering.
    #[serde(default, with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub clock_skew: Option<Duration>,
    /// Largest relative error of a host's clock rate (default 0): each host's clock runs at a seeded rate
    /// within 1 ± this. At most 0.1: lease fencing assumes rates within 20% of each other.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock_drift: Option<f64>,
    /// Even-numbered agents run wasmtime instead of wasmi (default false), so probes run on both engines.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub wasmtime: bool,
    /// Run a message bus (host `nats`) that every agent's messaging provider uses (default false), so
    /// `publisher` and `subscriber` instances on different nodes talk across the simulated network.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub messaging: bool,
    /// Run web hosts `web` and `intranet` that every agent's HTTP provider reaches over the simulated network
    /// (default false), for `http_getter` instances.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub http: bool,
    /// Run this many KV provider hosts (`kv-host`, `kv-host-2`, …; one store behind them all, as one Redis
    /// would be) that every agent's KV calls go to with their sealed grants, and a rogue caller that tries bent
    /// grants on the first (default 0, at most 3): Property 17. With `registry`, the hosts register there under
    /// leases of their own and agents find them; without, agents are told them.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub provider_hosts: usize,
    /// How long the control plane's grant seals last (default 10 min, longer than any run): short, seals are
    /// renewed several times a run and expire while a node is cut off from the control plane for longer.
    #[serde(default, with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub grant_ttl: Option<Duration>,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

fn yes() -> bool {
    true
}

/// A signed duration (`"90s"`, `"-2m"`) in seconds.
fn signed_seconds(text: &str) -> Result<f64, String> {
    let (sign, magnitude) = match text.strip_prefix('-') {
        Some(rest) => (-1.0, rest),
        None => (1.0, text.strip_prefix('+').unwrap_or(text)),
    };
    humantime::parse_duration(magnitude).map(|d| sign * d.as_secs_f64()).map_err(|e| e.to_string())
}

/// Item `r` (mod the length) of a non-empty list.
fn nth<T: Clone + Default>(items: &[T], r: u64) -> T {
    let len = items.len().max(1) as u64;
    items.get((r % len) as usize).cloned().unwrap_or_default()
}

/// One timed step.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// When, in simulated time from the start.
    #[serde(with = "humantime_serde")]
    pub at: Duration,
    /// What.
    #[serde(rename = "do")]
    pub action: Action,
    /// `start`: how many instances.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instances: Option<usize>,
    /// `start`: fixture name (default `sleeper`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest: Option<String>,
    /// `start`: restart policy (default `never`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// `start`: max retries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<u32>,
    /// `start`: base restart backoff in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<u32>,
    /// `start` / `grant` / `revoke`: capability id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capability: Option<String>,
    /// `start` / `grant`: permissions of `capability`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub permissions: Vec<String>,
    /// `crash` / `restart`: host name (`control-plane`, `agent-N`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// `partition`: one side.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub a: Option<String>,
    /// `partition`: the other side.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub b: Option<String>,
    /// `lossy`: probability in (0, 1] that a link fails (drops what it carries) at each network step.
    /// `drift`: the host clock's new rate against true time, in [0.5, 2].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<f64>,
    /// `jump`: how far the host's wall clock is set, forward or (with a leading `-`) back, e.g. `"-30s"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    /// `start`: placement constraints `NAME=VALUE`. Agent N is labelled `zone=a` when N is odd and `zone=b`
    /// when it is even (see [`crate::agent_labels`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub constraints: Vec<String>,
    /// `start`: the run fails if a start does not succeed within a few attempts (a healthy cluster must take
    /// new work); by default a failed start is one of the faults' effects and is ignored.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub must_succeed: bool,
}

impl Step {
    /// The first field set on this step that its action does not take (it would be ignored: a typo or a
    /// misunderstanding, so it is refused).
    fn stray_field(&self) -> Option<&'static str> {
        let takes: &[&str] = match self.action {
            Action::Start => &[
                "instances",
                "guest",
                "policy",
                "max_retries",
                "backoff",
                "capability",
                "permissions",
                "constraints",
                "must_succeed",
            ],
            Action::Grant => &["capability", "permissions"],
            Action::Revoke => &["capability"],
            Action::Crash
            | Action::Restart
            | Action::Recover
            | Action::Pause
            | Action::Resume
            | Action::Drain
            | Action::Undrain => &["node"],
            Action::Drift => &["node", "rate"],
            Action::Jump => &["node", "by"],
            Action::Partition | Action::Hold => &["a", "b"],
            Action::Lossy => &["rate"],
            Action::StopAll | Action::RemoveEnded | Action::Release | Action::Reliable | Action::Heal => &[],
        };
        let set = [
            ("instances", self.instances.is_some()),
            ("guest", self.guest.is_some()),
            ("policy", self.policy.is_some()),
            ("max_retries", self.max_retries.is_some()),
            ("backoff", self.backoff.is_some()),
            ("capability", self.capability.is_some()),
            ("permissions", !self.permissions.is_empty()),
            ("node", self.node.is_some()),
            ("a", self.a.is_some()),
            ("b", self.b.is_some()),
            ("rate", self.rate.is_some()),
            ("by", self.by.is_some()),
            ("constraints", !self.constraints.is_empty()),
            ("must_succeed", self.must_succeed),
        ];
        set.into_iter().find(|(field, set)| *set && !takes.contains(field)).map(|(field, _)| field)
    }
}

/// What a step does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// StartInstance × `instances`.
    Start,
    /// StopInstance on every instance started so far.
    StopAll,
    /// RemoveInstance on every instance started so far that the control plane lists as ended (stopped, or
    /// crashed with no restart pending).
    RemoveEnded,
    /// AssignCapability `capability` with `permissions` to every instance started so far.
    Grant,
    /// RevokeCapability `capability` from every instance started so far.
    Revoke,
    /// DrainNode `node`: it takes no new instances and its reschedulable instances move (stop first).
    Drain,
    /// Undo a drain of `node`.
    Undrain,
    /// Crash host `node`.
    Crash,
    /// Restart host `node` (after a crash, or kill-and-restart).
    Restart,
    /// Bring host `node` back: restart it if it is crashed, resume it if it is paused.
    Recover,
    /// Freeze host `node`'s process (SIGSTOP): none of its tasks or timers run until `resume`, while time and
    /// the rest of the cluster go on.
    Pause,
    /// Thaw host `node`: every frozen task wakes at once, its timers long past due.
    Resume,
    /// Host `node`'s clock runs at `rate` from now on (drift; its time stays continuous).
    Drift,
    /// Host `node`'s wall clock is set forward or back `by` (monotonic time is untouched).
    Jump,
    /// Drop traffic between `a` and `b`.
    Partition,
    /// Hold traffic between `a` and `b`: nothing is lost, everything arrives late, at the next `release`.
    Hold,
    /// Deliver everything held.
    Release,
    /// Make every link fail at random with probability `rate` per network step (message loss).
    Lossy,
    /// Stop random link failures.
    Reliable,
    /// Make the network whole: repair every partition, release every hold, stop random loss.
    Heal,
}

impl Action {
    fn is_fault(self) -> bool {
        !matches!(
            self,
            Action::Start
                | Action::StopAll
                | Action::RemoveEnded
                | Action::Grant
                | Action::Revoke
                | Action::Drain
                | Action::Undrain
        )
    }

    /// Every fault a scenario can inject, for coverage reports.
    pub const FAULTS: [Action; 14] = [
        Action::Crash,
        Action::Restart,
        Action::Recover,
        Action::Pause,
        Action::Resume,
        Action::Drift,
        Action::Jump,
        Action::Partition,
        Action::Hold,
        Action::Release,
        Action::Lossy,
        Action::Reliable,
        Action::Heal,
        Action::Revoke,
    ];
}

/// An `[[always]]` block.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Always {
    /// Check name, see [`invariants::check`].
    pub check: String,
}

/// An `[[eventually]]` block.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Eventually {
    /// Check name.
    pub check: String,
    /// Deadline in simulated time.
    #[serde(with = "humantime_serde")]
    pub by: Duration,
}

impl Scenario {
    /// Reads and validates a scenario file.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Parses and validates scenario text.
    pub fn parse(text: &str) -> Result<Self, String> {
        let scenario: Scenario = toml::from_str(text).map_err(|e| e.to_string())?;
        scenario.validate()?;
        Ok(scenario)
    }

    fn validate(&self) -> Result<(), String> {
        if self.agents == 0 {
            return Err("a scenario needs at least one agent".into());
        }
        let skew = self.clock_skew.unwrap_or_default();
        if self.grant_ttl.is_some_and(|ttl| ttl < Duration::from_secs(1) || ttl <= 2 * skew) {
            return Err(format!(
                "grant_ttl must be at least 1s and longer than twice clock_skew ({skew:?}): a seal must outlive the \
                 disagreement between the control plane's and the provider host's clocks"
            ));
        }
        if !self.clock_drift.is_none_or(|d| (0.0..=0.1).contains(&d)) {
            return Err("clock_drift must be in [0, 0.1]: fencing assumes clock rates within 20% of each other".into());
        }
        let registry = self.registry.then(|| crate::REGISTRY.to_string());
        let bus = self.messaging.then(|| crate::BUS.to_string());
        if self.provider_hosts > 3 {
            return Err(format!("provider_hosts = {}: at most 3", self.provider_hosts));
        }
        let kv_hosts = (1..=self.provider_hosts).map(crate::kv_host);
        let hosts: BTreeSet<String> = std::iter::once(crate::CONTROL_PLANE.to_string())
            .chain(registry)
            .chain(bus)
            .chain(kv_hosts)
            .chain(
                self.http
                    .then(|| [crate::web::WEB.to_string(), crate::web::INTRANET.to_string()])
                    .into_iter()
                    .flatten(),
            )
            .chain((1..=self.agents).map(crate::agent_name))
            .collect();
        let host = |h: &Option<String>, field: &str, step: &Step| match h {
            Some(h) if hosts.contains(h) => Ok(()),
            other => Err(format!(
                "step at {:?} ({:?}) needs `{field}` naming one of {hosts:?}, got {other:?}",
                step.at, step.action
            )),
        };
        for step in &self.steps {
            if let Some(field) = step.stray_field() {
                return Err(format!("step at {:?} ({:?}) does not take `{field}`", step.at, step.action));
            }
            match step.action {
                Action::Start => {
                    let guest = step.guest.as_deref().unwrap_or("sleeper");
                    if fixtures::by_name(guest).is_none() {
                        return Err(format!("unknown guest {guest:?}"));
                    }
                    if let Some(p) = &step.policy {
                        p.parse::<PolicyType>().map_err(|e| e.message)?;
                    }
                    factum_proto::labels::parse_labels("constraint", step.constraints.iter().map(String::as_str))
                        .map_err(|e| format!("step at {:?} (start): {}", step.at, e.message))?;
                }
                Action::Crash
                | Action::Restart
                | Action::Recover
                | Action::Pause
                | Action::Resume
                | Action::Drain
                | Action::Undrain => host(&step.node, "node", step)?,
                Action::Partition | Action::Hold => {
                    host(&step.a, "a", step)?;
                    host(&step.b, "b", step)?;
                }
                Action::Drift => {
                    host(&step.node, "node", step)?;
                    if !step.rate.is_some_and(|r| (0.5..=2.0).contains(&r)) {
                        return Err(format!("step at {:?} (drift) needs `rate` in [0.5, 2]", step.at));
                    }
                }
                Action::Jump => {
                    host(&step.node, "node", step)?;
                    signed_seconds(step.by.as_deref().unwrap_or_default()).map_err(|e| {
                        format!("step at {:?} (jump) needs `by`, a duration like \"-30s\": {e}", step.at)
                    })?;
                }
                Action::Lossy if !step.rate.is_some_and(|r| r > 0.0 && r <= 1.0) => {
                    return Err(format!("step at {:?} (lossy) needs `rate` in (0, 1]", step.at));
                }
                Action::Grant | Action::Revoke if step.capability.is_none() => {
                    return Err(format!("step at {:?} ({:?}) needs `capability`", step.at, step.action));
                }
                Action::StopAll
                | Action::RemoveEnded
                | Action::Heal
                | Action::Grant
                | Action::Revoke
                | Action::Release
                | Action::Lossy
                | Action::Reliable => {}
            }
            if step.at > self.duration {
                return Err(format!("step at {:?} is after the end ({:?})", step.at, self.duration));
            }
        }
        let empty = invariants::View {
            control_plane: None,
            control_plane_incarnation: 0,
            agents: Default::default(),
            labels: Default::default(),
            registry_entries: None,
            paused: Default::default(),
            ago: Default::default(),
        };
        for check in self.always.iter().map(|a| &a.check).chain(self.eventually.iter().map(|e| &e.check)) {
            if let Err(e) = invariants::check(check, &empty) {
                if e.starts_with("unknown check") {
                    return Err(format!("{e}; known: {}", invariants::check_names().join(", ")));
                }
            }
        }
        Ok(())
    }

    /// The scenario as TOML, e.g. to save a shrunk failing swarm run.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot print scenario: {e}"))
    }

    /// A random scenario drawn from `seed` (swarm testing): starts of random guests and policies, crashes and
    /// restarts of agents and of the control plane, partitions and heals, at random times in the first part
    /// of the run; then everything is healed and restarted so the cluster can settle, and the settle checks
    /// (`facts_match_agents`, `registry_matches_agents`) must hold before the end.
    pub fn swarm(seed: u64, agents: usize, duration: Duration) -> Self {
        use rand_chacha::ChaCha8Rng;
        use rand_core::{RngCore, SeedableRng};
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5a4a);
        let mut pick = |n: u64| rng.next_u64() % n.max(1);
        // Half the runs have a registry: leases, fencing and rescheduling join the fault space.
        let registry = pick(2) == 0;
        // A third have a message bus, publishers and subscribers; drawn from a stream of its own, so the runs
        // without one are the same as before the bus existed.
        let messaging = ChaCha8Rng::seed_from_u64(seed ^ 0xb05).next_u64() % 3 == 0;
        // A quarter have web hosts and HTTP clients, drawn the same way.
        let http = ChaCha8Rng::seed_from_u64(seed ^ 0x3eb).next_u64() % 4 == 0;
        // A quarter send their KV calls to a provider host (and have a rogue caller try it), drawn the same way.
        let provider_host = ChaCha8Rng::seed_from_u64(seed ^ 0x4b05).next_u64() % 4 == 0;
        // Half of those have a second host (a stream of its own, so no other draw moves).
        let provider_hosts = match provider_host {
            true => 1 + (ChaCha8Rng::seed_from_u64(seed ^ 0x4b06).next_u64() % 2) as usize,
            false => 0,
        };
        let chaos_end = duration.saturating_sub(Duration::from_secs(15)).max(Duration::from_secs(2));
        let hosts: Vec<String> =
            std::iter::once(crate::CONTROL_PLANE.to_string()).chain((1..=agents).map(crate::agent_name)).collect();
        let blank = |at: Duration, action: Action| Step {
            at,
            action,
            instances: None,
            guest: None,
            policy: None,
            max_retries: None,
            backoff: None,
            capability: None,
            permissions: Vec::new(),
            node: None,
            a: None,
            b: None,
            rate: None,
            by: None,
            constraints: Vec::new(),
            must_succeed: false,
        };
        // Every host, etcd too (it keeps its data across a crash).
        let machines: Vec<String> = hosts
            .iter()
            .cloned()
            .chain(registry.then(|| crate::REGISTRY.to_string()))
            .chain(messaging.then(|| crate::BUS.to_string()))
            .chain(http.then(|| crate::web::WEB.to_string()))
            .chain((1..=provider_hosts).map(crate::kv_host))
            .collect();
        let mut steps = Vec::new();
        // Subscribers, publishers, HTTP clients and KV greeters from the start, so traffic is in flight when the
        // faults come.
        let web = ["http:request", "http:domain:web"];
        let workloads = [
            (messaging, "subscriber", "bus", &["msg:subscribe:greetings.*"][..]),
            (messaging, "publisher", "bus", &["msg:publish:greetings.*"][..]),
            (http, "http_getter", "web", &web[..]),
            (provider_host, "kv_greeter", "kv", &["kv:write"][..]),
            (provider_host, "kv_reader", "kv", &["kv:read"][..]),
        ];
        for (_, guest, capability, permissions) in workloads.into_iter().filter(|w| w.0) {
            let mut s = blank(Duration::from_millis(300), Action::Start);
            s.instances = Some(2);
            s.guest = Some(guest.into());
            s.policy = Some("always".into());
            // A subscriber is spent after three refused subscribes (a revoked grant), like kv_greeter. The
            // smallest backoff: a revoke can land late (API steps queue behind a start that waits out the
            // faults), and the whole doubling chain (0.1 + 0.2 + 0.4 s) must fit before the eventual deadline.
            s.max_retries = Some(3);
            s.capability = Some(capability.into());
            s.permissions = permissions.iter().map(|p| p.to_string()).collect();
            steps.push(s);
        }
        let events = 4 + pick(8);
        for _ in 0..events {
            // Chaos ends before the settle steps, which the shrinker keeps.
            let at = Duration::from_millis(500 + pick(chaos_end.as_millis().saturating_sub(1000) as u64));
            let step = match pick(12) {
                0..=2 => {
                    let mut s = blank(at, Action::Start);
                    s.instances = Some(1 + pick(5) as usize);
                    // (guest, capability, permission); "" for none.
                    let mut guests = vec![
                        ("sleeper", "", ""),
                        ("kv_greeter", "kv", "kv:write"),
                        ("trap", "", ""),
                        ("exit_clean", "", ""),
                        ("random_trap", "", ""),
                        ("remember", "", ""),
                        ("os_probe", "", ""),
                    ];
                    if messaging {
                        guests.push(("publisher", "bus", "msg:publish:greetings.*"));
                        guests.push(("subscriber", "bus", "msg:subscribe:greetings.*"));
                    }
                    let (guest, cap, permission) = nth(&guests, pick(guests.len() as u64));
                    s.guest = Some(guest.to_string());
                    s.policy = Some(nth(&["never", "always", "on_failure"], pick(3)).to_string());
                    s.max_retries = Some(pick(4) as u32);
                    if !cap.is_empty() {
                        s.capability = Some(cap.into());
                        s.permissions = vec![permission.into()];
                    }
                    s
                }
                3 => {
                    let mut s = blank(at, Action::Crash);
                    s.node = Some(nth(&machines, pick(machines.len() as u64)));
                    s
                }
                4 => {
                    let mut s = blank(at, Action::Restart);
                    s.node = Some(nth(&machines, pick(machines.len() as u64)));
                    s
                }
                5 | 6 => {
                    // Drop or hold: a link that loses everything, or one that delivers it all late.
                    let mut s = blank(at, if pick(2) == 0 { Action::Partition } else { Action::Hold });
                    // Between an agent and the control plane or etcd, or between the control plane and etcd.
                    let (a, b) = match registry.then(|| pick(3)) {
                        _ if messaging && pick(4) == 0 => {
                            (crate::BUS.to_string(), crate::agent_name(1 + pick(agents as u64) as usize))
                        }
                        _ if http && pick(4) == 0 => {
                            (crate::web::WEB.to_string(), crate::agent_name(1 + pick(agents as u64) as usize))
                        }
                        Some(0) => (crate::REGISTRY.to_string(), crate::agent_name(1 + pick(agents as u64) as usize)),
                        Some(1) => (crate::REGISTRY.to_string(), crate::CONTROL_PLANE.to_string()),
                        _ => (crate::CONTROL_PLANE.to_string(), crate::agent_name(1 + pick(agents as u64) as usize)),
                    };
                    (s.a, s.b) = (Some(a), Some(b));
                    s
                }
                7 => blank(at, Action::Release),
                8 => {
                    let mut s = blank(at, Action::Lossy);
                    s.rate = Some(nth(&[0.005, 0.02, 0.1], pick(3)));
                    s
                }
                9 => {
                    let mut s = blank(at, Action::Revoke);
                    let bus = messaging && pick(2) == 0;
                    let web = !bus && http && pick(2) == 0;
                    s.capability = Some(
                        if bus {
                            "bus"
                        } else if web {
                            "web"
                        } else {
                            "kv"
                        }
                        .into(),
                    );
                    s
                }
                10 => {
                    // A machine clock set forward or back up to 30 s, or running up to 10% fast or slow.
                    let host = nth(&machines, pick(machines.len() as u64));
                    if pick(2) == 0 {
                        let mut s = blank(at, Action::Jump);
                        s.by = Some(format!("{}{}s", nth(&["", "-"], pick(2)), 1 + pick(30)));
                        s.node = Some(host);
                        s
                    } else {
                        let mut s = blank(at, Action::Drift);
                        s.rate = Some(0.9 + pick(201) as f64 / 1_000.0);
                        s.node = Some(host);
                        s
                    }
                }
                _ => {
                    // A process frozen for up to 6 s: past the lease TTL, the failure detector, RPC deadlines.
                    let host = nth(&machines, pick(machines.len() as u64));
                    let mut resume =
                        blank((at + Duration::from_millis(200 + pick(6000))).min(chaos_end), Action::Resume);
                    resume.node = Some(host.clone());
                    steps.push(resume);
                    let mut s = blank(at, Action::Pause);
                    s.node = Some(host);
                    s
                }
            };
            steps.push(step);
        }
        // A quarter of the starts are constrained to one zone, drawn from a stream of their own so the other
        // runs are the same as before constraints existed.
        let mut zones = ChaCha8Rng::seed_from_u64(seed ^ 0x20e5);
        for step in steps.iter_mut().filter(|s| s.action == Action::Start && s.capability.is_none()) {
            if zones.next_u64() % 4 == 0 {
                step.constraints = vec![format!("zone={}", nth(&["a", "b"], zones.next_u64()))];
            }
        }
        // A quarter drain an agent mid-chaos, undrained once the cluster is whole again (a drained node of the
        // only zone some instances may run in would keep them from running); their own stream too.
        let mut drains = ChaCha8Rng::seed_from_u64(seed ^ 0xd4a1);
        if agents > 1 && drains.next_u64() % 4 == 0 {
            let node = crate::agent_name(1 + (drains.next_u64() % agents as u64) as usize);
            let at = Duration::from_millis(1_000 + drains.next_u64() % chaos_end.as_millis().max(1) as u64);
            let mut drain = blank(at.min(chaos_end), Action::Drain);
            drain.node = Some(node.clone());
            steps.push(drain);
            let mut undrain = blank(chaos_end + Duration::from_secs(1), Action::Undrain);
            undrain.node = Some(node);
            steps.push(undrain);
        }
        // A third remove what has ended, once or twice, drawn from a stream of their own so the other runs are
        // the same as before removal existed.
        let mut removals = ChaCha8Rng::seed_from_u64(seed ^ 0x4e4d);
        if removals.next_u64() % 3 == 0 {
            for _ in 0..1 + removals.next_u64() % 2 {
                let at = Duration::from_millis(1_000 + removals.next_u64() % chaos_end.as_millis().max(1) as u64);
                steps.push(blank(at.min(chaos_end), Action::RemoveEnded));
            }
        }
        // Settle: heal every partition and bring back every host that is down or frozen.
        steps.push(blank(chaos_end, Action::Heal));
        for host in &machines {
            let mut s = blank(chaos_end + Duration::from_millis(100), Action::Recover);
            s.node = Some(host.clone());
            steps.push(s);
        }
        // Liveness: once healed, the cluster takes new work.
        let mut probe = blank(duration.saturating_sub(Duration::from_secs(8)).max(chaos_end), Action::Start);
        probe.instances = Some(1);
        probe.policy = Some("always".into());
        probe.must_succeed = true;
        steps.push(probe);
        let by = duration.saturating_sub(Duration::from_secs(1));
        Scenario {
            name: format!("swarm {seed}"),
            agents,
            duration,
            steps,
            always: vec![
                Always { check: "single_placement".into() },
                Always { check: "registry_only_membership".into() },
            ],
            eventually: vec![
                Eventually { check: "facts_match_agents".into(), by },
                Eventually { check: "registry_matches_agents".into(), by },
                Eventually { check: "always_running".into(), by },
            ],
            buggify: true,
            max_latency: None,
            registry,
            // A third of the runs have hosts whose wall clocks disagree by up to 30 s.
            clock_skew: (pick(3) == 0).then(|| Duration::from_secs(30)),
            // A third of the runs have clocks running up to 10% fast or slow.
            clock_drift: (pick(3) == 0).then_some(0.1),
            // A quarter run wasmtime on even-numbered agents.
            wasmtime: pick(4) == 0,
            messaging,
            http,
            provider_hosts,
            // Longer than a run: the swarm's control-plane outages are as long as it likes, and its short-lived
            // greeters would use up their retries on refused calls. grant_renewal.toml has short seals.
            grant_ttl: None,
        }
    }

    /// Shrinks a scenario that fails from `seed`: drops one step at a time (keeping the settle steps) while the
    /// run still fails, until no single step can go. Returns the smallest failing scenario found.
    pub fn shrink(&self, seed: u64, backend: Backend) -> Scenario {
        self.shrink_with(&|| ClusterConfig { backend, ..ClusterConfig::new(seed, self.agents) })
    }

    /// [`Scenario::shrink`] under a cluster configuration of the caller's (e.g. with an injected bug).
    pub fn shrink_with(&self, config: &dyn Fn() -> ClusterConfig) -> Scenario {
        let mut current = self.clone();
        // The settle steps (heal, recover, the liveness probe) stay: without them a run fails for want of them.
        let settles = |s: &Step| matches!(s.action, Action::Heal | Action::Recover | Action::Undrain) || s.must_succeed;
        loop {
            let mut shrunk = false;
            for i in 0..current.steps.len() {
                if current.steps.get(i).is_none_or(settles) {
                    continue;
                }
                let mut candidate = current.clone();
                candidate.steps.remove(i);
                if run_with(&candidate, config()).is_err() {
                    current = candidate;
                    shrunk = true;
                    break;
                }
            }
            if !shrunk {
                return current;
            }
        }
    }

    fn last_step_at(&self) -> Duration {
        self.steps.iter().map(|s| s.at).max().unwrap_or_default()
    }
}

/// Runs the API steps of a scenario as a simulated client.
async fn drive_api(
    steps: Vec<Step>,
    seed: u64,
    duration: Duration,
    done: Arc<std::sync::atomic::AtomicBool>,
) -> Result<(), SimError> {
    let mut client = SimClient::connect(seed).await?;
    // One time base for the whole script, kept across reconnections (a new client has a new clock).
    let clock = client.env.clock.clone();
    let start = clock.now();
    let mut started: Vec<String> = Vec::new();
    for (index, step) in steps.iter().enumerate() {
        let elapsed = clock.now().saturating_sub(start);
        clock.sleep(step.at.saturating_sub(elapsed)).await;
        // A crashed or restarted control plane broke the old connection: dial again, as a real client would.
        if client.is_broken() || client.nodes().await.is_err() {
            client = SimClient::connect(seed).await?;
        }
        match step.action {
            Action::Start => {
                let wat = fixtures::ALL
                    .iter()
                    .find(|(n, _)| Some(*n) == step.guest.as_deref())
                    .map_or(fixtures::SLEEPER, |(_, w)| w);
                let policy_type =
                    step.policy.as_deref().map_or(Ok(PolicyType::Never), str::parse).map_err(|e| e.message)?;
                let policy =
                    RestartPolicy { policy_type, max_retries: step.max_retries, backoff_seconds: step.backoff };
                let caps: Vec<CapabilityGrant> = step
                    .capability
                    .iter()
                    .map(|c| CapabilityGrant { capability_id: c.clone(), permissions: step.permissions.clone() })
                    .collect();
                let constraints =
                    factum_proto::labels::parse_labels("constraint", step.constraints.iter().map(String::as_str))
                        .map_err(|e| e.message)?;
                for k in 0..step.instances.unwrap_or(1) {
                    if client.is_broken() {
                        client = SimClient::connect(seed).await?;
                    }
                    let id = format!("s{index}-{k}");
                    // Faults make some starts fail; what matters is that the facts stay true. A start that must
                    // succeed gets a few attempts (a start is idempotent by id), as a careful client would make.
                    let attempts = if step.must_succeed { START_ATTEMPTS } else { 1 };
                    for attempt in 1..=attempts {
                        match client.start_with(&id, wat, policy, caps.clone(), constraints.clone()).await {
                            Ok(_) => {
                                started.push(id.clone());
                                break;
                            }
                            Err(e) if attempt == attempts && step.must_succeed => {
                                return Err(
                                    format!("start of {id} failed {attempts} times in a healthy cluster: {e}").into()
                                );
                            }
                            Err(e) => tracing::debug!(%id, error = %e, "start failed"),
                        }
                        client.sleep(Duration::from_secs(1)).await;
                        if client.is_broken() {
                            client = SimClient::connect(seed).await?;
                        }
                    }
                }
            }
            Action::StopAll => {
                for id in &started {
                    if client.is_broken() {
                        client = SimClient::connect(seed).await?;
                    }
                    let _ = client.stop(id).await;
                }
            }
            Action::RemoveEnded => {
                let listed = match client.instances().await {
                    Ok(listed) => listed,
                    Err(e) => {
                        tracing::debug!(error = %e, "list failed; nothing removed");
                        Vec::new()
                    }
                };
                let ended = listed
                    .iter()
                    .filter(|m| m.status.is_terminal() && m.backoff_ms.is_none() && started.contains(&m.instance_id));
                for id in ended.map(|m| m.instance_id.clone()).collect::<Vec<_>>() {
                    if client.is_broken() {
                        client = SimClient::connect(seed).await?;
                    }
                    // Refused when a restart turned out pending, or lost to a fault: both are fine.
                    let result = client.call(client.cp.remove_instance(rpc::rpc_context(), id.clone())).await;
                    tracing::debug!(%id, ?result, "remove");
                }
            }
            Action::Drain | Action::Undrain => {
                let node = step.node.clone().unwrap_or_default();
                let drained = step.action == Action::Drain;
                // The mark lives on the agent, which may be down or cut off for a while: a few attempts.
                for _ in 0..START_ATTEMPTS {
                    if client.is_broken() {
                        client = SimClient::connect(seed).await?;
                    }
                    let result = client.call(client.cp.drain_node(rpc::rpc_context(), node.clone(), drained)).await;
                    tracing::debug!(%node, drained, ?result, "drain");
                    if matches!(result, Ok(Ok(_))) {
                        break;
                    }
                    client.sleep(Duration::from_secs(1)).await;
                }
            }
            Action::Grant | Action::Revoke => {
                let cap = step.capability.clone().unwrap_or_default();
                for id in &started {
                    if client.is_broken() {
                        client = SimClient::connect(seed).await?;
                    }
                    let result = if step.action == Action::Grant {
                        let call = client.cp.assign_capability(
                            rpc::rpc_context(),
                            id.clone(),
                            cap.clone(),
                            step.permissions.clone(),
                        );
                        client.call(call).await
                    } else {
                        client.call(client.cp.revoke_capability(rpc::rpc_context(), id.clone(), cap.clone())).await
                    };
                    if !matches!(result, Ok(Ok(()))) {
                        tracing::debug!(%id, ?result, "capability change failed");
                    }
                }
            }
            _ => {}
        }
    }
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let elapsed = clock.now().saturating_sub(start);
    clock.sleep(duration.saturating_sub(elapsed)).await;
    Ok(())
}

/// A failed run: what was violated, and the timeline that led there.
#[derive(Debug, Clone)]
pub struct Failure {
    /// Scenario, seed, simulated time and the violated check.
    pub message: String,
    /// The trace up to the failure.
    pub timeline: Vec<String>,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Runs `scenario` from `seed`: the control plane and agents as simulated hosts, API steps from a client, faults
/// from the driver, checks sampled every 50 ms. The error names the seed, the time and the violated check.
pub fn run(scenario: &Scenario, seed: u64) -> Result<Outcome, Failure> {
    run_on(scenario, seed, Backend::default())
}

/// [`run`] on the simulator `backend`.
pub fn run_on(scenario: &Scenario, seed: u64, backend: Backend) -> Result<Outcome, Failure> {
    run_with(scenario, ClusterConfig { backend, ..ClusterConfig::new(seed, scenario.agents) })
}

/// [`run`] with a cluster configuration of the caller's (its seed and agent count are used as given).
pub fn run_with(scenario: &Scenario, config: ClusterConfig) -> Result<Outcome, Failure> {
    config.backend.isolated(|| run_here(scenario, config))
}

fn run_here(scenario: &Scenario, mut config: ClusterConfig) -> Result<Outcome, Failure> {
    let seed = config.seed;
    config.agents = scenario.agents;
    config.registry = scenario.registry;
    config.duration = scenario.duration + Duration::from_secs(30);
    if scenario.buggify && config.faults.is_none() {
        config.faults = Some(Arc::new(crate::buggify::Buggify::new(seed)));
    }
    if let Some(max) = scenario.max_latency {
        config.latency.1 = max;
    }
    config.clock_skew = scenario.clock_skew.unwrap_or_default();
    config.clock_drift = scenario.clock_drift.unwrap_or_default();
    config.wasmtime = scenario.wasmtime;
    config.messaging = scenario.messaging;
    config.http = scenario.http;
    config.provider_hosts = scenario.provider_hosts;
    if let Some(ttl) = scenario.grant_ttl {
        config.control_plane.grant_ttl = ttl;
    }
    let monitor_on = config.monitor;
    let buggify = config.faults.clone();
    let trace = Arc::new(TraceLog::default());
    let observed = Arc::new(Observed::default());
    let mut sim = build_observed_cluster(&config, trace.clone(), observed.clone())
        .map_err(|e| Failure { message: format!("{} (seed {seed}): {e}", scenario.name), timeline: Vec::new() })?;
    let api_steps: Vec<Step> = sorted(scenario.steps.iter().filter(|s| !s.action.is_fault()).cloned().collect());
    let mut faults: Vec<Step> = sorted(scenario.steps.iter().filter(|s| s.action.is_fault()).cloned().collect());
    faults.reverse(); // pop() takes the earliest
    let duration = scenario.duration;
    let api_done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    sim.client("client", Box::pin(drive_api(api_steps, seed, duration, api_done.clone())));

    let fail = |at: Duration, what: String| Failure {
        message: format!("{} (seed {seed}) at {:.3}s: {what}", scenario.name, at.as_secs_f64()),
        timeline: trace.lines(),
    };
    let settle_from = scenario.last_step_at();
    let mut convergence = vec![Convergence::default(); scenario.eventually.len()];
    // The latest break of each eventually check, for the message when it never settles.
    let mut last_broken: Vec<Option<(Duration, String)>> = vec![None; scenario.eventually.len()];
    let mut network = Network::default();
    let mut monitor = crate::monitor::Monitor::default();
    let mut traced = 0;
    // When each event a liveness check watches was last seen.
    let watched = [factum_node_agent::trace_events::DELIVER, crate::web::SERVED, PROVIDED];
    let mut last_seen: std::collections::BTreeMap<&'static str, Duration> = Default::default();
    let mut crashed: BTreeSet<String> = BTreeSet::new();
    let mut next_sample = Duration::ZERO;
    let mut samples: u64 = 0;
    loop {
        let done = sim.step().map_err(|e| fail(sim.elapsed(), e))?;
        let now = sim.elapsed();
        let mut thawed = false;
        while faults.last().is_some_and(|f| f.at <= now) {
            let Some(step) = faults.pop() else { break };
            thawed |= matches!(step.action, Action::Resume | Action::Recover);
            inject(sim.as_mut(), &observed, &step, &mut network, &mut crashed);
            trace.record_driver(now, &format!("{:?} {}", step.action, describe(&step)));
        }
        // A host thawed this instant has not run yet: what it held when it froze is not what it does. It is
        // judged after its first step, once its overdue timers have fired (and fenced it if its lease lapsed).
        if now >= next_sample && !thawed {
            next_sample = now + SAMPLE_EVERY;
            let render = if samples.is_multiple_of(RENDER_MAPS_EVERY) { Render::Maps } else { Render::ModulesOnly };
            samples += 1;
            let mut view = observed.view_of(render);
            let fresh = trace.lines_from(traced);
            traced += fresh.len();
            for line in &fresh {
                // The provider host's answers count only when `ok`: it refuses the rogue whatever agents do.
                let counts = |e: &str, args: &[&str]| e != PROVIDED || args.get(1) == Some(&"ok");
                if let Some(event) = crate::trace::event_words(line)
                    .and_then(|(_, e, args)| watched.iter().find(|w| **w == e && counts(e, &args)))
                {
                    last_seen.insert(event, now);
                }
            }
            view.ago = last_seen.iter().map(|(event, at)| (*event, now.saturating_sub(*at))).collect();
            if monitor_on {
                monitor.observe(&view, &fresh).map_err(|e| fail(now, e))?;
            }
            for always in &scenario.always {
                invariants::check(&always.check, &view)
                    .map_err(|e| fail(now, format!("always {}: {e}", always.check)))?;
            }
            // From the last step on (the API steps done too, not only their start times), every eventually
            // check must settle and stay settled (see `convergence`).
            if now >= settle_from && api_done.load(std::sync::atomic::Ordering::SeqCst) {
                for ((eventually, state), last) in
                    scenario.eventually.iter().zip(convergence.iter_mut()).zip(last_broken.iter_mut())
                {
                    let breaks = invariants::breaks(&eventually.check, &view);
                    if let Some(b) = breaks.first() {
                        *last = Some((now, b.why.clone()));
                    }
                    state
                        .sample(now, &breaks)
                        .map_err(|e| fail(now, format!("eventually {}: {e}", eventually.check)))?;
                }
            }
        }
        for ((eventually, state), last) in scenario.eventually.iter().zip(&convergence).zip(&last_broken) {
            if !state.settled() && now > eventually.by {
                let why = if !api_done.load(std::sync::atomic::Ordering::SeqCst) {
                    "the scenario's API steps were still under way".to_string()
                } else if let Some((at, why)) = last {
                    format!("last broken at {:.3}s: {why}", at.as_secs_f64())
                } else {
                    format!("never sampled (the last step is at {settle_from:?})")
                };
                return Err(fail(
                    now,
                    format!("eventually {} by {:?} never settled; {why}", eventually.check, eventually.by),
                ));
            }
        }
        if done {
            break;
        }
    }
    let final_instances = observed.view().control_plane.map(|cp| cp.instances).unwrap_or_default();
    let coverage = buggify.map(|f| f.coverage()).unwrap_or_default();
    Ok(Outcome { trace_hash: trace.hash(), events: trace.len(), final_instances, timeline: trace.lines(), coverage })
}

fn sorted(mut steps: Vec<Step>) -> Vec<Step> {
    steps.sort_by_key(|s| s.at);
    steps
}

fn describe(step: &Step) -> String {
    let hosts = [&step.node, &step.a, &step.b].into_iter().filter_map(|h| h.as_deref());
    let rate = step.rate.map(|r| format!("rate={r}"));
    let by = step.by.as_ref().map(|b| format!("by={b}"));
    hosts.map(str::to_string).chain(rate).chain(by).collect::<Vec<_>>().join(" ")
}

/// The network faults in force, so `heal` and `release` can undo them.
#[derive(Default)]
struct Network {
    partitions: Vec<(String, String)>,
    holds: Vec<(String, String)>,
}

fn inject(
    sim: &mut dyn crate::World,
    observed: &Observed,
    step: &Step,
    network: &mut Network,
    crashed: &mut BTreeSet<String>,
) {
    // A crashed or restarted process is not a frozen one: its next incarnation starts thawed.
    let thaw = |node: &str| observed.pause(node, 0).resume();
    match step.action {
        Action::Crash => {
            if let Some(node) = &step.node {
                thaw(node);
                sim.crash(node.as_str());
                observed.crashed(node);
                crashed.insert(node.clone());
            }
        }
        Action::Restart => {
            if let Some(node) = &step.node {
                thaw(node);
                if !crashed.remove(node) {
                    observed.crashed(node);
                }
                sim.bounce(node.as_str());
            }
        }
        Action::Recover => {
            if let Some(node) = &step.node {
                thaw(node);
                if crashed.remove(node) {
                    sim.bounce(node.as_str());
                }
            }
        }
        Action::Pause => {
            if let Some(node) = &step.node {
                observed.pause(node, 0).pause();
            }
        }
        Action::Resume => {
            if let Some(node) = &step.node {
                thaw(node);
            }
        }
        Action::Partition => {
            if let (Some(a), Some(b)) = (&step.a, &step.b) {
                sim.partition(a.as_str(), b.as_str());
                network.partitions.push((a.clone(), b.clone()));
            }
        }
        Action::Hold => {
            if let (Some(a), Some(b)) = (&step.a, &step.b) {
                sim.hold(a.as_str(), b.as_str());
                network.holds.push((a.clone(), b.clone()));
            }
        }
        Action::Release => {
            for (a, b) in network.holds.drain(..) {
                sim.release(a.as_str(), b.as_str());
            }
        }
        Action::Drift => {
            if let Some(clock) = step.node.as_deref().and_then(|node| observed.clock(node)) {
                clock.set_rate(sim.elapsed(), step.rate.unwrap_or(1.0));
            }
        }
        Action::Jump => {
            if let Some(clock) = step.node.as_deref().and_then(|node| observed.clock(node)) {
                clock.step_wall(signed_seconds(step.by.as_deref().unwrap_or_default()).unwrap_or_default());
            }
        }
        Action::Lossy => sim.set_fail_rate(step.rate.unwrap_or_default()),
        Action::Reliable => sim.set_fail_rate(0.0),
        Action::Heal => {
            for (a, b) in network.partitions.drain(..) {
                sim.repair(a.as_str(), b.as_str());
            }
            for (a, b) in network.holds.drain(..) {
                sim.release(a.as_str(), b.as_str());
            }
            sim.set_fail_rate(0.0);
        }
        Action::Start
        | Action::StopAll
        | Action::RemoveEnded
        | Action::Grant
        | Action::Revoke
        | Action::Drain
        | Action::Undrain => {}
    }
}

/// Loads every `*.toml` under `dir`, sorted by file name.
pub fn load_dir(dir: &Path) -> Result<Vec<(String, Scenario)>, String> {
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| format!("cannot read {}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    paths.sort();
    paths.into_iter().map(|p| Scenario::load(&p).map(|s| (p.display().to_string(), s))).collect()
}
