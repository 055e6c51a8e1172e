//! Helpers shared by the agent's integration tests.
#![allow(dead_code, clippy::unwrap_used)] // each test binary uses some of them

use factum_proto::{CapabilityAssignment, PolicyType, RestartPolicy, StartInstanceRequest};
use factum_wasm::fixtures::module;

/// Restart never.
pub const NEVER: RestartPolicy =
    RestartPolicy { policy_type: PolicyType::Never, max_retries: None, backoff_seconds: None };

/// A first placement (epoch 1, no lease) of `wat` as `id` under `policy`, with `caps` as
/// `(capability id, permissions)`.
pub fn request(id: &str, wat: &str, policy: RestartPolicy, caps: &[(&str, &[&str])]) -> StartInstanceRequest {
    request_bytes(id, module(wat), policy, caps)
}

/// [`request`] with the module given as bytes.
pub fn request_bytes(
    id: &str,
    module_bytes: Vec<u8>,
    policy: RestartPolicy,
    caps: &[(&str, &[&str])],
) -> StartInstanceRequest {
    StartInstanceRequest {
        module_hash: String::new(),
        grant_seals: Default::default(),
        instance_id: id.into(),
        module_bytes,
        capabilities: caps
            .iter()
            .map(|(cap, perms)| {
                let perms: Vec<String> = perms.iter().map(|p| p.to_string()).collect();
                CapabilityAssignment::new(id, cap, &perms).unwrap()
            })
            .collect(),
        restart_policy: policy,
        config: Default::default(),
        constraints: Default::default(),
        epoch: 1,
        node_lease: None,
        restarts: 0,
        seal: Default::default(),
    }
}
