//! A simulated machine's clock (drift, wall-clock steps), shared by the processes a simulated host runs, on
//! either simulation backend.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;

use crate::{Clock, Env};

/// A simulated machine's clock, shared by every process that host runs: its rate against true simulated time
/// (drift) and steps of its wall clock (an operator or NTP setting the time). Processes read it through the
/// [`Clock`] that [`Env::with_machine_clock`] installs.
pub struct MachineClock {
    wall_origin: SystemTime,
    state: std::sync::Mutex<MachineState>,
}

#[derive(Clone, Copy)]
struct MachineState {
    /// Since `anchor_true` (simulated time since the start of the run), machine time runs at `rate` from
    /// `anchor_machine`.
    anchor_true: f64,
    anchor_machine: f64,
    rate: f64,
    /// Sum of wall-clock steps, in seconds (negative: set back).
    wall_steps: f64,
}

impl MachineClock {
    /// A machine whose clock starts at `wall_origin` when the run starts, at `rate` (1.0: true time).
    pub fn new(wall_origin: SystemTime, rate: f64) -> Arc<Self> {
        let state = MachineState { anchor_true: 0.0, anchor_machine: 0.0, rate, wall_steps: 0.0 };
        Arc::new(Self { wall_origin, state: std::sync::Mutex::new(state) })
    }

    /// From simulated time `at` on, the clock runs at `rate` (without a jump: machine time is continuous).
    pub fn set_rate(&self, at: Duration, rate: f64) {
        let mut state = self.lock();
        let machine = state.machine_at(at.as_secs_f64());
        *state = MachineState { anchor_true: at.as_secs_f64(), anchor_machine: machine, rate, ..*state };
    }

    /// Steps the wall clock by `seconds` (negative: back). Monotonic time is untouched, as on a real machine.
    pub fn step_wall(&self, seconds: f64) {
        self.lock().wall_steps += seconds;
    }

    /// Its wall clock at `since_start` of simulated time into the run: what any process on the machine reads
    /// then.
    pub fn wall_at(&self, since_start: Duration) -> SystemTime {
        let state = *self.lock();
        let secs = state.machine_at(since_start.as_secs_f64()) + state.wall_steps;
        if secs >= 0.0 {
            self.wall_origin + Duration::from_secs_f64(secs)
        } else {
            self.wall_origin - Duration::from_secs_f64(-secs)
        }
    }

    /// Its rate now.
    pub fn rate(&self) -> f64 {
        self.lock().rate
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MachineState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl MachineState {
    fn machine_at(&self, true_secs: f64) -> f64 {
        self.anchor_machine + (true_secs - self.anchor_true) * self.rate
    }
}

/// One process's view of its [`MachineClock`]: monotonic time counts machine time from the process's start.
struct ProcessClock {
    machine: Arc<MachineClock>,
    /// The backend's own clock (true simulated time) and its reading at the process's start, with simulated time
    /// since the run began then: true time now is `started_true` plus what `base` counted since.
    base: Arc<dyn Clock>,
    base_at_start: Duration,
    started_true: Duration,
    started_machine: f64,
}

impl ProcessClock {
    fn true_now(&self) -> f64 {
        (self.started_true + self.base.now().saturating_sub(self.base_at_start)).as_secs_f64()
    }
}

impl Clock for ProcessClock {
    fn now(&self) -> Duration {
        let machine = self.machine.lock().machine_at(self.true_now());
        Duration::from_secs_f64((machine - self.started_machine).max(0.0))
    }

    fn wall(&self) -> SystemTime {
        self.machine.wall_at(Duration::from_secs_f64(self.true_now()))
    }

    fn sleep(&self, d: Duration) -> BoxFuture<'static, ()> {
        // d of machine time at the rate now; a rate change mid-sleep moves the wake-up, as on a real machine.
        let rate = self.machine.rate().max(f64::MIN_POSITIVE);
        self.base.sleep(d.div_f64(rate))
    }
}

impl Env {
    /// The same env, reading time from `machine` over the env's own (true simulated) clock. Call it inside the
    /// simulated host, as the process starts.
    pub fn with_machine_clock(mut self, machine: &Arc<MachineClock>) -> Self {
        let started_true = crate::sim_elapsed().unwrap_or_default();
        let started_machine = machine.lock().machine_at(started_true.as_secs_f64());
        let base_at_start = self.clock.now();
        self.clock = Arc::new(ProcessClock {
            machine: machine.clone(),
            base: self.clock,
            base_at_start,
            started_true,
            started_machine,
        });
        self
    }
}
