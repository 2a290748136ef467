//! The WatchTask and WatchQueueStats response streams.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use docket_proto::v1::{self, TaskState};
use tokio::sync::mpsc;
use tokio::time::MissedTickBehavior;
use tokio_stream::Stream;
use tokio_util::sync::WaitForCancellationFutureOwned;
use tonic::Status;

use crate::broker::Broker;
use crate::dispatch::watch::WatcherId;
use crate::error::BrokerError;
use crate::task::{QueueName, TaskId};

fn is_final(status: &v1::TaskStatus) -> bool {
    matches!(
        status.state(),
        TaskState::Succeeded | TaskState::Dead | TaskState::Cancelled
    )
}

fn shutting_down() -> Status {
    Status::unavailable("the broker is shutting down; watch again on a running broker")
}

/// Stream of one task's statuses: the current one, then one per change, until a final
/// state.
pub struct TaskWatchStream {
    broker: Arc<Broker>,
    task_id: TaskId,
    watcher: WatcherId,
    first: Option<v1::TaskStatus>,
    last_sent: Option<v1::TaskStatus>,
    changes: mpsc::Receiver<v1::TaskStatus>,
    shutdown: Pin<Box<WaitForCancellationFutureOwned>>,
    finished: bool,
}

impl TaskWatchStream {
    /// Registers a watcher, then reads the task's current status.
    ///
    /// # Errors
    ///
    /// `TaskNotFound` for an unknown task, `Store` if the read failed.
    pub(crate) async fn start(broker: Arc<Broker>, task_id: TaskId) -> Result<Self, BrokerError> {
        broker.ensure_running()?;
        // Registered before the read, so that no change between the two is lost.
        let (watcher, changes) = broker.dispatcher.watchers.watch(task_id);
        let status = match broker.get_task(task_id).await {
            Ok(status) => status,
            Err(err) => {
                broker.dispatcher.watchers.unwatch(task_id, watcher);
                return Err(err);
            }
        };
        broker.dispatcher.watchers.seed(task_id, &status);
        Ok(TaskWatchStream {
            shutdown: Box::pin(broker.shutdown.clone().cancelled_owned()),
            broker,
            task_id,
            watcher,
            first: Some(status),
            last_sent: None,
            changes,
            finished: false,
        })
    }

    fn send(
        &mut self,
        status: v1::TaskStatus,
    ) -> Poll<Option<Result<v1::WatchTaskResponse, Status>>> {
        self.finished = is_final(&status);
        self.last_sent = Some(status.clone());
        Poll::Ready(Some(Ok(v1::WatchTaskResponse {
            status: Some(status),
        })))
    }
}

impl Stream for TaskWatchStream {
    type Item = Result<v1::WatchTaskResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.finished {
            return Poll::Ready(None);
        }
        if let Some(first) = self.first.take() {
            return self.send(first);
        }
        if self.shutdown.as_mut().poll(cx).is_ready() {
            self.finished = true;
            return Poll::Ready(Some(Err(shutting_down())));
        }
        loop {
            match self.changes.poll_recv(cx) {
                Poll::Ready(Some(status)) => {
                    if self.last_sent.as_ref() == Some(&status) {
                        continue;
                    }
                    return self.send(status);
                }
                Poll::Ready(None) => {
                    self.finished = true;
                    let status = Status::resource_exhausted(
                        "the watcher fell behind the task's changes; watch again",
                    );
                    return Poll::Ready(Some(Err(status)));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl Drop for TaskWatchStream {
    fn drop(&mut self) {
        self.broker
            .dispatcher
            .watchers
            .unwatch(self.task_id, self.watcher);
    }
}

/// Stream of one queue's counts at a fixed interval, fed by a task that reads them and
/// stops when the client goes away or the broker shuts down.
pub struct QueueStatsStream {
    receiver: mpsc::Receiver<Result<v1::WatchQueueStatsResponse, Status>>,
}

impl QueueStatsStream {
    pub(crate) fn new(broker: Arc<Broker>, queue: QueueName, interval: Duration) -> Self {
        // One message of room: the reader waits for the next tick, not a backlog.
        let (sender, receiver) = mpsc::channel(1);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = broker.shutdown.cancelled() => {
                        let _ = sender.send(Err(shutting_down())).await;
                        return;
                    }
                    () = sender.closed() => return,
                    _ = ticks.tick() => {}
                }
                let message = broker
                    .queue_stats(&queue)
                    .await
                    .map(|stats| v1::WatchQueueStatsResponse { stats: Some(stats) })
                    .map_err(Status::from);
                if sender.send(message).await.is_err() {
                    return;
                }
            }
        });
        QueueStatsStream { receiver }
    }
}

impl Stream for QueueStatsStream {
    type Item = Result<v1::WatchQueueStatsResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.receiver.poll_recv(cx)
    }
}
