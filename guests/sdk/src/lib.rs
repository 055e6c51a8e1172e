//! The factum guest SDK: typed calls on the capabilities an instance was granted, over the guest ABI of
//! `guests/ABI.md` (`factum.invoke` + `factum.response_read`, MessagePack both ways).
//!
//! Every call names a capability id (the name it was granted under, e.g. `--cap store=kv:read,kv:write`) and
//! returns the design's error codes as [`Error`]: a call the instance has no permission for is
//! [`ErrorCode::PermissionDenied`], and never crashes the guest by itself.
//!
//! ```no_run
//! fn main() -> Result<(), factum_sdk::Error> {
//!     let n = factum_sdk::kv::get("store", "n")?.map_or(0, |v| v.len());
//!     factum_sdk::kv::set("store", "n", &vec![0; n + 1])?;
//!     Ok(())
//! }
//! ```
//!
//! Outside a factum guest (any target but `wasm32`), every call is [`ErrorCode::ProviderUnavailable`], so code
//! using the SDK still compiles and unit-tests on the host.

pub mod http;
pub mod kv;
pub mod msg;

use serde::{Deserialize, Serialize};

// The wire shapes below mirror `factum-proto` (which pulls tarpc and cannot build for wasm32-wasip1);
// `tests/guests.rs` runs guests built with this SDK against the real agent, which keeps them in step.

/// The design's error codes, as the host sends them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorCode {
    /// Bad parameters (garbage, too large, an unknown operation).
    InvalidRequest,
    /// An unknown instance.
    InstanceNotFound,
    /// The capability is not granted, was revoked, or lacks the permission.
    PermissionDenied,
    /// A limit was hit (a full store, an oversized value or response).
    ResourceExhausted,
    /// The provider is down or shutting down, or the backend failed.
    ProviderUnavailable,
    /// A network call failed.
    CommunicationFailure,
    /// A bug on the host side.
    InternalError,
    /// A code this SDK does not know (a newer host).
    Other(String),
}

impl ErrorCode {
    fn parse(code: &str) -> Self {
        match code {
            "INVALID_REQUEST" => ErrorCode::InvalidRequest,
            "INSTANCE_NOT_FOUND" => ErrorCode::InstanceNotFound,
            "PERMISSION_DENIED" => ErrorCode::PermissionDenied,
            "RESOURCE_EXHAUSTED" => ErrorCode::ResourceExhausted,
            "PROVIDER_UNAVAILABLE" => ErrorCode::ProviderUnavailable,
            "COMMUNICATION_FAILURE" => ErrorCode::CommunicationFailure,
            "INTERNAL_ERROR" => ErrorCode::InternalError,
            other => ErrorCode::Other(other.to_string()),
        }
    }
}

/// A refused or failed capability call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    /// What kind of failure.
    pub code: ErrorCode,
    /// The host's explanation.
    pub message: String,
}

impl Error {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Error { code, message: message.into() }
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.code, self.message)
    }
}

impl std::error::Error for Error {}

/// Result of a capability call.
pub type Result<T> = std::result::Result<T, Error>;

/// The invocation encoding this SDK speaks.
pub const INVOCATION_VERSION: u32 = 1;

#[derive(Deserialize)]
struct WireError {
    code: String,
    message: String,
}

#[derive(Deserialize)]
struct WireResponse {
    version: u32,
    success: bool,
    #[serde(default, with = "serde_bytes")]
    result: Option<Vec<u8>>,
    #[serde(default)]
    error: Option<WireError>,
}

/// Decodes a host response into the MessagePack bytes of its result.
fn decode_response(bytes: &[u8]) -> Result<Vec<u8>> {
    let response: WireResponse = rmp_serde::from_slice(bytes)
        .map_err(|e| Error::new(ErrorCode::InternalError, format!("unreadable host response: {e}")))?;
    if response.version != INVOCATION_VERSION {
        return Err(Error::new(
            ErrorCode::InternalError,
            format!("host speaks invocation version {}, this SDK {INVOCATION_VERSION}", response.version),
        ));
    }
    if response.success {
        return Ok(response.result.unwrap_or_default());
    }
    let error = response.error.unwrap_or(WireError { code: "INTERNAL_ERROR".into(), message: "no error given".into() });
    Err(Error::new(ErrorCode::parse(&error.code), error.message))
}

/// Encodes `params`, calls `operation` on `capability`, decodes the result as `T`.
fn call<P: Serialize, T: for<'de> Deserialize<'de>>(capability: &str, operation: &str, params: &P) -> Result<T> {
    let params = rmp_serde::to_vec_named(params)
        .map_err(|e| Error::new(ErrorCode::InvalidRequest, format!("cannot encode params: {e}")))?;
    let result = decode_response(&raw::invoke(capability, operation, &params)?)?;
    rmp_serde::from_slice(&result)
        .map_err(|e| Error::new(ErrorCode::InternalError, format!("unexpected result for {operation}: {e}")))
}

/// The host imports, and the host-target stand-in.
mod raw {
    #[cfg(target_arch = "wasm32")]
    mod imports {
        #[link(wasm_import_module = "factum")]
        extern "C" {
            pub fn invoke(
                cap: *const u8,
                cap_len: usize,
                op: *const u8,
                op_len: usize,
                params: *const u8,
                params_len: usize,
            ) -> i32;
            pub fn response_read(buf: *mut u8, buf_len: usize) -> i32;
        }
    }

    /// Reads the pending host response (or message envelope) of `len` bytes.
    #[cfg(target_arch = "wasm32")]
    pub fn read(len: i32) -> super::Result<Vec<u8>> {
        let len = usize::try_from(len).map_err(|_| fault(len))?;
        let mut buf = vec![0u8; len];
        // SAFETY: the host writes at most `len` bytes into `buf`, which holds `len`.
        let copied = unsafe { imports::response_read(buf.as_mut_ptr(), buf.len()) };
        buf.truncate(usize::try_from(copied).map_err(|_| fault(copied))?);
        Ok(buf)
    }

    #[cfg(target_arch = "wasm32")]
    pub fn invoke(capability: &str, operation: &str, params: &[u8]) -> super::Result<Vec<u8>> {
        // SAFETY: the host only reads the three (pointer, length) pairs, all valid slices.
        let len = unsafe {
            imports::invoke(
                capability.as_ptr(),
                capability.len(),
                operation.as_ptr(),
                operation.len(),
                params.as_ptr(),
                params.len(),
            )
        };
        read(len)
    }

    #[cfg(target_arch = "wasm32")]
    fn fault(code: i32) -> super::Error {
        super::Error::new(super::ErrorCode::InternalError, format!("host call failed with errno {}", -code))
    }

    #[cfg(not(target_arch = "wasm32"))]
    pub fn invoke(_capability: &str, _operation: &str, _params: &[u8]) -> super::Result<Vec<u8>> {
        Err(super::Error::new(super::ErrorCode::ProviderUnavailable, "not running inside a factum guest"))
    }

    #[cfg(not(target_arch = "wasm32"))]
    pub fn read(_len: i32) -> super::Result<Vec<u8>> {
        invoke("", "", &[])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize)]
    struct Resp<'a> {
        version: u32,
        success: bool,
        #[serde(with = "serde_bytes")]
        result: Option<&'a [u8]>,
        error: Option<Err<'a>>,
    }

    #[derive(Serialize)]
    struct Err<'a> {
        code: &'a str,
        message: &'a str,
    }

    #[test]
    fn responses_decode_into_results_and_error_codes() {
        let ok =
            rmp_serde::to_vec_named(&Resp { version: 1, success: true, result: Some(&[0xc0]), error: None }).unwrap();
        assert_eq!(decode_response(&ok).unwrap(), vec![0xc0]);
        let denied = Resp {
            version: 1,
            success: false,
            result: None,
            error: Some(Err { code: "PERMISSION_DENIED", message: "no" }),
        };
        let err = decode_response(&rmp_serde::to_vec_named(&denied).unwrap()).unwrap_err();
        assert_eq!(err, Error::new(ErrorCode::PermissionDenied, "no"));
        let newer = Resp { version: 2, success: true, result: None, error: None };
        assert_eq!(
            decode_response(&rmp_serde::to_vec_named(&newer).unwrap()).unwrap_err().code,
            ErrorCode::InternalError
        );
        assert_eq!(decode_response(&[0xc1]).unwrap_err().code, ErrorCode::InternalError);
    }

    #[test]
    fn outside_a_guest_every_call_is_provider_unavailable() {
        assert_eq!(kv::get("store", "k").unwrap_err().code, ErrorCode::ProviderUnavailable);
    }
}
