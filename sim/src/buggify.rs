//! BUGGIFY for factum: the simulation's [`Faults`]. Each named fault point is switched on or off for the whole
//! run when first reached (half of them, by the seed), and an enabled point fires 5% of the times it is
//! reached. Counting reaches and firings shows which fault paths a run or a sweep covered.

use std::collections::BTreeMap;
use std::sync::Mutex;

use factum_env::Faults;
use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};

/// Reaches and firings of one fault point.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PointCoverage {
    /// Whether this run enabled the point.
    pub enabled: bool,
    /// Times product code reached it.
    pub reached: u64,
    /// Times it fired.
    pub fired: u64,
}

/// Seeded fault injection with coverage counters.
#[derive(Debug)]
pub struct Buggify {
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    rng: ChaCha8Rng,
    points: BTreeMap<&'static str, PointCoverage>,
    /// Points that fire every time they are reached.
    forced: Vec<&'static str>,
}

impl Buggify {
    /// Fault injection driven by `seed`.
    pub fn new(seed: u64) -> Self {
        let rng = ChaCha8Rng::seed_from_u64(seed ^ 0xb066);
        Self { inner: Mutex::new(Inner { rng, points: BTreeMap::new(), forced: Vec::new() }) }
    }

    /// This fault injection with `point` firing every time it is reached: for a test that needs a rare fault
    /// often, to show a check catches the bug that fault exposes.
    pub fn always(self, point: &'static str) -> Self {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).forced.push(point);
        self
    }

    /// Coverage of every point reached so far.
    pub fn coverage(&self) -> BTreeMap<String, PointCoverage> {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.points.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }
}

impl Faults for Buggify {
    fn fire(&self, point: &'static str) -> bool {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let Inner { rng, points, forced } = &mut *inner;
        let entry = points
            .entry(point)
            .or_insert_with(|| PointCoverage { enabled: rng.next_u64() % 2 == 0, ..Default::default() });
        entry.reached += 1;
        let fires = entry.enabled && rng.next_u64() % 100 < 5 || forced.contains(&point);
        if fires {
            entry.fired += 1;
        }
        fires
    }
}
