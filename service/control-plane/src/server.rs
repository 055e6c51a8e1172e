//! The control plane's tarpc server.

use factum_env::Listener;
use factum_proto::{
    ErrorResponse, InstanceDetails, InstanceMetadata, KvEntry, NodeInfo, NodeReport, StartRequest, StatusReport,
};
use tarpc::context::Context;

use crate::ControlPlane;

impl factum_proto::ControlPlane for ControlPlane {
    async fn start_instance(self, _: Context, request: StartRequest) -> Result<String, ErrorResponse> {
        ControlPlane::start_instance(&self, request).await
    }

    async fn stop_instance(self, _: Context, instance_id: String) -> Result<(), ErrorResponse> {
        ControlPlane::stop_instance(&self, &instance_id).await
    }

    async fn query_instance(self, _: Context, instance_id: String) -> Result<InstanceDetails, ErrorResponse> {
        ControlPlane::query_instance(&self, &instance_id)
    }

    async fn list_instances(self, _: Context) -> Vec<InstanceMetadata> {
        ControlPlane::list_instances(&self)
    }

    async fn assign_capability(
        self,
        _: Context,
        instance_id: String,
        capability_id: String,
        permissions: Vec<String>,
    ) -> Result<(), ErrorResponse> {
        ControlPlane::assign_capability(&self, &instance_id, &capability_id, &permissions).await
    }

    async fn revoke_capability(
        self,
        _: Context,
        instance_id: String,
        capability_id: String,
    ) -> Result<(), ErrorResponse> {
        ControlPlane::revoke_capability(&self, &instance_id, &capability_id).await
    }

    async fn list_nodes(self, _: Context) -> Vec<NodeInfo> {
        ControlPlane::list_nodes(&self)
    }

    async fn inspect_kv(
        self,
        _: Context,
        capability_id: String,
        prefix: String,
    ) -> Result<Vec<KvEntry>, ErrorResponse> {
        ControlPlane::inspect_kv(&self, &capability_id, &prefix).await
    }

    async fn report_node(self, _: Context, report: NodeReport) -> Result<(), ErrorResponse> {
        ControlPlane::report_node(&self, report)
    }

    async fn report_status(self, _: Context, report: StatusReport) -> Result<(), ErrorResponse> {
        ControlPlane::report_status(&self, report);
        Ok(())
    }
}

/// Serves the control plane's API on `listener` until the listener fails.
pub async fn serve(control_plane: ControlPlane, listener: Box<dyn Listener>) {
    use factum_proto::ControlPlane as _;
    factum_env::serve_tarpc!(control_plane.inner.env, listener, "control plane", control_plane.clone().serve());
}
