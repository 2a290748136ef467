//! The builder for [`Worker`].

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use tokio::sync::Semaphore;

use crate::handler::{HandlerResult, Routes, box_handler};
use crate::{Client, Error, TaskContext, Worker};

/// Default number of handlers that run at once.
const DEFAULT_CONCURRENCY: usize = 10;

/// Time running handlers get to finish after shutdown starts. It matches the broker's
/// default lease of 30 s.
const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// First reconnect delay. Later delays double up to [`DEFAULT_BACKOFF_MAX`].
const DEFAULT_BACKOFF_INITIAL: Duration = Duration::from_millis(100);

/// Maximum reconnect delay.
const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Default maximum number of leases settled by one Ack or Nack call.
const DEFAULT_SETTLE_MAX_BATCH: usize = 64;

/// Default time a partial batch of acks or nacks waits for more items.
const DEFAULT_SETTLE_FLUSH_INTERVAL: Duration = Duration::from_millis(1);

/// Shortest lease the broker grants.
const MIN_LEASE_DURATION: Duration = Duration::from_secs(1);

/// Largest queue weight the broker accepts.
const MAX_QUEUE_WEIGHT: u32 = 100;

/// Upper limit of the settle batch size. It equals the broker's default limit of items
/// per Ack or Nack call, so that the broker accepts every batch with default settings.
const MAX_SETTLE_BATCH: usize = 1000;

/// Configures and builds a [`Worker`]. Created by [`Worker::builder`].
///
/// One worker can serve several queues, with weights, and run a different handler for
/// each task kind:
///
/// ```no_run
/// use docket::{Client, HandlerResult, TaskContext, Worker};
///
/// async fn send_email(task: TaskContext) -> HandlerResult {
///     println!("e-mail task {}", task.id());
///     Ok(None)
/// }
///
/// async fn resize_image(task: TaskContext) -> HandlerResult {
///     println!("image task {}", task.id());
///     Ok(None)
/// }
///
/// # async fn example() -> Result<(), docket::Error> {
/// let client = Client::connect("http://127.0.0.1:7070").await?;
/// let worker = Worker::builder(client)
///     // When both queues have tasks, "urgent" gets three deliveries for each of "bulk".
///     .queue_weighted("urgent", 3)
///     .queue("bulk")
///     .handle("send_email", send_email)
///     .handle("resize_image", resize_image)
///     .concurrency(20)
///     .build_handlers()?;
/// # let _ = worker;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until `build` is called"]
pub struct WorkerBuilder {
    client: Client,
    queues: Vec<String>,
    weights: HashMap<String, u32>,
    routes: Routes,
    duplicate_kinds: Vec<String>,
    concurrency: usize,
    max_in_flight: Option<u32>,
    lease_duration: Option<Duration>,
    shutdown_grace: Duration,
    backoff_initial: Duration,
    backoff_max: Duration,
    settle_max_batch: usize,
    settle_flush_interval: Duration,
}

impl WorkerBuilder {
    pub(crate) fn new(client: Client) -> Self {
        WorkerBuilder {
            client,
            queues: Vec::new(),
            weights: HashMap::new(),
            routes: Routes::default(),
            duplicate_kinds: Vec::new(),
            concurrency: DEFAULT_CONCURRENCY,
            max_in_flight: None,
            lease_duration: None,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            backoff_initial: DEFAULT_BACKOFF_INITIAL,
            backoff_max: DEFAULT_BACKOFF_MAX,
            settle_max_batch: DEFAULT_SETTLE_MAX_BATCH,
            settle_flush_interval: DEFAULT_SETTLE_FLUSH_INTERVAL,
        }
    }

    /// Adds a queue to receive tasks from. At least one is required.
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queues.push(queue.into());
        self
    }

    /// Adds several queues to receive tasks from.
    pub fn queues<I>(mut self, queues: I) -> Self
    where
        I: IntoIterator,
        I::Item: Into<String>,
    {
        self.queues.extend(queues.into_iter().map(Into::into));
        self
    }

    /// Adds a queue with a weight from 1 to 100.
    ///
    /// When several of the worker's queues have ready tasks, the broker shares the
    /// deliveries by weight: a queue of weight 3 gets up to three deliveries for each one
    /// of a queue of weight 1. Queues added with [`WorkerBuilder::queue`] have weight 1.
    /// Within a queue, tasks go by priority, then in enqueue order.
    pub fn queue_weighted(mut self, queue: impl Into<String>, weight: u32) -> Self {
        let queue = queue.into();
        self.weights.insert(queue.clone(), weight);
        self.queues.push(queue);
        self
    }

    /// Sets the handler of the tasks of one kind.
    ///
    /// A worker built with [`WorkerBuilder::build_handlers`] runs only the kinds that
    /// have a handler. A task of another kind fails its attempt with a message naming
    /// the kinds the worker handles, and is retried under its retry policy, so that a
    /// worker that has the handler can take it. Use [`WorkerBuilder::build`] to give
    /// every other kind one more handler instead.
    ///
    /// The handler has the same contract as the one of [`WorkerBuilder::build`].
    pub fn handle<F, Fut>(mut self, kind: impl Into<String>, handler: F) -> Self
    where
        F: Fn(TaskContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = HandlerResult> + Send + 'static,
    {
        let kind = kind.into();
        if !self.routes.insert(kind.clone(), box_handler(handler)) {
            self.duplicate_kinds.push(kind);
        }
        self
    }

    /// Sets the maximum number of handlers that run at once. The default is 10.
    pub fn concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency;
        self
    }

    /// Sets the maximum number of deliveries the broker sends before they are settled,
    /// running or waiting for a free handler slot. The default equals the concurrency.
    ///
    /// A value above the concurrency prefetches deliveries, so that a slot that becomes
    /// free starts the next task without a round trip. Prefetched deliveries use up
    /// their lease while they wait.
    pub fn max_in_flight(mut self, max_in_flight: u32) -> Self {
        self.max_in_flight = Some(max_in_flight);
        self
    }

    /// Sets the lease length of each delivery, from 1 s to the broker's maximum (1 hour by
    /// default). Unset takes the lease setting of each task's queue, 30 s by default.
    ///
    /// While a handler runs, the worker extends the lease by this length each time half
    /// of the time left has passed, so a handler may run longer than one lease. A lease
    /// still expires if the worker cannot reach the broker in time, and then the task is
    /// offered again and the late ack or nack is rejected.
    pub fn lease_duration(mut self, lease_duration: Duration) -> Self {
        self.lease_duration = Some(lease_duration);
        self
    }

    /// Sets how long [`Worker::run`] waits for running handlers after shutdown starts
    /// before it aborts them. The default is 30 s.
    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.shutdown_grace = grace;
        self
    }

    /// Sets the first and the maximum delay between reconnect attempts. The defaults are
    /// 100 ms and 10 s. Each delay is drawn at random from the upper half of the
    /// current step, and the step doubles after every failure.
    pub fn reconnect_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.backoff_initial = initial;
        self.backoff_max = max;
        self
    }

    /// Sets how acks and nacks are batched. The defaults are 64 items and 1 ms.
    ///
    /// The worker sends up to `max_items` leases in one Ack or Nack call, and sends a
    /// partial batch `flush_interval` after its first item arrived. Acks and nacks go in
    /// separate calls, and up to 4 calls run at once. A longer interval makes fewer,
    /// larger calls but delays every settle by up to that time, which counts against
    /// the lease. Use `settle_batch(1, Duration::ZERO)` to send every settle on its own.
    pub fn settle_batch(mut self, max_items: usize, flush_interval: Duration) -> Self {
        self.settle_max_batch = max_items;
        self.settle_flush_interval = flush_interval;
        self
    }

    /// Builds a worker that runs `handler` for every delivered task whose kind has no
    /// handler set with [`WorkerBuilder::handle`], which is every task if none is set.
    ///
    /// The handler returns `Ok` with an optional result to acknowledge the task, or
    /// `Err` to fail the attempt. A handler that panics fails the attempt too.
    ///
    /// # Errors
    ///
    /// Returns [`Error::InvalidConfig`] if no queue is set, if a queue weight is outside
    /// 1..=100, if two handlers are set for one kind, if the concurrency or
    /// `max_in_flight` is 0 or too large, if the lease duration is below 1 s, if the
    /// initial reconnect delay is 0 or above the maximum, or if the settle batch size is
    /// outside 1..=1000.
    pub fn build<F, Fut>(mut self, handler: F) -> Result<Worker, Error>
    where
        F: Fn(TaskContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = HandlerResult> + Send + 'static,
    {
        self.routes.set_fallback(box_handler(handler));
        self.finish()
    }

    /// Builds a worker that runs the handlers set with [`WorkerBuilder::handle`], each
    /// for its task kind.
    ///
    /// # Errors
    ///
    /// Returns [`Error::InvalidConfig`] if no handler is set, and in the cases that
    /// [`WorkerBuilder::build`] lists.
    pub fn build_handlers(self) -> Result<Worker, Error> {
        if self.routes.is_empty() {
            return Err(Error::InvalidConfig(
                "no handler is set: call `handle` for each task kind, or `build` with one \
                 handler for every kind"
                    .to_owned(),
            ));
        }
        self.finish()
    }

    fn finish(self) -> Result<Worker, Error> {
        if self.queues.is_empty() {
            return Err(Error::InvalidConfig(
                "no queue is set, and a worker needs at least one (call `queue`)".to_owned(),
            ));
        }
        let mut weights = self.weights.iter().collect::<Vec<_>>();
        weights.sort();
        if let Some((queue, weight)) = weights
            .into_iter()
            .find(|(_, weight)| !(1..=MAX_QUEUE_WEIGHT).contains(*weight))
        {
            return Err(Error::InvalidConfig(format!(
                "weight {weight} of queue {queue:?} is out of range 1..={MAX_QUEUE_WEIGHT}"
            )));
        }
        if !self.duplicate_kinds.is_empty() {
            return Err(Error::InvalidConfig(format!(
                "more than one handler is set for task kind {}",
                self.duplicate_kinds.join(", ")
            )));
        }
        if self.concurrency == 0 || self.concurrency > Semaphore::MAX_PERMITS {
            return Err(Error::InvalidConfig(format!(
                "concurrency {} is out of range 1..={}",
                self.concurrency,
                Semaphore::MAX_PERMITS
            )));
        }

        let max_in_flight = match self.max_in_flight {
            Some(0) => {
                return Err(Error::InvalidConfig(
                    "max_in_flight must be at least 1".to_owned(),
                ));
            }
            Some(max_in_flight) => max_in_flight,
            None => u32::try_from(self.concurrency).unwrap_or(u32::MAX),
        };

        if let Some(duration) = self.lease_duration {
            if duration < MIN_LEASE_DURATION {
                return Err(Error::InvalidConfig(format!(
                    "lease duration {duration:?} is below the minimum of {MIN_LEASE_DURATION:?}"
                )));
            }
            // The broker rejects a lease over its maximum when the worker subscribes.
            if let Err(error) = prost_types::Duration::try_from(duration) {
                return Err(Error::InvalidConfig(format!(
                    "lease duration {duration:?}: {error}"
                )));
            }
        }

        if self.backoff_initial.is_zero() || self.backoff_initial > self.backoff_max {
            return Err(Error::InvalidConfig(format!(
                "reconnect backoff must have 0 < initial <= max, got initial {:?} and max {:?}",
                self.backoff_initial, self.backoff_max
            )));
        }

        if !(1..=MAX_SETTLE_BATCH).contains(&self.settle_max_batch) {
            return Err(Error::InvalidConfig(format!(
                "settle batch size {} is out of range 1..={MAX_SETTLE_BATCH}",
                self.settle_max_batch
            )));
        }

        Ok(Worker {
            client: self.client,
            queues: self.queues,
            weights: self.weights,
            kinds: self.routes.kinds(),
            concurrency: self.concurrency,
            max_in_flight,
            lease_duration: self.lease_duration,
            shutdown_grace: self.shutdown_grace,
            backoff_initial: self.backoff_initial,
            backoff_max: self.backoff_max,
            settle_max_batch: self.settle_max_batch,
            settle_flush_interval: self.settle_flush_interval,
            handler: self.routes.into_handler(),
            cutoff: tokio::sync::watch::channel(false).0,
        })
    }
}
