//! Worker behavior against an in-process fake broker on loopback.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use docket::proto as v1;
use docket::proto::broker_server::{Broker, BrokerServer};
use docket::proto::subscribe_response::Event;
use docket::proto::{
    AckRequest, AckResponse, Delivery, EnqueueRequest, EnqueueResponse, GetTaskRequest,
    GetTaskResponse, Heartbeat, NackRequest, NackResponse, SettleResult, SubscribeRequest,
    SubscribeResponse, Task as WireTask, TaskState,
};
use docket::{Bytes, Client, Error, HandlerError, TaskContext, Worker};
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
}

struct FakeBroker {
    subscriptions: mpsc::Sender<Subscription>,
    settlements: mpsc::Sender<Settlement>,
    subscribe_error: Option<Status>,
    ack_error: Option<Status>,
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
        let mut results = Vec::new();
        for ack in request.into_inner().acks {
            let _ = self
                .settlements
                .send(Settlement::Ack {
                    lease_id: ack.lease_id.clone(),
                    result: ack.result,
                })
                .await;
            results.push(SettleResult {
                lease_id: ack.lease_id,
                state: TaskState::Succeeded.into(),
                ..SettleResult::default()
            });
        }
        match &self.ack_error {
            Some(status) => Err(status.clone()),
            None => Ok(Response::new(AckResponse { results })),
        }
    }

    async fn nack(&self, request: Request<NackRequest>) -> Result<Response<NackResponse>, Status> {
        let mut results = Vec::new();
        for nack in request.into_inner().nacks {
            let _ = self
                .settlements
                .send(Settlement::Nack {
                    lease_id: nack.lease_id.clone(),
                    error: nack.error,
                })
                .await;
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

    // The worker calls none of the RPCs below.

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
}

async fn start_broker(subscribe_error: Option<Status>, ack_error: Option<Status>) -> Harness {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (subscriptions_tx, subscriptions) = mpsc::channel(16);
    let (settlements_tx, settlements) = mpsc::channel(256);
    let broker = FakeBroker {
        subscriptions: subscriptions_tx,
        settlements: settlements_tx,
        subscribe_error,
        ack_error,
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
async fn shutdown_grace_aborts_handlers() {
    let mut harness = start_broker(None, None).await;
    // Every running handler holds a clone of `alive`, so `recv` returns `None` only
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
    // An aborted handler settles nothing, and the broker releases its lease when the
    // stream closes.
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
    let zero_backoff = Worker::builder(client)
        .queue("jobs")
        .reconnect_backoff(Duration::ZERO, Duration::from_secs(1))
        .build(handle);

    assert!(matches!(no_queue, Err(Error::InvalidConfig(_))));
    assert!(matches!(zero_concurrency, Err(Error::InvalidConfig(_))));
    assert!(matches!(zero_in_flight, Err(Error::InvalidConfig(_))));
    assert!(matches!(zero_backoff, Err(Error::InvalidConfig(_))));
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
        "broker call failed (NotFound): the fake broker stores no tasks"
    );
}
