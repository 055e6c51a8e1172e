//! The design's error model: seven error codes and one response shape for every failure.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// The error codes of the design (§Error Response Format). Every failure a user or a guest sees carries one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorCode {
    /// Malformed or invalid request: bad module bytes, bad permission string, bad policy, garbage MessagePack.
    InvalidRequest,
    /// The named instance does not exist.
    InstanceNotFound,
    /// A capability call or assignment was refused by the permission check.
    PermissionDenied,
    /// A node quota or an instance limit (memory, fuel, payload size) was hit.
    ResourceExhausted,
    /// The capability provider is not running.
    ProviderUnavailable,
    /// A call between components failed or timed out.
    CommunicationFailure,
    /// A bug or an unexpected state; the message says what.
    InternalError,
}

impl ErrorCode {
    /// The wire spelling, e.g. `INSTANCE_NOT_FOUND`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest => "INVALID_REQUEST",
            ErrorCode::InstanceNotFound => "INSTANCE_NOT_FOUND",
            ErrorCode::PermissionDenied => "PERMISSION_DENIED",
            ErrorCode::ResourceExhausted => "RESOURCE_EXHAUSTED",
            ErrorCode::ProviderUnavailable => "PROVIDER_UNAVAILABLE",
            ErrorCode::CommunicationFailure => "COMMUNICATION_FAILURE",
            ErrorCode::InternalError => "INTERNAL_ERROR",
        }
    }

    /// All seven codes, in the design's order.
    pub const ALL: [ErrorCode; 7] = [
        ErrorCode::InvalidRequest,
        ErrorCode::InstanceNotFound,
        ErrorCode::PermissionDenied,
        ErrorCode::ResourceExhausted,
        ErrorCode::ProviderUnavailable,
        ErrorCode::CommunicationFailure,
        ErrorCode::InternalError,
    ];
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The one error shape of every API (design §Error Response Format).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorResponse {
    /// Which of the seven kinds of failure this is.
    pub error_code: ErrorCode,
    /// What was wrong and, where it helps, what to do.
    pub message: String,
    /// Structured context such as `instance_id` or `permission`.
    pub details: Option<BTreeMap<String, String>>,
    /// Milliseconds since the Unix epoch, from the component's env clock; 0 where no clock was at hand.
    pub timestamp: u64,
}

impl ErrorResponse {
    /// An error with a code and a message; no details, timestamp 0 until [`ErrorResponse::at`] sets it.
    pub fn new(error_code: ErrorCode, message: impl Into<String>) -> Self {
        Self { error_code, message: message.into(), details: None, timestamp: 0 }
    }

    /// Adds one detail entry.
    pub fn with_detail(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.details.get_or_insert_with(BTreeMap::new).insert(key.into(), value.into());
        self
    }

    /// Stamps the error with a wall-clock time in milliseconds since the Unix epoch.
    pub fn at(mut self, timestamp_ms: u64) -> Self {
        self.timestamp = timestamp_ms;
        self
    }

    /// Shorthand for [`ErrorCode::InvalidRequest`].
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidRequest, message)
    }

    /// Shorthand for [`ErrorCode::InstanceNotFound`] naming the instance.
    pub fn instance_not_found(instance_id: &str) -> Self {
        Self::new(ErrorCode::InstanceNotFound, format!("no instance with id {instance_id:?}"))
            .with_detail("instance_id", instance_id)
    }

    /// INSTANCE_NOT_FOUND for a start by module hash alone when `holder` (the control plane, a node) holds no
    /// module of that hash: the caller sends the start again with the module's bytes.
    pub fn module_not_held(module_hash: &str, holder: &str) -> Self {
        Self::new(
            ErrorCode::InstanceNotFound,
            format!("{holder} holds no module with hash {module_hash}; send the start with the module's bytes"),
        )
        .with_detail("module_hash", module_hash)
    }

    /// Whether this is a [`ErrorResponse::module_not_held`].
    pub fn is_module_not_held(&self) -> bool {
        self.error_code == ErrorCode::InstanceNotFound
            && self.details.as_ref().is_some_and(|d| d.contains_key("module_hash"))
    }

    /// Shorthand for [`ErrorCode::PermissionDenied`].
    pub fn permission_denied(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::PermissionDenied, message)
    }

    /// Shorthand for [`ErrorCode::CommunicationFailure`].
    pub fn communication(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::CommunicationFailure, message)
    }

    /// Shorthand for [`ErrorCode::InternalError`].
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InternalError, message)
    }
}

impl fmt::Display for ErrorResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.error_code, self.message)
    }
}

impl std::error::Error for ErrorResponse {}
