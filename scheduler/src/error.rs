//! Errors of the scheduler's operations, and the gRPC status of each.

use tonic::Status;

/// An error of a scheduler operation.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    /// The request is malformed. `field` names the offending field, such as
    /// `recurrence.cron.time_zone`.
    #[error("{field}: {message}")]
    InvalidArgument {
        /// Path of the field in the request.
        field: String,
        /// Description of the problem, naming the value.
        message: String,
    },

    /// No schedule has this id or name.
    #[error("{0} not found")]
    NotFound(String),

    /// A recurring schedule with this name exists.
    #[error("a schedule named {0:?} already exists")]
    AlreadyExists(String),

    /// The schedule is not in a state that allows the change.
    #[error("{0}")]
    FailedPrecondition(String),

    /// The scheduler is starting or shutting down.
    #[error("the scheduler is {0}; retry shortly")]
    Unavailable(&'static str),

    /// A stored record could not be decoded: the data file is damaged or from a newer
    /// scheduler.
    #[error("corrupt record in the store: {0}")]
    Corrupt(String),

    /// The write transaction that held the operation was not committed.
    #[error("the change was not stored: {0}")]
    CommitFailed(String),

    /// redb failed to read or write the store.
    #[error("storage failed: {0}")]
    Storage(#[from] redb::Error),
}

impl SchedulerError {
    /// Returns an `InvalidArgument` error for `field`.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        SchedulerError::InvalidArgument {
            field: field.into(),
            message: message.into(),
        }
    }

    /// Whether the error comes from the store rather than from the request, so that the
    /// transaction it happened in must not commit.
    pub fn is_storage(&self) -> bool {
        matches!(
            self,
            SchedulerError::Storage(_) | SchedulerError::Corrupt(_)
        )
    }
}

macro_rules! from_redb {
    ($($error:ty),*) => {$(
        impl From<$error> for SchedulerError {
            fn from(err: $error) -> Self {
                SchedulerError::Storage(err.into())
            }
        }
    )*};
}

from_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

impl From<SchedulerError> for Status {
    fn from(err: SchedulerError) -> Self {
        let message = err.to_string();
        match err {
            SchedulerError::InvalidArgument { .. } => Status::invalid_argument(message),
            SchedulerError::NotFound(_) => Status::not_found(message),
            SchedulerError::AlreadyExists(_) => Status::already_exists(message),
            SchedulerError::FailedPrecondition(_) => Status::failed_precondition(message),
            SchedulerError::Unavailable(_) => Status::unavailable(message),
            SchedulerError::Corrupt(_)
            | SchedulerError::CommitFailed(_)
            | SchedulerError::Storage(_) => {
                tracing::error!(error = %message, "request failed in the store");
                Status::internal(message)
            }
        }
    }
}
