//! Task handlers and the error they return.

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;

use crate::TaskContext;

/// The outcome of a handler: an optional result to store with the task, or the reason
/// the attempt failed.
pub type HandlerResult = Result<Option<Bytes>, HandlerError>;

/// A type-erased handler as the worker stores it.
pub(crate) type BoxHandler =
    Arc<dyn Fn(TaskContext) -> Pin<Box<dyn Future<Output = HandlerResult> + Send>> + Send + Sync>;

/// Boxes a handler function so that the worker can store it without type parameters.
pub(crate) fn box_handler<F, Fut>(handler: F) -> BoxHandler
where
    F: Fn(TaskContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send + 'static,
{
    Arc::new(move |context| Box::pin(handler(context)))
}

/// The reason a handler attempt failed.
///
/// The worker sends its [`Display`](fmt::Display) output, with the chain of sources
/// joined by `": "`, to the broker as the task's last error. Any error type that
/// implements [`std::error::Error`] converts into it, so `?` works in handlers; use
/// [`HandlerError::msg`] for a plain message.
///
/// Like `anyhow::Error`, this type does not implement [`std::error::Error`] itself,
/// because that would conflict with the blanket `From` conversion.
pub struct HandlerError {
    source: Box<dyn StdError + Send + Sync + 'static>,
}

impl HandlerError {
    /// Wraps an error.
    pub fn new(error: impl StdError + Send + Sync + 'static) -> Self {
        HandlerError {
            source: Box::new(error),
        }
    }

    /// Creates an error from a message.
    pub fn msg(message: impl fmt::Display) -> Self {
        HandlerError {
            source: Box::new(MessageError(message.to_string())),
        }
    }

    /// Returns the wrapped error.
    pub fn get_ref(&self) -> &(dyn StdError + Send + Sync + 'static) {
        &*self.source
    }

    /// Converts into the wrapped error.
    pub fn into_inner(self) -> Box<dyn StdError + Send + Sync + 'static> {
        self.source
    }
}

impl<E> From<E> for HandlerError
where
    E: StdError + Send + Sync + 'static,
{
    fn from(error: E) -> Self {
        HandlerError::new(error)
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.source)?;
        let mut next = self.source.source();
        while let Some(cause) = next {
            write!(f, ": {cause}")?;
            next = cause.source();
        }
        Ok(())
    }
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.source, f)
    }
}

/// An error that is only a message.
#[derive(Debug)]
struct MessageError(String);

impl fmt::Display for MessageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl StdError for MessageError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Outer(std::io::Error);

    impl fmt::Display for Outer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("failed to write message")
        }
    }

    impl StdError for Outer {
        fn source(&self) -> Option<&(dyn StdError + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn display_joins_source_chain() {
        let error = HandlerError::from(Outer(std::io::Error::other("disk full")));

        assert_eq!(error.to_string(), "failed to write message: disk full");
    }

    #[test]
    fn msg_displays_message() {
        let error = HandlerError::msg("invalid recipient 42");

        assert_eq!(error.to_string(), "invalid recipient 42");
    }

    #[test]
    fn question_mark_converts_errors() {
        fn parse(input: &str) -> Result<u32, HandlerError> {
            Ok(input.parse::<u32>()?)
        }

        assert_eq!(parse("7").unwrap(), 7);
        assert_eq!(
            parse("x").unwrap_err().to_string(),
            "invalid digit found in string"
        );
    }
}
