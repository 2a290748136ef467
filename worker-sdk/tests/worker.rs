//! Worker behavior against an in-process fake broker on loopback.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use docket::proto as v1;
use docket::proto::broker_server::{Broker, BrokerServer};
use docket::proto::subscribe_response::Event;
use docket::proto::{
    AckRequest, AckResponse, CancelNotice, Delivery, EnqueueRequest, EnqueueResponse,
    GetTaskRequest, GetTaskResponse, Heartbeat, NackRequest, NackResponse, SettleResult,
    SubscribeRequest, SubscribeResponse, Task as WireTask, TaskState,
};
use docket::{Bytes, Client, Error, HandlerError, HandlerResult, TaskContext, Worker};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status};

/// Time any single wait in these tests may take before the test fails.
const TIMEOUT: Duration = Duration::from_secs(10);

/// One open Subscribe stream: the request and the sender that feeds the stream.
/// Dropping the sender closes the stream.
struct Subscription {
    request: SubscribeRequest,
    events: mpsc::Sender<Result<SubscribeResponse, Status>>,
}

#[derive(Debug, PartialEq)]
enum Settlement {
    Ack { lease_id: String, result: Bytes },
    Nack { lease_id: String, error: String },
    Release { lease_id: String },
}

/// Item counts of the Ack and Nack calls the fake broker received, in call order.
#[derive(Debug, Default)]
struct CallSizes {
    acks: Vec<usize>,
    nacks: Vec<usize>,
}

/// Behavior of the fake broker.
#[derive(Default)]
struct FakeOptions {
    /// Status that every Subscribe call returns.
    subscribe_error: Option<Status>,
    /// Status that every Ack call returns after recording its items.
    ack_error: Option<Status>,
    /// Leases whose Ack items always fail with code 9 (FAILED_PRECONDITION).
    stale_leases: HashSet<String>,
    /// Leases whose first Ack item fails with code 14 (UNAVAILABLE). Later items succeed.
    unavailable_once: HashSet<String>,
}

struct FakeBroker {
    subscriptions: mpsc::Sender<Subscription>,
    settlements: mpsc::Sender<Settlement>,
    call_sizes: Arc<Mutex<CallSizes>>,
    subscribe_error: Option<Status>,
    ack_error: Option<Status>,
    stale_leases: HashSet<String>,
    unavailable_once: Mutex<HashSet<String>>,
}

impl FakeBroker {
    /// Returns the result of one Ack item, failing it as the options ask.
    fn ack_result(&self, lease_id: String) -> SettleResult {
        let code = if self.stale_leases.contains(&lease_id) {
            tonic::Code::FailedPrecondition
        } else if self.unavailable_once.lock().unwrap().remove(&lease_id) {
            tonic::Code::Unavailable
        } else {
            tonic::Code::Ok
        };
        if code == tonic::Code::Ok {
            return SettleResult {
                lease_id,
                state: TaskState::Succeeded.into(),
                ..SettleResult::default()
            };
        }
        SettleResult {
            message: format!("lease {lease_id} failed with {code:?}"),
            lease_id,
            code: code as i32,
            state: TaskState::Leased.into(),
            ..SettleResult::default()
        }
    }
}

#[tonic::async_trait]
impl Broker for FakeBroker {
    type SubscribeStream = ReceiverStream<Result<SubscribeResponse, Status>>;

    async fn enqueue(
        &self,
        _request: Request<EnqueueRequest>,
    ) -> Result<Response<EnqueueResponse>, Status> {
        Err(Status::unimplemented("the fake broker does not enqueue"))
    }

    async fn subscribe(
        &self,
        request: Request<SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        if let Some(status) = &self.subscribe_error {
            return Err(status.clone());
        }
        let (events, receiver) = mpsc::channel(64);
        let subscription = Subscription {
            request: request.into_inner(),
            events,
        };
        self.subscriptions
            .send(subscription)
            .await
            .map_err(|_| Status::unavailable("test ended"))?;
        Ok(Response::new(ReceiverStream::new(receiver)))
    }

    async fn ack(&self, request: Request<AckRequest>) -> Result<Response<AckResponse>, Status> {
        let acks = request.into_inner().acks;
        self.call_sizes.lock().unwrap().acks.push(acks.len());
        let mut results = Vec::new();
        for ack in acks {
            let _ = self
                .settlements
                .send(Settlement::Ack {
                    lease_id: ack.lease_id.clone(),
                    result: ack.result,
                })
                .await;
            results.push(self.ack_result(ack.lease_id));
        }
        match &self.ack_error {
            Some(status) => Err(status.clone()),
            None => Ok(Response::new(AckResponse { results })),
        }
    }

    async fn nack(&self, request: Request<NackRequest>) -> Result<Response<NackResponse>, Status> {
        let nacks = request.into_inner().nacks;
        self.call_sizes.lock().unwrap().nacks.push(nacks.len());
        let mut results = Vec::new();
        for nack in nacks {
            let settlement = if nack.release {
                Settlement::Release {
                    lease_id: nack.lease_id.clone(),
                }
            } else {
                Settlement::Nack {
                    lease_id: nack.lease_id.clone(),
                    error: nack.error,
                }
            };
            let _ = self.settlements.send(settlement).await;
            results.push(SettleResult {
                lease_id: nack.lease_id,
                state: TaskState::Pending.into(),
                ..SettleResult::default()
            });
        }
        Ok(Response::new(NackResponse { results }))
    }

    async fn get_task(
        &self,
        _request: Request<GetTaskRequest>,
    ) -> Result<Response<GetTaskResponse>, Status> {
        Err(Status::not_found("the fake broker stores no tasks"))
    }

    type WatchTaskStream = ReceiverStream<Result<v1::WatchTaskResponse, Status>>;
    type WatchQueueStatsStream = ReceiverStream<Result<v1::WatchQueueStatsResponse, Status>>;

    // The worker calls none of the RPCs below. It calls StopDeliveries only with a
    // subscription id, which this broker does not send.

    async fn stop_deliveries(
        &self,
        _request: Request<v1::StopDeliveriesRequest>,
    ) -> Result<Response<v1::StopDeliveriesResponse>, Status> {
        Err(Status::unimplemented(
            "the fake broker does not serve stop_deliveries",
        ))
    }

    async fn extend_lease(
        &self,
        _request: Request<v1::ExtendLeaseRequest>,
    ) -> Result<Response<v1::ExtendLeaseResponse>, Status> {
        Err(Status::unimplemented(
            "the fake broker does not serve extend_lease",
        ))
    }

    async fn watch_task(
        &self,
        _request: Request<v1::WatchTaskRequest>,
    ) -> Result<Response<Self::WatchTaskStream>, Status> {
        Err(Status::unimplemented(
            "the fake broker does not serve watch_task",
        ))
    }

    async fn cancel_task(
        &self,
        _request: Request<v1::CancelTaskRequest>,
    ) -> Result<Response<v1::CancelTaskResponse>, Status> {
        Err(Status::unimplemented(
            "the fake broker does not serve cancel_task",
        ))
    }

    async fn list_queues(
        &self,
        _request: Request<v1::ListQueuesRequest>,
    ) -> Result<Response<v1::ListQueuesResponse>, Status> {
        Err(Status::unimplemented(
            "the fake broker does not serve list_queues",
        ))
    }

    async fn get_queue_stats(
        &self,
        _request: Request<v1::GetQueueStatsRequest>,
    ) -> Result<Response<v1::GetQueueStatsResponse>, Status> {
        Err(Status::unimplemented(
            "the fake broker does not serve get_queue_stats",
        ))
    }

    async fn watch_queue_stats(
        &self,
        _request: Request<v1::WatchQueueStatsRequest>,
    ) -> Result<Response<Self::WatchQueueStatsStream>, Status> {
        Err(Status::unimplemented(
            "the fake broker does not serve watch_queue_stats",
        ))
    }

    async fn pause_queue(
        &self,
        _request: Request<v1::PauseQueueRequest>,
    ) -> Result<Response<v1::PauseQueueResponse>, Status> {
        Err(Status::unimplemented(
            "the fake broker does not serve pause_queue",
        ))
    }

    async fn resume_queue(
        &self,
        _request: Request<v1::ResumeQueueRequest>,
    ) -> Result<Response<v1::ResumeQueueResponse>, Status> {
        Err(Status::unimplemented(
            "the fake broker does not serve resume_queue",
        ))
    }

    async fn purge_queue(
        &self,
        _request: Request<v1::PurgeQueueRequest>,
    ) -> Result<Response<v1::PurgeQueueResponse>, Status> {
        Err(Status::unimplemented(
            "the fake broker does not serve purge_queue",
        ))
    }

    async fn get_queue_settings(
        &self,
        _request: Request<v1::GetQueueSettingsRequest>,
    ) -> Result<Response<v1::GetQueueSettingsResponse>, Status> {
        Err(Status::unimplemented(
            "the fake broker does not serve get_queue_settings",
        ))
    }

    async fn update_queue_settings(
        &self,
        _request: Request<v1::UpdateQueueSettingsRequest>,
    ) -> Result<Response<v1::UpdateQueueSettingsResponse>, Status> {
        Err(Status::unimplemented(
            "the fake broker does not serve update_queue_settings",
        ))
    }

    async fn list_dead_tasks(
        &self,
        _request: Request<v1::ListDeadTasksRequest>,
    ) -> Result<Response<v1::ListDeadTasksResponse>, Status> {
        Err(Status::unimplemented(
            "the fake broker does not serve list_dead_tasks",
        ))
    }

    async fn requeue_dead_tasks(
        &self,
        _request: Request<v1::RequeueDeadTasksRequest>,
    ) -> Result<Response<v1::RequeueDeadTasksResponse>, Status> {
        Err(Status::unimplemented(
            "the fake broker does not serve requeue_dead_tasks",
        ))
    }

    async fn delete_dead_tasks(
        &self,
        _request: Request<v1::DeleteDeadTasksRequest>,
    ) -> Result<Response<v1::DeleteDeadTasksResponse>, Status> {
        Err(Status::unimplemented(
            "the fake broker does not serve delete_dead_tasks",
        ))
    }
}

/// A running fake broker and the receiving ends of what it records.
struct Harness {
    client: Client,
    subscriptions: mpsc::Receiver<Subscription>,
    settlements: mpsc::Receiver<Settlement>,
    call_sizes: Arc<Mutex<CallSizes>>,
}

impl Harness {
    async fn next_subscription(&mut self) -> Subscription {
        tokio::time::timeout(TIMEOUT, self.subscriptions.recv())
            .await
            .expect("no Subscribe call in time")
            .expect("fake broker stopped")
    }

    async fn next_settlement(&mut self) -> Settlement {
        tokio::time::timeout(TIMEOUT, self.settlements.recv())
            .await
            .expect("no Ack or Nack in time")
            .expect("fake broker stopped")
    }

    /// Returns every settlement recorded so far without waiting.
    fn recorded_settlements(&mut self) -> Vec<Settlement> {
        let mut settlements = Vec::new();
        while let Ok(settlement) = self.settlements.try_recv() {
            settlements.push(settlement);
        }
        settlements
    }
}

async fn start_broker(subscribe_error: Option<Status>, ack_error: Option<Status>) -> Harness {
    start_broker_with(FakeOptions {
        subscribe_error,
        ack_error,
        ..FakeOptions::default()
    })
    .await
}

async fn start_broker_with(options: FakeOptions) -> Harness {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (subscriptions_tx, subscriptions) = mpsc::channel(16);
    let (settlements_tx, settlements) = mpsc::channel(256);
    let call_sizes = Arc::new(Mutex::new(CallSizes::default()));
    let broker = FakeBroker {
        subscriptions: subscriptions_tx,
        settlements: settlements_tx,
        call_sizes: Arc::clone(&call_sizes),
        subscribe_error: options.subscribe_error,
        ack_error: options.ack_error,
        stale_leases: options.stale_leases,
        unavailable_once: Mutex::new(options.unavailable_once),
    };
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(BrokerServer::new(broker))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );

    let client = Client::connect(format!("http://{address}")).await.unwrap();
    Harness {
        client,
        subscriptions,
        settlements,
        call_sizes,
    }
}

fn delivery(kind: &str, number: u32) -> Result<SubscribeResponse, Status> {
    Ok(SubscribeResponse {
        event: Some(Event::Delivery(Delivery {
            task: Some(WireTask {
                id: format!("task-{number}"),
                queue: "jobs".to_owned(),
                kind: kind.to_owned(),
                max_attempts: 3,
                ..WireTask::default()
            }),
            lease_id: format!("lease-{number}"),
            attempt: 1,
            lease_deadline: None,
        })),
    })
}

/// Handles tasks by kind: `ok` succeeds with a result, `fail` returns an error,
/// `panic` panics and `slow` succeeds after 300 ms.
async fn handle(task: TaskContext) -> Result<Option<Bytes>, HandlerError> {
    match task.kind() {
        "ok" => Ok(Some(Bytes::from(format!("done {}", task.id())))),
        "fail" => Err(HandlerError::msg("invalid recipient")),
        "panic" => panic!("boom in {}", task.id()),
        "slow" => {
            tokio::time::sleep(Duration::from_millis(300)).await;
            Ok(None)
        }
        other => Err(HandlerError::msg(format!("unknown kind {other}"))),
    }
}

/// Returns a shutdown future and the sender that completes it.
fn shutdown_signal() -> (oneshot::Sender<()>, impl Future<Output = ()>) {
    let (sender, receiver) = oneshot::channel::<()>();
    (sender, async move {
        let _ = receiver.await;
    })
}

#[tokio::test]
async fn outcomes_map_to_ack_and_nack() {
    let mut harness = start_broker(None, None).await;
    let worker = Worker::builder(harness.client.clone())
        .queue("jobs")
        .concurrency(1)
        .build(handle)
        .unwrap();
    let (stop, shutdown) = shutdown_signal();
    let running = tokio::spawn(worker.run(shutdown));

    let subscription = harness.next_subscription().await;
    assert_eq!(subscription.request.queues, ["jobs"]);
    assert_eq!(subscription.request.max_in_flight, 1);
    assert_eq!(subscription.request.lease_duration, None);

    subscription.events.send(delivery("ok", 1)).await.unwrap();
    assert_eq!(
        harness.next_settlement().await,
        Settlement::Ack {
            lease_id: "lease-1".to_owned(),
            result: Bytes::from("done task-1"),
        }
    );

    subscription.events.send(delivery("fail", 2)).await.unwrap();
    assert_eq!(
        harness.next_settlement().await,
        Settlement::Nack {
            lease_id: "lease-2".to_owned(),
            error: "invalid recipient".to_owned(),
        }
    );

    subscription
        .events
        .send(delivery("panic", 3))
        .await
        .unwrap();
    assert_eq!(
        harness.next_settlement().await,
        Settlement::Nack {
            lease_id: "lease-3".to_owned(),
            error: "handler panicked: boom in task-3".to_owned(),
        }
    );

    // The worker survived the panic and still runs tasks.
    subscription.events.send(delivery("ok", 4)).await.unwrap();
    assert!(matches!(
        harness.next_settlement().await,
        Settlement::Ack { lease_id, .. } if lease_id == "lease-4"
    ));

    stop.send(()).unwrap();
    tokio::time::timeout(TIMEOUT, running)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn heartbeats_and_empty_events_are_ignored() {
    let mut harness = start_broker(None, None).await;
    let worker = Worker::builder(harness.client.clone())
        .queue("jobs")
        .build(handle)
        .unwrap();
    let (stop, shutdown) = shutdown_signal();
    let running = tokio::spawn(worker.run(shutdown));

    let subscription = harness.next_subscription().await;
    let heartbeat = SubscribeResponse {
        event: Some(Event::Heartbeat(Heartbeat { server_time: None })),
    };
    subscription.events.send(Ok(heartbeat)).await.unwrap();
    subscription
        .events
        .send(Ok(SubscribeResponse { event: None }))
        .await
        .unwrap();
    subscription.events.send(delivery("ok", 1)).await.unwrap();

    assert!(matches!(
        harness.next_settlement().await,
        Settlement::Ack { lease_id, .. } if lease_id == "lease-1"
    ));

    stop.send(()).unwrap();
    tokio::time::timeout(TIMEOUT, running)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn concurrency_limits_running_handlers() {
    const CONCURRENCY: usize = 3;
    const TASKS: u32 = 12;

    let mut harness = start_broker(None, None).await;
    let running_now = Arc::new(AtomicUsize::new(0));
    let running_max = Arc::new(AtomicUsize::new(0));
    let worker = {
        let running_now = Arc::clone(&running_now);
        let running_max = Arc::clone(&running_max);
        Worker::builder(harness.client.clone())
            .queue("jobs")
            .concurrency(CONCURRENCY)
            .max_in_flight(TASKS)
            .build(move |_task: TaskContext| {
                let running_now = Arc::clone(&running_now);
                let running_max = Arc::clone(&running_max);
                async move {
                    let now = running_now.fetch_add(1, Ordering::SeqCst) + 1;
                    running_max.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    running_now.fetch_sub(1, Ordering::SeqCst);
                    Ok::<_, HandlerError>(None)
                }
            })
            .unwrap()
    };
    let (stop, shutdown) = shutdown_signal();
    let running = tokio::spawn(worker.run(shutdown));

    let subscription = harness.next_subscription().await;
    assert_eq!(subscription.request.max_in_flight, TASKS);
    for number in 0..TASKS {
        subscription
            .events
            .send(delivery("any", number))
            .await
            .unwrap();
    }
    for _ in 0..TASKS {
        assert!(matches!(
            harness.next_settlement().await,
            Settlement::Ack { .. }
        ));
    }

    assert_eq!(running_max.load(Ordering::SeqCst), CONCURRENCY);

    stop.send(()).unwrap();
    tokio::time::timeout(TIMEOUT, running)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn shutdown_waits_for_running_handlers() {
    let mut harness = start_broker(None, None).await;
    let worker = Worker::builder(harness.client.clone())
        .queue("jobs")
        .build(handle)
        .unwrap();
    let (stop, shutdown) = shutdown_signal();
    let running = tokio::spawn(worker.run(shutdown));

    let subscription = harness.next_subscription().await;
    subscription.events.send(delivery("slow", 1)).await.unwrap();
    // Give the worker time to start the handler before shutdown begins.
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.send(()).unwrap();

    tokio::time::timeout(TIMEOUT, running)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        harness.settlements.try_recv().unwrap(),
        Settlement::Ack {
            lease_id: "lease-1".to_owned(),
            result: Bytes::new(),
        }
    );
}

#[tokio::test]
async fn shutdown_grace_stops_handlers_and_nacks_them() {
    let mut harness = start_broker(None, None).await;
    // Every running handler owns a clone of `alive`, so `recv` returns `None` only
    // after every handler future is dropped.
    let (alive, mut alive_receiver) = mpsc::channel::<()>(1);
    let worker = Worker::builder(harness.client.clone())
        .queue("jobs")
        .shutdown_grace(Duration::from_millis(50))
        .build(move |_task: TaskContext| {
            let alive = alive.clone();
            async move {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                drop(alive);
                Ok::<_, HandlerError>(None)
            }
        })
        .unwrap();
    let (stop, shutdown) = shutdown_signal();
    let running = tokio::spawn(worker.run(shutdown));

    let subscription = harness.next_subscription().await;
    subscription.events.send(delivery("any", 1)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.send(()).unwrap();

    tokio::time::timeout(TIMEOUT, running)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    // The stopped handler's task is nacked, so that another worker runs it at once.
    assert_eq!(
        harness.settlements.try_recv(),
        Ok(Settlement::Nack {
            lease_id: "lease-1".to_owned(),
            error: "the worker shut down before the handler finished".to_owned(),
        })
    );
    assert!(harness.settlements.try_recv().is_err());
    let dropped = tokio::time::timeout(TIMEOUT, alive_receiver.recv()).await;
    assert_eq!(dropped, Ok(None), "the handler still runs after shutdown");
}

#[tokio::test]
async fn closed_stream_is_resubscribed() {
    let mut harness = start_broker(None, None).await;
    let worker = Worker::builder(harness.client.clone())
        .queue("jobs")
        .reconnect_backoff(Duration::from_millis(10), Duration::from_millis(50))
        .build(handle)
        .unwrap();
    let (stop, shutdown) = shutdown_signal();
    let running = tokio::spawn(worker.run(shutdown));

    let first = harness.next_subscription().await;
    drop(first);
    let second = harness.next_subscription().await;
    second
        .events
        .send(Err(Status::internal("store failed")))
        .await
        .unwrap();
    let third = harness.next_subscription().await;
    third.events.send(delivery("ok", 1)).await.unwrap();

    assert!(matches!(
        harness.next_settlement().await,
        Settlement::Ack { lease_id, .. } if lease_id == "lease-1"
    ));

    stop.send(()).unwrap();
    tokio::time::timeout(TIMEOUT, running)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn expired_lease_on_ack_is_not_fatal() {
    let expired = Status::failed_precondition("lease lease-1 expired");
    let mut harness = start_broker(None, Some(expired)).await;
    let worker = Worker::builder(harness.client.clone())
        .queue("jobs")
        .build(handle)
        .unwrap();
    let (stop, shutdown) = shutdown_signal();
    let running = tokio::spawn(worker.run(shutdown));

    let subscription = harness.next_subscription().await;
    subscription.events.send(delivery("ok", 1)).await.unwrap();
    subscription.events.send(delivery("ok", 2)).await.unwrap();

    // One ack each: a rejected lease is not retried, and the worker goes on.
    let mut leases = Vec::new();
    for _ in 0..2 {
        if let Settlement::Ack { lease_id, .. } = harness.next_settlement().await {
            leases.push(lease_id);
        }
    }
    leases.sort();
    assert_eq!(leases, ["lease-1", "lease-2"]);

    stop.send(()).unwrap();
    tokio::time::timeout(TIMEOUT, running)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(harness.settlements.try_recv().is_err());
}

#[tokio::test]
async fn invalid_subscription_stops_worker() {
    let rejected = Status::invalid_argument("queue name \"bad name\" is invalid");
    let harness = start_broker(Some(rejected), None).await;
    let worker = Worker::builder(harness.client.clone())
        .queue("bad name")
        .build(handle)
        .unwrap();

    let result = tokio::time::timeout(TIMEOUT, worker.run(std::future::pending()))
        .await
        .unwrap();

    let error = result.unwrap_err();
    assert_eq!(error.code(), Some(tonic::Code::InvalidArgument), "{error}");
}

/// Handlers that report their task id when they start and then wait until the gate
/// opens.
struct Gate {
    started: mpsc::UnboundedReceiver<String>,
    report: mpsc::UnboundedSender<String>,
    open: tokio::sync::watch::Sender<bool>,
}

impl Gate {
    fn new() -> Self {
        let (report, started) = mpsc::unbounded_channel();
        Gate {
            started,
            report,
            open: tokio::sync::watch::channel(false).0,
        }
    }

    /// Returns a handler that waits at this gate.
    fn handler(
        &self,
    ) -> impl Fn(TaskContext) -> std::pin::Pin<Box<dyn Future<Output = HandlerResult> + Send>>
    + Send
    + Sync
    + 'static {
        let report = self.report.clone();
        let open = self.open.clone();
        move |task: TaskContext| {
            let report = report.clone();
            let mut opened = open.subscribe();
            Box::pin(async move {
                report.send(task.id().to_owned()).unwrap();
                let _ = opened.wait_for(|open| *open).await;
                Ok(None)
            })
        }
    }

    /// Waits for the next handler to start and returns its task id.
    async fn next_started(&mut self) -> Option<String> {
        tokio::time::timeout(TIMEOUT, self.started.recv())
            .await
            .ok()
            .flatten()
    }

    /// Lets every waiting and later handler finish.
    fn open(&self) {
        self.open.send_replace(true);
    }
}

#[tokio::test]
async fn handlers_are_chosen_by_kind() {
    let mut harness = start_broker(None, None).await;
    let worker = Worker::builder(harness.client.clone())
        .queue("jobs")
        .concurrency(1)
        .handle("resize", |task: TaskContext| async move {
            Ok(Some(Bytes::from(format!("resized {}", task.id()))))
        })
        .handle("email", |task: TaskContext| async move {
            Ok(Some(Bytes::from(format!("mailed {}", task.id()))))
        })
        .build_handlers()
        .unwrap();
    let (stop, shutdown) = shutdown_signal();
    let running = tokio::spawn(worker.run(shutdown));
    let subscription = harness.next_subscription().await;

    subscription
        .events
        .send(delivery("email", 1))
        .await
        .unwrap();
    assert_eq!(
        harness.next_settlement().await,
        Settlement::Ack {
            lease_id: "lease-1".to_owned(),
            result: Bytes::from("mailed task-1"),
        }
    );
    subscription
        .events
        .send(delivery("resize", 2))
        .await
        .unwrap();
    assert_eq!(
        harness.next_settlement().await,
        Settlement::Ack {
            lease_id: "lease-2".to_owned(),
            result: Bytes::from("resized task-2"),
        }
    );
    // A kind without a handler fails its attempt, so that it is retried, possibly on
    // a worker that handles it.
    subscription.events.send(delivery("sms", 3)).await.unwrap();
    assert_eq!(
        harness.next_settlement().await,
        Settlement::Nack {
            lease_id: "lease-3".to_owned(),
            error: "no handler for task kind \"sms\": this worker handles email, resize".to_owned(),
        }
    );

    stop.send(()).unwrap();
    tokio::time::timeout(TIMEOUT, running)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn build_handler_runs_kinds_without_their_own() {
    let mut harness = start_broker(None, None).await;
    let worker = Worker::builder(harness.client.clone())
        .queue("jobs")
        .concurrency(1)
        .handle("fail", |_task: TaskContext| async move {
            Ok(Some(Bytes::from("special")))
        })
        .build(handle)
        .unwrap();
    let (stop, shutdown) = shutdown_signal();
    let running = tokio::spawn(worker.run(shutdown));
    let subscription = harness.next_subscription().await;

    subscription.events.send(delivery("fail", 1)).await.unwrap();
    assert_eq!(
        harness.next_settlement().await,
        Settlement::Ack {
            lease_id: "lease-1".to_owned(),
            result: Bytes::from("special"),
        }
    );
    subscription.events.send(delivery("ok", 2)).await.unwrap();
    assert_eq!(
        harness.next_settlement().await,
        Settlement::Ack {
            lease_id: "lease-2".to_owned(),
            result: Bytes::from("done task-2"),
        }
    );

    stop.send(()).unwrap();
    tokio::time::timeout(TIMEOUT, running)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn queue_weights_reach_the_subscription() {
    let mut harness = start_broker(None, None).await;
    let worker = Worker::builder(harness.client.clone())
        .queue_weighted("urgent", 5)
        .queue("bulk")
        .queue_weighted("reports", 2)
        .build(handle)
        .unwrap();
    let (stop, shutdown) = shutdown_signal();
    let running = tokio::spawn(worker.run(shutdown));

    let subscription = harness.next_subscription().await;
    assert_eq!(subscription.request.queues, ["urgent", "bulk", "reports"]);
    let mut weights = subscription.request.weights.into_iter().collect::<Vec<_>>();
    weights.sort();
    assert_eq!(
        weights,
        [("reports".to_owned(), 2), ("urgent".to_owned(), 5)]
    );

    stop.send(()).unwrap();
    tokio::time::timeout(TIMEOUT, running)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn cancel_before_start_releases_task() {
    let mut harness = start_broker(None, None).await;
    let mut gate = Gate::new();
    let worker = Worker::builder(harness.client.clone())
        .queue("jobs")
        .concurrency(1)
        .max_in_flight(2)
        .build(gate.handler())
        .unwrap();
    let (stop, shutdown) = shutdown_signal();
    let running = tokio::spawn(worker.run(shutdown));
    let subscription = harness.next_subscription().await;

    // The only slot is busy with task 1, so task 2 waits in the worker.
    subscription.events.send(delivery("ok", 1)).await.unwrap();
    assert_eq!(gate.next_started().await.as_deref(), Some("task-1"));
    subscription.events.send(delivery("ok", 2)).await.unwrap();
    let notice = SubscribeResponse {
        event: Some(Event::CancelNotice(CancelNotice {
            task_id: "task-2".to_owned(),
            lease_id: "lease-2".to_owned(),
        })),
    };
    subscription.events.send(Ok(notice)).await.unwrap();

    // The notice is read while the slot is busy, and task 2 is released unrun.
    assert_eq!(
        harness.next_settlement().await,
        Settlement::Release {
            lease_id: "lease-2".to_owned(),
        }
    );
    gate.open();
    assert!(matches!(
        harness.next_settlement().await,
        Settlement::Ack { lease_id, .. } if lease_id == "lease-1"
    ));
    subscription.events.send(delivery("ok", 3)).await.unwrap();
    assert_eq!(gate.next_started().await.as_deref(), Some("task-3"));

    stop.send(()).unwrap();
    tokio::time::timeout(TIMEOUT, running)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(gate.started.try_recv().is_err(), "the cancelled task ran");
}

#[tokio::test]
async fn unstarted_deliveries_are_released_at_shutdown() {
    let mut harness = start_broker(None, None).await;
    let mut gate = Gate::new();
    let worker = Worker::builder(harness.client.clone())
        .queue("jobs")
        .concurrency(1)
        .max_in_flight(3)
        .shutdown_grace(Duration::from_secs(10))
        .build(gate.handler())
        .unwrap();
    let (stop, shutdown) = shutdown_signal();
    let running = tokio::spawn(worker.run(shutdown));
    let subscription = harness.next_subscription().await;

    subscription.events.send(delivery("ok", 1)).await.unwrap();
    assert_eq!(gate.next_started().await.as_deref(), Some("task-1"));
    subscription.events.send(delivery("ok", 2)).await.unwrap();
    // Task 2 waits for the busy slot when shutdown starts, so it is released unrun.
    tokio::time::sleep(Duration::from_millis(50)).await;
    stop.send(()).unwrap();
    assert_eq!(
        harness.next_settlement().await,
        Settlement::Release {
            lease_id: "lease-2".to_owned(),
        }
    );
    // A delivery that arrives while the running handler finishes is released too.
    subscription.events.send(delivery("ok", 3)).await.unwrap();
    assert_eq!(
        harness.next_settlement().await,
        Settlement::Release {
            lease_id: "lease-3".to_owned(),
        }
    );
    gate.open();
    assert!(matches!(
        harness.next_settlement().await,
        Settlement::Ack { lease_id, .. } if lease_id == "lease-1"
    ));

    tokio::time::timeout(TIMEOUT, running)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(gate.started.try_recv().is_err(), "a released task ran");
}

#[tokio::test]
async fn routing_and_weight_config_is_validated() {
    let client = Client::connect_lazy("http://127.0.0.1:1").unwrap();
    let config_error = |result: Result<Worker, Error>| match result {
        Err(Error::InvalidConfig(message)) => message,
        other => panic!("expected InvalidConfig, got {other:?}"),
    };

    let no_handler = Worker::builder(client.clone())
        .queue("jobs")
        .build_handlers();
    let duplicate_kind = Worker::builder(client.clone())
        .queue("jobs")
        .handle("email", handle)
        .handle("email", handle)
        .build_handlers();
    let zero_weight = Worker::builder(client.clone())
        .queue_weighted("jobs", 0)
        .build(handle);
    let heavy_weight = Worker::builder(client.clone())
        .queue_weighted("jobs", 101)
        .build(handle);
    let largest_weight = Worker::builder(client.clone())
        .queue_weighted("jobs", 100)
        .build(handle);
    let short_lease = Worker::builder(client)
        .queue("jobs")
        .lease_duration(Duration::from_millis(500))
        .build(handle);

    assert!(config_error(no_handler).contains("no handler is set"));
    assert!(config_error(duplicate_kind).contains("task kind email"));
    assert!(config_error(zero_weight).contains("weight 0 of queue \"jobs\""));
    assert!(config_error(heavy_weight).contains("weight 101 of queue \"jobs\""));
    assert!(largest_weight.is_ok());
    assert!(config_error(short_lease).contains("below the minimum of 1s"));
}

#[tokio::test]
async fn worker_config_is_validated() {
    let client = Client::connect_lazy("http://127.0.0.1:1").unwrap();

    let no_queue = Worker::builder(client.clone()).build(handle);
    let zero_concurrency = Worker::builder(client.clone())
        .queue("jobs")
        .concurrency(0)
        .build(handle);
    let zero_in_flight = Worker::builder(client.clone())
        .queue("jobs")
        .max_in_flight(0)
        .build(handle);
    let zero_backoff = Worker::builder(client.clone())
        .queue("jobs")
        .reconnect_backoff(Duration::ZERO, Duration::from_secs(1))
        .build(handle);
    let empty_settle_batch = Worker::builder(client.clone())
        .queue("jobs")
        .settle_batch(0, Duration::from_millis(1))
        .build(handle);
    let oversize_settle_batch = Worker::builder(client.clone())
        .queue("jobs")
        .settle_batch(1001, Duration::from_millis(1))
        .build(handle);
    let largest_settle_batch = Worker::builder(client)
        .queue("jobs")
        .settle_batch(1000, Duration::ZERO)
        .build(handle);

    assert!(matches!(no_queue, Err(Error::InvalidConfig(_))));
    assert!(matches!(zero_concurrency, Err(Error::InvalidConfig(_))));
    assert!(matches!(zero_in_flight, Err(Error::InvalidConfig(_))));
    assert!(matches!(zero_backoff, Err(Error::InvalidConfig(_))));
    assert!(matches!(empty_settle_batch, Err(Error::InvalidConfig(_))));
    assert!(matches!(
        oversize_settle_batch,
        Err(Error::InvalidConfig(_))
    ));
    assert!(largest_settle_batch.is_ok());
}

#[tokio::test]
async fn client_errors_keep_status_code() {
    let harness = start_broker(None, None).await;

    let enqueue_error = harness
        .client
        .enqueue(docket::Task::new("jobs", "ok"))
        .await
        .unwrap_err();
    let get_error = harness.client.get_task("missing").await.unwrap_err();

    assert_eq!(enqueue_error.code(), Some(tonic::Code::Unimplemented));
    assert_eq!(get_error.code(), Some(tonic::Code::NotFound));
    assert_eq!(
        get_error.status().map(tonic::Status::message),
        Some("the fake broker stores no tasks")
    );
    assert_eq!(
        get_error.to_string(),
        "gRPC call failed (NotFound): the fake broker stores no tasks"
    );
}

/// Waits for `run` to return and checks that it returned `Ok`.
async fn expect_stopped(running: tokio::task::JoinHandle<Result<(), Error>>) {
    tokio::time::timeout(TIMEOUT, running)
        .await
        .expect("the worker did not stop in time")
        .expect("the worker task panicked")
        .expect("the worker returned an error");
}

#[tokio::test]
async fn simultaneous_acks_share_calls() {
    const TASKS: u32 = 20;

    let mut harness = start_broker(None, None).await;
    // Every handler waits at the barrier, so all of them finish at the same time.
    let barrier = Arc::new(tokio::sync::Barrier::new(TASKS as usize));
    let worker = Worker::builder(harness.client.clone())
        .queue("jobs")
        .concurrency(TASKS as usize)
        .settle_batch(64, Duration::from_millis(5))
        .build(move |_task: TaskContext| {
            let barrier = Arc::clone(&barrier);
            async move {
                barrier.wait().await;
                Ok::<_, HandlerError>(None)
            }
        })
        .unwrap();
    let (stop, shutdown) = shutdown_signal();
    let running = tokio::spawn(worker.run(shutdown));

    let subscription = harness.next_subscription().await;
    for number in 0..TASKS {
        subscription
            .events
            .send(delivery("any", number))
            .await
            .unwrap();
    }
    let mut leases = Vec::new();
    for _ in 0..TASKS {
        match harness.next_settlement().await {
            Settlement::Ack { lease_id, .. } => leases.push(lease_id),
            nack => panic!("expected only acks, got {nack:?}"),
        }
    }

    stop.send(()).unwrap();
    expect_stopped(running).await;

    assert!(
        harness.recorded_settlements().is_empty(),
        "a lease was acked twice"
    );
    leases.sort();
    let mut expected: Vec<String> = (0..TASKS).map(|number| format!("lease-{number}")).collect();
    expected.sort();
    assert_eq!(leases, expected);

    let call_sizes = harness.call_sizes.lock().unwrap();
    assert!(
        call_sizes.acks.len() < TASKS as usize,
        "{TASKS} acks took {} calls: {:?}",
        call_sizes.acks.len(),
        call_sizes.acks
    );
    assert_eq!(call_sizes.acks.iter().sum::<usize>(), TASKS as usize);
    assert!(call_sizes.nacks.is_empty());
}

#[tokio::test]
async fn failed_item_leaves_batch_alone() {
    // `lease-2` is stale and `lease-3` fails once with UNAVAILABLE. With a batch size of
    // 3 and a long flush interval, the three acks go in one call.
    let mut harness = start_broker_with(FakeOptions {
        stale_leases: HashSet::from(["lease-2".to_owned()]),
        unavailable_once: HashSet::from(["lease-3".to_owned()]),
        ..FakeOptions::default()
    })
    .await;
    let worker = Worker::builder(harness.client.clone())
        .queue("jobs")
        .concurrency(3)
        .settle_batch(3, Duration::from_secs(3600))
        .build(handle)
        .unwrap();
    let (stop, shutdown) = shutdown_signal();
    let running = tokio::spawn(worker.run(shutdown));

    let subscription = harness.next_subscription().await;
    for number in 1..=3 {
        subscription
            .events
            .send(delivery("ok", number))
            .await
            .unwrap();
    }
    let mut leases = Vec::new();
    for _ in 0..3 {
        if let Settlement::Ack { lease_id, .. } = harness.next_settlement().await {
            leases.push(lease_id);
        }
    }
    // Only `lease-3` is retried. The worker is still running, so the retry waits for
    // the drain at shutdown, which sends it without the flush interval.
    stop.send(()).unwrap();
    expect_stopped(running).await;
    for settlement in harness.recorded_settlements() {
        if let Settlement::Ack { lease_id, .. } = settlement {
            leases.push(lease_id);
        }
    }

    leases.sort();
    assert_eq!(leases, ["lease-1", "lease-2", "lease-3", "lease-3"]);
    let call_sizes = harness.call_sizes.lock().unwrap();
    assert_eq!(call_sizes.acks, [3, 1]);
}

#[tokio::test]
async fn shutdown_flushes_pending_settles() {
    let mut harness = start_broker(None, None).await;
    // The flush interval and the grace period are far above `TIMEOUT`, so `run` returns
    // in time only if shutdown sends the queued settles at once.
    let worker = Worker::builder(harness.client.clone())
        .queue("jobs")
        .concurrency(4)
        .shutdown_grace(Duration::from_secs(3600))
        .settle_batch(64, Duration::from_secs(3600))
        .build(handle)
        .unwrap();
    let (stop, shutdown) = shutdown_signal();
    let running = tokio::spawn(worker.run(shutdown));

    let subscription = harness.next_subscription().await;
    subscription.events.send(delivery("ok", 1)).await.unwrap();
    subscription.events.send(delivery("fail", 2)).await.unwrap();
    subscription.events.send(delivery("slow", 3)).await.unwrap();
    // Give the fast handlers time to finish, so that their settles wait in a batch.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        harness.recorded_settlements().is_empty(),
        "a settle was sent before its batch was due"
    );

    stop.send(()).unwrap();
    expect_stopped(running).await;

    let settlements = harness.recorded_settlements();
    assert_eq!(settlements.len(), 3, "{settlements:?}");
    assert!(settlements.contains(&Settlement::Ack {
        lease_id: "lease-1".to_owned(),
        result: Bytes::from("done task-1"),
    }));
    assert!(settlements.contains(&Settlement::Nack {
        lease_id: "lease-2".to_owned(),
        error: "invalid recipient".to_owned(),
    }));
    assert!(settlements.contains(&Settlement::Ack {
        lease_id: "lease-3".to_owned(),
        result: Bytes::new(),
    }));
}

#[tokio::test]
async fn failed_call_retries_each_item() {
    // Every Ack call fails as a whole with UNAVAILABLE. The deliveries have no lease
    // deadline, so each lease gets 3 tries, and both leases go in every call.
    let unavailable = Status::unavailable("broker is shutting down");
    let mut harness = start_broker(None, Some(unavailable)).await;
    let worker = Worker::builder(harness.client.clone())
        .queue("jobs")
        .concurrency(2)
        .settle_batch(2, Duration::from_secs(3600))
        .build(handle)
        .unwrap();
    let (stop, shutdown) = shutdown_signal();
    let running = tokio::spawn(worker.run(shutdown));

    let subscription = harness.next_subscription().await;
    subscription.events.send(delivery("ok", 1)).await.unwrap();
    subscription.events.send(delivery("ok", 2)).await.unwrap();
    let mut leases = Vec::new();
    for _ in 0..6 {
        if let Settlement::Ack { lease_id, .. } = harness.next_settlement().await {
            leases.push(lease_id);
        }
    }

    stop.send(()).unwrap();
    expect_stopped(running).await;

    assert!(
        harness.recorded_settlements().is_empty(),
        "an ack was tried more than 3 times"
    );
    leases.sort();
    assert_eq!(
        leases,
        [
            "lease-1", "lease-1", "lease-1", "lease-2", "lease-2", "lease-2"
        ]
    );
    assert_eq!(harness.call_sizes.lock().unwrap().acks, [2, 2, 2]);
}
