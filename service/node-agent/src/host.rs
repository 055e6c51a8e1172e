//! What a running instance sees of its node: capability calls checked against its assignments at call time,
//! the env clock, the env's randomness, and a log for its output.

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use factum_proto::logs::{LogLine, Stream};
use factum_proto::permissions::allows;
use factum_proto::{CapabilityInvocation, CapabilityResponse, ErrorCode, ErrorResponse, MessageEnvelope, Permission};
use factum_wasm::GuestHost;
use futures::future::BoxFuture;

use crate::log_budget::{guest_lines, Dropped, Window};
use crate::trace_events::{AUTH, CALL, DELIVER};
use crate::{Inner, Route};

/// What a call's permission depends on beyond its operation, for the `auth` trace event: the topic of a
/// messaging call, `-` otherwise (KV needs only the operation; HTTP hosts are checked per hop by the provider).
fn call_target(operation: &str, params: &[u8]) -> String {
    match factum_proto::MsgOperation::decode(operation, params) {
        Ok(factum_proto::MsgOperation::Publish { topic, .. } | factum_proto::MsgOperation::Subscribe { topic }) => {
            topic
        }
        _ => "-".to_string(),
    }
}

/// What one grant allows: its provider, its permissions parsed, and its sealed form when a provider host
/// serves its kind (the host checks the seal itself).
type GrantView = (factum_proto::ProviderType, std::sync::Arc<[Permission]>, Option<factum_proto::SealedGrant>);

impl Inner {
    /// The [`GrantView`] of `grant`; sealed only for a kind that goes to a provider host, so a local call clones
    /// nothing but an `Arc`.
    fn grant_view(&self, grant: &crate::Grant) -> GrantView {
        let kind = grant.assignment.provider_type;
        let sealed = self.providers.remote.contains_key(&kind).then(|| grant.sealed(&self.config.node_id));
        (kind, grant.permissions.clone(), sealed)
    }
}

pub(crate) struct InstanceHost {
    agent: Weak<Inner>,
    instance_id: String,
    /// Grants as first seen by this run; used only under the injected bug [`crate::AgentBug::StaleGrants`].
    stale: Mutex<std::collections::BTreeMap<String, GrantView>>,
    /// This run's share of the node's log ([`crate::log_budget`]).
    log: Arc<Mutex<LogWindows>>,
}

/// The log windows of one run.
#[derive(Debug, Default)]
struct LogWindows {
    output: Window,
    audit: Window,
}

impl InstanceHost {
    pub(crate) fn new(agent: Weak<Inner>, instance_id: String) -> Self {
        Self { agent, instance_id, stale: Default::default(), log: Default::default() }
    }
}

impl Drop for InstanceHost {
    fn drop(&mut self) {
        // The run is over: report what its budget dropped since the last report, so nothing goes unsaid.
        let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(dropped) = log.output.take_dropped() {
            output_dropped(&self.instance_id, dropped);
        }
        if let Some(dropped) = log.audit.take_dropped() {
            audit_dropped(&self.instance_id, dropped);
        }
    }
}

fn output_dropped(instance_id: &str, dropped: Dropped) {
    tracing::warn!(target: "factum::guest", instance_id, lines = dropped.lines, bytes = dropped.bytes,
        "guest output over the instance's log budget was dropped");
}

fn audit_dropped(instance_id: &str, dropped: Dropped) {
    tracing::warn!(target: "factum::audit", instance_id, lines = dropped.lines,
        "audit lines over the instance's log budget were suppressed");
}

/// Writes one audit line about `instance_id` if its budget has room (design §Security Considerations 6).
fn audit(agent: &Inner, log: &Mutex<LogWindows>, instance_id: &str, line: impl FnOnce()) {
    let limits = agent.config.log_limits;
    let now = agent.env.clock.now();
    let (fits, report) = log.lock().unwrap_or_else(|p| p.into_inner()).audit.admit(now, 0, limits.audit_lines, 0);
    if let Some(dropped) = report {
        audit_dropped(instance_id, dropped);
    }
    if fits {
        line();
    }
}

fn denied(agent: &Inner, log: &Mutex<LogWindows>, instance_id: &str, capability_id: &str, why: String) -> Vec<u8> {
    audit(agent, log, instance_id, || {
        tracing::warn!(target: "factum::audit", instance_id, capability_id, reason = %why, "capability call denied");
    });
    CapabilityResponse::err(
        &ErrorResponse::permission_denied(why)
            .with_detail("instance_id", instance_id)
            .with_detail("capability_id", capability_id),
    )
    .encode()
}

impl InstanceHost {
    /// Reads the instance's configuration (empty once the instance is gone).
    fn with_config(&self, f: impl FnOnce(&factum_proto::GuestConfig) -> Vec<String>) -> Vec<String> {
        let Some(agent) = self.agent.upgrade() else { return Vec::new() };
        // Unfenced: a read must not move when a lapsed lease fences the node (the simulator's timelines).
        let instances = agent.lock_unfenced();
        instances.get(&self.instance_id).map(|i| f(&i.config)).unwrap_or_default()
    }

    /// Under [`crate::AgentBug::StaleGrants`] only: the grant as this run first saw it, never looked up again.
    fn stale_grant(&self, capability_id: &str) -> Option<GrantView> {
        let agent = self.agent.upgrade()?;
        if !agent.config.has_bug(crate::AgentBug::StaleGrants) {
            return None;
        }
        let mut stale = self.stale.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(grant) = stale.get(capability_id) {
            return Some(grant.clone());
        }
        let instances = agent.lock();
        let grant = instances.get(&self.instance_id)?.capabilities.get(capability_id)?;
        let view = agent.grant_view(grant);
        stale.insert(capability_id.to_string(), view.clone());
        Some(view)
    }
}

impl GuestHost for InstanceHost {
    fn invoke(&self, capability_id: String, operation: String, params: Vec<u8>) -> BoxFuture<'static, Vec<u8>> {
        let agent = self.agent.clone();
        let instance_id = self.instance_id.clone();
        let stale = self.stale_grant(&capability_id);
        let log = self.log.clone();
        Box::pin(async move {
            let Some(agent) = agent.upgrade() else {
                return CapabilityResponse::err(&ErrorResponse::new(
                    ErrorCode::ProviderUnavailable,
                    "node agent is shutting down",
                ))
                .encode();
            };
            let call = agent.calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let began = agent.env.clock.now();
            // Look the assignment up now, not at start: a revoke takes effect on the very next call (P4).
            let grant = {
                let instances = agent.lock();
                let grant = stale.or_else(|| {
                    instances
                        .get(&instance_id)
                        .and_then(|i| i.capabilities.get(&capability_id))
                        .map(|g| agent.grant_view(g))
                });
                // Traced under the lock, so the simulator orders it exactly against grants and revokes.
                if grant.is_some() {
                    agent.env.trace(|| {
                        let target = call_target(&operation, &params);
                        format!("{AUTH} {call} {instance_id} {capability_id} {operation} {target}")
                    });
                }
                grant
            };
            let Some((provider_type, granted, sealed)) = grant else {
                agent.metrics.ungranted_call();
                return denied(
                    &agent,
                    &log,
                    &instance_id,
                    &capability_id,
                    format!("no capability {capability_id:?} is assigned to this instance"),
                );
            };
            let invocation = CapabilityInvocation {
                instance_id: instance_id.clone(),
                capability_id: capability_id.clone(),
                operation,
                params,
            };
            // An injected outage is decided after the grant check and traced as the call's outcome, so a timeline
            // shows why a guest saw PROVIDER_UNAVAILABLE.
            let outage = agent.env.buggify("host.provider_unavailable");
            let response = match agent.providers.route(provider_type).filter(|_| !outage) {
                Some(Route::Local(provider)) => provider.invoke(&invocation, &granted).await,
                // `sealed` is there whenever the route is remote: both follow `providers.remote`.
                Some(Route::Remote(remote)) => match sealed {
                    Some(sealed) => remote.invoke(invocation.clone(), sealed).await,
                    None => CapabilityResponse::err(&ErrorResponse::internal("a remote call without its grant")),
                },
                None if outage => CapabilityResponse::err(&ErrorResponse::new(
                    ErrorCode::ProviderUnavailable,
                    "provider unavailable (injected fault)",
                )),
                None => CapabilityResponse::err(&ErrorResponse::new(
                    ErrorCode::ProviderUnavailable,
                    format!("no {provider_type} provider runs on node {}", agent.config.node_id),
                )),
            };
            // The simulator checks every successful call against the grant in force at its `auth` (P4).
            agent.env.trace(|| {
                let outcome = response.error_code().map_or("ok".to_string(), |code| code.to_string());
                format!("{CALL} {call} {instance_id} {capability_id} {outcome}")
            });
            let outcome = response.error_code().map_or("ok", |code| code.as_str());
            agent.metrics.call(provider_type, outcome, agent.env.clock.now().saturating_sub(began));
            if agent.config.has_bug(crate::AgentBug::CallsInFacts) && response.success {
                if let Some(local) = agent.lock().get_mut(&instance_id) {
                    local.metadata.last_error = Some(String::from_utf8_lossy(&invocation.params).into_owned());
                }
            }
            if response.error_code() == Some(ErrorCode::PermissionDenied) {
                let why = response.error.as_ref().map(|e| e.message.clone()).unwrap_or_default();
                return denied(&agent, &log, &instance_id, &capability_id, why);
            }
            response.encode()
        })
    }

    fn sleep(&self, d: Duration) -> BoxFuture<'static, ()> {
        match self.agent.upgrade() {
            Some(agent) => agent.env.clock.sleep(d),
            None => Box::pin(futures::future::pending()),
        }
    }

    fn wall_nanos(&self) -> u64 {
        self.agent.upgrade().map_or(0, |a| {
            let since = a.env.clock.wall().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            u64::try_from(since.as_nanos()).unwrap_or(u64::MAX)
        })
    }

    fn monotonic_nanos(&self) -> u64 {
        self.agent.upgrade().map_or(0, |a| u64::try_from(a.env.clock.now().as_nanos()).unwrap_or(u64::MAX))
    }

    fn fill_random(&self, buf: &mut [u8]) {
        let Some(agent) = self.agent.upgrade() else { return };
        for chunk in buf.chunks_mut(8) {
            let bytes = agent.env.rng.next_u64().to_le_bytes();
            chunk.copy_from_slice(bytes.get(..chunk.len()).unwrap_or(&[]));
        }
    }

    fn next_message(&self) -> BoxFuture<'static, Option<Vec<u8>>> {
        let agent = self.agent.clone();
        let instance_id = self.instance_id.clone();
        let log = self.log.clone();
        Box::pin(async move {
            loop {
                let waker = {
                    let agent = agent.upgrade()?;
                    let messaging = agent.providers.messaging.clone()?;
                    let mut instances = agent.lock();
                    let local = instances.get_mut(&instance_id)?;
                    while let Some(delivery) = local.mailbox.next() {
                        // Checked at delivery time, like every capability call: a revoke stops what is queued (P4).
                        let topic = Permission::MsgSubscribe(delivery.topic.clone());
                        let grant = local.capabilities.get(&delivery.capability_id);
                        if grant.is_some_and(|grant| allows(&grant.permissions, &topic)) {
                            agent.env.trace(|| {
                                format!("{DELIVER} {instance_id} {} {}", delivery.capability_id, delivery.topic)
                            });
                            let envelope = MessageEnvelope {
                                capability_id: delivery.capability_id.clone(),
                                topic: delivery.topic.clone(),
                                payload: delivery.payload.clone(),
                            };
                            return Some(envelope.encode());
                        }
                        audit(&agent, &log, &instance_id, || {
                            // Debug formatting: the topic came from a guest, so it is quoted and escaped.
                            tracing::warn!(target: "factum::audit", instance_id = %instance_id,
                                capability_id = ?delivery.capability_id, topic = ?delivery.topic,
                                "message not delivered: the capability no longer allows it");
                        });
                        local.mailbox.discard_in_hand();
                    }
                    if messaging.subscriptions_of(&instance_id).is_empty() {
                        return None; // nothing more can arrive: the run ends cleanly
                    }
                    local.mailbox.waker()
                };
                // No strong reference to the agent is held while waiting: a dropped agent ends the run.
                waker.notified().await;
            }
        })
    }

    fn argv(&self) -> Vec<String> {
        self.with_config(|c| c.argv(&self.instance_id).map(str::to_string).collect())
    }

    fn environ(&self) -> Vec<String> {
        self.with_config(|c| c.environ().collect())
    }

    fn write_output(&self, fd: u32, bytes: &[u8]) {
        let Some(agent) = self.agent.upgrade() else { return };
        let limits = agent.config.log_limits;
        let now = agent.env.clock.now();
        let (lines, cut) = guest_lines(bytes);
        let mut kept = Vec::new();
        {
            let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
            for line in lines {
                let (fits, report) = log.output.admit(now, line.len(), limits.output_lines, limits.output_bytes);
                if let Some(dropped) = report {
                    output_dropped(&self.instance_id, dropped);
                }
                if fits {
                    tracing::info!(target: "factum::guest", instance_id = %self.instance_id, fd, "{line}");
                    kept.push(line);
                }
            }
            log.output.count_dropped(cut);
        }
        // What the log budget admitted also goes to the instance's buffer, for `factum logs`.
        let stream = if fd == 1 { Stream::Stdout } else { Stream::Stderr };
        let time_ms = agent.env.wall_ms();
        let mut instances = agent.lock_unfenced();
        if let Some(local) = instances.get_mut(&self.instance_id) {
            let run = local.metadata.restarts;
            for line in kept {
                local.logs.push(|seq| LogLine { seq, time_ms, run, stream, text: line });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use factum_env::Env;
    use factum_proto::{CapabilityAssignment, KvOperation, RestartPolicy, StartInstanceRequest};
    use factum_providers::MemoryKv;
    use factum_wasm::{fixtures, WasmiEngine};

    use super::*;
    use crate::{Agent, AgentConfig};

    async fn host_for(perms: &[(&str, &str)]) -> (Agent, InstanceHost) {
        let config = AgentConfig::new("n", "127.0.0.1:0");
        let (agent, _reports) =
            Agent::new(Env::tokio(), config, Arc::new(WasmiEngine::new()), Arc::new(MemoryKv::new()));
        let capabilities =
            perms.iter().map(|(cap, perm)| CapabilityAssignment::new("i", cap, &[perm.to_string()]).unwrap()).collect();
        let request = StartInstanceRequest {
            module_hash: String::new(),
            grant_seals: Default::default(),
            instance_id: "i".into(),
            module_bytes: fixtures::module(fixtures::SLEEPER),
            capabilities,
            restart_policy: RestartPolicy::default(),
            config: Default::default(),
            constraints: Default::default(),
            epoch: 1,
            node_lease: None,
            restarts: 0,
            seal: Default::default(),
        };
        agent.start_instance(request).await.unwrap();
        let host = InstanceHost::new(Arc::downgrade(&agent.inner), "i".into());
        (agent, host)
    }

    async fn call(host: &InstanceHost, cap: &str, op: &str, params: Vec<u8>) -> CapabilityResponse {
        CapabilityResponse::decode(&host.invoke(cap.into(), op.into(), params).await).unwrap()
    }

    #[tokio::test]
    async fn guest_errors_come_back_as_error_codes() {
        let (agent, host) = host_for(&[("kv", "kv:write"), ("web", "http:request")]).await;
        let (op, params) = KvOperation::Set { key: "k".into(), value: b"v".to_vec() }.encode();
        assert!(call(&host, "kv", &op, params.clone()).await.success);
        // Garbage MessagePack, an unknown operation, a capability never granted, one whose provider is absent.
        assert_eq!(
            call(&host, "kv", "set", vec![0xc1, 0xff, 0x00]).await.error_code(),
            Some(ErrorCode::InvalidRequest)
        );
        assert_eq!(call(&host, "kv", "explode", params.clone()).await.error_code(), Some(ErrorCode::InvalidRequest));
        assert_eq!(call(&host, "db", &op, params.clone()).await.error_code(), Some(ErrorCode::PermissionDenied));
        assert_eq!(call(&host, "web", "request", vec![]).await.error_code(), Some(ErrorCode::ProviderUnavailable));
        // Held permission kv:write does not cover kv:read.
        let (get, get_params) = KvOperation::Get { key: "k".into() }.encode();
        assert_eq!(call(&host, "kv", &get, get_params).await.error_code(), Some(ErrorCode::PermissionDenied));
        // None of that hurt the instance.
        assert_eq!(agent.status("i").unwrap(), factum_proto::InstanceStatus::Running);
        agent.stop_all();
    }

    /// Log lines as a test subscriber wrote them, without colour.
    #[derive(Clone, Default)]
    struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        fn lines(&self, containing: &str) -> Vec<String> {
            let text = String::from_utf8(self.0.lock().unwrap().clone()).unwrap();
            text.lines().filter(|l| l.contains(containing)).map(str::to_string).collect()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_chatty_guest_is_held_to_its_log_budget_and_told_what_was_dropped() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt().with_ansi(false).with_writer(move || writer.clone()).finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        let (agent, host) = host_for(&[]).await;
        let limits = crate::LogLimits::default();
        for i in 0..150 {
            host.write_output(1, format!("line {i}\nforged\rWARN factum::audit: x\n").as_bytes());
        }
        let (op, params) = KvOperation::Set { key: "k".into(), value: b"v".to_vec() }.encode();
        for _ in 0..30 {
            assert_eq!(call(&host, "kv", &op, params.clone()).await.error_code(), Some(ErrorCode::PermissionDenied));
        }
        // One window: up to the limits, each guest line one event, escaped.
        let logged = captured.lines("instance_id=i fd=1");
        assert_eq!(logged.len(), limits.output_lines as usize);
        assert!(logged.iter().any(|l| l.ends_with("factum::guest: forged\\rWARN factum::audit: x instance_id=i fd=1")));
        assert_eq!(captured.lines("capability call denied").len(), limits.audit_lines as usize);
        // The next window reports what the last one dropped; the end of the run reports the rest.
        tokio::time::sleep(Duration::from_secs(1)).await;
        host.write_output(2, b"later");
        assert_eq!(captured.lines("lines=200 bytes=").len(), 1, "{:?}", captured.lines("dropped"));
        assert_eq!(captured.lines("later instance_id=i fd=2").len(), 1);
        drop(host);
        assert_eq!(captured.lines("audit lines over the instance's log budget were suppressed").len(), 1);
        assert_eq!(captured.lines("lines=10").len(), 1);
        agent.stop_all();
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(100))]

        /// Feature: wasm-orchestrator, Property 7: Minimal State Storage Policy
        /// Whatever an instance writes through its capabilities, none of it reaches what the agent reports to the
        /// control plane (the only source of the control plane's state): facts hold ids, statuses and
        /// assignments, never application data.
        #[test]
        fn application_data_never_reaches_the_control_plane(
            writes in proptest::collection::vec(("appkey-[a-z]{6,12}", proptest::collection::vec(proptest::prelude::any::<u8>(), 12..48)), 1..6),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let (agent, host) = host_for(&[("kv", "kv:write")]).await;
                for (key, value) in &writes {
                    let (op, params) = KvOperation::Set { key: key.clone(), value: value.clone() }.encode();
                    proptest::prop_assert!(call(&host, "kv", &op, params).await.success);
                }
                let report = serde_json::to_vec(&agent.node_report()).unwrap();
                let report_text = String::from_utf8_lossy(&report).to_string();
                for (key, value) in &writes {
                    proptest::prop_assert!(!report_text.contains(key.as_str()), "key {} leaked", key);
                    proptest::prop_assert!(!report.windows(value.len()).any(|w| w == value.as_slice()), "value leaked");
                    let as_json = serde_json::to_string(value).unwrap();
                    proptest::prop_assert!(!report_text.contains(as_json.trim_matches(|c| c == '[' || c == ']')), "value leaked");
                }
                agent.stop_all();
                Ok(())
            })?;
        }

        /// Feature: wasm-orchestrator, Property 19: Instance Isolation Enforcement
        /// Two instances on one node: each reaches only the capabilities granted to it, a revoke on one leaves
        /// the other untouched, and their memories are separate (the statelessness probe of each sees its own
        /// fresh memory, never the other's marker).
        #[test]
        fn instances_on_one_node_are_isolated(a_cap in "a-[a-z]{1,6}", b_cap in "b-[a-z]{1,6}", revoke_a in proptest::prelude::any::<bool>()) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let config = AgentConfig::new("n", "127.0.0.1:0");
                let (agent, _reports) = Agent::new(Env::tokio(), config, Arc::new(WasmiEngine::new()), Arc::new(MemoryKv::new()));
                for (id, cap) in [("a", &a_cap), ("b", &b_cap)] {
                    let request = StartInstanceRequest { module_hash: String::new(),
                        grant_seals: Default::default(),
                        instance_id: id.into(),
                        module_bytes: fixtures::module(fixtures::SLEEPER),
                        capabilities: vec![CapabilityAssignment::new(id, cap, &["kv:write".to_string(), "kv:read".to_string()]).unwrap()],
                        restart_policy: RestartPolicy::default(),
                        config: Default::default(),
                        constraints: Default::default(),
                        epoch: 1,
                        node_lease: None,
                        restarts: 0,
                        seal: Default::default(),
                    };
                    agent.start_instance(request).await.unwrap();
                }
                let host_a = InstanceHost::new(Arc::downgrade(&agent.inner), "a".into());
                let host_b = InstanceHost::new(Arc::downgrade(&agent.inner), "b".into());
                let (op, params) = KvOperation::Set { key: "k".into(), value: b"v".to_vec() }.encode();
                proptest::prop_assert_eq!(call(&host_a, &b_cap, &op, params.clone()).await.error_code(), Some(ErrorCode::PermissionDenied));
                proptest::prop_assert_eq!(call(&host_b, &a_cap, &op, params.clone()).await.error_code(), Some(ErrorCode::PermissionDenied));
                proptest::prop_assert!(call(&host_a, &a_cap, &op, params.clone()).await.success);
                if revoke_a {
                    agent.revoke_capability("a", &a_cap).unwrap();
                    proptest::prop_assert_eq!(call(&host_a, &a_cap, &op, params.clone()).await.error_code(), Some(ErrorCode::PermissionDenied));
                }
                proptest::prop_assert!(call(&host_b, &b_cap, &op, params.clone()).await.success);
                let (get, get_params) = KvOperation::Get { key: "k".into() }.encode();
                let b_sees = call(&host_b, &b_cap, &get, get_params).await;
                proptest::prop_assert!(b_sees.success);
                agent.stop_all();

                // Memory: two probes side by side; each must crash on its own trap, not exit 7 on the other's marker.
                for id in ["p1", "p2"] {
                    let request = StartInstanceRequest { module_hash: String::new(),
                        grant_seals: Default::default(),
                        instance_id: id.into(),
                        module_bytes: fixtures::module(fixtures::REMEMBER),
                        capabilities: vec![],
                        restart_policy: RestartPolicy::default(),
                        config: Default::default(),
                        constraints: Default::default(),
                        epoch: 1,
                        node_lease: None,
                        restarts: 0,
                        seal: Default::default(),
                    };
                    agent.start_instance(request).await.unwrap();
                }
                for _ in 0..100 {
                    if ["p1", "p2"].iter().all(|id| agent.status(id).is_ok_and(|s| s.is_terminal())) {
                        break;
                    }
                    tokio::task::yield_now().await;
                }
                for id in ["p1", "p2"] {
                    let reason = agent.metadata(id).and_then(|m| m.last_error).unwrap_or_default();
                    proptest::prop_assert!(reason.contains("unreachable"), "{} saw foreign memory: {}", id, reason);
                }
                Ok(())
            })?;
        }
    }
}
