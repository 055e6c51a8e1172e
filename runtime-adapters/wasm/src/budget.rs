//! One instance's memory budget, as a resource limiter for both engines. The engines' own `StoreLimits` cap
//! each linear memory and each table separately, so a module with many memories (multi-memory is on) or many
//! tables could hold many times the limit; this limiter charges every memory and every table element to one
//! budget per instance, and caps how many memories and tables an instance may define. What it grants is also
//! drawn from the node's pool ([`NodeMemory`]) and given back when the store is dropped.
//!
//! A refused `memory.grow` or `table.grow` returns -1 to the guest, as the Wasm spec says it may; the budget
//! remembers the refusal so that, if the guest then traps (as an allocator that cannot grow does), the crash
//! reason names the limit instead of only `unreachable`.

use std::sync::Arc;

use crate::{ExitReason, Limits, NodeMemory};

/// What one table element is charged against the memory budget: a function reference on a 64-bit host.
pub const TABLE_ELEMENT_BYTES: usize = 8;

/// The budget of one instance; kept in its store.
#[derive(Debug)]
pub(crate) struct Budget {
    limits: Limits,
    node: Arc<NodeMemory>,
    /// Bytes held by all linear memories.
    memory_bytes: usize,
    /// Elements held by all tables.
    table_elements: usize,
    /// What the last successful `memory_growing` charged, undone if the engine then fails the growth.
    last_memory_charge: usize,
    /// What the last successful `table_growing` charged.
    last_table_charge: usize,
    /// The first growth the budget refused, for the crash reason.
    refused: Option<String>,
}

impl Budget {
    pub(crate) fn new(limits: Limits, node: Arc<NodeMemory>) -> Self {
        Self {
            limits,
            node,
            memory_bytes: 0,
            table_elements: 0,
            last_memory_charge: 0,
            last_table_charge: 0,
            refused: None,
        }
    }

    /// Draws `bytes` from the node's pool, or records why not.
    fn draw(&mut self, bytes: usize, what: &str) -> bool {
        match self.node.reserve(bytes) {
            Ok(()) => true,
            Err(used) => {
                let capacity = self.node.capacity();
                self.refuse(format!(
                    "the node's memory budget of {capacity} bytes refused {what} ({used} bytes in use by all its \
                     instances)"
                ))
            }
        }
    }

    fn used_bytes(&self) -> usize {
        self.memory_bytes.saturating_add(self.table_elements.saturating_mul(TABLE_ELEMENT_BYTES))
    }

    fn refuse(&mut self, why: String) -> bool {
        self.refused.get_or_insert(why);
        false
    }

    fn memory_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> bool {
        if maximum.is_some_and(|max| desired > max) {
            // The engine fails this growth itself; charging it would leak budget.
            return false;
        }
        let extra = desired.saturating_sub(current);
        let budget = self.limits.max_memory_bytes;
        if self.used_bytes().saturating_add(extra) > budget {
            let used = self.used_bytes();
            return self.refuse(format!(
                "the instance's memory budget of {budget} bytes refused {extra} more bytes ({used} in use by its \
                 memories and tables)"
            ));
        }
        if !self.draw(extra, &format!("{extra} more bytes")) {
            return false;
        }
        self.memory_bytes += extra;
        self.last_memory_charge = extra;
        true
    }

    fn memory_grow_failed(&mut self) {
        let charge = std::mem::take(&mut self.last_memory_charge);
        self.memory_bytes = self.memory_bytes.saturating_sub(charge);
        self.node.release(charge);
    }

    fn table_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> bool {
        if maximum.is_some_and(|max| desired > max) {
            return false;
        }
        let extra = desired.saturating_sub(current);
        let cap = self.limits.max_table_elements;
        if self.table_elements.saturating_add(extra) > cap {
            let held = self.table_elements;
            return self.refuse(format!(
                "the instance's table budget of {cap} elements refused {extra} more elements ({held} held)"
            ));
        }
        let bytes = extra.saturating_mul(TABLE_ELEMENT_BYTES);
        let budget = self.limits.max_memory_bytes;
        if self.used_bytes().saturating_add(bytes) > budget {
            let used = self.used_bytes();
            return self.refuse(format!(
                "the instance's memory budget of {budget} bytes refused {extra} table elements ({used} bytes in \
                 use by its memories and tables)"
            ));
        }
        if !self.draw(bytes, &format!("{extra} table elements")) {
            return false;
        }
        self.table_elements += extra;
        self.last_table_charge = extra;
        true
    }

    fn table_grow_failed(&mut self) {
        let charge = std::mem::take(&mut self.last_table_charge);
        self.table_elements = self.table_elements.saturating_sub(charge);
        self.node.release(charge.saturating_mul(TABLE_ELEMENT_BYTES));
    }

    /// The first growth this budget refused.
    pub(crate) fn refused(&self) -> Option<&str> {
        self.refused.as_deref()
    }

    /// A crash after a refused growth names the refusal: the trap alone (often `unreachable` from an
    /// allocator) would not say why.
    pub(crate) fn explain(&self, exit: ExitReason) -> ExitReason {
        match (exit, &self.refused) {
            (ExitReason::Trapped(trap), Some(refused)) => ExitReason::Trapped(format!("{trap} after {refused}")),
            (exit, _) => exit,
        }
    }
}

impl Drop for Budget {
    fn drop(&mut self) {
        self.node.release(self.used_bytes());
    }
}

impl wasmtime::ResourceLimiter for Budget {
    fn memory_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(Budget::memory_growing(self, current, desired, maximum))
    }

    fn memory_grow_failed(&mut self, _error: wasmtime::Error) -> wasmtime::Result<()> {
        Budget::memory_grow_failed(self);
        Ok(())
    }

    fn table_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(Budget::table_growing(self, current, desired, maximum))
    }

    fn table_grow_failed(&mut self, _error: wasmtime::Error) -> wasmtime::Result<()> {
        Budget::table_grow_failed(self);
        Ok(())
    }

    fn instances(&self) -> usize {
        1
    }

    fn tables(&self) -> usize {
        self.limits.max_tables
    }

    fn memories(&self) -> usize {
        self.limits.max_memories
    }
}

impl wasmi::ResourceLimiter for Budget {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> Result<bool, wasmi_core::LimiterError> {
        Ok(Budget::memory_growing(self, current, desired, maximum))
    }

    fn memory_grow_failed(&mut self, _error: &wasmi::errors::MemoryError) -> Result<(), wasmi_core::LimiterError> {
        Budget::memory_grow_failed(self);
        Ok(())
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> Result<bool, wasmi_core::LimiterError> {
        Ok(Budget::table_growing(self, current, desired, maximum))
    }

    fn table_grow_failed(&mut self, _error: &wasmi::errors::TableError) -> Result<(), wasmi_core::LimiterError> {
        Budget::table_grow_failed(self);
        Ok(())
    }

    fn instances(&self) -> usize {
        1
    }

    fn tables(&self) -> usize {
        self.limits.max_tables
    }

    fn memories(&self) -> usize {
        self.limits.max_memories
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(max_memory_bytes: usize, max_table_elements: usize) -> Budget {
        Budget::new(Limits { max_memory_bytes, max_table_elements, ..Limits::default() }, Arc::default())
    }

    #[test]
    fn memories_and_tables_share_one_budget() {
        let mut b = budget(4 * 65536, 1_000);
        assert!(b.memory_growing(0, 2 * 65536, None));
        // A second memory draws on the same budget as the first.
        assert!(b.memory_growing(0, 65536, None));
        assert!(!b.memory_growing(65536, 3 * 65536, None));
        // 65536 bytes are left: 8,192 elements' worth, but the element cap is 1,000.
        assert!(!b.table_growing(0, 1_001, None));
        assert!(b.table_growing(0, 1_000, None));
        assert_eq!(b.used_bytes(), 3 * 65536 + 8_000);
        assert!(!b.memory_growing(0, 65536, None));
        let exit = b.explain(ExitReason::Trapped("unreachable".into()));
        assert!(matches!(&exit, ExitReason::Trapped(why) if why.contains("memory budget of 262144 bytes")), "{exit:?}");
    }

    #[test]
    fn instances_draw_from_the_node_and_give_back_when_dropped() {
        let node = Arc::new(NodeMemory::new(3 * 65536));
        let limits = Limits { max_memory_bytes: 2 * 65536, ..Limits::default() };
        let mut first = Budget::new(limits, node.clone());
        let mut second = Budget::new(limits, node.clone());
        assert!(first.memory_growing(0, 2 * 65536, None));
        assert!(!second.memory_growing(0, 2 * 65536, None), "within its own budget, but not the node's");
        assert!(second.refused().is_some_and(|why| why.contains("the node's memory budget of 196608 bytes")));
        assert!(second.memory_growing(0, 65536, None));
        assert_eq!(node.used(), 3 * 65536);
        second.memory_grow_failed();
        assert_eq!(node.used(), 2 * 65536, "a failed growth gives the node its bytes back");
        assert!(!second.table_growing(0, 8_193, None));
        assert!(second.table_growing(0, 8_192, None));
        drop(first);
        assert_eq!(node.used(), 65536, "a dropped store gives back what it held");
        drop(second);
        assert_eq!(node.used(), 0);
    }

    #[test]
    fn a_failed_growth_gives_its_charge_back() {
        let mut b = budget(2 * 65536, 10);
        assert!(b.memory_growing(0, 2 * 65536, None));
        b.memory_grow_failed();
        assert!(b.memory_growing(0, 2 * 65536, None));
        // Past the memory's own maximum: the engine fails it, so nothing is charged.
        let mut b = budget(4 * 65536, 10);
        assert!(!b.memory_growing(0, 2 * 65536, Some(65536)));
        assert_eq!(b.used_bytes(), 0);
        assert!(b.refused.is_none());
        assert!(b.table_growing(0, 10, None));
        b.table_grow_failed();
        assert!(b.table_growing(0, 10, None));
    }

    #[test]
    fn only_traps_after_a_refusal_are_explained() {
        let mut b = budget(65536, 10);
        assert_eq!(b.explain(ExitReason::Trapped("x".into())), ExitReason::Trapped("x".into()));
        assert!(!b.memory_growing(0, 2 * 65536, None));
        assert_eq!(b.explain(ExitReason::Exited(0)), ExitReason::Exited(0));
        assert_eq!(b.explain(ExitReason::OutOfFuel), ExitReason::OutOfFuel);
    }
}
