//! In-memory delivery state: the ready and retry-waiting tasks of each queue, the
//! subscribers with their credit, the live leases, and per-queue counts.
//!
//! Everything here sits behind one mutex that is never held across an `.await`. Any
//! change that can make a delivery possible (tasks becoming ready, credit freed, a new
//! subscriber, a resumed queue) runs the dispatch loop before the lock is released, so
//! there is no separate dispatcher task to wake.

mod state;
pub mod timers;
pub mod watch;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use docket_proto::v1::{self, SubscribeResponse};
use tokio::sync::{Notify, mpsc};

use crate::error::BrokerError;
use crate::metrics::BrokerMetrics;
use crate::store::writer::{WriteOp, WriterHandle};
use crate::task::{LeaseId, QueueName, TaskId};
use state::State;
pub use watch::WatchRegistry;

/// A deliverable task in the dispatcher's memory, with every field needed to order and
/// deliver it without reading the store.
#[derive(Debug, Clone)]
pub struct ReadyTask {
    /// Task id.
    pub id: TaskId,
    /// Queue the task belongs to.
    pub queue: QueueName,
    /// Delivery priority; higher first.
    pub priority: i32,
    /// Enqueue sequence number; lower first among equal priorities.
    pub sequence: u64,
    /// Finished attempts so far.
    pub attempts: u32,
    /// Enqueue time, in microseconds since the Unix epoch.
    pub created_at_us: i64,
    /// The task as sent to workers.
    pub task: Arc<v1::Task>,
}

/// A lease removed from the dispatcher, with what the store needs to record its attempt.
#[derive(Debug, Clone)]
pub struct SettledLease {
    /// The leased task.
    pub task: Arc<ReadyTask>,
    /// Delivery time, in microseconds since the Unix epoch.
    pub started_at_us: i64,
}

/// Identifies one Subscribe stream.
pub type SubscriberId = u64;

/// Position of a task in its queue's delivery order: negated priority, then sequence.
pub type ReadyKey = (i64, u64);

/// Default number of ready tasks per queue that the dispatcher keeps in memory.
pub const DEFAULT_WINDOW: usize = 1024;

/// When a settled lease's credit is used for the next delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redeliver {
    /// At once.
    Now,
    /// At the storage writer's next commit, so that a failed task that becomes ready again
    /// competes for the credit in its priority order.
    AfterCommit,
}

/// A committed change that the storage writer hands to the dispatcher, in commit order.
#[derive(Debug)]
pub enum Effect {
    /// The task is deliverable. It joins its queue's window if it sorts inside it.
    Ready(Arc<ReadyTask>),
    /// The next tasks of a queue's ready index, read from the store after `after`, in
    /// order, for the queue's window.
    Refilled {
        /// The queue.
        queue: QueueName,
        /// Window position the read started after; `None` from the start.
        after: Option<ReadyKey>,
        /// Deliverable tasks read, in delivery order.
        tasks: Vec<Arc<ReadyTask>>,
        /// Key of the last index entry read, deliverable or not.
        last: Option<ReadyKey>,
        /// The read reached the end of the queue's index.
        exhausted: bool,
    },
    /// The task was cancelled, purged or deleted: drop it from its queue's window.
    Forget(TaskId),
    /// The task was cancelled while leased: tell the stream that holds the lease.
    CancelRequested(TaskId),
    /// Changes of the stored per-queue counts, by (queue, stored state number).
    Counts(Vec<(QueueName, i32, i64)>),
    /// The earliest retry time of any retry-waiting task, in microseconds since the Unix
    /// epoch.
    NextRetry(Option<i64>),
    /// A queue was paused or resumed.
    Paused {
        /// The queue.
        queue: QueueName,
        /// Whether deliveries are paused.
        paused: bool,
    },
}

/// A subscription's parameters, validated.
pub struct Subscription {
    /// Queues to receive from, distinct, with their weights (at least 1).
    pub queues: Vec<(QueueName, u32)>,
    /// Maximum unsettled deliveries.
    pub max_in_flight: u32,
    /// Lease length of each delivery; `None` takes each task's queue setting.
    pub lease_duration: Option<Duration>,
}

/// Location of a task that is about to be cancelled.
#[derive(Debug)]
pub enum Claim {
    /// In its queue's window; it was removed.
    Ready(Arc<ReadyTask>),
    /// Under a live lease; nothing was changed.
    Leased,
    /// Its lease was settled, expired or released, and the outcome waits for the storage
    /// writer; nothing was changed.
    Settling,
    /// Not in memory: beyond its queue's window, waiting for a retry, or not deliverable.
    Absent,
}

/// The live lease on a task, as GetTask shows it.
#[derive(Debug, Clone)]
pub struct LeaseView {
    /// Current deadline.
    pub deadline: SystemTime,
    /// Delivery time, in microseconds since the Unix epoch.
    pub started_at_us: i64,
}

/// Task counts of one queue.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueCounts {
    /// Ready for delivery.
    pub pending: u64,
    /// Waiting out a retry backoff.
    pub retry_wait: u64,
    /// Under a live lease.
    pub leased: u64,
    /// Dead-lettered.
    pub dead: u64,
    /// Succeeded and not yet purged.
    pub succeeded: u64,
    /// Cancelled and not yet purged.
    pub cancelled: u64,
    /// Deliveries are paused.
    pub paused: bool,
}

/// The dispatcher's shared state.
pub struct Dispatcher {
    state: Mutex<State>,
    /// Woken when the earliest lease deadline or retry time moves earlier.
    timers_changed: Notify,
    /// Watchers of single tasks.
    pub watchers: Arc<WatchRegistry>,
    /// Per-queue lease lengths, consulted when a subscription sets none.
    lease_duration_of: Box<dyn Fn(&QueueName) -> Duration + Send + Sync>,
    /// Requests window refills from the storage writer. Weak, so that it does not keep the
    /// writer running at shutdown.
    refills: Mutex<Option<mpsc::WeakSender<WriteOp>>>,
    /// Counters and histograms that the dispatcher and the storage writer update.
    metrics: Arc<BrokerMetrics>,
}

impl Dispatcher {
    /// Creates an empty dispatcher that keeps up to `window` ready tasks per queue in
    /// memory. `lease_duration_of` returns a queue's lease length for subscriptions that
    /// set none.
    pub fn new(
        window: usize,
        lease_duration_of: impl Fn(&QueueName) -> Duration + Send + Sync + 'static,
    ) -> Self {
        let metrics = Arc::new(BrokerMetrics::new());
        Dispatcher {
            state: Mutex::new(State::new(window.max(2), Arc::clone(&metrics))),
            timers_changed: Notify::new(),
            watchers: Arc::new(WatchRegistry::default()),
            lease_duration_of: Box::new(lease_duration_of),
            refills: Mutex::new(None),
            metrics,
        }
    }

    /// Returns the broker's counters and histograms.
    pub fn metrics(&self) -> &Arc<BrokerMetrics> {
        &self.metrics
    }

    /// Connects the storage writer, which reads the next tasks of a queue whose window
    /// runs low.
    pub fn connect_writer(&self, writer: &WriterHandle) {
        *self
            .refills
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(writer.downgrade());
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic under the lock leaves the state as the panicking step left it. Serving on
        // is better than failing every later request.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Applies committed changes in order, then delivers what subscribers can take.
    /// Dispatches even when `effects` is empty, since the caller may have freed credit.
    pub fn apply(&self, effects: impl IntoIterator<Item = Effect>) {
        let mut state = self.lock();
        let mut timers_moved = false;
        for effect in effects {
            timers_moved |= state.apply(effect);
        }
        self.dispatch(&mut state, timers_moved);
    }

    /// Registers a stream and delivers what it can take at once. Returns the stream's id
    /// and the receiving end of its messages.
    pub fn subscribe(
        &self,
        subscription: Subscription,
    ) -> (SubscriberId, mpsc::Receiver<SubscribeResponse>) {
        let mut state = self.lock();
        let (id, receiver) = state.add_subscriber(subscription);
        self.dispatch(&mut state, false);
        (id, receiver)
    }

    /// Returns the token that names a subscriber in StopDeliveries.
    pub fn stop_token(&self, id: SubscriberId) -> Option<String> {
        self.lock().stop_token(id).map(str::to_owned)
    }

    /// Sends no further deliveries to the subscriber that `token` names. Its leases stay
    /// live until they are settled or expire. Returns the number of leases it holds, or
    /// `None` if no open stream has that token.
    pub fn stop_deliveries(&self, token: &str) -> Option<u32> {
        self.lock().stop_deliveries(token)
    }

    /// Removes a stream and returns the leases it held, which the caller must record as
    /// failed attempts.
    pub fn unsubscribe(&self, id: SubscriberId) -> Vec<SettledLease> {
        self.lock().remove_subscriber(id)
    }

    /// Settles a live lease for Ack or Nack: removes it, frees the subscriber's credit and
    /// returns the leased task.
    ///
    /// # Errors
    ///
    /// `LeaseNotLive` if the lease is unknown, expired or already settled.
    pub fn settle(
        &self,
        lease_id: &LeaseId,
        redeliver: Redeliver,
    ) -> Result<SettledLease, BrokerError> {
        let mut state = self.lock();
        let Some(settled) = state.remove_lease(lease_id) else {
            return Err(BrokerError::LeaseNotLive(lease_id.clone()));
        };
        if redeliver == Redeliver::Now {
            self.dispatch(&mut state, false);
        }
        Ok(settled)
    }

    /// Moves a live lease's deadline to `extension` from now. Returns the new deadline and
    /// whether the task was cancelled meanwhile.
    ///
    /// # Errors
    ///
    /// `LeaseNotLive` if the lease is unknown, expired or already settled.
    pub fn extend(
        &self,
        lease_id: &LeaseId,
        extension: Duration,
    ) -> Result<(SystemTime, bool), BrokerError> {
        let mut state = self.lock();
        let Some(extended) = state.extend_lease(lease_id, extension) else {
            return Err(BrokerError::LeaseNotLive(lease_id.clone()));
        };
        if extended.earliest_moved {
            self.timers_changed.notify_one();
        }
        Ok((extended.deadline, extended.cancel_requested))
    }

    /// Removes every lease whose deadline is at or before `now` and returns them, which
    /// the caller must record as failed attempts.
    pub fn expire_due(&self, now: Instant) -> Vec<SettledLease> {
        let mut state = self.lock();
        let expired = state.expire_leases(now);
        if !expired.is_empty() {
            self.dispatch(&mut state, false);
        }
        expired
    }

    /// Returns whether a retry-waiting task is due at `now_us`.
    pub fn retry_due(&self, now_us: i64) -> bool {
        self.lock()
            .next_retry_at()
            .is_some_and(|retry_at| retry_at <= now_us)
    }

    /// Returns the time of the next lease expiry or retry, whichever is first.
    pub fn next_timer(&self, now: Instant, now_us: i64) -> Option<Instant> {
        let state = self.lock();
        let lease = state.next_lease_deadline();
        let retry = state.next_retry_at().map(|retry_at_us| {
            let wait_us = u64::try_from(retry_at_us.saturating_sub(now_us)).unwrap_or(0);
            now + Duration::from_micros(wait_us)
        });
        match (lease, retry) {
            (Some(lease), Some(retry)) => Some(lease.min(retry)),
            (lease, retry) => lease.or(retry),
        }
    }

    /// Waits until the earliest lease deadline or retry time moves earlier.
    pub async fn timers_changed(&self) {
        self.timers_changed.notified().await;
    }

    /// Returns the live lease on a task, if it is leased.
    pub fn lease_of(&self, task_id: TaskId) -> Option<LeaseView> {
        self.lock().lease_view(task_id)
    }

    /// Removes a task that is about to be cancelled from the ready or retry-waiting set, so
    /// that it cannot be delivered before the cancellation commits.
    pub fn claim(&self, task_id: TaskId) -> Claim {
        self.lock().claim(task_id)
    }

    /// Notes that the storage writer is applying the outcome of a task's settled lease.
    pub fn finish_settling(&self, task_id: TaskId) {
        self.lock().finish_settling(task_id);
    }

    /// Returns whether a window refill was requested and has not arrived, or is wanted
    /// and could not be requested yet.
    pub fn refills_outstanding(&self) -> bool {
        let mut state = self.lock();
        self.request_refills(&mut state);
        state.refills_outstanding()
    }

    /// Describes a queue's window and the subscribers, for test failure messages.
    #[doc(hidden)]
    pub fn describe_queue(&self, queue: &QueueName) -> String {
        self.lock().describe_queue(queue)
    }

    /// Returns whether a task is leased or its settled lease waits for the writer.
    pub fn is_held(&self, task_id: TaskId) -> bool {
        self.lock().is_held(task_id)
    }

    /// Returns a queue's counts.
    pub fn counts(&self, queue: &QueueName) -> QueueCounts {
        self.lock().counts(queue)
    }

    /// Returns the name of every queue that has or had tasks since the broker started.
    pub fn queue_names(&self) -> Vec<QueueName> {
        self.lock().queue_names()
    }

    /// Delivers ready tasks to subscribers with free credit until no delivery is possible,
    /// then wakes the timer loop if a deadline moved earlier.
    fn dispatch(&self, state: &mut State, timers_moved: bool) {
        let lease_duration_of = |queue: &QueueName| (self.lease_duration_of)(queue);
        let earliest_moved = state.dispatch(&lease_duration_of, &self.watchers);
        if timers_moved || earliest_moved {
            self.timers_changed.notify_one();
        }
        self.request_refills(state);
    }

    /// Asks the storage writer for the next tasks of every queue whose window ran low.
    fn request_refills(&self, state: &mut State) {
        let needed = state.queues_needing_refill();
        if needed.is_empty() {
            return;
        }
        let sender = self
            .refills
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        let Some(sender) = sender.and_then(|weak| weak.upgrade()) else {
            return;
        };
        for (queue, after) in needed {
            let op = WriteOp::Refill {
                queue: queue.clone(),
                after,
                limit: state.window(),
            };
            // A full channel leaves the request for the next dispatch.
            if sender.try_send(op).is_ok() {
                state.mark_refill_pending(&queue);
            }
        }
    }
}

#[cfg(test)]
mod tests;
