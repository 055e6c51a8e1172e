//! A map that remembers which keys were handed out for writing: how the control plane finds what changed
//! under its lock (to announce it as events) without comparing every instance on every unlock.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Deref;

/// A `BTreeMap` keyed by id whose writes go through methods that note the key. Reads go through `Deref`.
pub(crate) struct Tracked<V> {
    map: BTreeMap<String, V>,
    touched: BTreeSet<String>,
    /// The same keys, for a second reader with its own pace (see [`Tracked::take_unindexed`]).
    unindexed: BTreeSet<String>,
}

impl<V> Default for Tracked<V> {
    fn default() -> Self {
        Tracked { map: BTreeMap::new(), touched: BTreeSet::new(), unindexed: BTreeSet::new() }
    }
}

impl<V: std::fmt::Debug> std::fmt::Debug for Tracked<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.map.fmt(f)
    }
}

impl<V> Deref for Tracked<V> {
    type Target = BTreeMap<String, V>;
    fn deref(&self) -> &Self::Target {
        &self.map
    }
}

impl<V> Tracked<V> {
    pub(crate) fn get_mut(&mut self, key: &str) -> Option<&mut V> {
        if !self.map.contains_key(key) {
            return None;
        }
        self.note(key);
        self.map.get_mut(key)
    }

    pub(crate) fn insert(&mut self, key: String, value: V) -> Option<V> {
        self.note(&key);
        self.map.insert(key, value)
    }

    pub(crate) fn remove(&mut self, key: &str) -> Option<V> {
        let value = self.map.remove(key)?;
        self.note(key);
        Some(value)
    }

    /// Notes every key: the caller may write any value.
    pub(crate) fn iter_mut(&mut self) -> std::collections::btree_map::IterMut<'_, String, V> {
        self.touched.extend(self.map.keys().cloned());
        self.unindexed.extend(self.map.keys().cloned());
        self.map.iter_mut()
    }

    /// Notes every key: the caller may write any value.
    pub(crate) fn values_mut(&mut self) -> std::collections::btree_map::ValuesMut<'_, String, V> {
        self.touched.extend(self.map.keys().cloned());
        self.unindexed.extend(self.map.keys().cloned());
        self.map.values_mut()
    }

    /// The keys written (inserted, changed or removed) since the last call.
    pub(crate) fn take_touched(&mut self) -> BTreeSet<String> {
        std::mem::take(&mut self.touched)
    }

    /// The keys written since the last call of this one: [`take_touched`](Self::take_touched)'s, for an index
    /// that is brought up to date when it is read rather than when the lock is released.
    pub(crate) fn take_unindexed(&mut self) -> BTreeSet<String> {
        std::mem::take(&mut self.unindexed)
    }

    fn note(&mut self, key: &str) {
        self.touched.insert(key.to_string());
        self.unindexed.insert(key.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_write_is_noted_once_and_reads_are_not() {
        let mut map = Tracked::default();
        map.insert("a".to_string(), 1);
        map.insert("b".to_string(), 2);
        assert_eq!(map.take_touched(), ["a".to_string(), "b".to_string()].into());
        assert_eq!(map.get("a"), Some(&1));
        assert!(map.get_mut("zz").is_none() && map.remove("zz").is_none());
        assert!(map.take_touched().is_empty());
        *map.get_mut("a").unwrap() = 3;
        map.remove("b");
        assert_eq!(map.take_touched(), ["a".to_string(), "b".to_string()].into());
        map.values_mut().for_each(|v| *v += 1);
        assert_eq!(map.take_touched(), ["a".to_string()].into());
        assert_eq!(map.get("a"), Some(&4));
        assert_eq!(map.take_unindexed(), ["a".to_string(), "b".to_string()].into(), "read at its own pace");
        assert!(map.take_unindexed().is_empty());
    }
}
