//! The worker that receives deliveries and runs a handler for each.

mod builder;
mod execute;
mod lease;
mod settle;

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::{Future, pending};
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use docket_proto::v1::subscribe_response::Event;
use docket_proto::v1::{CancelNotice, SubscribeRequest, SubscribeResponse};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tonic::Streaming;
use tracing::{debug, error, info, trace, warn};

pub use self::builder::WorkerBuilder;
use self::lease::CancelRegistry;
use self::settle::{Settle, SettleBatcher, SettleSender};
use crate::backoff::Backoff;
use crate::handler::BoxHandler;
use crate::{Client, Error, TaskContext};

/// Receives tasks from one or more queues and runs a handler for each, at most
/// `concurrency` at once.
///
/// The handler is the one set for the task's kind with [`WorkerBuilder::handle`], or the
/// one given to [`WorkerBuilder::build`]. The worker acks a task when the handler returns
/// `Ok` and nacks it with the error message when the handler returns `Err` or panics. A
/// [`HandlerError`](crate::HandlerError) can ask the Nack to skip the retries or to set
/// the retry delay. Acks and nacks are sent in batches, as
/// [`WorkerBuilder::settle_batch`] configures.
///
/// While a handler runs, the worker extends its lease with ExtendLease each time half of
/// the time left has passed, by the lease length, so a handler may run longer than one
/// lease. When the broker reports that the task was cancelled, the worker marks its
/// [`TaskContext`] as cancelled (see [`TaskContext::cancelled`]) but lets the handler
/// run until it returns; a delivery cancelled before its handler started is released
/// without running. The worker reconnects with exponential backoff and jitter when the
/// Subscribe stream breaks or the broker is unreachable. Build one with
/// [`Worker::builder`] and start it with [`Worker::run`].
pub struct Worker {
    client: Client,
    queues: Vec<String>,
    weights: HashMap<String, u32>,
    /// Kinds with a handler of their own, for logs.
    kinds: Vec<String>,
    concurrency: usize,
    max_in_flight: u32,
    lease_duration: Option<Duration>,
    shutdown_grace: Duration,
    backoff_initial: Duration,
    backoff_max: Duration,
    settle_max_batch: usize,
    settle_flush_interval: Duration,
    handler: BoxHandler,
    /// Becomes `true` when the shutdown grace period ends, which stops the running
    /// handlers.
    cutoff: watch::Sender<bool>,
}

/// Time a StopDeliveries call at shutdown may take.
const STOP_DELIVERIES_LIMIT: Duration = Duration::from_secs(2);

/// Time the handlers stopped at the end of the grace period get to send their nacks.
const CUTOFF_SETTLE_LIMIT: Duration = Duration::from_secs(5);

/// Reason the receive loop stopped.
enum Stop {
    /// The shutdown future completed. The stream is kept open while running handlers
    /// finish, so that their leases stay valid.
    Shutdown(Option<Streaming<SubscribeResponse>>),
    /// The broker rejected the subscription in a way that retrying cannot fix.
    Fatal(Error),
}

impl Worker {
    /// Starts building a worker that calls the broker through `client`.
    pub fn builder(client: Client) -> WorkerBuilder {
        WorkerBuilder::new(client)
    }

    /// Runs the worker until `shutdown` completes.
    ///
    /// On shutdown the worker starts no new handler and waits up to the shutdown grace
    /// period for running handlers to finish, acking or nacking each as usual. Handlers
    /// still running when the grace period ends are stopped, and their tasks are nacked
    /// with a retry delay of zero, so that another worker runs them at once. The Nack
    /// counts as a failed attempt, so on a task's last attempt it dead-letters the task
    /// with the message "the worker shut down before the handler finished". Then the
    /// worker closes the stream, and the broker offers again at once the deliveries that
    /// had not started.
    ///
    /// From the start of shutdown, batches of acks and nacks are sent without waiting
    /// for the flush interval, and `run` returns only after every queued ack and nack has
    /// been sent and its call has returned.
    ///
    /// Connection failures and broken streams are retried until shutdown. A failed ack
    /// or nack is logged and does not stop the worker.
    ///
    /// # Errors
    ///
    /// Returns [`Error::Status`] if the broker rejects the subscription with
    /// `INVALID_ARGUMENT` or `UNIMPLEMENTED`, for example for an invalid queue name or a
    /// `max_in_flight` over the broker's limit. Running handlers are drained first.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        let permits = Arc::new(Semaphore::new(self.concurrency));
        let cancellations = CancelRegistry::default();
        let mut tasks = JoinSet::new();
        let (batcher, settler) = SettleBatcher::spawn(
            self.client.clone(),
            self.settle_max_batch,
            self.settle_flush_interval,
        );

        let stop = self
            .receive(&settler, &cancellations, &permits, &mut tasks, shutdown)
            .await;
        let (stream, result) = match stop {
            Stop::Shutdown(stream) => (stream, Ok(())),
            Stop::Fatal(error) => (None, Err(error)),
        };

        // The batcher stops once the delivery tasks, which hold the other senders, end.
        batcher.start_draining();
        self.drain(&mut tasks, &cancellations, stream, settler)
            .await;
        batcher.finish().await;
        info!(queues = ?self.queues, "worker stopped");
        result
    }

    /// Subscribes, reconnecting as needed, and spawns a task per delivery until
    /// `shutdown` completes or a fatal error occurs.
    async fn receive(
        &self,
        settler: &SettleSender,
        cancellations: &CancelRegistry,
        permits: &Arc<Semaphore>,
        tasks: &mut JoinSet<()>,
        shutdown: impl Future<Output = ()>,
    ) -> Stop {
        let mut shutdown = pin!(shutdown);
        let mut backoff = Backoff::new(self.backoff_initial, self.backoff_max);

        loop {
            let subscribed = tokio::select! {
                () = &mut shutdown => return Stop::Shutdown(None),
                subscribed = self.client.subscribe(self.subscribe_request()) => subscribed,
            };

            match subscribed {
                Ok((mut stream, subscription_id)) => {
                    info!(
                        queues = ?self.queues, kinds = ?self.kinds,
                        max_in_flight = self.max_in_flight, "subscribed"
                    );
                    let disconnect = self
                        .receive_stream(
                            &mut stream,
                            subscription_id.as_deref(),
                            settler,
                            cancellations,
                            permits,
                            tasks,
                            &mut backoff,
                            &mut shutdown,
                        )
                        .await;
                    match disconnect {
                        Disconnect::Shutdown => return Stop::Shutdown(Some(stream)),
                        Disconnect::Closed => {
                            warn!(queues = ?self.queues, "broker closed the stream; reconnecting");
                        }
                        Disconnect::Failed(error) if is_fatal(&error) => {
                            error!(queues = ?self.queues, %error, "broker rejected the subscription");
                            return Stop::Fatal(error);
                        }
                        Disconnect::Failed(error) => {
                            warn!(queues = ?self.queues, %error, "stream failed; reconnecting");
                        }
                    }
                }
                Err(error) if is_fatal(&error) => {
                    error!(queues = ?self.queues, %error, "broker rejected the subscription");
                    return Stop::Fatal(error);
                }
                Err(error) => {
                    warn!(queues = ?self.queues, %error, "subscribe failed; reconnecting");
                }
            }

            let delay = backoff.next_delay();
            debug!(delay_ms = delay.as_millis(), "waiting before reconnecting");
            tokio::select! {
                () = &mut shutdown => return Stop::Shutdown(None),
                () = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// Reads one stream until it ends or `shutdown` completes.
    ///
    /// Deliveries wait in a local queue for a free handler slot, while the stream is
    /// still read, so that a cancellation notice reaches its delivery even when every
    /// slot is busy. The broker's `max_in_flight` bounds that queue.
    #[expect(
        clippy::too_many_arguments,
        reason = "the state of `receive` is borrowed, not owned by a struct"
    )]
    async fn receive_stream(
        &self,
        stream: &mut Streaming<SubscribeResponse>,
        subscription_id: Option<&str>,
        settler: &SettleSender,
        cancellations: &CancelRegistry,
        permits: &Arc<Semaphore>,
        tasks: &mut JoinSet<()>,
        backoff: &mut Backoff,
        shutdown: &mut (impl Future<Output = ()> + Unpin),
    ) -> Disconnect {
        let mut waiting = VecDeque::<TaskContext>::new();
        loop {
            reap(tasks);

            let message = tokio::select! {
                () = &mut *shutdown => {
                    self.stop_deliveries(subscription_id).await;
                    if !waiting.is_empty() {
                        info!(count = waiting.len(), "shutting down; releasing deliveries that did not start");
                    }
                    for context in waiting {
                        release(settler, context, tasks);
                    }
                    return Disconnect::Shutdown;
                }
                permit = Arc::clone(permits).acquire_owned(), if !waiting.is_empty() => {
                    let (Ok(permit), Some(context)) = (permit, waiting.pop_front()) else {
                        // The semaphore is never closed, and the guard ensures a delivery.
                        return Disconnect::Shutdown;
                    };
                    self.start(context, permit, settler, cancellations, tasks);
                    continue;
                }
                message = stream.message() => message,
            };
            let event = match message {
                Ok(Some(response)) => response.event,
                Ok(None) => return Disconnect::Closed,
                Err(status) => return Disconnect::Failed(status.into()),
            };
            // Any message shows that the stream works, so the next failure starts
            // again from the shortest delay.
            backoff.reset();

            match event {
                Some(Event::Delivery(delivery)) => {
                    let lease_id = delivery.lease_id.clone();
                    match TaskContext::from_delivery(delivery) {
                        Some(context) => waiting.push_back(context),
                        // Without a task there is nothing to run. The lease expires on
                        // its own.
                        None => warn!(%lease_id, "ignoring a delivery without a task"),
                    }
                }
                Some(Event::Heartbeat(_)) => trace!("heartbeat"),
                Some(Event::CancelNotice(notice)) => {
                    let position = waiting
                        .iter()
                        .position(|context| context.lease_id() == notice.lease_id);
                    match position.and_then(|index| waiting.remove(index)) {
                        Some(context) => {
                            info!(
                                task_id = context.id(),
                                "task cancelled before its handler started; releasing it"
                            );
                            release(settler, context, tasks);
                        }
                        None => signal_cancellation(cancellations, &notice),
                    }
                }
                None => debug!("ignoring a stream message of unknown kind"),
            }
        }
    }

    /// Asks the broker to send no more deliveries on the stream, so that the settles of
    /// the running handlers do not pull in new tasks while the worker shuts down.
    /// Deliveries that arrive anyway are released.
    async fn stop_deliveries(&self, subscription_id: Option<&str>) {
        let Some(subscription_id) = subscription_id else {
            debug!("the broker sent no subscription id; deliveries during shutdown are released");
            return;
        };
        let stopped = tokio::time::timeout(
            STOP_DELIVERIES_LIMIT,
            self.client.stop_deliveries(subscription_id.to_owned()),
        )
        .await;
        match stopped {
            Ok(Ok(leases_held)) => debug!(leases_held, "deliveries stopped"),
            Ok(Err(error)) => {
                warn!(%error, "stopping deliveries failed; deliveries during shutdown are released");
            }
            Err(_) => warn!(
                limit_ms = STOP_DELIVERIES_LIMIT.as_millis(),
                "stopping deliveries timed out; deliveries during shutdown are released"
            ),
        }
    }

    /// Spawns the handler of one delivery in a slot that `permit` holds.
    fn start(
        &self,
        context: TaskContext,
        permit: OwnedSemaphorePermit,
        settler: &SettleSender,
        cancellations: &CancelRegistry,
        tasks: &mut JoinSet<()>,
    ) {
        debug!(
            task_id = context.id(),
            kind = context.kind(),
            attempt = context.attempt(),
            "starting handler"
        );
        let delivery = execute::Delivery {
            settler: settler.clone(),
            client: self.client.clone(),
            lease_duration: self.lease_duration,
            cancellations: cancellations.clone(),
            cutoff: self.cutoff.subscribe(),
        };
        tasks.spawn(execute::execute(
            delivery,
            Arc::clone(&self.handler),
            context,
            permit,
        ));
    }

    /// Waits up to the grace period for running handlers, while reading and dropping
    /// any further deliveries, then stops the handlers that are left and waits a little
    /// longer for their nacks.
    async fn drain(
        &self,
        tasks: &mut JoinSet<()>,
        cancellations: &CancelRegistry,
        mut stream: Option<Streaming<SubscribeResponse>>,
        settler: SettleSender,
    ) {
        reap(tasks);
        if tasks.is_empty() {
            return;
        }
        info!(
            tasks = tasks.len(),
            grace_ms = self.shutdown_grace.as_millis(),
            "shutting down; waiting for running handlers and returned deliveries"
        );

        let mut grace = pin!(tokio::time::sleep(self.shutdown_grace));
        loop {
            tokio::select! {
                joined = tasks.join_next() => match joined {
                    Some(result) => log_join_error(result),
                    None => return,
                },
                // Reading keeps HTTP/2 flow control moving and catches cancellations.
                // Deliveries sent before the broker stopped them are not started but
                // released.
                message = next_message(&mut stream) => match message {
                    Ok(Some(SubscribeResponse {
                        event: Some(Event::CancelNotice(notice)),
                    })) => signal_cancellation(cancellations, &notice),
                    Ok(Some(SubscribeResponse {
                        event: Some(Event::Delivery(delivery)),
                    })) => match TaskContext::from_delivery(delivery) {
                        Some(context) => release(&settler, context, tasks),
                        None => trace!("ignoring a delivery without a task during shutdown"),
                    },
                    Ok(Some(_)) => trace!("ignoring a message during shutdown"),
                    Ok(None) | Err(_) => stream = None,
                },
                () = &mut grace => break,
            }
        }

        warn!(
            running = tasks.len(),
            "shutdown grace period elapsed; stopping handlers and nacking their tasks"
        );
        self.cutoff.send_replace(true);
        let settled = tokio::time::timeout(CUTOFF_SETTLE_LIMIT, async {
            while let Some(result) = tasks.join_next().await {
                log_join_error(result);
            }
        })
        .await;
        if settled.is_err() {
            warn!(
                running = tasks.len(),
                "nacks of stopped handlers did not finish; the broker offers their tasks again when the stream closes"
            );
            tasks.shutdown().await;
        }
    }

    fn subscribe_request(&self) -> SubscribeRequest {
        SubscribeRequest {
            queues: self.queues.clone(),
            max_in_flight: self.max_in_flight,
            // The builder checked that the duration fits a protobuf `Duration`.
            lease_duration: self
                .lease_duration
                .and_then(|duration| prost_types::Duration::try_from(duration).ok()),
            weights: self.weights.clone(),
        }
    }
}

impl fmt::Debug for Worker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Worker")
            .field("queues", &self.queues)
            .field("weights", &self.weights)
            .field("kinds", &self.kinds)
            .field("concurrency", &self.concurrency)
            .field("max_in_flight", &self.max_in_flight)
            .field("lease_duration", &self.lease_duration)
            .field("shutdown_grace", &self.shutdown_grace)
            .field("settle_max_batch", &self.settle_max_batch)
            .field("settle_flush_interval", &self.settle_flush_interval)
            .finish_non_exhaustive()
    }
}

/// Reason one stream ended.
enum Disconnect {
    Shutdown,
    Closed,
    Failed(Error),
}

/// Returns `true` for subscription errors that retrying cannot fix.
fn is_fatal(error: &Error) -> bool {
    matches!(
        error.code(),
        Some(tonic::Code::InvalidArgument | tonic::Code::Unimplemented)
    )
}

/// Marks the running delivery that `notice` names as cancelled.
fn signal_cancellation(cancellations: &CancelRegistry, notice: &CancelNotice) {
    if cancellations.cancel(&notice.lease_id) {
        info!(
            task_id = %notice.task_id, lease_id = %notice.lease_id,
            "task cancelled while running; signalling the handler"
        );
    } else {
        // The handler has returned and its Ack or Nack settles the task.
        debug!(
            task_id = %notice.task_id, lease_id = %notice.lease_id,
            "cancellation notice for a delivery that is no longer running"
        );
    }
}

/// Returns a delivery whose handler never started to the broker, which offers the task
/// again at once without counting the attempt, or ends it CANCELLED if its cancellation
/// was requested.
fn release(settler: &SettleSender, context: TaskContext, tasks: &mut JoinSet<()>) {
    let settler = settler.clone();
    tasks.spawn(async move {
        let release = Settle::Release {
            lease_id: context.lease_id().to_owned(),
        };
        match settler.settle(release).await {
            Ok(state) => debug!(task_id = context.id(), ?state, "released"),
            // The lease is released when the stream closes or expires instead.
            Err(error) => warn!(task_id = context.id(), %error, "releasing a delivery failed"),
        }
    });
}

/// Removes finished tasks from the set so that it holds only running ones.
fn reap(tasks: &mut JoinSet<()>) {
    while let Some(result) = tasks.try_join_next() {
        log_join_error(result);
    }
}

fn log_join_error(result: Result<(), tokio::task::JoinError>) {
    // `execute` catches handler panics, so a panic here is a bug in the worker.
    if let Err(join_error) = result
        && join_error.is_panic()
    {
        error!(error = %join_error, "delivery task panicked");
    }
}

/// Reads the next message, or waits forever once the stream is gone.
async fn next_message(
    stream: &mut Option<Streaming<SubscribeResponse>>,
) -> Result<Option<SubscribeResponse>, tonic::Status> {
    match stream {
        Some(stream) => stream.message().await,
        None => pending().await,
    }
}
