//! Routing a capability call to one of the provider hosts of its kind (P17). The rule, the same on every
//! agent so calls on one store meet at one host:
//! 1. a host on the calling agent's own node first (no network hop beyond loopback);
//! 2. then every other host in rendezvous order for the call's capability id (highest SHA-256 weight of
//!    capability and host id first), so each store has one preferred host cluster-wide, and a host that joins
//!    or leaves moves only the stores it wins or held.
//!
//! A call goes to the first host in that order. An idempotent one (KV `get`, `list`) that comes back
//! PROVIDER_UNAVAILABLE is tried on the next host, and so on; any other call is answered by its first host
//! alone, since it may have taken effect there before the answer was lost. Hosts of one kind are
//! interchangeable only when they share their backend (e.g. one Redis): with in-memory stores, run one host
//! per kind, or accept that a store moves (empty) with its host.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use factum_env::Env;
use factum_proto::{
    CapabilityInvocation, CapabilityResponse, ErrorCode, ErrorResponse, Principal, ProviderType, SealedGrant,
};
use sha2::{Digest, Sha256};

use crate::remote::RemoteProvider;

/// The trace event of an idempotent call that went on to the next host after its host was unavailable:
/// `rerouted <kind> <operation> <from> -> <to>` (recorded only where the env traces, as in simulation).
pub const REROUTED: &str = "rerouted";

/// One provider host calls may go to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct HostEntry {
    /// Its id: it proves the identity `provider/<id>`.
    pub id: String,
    /// The node it runs on (empty when unknown).
    pub node: String,
    /// Where it serves agents.
    pub addr: String,
}

/// A provider host in routing: where it is, and the one client (one multiplexed connection) to it.
pub struct Host {
    /// Which host.
    pub entry: HostEntry,
    /// Its client.
    pub client: RemoteProvider,
}

/// Whether an operation of `kind` may run twice with the effect of once, so a call may go to another host
/// after the first did not answer.
pub fn is_idempotent(kind: ProviderType, operation: &str) -> bool {
    kind == ProviderType::Kv && matches!(operation, "get" | "list")
}

/// The provider hosts of one kind that a node's calls may go to, and one client (one multiplexed connection)
/// per host. The set changes as hosts come and go ([`ProviderHosts::set`]); a host that stays keeps its
/// connection.
pub struct ProviderHosts {
    kind: ProviderType,
    /// Introduces itself as the calling node.
    env: Env,
    node: String,
    timeout: Duration,
    hosts: Mutex<BTreeMap<HostEntry, Arc<Host>>>,
    #[cfg(feature = "injected-bugs")]
    bug: Option<crate::remote::HostBug>,
}

impl ProviderHosts {
    /// No hosts yet, for calls of `kind` from `node`, with `timeout` per dial and per call. `env` must
    /// introduce itself as `node` (`Principal::Node`): a provider host serves nobody else.
    pub fn new(kind: ProviderType, env: Env, node: impl Into<String>, timeout: Duration) -> Self {
        ProviderHosts {
            kind,
            env,
            node: node.into(),
            timeout,
            hosts: Mutex::new(BTreeMap::new()),
            #[cfg(feature = "injected-bugs")]
            bug: None,
        }
    }

    /// These hosts, with `bug` in every client made from now on.
    #[cfg(feature = "injected-bugs")]
    pub fn with_injected_bug(mut self, bug: crate::remote::HostBug) -> Self {
        self.bug = Some(bug);
        self
    }

    /// The kind of calls these hosts serve.
    pub fn kind(&self) -> ProviderType {
        self.kind
    }

    /// Makes `entries` the hosts; clients of hosts that stay are kept. An entry whose id is not a valid
    /// provider id is skipped with a warning (it could never prove its identity).
    pub fn set(&self, entries: impl IntoIterator<Item = HostEntry>) {
        let mut hosts = self.lock();
        let mut next = BTreeMap::new();
        for entry in entries {
            if let Some(client) = hosts.remove(&entry) {
                next.insert(entry, client);
                continue;
            }
            let principal: Principal = match format!("provider/{}", entry.id).parse() {
                Ok(principal) => principal,
                Err(e) => {
                    tracing::warn!(provider = %entry.id, error = %e.message, "skipping a provider host");
                    continue;
                }
            };
            tracing::info!(kind = %self.kind, provider = %entry.id, node = %entry.node, addr = %entry.addr,
                "provider host in routing");
            let client = RemoteProvider::new(self.env.clone(), entry.addr.clone(), principal, self.timeout);
            #[cfg(feature = "injected-bugs")]
            let client = match self.bug {
                Some(bug) => client.with_injected_bug(bug),
                None => client,
            };
            next.insert(entry.clone(), Arc::new(Host { entry, client }));
        }
        for gone in hosts.keys() {
            tracing::info!(kind = %self.kind, provider = %gone.id, addr = %gone.addr, "provider host left routing");
        }
        *hosts = next;
    }

    /// The hosts now, ordered by id.
    pub fn entries(&self) -> Vec<HostEntry> {
        self.lock().keys().cloned().collect()
    }

    /// The hosts a call on `capability` tries, in order (see the module's rule).
    pub fn order(&self, capability: &str) -> Vec<Arc<Host>> {
        let mut order: Vec<Arc<Host>> = self.lock().values().cloned().collect();
        if order.len() > 1 {
            order.sort_by_cached_key(|h| (h.entry.node != self.node, std::cmp::Reverse(weight(capability, &h.entry))));
        }
        order
    }

    /// Runs `invocation` under `grant` on the first host in order, and on the next ones while an idempotent
    /// call finds its host unavailable. PROVIDER_UNAVAILABLE when there is no host.
    pub async fn invoke(&self, invocation: CapabilityInvocation, grant: SealedGrant) -> CapabilityResponse {
        let order = self.order(&invocation.capability_id);
        let Some(last) = order.len().checked_sub(1) else {
            let why = format!("no {} provider host is known to node {}", self.kind, self.node);
            return CapabilityResponse::err(&ErrorResponse::new(ErrorCode::ProviderUnavailable, why));
        };
        #[cfg(feature = "injected-bugs")]
        let retried = self.bug == Some(crate::remote::HostBug::RetriedWrites);
        #[cfg(not(feature = "injected-bugs"))]
        let retried = false;
        let last = if retried || is_idempotent(self.kind, &invocation.operation) { last } else { 0 };
        for (n, host) in order.iter().enumerate().take(last) {
            let response = host.client.invoke(invocation.clone(), grant.clone()).await;
            if response.error_code() != Some(ErrorCode::ProviderUnavailable) {
                return response;
            }
            self.env.trace(|| {
                let next = order.get(n + 1).map_or("-", |h| h.entry.id.as_str());
                format!("{REROUTED} {} {} {} -> {next}", self.kind, invocation.operation, host.entry.id)
            });
        }
        match order.get(last) {
            Some(host) => host.client.invoke(invocation, grant).await,
            None => CapabilityResponse::err(&ErrorResponse::internal("routing lost its last host")),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<HostEntry, Arc<Host>>> {
        self.hosts.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The rendezvous weight of `host` for calls on `capability`.
fn weight(capability: &str, host: &HostEntry) -> u64 {
    let digest = Sha256::new().chain_update(capability).chain_update([0]).chain_update(&host.id).finalize();
    digest.iter().take(8).fold(0, |w, b| (w << 8) | u64::from(*b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(node: &str, ids: &[(&str, &str)]) -> ProviderHosts {
        let hosts = ProviderHosts::new(ProviderType::Kv, Env::tokio(), node, Duration::from_secs(1));
        hosts.set(ids.iter().map(|(id, node)| HostEntry {
            id: id.to_string(),
            node: node.to_string(),
            addr: format!("{id}:1"),
        }));
        hosts
    }

    fn order(hosts: &ProviderHosts, capability: &str) -> Vec<String> {
        hosts.order(capability).into_iter().map(|h| h.entry.id.clone()).collect()
    }

    #[test]
    fn the_own_nodes_host_comes_first_then_every_agent_agrees_per_store() {
        let all = [("a", "n1"), ("b", "n2"), ("c", "n3"), ("d", "")];
        let (on_n1, on_n9) = (hosts("n1", &all), hosts("n9", &all));
        for store in ["kv", "cache", "sessions", "x"] {
            assert_eq!(order(&on_n1, store)[0], "a", "own node first");
            let (mut mine, theirs) = (order(&on_n1, store), order(&on_n9, store));
            mine.retain(|id| id != "a");
            let mut others = theirs.clone();
            others.retain(|id| id != "a");
            assert_eq!(mine, others, "the rest in one order on every node");
        }
        let firsts: std::collections::BTreeSet<String> =
            (0..64).map(|i| order(&on_n9, &format!("store-{i}"))[0].clone()).collect();
        assert_eq!(firsts.len(), 4, "stores spread over all hosts: {firsts:?}");
    }

    #[test]
    fn a_host_leaving_moves_only_the_stores_it_led() {
        let before = hosts("n9", &[("a", ""), ("b", ""), ("c", "")]);
        let after = hosts("n9", &[("a", ""), ("c", "")]);
        for i in 0..64 {
            let store = format!("store-{i}");
            let led = order(&before, &store)[0].clone();
            if led != "b" {
                assert_eq!(order(&after, &store)[0], led, "{store} stays where it was");
            }
        }
    }

    #[test]
    fn set_keeps_the_clients_of_hosts_that_stay() {
        let hosts = hosts("n1", &[("a", "n1"), ("b", "n2")]);
        let kept = hosts.order("kv").into_iter().find(|h| h.entry.id == "b").unwrap();
        hosts.set([HostEntry { id: "b".into(), node: "n2".into(), addr: "b:1".into() }]);
        let now = hosts.order("kv");
        assert_eq!(now.len(), 1);
        assert!(Arc::ptr_eq(&now[0], &kept));
        hosts.set([HostEntry { id: "bad id!".into(), node: String::new(), addr: "x:1".into() }]);
        assert!(hosts.entries().is_empty(), "an id that can prove no identity is skipped");
    }

    #[test]
    fn only_kv_reads_are_idempotent() {
        assert!(is_idempotent(ProviderType::Kv, "get") && is_idempotent(ProviderType::Kv, "list"));
        assert!(!is_idempotent(ProviderType::Kv, "set") && !is_idempotent(ProviderType::Kv, "delete"));
        assert!(!is_idempotent(ProviderType::Http, "request"));
    }
}
