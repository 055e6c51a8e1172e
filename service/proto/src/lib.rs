//! Wire types, error codes, permissions and tarpc service traits of factum. No I/O lives here: every other
//! crate speaks in these types.

pub mod capability;
pub mod delta;
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

/// The hash naming a start's module: `named` alone when the start carries no bytes (content-addressed), else
/// [`module_hash`] of `bytes`, which must equal `named` when the start names one as well. A `named` that is no
/// module hash, or that the bytes do not hash to, is INVALID_REQUEST.
pub fn start_module_hash(bytes: &[u8], named: Option<&str>) -> Result<String, ErrorResponse> {
    match named {
        Some(named) if bytes.is_empty() => {
            let hex = |b: u8| b.is_ascii_digit() || (b'a'..=b'f').contains(&b);
            if named.len() != 64 || !named.bytes().all(hex) {
                return Err(ErrorResponse::invalid(format!(
                    "module_hash {named:?} is not a module hash (64 lowercase hex digits of SHA-256)"
                )));
            }
            Ok(named.to_string())
        }
        named => {
            let hash = module_hash(bytes);
            match named {
                Some(named) if named != hash => Err(ErrorResponse::invalid(format!(
                    "the module's bytes hash to {hash}, not to the module_hash {named} the start names"
                ))),
                _ => Ok(hash),
            }
        }
    }
}
