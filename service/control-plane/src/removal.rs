//! Removing ended instances: on request (`RemoveInstance`, `factum rm`) and after the retention period. An
//! instance goes from its agent first and then from the maps here, its module's bytes with it once no other
//! instance uses them. A snapshot the agent took before the removal may still arrive and hold the instance;
//! a tombstone (the agent's snapshot number at removal) keeps it from being learned back. The same holds for
//! the ended copies a drain or a reschedule left on other nodes: until each is discarded there, its node's
//! snapshots hold it (swarm seed 9402395: a drained node's copy, its discard lost, relearned after removal).

use std::collections::BTreeMap;
use std::time::Duration;

use factum_env::rpc;
use factum_proto::{ErrorCode, ErrorResponse, InstanceFacts, NodeAgentClient, SnapshotMark};

use crate::{ControlPlane, InstanceRecord, State};

impl ControlPlane {
    /// RemoveInstance: forgets an ended instance (stopped, or crashed with no restart pending) on its node and
    /// here. INVALID_REQUEST while it runs, waits to restart or its node's word is unknown.
    pub async fn remove_instance(&self, instance_id: &str) -> Result<(), ErrorResponse> {
        self.remove(instance_id).await.map_err(|e| self.error(e))
    }

    async fn remove(&self, instance_id: &str) -> Result<(), ErrorResponse> {
        let placement = {
            let state = self.lock();
            let record =
                state.instances.get(instance_id).ok_or_else(|| ErrorResponse::instance_not_found(instance_id))?;
            ended(&state, instance_id).map_err(|why| {
                let status = record.metadata.status;
                ErrorResponse::invalid(format!(
                    "instance {instance_id} {why} ({status}): stop it before removing it (`factum rm --force` does both)"
                ))
            })?;
            (record.metadata.node_id.clone(), record.epoch)
        };
        let epoch = placement.1;
        let (node_id, client) = self.route(instance_id)?;
        let id = instance_id.to_string();
        let call = |c: NodeAgentClient| {
            let id = id.clone();
            async move { c.remove_instance_local(rpc::rpc_context(), id).await }
        };
        let removed_at = match self.call_agent_retrying(&node_id, client, "remove", call).await? {
            Ok(mark) => Some(mark),
            // Gone already (removed before, or the agent restarted since): nothing holds it there.
            Err(e) if e.error_code == ErrorCode::InstanceNotFound => None,
            Err(e) => return Err(e),
        };
        let mut state = self.lock();
        // Meanwhile the instance may have been placed anew (rescheduled, or started again under its id).
        let same = state.instances.get(instance_id).is_some_and(|r| (r.metadata.node_id.clone(), r.epoch) == placement);
        if !same || ended(&state, instance_id).is_err() {
            return Err(ErrorResponse::invalid(format!("instance {instance_id} was placed again while being removed")));
        }
        forget(&mut state, instance_id);
        if !self.inner.config.has_bug(crate::InjectedBug::NoTombstones) {
            let mut tombstone = Tombstone { epoch, nodes: BTreeMap::new() };
            if let Some(mark) = removed_at {
                tombstone.nodes.insert(node_id.clone(), Some(mark));
            }
            // Copies left elsewhere and not yet discarded: their discard goes on, screened meanwhile.
            let elsewhere = !self.inner.config.has_bug(crate::InjectedBug::TombstoneOnlyWhereRemoved);
            for (node, _) in state.stale_copies.keys().filter(|(_, id)| elsewhere && id == instance_id) {
                tombstone.nodes.insert(node.clone(), None);
            }
            if tombstone.kept() {
                state.removed.insert(instance_id.to_string(), tombstone);
            }
        }
        tracing::info!(instance_id, node = %node_id, "instance removed");
        self.inner.env.trace(|| format!("removed {instance_id}"));
        Ok(())
    }

    /// One retention pass: ended instances (no restart pending) older than the retention are removed, each
    /// on a task of its own. An instance's age counts from the first pass that saw it ended; a removal that
    /// fails is tried again a full retention later.
    pub(crate) fn expire_ended(&self) {
        let now = self.inner.env.clock.now();
        let retention = self.inner.config.retention;
        let mut expired = Vec::new();
        let mut state = self.lock();
        let State { instances, pending_starts, .. } = &mut *state;
        for (id, record) in instances.iter_mut() {
            let is_ended = ended_record(record, pending_starts.contains(id)).is_ok();
            match (is_ended, record.ended_since) {
                (false, _) => record.ended_since = None,
                (true, None) => record.ended_since = Some(now),
                (true, Some(since)) if now.saturating_sub(since) >= retention => {
                    record.ended_since = None;
                    expired.push(id.clone());
                }
                (true, Some(_)) => {}
            }
        }
        drop(state);
        for id in expired {
            let cp = self.clone();
            self.inner.env.spawn(async move {
                if let Err(e) = cp.remove(&id).await {
                    tracing::warn!(instance_id = %id, error = %e, "could not remove an instance past its retention");
                }
            });
        }
    }
}

/// Whether the instance ended for good as far as this control plane knows: stopped or crashed, with no restart
/// pending on its node (a backoff) or here (a reschedule or a start in flight). If not, why not.
fn ended(state: &State, instance_id: &str) -> Result<(), &'static str> {
    match state.instances.get(instance_id) {
        Some(record) => ended_record(record, state.pending_starts.contains(instance_id)),
        None => Ok(()),
    }
}

fn ended_record(record: &InstanceRecord, start_in_flight: bool) -> Result<(), &'static str> {
    if !record.metadata.status.is_terminal() {
        return Err("has not ended");
    }
    if record.metadata.backoff_ms.is_some() || record.retry.is_some() || start_in_flight {
        return Err("waits to restart");
    }
    Ok(())
}

/// Drops an instance from the maps, and its module's bytes once no other instance uses them.
pub(crate) fn forget(state: &mut State, instance_id: &str) {
    let Some(record) = state.instances.remove(instance_id) else { return };
    state.capabilities.remove(instance_id);
    state.pending_starts.remove(instance_id);
    let hash = record.metadata.module_hash;
    if !state.instances.values().any(|r| r.metadata.module_hash == hash) {
        state.modules.remove(&hash);
    }
}

/// Where a removed instance may still show up in snapshots, so they do not bring it back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Tombstone {
    /// Placement epoch of the removed instance: a fact of an older one, from any node, is a stale copy.
    pub(crate) epoch: u64,
    /// Node → its snapshot number once it no longer held the instance (removed there, or its stale copy
    /// discarded); `None` while a stale copy there waits to be discarded. A snapshot postdating the number
    /// cannot hold the instance, so the node's entry goes with it; the tombstone goes with its last entry
    /// unless [`Tombstone::kept`] says otherwise.
    pub(crate) nodes: BTreeMap<String, Option<SnapshotMark>>,
}

impl Tombstone {
    /// Whether the tombstone is still needed. After a move (epoch above 1) an earlier placement's node may hold
    /// a copy nobody has heard of, in a snapshot still on its way: a node that crashed behind a partition and
    /// left (swarm seed 41004357: its snapshot from before the crash, held 18 s, brought the instance back
    /// after its removal). Such a tombstone stays until the id is used again or this control plane restarts.
    pub(crate) fn kept(&self) -> bool {
        !self.nodes.is_empty() || self.epoch > 1
    }

    /// Whether a fact of the removed instance in snapshot `mark` of `node_id` is one the removal left behind.
    fn holds(&self, node_id: &str, mark: SnapshotMark, facts: &InstanceFacts) -> bool {
        match self.nodes.get(node_id) {
            Some(Some(gone_at)) => mark.predates(*gone_at),
            Some(None) => true,
            None => facts.epoch < self.epoch,
        }
    }
}

/// What of `snapshot` (numbered `mark`, from `node_id`) may be applied: not the instances removed from that
/// node after it was taken, nor stale copies of removed instances (those are noted for discard). Tombstone
/// entries of that node that this snapshot postdates are dropped: no later snapshot of it holds their instance.
pub(crate) fn screen<'a>(
    state: &mut State,
    node_id: &str,
    mark: SnapshotMark,
    snapshot: &[&'a InstanceFacts],
) -> Vec<&'a InstanceFacts> {
    let by_epoch = state.injected != Some(crate::InjectedBug::TombstoneOnlyWhereRemoved);
    let mut kept = Vec::with_capacity(snapshot.len());
    for &facts in snapshot {
        let id = &facts.metadata.instance_id;
        let Some(tombstone) = state.removed.get_mut(id) else {
            kept.push(facts);
            continue;
        };
        if !tombstone.holds(node_id, mark, facts) || (!by_epoch && !tombstone.nodes.contains_key(node_id)) {
            kept.push(facts);
        } else if !tombstone.nodes.contains_key(node_id) {
            // A copy nobody knew of (its node was away when the instance moved): discard it too.
            tombstone.nodes.insert(node_id.to_string(), None);
            state.stale_copies.entry((node_id.to_string(), id.clone())).or_insert(false);
        }
    }
    state.removed.retain(|_, tombstone| {
        tombstone.nodes.retain(|node, gone_at| node != node_id || gone_at.is_none_or(|at| mark.predates(at)));
        tombstone.kept()
    });
    kept
}

/// Notes the ended copies in `snapshot` (from `node_id`) of instances whose current placement is elsewhere: a
/// drain stops an instance on its node before starting it on another, and what it leaves behind is a stale
/// fact to discard (see [`ControlPlane::discard_stale_copies`]). A copy that still runs is not touched: ending
/// it is fencing's work.
pub(crate) fn note_stale_copies(state: &mut State, node_id: &str, snapshot: &[&InstanceFacts]) {
    // Ended runs first: most of a snapshot runs, and looking each one up costs more than the rest of the check.
    for facts in snapshot.iter().filter(|f| f.metadata.status.is_terminal() && f.metadata.backoff_ms.is_none()) {
        let id = &facts.metadata.instance_id;
        let elsewhere = state.instances.get(id).is_some_and(|r| r.metadata.node_id != node_id && facts.epoch < r.epoch);
        if elsewhere {
            state.stale_copies.entry((node_id.to_string(), id.clone())).or_insert(false);
        }
    }
}

impl ControlPlane {
    /// Removes from `node_id` the stale copies noted for it and not already being removed, on a task of its
    /// own. One that fails stays noted as not in flight, for the node's next snapshot to try again.
    pub(crate) fn discard_stale_copies(&self, node_id: &str) {
        let ids: Vec<String> = self
            .lock()
            .stale_copies
            .iter_mut()
            .filter(|((node, _), in_flight)| node == node_id && !**in_flight)
            .map(|((_, id), in_flight)| {
                *in_flight = true;
                id.clone()
            })
            .collect();
        if ids.is_empty() {
            return;
        }
        let (cp, node_id) = (self.clone(), node_id.to_string());
        self.inner.env.spawn(async move {
            for id in ids {
                let key = (node_id.clone(), id.clone());
                let client = {
                    let state = cp.lock();
                    // Placed back on that node since: the copy there may be the current one.
                    if state.instances.get(&id).is_some_and(|r| r.metadata.node_id == node_id) {
                        None
                    } else {
                        Some(state.nodes.get(&node_id).and_then(|n| n.client.clone()))
                    }
                };
                let mut done = client.is_none();
                let mut result_mark = None;
                if let Some(client) = client {
                    let call = |c: NodeAgentClient| {
                        let id = id.clone();
                        async move { c.remove_instance_local(rpc::rpc_context(), id).await }
                    };
                    let result = cp.call_agent(&node_id, client, "discard a stale copy", call).await;
                    done = matches!(
                        &result,
                        Ok(Ok(_)) | Ok(Err(ErrorResponse { error_code: ErrorCode::InstanceNotFound, .. }))
                    );
                    result_mark = result.ok().and_then(|r| r.ok());
                    cp.inner.env.trace(|| format!("discard {id} on {node_id}: {}", if done { "ok" } else { "failed" }));
                }
                let mut state = cp.lock();
                if done {
                    state.stale_copies.remove(&key);
                    // Of a removed instance: the node's snapshots from now on cannot hold it.
                    if let Some(tombstone) = state.removed.get_mut(&id) {
                        match result_mark {
                            Some(mark) => tombstone.nodes.insert(node_id.clone(), Some(mark)),
                            None => tombstone.nodes.remove(&node_id),
                        };
                        if !tombstone.kept() {
                            state.removed.remove(&id);
                        }
                    }
                } else if let Some(in_flight) = state.stale_copies.get_mut(&key) {
                    *in_flight = false;
                }
            }
        });
    }
}

/// How long ended instances are kept by default.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(3600);
