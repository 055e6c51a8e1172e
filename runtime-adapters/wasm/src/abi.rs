//! The guest ABI, shared by every engine: a WASI preview 1 subset with no filesystem and no sockets, plus the
//! `factum` module through which an instance reaches its capabilities. See `guests/ABI.md`.
//!
//! Engines only move values in and out; what each import means lives here, once, working on the guest's
//! linear memory as a byte slice. A host call either finishes at once ([`Outcome::Ready`]), ends the guest
//! ([`Outcome::Exit`]) or needs to wait for the host ([`Outcome::Pending`]): the engine awaits
//! [`perform`] and then calls [`complete`], so async host work (a provider call, a sleep on the env clock)
//! never blocks a thread and a simulated run stays deterministic.

use std::sync::Arc;
use std::time::Duration;

use factum_proto::capability::{MAX_OPERATION_LEN, MAX_PARAMS_BYTES};
use factum_proto::{validate_id, CapabilityResponse, ErrorCode, ErrorResponse, MAX_ID_LEN};
use futures::future::BoxFuture;

/// Import module of the WASI subset.
pub const WASI_MODULE: &str = "wasi_snapshot_preview1";
/// Import module of factum's own calls.
pub const FACTUM_MODULE: &str = "factum";

/// WASI errno values used here.
pub mod errno {
    /// Success.
    pub const SUCCESS: i32 = 0;
    /// Bad file descriptor (every fd but 0, 1, 2).
    pub const BADF: i32 = 8;
    /// A pointer or length outside linear memory.
    pub const FAULT: i32 = 21;
    /// Invalid argument.
    pub const INVAL: i32 = 28;
    /// Function not supported by factum.
    pub const NOSYS: i32 = 52;
    /// Operation not supported (poll on fds).
    pub const NOTSUP: i32 = 58;
    /// Seek on a stream.
    pub const SPIPE: i32 = 70;
}

/// What the engine needs from the node agent while a guest runs.
pub trait GuestHost: Send + Sync + 'static {
    /// Runs one capability invocation for this instance; returns a MessagePack [`CapabilityResponse`].
    /// Permission checks happen here, at call time.
    fn invoke(&self, capability_id: String, operation: String, params: Vec<u8>) -> BoxFuture<'static, Vec<u8>>;
    /// Sleeps on the env clock.
    fn sleep(&self, d: Duration) -> BoxFuture<'static, ()>;
    /// Wall-clock nanoseconds since the Unix epoch.
    fn wall_nanos(&self) -> u64;
    /// Monotonic nanoseconds since the host started.
    fn monotonic_nanos(&self) -> u64;
    /// Fills `buf` from the env's randomness.
    fn fill_random(&self, buf: &mut [u8]);
    /// Guest output on fd 1 or 2.
    fn write_output(&self, fd: u32, bytes: &[u8]);
    /// The guest's `argv`, `argv[0]` first; asked once, when the instance is made.
    fn argv(&self) -> Vec<String> {
        Vec::new()
    }
    /// The guest's environment as `NAME=value` strings; asked once, when the instance is made.
    fn environ(&self) -> Vec<String> {
        Vec::new()
    }
    /// The next message for the guest's `factum_on_message` export (a MessagePack envelope), waiting for one;
    /// `None` once the instance holds no subscriptions, which ends the run cleanly. Asked only after `_start`
    /// returned; asking again means the previous message was handled.
    fn next_message(&self) -> BoxFuture<'static, Option<Vec<u8>>> {
        Box::pin(async { None })
    }
}

/// Per-instance state the ABI keeps between calls.
pub struct GuestState {
    /// The host.
    pub host: Arc<dyn GuestHost>,
    /// The response to the last `factum.invoke`, read back by `factum.response_read`.
    pub last_response: Vec<u8>,
    /// `argv` as `args_get` copies it: C strings.
    argv: Vec<Vec<u8>>,
    /// The environment as `environ_get` copies it: C strings.
    environ: Vec<Vec<u8>>,
}

impl GuestState {
    /// Fresh state for one instance.
    pub fn new(host: Arc<dyn GuestHost>) -> Self {
        let c_strings = |list: Vec<String>| {
            list.into_iter()
                .map(|s| {
                    let mut bytes = s.into_bytes();
                    bytes.push(0);
                    bytes
                })
                .collect()
        };
        let (argv, environ) = (c_strings(host.argv()), c_strings(host.environ()));
        Self { host, last_response: Vec::new(), argv, environ }
    }
}

/// A Wasm value type as far as the ABI cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ty {
    /// i32.
    I32,
    /// i64.
    I64,
    /// Anything else (floats, references, vectors).
    Other,
}

/// A host function the ABI provides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostFn {
    /// `args_get`.
    ArgsGet,
    /// `args_sizes_get`.
    ArgsSizesGet,
    /// `environ_get`.
    EnvironGet,
    /// `environ_sizes_get`.
    EnvironSizesGet,
    /// `clock_res_get`.
    ClockResGet,
    /// `clock_time_get`.
    ClockTimeGet,
    /// `fd_write`.
    FdWrite,
    /// `fd_read`: stdin is empty.
    FdRead,
    /// `fd_close`.
    FdClose,
    /// `fd_fdstat_get`.
    FdFdstatGet,
    /// `fd_prestat_get`: no preopened directories.
    FdPrestatGet,
    /// `fd_seek`.
    FdSeek,
    /// `proc_exit`.
    ProcExit,
    /// `random_get`.
    RandomGet,
    /// `sched_yield`.
    SchedYield,
    /// `poll_oneoff`: clock subscriptions only (sleep).
    PollOneoff,
    /// Any other WASI p1 function returning an errno: answers NOSYS.
    Unsupported,
    /// `factum.invoke`.
    Invoke,
    /// `factum.response_read`.
    ResponseRead,
}

/// Resolves an import to the host function serving it, checking its signature. The error says which import
/// cannot be served; the engine turns it into INVALID_REQUEST at compile time.
pub fn resolve_import(module: &str, name: &str, params: &[Ty], results: &[Ty]) -> Result<HostFn, String> {
    use Ty::{I32, I64};
    let (f, want_params, want_results): (HostFn, &[Ty], &[Ty]) = match (module, name) {
        (WASI_MODULE, "args_get") => (HostFn::ArgsGet, &[I32, I32], &[I32]),
        (WASI_MODULE, "args_sizes_get") => (HostFn::ArgsSizesGet, &[I32, I32], &[I32]),
        (WASI_MODULE, "environ_get") => (HostFn::EnvironGet, &[I32, I32], &[I32]),
        (WASI_MODULE, "environ_sizes_get") => (HostFn::EnvironSizesGet, &[I32, I32], &[I32]),
        (WASI_MODULE, "clock_res_get") => (HostFn::ClockResGet, &[I32, I32], &[I32]),
        (WASI_MODULE, "clock_time_get") => (HostFn::ClockTimeGet, &[I32, I64, I32], &[I32]),
        (WASI_MODULE, "fd_write") => (HostFn::FdWrite, &[I32, I32, I32, I32], &[I32]),
        (WASI_MODULE, "fd_read") => (HostFn::FdRead, &[I32, I32, I32, I32], &[I32]),
        (WASI_MODULE, "fd_close") => (HostFn::FdClose, &[I32], &[I32]),
        (WASI_MODULE, "fd_fdstat_get") => (HostFn::FdFdstatGet, &[I32, I32], &[I32]),
        (WASI_MODULE, "fd_prestat_get") => (HostFn::FdPrestatGet, &[I32, I32], &[I32]),
        (WASI_MODULE, "fd_seek") => (HostFn::FdSeek, &[I32, I64, I32, I32], &[I32]),
        (WASI_MODULE, "proc_exit") => (HostFn::ProcExit, &[I32], &[]),
        (WASI_MODULE, "random_get") => (HostFn::RandomGet, &[I32, I32], &[I32]),
        (WASI_MODULE, "sched_yield") => (HostFn::SchedYield, &[], &[I32]),
        (WASI_MODULE, "poll_oneoff") => (HostFn::PollOneoff, &[I32, I32, I32, I32], &[I32]),
        (WASI_MODULE, _) if results == [I32] && params.iter().all(|t| *t != Ty::Other) => {
            return Ok(HostFn::Unsupported)
        }
        (FACTUM_MODULE, "invoke") => (HostFn::Invoke, &[I32, I32, I32, I32, I32, I32], &[I32]),
        (FACTUM_MODULE, "response_read") => (HostFn::ResponseRead, &[I32, I32], &[I32]),
        _ => return Err(format!("module imports {module}.{name}, which factum does not provide")),
    };
    if params != want_params || results != want_results {
        return Err(format!("import {module}.{name} has signature {params:?} -> {results:?}, expected {want_params:?} -> {want_results:?}"));
    }
    Ok(f)
}

/// What a host call asks of the engine.
#[derive(Debug)]
pub enum Outcome {
    /// Return this value (or nothing, for functions without results).
    Ready(i32),
    /// The guest called `proc_exit` with this code.
    Exit(i32),
    /// Await [`perform`], then [`complete`].
    Pending(Pending),
}

/// Host work a call waits for.
#[derive(Debug)]
pub enum Pending {
    /// A capability invocation.
    Invoke {
        /// Capability id.
        capability_id: String,
        /// Operation.
        operation: String,
        /// MessagePack params.
        params: Vec<u8>,
    },
    /// A sleep from `poll_oneoff`; the event is written when it ends.
    Sleep {
        /// How long.
        duration: Duration,
        /// Subscription userdata to echo.
        userdata: u64,
        /// Where the event goes.
        events_ptr: u32,
        /// Where the event count goes.
        nevents_ptr: u32,
    },
    /// `sched_yield`: let other tasks run.
    Yield,
}

/// The result of [`Pending`] work.
#[derive(Debug)]
pub enum Completed {
    /// Response bytes of an invocation.
    Invoke(Vec<u8>),
    /// The sleep ended.
    Sleep {
        /// Subscription userdata to echo.
        userdata: u64,
        /// Where the event goes.
        events_ptr: u32,
        /// Where the event count goes.
        nevents_ptr: u32,
    },
    /// The yield ended.
    Yield,
}

/// Runs the async part of a host call.
pub async fn perform(host: &Arc<dyn GuestHost>, pending: Pending) -> Completed {
    match pending {
        Pending::Invoke { capability_id, operation, params } => {
            Completed::Invoke(host.invoke(capability_id, operation, params).await)
        }
        Pending::Sleep { duration, userdata, events_ptr, nevents_ptr } => {
            host.sleep(duration).await;
            Completed::Sleep { userdata, events_ptr, nevents_ptr }
        }
        Pending::Yield => {
            host.sleep(Duration::ZERO).await;
            Completed::Yield
        }
    }
}

/// Memory-access failure: the guest passed a pointer or length outside its memory.
#[derive(Debug)]
struct Fault;

fn slice(mem: &[u8], ptr: i64, len: i64) -> Result<&[u8], Fault> {
    let start = usize::try_from(ptr).map_err(|_| Fault)?;
    let len = usize::try_from(len).map_err(|_| Fault)?;
    mem.get(start..start.checked_add(len).ok_or(Fault)?).ok_or(Fault)
}

fn slice_mut(mem: &mut [u8], ptr: i64, len: usize) -> Result<&mut [u8], Fault> {
    let start = usize::try_from(ptr).map_err(|_| Fault)?;
    mem.get_mut(start..start.checked_add(len).ok_or(Fault)?).ok_or(Fault)
}

fn write_u32(mem: &mut [u8], ptr: i64, v: u32) -> Result<(), Fault> {
    slice_mut(mem, ptr, 4)?.copy_from_slice(&v.to_le_bytes());
    Ok(())
}

fn write_u64(mem: &mut [u8], ptr: i64, v: u64) -> Result<(), Fault> {
    slice_mut(mem, ptr, 8)?.copy_from_slice(&v.to_le_bytes());
    Ok(())
}

fn read_u32(mem: &[u8], ptr: i64) -> Result<u32, Fault> {
    let b: [u8; 4] = slice(mem, ptr, 4)?.try_into().map_err(|_| Fault)?;
    Ok(u32::from_le_bytes(b))
}

fn read_u64(mem: &[u8], ptr: i64) -> Result<u64, Fault> {
    let b: [u8; 8] = slice(mem, ptr, 8)?.try_into().map_err(|_| Fault)?;
    Ok(u64::from_le_bytes(b))
}

fn read_u8(mem: &[u8], ptr: i64) -> Result<u8, Fault> {
    slice(mem, ptr, 1)?.first().copied().ok_or(Fault)
}

/// `args_sizes_get` / `environ_sizes_get`: how many strings, and how many bytes they take with their NULs.
fn list_sizes(mem: &mut [u8], list: &[Vec<u8>], count_ptr: i64, size_ptr: i64) -> Result<i32, Fault> {
    let size: usize = list.iter().map(Vec::len).sum();
    write_u32(mem, count_ptr, u32::try_from(list.len()).map_err(|_| Fault)?)?;
    write_u32(mem, size_ptr, u32::try_from(size).map_err(|_| Fault)?)?;
    Ok(errno::SUCCESS)
}

/// `args_get` / `environ_get`: the strings back to back from `buf_ptr`, a pointer to each from `ptrs_ptr`.
fn list_get(mem: &mut [u8], list: &[Vec<u8>], ptrs_ptr: i64, buf_ptr: i64) -> Result<i32, Fault> {
    let mut at = buf_ptr;
    for (i, s) in list.iter().enumerate() {
        let slot = ptrs_ptr.checked_add(i64::try_from(i * 4).map_err(|_| Fault)?).ok_or(Fault)?;
        write_u32(mem, slot, u32::try_from(at).map_err(|_| Fault)?)?;
        slice_mut(mem, at, s.len())?.copy_from_slice(s);
        at = at.checked_add(i64::try_from(s.len()).map_err(|_| Fault)?).ok_or(Fault)?;
    }
    Ok(errno::SUCCESS)
}

fn arg(args: &[i64], i: usize) -> i64 {
    args.get(i).copied().unwrap_or(0)
}

/// Size of one `poll_oneoff` subscription record.
const SUBSCRIPTION_SIZE: i64 = 48;
/// Size of one `poll_oneoff` event record.
const EVENT_SIZE: usize = 32;

/// Runs the synchronous part of host function `f` with integer `args` against the guest's memory (`None` when
/// the module exports no memory).
pub fn dispatch(state: &mut GuestState, mem: Option<&mut [u8]>, f: HostFn, args: &[i64]) -> Outcome {
    let mut empty: [u8; 0] = [];
    let mem = mem.unwrap_or(&mut empty);
    match dispatch_inner(state, mem, f, args) {
        Ok(outcome) => outcome,
        Err(Fault) => match f {
            HostFn::Invoke | HostFn::ResponseRead => Outcome::Ready(-errno::FAULT),
            _ => Outcome::Ready(errno::FAULT),
        },
    }
}

fn dispatch_inner(state: &mut GuestState, mem: &mut [u8], f: HostFn, args: &[i64]) -> Result<Outcome, Fault> {
    let host = &state.host;
    let ready = |e: i32| Ok(Outcome::Ready(e));
    match f {
        HostFn::ArgsGet => ready(list_get(mem, &state.argv, arg(args, 0), arg(args, 1))?),
        HostFn::ArgsSizesGet => ready(list_sizes(mem, &state.argv, arg(args, 0), arg(args, 1))?),
        HostFn::EnvironGet => ready(list_get(mem, &state.environ, arg(args, 0), arg(args, 1))?),
        HostFn::EnvironSizesGet => ready(list_sizes(mem, &state.environ, arg(args, 0), arg(args, 1))?),
        HostFn::ClockResGet => {
            write_u64(mem, arg(args, 1), 1_000)?;
            ready(errno::SUCCESS)
        }
        HostFn::ClockTimeGet => {
            let now = match arg(args, 0) {
                0 => host.wall_nanos(),
                1..=3 => host.monotonic_nanos(),
                _ => return ready(errno::INVAL),
            };
            write_u64(mem, arg(args, 2), now)?;
            ready(errno::SUCCESS)
        }
        HostFn::FdWrite => {
            let fd = arg(args, 0);
            if fd != 1 && fd != 2 {
                return ready(errno::BADF);
            }
            let (iovs, iovs_len) = (arg(args, 1), arg(args, 2));
            let mut written: u32 = 0;
            for i in 0..iovs_len.clamp(0, 1024) {
                let ptr = read_u32(mem, iovs + i * 8)?;
                let len = read_u32(mem, iovs + i * 8 + 4)?;
                host.write_output(fd as u32, slice(mem, i64::from(ptr), i64::from(len))?);
                written = written.saturating_add(len);
            }
            write_u32(mem, arg(args, 3), written)?;
            ready(errno::SUCCESS)
        }
        HostFn::FdRead => {
            if arg(args, 0) != 0 {
                return ready(errno::BADF);
            }
            write_u32(mem, arg(args, 3), 0)?;
            ready(errno::SUCCESS)
        }
        HostFn::FdClose => ready(if (0..=2).contains(&arg(args, 0)) { errno::SUCCESS } else { errno::BADF }),
        HostFn::FdFdstatGet => {
            if !(0..=2).contains(&arg(args, 0)) {
                return ready(errno::BADF);
            }
            // fdstat: filetype u8 (2 = character device), flags u16, rights u64 x2.
            let out = slice_mut(mem, arg(args, 1), 24)?;
            out.fill(0);
            if let Some(filetype) = out.first_mut() {
                *filetype = 2;
            }
            ready(errno::SUCCESS)
        }
        HostFn::FdPrestatGet => ready(errno::BADF),
        HostFn::FdSeek => ready(if (0..=2).contains(&arg(args, 0)) { errno::SPIPE } else { errno::BADF }),
        HostFn::ProcExit => Ok(Outcome::Exit(arg(args, 0) as i32)),
        HostFn::RandomGet => {
            let len = usize::try_from(arg(args, 1)).map_err(|_| Fault)?;
            host.fill_random(slice_mut(mem, arg(args, 0), len)?);
            ready(errno::SUCCESS)
        }
        HostFn::SchedYield => Ok(Outcome::Pending(Pending::Yield)),
        HostFn::PollOneoff => poll_oneoff(host, mem, args),
        HostFn::Unsupported => ready(errno::NOSYS),
        HostFn::Invoke => invoke(state, mem, args),
        HostFn::ResponseRead => {
            let n = state.last_response.len().min(usize::try_from(arg(args, 1)).unwrap_or(0));
            let src = state.last_response.get(..n).unwrap_or(&[]);
            slice_mut(mem, arg(args, 0), n)?.copy_from_slice(src);
            ready(i32::try_from(n).unwrap_or(i32::MAX))
        }
    }
}

fn poll_oneoff(host: &Arc<dyn GuestHost>, mem: &mut [u8], args: &[i64]) -> Result<Outcome, Fault> {
    let (subs, events_ptr, nsubs, nevents_ptr) = (arg(args, 0), arg(args, 1), arg(args, 2), arg(args, 3));
    if nsubs <= 0 {
        return Ok(Outcome::Ready(errno::INVAL));
    }
    let mut earliest: Option<(Duration, u64)> = None;
    for i in 0..nsubs.min(64) {
        let base = subs + i * SUBSCRIPTION_SIZE;
        let userdata = read_u64(mem, base)?;
        let tag = read_u8(mem, base + 8)?;
        if tag != 0 {
            return Ok(Outcome::Ready(errno::NOTSUP));
        }
        let clock_id = read_u32(mem, base + 16)?;
        let timeout = read_u64(mem, base + 24)?;
        let absolute = read_u8(mem, base + 40)? & 1 == 1;
        let wait = if absolute {
            let now = if clock_id == 0 { host.wall_nanos() } else { host.monotonic_nanos() };
            timeout.saturating_sub(now)
        } else {
            timeout
        };
        let wait = Duration::from_nanos(wait);
        if earliest.is_none_or(|(d, _)| wait < d) {
            earliest = Some((wait, userdata));
        }
    }
    let Some((duration, userdata)) = earliest else { return Ok(Outcome::Ready(errno::INVAL)) };
    // Check the output area now so a bad pointer faults before the sleep, not after.
    slice_mut(mem, events_ptr, EVENT_SIZE)?;
    slice_mut(mem, nevents_ptr, 4)?;
    Ok(Outcome::Pending(Pending::Sleep {
        duration,
        userdata,
        events_ptr: events_ptr as u32,
        nevents_ptr: nevents_ptr as u32,
    }))
}

fn invoke(state: &mut GuestState, mem: &mut [u8], args: &[i64]) -> Result<Outcome, Fault> {
    let capability_id = slice(mem, arg(args, 0), arg(args, 1))?;
    let operation = slice(mem, arg(args, 2), arg(args, 3))?;
    let params_len = arg(args, 5);
    let refuse = |state: &mut GuestState, err: ErrorResponse| {
        state.last_response = CapabilityResponse::err(&err).encode();
        Ok(Outcome::Ready(i32::try_from(state.last_response.len()).unwrap_or(i32::MAX)))
    };
    if usize::try_from(params_len).map_or(true, |n| n > MAX_PARAMS_BYTES) {
        let msg = format!("invocation params of {params_len} bytes are above the {MAX_PARAMS_BYTES}-byte limit");
        return refuse(state, ErrorResponse::new(ErrorCode::ResourceExhausted, msg));
    }
    if operation.len() > MAX_OPERATION_LEN {
        return refuse(state, ErrorResponse::invalid("operation name too long"));
    }
    // Checked before anything is copied: ids are short, and an id no grant can hold needs no lookup.
    if capability_id.len() > MAX_ID_LEN {
        let msg = format!("capability id of {} bytes is longer than {MAX_ID_LEN}", capability_id.len());
        return refuse(state, ErrorResponse::invalid(msg));
    }
    let params = slice(mem, arg(args, 4), params_len)?.to_vec();
    let (Ok(capability_id), Ok(operation)) = (std::str::from_utf8(capability_id), std::str::from_utf8(operation))
    else {
        return refuse(state, ErrorResponse::invalid("capability id and operation must be UTF-8"));
    };
    if let Err(bad) = validate_id("capability id", capability_id) {
        return refuse(state, bad);
    }
    Ok(Outcome::Pending(Pending::Invoke {
        capability_id: capability_id.to_string(),
        operation: operation.to_string(),
        params,
    }))
}

/// Finishes a host call after [`perform`]: writes results into guest memory and returns the value for the
/// guest.
pub fn complete(state: &mut GuestState, mem: Option<&mut [u8]>, done: Completed) -> i32 {
    let mut empty: [u8; 0] = [];
    let mem = mem.unwrap_or(&mut empty);
    match done {
        Completed::Invoke(response) => {
            state.last_response = response;
            i32::try_from(state.last_response.len()).unwrap_or(i32::MAX)
        }
        Completed::Sleep { userdata, events_ptr, nevents_ptr } => {
            let write = |mem: &mut [u8]| -> Result<(), Fault> {
                slice_mut(mem, i64::from(events_ptr), EVENT_SIZE)?.fill(0);
                write_u64(mem, i64::from(events_ptr), userdata)?;
                write_u32(mem, i64::from(nevents_ptr), 1)
            };
            match write(mem) {
                Ok(()) => errno::SUCCESS,
                Err(Fault) => errno::FAULT,
            }
        }
        Completed::Yield => errno::SUCCESS,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ready(outcome: Outcome) -> i32 {
        match outcome {
            Outcome::Ready(v) => v,
            other => panic!("expected a ready value, got {other:?}"),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Feature: wasm-orchestrator, Property 3: Capability-Mediated Side Effects
        /// No file descriptor but stdout/stderr can be written, none but stdin read, no directory is preopened,
        /// and every other WASI call (files, sockets) is NOSYS: a guest's only way out is `factum.invoke`.
        #[test]
        fn no_os_access_outside_capabilities(fd in 3i64..100_000, args in prop::collection::vec(0i64..4096, 8)) {
            let mut state = GuestState::new(Arc::new(crate::fixtures::IdleHost));
            let mut mem = vec![0u8; 8192];
            let mut call = |f: HostFn, a: &[i64]| ready(dispatch(&mut state, Some(&mut mem), f, a));
            prop_assert_eq!(call(HostFn::FdWrite, &[fd, 0, 1, 16]), errno::BADF);
            prop_assert_eq!(call(HostFn::FdRead, &[fd, 0, 1, 16]), errno::BADF);
            prop_assert_eq!(call(HostFn::FdPrestatGet, &[fd, 0]), errno::BADF);
            prop_assert_eq!(call(HostFn::FdPrestatGet, &[3, 0]), errno::BADF);
            prop_assert_eq!(call(HostFn::Unsupported, &args), errno::NOSYS);
        }

        /// Out-of-bounds pointers from a guest are EFAULT (or -EFAULT for factum calls), never a host panic.
        #[test]
        fn wild_pointers_fault(ptr in 8193i64..i64::from(u32::MAX), len in 0i64..i64::from(u32::MAX)) {
            let mut state = GuestState::new(Arc::new(crate::fixtures::IdleHost));
            let mut mem = vec![0u8; 8192];
            let mut call = |f: HostFn, a: &[i64]| ready(dispatch(&mut state, Some(&mut mem), f, a));
            prop_assert_eq!(call(HostFn::ClockTimeGet, &[0, 0, ptr]), errno::FAULT);
            prop_assert_eq!(call(HostFn::RandomGet, &[ptr, len.max(1)]), errno::FAULT);
            prop_assert_eq!(call(HostFn::Invoke, &[ptr, len.max(1), 0, 1, 0, 1]), -errno::FAULT);
            prop_assert_eq!(call(HostFn::ResponseRead, &[ptr, 0]), -errno::FAULT);
        }
    }

    /// An idle host with a command line and environment.
    struct Configured(Vec<String>, Vec<String>);

    impl GuestHost for Configured {
        fn invoke(&self, _: String, _: String, _: Vec<u8>) -> BoxFuture<'static, Vec<u8>> {
            Box::pin(async { Vec::new() })
        }
        fn sleep(&self, _: Duration) -> BoxFuture<'static, ()> {
            Box::pin(async {})
        }
        fn wall_nanos(&self) -> u64 {
            0
        }
        fn monotonic_nanos(&self) -> u64 {
            0
        }
        fn fill_random(&self, _: &mut [u8]) {}
        fn write_output(&self, _: u32, _: &[u8]) {}
        fn argv(&self) -> Vec<String> {
            self.0.clone()
        }
        fn environ(&self) -> Vec<String> {
            self.1.clone()
        }
    }

    /// Reads back what `*_sizes_get` and `*_get` wrote, the way wasi-libc does.
    fn read_list(mem: &mut [u8], state: &mut GuestState, sizes: HostFn, get: HostFn, at: i64) -> Vec<String> {
        assert_eq!(ready(dispatch(state, Some(mem), sizes, &[at, at + 4])), errno::SUCCESS);
        let count = read_u32(mem, at).unwrap();
        let size = read_u32(mem, at + 4).unwrap();
        let (ptrs, buf) = (at + 8, at + 8 + 4 * i64::from(count));
        assert_eq!(ready(dispatch(state, Some(mem), get, &[ptrs, buf])), errno::SUCCESS);
        let strings: Vec<String> = (0..i64::from(count))
            .map(|i| {
                let start = usize::try_from(read_u32(mem, ptrs + 4 * i).unwrap()).unwrap();
                let len = mem[start..].iter().position(|b| *b == 0).unwrap();
                String::from_utf8(mem[start..start + len].to_vec()).unwrap()
            })
            .collect();
        assert_eq!(strings.iter().map(|s| s.len() + 1).sum::<usize>(), size as usize);
        strings
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// A guest reads back exactly the command line and environment it was started with, wherever in its
        /// memory it asks for them; a buffer that does not fit is EFAULT, never a partial write past memory.
        #[test]
        fn args_and_environ_read_back_as_given(
            argv in prop::collection::vec("[^\\x00]{0,12}", 0..6),
            environ in prop::collection::vec("[A-Z]{1,4}=[^\\x00]{0,8}", 0..6),
            at in 0i64..2048,
        ) {
            let mut state = GuestState::new(Arc::new(Configured(argv.clone(), environ.clone())));
            let mut mem = vec![0u8; 4096];
            prop_assert_eq!(read_list(&mut mem, &mut state, HostFn::ArgsSizesGet, HostFn::ArgsGet, at), argv);
            prop_assert_eq!(read_list(&mut mem, &mut state, HostFn::EnvironSizesGet, HostFn::EnvironGet, at), environ);
            let mut small = vec![0u8; 64];
            let end = i64::try_from(small.len()).unwrap();
            let total: usize = state.argv.iter().map(Vec::len).sum();
            let fits = ready(dispatch(&mut state, Some(&mut small), HostFn::ArgsGet, &[0, end - 1]));
            prop_assert_eq!(fits, if total <= 1 { errno::SUCCESS } else { errno::FAULT });
        }
    }

    #[test]
    fn capability_ids_are_checked_before_they_are_copied() {
        let mut state = GuestState::new(Arc::new(crate::fixtures::IdleHost));
        let mut mem = vec![b'k'; 8192];
        mem[50] = b'\n';
        let mut refusal = |len: i64| {
            let n = ready(dispatch(&mut state, Some(&mut mem), HostFn::Invoke, &[0, len, 0, 3, 0, 0]));
            assert!(n > 0, "refusals are a response, not an errno");
            CapabilityResponse::decode(&state.last_response).unwrap().error.unwrap()
        };
        let long = refusal(4096);
        assert_eq!(long.code, ErrorCode::InvalidRequest);
        assert!(long.message.contains("4096 bytes"), "{}", long.message);
        // A short id with a newline in it never reaches the host (nor its audit log).
        assert_eq!(refusal(101).code, ErrorCode::InvalidRequest);
    }

    #[test]
    fn unknown_modules_and_bad_signatures_are_refused() {
        assert!(resolve_import("env", "abort", &[], &[]).is_err());
        assert!(resolve_import(WASI_MODULE, "fd_write", &[Ty::I32], &[Ty::I32]).is_err());
        assert_eq!(resolve_import(WASI_MODULE, "path_open", &[Ty::I32; 9], &[Ty::I32]), Ok(HostFn::Unsupported));
        assert_eq!(resolve_import(WASI_MODULE, "sock_accept", &[Ty::I32; 3], &[Ty::I32]), Ok(HostFn::Unsupported));
    }
}
