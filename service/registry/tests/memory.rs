//! The in-memory registry keeps etcd's semantics on the env clock: leases expire unless renewed, their keys go
//! with them, watchers wake on joins and on expiries, and bad input is refused, never a panic.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // tests may panic

use std::sync::Arc;
use std::time::Duration;

use factum_env::Env;
use factum_proto::{ProviderMetadata, ProviderType};
use factum_registry::{MemoryRegistry, NodeRegistration, ProviderRecord, Registry, RegistryError};
use proptest::prelude::*;

fn node(id: &str, lease: i64) -> NodeRegistration {
    NodeRegistration { node_id: id.into(), agent_addr: format!("{id}:1"), max_instances: 9, protocol_version: 1, lease }
}

fn provider(id: &str, node_id: &str) -> ProviderRecord {
    ProviderRecord {
        provider_id: id.into(),
        node_id: node_id.into(),
        metadata: ProviderMetadata {
            provider_type: ProviderType::Kv,
            name: "kv-memory".into(),
            version: "1".into(),
            operations: vec!["get".into()],
        },
        addr: None,
    }
}

fn paused() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap()
}

#[test]
fn a_restarted_registry_keeps_its_data_and_starts_every_lease_ttl_over() {
    paused().block_on(async {
        let registry = MemoryRegistry::new(Env::tokio(), "/factum");
        let lease = registry.grant_lease(Duration::from_secs(2)).await.unwrap();
        registry.register_node(&node("n1", lease), lease).await.unwrap();
        let before = registry.membership().await.unwrap();
        tokio::time::sleep(Duration::from_millis(1900)).await;
        let restarted = registry.restarted(Env::tokio());
        drop(registry);
        let after = restarted.membership().await.unwrap();
        assert_eq!((after.revision, after.nodes.len()), (before.revision, 1), "data and revision survive");
        tokio::time::sleep(Duration::from_millis(1900)).await;
        assert_eq!(restarted.membership().await.unwrap().nodes.len(), 1, "the TTL started over at the restart");
        restarted.keep_alive(lease).await.unwrap();
        let next = restarted.grant_lease(Duration::from_secs(2)).await.unwrap();
        assert!(next > lease, "lease ids are never reused");
        tokio::time::sleep(Duration::from_millis(2100)).await;
        assert!(restarted.membership().await.unwrap().nodes.is_empty(), "and it still expires when not renewed");
    });
}

#[test]
fn a_lease_not_renewed_expires_with_its_keys() {
    paused().block_on(async {
        let registry = MemoryRegistry::new(Env::tokio(), "/factum");
        let lease = registry.grant_lease(Duration::from_secs(2)).await.unwrap();
        registry.register_node(&node("n1", lease), lease).await.unwrap();
        registry.put_provider(&provider("kv@n1", "n1"), Some(lease)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        registry.keep_alive(lease).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(registry.membership().await.unwrap().nodes.len(), 1, "renewed 1.5 s ago with a 2 s TTL");
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(registry.membership().await.unwrap().nodes.is_empty());
        assert!(registry.providers().await.unwrap().is_empty(), "the provider entry was attached to the lease");
        assert_eq!(registry.keep_alive(lease).await, Err(RegistryError::LeaseExpired(lease)));
        assert_eq!(registry.register_node(&node("n1", lease), lease).await, Err(RegistryError::LeaseExpired(lease)));
    });
}

#[test]
fn watchers_wake_on_join_and_on_expiry() {
    paused().block_on(async {
        let registry = Arc::new(MemoryRegistry::new(Env::tokio(), "/factum"));
        let start = registry.membership().await.unwrap();
        let watcher = {
            let registry = registry.clone();
            tokio::spawn(async move { registry.watch_membership(start.revision, Duration::from_secs(60)).await })
        };
        let lease = registry.grant_lease(Duration::from_secs(2)).await.unwrap();
        registry.register_node(&node("n1", lease), lease).await.unwrap();
        let joined = watcher.await.unwrap().unwrap();
        assert_eq!(joined.nodes, vec![node("n1", lease)]);
        // Nobody writes now: only the expiry can wake the watcher, and it must, well before its 60 s wait.
        let before = tokio::time::Instant::now();
        let left = registry.watch_membership(joined.revision, Duration::from_secs(60)).await.unwrap();
        assert!(left.nodes.is_empty());
        assert!(left.revision > joined.revision);
        assert!(before.elapsed() <= Duration::from_secs(3), "woke at the expiry, not at the end of the wait");
    });
}

#[test]
fn revoking_a_lease_removes_the_node_at_once() {
    paused().block_on(async {
        let registry = MemoryRegistry::new(Env::tokio(), "/factum");
        let lease = registry.grant_lease(Duration::from_secs(30)).await.unwrap();
        registry.register_node(&node("n1", lease), lease).await.unwrap();
        registry.revoke_lease(lease).await.unwrap();
        assert!(registry.membership().await.unwrap().nodes.is_empty());
        assert_eq!(registry.revoke_lease(lease).await, Err(RegistryError::LeaseExpired(lease)));
    });
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Feature: wasm-orchestrator, Property 11: etcd Limited Usage When Enabled
    /// Whatever is written through the registry API, the store holds only `nodes/<id>` and `providers/<id>`
    /// keys under its prefix; bad ids and TTLs are INVALID_REQUEST-class errors, never a panic or a stray key.
    #[test]
    fn the_registry_holds_only_nodes_and_providers(
        ops in prop::collection::vec((0u8..4, "[a-zA-Z0-9./:@ _-]{0,12}", 0u64..5), 1..30),
    ) {
        paused().block_on(async {
            let registry = MemoryRegistry::new(Env::tokio(), "/factum");
            let mut leases = Vec::new();
            for (op, id, n) in &ops {
                match op {
                    0 => {
                        if let Ok(lease) = registry.grant_lease(Duration::from_secs(*n)).await {
                            leases.push(lease);
                        }
                    }
                    1 => {
                        let lease = leases.last().copied().unwrap_or(0);
                        let _ = registry.register_node(&node(id, lease), lease).await;
                    }
                    2 => {
                        let _ = registry.put_provider(&provider(id, "n"), leases.last().copied()).await;
                    }
                    _ => tokio::time::sleep(Duration::from_millis(700 * n)).await,
                }
            }
            for key in registry.keys().await.unwrap() {
                let rest = key.strip_prefix("/factum/nodes/").or_else(|| key.strip_prefix("/factum/providers/"));
                prop_assert!(rest.is_some_and(|r| !r.is_empty() && !r.contains('/')), "stray key {key:?}");
            }
            Ok(())
        })?;
    }
}
