//! Table changes of each write request. They run on the writer thread inside the batch's
//! write transaction.

use std::sync::Arc;

use docket_proto::storage::{AttemptRecord, QueueSettingsRecord, TaskRecord, TaskRecordState};
use docket_proto::v1::TaskState;
use prost::Message;
use prost::bytes::Bytes;
use redb::{ReadableTable, Table, WriteTransaction};

use super::index::{IndexKeys, Indexed};
use super::index::{read_ready, ready_key};
use super::records::{enter_state, is_final, ready_task, ready_task_in, wire_state};
use super::writer::{DeadSelection, Enqueued, Failure, SettingsUpdate, SettleOutcome};
use super::{IDEMPOTENCY, IDEMPOTENCY_EXPIRY, META, QUEUES, TASKS, add_micros, decode_record};
use crate::dispatch::{Claim, Dispatcher, Effect, ReadyKey, ReadyTask, SettledLease};
use crate::error::{BrokerError, StoreError};
use crate::settings::{QueueSettings, SettingsCache};
use crate::task::{NewTask, QueueName, TaskId, TaskIdGenerator};

/// Maximum number of dead tasks that one requeue or delete of a whole queue changes in
/// one transaction. The broker repeats the request until fewer are left.
pub const DEAD_BATCH: usize = 1000;

/// Maximum number of expired tasks or keys that one purge deletes.
const PURGE_BATCH: usize = 10_000;

/// The tables of one write transaction.
pub(crate) struct Tables<'txn> {
    tasks: Table<'txn, u128, &'static [u8]>,
    idempotency: Table<'txn, (&'static str, &'static str), (u128, i64)>,
    idempotency_expiry: Table<'txn, (i64, &'static str, &'static str), ()>,
    queues: Table<'txn, &'static str, &'static [u8]>,
    meta: Table<'txn, &'static str, u64>,
    /// Secondary indexes and counts, kept in step by every write below.
    pub index: Indexed<'txn>,
}

impl<'txn> Tables<'txn> {
    pub fn open(txn: &'txn WriteTransaction) -> Result<Self, StoreError> {
        Ok(Tables {
            tasks: txn.open_table(TASKS)?,
            idempotency: txn.open_table(IDEMPOTENCY)?,
            idempotency_expiry: txn.open_table(IDEMPOTENCY_EXPIRY)?,
            queues: txn.open_table(QUEUES)?,
            meta: txn.open_table(META)?,
            index: Indexed::open(txn)?,
        })
    }

    /// Writes what the batch changed besides records: counts and the sequence number. Hands
    /// the dispatcher the count changes and the earliest retry time.
    pub fn finish_batch(&mut self, cx: &mut Context<'_>) -> Result<(), StoreError> {
        let changes = self.index.write_counts()?;
        let changes: Vec<(QueueName, i32, i64)> = changes
            .into_iter()
            .filter_map(|(queue, state, change)| {
                Some((QueueName::parse("queue", &queue).ok()?, state, change))
            })
            .collect();
        if !changes.is_empty() {
            cx.effects.push(Effect::Counts(changes));
        }
        let next_retry = self.index.first_retry_at()?;
        cx.effects.push(Effect::NextRetry(next_retry));
        self.meta.insert("next_sequence", *cx.next_sequence)?;
        Ok(())
    }

    pub fn get_task(&self, task_id: TaskId) -> Result<Option<TaskRecord>, StoreError> {
        let Some(value) = self.tasks.get(task_id.as_key())? else {
            return Ok(None);
        };
        decode_record(task_id, value.value()).map(Some)
    }

    fn put_task(&mut self, task_id: TaskId, record: &TaskRecord) -> Result<(), StoreError> {
        self.tasks
            .insert(task_id.as_key(), record.encode_to_vec().as_slice())?;
        Ok(())
    }

    /// Stores a new task with its index entries.
    fn insert_task(&mut self, task_id: TaskId, record: &TaskRecord) -> Result<(), StoreError> {
        self.index.add(task_id, record)?;
        self.put_task(task_id, record)
    }

    /// Stores a changed task. `before` contains the index fields of the stored version,
    /// whose index entries are replaced by those of `record`.
    pub fn rewrite_task(
        &mut self,
        task_id: TaskId,
        before: &IndexKeys,
        record: &TaskRecord,
    ) -> Result<(), StoreError> {
        self.index.remove(task_id, before)?;
        self.index.add(task_id, record)?;
        self.put_task(task_id, record)
    }

    /// Deletes a task with its index entries and its idempotency key.
    fn delete_task(&mut self, task_id: TaskId, record: &TaskRecord) -> Result<(), StoreError> {
        self.index.remove(task_id, &IndexKeys::of(record))?;
        self.tasks.remove(task_id.as_key())?;
        self.release_idempotency_key(task_id, record)
    }

    fn release_idempotency_key(
        &mut self,
        task_id: TaskId,
        record: &TaskRecord,
    ) -> Result<(), StoreError> {
        if record.idempotency_key.is_empty() {
            return Ok(());
        }
        let key = (record.queue.as_str(), record.idempotency_key.as_str());
        let owned = self
            .idempotency
            .get(key)?
            .is_some_and(|entry| entry.value().0 == task_id.as_key());
        if owned {
            self.idempotency.remove(key)?;
        }
        Ok(())
    }

    pub fn queue_settings(&self, queue: &str) -> Result<Option<QueueSettingsRecord>, StoreError> {
        let Some(value) = self.queues.get(queue)? else {
            return Ok(None);
        };
        QueueSettingsRecord::decode(value.value())
            .map(Some)
            .map_err(|source| StoreError::DecodeSettings {
                queue: queue.to_owned(),
                source,
            })
    }
}

/// Moves a record into a final state, with its history and retention expiry. The caller
/// writes the record.
pub(crate) fn finish(
    record: &mut TaskRecord,
    state: TaskRecordState,
    now_us: i64,
    settings: &QueueSettings,
) {
    enter_state(record, state, now_us);
    record.retry_at_us = 0;
    let retention = if state == TaskRecordState::Dead {
        settings.dead_retention
    } else {
        settings.retention
    };
    record.expires_at_us = add_micros(now_us, retention);
}

/// Writer state that a request needs besides the tables.
pub(crate) struct Context<'a> {
    pub dispatcher: &'a Dispatcher,
    pub settings: &'a SettingsCache,
    pub now_us: i64,
    pub next_sequence: &'a mut u64,
    pub rng: &'a mut rand::rngs::StdRng,
    /// Source of new task ids.
    pub ids: &'a mut TaskIdGenerator<rand::rngs::StdRng>,
    /// Committed changes for the dispatcher, in order.
    pub effects: Vec<Effect>,
    /// Changes that undo the request's claims on the dispatcher if the batch fails.
    pub rollback: Vec<Effect>,
    /// Tasks whose new status watchers should see.
    pub changed: Vec<TaskId>,
}

pub(crate) fn enqueue(
    tables: &mut Tables<'_>,
    cx: &mut Context<'_>,
    tasks: &[NewTask],
) -> Result<Vec<Enqueued>, StoreError> {
    let mut enqueued = Vec::with_capacity(tasks.len());
    for task in tasks {
        let settings = cx.settings.get(&task.queue);
        if let Some(key) = &task.idempotency_key
            && let Some(existing) = find_idempotent(tables, &task.queue, key, cx.now_us)?
        {
            enqueued.push(Enqueued {
                id: existing,
                duplicate: true,
            });
            continue;
        }

        let task_id = cx.ids.next(u64::try_from(cx.now_us / 1000).unwrap_or(0));
        let mut record = TaskRecord {
            queue: task.queue.as_str().to_owned(),
            kind: task.kind.clone(),
            payload: task.payload.clone(),
            headers: task.headers.clone(),
            priority: task.priority,
            max_attempts: task.max_attempts.unwrap_or(settings.max_attempts),
            sequence: *cx.next_sequence,
            created_at_us: cx.now_us,
            idempotency_key: task.idempotency_key.clone().unwrap_or_default(),
            retry_policy: Some(
                task.retry_policy
                    .as_ref()
                    .unwrap_or(&settings.retry_policy)
                    .to_record(),
            ),
            ..TaskRecord::default()
        };
        *cx.next_sequence += 1;
        enter_state(&mut record, TaskRecordState::Pending, cx.now_us);
        tables.insert_task(task_id, &record)?;

        if let Some(key) = &task.idempotency_key {
            let expires_at = add_micros(cx.now_us, settings.idempotency_window);
            tables.idempotency.insert(
                (task.queue.as_str(), key.as_str()),
                (task_id.as_key(), expires_at),
            )?;
            tables
                .idempotency_expiry
                .insert((expires_at, task.queue.as_str(), key.as_str()), ())?;
        }
        cx.effects.push(Effect::Ready(Arc::new(ready_task_in(
            task.queue.clone(),
            task_id,
            &record,
        ))));
        enqueued.push(Enqueued {
            id: task_id,
            duplicate: false,
        });
    }
    Ok(enqueued)
}

/// Returns the task that owns an unexpired idempotency key, if it still exists.
fn find_idempotent(
    tables: &Tables<'_>,
    queue: &QueueName,
    key: &str,
    now_us: i64,
) -> Result<Option<TaskId>, StoreError> {
    let Some(entry) = tables.idempotency.get((queue.as_str(), key))? else {
        return Ok(None);
    };
    let (task, expires_at) = entry.value();
    if expires_at <= now_us || tables.tasks.get(task)?.is_none() {
        return Ok(None);
    }
    Ok(Some(TaskId::from_key(task)))
}

fn record_attempt(record: &mut TaskRecord, settled: &SettledLease, error: &str, now_us: i64) {
    record.attempts += 1;
    record.attempt_history.push(AttemptRecord {
        number: record.attempts,
        started_at_us: settled.started_at_us,
        finished_at_us: now_us,
        error: error.to_owned(),
    });
    enter_state(record, TaskRecordState::Leased, settled.started_at_us);
}

/// The stored record of a task whose lease was settled.
enum Settling {
    /// Not final yet: the settle applies to it.
    Open(Box<TaskRecord>),
    /// Already final, because it was cancelled while the settle waited for the writer.
    /// The settle changes nothing and reports this outcome.
    Final(SettleOutcome),
}

/// Marks a settled lease's task as no longer settling and reads its record. The outer error
/// fails the batch; the inner one fails this request only.
fn begin_settle(
    tables: &Tables<'_>,
    cx: &Context<'_>,
    settled: &SettledLease,
) -> Result<Result<Settling, BrokerError>, StoreError> {
    cx.dispatcher.finish_settling(settled.task.id);
    let Some(record) = tables.get_task(settled.task.id)? else {
        return Ok(Err(StoreError::Corrupt {
            task_id: settled.task.id,
            message: "a leased task is missing from the store".to_owned(),
        }
        .into()));
    };
    if is_final(record.state()) {
        return Ok(Ok(Settling::Final(SettleOutcome {
            state: record.state(),
            cancel_requested: record.cancel_requested,
        })));
    }
    Ok(Ok(Settling::Open(Box::new(record))))
}

pub(crate) fn complete(
    tables: &mut Tables<'_>,
    cx: &mut Context<'_>,
    settled: &SettledLease,
    result: &Bytes,
) -> Result<Result<SettleOutcome, BrokerError>, StoreError> {
    let mut record = match begin_settle(tables, cx, settled)? {
        Ok(Settling::Open(record)) => *record,
        Ok(Settling::Final(outcome)) => return Ok(Ok(outcome)),
        Err(err) => return Ok(Err(err)),
    };

    let before = IndexKeys::of(&record);
    record_attempt(&mut record, settled, "", cx.now_us);
    record.result = result.clone();
    let settings = cx.settings.get(&settled.task.queue);
    finish(
        &mut record,
        TaskRecordState::Succeeded,
        cx.now_us,
        &settings,
    );
    tables.rewrite_task(settled.task.id, &before, &record)?;
    cx.changed.push(settled.task.id);
    Ok(Ok(SettleOutcome {
        state: TaskRecordState::Succeeded,
        cancel_requested: record.cancel_requested,
    }))
}

pub(crate) fn fail(
    tables: &mut Tables<'_>,
    cx: &mut Context<'_>,
    settled: &SettledLease,
    failure: &Failure,
) -> Result<Result<SettleOutcome, BrokerError>, StoreError> {
    let mut record = match begin_settle(tables, cx, settled)? {
        Ok(Settling::Open(record)) => *record,
        Ok(Settling::Final(outcome)) => return Ok(Ok(outcome)),
        Err(err) => return Ok(Err(err)),
    };

    let before = IndexKeys::of(&record);
    let settings = cx.settings.get(&settled.task.queue);
    let task_id = settled.task.id;
    if failure.release {
        return release(tables, cx, settled, record, &before, &settings).map(Ok);
    }
    record_attempt(&mut record, settled, &failure.error, cx.now_us);
    record.last_error.clone_from(&failure.error);

    let state = if record.cancel_requested {
        TaskRecordState::Cancelled
    } else if failure.no_retry || record.attempts >= record.max_attempts {
        TaskRecordState::Dead
    } else {
        let policy = record
            .retry_policy
            .as_ref()
            .map(crate::retry::RetryPolicy::from_record);
        let delay = match (failure.retry_delay, policy) {
            (Some(delay), _) => delay,
            (None, Some(policy)) => policy.delay(record.attempts, cx.rng),
            (None, None) => settings.retry_policy.delay(record.attempts, cx.rng),
        };
        let retry_task = Arc::new(ReadyTask {
            attempts: record.attempts,
            ..ReadyTask::clone(&settled.task)
        });
        if delay.is_zero() {
            enter_state(&mut record, TaskRecordState::Pending, cx.now_us);
            cx.effects.push(Effect::Ready(retry_task));
            TaskRecordState::Pending
        } else {
            // The promotion at its retry time makes it ready again.
            record.retry_at_us = add_micros(cx.now_us, delay);
            enter_state(&mut record, TaskRecordState::RetryWait, cx.now_us);
            TaskRecordState::RetryWait
        }
    };
    if is_final(state) {
        finish(&mut record, state, cx.now_us, &settings);
    }
    tables.rewrite_task(task_id, &before, &record)?;
    cx.changed.push(task_id);
    Ok(Ok(SettleOutcome {
        state,
        cancel_requested: record.cancel_requested,
    }))
}

/// Returns a task that its worker never started to its queue, without counting the
/// attempt. A task whose cancellation was requested ends CANCELLED instead.
fn release(
    tables: &mut Tables<'_>,
    cx: &mut Context<'_>,
    settled: &SettledLease,
    mut record: TaskRecord,
    before: &IndexKeys,
    settings: &QueueSettings,
) -> Result<SettleOutcome, StoreError> {
    enter_state(&mut record, TaskRecordState::Leased, settled.started_at_us);
    let state = if record.cancel_requested {
        finish(&mut record, TaskRecordState::Cancelled, cx.now_us, settings);
        TaskRecordState::Cancelled
    } else {
        enter_state(&mut record, TaskRecordState::Pending, cx.now_us);
        cx.effects.push(Effect::Ready(Arc::clone(&settled.task)));
        TaskRecordState::Pending
    };
    tables.rewrite_task(settled.task.id, before, &record)?;
    cx.changed.push(settled.task.id);
    Ok(SettleOutcome {
        state,
        cancel_requested: record.cancel_requested,
    })
}

pub(crate) fn cancel(
    tables: &mut Tables<'_>,
    cx: &mut Context<'_>,
    task_id: TaskId,
) -> Result<Result<TaskState, BrokerError>, StoreError> {
    let Some(mut record) = tables.get_task(task_id)? else {
        return Ok(Err(BrokerError::TaskNotFound(task_id)));
    };
    if is_final(record.state()) {
        return Ok(Err(BrokerError::TaskFinal {
            task_id,
            state: wire_state(record.state())
                .as_str_name()
                .trim_start_matches("TASK_STATE_"),
        }));
    }

    let before = IndexKeys::of(&record);
    match cx.dispatcher.claim(task_id) {
        Claim::Leased => {
            record.cancel_requested = true;
            tables.rewrite_task(task_id, &before, &record)?;
            cx.effects.push(Effect::CancelRequested(task_id));
            cx.changed.push(task_id);
            return Ok(Ok(TaskState::Leased));
        }
        // The worker already settled the lease, so its queued Ack or Nack decides: an Ack
        // completes the task, anything else ends it CANCELLED with the attempt counted.
        Claim::Settling => {
            record.cancel_requested = true;
            tables.rewrite_task(task_id, &before, &record)?;
            cx.changed.push(task_id);
            return Ok(Ok(TaskState::Leased));
        }
        Claim::Ready(task) => cx.rollback.push(Effect::Ready(task)),
        // Beyond the window, waiting for a retry, or made ready earlier in this batch: the
        // Forget effect below removes it from memory if it gets there.
        Claim::Absent => {}
    }
    let settings = cx
        .settings
        .get(
            &QueueName::parse("queue", &record.queue).map_err(|_| StoreError::Corrupt {
                task_id,
                message: format!("invalid queue name {:?}", record.queue),
            })?,
        );
    finish(
        &mut record,
        TaskRecordState::Cancelled,
        cx.now_us,
        &settings,
    );
    tables.rewrite_task(task_id, &before, &record)?;
    // The task may also have become ready earlier in this batch.
    cx.effects.push(Effect::Forget(task_id));
    cx.changed.push(task_id);
    Ok(Ok(TaskState::Cancelled))
}

pub(crate) fn purge_queue(
    tables: &mut Tables<'_>,
    cx: &mut Context<'_>,
    queue: &QueueName,
) -> Result<u64, StoreError> {
    let start = ready_key(queue.as_str(), i32::MAX, 0);
    let end = ready_key(queue.as_str(), i32::MIN, u64::MAX);
    let mut ids = Vec::new();
    for entry in tables.index.ready.range(start..=end)? {
        let (_, task) = entry?;
        ids.push(TaskId::from_key(task.value()));
    }
    // Retry-waiting tasks of every queue share one index by retry time, so the queue's
    // own are picked by their records below.
    for entry in tables.index.waiting.iter()? {
        let (_, task) = entry?;
        ids.push(TaskId::from_key(task.value()));
    }
    let mut purged = 0;
    for task_id in ids {
        // A leased task finishes its attempt; its worker's Ack or Nack settles it.
        if cx.dispatcher.is_held(task_id) {
            continue;
        }
        let Some(record) = tables.get_task(task_id)? else {
            continue;
        };
        if record.queue != queue.as_str() {
            continue;
        }
        tables.delete_task(task_id, &record)?;
        cx.effects.push(Effect::Forget(task_id));
        purged += 1;
    }
    Ok(purged)
}

/// Reads up to `limit` entries of a queue's ready index after `after` and hands the
/// pending ones to the dispatcher's window.
pub(crate) fn refill(
    tables: &mut Tables<'_>,
    cx: &mut Context<'_>,
    queue: &QueueName,
    after: Option<ReadyKey>,
    limit: usize,
) -> Result<(), StoreError> {
    let (mut tasks, last, exhausted) =
        read_ready(&tables.index.ready, &tables.tasks, queue, after, limit)?;
    // A held task's own Ack or Nack decides its next state. If that settle comes later in
    // this batch, the record read here would carry its old attempt count.
    tasks.retain(|task| !cx.dispatcher.is_held(task.id));
    cx.effects.push(Effect::Refilled {
        queue: queue.clone(),
        after,
        tasks,
        last,
        exhausted,
    });
    Ok(())
}

/// Maximum number of retry-waiting tasks that one promotion makes pending.
const PROMOTE_BATCH: usize = 10_000;

/// Makes retry-waiting tasks whose retry time is at or before `now_us` pending, at most
/// `PROMOTE_BATCH`.
pub(crate) fn promote(
    tables: &mut Tables<'_>,
    cx: &mut Context<'_>,
    now_us: i64,
) -> Result<(), StoreError> {
    let mut due = Vec::new();
    for entry in tables
        .index
        .waiting
        .range(..(now_us.saturating_add(1), 0u64))?
        .take(PROMOTE_BATCH)
    {
        let (_, task) = entry?;
        due.push(TaskId::from_key(task.value()));
    }
    for task_id in due {
        let Some(mut record) = tables.get_task(task_id)? else {
            continue;
        };
        if record.state() != TaskRecordState::RetryWait {
            continue;
        }
        let before = IndexKeys::of(&record);
        record.retry_at_us = 0;
        enter_state(&mut record, TaskRecordState::Pending, cx.now_us);
        tables.rewrite_task(task_id, &before, &record)?;
        cx.effects
            .push(Effect::Ready(Arc::new(ready_task(task_id, &record)?)));
        cx.changed.push(task_id);
    }
    Ok(())
}

pub(crate) fn update_settings(
    tables: &mut Tables<'_>,
    cx: &mut Context<'_>,
    queue: &QueueName,
    update: &SettingsUpdate,
) -> Result<QueueSettingsRecord, StoreError> {
    let mut record = tables.queue_settings(queue.as_str())?.unwrap_or_default();
    let patch = &update.patch;
    if patch.max_attempts.is_some() {
        record.max_attempts = patch.max_attempts;
    }
    if patch.retry_policy.is_some() {
        record.retry_policy.clone_from(&patch.retry_policy);
    }
    if patch.lease_duration_ms.is_some() {
        record.lease_duration_ms = patch.lease_duration_ms;
    }
    if patch.retention_ms.is_some() {
        record.retention_ms = patch.retention_ms;
    }
    if patch.dead_retention_ms.is_some() {
        record.dead_retention_ms = patch.dead_retention_ms;
    }
    if patch.idempotency_window_ms.is_some() {
        record.idempotency_window_ms = patch.idempotency_window_ms;
    }
    if let Some(paused) = update.paused {
        record.paused = paused;
    }
    tables
        .queues
        .insert(queue.as_str(), record.encode_to_vec().as_slice())?;
    cx.effects.push(Effect::Paused {
        queue: queue.clone(),
        paused: record.paused,
    });
    Ok(record)
}

/// Returns the dead tasks of a queue that a selection names, at most `DEAD_BATCH` for
/// `All`.
fn select_dead(
    tables: &Tables<'_>,
    queue: &QueueName,
    selection: &DeadSelection,
) -> Result<Vec<(TaskId, TaskRecord)>, StoreError> {
    let mut selected = Vec::new();
    match selection {
        DeadSelection::Ids(ids) => {
            for &task_id in ids {
                if let Some(record) = tables.get_task(task_id)?
                    && record.queue == queue.as_str()
                    && record.state() == TaskRecordState::Dead
                {
                    selected.push((task_id, record));
                }
            }
        }
        DeadSelection::All => {
            let start = (queue.as_str(), i64::MIN, 0u128);
            let end = (queue.as_str(), i64::MAX, u128::MAX);
            let mut ids = Vec::new();
            for entry in tables.index.dead.range(start..=end)?.take(DEAD_BATCH) {
                let (key, _) = entry?;
                ids.push(TaskId::from_key(key.value().2));
            }
            for task_id in ids {
                if let Some(record) = tables.get_task(task_id)? {
                    selected.push((task_id, record));
                }
            }
        }
    }
    Ok(selected)
}

pub(crate) fn requeue_dead(
    tables: &mut Tables<'_>,
    cx: &mut Context<'_>,
    queue: &QueueName,
    selection: &DeadSelection,
) -> Result<u64, StoreError> {
    let selected = select_dead(tables, queue, selection)?;
    for (task_id, mut record) in selected.iter().cloned() {
        let before = IndexKeys::of(&record);
        record.attempts = 0;
        record.expires_at_us = 0;
        record.cancel_requested = false;
        enter_state(&mut record, TaskRecordState::Pending, cx.now_us);
        tables.rewrite_task(task_id, &before, &record)?;
        cx.effects
            .push(Effect::Ready(Arc::new(ready_task(task_id, &record)?)));
        cx.changed.push(task_id);
    }
    Ok(selected.len() as u64)
}

pub(crate) fn delete_dead(
    tables: &mut Tables<'_>,
    queue: &QueueName,
    selection: &DeadSelection,
) -> Result<u64, StoreError> {
    let selected = select_dead(tables, queue, selection)?;
    for (task_id, record) in &selected {
        tables.delete_task(*task_id, record)?;
    }
    Ok(selected.len() as u64)
}

/// Deletes tasks whose retention has ended and idempotency keys whose window has ended,
/// at most `PURGE_BATCH` of each.
pub(crate) fn purge_expired(
    tables: &mut Tables<'_>,
    cx: &mut Context<'_>,
) -> Result<(), StoreError> {
    let now_us = cx.now_us;
    let mut expired = Vec::new();
    for entry in tables
        .index
        .retention
        .range(..(now_us.saturating_add(1), 0u128))?
        .take(PURGE_BATCH)
    {
        let (key, _) = entry?;
        expired.push(key.value());
    }
    let mut purged = 0;
    for (expires_at, task) in expired {
        tables.index.retention.remove((expires_at, task))?;
        let task_id = TaskId::from_key(task);
        let Some(record) = tables.get_task(task_id)? else {
            continue;
        };
        // An older index entry of a task that was requeued and finished again.
        if record.expires_at_us != expires_at {
            continue;
        }
        tables.delete_task(task_id, &record)?;
        purged += 1;
    }

    let mut keys = Vec::new();
    for entry in tables
        .idempotency_expiry
        .range(..(now_us.saturating_add(1), "", ""))?
        .take(PURGE_BATCH)
    {
        let (key, _) = entry?;
        let (expires_at, queue, idempotency_key) = key.value();
        keys.push((expires_at, queue.to_owned(), idempotency_key.to_owned()));
    }
    for (expires_at, queue, key) in &keys {
        tables
            .idempotency_expiry
            .remove((*expires_at, queue.as_str(), key.as_str()))?;
        let current = tables
            .idempotency
            .get((queue.as_str(), key.as_str()))?
            .map(|entry| entry.value().1);
        if current == Some(*expires_at) {
            tables.idempotency.remove((queue.as_str(), key.as_str()))?;
        }
    }
    if purged > 0 || !keys.is_empty() {
        tracing::debug!(
            tasks = purged,
            idempotency_keys = keys.len(),
            "purged expired entries"
        );
    }
    Ok(())
}
