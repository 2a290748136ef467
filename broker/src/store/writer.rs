//! The storage writer: one thread that owns every redb write transaction.
//!
//! Requests reach it through a bounded channel, each with an optional reply channel. The
//! writer takes everything waiting, up to a batch limit, applies it in one transaction,
//! commits once (an fsync), hands the committed changes to the dispatcher and only then
//! replies. A request that got its reply is therefore durable, and the fsync cost is shared
//! by the whole batch.

use std::sync::Arc;
use std::thread::JoinHandle;

use docket_proto::storage::{TaskRecord, TaskRecordState};
use prost::Message;
use prost::bytes::Bytes;
use redb::{Database, ReadableTable, Table};
use tokio::sync::{mpsc, oneshot};

use super::{Store, TASKS, decode_record, now_micros, ready_task};
use crate::dispatch::{Dispatcher, ReadyTask};
use crate::error::StoreError;
use crate::task::{NewTask, TaskId};

/// A request to the storage writer.
pub enum WriteOp {
    /// Store new tasks and make them deliverable.
    Enqueue {
        /// Validated tasks, in request order.
        tasks: Vec<NewTask>,
        /// Receives the new ids in request order once the batch is durable.
        reply: oneshot::Sender<Result<Vec<TaskId>, StoreError>>,
    },
    /// Mark a task succeeded. Its lease has already been settled in memory.
    Complete {
        /// The task as it was leased.
        task: Arc<ReadyTask>,
        /// Result to store with it.
        result: Bytes,
        /// Receives the outcome once it is durable.
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    /// Record a failed attempt; the task is offered again or, after its last attempt,
    /// dead-lettered. Its lease has already been settled in memory.
    Fail {
        /// The task as it was leased.
        task: Arc<ReadyTask>,
        /// Error message of the failed attempt.
        error: String,
        /// Receives the task's new state once it is durable. `None` for an expired lease
        /// or a closed stream, where no request waits.
        reply: Option<oneshot::Sender<Result<TaskRecordState, StoreError>>>,
    },
}

/// Sending side of the writer's request channel.
#[derive(Clone)]
pub struct WriterHandle {
    sender: mpsc::Sender<WriteOp>,
}

impl WriterHandle {
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

    /// Queues a request without waiting. Returns the request if the channel is full.
    pub fn try_send(&self, op: WriteOp) -> Result<(), WriteOp> {
        match self.sender.try_send(op) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(op) | mpsc::error::TrySendError::Closed(op)) => {
                Err(op)
            }
        }
    }
}

/// Starts the writer thread. It runs until every `WriterHandle` is dropped and the channel
/// is drained.
pub fn spawn(
    store: Arc<Store>,
    dispatcher: Arc<Dispatcher>,
    next_sequence: u64,
    capacity: usize,
    max_batch: usize,
) -> std::io::Result<(WriterHandle, JoinHandle<()>)> {
    let (sender, receiver) = mpsc::channel(capacity.max(1));
    let writer = Writer {
        store,
        dispatcher,
        next_sequence,
        max_batch: max_batch.max(1),
    };
    let thread = std::thread::Builder::new()
        .name("docket-writer".into())
        .spawn(move || writer.run(receiver))?;
    Ok((WriterHandle { sender }, thread))
}

struct Writer {
    store: Arc<Store>,
    dispatcher: Arc<Dispatcher>,
    next_sequence: u64,
    max_batch: usize,
}

/// A committed request's change to the in-memory state, with its reply channel.
enum Applied {
    Enqueue {
        tasks: Vec<Arc<ReadyTask>>,
        reply: oneshot::Sender<Result<Vec<TaskId>, StoreError>>,
    },
    Complete {
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    Fail {
        /// The task with its new attempt count, if it is to be offered again.
        retry: Option<Arc<ReadyTask>>,
        state: TaskRecordState,
        reply: Option<oneshot::Sender<Result<TaskRecordState, StoreError>>>,
    },
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

    /// Applies every request of `batch` in one transaction, commits, publishes the
    /// changes to the dispatcher, then replies. Drains `batch`.
    fn commit_batch(&mut self, batch: &mut Vec<WriteOp>) {
        let batch_len = batch.len();
        let mut applied = Vec::with_capacity(batch_len);
        let store = Arc::clone(&self.store);
        let outcome = self.apply_batch(&store.db, batch, &mut applied);

        if let Err(err) = outcome {
            tracing::error!(error = %err, requests = batch_len, "commit failed; the batch is rolled back");
            let message = err.to_string();
            for op in batch.drain(..) {
                fail_request(op, &self.dispatcher, || StoreError::BatchFailed {
                    message: message.clone(),
                });
            }
            return;
        }

        let mut ready = Vec::new();
        for change in &applied {
            match change {
                Applied::Enqueue { tasks, .. } => ready.extend(tasks.iter().cloned()),
                Applied::Fail {
                    retry: Some(task), ..
                } => ready.push(task.clone()),
                _ => {}
            }
        }
        self.dispatcher.make_ready(ready);

        for change in applied {
            match change {
                Applied::Enqueue { tasks, reply } => {
                    let _ = reply.send(Ok(tasks.iter().map(|task| task.id).collect()));
                }
                Applied::Complete { reply } => {
                    let _ = reply.send(Ok(()));
                }
                Applied::Fail { state, reply, .. } => {
                    if let Some(reply) = reply {
                        let _ = reply.send(Ok(state));
                    }
                }
            }
        }
    }

    /// Applies and commits the batch. A request whose record is missing or damaged fails
    /// alone; a redb error fails the whole batch.
    fn apply_batch(
        &mut self,
        db: &Database,
        batch: &mut Vec<WriteOp>,
        applied: &mut Vec<Applied>,
    ) -> Result<(), StoreError> {
        let txn = db.begin_write()?;
        {
            let mut table = txn.open_table(TASKS)?;
            let now = now_micros();
            // Requests are only moved out once the commit succeeded, so that a failed
            // commit can still reply to each of them.
            let mut pending = Vec::with_capacity(batch.len());
            for op in batch.iter() {
                pending.push(self.apply(&mut table, op, now)?);
            }
            drop(table);
            txn.commit()?;

            for (op, result) in batch.drain(..).zip(pending) {
                match result {
                    Ok(change) => applied.push(attach_reply(change, op)),
                    Err(err) => fail_request(op, &self.dispatcher, || err),
                }
            }
        }
        Ok(())
    }

    /// Applies one request to the open table. The outer error aborts the batch; the inner
    /// one fails this request only.
    fn apply(
        &mut self,
        table: &mut Table<u128, &[u8]>,
        op: &WriteOp,
        now: i64,
    ) -> Result<Result<Change, StoreError>, StoreError> {
        match op {
            WriteOp::Enqueue { tasks, .. } => {
                let mut ready = Vec::with_capacity(tasks.len());
                for task in tasks {
                    let task_id = TaskId::generate();
                    let record = TaskRecord {
                        queue: task.queue.as_str().to_owned(),
                        kind: task.kind.clone(),
                        payload: task.payload.clone(),
                        headers: task.headers.clone(),
                        priority: task.priority,
                        max_attempts: task.max_attempts,
                        sequence: self.next_sequence,
                        state: TaskRecordState::Pending.into(),
                        attempts: 0,
                        last_error: String::new(),
                        result: Bytes::new(),
                        created_at_us: now,
                        updated_at_us: now,
                    };
                    self.next_sequence += 1;
                    table.insert(task_id.as_key(), record.encode_to_vec().as_slice())?;
                    match ready_task(task_id, record) {
                        Ok(task) => ready.push(Arc::new(task)),
                        Err(err) => return Ok(Err(err)),
                    }
                }
                Ok(Ok(Change::Enqueued(ready)))
            }
            WriteOp::Complete { task, result, .. } => {
                let mut record = match read_record(table, task.id)? {
                    Ok(record) => record,
                    Err(err) => return Ok(Err(err)),
                };
                record.attempts += 1;
                record.set_state(TaskRecordState::Succeeded);
                record.result = result.clone();
                record.updated_at_us = now;
                table.insert(task.id.as_key(), record.encode_to_vec().as_slice())?;
                Ok(Ok(Change::Completed))
            }
            WriteOp::Fail { task, error, .. } => {
                let mut record = match read_record(table, task.id)? {
                    Ok(record) => record,
                    Err(err) => return Ok(Err(err)),
                };
                record.attempts += 1;
                record.last_error.clone_from(error);
                record.updated_at_us = now;
                let state = if record.attempts >= record.max_attempts {
                    TaskRecordState::Dead
                } else {
                    TaskRecordState::Pending
                };
                record.set_state(state);
                let attempts = record.attempts;
                table.insert(task.id.as_key(), record.encode_to_vec().as_slice())?;

                let retry = (state == TaskRecordState::Pending).then(|| {
                    Arc::new(ReadyTask {
                        attempts,
                        ..ReadyTask::clone(task)
                    })
                });
                Ok(Ok(Change::Failed { retry, state }))
            }
        }
    }
}

/// A change applied in the transaction, before its reply is attached.
enum Change {
    Enqueued(Vec<Arc<ReadyTask>>),
    Completed,
    Failed {
        retry: Option<Arc<ReadyTask>>,
        state: TaskRecordState,
    },
}

fn attach_reply(change: Change, op: WriteOp) -> Applied {
    match (change, op) {
        (Change::Enqueued(tasks), WriteOp::Enqueue { reply, .. }) => {
            Applied::Enqueue { tasks, reply }
        }
        (Change::Completed, WriteOp::Complete { reply, .. }) => Applied::Complete { reply },
        (Change::Failed { retry, state }, WriteOp::Fail { reply, .. }) => Applied::Fail {
            retry,
            state,
            reply,
        },
        // `apply` returns the change that matches its request's variant.
        _ => unreachable!("change does not match its write request"),
    }
}

/// Replies to a request that was not committed. A settled lease's task is offered again,
/// because its stored state did not change.
fn fail_request(op: WriteOp, dispatcher: &Dispatcher, error: impl FnOnce() -> StoreError) {
    match op {
        WriteOp::Enqueue { reply, .. } => {
            let _ = reply.send(Err(error()));
        }
        WriteOp::Complete { task, reply, .. } => {
            dispatcher.make_ready(vec![task]);
            let _ = reply.send(Err(error()));
        }
        WriteOp::Fail { task, reply, .. } => {
            let task_id = task.id;
            dispatcher.make_ready(vec![task]);
            let error = error();
            match reply {
                Some(reply) => {
                    let _ = reply.send(Err(error));
                }
                None => {
                    tracing::warn!(%task_id, error = %error, "failed attempt was not recorded; the task is offered again")
                }
            }
        }
    }
}

fn read_record(
    table: &Table<u128, &[u8]>,
    task_id: TaskId,
) -> Result<Result<TaskRecord, StoreError>, StoreError> {
    let Some(value) = table.get(task_id.as_key())? else {
        return Ok(Err(StoreError::Missing(task_id)));
    };
    Ok(decode_record(task_id, value.value()))
}
