//! Provider discovery (P17): the provider hosts an agent routes calls to, read from the registry. A host is a
//! provider record with an address (`factum provider --etcd …`), kept under the host's own lease, so a host
//! that dies leaves routing once its lease expires. What the registry cannot be asked, the agent keeps: an
//! unreachable registry never empties routing.

use std::sync::Arc;
use std::time::Duration;

use factum_env::Env;
use factum_proto::ProviderType;
use factum_providers::HostEntry;
use factum_registry::{ProviderRecord, Registry};

/// The trace event of an agent's routes changing after a read of the registry: `routing <kind> <id>,<id>`
/// (`-`: none), recorded only where the env traces, as in simulation.
pub const ROUTING: &str = "routing";

/// The hosts of `kind` among `records`: those with an address.
pub fn hosts_of(kind: ProviderType, records: &[ProviderRecord]) -> Vec<HostEntry> {
    records
        .iter()
        .filter(|r| r.metadata.provider_type == kind)
        .filter_map(|r| {
            let addr = r.addr.clone()?;
            Some(HostEntry { id: r.provider_id.clone(), node: r.node_id.clone(), addr })
        })
        .collect()
}

/// Every `every`, sets each of `routes` to the hosts of its kind the registry lists, for as long as the
/// caller's runtime lives.
pub async fn run_provider_discovery(env: Env, registry: Arc<dyn Registry>, routes: crate::Routes, every: Duration) {
    loop {
        match env.timeout(every.max(Duration::from_secs(1)), registry.providers()).await {
            Some(Ok(records)) => {
                for (kind, hosts) in &routes {
                    let found = hosts_of(*kind, &records);
                    if found != hosts.entries() {
                        env.trace(|| {
                            let ids: Vec<&str> = found.iter().map(|h| h.id.as_str()).collect();
                            let ids = if ids.is_empty() { "-".into() } else { ids.join(",") };
                            format!("{ROUTING} {kind} {ids}")
                        });
                        hosts.set(found);
                    }
                }
            }
            Some(Err(e)) => tracing::warn!(error = %e, "cannot read provider hosts from the registry; keeping routes"),
            None => tracing::warn!("reading provider hosts from the registry timed out; keeping routes"),
        }
        env.clock.sleep(every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use factum_proto::ProviderMetadata;

    fn record(id: &str, kind: ProviderType, addr: Option<&str>) -> ProviderRecord {
        ProviderRecord {
            provider_id: id.into(),
            node_id: "n1".into(),
            metadata: ProviderMetadata {
                provider_type: kind,
                name: id.into(),
                version: "1".into(),
                operations: vec![],
            },
            addr: addr.map(String::from),
        }
    }

    #[test]
    fn only_records_with_an_address_of_the_kind_are_hosts() {
        let records = [
            record("kv-memory@n1", ProviderType::Kv, None),
            record("kv-1", ProviderType::Kv, Some("10.0.0.5:7801")),
            record("http-1", ProviderType::Http, Some("10.0.0.6:7801")),
        ];
        let kv = hosts_of(ProviderType::Kv, &records);
        assert_eq!(kv, [HostEntry { id: "kv-1".into(), node: "n1".into(), addr: "10.0.0.5:7801".into() }]);
        assert!(hosts_of(ProviderType::Messaging, &records).is_empty());
    }
}
