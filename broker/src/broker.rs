//! The broker's operations at the level of the domain: what the gRPC layer calls once it
//! has validated and converted a request.

use std::sync::Arc;
use std::time::Duration;

use docket_proto::storage::TaskRecordState;
use docket_proto::v1;
use prost::bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::dispatch::{Dispatcher, ReadyTask, Redeliver, SubscriberId, Subscription};
use crate::error::{BrokerError, StoreError};
use crate::store::writer::{WriteOp, WriterHandle};
use crate::store::{Store, timestamp_from_micros};
use crate::task::{LeaseId, Limits, NewTask, TaskId, truncate_error_message};

/// Error stored on a task whose Subscribe stream closed while it held the lease.
pub const STREAM_CLOSED: &str = "worker stream closed while the task was leased";

/// The broker: store, writer and dispatcher behind one handle, shared by every RPC.
pub struct Broker {
    pub(crate) dispatcher: Arc<Dispatcher>,
    writer: WriterHandle,
    store: Arc<Store>,
    pub(crate) limits: Limits,
    heartbeat_interval: Duration,
    pub(crate) shutdown: CancellationToken,
}

impl Broker {
    pub(crate) fn new(
        dispatcher: Arc<Dispatcher>,
        writer: WriterHandle,
        store: Arc<Store>,
        limits: Limits,
        heartbeat_interval: Duration,
        shutdown: CancellationToken,
    ) -> Self {
        Broker {
            dispatcher,
            writer,
            store,
            limits,
            heartbeat_interval,
            shutdown,
        }
    }

    /// Stores a validated batch and returns the new ids, in order, once it is durable.
    ///
    /// # Errors
    ///
    /// `ShuttingDown` once shutdown has begun; `Store` if the commit failed, in which case
    /// nothing of the batch was stored.
    pub async fn enqueue(&self, tasks: Vec<NewTask>) -> Result<Vec<TaskId>, BrokerError> {
        self.ensure_running()?;
        let (reply, response) = oneshot::channel();
        self.write(WriteOp::Enqueue { tasks, reply }).await?;
        Ok(response.await.map_err(|_| StoreError::WriterStopped)??)
    }

    /// Registers a Subscribe stream.
    pub fn subscribe(
        &self,
        subscription: Subscription,
    ) -> (SubscriberId, mpsc::Receiver<v1::SubscribeResponse>) {
        self.dispatcher.subscribe(subscription)
    }

    /// Removes a Subscribe stream whose client went away, and records each lease it held
    /// as a failed attempt. Runs from a `Drop`, so it must not wait.
    pub fn unsubscribe(&self, id: SubscriberId) {
        let released = self.dispatcher.unsubscribe(id);
        if released.is_empty() {
            return;
        }
        tracing::debug!(
            subscriber = id,
            leases = released.len(),
            "stream closed while holding leases"
        );
        for task in released {
            self.record_failure_in_background(task, STREAM_CLOSED);
        }
    }

    /// Completes the task under a live lease, storing `result`.
    ///
    /// # Errors
    ///
    /// `InvalidArgument` for an oversize result, `LeaseNotLive` for an unknown, expired
    /// or settled lease, `Store` if the commit failed (the task is then offered again).
    pub async fn ack(&self, lease_id: LeaseId, result: Bytes) -> Result<(), BrokerError> {
        if result.len() > self.limits.max_result_bytes {
            return Err(BrokerError::invalid(
                "result",
                format!(
                    "result of {} bytes exceeds the limit of {} bytes",
                    result.len(),
                    self.limits.max_result_bytes
                ),
            ));
        }
        self.ensure_running()?;
        let task = self.dispatcher.settle(&lease_id, Redeliver::Now)?;
        tracing::debug!(task_id = %task.id, %lease_id, "ack");
        let (reply, response) = oneshot::channel();
        self.write(WriteOp::Complete {
            task,
            result,
            reply,
        })
        .await?;
        Ok(response.await.map_err(|_| StoreError::WriterStopped)??)
    }

    /// Fails the attempt under a live lease and returns the task's new stored state:
    /// pending if it will be offered again, dead after its last attempt.
    ///
    /// # Errors
    ///
    /// `LeaseNotLive` for an unknown, expired or settled lease, `Store` if the commit
    /// failed (the task is then offered again).
    pub async fn nack(
        &self,
        lease_id: LeaseId,
        error: String,
    ) -> Result<TaskRecordState, BrokerError> {
        self.ensure_running()?;
        let task = self.dispatcher.settle(&lease_id, Redeliver::AfterCommit)?;
        tracing::debug!(task_id = %task.id, %lease_id, "nack");
        let (reply, response) = oneshot::channel();
        let error = truncate_error_message(error);
        self.write(WriteOp::Fail {
            task,
            error,
            reply: Some(reply),
        })
        .await?;
        Ok(response.await.map_err(|_| StoreError::WriterStopped)??)
    }

    /// Returns a task with its state and progress.
    ///
    /// # Errors
    ///
    /// `TaskNotFound` for an unknown id, `Store` if the read failed.
    pub async fn get_task(&self, task_id: TaskId) -> Result<v1::TaskStatus, BrokerError> {
        let store = Arc::clone(&self.store);
        let read = tokio::task::spawn_blocking(move || store.read_task(task_id));
        let record = read.await.map_err(|_| StoreError::WriterStopped)??;
        let Some(record) = record else {
            return Err(BrokerError::TaskNotFound(task_id));
        };

        let lease_deadline = self.dispatcher.lease_deadline(task_id);
        let state = match (record.state(), lease_deadline) {
            (TaskRecordState::Pending, Some(_)) => v1::TaskState::Leased,
            (TaskRecordState::Pending, None) => v1::TaskState::Pending,
            (TaskRecordState::Succeeded, _) => v1::TaskState::Succeeded,
            (TaskRecordState::Dead, _) => v1::TaskState::Dead,
            (TaskRecordState::Unspecified, _) => v1::TaskState::Unspecified,
        };
        Ok(v1::TaskStatus {
            task: Some(v1::Task {
                id: task_id.to_string(),
                queue: record.queue,
                kind: record.kind,
                payload: record.payload,
                headers: record.headers,
                priority: record.priority,
                max_attempts: record.max_attempts,
                created_at: Some(timestamp_from_micros(record.created_at_us)),
            }),
            state: state.into(),
            attempts: record.attempts,
            last_error: record.last_error,
            result: record.result,
            updated_at: Some(timestamp_from_micros(record.updated_at_us)),
            lease_deadline: lease_deadline
                .filter(|_| state == v1::TaskState::Leased)
                .map(Into::into),
        })
    }

    /// Heartbeat period of Subscribe streams.
    pub(crate) fn heartbeat_interval(&self) -> Duration {
        self.heartbeat_interval
    }

    fn ensure_running(&self) -> Result<(), BrokerError> {
        if self.shutdown.is_cancelled() {
            return Err(BrokerError::ShuttingDown);
        }
        Ok(())
    }

    async fn write(&self, op: WriteOp) -> Result<(), BrokerError> {
        self.writer.send(op).await.map_err(BrokerError::from)
    }

    fn record_failure_in_background(&self, task: Arc<ReadyTask>, error: &str) {
        let op = WriteOp::Fail {
            task,
            error: error.to_owned(),
            reply: None,
        };
        if let Err(op) = self.writer.try_send(op) {
            let writer = self.writer.clone();
            tokio::spawn(async move {
                if writer.send(op).await.is_err() {
                    tracing::warn!(
                        "storage writer stopped before a released lease was recorded; the task is offered again after restart"
                    );
                }
            });
        }
    }
}
