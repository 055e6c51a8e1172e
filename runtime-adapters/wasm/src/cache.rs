//! Compile once per module hash, never per start.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};

use crate::{CompiledModule, EngineError, WasmEngine};

/// A bounded cache of compiled modules keyed by module hash, in front of one engine. When full, the module
/// cached longest ago is dropped (instances already made from it keep their own reference).
///
/// The module bytes are kept beside the compiled module and shared with every caller, so a node can hand a
/// module back (to a restarted control plane that reschedules it) without holding one copy per instance.
pub struct ModuleCache {
    engine: Arc<dyn WasmEngine>,
    capacity: usize,
    inner: Mutex<Inner>,
}

/// A compiled module and the bytes it was compiled from.
#[derive(Clone)]
pub struct CachedModule {
    /// Ready to instantiate.
    pub compiled: Arc<dyn CompiledModule>,
    /// The module's bytes, shared.
    pub bytes: Arc<[u8]>,
}

#[derive(Default)]
struct Inner {
    modules: BTreeMap<String, CachedModule>,
    order: VecDeque<String>,
}

impl ModuleCache {
    /// A cache holding at most `capacity` modules (at least one).
    pub fn new(engine: Arc<dyn WasmEngine>, capacity: usize) -> Self {
        Self { engine, capacity: capacity.max(1), inner: Mutex::new(Inner::default()) }
    }

    /// The engine behind the cache.
    pub fn engine(&self) -> &Arc<dyn WasmEngine> {
        &self.engine
    }

    /// Returns the compiled module for `bytes`, compiling on a miss. `hash` must be the module hash of `bytes`.
    pub fn get_or_compile(&self, hash: &str, bytes: &[u8]) -> Result<CachedModule, EngineError> {
        if let Some(hit) = self.lock().modules.get(hash) {
            return Ok(hit.clone());
        }
        // Compile outside the lock: compiling is slow and other starts should not wait on it.
        let compiled = CachedModule { compiled: self.engine.compile(bytes)?, bytes: Arc::from(bytes) };
        let mut inner = self.lock();
        if let Some(raced) = inner.modules.get(hash) {
            return Ok(raced.clone());
        }
        inner.modules.insert(hash.to_string(), compiled.clone());
        inner.order.push_back(hash.to_string());
        while inner.order.len() > self.capacity {
            if let Some(old) = inner.order.pop_front() {
                inner.modules.remove(&old);
            }
        }
        Ok(compiled)
    }

    /// The cached module with `hash`, if the cache still holds it.
    pub fn get(&self, hash: &str) -> Option<CachedModule> {
        self.lock().modules.get(hash).cloned()
    }

    /// Number of cached modules.
    pub fn len(&self) -> usize {
        self.lock().modules.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}
