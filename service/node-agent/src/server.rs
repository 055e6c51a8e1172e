//! The agent's tarpc server: the [`NodeAgent`] service the control plane calls.

use factum_env::Listener;
use factum_proto::{
    CapabilityAssignment, ErrorResponse, GrantSeal, InstanceFacts, InstanceStatus, KvEntry, NodeAgent, NodeReport,
    SnapshotMark, StartInstanceRequest, StartInstanceResponse, StopInstanceRequest, StopInstanceResponse,
};
use tarpc::context::Context;

use crate::Agent;

impl NodeAgent for Agent {
    async fn start_instance_local(self, _: Context, request: StartInstanceRequest) -> StartInstanceResponse {
        match self.start_instance(request).await {
            Ok(facts) => StartInstanceResponse { success: true, error: None, facts: Some(facts) },
            Err(e) => StartInstanceResponse { success: false, error: Some(e), facts: None },
        }
    }

    async fn stop_instance_local(self, _: Context, request: StopInstanceRequest) -> StopInstanceResponse {
        match self.stop_instance(&request.instance_id) {
            Ok(facts) => StopInstanceResponse { success: true, error: None, facts: Some(facts) },
            Err(e) => StopInstanceResponse { success: false, error: Some(e), facts: None },
        }
    }

    async fn restart_instance(self, _: Context, instance_id: String) -> Result<(), ErrorResponse> {
        Agent::restart_instance(&self, &instance_id).await
    }

    async fn get_instance_status(self, _: Context, instance_id: String) -> Result<InstanceStatus, ErrorResponse> {
        self.status(&instance_id)
    }

    async fn list_local_instances(self, _: Context) -> NodeReport {
        self.node_report()
    }

    async fn assign_capability(
        self,
        _: Context,
        assignment: CapabilityAssignment,
        seal: GrantSeal,
    ) -> Result<InstanceFacts, ErrorResponse> {
        Agent::assign_capability(&self, assignment, seal)
    }

    async fn revoke_capability(
        self,
        _: Context,
        instance_id: String,
        capability_id: String,
    ) -> Result<InstanceFacts, ErrorResponse> {
        Agent::revoke_capability(&self, &instance_id, &capability_id)
    }

    async fn inspect_kv(
        self,
        _: Context,
        capability_id: String,
        prefix: String,
    ) -> Result<Vec<KvEntry>, ErrorResponse> {
        Agent::inspect_kv(&self, &capability_id, &prefix).await
    }

    async fn instance_logs(
        self,
        _: Context,
        instance_id: String,
        after: u64,
    ) -> Result<factum_proto::logs::LogPage, ErrorResponse> {
        self.logs(&instance_id, after)
    }

    async fn set_drained(self, _: Context, drained: bool) {
        Agent::set_drained(&self, drained)
    }

    async fn remove_instance_local(self, _: Context, instance_id: String) -> Result<SnapshotMark, ErrorResponse> {
        self.remove_instance(&instance_id)
    }

    async fn module_bytes(self, _: Context, module_hash: String) -> Result<Vec<u8>, ErrorResponse> {
        Agent::module_bytes(&self, &module_hash)
    }
}

/// Serves the agent's API on `listener` until the listener fails. Only the control plane is served: every other
/// peer is refused when it introduces itself, with the reason.
pub async fn serve(agent: Agent, listener: Box<dyn Listener>) {
    let env = agent.inner.env.clone();
    factum_env::serve_tarpc!(env, listener, "agent", move |peer: &factum_env::rpc::Peer| {
        match peer.principal.require_control_plane("calling a node agent") {
            Ok(()) => Ok(agent.clone().serve()),
            Err(refused) => Err(refused.message),
        }
    });
}
