//! factum's typed Rust client: one method per control-plane call, and followers of the event journal and of
//! an instance's output. Every error is an [`ErrorResponse`] with the design's codes: a call that could not
//! reach the control plane, or got no answer in time, is `COMMUNICATION_FAILURE`.
//!
//! ```no_run
//! use factum_client::{Client, Credentials};
//! use factum_client::proto::{Principal, StartRequest};
//!
//! # async fn demo(module_bytes: Vec<u8>) -> Result<(), factum_client::proto::ErrorResponse> {
//! let operator = Credentials::claim(Principal::Operator("me".into())); // plaintext: loopback only
//! let client = Client::connect("127.0.0.1:7600", operator).await?;
//! let id = client.start(StartRequest { module_bytes, ..StartRequest::default() }).await?;
//! println!("{id}: {}", client.query(&id).await?.metadata.status);
//! # Ok(()) }
//! ```
//!
//! See `examples/watch.rs` for a program that starts an instance and follows the events it causes.

use std::future::Future;
use std::time::Duration;

use factum_env::{rpc, Env};
use factum_proto::events::EventPage;
use factum_proto::journal::Page;
use factum_proto::logs::LogPage;
use factum_proto::{ControlPlaneClient, InstanceDetails, InstanceMetadata, KvEntry, NodeInfo, Principal, StartRequest};
use futures::Stream;
use tarpc::client::RpcError;
use tarpc::context::Context;

pub use factum_env::rpc::tls::Tls;
pub use factum_env::rpc::Credentials;
pub use factum_proto as proto;
pub use factum_proto::ErrorResponse;

/// How long a call waits for its answer unless [`Client::with_timeout`] says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// How often a follower ([`Client::follow_events`], [`Client::follow_logs`]) asks for new entries.
pub const FOLLOW_POLL: Duration = Duration::from_millis(500);

/// How many times [`Client::start`] sends one start whose answer does not arrive.
const START_ATTEMPTS: u32 = 3;

/// A connection to a control plane, as one identity. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct Client {
    env: Env,
    addr: String,
    rpc: ControlPlaneClient,
    timeout: Duration,
}

impl Client {
    /// Connects to the control plane at `addr` as `credentials` say: with TLS, the identity is the one in the
    /// certificate; without, it is claimed, and a TLS control plane refuses the connection.
    pub async fn connect(addr: impl Into<String>, credentials: Credentials) -> Result<Client, ErrorResponse> {
        let env = Env::tokio().with_credentials(credentials);
        let addr = addr.into();
        let rpc = dial(&env, &addr, DEFAULT_TIMEOUT).await?;
        Ok(Client { env, addr, rpc, timeout: DEFAULT_TIMEOUT })
    }

    /// The same connection, waiting up to `timeout` for each answer.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The control plane's address.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// StartInstance; returns the instance id. Safe to repeat: the id is drawn here when the request names
    /// none, and while an answer is lost the same start is sent again on a new connection (up to three times,
    /// one correlation id), which the control plane answers without starting it twice. A
    /// `COMMUNICATION_FAILURE` therefore means the instance may or may not have started: query its id.
    ///
    /// The module goes by hash first: a control plane that already holds it (another instance runs it) starts
    /// it without its bytes crossing the network again; one that does not says so, and the bytes follow.
    pub async fn start(&self, mut request: StartRequest) -> Result<String, ErrorResponse> {
        request.instance_id.get_or_insert_with(|| self.env.random_id("i-"));
        if request.module_hash.is_none() && !request.module_bytes.is_empty() {
            let hash = factum_proto::module_hash(&request.module_bytes);
            let bytes = std::mem::take(&mut request.module_bytes);
            request.module_hash = Some(hash);
            match self.start_once(request.clone()).await {
                Err(e) if e.is_module_not_held() => request.module_bytes = bytes,
                answer => return answer,
            }
        }
        self.start_once(request).await
    }

    /// One [`Client::start`] as `request` says, resent while its answer is lost.
    async fn start_once(&self, request: StartRequest) -> Result<String, ErrorResponse> {
        let id = request.instance_id.clone().unwrap_or_default();
        let ctx = rpc::traced_context(&self.env);
        let mut rpc = self.rpc.clone();
        let mut attempt = 1;
        loop {
            let answer = self.answer(rpc.start_instance(ctx, request.clone())).await;
            match answer {
                Err(e) if e.error_code == factum_proto::ErrorCode::CommunicationFailure && attempt < START_ATTEMPTS => {
                    tracing::warn!(instance_id = %id, attempt, "no answer to the start ({}); sending the same start again", e.message);
                    self.env.clock.sleep(Duration::from_secs(u64::from(attempt))).await;
                    attempt += 1;
                    rpc = match dial(&self.env, &self.addr, self.timeout).await {
                        Ok(rpc) => rpc,
                        Err(e) => return Err(may_have_started(e, &id)),
                    };
                }
                Err(e) if e.error_code == factum_proto::ErrorCode::CommunicationFailure => {
                    return Err(may_have_started(e, &id))
                }
                answer => return answer,
            }
        }
    }

    /// StopInstance. Stopping a stopped instance succeeds.
    pub async fn stop(&self, instance_id: &str) -> Result<(), ErrorResponse> {
        self.call(|c, ctx| c.stop_instance(ctx, instance_id.to_string())).await
    }

    /// RestartInstance: ends its run, if any, and starts it again with fresh memory on its node.
    pub async fn restart(&self, instance_id: &str) -> Result<(), ErrorResponse> {
        self.call(|c, ctx| c.restart_instance(ctx, instance_id.to_string())).await
    }

    /// QueryInstance: its latest facts, capabilities, restart policy and configuration.
    pub async fn query(&self, instance_id: &str) -> Result<InstanceDetails, ErrorResponse> {
        self.call(|c, ctx| c.query_instance(ctx, instance_id.to_string())).await
    }

    /// ListInstances, ordered by id.
    pub async fn list(&self) -> Result<Vec<InstanceMetadata>, ErrorResponse> {
        self.call(|c, ctx| c.list_instances(ctx)).await
    }

    /// AssignCapability: adds or replaces one capability; in force from the instance's next call.
    pub async fn assign(
        &self,
        instance_id: &str,
        capability_id: &str,
        permissions: &[String],
    ) -> Result<(), ErrorResponse> {
        self.call(|c, ctx| c.assign_capability(ctx, instance_id.into(), capability_id.into(), permissions.to_vec()))
            .await
    }

    /// RevokeCapability: the instance's next call on it is `PERMISSION_DENIED`.
    pub async fn revoke(&self, instance_id: &str, capability_id: &str) -> Result<(), ErrorResponse> {
        self.call(|c, ctx| c.revoke_capability(ctx, instance_id.into(), capability_id.into())).await
    }

    /// RemoveInstance: forgets an ended instance everywhere; `INVALID_REQUEST` while it runs.
    pub async fn remove(&self, instance_id: &str) -> Result<(), ErrorResponse> {
        self.call(|c, ctx| c.remove_instance(ctx, instance_id.to_string())).await
    }

    /// Nodes and their availability.
    pub async fn nodes(&self) -> Result<Vec<NodeInfo>, ErrorResponse> {
        self.call(|c, ctx| c.list_nodes(ctx)).await
    }

    /// Drains a node (`drained: false` undoes it): it takes no new instances, and its instances that a failure
    /// would restart are stopped there and started elsewhere, one at a time. Answers what moved and what stayed.
    pub async fn drain(&self, node_id: &str, drained: bool) -> Result<factum_proto::DrainReport, ErrorResponse> {
        self.call(|c, ctx| c.drain_node(ctx, node_id.to_string(), drained)).await
    }

    /// An operator's view of a KV store on every node: keys starting with `prefix`.
    pub async fn inspect_kv(&self, capability_id: &str, prefix: &str) -> Result<Vec<KvEntry>, ErrorResponse> {
        self.call(|c, ctx| c.inspect_kv(ctx, capability_id.into(), prefix.into())).await
    }

    /// One page of an instance's output after line `after` (0: from the oldest its node holds).
    pub async fn logs(&self, instance_id: &str, after: u64) -> Result<LogPage, ErrorResponse> {
        self.call(|c, ctx| c.instance_logs(ctx, instance_id.to_string(), after)).await
    }

    /// One page of the control plane's events after number `after` (0: from the oldest it holds).
    pub async fn events(&self, after: u64) -> Result<EventPage, ErrorResponse> {
        self.call(|c, ctx| c.events(ctx, after)).await
    }

    /// The control plane's events after number `after` (0: from the oldest it holds), page by page; with
    /// `follow`, new ones as they come (asked for every [`FOLLOW_POLL`]) until dropped, else it ends once
    /// caught up. A page's `evicted` counts events no longer held when asked for. The stream ends after its
    /// first error.
    pub fn follow_events(&self, after: u64, follow: bool) -> impl Stream<Item = Result<EventPage, ErrorResponse>> + '_ {
        self.follow(after, follow, move |client, after| async move { client.events(after).await })
    }

    /// An instance's output after line `after`, page by page, like [`Client::follow_events`].
    pub fn follow_logs<'a>(
        &'a self,
        instance_id: &'a str,
        after: u64,
        follow: bool,
    ) -> impl Stream<Item = Result<LogPage, ErrorResponse>> + 'a {
        self.follow(after, follow, move |client, after| async move { client.logs(instance_id, after).await })
    }

    /// The number of the newest event the control plane holds (0: none), to follow only what comes next.
    pub async fn last_event(&self) -> Result<u64, ErrorResponse> {
        let mut after = 0;
        loop {
            let page = self.events(after).await?;
            if page.entries.is_empty() {
                return Ok(page.next);
            }
            after = page.next;
        }
    }

    /// Pages of a journal after the last one read: non-empty ones (or ones telling of evicted entries).
    fn follow<'a, T, F, Fut>(
        &'a self,
        after: u64,
        follow: bool,
        fetch: F,
    ) -> impl Stream<Item = Result<Page<T>, ErrorResponse>> + 'a
    where
        T: 'a,
        F: Fn(&'a Client, u64) -> Fut + 'a,
        Fut: Future<Output = Result<Page<T>, ErrorResponse>> + 'a,
    {
        futures::stream::unfold((Some(after), fetch), move |(after, fetch)| async move {
            let mut after = after?; // `None`: ended after an error
            loop {
                match fetch(self, after).await {
                    Err(e) => return Some((Err(e), (None, fetch))),
                    Ok(page) if !page.entries.is_empty() || page.evicted > 0 => {
                        let next = page.next;
                        return Some((Ok(page), (Some(next), fetch)));
                    }
                    Ok(page) if follow => {
                        after = page.next;
                        self.env.clock.sleep(FOLLOW_POLL).await;
                    }
                    Ok(_) => return None,
                }
            }
        })
    }

    /// Makes one call with a fresh correlation id.
    async fn call<'a, T, Fut>(
        &'a self,
        make: impl FnOnce(&'a ControlPlaneClient, Context) -> Fut,
    ) -> Result<T, ErrorResponse>
    where
        Fut: Future<Output = Result<Result<T, ErrorResponse>, RpcError>>,
    {
        self.answer(make(&self.rpc, rpc::traced_context(&self.env))).await
    }

    /// Awaits an answer with the timeout, flattening transport failures into `COMMUNICATION_FAILURE`.
    async fn answer<T>(
        &self,
        call: impl Future<Output = Result<Result<T, ErrorResponse>, RpcError>>,
    ) -> Result<T, ErrorResponse> {
        match self.env.timeout(self.timeout, call).await {
            Some(Ok(answer)) => answer,
            Some(Err(e)) => Err(ErrorResponse::communication(rpc::describe(&e))),
            None => Err(ErrorResponse::communication(format!(
                "the control plane at {} did not answer within {:?}",
                self.addr, self.timeout
            ))),
        }
    }
}

/// A failed start whose id the caller needs to find out what happened.
fn may_have_started(e: ErrorResponse, id: &str) -> ErrorResponse {
    let message =
        format!("{}; instance {id} may or may not have started: query it, or send the same start again", e.message);
    ErrorResponse::new(e.error_code, message).with_detail("instance_id", id)
}

/// Opens a connection to the control plane, its errors in the design's codes.
async fn dial(env: &Env, addr: &str, timeout: Duration) -> Result<ControlPlaneClient, ErrorResponse> {
    let stream = env
        .timeout(timeout, rpc::dial(env, addr, &Principal::ControlPlane))
        .await
        .ok_or_else(|| ErrorResponse::communication(format!("connecting to {addr} timed out")))?
        .map_err(|e| {
            use std::io::ErrorKind::{ConnectionRefused, NotFound, PermissionDenied};
            match e.kind() {
                PermissionDenied => ErrorResponse::permission_denied(e.to_string()),
                ConnectionRefused | NotFound => ErrorResponse::communication(format!(
                    "cannot reach the control plane at {addr} (is `factum up` running?): {e}"
                )),
                _ => ErrorResponse::communication(format!("the control plane at {addr} could not be called: {e}")),
            }
        })?;
    let config = tarpc::client::Config::default();
    Ok(rpc::start_client(env, ControlPlaneClient::new(config, rpc::transport(stream))))
}
