//! The one debouncer: a burst of triggers ends `debounce` after the last
//! one, but never later than `max_delay` after the first, so constant churn
//! cannot starve whoever waits for the burst to end (the reconcile loop, the
//! address watcher).

use std::time::Duration;

use tokio::time::Instant;

/// When a burst of triggers is over: `debounce` after the last one, but never
/// later than `max_delay` after the first, so constant churn cannot starve
/// the loop.
#[derive(Clone, Copy, Debug)]
pub struct Coalescer {
    debounce: Duration,
    max_delay: Duration,
    first: Instant,
    last: Instant,
}

impl Coalescer {
    pub fn new(now: Instant, debounce: Duration, max_delay: Duration) -> Coalescer {
        Coalescer {
            debounce,
            max_delay,
            first: now,
            last: now,
        }
    }

    pub fn poke(&mut self, now: Instant) {
        self.last = now;
    }

    pub fn deadline(&self) -> Instant {
        (self.last + self.debounce).min(self.first + self.max_delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coalescer_waits_for_quiet_but_never_past_the_bound() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut c = Coalescer::new(t0, ms(20), ms(200));
        assert_eq!(c.deadline(), t0 + ms(20));
        c.poke(t0 + ms(15));
        assert_eq!(c.deadline(), t0 + ms(35));
        // A trigger every 10 ms forever: the burst still ends at 200 ms.
        for i in 0..100 {
            c.poke(t0 + ms(10 * i));
            assert!(c.deadline() <= t0 + ms(200));
        }
        assert_eq!(c.deadline(), t0 + ms(200));
    }
}
