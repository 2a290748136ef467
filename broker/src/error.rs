//! Errors of the broker's operations.

use crate::task::{LeaseId, TaskId};

/// An error of a broker operation. `grpc::status` maps each variant onto a gRPC status code.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The request is malformed. `field` names the offending field, such as `tasks[2].queue`.
    #[error("{field}: {message}")]
    InvalidArgument {
        /// Path of the field in the request.
        field: String,
        /// Description of the problem, naming the value.
        message: String,
    },

    /// No task has this id.
    #[error("task {0} not found")]
    TaskNotFound(TaskId),

    /// The task is already in a final state, so it cannot change.
    #[error("task {task_id} is already {state}")]
    TaskFinal {
        /// The task.
        task_id: TaskId,
        /// Its final state's wire name.
        state: &'static str,
    },

    /// The lease is unknown, expired or already settled.
    #[error("lease {0} is not live: it is unknown, expired or already settled")]
    LeaseNotLive(LeaseId),

    /// The broker is shutting down and takes no more work.
    #[error("the broker is shutting down; retry against a running broker")]
    ShuttingDown,

    /// Reading or writing the store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl BrokerError {
    /// Returns an `InvalidArgument` error for `field`.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        BrokerError::InvalidArgument {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// An error of the redb store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// redb failed to open, read or write the database file.
    #[error("storage failed: {0}")]
    Redb(#[from] redb::Error),

    /// A stored record could not be decoded; the data file is damaged or from a newer broker.
    #[error("stored record of task {task_id} could not be decoded: {source}")]
    Decode {
        /// Key of the record.
        task_id: TaskId,
        /// Decoder error.
        source: prost::DecodeError,
    },

    /// A stored record contradicts the rules that every write keeps.
    #[error("stored record of task {task_id} is damaged: {message}")]
    Corrupt {
        /// Key of the record.
        task_id: TaskId,
        /// Description of the inconsistency.
        message: String,
    },

    /// Stored queue settings could not be decoded.
    #[error("stored settings of queue {queue:?} could not be decoded: {source}")]
    DecodeSettings {
        /// The queue.
        queue: String,
        /// Decoder error.
        source: prost::DecodeError,
    },

    /// Another process has the database file open.
    #[error(
        "{path} is open in another process, probably another broker on the same --data-dir; stop it or choose another folder"
    )]
    AlreadyOpen {
        /// The database file.
        path: std::path::PathBuf,
    },

    /// The data folder could not be created.
    #[error("cannot create data folder {path}: {source}")]
    DataDir {
        /// The folder.
        path: std::path::PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },

    /// The transaction that held this request failed to commit, so nothing of it was stored.
    #[error("commit failed: {message}")]
    BatchFailed {
        /// The error of the failed commit.
        message: String,
    },

    /// The storage writer has stopped, so nothing more can be committed.
    #[error("the storage writer has stopped")]
    WriterStopped,

    /// A commit failed on purpose, through the test hook `--fail-commits-while-exists`.
    #[error("commit failed on purpose while the test file {path} exists")]
    TestFault {
        /// The test file.
        path: std::path::PathBuf,
    },
}

macro_rules! redb_error_into_store_error {
    ($($error:ty),*) => {
        $(impl From<$error> for StoreError {
            fn from(err: $error) -> Self {
                StoreError::Redb(err.into())
            }
        })*
    };
}

redb_error_into_store_error!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);
