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
    ProviderMetadata, SealedGrant,
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

/// One connection's server: the provider, the key that checks grants, and the node at the other end.
#[derive(Clone)]
struct Server {
    provider: Arc<dyn Provider>,
    key: Arc<GrantKey>,
    node: String,
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
        self.key.check(grant, invocation, &self.node)?;
        let (kind, granted) = parse_permissions(&grant.permissions)?;
        let serves = self.provider.metadata().provider_type;
        if kind != serves {
            return Err(ErrorResponse::permission_denied(format!(
                "capability {:?} is a {kind} grant; this provider serves {serves}",
                invocation.capability_id
            )));
        }
        Ok(granted)
    }
}

/// Serves `provider` on `listener` to node agents, forever; `key` checks the grants they send. A connection
/// that is not a node agent's is refused at its hello.
pub async fn serve(env: Env, provider: Arc<dyn Provider>, key: GrantKey, listener: Box<dyn Listener>) {
    let key = Arc::new(key);
    let what = format!("provider {}", provider.metadata().name);
    factum_env::serve_tarpc!(env, listener, &what, move |peer: &rpc::Peer| match &peer.principal {
        Principal::Node(node) => {
            Ok(Server { provider: provider.clone(), key: key.clone(), node: node.clone() }.serve())
        }
        other => Err(format!("a provider serves node agents only; this connection is {other}")),
    });
}

/// A provider on another host, reached over the env's network: dialled on first use, dialled anew after a
/// failure, every call bounded on the env clock. A call that cannot reach the provider, or gets no answer in
/// time, is PROVIDER_UNAVAILABLE, never a hang.
pub struct RemoteProvider {
    addr: String,
    client: rpc::Redial<ProviderApiClient>,
}

impl RemoteProvider {
    /// A client of provider host `provider` at `addr`, with `timeout` per dial and per call. `env` must introduce
    /// itself as the calling node (`Principal::Node`): a provider host serves nobody else.
    pub fn new(env: Env, addr: impl Into<String>, provider: Principal, timeout: Duration) -> Self {
        let addr = addr.into();
        let client = rpc::Redial::new(env, addr.clone(), provider, timeout, |env, stream| {
            rpc::start_client(env, ProviderApiClient::new(tarpc::client::Config::default(), rpc::transport(stream)))
        });
        RemoteProvider { addr, client }
    }

    /// Where the provider is.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Runs `invocation` on the provider under `grant`.
    pub async fn invoke(&self, invocation: CapabilityInvocation, grant: SealedGrant) -> CapabilityResponse {
        let call = |c: ProviderApiClient| async move { c.invoke(rpc::rpc_context(), invocation, grant).await };
        match self.client.call(Duration::ZERO, call).await {
            Ok(response) => response,
            Err(why) => CapabilityResponse::err(&ErrorResponse::new(
                ErrorCode::ProviderUnavailable,
                format!("remote provider unavailable: {why}"),
            )),
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
