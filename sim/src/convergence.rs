//! What `eventually` means in a scenario: once the last step is done, the check must come to hold for a
//! whole [`SETTLE`] window no later than its deadline, and from then on it must never stay broken for longer
//! than [`REPAIR`]. A cluster that converges once and then falls apart has not converged; but an instance that
//! crashes after the last step is a fact on its way to the control plane, not a divergence, so a break that
//! the next reports repair is allowed.

use std::time::Duration;

/// How long a check must hold without a break before the cluster counts as settled on it.
pub const SETTLE: Duration = Duration::from_secs(1);

/// Longest a settled check may stay broken: a few heartbeats, so any fact reaches the control plane.
pub const REPAIR: Duration = Duration::from_secs(2);

/// Where one `eventually` check stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Convergence {
    /// Not holding (or not yet asked).
    #[default]
    Waiting,
    /// Holding since this time, not yet for a whole window.
    Holding(Duration),
    /// Settled; if it is broken now, since when.
    Settled(Option<Duration>),
}

impl Convergence {
    /// Folds in one sample at `now`; an error says the settled check stayed broken too long.
    pub fn sample(&mut self, now: Duration, result: Result<(), String>) -> Result<(), String> {
        *self = match (*self, result) {
            (Convergence::Waiting, Ok(())) => Convergence::Holding(now),
            (Convergence::Waiting | Convergence::Holding(_), Err(_)) => Convergence::Waiting,
            (Convergence::Holding(since), Ok(())) if now >= since + SETTLE => Convergence::Settled(None),
            (Convergence::Holding(since), Ok(())) => Convergence::Holding(since),
            (Convergence::Settled(_), Ok(())) => Convergence::Settled(None),
            (Convergence::Settled(None), Err(_)) => Convergence::Settled(Some(now)),
            (Convergence::Settled(Some(broken)), Err(e)) if now > broken + REPAIR => {
                let (broken, now) = (broken.as_secs_f64(), now.as_secs_f64());
                return Err(format!("settled, then broken from {broken:.3}s to {now:.3}s: {e}"));
            }
            (Convergence::Settled(Some(broken)), Err(_)) => Convergence::Settled(Some(broken)),
        };
        Ok(())
    }

    /// Whether the check has settled.
    pub fn settled(&self) -> bool {
        matches!(self, Convergence::Settled(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn run(samples: &[(u64, bool)]) -> (Convergence, Result<(), String>) {
        let mut c = Convergence::default();
        for (at, ok) in samples {
            let result = if *ok { Ok(()) } else { Err("broken".to_string()) };
            if let Err(e) = c.sample(ms(*at), result) {
                return (c, Err(e));
            }
        }
        (c, Ok(()))
    }

    #[test]
    fn holding_once_is_not_settling() {
        let (c, r) = run(&[(0, true), (500, false), (600, true)]);
        assert!(r.is_ok());
        assert_eq!(c, Convergence::Holding(ms(600)));
        assert!(!c.settled());
    }

    #[test]
    fn a_break_that_is_repaired_in_time_is_allowed() {
        let (c, r) = run(&[(0, true), (1000, true), (1500, false), (3400, false), (3450, true)]);
        assert!(r.is_ok());
        assert!(c.settled());
    }

    #[test]
    fn a_settled_check_that_stays_broken_fails() {
        let (_, r) = run(&[(0, true), (1000, true), (1500, false), (3000, false), (3550, false)]);
        assert!(r.unwrap_err().contains("from 1.500s to 3.550s"));
    }
}
