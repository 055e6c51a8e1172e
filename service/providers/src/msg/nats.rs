//! The NATS bus (async-nats, a real `nats-server`): topics map to subjects `<prefix>.<topic>`, and the factum
//! wildcards are the NATS ones, so a pattern subscription is one NATS subscription. Each subscription is
//! pumped by one task on the env's spawner; dropping the subscription ends the task, and the NATS client
//! unsubscribes when the subscriber is dropped.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use factum_proto::{ErrorCode, ErrorResponse};
use futures::future::{AbortHandle, Abortable};
use futures::StreamExt;

use super::{BusSubscription, MessageBus, MessageSink};

/// Messages through a NATS server, across nodes.
pub struct NatsBus {
    client: async_nats::Client,
    prefix: String,
    spawner: Arc<dyn factum_env::Spawn>,
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> ErrorResponse {
    ErrorResponse::new(ErrorCode::ProviderUnavailable, format!("msg-nats: {what}: {e}"))
}

struct AbortOnDrop(AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl NatsBus {
    /// Connects to `url` (e.g. `nats://127.0.0.1:4222`) within `timeout`; subjects live under `prefix`, so
    /// clusters sharing one server stay apart. Subscription pumps run on `spawner`.
    pub async fn connect(
        url: &str,
        prefix: &str,
        timeout: Duration,
        spawner: Arc<dyn factum_env::Spawn>,
    ) -> Result<Self, ErrorResponse> {
        factum_proto::permissions::validate_topic_arg(prefix, false)
            .map_err(|e| ErrorResponse::invalid(format!("bad NATS subject prefix: {}", e.message)))?;
        let options = async_nats::ConnectOptions::new().connection_timeout(timeout).request_timeout(Some(timeout));
        let client = options.connect(url).await.map_err(|e| unavailable(&format!("cannot connect to {url}"), e))?;
        Ok(NatsBus { client, prefix: prefix.to_string(), spawner })
    }

    fn subject(&self, topic: &str) -> String {
        format!("{}.{topic}", self.prefix)
    }
}

#[async_trait]
impl MessageBus for NatsBus {
    fn name(&self) -> &'static str {
        "msg-nats"
    }

    async fn publish(&self, topic: &str, payload: &[u8]) -> Result<(), ErrorResponse> {
        self.client.publish(self.subject(topic), payload.to_vec().into()).await.map_err(|e| unavailable("publish", e))
    }

    async fn subscribe(&self, pattern: &str, sink: MessageSink) -> Result<BusSubscription, ErrorResponse> {
        let mut subscriber =
            self.client.subscribe(self.subject(pattern)).await.map_err(|e| unavailable("subscribe", e))?;
        // The server has the subscription once a flush returns: a publish after this call is delivered.
        self.client.flush().await.map_err(|e| unavailable("flush", e))?;
        let strip = format!("{}.", self.prefix);
        let (abort, registration) = AbortHandle::new_pair();
        let pump = Abortable::new(
            async move {
                while let Some(message) = subscriber.next().await {
                    let topic = message.subject.as_str().strip_prefix(&strip).unwrap_or(message.subject.as_str());
                    sink(topic, &message.payload);
                }
            },
            registration,
        );
        self.spawner.spawn(Box::pin(async move {
            let _ = pump.await;
        }));
        Ok(BusSubscription::new(AbortOnDrop(abort)))
    }
}
