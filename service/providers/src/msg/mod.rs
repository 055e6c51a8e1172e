//! The messaging provider: publish to a topic, subscribe to a topic or NATS-style pattern, unsubscribe; on a
//! [`MessageBus`] (in-process by default, NATS across nodes). Topics are one space per bus, shared by every
//! capability id: permissions, not namespaces, decide who may publish or subscribe where.
//!
//! A subscription belongs to one (instance, capability, pattern). Messages it receives go to the node agent's
//! [`DeliverFn`], which queues them for the instance and hands them to its `factum_on_message` export.

mod memory;
#[cfg(feature = "nats")]
mod nats;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};

use async_trait::async_trait;
use factum_proto::permissions::allows;
use factum_proto::{
    CapabilityInvocation, CapabilityResponse, ErrorCode, ErrorResponse, MsgOperation, Permission, ProviderType,
};

pub use memory::MemoryBus;
#[cfg(feature = "nats")]
pub use nats::NatsBus;

use crate::{Lifecycle, Provider, ProviderMetadata};

/// Called with the topic and payload of every message a bus subscription receives.
pub type MessageSink = Arc<dyn Fn(&str, &[u8]) + Send + Sync>;

/// One message for one subscribed instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The subscriber.
    pub instance_id: String,
    /// The capability it subscribed through.
    pub capability_id: String,
    /// The (literal) topic the message was published on.
    pub topic: String,
    /// Payload.
    pub payload: Vec<u8>,
}

/// Where the provider sends deliveries: the node agent's mailboxes.
pub type DeliverFn = Arc<dyn Fn(Delivery) + Send + Sync>;

/// An active subscription on a bus; dropping it unsubscribes.
pub struct BusSubscription(#[allow(dead_code)] Box<dyn Send + Sync>);

impl BusSubscription {
    /// Wraps whatever ends the subscription when dropped.
    pub fn new(guard: impl Send + Sync + 'static) -> Self {
        BusSubscription(Box::new(guard))
    }
}

/// A publish/subscribe transport. Failures of the transport itself are PROVIDER_UNAVAILABLE.
#[async_trait]
pub trait MessageBus: Send + Sync + 'static {
    /// Implementation name, e.g. `msg-memory`.
    fn name(&self) -> &'static str;
    /// Publishes `payload` on the literal `topic`.
    async fn publish(&self, topic: &str, payload: &[u8]) -> Result<(), ErrorResponse>;
    /// Calls `sink` for every message on a topic matching `pattern` published after this returns, until the
    /// returned subscription is dropped.
    async fn subscribe(&self, pattern: &str, sink: MessageSink) -> Result<BusSubscription, ErrorResponse>;
}

/// (instance id, capability id, pattern).
type SubscriptionKey = (String, String, String);

/// Subscriptions one instance may hold at once, over all its capabilities: each is a subscription on the bus
/// (a NATS one, with its own task), so a guest must not make them without end.
pub const MAX_SUBSCRIPTIONS_PER_INSTANCE: usize = 64;

/// The messaging provider over one bus.
pub struct MessagingProvider {
    bus: Arc<dyn MessageBus>,
    lifecycle: Lifecycle,
    deliver: OnceLock<DeliverFn>,
    subscriptions: Mutex<BTreeMap<SubscriptionKey, BusSubscription>>,
}

impl MessagingProvider {
    /// A running provider over `bus`; subscriptions fail until [`MessagingProvider::connect`] is called.
    pub fn new(bus: Arc<dyn MessageBus>) -> Self {
        Self { bus, lifecycle: Lifecycle::new(), deliver: OnceLock::new(), subscriptions: Mutex::new(BTreeMap::new()) }
    }

    /// A running provider over a fresh in-process bus.
    pub fn in_memory() -> Self {
        Self::new(Arc::new(MemoryBus::new()))
    }

    /// Sets where deliveries go; only the first call counts (one agent owns a provider).
    pub fn connect(&self, deliver: DeliverFn) {
        if self.deliver.set(deliver).is_err() {
            tracing::warn!("messaging provider is already connected to an agent; ignoring a second connect");
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<SubscriptionKey, BusSubscription>> {
        self.subscriptions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ends the subscriptions of `instance_id`: all of them, or those made through `capability_id`. Returns how
    /// many ended. Used when an instance ends or a capability is revoked.
    pub fn release(&self, instance_id: &str, capability_id: Option<&str>) -> usize {
        let ended: Vec<BusSubscription> = {
            let mut subscriptions = self.lock();
            let keys: Vec<SubscriptionKey> = subscriptions
                .keys()
                .filter(|(i, c, _)| i == instance_id && capability_id.is_none_or(|cap| cap == c))
                .cloned()
                .collect();
            keys.iter().filter_map(|k| subscriptions.remove(k)).collect()
        };
        // Dropped outside the lock: ending a bus subscription may take the bus's own lock.
        ended.len()
    }

    /// Patterns `instance_id` is subscribed to, as (capability id, pattern), sorted.
    pub fn subscriptions_of(&self, instance_id: &str) -> Vec<(String, String)> {
        self.lock().keys().filter(|(i, _, _)| i == instance_id).map(|(_, c, p)| (c.clone(), p.clone())).collect()
    }

    async fn execute(
        &self,
        invocation: &CapabilityInvocation,
        op: MsgOperation,
    ) -> Result<CapabilityResponse, ErrorResponse> {
        match op {
            MsgOperation::Publish { topic, payload } => {
                self.bus.publish(&topic, &payload).await?;
                Ok(CapabilityResponse::ok(&()))
            }
            MsgOperation::Subscribe { topic } => {
                let key = (invocation.instance_id.clone(), invocation.capability_id.clone(), topic.clone());
                {
                    let subscriptions = self.lock();
                    if subscriptions.contains_key(&key) {
                        return Ok(CapabilityResponse::ok(&()));
                    }
                    let first = (key.0.clone(), String::new(), String::new());
                    let held = subscriptions.range(first..).take_while(|((i, _, _), _)| *i == key.0).count();
                    if held >= MAX_SUBSCRIPTIONS_PER_INSTANCE {
                        return Err(ErrorResponse::new(
                            ErrorCode::ResourceExhausted,
                            format!(
                                "instance {} holds its maximum of {MAX_SUBSCRIPTIONS_PER_INSTANCE} subscriptions",
                                key.0
                            ),
                        ));
                    }
                }
                let deliver = self.deliver.get().cloned().ok_or_else(|| {
                    ErrorResponse::new(ErrorCode::ProviderUnavailable, "messaging provider has no agent to deliver to")
                })?;
                let (instance_id, capability_id) = (key.0.clone(), key.1.clone());
                let sink: MessageSink = Arc::new(move |topic: &str, payload: &[u8]| {
                    deliver(Delivery {
                        instance_id: instance_id.clone(),
                        capability_id: capability_id.clone(),
                        topic: topic.to_string(),
                        payload: payload.to_vec(),
                    })
                });
                let subscription = self.bus.subscribe(&topic, sink).await?;
                // A concurrent identical subscribe may have won; keeping either one is the same.
                self.lock().entry(key).or_insert(subscription);
                Ok(CapabilityResponse::ok(&()))
            }
            MsgOperation::Unsubscribe { topic } => {
                let key = (invocation.instance_id.clone(), invocation.capability_id.clone(), topic);
                let ended = self.lock().remove(&key);
                Ok(CapabilityResponse::ok(&ended.is_some()))
            }
        }
    }
}

#[async_trait]
impl Provider for MessagingProvider {
    fn metadata(&self) -> ProviderMetadata {
        ProviderMetadata {
            provider_type: ProviderType::Messaging,
            name: self.bus.name().into(),
            version: env!("CARGO_PKG_VERSION").into(),
            operations: ["publish", "subscribe", "unsubscribe"].map(String::from).to_vec(),
        }
    }

    fn lifecycle(&self) -> &Lifecycle {
        &self.lifecycle
    }

    async fn handle(&self, invocation: &CapabilityInvocation, granted: &[Permission]) -> CapabilityResponse {
        let op = match MsgOperation::decode(&invocation.operation, &invocation.params) {
            Ok(op) => op,
            Err(e) => return CapabilityResponse::err(&e),
        };
        if let Some(needed) = op.required_permission().filter(|needed| !allows(granted, needed)) {
            return CapabilityResponse::err(
                &ErrorResponse::permission_denied(format!(
                    "instance {} lacks {needed} on capability {}",
                    invocation.instance_id, invocation.capability_id
                ))
                .with_detail("permission", needed.to_string()),
            );
        }
        self.execute(invocation, op).await.unwrap_or_else(|e| CapabilityResponse::err(&e))
    }

    async fn shutdown(&self) -> Result<(), ErrorResponse> {
        self.lifecycle.shutdown().await;
        let ended = std::mem::take(&mut *self.lock());
        drop(ended);
        Ok(())
    }
}
