//! Task handlers and the error they return.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

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

/// Handlers by task kind, with an optional handler for every other kind.
#[derive(Clone, Default)]
pub(crate) struct Routes {
    by_kind: BTreeMap<String, BoxHandler>,
    fallback: Option<BoxHandler>,
}

impl Routes {
    /// Adds the handler of `kind`. Returns `false`, and keeps the first handler, if the
    /// kind already has one.
    pub(crate) fn insert(&mut self, kind: String, handler: BoxHandler) -> bool {
        match self.by_kind.entry(kind) {
            Entry::Occupied(_) => false,
            Entry::Vacant(entry) => {
                entry.insert(handler);
                true
            }
        }
    }

    /// Sets the handler of kinds without one of their own.
    pub(crate) fn set_fallback(&mut self, handler: BoxHandler) {
        self.fallback = Some(handler);
    }

    /// Returns `true` if no handler is set at all.
    pub(crate) fn is_empty(&self) -> bool {
        self.by_kind.is_empty() && self.fallback.is_none()
    }

    /// Returns the kinds that have a handler of their own, in order.
    pub(crate) fn kinds(&self) -> Vec<String> {
        self.by_kind.keys().cloned().collect()
    }

    /// Combines the routes into one handler that picks by the task's kind.
    ///
    /// A task of a kind without a handler fails its attempt with a message naming the
    /// kinds this worker handles. It is retried under its retry policy, so that a worker
    /// that has the handler can run it, for example a newer version during a rolling
    /// update. Its last attempt dead-letters it with that message.
    pub(crate) fn into_handler(self) -> BoxHandler {
        let Routes { by_kind, fallback } = self;
        if by_kind.is_empty()
            && let Some(fallback) = fallback
        {
            return fallback;
        }
        let known = by_kind
            .keys()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join(", ");
        Arc::new(move |context: TaskContext| {
            match by_kind.get(context.kind()).or(fallback.as_ref()) {
                Some(handler) => handler(context),
                None => {
                    let message = format!(
                        "no handler for task kind {:?}: this worker handles {known}",
                        context.kind()
                    );
                    Box::pin(async move { Err(HandlerError::msg(message)) })
                }
            }
        })
    }
}

impl fmt::Debug for Routes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Routes")
            .field("kinds", &self.by_kind.keys().collect::<Vec<_>>())
            .field("fallback", &self.fallback.is_some())
            .finish()
    }
}

/// The reason a handler attempt failed.
///
/// The worker sends its [`Display`](fmt::Display) output, with the chain of sources
/// joined by `": "`, to the broker as the task's last error. Any error type that
/// implements [`std::error::Error`] converts into it, so `?` works in handlers; use
/// [`HandlerError::msg`] for a plain message.
///
/// By default the broker retries the task after the delay of its retry policy, until it
/// has used its maximum attempts. [`HandlerError::no_retry`] and
/// [`HandlerError::retry_after`] override that for one failure:
///
/// ```
/// use std::time::Duration;
///
/// use docket::{HandlerError, HandlerResult, TaskContext};
///
/// async fn charge(task: TaskContext) -> HandlerResult {
///     match task.header("card") {
///         // Retrying cannot fix a missing card, so the task is dead-lettered now.
///         None => Err(HandlerError::msg("missing header card").no_retry()),
///         // The payment provider asked for a pause, so the next attempt waits for it.
///         Some("rate-limited") => {
///             Err(HandlerError::msg("rate limited").retry_after(Duration::from_secs(30)))
///         }
///         Some(_) => Ok(None),
///     }
/// }
/// ```
///
/// Like `anyhow::Error`, this type does not implement [`std::error::Error`] itself,
/// because that would conflict with the blanket `From` conversion.
pub struct HandlerError {
    source: Box<dyn StdError + Send + Sync + 'static>,
    no_retry: bool,
    retry_delay: Option<Duration>,
}

/// Maximum retry delay the broker accepts in a Nack.
pub(crate) const MAX_RETRY_DELAY: Duration = Duration::from_secs(24 * 60 * 60);

impl HandlerError {
    /// Wraps an error.
    pub fn new(error: impl StdError + Send + Sync + 'static) -> Self {
        HandlerError {
            source: Box::new(error),
            no_retry: false,
            retry_delay: None,
        }
    }

    /// Creates an error from a message.
    pub fn msg(message: impl fmt::Display) -> Self {
        HandlerError::new(MessageError(message.to_string()))
    }

    /// Asks the broker not to retry: the Nack sets `no_retry`, so the task is
    /// dead-lettered at once, whatever attempts it has left. Use it for failures that
    /// no retry can fix, such as invalid input.
    #[must_use]
    pub fn no_retry(mut self) -> Self {
        self.no_retry = true;
        self
    }

    /// Sets the delay before the next attempt, in place of the delay of the task's retry
    /// policy. The Nack carries it as `retry_delay`. A delay over the broker's maximum of
    /// 1 day is shortened to 1 day. It has no effect together with
    /// [`HandlerError::no_retry`] or on the last attempt, because no attempt follows.
    #[must_use]
    pub fn retry_after(mut self, delay: Duration) -> Self {
        self.retry_delay = Some(delay.min(MAX_RETRY_DELAY));
        self
    }

    /// Returns `true` if [`HandlerError::no_retry`] was called.
    pub fn is_no_retry(&self) -> bool {
        self.no_retry
    }

    /// Returns the delay set with [`HandlerError::retry_after`], or `None` if the task's
    /// retry policy decides.
    pub fn retry_delay(&self) -> Option<Duration> {
        self.retry_delay
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
        if !self.no_retry && self.retry_delay.is_none() {
            return fmt::Debug::fmt(&self.source, f);
        }
        f.debug_struct("HandlerError")
            .field("source", &self.source)
            .field("no_retry", &self.no_retry)
            .field("retry_delay", &self.retry_delay)
            .finish()
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
    fn retry_settings_default_to_policy() {
        let error = HandlerError::msg("timeout");

        assert!(!error.is_no_retry());
        assert_eq!(error.retry_delay(), None);
    }

    #[test]
    fn retry_builders_set_fields() {
        let dead = HandlerError::msg("invalid input").no_retry();
        let delayed = HandlerError::msg("busy").retry_after(Duration::from_secs(2));
        let capped = HandlerError::msg("busy").retry_after(Duration::from_secs(100_000));

        assert!(dead.is_no_retry());
        assert_eq!(delayed.retry_delay(), Some(Duration::from_secs(2)));
        assert!(!delayed.is_no_retry());
        assert_eq!(capped.retry_delay(), Some(MAX_RETRY_DELAY));
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
