//! An in-memory registry with etcd's lease semantics on the env clock: the single-node default (P15) and, served
//! over the simulated network, the simulation's etcd.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use factum_env::Env;
use tokio::sync::watch;

use crate::{
    check_ttl, decode, encode, Keys, LeaseId, Membership, NodeRegistration, ProviderRecord, Registry, RegistryError,
};

struct Lease {
    ttl: Duration,
    expires_at: Duration,
}

#[derive(Clone)]
struct Entry {
    value: Vec<u8>,
    lease: Option<LeaseId>,
}

#[derive(Default)]
struct State {
    revision: u64,
    next_lease: LeaseId,
    leases: BTreeMap<LeaseId, Lease>,
    entries: BTreeMap<String, Entry>,
}

/// In-memory registry; leases expire on the env clock (checked on every call and while watching).
pub struct MemoryRegistry {
    env: Env,
    keys: Keys,
    state: Mutex<State>,
    revision: watch::Sender<u64>,
}

impl MemoryRegistry {
    /// An empty registry with keys under `prefix`.
    pub fn new(env: Env, prefix: &str) -> Self {
        MemoryRegistry {
            env,
            keys: Keys::new(prefix),
            state: Mutex::new(State::default()),
            revision: watch::channel(0).0,
        }
    }

    /// The same data served by a new process, as etcd restarted from its data directory: entries, the revision
    /// and lease ids are kept, and every lease's TTL starts over from now on `env`'s clock (etcd does the same
    /// when a new leader takes over, so its own downtime never expires a lease).
    pub fn restarted(&self, env: Env) -> Self {
        let old = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = env.clock.now();
        let leases = old.leases.iter().map(|(id, l)| (*id, Lease { ttl: l.ttl, expires_at: now + l.ttl })).collect();
        let state = State { revision: old.revision, next_lease: old.next_lease, leases, entries: old.entries.clone() };
        env.trace(|| format!("registry recovered revision={} leases={}", state.revision, state.leases.len()));
        MemoryRegistry {
            env,
            keys: self.keys.clone(),
            revision: watch::channel(state.revision).0,
            state: Mutex::new(state),
        }
    }

    /// Locks the state after expiring every lease whose deadline has passed.
    fn lock(&self) -> MutexGuard<'_, State> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = self.env.clock.now();
        let expired: Vec<LeaseId> =
            state.leases.iter().filter(|(_, l)| l.expires_at <= now).map(|(id, _)| *id).collect();
        for lease in expired {
            self.env.trace(|| format!("registry lease {lease} expired"));
            tracing::info!(lease, "registry lease expired");
            self.end_lease(&mut state, lease);
        }
        state
    }

    fn end_lease(&self, state: &mut State, lease: LeaseId) {
        state.leases.remove(&lease);
        let before = state.entries.len();
        state.entries.retain(|_, e| e.lease != Some(lease));
        if state.entries.len() != before {
            self.bump(state);
        }
    }

    fn bump(&self, state: &mut State) {
        state.revision += 1;
        self.revision.send_replace(state.revision);
    }

    fn put(&self, key: String, value: Vec<u8>, lease: Option<LeaseId>) -> Result<(), RegistryError> {
        self.put_if(key, value, lease, |_| Ok(()))
    }

    /// Puts if `allowed` accepts the lease the key is held under now (`None`: absent or leaseless), checked
    /// under the same lock as the write.
    fn put_if(
        &self,
        key: String,
        value: Vec<u8>,
        lease: Option<LeaseId>,
        allowed: impl FnOnce(Option<LeaseId>) -> Result<(), RegistryError>,
    ) -> Result<(), RegistryError> {
        let mut state = self.lock();
        if let Some(lease) = lease {
            if !state.leases.contains_key(&lease) {
                return Err(RegistryError::LeaseExpired(lease));
            }
        }
        allowed(state.entries.get(&key).and_then(|e| e.lease))?;
        self.env.trace(|| format!("registry put {key} lease={lease:?} revision={}", state.revision + 1));
        state.entries.insert(key, Entry { value, lease });
        self.bump(&mut state);
        Ok(())
    }

    fn membership_now(&self) -> Result<Membership, RegistryError> {
        let state = self.lock();
        let prefix = self.keys.nodes();
        let nodes = state
            .entries
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(k, e)| decode::<NodeRegistration>(k, &e.value))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Membership { revision: state.revision, nodes })
    }

    /// Every key held and its value, for invariant checkers that inspect the registry directly (P11). A pure read: it
    /// neither expires leases nor reads the clock, because checkers run outside the simulated hosts, where a
    /// clock read would be the OS clock (a simulator bug this caused: an observer expired leases early).
    pub fn entries_now(&self) -> Vec<(String, Vec<u8>)> {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.entries.iter().map(|(k, e)| (k.clone(), e.value.clone())).collect()
    }

    /// Time until the earliest lease deadline, so a watcher wakes to expire it.
    fn next_expiry(&self) -> Option<Duration> {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = self.env.clock.now();
        state.leases.values().map(|l| l.expires_at.saturating_sub(now)).min()
    }
}

#[async_trait]
impl Registry for MemoryRegistry {
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, RegistryError> {
        check_ttl(ttl)?;
        let mut state = self.lock();
        state.next_lease += 1;
        let id = state.next_lease;
        state.leases.insert(id, Lease { ttl, expires_at: self.env.clock.now() + ttl });
        self.env.trace(|| format!("registry grant lease {id} ttl={ttl:?}"));
        Ok(id)
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), RegistryError> {
        let now = self.env.clock.now();
        let mut state = self.lock();
        let entry = state.leases.get_mut(&lease).ok_or(RegistryError::LeaseExpired(lease))?;
        entry.expires_at = now + entry.ttl;
        Ok(())
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), RegistryError> {
        let mut state = self.lock();
        if !state.leases.contains_key(&lease) {
            return Err(RegistryError::LeaseExpired(lease));
        }
        self.end_lease(&mut state, lease);
        Ok(())
    }

    async fn register_node(&self, node: &NodeRegistration, lease: LeaseId) -> Result<(), RegistryError> {
        let key = self.keys.node(&node.node_id)?;
        let taken = |held: Option<LeaseId>| match held {
            Some(held) if held != lease => Err(RegistryError::Taken { node_id: node.node_id.clone(), lease: held }),
            _ => Ok(()),
        };
        self.put_if(key, encode(node)?, Some(lease), taken)
    }

    async fn membership(&self) -> Result<Membership, RegistryError> {
        self.membership_now()
    }

    async fn watch_membership(&self, after_revision: u64, max_wait: Duration) -> Result<Membership, RegistryError> {
        let deadline = self.env.clock.now() + max_wait;
        let mut changes = self.revision.subscribe();
        loop {
            let membership = self.membership_now()?;
            let now = self.env.clock.now();
            if membership.revision > after_revision || now >= deadline {
                return Ok(membership);
            }
            let wait =
                self.next_expiry().map_or(deadline - now, |e| e.min(deadline - now)).max(Duration::from_millis(1));
            tokio::select! {
                biased; // tokio's unbiased select draws from an unseeded RNG: keep simulated runs deterministic
                _ = changes.changed() => {}
                () = self.env.clock.sleep(wait) => {}
            }
        }
    }

    async fn put_provider(&self, provider: &ProviderRecord, lease: Option<LeaseId>) -> Result<(), RegistryError> {
        self.put(self.keys.provider(&provider.provider_id)?, encode(provider)?, lease)
    }

    async fn providers(&self) -> Result<Vec<ProviderRecord>, RegistryError> {
        let state = self.lock();
        let prefix = self.keys.providers();
        state
            .entries
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(k, e)| decode::<ProviderRecord>(k, &e.value))
            .collect()
    }

    async fn keys(&self) -> Result<Vec<String>, RegistryError> {
        let root = self.keys.root();
        Ok(self.lock().entries.keys().filter(|k| k.starts_with(&root)).cloned().collect())
    }
}
