//! Membership from the registry: nodes join when their entry appears (the control plane then asks the agent
//! what it runs, which is how a restarted control plane rebuilds without waiting for heartbeats) and leave when
//! their lease expires (their instances become `unknown`, and reschedulable ones start elsewhere).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use factum_env::rpc;
use factum_proto::{NodeAgentClient, PolicyType, PROTOCOL_VERSION};
use factum_registry::{NodeRegistration, Registry};

use crate::{facts, ControlPlane, NodeRecord};

impl ControlPlane {
    /// Follows the registry's node list until the runtime ends. From the first call on, only nodes the registry
    /// lists get new instances.
    pub async fn run_membership(self, registry: Arc<dyn Registry>) {
        self.lock().registry_mode = true;
        let env = self.inner.env.clone();
        let mut revision = 0;
        let mut known: BTreeMap<String, NodeRegistration> = BTreeMap::new();
        loop {
            let membership = match registry.watch_membership(revision, self.inner.config.watch_wait).await {
                Ok(membership) => membership,
                Err(e) => {
                    // Without the registry nothing is known to have died: keep the current view.
                    tracing::warn!(error = %e, "cannot read node membership from the registry");
                    env.clock.sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            revision = membership.revision;
            let listed: BTreeMap<String, NodeRegistration> =
                membership.nodes.into_iter().map(|n| (n.node_id.clone(), n)).collect();
            let grew = listed.iter().any(|(node_id, registration)| known.get(node_id) != Some(registration));
            for (node_id, old) in &known {
                match listed.get(node_id) {
                    None => self.node_lost(node_id, true),
                    Some(new) if new != old => self.node_rejoined(new),
                    Some(_) => {}
                }
            }
            for (node_id, registration) in &listed {
                if !known.contains_key(node_id) {
                    self.node_joined(registration);
                }
            }
            known = listed;
            if grew && !self.inner.config.has_bug(crate::InjectedBug::BackoffAcrossJoins) {
                self.retry_placements_now();
            }
            // On every membership change, and at least every `watch_wait` (the watch's timeout) otherwise.
            if self.inner.config.reschedule {
                self.inner.env.spawn(self.clone().retry_reschedules());
            }
        }
    }

    /// The node registered under a new lease: it lost the old one (and fenced) or restarted, so nothing
    /// reschedulable placed under an older lease runs there any more, and none of it can start there (the
    /// agent refuses starts placed under another lease). Those are rescheduled; what was placed under the new
    /// lease stays.
    fn node_rejoined(&self, registration: &NodeRegistration) {
        self.node_lost(&registration.node_id, false);
        self.node_joined(registration);
        if self.inner.config.reschedule {
            let cp = self.clone();
            let (node_id, lease) = (registration.node_id.clone(), registration.lease);
            self.inner.env.spawn(cp.reschedule_from(node_id, crate::reschedule::Lost::Rejoined(lease)));
        }
    }

    fn node_joined(&self, registration: &NodeRegistration) {
        let node_id = registration.node_id.clone();
        if registration.protocol_version != PROTOCOL_VERSION {
            tracing::error!(node = %node_id, version = registration.protocol_version, "node speaks another protocol; ignored");
            return;
        }
        if factum_proto::validate_id("node_id", &node_id).is_err() {
            return;
        }
        tracing::info!(node = %node_id, addr = %registration.agent_addr, lease = registration.lease, "node joined");
        self.inner.env.trace(|| format!("node {node_id} joined lease={}", registration.lease));
        let now = self.inner.env.clock.now();
        {
            let mut state = self.lock();
            let node = state.nodes.entry(node_id.clone()).or_insert_with(|| NodeRecord {
                registered: true,
                lease: Some(registration.lease),
                ..NodeRecord::new(registration.agent_addr.clone(), registration.max_instances, now)
            });
            if node.agent_addr != registration.agent_addr {
                node.agent_addr = registration.agent_addr.clone();
                node.client = None;
            }
            node.max_instances = registration.max_instances;
            node.lease = Some(registration.lease);
            node.registered = true;
            node.available = true;
            node.last_seen = now;
        }
        self.inner.env.spawn(self.clone().sync_node(node_id));
    }

    fn node_lost(&self, node_id: &str, reschedule: bool) {
        tracing::warn!(node = node_id, "node left the registry (lease expired or revoked)");
        self.inner.env.trace(|| format!("node {node_id} left"));
        {
            let mut state = self.lock();
            if let Some(node) = state.nodes.get_mut(node_id) {
                node.registered = false;
                node.available = false;
                node.lease = None;
                node.client = None;
            }
            facts::mark_node_unknown(&mut state, node_id);
            crate::reschedule::release_in_doubt(&mut state, node_id);
            if self.inner.config.has_bug(crate::InjectedBug::ForgetLostNodes) {
                state.nodes.remove(node_id);
            }
        }
        if reschedule && self.inner.config.reschedule {
            self.inner.env.spawn(self.clone().reschedule_from(node_id.to_string(), crate::reschedule::Lost::Left));
        }
    }

    /// Asks a node what it runs and merges the answer (a rebuild that does not wait for its heartbeat; what the
    /// answer lacks is left to the heartbeat, see [`facts::merge_snapshot`]), then fetches the bytes of every
    /// reschedulable module the control plane lacks.
    async fn sync_node(self, node_id: String) {
        let client = self.lock().nodes.get(&node_id).and_then(|n| n.client.clone());
        let call = |c: NodeAgentClient| async move { c.list_local_instances(rpc::rpc_context()).await };
        let mut snapshot = match self.call_agent_retrying(&node_id, client, "instance listing", call).await {
            Ok(snapshot) => snapshot,
            Err(e) => {
                tracing::warn!(node = %node_id, error = %e, "cannot list the node's instances; waiting for its report");
                return;
            }
        };
        if snapshot.base.is_some() {
            tracing::warn!(node = %node_id, "the node answered a listing with a delta; waiting for its report");
            return;
        }
        let count = snapshot.instances.len();
        let missing = {
            let mut state = self.lock();
            let stale_ok = self.inner.config.has_bug(crate::InjectedBug::AcceptStaleSnapshots);
            let mark = factum_proto::SnapshotMark { boot: snapshot.boot, sequence: snapshot.sequence };
            let taken = match state.nodes.get_mut(&node_id).map(|node| node.snapshots.take_in(&mut snapshot)) {
                Some(Some(facts)) => Some(facts),
                None => None,
                Some(None) if stale_ok => None,
                Some(None) => {
                    // A heartbeat taken after this listing got here first.
                    self.inner.env.trace(|| format!("stale listing {node_id} seq={} ignored", snapshot.sequence));
                    return;
                }
            };
            let listed: Vec<&factum_proto::InstanceFacts> = match &taken {
                Some(facts) => facts.values().collect(),
                None => snapshot.instances.iter().collect(),
            };
            let learn = !self.inner.config.has_bug(crate::InjectedBug::NoRebuildFromSnapshots);
            facts::merge_snapshot(&mut state, &node_id, &listed, learn, facts::Source::Listing(mark));
            drop(listed);
            if let (Some(facts), Some(node)) = (taken, state.nodes.get_mut(&node_id)) {
                node.snapshots.keep(facts);
            }
            missing_modules(&mut state, &node_id)
        };
        self.inner.env.trace(|| format!("synced {node_id} instances={count} fetch_modules={}", missing.len()));
        self.fetch_modules(node_id, missing).await;
    }

    /// Fetches module bytes from the node that runs them (taken from [`missing_modules`]).
    pub(crate) async fn fetch_modules(self, node_id: String, hashes: Vec<String>) {
        for hash in hashes {
            let client = self.lock().nodes.get(&node_id).and_then(|n| n.client.clone());
            let wanted = hash.clone();
            let call = |c: NodeAgentClient| {
                let wanted = wanted.clone();
                async move { c.module_bytes(rpc::rpc_context(), wanted).await }
            };
            let result = self.call_agent_retrying(&node_id, client, "module fetch", call).await.and_then(|r| r);
            let mut state = self.lock();
            state.fetching.remove(&hash);
            match result {
                Ok(bytes) if factum_proto::module_hash(&bytes) == hash => {
                    state.modules.insert(hash, Arc::new(bytes));
                }
                Ok(_) => tracing::error!(node = %node_id, %hash, "node sent module bytes that do not match their hash"),
                Err(e) => tracing::warn!(node = %node_id, %hash, error = %e, "cannot fetch module bytes"),
            }
        }
    }
}

/// The modules of `node_id`'s `always`/`on_failure` instances the control plane lacks and is not already
/// fetching (it needs them to run those instances again), now marked as being fetched.
pub(crate) fn missing_modules(state: &mut crate::State, node_id: &str) -> Vec<String> {
    state.by_node.refresh(&mut state.instances);
    let missing: std::collections::BTreeSet<String> = state
        .by_node
        .held_by(node_id)
        .filter_map(|id| state.instances.get(id))
        .filter(|r| r.restart_policy.policy_type != PolicyType::Never)
        .map(|r| &r.metadata.module_hash)
        .filter(|hash| !state.modules.contains_key(*hash) && !state.fetching.contains(*hash))
        .cloned()
        .collect();
    state.fetching.extend(missing.iter().cloned());
    missing.into_iter().collect()
}
