//! The builder for tasks to enqueue.

use std::collections::HashMap;

use bytes::Bytes;
use docket_proto::v1::NewTask;

use crate::RetryPolicy;

/// A task to add to a queue, built with chained setters.
///
/// The broker validates every field when the task is enqueued. The queue name is 1 to 128
/// characters of `A-Z`, `a-z`, `0-9`, `.`, `_` and `-`, and the kind also allows `:` and
/// `/`.
///
/// ```
/// use docket::Task;
///
/// let task = Task::new("emails", "send_email")
///     .payload(r#"{"to":"zoe@example.com"}"#)
///     .header("content-type", "application/json")
///     .priority(10)
///     .max_attempts(5)
///     .idempotency_key("welcome:zoe@example.com");
/// assert_eq!(task.queue_name(), "emails");
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    inner: NewTask,
}

impl Task {
    /// Creates a task of `kind` for `queue` with an empty payload, no headers, priority
    /// 0, and the maximum attempts and retry policy of its queue.
    pub fn new(queue: impl Into<String>, kind: impl Into<String>) -> Self {
        Task {
            inner: NewTask {
                queue: queue.into(),
                kind: kind.into(),
                ..NewTask::default()
            },
        }
    }

    /// Sets the opaque task input. The broker's default limit is 1 MiB.
    pub fn payload(mut self, payload: impl Into<Bytes>) -> Self {
        self.inner.payload = payload.into();
        self
    }

    /// Adds a string header passed through to the worker, replacing any earlier value
    /// for the same key.
    pub fn header(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.inner.headers.insert(key.into(), value.into());
        self
    }

    /// Replaces all headers.
    pub fn headers(mut self, headers: HashMap<String, String>) -> Self {
        self.inner.headers = headers;
        self
    }

    /// Sets the delivery priority within the queue. A higher value is delivered first.
    pub fn priority(mut self, priority: i32) -> Self {
        self.inner.priority = priority;
        self
    }

    /// Sets the maximum number of attempts, including the first, at most 100. 0 takes the
    /// queue's setting, 5 unless the queue or the broker sets another.
    pub fn max_attempts(mut self, max_attempts: u32) -> Self {
        self.inner.max_attempts = max_attempts;
        self
    }

    /// Sets a key that makes the enqueue idempotent, at most 256 bytes.
    ///
    /// While the queue's idempotency window lasts (24 hours by default), enqueueing
    /// another task with the same queue and key creates nothing and returns the first
    /// task's id, so a producer can retry an enqueue whose response it lost.
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.inner.idempotency_key = key.into();
        self
    }

    /// Sets the backoff between failed attempts, in place of the queue's policy.
    pub fn retry_policy(mut self, policy: RetryPolicy) -> Self {
        self.inner.retry_policy = Some(policy.to_proto());
        self
    }

    /// Returns the queue name.
    pub fn queue_name(&self) -> &str {
        &self.inner.queue
    }

    /// Returns the task kind.
    pub fn kind_name(&self) -> &str {
        &self.inner.kind
    }

    /// Returns the wire message.
    pub fn as_proto(&self) -> &NewTask {
        &self.inner
    }

    /// Converts the task into the wire message.
    pub fn into_proto(self) -> NewTask {
        self.inner
    }
}

impl From<Task> for NewTask {
    fn from(task: Task) -> Self {
        task.inner
    }
}

impl From<NewTask> for Task {
    fn from(inner: NewTask) -> Self {
        Task { inner }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn builder_sets_every_field() {
        let task = Task::new("emails", "send_email")
            .payload(Bytes::from_static(b"{}"))
            .header("content-type", "application/json")
            .priority(-3)
            .max_attempts(7)
            .idempotency_key("order-17")
            .retry_policy(RetryPolicy::fixed(Duration::from_secs(2)));
        let proto = task.into_proto();

        assert_eq!(proto.queue, "emails");
        assert_eq!(proto.kind, "send_email");
        assert_eq!(proto.payload, Bytes::from_static(b"{}"));
        assert_eq!(proto.headers.len(), 1);
        assert_eq!(proto.headers["content-type"], "application/json");
        assert_eq!(proto.priority, -3);
        assert_eq!(proto.max_attempts, 7);
        assert_eq!(proto.idempotency_key, "order-17");
        assert_eq!(
            proto.retry_policy,
            Some(RetryPolicy::fixed(Duration::from_secs(2)).to_proto())
        );
    }

    #[test]
    fn builder_defaults_are_broker_defaults() {
        let proto = NewTask::from(Task::new("q", "k"));

        assert!(proto.payload.is_empty());
        assert!(proto.headers.is_empty());
        assert_eq!(proto.priority, 0);
        assert_eq!(proto.max_attempts, 0);
        assert!(proto.idempotency_key.is_empty());
        assert_eq!(proto.retry_policy, None);
    }
}
