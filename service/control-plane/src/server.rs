//! The control plane's tarpc server: one [`Session`] per connection, which checks every call against the
//! peer's identity before the control plane sees it, and audits what operators do and what is refused.

use factum_env::rpc::{hello::AUDIT, Peer};
use factum_env::Listener;
use factum_proto::{
    ErrorResponse, InstanceDetails, InstanceMetadata, KvEntry, NodeAck, NodeInfo, NodeReport, Principal, StartRequest,
    StatusReport,
};
use tarpc::context::Context;

use crate::ControlPlane;

/// The control plane as one connection's peer sees it.
#[derive(Clone)]
pub struct Session {
    control_plane: ControlPlane,
    peer: Peer,
}

impl Session {
    /// Serves `peer` from `control_plane`.
    pub fn new(control_plane: ControlPlane, peer: Peer) -> Self {
        Session { control_plane, peer }
    }

    /// Runs an operator call on `target` if the peer may operate, and audits it either way.
    async fn operate<T>(
        &self,
        ctx: &Context,
        action: &str,
        target: &str,
        call: impl std::future::Future<Output = Result<T, ErrorResponse>>,
    ) -> Result<T, ErrorResponse> {
        let result = match self.peer.principal.require_operator(action) {
            Ok(()) => call.await,
            Err(refused) => Err(refused),
        };
        self.audit(ctx, action, target, &result);
        result
    }

    /// Passes `check` on the peer's principal through, auditing only a refusal: reads and reports are too
    /// frequent to audit when allowed, and a refused one (a forged report above all) must be seen.
    fn admitted(
        &self,
        ctx: &Context,
        action: &str,
        target: &str,
        check: impl FnOnce(&Principal, &str) -> Result<(), ErrorResponse>,
    ) -> Result<(), ErrorResponse> {
        let allowed = check(&self.peer.principal, action);
        if allowed.is_err() {
            self.audit(ctx, action, target, &allowed);
        }
        allowed
    }

    /// Runs `call`, counting it and its latency under `method`.
    async fn measured<T>(
        &self,
        method: &str,
        call: impl std::future::Future<Output = Result<T, ErrorResponse>>,
    ) -> Result<T, ErrorResponse> {
        let inner = &self.control_plane.inner;
        let began = inner.env.clock.now();
        let result = call.await;
        let took = inner.env.clock.now().saturating_sub(began);
        inner.metrics.call(method, result.as_ref().err().map(|e| e.error_code), took);
        result
    }

    fn audit<T>(&self, ctx: &Context, action: &str, target: &str, result: &Result<T, ErrorResponse>) {
        // The caller's trace id (the CLI draws one per command; 0 from a client that sets none).
        let (principal, peer, correlation) = (&self.peer.principal, &self.peer.addr, ctx.trace_id());
        match result {
            Ok(_) => tracing::info!(target: AUDIT, %principal, %peer, action, target, result = "ok", %correlation),
            Err(e) => tracing::warn!(target: AUDIT, %principal, %peer, action, target, result = e.error_code.as_str(),
                %correlation, "{}", e.message),
        }
    }
}

impl factum_proto::ControlPlane for Session {
    async fn start_instance(self, ctx: Context, request: StartRequest) -> Result<String, ErrorResponse> {
        self.measured("start_instance", async {
            let target = request.instance_id.clone().unwrap_or_default();
            self.operate(&ctx, "start_instance", &target, self.control_plane.start_instance(request)).await
        })
        .await
    }

    async fn stop_instance(self, ctx: Context, instance_id: String) -> Result<(), ErrorResponse> {
        self.measured("stop_instance", async {
            self.operate(&ctx, "stop_instance", &instance_id, self.control_plane.stop_instance(&instance_id)).await
        })
        .await
    }

    async fn restart_instance(self, ctx: Context, instance_id: String) -> Result<(), ErrorResponse> {
        self.measured("restart_instance", async {
            self.operate(&ctx, "restart_instance", &instance_id, self.control_plane.restart_instance(&instance_id))
                .await
        })
        .await
    }

    async fn remove_instance(self, ctx: Context, instance_id: String) -> Result<(), ErrorResponse> {
        self.measured("remove_instance", async {
            self.operate(&ctx, "remove_instance", &instance_id, self.control_plane.remove_instance(&instance_id)).await
        })
        .await
    }

    async fn query_instance(self, ctx: Context, instance_id: String) -> Result<InstanceDetails, ErrorResponse> {
        self.measured("query_instance", async {
            self.admitted(&ctx, "query_instance", &instance_id, Principal::require_reader)?;
            self.control_plane.query_instance(&instance_id)
        })
        .await
    }

    async fn list_instances(self, ctx: Context) -> Result<Vec<InstanceMetadata>, ErrorResponse> {
        self.measured("list_instances", async {
            self.admitted(&ctx, "list_instances", "", Principal::require_reader)?;
            Ok(self.control_plane.list_instances())
        })
        .await
    }

    async fn assign_capability(
        self,
        ctx: Context,
        instance_id: String,
        capability_id: String,
        permissions: Vec<String>,
    ) -> Result<(), ErrorResponse> {
        self.measured("assign_capability", async {
            let target = format!("{instance_id} {capability_id}");
            let call = self.control_plane.assign_capability(&instance_id, &capability_id, &permissions);
            self.operate(&ctx, "assign_capability", &target, call).await
        })
        .await
    }

    async fn revoke_capability(
        self,
        ctx: Context,
        instance_id: String,
        capability_id: String,
    ) -> Result<(), ErrorResponse> {
        self.measured("revoke_capability", async {
            let target = format!("{instance_id} {capability_id}");
            let call = self.control_plane.revoke_capability(&instance_id, &capability_id);
            self.operate(&ctx, "revoke_capability", &target, call).await
        })
        .await
    }

    async fn list_nodes(self, ctx: Context) -> Result<Vec<NodeInfo>, ErrorResponse> {
        self.measured("list_nodes", async {
            self.admitted(&ctx, "list_nodes", "", Principal::require_reader)?;
            Ok(self.control_plane.list_nodes())
        })
        .await
    }

    async fn drain_node(
        self,
        ctx: Context,
        node_id: String,
        drained: bool,
    ) -> Result<factum_proto::DrainReport, ErrorResponse> {
        self.measured("drain_node", async {
            let action = if drained { "drain_node" } else { "undrain_node" };
            self.operate(&ctx, action, &node_id, self.control_plane.drain_node(&node_id, drained)).await
        })
        .await
    }

    async fn instance_logs(
        self,
        ctx: Context,
        instance_id: String,
        after: u64,
    ) -> Result<factum_proto::logs::LogPage, ErrorResponse> {
        self.measured("instance_logs", async {
            // Guest output is the instance's data, like its KV store: an operator's to read. Only a refusal is
            // audited: a follower asks twice a second.
            self.admitted(&ctx, "instance_logs", &instance_id, Principal::require_operator)?;
            self.control_plane.instance_logs(&instance_id, after).await
        })
        .await
    }

    async fn events(self, ctx: Context, after: u64) -> Result<factum_proto::events::EventPage, ErrorResponse> {
        self.measured("events", async {
            // Facts about instances and nodes, as `list` shows them: a reader's. A follower asks twice a second, so
            // only a refusal is audited.
            self.admitted(&ctx, "events", "", Principal::require_reader)?;
            Ok(self.control_plane.events(after))
        })
        .await
    }

    async fn inspect_kv(
        self,
        ctx: Context,
        capability_id: String,
        prefix: String,
    ) -> Result<Vec<KvEntry>, ErrorResponse> {
        self.measured("inspect_kv", async {
            let call = self.control_plane.inspect_kv(&capability_id, &prefix);
            self.operate(&ctx, "inspect_kv", &capability_id, call).await
        })
        .await
    }

    async fn report_node(self, ctx: Context, report: NodeReport) -> Result<NodeAck, ErrorResponse> {
        self.measured("report_node", async {
            self.admitted(&ctx, "report_node", &report.node_id, |p, action| p.require_node(action, &report.node_id))?;
            self.control_plane.report_node(report)
        })
        .await
    }

    async fn report_status(self, ctx: Context, report: StatusReport) -> Result<(), ErrorResponse> {
        self.measured("report_status", async {
            self.admitted(&ctx, "report_status", &report.node_id, |p, action| p.require_node(action, &report.node_id))?;
            self.control_plane.report_status(report);
            Ok(())
        })
        .await
    }
}

/// Serves the control plane's API on `listener` until the listener fails.
pub async fn serve(control_plane: ControlPlane, listener: Box<dyn Listener>) {
    use factum_proto::ControlPlane as _;
    let env = control_plane.inner.env.clone();
    factum_env::serve_tarpc!(env, listener, "control plane", move |peer: &Peer| {
        Ok(Session::new(control_plane.clone(), peer.clone()).serve())
    });
}
