//! Messages waiting for one subscribed instance. The mailbox belongs to the instance, not to one run: what
//! arrives while the instance crashed and waits out its restart backoff is kept for the next run, and the
//! message a run was handling when it crashed is handed to the next run again, up to
//! [`MAX_DELIVERY_ATTEMPTS`] times. Nothing is dropped without a `factum::msg` warning: a full mailbox, a
//! message that crashed its handler too often, and whatever is queued when the instance ends for good.

use std::collections::VecDeque;
use std::sync::Arc;

use factum_providers::Delivery;
use tokio::sync::Notify;

/// Most messages queued for one instance; more are dropped (and logged).
pub const MAILBOX_CAPACITY: usize = 1024;
/// Most payload bytes queued for one instance (1,024 messages of 1 MiB would otherwise be 1 GiB); a message
/// that does not fit is dropped (and logged).
pub const MAILBOX_BYTES: usize = 16 * 1024 * 1024;
/// How many runs may crash on one message before it is dropped (and logged).
pub const MAX_DELIVERY_ATTEMPTS: u32 = 3;

struct Queued {
    delivery: Delivery,
    attempts: u32,
}

/// One instance's queue, the message its handler holds, and the wake-up for a run waiting on it.
#[derive(Default)]
pub(crate) struct Mailbox {
    queue: VecDeque<Queued>,
    /// Payload bytes in `queue`.
    queued_bytes: usize,
    in_hand: Option<Queued>,
    wake: Arc<Notify>,
}

impl Mailbox {
    /// Queues a delivery and wakes the waiting run (unless `wake` is off: only an injected bug turns it off); a
    /// full mailbox drops it.
    pub(crate) fn push(&mut self, delivery: Delivery, wake: bool) {
        let bytes = delivery.payload.len();
        if self.queue.len() >= MAILBOX_CAPACITY || self.queued_bytes.saturating_add(bytes) > MAILBOX_BYTES {
            tracing::warn!(target: "factum::msg", instance_id = %delivery.instance_id, topic = %delivery.topic,
                capacity = MAILBOX_CAPACITY, capacity_bytes = MAILBOX_BYTES, queued_bytes = self.queued_bytes,
                "mailbox full: message dropped");
            return;
        }
        self.queued_bytes += bytes;
        self.queue.push_back(Queued { delivery, attempts: 0 });
        if wake {
            self.wake.notify_one();
        }
    }

    /// The previous message counts as handled; the next one (if any) is now in hand.
    pub(crate) fn next(&mut self) -> Option<&Delivery> {
        self.in_hand = self.queue.pop_front();
        if let Some(q) = &self.in_hand {
            self.queued_bytes = self.queued_bytes.saturating_sub(q.delivery.payload.len());
        }
        self.in_hand.as_ref().map(|q| &q.delivery)
    }

    /// The message in hand was not handled after all (refused at delivery time): forget it.
    pub(crate) fn discard_in_hand(&mut self) {
        self.in_hand = None;
    }

    /// The run ended while handling a message: give it to the next run again, unless it has crashed too many.
    pub(crate) fn run_crashed(&mut self) {
        let Some(mut queued) = self.in_hand.take() else { return };
        queued.attempts += 1;
        if queued.attempts >= MAX_DELIVERY_ATTEMPTS {
            tracing::warn!(target: "factum::msg", instance_id = %queued.delivery.instance_id,
                topic = %queued.delivery.topic, attempts = queued.attempts,
                "message dropped: its handler crashed on every attempt");
        } else {
            self.queued_bytes += queued.delivery.payload.len();
            self.queue.push_front(queued);
        }
    }

    /// The instance ended for good: drop and log whatever is left. Returns how many messages were dropped.
    pub(crate) fn close(&mut self, instance_id: &str, why: &str) -> usize {
        let dropped = self.queue.len() + usize::from(self.in_hand.is_some());
        self.queue.clear();
        self.queued_bytes = 0;
        self.in_hand = None;
        if dropped > 0 {
            tracing::warn!(target: "factum::msg", instance_id, dropped, why, "undelivered messages dropped");
        }
        self.wake.notify_one();
        dropped
    }

    /// What a waiting run waits on.
    pub(crate) fn waker(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    /// Wakes the waiting run to look again (a subscription ended).
    pub(crate) fn poke(&self) {
        self.wake.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(bytes: usize) -> Delivery {
        Delivery { instance_id: "i".into(), capability_id: "bus".into(), topic: "t".into(), payload: vec![0; bytes] }
    }

    #[test]
    fn a_mailbox_is_bounded_in_bytes_as_well_as_messages() {
        let mut mailbox = Mailbox::default();
        let big = MAILBOX_BYTES / 4;
        for _ in 0..5 {
            mailbox.push(delivery(big), true);
        }
        assert_eq!(mailbox.queue.len(), 4, "the fifth quarter does not fit");
        // Taking one out makes room; a crash on it puts it back and takes its room again.
        assert!(mailbox.next().is_some());
        mailbox.push(delivery(1), true);
        assert_eq!(mailbox.queue.len(), 4);
        mailbox.run_crashed();
        assert_eq!(mailbox.queue.len(), 5);
        mailbox.push(delivery(big), true);
        assert_eq!(mailbox.queue.len(), 5);
        assert_eq!(mailbox.close("i", "test"), 5);
        mailbox.push(delivery(big), true);
        assert_eq!(mailbox.queue.len(), 1, "closing gave every byte back");
    }
}
