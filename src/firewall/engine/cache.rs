//! The cache of the last commit the applier made, and when it may be
//! trusted: the ruleset generation, or the notifications a `Tracker` read.

use std::sync::Arc;

use super::monitor::{self, Tracker};

/// The last committed kernel state. Valid while the ruleset generation has
/// not moved, or — with a `Tracker` attached (agent mode) — while every
/// commit since was read from the notifications and none touched what the
/// agent owns: kube-proxy's syncs then cost no re-read.
pub struct GenerationCache<T> {
    entry: Option<(u32, u64, T)>,
    tracker: Option<Arc<Tracker>>,
}

impl<T> Default for GenerationCache<T> {
    fn default() -> Self {
        GenerationCache {
            entry: None,
            tracker: None,
        }
    }
}

impl<T> GenerationCache<T> {
    pub fn attach(&mut self, tracker: Arc<Tracker>) {
        self.tracker = Some(tracker);
        self.entry = None;
    }

    /// Called at the start of an attempt, before the generation is read:
    /// the epoch a state read from now on belongs to.
    pub fn epoch(&self) -> u64 {
        self.tracker.as_ref().map_or(0, |t| t.catch_up())
    }

    /// Moves the entry out if it holds at `generation` (the caller sets the
    /// next one); the cache is empty afterwards either way.
    pub fn take(&mut self, generation: u32) -> Option<T> {
        let (g, epoch, value) = self.entry.take()?;
        let valid = g == generation
            || self
                .tracker
                .as_ref()
                .is_some_and(|t| t.still_valid(epoch, generation));
        valid.then_some(value)
    }

    /// Moves the entry out with the generation it holds at now, as far as
    /// the agent knows without asking the kernel: its own generation, or —
    /// with a tracker whose epoch has not moved since (`epoch`: from
    /// `epoch()` just before) — the newest commit the tracker read. A batch
    /// built on a wrong guess is refused by the kernel (ERESTART).
    pub fn take_current(&mut self, epoch: u64) -> Option<(u32, T)> {
        let (g, e, value) = self.entry.take()?;
        match &self.tracker {
            None => Some((g, value)),
            Some(t) if e == epoch => Some((t.seen().unwrap_or(g), value)),
            Some(_) => None,
        }
    }

    pub fn set(&mut self, generation: u32, epoch: u64, value: T) {
        self.entry = Some((generation, epoch, value));
    }

    pub fn clear(&mut self) {
        self.entry = None;
    }

    /// Before sending a batch built against `generation`: the generation its
    /// commit will have, remembered as the agent's own (no wake for it).
    pub fn sending(&self, generation: u32) -> u32 {
        match &self.tracker {
            Some(t) => t.expect_own(generation),
            None => monitor::next_generation(generation),
        }
    }

    /// The batch meant to produce `genid` was refused.
    pub fn refused(&self, genid: u32) {
        if let Some(t) = &self.tracker {
            t.not_own(genid);
        }
    }
}
