//! Rescheduling: the reschedulable instances of a node that left (or re-registered under a new lease) start on
//! another node under the next placement epoch, and a placement that did not take is tried again, with a
//! backoff, until the instance runs, its retries are spent, or it is stopped (P12).
//!
//! Every placement counts as a restart, and the count travels with the instance, so `max_retries` bounds
//! restarts across the cluster (P8).

use std::time::Duration;

use futures::StreamExt;

use factum_proto::{
    ErrorCode, ErrorResponse, InstanceFacts, InstanceStatus, NodeAgentClient, PolicyType, StartInstanceRequest,
};

use crate::{facts, place, ControlPlane, InstanceRecord, State};

/// Why an instance waits for another placement attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Retry {
    /// No node took it, or the node chosen refused the start: nothing runs it, so place it again, anywhere.
    Place,
    /// The node chosen did not answer: it may run it. Until that node answers or leaves, only that node may
    /// have it, so the same start (same epoch, idempotent) is sent there again; the instance stays a pending
    /// start meanwhile, so a snapshot that raced the start cannot declare it lost.
    Resend,
    /// Its node answered that it does not hold it (the agent restarted, or fenced it): nothing runs it, and
    /// that node is where it was placed, so start it there again, under a new epoch, as one more restart.
    Restart,
}

/// What became of the node whose instances [`ControlPlane::reschedule_from`] looks at, which decides which of
/// them may run elsewhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Lost {
    /// Its lease ended: it fenced, or will before the lease is gone, so nothing reschedulable runs there.
    Left,
    /// It registered again under this lease: what was placed under an older one no longer runs there.
    Rejoined(i64),
    /// It is still a member as far as anyone knows (no registry decides membership, so nothing fences it even
    /// when its reports stop): only placements that did not take may go elsewhere.
    Present,
}

/// Longest wait between two attempts to place one instance.
const MAX_PLACEMENT_BACKOFF: Duration = Duration::from_secs(10);

/// Most starts one pass of rescheduling or retries has in flight at once: enough that a slow node does not
/// serialise the rest, few enough that a node lost with many instances does not open that many calls at once.
const STARTS_IN_FLIGHT: usize = 32;

impl ControlPlane {
    /// Starts the instances of node `lost` that may run elsewhere (see [`Lost`]) on other nodes, each under the
    /// next placement epoch. Every placement is chosen at once, under one lock (so each sees the ones before
    /// it), and the starts go out together: one slow start (a big module's compile) must not hold back the
    /// rest (seed 28000596 of nodes_return: four instances, three slow starts in a row, missed the deadline).
    /// An instance that cannot be placed keeps its status with the reason in `last_error`, and is retried.
    pub(crate) async fn reschedule_from(self, lost: String, scope: Lost) {
        let starts: Vec<_> = {
            let mut guard = self.lock();
            let state = &mut *guard;
            let candidates: Vec<String> = state
                .instances
                .values()
                .filter(|r| reschedulable(r, &lost, scope))
                .map(|r| r.metadata.instance_id.clone())
                .collect();
            let now = self.inner.env.clock.now();
            candidates
                .into_iter()
                .filter_map(|instance_id| match self.prepare_reschedule(state, &instance_id, &lost, scope) {
                    Ok(Some((node_id, client, request))) => {
                        let epoch = request.epoch;
                        tracing::info!(%instance_id, from = %lost, to = %node_id, epoch, "rescheduling");
                        self.inner.env.trace(|| format!("reschedule {instance_id} {lost}->{node_id} epoch={epoch}"));
                        Some((instance_id, node_id, client, request))
                    }
                    Ok(None) => None,
                    Err(reason) => {
                        tracing::warn!(%instance_id, node = %lost, %reason, "cannot reschedule");
                        if let Some(record) = state.instances.get_mut(&instance_id) {
                            record.metadata.last_error = Some(format!("cannot reschedule from {lost}: {reason}"));
                            retry_later(record, now, Retry::Place);
                        }
                        None
                    }
                })
                .collect()
        };
        futures::stream::iter(starts)
            .for_each_concurrent(STARTS_IN_FLIGHT, |(instance_id, node_id, client, request)| {
                let cp = &self;
                async move {
                    let epoch = request.epoch;
                    let result = cp.call_start(&node_id, client, request).await;
                    cp.settle(&instance_id, &node_id, epoch, result);
                }
            })
            .await;
    }

    /// Retries every placement whose backoff has passed: places again what nothing runs, asks again the node
    /// that did not answer, and starts again what a node lost. Run by the failure detector's timer and on every
    /// membership change.
    pub(crate) async fn retry_reschedules(self) {
        if self.inner.config.has_bug(crate::InjectedBug::NoPlacementRetries)
            || self.inner.retrying.swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            return; // one pass at a time
        }
        let now = self.inner.env.clock.now();
        let due: Vec<(Retry, String, String, Lost)> = {
            let state = self.lock();
            state
                .instances
                .values()
                .filter_map(|r| r.retry.filter(|(at, _)| *at <= now).map(|(_, why)| (r, why)))
                .map(|(r, why)| {
                    let node = r.metadata.node_id.clone();
                    // Without a registry no node ever leaves (seed 23000735 of drain_remove_lossy rescheduled
                    // an instance off a node that had only missed heartbeats, and it ran on two nodes).
                    let lease = state.nodes.get(&node).filter(|n| n.registered).and_then(|n| n.lease);
                    let scope = match (state.registry_mode, lease) {
                        (false, _) if !self.inner.config.has_bug(crate::InjectedBug::RescheduleLiveNodes) => {
                            Lost::Present
                        }
                        (_, Some(lease)) => Lost::Rejoined(lease),
                        (_, None) => Lost::Left,
                    };
                    (why, r.metadata.instance_id.clone(), node, scope)
                })
                .collect()
        };
        let origins: std::collections::BTreeSet<(String, Lost)> = due
            .iter()
            .filter(|(why, ..)| *why == Retry::Place)
            .map(|(_, _, node, scope)| (node.clone(), *scope))
            .collect();
        for (node, scope) in origins {
            self.clone().reschedule_from(node, scope).await;
        }
        futures::stream::iter(&due)
            .for_each_concurrent(STARTS_IN_FLIGHT, |(why, instance_id, ..)| {
                let cp = &self;
                async move {
                    match why {
                        Retry::Resend => cp.resend(instance_id).await,
                        Retry::Restart => cp.restart_in_place(instance_id).await,
                        Retry::Place => {}
                    }
                }
            })
            .await;
        self.inner.retrying.store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// A node joined, or came back under a new lease: what could not be placed may fit now. Every placement
    /// waiting out its backoff is tried at once and its backoff starts over; one that waited out a long outage
    /// (10 s apart by then) would otherwise wait that long again after the cluster healed.
    pub(crate) fn retry_placements_now(&self) {
        let now = self.inner.env.clock.now();
        for record in self.lock().instances.values_mut() {
            record.placement_failures = 0;
            if let Some((at, Retry::Place)) = &mut record.retry {
                *at = now;
            }
        }
    }

    /// Sends the start of an in-doubt placement to its node again.
    async fn resend(&self, instance_id: &str) {
        let prepared = {
            let mut guard = self.lock();
            let state = &mut *guard;
            let Some(record) = state.instances.get_mut(instance_id) else { return };
            if record.retry.is_none_or(|(_, why)| why != Retry::Resend) {
                return;
            }
            let node_id = record.metadata.node_id.clone();
            let node = state.nodes.get(&node_id).filter(|n| n.registered && n.lease == record.lease);
            if node.is_none() {
                // The node's lease ended since: the placement is dead, place the instance anew.
                record.retry = Some((Duration::ZERO, Retry::Place));
                state.pending_starts.remove(instance_id);
                return;
            }
            let client = node.and_then(|n| n.client.clone());
            let now_ms = self.inner.env.wall_ms();
            state.instances.get(instance_id).and_then(|r| start_request(state, r, now_ms)).map(|r| (node_id, client, r))
        };
        let Some((node_id, client, request)) = prepared else { return };
        let epoch = request.epoch;
        self.inner.env.trace(|| format!("resend {instance_id} {node_id} epoch={epoch}"));
        let result = self.call_start(&node_id, client, request).await;
        self.settle(instance_id, &node_id, epoch, result);
    }

    /// Records the outcome of a (re)scheduled start of placement `epoch` on `node_id`.
    pub(crate) fn settle(
        &self,
        instance_id: &str,
        node_id: &str,
        epoch: u64,
        result: Result<InstanceFacts, ErrorResponse>,
    ) {
        let now = self.inner.env.clock.now();
        let mut guard = self.lock();
        let state = &mut *guard;
        let Some(record) = state.instances.get_mut(instance_id).filter(|r| r.epoch == epoch) else {
            return; // moved on meanwhile: what is pending now is another placement's
        };
        state.pending_starts.remove(instance_id);
        match result {
            Ok(facts) => {
                record.placement_failures = 0;
                record.retry = None;
                facts::apply_facts(state, node_id, &facts, true, true);
            }
            // The answer was lost, but the node has already reported facts of this placement: it took.
            Err(e) if e.error_code == ErrorCode::CommunicationFailure && record.seq > 0 => {
                record.placement_failures = 0;
                record.retry = None;
            }
            Err(_) if self.inner.config.has_bug(crate::InjectedBug::ForgetFailedReschedules) => {
                state.instances.remove(instance_id);
            }
            Err(e) => {
                record.metadata.last_error = Some(format!("rescheduling to {node_id} failed: {}", e.message));
                let alive = state.nodes.get(node_id).is_some_and(|n| n.registered && n.lease == record.lease);
                if e.error_code == ErrorCode::CommunicationFailure && alive {
                    record.metadata.status = InstanceStatus::Unknown;
                    retry_later(record, now, Retry::Resend);
                    state.pending_starts.insert(instance_id.to_string());
                } else if e.error_code == ErrorCode::CommunicationFailure {
                    // The node's lease ended meanwhile: whatever it started under it, it fenced.
                    record.metadata.status = InstanceStatus::Unknown;
                    retry_later(record, now, Retry::Place);
                } else {
                    record.metadata.status = InstanceStatus::Crashed;
                    retry_later(record, now, Retry::Place);
                }
            }
        }
    }

    /// Moves the record to a new node and epoch; `Ok(None)` if it no longer needs rescheduling.
    #[allow(clippy::type_complexity)]
    fn prepare_reschedule(
        &self,
        state: &mut State,
        instance_id: &str,
        lost: &str,
        scope: Lost,
    ) -> Result<Option<(String, Option<NodeAgentClient>, StartInstanceRequest)>, String> {
        let Some(record) = state.instances.get(instance_id) else { return Ok(None) };
        // A start still in flight to the lost node does not hold it back: that node can no longer run it.
        if !reschedulable(record, lost, scope) {
            return Ok(None); // stopped, moved or out of retries meanwhile
        }
        // But the node may be back by now, and the instance placed on it again under its new lease (by another
        // pass, since the one that listed it as lost): that placement is live, not lost.
        let live = state.nodes.get(lost).is_some_and(|n| n.available && n.registered && n.lease == record.lease);
        if live && record.retry.is_none_or(|(_, why)| why != Retry::Place) {
            return Ok(None);
        }
        if !state.modules.contains_key(&record.metadata.module_hash) {
            return Err("the control plane no longer has its module bytes".into());
        }
        let constraints = if self.inner.config.has_bug(crate::InjectedBug::RescheduleIgnoresConstraints) {
            factum_proto::Labels::new()
        } else {
            record.constraints.clone()
        };
        let node_id = place(state, &constraints).map_err(|e: ErrorResponse| e.message)?;
        Ok(begin_placement(state, instance_id, &node_id, self.inner.env.wall_ms())
            .map(|(client, request)| (node_id, client, request)))
    }

    /// Starts an instance its node lost on that node again (see [`Retry::Restart`]).
    async fn restart_in_place(&self, instance_id: &str) {
        let prepared = {
            let mut state = self.lock();
            let Some(record) = state.instances.get(instance_id) else { return };
            let node_id = record.metadata.node_id.clone();
            let wanted = record.retry.is_some_and(|(_, why)| why == Retry::Restart)
                && !state.pending_starts.contains(instance_id)
                && restartable(record);
            let node_up = state.nodes.get(&node_id).is_some_and(|n| n.available && n.registered);
            if wanted && state.nodes.get(&node_id).is_some_and(|n| n.drained) {
                // Its node takes nothing new: place it anew, elsewhere.
                if let Some(record) = state.instances.get_mut(instance_id) {
                    record.retry = Some((Duration::ZERO, Retry::Place));
                }
                return;
            }
            if !wanted || !node_up {
                return; // stopped, out of retries or placed meanwhile; or wait for the node
            }
            let placed = begin_placement(&mut state, instance_id, &node_id, self.inner.env.wall_ms());
            if placed.is_none() {
                if let Some(record) = state.instances.get_mut(instance_id) {
                    record.retry = None;
                    record.metadata.last_error =
                        Some("lost, and the control plane has no module bytes to run it".into());
                }
            }
            placed.map(|(client, request)| (node_id, client, request))
        };
        let Some((node_id, client, request)) = prepared else { return };
        let epoch = request.epoch;
        self.inner.env.trace(|| format!("restart {instance_id} on {node_id} epoch={epoch}"));
        let result = self.call_start(&node_id, client, request).await;
        self.settle(instance_id, &node_id, epoch, result);
    }
}

/// Moves the record to a new placement on `node_id` (next epoch, one more restart) and marks its start
/// pending; the start to send, or `None` without module bytes.
pub(crate) fn begin_placement(
    state: &mut State,
    instance_id: &str,
    node_id: &str,
    now_ms: u64,
) -> Option<(Option<NodeAgentClient>, StartInstanceRequest)> {
    if !state.instances.get(instance_id).is_some_and(|r| state.modules.contains_key(&r.metadata.module_hash)) {
        return None;
    }
    let client = state.nodes.get(node_id).and_then(|n| n.client.clone());
    let node_lease = state.nodes.get(node_id).and_then(|n| n.lease);
    let record = state.instances.get_mut(instance_id)?;
    record.epoch += 1;
    record.lease = node_lease;
    record.seq = 0;
    record.caps_seq = 0;
    record.retry = None;
    record.accepted_after = None;
    record.reported = false;
    record.metadata.node_id = node_id.to_string();
    record.metadata.status = InstanceStatus::Starting;
    record.metadata.restarts = record.metadata.restarts.saturating_add(1);
    let request = state.instances.get(instance_id).and_then(|r| start_request(state, r, now_ms))?;
    state.pending_starts.insert(instance_id.to_string());
    Some((client, request))
}

/// The start of `record`'s current placement, as its node must receive it at wall-clock `now_ms`, by module hash
/// (`None` if the control plane lacks the module's bytes).
fn start_request(state: &State, record: &InstanceRecord, now_ms: u64) -> Option<StartInstanceRequest> {
    let id = &record.metadata.instance_id;
    Some(StartInstanceRequest {
        instance_id: id.clone(),
        // Filled in by `call_start` if the node does not hold the module.
        module_bytes: Vec::new(),
        module_hash: state.modules.get_key_value(&record.metadata.module_hash)?.0.clone(),
        capabilities: state.capabilities.get(id).map(|c| c.values().cloned().collect()).unwrap_or_default(),
        grant_seals: state.grants.seals(
            &record.metadata.node_id,
            state.capabilities.get(id).into_iter().flat_map(|c| c.values()),
            now_ms,
        ),
        restart_policy: record.restart_policy,
        config: record.config.clone(),
        constraints: record.constraints.clone(),
        epoch: record.epoch,
        node_lease: record.lease,
        restarts: record.metadata.restarts,
        seal: state.placement_key.seal(id, &record.metadata.node_id, record.epoch),
    })
}

/// The node left: nothing it may run is in doubt any more (it fenced, or will before its lease ends), so its
/// in-doubt placements are released for rescheduling.
pub(crate) fn release_in_doubt(state: &mut State, node_id: &str) {
    for record in state.instances.values_mut().filter(|r| r.metadata.node_id == node_id) {
        if record.retry.is_some_and(|(_, why)| why == Retry::Resend) {
            record.retry = None;
            state.pending_starts.remove(&record.metadata.instance_id);
        }
    }
}

/// Whether an instance of the lost node should run elsewhere: its policy restarts it after a failure (losing
/// the node is one), it has retries left, and nobody stopped it. A `crashed` instance qualifies too: the node
/// may have fenced it (its snapshot then lacked it) just before its lease expired, or it was waiting out a
/// restart backoff there. So does one whose last placement did not take.
fn reschedulable(record: &InstanceRecord, lost: &str, scope: Lost) -> bool {
    let not_taken = record.retry.is_some_and(|(_, why)| why == Retry::Place);
    record.metadata.node_id == lost
        && match scope {
            Lost::Left => true,
            Lost::Rejoined(lease) => record.lease != Some(lease) || not_taken,
            Lost::Present => not_taken,
        }
        && restartable(record)
}

/// Whether losing the instance's run calls for another: its policy restarts after a failure, it has retries
/// left, and nobody stopped it.
pub(crate) fn restartable(record: &InstanceRecord) -> bool {
    record.restart_policy.policy_type != PolicyType::Never
        && record.metadata.status != InstanceStatus::Stopped
        && record.restart_policy.should_restart(true, record.metadata.restarts)
}

/// A placement attempt did not take: try again after a backoff that doubles per failure in a row.
fn retry_later(record: &mut InstanceRecord, now: Duration, why: Retry) {
    record.placement_failures = record.placement_failures.saturating_add(1);
    let backoff = Duration::from_millis(250).saturating_mul(1 << record.placement_failures.min(6));
    record.retry = Some((now + backoff.min(MAX_PLACEMENT_BACKOFF), why));
}
