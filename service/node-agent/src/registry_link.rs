//! The agent's registry membership: a lease with a TTL, kept alive every third of it, with this node's entry
//! attached. When the lease is lost the node fences itself before the control plane can reschedule its
//! instances elsewhere, so no instance runs on two nodes at once.
//!
//! Why the fence comes first: the lease was renewed at the registry no earlier than the renewal was sent, so
//! it cannot expire before `last successful send + TTL`. The agent fences at `last successful send + 4/5 TTL`
//! by its own clock, while the control plane only reschedules after it has seen the expiry. The agent does not
//! rely on this task's timer firing on time: the deadline is checked whenever the instance lock is taken.

use std::sync::Arc;
use std::time::Duration;

use factum_registry::{LeaseId, ProviderRecord, Registry, RegistryError};

use crate::Agent;

/// Keeps this node registered in `registry` for as long as the agent's runtime lives, re-registering under a
/// fresh lease after a loss and fencing (see [`Agent::fence`]) whenever the old lease may have expired.
///
/// Call it before the agent serves: from this call until the first registration the agent refuses starts,
/// because a control plane that still holds this node's previous registration must not place instances on a
/// new incarnation it has not seen register (it may be rescheduling them elsewhere).
pub fn run_registry_link(agent: Agent, registry: Arc<dyn Registry>) -> impl std::future::Future<Output = ()> {
    agent.inner.fenced.store(true, std::sync::atomic::Ordering::SeqCst);
    registry_link(agent, registry)
}

async fn registry_link(agent: Agent, registry: Arc<dyn Registry>) {
    let env = agent.inner.env.clone();
    let ttl = agent.inner.config.lease_ttl;
    let renew_every = ttl / 3;
    let fence_after = if agent.inner.config.has_bug(crate::AgentBug::FenceAtTtl) { ttl } else { ttl * 4 / 5 };
    let node = agent.registration();
    loop {
        let sent = env.clock.now();
        let lease = match register(&agent, &*registry, &node, ttl).await {
            Ok(lease) => lease,
            Err(e) => {
                tracing::warn!(node = %node.node_id, error = %e, "cannot register with the registry; retrying");
                env.clock.sleep(renew_every).await;
                continue;
            }
        };
        agent.registered(lease, sent + fence_after);
        tracing::info!(node = %node.node_id, lease, ?ttl, "registered");
        env.trace(|| format!("registered {} lease={lease}", node.node_id));
        let mut fence_at = sent + fence_after;
        loop {
            // Wake for the next renewal, or at the fence deadline if that comes first: neither a failed
            // renewal's wait nor one stuck in a partition may carry the node past it.
            let wake = (env.clock.now() + renew_every).min(fence_at);
            env.clock.sleep(wake.saturating_sub(env.clock.now())).await;
            let sent = env.clock.now();
            if sent >= fence_at {
                tracing::warn!(node = %node.node_id, lease, "lease not renewed in time");
                agent.fence();
                break;
            }
            let renewal = env.timeout(fence_at - sent, registry.keep_alive(lease)).await;
            let result = match &renewal {
                Some(Ok(())) => "ok",
                Some(Err(RegistryError::LeaseExpired(_))) => "expired",
                _ => "failed",
            };
            agent.inner.metrics.renewal(result);
            match renewal {
                Some(Ok(())) => {
                    fence_at = sent + fence_after;
                    if !agent.renewed(fence_at) {
                        break; // fenced meanwhile: what ran under this lease is gone, so take a new one
                    }
                }
                Some(Err(RegistryError::LeaseExpired(_))) => {
                    tracing::warn!(node = %node.node_id, lease, "registry lease expired");
                    agent.fence();
                    break;
                }
                Some(Err(e)) => tracing::warn!(node = %node.node_id, error = %e, "cannot renew the registry lease"),
                None => {}
            }
        }
    }
}

/// Takes a lease and writes this node's entry and its providers' metadata under it (P11: nothing else).
async fn register(
    agent: &Agent,
    registry: &dyn Registry,
    node: &factum_registry::NodeRegistration,
    ttl: Duration,
) -> Result<LeaseId, RegistryError> {
    let lease = registry.grant_lease(ttl).await?;
    let node = factum_registry::NodeRegistration { lease, ..node.clone() };
    if let Err(e) = registry.register_node(&node, lease).await {
        // Most often `Taken` after a crash: this node's previous lease still holds the entry until it expires.
        // The new lease holds nothing yet; ending it keeps one lease per node at the registry.
        let _ = registry.revoke_lease(lease).await;
        return Err(e);
    }
    for metadata in agent.providers() {
        let record = ProviderRecord {
            provider_id: format!("{}@{}", metadata.name, node.node_id),
            node_id: node.node_id.clone(),
            metadata,
            addr: None,
        };
        registry.put_provider(&record, Some(lease)).await?;
    }
    if agent.inner.config.has_bug(crate::AgentBug::InstancesInRegistry) {
        for (facts, metadata) in agent.snapshot().into_iter().zip(agent.providers().into_iter().cycle()) {
            let provider_id = facts.metadata.instance_id;
            let record = ProviderRecord { provider_id, node_id: node.node_id.clone(), metadata, addr: None };
            registry.put_provider(&record, Some(lease)).await?;
        }
    }
    Ok(lease)
}
