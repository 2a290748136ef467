//! Retry backoff: exponential delays with random jitter.

use std::time::Duration;

use docket_proto::storage::RetryPolicyRecord;
use docket_proto::v1;
use rand::Rng;

use crate::error::BrokerError;

/// Maximum delay that a retry policy or a Nack may request.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(24 * 60 * 60);

/// Largest growth factor of a retry policy.
pub const MAX_MULTIPLIER: f64 = 10.0;

/// Exponential backoff between attempts.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Delay after the first failed attempt.
    pub initial_backoff: Duration,
    /// Growth factor per failed attempt, at least 1.
    pub multiplier: f64,
    /// Maximum delay.
    pub max_backoff: Duration,
    /// Maximum fraction, 0 to 1, by which a delay is randomly shortened.
    pub jitter: f64,
}

impl RetryPolicy {
    /// Validates a wire policy in request field `field`.
    pub fn validate(field: &str, policy: &v1::RetryPolicy) -> Result<Self, BrokerError> {
        let duration =
            |name: &str, value: &Option<prost_types::Duration>| -> Result<Duration, BrokerError> {
                let Some(value) = value else {
                    return Err(BrokerError::invalid(
                        format!("{field}.{name}"),
                        "missing: set a duration",
                    ));
                };
                match Duration::try_from(*value) {
                    Ok(duration) if duration <= MAX_RETRY_DELAY => Ok(duration),
                    _ => Err(BrokerError::invalid(
                        format!("{field}.{name}"),
                        format!(
                            "{}.{:09}s is out of range: use 0s to 1 day",
                            value.seconds, value.nanos
                        ),
                    )),
                }
            };
        let initial_backoff = duration("initial_backoff", &policy.initial_backoff)?;
        let max_backoff = duration("max_backoff", &policy.max_backoff)?;
        if max_backoff < initial_backoff {
            return Err(BrokerError::invalid(
                format!("{field}.max_backoff"),
                format!(
                    "max_backoff {max_backoff:?} is shorter than initial_backoff {initial_backoff:?}"
                ),
            ));
        }
        if !(1.0..=MAX_MULTIPLIER).contains(&policy.multiplier) {
            return Err(BrokerError::invalid(
                format!("{field}.multiplier"),
                format!(
                    "multiplier {} is out of range: use 1.0 to {MAX_MULTIPLIER}",
                    policy.multiplier
                ),
            ));
        }
        if !(0.0..=1.0).contains(&policy.jitter) {
            return Err(BrokerError::invalid(
                format!("{field}.jitter"),
                format!("jitter {} is out of range: use 0.0 to 1.0", policy.jitter),
            ));
        }
        Ok(RetryPolicy {
            initial_backoff,
            multiplier: policy.multiplier,
            max_backoff,
            jitter: policy.jitter,
        })
    }

    /// Returns the delay before the attempt after `failed_attempts` failures, before jitter.
    pub fn base_delay(&self, failed_attempts: u32) -> Duration {
        let exponent = failed_attempts.saturating_sub(1).min(64) as i32;
        let seconds = self.initial_backoff.as_secs_f64() * self.multiplier.powi(exponent);
        let capped = seconds.min(self.max_backoff.as_secs_f64());
        Duration::try_from_secs_f64(capped).unwrap_or(self.max_backoff)
    }

    /// Returns the delay before the attempt after `failed_attempts` failures, shortened by
    /// a random fraction of up to `jitter`.
    pub fn delay(&self, failed_attempts: u32, rng: &mut impl Rng) -> Duration {
        let base = self.base_delay(failed_attempts);
        if self.jitter <= 0.0 {
            return base;
        }
        let cut = rng.random_range(0.0..=self.jitter);
        base.mul_f64(1.0 - cut)
    }

    /// Converts a stored policy.
    pub fn from_record(record: &RetryPolicyRecord) -> Self {
        RetryPolicy {
            initial_backoff: Duration::from_millis(record.initial_backoff_ms),
            multiplier: record.multiplier,
            max_backoff: Duration::from_millis(record.max_backoff_ms),
            jitter: record.jitter,
        }
    }

    /// Converts into the stored form.
    pub fn to_record(&self) -> RetryPolicyRecord {
        RetryPolicyRecord {
            initial_backoff_ms: self.initial_backoff.as_millis() as u64,
            multiplier: self.multiplier,
            max_backoff_ms: self.max_backoff.as_millis() as u64,
            jitter: self.jitter,
        }
    }

    /// Converts into the wire form.
    pub fn to_wire(&self) -> v1::RetryPolicy {
        v1::RetryPolicy {
            initial_backoff: prost_types::Duration::try_from(self.initial_backoff).ok(),
            multiplier: self.multiplier,
            max_backoff: prost_types::Duration::try_from(self.max_backoff).ok(),
            jitter: self.jitter,
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;

    fn policy(jitter: f64) -> RetryPolicy {
        RetryPolicy {
            initial_backoff: Duration::from_secs(1),
            multiplier: 2.0,
            max_backoff: Duration::from_secs(10),
            jitter,
        }
    }

    #[test]
    fn base_delay_grows_then_caps() {
        let delays: Vec<u64> = (1..=6)
            .map(|n| policy(0.0).base_delay(n).as_secs())
            .collect();
        assert_eq!(delays, [1, 2, 4, 8, 10, 10]);
    }

    #[test]
    fn jitter_stays_within_bounds() {
        let mut rng = StdRng::seed_from_u64(7);
        let policy = policy(0.5);
        for attempt in 1..=8 {
            let base = policy.base_delay(attempt);
            for _ in 0..200 {
                let delay = policy.delay(attempt, &mut rng);
                assert!(delay <= base, "{delay:?} > {base:?}");
                assert!(delay >= base.mul_f64(0.5), "{delay:?} < half of {base:?}");
            }
        }
    }

    #[test]
    fn huge_attempt_counts_do_not_overflow() {
        assert_eq!(policy(0.0).base_delay(u32::MAX), Duration::from_secs(10));
    }

    #[test]
    fn validate_rejects_out_of_range_values() {
        let mut wire = policy(0.1).to_wire();
        wire.multiplier = 0.5;
        let err = RetryPolicy::validate("retry_policy", &wire).expect_err("multiplier below 1");
        assert!(
            err.to_string().starts_with("retry_policy.multiplier"),
            "{err}"
        );

        let mut wire = policy(0.1).to_wire();
        wire.jitter = 1.5;
        let err = RetryPolicy::validate("retry_policy", &wire).expect_err("jitter above 1");
        assert!(err.to_string().starts_with("retry_policy.jitter"), "{err}");

        let mut wire = policy(0.1).to_wire();
        wire.max_backoff = Some(prost_types::Duration {
            seconds: 0,
            nanos: 1,
        });
        let err = RetryPolicy::validate("retry_policy", &wire).expect_err("max below initial");
        assert!(
            err.to_string().starts_with("retry_policy.max_backoff"),
            "{err}"
        );
    }
}
