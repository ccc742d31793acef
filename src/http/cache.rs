//! A small, bounded, time-limited map of review answers, so that a scraper
//! asking every 15 s costs the apiserver one TokenReview and one
//! SubjectAccessReview per lifetime instead of two reviews per scrape.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// How long an answer is reused, by what it said.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lifetimes {
    /// A valid token, an allowed path: two minutes, the kubelet's
    /// `--authentication-token-webhook-cache-ttl` default. A revoked token
    /// or a removed RoleBinding takes effect within that.
    pub yes: Duration,
    /// An invalid token, a denied path: ten seconds, so that a credential
    /// or binding just fixed works almost at once, while a client retrying
    /// a bad one in a loop still costs one review per ten seconds.
    pub no: Duration,
}

pub const LIFETIMES: Lifetimes = Lifetimes {
    yes: Duration::from_secs(120),
    no: Duration::from_secs(10),
};

/// Entries per cache: far more than the scrapers of one node (each token and
/// each token×path is one entry), few enough that a flood of made-up tokens
/// cannot grow the agent's memory (each costs a review anyway).
pub const CAPACITY: usize = 1024;

/// Answers by key, each until its own deadline.
#[derive(Debug)]
pub(crate) struct ReviewCache<K, V> {
    entries: HashMap<K, (V, Instant)>,
    capacity: usize,
}

impl<K: Hash + Eq + Clone, V: Clone> ReviewCache<K, V> {
    pub(crate) fn new(capacity: usize) -> Self {
        ReviewCache {
            entries: HashMap::new(),
            capacity: capacity.max(1),
        }
    }

    /// The answer for `key` while it is still valid at `now`.
    pub(crate) fn get(&mut self, key: &K, now: Instant) -> Option<V> {
        match self.entries.get(key) {
            Some((v, until)) if now < *until => Some(v.clone()),
            Some(_) => {
                self.entries.remove(key);
                None
            }
            None => None,
        }
    }

    /// Keeps `value` until `now + ttl`. When full, expired answers go
    /// first, then the one that would expire soonest.
    pub(crate) fn insert(&mut self, key: K, value: V, now: Instant, ttl: Duration) {
        if self.entries.len() >= self.capacity && !self.entries.contains_key(&key) {
            self.entries.retain(|_, (_, until)| now < *until);
            if self.entries.len() >= self.capacity {
                let soonest = self
                    .entries
                    .iter()
                    .min_by_key(|(_, (_, until))| *until)
                    .map(|(k, _)| k.clone());
                if let Some(k) = soonest {
                    self.entries.remove(&k);
                }
            }
        }
        self.entries.insert(key, (value, now + ttl));
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_expire_and_the_size_stays_bounded() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut c = ReviewCache::new(2);
        c.insert("a", true, t0, s(10));
        assert_eq!(c.get(&"a", t0 + s(9)), Some(true));
        assert_eq!(c.get(&"a", t0 + s(10)), None, "expired at its deadline");
        c.insert("a", true, t0, s(100));
        c.insert("b", false, t0, s(5));
        // Full: "b" would expire first, so it makes room for "c".
        c.insert("c", true, t0, s(50));
        assert_eq!(c.len(), 2);
        assert_eq!(c.get(&"b", t0), None);
        assert_eq!(c.get(&"a", t0), Some(true));
        // Expired entries are dropped before anything valid.
        c.insert("d", true, t0 + s(60), s(50));
        assert_eq!(c.get(&"a", t0 + s(60)), Some(true));
        assert_eq!(c.get(&"c", t0 + s(60)), None);
        // Replacing a key never evicts another.
        c.insert("a", false, t0 + s(60), s(50));
        assert_eq!(c.get(&"d", t0 + s(60)), Some(true));
        assert_eq!(c.get(&"a", t0 + s(60)), Some(false));
    }
}
