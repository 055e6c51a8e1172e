//! Sometimes-assertions (Antithesis' term): events a sweep must reach at least once, or its faults are not
//! exercising what they claim to. Each goal is recognised in a run's timeline; a sweep reports in how many runs
//! each goal was reached, and `sim/tests` asserts that a swarm reaches all of them.

use std::collections::BTreeSet;

/// A goal: its name and how to recognise it in one timeline line.
pub struct Goal {
    /// Short name, as reported.
    pub name: &'static str,
    /// Whether `line` shows the goal reached.
    pub reached_by: fn(&str) -> bool,
}

fn driver(line: &str, action: &str) -> bool {
    line.contains(" driver ") && line.split_whitespace().nth(2) == Some(action)
}

/// Every goal, in report order.
pub const GOALS: &[Goal] = &[
    Goal { name: "fault: crash", reached_by: |l| driver(l, "Crash") },
    Goal { name: "fault: restart", reached_by: |l| driver(l, "Restart") },
    Goal { name: "fault: partition", reached_by: |l| driver(l, "Partition") },
    Goal { name: "fault: hold", reached_by: |l| driver(l, "Hold") },
    Goal { name: "fault: release", reached_by: |l| driver(l, "Release") },
    Goal { name: "fault: message loss", reached_by: |l| driver(l, "Lossy") },
    Goal { name: "fault: heal", reached_by: |l| driver(l, "Heal") },
    Goal { name: "fault: pause", reached_by: |l| driver(l, "Pause") },
    Goal { name: "fault: clock drift", reached_by: |l| driver(l, "Drift") },
    Goal { name: "fault: wall clock jump", reached_by: |l| driver(l, "Jump") },
    Goal { name: "instance crashed", reached_by: |l| l.contains(" status ") && l.contains(" crashed seq=") },
    Goal {
        name: "instance restarted by policy",
        reached_by: |l| l.contains(" running seq=") && !l.contains(" restarts=0 "),
    },
    Goal { name: "node declared unavailable", reached_by: |l| l.contains(" node ") && l.ends_with(" unavailable") },
    Goal { name: "registry lease expired", reached_by: |l| l.contains("registry lease ") && l.ends_with(" expired") },
    Goal { name: "agent fenced itself", reached_by: |l| l.contains(" fence ") },
    Goal { name: "instance rescheduled", reached_by: |l| l.contains(" reschedule ") },
    Goal { name: "node joined via the registry", reached_by: |l| l.contains(" joined lease=") },
    Goal { name: "message delivered", reached_by: |l| l.split_whitespace().nth(2) == Some("deliver") },
    Goal { name: "HTTP request served", reached_by: |l| l.split_whitespace().nth(2) == Some("served") },
    Goal { name: "ended instance removed", reached_by: |l| l.split_whitespace().nth(2) == Some("removed") },
    Goal { name: "instance moved off a drained node", reached_by: |l| l.split_whitespace().nth(2) == Some("move") },
    Goal { name: "stale copy discarded", reached_by: |l| l.contains(" discard ") && l.ends_with(": ok") },
    Goal {
        name: "provider host answered a node",
        reached_by: |l| {
            let mut words = l.split_whitespace().skip(2);
            words.next() == Some(factum_providers::remote::PROVIDED) && words.nth(1) == Some("ok")
        },
    },
    Goal {
        name: "provider hosts routed by the registry",
        reached_by: |l| l.split_whitespace().nth(2) == Some(factum_node_agent::ROUTING),
    },
    Goal { name: "grant seals renewed", reached_by: |l| l.contains(" renew seals ") },
    Goal { name: "start by hash found the module gone", reached_by: |l| l.contains(": sending its bytes") },
    Goal {
        name: "provider host refused a rogue call",
        reached_by: |l| l.split_whitespace().nth(2) == Some(crate::ROGUE) && !l.ends_with(" ok"),
    },
];

/// The goals one run's timeline reached.
pub fn reached(timeline: &[String]) -> BTreeSet<&'static str> {
    GOALS.iter().filter(|g| timeline.iter().any(|line| (g.reached_by)(line))).map(|g| g.name).collect()
}
