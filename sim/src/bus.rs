//! The simulation's NATS: a message bus on its own host, so messages between instances cross the simulated
//! network and meet its faults. Like NATS core it is at most once: subscriptions live in the bus's memory,
//! a bus that crashes forgets them, and a message published while a subscriber is cut off may be lost. Each
//! agent reaches it through a [`RemoteBus`], the [`MessageBus`] its messaging provider runs on.
//!
//! A subscriber's messages wait in its session's queue until it polls (a long poll, as NATS pushes them down
//! an open connection). A session nobody polls for [`SESSION_TTL`] is dropped with its subscriptions, as NATS
//! drops a client that misses its pings; the client subscribes again when a poll finds its session gone.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use factum_env::{rpc, Env, Listener};
use factum_proto::permissions::topic_matches;
use factum_proto::{ErrorCode, ErrorResponse};
use factum_providers::{BusSubscription, MessageBus, MessageSink};
use tarpc::context::Context;

/// A session nobody polled for this long is dropped, its subscriptions with it.
pub const SESSION_TTL: Duration = Duration::from_secs(5);
/// Longest a poll waits for a message before it answers with none.
const POLL_WAIT: Duration = Duration::from_secs(1);
/// Deadline of one call, on the caller's clock (a poll gets [`POLL_WAIT`] more).
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Most messages queued for one session; the oldest go first (a slow consumer loses messages, as on NATS).
const QUEUE_LIMIT: usize = 1024;

/// One message for one subscription of a session: (subscription id, topic, payload).
pub type Message = (u64, String, Vec<u8>);

/// The bus's wire API.
#[tarpc::service]
pub trait BusApi {
    /// Adds (or keeps) subscription `id` of `session` to `pattern`; creates the session if it is new.
    async fn subscribe(session: String, id: u64, pattern: String);
    /// Ends subscription `id` of `session`.
    async fn unsubscribe(session: String, id: u64);
    /// Queues `payload` for every subscription whose pattern matches `topic`.
    async fn publish(topic: String, payload: Vec<u8>);
    /// Takes the session's queued messages, waiting up to a second for one; `None` if the bus does not know the
    /// session (it restarted, or dropped the session as silent).
    async fn poll(session: String) -> Option<Vec<Message>>;
}

struct Session {
    patterns: BTreeMap<u64, String>,
    queue: VecDeque<Message>,
    arrived: Arc<tokio::sync::Notify>,
    last_seen: Duration,
}

/// The bus itself: sessions, their subscriptions and queues, in memory only.
#[derive(Clone)]
pub struct Bus {
    env: Env,
    sessions: Arc<Mutex<BTreeMap<String, Session>>>,
}

impl Bus {
    /// An empty bus; [`Bus::run_reaper`] drops silent sessions.
    pub fn new(env: Env) -> Self {
        Bus { env, sessions: Arc::default() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Session>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Drops every session not polled for [`SESSION_TTL`], forever.
    pub async fn run_reaper(self) {
        loop {
            self.env.clock.sleep(Duration::from_secs(1)).await;
            let now = self.env.clock.now();
            self.lock().retain(|_, s| now.saturating_sub(s.last_seen) < SESSION_TTL);
        }
    }
}

impl BusApi for Bus {
    async fn subscribe(self, _: Context, session: String, id: u64, pattern: String) {
        let now = self.env.clock.now();
        let mut sessions = self.lock();
        let s = sessions.entry(session).or_insert_with(|| Session {
            patterns: BTreeMap::new(),
            queue: VecDeque::new(),
            arrived: Arc::default(),
            last_seen: now,
        });
        s.last_seen = now;
        s.patterns.insert(id, pattern);
    }

    async fn unsubscribe(self, _: Context, session: String, id: u64) {
        if let Some(s) = self.lock().get_mut(&session) {
            s.patterns.remove(&id);
        }
    }

    async fn publish(self, _: Context, topic: String, payload: Vec<u8>) {
        for s in self.lock().values_mut() {
            let matching: Vec<u64> =
                s.patterns.iter().filter(|(_, pattern)| topic_matches(pattern, &topic)).map(|(id, _)| *id).collect();
            for id in matching {
                if s.queue.len() == QUEUE_LIMIT {
                    s.queue.pop_front();
                }
                s.queue.push_back((id, topic.clone(), payload.clone()));
            }
            if !s.queue.is_empty() {
                s.arrived.notify_one();
            }
        }
    }

    async fn poll(self, _: Context, session: String) -> Option<Vec<Message>> {
        let arrived = {
            let mut sessions = self.lock();
            let s = sessions.get_mut(&session)?;
            s.last_seen = self.env.clock.now();
            if !s.queue.is_empty() {
                return Some(s.queue.drain(..).collect());
            }
            s.arrived.clone()
        };
        let _ = self.env.timeout(POLL_WAIT, arrived.notified()).await;
        let now = self.env.clock.now();
        let mut sessions = self.lock();
        let s = sessions.get_mut(&session)?;
        s.last_seen = now;
        Some(s.queue.drain(..).collect())
    }
}

/// Serves `bus` on `listener` until the listener fails.
pub async fn serve(bus: Bus, listener: Box<dyn Listener>) {
    let env = bus.env.clone();
    factum_env::serve_tarpc!(env, listener, "bus", move |_: &rpc::Peer| Ok(bus.clone().serve()));
}

struct Client {
    env: Env,
    session: String,
    connection: rpc::Redial<BusApiClient>,
    sinks: Mutex<BTreeMap<u64, (String, MessageSink)>>,
    next_id: std::sync::atomic::AtomicU64,
}

impl Client {
    async fn call<T, F, Fut>(&self, extra: Duration, call: F) -> Result<T, ErrorResponse>
    where
        F: FnOnce(BusApiClient) -> Fut,
        Fut: std::future::Future<Output = Result<T, tarpc::client::RpcError>>,
    {
        let unavailable = |why: String| ErrorResponse::new(ErrorCode::ProviderUnavailable, format!("bus: {why}"));
        self.connection.call(extra, call).await.map_err(unavailable)
    }

    fn sinks(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, (String, MessageSink)>> {
        self.sinks.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn subscribe_on_bus(&self, id: u64, pattern: String) -> Result<(), ErrorResponse> {
        let session = self.session.clone();
        self.call(Duration::ZERO, |c| async move { c.subscribe(rpc::rpc_context(), session, id, pattern).await }).await
    }

    /// One poll: hands what arrived to its sinks, or subscribes everything again if the bus lost the session.
    async fn poll_once(&self) -> Result<(), ErrorResponse> {
        let session = self.session.clone();
        let answer = self.call(POLL_WAIT, |c| async move { c.poll(rpc::rpc_context(), session).await }).await?;
        match answer {
            Some(messages) => {
                for (id, topic, payload) in messages {
                    // Called outside the lock: a sink takes the agent's lock.
                    let sink = self.sinks().get(&id).map(|(_, sink)| sink.clone());
                    if let Some(sink) = sink {
                        sink(&topic, &payload);
                    }
                }
            }
            None => {
                let all: Vec<(u64, String)> = self.sinks().iter().map(|(id, (p, _))| (*id, p.clone())).collect();
                for (id, pattern) in all {
                    self.subscribe_on_bus(id, pattern).await?;
                }
            }
        }
        Ok(())
    }
}

/// Polls for as long as the bus client lives, while it has subscriptions.
async fn poll_loop(client: Weak<Client>) {
    loop {
        let Some(c) = client.upgrade() else { return };
        let idle = c.sinks().is_empty();
        let failed = !idle && c.poll_once().await.is_err();
        let env = c.env.clone();
        drop(c);
        if idle || failed {
            env.clock.sleep(Duration::from_millis(250)).await;
        }
    }
}

/// A [`MessageBus`] on the bus host at `addr`, for one agent.
pub struct RemoteBus(Arc<Client>);

impl RemoteBus {
    /// A client of the bus at `addr`; its poll loop runs on `env` for as long as the client lives.
    pub fn new(env: Env, addr: impl Into<String>) -> Self {
        let session = env.random_id("session-");
        // The bus holds no identity of its own (the simulator's network carries no TLS).
        let server = factum_proto::Principal::Anonymous;
        let connection = rpc::Redial::new(env.clone(), addr, server, CALL_TIMEOUT, |env, stream| {
            rpc::start_client(env, BusApiClient::new(tarpc::client::Config::default(), rpc::transport(stream)))
        });
        let client = Arc::new(Client {
            env: env.clone(),
            session,
            connection,
            sinks: Mutex::new(BTreeMap::new()),
            next_id: std::sync::atomic::AtomicU64::new(1),
        });
        env.spawn(poll_loop(Arc::downgrade(&client)));
        RemoteBus(client)
    }
}

struct Unsubscribe {
    client: Weak<Client>,
    id: u64,
}

impl Drop for Unsubscribe {
    fn drop(&mut self) {
        let Some(client) = self.client.upgrade() else { return };
        client.sinks().remove(&self.id);
        let (env, session, id) = (client.env.clone(), client.session.clone(), self.id);
        // Best effort: a subscription the bus keeps is dropped with the session, and its messages find no sink.
        env.spawn(async move {
            let _ = client
                .call(Duration::ZERO, |c| async move { c.unsubscribe(rpc::rpc_context(), session, id).await })
                .await;
        });
    }
}

#[async_trait]
impl MessageBus for RemoteBus {
    fn name(&self) -> &'static str {
        "msg-sim-bus"
    }

    async fn publish(&self, topic: &str, payload: &[u8]) -> Result<(), ErrorResponse> {
        let (topic, payload) = (topic.to_string(), payload.to_vec());
        self.0.call(Duration::ZERO, |c| async move { c.publish(rpc::rpc_context(), topic, payload).await }).await
    }

    async fn subscribe(&self, pattern: &str, sink: MessageSink) -> Result<BusSubscription, ErrorResponse> {
        let id = self.0.next_id.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.0.sinks().insert(id, (pattern.to_string(), sink));
        let guard = Unsubscribe { client: Arc::downgrade(&self.0), id };
        // On failure the guard drops here, which forgets the sink again.
        self.0.subscribe_on_bus(id, pattern.to_string()).await?;
        Ok(BusSubscription::new(guard))
    }
}
