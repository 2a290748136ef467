//! Secondary indexes of the tasks table and per-queue counts, kept in step with every
//! record's state by [`Indexed`].

use std::collections::BTreeMap;

use docket_proto::storage::{TaskRecord, TaskRecordState};
use redb::{ReadableTable, Table, TableDefinition};

use std::sync::Arc;

use super::records::is_final;
use crate::dispatch::{ReadyKey, ReadyTask};
use crate::error::StoreError;
use crate::task::{QueueName, TaskId};

/// Tasks in state PENDING by (queue, negated priority, sequence): the order in which a
/// queue delivers them. A retry keeps its sequence, so a promoted task goes back to its
/// place. Leased tasks stay here, as deliveries are not stored.
pub(crate) const READY: TableDefinition<(&str, i64, u64), u128> = TableDefinition::new("ready");

/// Tasks in state RETRY_WAIT by (retry time in microseconds since the Unix epoch, sequence).
pub(crate) const WAITING: TableDefinition<(i64, u64), u128> = TableDefinition::new("waiting");

/// Number of tasks by (queue, stored state number).
pub(crate) const COUNTS: TableDefinition<(&str, i32), u64> = TableDefinition::new("counts");

/// Tasks that are not final and whose cancellation was requested while they were leased.
pub(crate) const CANCEL_REQUESTED: TableDefinition<u128, ()> =
    TableDefinition::new("cancel_requested");

/// Tasks in a final state by (expiry, task id), for the purge.
pub(crate) const RETENTION: TableDefinition<(i64, u128), ()> = TableDefinition::new("retention");

/// Dead tasks by (queue, time of death, task id), for listing a queue's dead letters.
pub(crate) const DEAD: TableDefinition<(&str, i64, u128), ()> = TableDefinition::new("dead");

/// Reads up to `limit` entries of a queue's ready index after `after` and returns the
/// pending tasks among them in delivery order, the key of the last entry read, and whether
/// the read reached the end of the queue's index.
///
/// # Errors
///
/// Fails on a read error or a record that cannot be decoded.
#[allow(clippy::type_complexity)]
pub(crate) fn read_ready(
    ready: &impl ReadableTable<(&'static str, i64, u64), u128>,
    tasks: &impl ReadableTable<u128, &'static [u8]>,
    queue: &QueueName,
    after: Option<ReadyKey>,
    limit: usize,
) -> Result<(Vec<Arc<ReadyTask>>, Option<ReadyKey>, bool), StoreError> {
    let name = queue.as_str();
    // The first key after `after`: sequences are unique, so the next one in order has the
    // same priority and a higher sequence, or a lower priority.
    let start = match after {
        Some((negated_priority, u64::MAX)) => (name, negated_priority + 1, 0),
        Some((negated_priority, sequence)) => (name, negated_priority, sequence + 1),
        None => ready_key(name, i32::MAX, 0),
    };
    let end = ready_key(name, i32::MIN, u64::MAX);
    let mut entries = Vec::with_capacity(limit);
    for entry in ready.range(start..=end)?.take(limit) {
        let (key, task) = entry?;
        let (_, negated_priority, sequence) = key.value();
        entries.push(((negated_priority, sequence), TaskId::from_key(task.value())));
    }

    let exhausted = entries.len() < limit;
    let last = entries.last().map(|(key, _)| *key);
    let mut pending = Vec::with_capacity(entries.len());
    for (_, task_id) in entries {
        let Some(value) = tasks.get(task_id.as_key())? else {
            continue;
        };
        let record = super::decode_record(task_id, value.value())?;
        // Every entry should be pending, and `check` reports an index where one is not.
        if record.state() == TaskRecordState::Pending {
            pending.push(Arc::new(super::records::ready_task(task_id, &record)?));
        }
    }
    Ok((pending, last, exhausted))
}

/// The fields of a record that its index entries are built from.
#[derive(Debug, Clone)]
pub(crate) struct IndexKeys {
    queue: String,
    fields: IndexFields,
}

/// The index fields of a record besides its queue.
#[derive(Debug, Clone, Copy)]
struct IndexFields {
    priority: i32,
    sequence: u64,
    state: TaskRecordState,
    retry_at_us: i64,
    expires_at_us: i64,
    updated_at_us: i64,
    cancel_requested: bool,
}

impl IndexFields {
    fn of(record: &TaskRecord) -> Self {
        IndexFields {
            priority: record.priority,
            sequence: record.sequence,
            state: record.state(),
            retry_at_us: record.retry_at_us,
            expires_at_us: record.expires_at_us,
            updated_at_us: record.updated_at_us,
            cancel_requested: record.cancel_requested,
        }
    }
}

impl IndexKeys {
    /// Takes the index fields of a record as it is stored now.
    pub fn of(record: &TaskRecord) -> Self {
        IndexKeys {
            queue: record.queue.clone(),
            fields: IndexFields::of(record),
        }
    }
}

/// Returns the READY key of a task: its queue's delivery order.
pub(crate) fn ready_key(queue: &str, priority: i32, sequence: u64) -> (&str, i64, u64) {
    (queue, -i64::from(priority), sequence)
}

/// The index tables of one write transaction, and the count changes to write at its end.
pub(crate) struct Indexed<'txn> {
    pub(crate) ready: Table<'txn, (&'static str, i64, u64), u128>,
    pub(crate) waiting: Table<'txn, (i64, u64), u128>,
    counts: Table<'txn, (&'static str, i32), u64>,
    cancel_requested: Table<'txn, u128, ()>,
    pub(crate) retention: Table<'txn, (i64, u128), ()>,
    pub(crate) dead: Table<'txn, (&'static str, i64, u128), ()>,
    /// Count changes by queue and state. A batch touches few queues, so a list searched
    /// by name costs less than a map whose keys each need an owned name.
    count_changes: Vec<(String, i32, i64)>,
}

impl<'txn> Indexed<'txn> {
    pub fn open(txn: &'txn redb::WriteTransaction) -> Result<Self, StoreError> {
        Ok(Indexed {
            ready: txn.open_table(READY)?,
            waiting: txn.open_table(WAITING)?,
            counts: txn.open_table(COUNTS)?,
            cancel_requested: txn.open_table(CANCEL_REQUESTED)?,
            retention: txn.open_table(RETENTION)?,
            dead: txn.open_table(DEAD)?,
            count_changes: Vec::new(),
        })
    }

    /// Adds the entries of a record's state.
    pub fn add(&mut self, task_id: TaskId, record: &TaskRecord) -> Result<(), StoreError> {
        self.apply(task_id, &record.queue, &IndexFields::of(record), true)
    }

    /// Removes the entries of a record's state, as `keys` captured it.
    pub fn remove(&mut self, task_id: TaskId, keys: &IndexKeys) -> Result<(), StoreError> {
        self.apply(task_id, &keys.queue, &keys.fields, false)
    }

    fn apply(
        &mut self,
        task_id: TaskId,
        queue: &str,
        keys: &IndexFields,
        add: bool,
    ) -> Result<(), StoreError> {
        let task = task_id.as_key();
        let ready = ready_key(queue, keys.priority, keys.sequence);
        if keys.state == TaskRecordState::Pending {
            if add {
                self.ready.insert(ready, task)?;
            } else {
                self.ready.remove(ready)?;
            }
        }
        if keys.state == TaskRecordState::RetryWait {
            if add {
                self.waiting
                    .insert((keys.retry_at_us, keys.sequence), task)?;
            } else {
                self.waiting.remove((keys.retry_at_us, keys.sequence))?;
            }
        }
        if is_final(keys.state) {
            if add {
                self.retention.insert((keys.expires_at_us, task), ())?;
            } else {
                self.retention.remove((keys.expires_at_us, task))?;
            }
        }
        if keys.state == TaskRecordState::Dead {
            if add {
                self.dead.insert((queue, keys.updated_at_us, task), ())?;
            } else {
                self.dead.remove((queue, keys.updated_at_us, task))?;
            }
        }
        if keys.cancel_requested && !is_final(keys.state) {
            if add {
                self.cancel_requested.insert(task, ())?;
            } else {
                self.cancel_requested.remove(task)?;
            }
        }
        let state = keys.state as i32;
        let delta = if add { 1 } else { -1 };
        match self
            .count_changes
            .iter_mut()
            .find(|(name, changed, _)| *changed == state && name == queue)
        {
            Some((_, _, change)) => *change += delta,
            None => self.count_changes.push((queue.to_owned(), state, delta)),
        }
        Ok(())
    }

    /// Returns the earliest retry time of a retry-waiting task.
    pub fn first_retry_at(&self) -> Result<Option<i64>, StoreError> {
        Ok(self.waiting.first()?.map(|(key, _)| key.value().0))
    }

    /// Writes the count changes and returns them. Call once, before the commit.
    pub fn write_counts(&mut self) -> Result<Vec<(String, i32, i64)>, StoreError> {
        let mut changes = std::mem::take(&mut self.count_changes);
        changes.retain(|(_, _, change)| *change != 0);
        for (queue, state, change) in &changes {
            self.write_count(queue, *state, *change)?;
        }
        Ok(changes)
    }

    fn write_count(&mut self, queue: &str, state: i32, change: i64) -> Result<(), StoreError> {
        let key = (queue, state);
        {
            let current = self
                .counts
                .get(key)?
                .map(|value| value.value())
                .unwrap_or(0);
            let updated = current.saturating_add_signed(change);
            if updated == 0 {
                self.counts.remove(key)?;
            } else {
                self.counts.insert(key, updated)?;
            }
        }
        Ok(())
    }
}

/// Entries that the index tables should hold, built from the records alone.
#[derive(Debug, Default, PartialEq, Eq)]
struct Expected {
    ready: std::collections::BTreeSet<(String, i64, u64, u128)>,
    waiting: std::collections::BTreeSet<(i64, u64, u128)>,
    counts: BTreeMap<(String, i32), u64>,
    cancel_requested: std::collections::BTreeSet<u128>,
    retention: std::collections::BTreeSet<(i64, u128)>,
    dead: std::collections::BTreeSet<(String, i64, u128)>,
}

impl Expected {
    fn add(&mut self, task: u128, keys: &IndexKeys) {
        let queue = keys.queue.clone();
        let keys = &keys.fields;
        if keys.state == TaskRecordState::Pending {
            self.ready.insert((
                queue.clone(),
                -i64::from(keys.priority),
                keys.sequence,
                task,
            ));
        }
        if keys.state == TaskRecordState::RetryWait {
            self.waiting.insert((keys.retry_at_us, keys.sequence, task));
        }
        if is_final(keys.state) {
            self.retention.insert((keys.expires_at_us, task));
        }
        if keys.state == TaskRecordState::Dead {
            self.dead.insert((queue.clone(), keys.updated_at_us, task));
        }
        if keys.cancel_requested && !is_final(keys.state) {
            self.cancel_requested.insert(task);
        }
        *self.counts.entry((queue, keys.state as i32)).or_default() += 1;
    }
}

/// Compares every index table with what the tasks table implies. Returns a description of
/// the first difference. For tests and offline checks: it reads every record.
///
/// # Errors
///
/// Fails on a read error or a record that cannot be decoded.
pub fn check(db: &redb::Database) -> Result<Result<(), String>, StoreError> {
    use redb::ReadableDatabase;

    let txn = db.begin_read()?;
    let mut expected = Expected::default();
    for entry in txn.open_table(super::TASKS)?.iter()? {
        let (key, value) = entry?;
        let task_id = TaskId::from_key(key.value());
        let record = super::decode_record(task_id, value.value())?;
        expected.add(key.value(), &IndexKeys::of(&record));
    }

    let mut actual = Expected::default();
    for entry in txn.open_table(READY)?.iter()? {
        let (key, value) = entry?;
        let (queue, priority, sequence) = key.value();
        actual
            .ready
            .insert((queue.to_owned(), priority, sequence, value.value()));
    }
    for entry in txn.open_table(WAITING)?.iter()? {
        let (key, value) = entry?;
        let (retry_at, sequence) = key.value();
        actual.waiting.insert((retry_at, sequence, value.value()));
    }
    for entry in txn.open_table(COUNTS)?.iter()? {
        let (key, value) = entry?;
        let (queue, state) = key.value();
        actual
            .counts
            .insert((queue.to_owned(), state), value.value());
    }
    for entry in txn.open_table(CANCEL_REQUESTED)?.iter()? {
        let (key, _) = entry?;
        actual.cancel_requested.insert(key.value());
    }
    for entry in txn.open_table(RETENTION)?.iter()? {
        let (key, _) = entry?;
        actual.retention.insert(key.value());
    }
    for entry in txn.open_table(DEAD)?.iter()? {
        let (key, _) = entry?;
        let (queue, died_at, task) = key.value();
        actual.dead.insert((queue.to_owned(), died_at, task));
    }

    macro_rules! compare {
        ($($field:ident),*) => {
            $(if expected.$field != actual.$field {
                return Ok(Err(format!(
                    "index {} differs: expected {:?}, stored {:?}",
                    stringify!($field), expected.$field, actual.$field
                )));
            })*
        };
    }
    compare!(ready, waiting, counts, cancel_requested, retention, dead);
    Ok(Ok(()))
}
