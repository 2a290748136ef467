//! The stream that [`Client::watch_task`](crate::Client::watch_task) returns.

use std::pin::Pin;
use std::task::{Context, Poll};

use docket_proto::v1::{TaskState, TaskStatus, WatchTaskResponse};
use tokio_stream::Stream;
use tonic::Streaming;

use crate::Error;

/// The stream of one task's statuses that [`Client::watch_task`](crate::Client::watch_task)
/// returns: the current status, then one per state change, until a final state or an
/// error.
///
/// It implements [`Stream`], so `StreamExt::next` from `tokio-stream` or `futures`
/// reads it. It is `Send`, `Unpin` and `'static`, so it can be moved into a spawned task
/// or stored in a struct. Dropping it closes the stream on the broker.
#[derive(Debug)]
pub struct TaskWatch {
    task_id: String,
    responses: Streaming<WatchTaskResponse>,
    finished: bool,
}

impl TaskWatch {
    pub(crate) fn new(task_id: String, responses: Streaming<WatchTaskResponse>) -> Self {
        TaskWatch {
            task_id,
            responses,
            finished: false,
        }
    }

    /// Returns the id of the watched task.
    pub fn task_id(&self) -> &str {
        &self.task_id
    }

    /// Converts one message of the broker's stream into an item, and marks the stream
    /// finished after a final state or an error.
    fn item(
        &mut self,
        message: Option<Result<WatchTaskResponse, tonic::Status>>,
    ) -> Option<Result<TaskStatus, Error>> {
        let item = match message {
            Some(Ok(WatchTaskResponse {
                status: Some(status),
            })) => {
                self.finished = is_final(status.state());
                Ok(status)
            }
            Some(Ok(WatchTaskResponse { status: None })) => Err(Error::InvalidResponse(format!(
                "WatchTask returned a message without status for task {}",
                self.task_id
            ))),
            Some(Err(status)) => Err(Error::from(status)),
            None => Err(Error::InvalidResponse(format!(
                "WatchTask ended before task {} reached a final state",
                self.task_id
            ))),
        };
        if item.is_err() {
            self.finished = true;
        }
        Some(item)
    }
}

impl Stream for TaskWatch {
    type Item = Result<TaskStatus, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.finished {
            return Poll::Ready(None);
        }
        let message = std::task::ready!(Pin::new(&mut self.responses).poll_next(cx));
        Poll::Ready(self.item(message))
    }
}

/// Returns `true` for the states after which a task no longer changes: SUCCEEDED, DEAD
/// and CANCELLED. An operator can still requeue a DEAD task, but WatchTask ends there.
fn is_final(state: TaskState) -> bool {
    matches!(
        state,
        TaskState::Succeeded | TaskState::Dead | TaskState::Cancelled
    )
}
