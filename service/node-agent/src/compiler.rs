//! Compiling modules off the async runtime. Cranelift can spend seconds on a large module; compiled on a tokio
//! worker, a few hostile 32 MiB modules would stall the heartbeats until the node fenced itself. Here a compile
//! runs through the env's blocking spawner (tokio's blocking pool in production, inline in simulation so runs
//! stay deterministic), behind a semaphore, once per module hash however many starts want it, and within a
//! time budget.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use factum_env::Env;
use factum_wasm::{CachedModule, EngineError, ModuleCache};
use futures::future::{BoxFuture, FutureExt, Shared};
use tokio::sync::Semaphore;

type Compile = Shared<BoxFuture<'static, Result<CachedModule, EngineError>>>;

/// How many compiles run at once, and how long one may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompileLimits {
    /// Compiles running at once; more wait their turn (at least 1).
    pub concurrency: usize,
    /// Longest a compile may take once it runs; longer is RESOURCE_EXHAUSTED. The thread finishes that
    /// compile in the background (Cranelift cannot be interrupted) and holds its slot until then, so hostile
    /// modules cannot pile up threads.
    pub budget: Duration,
}

impl Default for CompileLimits {
    fn default() -> Self {
        CompileLimits { concurrency: 2, budget: Duration::from_secs(60) }
    }
}

/// Compiles modules into the agent's [`ModuleCache`].
pub(crate) struct Compiler {
    cache: Arc<ModuleCache>,
    limits: CompileLimits,
    slots: Arc<Semaphore>,
    /// Compiles under way, by module hash: a second start of the same module waits for the first compile.
    in_flight: Arc<Mutex<BTreeMap<String, Compile>>>,
}

impl Compiler {
    pub(crate) fn new(cache: Arc<ModuleCache>, limits: CompileLimits) -> Self {
        let slots = Arc::new(Semaphore::new(limits.concurrency.max(1)));
        Compiler { cache, limits, slots, in_flight: Arc::default() }
    }

    /// The compiled module for `bytes` (whose module hash is `hash`): from the cache, from a compile already
    /// under way, or compiled now.
    pub(crate) async fn get_or_compile(
        &self,
        env: &Env,
        hash: &str,
        bytes: &[u8],
    ) -> Result<CachedModule, EngineError> {
        if let Some(hit) = self.cache.get(hash) {
            return Ok(hit);
        }
        let compile = {
            let mut in_flight = lock(&self.in_flight);
            match in_flight.get(hash) {
                Some(compile) => compile.clone(),
                None => {
                    let compile = self.compile(env.clone(), hash.to_string(), bytes.to_vec()).boxed().shared();
                    in_flight.insert(hash.to_string(), compile.clone());
                    compile
                }
            }
        };
        compile.await
    }

    fn compile(
        &self,
        env: Env,
        hash: String,
        bytes: Vec<u8>,
    ) -> impl std::future::Future<Output = Result<CachedModule, EngineError>> + Send + 'static {
        let (cache, slots, in_flight, budget) =
            (self.cache.clone(), self.slots.clone(), self.in_flight.clone(), self.limits.budget);
        async move {
            let result = async {
                let slot = slots.acquire_owned().await.map_err(|_| EngineError::Internal("compiler closed".into()))?;
                let key = hash.clone();
                let work = env.blocking(move || {
                    let _slot = slot; // released when this compile ends, even after its caller gave up
                    cache.get_or_compile(&key, &bytes)
                });
                match env.timeout(budget, work).await {
                    Some(Some(result)) => result,
                    Some(None) => {
                        Err(EngineError::Internal("compiling the module failed: the compiler panicked".into()))
                    }
                    None => Err(EngineError::ResourceExhausted(format!(
                        "compiling the module took longer than the node's compile budget of {budget:?}"
                    ))),
                }
            }
            .await;
            lock(&in_flight).remove(&hash);
            result
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
