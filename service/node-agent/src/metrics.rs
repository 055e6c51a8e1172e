//! The agent's Prometheus metrics. Each counter is bumped where its fact happens; the instance gauge is read
//! from the instance map at each scrape, so it cannot drift from what the agent holds. Durations are measured
//! on the env clock, like everything else the agent times.

use std::borrow::Cow;
use std::sync::Weak;
use std::time::Duration;

use factum_proto::InstanceStatus;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::Inner;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    status: String,
}

// Static strings: a capability call is a hot path, and these labels cost it no allocation.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    provider: &'static str,
    /// `ok`, or the call's error code (`PERMISSION_DENIED` for a denial).
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProviderLabels {
    provider: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: String,
}

/// Capability calls take from microseconds (in-memory KV) to seconds (HTTP): 100 µs × 4ⁿ up to 6.6 s.
fn call_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 4.0, 9))
}

/// What the agent counts. Cheap to clone: clones count into the same metrics.
#[derive(Clone)]
pub(crate) struct AgentMetrics {
    transitions: Family<StatusLabels, Counter>,
    restarts: Counter,
    calls: Family<CallLabels, Counter>,
    call_seconds: Family<ProviderLabels, Histogram, fn() -> Histogram>,
    lease_renewals: Family<ResultLabels, Counter>,
    fences: Counter,
    fenced_instances: Counter,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self {
            transitions: Family::default(),
            restarts: Counter::default(),
            calls: Family::default(),
            call_seconds: Family::new_with_constructor(call_histogram),
            lease_renewals: Family::default(),
            fences: Counter::default(),
            fenced_instances: Counter::default(),
        }
    }
}

impl AgentMetrics {
    /// An instance entered `status` (every status fact the agent records).
    pub(crate) fn transition(&self, status: InstanceStatus) {
        self.transitions.get_or_create(&StatusLabels { status: status.to_string() }).inc();
    }

    /// A restart began (the policy chose to run the instance again).
    pub(crate) fn restarted(&self) {
        self.restarts.inc();
    }

    /// A capability call reached `provider` and ended with `outcome` after `took`.
    pub(crate) fn call(&self, provider: factum_proto::ProviderType, outcome: &'static str, took: Duration) {
        let provider = provider.as_str();
        self.calls.get_or_create(&CallLabels { provider, outcome }).inc();
        self.call_seconds.get_or_create(&ProviderLabels { provider }).observe(took.as_secs_f64());
    }

    /// A capability call named a capability the instance does not hold: denied before any provider (counted as
    /// provider `none`, with no latency: there was no call to time).
    pub(crate) fn ungranted_call(&self) {
        let outcome = factum_proto::ErrorCode::PermissionDenied.as_str();
        self.calls.get_or_create(&CallLabels { provider: "none", outcome }).inc();
    }

    /// A lease renewal was answered (`ok`), refused as expired (`expired`) or failed (`failed`).
    pub(crate) fn renewal(&self, result: &str) {
        self.lease_renewals.get_or_create(&ResultLabels { result: result.to_string() }).inc();
    }

    /// The node fenced itself, dropping `dropped` instances.
    pub(crate) fn fenced(&self, dropped: usize) {
        self.fences.inc();
        self.fenced_instances.inc_by(u64::try_from(dropped).unwrap_or(u64::MAX));
    }

    /// Registers every metric, and a collector reading `agent`'s instances at each scrape, under `agent_`
    /// with a `node` label.
    pub(crate) fn register(&self, registry: &mut Registry, node_id: &str, agent: Weak<Inner>) {
        let registry = registry
            .sub_registry_with_prefix("agent")
            .sub_registry_with_label((Cow::Borrowed("node"), Cow::Owned(node_id.to_string())));
        registry.register(
            "instance_transitions",
            "Status facts recorded, by the status entered",
            self.transitions.clone(),
        );
        registry.register("instance_restarts", "Restarts begun under a restart policy", self.restarts.clone());
        registry.register(
            "capability_calls",
            "Capability calls by provider and outcome (ok or the error code; PERMISSION_DENIED is a denial)",
            self.calls.clone(),
        );
        registry.register(
            "capability_call_duration_seconds",
            "Capability call latency by provider, from the grant check to the answer",
            self.call_seconds.clone(),
        );
        registry.register(
            "lease_renewals",
            "Registry lease renewals by result (ok, expired, failed)",
            self.lease_renewals.clone(),
        );
        registry.register("fences", "Times the node fenced itself after losing its lease", self.fences.clone());
        registry.register(
            "fenced_instances",
            "Instances dropped by fencing (the control plane reschedules them)",
            self.fenced_instances.clone(),
        );
        registry.register_collector(Box::new(Instances(agent)));
    }
}

/// `instances{status}`: what the agent holds now, read at the scrape.
struct Instances(Weak<Inner>);

impl std::fmt::Debug for Instances {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Instances")
    }
}

impl Collector for Instances {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let family = Family::<StatusLabels, Gauge>::default();
        for status in
            [InstanceStatus::Starting, InstanceStatus::Running, InstanceStatus::Stopped, InstanceStatus::Crashed]
        {
            let _ = family.get_or_create(&StatusLabels { status: status.to_string() });
            // every status, zero or not
        }
        if let Some(agent) = self.0.upgrade() {
            // Unfenced: a scrape must not change what it reads.
            for local in agent.lock_unfenced().values() {
                family.get_or_create(&StatusLabels { status: local.metadata.status.to_string() }).inc();
            }
        }
        let metric =
            encoder.encode_descriptor("instances", "Instances on this node by status", None, family.metric_type())?;
        family.encode(metric)
    }
}
