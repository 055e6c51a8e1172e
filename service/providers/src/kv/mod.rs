//! The key-value provider: decodes MessagePack operations, checks each against the permissions granted for the
//! capability, and runs it on a [`KvBackend`]. Every capability id is its own store: instances assigned the same
//! capability id share it, different ids never see each other's keys (P19), on every backend.

mod memory;
#[cfg(feature = "redis")]
mod redis;

use std::sync::Arc;

use async_trait::async_trait;
use factum_proto::permissions::allows;
use factum_proto::{CapabilityInvocation, CapabilityResponse, ErrorResponse, KvOperation, Permission, ProviderType};
use serde_bytes::ByteBuf;

pub use memory::MemoryStore;
#[cfg(feature = "redis")]
pub use redis::RedisStore;

use crate::{Lifecycle, Provider, ProviderMetadata};

/// Default most keys per store.
pub const DEFAULT_MAX_KEYS_PER_STORE: usize = 100_000;

/// Where key-value data lives. `store` is the capability id; keys are opaque strings. Failures of the backend
/// itself are PROVIDER_UNAVAILABLE; a full store is RESOURCE_EXHAUSTED.
#[async_trait]
pub trait KvBackend: Send + Sync + 'static {
    /// Implementation name, e.g. `kv-memory`.
    fn name(&self) -> &'static str;
    /// The value of `key`, if set.
    async fn get(&self, store: &str, key: &str) -> Result<Option<Vec<u8>>, ErrorResponse>;
    /// Sets `key`; a new key in a full store is RESOURCE_EXHAUSTED.
    async fn set(&self, store: &str, key: &str, value: &[u8]) -> Result<(), ErrorResponse>;
    /// Deletes `key`; whether it existed.
    async fn delete(&self, store: &str, key: &str) -> Result<bool, ErrorResponse>;
    /// Keys starting with `prefix` and after `after` (if set), sorted, at most `limit` of them.
    async fn list(
        &self,
        store: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, ErrorResponse>;
    /// Entries whose key starts with `prefix`, sorted by key (the operator view).
    async fn entries(&self, store: &str, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, ErrorResponse>;
}

/// The KV provider over one backend.
pub struct KvProvider {
    backend: Arc<dyn KvBackend>,
    lifecycle: Lifecycle,
}

/// The in-memory KV provider (the default): [`KvProvider::new`].
pub type MemoryKv = KvProvider;

impl KvProvider {
    /// A running provider over an empty in-memory store.
    pub fn new() -> Self {
        Self::with_max_keys(DEFAULT_MAX_KEYS_PER_STORE)
    }

    /// A running in-memory provider holding at most `max_keys` keys per store.
    pub fn with_max_keys(max_keys: usize) -> Self {
        Self::with_backend(Arc::new(MemoryStore::new(max_keys)))
    }

    /// A running provider over `backend`.
    pub fn with_backend(backend: Arc<dyn KvBackend>) -> Self {
        Self { backend, lifecycle: Lifecycle::new() }
    }

    /// Operator view: entries of store `capability_id` whose key starts with `prefix`, sorted by key.
    pub async fn inspect(&self, capability_id: &str, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, ErrorResponse> {
        self.backend.entries(capability_id, prefix).await
    }

    async fn execute(&self, store: &str, op: KvOperation) -> Result<CapabilityResponse, ErrorResponse> {
        let backend = &self.backend;
        Ok(match op {
            KvOperation::Get { key } => CapabilityResponse::ok(&backend.get(store, &key).await?.map(ByteBuf::from)),
            KvOperation::Set { key, value } => {
                backend.set(store, &key, &value).await?;
                CapabilityResponse::ok(&())
            }
            KvOperation::Delete { key } => CapabilityResponse::ok(&backend.delete(store, &key).await?),
            KvOperation::List { prefix, after, limit } => {
                let limit = limit.unwrap_or(factum_proto::MAX_LIST_KEYS) as usize;
                CapabilityResponse::ok(&backend.list(store, &prefix, after.as_deref(), limit).await?)
            }
        })
    }
}

impl Default for KvProvider {
    fn default() -> Self {
        Self::new()
    }
}

#[async_trait]
impl Provider for KvProvider {
    fn metadata(&self) -> ProviderMetadata {
        ProviderMetadata {
            provider_type: ProviderType::Kv,
            name: self.backend.name().into(),
            version: env!("CARGO_PKG_VERSION").into(),
            operations: ["get", "set", "delete", "list"].map(String::from).to_vec(),
        }
    }

    fn lifecycle(&self) -> &Lifecycle {
        &self.lifecycle
    }

    async fn handle(&self, invocation: &CapabilityInvocation, granted: &[Permission]) -> CapabilityResponse {
        let op = match KvOperation::decode(&invocation.operation, &invocation.params) {
            Ok(op) => op,
            Err(e) => return CapabilityResponse::err(&e),
        };
        let needed = op.required_permission();
        if !allows(granted, &needed) {
            return CapabilityResponse::err(
                &ErrorResponse::permission_denied(format!(
                    "instance {} lacks {needed} on capability {} for kv {}",
                    invocation.instance_id,
                    invocation.capability_id,
                    op.name()
                ))
                .with_detail("permission", needed.to_string()),
            );
        }
        self.execute(&invocation.capability_id, op).await.unwrap_or_else(|e| CapabilityResponse::err(&e))
    }
}

#[cfg(test)]
mod tests {
    use factum_proto::ErrorCode;

    use super::*;
    use proptest::prelude::*;

    fn inv(cap: &str, op: &KvOperation) -> CapabilityInvocation {
        let (operation, params) = op.encode();
        CapabilityInvocation { instance_id: "i".into(), capability_id: cap.into(), operation, params }
    }

    const ALL: [Permission; 3] = [Permission::KvRead, Permission::KvWrite, Permission::KvDelete];

    #[tokio::test]
    async fn get_set_delete_list() {
        let kv = MemoryKv::new();
        let set = |k: &str, v: &str| KvOperation::Set { key: k.into(), value: v.as_bytes().to_vec() };
        for (k, v) in [("a/1", "x"), ("a/2", "y"), ("b/1", "z")] {
            assert!(kv.invoke(&inv("s", &set(k, v)), &ALL).await.success);
        }
        let got = kv.invoke(&inv("s", &KvOperation::Get { key: "a/2".into() }), &ALL).await;
        assert_eq!(got.result_as::<Option<ByteBuf>>().unwrap().unwrap().as_ref(), b"y");
        let keys = kv.invoke(&inv("s", &KvOperation::list("a/")), &ALL).await;
        assert_eq!(keys.result_as::<Vec<String>>().unwrap(), vec!["a/1", "a/2"]);
        let del = kv.invoke(&inv("s", &KvOperation::Delete { key: "a/1".into() }), &ALL).await;
        assert!(del.result_as::<bool>().unwrap());
        let gone = kv.invoke(&inv("s", &KvOperation::Get { key: "a/1".into() }), &ALL).await;
        assert_eq!(gone.result_as::<Option<ByteBuf>>().unwrap(), None);
        // Another capability id is another store.
        let other = kv.invoke(&inv("t", &KvOperation::Get { key: "a/2".into() }), &ALL).await;
        assert_eq!(other.result_as::<Option<ByteBuf>>().unwrap(), None);
    }

    #[tokio::test]
    async fn full_store_is_resource_exhausted_and_shutdown_is_unavailable() {
        let kv = MemoryKv::with_max_keys(1);
        let set = |k: &str| KvOperation::Set { key: k.into(), value: vec![] };
        assert!(kv.invoke(&inv("s", &set("a")), &ALL).await.success);
        assert!(kv.invoke(&inv("s", &set("a")), &ALL).await.success, "overwrite is not a new key");
        assert_eq!(kv.invoke(&inv("s", &set("b")), &ALL).await.error_code(), Some(ErrorCode::ResourceExhausted));
        kv.shutdown().await.unwrap();
        assert_eq!(kv.invoke(&inv("s", &set("a")), &ALL).await.error_code(), Some(ErrorCode::ProviderUnavailable));
    }

    fn arb_op() -> impl Strategy<Value = KvOperation> {
        prop_oneof![
            "[a-c]{1,2}".prop_map(|key| KvOperation::Get { key }),
            ("[a-c]{1,2}", prop::collection::vec(any::<u8>(), 0..4))
                .prop_map(|(key, value)| KvOperation::Set { key, value }),
            "[a-c]{1,2}".prop_map(|key| KvOperation::Delete { key }),
            ("[a-c]{0,1}", prop::option::of("[a-c]{0,2}"), prop::option::of(1u32..4))
                .prop_map(|(prefix, after, limit)| KvOperation::List { prefix, after, limit }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        // The model and permission properties run on every backend, this one included: tests/kv_backends.rs.

        /// Feature: wasm-orchestrator, Property 20: Graceful Provider Shutdown Handling
        /// After shutdown every invocation, whatever it is, gets PROVIDER_UNAVAILABLE; nothing panics and the
        /// stored data is left as it was.
        #[test]
        fn shutdown_refuses_everything_gracefully(before in prop::collection::vec(arb_op(), 0..10), after in prop::collection::vec(arb_op(), 1..10)) {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            rt.block_on(async {
                let kv = MemoryKv::new();
                for op in &before {
                    prop_assert!(kv.invoke(&inv("s", op), &ALL).await.success);
                }
                let snapshot = kv.inspect("s", "").await.unwrap();
                kv.shutdown().await.unwrap();
                for op in &after {
                    prop_assert_eq!(kv.invoke(&inv("s", op), &ALL).await.error_code(), Some(ErrorCode::ProviderUnavailable));
                }
                prop_assert_eq!(kv.inspect("s", "").await.unwrap(), snapshot);
                Ok(())
            })?;
        }

        /// Feature: wasm-orchestrator, Property 21: Provider and Instance Metadata Separation
        /// Provider metadata is its own structure: no invocation, from any instance, changes it or adds
        /// anything about instances to it.
        #[test]
        fn provider_metadata_is_independent_of_instances(ops in prop::collection::vec(("inst-[a-z]{1,6}", arb_op()), 0..20)) {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            rt.block_on(async {
                let kv = MemoryKv::new();
                let before = kv.metadata();
                for (instance, op) in &ops {
                    let mut invocation = inv("s", op);
                    invocation.instance_id = instance.clone();
                    kv.invoke(&invocation, &ALL).await;
                }
                prop_assert_eq!(kv.metadata(), before);
                let operations = kv.metadata().operations;
                let leaked = ops.iter().any(|(instance, _)| operations.contains(instance) || kv.metadata().name == *instance);
                prop_assert!(!leaked);
                Ok(())
            })?;
        }
    }
}
