//! Wire types, error codes, permissions and tarpc service traits of factum. No I/O lives here: every other
//! crate speaks in these types.

pub mod capability;
pub mod error;
pub mod events;
pub mod grant;
pub mod guest_config;
pub mod journal;
pub mod labels;
pub mod logs;
pub mod permissions;
pub mod principal;
pub mod types;
pub mod wire;

pub use capability::{
    CapabilityInvocation, CapabilityResponse, GuestError, HttpRequest, HttpResponse, KvOperation, MessageEnvelope,
    MsgOperation, MAX_LIST_KEYS,
};
pub use error::{ErrorCode, ErrorResponse};
pub use grant::{GrantKey, GrantSeal, SealedGrant};
pub use guest_config::GuestConfig;
pub use labels::Labels;
pub use permissions::Permission;
pub use principal::Principal;
pub use types::{
    validate_id, CapabilityAssignment, InstanceMetadata, InstanceStatus, PolicyType, ProviderMetadata, ProviderType,
    RestartPolicy, BACKOFF_CAP, CRASH_LOOP_STREAK, MAX_ID_LEN, MIN_BACKOFF, STABLE_RUN,
};
pub use wire::*;

/// Hex SHA-256 of a module: its identity in caches and metadata.
pub fn module_hash(module_bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(module_bytes))
}
