//! The queue of status reports from an agent to its control-plane link, bounded by keeping only the latest
//! fact per instance. A guest in a restart storm or a link stalled behind a partition would otherwise queue
//! reports without end; the control plane only needs each instance's newest fact (it ignores an older `seq`
//! anyway, and the next snapshot repairs anything a lost report said).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use factum_proto::StatusReport;
use tokio::sync::Notify;

#[derive(Default)]
struct Queue {
    /// Instance ids in the order their oldest unsent fact was queued.
    order: VecDeque<String>,
    /// The newest unsent fact of each instance in `order`.
    latest: BTreeMap<String, StatusReport>,
    /// The agent is gone: nothing more will be queued.
    closed: bool,
}

#[derive(Default)]
struct Shared {
    queue: Mutex<Queue>,
    /// One permit per push, kept while nobody waits: a push between the receiver's check and its wait is not
    /// missed.
    ready: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The agent's end: queues facts, replacing an unsent older fact of the same instance in place.
pub(crate) struct ReportSender(Arc<Shared>);

/// A new queue: the agent keeps the sender, its link the receiver.
pub(crate) fn queue() -> (ReportSender, StatusReports) {
    let shared = Arc::new(Shared::default());
    (ReportSender(shared.clone()), StatusReports(shared))
}

impl ReportSender {
    pub(crate) fn send(&self, report: StatusReport) {
        let mut queue = self.0.lock();
        match queue.latest.get_mut(&report.instance_id) {
            Some(older) => *older = report,
            None => {
                queue.order.push_back(report.instance_id.clone());
                queue.latest.insert(report.instance_id.clone(), report);
            }
        }
        drop(queue);
        self.0.ready.notify_one();
    }
}

impl Drop for ReportSender {
    fn drop(&mut self) {
        self.0.lock().closed = true;
        self.0.ready.notify_one();
    }
}

/// Receives the status reports an [`Agent`](crate::Agent) emits, at most one pending per instance (its latest);
/// hand it to [`run_control_plane_link`](crate::run_control_plane_link).
pub struct StatusReports(Arc<Shared>);

impl StatusReports {
    /// The next report, waiting for one; `None` once the agent is gone and everything was received.
    pub async fn recv(&mut self) -> Option<StatusReport> {
        loop {
            {
                let mut queue = self.0.lock();
                if let Some(report) = pop(&mut queue) {
                    return Some(report);
                }
                if queue.closed {
                    return None;
                }
            }
            self.0.ready.notified().await;
        }
    }

    /// Every report queued now, without waiting.
    pub fn drain(&mut self) -> Vec<StatusReport> {
        let mut queue = self.0.lock();
        std::iter::from_fn(|| pop(&mut queue)).collect()
    }

    /// How many instances have a report waiting.
    pub fn len(&self) -> usize {
        self.0.lock().order.len()
    }

    /// Whether no report waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn pop(queue: &mut Queue) -> Option<StatusReport> {
    let id = queue.order.pop_front()?;
    queue.latest.remove(&id)
}

#[cfg(test)]
mod tests {
    use factum_proto::InstanceStatus;

    use super::*;

    fn report(id: &str, seq: u64, status: InstanceStatus) -> StatusReport {
        StatusReport {
            instance_id: id.into(),
            node_id: "n".into(),
            status,
            timestamp: seq,
            seq,
            restarts: 0,
            last_error: None,
            epoch: 1,
            restart_streak: 0,
            backoff_ms: None,
            seal: Default::default(),
        }
    }

    #[test]
    fn keeps_the_latest_fact_per_instance_in_first_queued_order() {
        let (tx, mut rx) = queue();
        for seq in 1..=1_000 {
            tx.send(report("a", seq, InstanceStatus::Crashed));
        }
        tx.send(report("b", 1, InstanceStatus::Running));
        tx.send(report("a", 1_001, InstanceStatus::Starting));
        assert_eq!(rx.len(), 2, "a storm of one instance's facts holds one slot");
        let got: Vec<(String, u64)> = rx.drain().into_iter().map(|r| (r.instance_id, r.seq)).collect();
        assert_eq!(got, [("a".to_string(), 1_001), ("b".to_string(), 1)]);
        assert!(rx.is_empty());
    }

    #[tokio::test]
    async fn a_waiting_receiver_wakes_for_a_report_and_ends_with_the_agent() {
        let (tx, mut rx) = queue();
        let waiting = tokio::spawn(async move {
            let first = rx.recv().await.map(|r| r.seq);
            let second = rx.recv().await.map(|r| r.seq);
            (first, second, rx.recv().await.is_none())
        });
        tokio::task::yield_now().await;
        tx.send(report("a", 7, InstanceStatus::Running));
        tx.send(report("b", 8, InstanceStatus::Running));
        drop(tx);
        assert_eq!(waiting.await.unwrap(), (Some(7), Some(8), true));
    }
}
