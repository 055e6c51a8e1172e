//! Capability providers: the only way an instance touches the world (design §Capability Provider).
//!
//! A provider decodes an invocation, checks it against the permissions granted to the calling instance for
//! that capability, and only then executes it. The node agent finds the assignment (no assignment is
//! PERMISSION_DENIED before any provider is asked) and hands the provider the granted permissions.

mod kv;

use async_trait::async_trait;
use factum_proto::{CapabilityInvocation, CapabilityResponse, ErrorResponse, Permission};

pub use factum_proto::ProviderMetadata;

pub use kv::MemoryKv;

/// A capability provider (design §Capability Provider, Base Interface).
#[async_trait]
pub trait Provider: Send + Sync + 'static {
    /// Type, name, version, operations.
    fn metadata(&self) -> ProviderMetadata;
    /// Prepares the provider; invocations before it are PROVIDER_UNAVAILABLE.
    async fn initialize(&self) -> Result<(), ErrorResponse>;
    /// Runs one invocation whose caller holds `granted` for `invocation.capability_id`. Never panics on any
    /// input: bad params are INVALID_REQUEST, missing permission PERMISSION_DENIED.
    async fn invoke(&self, invocation: &CapabilityInvocation, granted: &[Permission]) -> CapabilityResponse;
    /// Stops the provider; later invocations are PROVIDER_UNAVAILABLE (P20).
    async fn shutdown(&self) -> Result<(), ErrorResponse>;
}

/// The refusal a provider gives when it is not running.
pub fn unavailable(metadata: &ProviderMetadata) -> CapabilityResponse {
    CapabilityResponse::err(&ErrorResponse::new(
        factum_proto::ErrorCode::ProviderUnavailable,
        format!("provider {} is not running", metadata.name),
    ))
}
