//! The settle batcher: it collects the acks and nacks of a worker's handlers and sends
//! them to the broker in batched Ack and Nack calls.

use std::time::Duration;

use bytes::Bytes;
use docket_proto::v1::{Acknowledgement, NegativeAcknowledgement, TaskState};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tracing::{debug, error};

use crate::{Client, Error};

/// Maximum number of Ack and Nack calls in flight at once, so that one slow call does
/// not hold back the batches behind it.
const MAX_CALLS_IN_FLIGHT: usize = 4;

/// One lease to settle.
#[derive(Debug)]
pub(super) enum Settle {
    /// Completes the task, storing the result if one is given.
    Ack {
        lease_id: String,
        result: Option<Bytes>,
    },
    /// Fails the attempt with an error message. `no_retry` dead-letters the task at
    /// once, and `retry_delay` replaces the delay of its retry policy.
    Nack {
        lease_id: String,
        error: String,
        no_retry: bool,
        retry_delay: Option<Duration>,
    },
    /// Returns a task that was never started, without counting the attempt.
    Release { lease_id: String },
}

/// Outcome of settling one lease: the task's new state, or the item's own error.
type SettleOutcome = Result<TaskState, Error>;

/// A settle request waiting in a batch, with the channel that returns its outcome.
struct Pending<T> {
    item: T,
    reply: oneshot::Sender<SettleOutcome>,
}

/// The sending side of a settle batcher. Clones share one batcher, which stops after
/// every clone is dropped and the last batch is sent.
#[derive(Debug, Clone)]
pub(super) struct SettleSender {
    requests: mpsc::Sender<(Settle, oneshot::Sender<SettleOutcome>)>,
}

impl SettleSender {
    /// Queues `settle` for the next Ack or Nack call and waits for its outcome.
    ///
    /// A call that fails as a whole returns its error for every item of the batch.
    pub(super) async fn settle(&self, settle: Settle) -> SettleOutcome {
        let (reply, outcome) = oneshot::channel();
        if self.requests.send((settle, reply)).await.is_err() {
            return Err(batcher_stopped());
        }
        outcome.await.unwrap_or_else(|_| Err(batcher_stopped()))
    }
}

/// Handle that [`super::Worker::run`] keeps to control the batcher task.
pub(super) struct SettleBatcher {
    draining: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl SettleBatcher {
    /// Spawns a batcher that sends Ack and Nack calls of up to `max_batch` items through
    /// `client`. A partial batch is sent `flush_interval` after its first item arrived.
    pub(super) fn spawn(
        client: Client,
        max_batch: usize,
        flush_interval: Duration,
    ) -> (Self, SettleSender) {
        let (requests, receiver) = mpsc::channel(max_batch);
        let (draining, draining_receiver) = watch::channel(false);
        let batcher = Batcher {
            client,
            max_batch,
            flush_interval,
            acks: Batch::default(),
            nacks: Batch::default(),
            calls: JoinSet::new(),
        };
        let task = tokio::spawn(batcher.run(receiver, draining_receiver));
        (SettleBatcher { draining, task }, SettleSender { requests })
    }

    /// Makes the batcher send every batch at once from now on, without waiting for the
    /// flush interval, so that shutdown does not wait for it.
    pub(super) fn start_draining(&self) {
        self.draining.send_replace(true);
    }

    /// Waits until the batcher has sent every queued request and every call has
    /// returned. The batcher ends only after every [`SettleSender`] is dropped.
    pub(super) async fn finish(self) {
        self.start_draining();
        if let Err(join_error) = self.task.await
            && join_error.is_panic()
        {
            error!(error = %join_error, "settle batcher panicked");
        }
    }
}

/// Requests of one kind that wait to be sent together.
struct Batch<T> {
    items: Vec<Pending<T>>,
    /// Time by which the batch must be sent: the arrival of its first item plus the
    /// flush interval. `None` while the batch is empty.
    deadline: Option<Instant>,
}

impl<T> Default for Batch<T> {
    fn default() -> Self {
        Batch {
            items: Vec::new(),
            deadline: None,
        }
    }
}

impl<T> Batch<T> {
    fn push(&mut self, item: Pending<T>, flush_interval: Duration) {
        if self.items.is_empty() {
            self.deadline = Some(Instant::now() + flush_interval);
        }
        self.items.push(item);
    }

    fn take(&mut self) -> Vec<Pending<T>> {
        self.deadline = None;
        std::mem::take(&mut self.items)
    }

    /// Returns `true` if the batch is not empty and must be sent now: it is full, its
    /// deadline has passed, or the batcher is draining.
    fn is_due(&self, max_batch: usize, draining: bool, now: Instant) -> bool {
        match self.deadline {
            None => false,
            Some(deadline) => draining || self.items.len() >= max_batch || deadline <= now,
        }
    }
}

/// State of the batcher task.
struct Batcher {
    client: Client,
    max_batch: usize,
    flush_interval: Duration,
    acks: Batch<Acknowledgement>,
    nacks: Batch<NegativeAcknowledgement>,
    calls: JoinSet<()>,
}

impl Batcher {
    /// Receives requests and sends batches until every sender is dropped, then sends what
    /// is left and waits for the calls in flight.
    async fn run(
        mut self,
        mut receiver: mpsc::Receiver<(Settle, oneshot::Sender<SettleOutcome>)>,
        mut draining: watch::Receiver<bool>,
    ) {
        let mut closed = false;
        let mut handle_dropped = false;
        loop {
            // After the last sender is gone every remaining batch is sent at once.
            let drain_now = closed || handle_dropped || *draining.borrow();
            self.send_due_batches(drain_now);

            let pending = self.acks.items.len() + self.nacks.items.len();
            if closed && pending == 0 && self.calls.is_empty() {
                return;
            }

            // Receiving stops while a batch is full, which leaves later requests in the
            // bounded channel until a call slot frees up.
            let may_receive = !closed
                && self.acks.items.len() < self.max_batch
                && self.nacks.items.len() < self.max_batch;
            let has_free_slot = self.calls.len() < MAX_CALLS_IN_FLIGHT;
            let next_deadline = [self.acks.deadline, self.nacks.deadline]
                .into_iter()
                .flatten()
                .min();
            let sleep_until = next_deadline.filter(|_| has_free_slot);

            tokio::select! {
                joined = self.calls.join_next(), if !self.calls.is_empty() => {
                    if let Some(Err(join_error)) = joined
                        && join_error.is_panic()
                    {
                        error!(error = %join_error, "settle call task panicked");
                    }
                }
                request = receiver.recv(), if may_receive => match request {
                    Some((settle, reply)) => self.push(settle, reply),
                    None => closed = true,
                },
                changed = draining.changed(), if !drain_now => {
                    // An error means the handle was dropped without `finish`, because
                    // the `run` future was dropped. No flush deadline is waited for then.
                    handle_dropped = changed.is_err();
                }
                () = sleep_until_or_forever(sleep_until) => {}
            }
        }
    }

    fn push(&mut self, settle: Settle, reply: oneshot::Sender<SettleOutcome>) {
        match settle {
            Settle::Ack { lease_id, result } => {
                let item = Acknowledgement {
                    lease_id,
                    result: result.unwrap_or_default(),
                };
                self.acks.push(Pending { item, reply }, self.flush_interval);
            }
            Settle::Nack {
                lease_id,
                error,
                no_retry,
                retry_delay,
            } => {
                // `HandlerError::retry_after` caps the delay at 1 day, which always fits.
                let retry_delay =
                    retry_delay.and_then(|delay| prost_types::Duration::try_from(delay).ok());
                let item = NegativeAcknowledgement {
                    lease_id,
                    error,
                    retry_delay,
                    no_retry,
                    release: false,
                };
                self.nacks
                    .push(Pending { item, reply }, self.flush_interval);
            }
            Settle::Release { lease_id } => {
                let item = NegativeAcknowledgement {
                    lease_id,
                    release: true,
                    ..NegativeAcknowledgement::default()
                };
                self.nacks
                    .push(Pending { item, reply }, self.flush_interval);
            }
        }
    }

    /// Starts a call for each batch that is due, while fewer than
    /// [`MAX_CALLS_IN_FLIGHT`] calls run.
    fn send_due_batches(&mut self, draining: bool) {
        loop {
            if self.calls.len() >= MAX_CALLS_IN_FLIGHT {
                return;
            }
            let now = Instant::now();
            if self.acks.is_due(self.max_batch, draining, now) {
                let batch = self.acks.take();
                self.calls.spawn(send_acks(self.client.clone(), batch));
            } else if self.nacks.is_due(self.max_batch, draining, now) {
                let batch = self.nacks.take();
                self.calls.spawn(send_nacks(self.client.clone(), batch));
            } else {
                return;
            }
        }
    }
}

/// Sends one Ack call and returns each item's outcome to its requester.
async fn send_acks(client: Client, batch: Vec<Pending<Acknowledgement>>) {
    let (items, replies): (Vec<_>, Vec<_>) = batch
        .into_iter()
        .map(|pending| (pending.item, pending.reply))
        .unzip();
    debug!(items = items.len(), "sending Ack");
    let outcomes = client.ack(items).await;
    reply_each(replies, outcomes);
}

/// Sends one Nack call and returns each item's outcome to its requester.
async fn send_nacks(client: Client, batch: Vec<Pending<NegativeAcknowledgement>>) {
    let (items, replies): (Vec<_>, Vec<_>) = batch
        .into_iter()
        .map(|pending| (pending.item, pending.reply))
        .unzip();
    debug!(items = items.len(), "sending Nack");
    let outcomes = client.nack(items).await;
    reply_each(replies, outcomes);
}

/// Sends each item its own outcome, or the call's error if the call failed as a whole.
/// A requester that stopped waiting, such as an aborted handler task, is skipped.
fn reply_each(
    replies: Vec<oneshot::Sender<SettleOutcome>>,
    outcomes: Result<Vec<SettleOutcome>, Error>,
) {
    match outcomes {
        Ok(outcomes) => {
            for (reply, outcome) in replies.into_iter().zip(outcomes) {
                let _ = reply.send(outcome);
            }
        }
        Err(call_error) => {
            for reply in replies {
                let _ = reply.send(Err(copy_call_error(&call_error)));
            }
        }
    }
}

/// Copies the error of a failed Ack or Nack call for one of its items. `Error` is not
/// `Clone` because its transport variants are not. A call returns only `Status` and
/// `InvalidResponse`, and any other variant becomes `InvalidResponse` with its text.
fn copy_call_error(error: &Error) -> Error {
    match error {
        Error::Status(status) => Error::Status(status.clone()),
        Error::InvalidResponse(message) => Error::InvalidResponse(message.clone()),
        other => Error::InvalidResponse(other.to_string()),
    }
}

/// Builds the error of a request that got no outcome because the batcher task stopped.
fn batcher_stopped() -> Error {
    tonic::Status::cancelled("the worker's settle batcher stopped before sending the request")
        .into()
}

/// Sleeps until `deadline`, or forever if there is none.
async fn sleep_until_or_forever(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
