//! Membership from the registry: nodes join when their entry appears (the control plane then asks the agent
//! what it runs, which is how a restarted control plane rebuilds without waiting for heartbeats) and leave when
//! their lease expires (their instances become `unknown`, and reschedulable ones start elsewhere).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use factum_env::rpc;
use factum_proto::{
    ErrorCode, ErrorResponse, InstanceStatus, NodeAgentClient, PolicyType, StartInstanceRequest, PROTOCOL_VERSION,
};
use factum_registry::{NodeRegistration, Registry};

use crate::{facts, place, ControlPlane, NodeRecord};

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
            self.inner.env.spawn(cp.reschedule_from(node_id, Some(lease)));
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
                agent_addr: registration.agent_addr.clone(),
                max_instances: registration.max_instances,
                last_seen: now,
                available: true,
                registered: true,
                lease: Some(registration.lease),
                client: None,
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
        }
        if reschedule && self.inner.config.reschedule {
            self.inner.env.spawn(self.clone().reschedule_from(node_id.to_string(), None));
        }
    }

    /// Asks a node what it runs and merges the answer (a rebuild that does not wait for its heartbeat), then
    /// fetches the bytes of every reschedulable module the control plane lacks.
    async fn sync_node(self, node_id: String) {
        let client = self.lock().nodes.get(&node_id).and_then(|n| n.client.clone());
        let call = |c: NodeAgentClient| async move { c.list_local_instances(rpc::rpc_context()).await };
        let snapshot = match self.call_agent_retrying(&node_id, client, "instance listing", call).await {
            Ok(snapshot) => snapshot,
            Err(e) => {
                tracing::warn!(node = %node_id, error = %e, "cannot list the node's instances; waiting for its report");
                return;
            }
        };
        let count = snapshot.len();
        let missing: Vec<String> = {
            let mut state = self.lock();
            let learn = self.inner.config.injected_bug != Some(crate::InjectedBug::NoRebuildFromSnapshots);
            facts::merge_snapshot(&mut state, &node_id, snapshot, learn);
            let mut missing: Vec<String> = state
                .instances
                .values()
                .filter(|r| r.metadata.node_id == node_id && r.restart_policy.policy_type != PolicyType::Never)
                .map(|r| r.metadata.module_hash.clone())
                .filter(|hash| !state.modules.contains_key(hash))
                .collect();
            missing.dedup();
            missing
        };
        self.inner.env.trace(|| format!("synced {node_id} instances={count} fetch_modules={}", missing.len()));
        for hash in missing {
            let client = self.lock().nodes.get(&node_id).and_then(|n| n.client.clone());
            let wanted = hash.clone();
            let call = |c: NodeAgentClient| {
                let wanted = wanted.clone();
                async move { c.module_bytes(rpc::rpc_context(), wanted).await }
            };
            match self.call_agent_retrying(&node_id, client, "module fetch", call).await.and_then(|r| r) {
                Ok(bytes) if factum_proto::module_hash(&bytes) == hash => {
                    self.lock().modules.insert(hash, Arc::new(bytes));
                }
                Ok(_) => tracing::error!(node = %node_id, %hash, "node sent module bytes that do not match their hash"),
                Err(e) => tracing::warn!(node = %node_id, %hash, error = %e, "cannot fetch module bytes"),
            }
        }
    }

    /// Starts every reschedulable instance of a lost node on another node, one at a time, each under the next
    /// placement epoch, except those placed under `current_lease` (the node's new lease, if it re-registered).
    /// An instance that cannot be placed keeps its status with the reason in `last_error`.
    async fn reschedule_from(self, lost: String, current_lease: Option<i64>) {
        let candidates: Vec<String> = {
            let state = self.lock();
            state
                .instances
                .values()
                .filter(|r| reschedulable(r, &lost, current_lease))
                .map(|r| r.metadata.instance_id.clone())
                .collect()
        };
        for instance_id in candidates {
            let prepared = {
                let mut state = self.lock();
                self.prepare_reschedule(&mut state, &instance_id, &lost, current_lease)
            };
            let (node_id, client, request) = match prepared {
                Ok(Some(prepared)) => prepared,
                Ok(None) => continue,
                Err(reason) => {
                    tracing::warn!(%instance_id, node = %lost, %reason, "cannot reschedule");
                    if let Some(record) = self.lock().instances.get_mut(&instance_id) {
                        record.metadata.last_error = Some(format!("cannot reschedule from {lost}: {reason}"));
                    }
                    continue;
                }
            };
            let epoch = request.epoch;
            tracing::info!(%instance_id, from = %lost, to = %node_id, epoch, "rescheduling");
            self.inner.env.trace(|| format!("reschedule {instance_id} {lost}->{node_id} epoch={epoch}"));
            let result = self.call_start(&node_id, client, request).await;
            let mut state = self.lock();
            state.pending_starts.remove(&instance_id);
            match result {
                Ok(facts) => facts::apply_facts(&mut state, &node_id, facts, true, true),
                Err(e) => {
                    if let Some(record) = state.instances.get_mut(&instance_id).filter(|r| r.epoch == epoch) {
                        record.metadata.status = if e.error_code == ErrorCode::CommunicationFailure {
                            InstanceStatus::Unknown
                        } else {
                            InstanceStatus::Crashed
                        };
                        record.metadata.last_error = Some(format!("rescheduling to {node_id} failed: {}", e.message));
                    }
                }
            }
        }
    }

    /// Moves the record to a new node and epoch; `Ok(None)` if it no longer needs rescheduling.
    #[allow(clippy::type_complexity)]
    fn prepare_reschedule(
        &self,
        state: &mut crate::State,
        instance_id: &str,
        lost: &str,
        current_lease: Option<i64>,
    ) -> Result<Option<(String, Option<NodeAgentClient>, StartInstanceRequest)>, String> {
        let Some(record) = state.instances.get(instance_id) else { return Ok(None) };
        if !reschedulable(record, lost, current_lease) {
            return Ok(None); // stopped, moved or out of retries meanwhile
        }
        let bytes = state
            .modules
            .get(&record.metadata.module_hash)
            .cloned()
            .ok_or("the control plane no longer has its module bytes")?;
        let node_id = place(state).map_err(|e: ErrorResponse| e.message)?;
        let capabilities =
            state.capabilities.get(instance_id).map(|c| c.values().cloned().collect()).unwrap_or_default();
        let client = state.nodes.get(&node_id).and_then(|n| n.client.clone());
        let node_lease = state.nodes.get(&node_id).and_then(|n| n.lease);
        let Some(record) = state.instances.get_mut(instance_id) else { return Ok(None) };
        record.epoch += 1;
        record.lease = node_lease;
        record.seq = 0;
        record.caps_seq = 0;
        record.metadata.node_id = node_id.clone();
        record.metadata.status = InstanceStatus::Starting;
        record.metadata.restarts = record.metadata.restarts.saturating_add(1);
        let request = StartInstanceRequest {
            instance_id: instance_id.to_string(),
            module_bytes: bytes.to_vec(),
            capabilities,
            restart_policy: record.restart_policy,
            epoch: record.epoch,
            node_lease,
        };
        state.pending_starts.insert(instance_id.to_string());
        Ok(Some((node_id, client, request)))
    }
}

/// Whether an instance of the lost node should run elsewhere: its policy restarts it after a failure (losing
/// the node is one), it has retries left, and nobody stopped it. A `crashed` instance qualifies too: the node
/// may have fenced it (its snapshot then lacked it) just before its lease expired, or it was waiting out a
/// restart backoff there.
fn reschedulable(record: &crate::InstanceRecord, lost: &str, current_lease: Option<i64>) -> bool {
    record.metadata.node_id == lost
        && (current_lease.is_none() || record.lease != current_lease)
        && record.restart_policy.policy_type != PolicyType::Never
        && record.metadata.status != InstanceStatus::Stopped
        && record.restart_policy.should_restart(true, record.metadata.restarts)
}
