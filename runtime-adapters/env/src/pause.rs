//! Pausing a process in simulation: a gate every task of a host is spawned behind.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use futures::future::BoxFuture;

use crate::{Env, Rng, SeededRng, Spawn};

/// Freezes a simulated process (SIGSTOP): while paused, no task spawned through an env built
/// [`with_pause`](Env::with_pause) is polled, so none of its timers fire and it reads nothing from the network,
/// while the rest of the simulation (and its clock) goes on. On resume every frozen task is woken at once, in an
/// order drawn from the seed, and finds its timers long past due: the fault the fencing argument must survive.
pub struct Pause {
    state: Mutex<PauseState>,
}

struct PauseState {
    paused: bool,
    frozen: Vec<Waker>,
    rng: SeededRng,
}

impl Pause {
    /// A running (not paused) process whose wake-up order is drawn from `seed`.
    pub fn new(seed: u64) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(PauseState { paused: false, frozen: Vec::new(), rng: SeededRng::new(seed) }),
        })
    }

    /// Freezes the process.
    pub fn pause(&self) {
        self.lock().paused = true;
    }

    /// Thaws it: every frozen task is woken, in a seeded random order.
    pub fn resume(&self) {
        let mut frozen = {
            let mut state = self.lock();
            state.paused = false;
            let mut frozen = std::mem::take(&mut state.frozen);
            // Fisher–Yates from the seed: which task runs first after a thaw is up to the scheduler.
            for i in (1..frozen.len()).rev() {
                let j = (state.rng.next_u64() % (i as u64 + 1)) as usize;
                frozen.swap(i, j);
            }
            frozen
        };
        for waker in frozen.drain(..) {
            waker.wake();
        }
    }

    /// Whether the process is frozen now.
    pub fn is_paused(&self) -> bool {
        self.lock().paused
    }

    /// `f`, polled only while the process is not paused.
    pub fn gate<F: Future>(self: &Arc<Self>, f: F) -> Gated<F> {
        Gated { pause: self.clone(), inner: Box::pin(f) }
    }

    fn lock(&self) -> MutexGuard<'_, PauseState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A future that does not run while its process is paused (see [`Pause::gate`]).
pub struct Gated<F> {
    pause: Arc<Pause>,
    inner: Pin<Box<F>>,
}

impl<F: Future> Future for Gated<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        {
            let mut state = self.pause.lock();
            if state.paused {
                state.frozen.push(cx.waker().clone());
                return Poll::Pending;
            }
        }
        self.inner.as_mut().poll(cx)
    }
}

/// Spawns through another spawner, every task gated by a [`Pause`].
struct PausedSpawn {
    pause: Arc<Pause>,
    inner: Arc<dyn Spawn>,
}

impl Spawn for PausedSpawn {
    fn spawn(&self, f: BoxFuture<'static, ()>) {
        self.inner.spawn(Box::pin(self.pause.gate(f)));
    }

    fn offload(&self, work: Box<dyn FnOnce() + Send>) {
        self.inner.offload(work);
    }
}

impl Env {
    /// The same env, with every task it spawns frozen while `pause` is paused. The process's root future must
    /// be wrapped in [`Pause::gate`] too.
    pub fn with_pause(mut self, pause: Arc<Pause>) -> Self {
        self.spawner = Arc::new(PausedSpawn { pause, inner: self.spawner });
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(start_paused = true)]
    async fn a_paused_task_runs_nothing_until_resumed_and_then_finds_its_timer_overdue() {
        let pause = Pause::new(1);
        let ticks = Arc::new(AtomicUsize::new(0));
        let counter = ticks.clone();
        let task = tokio::spawn(pause.gate(async move {
            loop {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                counter.fetch_add(1, Ordering::SeqCst);
            }
        }));
        tokio::time::sleep(std::time::Duration::from_millis(35)).await;
        assert_eq!(ticks.load(Ordering::SeqCst), 3);
        pause.pause();
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert_eq!(ticks.load(Ordering::SeqCst), 3, "nothing runs while paused");
        pause.resume();
        tokio::task::yield_now().await;
        assert_eq!(ticks.load(Ordering::SeqCst), 4, "the overdue timer fires once on resume");
        task.abort();
    }
}
