//! The production engine: wasmtime with Cranelift. Imports are resolved once per module into an
//! `InstancePre`, so a start only allocates a store and memory.

use std::any::Any;
use std::sync::Arc;

use futures::future::BoxFuture;
use wasmtime::{Caller, Config, Engine, ExternType, InstancePre, Linker, Module, Store, Trap, TypedFunc, Val, ValType};

use crate::abi::{self, GuestState, HostFn, Outcome, Ty};
use crate::budget::Budget;
use crate::NodeMemory;
use crate::{
    handler_failed, within_deadline, CompiledModule, EngineError, ExitReason, GuestHost, Instance, Limits, WasmEngine,
    ENTRY_POINT, MESSAGE_HANDLER,
};

/// wasmtime behind the [`WasmEngine`] seam.
pub struct WasmtimeEngine {
    engine: Engine,
    /// The node's memory, drawn on by every store this engine makes.
    node_memory: Arc<NodeMemory>,
}

/// What a store carries: the ABI state and its memory budget.
struct StoreData {
    guest: GuestState,
    budget: Budget,
}

/// `proc_exit` unwinds the guest with this error.
#[derive(Debug)]
struct GuestExit(i32);

impl std::fmt::Display for GuestExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "guest exited with code {}", self.0)
    }
}

impl std::error::Error for GuestExit {}

struct Compiled {
    hash: String,
    pre: InstancePre<StoreData>,
}

impl CompiledModule for Compiled {
    fn hash(&self) -> &str {
        &self.hash
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// How many memories and tables per module a pool admits at compile time (see [`WasmtimeEngine::pooled`]).
const POOL_PER_MODULE_CAP: u32 = 64;

/// How much address space a wasmtime engine reserves for each linear memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Reservation {
    /// wasmtime's default, 4 GiB plus guard pages: every 32-bit address falls inside it, so guest code needs no
    /// bounds checks, but each instance takes ~4 GiB of a 128 TiB address space (~32,000 instances at most).
    #[default]
    Guarded,
    /// Only the instance's memory budget ([`Limits::max_memory_bytes`]): guest loads and stores check their
    /// bounds explicitly (measured in `benches/limits.rs`), and 100,000 instances of 64 MiB take ~6 TiB.
    Budget,
}

impl WasmtimeEngine {
    /// An engine with fuel metering on (fuel drives cooperative yielding, so runs are deterministic).
    pub fn new() -> Result<Self, EngineError> {
        Self::from_config(Config::new())
    }

    /// An engine that maps each instance's memory on demand, reserving `reservation`'s worth of address space.
    pub fn on_demand(reservation: Reservation, limits: &Limits) -> Result<Self, EngineError> {
        let mut config = Config::new();
        reserve(&mut config, reservation, limits);
        Self::from_config(config)
    }

    /// An engine whose instances take their memories, tables and async stacks from a pool of `slots`
    /// preallocated slots sized by `limits` (wasmtime's pooling allocator): a start maps nothing, and a slot
    /// freed by an ended instance is reused, its memory image reset copy-on-write. More than `slots` instances
    /// at once are refused (RESOURCE_EXHAUSTED). The pool reserves `slots` × `reservation` of address space up
    /// front, so a pool of more than ~32,000 slots needs [`Reservation::Budget`].
    pub fn pooled(slots: u32, limits: &Limits, reservation: Reservation) -> Result<Self, EngineError> {
        let mut pool = wasmtime::PoolingAllocationConfig::new();
        pool.total_core_instances(slots)
            .total_memories(slots)
            .total_tables(slots)
            .total_stacks(slots)
            .max_memory_size(limits.max_memory_bytes)
            // Above the budget's own counts, so a module with one too many is refused at instantiation by
            // the budget, naming the limit, as on the other engines (the pool would reject it at compile).
            .max_memories_per_module(POOL_PER_MODULE_CAP.max(u32::try_from(limits.max_memories).unwrap_or(u32::MAX)))
            .max_tables_per_module(POOL_PER_MODULE_CAP.max(u32::try_from(limits.max_tables).unwrap_or(u32::MAX)))
            .table_elements(limits.max_table_elements);
        let mut config = Config::new();
        config.allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pool));
        reserve(&mut config, reservation, limits);
        Self::from_config(config).map_err(|e| {
            let space = match reservation {
                Reservation::Guarded => "~4 GiB of address space each (a large pool needs the budget reservation)",
                Reservation::Budget => "their memory budget of address space each",
            };
            // Read only to explain a refusal: each slot's stack and memory are separate maps.
            let map_count = std::fs::read_to_string("/proc/sys/vm/max_map_count").unwrap_or_default();
            EngineError::Internal(format!(
                "{e}: {slots} slots reserve {space} and map ~2 regions each (vm.max_map_count is {})",
                map_count.trim()
            ))
        })
    }

    /// An engine from `config`, with what every factum engine needs on top: fuel metering.
    fn from_config(mut config: Config) -> Result<Self, EngineError> {
        config.consume_fuel(true);
        let engine = Engine::new(&config).map_err(|e| EngineError::Internal(format!("wasmtime config: {e}")))?;
        Ok(Self { engine, node_memory: Arc::default() })
    }

    /// The same engine with its instances drawing on `node_memory` (unlimited by default).
    pub fn with_node_memory(self, node_memory: Arc<NodeMemory>) -> Self {
        Self { node_memory, ..self }
    }
}

/// Sizes `config`'s memory reservation as `reservation` says.
fn reserve(config: &mut Config, reservation: Reservation, limits: &Limits) {
    if reservation == Reservation::Budget {
        let budget = u64::try_from(limits.max_memory_bytes).unwrap_or(u64::MAX);
        // Growth never passes the budget, so nothing is reserved beyond it; one 64 KiB guard page per memory
        // still lets constant offsets of small loads skip their check.
        config.memory_reservation(budget).memory_reservation_for_growth(0).memory_guard_size(64 * 1024);
    }
}

fn ty(t: &ValType) -> Ty {
    match t {
        ValType::I32 => Ty::I32,
        ValType::I64 => Ty::I64,
        _ => Ty::Other,
    }
}

fn to_args(params: &[Val]) -> Vec<i64> {
    // i32 arguments are pointers, lengths or small codes: read them as unsigned so pointers above 2 GiB work;
    // `proc_exit` truncates back to i32.
    params
        .iter()
        .map(|v| match v {
            Val::I32(x) => i64::from(*x as u32),
            Val::I64(x) => *x,
            _ => 0,
        })
        .collect()
}

fn memory_and_state<'a>(caller: &'a mut Caller<'_, StoreData>) -> (Option<&'a mut [u8]>, &'a mut GuestState) {
    match caller.get_export("memory").and_then(|e| e.into_memory()) {
        Some(memory) => {
            let (mem, data) = memory.data_and_store_mut(caller);
            (Some(mem), &mut data.guest)
        }
        None => (None, &mut caller.data_mut().guest),
    }
}

fn define(
    linker: &mut Linker<StoreData>,
    module: &str,
    name: &str,
    func_ty: wasmtime::FuncType,
    f: HostFn,
) -> Result<(), EngineError> {
    linker
        .func_new_async(module, name, func_ty, move |mut caller, params, results| {
            Box::new(async move {
                let args = to_args(params);
                let outcome = {
                    let (mem, state) = memory_and_state(&mut caller);
                    abi::dispatch(state, mem, f, &args)
                };
                let ret = match outcome {
                    Outcome::Ready(v) => v,
                    Outcome::Exit(code) => return Err(wasmtime::Error::new(GuestExit(code))),
                    Outcome::Pending(pending) => {
                        let host = caller.data().guest.host.clone();
                        let done = abi::perform(&host, pending).await;
                        let (mem, state) = memory_and_state(&mut caller);
                        abi::complete(state, mem, done)
                    }
                };
                if let Some(slot) = results.first_mut() {
                    *slot = Val::I32(ret);
                }
                Ok(())
            })
        })
        .map(|_| ())
        .map_err(|e| EngineError::InvalidModule(format!("cannot link import {module}.{name}: {e}")))
}

impl WasmEngine for WasmtimeEngine {
    fn name(&self) -> &'static str {
        "wasmtime"
    }

    fn compile(&self, bytes: &[u8]) -> Result<Arc<dyn CompiledModule>, EngineError> {
        let module = Module::new(&self.engine, bytes).map_err(|e| {
            let msg = format!("{e:#}");
            // A pooled engine checks a module's memories against its slots when it compiles it.
            if msg.contains("pooling allocator") {
                EngineError::ResourceExhausted(msg)
            } else {
                EngineError::InvalidModule(msg)
            }
        })?;
        match module.get_export(ENTRY_POINT) {
            Some(ExternType::Func(f)) if f.params().len() == 0 && f.results().len() == 0 => {}
            _ => {
                return Err(EngineError::InvalidModule(format!("module exports no `{ENTRY_POINT}: () -> ()` function")))
            }
        }
        match module.get_export(MESSAGE_HANDLER) {
            None => {}
            Some(ExternType::Func(f))
                if f.params().map(|t| ty(&t)).eq([Ty::I32]) && f.results().map(|t| ty(&t)).eq([Ty::I32]) => {}
            Some(_) => {
                return Err(EngineError::InvalidModule(format!("export `{MESSAGE_HANDLER}` must be (i32) -> i32")))
            }
        }
        let mut linker = Linker::new(&self.engine);
        let mut defined = std::collections::BTreeSet::new();
        for import in module.imports() {
            let ExternType::Func(func_ty) = import.ty() else {
                return Err(EngineError::InvalidModule(format!(
                    "module imports {}.{}, which is not a function; factum provides only functions",
                    import.module(),
                    import.name()
                )));
            };
            let params: Vec<Ty> = func_ty.params().map(|t| ty(&t)).collect();
            let results: Vec<Ty> = func_ty.results().map(|t| ty(&t)).collect();
            let f = abi::resolve_import(import.module(), import.name(), &params, &results)
                .map_err(EngineError::InvalidModule)?;
            if !defined.insert((import.module(), import.name())) {
                continue; // imported twice (legal Wasm, and what some toolchains emit): one definition serves both
            }
            define(&mut linker, import.module(), import.name(), func_ty.clone(), f)?;
        }
        let pre = linker.instantiate_pre(&module).map_err(|e| EngineError::InvalidModule(format!("{e}")))?;
        Ok(Arc::new(Compiled { hash: factum_proto::module_hash(bytes), pre }))
    }

    fn instantiate<'a>(
        &'a self,
        module: &'a Arc<dyn CompiledModule>,
        host: Arc<dyn GuestHost>,
        limits: Limits,
    ) -> BoxFuture<'a, Result<Box<dyn Instance>, EngineError>> {
        Box::pin(async move {
            let compiled = module
                .as_any()
                .downcast_ref::<Compiled>()
                .ok_or_else(|| EngineError::Internal("module was compiled by another engine".into()))?;
            let mut store = Store::new(
                &self.engine,
                StoreData { guest: GuestState::new(host), budget: Budget::new(limits, self.node_memory.clone()) },
            );
            store.limiter(|data| &mut data.budget);
            let internal = |e: wasmtime::Error| EngineError::Internal(format!("{e}"));
            store.fuel_async_yield_interval(Some(limits.fuel_yield_interval.max(1))).map_err(internal)?;
            store.set_fuel(limits.start_fuel).map_err(internal)?;
            let instance = match compiled.pre.instantiate_async(&mut store).await {
                Ok(instance) => instance,
                Err(e) => return Err(instantiation_error(&e, &store.data().budget, &limits)),
            };
            store.set_fuel(limits.fuel.unwrap_or(u64::MAX)).map_err(internal)?;
            let start = instance
                .get_typed_func::<(), ()>(&mut store, ENTRY_POINT)
                .map_err(|e| EngineError::InvalidModule(format!("{e}")))?;
            let handler = instance.get_typed_func::<i32, i32>(&mut store, MESSAGE_HANDLER).ok();
            let deadline = limits.handler_deadline;
            Ok(Box::new(WasmtimeInstance { store, start, handler, deadline }) as Box<dyn Instance>)
        })
    }
}

struct WasmtimeInstance {
    store: Store<StoreData>,
    start: TypedFunc<(), ()>,
    handler: Option<TypedFunc<i32, i32>>,
    deadline: std::time::Duration,
}

/// Why instantiating failed: a limit (RESOURCE_EXHAUSTED, naming it) or the module (INVALID_REQUEST).
fn instantiation_error(e: &wasmtime::Error, budget: &Budget, limits: &Limits) -> EngineError {
    if let Some(refused) = budget.refused() {
        return EngineError::ResourceExhausted(refused.to_string());
    }
    if let Some(Trap::OutOfFuel) = e.downcast_ref::<Trap>() {
        return crate::start_out_of_fuel(limits);
    }
    // wasmtime reports its count limits only as text ("resource limit exceeded: table count too high").
    let msg = format!("{e:#}");
    if msg.contains("table count") {
        crate::too_many("tables", limits.max_tables)
    } else if msg.contains("memory count") {
        crate::too_many("memories", limits.max_memories)
    } else if msg.contains("limit") || msg.contains("Cannot allocate memory") {
        // The latter: the OS refused to map the memory (address space or map count exhausted).
        EngineError::ResourceExhausted(msg)
    } else {
        EngineError::InvalidModule(msg)
    }
}

fn exit_reason(e: &wasmtime::Error) -> ExitReason {
    if let Some(GuestExit(code)) = e.downcast_ref::<GuestExit>() {
        ExitReason::Exited(*code)
    } else if let Some(Trap::OutOfFuel) = e.downcast_ref::<Trap>() {
        ExitReason::OutOfFuel
    } else if let Some(trap) = e.downcast_ref::<Trap>() {
        ExitReason::Trapped(trap.to_string())
    } else {
        ExitReason::Trapped(e.to_string())
    }
}

impl Instance for WasmtimeInstance {
    fn run(self: Box<Self>) -> BoxFuture<'static, ExitReason> {
        let WasmtimeInstance { mut store, start, handler, deadline } = *self;
        Box::pin(async move {
            let exit = run_to_end(&mut store, start, handler, deadline).await;
            store.data().budget.explain(exit)
        })
    }
}

/// `_start`, then the message handler for each message while the guest subscribes.
async fn run_to_end(
    store: &mut Store<StoreData>,
    start: TypedFunc<(), ()>,
    handler: Option<TypedFunc<i32, i32>>,
    deadline: std::time::Duration,
) -> ExitReason {
    if let Err(e) = start.call_async(&mut *store, ()).await {
        return exit_reason(&e);
    }
    let Some(handler) = handler else { return ExitReason::Exited(0) };
    let host = store.data().guest.host.clone();
    while let Some(message) = host.next_message().await {
        let len = i32::try_from(message.len()).unwrap_or(i32::MAX);
        store.data_mut().guest.last_response = message;
        let call = async { handler.call_async(&mut *store, len).await.map_err(|e| exit_reason(&e)) };
        match within_deadline(&host, deadline, call).await {
            Ok(0) => {}
            Ok(code) => return handler_failed(code),
            Err(exit) => return exit,
        }
    }
    ExitReason::Exited(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The OS refusing to map an instance's memory (address space or `vm.max_map_count` used up, as a node
    /// of ~32,000 instances with 4 GiB reservations meets) is a full node, not a bad module.
    #[test]
    fn a_refused_memory_mapping_is_resource_exhausted() {
        let e = wasmtime::Error::msg("mmap failed to reserve 0x104000000 bytes: Cannot allocate memory (os error 12)");
        let budget = Budget::new(Limits::default(), Arc::default());
        let err = instantiation_error(&e, &budget, &Limits::default());
        assert!(matches!(err, EngineError::ResourceExhausted(_)), "{err:?}");
    }
}
