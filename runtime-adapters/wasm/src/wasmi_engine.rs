//! The portable engine: the wasmi interpreter. wasmi host functions are synchronous, so async host work
//! (provider calls, sleeps) and fuel-driven yields use wasmi's resumable calls: the host function returns a
//! [`PendingCall`] error, the run loop awaits the work and resumes the guest where it stopped.

use std::any::Any;
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use wasmi::{Caller, Config, Engine, Error, ExternType, Func, Linker, Module, ResumableCall, Store, Val, ValType};

use crate::abi::{self, GuestState, Outcome, Pending, Ty};
use crate::budget::Budget;
use crate::NodeMemory;
use crate::{
    handler_failed, within_deadline, CompiledModule, EngineError, ExitReason, GuestHost, Instance, Limits, WasmEngine,
    ENTRY_POINT, MESSAGE_HANDLER,
};

/// wasmi behind the [`WasmEngine`] seam.
pub struct WasmiEngine {
    engine: Engine,
    /// The node's memory, drawn on by every store this engine makes.
    node_memory: Arc<NodeMemory>,
    #[cfg(feature = "injected-bugs")]
    bug: Option<EngineBug>,
    /// With [`EngineBug::RecycledMemory`]: the linear memory each module's last run ended with, by module hash.
    #[cfg(feature = "injected-bugs")]
    recycled: Arc<Mutex<std::collections::BTreeMap<String, Vec<u8>>>>,
}

/// Bugs the simulator must catch, injected into a [`WasmiEngine`] (feature `injected-bugs`, simulation only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineBug {
    /// A new instance of a module starts with the linear memory its previous run ended with, as a pooling
    /// allocator that does not zero a recycled slot would (breaks P1: statelessness across restarts).
    RecycledMemory,
    /// `fd_write` on fd 3 reaches the host's stderr, as a WASI host that preopened a file there would (breaks
    /// P3: no side effect but through a capability).
    OpenFds,
}

struct StoreData {
    guest: GuestState,
    budget: Budget,
}

/// Raised by a host function whose work must be awaited; the run loop takes the work out and resumes.
#[derive(Debug)]
struct PendingCall(Mutex<Option<Pending>>);

impl std::fmt::Display for PendingCall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("host call pending")
    }
}

impl wasmi::errors::HostError for PendingCall {}

struct Compiled {
    hash: String,
    module: Module,
    linker: Linker<StoreData>,
}

impl CompiledModule for Compiled {
    fn hash(&self) -> &str {
        &self.hash
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl WasmiEngine {
    /// An interpreter with fuel metering on.
    pub fn new() -> Self {
        let mut config = Config::default();
        config.consume_fuel(true);
        Self {
            engine: Engine::new(&config),
            node_memory: Arc::default(),
            #[cfg(feature = "injected-bugs")]
            bug: None,
            #[cfg(feature = "injected-bugs")]
            recycled: Arc::default(),
        }
    }

    /// An interpreter with `bug` in it.
    #[cfg(feature = "injected-bugs")]
    pub fn with_injected_bug(bug: EngineBug) -> Self {
        Self { bug: Some(bug), ..Self::new() }
    }

    #[cfg(feature = "injected-bugs")]
    fn has_bug(&self, bug: EngineBug) -> bool {
        self.bug == Some(bug)
    }

    #[cfg(not(feature = "injected-bugs"))]
    fn has_bug(&self, _bug: EngineBug) -> bool {
        false
    }

    /// Where a run leaves its memory for the next instance of its module, with [`EngineBug::RecycledMemory`].
    #[cfg(feature = "injected-bugs")]
    fn recycler(&self, hash: &str) -> Option<Recycler> {
        self.has_bug(EngineBug::RecycledMemory).then(|| Recycler { pool: self.recycled.clone(), hash: hash.into() })
    }

    #[cfg(not(feature = "injected-bugs"))]
    fn recycler(&self, _hash: &str) -> Option<Recycler> {
        None
    }
}

/// A module's slot in the recycled-memory pool ([`EngineBug::RecycledMemory`]).
struct Recycler {
    pool: Arc<Mutex<std::collections::BTreeMap<String, Vec<u8>>>>,
    hash: String,
}

impl Recycler {
    fn take_into(&self, memory: Option<&mut [u8]>) {
        let pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        if let (Some(memory), Some(old)) = (memory, pool.get(&self.hash)) {
            memory.iter_mut().zip(old).for_each(|(now, before)| *now = *before);
        }
    }

    fn keep(&self, memory: Option<&mut [u8]>) {
        if let Some(memory) = memory {
            self.pool.lock().unwrap_or_else(|p| p.into_inner()).insert(self.hash.clone(), memory.to_vec());
        }
    }
}

impl WasmiEngine {
    /// The same engine with its instances drawing on `node_memory` (unlimited by default).
    pub fn with_node_memory(self, node_memory: Arc<NodeMemory>) -> Self {
        Self { node_memory, ..self }
    }
}

impl Default for WasmiEngine {
    fn default() -> Self {
        Self::new()
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
    // Same reading as the wasmtime engine: i32s as unsigned.
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

fn store_memory<'a>(
    store: &'a mut Store<StoreData>,
    instance: &wasmi::Instance,
) -> (Option<&'a mut [u8]>, &'a mut GuestState) {
    match instance.get_memory(&*store, "memory") {
        Some(memory) => {
            let (mem, data) = memory.data_and_store_mut(store);
            (Some(mem), &mut data.guest)
        }
        None => (None, &mut store.data_mut().guest),
    }
}

impl WasmEngine for WasmiEngine {
    fn name(&self) -> &'static str {
        "wasmi"
    }

    fn compile(&self, bytes: &[u8]) -> Result<Arc<dyn CompiledModule>, EngineError> {
        let module = Module::new(&self.engine, bytes).map_err(|e| EngineError::InvalidModule(format!("{e}")))?;
        let has_entry = module.exports().any(|export| {
            export.name() == ENTRY_POINT
                && matches!(export.ty(), ExternType::Func(f) if f.params().is_empty() && f.results().is_empty())
        });
        if !has_entry {
            return Err(EngineError::InvalidModule(format!("module exports no `{ENTRY_POINT}: () -> ()` function")));
        }
        let bad_handler = module.exports().any(|export| {
            export.name() == MESSAGE_HANDLER
                && !matches!(export.ty(), ExternType::Func(f)
                    if f.params().iter().map(ty).eq([Ty::I32]) && f.results().iter().map(ty).eq([Ty::I32]))
        });
        if bad_handler {
            return Err(EngineError::InvalidModule(format!("export `{MESSAGE_HANDLER}` must be (i32) -> i32")));
        }
        let mut linker = Linker::new(&self.engine);
        let open_fds = self.has_bug(EngineBug::OpenFds);
        let mut defined = std::collections::BTreeSet::new();
        for import in module.imports() {
            let ExternType::Func(func_ty) = import.ty() else {
                return Err(EngineError::InvalidModule(format!(
                    "module imports {}.{}, which is not a function; factum provides only functions",
                    import.module(),
                    import.name()
                )));
            };
            let params: Vec<Ty> = func_ty.params().iter().map(ty).collect();
            let results: Vec<Ty> = func_ty.results().iter().map(ty).collect();
            let f = abi::resolve_import(import.module(), import.name(), &params, &results)
                .map_err(EngineError::InvalidModule)?;
            if !defined.insert((import.module(), import.name())) {
                continue; // imported twice (legal Wasm, and what some toolchains emit): one definition serves both
            }
            linker
                .func_new(import.module(), import.name(), func_ty.clone(), move |mut caller, params, results| {
                    let mut args = to_args(params);
                    if let Some(fd) = args.first_mut().filter(|fd| open_fds && f == abi::HostFn::FdWrite && **fd == 3) {
                        *fd = 2;
                    }
                    let (mem, state) = memory_and_state(&mut caller);
                    match abi::dispatch(state, mem, f, &args) {
                        Outcome::Ready(v) => {
                            if let Some(slot) = results.first_mut() {
                                *slot = Val::I32(v);
                            }
                            Ok(())
                        }
                        Outcome::Exit(code) => Err(Error::i32_exit(code)),
                        Outcome::Pending(p) => Err(Error::host(PendingCall(Mutex::new(Some(p))))),
                    }
                })
                .map_err(|e| {
                    EngineError::InvalidModule(format!("cannot link import {}.{}: {e}", import.module(), import.name()))
                })?;
        }
        Ok(Arc::new(Compiled { hash: factum_proto::module_hash(bytes), module, linker }))
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
                StoreData {
                    guest: GuestState::new(host.clone()),
                    budget: Budget::new(limits, self.node_memory.clone()),
                },
            );
            store.limiter(|data| &mut data.budget);
            let internal = |e: Error| EngineError::Internal(format!("{e}"));
            store.set_fuel(limits.start_fuel).map_err(internal)?;
            let instance = match compiled.linker.instantiate_and_start(&mut store, &compiled.module) {
                Ok(instance) => instance,
                Err(e) => return Err(instantiation_error(&e, &store.data().budget, &limits)),
            };
            let first_slice = limits.fuel.map_or(limits.fuel_yield_interval, |f| f.min(limits.fuel_yield_interval));
            store.set_fuel(first_slice).map_err(internal)?;
            let start = instance
                .get_func(&store, ENTRY_POINT)
                .ok_or_else(|| EngineError::InvalidModule(format!("no `{ENTRY_POINT}` export")))?;
            let remaining = limits.fuel.map(|f| f.saturating_sub(first_slice));
            let handler = instance.get_func(&store, MESSAGE_HANDLER);
            let fuel = Fuel { limits, remaining };
            let recycler = self.recycler(&compiled.hash);
            if let Some(recycler) = &recycler {
                recycler.take_into(store_memory(&mut store, &instance).0);
            }
            Ok(Box::new(WasmiInstance { store, instance, start, handler, host, fuel, recycler }) as Box<dyn Instance>)
        })
    }
}

struct WasmiInstance {
    store: Store<StoreData>,
    instance: wasmi::Instance,
    start: Func,
    handler: Option<Func>,
    host: Arc<dyn GuestHost>,
    fuel: Fuel,
    recycler: Option<Recycler>,
}

/// The fuel budget of one run, handed to the store a slice at a time.
struct Fuel {
    limits: Limits,
    /// Fuel left in the budget after the slice currently in the store; `None` is unlimited.
    remaining: Option<u64>,
}

fn exit_reason(e: Error) -> ExitReason {
    if let Some(code) = e.i32_exit_status() {
        return ExitReason::Exited(code);
    }
    if let Some(wasmi::TrapCode::OutOfFuel) = e.as_trap_code() {
        return ExitReason::OutOfFuel;
    }
    ExitReason::Trapped(e.to_string())
}

/// Why instantiating failed: a limit (RESOURCE_EXHAUSTED, naming it) or the module (INVALID_REQUEST).
fn instantiation_error(e: &Error, budget: &Budget, limits: &Limits) -> EngineError {
    use wasmi::errors::{ErrorKind, InstantiationError as Failed};
    if let Some(refused) = budget.refused() {
        return EngineError::ResourceExhausted(refused.to_string());
    }
    match e.kind() {
        ErrorKind::TrapCode(wasmi::TrapCode::OutOfFuel) => crate::start_out_of_fuel(limits),
        ErrorKind::Instantiation(Failed::TooManyMemories) => crate::too_many("memories", limits.max_memories),
        ErrorKind::Instantiation(Failed::TooManyTables) => crate::too_many("tables", limits.max_tables),
        ErrorKind::Instantiation(
            Failed::TooManyInstances | Failed::FailedToInstantiateMemory(_) | Failed::FailedToInstantiateTable(_),
        )
        | ErrorKind::Memory(_)
        | ErrorKind::Table(_) => EngineError::ResourceExhausted(e.to_string()),
        _ => EngineError::InvalidModule(e.to_string()),
    }
}

/// Drives one resumable call to its end: refuels (yielding to the executor between slices) and performs
/// pending host calls. `outputs` receives the function's results.
async fn drive(
    store: &mut Store<StoreData>,
    instance: &wasmi::Instance,
    host: &Arc<dyn GuestHost>,
    fuel: &mut Fuel,
    mut call: Result<ResumableCall, Error>,
    outputs: &mut [Val],
) -> Result<(), ExitReason> {
    loop {
        match call {
            Err(e) => return Err(exit_reason(e)),
            Ok(ResumableCall::Finished) => return Ok(()),
            Ok(ResumableCall::OutOfFuel(out)) => {
                let slice = fuel.limits.fuel_yield_interval.max(out.required_fuel());
                let refill = match fuel.remaining {
                    None => slice,
                    Some(0) => return Err(ExitReason::OutOfFuel),
                    Some(left) => {
                        let n = left.min(slice);
                        fuel.remaining = Some(left - n);
                        n
                    }
                };
                if let Err(e) = store.set_fuel(refill) {
                    return Err(ExitReason::Trapped(e.to_string()));
                }
                tokio::task::yield_now().await;
                call = out.resume(&mut *store, outputs);
            }
            Ok(ResumableCall::HostTrap(trap)) => {
                let pending = trap
                    .host_error()
                    .downcast_ref::<PendingCall>()
                    .and_then(|p| p.0.lock().ok().and_then(|mut slot| slot.take()));
                let Some(pending) = pending else {
                    return Err(exit_reason(trap.into_host_error()));
                };
                let has_result = !trap.host_func().ty(&*store).results().is_empty();
                let done = abi::perform(host, pending).await;
                let (mem, state) = store_memory(store, instance);
                let ret = abi::complete(state, mem, done);
                let inputs = if has_result { vec![Val::I32(ret)] } else { Vec::new() };
                call = trap.resume(&mut *store, &inputs, outputs);
            }
        }
    }
}

impl Instance for WasmiInstance {
    fn run(self: Box<Self>) -> BoxFuture<'static, ExitReason> {
        let WasmiInstance { mut store, instance, start, handler, host, mut fuel, recycler } = *self;
        Box::pin(async move {
            let exit = run_to_end(&mut store, &instance, start, handler, &host, &mut fuel).await;
            if let Some(recycler) = &recycler {
                recycler.keep(store_memory(&mut store, &instance).0);
            }
            store.data().budget.explain(exit)
        })
    }
}

/// `_start`, then the message handler for each message while the guest subscribes.
async fn run_to_end(
    store: &mut Store<StoreData>,
    instance: &wasmi::Instance,
    start: Func,
    handler: Option<Func>,
    host: &Arc<dyn GuestHost>,
    fuel: &mut Fuel,
) -> ExitReason {
    let call = start.call_resumable(&mut *store, &[], &mut []);
    if let Err(exit) = drive(store, instance, host, fuel, call, &mut []).await {
        return exit;
    }
    let Some(handler) = handler else { return ExitReason::Exited(0) };
    let deadline = fuel.limits.handler_deadline;
    while let Some(message) = host.next_message().await {
        let len = i32::try_from(message.len()).unwrap_or(i32::MAX);
        store.data_mut().guest.last_response = message;
        let mut result = [Val::I32(0)];
        let call = handler.call_resumable(&mut *store, &[Val::I32(len)], &mut result);
        let driven = drive(store, instance, host, fuel, call, &mut result);
        if let Err(exit) = within_deadline(host, deadline, driven).await {
            return exit;
        }
        match result {
            [Val::I32(0)] => {}
            [Val::I32(code)] => return handler_failed(code),
            _ => return handler_failed(-1),
        }
    }
    ExitReason::Exited(0)
}
