//! The NATS bus (async-nats, a real `nats-server`): topics map to subjects `<prefix>.<topic>`, and the factum
//! wildcards are the NATS ones, so a pattern subscription is one NATS subscription. Each subscription is
//! pumped by one task on the env's spawner; dropping the subscription ends the task, and the NATS client
//! unsubscribes when the subscriber is dropped. Every call to the server is bounded by the bus's timeout on
//! the env clock: a server that stops answering (paused, partitioned) is PROVIDER_UNAVAILABLE, never a guest
//! stuck in a host call.

use std::time::Duration;

use async_trait::async_trait;
use factum_proto::{ErrorCode, ErrorResponse};
use futures::future::{AbortHandle, Abortable};
use futures::StreamExt;

use super::{BusSubscription, MessageBus, MessageSink};
use crate::BackendTls;

/// Commands (publishes, subscribes) the client queues for the server before calls wait.
const COMMAND_QUEUE: usize = 128;

/// Messages through a NATS server, across nodes.
pub struct NatsBus {
    client: async_nats::Client,
    prefix: String,
    timeout: Duration,
    env: factum_env::Env,
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
    /// Connects to `url` (e.g. `nats://127.0.0.1:4222`) within `timeout`, which then bounds every publish and
    /// subscribe too; subjects live under `prefix`, so clusters sharing one server stay apart. Subscription
    /// pumps run on `env`'s spawner, and timeouts on its clock.
    pub async fn connect(
        url: &str,
        prefix: &str,
        timeout: Duration,
        env: factum_env::Env,
    ) -> Result<Self, ErrorResponse> {
        Self::connect_with(url, prefix, timeout, env, &BackendTls::default()).await
    }

    /// [`NatsBus::connect`] over TLS as `tls` says (the server's certificate checked against `tls.ca`, and
    /// `tls.client` shown when the server verifies clients). User and password go in the URL
    /// (`nats://user:password@host:4222`).
    pub async fn connect_with(
        url: &str,
        prefix: &str,
        timeout: Duration,
        env: factum_env::Env,
        tls: &BackendTls,
    ) -> Result<Self, ErrorResponse> {
        factum_proto::permissions::validate_topic_arg(prefix, false)
            .map_err(|e| ErrorResponse::invalid(format!("bad NATS subject prefix: {}", e.message)))?;
        // A bounded command queue: against a server that stopped reading, calls wait (and time out) instead of
        // queueing payloads without end.
        let mut options = async_nats::ConnectOptions::new()
            .connection_timeout(timeout)
            .request_timeout(Some(timeout))
            .client_capacity(COMMAND_QUEUE);
        if tls.enabled() {
            options = options.require_tls(true);
        }
        if let Some(ca) = &tls.ca {
            options = options.add_root_certificates(ca.clone());
        }
        if let Some((cert, key)) = &tls.client {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        let client = options.connect(url).await.map_err(|e| unavailable(&format!("cannot connect to {url}"), e))?;
        Ok(NatsBus { client, prefix: prefix.to_string(), timeout, env })
    }

    /// `call` within the bus's timeout; its error or the timeout is PROVIDER_UNAVAILABLE.
    async fn bounded<T, E: std::fmt::Display>(
        &self,
        what: &str,
        call: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<T, ErrorResponse> {
        match self.env.timeout(self.timeout, call).await {
            Some(result) => result.map_err(|e| unavailable(what, e)),
            None => Err(unavailable(what, format!("no answer from the NATS server within {:?}", self.timeout))),
        }
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
        self.bounded("publish", self.client.publish(self.subject(topic), payload.to_vec().into())).await
    }

    async fn subscribe(&self, pattern: &str, sink: MessageSink) -> Result<BusSubscription, ErrorResponse> {
        let mut subscriber = self.bounded("subscribe", self.client.subscribe(self.subject(pattern))).await?;
        // The SUB is on its way to the server once a flush returns (written to the socket, in order before any
        // later publish from this client).
        self.bounded("flush", self.client.flush()).await?;
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
        self.env.spawn(Box::pin(async move {
            let _ = pump.await;
        }));
        Ok(BusSubscription::new(AbortOnDrop(abort)))
    }
}
