//! Running one delivery through the handler and settling its lease.

use std::any::Any;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use docket_proto::v1::TaskState;
use tokio::sync::{OwnedSemaphorePermit, watch};
use tokio::task::AbortHandle;
use tracing::{Instrument, debug, error, warn};

use super::lease::{CancelRegistry, LeaseKeeper};
use super::settle::{Settle, SettleSender};
use crate::handler::{BoxHandler, HandlerError};
use crate::trace::TaskTrace;
use crate::{Client, Error, TaskContext};

/// Tries per ack or nack while the broker is unavailable, if the delivery has no lease
/// deadline. With a deadline, tries go on while the lease is live.
const SETTLE_TRIES_WITHOUT_DEADLINE: u32 = 3;

/// Delay before the second try of an ack or nack. It doubles for each further try, up
/// to [`SETTLE_RETRY_MAX_DELAY`].
const SETTLE_RETRY_DELAY: Duration = Duration::from_millis(200);

/// Maximum delay between tries of an ack or nack.
const SETTLE_RETRY_MAX_DELAY: Duration = Duration::from_secs(5);

/// Result of one handler attempt.
enum Outcome {
    Succeeded(Option<Bytes>),
    Failed(Failure),
}

/// A failed attempt as the Nack reports it.
struct Failure {
    message: String,
    no_retry: bool,
    retry_delay: Option<Duration>,
}

impl Failure {
    fn from_handler(error: &HandlerError) -> Self {
        Failure {
            message: error.to_string(),
            no_retry: error.is_no_retry(),
            retry_delay: error.retry_delay(),
        }
    }

    /// Builds a failure that the task's retry policy handles, such as a panic.
    fn retryable(message: String) -> Self {
        Failure {
            message,
            no_retry: false,
            retry_delay: None,
        }
    }
}

/// Worker state that one delivery uses besides the handler and its context.
pub(super) struct Delivery {
    pub(super) settler: SettleSender,
    pub(super) client: Client,
    /// Lease length the worker asked for in Subscribe, or `None` for the broker's default.
    pub(super) lease_duration: Option<Duration>,
    pub(super) cancellations: CancelRegistry,
    /// Becomes `true` when the worker's shutdown grace period ends.
    pub(super) cutoff: watch::Receiver<bool>,
}

/// Runs the handler for one delivery while extending its lease, then acks or nacks the
/// lease through the settle batcher. `_permit` holds a handler slot until the lease is
/// settled.
///
/// All of it runs inside the delivery's `docket.task` span, so the handler's own events
/// and the logs of the ack or nack carry the task's fields and trace.
pub(super) async fn execute(
    delivery: Delivery,
    handler: BoxHandler,
    context: TaskContext,
    _permit: OwnedSemaphorePermit,
) {
    let trace = TaskTrace::start(&context);
    let span = trace.span().clone();
    execute_traced(delivery, handler, context, trace)
        .instrument(span)
        .await;
}

/// Runs and settles one delivery as [`execute`] describes, inside the span of `trace`.
async fn execute_traced(
    delivery: Delivery,
    handler: BoxHandler,
    context: TaskContext,
    trace: TaskTrace,
) {
    let task_id = context.id().to_owned();
    let lease_id = context.lease_id().to_owned();
    let attempt = context.attempt();
    let max_attempts = context.max_attempts();
    let mut lease_deadline = context.lease_deadline();
    let cancellation = context.cancellation();
    let _registration = delivery
        .cancellations
        .register(&lease_id, Arc::clone(&cancellation));

    // The handler runs in its own task so that a panic is caught as a `JoinError`
    // instead of unwinding through the worker.
    let mut handle = tokio::spawn(trace.run_handler(|| handler(context)));
    let _abort = AbortOnDrop(handle.abort_handle());
    let keeper = LeaseKeeper {
        client: &delivery.client,
        task_id: &task_id,
        lease_id: &lease_id,
        lease_duration: delivery.lease_duration,
        cancellation: &cancellation,
    };
    // Extension stops when the handler ends, because the keeper's future is dropped.
    let mut cutoff = delivery.cutoff;
    let joined = tokio::select! {
        joined = &mut handle => Some(joined),
        () = keeper.run(&mut lease_deadline) => unreachable!("the lease keeper never completes"),
        // Stopped at the end of the shutdown grace period: the Nack sets a retry delay of zero, so
        // that another worker runs the task at once.
        _ = cutoff.wait_for(|cut_off| *cut_off) => None,
    };
    let Some(joined) = joined else {
        handle.abort();
        warn!(
            %task_id, attempt, max_attempts,
            "handler stopped at the end of the shutdown grace period; nacking for an immediate retry"
        );
        let failure = Failure {
            message: "the worker shut down before the handler finished".to_owned(),
            no_retry: false,
            retry_delay: Some(Duration::ZERO),
        };
        settle(
            &delivery.settler,
            &task_id,
            &lease_id,
            lease_deadline,
            Outcome::Failed(failure),
        )
        .await;
        return;
    };
    let outcome = match joined {
        Ok(Ok(result)) => Outcome::Succeeded(result),
        Ok(Err(handler_error)) => {
            let failure = Failure::from_handler(&handler_error);
            warn!(
                %task_id, attempt, max_attempts, error = %failure.message,
                no_retry = failure.no_retry, retry_delay = ?failure.retry_delay,
                "handler failed"
            );
            Outcome::Failed(failure)
        }
        Err(join_error) if join_error.is_panic() => {
            let payload = join_error.into_panic();
            // `&*payload` passes the payload itself. `&payload` would pass the `Box`,
            // which is also `Any` and never downcasts to a string.
            let message = format!("handler panicked: {}", panic_message(&*payload));
            error!(%task_id, attempt, max_attempts, error = %message, "handler panicked");
            Outcome::Failed(Failure::retryable(message))
        }
        Err(_) => {
            // Handlers are aborted here only when the `run` future is dropped. The lease
            // is released when the stream closes.
            debug!(%task_id, "handler aborted at shutdown");
            return;
        }
    };

    settle(
        &delivery.settler,
        &task_id,
        &lease_id,
        lease_deadline,
        outcome,
    )
    .await;
}

/// Acks or nacks a lease, retrying while the broker is unavailable and the lease is
/// live. Each try goes into the next batch, and only this lease's own outcome decides
/// whether it is retried.
async fn settle(
    settler: &SettleSender,
    task_id: &str,
    lease_id: &str,
    lease_deadline: Option<SystemTime>,
    outcome: Outcome,
) {
    let operation = match outcome {
        Outcome::Succeeded(_) => "ack",
        Outcome::Failed(_) => "nack",
    };
    let mut delay = SETTLE_RETRY_DELAY;
    let mut try_number = 1;
    loop {
        let request = match &outcome {
            Outcome::Succeeded(result) => Settle::Ack {
                lease_id: lease_id.to_owned(),
                result: result.clone(),
            },
            Outcome::Failed(failure) => Settle::Nack {
                lease_id: lease_id.to_owned(),
                error: failure.message.clone(),
                no_retry: failure.no_retry,
                retry_delay: failure.retry_delay,
            },
        };
        let result = settler.settle(request).await.map(|state| match &outcome {
            Outcome::Succeeded(_) => debug!(%task_id, "acked"),
            Outcome::Failed(failure) if state == TaskState::Dead => {
                warn!(%task_id, error = %failure.message, no_retry = failure.no_retry, "task dead-lettered");
            }
            Outcome::Failed(_) => debug!(%task_id, ?state, "nacked"),
        });

        let error = match result {
            Ok(()) => return,
            Err(error) => error,
        };
        if error.code() == Some(tonic::Code::FailedPrecondition) {
            warn!(
                %task_id, %error, operation,
                "lease expired or already settled; the broker offers the task again"
            );
            return;
        }
        if !is_retryable(&error) || !may_retry(try_number, delay, lease_deadline) {
            error!(
                %task_id, %error, operation, try_number,
                "settling failed; the broker offers the task again when its lease expires"
            );
            return;
        }

        warn!(%task_id, %error, operation, try_number, "settling failed; retrying");
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(SETTLE_RETRY_MAX_DELAY);
        try_number += 1;
    }
}

/// Returns `true` if another try after `delay` can still reach the broker before the
/// lease expires.
fn may_retry(try_number: u32, delay: Duration, lease_deadline: Option<SystemTime>) -> bool {
    match lease_deadline {
        Some(deadline) => SystemTime::now() + delay < deadline,
        None => try_number < SETTLE_TRIES_WITHOUT_DEADLINE,
    }
}

fn is_retryable(error: &Error) -> bool {
    error.code() == Some(tonic::Code::Unavailable)
}

/// Extracts the message of a panic payload, which is a `&str` or a `String` for
/// `panic!` with a message.
fn panic_message(payload: &(dyn Any + Send)) -> &str {
    if let Some(message) = payload.downcast_ref::<&str>() {
        message
    } else if let Some(message) = payload.downcast_ref::<String>() {
        message
    } else {
        "non-string panic payload"
    }
}

/// Aborts the handler task when `execute` is dropped, so that aborting `execute` at the
/// end of shutdown also stops its handler.
struct AbortOnDrop(AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_stops_at_lease_deadline() {
        let delay = Duration::from_secs(1);
        let live = SystemTime::now() + Duration::from_secs(60);
        let expiring = SystemTime::now() + Duration::from_millis(500);

        assert!(may_retry(100, delay, Some(live)));
        assert!(!may_retry(1, delay, Some(expiring)));
    }

    #[test]
    fn retry_without_deadline_is_bounded() {
        let delay = Duration::from_millis(200);

        assert!(may_retry(1, delay, None));
        assert!(!may_retry(SETTLE_TRIES_WITHOUT_DEADLINE, delay, None));
    }

    #[test]
    fn panic_message_reads_str_and_string() {
        let literal: Box<dyn Any + Send> = Box::new("boom");
        let formatted: Box<dyn Any + Send> = Box::new(format!("boom {}", 42));
        let other: Box<dyn Any + Send> = Box::new(42_u8);

        assert_eq!(panic_message(&*literal), "boom");
        assert_eq!(panic_message(&*formatted), "boom 42");
        assert_eq!(panic_message(&*other), "non-string panic payload");
    }
}
