//! The one place where broker errors become gRPC statuses.
//!
//! | error | code |
//! | --- | --- |
//! | `InvalidArgument` | `INVALID_ARGUMENT` |
//! | `TaskNotFound` | `NOT_FOUND` |
//! | `LeaseNotLive`, `TaskFinal` | `FAILED_PRECONDITION` |
//! | `ShuttingDown`, `Store(WriterStopped)` | `UNAVAILABLE` |
//! | any other `Store` error | `INTERNAL` |

use tonic::Status;

use crate::error::{BrokerError, StoreError};

impl From<BrokerError> for Status {
    fn from(err: BrokerError) -> Self {
        let message = err.to_string();
        match err {
            BrokerError::InvalidArgument { .. } => Status::invalid_argument(message),
            BrokerError::TaskNotFound(_) => Status::not_found(message),
            BrokerError::LeaseNotLive(_) | BrokerError::TaskFinal { .. } => {
                Status::failed_precondition(message)
            }
            BrokerError::ShuttingDown | BrokerError::Store(StoreError::WriterStopped) => {
                Status::unavailable(message)
            }
            BrokerError::Store(err) => {
                tracing::error!(error = %err, "request failed in the store");
                Status::internal(message)
            }
        }
    }
}
