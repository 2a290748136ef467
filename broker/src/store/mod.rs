//! Durable storage in one redb file.
//!
//! Every write goes through the single [`writer`] thread, which commits batches of
//! requests in one transaction (group commit). Reads open their own read transactions and
//! run on blocking threads, never on the async workers.

mod apply;
pub(crate) mod index;
pub mod records;
pub mod writer;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use docket_proto::storage::{QueueSettingsRecord, TaskRecord, TaskRecordState};
use prost::Message;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::dispatch::{Effect, LeaseView};
use crate::error::StoreError;
use crate::settings::Defaults;
use crate::task::{QueueName, TaskId};
use index::{CANCEL_REQUESTED, COUNTS, DEAD, IndexKeys, READY, RETENTION, WAITING};

/// Tasks by id (`TaskId::as_key`), each a prost-encoded `TaskRecord`.
pub(crate) const TASKS: TableDefinition<u128, &[u8]> = TableDefinition::new("tasks");

/// Idempotency keys by (queue, key): the task id and the key's expiry in microseconds
/// since the Unix epoch.
pub(crate) const IDEMPOTENCY: TableDefinition<(&str, &str), (u128, i64)> =
    TableDefinition::new("idempotency");

/// Idempotency keys by (expiry, queue, key), for the purge.
pub(crate) const IDEMPOTENCY_EXPIRY: TableDefinition<(i64, &str, &str), ()> =
    TableDefinition::new("idempotency_expiry");

/// Store-wide values by name, such as the schema version.
pub(crate) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Version of the table layout. Version 2 added the secondary indexes in `index`. Version
/// 3 keeps only pending tasks in READY, which also gives the oldest pending task, so the
/// pending-age table of version 2 is gone.
const SCHEMA_VERSION: u64 = 3;

/// The table of pending tasks by age that version 2 kept, deleted by the upgrade to 3.
const PENDING_AGE_V2: TableDefinition<(&str, u64), (i64, u128)> =
    TableDefinition::new("pending_age");

/// Queue settings by queue name, each a prost-encoded `QueueSettingsRecord`.
pub(crate) const QUEUES: TableDefinition<&str, &[u8]> = TableDefinition::new("queues");

/// The broker's redb database.
pub struct Store {
    db: Database,
    /// Test hook: every commit fails while this file exists.
    fault_file: Option<PathBuf>,
}

/// State that the broker rebuilds from the store at start-up.
pub struct Recovered {
    /// Changes that rebuild the dispatcher: ready and retry-waiting tasks, counts of final
    /// states, paused queues.
    pub effects: Vec<Effect>,
    /// Stored queue settings.
    pub settings: HashMap<QueueName, QueueSettingsRecord>,
    /// The sequence number to give the next enqueued task.
    pub next_sequence: u64,
    /// Number of tasks that are pending or waiting for a retry.
    pub deliverable: u64,
}

/// Builds every secondary index and the next sequence number from the records of a data
/// file of version 0 or 1, which had none of them. Returns the number of records.
fn build_indexes(txn: &redb::WriteTransaction) -> Result<u64, StoreError> {
    let tasks = txn.open_table(TASKS)?;
    let mut index = index::Indexed::open(txn)?;
    let mut indexed = 0u64;
    let mut max_sequence = 0;
    for entry in tasks.iter()? {
        let (key, value) = entry?;
        let task_id = TaskId::from_key(key.value());
        let record = decode_record(task_id, value.value())?;
        max_sequence = max_sequence.max(record.sequence);
        // Version 1 kept retention and dead entries already; re-adding is harmless.
        index.add(task_id, &record)?;
        indexed += 1;
    }
    index.write_counts()?;
    txn.open_table(META)?
        .insert("next_sequence", max_sequence + 1)?;
    Ok(indexed)
}

/// Removes the READY entries of retry-waiting tasks, which version 2 kept there. Returns
/// the number of entries removed.
fn upgrade_from_v2(txn: &redb::WriteTransaction) -> Result<u64, StoreError> {
    let tasks = txn.open_table(TASKS)?;
    let mut ready = txn.open_table(READY)?;
    let mut removed = 0u64;
    for entry in txn.open_table(WAITING)?.iter()? {
        let (_, task) = entry?;
        let task_id = TaskId::from_key(task.value());
        let Some(value) = tasks.get(task.value())? else {
            continue;
        };
        let record = decode_record(task_id, value.value())?;
        let key = index::ready_key(&record.queue, record.priority, record.sequence);
        if ready.remove(key)?.is_some() {
            removed += 1;
        }
    }
    Ok(removed)
}

impl Store {
    /// Makes every commit fail while `path` exists. A test hook for store failures.
    pub fn fail_commits_while_exists(&mut self, path: PathBuf) {
        self.fault_file = Some(path);
    }

    /// Returns the injected failure of the next commit, if the test hook's file exists.
    pub(crate) fn injected_fault(&self) -> Option<StoreError> {
        let path = self.fault_file.as_ref()?;
        path.exists()
            .then(|| StoreError::TestFault { path: path.clone() })
    }

    /// Opens the database in `data_dir`, creating the folder and the file if missing, with a
    /// page cache of at most `cache_bytes`.
    ///
    /// # Errors
    ///
    /// Fails if the folder cannot be created or redb cannot open the file, for example
    /// because another broker process has it open.
    pub fn open(data_dir: &Path, path: &Path, cache_bytes: usize) -> Result<Store, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|source| StoreError::DataDir {
            path: data_dir.to_path_buf(),
            source,
        })?;
        let db = match Database::builder().set_cache_size(cache_bytes).create(path) {
            Ok(db) => db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                return Err(StoreError::AlreadyOpen {
                    path: path.to_path_buf(),
                });
            }
            Err(err) => return Err(err.into()),
        };

        // Create the tables up front, so that read transactions never find them missing.
        let txn = db.begin_write()?;
        txn.open_table(TASKS)?;
        txn.open_table(IDEMPOTENCY)?;
        txn.open_table(IDEMPOTENCY_EXPIRY)?;
        txn.open_table(QUEUES)?;
        txn.open_table(META)?;
        txn.open_table(READY)?;
        txn.open_table(WAITING)?;
        txn.open_table(COUNTS)?;
        txn.open_table(CANCEL_REQUESTED)?;
        txn.open_table(RETENTION)?;
        txn.open_table(DEAD)?;
        txn.commit()?;

        let store = Store {
            db,
            fault_file: None,
        };
        store.upgrade_schema()?;
        Ok(store)
    }

    /// Brings a data file written by an earlier version to the current table layout.
    fn upgrade_schema(&self) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        let version = txn
            .open_table(META)?
            .get("schema")?
            .map(|value| value.value())
            .unwrap_or(0);
        if version >= SCHEMA_VERSION {
            return Ok(());
        }
        let entries = if version == 2 {
            upgrade_from_v2(&txn)?
        } else {
            build_indexes(&txn)?
        };
        if txn.delete_table(PENDING_AGE_V2)? {
            tracing::debug!("deleted the pending-age table of schema version 2");
        }
        txn.open_table(META)?.insert("schema", SCHEMA_VERSION)?;
        txn.commit()?;
        if version == 0 && entries == 0 {
            tracing::debug!(version = SCHEMA_VERSION, "new data file");
        } else {
            tracing::info!(
                entries,
                from = version,
                to = SCHEMA_VERSION,
                "data file upgraded"
            );
        }
        Ok(())
    }

    /// Scans the store and returns what the dispatcher needs to start. Tasks whose
    /// cancellation was requested while they were leased are committed as cancelled first.
    ///
    /// # Errors
    ///
    /// Fails on a read or write error or on a record that cannot be decoded.
    pub fn recover(&self, defaults: &Defaults, window: usize) -> Result<Recovered, StoreError> {
        let settings = self.read_settings()?;
        self.cancel_orphaned_cancellations(defaults, &settings)?;

        let mut effects: Vec<Effect> = settings
            .iter()
            .map(|(queue, record)| Effect::Paused {
                queue: queue.clone(),
                paused: record.paused,
            })
            .collect();
        let txn = self.db.begin_read()?;

        let mut counts = Vec::new();
        let mut deliverable = 0;
        let mut with_pending = Vec::new();
        for entry in txn.open_table(COUNTS)?.iter()? {
            let (key, value) = entry?;
            let (name, state) = key.value();
            let Ok(queue) = QueueName::parse("queue", name) else {
                continue;
            };
            let count = value.value();
            if state == TaskRecordState::Pending as i32
                || state == TaskRecordState::RetryWait as i32
            {
                deliverable += count;
            }
            if state == TaskRecordState::Pending as i32 && count > 0 {
                with_pending.push(queue.clone());
            }
            counts.push((queue, state, i64::try_from(count).unwrap_or(i64::MAX)));
        }
        effects.push(Effect::Counts(counts));

        // Only each queue's first tasks are read; the rest follow as its window empties.
        let ready = txn.open_table(READY)?;
        let tasks = txn.open_table(TASKS)?;
        for queue in with_pending {
            let (pending, last, exhausted) =
                index::read_ready(&ready, &tasks, &queue, None, window)?;
            effects.push(Effect::Refilled {
                queue,
                after: None,
                tasks: pending,
                last,
                exhausted,
            });
        }
        let next_retry = txn
            .open_table(WAITING)?
            .first()?
            .map(|(key, _)| key.value().0);
        effects.push(Effect::NextRetry(next_retry));
        let next_sequence = txn
            .open_table(META)?
            .get("next_sequence")?
            .map(|value| value.value())
            .unwrap_or(1);

        Ok(Recovered {
            effects,
            settings,
            next_sequence,
            deliverable,
        })
    }

    fn read_settings(&self) -> Result<HashMap<QueueName, QueueSettingsRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let mut settings = HashMap::new();
        for entry in txn.open_table(QUEUES)?.iter()? {
            let (name, value) = entry?;
            let Ok(queue) = QueueName::parse("queue", name.value()) else {
                continue;
            };
            let record = QueueSettingsRecord::decode(value.value()).map_err(|source| {
                StoreError::DecodeSettings {
                    queue: name.value().to_owned(),
                    source,
                }
            })?;
            settings.insert(queue, record);
        }
        Ok(settings)
    }

    /// Commits as cancelled every deliverable task with a cancellation request. Such a task
    /// was leased when the broker stopped, so no worker can settle it any more.
    fn cancel_orphaned_cancellations(
        &self,
        defaults: &Defaults,
        settings: &HashMap<QueueName, QueueSettingsRecord>,
    ) -> Result<(), StoreError> {
        let orphaned: Vec<(TaskId, TaskRecord)> = {
            let txn = self.db.begin_read()?;
            let tasks = txn.open_table(TASKS)?;
            let mut orphaned = Vec::new();
            for entry in txn.open_table(CANCEL_REQUESTED)?.iter()? {
                let (key, _) = entry?;
                let task_id = TaskId::from_key(key.value());
                if let Some(value) = tasks.get(key.value())? {
                    orphaned.push((task_id, decode_record(task_id, value.value())?));
                }
            }
            orphaned
        };
        if orphaned.is_empty() {
            return Ok(());
        }

        let txn = self.db.begin_write()?;
        {
            let mut tables = apply::Tables::open(&txn)?;
            let now = now_micros();
            for (task_id, mut record) in orphaned {
                let queue_settings = match QueueName::parse("queue", &record.queue) {
                    Ok(queue) => defaults.resolve(settings.get(&queue)),
                    Err(_) => defaults.resolve(None),
                };
                let before = IndexKeys::of(&record);
                apply::finish(
                    &mut record,
                    TaskRecordState::Cancelled,
                    now,
                    &queue_settings,
                );
                tables.rewrite_task(task_id, &before, &record)?;
                tracing::info!(%task_id, "task whose cancellation was requested before a restart is now cancelled");
            }
            tables.index.write_counts()?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Compares the secondary indexes with the tasks table, reading every record. Returns a
    /// description of the first difference.
    ///
    /// # Errors
    ///
    /// Fails on a read error or a record that cannot be decoded.
    pub fn check_indexes(&self) -> Result<Result<(), String>, StoreError> {
        index::check(&self.db)
    }

    /// Returns the enqueue time of a queue's oldest pending task that `is_held` does not
    /// report as leased, in microseconds since the Unix epoch.
    ///
    /// # Errors
    ///
    /// Fails on a read error.
    pub fn oldest_pending(
        &self,
        queue: &QueueName,
        is_held: impl Fn(TaskId) -> bool,
    ) -> Result<Option<i64>, StoreError> {
        let txn = self.db.begin_read()?;
        let ready = txn.open_table(READY)?;
        let name = queue.as_str();
        // READY orders a queue's tasks by priority, then by sequence, which follows the
        // enqueue time. The oldest task is the one with the lowest sequence among the first
        // unheld task of each priority, so the scan visits each priority once.
        let mut oldest: Option<(u64, u128)> = None;
        let mut from = index::ready_key(name, i32::MAX, 0);
        let end = index::ready_key(name, i32::MIN, u64::MAX);
        while from <= end {
            let mut priority = None;
            let mut unheld = None;
            for entry in ready.range(from..=end)? {
                let (key, task) = entry?;
                let (_, negated_priority, sequence) = key.value();
                if *priority.get_or_insert(negated_priority) != negated_priority {
                    break;
                }
                if !is_held(TaskId::from_key(task.value())) {
                    unheld = Some((sequence, task.value()));
                    break;
                }
            }
            let Some(negated_priority) = priority else {
                break;
            };
            if let Some((sequence, task)) = unheld
                && oldest.is_none_or(|(best, _)| sequence < best)
            {
                oldest = Some((sequence, task));
            }
            // Negated priorities come from i32, so adding one cannot overflow.
            from = (name, negated_priority + 1, 0);
        }
        let Some((_, task)) = oldest else {
            return Ok(None);
        };
        let tasks = txn.open_table(TASKS)?;
        let task_id = TaskId::from_key(task);
        match tasks.get(task)? {
            Some(value) => Ok(Some(decode_record(task_id, value.value())?.created_at_us)),
            None => Ok(None),
        }
    }

    /// Reads one task's record.
    ///
    /// # Errors
    ///
    /// Fails on a read error or a record that cannot be decoded.
    pub fn read_task(&self, task_id: TaskId) -> Result<Option<TaskRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(TASKS)?;
        let Some(value) = table.get(task_id.as_key())? else {
            return Ok(None);
        };
        decode_record(task_id, value.value()).map(Some)
    }

    /// Reads one page of a queue's dead tasks, oldest death first, starting after
    /// `after` (a time of death and task id). Returns the page and the position of its
    /// last entry if more may follow.
    ///
    /// # Errors
    ///
    /// Fails on a read error or a record that cannot be decoded.
    #[allow(clippy::type_complexity)]
    pub fn read_dead_page(
        &self,
        queue: &QueueName,
        after: Option<(i64, u128)>,
        page_size: usize,
    ) -> Result<(Vec<(TaskId, TaskRecord)>, Option<(i64, u128)>), StoreError> {
        let txn = self.db.begin_read()?;
        let dead = txn.open_table(DEAD)?;
        let tasks = txn.open_table(TASKS)?;
        let start = match after {
            Some((died_at, task)) => (queue.as_str(), died_at, task.saturating_add(1)),
            None => (queue.as_str(), i64::MIN, 0),
        };
        let end = (queue.as_str(), i64::MAX, u128::MAX);
        let mut page = Vec::new();
        let mut last = None;
        for entry in dead.range(start..=end)? {
            let (key, _) = entry?;
            let (_, died_at, task) = key.value();
            if page.len() == page_size {
                return Ok((page, last));
            }
            last = Some((died_at, task));
            let task_id = TaskId::from_key(task);
            if let Some(value) = tasks.get(task)? {
                page.push((task_id, decode_record(task_id, value.value())?));
            }
        }
        Ok((page, None))
    }
}

pub(crate) fn decode_record(task_id: TaskId, bytes: &[u8]) -> Result<TaskRecord, StoreError> {
    TaskRecord::decode(bytes).map_err(|source| StoreError::Decode { task_id, source })
}

/// Returns the current time in microseconds since the Unix epoch, for record timestamps.
pub fn now_micros() -> i64 {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    i64::try_from(since_epoch.as_micros()).unwrap_or(i64::MAX)
}

/// Converts a record timestamp into a protobuf `Timestamp`.
pub fn timestamp_from_micros(micros: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: micros.div_euclid(1_000_000),
        nanos: (micros.rem_euclid(1_000_000) * 1000) as i32,
    }
}

/// Adds a duration to a record timestamp, saturating.
pub fn add_micros(at_us: i64, duration: Duration) -> i64 {
    at_us.saturating_add(i64::try_from(duration.as_micros()).unwrap_or(i64::MAX))
}

/// Builds a task's status as GetTask returns it.
pub fn status_of(
    task_id: TaskId,
    record: &TaskRecord,
    lease: Option<&LeaseView>,
) -> docket_proto::v1::TaskStatus {
    records::task_status(task_id, record, lease, now_micros())
}

#[cfg(test)]
mod tests;
