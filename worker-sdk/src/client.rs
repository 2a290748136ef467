//! The client of the broker and the scheduler, for producers and workers.

use docket_proto::v1::broker_client::BrokerClient;
use docket_proto::v1::scheduler_client::SchedulerClient;
use docket_proto::v1::{
    AckRequest, Acknowledgement, CancelTaskRequest, EnqueueRequest, GetTaskRequest, NackRequest,
    NegativeAcknowledgement, NewTask, SettleResult, SubscribeRequest, SubscribeResponse, TaskState,
    TaskStatus, WatchTaskRequest,
};
use tonic::Streaming;
use tonic::transport::{Channel, Endpoint};

use crate::connection::{CallCredentials, ClientBuilder, ConnectOptions, GrpcChannel};
use crate::trace::fill_traceparent;
use crate::{Error, TaskWatch};

/// A client of the Docket broker and, optionally, of the scheduler.
///
/// The broker stores tasks that are ready now. Tasks meant for a later time go through
/// the scheduler, a separate service on its own address, which
/// [`Client::with_scheduler`] sets.
///
/// Cloning is cheap: clones share one HTTP/2 connection per service, which is
/// re-established on the next call if it drops.
///
/// [`Client::builder`] adds TLS, a client certificate or a bearer token.
#[derive(Debug, Clone)]
pub struct Client {
    inner: BrokerClient<GrpcChannel>,
    scheduler: Option<SchedulerClient<GrpcChannel>>,
    /// The settings that [`Client::with_scheduler`] connects with.
    options: ConnectOptions,
}

impl Client {
    /// Connects to the broker at `endpoint`, such as `http://127.0.0.1:7070`, and waits
    /// until the connection is established.
    ///
    /// # Errors
    ///
    /// Returns [`Error::InvalidEndpoint`] if `endpoint` is not a valid URI and
    /// [`Error::Connect`] if the broker cannot be reached.
    pub async fn connect(endpoint: impl Into<String>) -> Result<Self, Error> {
        let endpoint = endpoint.into();
        let channel = parse_endpoint(&endpoint)?
            .connect()
            .await
            .map_err(|source| Error::Connect { endpoint, source })?;
        Ok(Self::from_channel(channel))
    }

    /// Creates a client for the broker at `endpoint` that connects on its first call.
    ///
    /// This suits workers, which retry until the broker is reachable.
    ///
    /// # Errors
    ///
    /// Returns [`Error::InvalidEndpoint`] if `endpoint` is not a valid URI.
    pub fn connect_lazy(endpoint: impl Into<String>) -> Result<Self, Error> {
        let endpoint = endpoint.into();
        Ok(Self::from_channel(
            parse_endpoint(&endpoint)?.connect_lazy(),
        ))
    }

    /// Creates a client over a channel configured by the caller, for example with TLS or
    /// custom timeouts.
    pub fn from_channel(channel: Channel) -> Self {
        Self::from_channel_with_credentials(channel, CallCredentials::default())
    }

    /// Creates a client over a channel configured by the caller that sends `credentials`
    /// on every call, including those of [`Client::with_scheduler_channel`].
    pub fn from_channel_with_credentials(channel: Channel, credentials: CallCredentials) -> Self {
        let options = ConnectOptions {
            credentials,
            ..ConnectOptions::default()
        };
        Client {
            inner: BrokerClient::new(options.credentials.wrap(channel)),
            scheduler: None,
            options,
        }
    }

    /// Returns a builder for a client of the broker at `endpoint` with TLS settings, a
    /// client certificate, a bearer token or timeouts. An `https://` endpoint uses TLS.
    pub fn builder(endpoint: impl Into<String>) -> ClientBuilder {
        ClientBuilder::new(endpoint.into())
    }

    /// Creates a client over `channel` with `options`, and sets the scheduler's address
    /// if one is given.
    pub(crate) fn from_parts(
        channel: Channel,
        options: ConnectOptions,
        scheduler: Option<String>,
    ) -> Result<Self, Error> {
        let client = Client {
            inner: BrokerClient::new(options.credentials.wrap(channel)),
            scheduler: None,
            options,
        };
        match scheduler {
            Some(endpoint) => client.with_scheduler(endpoint),
            None => Ok(client),
        }
    }

    /// Sets the address of the scheduler, such as `http://127.0.0.1:7071`, which
    /// [`Client::enqueue_at`], [`Client::enqueue_in`] and [`Client::cancel_scheduled`]
    /// call. The connection is made on the first such call, as with
    /// [`Client::connect_lazy`], so the scheduler need not be running yet.
    ///
    /// ```no_run
    /// # async fn example() -> Result<(), docket::Error> {
    /// let client = docket::Client::connect("http://127.0.0.1:7070")
    ///     .await?
    ///     .with_scheduler("http://127.0.0.1:7071")?;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// Returns [`Error::InvalidEndpoint`] if `endpoint` is not a valid URI.
    pub fn with_scheduler(self, endpoint: impl Into<String>) -> Result<Self, Error> {
        let endpoint = endpoint.into();
        let channel = self.options.endpoint(&endpoint)?.connect_lazy();
        Ok(self.with_scheduler_channel(channel))
    }

    /// Sets the scheduler connection to a channel configured by the caller, for example
    /// with TLS or custom timeouts. The client's bearer token, if any, is sent on it too.
    pub fn with_scheduler_channel(mut self, channel: Channel) -> Self {
        self.scheduler = Some(SchedulerClient::new(self.options.credentials.wrap(channel)));
        self
    }

    /// Returns the generated gRPC client, for calls that this type does not wrap. Its
    /// calls carry the client's bearer token.
    pub fn grpc(&self) -> BrokerClient<GrpcChannel> {
        self.inner.clone()
    }

    /// Returns the generated gRPC client of the scheduler, for calls that this type does
    /// not wrap, such as recurring schedules.
    ///
    /// ```no_run
    /// use docket::proto::{
    ///     CreateScheduleRequest, CronRule, GetScheduleRequest, MissedRunPolicy, Recurrence,
    ///     recurrence,
    /// };
    /// use docket::{Client, Task};
    ///
    /// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
    /// let client = Client::connect("http://127.0.0.1:7070")
    ///     .await?
    ///     .with_scheduler("http://127.0.0.1:7071")?;
    /// let mut scheduler = client.scheduler_grpc()?;
    ///
    /// // The nightly report at 02:00 Berlin time, once after a night the scheduler missed.
    /// let recurrence = Recurrence {
    ///     rule: Some(recurrence::Rule::Cron(CronRule {
    ///         expression: "0 0 2 * * *".into(),
    ///         time_zone: "Europe/Berlin".into(),
    ///     })),
    ///     missed_runs: MissedRunPolicy::RunOnce.into(),
    ///     max_missed_runs: 0,
    /// };
    /// let task = Task::new("reports", "nightly_report").payload("sales");
    /// scheduler
    ///     .create_schedule(CreateScheduleRequest {
    ///         name: "nightly-report".into(),
    ///         recurrence: Some(recurrence),
    ///         task: Some(task.into()),
    ///         paused: false,
    ///     })
    ///     .await?;
    ///
    /// let schedule = scheduler
    ///     .get_schedule(GetScheduleRequest {
    ///         name: "nightly-report".into(),
    ///         ..Default::default()
    ///     })
    ///     .await?
    ///     .into_inner()
    ///     .schedule;
    /// println!("next run: {:?}", schedule.and_then(|schedule| schedule.next_fire_time));
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// Returns [`Error::SchedulerNotConfigured`] if the client has no scheduler address.
    pub fn scheduler_grpc(&self) -> Result<SchedulerClient<GrpcChannel>, Error> {
        self.scheduler.clone().ok_or(Error::SchedulerNotConfigured)
    }

    /// Adds one task and returns its id, a UUIDv7 string.
    ///
    /// A task without a `traceparent` header gets one, as the crate's "Tracing" section
    /// describes. A `traceparent` that the task has already is sent unchanged.
    ///
    /// # Errors
    ///
    /// Returns [`Error::Status`] if the broker rejects the task, with
    /// [`tonic::Code::InvalidArgument`] for an invalid field, or if the call fails.
    pub async fn enqueue(&self, task: impl Into<NewTask>) -> Result<String, Error> {
        let mut ids = self.enqueue_batch([task]).await?;
        ids.pop()
            .ok_or_else(|| Error::InvalidResponse("Enqueue returned no task id".to_owned()))
    }

    /// Adds a batch of tasks atomically and returns their ids in input order.
    ///
    /// Either every task is stored or none is. An empty batch returns an empty list
    /// without calling the broker. The broker rejects batches over its limit (1000
    /// tasks by default), so split larger inputs. Each task without a `traceparent`
    /// header gets one, as in [`Client::enqueue`].
    ///
    /// # Errors
    ///
    /// Returns [`Error::Status`] if the broker rejects the batch or the call fails, and
    /// [`Error::InvalidResponse`] if the broker returns a different number of ids.
    pub async fn enqueue_batch<T>(
        &self,
        tasks: impl IntoIterator<Item = T>,
    ) -> Result<Vec<String>, Error>
    where
        T: Into<NewTask>,
    {
        let mut tasks: Vec<NewTask> = tasks.into_iter().map(Into::into).collect();
        if tasks.is_empty() {
            return Ok(Vec::new());
        }
        for task in &mut tasks {
            fill_traceparent(task);
        }

        let expected = tasks.len();
        let response = self
            .inner
            .clone()
            .enqueue(EnqueueRequest { tasks })
            .await?
            .into_inner();
        if response.task_ids.len() != expected {
            return Err(Error::InvalidResponse(format!(
                "Enqueue returned {} task ids for {expected} tasks",
                response.task_ids.len()
            )));
        }
        Ok(response.task_ids)
    }

    /// Returns a task with its state, attempts, last error and result.
    ///
    /// # Errors
    ///
    /// Returns [`Error::Status`] with [`tonic::Code::NotFound`] if the id is unknown, or
    /// with another code if the call fails.
    pub async fn get_task(&self, task_id: impl Into<String>) -> Result<TaskStatus, Error> {
        let response = self
            .inner
            .clone()
            .get_task(GetTaskRequest {
                task_id: task_id.into(),
            })
            .await?
            .into_inner();
        response
            .status
            .ok_or_else(|| Error::InvalidResponse("GetTask returned no status".to_owned()))
    }

    /// Streams the status of a task: first its current status, then one item per state
    /// change, until the task reaches a final state (SUCCEEDED, DEAD or CANCELLED).
    ///
    /// The stream ends after the item with the final state. If the task is final
    /// already, that is the only item. An error item also ends the stream:
    ///
    /// - [`Error::Status`] with [`tonic::Code::Unavailable`] when the broker shuts down,
    /// - [`Error::Status`] with [`tonic::Code::ResourceExhausted`] when this watcher
    ///   falls behind the task's changes,
    /// - [`Error::Status`] with another code when the connection breaks,
    /// - [`Error::InvalidResponse`] when the broker closes the stream before a final
    ///   state.
    ///
    /// Calling `watch_task` again resumes with the current status.
    ///
    /// [`TaskWatch`] implements `Stream`, so `StreamExt::next` from `tokio-stream` or
    /// `futures` reads it, for example to wait until a task finishes:
    ///
    /// ```no_run
    /// use docket::{Client, Task, TaskState};
    /// use tokio_stream::StreamExt;
    ///
    /// # async fn example() -> Result<(), docket::Error> {
    /// let client = Client::connect("http://127.0.0.1:7070").await?;
    /// let task_id = client
    ///     .enqueue(Task::new("reports", "build_report").payload("2026-q3"))
    ///     .await?;
    ///
    /// let mut statuses = client.watch_task(&task_id).await?;
    /// let mut last = None;
    /// while let Some(status) = statuses.next().await {
    ///     let status = status?;
    ///     println!("task {task_id} is {}", status.state().as_str_name());
    ///     last = Some(status);
    /// }
    ///
    /// if let Some(status) = last
    ///     && status.state() == TaskState::Succeeded
    /// {
    ///     println!("report: {} bytes", status.result.len());
    /// }
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// Returns [`Error::Status`] with [`tonic::Code::NotFound`] if the id is unknown,
    /// with [`tonic::Code::InvalidArgument`] if it is not a UUID, or with another code if
    /// the call fails.
    pub async fn watch_task(&self, task_id: impl Into<String>) -> Result<TaskWatch, Error> {
        let task_id = task_id.into();
        let responses = self
            .inner
            .clone()
            .watch_task(WatchTaskRequest {
                task_id: task_id.clone(),
            })
            .await?
            .into_inner();
        Ok(TaskWatch::new(task_id, responses))
    }

    /// Cancels a task and returns the state the broker reports.
    ///
    /// A pending or retry-waiting task is cancelled at once, and the result is
    /// [`TaskState::Cancelled`]: the task is never delivered again. For a leased task
    /// the result is [`TaskState::Leased`]. The broker records the request and sends a
    /// cancel notice to the worker that holds the lease, and the task ends CANCELLED
    /// unless that worker acks it, which makes it SUCCEEDED. [`Client::watch_task`]
    /// shows which of the two happens.
    ///
    /// ```no_run
    /// use docket::{Client, TaskState};
    ///
    /// # async fn example(task_id: &str) -> Result<(), docket::Error> {
    /// let client = Client::connect("http://127.0.0.1:7070").await?;
    /// match client.cancel_task(task_id).await? {
    ///     TaskState::Cancelled => println!("task {task_id} cancelled"),
    ///     state => println!("task {task_id} is {}, its worker was notified", state.as_str_name()),
    /// }
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// Returns [`Error::Status`] with [`tonic::Code::NotFound`] if the id is unknown,
    /// with [`tonic::Code::FailedPrecondition`] if the task is already SUCCEEDED, DEAD or
    /// CANCELLED, with [`tonic::Code::InvalidArgument`] if the id is not a UUID, or with
    /// another code if the call fails.
    pub async fn cancel_task(&self, task_id: impl Into<String>) -> Result<TaskState, Error> {
        let response = self
            .inner
            .clone()
            .cancel_task(CancelTaskRequest {
                task_id: task_id.into(),
            })
            .await?
            .into_inner();
        match TaskState::try_from(response.state) {
            Ok(TaskState::Unspecified) | Err(_) => Err(Error::InvalidResponse(format!(
                "CancelTask returned the invalid state {}",
                response.state
            ))),
            Ok(state) => Ok(state),
        }
    }

    /// Opens a Subscribe stream. Returns it with the subscription id from the
    /// response's metadata, which a broker without StopDeliveries does not send.
    pub(crate) async fn subscribe(
        &self,
        request: SubscribeRequest,
    ) -> Result<(Streaming<SubscribeResponse>, Option<String>), Error> {
        let response = self.inner.clone().subscribe(request).await?;
        let subscription_id = response
            .metadata()
            .get(docket_proto::SUBSCRIPTION_ID_HEADER)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        Ok((response.into_inner(), subscription_id))
    }

    /// Stops deliveries on the Subscribe stream that `subscription_id` names, and returns
    /// the number of leases it still holds.
    pub(crate) async fn stop_deliveries(&self, subscription_id: String) -> Result<u32, Error> {
        let request = docket_proto::v1::StopDeliveriesRequest { subscription_id };
        let response = self.inner.clone().stop_deliveries(request).await?;
        Ok(response.into_inner().leases_held)
    }

    /// Completes the tasks held under the leases in `acks` in one Ack call and returns
    /// one outcome per item, in request order: the task's new state, or the item's own
    /// error code and message as [`Error::Status`].
    ///
    /// # Errors
    ///
    /// Returns [`Error::Status`] if the call as a whole fails, and
    /// [`Error::InvalidResponse`] if the broker returns a different number of results.
    pub(crate) async fn ack(
        &self,
        acks: Vec<Acknowledgement>,
    ) -> Result<Vec<Result<TaskState, Error>>, Error> {
        let expected = acks.len();
        let response = self
            .inner
            .clone()
            .ack(AckRequest { acks })
            .await?
            .into_inner();
        item_results("Ack", response.results, expected)
    }

    /// Fails the attempts held under the leases in `nacks` in one Nack call and returns
    /// one outcome per item, in request order, as [`Client::ack`] does.
    ///
    /// # Errors
    ///
    /// Returns [`Error::Status`] if the call as a whole fails, and
    /// [`Error::InvalidResponse`] if the broker returns a different number of results.
    pub(crate) async fn nack(
        &self,
        nacks: Vec<NegativeAcknowledgement>,
    ) -> Result<Vec<Result<TaskState, Error>>, Error> {
        let expected = nacks.len();
        let response = self
            .inner
            .clone()
            .nack(NackRequest { nacks })
            .await?
            .into_inner();
        item_results("Nack", response.results, expected)
    }
}

/// Converts the results of an Ack or Nack call into one outcome per item, after
/// checking that the broker returned one result for each of the `expected` items.
fn item_results(
    call: &str,
    results: Vec<SettleResult>,
    expected: usize,
) -> Result<Vec<Result<TaskState, Error>>, Error> {
    if results.len() != expected {
        return Err(Error::InvalidResponse(format!(
            "{call} returned {} results for {expected} leases",
            results.len()
        )));
    }
    Ok(results.into_iter().map(item_result).collect())
}

/// Returns the task's new state if the item was settled, or its code and message as a
/// status otherwise.
fn item_result(result: SettleResult) -> Result<TaskState, Error> {
    if result.code != tonic::Code::Ok as i32 {
        let status = tonic::Status::new(tonic::Code::from_i32(result.code), result.message);
        return Err(Error::Status(Box::new(status)));
    }
    Ok(result.state())
}

/// Parses the endpoint of the broker or the scheduler. A bare `host:port`, the form the
/// broker's `--listen` takes, means plain-text HTTP/2 at that address. An `https://`
/// endpoint gets TLS with the system's root certificates.
fn parse_endpoint(endpoint: &str) -> Result<Endpoint, Error> {
    ConnectOptions::default().endpoint(endpoint)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_without_scheme_means_http() {
        let endpoint = parse_endpoint("127.0.0.1:7070").expect("host and port parse");
        assert_eq!(endpoint.uri().to_string(), "http://127.0.0.1:7070/");
    }

    #[tokio::test]
    async fn connect_lazy_rejects_invalid_uri() {
        let error = Client::connect_lazy("not a uri").unwrap_err();

        assert!(matches!(error, Error::InvalidEndpoint { .. }), "{error:?}");
    }

    /// Returns an endpoint on loopback where nothing listens.
    fn closed_endpoint() -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        drop(listener);
        format!("http://{address}")
    }

    #[tokio::test]
    async fn empty_batch_skips_the_broker() {
        let client = Client::connect_lazy(closed_endpoint()).unwrap();

        let ids = client.enqueue_batch(Vec::<NewTask>::new()).await.unwrap();

        assert!(ids.is_empty());
    }

    #[tokio::test]
    async fn connect_to_closed_port_fails() {
        let error = Client::connect(closed_endpoint()).await.unwrap_err();

        assert!(matches!(error, Error::Connect { .. }), "{error:?}");
    }
}
