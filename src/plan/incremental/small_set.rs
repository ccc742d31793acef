//! The planner's set for the one or two claimants a key or a pod IP has.

/// A sorted set for the few members a key or a pod IP has (one, nearly
/// always): a `Vec` costs its element, where a `BTreeSet` allocated a whole
/// node per key — heaptrack showed 4.9 MB of the agent's heap in them at
/// 5,000 keys (BENCHMARKS.md "Latency and footprint").
#[derive(Debug)]
pub(super) struct SmallSet<T>(Vec<T>);

/// Up to this many members a [`SmallSet`] grows by one at a time.
const SMALL: usize = 4;

impl<T> Default for SmallSet<T> {
    fn default() -> Self {
        SmallSet(Vec::new())
    }
}

impl<T: Ord> SmallSet<T> {
    pub(super) fn insert(&mut self, v: T) {
        if let Err(i) = self.0.binary_search(&v) {
            // Most sets hold one or two members: a Vec's first growth
            // (to four) left 1.4 MB of empty claim slots at 5,000 keys.
            if self.0.len() == self.0.capacity() && self.0.len() < SMALL {
                self.0.reserve_exact(1);
            }
            self.0.insert(i, v);
        }
    }

    /// Whether `v` was there.
    pub(super) fn remove(&mut self, v: &T) -> bool {
        let found = self.0.binary_search(v);
        if let Ok(i) = found {
            self.0.remove(i);
        }
        found.is_ok()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<'a, T> IntoIterator for &'a SmallSet<T> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}
