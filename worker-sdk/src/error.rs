//! The error type of the client and the worker.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// An error from talking to the broker or the scheduler, from configuring a client or a
/// worker, or from encoding or decoding a JSON payload.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The endpoint of the broker or the scheduler is not a valid URI, such as
    /// `http://127.0.0.1:7070`.
    #[error("invalid endpoint {endpoint:?}: expected a URI such as http://127.0.0.1:7070")]
    InvalidEndpoint {
        /// The endpoint as given.
        endpoint: String,
        /// The parse error.
        #[source]
        source: tonic::transport::Error,
    },

    /// A client setting is invalid, such as an empty bearer token, unreadable TLS
    /// certificates, or TLS settings for an `http://` endpoint. The message never
    /// contains the token.
    #[error("invalid client configuration: {0}")]
    InvalidClientConfig(String),

    /// The connection to the broker could not be established.
    #[error("failed to connect to the broker at {endpoint}")]
    Connect {
        /// The endpoint that was dialed.
        endpoint: String,
        /// The transport error.
        #[source]
        source: tonic::transport::Error,
    },

    /// The broker or the scheduler, or the transport under them, returned a gRPC status
    /// other than OK.
    ///
    /// Its `Display` output is the status code and message. The status is boxed to keep
    /// `Result<T, Error>` small, and [`Error::status`] and [`Error::code`] return it
    /// without matching.
    #[error("gRPC call failed ({:?}): {}", .0.code(), .0.message())]
    Status(Box<tonic::Status>),

    /// The broker or the scheduler returned a response that breaks the wire contract,
    /// such as a missing required field. The message names the call.
    #[error("invalid response: {0}")]
    InvalidResponse(String),

    /// A call needs the scheduler, but the client was created without its address.
    ///
    /// Delayed tasks and schedules go through the scheduler service, which listens on its
    /// own address. [`Client::with_scheduler`](crate::Client::with_scheduler) sets it.
    #[error(
        "no scheduler configured: call Client::with_scheduler with the scheduler's \
         address, such as http://127.0.0.1:7071, before scheduling tasks"
    )]
    SchedulerNotConfigured,

    /// A due time that a protobuf `Timestamp` cannot carry to the scheduler: before the
    /// Unix epoch or after 9999-12-31T23:59:59.999999999Z.
    #[error(
        "invalid due time {}: expected a time from 1970-01-01T00:00:00Z to \
         9999-12-31T23:59:59.999999999Z",
        describe_system_time(.due_time)
    )]
    InvalidDueTime {
        /// The due time as given.
        due_time: SystemTime,
    },

    /// A delay that a protobuf `Duration` cannot carry to the scheduler: longer than
    /// 315,576,000,000 seconds (about 10,000 years).
    ///
    /// The scheduler itself accepts delays of at most 100 years and rejects longer ones
    /// with [`tonic::Code::InvalidArgument`].
    #[error("invalid delay {delay:?}: expected at most 315576000000s (about 10,000 years)")]
    InvalidDelay {
        /// The delay as given.
        delay: Duration,
    },

    /// A worker was built with an invalid setting, such as no queues.
    #[error("invalid worker configuration: {0}")]
    InvalidConfig(String),

    /// A value that serde_json could not encode as a task payload, returned by
    /// [`Task::json`](crate::Task::json). Examples are a map with non-string keys or a
    /// `Serialize` implementation that fails.
    #[cfg(feature = "json")]
    #[error("failed to encode the payload of a {kind:?} task for queue {queue:?} as JSON")]
    EncodeJson {
        /// The task's queue.
        queue: String,
        /// The task's kind.
        kind: String,
        /// The serde_json error.
        #[source]
        source: serde_json::Error,
    },

    /// A delivered task whose `content-type` header names a type other than JSON,
    /// returned by [`TaskContext::json`](crate::TaskContext::json).
    #[cfg(feature = "json")]
    #[error(
        "task {task_id} has content type {content_type:?}, expected {}: read other \
         payloads with TaskContext::payload",
        crate::json::JSON_CONTENT_TYPE
    )]
    UnexpectedContentType {
        /// The task id.
        task_id: String,
        /// The value of the task's `content-type` header.
        content_type: String,
    },

    /// A delivered task whose payload is not valid JSON or does not match the requested
    /// type, returned by [`TaskContext::json`](crate::TaskContext::json).
    #[cfg(feature = "json")]
    #[error(
        "invalid JSON payload in task {task_id} ({})",
        describe_content_type(content_type.as_deref())
    )]
    DecodeJson {
        /// The task id.
        task_id: String,
        /// The value of the task's `content-type` header, or `None` if it has none.
        content_type: Option<String>,
        /// The serde_json error, with the line and column of the problem.
        #[source]
        source: serde_json::Error,
    },
}

impl Error {
    /// Returns the gRPC status if this error is [`Error::Status`].
    pub fn status(&self) -> Option<&tonic::Status> {
        match self {
            Error::Status(status) => Some(status),
            _ => None,
        }
    }

    /// Returns the gRPC status code if this error is [`Error::Status`].
    ///
    /// For example, [`tonic::Code::NotFound`] from [`Client::get_task`](crate::Client::get_task)
    /// means the task id is unknown.
    pub fn code(&self) -> Option<tonic::Code> {
        self.status().map(tonic::Status::code)
    }
}

/// Describes `time` as an offset from the Unix epoch, such as `12.5s before the Unix
/// epoch`. Unlike an RFC 3339 date, which ends at year 9999, the offset can express every
/// `SystemTime`.
fn describe_system_time(time: &SystemTime) -> String {
    match time.duration_since(UNIX_EPOCH) {
        Ok(after) => format!("{after:?} after the Unix epoch"),
        Err(error) => format!("{:?} before the Unix epoch", error.duration()),
    }
}

/// Describes a task's `content-type` header for an error message.
#[cfg(feature = "json")]
fn describe_content_type(content_type: Option<&str>) -> String {
    match content_type {
        Some(content_type) => format!("content type {content_type:?}"),
        None => "no content-type header".to_owned(),
    }
}

impl From<tonic::Status> for Error {
    fn from(status: tonic::Status) -> Self {
        Error::Status(Box::new(status))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_time_before_epoch_names_offset() {
        let due_time = UNIX_EPOCH - Duration::from_millis(12_500);

        let message = Error::InvalidDueTime { due_time }.to_string();

        assert!(
            message.starts_with("invalid due time 12.5s before the Unix epoch:"),
            "{message}"
        );
    }

    #[test]
    fn due_time_after_epoch_names_offset() {
        let due_time = UNIX_EPOCH + Duration::from_secs(253_402_300_800);

        let message = Error::InvalidDueTime { due_time }.to_string();

        assert!(
            message.starts_with("invalid due time 253402300800s after the Unix epoch:"),
            "{message}"
        );
    }

    #[test]
    fn missing_scheduler_names_the_fix() {
        let message = Error::SchedulerNotConfigured.to_string();

        assert!(message.contains("Client::with_scheduler"), "{message}");
        assert!(message.contains("http://127.0.0.1:7071"), "{message}");
    }
}
