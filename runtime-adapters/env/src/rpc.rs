//! tarpc over the env's network: the one way factum frames RPC messages (length-delimited bincode over any
//! byte stream), so the same services run over tokio TCP in production and turmoil TCP in simulation.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tarpc::serde_transport::Transport;
use tarpc::tokio_serde::formats::Bincode;
use tarpc::tokio_util::codec::LengthDelimitedCodec;
use tokio::io::{AsyncRead, AsyncWrite};

use factum_proto::MAX_FRAME_BYTES;

pub mod connections;
pub mod hello;
mod redial;
pub mod tls;
pub use connections::{Connections, ServerLimits};
pub use hello::{dial, Credentials, Peer};
pub use redial::Redial;

/// A tarpc transport over `S` speaking bincode in length-delimited frames of at most [`MAX_FRAME_BYTES`].
pub fn transport<S, Item, SinkItem>(io: S) -> Transport<S, Item, SinkItem, SafeBincode<Item, SinkItem>>
where
    S: AsyncRead + AsyncWrite,
    Item: for<'de> Deserialize<'de>,
    SinkItem: Serialize,
{
    let framed = LengthDelimitedCodec::builder().max_frame_length(MAX_FRAME_BYTES).new_framed(io);
    tarpc::serde_transport::new(framed, SafeBincode(std::marker::PhantomData))
}

/// tarpc's bincode format, with a frame that panics the decoder refused like any other bad frame. tarpc's
/// own `Deserialize` for a request context adds the peer's deadline to `Instant::now()`, which panics on a
/// deadline centuries away: any peer could kill the connection task with 16 bytes (found by fuzzing the
/// frames, `runtime-adapters/env/tests/wire.rs`).
pub struct SafeBincode<Item, SinkItem>(std::marker::PhantomData<(Item, SinkItem)>);

impl<Item, SinkItem> tarpc::tokio_serde::Deserializer<Item> for SafeBincode<Item, SinkItem>
where
    Item: for<'de> Deserialize<'de>,
{
    type Error = std::io::Error;

    fn deserialize(
        self: std::pin::Pin<&mut Self>,
        src: &tarpc::tokio_util::bytes::BytesMut,
    ) -> Result<Item, Self::Error> {
        let decode = std::panic::AssertUnwindSafe(|| {
            let inner = std::pin::pin!(Bincode::<Item, SinkItem>::default());
            tarpc::tokio_serde::Deserializer::deserialize(inner, src)
        });
        std::panic::catch_unwind(decode).unwrap_or_else(|_| {
            Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "a frame that cannot be decoded"))
        })
    }
}

impl<Item, SinkItem> tarpc::tokio_serde::Serializer<SinkItem> for SafeBincode<Item, SinkItem>
where
    SinkItem: Serialize,
{
    type Error = std::io::Error;

    fn serialize(
        self: std::pin::Pin<&mut Self>,
        item: &SinkItem,
    ) -> Result<tarpc::tokio_util::bytes::Bytes, Self::Error> {
        let inner = std::pin::pin!(Bincode::<Item, SinkItem>::default());
        tarpc::tokio_serde::Serializer::serialize(inner, item)
    }
}

/// A tarpc context whose deadline never fires on its own. tarpc's deadline is a `std::time::Instant`, which
/// does not follow simulated time, so factum enforces its timeouts with the env clock instead and keeps
/// tarpc's deadline out of the way.
///
/// Why the nondeterministic things tarpc puts in every request cannot reach a simulated run's behaviour:
/// - the trace and span ids come from tarpc's own thread-local generator, and the deadline from the OS clock.
///   Both only change the bytes of a frame and its length by a few bytes (bincode varints); turmoil's TCP makes
///   one segment of each write whatever its length, and draws latency and loss per segment, so delivery does
///   not depend on them; and nothing in factum reads a trace context.
/// - a deadline a day away is never put on a timer: upstream tarpc keeps every in-flight request in a
///   real-time `DelayQueue` whose inserts wake the connection task depending on how far the OS clock moved,
///   which made the order of a simulated host's answers depend on CPU load; factum's tarpc is patched to leave
///   deadlines an hour or more away untracked (`vendor/README.md`). No simulated run lasts a day of real time.
///
/// `sim/tests/reference_hashes.rs` checks the consequence: the same seed gives the same trace hash in a fresh
/// process, whatever ids tarpc drew, also while the CPU is busy.
pub fn rpc_context() -> tarpc::context::Context {
    let mut ctx = tarpc::context::current();
    ctx.deadline = Instant::now() + Duration::from_secs(24 * 3600);
    ctx
}

/// [`rpc_context`] with a trace id drawn from `env`, which the server logs as the call's correlation id (an
/// audit event names it): for clients whose calls a person may want to find again in the logs.
pub fn traced_context(env: &crate::Env) -> tarpc::context::Context {
    let mut ctx = rpc_context();
    let id = (u128::from(env.rng.next_u64()) << 64) | u128::from(env.rng.next_u64());
    ctx.trace_context.trace_id = tarpc::trace::TraceId::from(id);
    ctx
}

/// Accepts connections on `listener` forever, handing each that `connections` admits to `on_connection` with
/// the peer's address and its guard (which typically reads the peer's hello, wraps the stream in [`transport`]
/// and spawns a tarpc channel that holds the guard). One
/// over the limits is closed at once and logged. An accept error never ends the loop: one about a single
/// connection (reset or aborted before it was taken) is skipped, and any other (out of file descriptors, say)
/// is logged and retried after [`ACCEPT_RETRY`] on the env clock, so a burst of connections cannot take a
/// server down for good.
pub async fn accept_loop(
    env: &crate::Env,
    listener: Box<dyn crate::Listener>,
    what: &str,
    connections: &std::sync::Arc<Connections>,
    on_connection: impl Fn(crate::BoxStream, String, connections::Admitted),
) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => match connections.admit(&peer) {
                Ok(admitted) => on_connection(stream, peer, admitted),
                Err(refused) => tracing::warn!(target: hello::AUDIT, %peer, server = what, result = "refused",
                    "connection refused: {refused}"),
            },
            Err(e) if connection_error(&e) => {
                tracing::debug!(error = %e, "{what}: a connection failed before it was accepted")
            }
            Err(e) => {
                tracing::error!(error = %e, "{what} listener cannot accept; retrying in {ACCEPT_RETRY:?}");
                env.clock.sleep(ACCEPT_RETRY).await;
            }
        }
    }
}

/// How long [`accept_loop`] waits after an accept error that is not about one connection.
pub const ACCEPT_RETRY: Duration = Duration::from_secs(1);

/// An accept error about one incoming connection, not the listener.
fn connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset, Interrupted};
    matches!(e.kind(), ConnectionAborted | ConnectionRefused | ConnectionReset | Interrupted)
}

/// An RPC error with its causes, for people: tarpc's own text for a refused request ("the server aborted
/// request processing") leaves out why ("server throttled the request").
pub fn describe(e: &tarpc::client::RpcError) -> String {
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// Starts a tarpc client: its dispatch task runs on the env's spawner (never a bare `tokio::spawn`, which
/// simulation cannot keep deterministic) and the client is returned.
pub fn start_client<C, D, E>(env: &crate::Env, new: tarpc::client::NewClient<C, D>) -> C
where
    D: std::future::Future<Output = Result<(), E>> + Send + 'static,
{
    let tarpc::client::NewClient { client, dispatch } = new;
    env.spawn(async move {
        let _ = dispatch.await; // the dispatch ends when the connection does; callers see that as call errors
    });
    client
}

/// Serves a tarpc service on a listener, forever (see [`accept_loop`]): one channel per connection, one task per
/// request, every task on the env's spawner, within [`ServerLimits`] (a connection that stays silent past the
/// idle timeout is closed; requests past the in-flight limit are answered "throttled"). Each connection first
/// introduces itself ([`hello::accept`]); `serve` says what to serve that peer, or why not. A macro, not a
/// function, because tarpc's `Serve` returns its futures from an `async fn`, whose `Send`-ness a generic
/// function cannot require.
///
/// `serve_tarpc!(env, listener, "what", serve)` where `serve` is a `Clone` closure from the [`Peer`] to
/// `Result<S, String>` and `S` a tarpc server value (e.g. `|_| Ok(my_impl.clone().serve())`), under the default
/// limits; `serve_tarpc!(env, listener, "what", serve, limits)` under others.
#[macro_export]
macro_rules! serve_tarpc {
    ($env:expr, $listener:expr, $what:expr, $serve:expr) => {
        $crate::serve_tarpc!($env, $listener, $what, $serve, $crate::rpc::ServerLimits::default())
    };
    ($env:expr, $listener:expr, $what:expr, $serve:expr, $limits:expr) => {{
        let env: $crate::Env = $env.clone();
        let serve = $serve;
        let what: &str = $what;
        let limits: $crate::rpc::ServerLimits = $limits;
        let connections = $crate::rpc::Connections::new(limits);
        $crate::rpc::accept_loop(&env, $listener, what, &connections, |stream, peer, admitted| {
            use ::futures::StreamExt as _;
            use ::tarpc::server::Channel as _;
            let (env, serve, what) = (env.clone(), serve.clone(), what.to_string());
            env.clone().spawn(async move {
                let _admitted = admitted; // counted out when the connection ends
                let Some((stream, _, service)) = $crate::rpc::hello::accept(&env, stream, peer, &what, serve).await
                else {
                    return;
                };
                let (stream, silent) = $crate::rpc::connections::watch(stream, env.clock.clone(), limits.idle_timeout);
                let channel = ::tarpc::server::BaseChannel::with_defaults($crate::rpc::transport(stream))
                    .max_concurrent_requests(limits.max_in_flight_per_connection);
                let spawner = env.clone();
                let serving = channel.execute(service).for_each(move |call| {
                    spawner.spawn(call);
                    ::futures::future::ready(())
                });
                // The first to end ends both: the peer hung up, or it stayed silent too long.
                ::futures::future::select(::std::pin::pin!(serving), ::std::pin::pin!(silent)).await;
            });
        })
        .await
    }};
}
