//! The etcd registry (etcd v3 API through `etcd-client`). Leases are etcd leases; node and provider entries are
//! keys attached to them, so etcd itself deletes a node's entry when the node stops renewing.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, LeaseKeepAliveStream, LeaseKeeper, PutOptions, Txn, TxnOp,
    TxnOpResponse, WatchOptions,
};
use factum_env::{BackendTls, Env};
use tokio::sync::Mutex;

use crate::{
    check_ttl, decode, encode, Keys, LeaseId, Membership, NodeRegistration, ProviderRecord, Registry, RegistryError,
};

/// A [`Registry`] in etcd.
pub struct EtcdRegistry {
    env: Env,
    client: Client,
    keys: Keys,
    timeout: Duration,
    /// One keep-alive stream per lease this process renews, opened on first use.
    keepers: Mutex<BTreeMap<LeaseId, (LeaseKeeper, LeaseKeepAliveStream)>>,
}

fn unavailable(e: impl std::fmt::Display) -> RegistryError {
    RegistryError::Unavailable(format!("etcd: {e}"))
}

fn revision(header: Option<&etcd_client::ResponseHeader>) -> u64 {
    header.map_or(0, |h| u64::try_from(h.revision()).unwrap_or(0))
}

impl EtcdRegistry {
    /// Connects to the etcd cluster at `endpoints` (e.g. `["127.0.0.1:2379"]`), keys under `prefix`, `timeout`
    /// per call.
    pub async fn connect(
        env: Env,
        endpoints: &[String],
        prefix: &str,
        timeout: Duration,
    ) -> Result<Self, RegistryError> {
        Self::connect_with(env, endpoints, prefix, timeout, &BackendTls::default(), None).await
    }

    /// [`EtcdRegistry::connect`] over TLS as `tls` says (endpoints without a scheme are dialled `https://`;
    /// the server's certificate is checked against `tls.ca`, and `tls.client` shown to an etcd that verifies
    /// clients), and as etcd user `user` (name, password) when given.
    pub async fn connect_with(
        env: Env,
        endpoints: &[String],
        prefix: &str,
        timeout: Duration,
        tls: &BackendTls,
        user: Option<(String, String)>,
    ) -> Result<Self, RegistryError> {
        let mut options = ConnectOptions::new().with_connect_timeout(timeout).with_timeout(timeout);
        if tls.enabled() {
            let unreadable = |e: std::io::Error| unavailable(e);
            let mut config = etcd_client::TlsOptions::new();
            if let Some(ca) = tls.read_ca().map_err(unreadable)? {
                config = config.ca_certificate(etcd_client::Certificate::from_pem(ca));
            }
            if let Some((cert, key)) = tls.read_client().map_err(unreadable)? {
                config = config.identity(etcd_client::Identity::from_pem(cert, key));
            }
            options = options.with_tls(config);
        }
        if let Some((name, password)) = user {
            options = options.with_user(name, password);
        }
        let client = match env.timeout(timeout, Client::connect(endpoints, Some(options))).await {
            Some(Ok(client)) => client,
            Some(Err(e)) => return Err(unavailable(format!("cannot connect to {endpoints:?}: {e}"))),
            None => return Err(unavailable(format!("connecting to {endpoints:?} timed out"))),
        };
        Ok(EtcdRegistry { env, client, keys: Keys::new(prefix), timeout, keepers: Mutex::new(BTreeMap::new()) })
    }

    async fn bounded<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, RegistryError> {
        match self.env.timeout(self.timeout, call).await {
            Some(result) => result.map_err(unavailable),
            None => Err(unavailable(format!("call timed out after {:?}", self.timeout))),
        }
    }

    async fn list(&self, prefix: String) -> Result<(u64, Vec<(String, Vec<u8>)>), RegistryError> {
        let mut client = self.client.clone();
        let response = self.bounded(client.get(prefix, Some(GetOptions::new().with_prefix()))).await?;
        let entries = response
            .kvs()
            .iter()
            .map(|kv| (String::from_utf8_lossy(kv.key()).into_owned(), kv.value().to_vec()))
            .collect();
        Ok((revision(response.header()), entries))
    }

    async fn put(&self, key: String, value: Vec<u8>, lease: Option<LeaseId>) -> Result<(), RegistryError> {
        let mut client = self.client.clone();
        let options = lease.map(|l| PutOptions::new().with_lease(l));
        match self.env.timeout(self.timeout, client.put(key, value, options)).await {
            Some(Ok(_)) => Ok(()),
            // etcd refuses a put on a lease it does not know: "requested lease not found".
            Some(Err(e)) if e.to_string().contains("lease not found") => {
                Err(RegistryError::LeaseExpired(lease.unwrap_or_default()))
            }
            Some(Err(e)) => Err(unavailable(e)),
            None => Err(unavailable(format!("put timed out after {:?}", self.timeout))),
        }
    }
}

#[async_trait]
impl Registry for EtcdRegistry {
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, RegistryError> {
        check_ttl(ttl)?;
        let seconds = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX).max(1);
        let mut client = self.client.clone();
        Ok(self.bounded(client.lease_grant(seconds, None)).await?.id())
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), RegistryError> {
        let mut keepers = self.keepers.lock().await;
        let (keeper, stream) = match keepers.entry(lease) {
            std::collections::btree_map::Entry::Occupied(open) => open.into_mut(),
            std::collections::btree_map::Entry::Vacant(slot) => {
                let mut client = self.client.clone();
                slot.insert(self.bounded(client.lease_keep_alive(lease)).await?)
            }
        };
        let renewed = async {
            keeper.keep_alive().await?;
            stream.message().await
        };
        let outcome = self.env.timeout(self.timeout, renewed).await;
        match outcome {
            Some(Ok(Some(response))) if response.ttl() > 0 => Ok(()),
            Some(Ok(Some(_))) => {
                keepers.remove(&lease);
                Err(RegistryError::LeaseExpired(lease))
            }
            Some(Ok(None)) => {
                keepers.remove(&lease);
                Err(unavailable("keep-alive stream closed"))
            }
            Some(Err(e)) => {
                keepers.remove(&lease);
                Err(unavailable(e))
            }
            None => {
                keepers.remove(&lease);
                Err(unavailable("keep-alive timed out"))
            }
        }
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), RegistryError> {
        self.keepers.lock().await.remove(&lease);
        let mut client = self.client.clone();
        match self.env.timeout(self.timeout, client.lease_revoke(lease)).await {
            Some(Ok(_)) => Ok(()),
            Some(Err(e)) if e.to_string().contains("lease not found") => Err(RegistryError::LeaseExpired(lease)),
            Some(Err(e)) => Err(unavailable(e)),
            None => Err(unavailable("revoke timed out")),
        }
    }

    async fn register_node(&self, node: &NodeRegistration, lease: LeaseId) -> Result<(), RegistryError> {
        let key = self.keys.node(&node.node_id)?;
        let value = encode(node)?;
        // "Absent or ours": etcd compares the key's lease, an absent key comparing as lease 0. Expect absent
        // first; if the key turns out to be ours (or to have just gone), expect that instead.
        let mut expected = 0;
        for _ in 0..3 {
            let put = TxnOp::put(key.clone(), value.clone(), Some(PutOptions::new().with_lease(lease)));
            let txn = Txn::new()
                .when([Compare::lease(key.clone(), CompareOp::Equal, expected)])
                .and_then([put])
                .or_else([TxnOp::get(key.clone(), None)]);
            let mut client = self.client.clone();
            let response = match self.env.timeout(self.timeout, client.txn(txn)).await {
                Some(Ok(response)) => response,
                Some(Err(e)) if e.to_string().contains("lease not found") => {
                    return Err(RegistryError::LeaseExpired(lease))
                }
                Some(Err(e)) => return Err(unavailable(e)),
                None => return Err(unavailable(format!("txn timed out after {:?}", self.timeout))),
            };
            if response.succeeded() {
                return Ok(());
            }
            let held = response
                .op_responses()
                .iter()
                .find_map(|op| match op {
                    TxnOpResponse::Get(get) => get.kvs().first().map(|kv| kv.lease()),
                    _ => None,
                })
                .unwrap_or(0);
            if held != 0 && held != lease {
                return Err(RegistryError::Taken { node_id: node.node_id.clone(), lease: held });
            }
            expected = held;
        }
        Err(unavailable(format!("the entry of node {} kept changing while it registered", node.node_id)))
    }

    async fn membership(&self) -> Result<Membership, RegistryError> {
        let (revision, entries) = self.list(self.keys.nodes()).await?;
        let nodes = entries.iter().map(|(k, v)| decode(k, v)).collect::<Result<Vec<_>, _>>()?;
        Ok(Membership { revision, nodes })
    }

    async fn watch_membership(&self, after_revision: u64, max_wait: Duration) -> Result<Membership, RegistryError> {
        let current = self.membership().await?;
        if current.revision > after_revision {
            return Ok(current);
        }
        let start = i64::try_from(after_revision + 1).unwrap_or(i64::MAX);
        let options = WatchOptions::new().with_prefix().with_start_revision(start);
        let mut client = self.client.clone();
        let mut stream = self.bounded(client.watch(self.keys.nodes(), Some(options))).await?;
        // Any event, an error or the end of `max_wait`: re-read and let the caller diff (level-triggered).
        let _ = self.env.timeout(max_wait, stream.message()).await;
        self.membership().await
    }

    async fn put_provider(&self, provider: &ProviderRecord, lease: Option<LeaseId>) -> Result<(), RegistryError> {
        self.put(self.keys.provider(&provider.provider_id)?, encode(provider)?, lease).await
    }

    async fn providers(&self) -> Result<Vec<ProviderRecord>, RegistryError> {
        let (_, entries) = self.list(self.keys.providers()).await?;
        entries.iter().map(|(k, v)| decode(k, v)).collect()
    }

    async fn keys(&self) -> Result<Vec<String>, RegistryError> {
        let mut client = self.client.clone();
        let options = GetOptions::new().with_prefix().with_keys_only();
        let response = self.bounded(client.get(self.keys.root(), Some(options))).await?;
        Ok(response.kvs().iter().map(|kv| String::from_utf8_lossy(kv.key()).into_owned()).collect())
    }
}
