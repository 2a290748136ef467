//! Durable storage in one redb file.
//!
//! Every write goes through the single [`writer`] thread, which commits batches of
//! requests in one transaction (group commit). Reads open their own read transactions and
//! run on blocking threads, never on the async workers.

pub mod writer;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use docket_proto::storage::{TaskRecord, TaskRecordState};
use docket_proto::v1;
use prost::Message;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::dispatch::ReadyTask;
use crate::error::StoreError;
use crate::task::{QueueName, TaskId};

/// Tasks by id (`TaskId::as_key`), each a prost-encoded `TaskRecord`.
pub(crate) const TASKS: TableDefinition<u128, &[u8]> = TableDefinition::new("tasks");

/// The broker's redb database.
pub struct Store {
    db: Database,
}

/// State that the broker rebuilds from the store at start-up.
pub struct Recovered {
    /// Every task that is waiting for delivery, in no particular order.
    pub pending: Vec<Arc<ReadyTask>>,
    /// The sequence number to give the next enqueued task.
    pub next_sequence: u64,
}

impl Store {
    /// Opens the database in `data_dir`, creating the folder and the file if missing.
    ///
    /// # Errors
    ///
    /// Fails if the folder cannot be created or redb cannot open the file, for example
    /// because another broker process has it open.
    pub fn open(data_dir: &Path, path: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|source| StoreError::DataDir {
            path: data_dir.to_path_buf(),
            source,
        })?;
        let db = Database::create(path)?;

        // Create the tables up front, so that read transactions never find them missing.
        let txn = db.begin_write()?;
        txn.open_table(TASKS)?;
        txn.commit()?;

        Ok(Store { db })
    }

    /// Scans the tasks table and returns the pending tasks and the next sequence number.
    ///
    /// # Errors
    ///
    /// Fails on a read error or on a record that cannot be decoded.
    pub fn recover(&self) -> Result<Recovered, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(TASKS)?;
        let mut pending = Vec::new();
        let mut max_sequence = 0;
        for entry in table.iter()? {
            let (key, value) = entry?;
            let task_id = TaskId::from_key(key.value());
            let record = decode_record(task_id, value.value())?;
            max_sequence = max_sequence.max(record.sequence);
            if record.state() == TaskRecordState::Pending {
                pending.push(Arc::new(ready_task(task_id, record)?));
            }
        }
        Ok(Recovered {
            pending,
            next_sequence: max_sequence + 1,
        })
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
}

pub(crate) fn decode_record(task_id: TaskId, bytes: &[u8]) -> Result<TaskRecord, StoreError> {
    TaskRecord::decode(bytes).map_err(|source| StoreError::Decode { task_id, source })
}

/// Builds the in-memory form of a pending task from its record.
pub(crate) fn ready_task(task_id: TaskId, record: TaskRecord) -> Result<ReadyTask, StoreError> {
    // A record holds only queue names that passed validation when it was enqueued.
    let queue =
        QueueName::parse("queue", &record.queue).map_err(|_| StoreError::Missing(task_id))?;
    let task = v1::Task {
        id: task_id.to_string(),
        queue: record.queue,
        kind: record.kind,
        payload: record.payload,
        headers: record.headers,
        priority: record.priority,
        max_attempts: record.max_attempts,
        created_at: Some(timestamp_from_micros(record.created_at_us)),
    };
    Ok(ReadyTask {
        id: task_id,
        queue,
        priority: record.priority,
        sequence: record.sequence,
        attempts: record.attempts,
        task: Arc::new(task),
    })
}

/// Microseconds since the Unix epoch, for record timestamps.
pub(crate) fn now_micros() -> i64 {
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

#[cfg(test)]
mod tests;
