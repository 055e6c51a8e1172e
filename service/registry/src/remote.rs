//! A registry served over tarpc, so a registry can live on its own host. The simulation runs a
//! [`crate::MemoryRegistry`] this way as its etcd: it can crash, be partitioned and lose messages like any host.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use factum_env::{rpc, Env, Listener};
use tarpc::context::Context;

use crate::{LeaseId, Membership, NodeRegistration, ProviderRecord, Registry, RegistryError};

/// The registry's wire API: [`Registry`], call for call.
#[tarpc::service]
pub trait RegistryApi {
    /// See [`Registry::grant_lease`].
    async fn grant_lease(ttl: Duration) -> Result<LeaseId, RegistryError>;
    /// See [`Registry::keep_alive`].
    async fn keep_alive(lease: LeaseId) -> Result<(), RegistryError>;
    /// See [`Registry::revoke_lease`].
    async fn revoke_lease(lease: LeaseId) -> Result<(), RegistryError>;
    /// See [`Registry::register_node`].
    async fn register_node(node: NodeRegistration, lease: LeaseId) -> Result<(), RegistryError>;
    /// See [`Registry::membership`].
    async fn membership() -> Result<Membership, RegistryError>;
    /// See [`Registry::watch_membership`].
    async fn watch_membership(after_revision: u64, max_wait: Duration) -> Result<Membership, RegistryError>;
    /// See [`Registry::put_provider`].
    async fn put_provider(provider: ProviderRecord, lease: Option<LeaseId>) -> Result<(), RegistryError>;
    /// See [`Registry::providers`].
    async fn providers() -> Result<Vec<ProviderRecord>, RegistryError>;
    /// See [`Registry::keys`].
    async fn keys() -> Result<Vec<String>, RegistryError>;
}

#[derive(Clone)]
struct Server(Arc<dyn Registry>);

impl RegistryApi for Server {
    async fn grant_lease(self, _: Context, ttl: Duration) -> Result<LeaseId, RegistryError> {
        self.0.grant_lease(ttl).await
    }
    async fn keep_alive(self, _: Context, lease: LeaseId) -> Result<(), RegistryError> {
        self.0.keep_alive(lease).await
    }
    async fn revoke_lease(self, _: Context, lease: LeaseId) -> Result<(), RegistryError> {
        self.0.revoke_lease(lease).await
    }
    async fn register_node(self, _: Context, node: NodeRegistration, lease: LeaseId) -> Result<(), RegistryError> {
        self.0.register_node(&node, lease).await
    }
    async fn membership(self, _: Context) -> Result<Membership, RegistryError> {
        self.0.membership().await
    }
    async fn watch_membership(
        self,
        _: Context,
        after_revision: u64,
        max_wait: Duration,
    ) -> Result<Membership, RegistryError> {
        self.0.watch_membership(after_revision, max_wait).await
    }
    async fn put_provider(
        self,
        _: Context,
        provider: ProviderRecord,
        lease: Option<LeaseId>,
    ) -> Result<(), RegistryError> {
        self.0.put_provider(&provider, lease).await
    }
    async fn providers(self, _: Context) -> Result<Vec<ProviderRecord>, RegistryError> {
        self.0.providers().await
    }
    async fn keys(self, _: Context) -> Result<Vec<String>, RegistryError> {
        self.0.keys().await
    }
}

/// Serves `registry` on `listener` until the listener fails, spawning on `env`.
pub async fn serve(env: Env, registry: Arc<dyn Registry>, listener: Box<dyn Listener>) {
    // A stand-in for etcd (in simulation): its peers are whoever the cluster's components say they are.
    factum_env::serve_tarpc!(env, listener, "registry", move |_: &rpc::Peer| Ok(Server(registry.clone()).serve()));
}

/// A [`Registry`] reached over the env's network. Connects lazily, reconnects after a failure, and bounds every
/// call with a deadline on the env clock; a failed or late call is [`RegistryError::Unavailable`].
pub struct RemoteRegistry(rpc::Redial<RegistryApiClient>);

impl RemoteRegistry {
    /// A client of the registry served at `addr`, with `timeout` per call.
    pub fn new(env: Env, addr: impl Into<String>, timeout: Duration) -> Self {
        // The simulation's etcd holds no identity of its own (the simulator's network carries no TLS).
        let server = factum_proto::Principal::Anonymous;
        RemoteRegistry(rpc::Redial::new(env, addr, server, timeout, |env, stream| {
            rpc::start_client(env, RegistryApiClient::new(tarpc::client::Config::default(), rpc::transport(stream)))
        }))
    }

    async fn call<T, F, Fut>(&self, extra: Duration, call: F) -> Result<T, RegistryError>
    where
        F: FnOnce(RegistryApiClient) -> Fut,
        Fut: std::future::Future<Output = Result<Result<T, RegistryError>, tarpc::client::RpcError>>,
    {
        self.0.call(extra, call).await.unwrap_or_else(|why| Err(RegistryError::Unavailable(format!("registry: {why}"))))
    }
}

#[async_trait]
impl Registry for RemoteRegistry {
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, RegistryError> {
        self.call(Duration::ZERO, |c| async move { c.grant_lease(rpc::rpc_context(), ttl).await }).await
    }
    async fn keep_alive(&self, lease: LeaseId) -> Result<(), RegistryError> {
        self.call(Duration::ZERO, |c| async move { c.keep_alive(rpc::rpc_context(), lease).await }).await
    }
    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), RegistryError> {
        self.call(Duration::ZERO, |c| async move { c.revoke_lease(rpc::rpc_context(), lease).await }).await
    }
    async fn register_node(&self, node: &NodeRegistration, lease: LeaseId) -> Result<(), RegistryError> {
        let node = node.clone();
        self.call(Duration::ZERO, |c| async move { c.register_node(rpc::rpc_context(), node, lease).await }).await
    }
    async fn membership(&self) -> Result<Membership, RegistryError> {
        self.call(Duration::ZERO, |c| async move { c.membership(rpc::rpc_context()).await }).await
    }
    async fn watch_membership(&self, after_revision: u64, max_wait: Duration) -> Result<Membership, RegistryError> {
        self.call(max_wait, |c| async move { c.watch_membership(rpc::rpc_context(), after_revision, max_wait).await })
            .await
    }
    async fn put_provider(&self, provider: &ProviderRecord, lease: Option<LeaseId>) -> Result<(), RegistryError> {
        let provider = provider.clone();
        self.call(Duration::ZERO, |c| async move { c.put_provider(rpc::rpc_context(), provider, lease).await }).await
    }
    async fn providers(&self) -> Result<Vec<ProviderRecord>, RegistryError> {
        self.call(Duration::ZERO, |c| async move { c.providers(rpc::rpc_context()).await }).await
    }
    async fn keys(&self) -> Result<Vec<String>, RegistryError> {
        self.call(Duration::ZERO, |c| async move { c.keys(rpc::rpc_context()).await }).await
    }
}
