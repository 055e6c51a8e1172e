//! The Redis KV backend: each store (capability id) is one Redis hash, `<namespace>:kv:<capability id>`, whose
//! fields are the keys. Capability ids cannot contain `:`, so stores never overlap; the namespace keeps clusters
//! sharing one Redis apart. The per-store key limit is checked and applied atomically in a Lua script.

use std::time::Duration;

use async_trait::async_trait;
use factum_proto::{ErrorCode, ErrorResponse};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::KvBackend;

/// Sets a field unless that would add a key to a full hash: 1 if set, 0 if full.
const CAPPED_SET: &str = r"
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 or redis.call('HLEN', KEYS[1]) < tonumber(ARGV[3]) then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  return 1
end
return 0
";

/// KV stores in Redis.
pub struct RedisStore {
    connection: ConnectionManager,
    namespace: String,
    max_keys: usize,
    capped_set: redis::Script,
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
        let client =
            redis::Client::open(url).map_err(|e| ErrorResponse::invalid(format!("bad redis url {url:?}: {e}")))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(2);
        let connection = client.get_connection_manager_with_config(config).await.map_err(unavailable)?;
        Ok(RedisStore {
            connection,
            namespace: namespace.to_string(),
            max_keys,
            capped_set: redis::Script::new(CAPPED_SET),
        })
    }

    fn hash(&self, store: &str) -> String {
        format!("{}:kv:{store}", self.namespace)
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
            .arg(key)
            .arg(value)
            .arg(self.max_keys)
            .invoke_async(&mut connection)
            .await
            .map_err(unavailable)?;
        if set == 1 {
            Ok(())
        } else {
            Err(ErrorResponse::new(
                ErrorCode::ResourceExhausted,
                format!("kv store {store} is full ({} keys)", self.max_keys),
            ))
        }
    }

    async fn delete(&self, store: &str, key: &str) -> Result<bool, ErrorResponse> {
        let mut connection = self.connection.clone();
        let removed: i64 = redis::cmd("HDEL")
            .arg(self.hash(store))
            .arg(key)
            .query_async(&mut connection)
            .await
            .map_err(unavailable)?;
        Ok(removed > 0)
    }

    async fn list(&self, store: &str, prefix: &str) -> Result<Vec<String>, ErrorResponse> {
        let mut connection = self.connection.clone();
        let mut keys: Vec<String> =
            redis::cmd("HKEYS").arg(self.hash(store)).query_async(&mut connection).await.map_err(unavailable)?;
        keys.retain(|k| k.starts_with(prefix));
        keys.sort();
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
