//! A rogue caller of the KV provider host (P17): it reaches the host's port like an agent and claims any node's
//! identity (in simulation an identity is a claim; in production mTLS binds it), and it holds real seals, as a
//! thief would, but never a call's rightful combination. Every call it makes must be refused, which is what
//! the host's seal check and its sealed permissions are for, and a seal that has expired (one stolen long
//! ago, or of a grant the control plane stopped renewing) is worth nothing. Each call is traced as
//! `rogue <how> <claimed node> <outcome>`, and the monitor fails a run in which one succeeds.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use factum_env::{Env, MachineClock};
use factum_proto::{CapabilityAssignment, CapabilityInvocation, GrantKey, KvOperation, Principal};
use factum_providers::RemoteProvider;

use crate::Observed;

/// Trace event of one rogue call.
pub const ROGUE: &str = "rogue";

/// The ways a rogue call bends a stolen grant; each must be refused.
const HOW: [&str; 6] = ["operation", "widened", "node", "instance", "forged", "expired"];

/// What the rogue has stolen, and what it knows of the cluster's clocks.
pub struct Loot {
    /// Stands for seals the rogue stole: it seals only what the control plane itself has sealed for some node.
    pub key: GrantKey,
    /// How long the control plane's seals last.
    pub ttl: Duration,
    /// The provider host's machine clock: an expired seal must be expired on it, however skewed, drifting or
    /// stepped.
    pub host_clock: Arc<MachineClock>,
}

/// The largest step of a machine's wall clock a fault makes (the swarm's `jump` is up to 30 s): one may land
/// while a call is in flight and set the host's clock back by that much.
const LARGEST_JUMP: Duration = Duration::from_secs(31);

/// Calls the provider host at `addr` every few hundred milliseconds with a bent grant, forever. The rogue's own
/// clock is the simulation's true time.
pub async fn run(env: Env, observed: Arc<Observed>, loot: Loot, addr: String, provider: Principal) {
    let mut callers: BTreeMap<String, RemoteProvider> = BTreeMap::new();
    loop {
        env.clock.sleep(Duration::from_millis(200 + env.rng.next_u64() % 500)).await;
        let Some((assignment, node, others)) = victim(&env, &observed) else { continue };
        let how = HOW.get((env.rng.next_u64() % HOW.len() as u64) as usize).copied().unwrap_or("forged");
        // As the control plane would have sealed it a moment ago.
        let mut grant = loot.key.seal(&assignment, &node, env.wall_ms() + millis(loot.ttl));
        let mut claimed = node.clone();
        let mut invocation = kv_call(&env, &assignment, &grant.permissions);
        match how {
            // The stolen grant as it is, from its own node, for an operation it does not allow.
            "operation" => match forbidden_operation(&grant.permissions) {
                Some(op) => invocation = with_operation(invocation, op),
                None => continue,
            },
            "widened" => match missing_permission(&grant.permissions) {
                Some(perm) => grant.permissions.push(perm.to_string()),
                None => continue,
            },
            "node" => {
                claimed = others.get((env.rng.next_u64() % others.len() as u64) as usize).cloned().unwrap_or_default()
            }
            "instance" => invocation.instance_id = format!("{}-not", invocation.instance_id),
            "expired" => {
                // Expired on the host's clock now, by more than a step back while the call is in flight. (The
                // rogue started with the run, so its monotonic clock is the run's simulated time.)
                let host_now = loot.host_clock.wall_at(env.clock.now());
                let host_ms = millis(host_now.duration_since(std::time::UNIX_EPOCH).unwrap_or_default());
                let last = env.rng.next_u64() % 2_000; // how long before that it expired
                grant = loot.key.seal(&assignment, &node, host_ms.saturating_sub(millis(LARGEST_JUMP) + last));
            }
            _ => {
                let guess: Vec<u8> =
                    [env.rng.next_u64(), env.rng.next_u64()].iter().flat_map(|x| x.to_le_bytes()).collect();
                grant.seal.tag = guess.try_into().unwrap_or_default();
                grant.permissions = ["kv:read", "kv:write", "kv:delete"].map(String::from).to_vec();
                invocation = kv_call(&env, &assignment, &grant.permissions);
            }
        }
        let caller = callers.entry(claimed.clone()).or_insert_with(|| {
            let as_node = env.clone().with_principal(Principal::Node(claimed.clone()));
            RemoteProvider::new(as_node, addr.clone(), provider.clone(), Duration::from_secs(2))
        });
        let response = caller.invoke(invocation, grant).await;
        let outcome = response.error_code().map_or_else(|| "ok".to_string(), |code| format!("{code:?}"));
        env.trace(|| format!("{ROGUE} {how} {claimed} {outcome}"));
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A KV grant the control plane holds now, the node of its instance, and the other nodes (plus one nobody
/// runs) to claim instead.
fn victim(env: &Env, observed: &Observed) -> Option<(CapabilityAssignment, String, Vec<String>)> {
    let view = observed.view_of(crate::Render::ModulesOnly);
    let cp = view.control_plane?;
    let held: Vec<(CapabilityAssignment, String)> = cp
        .instances
        .iter()
        .filter(|m| !m.node_id.is_empty())
        .flat_map(|m| {
            let grants = cp.capabilities.get(&m.instance_id).cloned().unwrap_or_default();
            grants
                .into_iter()
                .filter(|a| a.permissions.iter().any(|p| p.starts_with("kv:")))
                .map(|a| (a, m.node_id.clone()))
        })
        .collect();
    if held.is_empty() {
        return None;
    }
    let (assignment, node) = held.get((env.rng.next_u64() % held.len() as u64) as usize)?.clone();
    let others = view.agents.keys().filter(|n| **n != node).cloned().chain(["rogue".to_string()]).collect();
    Some((assignment, node, others))
}

/// A KV call through `assignment`'s capability that `permissions` allow (a read if they allow nothing).
fn kv_call(env: &Env, assignment: &CapabilityAssignment, permissions: &[String]) -> CapabilityInvocation {
    let key = format!("rogue-{}", env.rng.next_u64() % 4);
    let op = if permissions.iter().any(|p| p == "kv:write") {
        KvOperation::Set { key, value: b"rogue".to_vec() }
    } else if permissions.iter().any(|p| p == "kv:delete") {
        KvOperation::Delete { key }
    } else {
        KvOperation::Get { key }
    };
    let (operation, params) = op.encode();
    CapabilityInvocation {
        instance_id: assignment.instance_id.clone(),
        capability_id: assignment.capability_id.clone(),
        operation,
        params,
    }
}

/// `invocation` doing `op` instead.
fn with_operation(invocation: CapabilityInvocation, op: KvOperation) -> CapabilityInvocation {
    let (operation, params) = op.encode();
    CapabilityInvocation { operation, params, ..invocation }
}

/// A KV operation `permissions` do not allow, if there is one.
fn forbidden_operation(permissions: &[String]) -> Option<KvOperation> {
    let has = |p: &str| permissions.iter().any(|g| g == p);
    let key = "rogue-0".to_string();
    if !has("kv:write") {
        Some(KvOperation::Set { key, value: b"rogue".to_vec() })
    } else if !has("kv:delete") {
        Some(KvOperation::Delete { key })
    } else if !has("kv:read") {
        Some(KvOperation::Get { key })
    } else {
        None
    }
}

/// A KV permission `permissions` lack, if there is one.
fn missing_permission(permissions: &[String]) -> Option<&'static str> {
    ["kv:write", "kv:delete", "kv:read"].into_iter().find(|p| !permissions.iter().any(|g| g == p))
}
