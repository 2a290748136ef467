//! Scheduling calls of the client against an in-process fake scheduler on loopback, which
//! records the requests it receives.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use docket::proto::schedule_task_request::Due;
use docket::proto::scheduler_server::{Scheduler, SchedulerServer};
use docket::proto::{
    CancelScheduleRequest, CancelScheduleResponse, NewTask, Schedule, ScheduleTaskRequest,
    ScheduleTaskResponse,
};
use docket::{Client, Error, Task};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

use docket::proto as v1;

/// Schedule id that the fake scheduler returns for every ScheduleTask call.
const SCHEDULE_ID: &str = "0198a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b";

/// Due time that the fake scheduler returns for a request with a delay.
const DELAYED_DUE_SECONDS: i64 = 1_800_000_000;

#[derive(Default)]
struct FakeScheduler {
    schedule_requests: Arc<Mutex<Vec<ScheduleTaskRequest>>>,
    cancel_requests: Arc<Mutex<Vec<CancelScheduleRequest>>>,
}

#[tonic::async_trait]
impl Scheduler for FakeScheduler {
    async fn schedule_task(
        &self,
        request: Request<ScheduleTaskRequest>,
    ) -> Result<Response<ScheduleTaskResponse>, Status> {
        let request = request.into_inner();
        self.schedule_requests.lock().unwrap().push(request.clone());

        let task = request.task.unwrap_or_default();
        if !task.idempotency_key.is_empty() {
            return Err(Status::invalid_argument(format!(
                "task.idempotency_key must be empty, got {:?}",
                task.idempotency_key
            )));
        }
        let due_time = match request.due {
            Some(Due::DueTime(due_time)) => due_time,
            Some(Due::Delay(_)) => prost_types::Timestamp {
                seconds: DELAYED_DUE_SECONDS,
                nanos: 0,
            },
            None => return Err(Status::invalid_argument("due is missing")),
        };
        Ok(Response::new(ScheduleTaskResponse {
            schedule: Some(Schedule {
                id: SCHEDULE_ID.to_owned(),
                due_time: Some(due_time),
                task: Some(task),
                ..Schedule::default()
            }),
        }))
    }

    async fn cancel_schedule(
        &self,
        request: Request<CancelScheduleRequest>,
    ) -> Result<Response<CancelScheduleResponse>, Status> {
        let request = request.into_inner();
        self.cancel_requests.lock().unwrap().push(request.clone());
        if request.schedule_id != SCHEDULE_ID {
            return Err(Status::not_found(format!(
                "schedule {} not found",
                request.schedule_id
            )));
        }
        Ok(Response::new(CancelScheduleResponse {
            schedule: Some(Schedule {
                id: request.schedule_id,
                ..Schedule::default()
            }),
        }))
    }

    // The client wraps none of the RPCs below.

    async fn create_schedule(
        &self,
        _request: Request<v1::CreateScheduleRequest>,
    ) -> Result<Response<v1::CreateScheduleResponse>, Status> {
        Err(Status::unimplemented(
            "the fake scheduler serves no CreateSchedule",
        ))
    }

    async fn update_schedule(
        &self,
        _request: Request<v1::UpdateScheduleRequest>,
    ) -> Result<Response<v1::UpdateScheduleResponse>, Status> {
        Err(Status::unimplemented(
            "the fake scheduler serves no UpdateSchedule",
        ))
    }

    async fn pause_schedule(
        &self,
        _request: Request<v1::PauseScheduleRequest>,
    ) -> Result<Response<v1::PauseScheduleResponse>, Status> {
        Err(Status::unimplemented(
            "the fake scheduler serves no PauseSchedule",
        ))
    }

    async fn resume_schedule(
        &self,
        _request: Request<v1::ResumeScheduleRequest>,
    ) -> Result<Response<v1::ResumeScheduleResponse>, Status> {
        Err(Status::unimplemented(
            "the fake scheduler serves no ResumeSchedule",
        ))
    }

    async fn delete_schedule(
        &self,
        _request: Request<v1::DeleteScheduleRequest>,
    ) -> Result<Response<v1::DeleteScheduleResponse>, Status> {
        Err(Status::unimplemented(
            "the fake scheduler serves no DeleteSchedule",
        ))
    }

    async fn get_schedule(
        &self,
        _request: Request<v1::GetScheduleRequest>,
    ) -> Result<Response<v1::GetScheduleResponse>, Status> {
        Err(Status::unimplemented(
            "the fake scheduler serves no GetSchedule",
        ))
    }

    async fn list_schedules(
        &self,
        _request: Request<v1::ListSchedulesRequest>,
    ) -> Result<Response<v1::ListSchedulesResponse>, Status> {
        Err(Status::unimplemented(
            "the fake scheduler serves no ListSchedules",
        ))
    }

    async fn preview_schedule(
        &self,
        _request: Request<v1::PreviewScheduleRequest>,
    ) -> Result<Response<v1::PreviewScheduleResponse>, Status> {
        Err(Status::unimplemented(
            "the fake scheduler serves no PreviewSchedule",
        ))
    }
}

struct Harness {
    client: Client,
    schedule_requests: Arc<Mutex<Vec<ScheduleTaskRequest>>>,
    cancel_requests: Arc<Mutex<Vec<CancelScheduleRequest>>>,
}

impl Harness {
    /// Returns the one ScheduleTask request received so far.
    fn only_schedule_request(&self) -> ScheduleTaskRequest {
        let requests = self.schedule_requests.lock().unwrap();
        assert_eq!(requests.len(), 1, "ScheduleTask calls: {requests:?}");
        requests[0].clone()
    }
}

/// Starts a fake scheduler on a loopback port and returns a client whose broker address
/// is never dialed, because the scheduling calls go to the scheduler only.
async fn start_scheduler() -> Harness {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let scheduler = FakeScheduler::default();
    let schedule_requests = Arc::clone(&scheduler.schedule_requests);
    let cancel_requests = Arc::clone(&scheduler.cancel_requests);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(SchedulerServer::new(scheduler))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );

    let client = Client::connect_lazy("http://127.0.0.1:1")
        .unwrap()
        .with_scheduler(format!("http://{address}"))
        .unwrap();
    Harness {
        client,
        schedule_requests,
        cancel_requests,
    }
}

#[tokio::test]
async fn enqueue_in_sends_delay() {
    let harness = start_scheduler().await;
    let task = Task::new("emails", "send_reminder")
        .payload("zoe@example.com")
        .priority(4);

    let scheduled = harness
        .client
        .enqueue_in(task.clone(), Duration::new(90, 250_000_000))
        .await
        .unwrap();

    let request = harness.only_schedule_request();
    // The client adds a trace context to the caller's task.
    let mut sent = request.task.expect("the request carries the task");
    let traceparent = sent.headers.remove("traceparent");
    assert!(
        traceparent.is_some_and(|value| value.parse::<docket::TraceParent>().is_ok()),
        "headers of the sent task: {:?}",
        sent.headers
    );
    assert_eq!(sent, NewTask::from(task));
    assert_eq!(
        request.due,
        Some(Due::Delay(prost_types::Duration {
            seconds: 90,
            nanos: 250_000_000,
        }))
    );
    assert_eq!(scheduled.schedule_id(), SCHEDULE_ID);
    assert_eq!(
        scheduled.due_time(),
        UNIX_EPOCH + Duration::from_secs(DELAYED_DUE_SECONDS as u64),
        "enqueue_in must return the scheduler's due time"
    );
}

#[tokio::test]
async fn enqueue_at_sends_due_time() {
    let harness = start_scheduler().await;
    let due_time = UNIX_EPOCH + Duration::new(1_750_000_000, 123_456_789);

    let scheduled = harness
        .client
        .enqueue_at(Task::new("emails", "send_reminder"), due_time)
        .await
        .unwrap();

    let request = harness.only_schedule_request();
    assert_eq!(
        request.due,
        Some(Due::DueTime(prost_types::Timestamp {
            seconds: 1_750_000_000,
            nanos: 123_456_789,
        }))
    );
    assert_eq!(scheduled.schedule_id(), SCHEDULE_ID);
    assert_eq!(scheduled.due_time(), due_time);
}

#[tokio::test]
async fn enqueue_at_past_time_is_sent() {
    let harness = start_scheduler().await;
    let due_time = SystemTime::now() - Duration::from_secs(3600);

    let scheduled = harness
        .client
        .enqueue_at(Task::new("emails", "send_reminder"), due_time)
        .await
        .unwrap();

    assert_eq!(scheduled.due_time(), due_time);
    assert!(matches!(
        harness.only_schedule_request().due,
        Some(Due::DueTime(_))
    ));
}

#[tokio::test]
async fn idempotency_key_rejection_is_status() {
    let harness = start_scheduler().await;
    let task = NewTask {
        idempotency_key: "order-1".to_owned(),
        ..NewTask::from(Task::new("orders", "create_order"))
    };

    let error = harness
        .client
        .enqueue_in(task, Duration::from_secs(1))
        .await
        .unwrap_err();

    assert!(matches!(error, Error::Status(_)), "{error:?}");
    assert_eq!(error.code(), Some(tonic::Code::InvalidArgument));
    assert!(
        error.to_string().contains("task.idempotency_key"),
        "{error}"
    );
}

#[tokio::test]
async fn cancel_scheduled_sends_id() {
    let harness = start_scheduler().await;

    harness.client.cancel_scheduled(SCHEDULE_ID).await.unwrap();
    let error = harness
        .client
        .cancel_scheduled("unknown-id")
        .await
        .unwrap_err();

    let requests = harness.cancel_requests.lock().unwrap();
    let ids: Vec<&str> = requests
        .iter()
        .map(|request| request.schedule_id.as_str())
        .collect();
    assert_eq!(ids, [SCHEDULE_ID, "unknown-id"]);
    assert_eq!(error.code(), Some(tonic::Code::NotFound));
}

#[tokio::test]
async fn invalid_delay_is_not_sent() {
    let harness = start_scheduler().await;

    let error = harness
        .client
        .enqueue_in(Task::new("emails", "send_reminder"), Duration::MAX)
        .await
        .unwrap_err();

    assert!(matches!(error, Error::InvalidDelay { .. }), "{error:?}");
    assert!(harness.schedule_requests.lock().unwrap().is_empty());
}

#[tokio::test]
async fn unreachable_scheduler_is_status() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    drop(listener);
    let client = Client::connect_lazy("http://127.0.0.1:1")
        .unwrap()
        .with_scheduler(format!("http://{address}"))
        .unwrap();

    let error = client
        .enqueue_in(Task::new("emails", "send_reminder"), Duration::from_secs(1))
        .await
        .unwrap_err();

    assert_eq!(error.code(), Some(tonic::Code::Unavailable), "{error:?}");
}
