//! A tarpc client that dials on first use and dials anew after a failed call.

use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use crate::{BoxStream, Env};

/// Makes a tarpc client of a freshly dialled stream.
type Open<C> = Box<dyn Fn(&Env, BoxStream) -> C + Send + Sync>;

/// A tarpc client of one address, dialled on the first call and forgotten after a call that fails or outlives
/// its deadline, so the next call dials anew: a stream that lost a segment may never end, and waiting on it
/// would stall every later call. Every step is bounded on the env clock.
pub struct Redial<C> {
    env: Env,
    addr: String,
    server: factum_proto::Principal,
    timeout: Duration,
    cached: Mutex<Option<C>>,
    open: Open<C>,
}

impl<C: Clone> Redial<C> {
    /// A client of `server` at `addr` with `timeout` per dial and per call; `open` makes the tarpc client of a
    /// fresh stream, e.g. `|env, s| rpc::start_client(env, MyClient::new(Config::default(), rpc::transport(s)))`.
    pub fn new(
        env: Env,
        addr: impl Into<String>,
        server: factum_proto::Principal,
        timeout: Duration,
        open: impl Fn(&Env, BoxStream) -> C + Send + Sync + 'static,
    ) -> Self {
        Self { env, addr: addr.into(), server, timeout, cached: Mutex::new(None), open: Box::new(open) }
    }

    /// Runs `call` on the client under the timeout plus `extra` (for calls that wait on purpose, like a long
    /// poll). The error says what failed, naming the address.
    pub async fn call<T, F, Fut>(&self, extra: Duration, call: F) -> Result<T, String>
    where
        F: FnOnce(C) -> Fut,
        Fut: Future<Output = Result<T, tarpc::client::RpcError>>,
    {
        let client = self.client().await?;
        match self.env.timeout(self.timeout + extra, call(client)).await {
            Some(Ok(answer)) => Ok(answer),
            failed => {
                *self.lock() = None;
                let why = if failed.is_some() { "failed" } else { "timed out" };
                Err(format!("call to {} {why}", self.addr))
            }
        }
    }

    async fn client(&self) -> Result<C, String> {
        if let Some(client) = self.lock().clone() {
            return Ok(client);
        }
        let stream = match self.env.timeout(self.timeout, crate::rpc::dial(&self.env, &self.addr, &self.server)).await {
            Some(Ok(stream)) => stream,
            Some(Err(e)) => return Err(format!("cannot reach {}: {e}", self.addr)),
            None => return Err(format!("connecting to {} timed out", self.addr)),
        };
        let client = (self.open)(&self.env, stream);
        *self.lock() = Some(client.clone());
        Ok(client)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<C>> {
        self.cached.lock().unwrap_or_else(|p| p.into_inner())
    }
}
