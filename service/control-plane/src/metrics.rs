//! The control plane's Prometheus metrics: its API calls (count, outcome, latency), the events it announces
//! (instances entering each status, restarts, reschedules, grants, removals, node membership), and, read from
//! its maps at each scrape, instances by status and nodes by state. Durations are on the env clock.

use std::sync::Weak;
use std::time::Duration;

use factum_proto::events::EventKind;
use factum_proto::{ErrorCode, InstanceStatus};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::Inner;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    method: String,
    /// `ok`, or the error code the caller got.
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    event: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: String,
}

/// API calls take from microseconds (a query) to seconds (a start compiling a large module): 50 µs × 4ⁿ up to
/// 13 s.
fn rpc_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.00005, 4.0, 10))
}

/// What the control plane counts. Cheap to clone: clones count into the same metrics.
#[derive(Clone)]
pub(crate) struct ControlPlaneMetrics {
    calls: Family<CallLabels, Counter>,
    call_seconds: Family<MethodLabels, Histogram, fn() -> Histogram>,
    events: Family<EventLabels, Counter>,
}

impl Default for ControlPlaneMetrics {
    fn default() -> Self {
        Self {
            calls: Family::default(),
            call_seconds: Family::new_with_constructor(rpc_histogram),
            events: Family::default(),
        }
    }
}

/// An event's metric label: `instance_<status>` for a status fact, else the kind (`rescheduled`, `granted`, …).
pub(crate) fn event_label(kind: &EventKind) -> String {
    match kind {
        EventKind::Instance { status, .. } => format!("instance_{status}"),
        EventKind::Rescheduled { .. } => "rescheduled".into(),
        EventKind::Granted { .. } => "granted".into(),
        EventKind::Revoked { .. } => "revoked".into(),
        EventKind::Removed { .. } => "removed".into(),
        EventKind::NodeJoined { .. } => "node_joined".into(),
        EventKind::NodeAvailable { .. } => "node_available".into(),
        EventKind::NodeUnavailable { .. } => "node_unavailable".into(),
        EventKind::NodeLeft { .. } => "node_left".into(),
        EventKind::NodeDrained { drained: true, .. } => "node_drained".into(),
        EventKind::NodeDrained { drained: false, .. } => "node_undrained".into(),
    }
}

impl ControlPlaneMetrics {
    /// An API call `method` ended with `error` (none: it succeeded) after `took`.
    pub(crate) fn call(&self, method: &str, error: Option<ErrorCode>, took: Duration) {
        let outcome = error.map_or("ok", ErrorCode::as_str).to_string();
        self.calls.get_or_create(&CallLabels { method: method.to_string(), outcome }).inc();
        self.call_seconds.get_or_create(&MethodLabels { method: method.to_string() }).observe(took.as_secs_f64());
    }

    /// An event was announced.
    pub(crate) fn event(&self, kind: &EventKind) {
        self.events.get_or_create(&EventLabels { event: event_label(kind) }).inc();
    }

    /// Registers every metric, and a collector reading the maps at each scrape, under `control_plane_`.
    pub(crate) fn register(&self, registry: &mut Registry, control_plane: Weak<Inner>) {
        let registry = registry.sub_registry_with_prefix("control_plane");
        registry.register(
            "rpc_requests",
            "API calls by method and outcome (ok or the error code returned)",
            self.calls.clone(),
        );
        registry.register(
            "rpc_duration_seconds",
            "API call latency by method, as the control plane served it",
            self.call_seconds.clone(),
        );
        registry.register(
            "events",
            "Events announced (factum events) by kind: instance_<status> for each status an instance entered",
            self.events.clone(),
        );
        registry.register_collector(Box::new(Maps(control_plane)));
    }
}

/// `instances{status}` and `nodes{state}`, read from the maps at the scrape.
struct Maps(Weak<Inner>);

impl std::fmt::Debug for Maps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Maps")
    }
}

impl Collector for Maps {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let instances = Family::<StatusLabels, Gauge>::default();
        let nodes = Family::<StateLabels, Gauge>::default();
        let statuses = [
            InstanceStatus::Starting,
            InstanceStatus::Running,
            InstanceStatus::Stopped,
            InstanceStatus::Crashed,
            InstanceStatus::Unknown,
        ];
        for status in statuses {
            let _ = instances.get_or_create(&StatusLabels { status: status.to_string() });
            // every one, zero or not
        }
        for state in ["available", "drained", "unavailable", "left"] {
            let _ = nodes.get_or_create(&StateLabels { state: state.into() });
        }
        if let Some(inner) = self.0.upgrade() {
            // The bare mutex: a scrape announces nothing and changes nothing.
            let state = inner.state.lock().unwrap_or_else(|p| p.into_inner());
            for record in state.instances.values() {
                instances.get_or_create(&StatusLabels { status: record.metadata.status.to_string() }).inc();
            }
            for node in state.nodes.values() {
                let label = match (node.registered, node.available, node.drained) {
                    (false, ..) => "left",
                    (true, true, false) => "available",
                    (true, true, true) => "drained",
                    (true, false, _) => "unavailable",
                };
                nodes.get_or_create(&StateLabels { state: label.into() }).inc();
            }
        }
        let metric =
            encoder.encode_descriptor("instances", "Instances known by status", None, instances.metric_type())?;
        instances.encode(metric)?;
        let metric = encoder.encode_descriptor("nodes", "Nodes by state", None, nodes.metric_type())?;
        nodes.encode(metric)
    }
}
