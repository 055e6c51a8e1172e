//! Invariant checkers: one named function per property, each returning what was violated. Scenario files
//! name them in `[[always]]` and `[[eventually]]` blocks (see [`check`]).

use std::collections::{BTreeMap, BTreeSet};

use factum_proto::{
    CapabilityAssignment, InstanceFacts, InstanceMetadata, InstanceStatus, NodeInfo, PolicyType, RestartPolicy,
};

use crate::convergence::Break;

/// What the control plane says.
#[derive(Debug, Clone)]
pub struct ControlPlaneView {
    /// ListInstances.
    pub instances: Vec<InstanceMetadata>,
    /// The capability registry, per instance.
    pub capabilities: BTreeMap<String, Vec<CapabilityAssignment>>,
    /// Nodes.
    pub nodes: Vec<NodeInfo>,
    /// Restart policy of every listed instance.
    pub policies: BTreeMap<String, RestartPolicy>,
    /// Placement epoch of each listed instance, and the sequence number of the agent fact its status comes from.
    pub fact_positions: BTreeMap<String, (u64, u64)>,
    /// Everything the control plane holds: its maps rendered with `Debug` (`None` in a view that skipped the
    /// rendering, see [`crate::Observed::view_of`]), and its module map (hash, bytes).
    pub held: (Option<String>, factum_control_plane::HeldModules),
}

/// The cluster at one moment: the control plane's view (if it is up) and the truth of every running agent.
#[derive(Debug, Clone)]
pub struct View {
    /// `None` while the control plane is down.
    pub control_plane: Option<ControlPlaneView>,
    /// Which start of the control plane this is (1 for the first); it changes on every restart.
    pub control_plane_incarnation: u64,
    /// Facts of every running agent, by node.
    pub agents: BTreeMap<String, Vec<InstanceFacts>>,
    /// Labels of every running agent, by node.
    pub labels: BTreeMap<String, factum_proto::Labels>,
    /// Every key of the simulated registry, when the cluster runs one and it is up.
    pub registry_entries: Option<Vec<(String, Vec<u8>)>>,
    /// Hosts frozen by a `pause` fault now.
    pub paused: BTreeSet<String>,
    /// How long ago each kind of traced event liveness checks watch was last seen (`deliver`: an instance
    /// was handed a message; `served`: a web host answered a request); filled in by the scenario runner.
    pub ago: BTreeMap<&'static str, std::time::Duration>,
}

/// A named check: the view and the argument after `name:` (empty without one) to what it finds broken, each
/// instance on its own for the checks that judge instances one by one, else the check as a whole.
type NamedCheck = fn(&View, &str) -> Vec<Break>;

/// Every check a scenario can name: (name, argument it takes, check). The one list [`check`] and [`breaks`]
/// dispatch on and error messages print, so they cannot drift apart.
pub const CHECKS: [(&str, &str, NamedCheck); 14] = [
    ("single_placement", "", |v, _| whole(single_placement(v))),
    ("facts_match_agents", "", |v, _| facts_breaks(v)),
    ("registry_matches_agents", "", |v, _| registry_breaks(v)),
    ("all_running", "", |v, _| whole(all_running(v))),
    ("no_unknown", "", |v, _| whole(no_unknown(v))),
    ("node_unknown", "<node>", |v, node| whole(node_unknown(v, node))),
    ("none_running", "", |v, _| whole(none_running(v))),
    ("restarts", "<n>", |v, n| whole(restarts(v, n))),
    ("registry_only_membership", "", |v, _| whole(registry_only_membership(v))),
    ("always_running", "", |v, _| always_running_breaks(v)),
    ("dead_nodes_unknown", "", |v, _| whole(dead_nodes_unknown(v))),
    ("messages_flow", "", |v, _| whole(flowing(v, factum_node_agent::trace_events::DELIVER, "message delivered"))),
    ("requests_flow", "", |v, _| whole(flowing(v, crate::web::SERVED, "HTTP request served"))),
    ("provider_host_answers", "", |v, _| {
        whole(flowing(v, factum_providers::remote::PROVIDED, "call answered `ok` by the provider host"))
    }),
];

/// A check judged as a whole: broken once, or not.
fn whole(result: Result<(), String>) -> Vec<Break> {
    result.err().map(Break::whole).into_iter().collect()
}

/// Runs the check named `spec` (`name` or `name:argument`) on `view`: the first thing it finds broken.
pub fn check(spec: &str, view: &View) -> Result<(), String> {
    first(breaks(spec, view))
}

/// What the check named `spec` finds broken in `view`, for [`crate::convergence`].
pub fn breaks(spec: &str, view: &View) -> Vec<Break> {
    let (name, arg) = spec.split_once(':').unwrap_or((spec, ""));
    match CHECKS.iter().find(|(n, ..)| *n == name) {
        Some((_, _, check)) => check(view, arg),
        None => vec![Break::whole(format!("unknown check {spec:?}"))],
    }
}

/// Every check name, as a scenario writes it (`node_unknown:<node>`).
pub fn check_names() -> Vec<String> {
    CHECKS
        .iter()
        .map(|(name, arg, _)| if arg.is_empty() { name.to_string() } else { format!("{name}:{arg}") })
        .collect()
}

/// Property 11: the registry holds node entries and provider metadata only: nothing lives outside `nodes/` and
/// `providers/`, and no key or value names an instance.
pub fn registry_only_membership(view: &View) -> Result<(), String> {
    let Some(entries) = &view.registry_entries else { return Ok(()) };
    let nodes = format!("{}/nodes/", crate::REGISTRY_PREFIX);
    let providers = format!("{}/providers/", crate::REGISTRY_PREFIX);
    if let Some((bad, _)) = entries.iter().find(|(k, _)| !k.starts_with(&nodes) && !k.starts_with(&providers)) {
        return Err(format!("registry holds {bad:?}, which is neither a node nor a provider"));
    }
    let instance_ids: BTreeSet<&str> =
        view.agents.values().flatten().map(|f| f.metadata.instance_id.as_str()).collect();
    for id in instance_ids {
        let last = format!("/{id}");
        if let Some((key, _)) = entries.iter().find(|(k, _)| k.ends_with(&last)) {
            return Err(format!("registry key {key:?} names instance {id}"));
        }
        let finder = memchr::memmem::Finder::new(id);
        if let Some((key, _)) = entries.iter().find(|(_, value)| finder.find(value).is_some()) {
            return Err(format!("registry value under {key:?} names instance {id}"));
        }
    }
    Ok(())
}

fn cp(view: &View) -> Result<&ControlPlaneView, String> {
    view.control_plane.as_ref().ok_or_else(|| "the control plane is down".to_string())
}

/// Safety: no instance id is starting or running on two nodes at once. A frozen (paused) agent runs nothing
/// while it is frozen; that it acts on nothing its lost lease covered once it thaws is P12's
/// `nodes_act_only_under_their_lease`.
pub fn single_placement(view: &View) -> Result<(), String> {
    let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
    for (node, facts) in view.agents.iter().filter(|(node, _)| !view.paused.contains(*node)) {
        for f in facts.iter().filter(|f| !f.metadata.status.is_terminal()) {
            if let Some(other) = seen.insert(&f.metadata.instance_id, node) {
                return Err(format!("{} is active on {other} and {node}", f.metadata.instance_id));
            }
        }
    }
    Ok(())
}

/// Properties 13 and 14: the control plane's facts are the agents' facts. Every instance a running agent holds
/// is listed with the same status and node, and every instance listed on a running agent's node exists there.
pub fn facts_match_agents(view: &View) -> Result<(), String> {
    first(facts_breaks(view))
}

/// [`facts_match_agents`], each instance on its own.
fn facts_breaks(view: &View) -> Vec<Break> {
    let cp = match cp(view) {
        Ok(cp) => cp,
        Err(why) => return vec![Break::whole(why)],
    };
    let listed: BTreeMap<&str, &InstanceMetadata> = cp.instances.iter().map(|m| (m.instance_id.as_str(), m)).collect();
    let mut breaks = Vec::new();
    for (node, facts) in &view.agents {
        for f in facts {
            let id = f.metadata.instance_id.as_str();
            match listed.get(id) {
                None => {
                    breaks.push(instance(id, format!("{id} runs on {node} but the control plane does not list it")))
                }
                Some(m) if m.node_id != *node || m.status != f.metadata.status => breaks.push(instance(
                    id,
                    format!(
                        "{id}: control plane says {} on {}, agent {node} says {}",
                        m.status, m.node_id, f.metadata.status
                    ),
                )),
                Some(_) => {}
            }
        }
        let held: BTreeSet<&str> = facts.iter().map(|f| f.metadata.instance_id.as_str()).collect();
        for m in cp.instances.iter().filter(|m| m.node_id == *node && !m.status.is_terminal()) {
            if !held.contains(m.instance_id.as_str()) {
                breaks.push(instance(
                    &m.instance_id,
                    format!("control plane says {} is {} on {node}, which does not hold it", m.instance_id, m.status),
                ));
            }
        }
    }
    breaks
}

/// Property 5: the control plane's capability registry equals what the agents enforce.
pub fn registry_matches_agents(view: &View) -> Result<(), String> {
    first(registry_breaks(view))
}

/// [`registry_matches_agents`], each instance on its own.
fn registry_breaks(view: &View) -> Vec<Break> {
    let cp = match cp(view) {
        Ok(cp) => cp,
        Err(why) => return vec![Break::whole(why)],
    };
    let mut breaks = Vec::new();
    for (node, facts) in &view.agents {
        for f in facts {
            let id = &f.metadata.instance_id;
            let registry = cp.capabilities.get(id).cloned().unwrap_or_default();
            if registry != f.capabilities {
                let why = format!("{id} on {node}: registry {registry:?}, agent enforces {:?}", f.capabilities);
                breaks.push(instance(id, why));
            }
        }
    }
    breaks
}

/// A break of one instance, repaired in the time any fact takes to travel.
fn instance(id: &str, why: String) -> Break {
    Break { subject: id.to_string(), why, grace: std::time::Duration::ZERO }
}

/// The first break, as a check's verdict.
fn first(breaks: Vec<Break>) -> Result<(), String> {
    breaks.into_iter().next().map_or(Ok(()), |b| Err(b.why))
}

/// Liveness: every listed instance is running.
pub fn all_running(view: &View) -> Result<(), String> {
    let cp = cp(view)?;
    if cp.instances.is_empty() {
        return Err("no instances listed".into());
    }
    match cp.instances.iter().find(|m| m.status != InstanceStatus::Running) {
        Some(m) => Err(format!("{} on {} is {}", m.instance_id, m.node_id, m.status)),
        None => Ok(()),
    }
}

/// Property 12, liveness: every instance with restart policy `always` whose retries are not spent, and that
/// nobody stopped, is running on a live node, including those whose node died (they must have been
/// rescheduled, and a reschedule that did not take must have been retried). Except one whose module bytes are
/// gone from the cluster: a restarted control plane holds only the bytes it fetched back from agents, so when
/// the one agent that had them dies first, nothing can run the instance again (the design keeps modules out of
/// etcd). A first control plane keeps the bytes of every such instance, so it gets no such pass. Each broken
/// instance is its own break, with the backoff its policy set as grace.
fn always_running_breaks(view: &View) -> Vec<Break> {
    let cp = match cp(view) {
        Ok(cp) => cp,
        Err(why) => return vec![Break::whole(why)],
    };
    let bytes_gone = |hash: &str| {
        view.control_plane_incarnation > 1
            && !cp.held.1.iter().any(|(held, _)| held == hash)
            && !view.agents.values().flatten().any(|f| f.metadata.module_hash == hash)
    };
    let always = cp.instances.iter().filter(|m| {
        cp.policies.get(&m.instance_id).is_some_and(|p| {
            p.policy_type == PolicyType::Always
                && p.should_restart(true, m.restarts)
                && m.status != InstanceStatus::Stopped
        }) && !bytes_gone(&m.module_hash)
    });
    let mut breaks = Vec::new();
    for m in always {
        let live = view.agents.get(&m.node_id).is_some_and(|facts| {
            facts
                .iter()
                .any(|f| f.metadata.instance_id == m.instance_id && f.metadata.status == InstanceStatus::Running)
        });
        if m.status != InstanceStatus::Running || !live {
            breaks.push(Break {
                subject: m.instance_id.clone(),
                why: format!("{} (policy always) is {} on {}", m.instance_id, m.status, m.node_id),
                grace: std::time::Duration::from_millis(m.backoff_ms.unwrap_or(0)),
            });
        }
    }
    breaks
}

/// Property 14 for nodes that are down: nothing the control plane lists on a node that is not running claims
/// to be `starting` or `running`; it is `unknown` (or ended).
pub fn dead_nodes_unknown(view: &View) -> Result<(), String> {
    let cp = cp(view)?;
    let claimed = cp.instances.iter().find(|m| {
        !view.agents.contains_key(&m.node_id) && matches!(m.status, InstanceStatus::Starting | InstanceStatus::Running)
    });
    match claimed {
        Some(m) => Err(format!("{} is {} on {}, which is down", m.instance_id, m.status, m.node_id)),
        None => Ok(()),
    }
}

/// After every node is back, nothing is `unknown`.
pub fn no_unknown(view: &View) -> Result<(), String> {
    match cp(view)?.instances.iter().find(|m| m.status == InstanceStatus::Unknown) {
        Some(m) => Err(format!("{} on {} is still unknown", m.instance_id, m.node_id)),
        None => Ok(()),
    }
}

/// Properties 12 and 14 through the control plane's eyes: every instance on `node` is `unknown` or terminal.
pub fn node_unknown(view: &View, node: &str) -> Result<(), String> {
    crashed_node_is_unknown(&cp(view)?.instances, node)
}

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

/// Liveness of messaging (`messages_flow`) or HTTP (`requests_flow`): `event` (a message handed to an
/// instance, a request a web host served) was seen within the last second. The `publisher` and
/// `http_getter` guests act every 200 and 300 ms, so a longer silence means their traffic stopped getting
/// through.
pub fn flowing(view: &View, event: &str, what: &str) -> Result<(), String> {
    match view.ago.get(event) {
        Some(ago) if *ago <= std::time::Duration::from_secs(1) => Ok(()),
        Some(ago) => Err(format!("no {what} for {:.1}s", ago.as_secs_f64())),
        None => Err(format!("no {what} ever")),
    }
}

/// Every listed instance has ended (stopped or crashed): e.g. guests whose capability was revoked.
pub fn none_running(view: &View) -> Result<(), String> {
    let cp = cp(view)?;
    if cp.instances.is_empty() {
        return Err("no instances listed".into());
    }
    match cp.instances.iter().find(|m| !m.status.is_terminal()) {
        Some(m) => Err(format!("{} on {} is {}", m.instance_id, m.node_id, m.status)),
        None => Ok(()),
    }
}

/// Property 8 at cluster scale: every listed instance ended after exactly `n` restarts.
pub fn restarts(view: &View, n: &str) -> Result<(), String> {
    let want: u32 = n.parse().map_err(|_| format!("restarts needs a number, got {n:?}"))?;
    none_running(view)?;
    match cp(view)?.instances.iter().find(|m| m.restarts != want) {
        Some(m) => Err(format!("{} restarted {} times, expected {want}", m.instance_id, m.restarts)),
        None => Ok(()),
    }
}

#[cfg(test)]
pub(crate) mod tests_support {
    use super::*;

    /// Metadata of instance `id` on agent-1 with `status`, for checker tests.
    pub(crate) fn metadata(id: &str, status: InstanceStatus) -> InstanceMetadata {
        InstanceMetadata {
            instance_id: id.into(),
            node_id: "agent-1".into(),
            module_hash: "h".into(),
            created_at: 0,
            status,
            restarts: 0,
            last_error: None,
            restart_streak: 0,
            backoff_ms: None,
        }
    }

    /// Facts of a running instance `id` on agent-1 in placement `epoch`, for checker tests.
    pub(crate) fn running(id: &str, epoch: u64) -> factum_proto::InstanceFacts {
        factum_proto::InstanceFacts {
            metadata: metadata(id, InstanceStatus::Running),
            capabilities: Vec::new(),
            restart_policy: Default::default(),
            config: Default::default(),
            constraints: Default::default(),
            seq: 1,
            epoch,
            lease: None,
            accepted_after: Default::default(),
            seal: Default::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_registry(entries: &[(&str, &str)]) -> View {
        View {
            control_plane: None,
            control_plane_incarnation: 1,
            agents: [("agent-1".to_string(), vec![tests_support::running("s0-1", 1)])].into_iter().collect(),
            labels: BTreeMap::new(),
            registry_entries: Some(entries.iter().map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())).collect()),
            paused: BTreeSet::new(),
            ago: BTreeMap::new(),
        }
    }

    #[test]
    fn p11_looks_at_keys_and_values() {
        let node = ("/factum/nodes/agent-1", r#"{"node_id":"agent-1","agent_addr":"agent-1:7700"}"#);
        registry_only_membership(&with_registry(&[node])).unwrap();
        let stray = ("/factum/instances/x", "{}");
        assert!(registry_only_membership(&with_registry(&[node, stray])).is_err());
        let keyed = ("/factum/providers/s0-1", "{}");
        assert!(registry_only_membership(&with_registry(&[node, keyed])).is_err());
        let valued = ("/factum/providers/kv@agent-1", r#"{"serves":"s0-1"}"#);
        assert!(registry_only_membership(&with_registry(&[node, valued])).is_err());
    }
}
