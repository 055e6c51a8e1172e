//! The in-memory KV backend: one sorted map per store.

use std::collections::BTreeMap;
use std::sync::Mutex;

use async_trait::async_trait;
use factum_proto::{ErrorCode, ErrorResponse};

use super::KvBackend;

type Stores = BTreeMap<String, BTreeMap<String, Vec<u8>>>;

/// In-memory stores keyed by capability id, each holding at most `max_keys` keys.
pub struct MemoryStore {
    stores: Mutex<Stores>,
    max_keys: usize,
}

impl MemoryStore {
    /// Empty stores of at most `max_keys` keys each.
    pub fn new(max_keys: usize) -> Self {
        Self { stores: Mutex::new(BTreeMap::new()), max_keys }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Stores> {
        self.stores.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn range(&self, store: &str, prefix: &str) -> Vec<(String, Vec<u8>)> {
        self.lock()
            .get(store)
            .map(|s| {
                s.range(prefix.to_string()..)
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
        Ok(self.lock().get(store).and_then(|s| s.get(key)).cloned())
    }

    async fn set(&self, store: &str, key: &str, value: &[u8]) -> Result<(), ErrorResponse> {
        let mut stores = self.lock();
        let entries = stores.entry(store.to_string()).or_default();
        if !entries.contains_key(key) && entries.len() >= self.max_keys {
            return Err(ErrorResponse::new(
                ErrorCode::ResourceExhausted,
                format!("kv store {store} is full ({} keys)", self.max_keys),
            ));
        }
        entries.insert(key.to_string(), value.to_vec());
        Ok(())
    }

    async fn delete(&self, store: &str, key: &str) -> Result<bool, ErrorResponse> {
        Ok(self.lock().get_mut(store).and_then(|s| s.remove(key)).is_some())
    }

    async fn list(&self, store: &str, prefix: &str) -> Result<Vec<String>, ErrorResponse> {
        Ok(self.range(store, prefix).into_iter().map(|(k, _)| k).collect())
    }

    async fn entries(&self, store: &str, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, ErrorResponse> {
        Ok(self.range(store, prefix))
    }
}
