//! Queue settings: broker-wide defaults from the configuration, overridden per queue by
//! records stored in the queues table.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use docket_proto::storage::QueueSettingsRecord;

use crate::retry::RetryPolicy;
use crate::task::QueueName;

/// Settings that apply to a queue without stored overrides.
#[derive(Debug, Clone)]
pub struct Defaults {
    /// Maximum attempts of a task that sets none.
    pub max_attempts: u32,
    /// Retry policy of a task that sets none.
    pub retry_policy: RetryPolicy,
    /// Lease length when a Subscribe request sets none.
    pub lease_duration: Duration,
    /// Retention of succeeded and cancelled tasks.
    pub retention: Duration,
    /// Retention of dead tasks.
    pub dead_retention: Duration,
    /// Time an idempotency key blocks a second task.
    pub idempotency_window: Duration,
}

/// A queue's settings with every default filled in.
#[derive(Debug, Clone)]
pub struct QueueSettings {
    /// Maximum attempts of a task that sets none.
    pub max_attempts: u32,
    /// Retry policy of a task that sets none.
    pub retry_policy: RetryPolicy,
    /// Lease length when a Subscribe request sets none.
    pub lease_duration: Duration,
    /// Retention of succeeded and cancelled tasks.
    pub retention: Duration,
    /// Retention of dead tasks.
    pub dead_retention: Duration,
    /// Time an idempotency key blocks a second task.
    pub idempotency_window: Duration,
    /// Deliveries are paused.
    pub paused: bool,
}

impl Defaults {
    /// Resolves a queue's stored overrides against these defaults.
    pub fn resolve(&self, record: Option<&QueueSettingsRecord>) -> QueueSettings {
        let record = record.cloned().unwrap_or_default();
        let millis = Duration::from_millis;
        QueueSettings {
            max_attempts: record.max_attempts.unwrap_or(self.max_attempts),
            retry_policy: record
                .retry_policy
                .as_ref()
                .map(RetryPolicy::from_record)
                .unwrap_or_else(|| self.retry_policy.clone()),
            lease_duration: record
                .lease_duration_ms
                .map(millis)
                .unwrap_or(self.lease_duration),
            retention: record.retention_ms.map(millis).unwrap_or(self.retention),
            dead_retention: record
                .dead_retention_ms
                .map(millis)
                .unwrap_or(self.dead_retention),
            idempotency_window: record
                .idempotency_window_ms
                .map(millis)
                .unwrap_or(self.idempotency_window),
            paused: record.paused,
        }
    }
}

/// Stored per-queue overrides, shared between the storage writer, which changes them after
/// each commit, and the request handlers, which read them.
#[derive(Clone)]
pub struct SettingsCache {
    defaults: Arc<Defaults>,
    records: Arc<RwLock<HashMap<QueueName, QueueSettingsRecord>>>,
}

impl SettingsCache {
    /// Creates a cache holding `records`.
    pub fn new(defaults: Defaults, records: HashMap<QueueName, QueueSettingsRecord>) -> Self {
        SettingsCache {
            defaults: Arc::new(defaults),
            records: Arc::new(RwLock::new(records)),
        }
    }

    /// Returns the broker-wide defaults.
    pub fn defaults(&self) -> &Defaults {
        &self.defaults
    }

    /// Returns a queue's settings with the defaults filled in.
    pub fn get(&self, queue: &QueueName) -> QueueSettings {
        let records = self
            .records
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        self.defaults.resolve(records.get(queue))
    }

    /// Returns a queue's stored overrides.
    pub fn record(&self, queue: &QueueName) -> Option<QueueSettingsRecord> {
        let records = self
            .records
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        records.get(queue).cloned()
    }

    /// Returns the names of every queue with stored settings.
    pub fn queues(&self) -> Vec<QueueName> {
        let records = self
            .records
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        records.keys().cloned().collect()
    }

    /// Replaces a queue's stored overrides after they were committed.
    pub fn set(&self, queue: QueueName, record: QueueSettingsRecord) {
        let mut records = self
            .records
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        records.insert(queue, record);
    }
}
