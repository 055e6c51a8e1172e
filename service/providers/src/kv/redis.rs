//! The Redis KV backend: each store (capability id) is one Redis hash, `<namespace>:kv:<capability id>`, whose
//! fields are the keys. Capability ids cannot contain `:`, so stores never overlap; the namespace keeps clusters
//! sharing one Redis apart. The limits (keys per store, bytes per store, bytes of every store of the namespace
//! together) are checked and applied atomically in Lua scripts, beside byte counters kept in the same Redis.

use std::time::Duration;

use async_trait::async_trait;
use factum_proto::{ErrorCode, ErrorResponse};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::KvBackend;
use crate::BackendTls;

/// Sets field ARGV[1] of hash KEYS[1] to ARGV[2] unless that would add a key to a hash of ARGV[3] keys (0), grow
/// the store's byte counter KEYS[2] past ARGV[4] (-1) or the namespace's KEYS[3] past ARGV[5] (-2); 1 if set.
/// A key counts its own bytes and its value's.
const CAPPED_SET: &str = r"
local exists = redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1
if not exists and redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
local grows = string.len(ARGV[2])
if exists then grows = grows - redis.call('HSTRLEN', KEYS[1], ARGV[1]) else grows = grows + string.len(ARGV[1]) end
if grows > 0 then
  if tonumber(redis.call('GET', KEYS[2]) or '0') + grows > tonumber(ARGV[4]) then return -1 end
  if tonumber(redis.call('GET', KEYS[3]) or '0') + grows > tonumber(ARGV[5]) then return -2 end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('INCRBY', KEYS[2], grows)
redis.call('INCRBY', KEYS[3], grows)
return 1
";

/// Deletes field ARGV[1] of hash KEYS[1], giving its bytes back to the counters KEYS[2] and KEYS[3]; 1 if it
/// existed.
const COUNTED_DELETE: &str = r"
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
local freed = string.len(ARGV[1]) + redis.call('HSTRLEN', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('DECRBY', KEYS[2], freed)
redis.call('DECRBY', KEYS[3], freed)
return 1
";

/// KV stores in Redis.
pub struct RedisStore {
    connection: ConnectionManager,
    namespace: String,
    max_keys: usize,
    max_store_bytes: usize,
    max_total_bytes: usize,
    capped_set: redis::Script,
    counted_delete: redis::Script,
}

fn unavailable(e: redis::RedisError) -> ErrorResponse {
    ErrorResponse::new(ErrorCode::ProviderUnavailable, format!("kv-redis: {e}"))
}

impl RedisStore {
    /// Connects to `url` (e.g. `redis://127.0.0.1:6379`); stores live under `namespace`, each holding at most
    /// `max_keys` keys; `timeout` bounds connecting and every command (a slow Redis is PROVIDER_UNAVAILABLE,
    /// never a hung guest).
    pub async fn connect(
        url: &str,
        namespace: &str,
        max_keys: usize,
        timeout: Duration,
    ) -> Result<Self, ErrorResponse> {
        Self::connect_with(url, namespace, max_keys, timeout, &BackendTls::default()).await
    }

    /// [`RedisStore::connect`] over TLS as `tls` says, for a `rediss://` URL: the server's certificate checked
    /// against `tls.ca` (the system's roots without one), and `tls.client` shown when the server verifies
    /// clients. User and password go in the URL (`rediss://user:password@host:6380`).
    pub async fn connect_with(
        url: &str,
        namespace: &str,
        max_keys: usize,
        timeout: Duration,
        tls: &BackendTls,
    ) -> Result<Self, ErrorResponse> {
        let bad_url = |e: redis::RedisError| ErrorResponse::invalid(format!("bad redis url {url:?}: {e}"));
        let client = if tls.enabled() {
            if !url.starts_with("rediss://") {
                return Err(ErrorResponse::invalid(format!("TLS to Redis needs a rediss:// URL, not {url:?}")));
            }
            let unreadable = |e: std::io::Error| ErrorResponse::invalid(e.to_string());
            let client_tls = tls
                .read_client()
                .map_err(unreadable)?
                .map(|(client_cert, client_key)| redis::ClientTlsConfig { client_cert, client_key });
            let root_cert = tls.read_ca().map_err(unreadable)?;
            redis::Client::build_with_tls(url, redis::TlsCertificates { client_tls, root_cert }).map_err(bad_url)?
        } else {
            redis::Client::open(url).map_err(bad_url)?
        };
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(2);
        let connection = client.get_connection_manager_with_config(config).await.map_err(unavailable)?;
        Ok(RedisStore {
            connection,
            namespace: namespace.to_string(),
            max_keys,
            max_store_bytes: super::memory::DEFAULT_MAX_STORE_BYTES,
            max_total_bytes: super::memory::DEFAULT_MAX_TOTAL_BYTES,
            capped_set: redis::Script::new(CAPPED_SET),
            counted_delete: redis::Script::new(COUNTED_DELETE),
        })
    }

    /// The same store with other byte limits: at most `max_store_bytes` per store (keys and values) and
    /// `max_total_bytes` for every store of the namespace together (defaults: as the in-memory backend's).
    pub fn with_byte_limits(mut self, max_store_bytes: usize, max_total_bytes: usize) -> Self {
        (self.max_store_bytes, self.max_total_bytes) = (max_store_bytes, max_total_bytes);
        self
    }

    fn hash(&self, store: &str) -> String {
        format!("{}:kv:{store}", self.namespace)
    }

    /// The byte counter of `store` (store ids cannot contain `:`, so it never names a hash).
    fn store_bytes(&self, store: &str) -> String {
        format!("{}:kvbytes:{store}", self.namespace)
    }

    fn total_bytes(&self) -> String {
        format!("{}:kvbytes", self.namespace)
    }
}

#[async_trait]
impl KvBackend for RedisStore {
    fn name(&self) -> &'static str {
        "kv-redis"
    }

    async fn get(&self, store: &str, key: &str) -> Result<Option<Vec<u8>>, ErrorResponse> {
        let mut connection = self.connection.clone();
        redis::cmd("HGET").arg(self.hash(store)).arg(key).query_async(&mut connection).await.map_err(unavailable)
    }

    async fn set(&self, store: &str, key: &str, value: &[u8]) -> Result<(), ErrorResponse> {
        let mut connection = self.connection.clone();
        let set: i64 = self
            .capped_set
            .key(self.hash(store))
            .key(self.store_bytes(store))
            .key(self.total_bytes())
            .arg(key)
            .arg(value)
            .arg(self.max_keys)
            .arg(self.max_store_bytes)
            .arg(self.max_total_bytes)
            .invoke_async(&mut connection)
            .await
            .map_err(unavailable)?;
        let full = |why: String| Err(ErrorResponse::new(ErrorCode::ResourceExhausted, why));
        match set {
            1 => Ok(()),
            0 => full(format!("kv store {store} is full ({} keys)", self.max_keys)),
            -1 => full(format!("kv store {store} is full ({} bytes)", self.max_store_bytes)),
            _ => full(format!("the cluster's kv stores are full ({} bytes together)", self.max_total_bytes)),
        }
    }

    async fn delete(&self, store: &str, key: &str) -> Result<bool, ErrorResponse> {
        let mut connection = self.connection.clone();
        let removed: i64 = self
            .counted_delete
            .key(self.hash(store))
            .key(self.store_bytes(store))
            .key(self.total_bytes())
            .arg(key)
            .invoke_async(&mut connection)
            .await
            .map_err(unavailable)?;
        Ok(removed > 0)
    }

    async fn list(
        &self,
        store: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, ErrorResponse> {
        let mut connection = self.connection.clone();
        // A Redis hash has no order: the page is cut here, from a store bounded by its key cap.
        let mut keys: Vec<String> =
            redis::cmd("HKEYS").arg(self.hash(store)).query_async(&mut connection).await.map_err(unavailable)?;
        keys.retain(|k| k.starts_with(prefix) && after.is_none_or(|a| k.as_str() > a));
        keys.sort();
        keys.truncate(limit);
        Ok(keys)
    }

    async fn entries(&self, store: &str, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, ErrorResponse> {
        let mut connection = self.connection.clone();
        let mut entries: Vec<(String, Vec<u8>)> =
            redis::cmd("HGETALL").arg(self.hash(store)).query_async(&mut connection).await.map_err(unavailable)?;
        entries.retain(|(k, _)| k.starts_with(prefix));
        entries.sort();
        Ok(entries)
    }
}
