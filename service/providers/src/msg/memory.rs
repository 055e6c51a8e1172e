//! The in-process bus: subscribers on this node only. Delivery is synchronous, in subscription order, so a run
//! in simulation delivers the same messages in the same order every time.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, Weak};

use async_trait::async_trait;
use factum_proto::permissions::topic_matches;
use factum_proto::ErrorResponse;

use super::{BusSubscription, MessageBus, MessageSink};

#[derive(Default)]
struct Subscribers {
    next_id: u64,
    by_id: BTreeMap<u64, (String, MessageSink)>,
}

/// Messages between instances of one node.
#[derive(Default)]
pub struct MemoryBus {
    subscribers: Arc<Mutex<Subscribers>>,
}

impl MemoryBus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }
}

fn lock(subscribers: &Mutex<Subscribers>) -> std::sync::MutexGuard<'_, Subscribers> {
    subscribers.lock().unwrap_or_else(|p| p.into_inner())
}

struct Unsubscribe {
    subscribers: Weak<Mutex<Subscribers>>,
    id: u64,
}

impl Drop for Unsubscribe {
    fn drop(&mut self) {
        if let Some(subscribers) = self.subscribers.upgrade() {
            lock(&subscribers).by_id.remove(&self.id);
        }
    }
}

#[async_trait]
impl MessageBus for MemoryBus {
    fn name(&self) -> &'static str {
        "msg-memory"
    }

    async fn publish(&self, topic: &str, payload: &[u8]) -> Result<(), ErrorResponse> {
        let sinks: Vec<MessageSink> = lock(&self.subscribers)
            .by_id
            .values()
            .filter(|(pattern, _)| topic_matches(pattern, topic))
            .map(|(_, sink)| sink.clone())
            .collect();
        // Called outside the lock: a sink takes the agent's lock, and may cause a subscribe.
        for sink in sinks {
            sink(topic, payload);
        }
        Ok(())
    }

    async fn subscribe(&self, pattern: &str, sink: MessageSink) -> Result<BusSubscription, ErrorResponse> {
        let mut subscribers = lock(&self.subscribers);
        let id = subscribers.next_id;
        subscribers.next_id += 1;
        subscribers.by_id.insert(id, (pattern.to_string(), sink));
        Ok(BusSubscription::new(Unsubscribe { subscribers: Arc::downgrade(&self.subscribers), id }))
    }
}
