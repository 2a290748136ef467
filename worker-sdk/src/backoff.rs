//! Exponential backoff with jitter for reconnecting to the broker.

use std::time::Duration;

use rand::Rng;

/// Exponential backoff with "equal jitter": each delay is drawn uniformly from
/// `[base / 2, base]`, and `base` doubles after every delay up to `max`.
///
/// The jitter keeps many workers that lost the same broker from reconnecting in step.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    initial: Duration,
    max: Duration,
    base: Duration,
}

impl Backoff {
    /// Creates a backoff whose first delay is at most `initial` and whose delays never
    /// exceed `max`. An `initial` above `max` is lowered to `max`.
    pub(crate) fn new(initial: Duration, max: Duration) -> Self {
        let initial = initial.min(max);
        Backoff {
            initial,
            max,
            base: initial,
        }
    }

    /// Returns the next delay and doubles the base for the one after.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let base = self.base;
        self.base = base.saturating_mul(2).min(self.max);

        let half = base / 2;
        let jitter = rand::rng().random_range(Duration::ZERO..=base - half);
        half + jitter
    }

    /// Starts again from the initial delay, after a connection has worked.
    pub(crate) fn reset(&mut self) {
        self.base = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INITIAL: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(10);

    #[test]
    fn delays_stay_within_bounds() {
        let mut backoff = Backoff::new(INITIAL, MAX);
        let mut base = INITIAL;

        for _ in 0..40 {
            let delay = backoff.next_delay();
            assert!(delay >= base / 2, "{delay:?} is below half of {base:?}");
            assert!(delay <= base, "{delay:?} is above {base:?}");
            assert!(delay <= MAX, "{delay:?} is above the maximum");
            base = (base * 2).min(MAX);
        }
    }

    #[test]
    fn base_reaches_max_and_stays() {
        let mut backoff = Backoff::new(INITIAL, MAX);

        // 100 ms doubled 7 times is 12.8 s, past the 10 s maximum.
        for _ in 0..8 {
            backoff.next_delay();
        }

        assert_eq!(backoff.base, MAX);
        assert!(backoff.next_delay() >= MAX / 2);
    }

    #[test]
    fn reset_returns_to_initial() {
        let mut backoff = Backoff::new(INITIAL, MAX);
        for _ in 0..5 {
            backoff.next_delay();
        }

        backoff.reset();

        assert!(backoff.next_delay() <= INITIAL);
    }

    #[test]
    fn initial_above_max_is_lowered() {
        let mut backoff = Backoff::new(Duration::from_secs(60), MAX);

        assert!(backoff.next_delay() <= MAX);
    }
}
