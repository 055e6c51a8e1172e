//! Guest ↔ provider invocations (design §CapabilityInvocation / §CapabilityResponse), encoded as MessagePack,
//! and the typed operations of the KV provider.

use serde::{Deserialize, Serialize};

use crate::error::{ErrorCode, ErrorResponse};
use crate::permissions::Permission;

/// Version of the guest invocation encoding; carried in every [`CapabilityResponse`] so guest SDKs can check.
pub const INVOCATION_VERSION: u32 = 1;

/// Largest accepted `params` of one invocation.
pub const MAX_PARAMS_BYTES: usize = 2 * 1024 * 1024;
/// Longest accepted operation name.
pub const MAX_OPERATION_LEN: usize = 64;
/// Longest accepted KV key.
pub const MAX_KEY_BYTES: usize = 1024;
/// Largest accepted KV value.
pub const MAX_VALUE_BYTES: usize = 1024 * 1024;
/// Most keys one KV `list` answers (and its default `limit`): a guest pages through more with `after`.
pub const MAX_LIST_KEYS: u32 = 1000;

/// One call from an instance to a provider.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapabilityInvocation {
    /// The calling instance; set by the host, never by the guest.
    pub instance_id: String,
    /// Which capability of the instance.
    pub capability_id: String,
    /// Operation name, e.g. `get`.
    pub operation: String,
    /// MessagePack-encoded parameters of the operation.
    #[serde(with = "serde_bytes")]
    pub params: Vec<u8>,
}

/// Error carried back to the guest: the design's code plus a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestError {
    /// One of the seven codes.
    pub code: ErrorCode,
    /// What went wrong.
    pub message: String,
}

/// The answer to one invocation, MessagePack-encoded into guest memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapabilityResponse {
    /// Encoding version, [`INVOCATION_VERSION`].
    pub version: u32,
    /// Whether the operation succeeded.
    pub success: bool,
    /// MessagePack-encoded result on success.
    #[serde(with = "serde_bytes")]
    pub result: Option<Vec<u8>>,
    /// The error on failure.
    pub error: Option<GuestError>,
}

impl CapabilityResponse {
    /// A success carrying `result` encoded as MessagePack.
    pub fn ok<T: Serialize>(result: &T) -> Self {
        match rmp_serde::to_vec_named(result) {
            Ok(bytes) => Self { version: INVOCATION_VERSION, success: true, result: Some(bytes), error: None },
            Err(e) => Self::err(&ErrorResponse::internal(format!("cannot encode result: {e}"))),
        }
    }

    /// A failure.
    pub fn err(error: &ErrorResponse) -> Self {
        Self {
            version: INVOCATION_VERSION,
            success: false,
            result: None,
            error: Some(GuestError { code: error.error_code, message: error.message.clone() }),
        }
    }

    /// The error code, if it failed.
    pub fn error_code(&self) -> Option<ErrorCode> {
        self.error.as_ref().map(|e| e.code)
    }

    /// Encodes for the guest.
    pub fn encode(&self) -> Vec<u8> {
        // A response of plain fields always encodes; fall back to an empty buffer rather than panic.
        rmp_serde::to_vec_named(self).unwrap_or_default()
    }

    /// Decodes what a host wrote (used by guest SDKs and tests).
    pub fn decode(bytes: &[u8]) -> Result<Self, ErrorResponse> {
        rmp_serde::from_slice(bytes).map_err(|e| ErrorResponse::invalid(format!("bad capability response: {e}")))
    }

    /// Decodes the result of a success as `T`.
    pub fn result_as<T: for<'de> Deserialize<'de>>(&self) -> Result<T, ErrorResponse> {
        if let Some(err) = &self.error {
            return Err(ErrorResponse::new(err.code, err.message.clone()));
        }
        let bytes = self.result.as_deref().unwrap_or(&[]);
        rmp_serde::from_slice(bytes).map_err(|e| ErrorResponse::invalid(format!("bad result: {e}")))
    }
}

/// A decoded KV operation (design §KV Provider Operations).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum KvOperation {
    /// Get(key) -> optional value.
    Get {
        /// Key.
        key: String,
    },
    /// Set(key, value).
    Set {
        /// Key.
        key: String,
        /// Value.
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
    },
    /// Delete(key); deleting a missing key succeeds.
    Delete {
        /// Key.
        key: String,
    },
    /// List(prefix, after, limit) -> keys, sorted: those starting with `prefix` and after `after`, at most
    /// `limit` ([`MAX_LIST_KEYS`] when unset). A page shorter than its limit is the last one.
    List {
        /// Key prefix; empty lists everything.
        prefix: String,
        /// Only keys after this one (the last key of the previous page).
        after: Option<String>,
        /// Most keys wanted, 1 to [`MAX_LIST_KEYS`].
        limit: Option<u32>,
    },
}

#[derive(Deserialize)]
struct KeyParams {
    key: String,
}

#[derive(Deserialize)]
struct SetParams {
    key: String,
    #[serde(with = "serde_bytes")]
    value: Vec<u8>,
}

#[derive(Deserialize)]
struct ListParams {
    #[serde(default)]
    prefix: String,
    #[serde(default)]
    after: Option<String>,
    #[serde(default)]
    limit: Option<u32>,
}

impl KvOperation {
    /// Decodes `operation` + MessagePack `params` sent by a guest. Garbage is INVALID_REQUEST, never a panic.
    pub fn decode(operation: &str, params: &[u8]) -> Result<Self, ErrorResponse> {
        fn de<'a, T: Deserialize<'a>>(operation: &str, params: &'a [u8]) -> Result<T, ErrorResponse> {
            rmp_serde::from_slice(params)
                .map_err(|e| ErrorResponse::invalid(format!("bad MessagePack params for kv {operation}: {e}")))
        }
        let op = match operation {
            "get" => KvOperation::Get { key: de::<KeyParams>(operation, params)?.key },
            "set" => {
                let p: SetParams = de(operation, params)?;
                KvOperation::Set { key: p.key, value: p.value }
            }
            "delete" => KvOperation::Delete { key: de::<KeyParams>(operation, params)?.key },
            "list" => {
                let p: ListParams = de(operation, params)?;
                KvOperation::List { prefix: p.prefix, after: p.after, limit: p.limit }
            }
            other => {
                return Err(ErrorResponse::invalid(format!(
                    "unknown kv operation {other:?}: expected get, set, delete or list"
                )))
            }
        };
        op.validate()?;
        Ok(op)
    }

    /// Encodes into (operation, params) as a guest would send them.
    pub fn encode(&self) -> (String, Vec<u8>) {
        #[derive(Serialize)]
        struct Key<'a> {
            key: &'a str,
        }
        #[derive(Serialize)]
        struct Set<'a> {
            key: &'a str,
            #[serde(with = "serde_bytes")]
            value: &'a [u8],
        }
        #[derive(Serialize)]
        struct List<'a> {
            prefix: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            after: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            limit: Option<u32>,
        }
        let params = match self {
            KvOperation::Get { key } | KvOperation::Delete { key } => rmp_serde::to_vec_named(&Key { key }),
            KvOperation::Set { key, value } => rmp_serde::to_vec_named(&Set { key, value }),
            KvOperation::List { prefix, after, limit } => {
                rmp_serde::to_vec_named(&List { prefix, after: after.as_deref(), limit: *limit })
            }
        };
        (self.name().to_string(), params.unwrap_or_default())
    }

    /// Operation name on the wire.
    pub fn name(&self) -> &'static str {
        match self {
            KvOperation::Get { .. } => "get",
            KvOperation::Set { .. } => "set",
            KvOperation::Delete { .. } => "delete",
            KvOperation::List { .. } => "list",
        }
    }

    /// A first page of keys starting with `prefix`, as many as one list answers.
    pub fn list(prefix: impl Into<String>) -> Self {
        KvOperation::List { prefix: prefix.into(), after: None, limit: None }
    }

    /// The permission this operation needs (`kv:read` covers Get and List).
    pub fn required_permission(&self) -> Permission {
        match self {
            KvOperation::Get { .. } | KvOperation::List { .. } => Permission::KvRead,
            KvOperation::Set { .. } => Permission::KvWrite,
            KvOperation::Delete { .. } => Permission::KvDelete,
        }
    }

    fn validate(&self) -> Result<(), ErrorResponse> {
        let key = match self {
            KvOperation::Get { key } | KvOperation::Delete { key } | KvOperation::Set { key, .. } => key,
            KvOperation::List { prefix, .. } => prefix,
        };
        if key.len() > MAX_KEY_BYTES {
            return Err(ErrorResponse::invalid(format!("kv key longer than {MAX_KEY_BYTES} bytes")));
        }
        if let KvOperation::List { after, limit, .. } = self {
            if after.as_ref().is_some_and(|a| a.len() > MAX_KEY_BYTES) {
                return Err(ErrorResponse::invalid(format!("kv list `after` longer than {MAX_KEY_BYTES} bytes")));
            }
            if limit.is_some_and(|l| l == 0 || l > MAX_LIST_KEYS) {
                return Err(ErrorResponse::invalid(format!("kv list `limit` must be 1 to {MAX_LIST_KEYS}")));
            }
        }
        if matches!(self, KvOperation::Get { key } | KvOperation::Delete { key } if key.is_empty()) {
            return Err(ErrorResponse::invalid("empty kv key"));
        }
        if let KvOperation::Set { key, value } = self {
            if key.is_empty() {
                return Err(ErrorResponse::invalid("empty kv key"));
            }
            if value.len() > MAX_VALUE_BYTES {
                return Err(ErrorResponse::new(
                    ErrorCode::ResourceExhausted,
                    format!("kv value of {} bytes is above the {MAX_VALUE_BYTES}-byte limit", value.len()),
                ));
            }
        }
        Ok(())
    }
}

/// Params of the HTTP provider's `request` operation (MessagePack, named fields).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpRequest {
    /// `GET`, `POST`, … (case-insensitive).
    pub method: String,
    /// Absolute `http://` or `https://` URL.
    pub url: String,
    /// Request headers, in order.
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    /// Request body.
    #[serde(default, with = "serde_bytes")]
    pub body: Vec<u8>,
}

/// Result of the HTTP provider's `request` operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpResponse {
    /// HTTP status code.
    pub status: u16,
    /// Response headers, in order (values that are not UTF-8 are dropped).
    pub headers: Vec<(String, String)>,
    /// Response body.
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
}

impl HttpRequest {
    /// Decodes the params of operation `operation`; only `request` exists. Garbage is INVALID_REQUEST.
    pub fn decode(operation: &str, params: &[u8]) -> Result<Self, ErrorResponse> {
        if operation != "request" {
            return Err(ErrorResponse::invalid(format!("unknown http operation {operation:?}: expected request")));
        }
        rmp_serde::from_slice(params)
            .map_err(|e| ErrorResponse::invalid(format!("bad MessagePack params for http request: {e}")))
    }

    /// Encodes into (operation, params) as a guest would send them.
    pub fn encode(&self) -> (String, Vec<u8>) {
        ("request".to_string(), rmp_serde::to_vec_named(self).unwrap_or_default())
    }
}

/// Largest message payload a guest may publish.
pub const MAX_MESSAGE_BYTES: usize = 1024 * 1024;

/// A decoded messaging operation (design §Messaging Provider).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum MsgOperation {
    /// Publish(topic, payload) to a literal topic; needs `msg:publish:<pattern covering topic>`.
    Publish {
        /// Literal topic (no wildcards).
        topic: String,
        /// Payload.
        #[serde(with = "serde_bytes")]
        payload: Vec<u8>,
    },
    /// Subscribe(topic) to a topic or NATS-style pattern; needs a `msg:subscribe:` pattern that covers it.
    Subscribe {
        /// Topic or pattern.
        topic: String,
    },
    /// Unsubscribe(topic): ends a subscription made with the same topic string; needs no permission.
    Unsubscribe {
        /// Topic or pattern, as subscribed.
        topic: String,
    },
}

#[derive(Deserialize)]
struct TopicParams {
    topic: String,
}

#[derive(Deserialize)]
struct PublishParams {
    topic: String,
    #[serde(with = "serde_bytes")]
    payload: Vec<u8>,
}

impl MsgOperation {
    /// Decodes `operation` + MessagePack `params` sent by a guest. Garbage is INVALID_REQUEST, never a panic.
    pub fn decode(operation: &str, params: &[u8]) -> Result<Self, ErrorResponse> {
        fn de<'a, T: Deserialize<'a>>(operation: &str, params: &'a [u8]) -> Result<T, ErrorResponse> {
            rmp_serde::from_slice(params)
                .map_err(|e| ErrorResponse::invalid(format!("bad MessagePack params for msg {operation}: {e}")))
        }
        let op = match operation {
            "publish" => {
                let p: PublishParams = de(operation, params)?;
                MsgOperation::Publish { topic: p.topic, payload: p.payload }
            }
            "subscribe" => MsgOperation::Subscribe { topic: de::<TopicParams>(operation, params)?.topic },
            "unsubscribe" => MsgOperation::Unsubscribe { topic: de::<TopicParams>(operation, params)?.topic },
            other => {
                return Err(ErrorResponse::invalid(format!(
                    "unknown msg operation {other:?}: expected publish, subscribe or unsubscribe"
                )))
            }
        };
        match &op {
            MsgOperation::Publish { topic, payload } => {
                crate::permissions::validate_topic_arg(topic, false)?;
                if payload.len() > MAX_MESSAGE_BYTES {
                    return Err(ErrorResponse::new(
                        ErrorCode::ResourceExhausted,
                        format!("message of {} bytes is above the {MAX_MESSAGE_BYTES}-byte limit", payload.len()),
                    ));
                }
            }
            MsgOperation::Subscribe { topic } | MsgOperation::Unsubscribe { topic } => {
                crate::permissions::validate_topic_arg(topic, true)?;
            }
        }
        Ok(op)
    }

    /// Encodes into (operation, params) as a guest would send them.
    pub fn encode(&self) -> (String, Vec<u8>) {
        #[derive(Serialize)]
        struct Topic<'a> {
            topic: &'a str,
        }
        #[derive(Serialize)]
        struct Publish<'a> {
            topic: &'a str,
            #[serde(with = "serde_bytes")]
            payload: &'a [u8],
        }
        let params = match self {
            MsgOperation::Publish { topic, payload } => rmp_serde::to_vec_named(&Publish { topic, payload }),
            MsgOperation::Subscribe { topic } | MsgOperation::Unsubscribe { topic } => {
                rmp_serde::to_vec_named(&Topic { topic })
            }
        };
        (self.name().to_string(), params.unwrap_or_default())
    }

    /// Operation name on the wire.
    pub fn name(&self) -> &'static str {
        match self {
            MsgOperation::Publish { .. } => "publish",
            MsgOperation::Subscribe { .. } => "subscribe",
            MsgOperation::Unsubscribe { .. } => "unsubscribe",
        }
    }

    /// The permission this operation needs; unsubscribing needs none (it only gives something up).
    pub fn required_permission(&self) -> Option<Permission> {
        match self {
            MsgOperation::Publish { topic, .. } => Some(Permission::MsgPublish(topic.clone())),
            MsgOperation::Subscribe { topic } => Some(Permission::MsgSubscribe(topic.clone())),
            MsgOperation::Unsubscribe { .. } => None,
        }
    }
}

/// A message handed to a subscribed guest's `factum_on_message` export (MessagePack, named fields).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageEnvelope {
    /// The capability the subscription was made through.
    pub capability_id: String,
    /// The topic it was published on (always literal).
    pub topic: String,
    /// Payload.
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
}

impl MessageEnvelope {
    /// MessagePack bytes, as the guest reads them.
    pub fn encode(&self) -> Vec<u8> {
        rmp_serde::to_vec_named(self).unwrap_or_default()
    }

    /// Decodes; garbage is INVALID_REQUEST.
    pub fn decode(bytes: &[u8]) -> Result<Self, ErrorResponse> {
        rmp_serde::from_slice(bytes).map_err(|e| ErrorResponse::invalid(format!("bad message envelope: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_kv_op() -> impl Strategy<Value = KvOperation> {
        let key = "[a-z0-9/._-]{1,24}";
        prop_oneof![
            key.prop_map(|key| KvOperation::Get { key }),
            (key, prop::collection::vec(any::<u8>(), 0..64)).prop_map(|(key, value)| KvOperation::Set { key, value }),
            key.prop_map(|key| KvOperation::Delete { key }),
            ("[a-z0-9/]{0,8}", prop::option::of("[a-z0-9/]{0,8}"), prop::option::of(1..=MAX_LIST_KEYS))
                .prop_map(|(prefix, after, limit)| KvOperation::List { prefix, after, limit }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Feature: wasm-orchestrator, Property 16: Control Plane and Node Agent Protocol Communication
        /// Every KV operation survives its MessagePack encoding unchanged.
        #[test]
        fn kv_ops_round_trip(op in arb_kv_op()) {
            let (name, params) = op.encode();
            prop_assert_eq!(KvOperation::decode(&name, &params).unwrap(), op);
        }

        /// Feature: wasm-orchestrator, Property 16: Control Plane and Node Agent Protocol Communication
        /// Every messaging operation survives its MessagePack encoding unchanged.
        #[test]
        fn msg_ops_round_trip(topic in "[a-z]{1,6}(\\.[a-z]{1,6}){0,3}", payload in prop::collection::vec(any::<u8>(), 0..64), which in 0u8..3) {
            let op = match which {
                0 => MsgOperation::Publish { topic, payload },
                1 => MsgOperation::Subscribe { topic },
                _ => MsgOperation::Unsubscribe { topic },
            };
            let (name, params) = op.encode();
            prop_assert_eq!(MsgOperation::decode(&name, &params).unwrap(), op);
        }

        /// Feature: wasm-orchestrator, Property 18: API Request Validation
        /// Garbage messaging params are INVALID_REQUEST, never a panic.
        #[test]
        fn garbage_msg_params_are_invalid_request(op in "publish|subscribe|unsubscribe|frob", params in prop::collection::vec(any::<u8>(), 0..64)) {
            if let Err(e) = MsgOperation::decode(&op, &params) {
                prop_assert_eq!(e.error_code, ErrorCode::InvalidRequest);
            }
        }

        /// Feature: wasm-orchestrator, Property 18: API Request Validation
        /// Garbage params are INVALID_REQUEST, never a panic.
        #[test]
        fn garbage_params_are_invalid_request(op in "get|set|delete|list|frob", params in prop::collection::vec(any::<u8>(), 0..64)) {
            if let Err(e) = KvOperation::decode(&op, &params) {
                prop_assert_eq!(e.error_code, ErrorCode::InvalidRequest);
            }
        }

        /// Feature: wasm-orchestrator, Property 18: API Request Validation
        /// Fuzzing the HTTP provider's guest input: garbage, and a valid request with bytes flipped, decode to
        /// a request or INVALID_REQUEST, never a panic.
        #[test]
        fn garbage_http_params_are_invalid_request(
            op in "request|frob",
            params in prop::collection::vec(any::<u8>(), 0..64),
            flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        ) {
            if let Err(e) = HttpRequest::decode(&op, &params) {
                prop_assert_eq!(e.error_code, ErrorCode::InvalidRequest);
            }
            let request = HttpRequest { method: "GET".into(), url: "http://example.com/".into(), headers: vec![("a".into(), "b".into())], body: b"x".to_vec() };
            let (op, mut params) = request.encode();
            for (at, byte) in flips {
                let i = at.index(params.len());
                params[i] ^= byte;
            }
            if let Err(e) = HttpRequest::decode(&op, &params) {
                prop_assert!(matches!(e.error_code, ErrorCode::InvalidRequest | ErrorCode::ResourceExhausted));
            }
        }
    }

    #[test]
    fn oversized_value_is_resource_exhausted() {
        let (name, params) = KvOperation::Set { key: "k".into(), value: vec![0; MAX_VALUE_BYTES + 1] }.encode();
        let err = KvOperation::decode(&name, &params).unwrap_err();
        assert_eq!(err.error_code, ErrorCode::ResourceExhausted);
    }

    #[test]
    fn response_round_trip() {
        let ok = CapabilityResponse::ok(&Some(serde_bytes::ByteBuf::from(b"v".to_vec())));
        let back = CapabilityResponse::decode(&ok.encode()).unwrap();
        assert_eq!(back.result_as::<Option<serde_bytes::ByteBuf>>().unwrap().unwrap().as_ref(), b"v");
        let err = CapabilityResponse::err(&ErrorResponse::permission_denied("no"));
        assert_eq!(CapabilityResponse::decode(&err.encode()).unwrap().error_code(), Some(ErrorCode::PermissionDenied));
    }
}
