//! Invariant checkers: one named function per property, each returning what was violated.

use factum_proto::{InstanceMetadata, InstanceStatus};

/// Property 6 (placement): instances spread over `nodes` nodes differ by at most one per node.
pub fn placement_is_balanced(instances: &[InstanceMetadata], nodes: usize) -> Result<(), String> {
    let mut counts = std::collections::BTreeMap::new();
    for m in instances {
        *counts.entry(m.node_id.as_str()).or_insert(0usize) += 1;
    }
    let (min, max) = (counts.values().min().copied().unwrap_or(0), counts.values().max().copied().unwrap_or(0));
    if counts.len() != nodes || max - min > 1 {
        return Err(format!("placement unbalanced over {nodes} nodes: {counts:?}"));
    }
    Ok(())
}

/// Properties 12 and 14: once a node is declared failed, the control plane claims nothing about what it runs:
/// each of its instances that was not already stopped or crashed is `unknown`.
pub fn crashed_node_is_unknown(instances: &[InstanceMetadata], node: &str) -> Result<(), String> {
    let on_node: Vec<_> = instances.iter().filter(|m| m.node_id == node).collect();
    if on_node.is_empty() {
        return Err(format!("no instances on {node}"));
    }
    match on_node.iter().find(|m| !m.status.is_terminal() && m.status != InstanceStatus::Unknown) {
        Some(m) => Err(format!("{} on failed node {node} still reported {}", m.instance_id, m.status)),
        None => Ok(()),
    }
}

/// Property 12: instances on a healthy node keep running through another node's failure.
pub fn node_keeps_running(instances: &[InstanceMetadata], node: &str) -> Result<(), String> {
    let on_node: Vec<_> = instances.iter().filter(|m| m.node_id == node).collect();
    if on_node.is_empty() {
        return Err(format!("no instances on {node}"));
    }
    match on_node.iter().find(|m| m.status != InstanceStatus::Running) {
        Some(m) => Err(format!("{} on healthy node {node} is {}", m.instance_id, m.status)),
        None => Ok(()),
    }
}
