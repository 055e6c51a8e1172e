//! The run's trace: every recorded event, stamped with simulated time, folded into a SHA-256.

use std::sync::Mutex;

use factum_env::Trace;
use sha2::{Digest, Sha256};

/// Trace of one simulated run. Events arrive in the order turmoil runs hosts, which is a function of the seed,
/// so the hash is too.
#[derive(Default)]
pub struct TraceLog {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    hasher: Sha256,
    lines: Vec<String>,
}

impl TraceLog {
    /// Hex digest of everything recorded so far.
    pub fn hash(&self) -> String {
        hex::encode(self.lock().hasher.clone().finalize())
    }

    /// Number of events.
    pub fn len(&self) -> usize {
        self.lock().lines.len()
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The readable timeline.
    pub fn lines(&self) -> Vec<String> {
        self.lock().lines.clone()
    }

    /// The lines recorded after the first `start`.
    pub fn lines_from(&self, start: usize) -> Vec<String> {
        self.lock().lines.get(start..).map(<[String]>::to_vec).unwrap_or_default()
    }

    /// Records an action of the simulation driver (a fault it injected) at simulated time `at` (the driver runs
    /// outside every host, where the simulator has no clock to read).
    pub fn record_driver(&self, at: std::time::Duration, event: &str) {
        self.push(at, "driver", event);
    }

    fn push(&self, at: std::time::Duration, component: &str, event: &str) {
        let line = format!("{:>10.3}s {component:<14} {event}", at.as_secs_f64());
        let mut inner = self.lock();
        inner.hasher.update(line.as_bytes());
        inner.hasher.update(b"\n");
        inner.lines.push(line);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Trace for TraceLog {
    fn record(&self, component: &str, event: String) {
        self.push(factum_env::sim_elapsed().unwrap_or_default(), component, &event);
    }
}

/// The words of one timeline line (`<time>s <component> <event> <args>…`): its component, its event word and
/// the words after it; `None` for a line without an event.
pub(crate) fn event_words(line: &str) -> Option<(&str, &str, Vec<&str>)> {
    let mut words = line.split_whitespace().skip(1);
    let component = words.next()?;
    let event = words.next()?;
    Some((component, event, words.collect()))
}
