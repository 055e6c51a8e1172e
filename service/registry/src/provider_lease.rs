//! A provider host's own registry entry (P17): its record under a lease of its own, kept alive every third of
//! the TTL and written again under a fresh lease once that one is lost. Agents route calls to the host while
//! the entry lives and drop it from routing once the lease expires, so a host that died stops receiving calls
//! within one TTL without anyone deleting anything.

use std::sync::Arc;
use std::time::Duration;

use factum_env::Env;

use crate::{LeaseId, ProviderRecord, Registry, RegistryError};

/// Keeps `record` in `registry` under a lease of `ttl` for as long as the caller's runtime lives.
pub async fn hold_provider(env: Env, registry: Arc<dyn Registry>, record: ProviderRecord, ttl: Duration) {
    let renew_every = ttl / 3;
    let id = record.provider_id.clone();
    loop {
        let lease = match register(&*registry, &record, ttl).await {
            Ok(lease) => lease,
            Err(e) => {
                tracing::warn!(provider = %id, error = %e, "cannot register the provider; retrying");
                env.clock.sleep(renew_every).await;
                continue;
            }
        };
        tracing::info!(provider = %id, lease, ?ttl, "provider registered");
        env.trace(|| format!("provider registered {id} lease={lease}"));
        loop {
            env.clock.sleep(renew_every).await;
            match env.timeout(renew_every, registry.keep_alive(lease)).await {
                Some(Ok(())) => {}
                Some(Err(RegistryError::LeaseExpired(_))) => {
                    tracing::warn!(provider = %id, lease, "provider lease expired; registering again");
                    break;
                }
                // The lease may still live: try again at the next renewal, and learn of an expiry then.
                Some(Err(e)) => tracing::warn!(provider = %id, error = %e, "cannot renew the provider's lease"),
                None => tracing::warn!(provider = %id, "renewing the provider's lease timed out"),
            }
        }
    }
}

async fn register(registry: &dyn Registry, record: &ProviderRecord, ttl: Duration) -> Result<LeaseId, RegistryError> {
    let lease = registry.grant_lease(ttl).await?;
    if let Err(e) = registry.put_provider(record, Some(lease)).await {
        let _ = registry.revoke_lease(lease).await; // holds nothing: one lease per host at the registry
        return Err(e);
    }
    Ok(lease)
}
