//! The node's memory: one pool every instance's memories and tables draw from, beside each instance's own
//! budget. Per-instance budgets alone bound a node only at `instances × budget`; this pool bounds the sum, so
//! a start whose initial memory does not fit is refused (RESOURCE_EXHAUSTED) and a growth that does not fit
//! fails like one over the instance's budget, while the instances already running keep what they hold.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Bytes the instances of one node may hold together, shared by every store an engine makes.
#[derive(Debug)]
pub struct NodeMemory {
    capacity: usize,
    used: AtomicUsize,
}

impl NodeMemory {
    /// A pool of `capacity` bytes.
    pub fn new(capacity: usize) -> Self {
        Self { capacity, used: AtomicUsize::new(0) }
    }

    /// A pool that refuses nothing.
    pub fn unlimited() -> Self {
        Self::new(usize::MAX)
    }

    /// Its size in bytes.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes held now by all instances.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::SeqCst)
    }

    /// Takes `bytes` if they fit; else the bytes held now.
    pub(crate) fn reserve(&self, bytes: usize) -> Result<(), usize> {
        self.used
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |used| {
                used.checked_add(bytes).filter(|total| *total <= self.capacity)
            })
            .map(|_| ())
    }

    /// Gives back `bytes` taken with [`NodeMemory::reserve`].
    pub(crate) fn release(&self, bytes: usize) {
        let _ = self.used.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |used| Some(used.saturating_sub(bytes)));
    }
}

impl Default for NodeMemory {
    fn default() -> Self {
        Self::unlimited()
    }
}
