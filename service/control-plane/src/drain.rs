//! Draining a node: it takes no new instances, and its instances that a failure would run again (restart
//! policy `always` or `on_failure`, retries left) move to other nodes. Each move stops the instance on the
//! drained node first and only then starts it elsewhere, under the next placement epoch, so it never runs
//! twice; the move counts as a restart, as every placement does. An instance under `never` stays where it is
//! until it ends: nothing may run it again.
//!
//! The drained mark lives on the agent (it refuses starts, and reports the mark in every snapshot), so a
//! control plane rebuilt after a restart knows it; an agent process that restarts comes back undrained.

use factum_env::rpc;
use factum_proto::{DrainReport, ErrorResponse, InstanceFacts, NodeAgentClient, PolicyType};

use crate::facts::apply_facts;
use crate::reschedule::{begin_placement, restartable};
use crate::{place, ControlPlane, InjectedBug};

impl ControlPlane {
    /// DrainNode (see [`factum_proto::ControlPlane::drain_node`]): marks `node_id` drained (or not) on its
    /// agent and here, then moves what it can. Safe to repeat: a second drain moves what the first left.
    ///
    /// The work runs on its own task: a caller that goes away must not leave an instance stopped on the
    /// drained node and not yet started on the other.
    pub async fn drain_node(&self, node_id: &str, drained: bool) -> Result<DrainReport, ErrorResponse> {
        let (cp, node_id) = (self.clone(), node_id.to_string());
        let result = self.inner.env.uncancellable(async move { cp.drain_inner(&node_id, drained).await }).await;
        let result = result.unwrap_or_else(|| Err(ErrorResponse::internal("the drain task ended early")));
        result.map_err(|e| self.error(e))
    }

    async fn drain_inner(&self, node_id: &str, drained: bool) -> Result<DrainReport, ErrorResponse> {
        {
            let client = {
                let state = self.lock();
                let node = state.nodes.get(node_id).ok_or_else(|| {
                    ErrorResponse::invalid(format!("no node {node_id:?} is known to the control plane"))
                        .with_detail("node_id", node_id)
                })?;
                node.client.clone()
            };
            let call = |c: NodeAgentClient| async move { c.set_drained(rpc::rpc_context(), drained).await };
            self.call_agent_retrying(node_id, client, "drain", call).await?;
            if let Some(node) = self.lock().nodes.get_mut(node_id) {
                node.drained = drained;
            }
            tracing::info!(node = node_id, drained, "drain");
            self.inner.env.trace(|| format!("drain {node_id} {drained}"));
            if !drained {
                // What waits for a node may fit there again.
                self.retry_placements_now();
                return Ok(DrainReport::default());
            }
            Ok(self.move_instances_from(node_id).await)
        }
    }

    /// Moves every movable instance of `from`, one at a time.
    async fn move_instances_from(&self, from: &str) -> DrainReport {
        let held: Vec<String> = {
            let state = self.lock();
            state
                .instances
                .values()
                .filter(|r| r.metadata.node_id == from)
                .map(|r| r.metadata.instance_id.clone())
                .collect()
        };
        let mut report = DrainReport::default();
        for instance_id in held {
            match self.move_instance(&instance_id, from).await {
                Ok(Some(to)) => report.moved.push((instance_id, to)),
                Ok(None) => {}
                Err(why) => report.stayed.push((instance_id, why)),
            }
        }
        report
    }

    /// Moves one instance off `from`: its new node, `None` if there is nothing to move (it ended, or moved or
    /// went meanwhile), or why it stays.
    async fn move_instance(&self, instance_id: &str, from: &str) -> Result<Option<String>, String> {
        let (epoch, to, from_client) = {
            let mut state = self.lock();
            let Some(record) = state.instances.get(instance_id).filter(|r| r.metadata.node_id == from) else {
                return Ok(None);
            };
            let active = !record.metadata.status.is_terminal() || record.metadata.backoff_ms.is_some();
            if record.restart_policy.policy_type == PolicyType::Never {
                return if active {
                    Err("its restart policy is never: it runs here until it ends".into())
                } else {
                    Ok(None)
                };
            }
            if !restartable(record) {
                return Ok(None); // stopped, or its retries are spent: nothing runs, nothing will
            }
            if state.moving.contains(instance_id) {
                return Err("another drain is moving it".into());
            }
            if state.pending_starts.contains(instance_id) || record.retry.is_some() {
                return Err("a placement of it is in flight; drain again once it has settled".into());
            }
            if !state.modules.contains_key(&record.metadata.module_hash) {
                return Err("the control plane does not hold its module yet (it restarted); drain again soon".into());
            }
            let (epoch, constraints) = (record.epoch, record.constraints.clone());
            let to = place(&mut state, &constraints).map_err(|e| e.message)?;
            state.moving.insert(instance_id.to_string());
            (epoch, to, state.nodes.get(from).and_then(|n| n.client.clone()))
        };
        if self.inner.config.has_bug(InjectedBug::DrainStartsFirst) {
            let started = self.start_moved(instance_id, from, epoch, &to, None).await;
            self.stop_on(instance_id, from, from_client, "stop for a drain").await.ok();
            return started;
        }
        let stopped = match self.stop_on(instance_id, from, from_client, "stop for a drain").await {
            Ok(facts) => facts,
            Err(e) => {
                self.lock().moving.remove(instance_id);
                return Err(format!("stopping it on {from} failed, so it runs there still: {}", e.message));
            }
        };
        self.start_moved(instance_id, from, epoch, &to, stopped).await
    }

    /// Places the instance stopped on `from` (placement `epoch`; `stopped`: its facts there after the stop) on
    /// `to` and starts it there, unless a user stopped it meanwhile, it moved on, or it has no retries left. A
    /// start that does not take is retried as any reschedule is.
    async fn start_moved(
        &self,
        instance_id: &str,
        from: &str,
        epoch: u64,
        to: &str,
        stopped: Option<InstanceFacts>,
    ) -> Result<Option<String>, String> {
        let prepared = {
            let mut state = self.lock();
            let wanted = state.moving.remove(instance_id);
            let unmoved =
                state.instances.get(instance_id).is_some_and(|r| r.epoch == epoch && r.metadata.node_id == from);
            if !wanted || !unmoved {
                return Ok(None); // stopped by a user, or rescheduled, or removed meanwhile
            }
            // The agent may have restarted it after the check above, using up its last retry (seed 19 of
            // drain_remove_lossy): its count after the stop decides, or the move would break P8.
            if let Some(facts) = stopped {
                apply_facts(&mut state, from, &facts, false, true);
            }
            let policy = state.instances.get(instance_id).map(|r| (r.restart_policy, r.metadata.restarts));
            if let Some((policy, restarts)) = policy.filter(|(p, n)| !p.should_restart(true, *n)) {
                let max = policy.max_retries.unwrap_or_default();
                return Err(format!(
                    "it restarted on {from} meanwhile and has used its retries ({restarts} of {max}): stopped there"
                ));
            }
            // What the stop left on `from` is now a stale copy: discarded below, not waiting for a snapshot
            // (which may be lost, and the instance removed meanwhile).
            if !self.inner.config.has_bug(InjectedBug::TombstoneOnlyWhereRemoved) {
                state.stale_copies.entry((from.to_string(), instance_id.to_string())).or_insert(false);
            }
            begin_placement(&mut state, instance_id, to, self.inner.env.wall_ms())
        };
        let Some((client, request)) = prepared else {
            return Err("the control plane no longer holds its module".into());
        };
        let new_epoch = request.epoch;
        self.inner.env.trace(|| format!("move {instance_id} {from}->{to} epoch={new_epoch}"));
        let result = self.call_start(to, client, request).await;
        let outcome = match &result {
            Ok(_) => Ok(Some(to.to_string())),
            Err(e) => Err(format!("starting it on {to} failed ({}); it will be placed again", e.message)),
        };
        self.settle(instance_id, to, new_epoch, result);
        self.discard_stale_copies(from);
        outcome
    }
}
