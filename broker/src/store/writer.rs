//! The storage writer: one thread that owns every redb write transaction.
//!
//! Requests reach it through a bounded channel, each with an optional reply channel. The
//! writer takes everything waiting, up to a batch limit, applies it in one transaction,
//! commits once (an fsync), hands the committed changes to the dispatcher and only then
//! replies. A request that got its reply is therefore durable, and the fsync cost is shared
//! by the whole batch.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use docket_proto::storage::{QueueSettingsRecord, TaskRecordState};
use docket_proto::v1::TaskState;
use prost::bytes::Bytes;
use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio::sync::{mpsc, oneshot, watch};

use super::apply::{self, Context, Tables};
use super::{Store, status_of};
use crate::dispatch::timers::LEASE_EXPIRED;
use crate::dispatch::{Dispatcher, Effect, ReadyKey, SettledLease};
use crate::error::{BrokerError, StoreError};
use crate::metrics::{QueueMetricsCache, micros_to_seconds};
use crate::settings::SettingsCache;
use crate::task::{NewTask, QueueName, TaskId, TaskIdGenerator};

/// Receives a request's outcome once it is durable.
pub type Reply<T> = oneshot::Sender<Result<T, BrokerError>>;

/// A request to the storage writer.
pub enum WriteOp {
    /// Store new tasks and make them deliverable.
    Enqueue {
        /// Validated tasks, in request order.
        tasks: Vec<NewTask>,
        /// Receives one entry per task, in request order.
        reply: Reply<Vec<Enqueued>>,
    },
    /// Mark a task succeeded. Its lease has already been settled in memory.
    Complete {
        /// The settled lease.
        settled: SettledLease,
        /// Result to store with the task.
        result: Bytes,
        /// Receives the task's new state.
        reply: Reply<SettleOutcome>,
    },
    /// Record a failed attempt. Its lease has already been settled in memory.
    Fail {
        /// The settled lease.
        settled: SettledLease,
        /// Error and retry instructions.
        failure: Failure,
        /// Receives the task's new state; `None` for an expired lease or a closed
        /// stream, where no request waits.
        reply: Option<Reply<SettleOutcome>>,
    },
    /// Cancel a task, or request the cancellation of a leased one.
    Cancel {
        /// The task.
        task_id: TaskId,
        /// Receives CANCELLED, or LEASED if the holding worker was sent a cancellation notice.
        reply: Reply<TaskState>,
    },
    /// Delete every pending and retry-waiting task of a queue that no worker holds.
    PurgeQueue {
        /// The queue.
        queue: QueueName,
        /// Receives the number of tasks deleted.
        reply: Reply<u64>,
    },
    /// Read the next tasks of a queue's ready index for the dispatcher's window.
    Refill {
        /// The queue.
        queue: QueueName,
        /// Window position to read after; `None` from the start.
        after: Option<ReadyKey>,
        /// Maximum number of index entries to read.
        limit: usize,
    },
    /// Make retry-waiting tasks whose retry time is at or before `now_us` pending.
    Promote {
        /// Current time, in microseconds since the Unix epoch.
        now_us: i64,
    },
    /// Change a queue's stored settings.
    UpdateSettings {
        /// The queue.
        queue: QueueName,
        /// The fields to change.
        update: SettingsUpdate,
        /// Receives the stored settings after the change.
        reply: Reply<QueueSettingsRecord>,
    },
    /// Make dead tasks pending again, with their attempts reset.
    RequeueDead {
        /// The queue.
        queue: QueueName,
        /// Selection of dead tasks.
        selection: DeadSelection,
        /// Receives the number of tasks requeued.
        reply: Reply<u64>,
    },
    /// Delete dead tasks.
    DeleteDead {
        /// The queue.
        queue: QueueName,
        /// Selection of dead tasks.
        selection: DeadSelection,
        /// Receives the number of tasks deleted.
        reply: Reply<u64>,
    },
    /// Delete tasks and idempotency keys whose time has passed.
    Purge,
}

/// A failed attempt's error and retry instructions.
#[derive(Debug, Clone)]
pub struct Failure {
    /// Error message to store.
    pub error: String,
    /// Delay before the next attempt, overriding the retry policy.
    pub retry_delay: Option<Duration>,
    /// Dead-letter the task whatever attempts it has left.
    pub no_retry: bool,
    /// The worker never started the task: return it to its queue at once without
    /// counting the attempt.
    pub release: bool,
}

impl Failure {
    /// Creates the failure that the broker records itself, for an expired lease or a
    /// closed stream.
    pub fn released(error: &str) -> Self {
        Failure {
            error: error.to_owned(),
            retry_delay: None,
            no_retry: false,
            release: false,
        }
    }
}

/// One enqueued task.
#[derive(Debug, Clone, Copy)]
pub struct Enqueued {
    /// The task's id.
    pub id: TaskId,
    /// The idempotency key matched an earlier task, whose id this is.
    pub duplicate: bool,
}

/// A task's state after its lease was settled.
#[derive(Debug, Clone, Copy)]
pub struct SettleOutcome {
    /// The new stored state.
    pub state: TaskRecordState,
    /// A cancellation was requested while the task was leased.
    pub cancel_requested: bool,
}

/// Fields of a queue's settings to change.
#[derive(Debug, Clone, Default)]
pub struct SettingsUpdate {
    /// Set fields replace the stored ones; `paused` is ignored.
    pub patch: QueueSettingsRecord,
    /// New paused flag, if it changes.
    pub paused: Option<bool>,
}

/// Dead tasks that a requeue or delete applies to.
#[derive(Debug, Clone)]
pub enum DeadSelection {
    /// These tasks, where they are dead tasks of the queue.
    Ids(Vec<TaskId>),
    /// Every dead task of the queue, up to a batch limit per request.
    All,
}

/// Number of dead tasks that one `DeadSelection::All` request changes at most.
pub const DEAD_BATCH: usize = apply::DEAD_BATCH;

/// Sending side of the writer's request channel.
#[derive(Clone)]
pub struct WriterHandle {
    sender: mpsc::Sender<WriteOp>,
    committing: watch::Receiver<bool>,
}

impl WriterHandle {
    /// Returns a receiver of whether the last commit succeeded. It starts `true` and
    /// changes when a commit fails and when one succeeds again after a failure.
    pub fn committing(&self) -> watch::Receiver<bool> {
        self.committing.clone()
    }

    /// Queues a request, waiting while the channel is full.
    ///
    /// # Errors
    ///
    /// Fails with `WriterStopped` once the writer thread has ended.
    pub async fn send(&self, op: WriteOp) -> Result<(), StoreError> {
        self.sender
            .send(op)
            .await
            .map_err(|_| StoreError::WriterStopped)
    }

    /// Queues a request without being cancellable: if the channel is full, a spawned task
    /// waits for room. For requests whose state the caller already took from the
    /// dispatcher, such as a settled lease, which would be stranded in memory if a dropped
    /// RPC future lost the request.
    pub fn send_detached(&self, op: WriteOp) {
        if let Err(op) = self.try_send(op) {
            let sender = self.sender.clone();
            tokio::spawn(async move {
                if sender.send(*op).await.is_err() {
                    tracing::warn!(
                        "storage writer stopped before a request was queued; its task is offered again after restart"
                    );
                }
            });
        }
    }

    /// Returns a handle that does not keep the writer running.
    pub fn downgrade(&self) -> mpsc::WeakSender<WriteOp> {
        self.sender.downgrade()
    }

    /// Queues a request without waiting. Returns the request, boxed, if the channel is
    /// full or closed.
    pub fn try_send(&self, op: WriteOp) -> Result<(), Box<WriteOp>> {
        match self.sender.try_send(op) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(op) | mpsc::error::TrySendError::Closed(op)) => {
                Err(Box::new(op))
            }
        }
    }
}

/// Starts the writer thread. It runs until every `WriterHandle` is dropped and the channel
/// is drained.
pub fn spawn(
    store: Arc<Store>,
    dispatcher: Arc<Dispatcher>,
    settings: SettingsCache,
    next_sequence: u64,
    capacity: usize,
    max_batch: usize,
) -> std::io::Result<(WriterHandle, JoinHandle<()>)> {
    let (sender, receiver) = mpsc::channel(capacity.max(1));
    let (committing, committing_receiver) = watch::channel(true);
    let writer = Writer {
        committing,
        metrics: QueueMetricsCache::new(Arc::clone(dispatcher.metrics())),
        store,
        dispatcher,
        settings,
        next_sequence,
        max_batch: max_batch.max(1),
        rng: StdRng::from_os_rng(),
        ids: TaskIdGenerator::new(StdRng::from_os_rng()),
        buffers: Buffers::default(),
    };
    let thread = std::thread::Builder::new()
        .name("docket-writer".into())
        .spawn(move || writer.run(receiver))?;
    Ok((
        WriterHandle {
            sender,
            committing: committing_receiver,
        },
        thread,
    ))
}

struct Writer {
    /// Whether the last commit succeeded.
    committing: watch::Sender<bool>,
    /// Per-queue handles of the counters that committed changes update.
    metrics: QueueMetricsCache,
    store: Arc<Store>,
    dispatcher: Arc<Dispatcher>,
    settings: SettingsCache,
    next_sequence: u64,
    max_batch: usize,
    rng: StdRng,
    ids: TaskIdGenerator<StdRng>,
    buffers: Buffers,
}

/// Lists that each batch fills and empties, kept with their capacity between batches.
/// Allocating them anew for a large batch cost the writer fresh memory pages each time.
#[derive(Default)]
struct Buffers {
    effects: Vec<Effect>,
    rollback: Vec<Effect>,
    changed: Vec<TaskId>,
}

impl Buffers {
    fn take_from(cx: Context<'_>) -> Self {
        Buffers {
            effects: cx.effects,
            rollback: cx.rollback,
            changed: cx.changed,
        }
    }

    /// Empties the lists and keeps their capacity.
    fn cleared(mut self) -> Self {
        self.effects.clear();
        self.rollback.clear();
        self.changed.clear();
        self
    }
}

/// A request's outcome, before its reply is sent.
enum Done {
    Enqueued(Vec<Enqueued>),
    Settled(SettleOutcome),
    Cancelled(TaskState),
    Count(u64),
    Settings(QueueSettingsRecord),
    Nothing,
}

impl Writer {
    fn run(mut self, mut receiver: mpsc::Receiver<WriteOp>) {
        let mut batch = Vec::with_capacity(self.max_batch);
        while let Some(op) = receiver.blocking_recv() {
            batch.push(op);
            while batch.len() < self.max_batch {
                match receiver.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            self.commit_batch(&mut batch);
        }
        tracing::debug!("storage writer stopped");
    }

    /// Applies every request of `batch` in one transaction, commits, hands the changes to
    /// the dispatcher, then replies. Drains `batch`.
    fn commit_batch(&mut self, batch: &mut Vec<WriteOp>) {
        let store = Arc::clone(&self.store);
        let mut cx = Context {
            dispatcher: &self.dispatcher,
            settings: &self.settings,
            now_us: super::now_micros(),
            next_sequence: &mut self.next_sequence,
            rng: &mut self.rng,
            ids: &mut self.ids,
            effects: std::mem::take(&mut self.buffers.effects),
            rollback: std::mem::take(&mut self.buffers.rollback),
            changed: std::mem::take(&mut self.buffers.changed),
        };

        let started = Instant::now();
        let outcomes = match apply_batch(&store, &mut cx, batch) {
            Ok(outcomes) => outcomes,
            Err(err) => {
                self.metrics.metrics().record_commit_failure();
                tracing::error!(error = %err, requests = batch.len(), "commit failed; the batch is rolled back");
                self.committing.send_replace(false);
                let mut buffers = Buffers::take_from(cx);
                let message = err.to_string();
                for op in batch.drain(..) {
                    fail_request(op, &message);
                }
                self.dispatcher.apply(buffers.rollback.drain(..));
                self.buffers = buffers.cleared();
                return;
            }
        };

        self.metrics
            .metrics()
            .record_commit(batch.len(), started.elapsed());
        if !*self.committing.borrow() {
            tracing::info!("commits succeed again");
            self.committing.send_replace(true);
        }
        let mut buffers = Buffers::take_from(cx);
        self.count_committed(batch, &outcomes);
        for (op, outcome) in batch.iter().zip(&outcomes) {
            if let (WriteOp::UpdateSettings { queue, .. }, Ok(Done::Settings(record))) =
                (op, outcome)
            {
                self.settings.set(queue.clone(), *record);
            }
        }
        // Watchers get the committed statuses before the effects run, because dispatching
        // may deliver a task at once and publish its LEASED status.
        self.publish_to_watchers(&buffers.changed);
        self.dispatcher.apply(buffers.effects.drain(..));
        self.buffers = buffers.cleared();

        for (op, outcome) in batch.drain(..).zip(outcomes) {
            reply(op, outcome);
        }
    }

    /// Counts the committed state changes of a batch by queue, before any reply is sent, so
    /// that a client that got its reply finds the change in the metrics.
    fn count_committed(&mut self, batch: &[WriteOp], outcomes: &[Result<Done, BrokerError>]) {
        let now_us = super::now_micros();
        for (op, outcome) in batch.iter().zip(outcomes) {
            match (op, outcome) {
                (WriteOp::Enqueue { tasks, .. }, Ok(Done::Enqueued(enqueued))) => {
                    self.count_enqueued(tasks, enqueued);
                }
                // Another state means the task was final before the Ack arrived.
                (WriteOp::Complete { settled, .. }, Ok(Done::Settled(settle)))
                    if settle.state == TaskRecordState::Succeeded =>
                {
                    let queue = self.metrics.get(&settled.task.queue);
                    queue.acked.inc();
                    let held_us = now_us.saturating_sub(settled.started_at_us);
                    queue.ack_latency.observe(micros_to_seconds(held_us));
                }
                (
                    WriteOp::Fail {
                        settled,
                        failure,
                        reply,
                    },
                    Ok(Done::Settled(settle)),
                ) => {
                    let queue = self.metrics.get(&settled.task.queue);
                    // Only a Nack waits for a reply. The broker's own failures, for an
                    // expired lease or a closed stream, carry their fixed error message.
                    if reply.is_some() && failure.release {
                        queue.released.inc();
                    } else if reply.is_some() {
                        queue.nacked.inc();
                    } else if failure.error == LEASE_EXPIRED {
                        queue.expired.inc();
                    }
                    if settle.state == TaskRecordState::Dead {
                        queue.dead_lettered.inc();
                    } else if settle.state == TaskRecordState::Cancelled && settle.cancel_requested
                    {
                        queue.cancelled.inc();
                    }
                }
                (WriteOp::Cancel { task_id, .. }, Ok(Done::Cancelled(TaskState::Cancelled))) => {
                    self.count_cancelled(*task_id);
                }
                _ => {}
            }
        }
    }

    /// Counts the tasks of an Enqueue that were stored, leaving out duplicates of an
    /// idempotency key. A batch usually names one queue, so each run of tasks with the same
    /// queue takes one lookup and one atomic addition.
    fn count_enqueued(&mut self, tasks: &[NewTask], enqueued: &[Enqueued]) {
        let mut run: Option<(&QueueName, u64)> = None;
        for (task, entry) in tasks.iter().zip(enqueued) {
            if entry.duplicate {
                continue;
            }
            match &mut run {
                Some((queue, count)) if *queue == &task.queue => *count += 1,
                _ => {
                    if let Some((queue, count)) = run.replace((&task.queue, 1)) {
                        self.metrics.get(queue).enqueued.inc_by(count);
                    }
                }
            }
        }
        if let Some((queue, count)) = run {
            self.metrics.get(queue).enqueued.inc_by(count);
        }
    }

    /// Counts a task that Cancel ended, under the queue in its stored record, because the
    /// request names the task only.
    fn count_cancelled(&mut self, task_id: TaskId) {
        let queue = match self.store.read_task(task_id) {
            Ok(Some(record)) => QueueName::parse("queue", &record.queue).ok(),
            Ok(None) => None,
            Err(err) => {
                tracing::warn!(%task_id, error = %err, "reading a cancelled task to count it failed");
                None
            }
        };
        if let Some(queue) = queue {
            self.metrics.get(&queue).cancelled.inc();
        }
    }

    /// Sends the committed status of each changed task to its watchers.
    fn publish_to_watchers(&self, changed: &[TaskId]) {
        let watchers = &self.dispatcher.watchers;
        for &task_id in changed {
            if !watchers.is_watched(task_id) {
                continue;
            }
            match self.store.read_task(task_id) {
                Ok(Some(record)) => {
                    let lease = self.dispatcher.lease_of(task_id);
                    watchers.publish(task_id, status_of(task_id, &record, lease.as_ref()));
                }
                Ok(None) => {}
                Err(err) => {
                    tracing::warn!(%task_id, error = %err, "cannot read a changed task for its watchers")
                }
            }
        }
    }
}

/// Applies and commits the batch. A request that fails on its own (an unknown task, a
/// damaged record) fails alone; a redb error fails the whole batch.
fn apply_batch(
    store: &Store,
    cx: &mut Context<'_>,
    batch: &[WriteOp],
) -> Result<Vec<Result<Done, BrokerError>>, StoreError> {
    let txn = store.db.begin_write()?;
    let mut outcomes = Vec::with_capacity(batch.len());
    {
        let mut tables = Tables::open(&txn)?;
        for op in batch {
            outcomes.push(apply_one(&mut tables, cx, op)?);
        }
        tables.finish_batch(cx)?;
    }
    if let Some(fault) = store.injected_fault() {
        return Err(fault);
    }
    txn.commit()?;
    Ok(outcomes)
}

fn apply_one(
    tables: &mut Tables<'_>,
    cx: &mut Context<'_>,
    op: &WriteOp,
) -> Result<Result<Done, BrokerError>, StoreError> {
    Ok(match op {
        WriteOp::Enqueue { tasks, .. } => Ok(Done::Enqueued(apply::enqueue(tables, cx, tasks)?)),
        WriteOp::Complete {
            settled, result, ..
        } => {
            cx.rollback.push(Effect::Ready(Arc::clone(&settled.task)));
            apply::complete(tables, cx, settled, result)?.map(Done::Settled)
        }
        WriteOp::Fail {
            settled, failure, ..
        } => {
            cx.rollback.push(Effect::Ready(Arc::clone(&settled.task)));
            apply::fail(tables, cx, settled, failure)?.map(Done::Settled)
        }
        WriteOp::Cancel { task_id, .. } => {
            apply::cancel(tables, cx, *task_id)?.map(Done::Cancelled)
        }
        WriteOp::PurgeQueue { queue, .. } => {
            Ok(Done::Count(apply::purge_queue(tables, cx, queue)?))
        }
        WriteOp::Refill {
            queue,
            after,
            limit,
        } => {
            // If the batch fails, this empty refill lets the dispatcher ask again.
            cx.rollback.push(Effect::Refilled {
                queue: queue.clone(),
                after: *after,
                tasks: Vec::new(),
                last: *after,
                exhausted: false,
            });
            apply::refill(tables, cx, queue, *after, *limit)?;
            Ok(Done::Nothing)
        }
        WriteOp::Promote { now_us } => {
            apply::promote(tables, cx, *now_us)?;
            Ok(Done::Nothing)
        }
        WriteOp::UpdateSettings { queue, update, .. } => Ok(Done::Settings(
            apply::update_settings(tables, cx, queue, update)?,
        )),
        WriteOp::RequeueDead {
            queue, selection, ..
        } => Ok(Done::Count(apply::requeue_dead(
            tables, cx, queue, selection,
        )?)),
        WriteOp::DeleteDead {
            queue, selection, ..
        } => Ok(Done::Count(apply::delete_dead(tables, queue, selection)?)),
        WriteOp::Purge => {
            apply::purge_expired(tables, cx)?;
            Ok(Done::Nothing)
        }
    })
}

/// Sends a committed request's outcome.
fn reply(op: WriteOp, outcome: Result<Done, BrokerError>) {
    fn send<T>(reply: Reply<T>, outcome: Result<T, BrokerError>) {
        // The requester may have gone away; the change is committed either way.
        let _ = reply.send(outcome);
    }
    let mismatch = || BrokerError::Store(StoreError::WriterStopped);
    match op {
        WriteOp::Enqueue { reply, .. } => send(
            reply,
            outcome.and_then(|done| match done {
                Done::Enqueued(enqueued) => Ok(enqueued),
                _ => Err(mismatch()),
            }),
        ),
        WriteOp::Complete { reply, .. } => send(reply, settle_outcome(outcome)),
        WriteOp::Fail { reply, settled, .. } => match reply {
            Some(reply) => send(reply, settle_outcome(outcome)),
            None => {
                if let Err(err) = outcome {
                    tracing::warn!(task_id = %settled.task.id, error = %err, "failed attempt was not recorded");
                }
            }
        },
        WriteOp::Cancel { reply, .. } => send(
            reply,
            outcome.and_then(|done| match done {
                Done::Cancelled(state) => Ok(state),
                _ => Err(mismatch()),
            }),
        ),
        WriteOp::PurgeQueue { reply, .. }
        | WriteOp::RequeueDead { reply, .. }
        | WriteOp::DeleteDead { reply, .. } => send(
            reply,
            outcome.and_then(|done| match done {
                Done::Count(count) => Ok(count),
                _ => Err(mismatch()),
            }),
        ),
        WriteOp::UpdateSettings { reply, .. } => send(
            reply,
            outcome.and_then(|done| match done {
                Done::Settings(record) => Ok(record),
                _ => Err(mismatch()),
            }),
        ),
        WriteOp::Refill { queue, .. } => {
            if let Err(err) = outcome {
                tracing::warn!(%queue, error = %err, "reading the next ready tasks failed");
            }
        }
        WriteOp::Promote { .. } => {
            if let Err(err) = outcome {
                tracing::warn!(error = %err, "making due retries pending failed");
            }
        }
        WriteOp::Purge => {
            if let Err(err) = outcome {
                tracing::warn!(error = %err, "purge of expired entries failed");
            }
        }
    }
}

fn settle_outcome(outcome: Result<Done, BrokerError>) -> Result<SettleOutcome, BrokerError> {
    outcome.and_then(|done| match done {
        Done::Settled(settled) => Ok(settled),
        _ => Err(BrokerError::Store(StoreError::WriterStopped)),
    })
}

/// Replies to a request of a batch that failed to commit. The caller undoes the
/// dispatcher's claims.
fn fail_request(op: WriteOp, message: &str) {
    let error = || {
        BrokerError::Store(StoreError::BatchFailed {
            message: message.to_owned(),
        })
    };
    match op {
        WriteOp::Fail {
            reply: None,
            settled,
            ..
        } => {
            tracing::warn!(task_id = %settled.task.id, error = message, "failed attempt was not recorded; the task is offered again");
        }
        WriteOp::Purge | WriteOp::Refill { .. } | WriteOp::Promote { .. } => {}
        op => reply(op, Err(error())),
    }
}
