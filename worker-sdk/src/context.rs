//! The delivery handed to a task handler.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use docket_proto::v1::{Delivery, Task};
use tokio::sync::watch;

/// One delivery of a task to a handler: the task, its attempt number and its lease.
///
/// Delivery is at least once, so a handler may see the same task again after a failed
/// attempt, an expired lease or a broken stream. [`TaskContext::id`] is stable across
/// attempts and suits as an idempotency key.
///
/// # Cancellation
///
/// When the task is cancelled with `CancelTask` while this delivery runs, the worker
/// marks the context as cancelled: [`TaskContext::is_cancelled`] returns `true` and
/// [`TaskContext::cancelled`] completes. The handler should then stop early and return.
/// If it returns `Err` or panics, the worker's Nack ends the task CANCELLED. If it
/// returns `Ok`, the worker's Ack completes the task as SUCCEEDED. The worker does not
/// abort a handler that ignores the signal.
///
/// ```no_run
/// use std::time::Duration;
///
/// use docket::{HandlerError, HandlerResult, TaskContext};
///
/// async fn resize_images(task: TaskContext) -> HandlerResult {
///     for chunk in 0..100 {
///         tokio::select! {
///             () = task.cancelled() => {
///                 return Err(HandlerError::msg(format!("cancelled at chunk {chunk}")));
///             }
///             () = tokio::time::sleep(Duration::from_millis(100)) => {}
///         }
///     }
///     Ok(None)
/// }
/// ```
#[derive(Debug, Clone)]
pub struct TaskContext {
    task: Task,
    lease_id: String,
    attempt: u32,
    lease_deadline: Option<SystemTime>,
    /// Set to `true` once the broker reports that the task was cancelled. The context
    /// owns the sender itself, so the channel never closes while a context exists.
    cancellation: Arc<watch::Sender<bool>>,
}

impl TaskContext {
    /// Builds the context of a delivery, or returns `None` if the delivery has no task.
    pub(crate) fn from_delivery(delivery: Delivery) -> Option<Self> {
        let lease_deadline = delivery
            .lease_deadline
            .and_then(|deadline| SystemTime::try_from(deadline).ok());
        Some(TaskContext {
            task: delivery.task?,
            lease_id: delivery.lease_id,
            attempt: delivery.attempt,
            lease_deadline,
            cancellation: Arc::new(watch::Sender::new(false)),
        })
    }

    /// Returns the task id, a UUIDv7 string that is the same on every attempt.
    pub fn id(&self) -> &str {
        &self.task.id
    }

    /// Returns the queue the task belongs to.
    pub fn queue(&self) -> &str {
        &self.task.queue
    }

    /// Returns the task kind, the name of its handler.
    pub fn kind(&self) -> &str {
        &self.task.kind
    }

    /// Returns the opaque task input.
    pub fn payload(&self) -> &Bytes {
        &self.task.payload
    }

    /// Returns all headers given at enqueue.
    pub fn headers(&self) -> &HashMap<String, String> {
        &self.task.headers
    }

    /// Returns the value of one header, or `None` if it is not set.
    pub fn header(&self, key: &str) -> Option<&str> {
        self.task.headers.get(key).map(String::as_str)
    }

    /// Returns the delivery priority within the queue.
    pub fn priority(&self) -> i32 {
        self.task.priority
    }

    /// Returns the attempt number, starting at 1 for the first delivery.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Returns the maximum number of attempts, including the first.
    pub fn max_attempts(&self) -> u32 {
        self.task.max_attempts
    }

    /// Returns `true` if this is the task's last attempt: if the handler fails now, the
    /// broker dead-letters the task.
    pub fn is_last_attempt(&self) -> bool {
        self.attempt >= self.task.max_attempts
    }

    /// Returns the time by which the lease must be settled, or `None` if the broker sent
    /// none or it is out of range. After it the task is offered again.
    pub fn lease_deadline(&self) -> Option<SystemTime> {
        self.lease_deadline
    }

    /// Returns the time the broker committed the task, or `None` if it is unset or out of
    /// range.
    pub fn created_at(&self) -> Option<SystemTime> {
        self.task
            .created_at
            .and_then(|created_at| SystemTime::try_from(created_at).ok())
    }

    /// Returns the task as sent on the wire.
    pub fn task(&self) -> &Task {
        &self.task
    }

    /// Returns `true` once the broker has reported that the task was cancelled while
    /// this delivery runs.
    pub fn is_cancelled(&self) -> bool {
        *self.cancellation.borrow()
    }

    /// Waits until the broker reports that the task was cancelled while this delivery
    /// runs, and completes at once if that happened already. It never completes for a
    /// task that is not cancelled, so use it in `tokio::select!` next to the work.
    ///
    /// The worker learns of a cancellation from the notice the broker sends on the
    /// Subscribe stream, or from an ExtendLease response. It also reports a lease that
    /// ExtendLease finds expired or settled, because the attempt can no longer succeed.
    pub async fn cancelled(&self) {
        let mut receiver = self.cancellation.subscribe();
        // `wait_for` fails only once the sender is dropped, and `self` keeps an `Arc` of it.
        let _ = receiver.wait_for(|cancelled| *cancelled).await;
    }

    /// Returns the lease id to settle this delivery with.
    pub(crate) fn lease_id(&self) -> &str {
        &self.lease_id
    }

    /// Returns the sender that marks this delivery as cancelled. Every clone of the
    /// context shares it.
    pub(crate) fn cancellation(&self) -> Arc<watch::Sender<bool>> {
        Arc::clone(&self.cancellation)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(attempt: u32, max_attempts: u32) -> Delivery {
        Delivery {
            task: Some(Task {
                id: "0190a5f0-0000-7000-8000-000000000001".to_owned(),
                queue: "emails".to_owned(),
                kind: "send_email".to_owned(),
                max_attempts,
                headers: HashMap::from([("lang".to_owned(), "de".to_owned())]),
                ..Task::default()
            }),
            lease_id: "lease-1".to_owned(),
            attempt,
            lease_deadline: Some(prost_types::Timestamp {
                seconds: 1_800_000_000,
                nanos: 0,
            }),
        }
    }

    #[test]
    fn context_exposes_delivery_fields() {
        let context = TaskContext::from_delivery(delivery(2, 5)).unwrap();

        assert_eq!(context.id(), "0190a5f0-0000-7000-8000-000000000001");
        assert_eq!(context.queue(), "emails");
        assert_eq!(context.kind(), "send_email");
        assert_eq!(context.header("lang"), Some("de"));
        assert_eq!(context.header("missing"), None);
        assert_eq!(context.attempt(), 2);
        assert_eq!(context.lease_id(), "lease-1");
        assert_eq!(
            context.lease_deadline(),
            Some(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000))
        );
        assert!(!context.is_last_attempt());
    }

    #[test]
    fn last_attempt_is_detected() {
        let context = TaskContext::from_delivery(delivery(5, 5)).unwrap();

        assert!(context.is_last_attempt());
    }

    #[tokio::test]
    async fn cancellation_reaches_every_clone() {
        let context = TaskContext::from_delivery(delivery(1, 3)).unwrap();
        let handler_copy = context.clone();
        assert!(!handler_copy.is_cancelled());

        let waiting = tokio::spawn(async move { handler_copy.cancelled().await });
        context.cancellation().send_replace(true);

        tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("cancelled() did not complete")
            .unwrap();
        assert!(context.is_cancelled());
    }

    #[test]
    fn delivery_without_task_is_rejected() {
        let mut empty = delivery(1, 1);
        empty.task = None;

        assert!(TaskContext::from_delivery(empty).is_none());
    }
}
