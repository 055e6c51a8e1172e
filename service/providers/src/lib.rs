//! Capability providers: the only way an instance touches the world (design §Capability Provider).
//!
//! A provider decodes an invocation, checks it against the permissions granted to the calling instance for
//! that capability, and only then executes it. The node agent finds the assignment (no assignment is
//! PERMISSION_DENIED before any provider is asked) and hands the provider the granted permissions.

mod http;
mod kv;
mod msg;
pub mod remote;
mod routing;

use async_trait::async_trait;
use factum_proto::{CapabilityInvocation, CapabilityResponse, ErrorResponse, Permission};

/// TLS settings of a backend (Redis, NATS): one type for every backend, from the env crate.
pub use factum_env::BackendTls;
pub use factum_proto::ProviderMetadata;

pub use http::{Hop, HopResponse, HttpBug, HttpLimits, HttpProvider, HttpTransport, ReqwestTransport};
#[cfg(feature = "redis")]
pub use kv::RedisStore;
pub use kv::{KvBackend, KvProvider, MemoryKv, MemoryStore, DEFAULT_MAX_KEYS_PER_STORE};
#[cfg(feature = "nats")]
pub use msg::NatsBus;
pub use msg::{
    BusSubscription, DeliverFn, Delivery, MemoryBus, MessageBus, MessageSink, MessagingProvider,
    MAX_SUBSCRIPTIONS_PER_INSTANCE,
};
pub use remote::RemoteProvider;
pub use routing::{is_idempotent, Host, HostEntry, ProviderHosts, REROUTED};

/// A capability provider (design §Capability Provider, Base Interface). A provider implements
/// [`Provider::handle`]; the provided [`Provider::invoke`] runs it behind the provider's [`Lifecycle`] gate, so
/// no provider can forget graceful shutdown (P20).
#[async_trait]
pub trait Provider: Send + Sync + 'static {
    /// Type, name, version, operations.
    fn metadata(&self) -> ProviderMetadata;
    /// The provider's start/stop gate.
    fn lifecycle(&self) -> &Lifecycle;
    /// Runs one admitted invocation whose caller holds `granted` for `invocation.capability_id`. Never panics
    /// on any input: bad params are INVALID_REQUEST, missing permission PERMISSION_DENIED.
    async fn handle(&self, invocation: &CapabilityInvocation, granted: &[Permission]) -> CapabilityResponse;

    /// Prepares the provider; invocations before it are PROVIDER_UNAVAILABLE.
    async fn initialize(&self) -> Result<(), ErrorResponse> {
        self.lifecycle().start();
        Ok(())
    }
    /// Runs one invocation, or refuses it with PROVIDER_UNAVAILABLE once shutdown has begun.
    async fn invoke(&self, invocation: &CapabilityInvocation, granted: &[Permission]) -> CapabilityResponse {
        let Some(_in_flight) = self.lifecycle().enter() else {
            return unavailable(&self.metadata());
        };
        self.handle(invocation, granted).await
    }
    /// Stops the provider: new invocations are refused, those in flight finish first (P20).
    async fn shutdown(&self) -> Result<(), ErrorResponse> {
        self.lifecycle().shutdown().await;
        Ok(())
    }
}

/// The refusal a provider gives when it is not running.
pub fn unavailable(metadata: &ProviderMetadata) -> CapabilityResponse {
    CapabilityResponse::err(&ErrorResponse::new(
        factum_proto::ErrorCode::ProviderUnavailable,
        format!("provider {} is not running", metadata.name),
    ))
}

/// Start/stop gate shared by providers, for graceful shutdown (P20): once [`Lifecycle::shutdown`] begins, new
/// invocations are refused (PROVIDER_UNAVAILABLE) and it returns when the ones already inside have finished.
pub struct Lifecycle {
    running: std::sync::atomic::AtomicBool,
    in_flight: std::sync::atomic::AtomicUsize,
    idle: tokio::sync::Notify,
}

/// Held by one invocation while it runs; see [`Lifecycle::enter`].
pub struct InFlight<'a>(&'a Lifecycle);

impl Lifecycle {
    /// A running gate.
    pub fn new() -> Self {
        Lifecycle {
            running: std::sync::atomic::AtomicBool::new(true),
            in_flight: std::sync::atomic::AtomicUsize::new(0),
            idle: tokio::sync::Notify::new(),
        }
    }

    /// Admits one invocation, or `None` once shutdown has begun.
    pub fn enter(&self) -> Option<InFlight<'_>> {
        use std::sync::atomic::Ordering::SeqCst;
        self.in_flight.fetch_add(1, SeqCst);
        let guard = InFlight(self);
        // Checked after counting in, so a shutdown that saw zero in flight cannot miss this invocation.
        self.running.load(SeqCst).then_some(guard)
    }

    /// Accepts invocations again.
    pub fn start(&self) {
        self.running.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether invocations are accepted.
    pub fn is_running(&self) -> bool {
        self.running.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Refuses new invocations and waits for those in flight to finish.
    pub async fn shutdown(&self) {
        use std::sync::atomic::Ordering::SeqCst;
        self.running.store(false, SeqCst);
        loop {
            let idle = self.idle.notified();
            if self.in_flight.load(SeqCst) == 0 {
                return;
            }
            idle.await;
        }
    }
}

impl Default for Lifecycle {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, std::sync::atomic::Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}
