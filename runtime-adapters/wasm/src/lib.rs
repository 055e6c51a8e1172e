//! The WasmEngine seam: compile a module once, instantiate it with per-instance limits, run it as a future
//! that can be dropped to stop it. Two engines sit behind it: [`WasmtimeEngine`] (Cranelift, production) and
//! [`WasmiEngine`] (an interpreter: portable, and cheap to run thousands of times in simulation). Both meter
//! fuel and yield to the executor every [`Limits::fuel_yield_interval`] units, so a guest in a busy loop
//! neither blocks its thread nor escapes StopInstance, and both run the same guest ABI ([`abi`]).

pub mod abi;
mod budget;
mod cache;
pub mod fixtures;
mod node_memory;
mod wasmi_engine;
mod wasmtime_engine;

use std::any::Any;
use std::sync::Arc;

use factum_proto::ErrorResponse;
use futures::future::BoxFuture;

pub use abi::GuestHost;
pub use budget::TABLE_ELEMENT_BYTES;
pub use cache::{CachedModule, ModuleCache};
pub use node_memory::NodeMemory;
pub use wasmi_engine::{EngineBug, WasmiEngine};
pub use wasmtime_engine::{Reservation, WasmtimeEngine};

/// Resource limits of one instance (wasmtime `StoreLimits`-style: explicit, per instance, documented).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most bytes one instance holds across all its linear memories and tables (each table element counts
    /// [`TABLE_ELEMENT_BYTES`]); a `memory.grow` or `table.grow` beyond returns -1, and a module whose initial
    /// sizes do not fit is RESOURCE_EXHAUSTED.
    pub max_memory_bytes: usize,
    /// Most table elements one instance holds across all its tables.
    pub max_table_elements: usize,
    /// Most linear memories one instance may define (multi-memory is on).
    pub max_memories: usize,
    /// Most tables one instance may define.
    pub max_tables: usize,
    /// Fuel that instantiating may use: a module's `start` section runs to its end before the instance exists,
    /// so it needs a bound of its own. More is RESOURCE_EXHAUSTED. Not counted against [`Limits::fuel`].
    pub start_fuel: u64,
    /// Total fuel for one run; `None` runs until the guest ends or is stopped. Running out is a crash.
    pub fuel: Option<u64>,
    /// Fuel between two yields to the executor.
    pub fuel_yield_interval: u64,
    /// Longest one call of the message handler may take, on the host's clock (host calls and sleeps
    /// included); longer is a crash naming the deadline, so one message cannot hold the instance's queue.
    pub handler_deadline: std::time::Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_memory_bytes: 64 * 1024 * 1024,
            max_table_elements: 100_000,
            max_memories: 4,
            max_tables: 16,
            start_fuel: 10_000_000,
            fuel: None,
            fuel_yield_interval: 100_000,
            handler_deadline: std::time::Duration::from_secs(60),
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// `_start` returned, or the guest called `proc_exit(code)`.
    Exited(i32),
    /// A trap: unreachable, out-of-bounds access, stack overflow, a failed host call.
    Trapped(String),
    /// The fuel budget ran out.
    OutOfFuel,
}

impl ExitReason {
    /// Whether this counts as a crash for restart policies: anything but a clean exit 0.
    pub fn is_crash(&self) -> bool {
        !matches!(self, ExitReason::Exited(0))
    }

    /// One line for status facts and logs.
    pub fn describe(&self) -> String {
        match self {
            ExitReason::Exited(code) => format!("exited with code {code}"),
            ExitReason::Trapped(why) => format!("trapped: {why}"),
            ExitReason::OutOfFuel => "ran out of fuel".to_string(),
        }
    }
}

/// Why compiling or instantiating failed; maps onto the design's error codes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// The bytes are not a valid module, or it needs imports or exports factum does not provide.
    #[error("invalid module: {0}")]
    InvalidModule(String),
    /// A limit was hit while instantiating (memory, instances).
    #[error("resource limit: {0}")]
    ResourceExhausted(String),
    /// Anything else.
    #[error("engine error: {0}")]
    Internal(String),
}

impl From<EngineError> for ErrorResponse {
    fn from(e: EngineError) -> Self {
        use factum_proto::ErrorCode;
        let code = match e {
            EngineError::InvalidModule(_) => ErrorCode::InvalidRequest,
            EngineError::ResourceExhausted(_) => ErrorCode::ResourceExhausted,
            EngineError::Internal(_) => ErrorCode::InternalError,
        };
        ErrorResponse::new(code, e.to_string())
    }
}

/// A compiled module, ready to instantiate many times.
pub trait CompiledModule: Send + Sync + 'static {
    /// Hex SHA-256 of the bytes it was compiled from.
    fn hash(&self) -> &str;
    /// For the engine that made it.
    fn as_any(&self) -> &dyn Any;
}

/// A Wasm engine.
pub trait WasmEngine: Send + Sync + 'static {
    /// Short name, e.g. `wasmtime`.
    fn name(&self) -> &'static str;
    /// Validates and compiles; checks every import against the guest ABI.
    fn compile(&self, bytes: &[u8]) -> Result<Arc<dyn CompiledModule>, EngineError>;
    /// Creates an instance with fresh memory: nothing survives from earlier instances of the module (P1).
    fn instantiate<'a>(
        &'a self,
        module: &'a Arc<dyn CompiledModule>,
        host: Arc<dyn GuestHost>,
        limits: Limits,
    ) -> BoxFuture<'a, Result<Box<dyn Instance>, EngineError>>;
}

/// An instantiated module.
pub trait Instance: Send {
    /// Runs `_start` to its end. Dropping the future stops the guest at its next yield point.
    fn run(self: Box<Self>) -> BoxFuture<'static, ExitReason>;
}

/// The name of the entry point factum calls.
pub const ENTRY_POINT: &str = "_start";

/// The optional export through which a subscribed guest receives messages: `(len: i32) -> i32`. When `_start`
/// returns (not `proc_exit`) and the module exports it, the run goes on serving messages: each one is a
/// MessagePack [`factum_proto::MessageEnvelope`] of `len` bytes, read with `factum.response_read`. Returning 0
/// means handled; anything else, or a trap, is a crash.
pub const MESSAGE_HANDLER: &str = "factum_on_message";

/// Instantiating ran the module's `start` section past [`Limits::start_fuel`].
fn start_out_of_fuel(limits: &Limits) -> EngineError {
    EngineError::ResourceExhausted(format!(
        "the module's start section ran past its fuel budget of {} while instantiating",
        limits.start_fuel
    ))
}

/// The module defines more memories or tables than an instance may have.
fn too_many(what: &str, max: usize) -> EngineError {
    EngineError::ResourceExhausted(format!("the module defines more {what} than the {max} an instance may have"))
}

/// Why a message handler's failure ended a run.
fn handler_failed(code: i32) -> ExitReason {
    ExitReason::Trapped(format!("{MESSAGE_HANDLER} returned {code}"))
}

/// Runs one handler call against its deadline on the host's clock: past it, the call is dropped (which stops
/// the guest at its next yield, as StopInstance does) and the run ends as a crash.
async fn within_deadline<T>(
    host: &Arc<dyn GuestHost>,
    deadline: std::time::Duration,
    call: impl std::future::Future<Output = Result<T, ExitReason>>,
) -> Result<T, ExitReason> {
    let call = std::pin::pin!(call);
    match futures::future::select(call, host.sleep(deadline)).await {
        futures::future::Either::Left((result, _)) => result,
        futures::future::Either::Right(((), _)) => {
            Err(ExitReason::Trapped(format!("{MESSAGE_HANDLER} ran past its deadline of {deadline:?} on one message")))
        }
    }
}
