//! The broker's operations at the level of the domain: what the gRPC layer calls once it
//! has validated and converted a request.

use std::sync::Arc;
use std::time::Duration;

use docket_proto::storage::QueueSettingsRecord;
use docket_proto::v1::{self, TaskState};
use prost::bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::dispatch::{
    Dispatcher, QueueCounts, Redeliver, SettledLease, SubscriberId, Subscription,
};
use crate::error::{BrokerError, StoreError};
use crate::settings::{QueueSettings, SettingsCache};
use crate::store::writer::{
    DEAD_BATCH, DeadSelection, Enqueued, Failure, Reply, SettingsUpdate, SettleOutcome, WriteOp,
    WriterHandle,
};
use crate::store::{Store, now_micros, status_of};
use crate::task::{LeaseId, Limits, NewTask, QueueName, TaskId};

/// Error stored on a task whose Subscribe stream closed while it held the lease.
pub const STREAM_CLOSED: &str = "worker stream closed while the task was leased";

/// One Ack in a batch, after its fields were parsed.
pub struct AckItem {
    /// The lease, or why its id is malformed.
    pub lease_id: Result<LeaseId, BrokerError>,
    /// Result to store.
    pub result: Bytes,
}

/// One Nack in a batch, after its fields were parsed.
pub struct NackItem {
    /// The lease, or why its id is malformed.
    pub lease_id: Result<LeaseId, BrokerError>,
    /// Error and retry instructions.
    pub failure: Failure,
}

/// The broker: store, writer, dispatcher and settings behind one handle, shared by every
/// RPC.
pub struct Broker {
    pub(crate) dispatcher: Arc<Dispatcher>,
    writer: WriterHandle,
    store: Arc<Store>,
    settings: SettingsCache,
    pub(crate) limits: Limits,
    heartbeat_interval: Duration,
    pub(crate) shutdown: CancellationToken,
}

impl Broker {
    pub(crate) fn new(
        dispatcher: Arc<Dispatcher>,
        writer: WriterHandle,
        store: Arc<Store>,
        settings: SettingsCache,
        limits: Limits,
        heartbeat_interval: Duration,
        shutdown: CancellationToken,
    ) -> Self {
        Broker {
            dispatcher,
            writer,
            store,
            settings,
            limits,
            heartbeat_interval,
            shutdown,
        }
    }

    /// Stores a validated batch and returns one entry per task, in order, once it is
    /// durable.
    ///
    /// # Errors
    ///
    /// `ShuttingDown` once shutdown has begun; `Store` if the commit failed, in which case
    /// nothing of the batch was stored.
    pub async fn enqueue(&self, tasks: Vec<NewTask>) -> Result<Vec<Enqueued>, BrokerError> {
        self.ensure_running()?;
        self.request(|reply| WriteOp::Enqueue { tasks, reply })
            .await
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
        for settled in released {
            self.record_failure_in_background(settled, STREAM_CLOSED);
        }
    }

    /// Completes the tasks under live leases. Each item succeeds or fails on its own.
    ///
    /// # Errors
    ///
    /// `ShuttingDown` once shutdown has begun. Per item: `InvalidArgument` for a malformed
    /// lease id or an oversize result, `LeaseNotLive` for an unknown, expired or settled
    /// lease, `Store` if the commit failed (the task is then offered again).
    pub async fn ack(
        &self,
        items: Vec<AckItem>,
    ) -> Result<Vec<Result<SettleOutcome, BrokerError>>, BrokerError> {
        self.ensure_running()?;
        let mut pending = Vec::with_capacity(items.len());
        for (index, item) in items.into_iter().enumerate() {
            pending.push(self.start_ack(index, item).await);
        }
        Ok(wait_all(pending).await)
    }

    async fn start_ack(
        &self,
        index: usize,
        item: AckItem,
    ) -> Result<oneshot::Receiver<Result<SettleOutcome, BrokerError>>, BrokerError> {
        let lease_id = item.lease_id?;
        if item.result.len() > self.limits.max_result_bytes {
            return Err(BrokerError::invalid(
                format!("acks[{index}].result"),
                format!(
                    "result of {} bytes exceeds the limit of {} bytes",
                    item.result.len(),
                    self.limits.max_result_bytes
                ),
            ));
        }
        let settled = self.dispatcher.settle(&lease_id, Redeliver::Now)?;
        tracing::debug!(task_id = %settled.task.id, %lease_id, "ack");
        let (reply, response) = oneshot::channel();
        self.writer.send_detached(WriteOp::Complete {
            settled,
            result: item.result,
            reply,
        });
        Ok(response)
    }

    /// Fails the attempts under live leases. Each item succeeds or fails on its own.
    ///
    /// # Errors
    ///
    /// `ShuttingDown` once shutdown has begun. Per item: `InvalidArgument` for a malformed
    /// lease id, `LeaseNotLive` for an unknown, expired or settled lease, `Store` if the
    /// commit failed (the task is then offered again).
    pub async fn nack(
        &self,
        items: Vec<NackItem>,
    ) -> Result<Vec<Result<SettleOutcome, BrokerError>>, BrokerError> {
        self.ensure_running()?;
        let mut pending = Vec::with_capacity(items.len());
        for item in items {
            pending.push(self.start_nack(item).await);
        }
        Ok(wait_all(pending).await)
    }

    async fn start_nack(
        &self,
        item: NackItem,
    ) -> Result<oneshot::Receiver<Result<SettleOutcome, BrokerError>>, BrokerError> {
        let lease_id = item.lease_id?;
        let settled = self.dispatcher.settle(&lease_id, Redeliver::AfterCommit)?;
        tracing::debug!(task_id = %settled.task.id, %lease_id, "nack");
        let (reply, response) = oneshot::channel();
        self.writer.send_detached(WriteOp::Fail {
            settled,
            failure: item.failure,
            reply: Some(reply),
        });
        Ok(response)
    }

    /// Moves a live lease's deadline to `extension` from now. Returns the new deadline and
    /// whether the task was cancelled meanwhile.
    ///
    /// # Errors
    ///
    /// `LeaseNotLive` for an unknown, expired or settled lease.
    pub fn extend_lease(
        &self,
        lease_id: &LeaseId,
        extension: Duration,
    ) -> Result<(std::time::SystemTime, bool), BrokerError> {
        self.ensure_running()?;
        self.dispatcher.extend(lease_id, extension)
    }

    /// Returns a task with its state, history and result.
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
        let lease = self.dispatcher.lease_of(task_id);
        Ok(status_of(task_id, &record, lease.as_ref()))
    }

    /// Cancels a task. Returns CANCELLED, or LEASED if its worker was sent a cancellation
    /// notice.
    ///
    /// # Errors
    ///
    /// `TaskNotFound` for an unknown id, `TaskFinal` for a task already in a final state.
    pub async fn cancel_task(&self, task_id: TaskId) -> Result<TaskState, BrokerError> {
        self.ensure_running()?;
        self.request(|reply| WriteOp::Cancel { task_id, reply })
            .await
    }

    /// Returns a queue's counts.
    ///
    /// # Errors
    ///
    /// `Store` if reading the age of the oldest pending task failed.
    pub async fn queue_stats(&self, queue: &QueueName) -> Result<v1::QueueStats, BrokerError> {
        let counts = self.dispatcher.counts(queue);
        let oldest_pending_us = if counts.pending == 0 {
            None
        } else {
            let store = Arc::clone(&self.store);
            let dispatcher = Arc::clone(&self.dispatcher);
            let queue = queue.clone();
            let read = tokio::task::spawn_blocking(move || {
                store.oldest_pending(&queue, |task_id| dispatcher.is_held(task_id))
            });
            read.await.map_err(|_| StoreError::WriterStopped)??
        };
        let paused = self.settings.get(queue).paused;
        Ok(queue_stats(queue, counts, oldest_pending_us, paused))
    }

    /// Returns every queue that has tasks or stored settings, by name.
    ///
    /// # Errors
    ///
    /// `Store` if reading the age of a queue's oldest pending task failed.
    pub async fn list_queues(&self) -> Result<Vec<v1::QueueStats>, BrokerError> {
        let with_settings = self.settings.queues();
        let mut names = self.dispatcher.queue_names();
        names.extend(with_settings.iter().cloned());
        names.sort();
        names.dedup();
        let mut stats = Vec::with_capacity(names.len());
        for queue in &names {
            let queue_stats = self.queue_stats(queue).await?;
            // The dispatcher also tracks queues that a subscription merely names, which
            // have neither tasks nor settings and are not listed.
            if has_tasks(&queue_stats) || with_settings.contains(queue) {
                stats.push(queue_stats);
            }
        }
        Ok(stats)
    }

    /// Pauses or resumes deliveries from a queue.
    ///
    /// # Errors
    ///
    /// `Store` if the commit failed.
    pub async fn set_paused(&self, queue: QueueName, paused: bool) -> Result<(), BrokerError> {
        self.ensure_running()?;
        let update = SettingsUpdate {
            paused: Some(paused),
            ..SettingsUpdate::default()
        };
        self.request(|reply| WriteOp::UpdateSettings {
            queue,
            update,
            reply,
        })
        .await?;
        Ok(())
    }

    /// Deletes every pending and retry-waiting task of a queue. Returns how many.
    ///
    /// # Errors
    ///
    /// `Store` if the commit failed; the tasks are then deliverable again.
    pub async fn purge_queue(&self, queue: &QueueName) -> Result<u64, BrokerError> {
        self.ensure_running()?;
        let queue = queue.clone();
        self.request(|reply| WriteOp::PurgeQueue { queue, reply })
            .await
    }

    /// Returns a queue's settings with the defaults filled in.
    pub fn queue_settings(&self, queue: &QueueName) -> QueueSettings {
        self.settings.get(queue)
    }

    /// Changes a queue's stored settings and returns them with the defaults filled in.
    ///
    /// # Errors
    ///
    /// `Store` if the commit failed.
    pub async fn update_queue_settings(
        &self,
        queue: QueueName,
        patch: QueueSettingsRecord,
    ) -> Result<QueueSettings, BrokerError> {
        self.ensure_running()?;
        let update = SettingsUpdate {
            patch,
            paused: None,
        };
        let stored = self
            .request(|reply| WriteOp::UpdateSettings {
                queue: queue.clone(),
                update,
                reply,
            })
            .await?;
        Ok(self.settings.defaults().resolve(Some(&stored)))
    }

    /// Returns one page of a queue's dead tasks and the position after its last entry if
    /// more may follow.
    ///
    /// # Errors
    ///
    /// `Store` if the read failed.
    pub async fn list_dead(
        &self,
        queue: QueueName,
        after: Option<(i64, u128)>,
        page_size: usize,
    ) -> Result<(Vec<v1::TaskStatus>, Option<(i64, u128)>), BrokerError> {
        let store = Arc::clone(&self.store);
        let read =
            tokio::task::spawn_blocking(move || store.read_dead_page(&queue, after, page_size));
        let (page, next) = read.await.map_err(|_| StoreError::WriterStopped)??;
        let statuses = page
            .iter()
            .map(|(task_id, record)| status_of(*task_id, record, None))
            .collect();
        Ok((statuses, next))
    }

    /// Makes dead tasks pending again with their attempts reset. Returns how many.
    ///
    /// # Errors
    ///
    /// `Store` if a commit failed; the tasks requeued before it stay requeued.
    pub async fn requeue_dead(
        &self,
        queue: QueueName,
        selection: DeadSelection,
    ) -> Result<u64, BrokerError> {
        self.ensure_running()?;
        self.change_dead(queue, selection, |queue, selection, reply| {
            WriteOp::RequeueDead {
                queue,
                selection,
                reply,
            }
        })
        .await
    }

    /// Deletes dead tasks. Returns how many.
    ///
    /// # Errors
    ///
    /// `Store` if a commit failed; the tasks deleted before it stay deleted.
    pub async fn delete_dead(
        &self,
        queue: QueueName,
        selection: DeadSelection,
    ) -> Result<u64, BrokerError> {
        self.ensure_running()?;
        self.change_dead(queue, selection, |queue, selection, reply| {
            WriteOp::DeleteDead {
                queue,
                selection,
                reply,
            }
        })
        .await
    }

    /// Sends dead-task requests until a request for all of a queue's dead tasks finds
    /// fewer than a full batch.
    async fn change_dead(
        &self,
        queue: QueueName,
        selection: DeadSelection,
        make_op: impl Fn(QueueName, DeadSelection, Reply<u64>) -> WriteOp,
    ) -> Result<u64, BrokerError> {
        let mut total = 0;
        loop {
            let all = matches!(selection, DeadSelection::All);
            let changed = self
                .request(|reply| make_op(queue.clone(), selection.clone(), reply))
                .await?;
            total += changed;
            if !all || changed < DEAD_BATCH as u64 {
                return Ok(total);
            }
        }
    }

    /// Heartbeat period of Subscribe streams.
    pub(crate) fn heartbeat_interval(&self) -> Duration {
        self.heartbeat_interval
    }

    pub(crate) fn ensure_running(&self) -> Result<(), BrokerError> {
        if self.shutdown.is_cancelled() {
            return Err(BrokerError::ShuttingDown);
        }
        Ok(())
    }

    /// Sends a request to the writer and waits for its durable outcome.
    async fn request<T>(
        &self,
        make_op: impl FnOnce(Reply<T>) -> WriteOp,
    ) -> Result<T, BrokerError> {
        let (reply, response) = oneshot::channel();
        self.writer.send(make_op(reply)).await?;
        response.await.map_err(|_| StoreError::WriterStopped)?
    }

    fn record_failure_in_background(&self, settled: SettledLease, error: &str) {
        self.writer.send_detached(WriteOp::Fail {
            settled,
            failure: Failure::released(error),
            reply: None,
        });
    }
}

/// Waits for every started request of a batch, in order.
async fn wait_all(
    pending: Vec<Result<oneshot::Receiver<Result<SettleOutcome, BrokerError>>, BrokerError>>,
) -> Vec<Result<SettleOutcome, BrokerError>> {
    let mut outcomes = Vec::with_capacity(pending.len());
    for started in pending {
        let outcome = match started {
            Ok(response) => response
                .await
                .unwrap_or(Err(BrokerError::Store(StoreError::WriterStopped))),
            Err(err) => Err(err),
        };
        outcomes.push(outcome);
    }
    outcomes
}

/// Builds the wire stats of a queue from its counts.
pub fn queue_stats(
    queue: &QueueName,
    counts: QueueCounts,
    oldest_pending_us: Option<i64>,
    paused: bool,
) -> v1::QueueStats {
    let oldest_pending_age = oldest_pending_us.map(|created_us| {
        let age_us = u64::try_from(now_micros().saturating_sub(created_us)).unwrap_or(0);
        prost_types::Duration::try_from(Duration::from_micros(age_us)).unwrap_or_default()
    });
    v1::QueueStats {
        queue: queue.as_str().to_owned(),
        pending: counts.pending,
        retry_wait: counts.retry_wait,
        leased: counts.leased,
        dead: counts.dead,
        succeeded: counts.succeeded,
        cancelled: counts.cancelled,
        oldest_pending_age: Some(oldest_pending_age.unwrap_or_default()),
        paused: paused || counts.paused,
    }
}

/// Returns whether a queue contains any task, in any state.
fn has_tasks(stats: &v1::QueueStats) -> bool {
    [
        stats.pending,
        stats.retry_wait,
        stats.leased,
        stats.dead,
        stats.succeeded,
        stats.cancelled,
    ]
    .iter()
    .any(|&count| count > 0)
}
