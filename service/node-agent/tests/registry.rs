//! An agent in a registry, on virtual (paused tokio) time: it registers under a lease with its provider
//! metadata, refuses starts until registered and under any other lease, and fences its reschedulable
//! instances when it cannot renew.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // tests may panic

use std::sync::Arc;
use std::time::Duration;

use factum_env::Env;
use factum_node_agent::{Agent, AgentConfig};
use factum_proto::{ErrorCode, PolicyType, ProviderType, RestartPolicy, StartInstanceRequest};
use factum_providers::MemoryKv;
use factum_registry::{MemoryRegistry, Registry};
use factum_wasm::fixtures::{self, module};
use factum_wasm::WasmiEngine;
use proptest::prelude::*;

fn paused() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap()
}

fn agent(node_id: &str, registry: Arc<dyn Registry>) -> Agent {
    let mut config = AgentConfig::new(node_id, format!("{node_id}:7701"));
    config.lease_ttl = Duration::from_secs(3);
    let (agent, _reports) = Agent::new(Env::tokio(), config, Arc::new(WasmiEngine::new()), Arc::new(MemoryKv::new()));
    tokio::spawn(factum_node_agent::run_registry_link(agent.clone(), registry));
    agent
}

fn start(id: &str, policy: PolicyType, node_lease: Option<i64>) -> StartInstanceRequest {
    StartInstanceRequest {
        module_hash: String::new(),
        grant_seals: Default::default(),
        instance_id: id.into(),
        module_bytes: module(fixtures::SLEEPER),
        capabilities: vec![],
        restart_policy: RestartPolicy { policy_type: policy, max_retries: None, backoff_seconds: None },
        config: Default::default(),
        constraints: Default::default(),
        epoch: 1,
        node_lease,
        restarts: 0,
        seal: Default::default(),
    }
}

/// A registry whose calls can be made to fail, standing in for a partition between an agent and etcd.
struct Cut {
    inner: MemoryRegistry,
    cut: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl Registry for Cut {
    async fn grant_lease(&self, ttl: Duration) -> Result<i64, factum_registry::RegistryError> {
        self.check()?;
        self.inner.grant_lease(ttl).await
    }
    async fn keep_alive(&self, lease: i64) -> Result<(), factum_registry::RegistryError> {
        self.check()?;
        self.inner.keep_alive(lease).await
    }
    async fn revoke_lease(&self, lease: i64) -> Result<(), factum_registry::RegistryError> {
        self.inner.revoke_lease(lease).await
    }
    async fn register_node(
        &self,
        node: &factum_registry::NodeRegistration,
        lease: i64,
    ) -> Result<(), factum_registry::RegistryError> {
        self.check()?;
        self.inner.register_node(node, lease).await
    }
    async fn membership(&self) -> Result<factum_registry::Membership, factum_registry::RegistryError> {
        self.inner.membership().await
    }
    async fn watch_membership(
        &self,
        after: u64,
        wait: Duration,
    ) -> Result<factum_registry::Membership, factum_registry::RegistryError> {
        self.inner.watch_membership(after, wait).await
    }
    async fn put_provider(
        &self,
        provider: &factum_registry::ProviderRecord,
        lease: Option<i64>,
    ) -> Result<(), factum_registry::RegistryError> {
        self.check()?;
        self.inner.put_provider(provider, lease).await
    }
    async fn providers(&self) -> Result<Vec<factum_registry::ProviderRecord>, factum_registry::RegistryError> {
        self.inner.providers().await
    }
    async fn keys(&self) -> Result<Vec<String>, factum_registry::RegistryError> {
        self.inner.keys().await
    }
}

impl Cut {
    fn check(&self) -> Result<(), factum_registry::RegistryError> {
        if self.cut.load(std::sync::atomic::Ordering::SeqCst) {
            // A partition: the call hangs until the caller gives up; here it fails at once.
            return Err(factum_registry::RegistryError::Unavailable("cut".into()));
        }
        Ok(())
    }
}

#[test]
fn starts_are_refused_until_registered_under_another_lease_and_under_none() {
    paused().block_on(async {
        // Cut off at first, so the start below surely comes before the first registration (starts run on a
        // task of their own, which the registry link may otherwise beat).
        let registry = Arc::new(Cut { inner: MemoryRegistry::new(Env::tokio(), "/factum"), cut: true.into() });
        let agent = agent("n1", registry.clone());
        let early = agent.start_instance(start("a", PolicyType::Always, None)).await.unwrap_err();
        assert_eq!(early.error_code, ErrorCode::CommunicationFailure, "{early}");
        registry.cut.store(false, std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let lease = registry.membership().await.unwrap().nodes[0].lease;
        let stale = agent.start_instance(start("b", PolicyType::Always, Some(lease + 1))).await.unwrap_err();
        assert_eq!(stale.error_code, ErrorCode::CommunicationFailure, "{stale}");
        // Naming no lease would skip the fencing check: a registered node refuses it.
        let unleased = agent.start_instance(start("d", PolicyType::Always, None)).await.unwrap_err();
        assert_eq!(unleased.error_code, ErrorCode::InvalidRequest, "{unleased}");
        assert!(unleased.message.contains("must name the lease"), "{unleased}");
        assert!(agent.metadata("d").is_none());
        let facts = agent.start_instance(start("c", PolicyType::Always, Some(lease))).await.unwrap();
        assert_eq!(facts.lease, Some(lease));
    });
}

#[test]
fn an_agent_cut_off_from_the_registry_fences_before_its_lease_expires() {
    paused().block_on(async {
        let registry = Arc::new(Cut { inner: MemoryRegistry::new(Env::tokio(), "/factum"), cut: false.into() });
        let agent = agent("n1", registry.clone());
        tokio::time::sleep(Duration::from_millis(100)).await;
        let lease = registry.membership().await.unwrap().nodes[0].lease;
        agent.start_instance(start("moves", PolicyType::Always, Some(lease))).await.unwrap();
        agent.start_instance(start("stays", PolicyType::Never, Some(lease))).await.unwrap();
        registry.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        // Poll in small steps: the agent's instances must be gone while the registry still lists the node.
        let mut fenced_while_registered = false;
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let listed = !registry.membership().await.unwrap().nodes.is_empty();
            if agent.facts("moves").is_none() {
                fenced_while_registered = listed;
                break;
            }
        }
        assert!(fenced_while_registered, "the fence must come before the lease expires");
        assert!(agent.facts("stays").is_some(), "a `never` instance is never rescheduled, so it keeps running");
        let refused = agent.start_instance(start("new", PolicyType::Always, Some(lease))).await.unwrap_err();
        assert_eq!(refused.error_code, ErrorCode::CommunicationFailure);
    });
}

#[test]
fn a_lapsed_lease_fences_the_next_action_even_if_the_registry_link_never_runs() {
    paused().block_on(async {
        // No registry link: it stands for one whose timer fires late (a process woken from a pause).
        let env = Env::tokio();
        let config = AgentConfig::new("n1", "n1:7701");
        let (agent, _reports) =
            Agent::new(env.clone(), config, Arc::new(WasmiEngine::new()), Arc::new(MemoryKv::new()));
        agent.registered(7, env.clock.now() + Duration::from_secs(1));
        agent.start_instance(start("moves", PolicyType::Always, Some(7))).await.unwrap();
        agent.start_instance(start("stays", PolicyType::Never, Some(7))).await.unwrap();
        tokio::time::sleep(Duration::from_millis(900)).await;
        agent.start_instance(start("early", PolicyType::Always, Some(7))).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(agent.facts("moves").is_some(), "looking is not acting: reads do not fence");
        let refused = agent.start_instance(start("late", PolicyType::Always, Some(7))).await.unwrap_err();
        assert_eq!(refused.error_code, ErrorCode::CommunicationFailure, "{refused}");
        assert!(agent.facts("moves").is_none() && agent.facts("early").is_none(), "the late start fenced the node");
        assert!(agent.facts("stays").is_some(), "a `never` instance is never rescheduled, so it keeps running");
        let restart = agent.restart_instance("stays").await.unwrap_err();
        assert_eq!(restart.error_code, ErrorCode::CommunicationFailure, "a fenced node restarts nothing: {restart}");
        assert!(!agent.renewed(Duration::from_secs(10)), "a renewal after the fence must not revive the lease");
    });
}

/// Found by the swarm (seed 1402004787): the control plane restarted, could not fetch a module from the only
/// node running it before that node fenced, and the node then answered that it had no such module. The
/// instances were forgotten, but their module must still be there for a rescheduling control plane.
#[test]
fn a_fenced_node_still_hands_out_the_modules_of_what_it_forgot() {
    paused().block_on(async {
        let env = Env::tokio();
        let (agent, _reports) = Agent::new(
            env.clone(),
            AgentConfig::new("n1", "n1:7701"),
            Arc::new(WasmiEngine::new()),
            Arc::new(MemoryKv::new()),
        );
        agent.registered(7, env.clock.now() + Duration::from_secs(1));
        let facts = agent.start_instance(start("moves", PolicyType::Always, Some(7))).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1_100)).await;
        assert!(agent.start_instance(start("late", PolicyType::Always, Some(7))).await.is_err());
        assert!(agent.facts("moves").is_none(), "fenced");
        let hash = facts.metadata.module_hash;
        assert_eq!(agent.module_bytes(&hash).unwrap(), module(fixtures::SLEEPER));
        let unknown = agent.module_bytes(&"0".repeat(64)).unwrap_err();
        assert_eq!(unknown.error_code, ErrorCode::InstanceNotFound);
    });
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(100))]

    /// Feature: wasm-orchestrator, Property 17: Distributed Capability Provider Invocation Routing
    /// (routing metadata): every registered node publishes its providers' metadata with its node id beside its
    /// membership, so an invocation can be routed to a live provider; a node that leaves takes its provider
    /// entries with it, so nothing routes to a dead node.
    #[test]
    fn providers_are_discoverable_by_node_and_leave_with_it(
        nodes in prop::collection::btree_set("[a-z][a-z0-9-]{0,8}", 1..5), leaver in any::<prop::sample::Index>(),
    ) {
        paused().block_on(async {
            let registry = Arc::new(MemoryRegistry::new(Env::tokio(), "/factum"));
            let agents: Vec<(String, Agent)> =
                nodes.iter().map(|n| (n.clone(), agent(n, registry.clone()))).collect();
            tokio::time::sleep(Duration::from_millis(100)).await;
            let providers = registry.providers().await.unwrap();
            for (node, _) in &agents {
                let mine: Vec<_> = providers.iter().filter(|p| &p.node_id == node).collect();
                prop_assert_eq!(mine.len(), 1);
                prop_assert_eq!(mine[0].metadata.provider_type, ProviderType::Kv);
                prop_assert_eq!(&mine[0].provider_id, &format!("{}@{node}", mine[0].metadata.name));
            }
            let (gone, _) = leaver.get(&agents);
            let lease = registry.membership().await.unwrap().nodes.iter().find(|n| &n.node_id == gone).unwrap().lease;
            registry.revoke_lease(lease).await.unwrap();
            let providers = registry.providers().await.unwrap();
            prop_assert!(providers.iter().all(|p| &p.node_id != gone));
            prop_assert_eq!(providers.len(), agents.len() - 1);
            Ok(())
        })?;
    }
}
