//! Invariants that hold in every run, whatever the scenario says: the simulator checks them at every sample.
//! Unlike the [`invariants`](crate::invariants) a scenario names, some of them compare a sample with the one
//! before it, so the [`Monitor`] keeps what it last saw of every instance.

use std::collections::{BTreeMap, BTreeSet};

use factum_proto::{InstanceFacts, InstanceStatus, PolicyType};

use crate::fencing::LeaseWatch;
use crate::invariants::{single_placement, View};
use crate::ledger::GrantLedger;
use factum_node_agent::trace_events::GRANTS;

/// Exit code of the statelessness probe (`guests/fixtures/remember.wat`) when memory survived a restart.
const MEMORY_SURVIVED: &str = "exited with code 7";
/// Exit code of the side-effect probe (`guests/fixtures/os_probe.wat`) when it reached the OS directly.
const REACHED_THE_OS: &str = "exited with code 9";
/// What the `kv_greeter` fixture writes: application data, which must never reach the control plane.
const APPLICATION_DATA: &str = "hello from factum";

/// The always-on checks, by name and property: each takes the previous facts of every instance and the view.
type Check = fn(&BTreeMap<Key, InstanceFacts>, &View) -> Result<(), String>;

/// (node, instance id, placement epoch): one placement of one instance.
type Key = (String, String, u64);

/// Every always-on check, named as failures report them.
pub const ALWAYS_ON: [(&str, Check); 9] = [
    ("single_placement", |_, view| single_placement(view)),
    ("P1 no_memory_survives_a_restart", |_, view| no_memory_survives_a_restart(view)),
    ("P3 no_side_effect_bypasses_capabilities", |_, view| no_side_effect_bypasses_capabilities(view)),
    ("P2 crashes_preserve_system_state", crashes_preserve_system_state),
    ("P6 instances_live_on_known_nodes", |_, view| instances_live_on_known_nodes(view)),
    ("P7 no_application_data_in_the_control_plane", |_, view| no_application_data_in_the_control_plane(view)),
    ("P8 restart_policies_are_respected", |_, view| restart_policies_are_respected(view)),
    ("P19 capabilities_are_scoped_to_their_instance", |_, view| capabilities_are_scoped_to_their_instance(view)),
    ("placements_satisfy_constraints", |_, view| placements_satisfy_constraints(view)),
];

/// Runs [`ALWAYS_ON`] over successive views, the grant ledger (P4) and [`statuses_come_from_agents`] over
/// the trace between them.
#[derive(Default)]
pub struct Monitor {
    previous: BTreeMap<Key, InstanceFacts>,
    grants: GrantLedger,
    leases: LeaseWatch,
    /// (node, instance) → every (sequence number, status) its agent traced for the instance's current life there.
    reported: BTreeMap<(String, String), Vec<(u64, String)>>,
    /// Instances this incarnation of the control plane has listed as running, and which incarnation.
    confirmed: (u64, BTreeSet<String>),
    /// Where each listed instance's facts stood at the last sample, and in which control-plane incarnation.
    positions: (u64, BTreeMap<String, Position>),
    /// Instances the control plane removed (its `removed` trace events), each with the stale copies (node,
    /// placement epoch) agents still held at the removal and have held at every sample since: a paused or cut-off
    /// node keeps an older placement until it fences itself, and that is not holding it *again*.
    removed: BTreeMap<String, BTreeSet<(String, u64)>>,
}

impl Monitor {
    /// Checks `view`, and the trace lines recorded since the last sample, against every always-on invariant;
    /// remembers the view for the next sample.
    pub fn observe(&mut self, view: &View, fresh_trace: &[String]) -> Result<(), String> {
        for (name, check) in ALWAYS_ON {
            check(&self.previous, view).map_err(|e| format!("always-on {name}: {e}"))?;
        }
        for line in fresh_trace {
            self.grants.apply(line).map_err(|e| match e.starts_with(crate::ledger::P17) {
                true => format!("always-on {e}"),
                false => format!("always-on P4 calls_were_granted: {e}"),
            })?;
            self.leases.apply(line).map_err(|e| format!("always-on P12 nodes_act_only_under_their_lease: {e}"))?;
        }
        for line in fresh_trace {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                // A new life of the instance on that node: its sequence numbers start over.
                [_, node, event, instance, ..] if *event == GRANTS => {
                    self.reported.insert((node.to_string(), instance.to_string()), Vec::new());
                }
                // A removal ends the instance's confirmation (P13): it is meant to go.
                [_, "control-plane", "removed", instance] => {
                    self.confirmed.1.remove(*instance);
                    let stale = holders(view, instance).map(|(node, f)| (node.clone(), f.epoch)).collect();
                    self.removed.insert(instance.to_string(), stale);
                }
                [_, node, "status", instance, status, seq, ..] => {
                    let Some(seq) = seq.strip_prefix("seq=").and_then(|n| n.parse().ok()) else { continue };
                    let key = (node.to_string(), instance.to_string());
                    self.reported.entry(key).or_default().push((seq, status.to_string()));
                }
                _ => {}
            }
        }
        statuses_come_from_agents(&self.reported, view)
            .map_err(|e| format!("always-on P9 statuses_come_from_agents: {e}"))?;
        confirmed_instances_stay_listed(&mut self.confirmed, view)
            .map_err(|e| format!("always-on P13 confirmed_instances_stay_listed: {e}"))?;
        facts_only_move_forward(&mut self.positions, view)
            .map_err(|e| format!("always-on P14 facts_only_move_forward: {e}"))?;
        removed_instances_stay_removed(&mut self.removed, view)
            .map_err(|e| format!("always-on removed_instances_stay_removed: {e}"))?;
        self.previous = view
            .agents
            .iter()
            .flat_map(|(node, facts)| {
                facts.iter().map(move |f| ((node.clone(), f.metadata.instance_id.clone(), f.epoch), f.clone()))
            })
            .collect();
        Ok(())
    }
}

/// Property 9 (with 14): when the control plane says an instance is `running` on a node, that is the status
/// the node's agent reported in the very fact the control plane holds (the last status it traced at or before
/// that fact's sequence number): the control plane relays facts, it never fills in what it intends, and it never
/// keeps a status the fact it took in had replaced. (`starting` also marks a start the control plane has sent
/// and not yet heard back about; `unknown`, and `crashed` for an instance its node lost, are the control
/// plane's own facts about a node.)
pub fn statuses_come_from_agents(
    reported: &BTreeMap<(String, String), Vec<(u64, String)>>,
    view: &View,
) -> Result<(), String> {
    let Some(cp) = &view.control_plane else { return Ok(()) };
    for m in cp.instances.iter().filter(|m| m.status == factum_proto::InstanceStatus::Running) {
        let seq = cp.fact_positions.get(&m.instance_id).map_or(0, |(_, seq)| *seq);
        let history = reported.get(&(m.node_id.clone(), m.instance_id.clone()));
        let said = history.and_then(|h| h.iter().rev().find(|(s, _)| *s <= seq)).map(|(_, status)| status.as_str());
        if said != Some("running") {
            return Err(format!(
                "control plane says {} is running on {} from its fact seq={seq}, where the agent said {}",
                m.instance_id,
                m.node_id,
                said.unwrap_or("nothing")
            ));
        }
    }
    Ok(())
}

/// Where an instance's facts stood in the control plane at one sample: (epoch, seq) and status.
type Position = ((u64, u64), InstanceStatus);

/// Property 14: the control plane's facts about an instance only move forward. Within one incarnation of the
/// control plane, between two samples, an instance's (placement epoch, fact sequence number) never goes back (a
/// delayed, duplicated or reordered report never rolls a status back), and within one placement an end its node
/// reported (stopped, crashed) never turns `unknown`: a silent node makes unknown only what was still running.
pub fn facts_only_move_forward(positions: &mut (u64, BTreeMap<String, Position>), view: &View) -> Result<(), String> {
    let Some(cp) = &view.control_plane else { return Ok(()) };
    if positions.0 != view.control_plane_incarnation {
        *positions = (view.control_plane_incarnation, BTreeMap::new());
    }
    let now: BTreeMap<String, Position> = cp
        .instances
        .iter()
        .filter_map(|m| cp.fact_positions.get(&m.instance_id).map(|at| (m.instance_id.clone(), (*at, m.status))))
        .collect();
    for (id, (at, status)) in &now {
        let Some((before, was)) = positions.1.get(id) else { continue };
        if at < before {
            return Err(format!("{id} went back from (epoch, seq) {before:?} to {at:?}"));
        }
        // An ended run the node reported (seq > 0) is a fact; `crashed` before any fact of the placement is the
        // control plane's own guess (its node lost it), which a later doubt may replace. A newer fact between
        // the two samples (a restart by policy) ended the end: only an end still the latest fact must stay.
        if at == before && before.1 > 0 && was.is_terminal() && *status == InstanceStatus::Unknown {
            return Err(format!("{id} was {was} and turned unknown in the same placement (epoch {})", at.0));
        }
    }
    positions.1 = now;
    Ok(())
}

/// Property 13: nothing an agent confirmed is ever lost. Once the control plane lists an instance as `running`
/// (which, by P9, its agent reported), it lists it at every later sample until the control plane itself
/// restarts; a restarted one starts over from what the agents then tell it. Stopped or crashed, it stays listed.
pub fn confirmed_instances_stay_listed(confirmed: &mut (u64, BTreeSet<String>), view: &View) -> Result<(), String> {
    let Some(cp) = &view.control_plane else { return Ok(()) };
    if confirmed.0 != view.control_plane_incarnation {
        *confirmed = (view.control_plane_incarnation, BTreeSet::new());
    }
    let listed: BTreeSet<&str> = cp.instances.iter().map(|m| m.instance_id.as_str()).collect();
    if let Some(lost) = confirmed.1.iter().find(|id| !listed.contains(id.as_str())) {
        return Err(format!("{lost} was listed running, and the control plane no longer lists it"));
    }
    let running = cp.instances.iter().filter(|m| m.status == factum_proto::InstanceStatus::Running);
    confirmed.1.extend(running.map(|m| m.instance_id.clone()));
    Ok(())
}

/// Removal is for good: once the control plane removed an instance (it does so only after the agent holding its
/// placement did), the control plane never lists it again, and no agent holds it again, whatever snapshots were
/// still in flight (ids are never reused within a run). A stale copy of an older placement that a paused or
/// cut-off node still held at the removal may stay until that node fences itself; once gone, it is gone.
pub fn removed_instances_stay_removed(
    removed: &mut BTreeMap<String, BTreeSet<(String, u64)>>,
    view: &View,
) -> Result<(), String> {
    if let Some(cp) = &view.control_plane {
        if let Some(m) = cp.instances.iter().find(|m| removed.contains_key(&m.instance_id)) {
            return Err(format!("{} was removed, and the control plane lists it again ({})", m.instance_id, m.status));
        }
    }
    for (id, stale) in removed.iter_mut() {
        let held: BTreeSet<(String, u64)> = holders(view, id).map(|(node, f)| (node.clone(), f.epoch)).collect();
        if let Some((node, epoch)) = held.difference(stale).next() {
            return Err(format!("{id} was removed, and {node} holds it again (epoch {epoch})"));
        }
        *stale = held;
    }
    Ok(())
}

/// Every agent holding instance `id`, with its facts.
fn holders<'a>(view: &'a View, id: &'a str) -> impl Iterator<Item = (&'a String, &'a InstanceFacts)> + 'a {
    view.agents.iter().flat_map(move |(node, facts)| {
        facts.iter().filter(move |f| f.metadata.instance_id == id).map(move |f| (node, f))
    })
}

/// The first instance some agent holds whose last crash is `reason`.
fn crashed_with<'a>(view: &'a View, reason: &str) -> Option<(&'a String, &'a InstanceFacts)> {
    view.agents
        .iter()
        .flat_map(|(node, facts)| facts.iter().map(move |f| (node, f)))
        .find(|(_, f)| f.metadata.last_error.as_deref() == Some(reason))
}

/// Property 1: every run starts with fresh memory. The statelessness probe exits 7 only if it finds the marker
/// a previous run left in its memory.
pub fn no_memory_survives_a_restart(view: &View) -> Result<(), String> {
    match crashed_with(view, MEMORY_SURVIVED) {
        Some((node, f)) => Err(format!("{} on {node}: memory of an earlier run survived", f.metadata.instance_id)),
        None => Ok(()),
    }
}

/// Property 3: a guest reaches nothing outside its capabilities. The side-effect probe exits 9 only if a
/// write to a non-standard fd, a preopened directory or bytes on stdin got through.
pub fn no_side_effect_bypasses_capabilities(view: &View) -> Result<(), String> {
    match crashed_with(view, REACHED_THE_OS) {
        Some((node, f)) => Err(format!("{} on {node} reached the OS around its capabilities", f.metadata.instance_id)),
        None => Ok(()),
    }
}

/// Property 2: a crash changes status, error and restart count, never the system-level state of the instance:
/// within one placement its id, module, creation time and policy stay as they were, its restart count and
/// fact sequence never go back, and a crashed instance stays known to its agent.
pub fn crashes_preserve_system_state(previous: &BTreeMap<Key, InstanceFacts>, view: &View) -> Result<(), String> {
    for (node, facts) in &view.agents {
        for now in facts {
            let key = (node.clone(), now.metadata.instance_id.clone(), now.epoch);
            let Some(before) = previous.get(&key) else { continue };
            let id = &now.metadata.instance_id;
            let kept = before.metadata.module_hash == now.metadata.module_hash
                && before.metadata.created_at == now.metadata.created_at
                && before.restart_policy == now.restart_policy;
            if !kept {
                return Err(format!("{id} on {node} changed identity: {:?} then {:?}", before.metadata, now.metadata));
            }
            if now.metadata.restarts < before.metadata.restarts || now.seq < before.seq {
                return Err(format!(
                    "{id} on {node} went back: restarts {} → {}, seq {} → {}",
                    before.metadata.restarts, now.metadata.restarts, before.seq, now.seq
                ));
            }
        }
    }
    Ok(())
}

/// Property 6: every instance the control plane lists was placed on a node it knows.
pub fn instances_live_on_known_nodes(view: &View) -> Result<(), String> {
    let Some(cp) = &view.control_plane else { return Ok(()) };
    match cp.instances.iter().find(|m| !cp.nodes.iter().any(|n| n.node_id == m.node_id)) {
        Some(m) => Err(format!("{} is listed on {}, a node the control plane does not know", m.instance_id, m.node_id)),
        None => Ok(()),
    }
}

/// Every instance an agent holds satisfies its placement constraints with that agent's labels: the first
/// placement, every reschedule and every restart in place honour them (labels do not change while a node runs).
pub fn placements_satisfy_constraints(view: &View) -> Result<(), String> {
    for (node, facts) in &view.agents {
        let labels = view.labels.get(node).cloned().unwrap_or_default();
        if let Some(f) = facts.iter().find(|f| !factum_proto::labels::satisfies(&labels, &f.constraints)) {
            return Err(format!(
                "{} (epoch {}, constraints {}) is on {node}, labelled {}",
                f.metadata.instance_id,
                f.epoch,
                factum_proto::labels::display(&f.constraints),
                factum_proto::labels::display(&labels)
            ));
        }
    }
    Ok(())
}

/// Property 7: what guests store through their capabilities never shows up in the control plane's state: not
/// in any of its maps, as text or as bytes, and nothing but modules, each under its own hash, in its module map
/// (module bytes are user code and may carry any string, so that map is checked by hash instead).
pub fn no_application_data_in_the_control_plane(view: &View) -> Result<(), String> {
    let Some(cp) = &view.control_plane else { return Ok(()) };
    let (maps, modules) = &cp.held;
    // `Debug` renders a byte string as a list of numbers.
    let as_bytes = format!("{:?}", APPLICATION_DATA.as_bytes());
    let as_bytes = as_bytes.trim_start_matches('[').trim_end_matches(']');
    if maps.as_ref().is_some_and(|maps| maps.contains(APPLICATION_DATA) || maps.contains(as_bytes)) {
        return Err(format!("the control plane's state holds application data {APPLICATION_DATA:?}"));
    }
    if let Some((hash, _)) = modules.iter().find(|(hash, bytes)| factum_proto::module_hash(bytes) != *hash) {
        return Err(format!("the control plane's module map holds bytes that are not module {hash}"));
    }
    Ok(())
}

/// Property 8: an instance with policy `never` is never restarted, and none is restarted more than its
/// `max_retries`, counted over the whole cluster: each placement after the first (epoch > 1) was a restart
/// after a node loss, so the count is at least `epoch - 1`.
pub fn restart_policies_are_respected(view: &View) -> Result<(), String> {
    for (node, facts) in &view.agents {
        for f in facts {
            if u64::from(f.metadata.restarts) + 1 < f.epoch {
                return Err(format!(
                    "{} on {node} is in placement {} but counts {} restarts: a reschedule escaped max_retries",
                    f.metadata.instance_id, f.epoch, f.metadata.restarts
                ));
            }
            let policy = f.restart_policy;
            let limit = match policy.policy_type {
                PolicyType::Never => Some(0),
                PolicyType::Always | PolicyType::OnFailure => policy.max_retries,
            };
            if limit.is_some_and(|limit| f.metadata.restarts > limit) {
                return Err(format!(
                    "{} on {node} restarted {} times under {policy:?}",
                    f.metadata.instance_id, f.metadata.restarts
                ));
            }
        }
    }
    Ok(())
}

/// Property 19: every capability an agent enforces for an instance was assigned to that instance.
pub fn capabilities_are_scoped_to_their_instance(view: &View) -> Result<(), String> {
    for (node, facts) in &view.agents {
        for f in facts {
            if let Some(a) = f.capabilities.iter().find(|a| a.instance_id != f.metadata.instance_id) {
                return Err(format!(
                    "{} on {node} holds capability {} assigned to {}",
                    f.metadata.instance_id, a.capability_id, a.instance_id
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::invariants::ControlPlaneView;
    use std::sync::Arc;

    fn holding(maps: String, modules: Vec<(String, Arc<Vec<u8>>)>) -> View {
        let cp = ControlPlaneView {
            instances: Vec::new(),
            capabilities: BTreeMap::new(),
            nodes: Vec::new(),
            policies: BTreeMap::new(),
            fact_positions: BTreeMap::new(),
            held: (Some(maps), modules),
        };
        View {
            control_plane: Some(cp),
            control_plane_incarnation: 1,
            agents: BTreeMap::new(),
            labels: BTreeMap::new(),
            registry_entries: None,
            paused: BTreeSet::new(),
            ago: BTreeMap::new(),
        }
    }

    #[test]
    fn a_placement_on_a_node_without_the_constrained_label_is_caught() {
        let mut facts = crate::invariants::tests_support::running("i-1", 2);
        facts.constraints = [("zone".to_string(), "a".to_string())].into();
        let mut view = holding(String::new(), Vec::new());
        view.agents.insert("agent-1".into(), vec![facts.clone()]);
        view.labels.insert("agent-1".into(), crate::agent_labels(1));
        assert_eq!(placements_satisfy_constraints(&view), Ok(()));
        view.agents.insert("agent-2".into(), vec![facts]);
        view.labels.insert("agent-2".into(), crate::agent_labels(2));
        let err = placements_satisfy_constraints(&view).unwrap_err();
        assert!(err.contains("i-1 (epoch 2, constraints zone=a) is on agent-2, labelled zone=b"), "{err}");
    }

    #[test]
    fn p14_sees_facts_go_back_and_an_ended_run_turn_unknown() {
        let at = |epoch: u64, seq: u64, status: InstanceStatus| {
            let mut view = holding(String::new(), Vec::new());
            if let Some(cp) = view.control_plane.as_mut() {
                let mut m = crate::invariants::tests_support::metadata("i", status);
                m.node_id = "agent-1".into();
                cp.instances = vec![m];
                cp.fact_positions = [("i".to_string(), (epoch, seq))].into_iter().collect();
            }
            view
        };
        let mut positions = (0, BTreeMap::new());
        facts_only_move_forward(&mut positions, &at(1, 3, InstanceStatus::Running)).unwrap();
        facts_only_move_forward(&mut positions, &at(1, 4, InstanceStatus::Crashed)).unwrap();
        facts_only_move_forward(&mut positions, &at(2, 0, InstanceStatus::Starting)).unwrap();
        assert!(facts_only_move_forward(&mut positions.clone(), &at(1, 9, InstanceStatus::Running)).is_err());
        assert!(facts_only_move_forward(&mut positions, &at(2, 0, InstanceStatus::Unknown)).is_ok());
        let mut ended = (0, BTreeMap::new());
        facts_only_move_forward(&mut ended, &at(1, 4, InstanceStatus::Stopped)).unwrap();
        assert!(facts_only_move_forward(&mut ended.clone(), &at(1, 4, InstanceStatus::Unknown)).is_err());
        // Restarted by policy between two samples (a newer fact), then its node went silent: no end was undone.
        assert!(facts_only_move_forward(&mut ended, &at(1, 6, InstanceStatus::Unknown)).is_ok());
    }

    #[test]
    fn p7_sees_application_data_as_text_as_bytes_and_under_a_false_module_hash() {
        let module = Arc::new(format!("\0asm{APPLICATION_DATA}").into_bytes());
        let hash = factum_proto::module_hash(&module);
        let clean = holding("{}".into(), vec![(hash.clone(), module.clone())]);
        no_application_data_in_the_control_plane(&clean).unwrap();
        let text = holding(format!("last_error: {APPLICATION_DATA:?}"), Vec::new());
        assert!(no_application_data_in_the_control_plane(&text).is_err());
        let bytes = holding(format!("value: {:?}", APPLICATION_DATA.as_bytes().to_vec()), Vec::new());
        assert!(no_application_data_in_the_control_plane(&bytes).is_err());
        let hidden = holding("{}".into(), vec![(hash, Arc::new(APPLICATION_DATA.as_bytes().to_vec()))]);
        assert!(no_application_data_in_the_control_plane(&hidden).is_err());
    }

    #[test]
    fn a_removed_instance_may_linger_only_as_the_stale_copy_it_was() {
        let on = |holders: &[(&str, u64)]| {
            let mut view = holding(String::new(), Vec::new());
            for (node, epoch) in holders {
                view.agents
                    .entry(node.to_string())
                    .or_default()
                    .push(crate::invariants::tests_support::running("i", *epoch));
            }
            view
        };
        // Removed while paused agent-1 still held placement 1: it may keep that copy until it fences.
        let mut removed: BTreeMap<String, BTreeSet<(String, u64)>> =
            [("i".to_string(), [("agent-1".to_string(), 1)].into())].into();
        removed_instances_stay_removed(&mut removed, &on(&[("agent-1", 1)])).unwrap();
        assert!(removed_instances_stay_removed(&mut removed.clone(), &on(&[("agent-2", 2)])).is_err());
        assert!(removed_instances_stay_removed(&mut removed.clone(), &on(&[("agent-1", 3)])).is_err());
        // Once let go, the stale copy may not come back.
        removed_instances_stay_removed(&mut removed, &on(&[])).unwrap();
        assert!(removed_instances_stay_removed(&mut removed, &on(&[("agent-1", 1)])).is_err());
        let mut listed = holding(String::new(), Vec::new());
        listed.control_plane.as_mut().unwrap().instances =
            vec![crate::invariants::tests_support::metadata("i", InstanceStatus::Stopped)];
        assert!(removed_instances_stay_removed(&mut removed, &listed).is_err());
    }
}
