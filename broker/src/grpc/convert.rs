//! Validation of wire values that several RPCs share, and conversions of domain values
//! into wire messages.

use std::time::Duration;

use docket_proto::storage::{QueueSettingsRecord, TaskRecordState};
use docket_proto::v1;

use crate::config::MAX_ATTEMPTS_LIMIT;
use crate::error::BrokerError;
use crate::retry::{MAX_RETRY_DELAY, RetryPolicy};
use crate::settings::QueueSettings;
use crate::store::records::wire_state;
use crate::store::writer::SettleOutcome;

/// Shortest retention or dead retention that a queue may set.
const MIN_RETENTION: Duration = Duration::from_secs(60);

/// Maximum retention, dead retention or idempotency window that a queue may set.
const MAX_KEEP: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);

/// Converts a wire duration in `field`, which must lie within `min..=max`.
pub fn duration_in(
    field: &str,
    value: &prost_types::Duration,
    min: Duration,
    max: Duration,
) -> Result<Duration, BrokerError> {
    match Duration::try_from(*value) {
        Ok(duration) if duration >= min && duration <= max => Ok(duration),
        _ => Err(BrokerError::invalid(
            field,
            format!(
                "{}.{:09}s is out of range: use {} to {}",
                value.seconds,
                value.nanos,
                humantime::format_duration(min),
                humantime::format_duration(max)
            ),
        )),
    }
}

/// Validates a settings update and converts it into the stored form of the fields it sets.
pub fn settings_patch(
    settings: &v1::QueueSettings,
    max_lease: Duration,
) -> Result<QueueSettingsRecord, BrokerError> {
    let millis = |duration: Duration| duration.as_millis() as u64;
    let mut patch = QueueSettingsRecord::default();
    if let Some(max_attempts) = settings.max_attempts {
        if max_attempts == 0 || max_attempts > MAX_ATTEMPTS_LIMIT {
            return Err(BrokerError::invalid(
                "settings.max_attempts",
                format!(
                    "max_attempts {max_attempts} is out of range: use 1 to {MAX_ATTEMPTS_LIMIT}"
                ),
            ));
        }
        patch.max_attempts = Some(max_attempts);
    }
    if let Some(policy) = &settings.retry_policy {
        patch.retry_policy =
            Some(RetryPolicy::validate("settings.retry_policy", policy)?.to_record());
    }
    if let Some(lease) = &settings.lease_duration {
        patch.lease_duration_ms = Some(millis(duration_in(
            "settings.lease_duration",
            lease,
            Duration::from_secs(1),
            max_lease,
        )?));
    }
    if let Some(retention) = &settings.retention {
        patch.retention_ms = Some(millis(duration_in(
            "settings.retention",
            retention,
            MIN_RETENTION,
            MAX_KEEP,
        )?));
    }
    if let Some(retention) = &settings.dead_retention {
        patch.dead_retention_ms = Some(millis(duration_in(
            "settings.dead_retention",
            retention,
            MIN_RETENTION,
            MAX_KEEP,
        )?));
    }
    if let Some(window) = &settings.idempotency_window {
        patch.idempotency_window_ms = Some(millis(duration_in(
            "settings.idempotency_window",
            window,
            Duration::from_secs(1),
            MAX_KEEP,
        )?));
    }
    Ok(patch)
}

/// Converts resolved settings into the wire form, every field set.
pub fn wire_settings(settings: &QueueSettings) -> v1::QueueSettings {
    let duration = |value: Duration| prost_types::Duration::try_from(value).ok();
    v1::QueueSettings {
        max_attempts: Some(settings.max_attempts),
        retry_policy: Some(settings.retry_policy.to_wire()),
        lease_duration: duration(settings.lease_duration),
        retention: duration(settings.retention),
        dead_retention: duration(settings.dead_retention),
        idempotency_window: duration(settings.idempotency_window),
        paused: settings.paused,
    }
}

/// Converts one item's settle outcome into its wire result.
pub fn settle_result(
    lease_id: String,
    outcome: Result<SettleOutcome, BrokerError>,
) -> v1::SettleResult {
    match outcome {
        Ok(outcome) => v1::SettleResult {
            lease_id,
            code: tonic::Code::Ok as i32,
            message: String::new(),
            state: wire_state(outcome.state).into(),
            cancel_requested: outcome.cancel_requested,
        },
        Err(err) => {
            let status = tonic::Status::from(err);
            v1::SettleResult {
                lease_id,
                code: status.code() as i32,
                message: status.message().to_owned(),
                state: wire_state(TaskRecordState::Unspecified).into(),
                cancel_requested: false,
            }
        }
    }
}

/// Validates a Nack's retry delay override.
pub fn retry_delay(
    field: &str,
    value: &Option<prost_types::Duration>,
) -> Result<Option<Duration>, BrokerError> {
    match value {
        None => Ok(None),
        Some(value) => duration_in(field, value, Duration::ZERO, MAX_RETRY_DELAY).map(Some),
    }
}
