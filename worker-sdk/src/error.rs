//! The error type of the client and the worker.

/// An error from talking to the broker or from configuring a worker.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The endpoint is not a valid URI, such as `http://127.0.0.1:7070`.
    #[error("invalid broker endpoint {endpoint:?}")]
    InvalidEndpoint {
        /// The endpoint as given.
        endpoint: String,
        /// The parse error.
        #[source]
        source: tonic::transport::Error,
    },

    /// The connection to the broker could not be established.
    #[error("failed to connect to the broker at {endpoint}")]
    Connect {
        /// The endpoint that was dialed.
        endpoint: String,
        /// The transport error.
        #[source]
        source: tonic::transport::Error,
    },

    /// The broker, or the transport under it, returned a gRPC status other than OK.
    ///
    /// Its `Display` output is the status code and message. The status is boxed to keep
    /// `Result<T, Error>` small, and [`Error::status`] and [`Error::code`] return it
    /// without matching.
    #[error("broker call failed ({:?}): {}", .0.code(), .0.message())]
    Status(Box<tonic::Status>),

    /// The broker returned a response that breaks the wire contract, such as a missing
    /// required field.
    #[error("invalid response from the broker: {0}")]
    InvalidResponse(String),

    /// A worker was built with an invalid setting, such as no queues.
    #[error("invalid worker configuration: {0}")]
    InvalidConfig(String),
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

impl From<tonic::Status> for Error {
    fn from(status: tonic::Status) -> Self {
        Error::Status(Box::new(status))
    }
}
