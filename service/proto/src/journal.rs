//! A bounded, numbered journal read page by page after a sequence number: how an agent keeps an instance's
//! output for `factum logs` and how the control plane keeps its events for `factum events`. The oldest entries
//! go first; a reader is told how many it missed.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

/// What a [`Journal`] holds.
pub trait Entry {
    /// The number the journal gave it.
    fn seq(&self) -> u64;
    /// Roughly how many bytes it holds, for the journal's byte bound.
    fn weight(&self) -> usize;
}

/// Entries after a sequence number, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Page<T> {
    /// At most the page size asked for.
    pub entries: Vec<T>,
    /// The sequence number to ask after next (the last entry's, or the one asked after when there is none).
    pub next: u64,
    /// Entries after the one asked for that the journal no longer holds (it keeps the newest).
    pub evicted: u64,
}

impl<T> Default for Page<T> {
    fn default() -> Self {
        Page { entries: Vec::new(), next: 0, evicted: 0 }
    }
}

/// The journal: at most `max_entries` entries and `max_bytes` of weight.
#[derive(Debug)]
pub struct Journal<T> {
    entries: VecDeque<T>,
    bytes: usize,
    /// The newest entry's number (0: none yet).
    last_seq: u64,
    max_entries: usize,
    max_bytes: usize,
}

impl<T: Entry + Clone> Journal<T> {
    /// An empty journal with these bounds.
    pub fn new(max_entries: usize, max_bytes: usize) -> Self {
        Journal { entries: VecDeque::new(), bytes: 0, last_seq: 0, max_entries, max_bytes }
    }

    /// Keeps the entry `make` builds from its number, evicting the oldest while over either bound.
    pub fn push(&mut self, make: impl FnOnce(u64) -> T) {
        self.last_seq += 1;
        let entry = make(self.last_seq);
        self.bytes += entry.weight();
        self.entries.push_back(entry);
        while self.entries.len() > self.max_entries || self.bytes > self.max_bytes {
            let Some(old) = self.entries.pop_front() else { break };
            self.bytes -= old.weight();
        }
    }

    /// Up to `limit` entries after number `after`, oldest first. Asking after a number this journal never
    /// reached (its keeper restarted, or the reader moved to another keeper) starts from the beginning, so a
    /// follower is not stuck.
    pub fn page(&self, after: u64, limit: usize) -> Page<T> {
        let after = if after > self.last_seq { 0 } else { after };
        let first_held = self.entries.front().map_or(self.last_seq + 1, Entry::seq);
        let start = self.entries.partition_point(|e| e.seq() <= after);
        let entries: Vec<T> = self.entries.iter().skip(start).take(limit).cloned().collect();
        let next = entries.last().map_or(after.max(first_held.saturating_sub(1)), Entry::seq);
        Page { evicted: first_held.saturating_sub(after + 1), next, entries }
    }

    /// How many entries it holds.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The weight it holds.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    struct Line(u64, usize);

    impl Entry for Line {
        fn seq(&self) -> u64 {
            self.0
        }
        fn weight(&self) -> usize {
            self.1
        }
    }

    const MAX_ENTRIES: usize = 1_000;
    const MAX_BYTES: usize = 128 * 1024;
    const LIMIT: usize = 500;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// Whatever is written, the journal stays within its bounds, and a reader that pages from any point
        /// gets every held entry after it exactly once, in order, told how many it missed.
        #[test]
        fn pages_return_each_held_entry_once_within_the_bounds(
            weights in prop::collection::vec(0usize..600, 0..1_500),
            from in 0u64..1_600,
        ) {
            let mut journal = Journal::new(MAX_ENTRIES, MAX_BYTES);
            for weight in &weights {
                journal.push(|seq| Line(seq, *weight));
            }
            prop_assert!(journal.len() <= MAX_ENTRIES && journal.bytes() <= MAX_BYTES);
            let total = weights.len() as u64;
            let mut after = from;
            let mut seen = Vec::new();
            let mut evicted = None;
            loop {
                let page = journal.page(after, LIMIT);
                evicted.get_or_insert(page.evicted);
                if page.entries.is_empty() {
                    break;
                }
                prop_assert!(page.entries.len() <= LIMIT);
                seen.extend(page.entries.iter().map(|l| l.0));
                after = page.next;
            }
            let start = if from > total { 0 } else { from };
            let want: Vec<u64> = journal.entries.iter().map(|l| l.0).filter(|s| *s > start).collect();
            prop_assert_eq!(&seen, &want);
            let missed = want.first().map_or(total.saturating_sub(start), |first| first - start - 1);
            prop_assert_eq!(evicted, Some(missed));
        }
    }

    #[test]
    fn an_empty_journal_answers_an_empty_page() {
        let page = Journal::<Line>::new(MAX_ENTRIES, MAX_BYTES).page(0, LIMIT);
        assert_eq!((page.entries.len(), page.next, page.evicted), (0, 0, 0));
    }
}
