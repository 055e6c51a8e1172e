//! Providers across the network (design Phase 3, P17): a provider served over tarpc from its own host, and
//! [`RemoteProvider`], what an agent calls it through. An invocation travels unchanged (its params stay
//! MessagePack) beside the grant the control plane sealed for it; the provider host checks the seal itself
//! ([`GrantKey::check`]) and runs the call under the permissions in it, so it never takes an agent's word for a
//! grant. Denials are audited here as well as at the calling agent.

use std::sync::Arc;
use std::time::Duration;

use factum_env::rpc::{self, hello::AUDIT};
use factum_env::{Env, Listener};
use factum_proto::permissions::parse_permissions;
use factum_proto::{
    CapabilityInvocation, CapabilityResponse, ErrorCode, ErrorResponse, GrantKey, Permission, Principal,
    ProviderMetadata, ProviderType, SealedGrant,
};
use tarpc::context::Context;

use crate::Provider;

/// The wire API of a provider host.
#[tarpc::service]
pub trait ProviderApi {
    /// What the provider is.
    async fn metadata() -> ProviderMetadata;
    /// Runs `invocation` for an instance on the calling node, under `grant`.
    async fn invoke(invocation: CapabilityInvocation, grant: SealedGrant) -> CapabilityResponse;
}

/// The trace event of a call a provider host answered (recorded only where the env traces, as in simulation):
/// `provided <node> <outcome> <instance> <capability> <operation> <perm>,<perm>`, where `<node>` is the caller,
/// `<outcome>` is `ok` or an error code and the permissions are the ones the grant claimed (`-`: none).
pub const PROVIDED: &str = "provided";

/// A deliberate bug, for proving that the simulator catches it. Only the `injected-bugs` feature, which the
/// simulator turns on and the `factum` binary does not, can put one into a provider host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostBug {
    /// The seal is not checked: the host takes the caller's word for the grant (breaks P17).
    UncheckedSeals,
    /// The seal is checked, but the call runs with every permission of the kind, not the sealed ones (breaks
    /// P17: an operation the grant does not allow succeeds).
    IgnoredPermissions,
    /// The seal's expiry is not checked: a seal of a grant the control plane stopped renewing (revoked, or its
    /// instance gone) works for ever (breaks P17).
    IgnoredExpiry,
    /// In the agent's client: after one failed call it never dials again, so a host that restarted stays
    /// unavailable to it (breaks liveness: calls must reach the host again once it is back).
    LatchedClient,
    /// In the agent's routing: every call, writes too, goes on to the next host after PROVIDER_UNAVAILABLE, so
    /// a write whose answer was lost may take effect twice (breaks "only idempotent calls are retried").
    RetriedWrites,
}

/// One connection's server: the provider, the key that checks grants, and the node at the other end.
#[derive(Clone)]
struct Server {
    env: Env,
    provider: Arc<dyn Provider>,
    key: Arc<GrantKey>,
    node: String,
    bug: Option<HostBug>,
}

impl ProviderApi for Server {
    async fn metadata(self, _: Context) -> ProviderMetadata {
        self.provider.metadata()
    }

    async fn invoke(self, _: Context, invocation: CapabilityInvocation, grant: SealedGrant) -> CapabilityResponse {
        let response = match self.admit(&invocation, &grant) {
            Ok(granted) => self.provider.invoke(&invocation, &granted).await,
            Err(refused) => CapabilityResponse::err(&refused),
        };
        self.env.trace(|| {
            let outcome = response.error_code().map_or_else(|| "ok".to_string(), |code| format!("{code:?}"));
            let perms = if grant.permissions.is_empty() { "-".to_string() } else { grant.permissions.join(",") };
            let (instance, cap, op) = (&invocation.instance_id, &invocation.capability_id, &invocation.operation);
            format!("{PROVIDED} {} {outcome} {instance} {cap} {op} {perms}", self.node)
        });
        if response.error_code() == Some(ErrorCode::PermissionDenied) {
            let why = response.error.as_ref().map(|e| e.message.as_str()).unwrap_or_default();
            tracing::warn!(target: AUDIT, node = %self.node, instance = %invocation.instance_id,
                capability = %invocation.capability_id, operation = %invocation.operation, result = "denied",
                "provider {} refused a call: {why}", self.provider.metadata().name);
        }
        response
    }
}

impl Server {
    /// The permissions `grant` gives the calling node for `invocation`, if the control plane sealed it and it is
    /// for this provider's kind.
    fn admit(&self, invocation: &CapabilityInvocation, grant: &SealedGrant) -> Result<Vec<Permission>, ErrorResponse> {
        if self.bug != Some(HostBug::UncheckedSeals) {
            let now_ms = if self.bug == Some(HostBug::IgnoredExpiry) { 0 } else { self.env.wall_ms() };
            self.key.check(grant, invocation, &self.node, now_ms)?;
        }
        let (kind, granted) = parse_permissions(&grant.permissions)?;
        let serves = self.provider.metadata().provider_type;
        if kind != serves {
            return Err(ErrorResponse::permission_denied(format!(
                "capability {:?} is a {kind} grant; this provider serves {serves}",
                invocation.capability_id
            )));
        }
        if self.bug == Some(HostBug::IgnoredPermissions) && kind == ProviderType::Kv {
            return Ok(vec![Permission::KvRead, Permission::KvWrite, Permission::KvDelete]);
        }
        Ok(granted)
    }
}

/// Serves `provider` on `listener` to node agents, forever; `key` checks the grants they send. A connection
/// that is not a node agent's is refused at its hello.
pub async fn serve(env: Env, provider: Arc<dyn Provider>, key: GrantKey, listener: Box<dyn Listener>) {
    serve_host(env, provider, key, None, listener).await;
}

/// [`serve`] with `bug` in the host.
#[cfg(feature = "injected-bugs")]
pub async fn serve_with_bug(
    env: Env,
    provider: Arc<dyn Provider>,
    key: GrantKey,
    bug: HostBug,
    listener: Box<dyn Listener>,
) {
    serve_host(env, provider, key, Some(bug), listener).await;
}

async fn serve_host(
    env: Env,
    provider: Arc<dyn Provider>,
    key: GrantKey,
    bug: Option<HostBug>,
    listener: Box<dyn Listener>,
) {
    let key = Arc::new(key);
    let what = format!("provider {}", provider.metadata().name);
    let server_env = env.clone();
    factum_env::serve_tarpc!(env, listener, &what, move |peer: &rpc::Peer| match &peer.principal {
        Principal::Node(node) => Ok(Server {
            env: server_env.clone(),
            provider: provider.clone(),
            key: key.clone(),
            node: node.clone(),
            bug,
        }
        .serve()),
        other => Err(format!("a provider serves node agents only; this connection is {other}")),
    });
}

/// A provider on another host, reached over the env's network: dialled on first use, dialled anew after a
/// failure, every call bounded on the env clock. A call that cannot reach the provider, or gets no answer in
/// time, is PROVIDER_UNAVAILABLE, never a hang.
pub struct RemoteProvider {
    addr: String,
    client: rpc::Redial<ProviderApiClient>,
    /// Set by [`HostBug::LatchedClient`] only.
    latched: Option<std::sync::atomic::AtomicBool>,
}

impl RemoteProvider {
    /// A client of provider host `provider` at `addr`, with `timeout` per dial and per call. `env` must introduce
    /// itself as the calling node (`Principal::Node`): a provider host serves nobody else.
    pub fn new(env: Env, addr: impl Into<String>, provider: Principal, timeout: Duration) -> Self {
        let addr = addr.into();
        let client = rpc::Redial::new(env, addr.clone(), provider, timeout, |env, stream| {
            rpc::start_client(env, ProviderApiClient::new(tarpc::client::Config::default(), rpc::transport(stream)))
        });
        RemoteProvider { addr, client, latched: None }
    }

    /// This client with `bug` in it ([`HostBug::LatchedClient`]; the others are the host's).
    #[cfg(feature = "injected-bugs")]
    pub fn with_injected_bug(mut self, bug: HostBug) -> Self {
        if bug == HostBug::LatchedClient {
            self.latched = Some(std::sync::atomic::AtomicBool::new(false));
        }
        self
    }

    /// Where the provider is.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Runs `invocation` on the provider under `grant`.
    pub async fn invoke(&self, invocation: CapabilityInvocation, grant: SealedGrant) -> CapabilityResponse {
        use std::sync::atomic::Ordering::SeqCst;
        let unavailable = |why| CapabilityResponse::err(&ErrorResponse::new(ErrorCode::ProviderUnavailable, why));
        if self.latched.as_ref().is_some_and(|l| l.load(SeqCst)) {
            return unavailable("remote provider unavailable: latched".to_string());
        }
        let call = |c: ProviderApiClient| async move { c.invoke(rpc::rpc_context(), invocation, grant).await };
        match self.client.call(Duration::ZERO, call).await {
            Ok(response) => response,
            Err(why) => {
                if let Some(latched) = &self.latched {
                    latched.store(true, SeqCst);
                }
                unavailable(format!("remote provider unavailable: {why}"))
            }
        }
    }

    /// The provider's metadata; PROVIDER_UNAVAILABLE if it cannot be asked.
    pub async fn metadata(&self) -> Result<ProviderMetadata, ErrorResponse> {
        let call = |c: ProviderApiClient| async move { c.metadata(rpc::rpc_context()).await };
        self.client.call(Duration::ZERO, call).await.map_err(|why| {
            ErrorResponse::new(ErrorCode::ProviderUnavailable, format!("remote provider unavailable: {why}"))
        })
    }
}
