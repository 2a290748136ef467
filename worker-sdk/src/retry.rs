//! The retry policy of one task.

use std::time::Duration;

use docket_proto::v1;

/// Exponential backoff between the failed attempts of a task, set with
/// [`Task::retry_policy`](crate::Task::retry_policy).
///
/// The delay before attempt `n + 1` is `initial * multiplier^(n - 1)`, at most `max`, then
/// shortened by a random fraction of up to `jitter` so that tasks that failed together do
/// not come back together. A task without a policy takes its queue's policy, which
/// defaults to 1 s, doubling, at most 10 minutes, with a jitter of 0.2.
///
/// The broker checks the values when the task is enqueued: both delays from 0 to 1 day
/// with `max >= initial`, a multiplier from 1.0 to 10.0, and a jitter from 0.0 to 1.0.
///
/// ```
/// use std::time::Duration;
///
/// use docket::{RetryPolicy, Task};
///
/// // 5 s, 15 s, 45 s, 135 s, then every 5 minutes, each up to 10 % shorter.
/// let policy = RetryPolicy::exponential(Duration::from_secs(5), Duration::from_secs(300))
///     .multiplier(3.0)
///     .jitter(0.1);
/// let task = Task::new("reports", "render")
///     .max_attempts(8)
///     .retry_policy(policy);
/// # let _ = task;
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    initial: Duration,
    max: Duration,
    multiplier: f64,
    jitter: f64,
}

impl RetryPolicy {
    /// Creates a policy whose delays start at `initial` and double up to `max`, with a
    /// jitter of 0.2.
    pub fn exponential(initial: Duration, max: Duration) -> Self {
        RetryPolicy {
            initial,
            max,
            multiplier: 2.0,
            jitter: 0.2,
        }
    }

    /// Creates a policy that waits `delay` before every retry, without jitter.
    pub fn fixed(delay: Duration) -> Self {
        RetryPolicy {
            initial: delay,
            max: delay,
            multiplier: 1.0,
            jitter: 0.0,
        }
    }

    /// Sets the growth factor of the delay per failed attempt, from 1.0 to 10.0.
    #[must_use]
    pub fn multiplier(mut self, multiplier: f64) -> Self {
        self.multiplier = multiplier;
        self
    }

    /// Sets the largest fraction, from 0.0 to 1.0, by which a delay is randomly shortened.
    #[must_use]
    pub fn jitter(mut self, jitter: f64) -> Self {
        self.jitter = jitter;
        self
    }

    /// Returns the delay after the first failed attempt.
    pub fn initial_backoff(&self) -> Duration {
        self.initial
    }

    /// Returns the longest delay.
    pub fn max_backoff(&self) -> Duration {
        self.max
    }

    /// Returns the wire message.
    pub fn to_proto(&self) -> v1::RetryPolicy {
        v1::RetryPolicy {
            initial_backoff: Some(proto_duration(self.initial)),
            multiplier: self.multiplier,
            max_backoff: Some(proto_duration(self.max)),
            jitter: self.jitter,
        }
    }
}

impl From<RetryPolicy> for v1::RetryPolicy {
    fn from(policy: RetryPolicy) -> Self {
        policy.to_proto()
    }
}

/// Converts a duration into its wire form. A duration beyond the wire range, about
/// 292 billion years, becomes the largest wire value, which the broker rejects by name.
fn proto_duration(duration: Duration) -> prost_types::Duration {
    prost_types::Duration::try_from(duration).unwrap_or(prost_types::Duration {
        seconds: i64::MAX,
        nanos: 999_999_999,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exponential_policy_has_the_documented_defaults() {
        let policy = RetryPolicy::exponential(Duration::from_millis(250), Duration::from_secs(60))
            .to_proto();

        assert_eq!(
            policy.initial_backoff,
            Some(prost_types::Duration {
                seconds: 0,
                nanos: 250_000_000
            })
        );
        assert_eq!(
            policy.max_backoff,
            Some(prost_types::Duration {
                seconds: 60,
                nanos: 0
            })
        );
        assert_eq!(policy.multiplier, 2.0);
        assert_eq!(policy.jitter, 0.2);
    }

    #[test]
    fn fixed_policy_repeats_one_delay() {
        let policy = RetryPolicy::fixed(Duration::from_secs(3))
            .jitter(0.5)
            .to_proto();

        assert_eq!(policy.initial_backoff, policy.max_backoff);
        assert_eq!(policy.multiplier, 1.0);
        assert_eq!(policy.jitter, 0.5);
    }

    #[test]
    fn out_of_range_duration_saturates() {
        let policy = RetryPolicy::fixed(Duration::MAX).to_proto();

        assert_eq!(
            policy.max_backoff.map(|duration| duration.seconds),
            Some(i64::MAX)
        );
    }
}
