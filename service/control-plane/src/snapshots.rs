//! Which snapshots of a node are still news. A node's snapshots are numbered per run of its agent process
//! (boot); one that arrives after a newer one (sent on a connection given up for dead, say) would make the
//! instances started since look lost, so it is not applied.

use std::collections::VecDeque;

/// Boots retired per node: a snapshot from one of them is stale. A few suffice: a late snapshot outlives its
/// connection by seconds, not by many agent restarts.
const RETIRED_BOOTS: usize = 8;

/// The newest snapshot applied from one node, so a late one is not applied after it (its missing instances
/// would look lost).
#[derive(Debug, Clone, Default)]
pub(crate) struct Snapshots {
    /// (boot, sequence) of the newest snapshot applied.
    newest: Option<(u64, u64)>,
    /// Boots of the node's earlier runs, newest last.
    retired: VecDeque<u64>,
}

impl Snapshots {
    /// Whether snapshot `sequence` of run `boot` is newer than every one applied; if so it becomes the newest.
    pub(crate) fn admit(&mut self, boot: u64, sequence: u64) -> bool {
        if self.retired.contains(&boot) {
            return false;
        }
        match self.newest {
            Some((b, s)) if b == boot && sequence <= s => return false,
            Some((b, _)) if b != boot => {
                self.retired.push_back(b);
                if self.retired.len() > RETIRED_BOOTS {
                    self.retired.pop_front();
                }
            }
            _ => {}
        }
        self.newest = Some((boot, sequence));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_newer_snapshots_of_the_current_run_are_admitted() {
        let mut snapshots = Snapshots::default();
        assert!(snapshots.admit(7, 1));
        assert!(snapshots.admit(7, 3));
        assert!(!snapshots.admit(7, 2), "older than one applied");
        assert!(!snapshots.admit(7, 3), "the same one again");
        assert!(snapshots.admit(9, 1), "the node restarted");
        assert!(!snapshots.admit(7, 4), "a run that has ended");
        assert!(snapshots.admit(9, 2));
    }

    #[test]
    fn retired_runs_are_bounded() {
        let mut snapshots = Snapshots::default();
        for boot in 0..=RETIRED_BOOTS as u64 + 1 {
            assert!(snapshots.admit(boot, 1));
        }
        assert_eq!(snapshots.retired.len(), RETIRED_BOOTS);
        assert!(snapshots.admit(0, 2), "forgotten after RETIRED_BOOTS newer runs");
    }
}
