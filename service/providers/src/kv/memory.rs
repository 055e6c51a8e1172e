//! The in-memory KV backend: one sorted map per store.

use std::collections::BTreeMap;
use std::sync::Mutex;

use async_trait::async_trait;
use factum_proto::{ErrorCode, ErrorResponse};

use super::KvBackend;

/// Default most bytes (keys and values) of one store.
pub const DEFAULT_MAX_STORE_BYTES: usize = 64 * 1024 * 1024;
/// Default most bytes of every store of one node together.
pub const DEFAULT_MAX_TOTAL_BYTES: usize = 1024 * 1024 * 1024;

#[derive(Default)]
struct Stores {
    stores: BTreeMap<String, Store>,
    /// Bytes of every store together.
    bytes: usize,
}

#[derive(Default)]
struct Store {
    entries: BTreeMap<String, Vec<u8>>,
    /// Key and value bytes of `entries`.
    bytes: usize,
}

/// In-memory stores keyed by capability id, bounded in keys per store and in bytes per store and per node:
/// counting keys alone would let 100,000 values of 1 MiB each into one store.
pub struct MemoryStore {
    stores: Mutex<Stores>,
    max_keys: usize,
    max_store_bytes: usize,
    max_total_bytes: usize,
}

impl MemoryStore {
    /// Empty stores of at most `max_keys` keys each, and the default byte limits.
    pub fn new(max_keys: usize) -> Self {
        Self::with_limits(max_keys, DEFAULT_MAX_STORE_BYTES, DEFAULT_MAX_TOTAL_BYTES)
    }

    /// Empty stores of at most `max_keys` keys and `max_store_bytes` each, `max_total_bytes` together.
    pub fn with_limits(max_keys: usize, max_store_bytes: usize, max_total_bytes: usize) -> Self {
        Self { stores: Mutex::new(Stores::default()), max_keys, max_store_bytes, max_total_bytes }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Stores> {
        self.stores.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn range(&self, store: &str, prefix: &str) -> Vec<(String, Vec<u8>)> {
        self.lock()
            .stores
            .get(store)
            .map(|s| {
                s.entries
                    .range(prefix.to_string()..)
                    .take_while(|(k, _)| k.starts_with(prefix))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[async_trait]
impl KvBackend for MemoryStore {
    fn name(&self) -> &'static str {
        "kv-memory"
    }

    async fn get(&self, store: &str, key: &str) -> Result<Option<Vec<u8>>, ErrorResponse> {
        Ok(self.lock().stores.get(store).and_then(|s| s.entries.get(key)).cloned())
    }

    async fn set(&self, store: &str, key: &str, value: &[u8]) -> Result<(), ErrorResponse> {
        let full = |why: String| Err(ErrorResponse::new(ErrorCode::ResourceExhausted, why));
        let mut guard = self.lock();
        let Stores { stores, bytes: total } = &mut *guard;
        let entries = stores.entry(store.to_string()).or_default();
        let old = entries.entries.get(key).map(|v| key.len() + v.len());
        if old.is_none() && entries.entries.len() >= self.max_keys {
            return full(format!("kv store {store} is full ({} keys)", self.max_keys));
        }
        let new = key.len() + value.len();
        let grows = new.saturating_sub(old.unwrap_or(0));
        if entries.bytes.saturating_add(grows) > self.max_store_bytes {
            return full(format!("kv store {store} is full ({} bytes)", self.max_store_bytes));
        }
        if total.saturating_add(grows) > self.max_total_bytes {
            return full(format!("the node's kv stores are full ({} bytes together)", self.max_total_bytes));
        }
        entries.bytes = entries.bytes - old.unwrap_or(0) + new;
        *total = *total - old.unwrap_or(0) + new;
        entries.entries.insert(key.to_string(), value.to_vec());
        Ok(())
    }

    async fn delete(&self, store: &str, key: &str) -> Result<bool, ErrorResponse> {
        let mut guard = self.lock();
        let Stores { stores, bytes: total } = &mut *guard;
        let Some(entries) = stores.get_mut(store) else { return Ok(false) };
        let Some(value) = entries.entries.remove(key) else { return Ok(false) };
        entries.bytes -= key.len() + value.len();
        *total -= key.len() + value.len();
        Ok(true)
    }

    async fn list(
        &self,
        store: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, ErrorResponse> {
        use std::ops::Bound;
        let guard = self.lock();
        let Some(entries) = guard.stores.get(store) else { return Ok(Vec::new()) };
        // From the later of the prefix and `after` (excluded), so a page costs its own size, not the store's.
        let from = match after {
            Some(after) if after >= prefix => Bound::Excluded(after.to_string()),
            _ => Bound::Included(prefix.to_string()),
        };
        Ok(entries
            .entries
            .range::<String, _>((from, Bound::Unbounded))
            .map(|(k, _)| k)
            .take_while(|k| k.starts_with(prefix))
            .take(limit)
            .cloned()
            .collect())
    }

    async fn entries(&self, store: &str, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, ErrorResponse> {
        Ok(self.range(store, prefix))
    }
}
