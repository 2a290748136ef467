//! End-to-end test harness: runs the real `docket-broker` and `docket-scheduler` binaries
//! on loopback and talks to them over gRPC, or through the `docket` command line.
//!
//! The harness finds binaries in the Cargo target directory of the test executable and
//! never builds them: run `cargo build --workspace --bins --examples` before the tests.
//! It stops processes with Unix signals, so it runs on Unix only.

pub mod cli;
mod process;
mod schedule;

use std::collections::HashMap;
use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use docket_proto::v1::broker_client::BrokerClient;
use docket_proto::v1::subscribe_response::Event;
use docket_proto::v1::{
    AckRequest, CancelNotice, Delivery, EnqueueRequest, ExtendLeaseRequest, ExtendLeaseResponse,
    GetQueueStatsRequest, GetTaskRequest, NackRequest, NewTask, QueueStats, SubscribeRequest,
    TaskState, TaskStatus,
};
use tokio::time::{Instant, timeout};
use tonic::Streaming;
use tonic::transport::Channel;

pub use process::{BROKER_SERVICE, BrokerProcess, SCHEDULER_SERVICE, SchedulerProcess};
pub use schedule::{
    FIRE_TIME_HEADER, SCHEDULE_ID_HEADER, SCHEDULE_NAME_HEADER, SchedulerSetup,
    ack_all_and_expect_only_them, cron_recurrence, delivered_fire_time, format_utc, get_schedule,
    get_schedule_by_name, interval_recurrence, preview, schedule_at, schedule_idempotency_key,
    sleep_until, total_tasks, unix_nanos, utc, wait_for_schedule, whole_second_at_or_after,
    whole_second_at_or_before,
};
pub use tonic_health::pb::health_check_response::ServingStatus;

pub use docket_proto::v1;

/// Upper bound on the wait for anything a test expects to happen: a startup, a delivery,
/// a state change. It is generous because the tests share a small machine with the
/// build and with each other.
pub const WAIT: Duration = Duration::from_secs(20);

/// How long a test watches for something that must not happen, such as a delivery past
/// `max_in_flight`.
pub const QUIET: Duration = Duration::from_millis(500);

/// Creates a temporary directory that is deleted when the returned value is dropped.
pub fn temp_dir() -> TempDir {
    tempfile::Builder::new()
        .prefix("docket-test-")
        .tempdir()
        .expect("failed to create a temporary directory")
}

pub use tempfile::TempDir;

/// Returns the Cargo profile directory (`target/debug`) that contains the test executable.
///
/// Integration test executables live in `target/<profile>/deps/`, and binaries one level
/// up.
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("failed to find the test executable's path");
    let deps = exe
        .parent()
        .expect("the test executable has no parent directory");
    let profile = if deps.file_name().is_some_and(|name| name == "deps") {
        deps.parent()
            .expect("the deps directory has no parent directory")
    } else {
        deps
    };
    profile.to_path_buf()
}

/// Returns the path of the `docket-broker` binary, panicking with the build command if it
/// is missing.
pub fn broker_binary() -> PathBuf {
    let path = profile_dir().join(format!("docket-broker{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.is_file(),
        "broker binary {} not found: run `cargo build --workspace --bins --examples` first",
        path.display()
    );
    path
}

/// Returns the path of the `docket-scheduler` binary, panicking with the build command if
/// it is missing.
pub fn scheduler_binary() -> PathBuf {
    let path = profile_dir().join(format!("docket-scheduler{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.is_file(),
        "scheduler binary {} not found: run `cargo build --workspace --bins --examples` first",
        path.display()
    );
    path
}

/// Returns the path of the `docket` command-line binary, panicking with the build command
/// if it is missing.
pub fn cli_binary() -> PathBuf {
    let path = profile_dir().join(format!("docket{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.is_file(),
        "docket binary {} not found: run `cargo build --workspace --bins --examples` first",
        path.display()
    );
    path
}

/// Returns the path of a built example of the workspace, panicking with the build command
/// if it is missing.
pub fn example_binary(name: &str) -> PathBuf {
    let path = profile_dir()
        .join("examples")
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.is_file(),
        "example binary {} not found: run `cargo build --workspace --bins --examples` first",
        path.display()
    );
    path
}

/// Runs `future` with the deadline `limit`, turning a timeout into an error that names
/// `description`, the event the test was waiting for.
pub async fn within<T>(
    limit: Duration,
    description: &str,
    future: impl Future<Output = Result<T>>,
) -> Result<T> {
    match timeout(limit, future).await {
        Ok(result) => result,
        Err(_) => bail!("timed out after {limit:?} waiting for {description}"),
    }
}

/// Runs `command` to completion with stdout and stderr captured, killing it if it runs
/// longer than `limit`.
pub async fn run_with_timeout(command: &mut Command, limit: Duration) -> Result<Output> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("failed to start {command:?}"))?;

    // Both pipes are drained while the process runs, so that neither fills and blocks it.
    let stdout_reader = spawn_pipe_reader(child.stdout.take().expect("stdout is piped"));
    let stderr_reader = spawn_pipe_reader(child.stderr.take().expect("stderr is piped"));

    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stdout = stdout_reader.join().unwrap_or_default();
            let stderr = stderr_reader.join().unwrap_or_default();
            bail!(
                "{command:?} did not finish within {limit:?} and was killed; stdout:\n{}\n\
                 stderr:\n{}",
                String::from_utf8_lossy(&stdout),
                String::from_utf8_lossy(&stderr)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    Ok(Output {
        status,
        stdout: stdout_reader.join().unwrap_or_default(),
        stderr: stderr_reader.join().unwrap_or_default(),
    })
}

fn spawn_pipe_reader(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut contents = Vec::new();
        let _ = pipe.read_to_end(&mut contents);
        contents
    })
}

/// Builds a task with default priority and attempts, and no headers.
pub fn new_task(queue: &str, kind: &str, payload: impl Into<Bytes>) -> NewTask {
    NewTask {
        queue: queue.to_string(),
        kind: kind.to_string(),
        payload: payload.into(),
        headers: HashMap::new(),
        priority: 0,
        max_attempts: 0,
        ..NewTask::default()
    }
}

/// Enqueues `tasks` in one batch and returns their ids, checking that there is one per
/// task.
pub async fn enqueue(
    client: &mut BrokerClient<Channel>,
    tasks: Vec<NewTask>,
) -> Result<Vec<String>> {
    let count = tasks.len();
    let response = within(WAIT, "Enqueue", async {
        Ok(client.enqueue(EnqueueRequest { tasks }).await?)
    })
    .await?;
    let ids = response.into_inner().task_ids;
    if ids.len() != count {
        bail!("Enqueue returned {} ids for {count} tasks", ids.len());
    }
    Ok(ids)
}

/// Returns the status of the task `task_id`.
pub async fn get_task(client: &mut BrokerClient<Channel>, task_id: &str) -> Result<TaskStatus> {
    let response = within(WAIT, "GetTask", async {
        Ok(client
            .get_task(GetTaskRequest {
                task_id: task_id.to_string(),
            })
            .await?)
    })
    .await?;
    response
        .into_inner()
        .status
        .ok_or_else(|| anyhow!("GetTask for {task_id} returned no status"))
}

/// Polls `GetTask` until the task reaches `state`, and returns its status then.
pub async fn wait_for_state(
    client: &mut BrokerClient<Channel>,
    task_id: &str,
    state: TaskState,
) -> Result<TaskStatus> {
    let description = format!("task {task_id} to reach state {state:?}");
    within(WAIT, &description, async {
        loop {
            let status = get_task(client, task_id).await?;
            if status.state() == state {
                return Ok(status);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
}

/// Acknowledges the lease `lease_id` with `result`. The item's own result, if it is not
/// OK, is returned as a status.
pub async fn ack(
    client: &mut BrokerClient<Channel>,
    lease_id: &str,
    result: impl Into<Bytes>,
) -> Result<(), tonic::Status> {
    let request = AckRequest {
        acks: vec![v1::Acknowledgement {
            lease_id: lease_id.to_string(),
            result: result.into(),
        }],
    };
    match timeout(WAIT, client.ack(request)).await {
        Ok(response) => single_result(response?.into_inner().results).map(|_| ()),
        Err(_) => Err(tonic::Status::deadline_exceeded(format!(
            "Ack of lease {lease_id} timed out after {WAIT:?}"
        ))),
    }
}

/// Fails the attempt under lease `lease_id` and returns the task's new state. The item's
/// own result, if it is not OK, is returned as a status.
pub async fn nack(
    client: &mut BrokerClient<Channel>,
    lease_id: &str,
    error: &str,
) -> Result<TaskState, tonic::Status> {
    let request = NackRequest {
        nacks: vec![v1::NegativeAcknowledgement {
            lease_id: lease_id.to_string(),
            error: error.to_string(),
            ..Default::default()
        }],
    };
    match timeout(WAIT, client.nack(request)).await {
        Ok(response) => single_result(response?.into_inner().results).map(|result| result.state()),
        Err(_) => Err(tonic::Status::deadline_exceeded(format!(
            "Nack of lease {lease_id} timed out after {WAIT:?}"
        ))),
    }
}

/// Returns the one result of a single-item Ack or Nack, or its error as a status.
pub fn single_result(results: Vec<v1::SettleResult>) -> Result<v1::SettleResult, tonic::Status> {
    let count = results.len();
    let Some(result) = results.into_iter().next().filter(|_| count == 1) else {
        return Err(tonic::Status::internal(format!(
            "expected one settle result, got {count}"
        )));
    };
    if result.code != tonic::Code::Ok as i32 {
        return Err(tonic::Status::new(
            tonic::Code::from_i32(result.code),
            result.message,
        ));
    }
    Ok(result)
}

/// Fails the attempts of `nacks` in one Nack call and returns the per-item results.
pub async fn nack_items(
    client: &mut BrokerClient<Channel>,
    nacks: Vec<v1::NegativeAcknowledgement>,
) -> Result<Vec<v1::SettleResult>> {
    let response = within(WAIT, "Nack", async {
        Ok(client.nack(NackRequest { nacks }).await?)
    })
    .await?;
    Ok(response.into_inner().results)
}

/// Settles the leases of `acks` in one Ack call and returns the per-item results.
pub async fn ack_items(
    client: &mut BrokerClient<Channel>,
    acks: Vec<v1::Acknowledgement>,
) -> Result<Vec<v1::SettleResult>> {
    let response = within(WAIT, "Ack", async {
        Ok(client.ack(AckRequest { acks }).await?)
    })
    .await?;
    Ok(response.into_inner().results)
}

/// Moves the deadline of lease `lease_id` to `extension` from now.
pub async fn extend_lease(
    client: &mut BrokerClient<Channel>,
    lease_id: &str,
    extension: Duration,
) -> Result<ExtendLeaseResponse, tonic::Status> {
    let request = ExtendLeaseRequest {
        lease_id: lease_id.to_string(),
        extension: Some(proto_duration(extension)),
    };
    match timeout(WAIT, client.extend_lease(request)).await {
        Ok(response) => Ok(response?.into_inner()),
        Err(_) => Err(tonic::Status::deadline_exceeded(format!(
            "ExtendLease of lease {lease_id} timed out after {WAIT:?}"
        ))),
    }
}

/// Returns the task counts of `queue`.
pub async fn queue_stats(client: &mut BrokerClient<Channel>, queue: &str) -> Result<QueueStats> {
    let response = within(WAIT, "GetQueueStats", async {
        Ok(client
            .get_queue_stats(GetQueueStatsRequest {
                queue: queue.to_string(),
            })
            .await?)
    })
    .await?;
    response
        .into_inner()
        .stats
        .ok_or_else(|| anyhow!("GetQueueStats for {queue} returned no stats"))
}

/// Polls `GetQueueStats` until `condition` holds for the counts of `queue`, and returns
/// them then.
pub async fn wait_for_stats(
    client: &mut BrokerClient<Channel>,
    queue: &str,
    description: &str,
    condition: impl Fn(&QueueStats) -> bool,
) -> Result<QueueStats> {
    let description = format!("queue {queue} stats: {description}");
    within(WAIT, &description, async {
        loop {
            let stats = queue_stats(client, queue).await?;
            if condition(&stats) {
                return Ok(stats);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
}

/// Polls `GetTask` until the broker reports the task `task_id` as NOT_FOUND.
pub async fn wait_for_not_found(client: &mut BrokerClient<Channel>, task_id: &str) -> Result<()> {
    let description = format!("task {task_id} to be deleted");
    within(WAIT, &description, async {
        loop {
            let request = GetTaskRequest {
                task_id: task_id.to_string(),
            };
            match client.get_task(request).await {
                Err(status) if status.code() == tonic::Code::NotFound => return Ok(()),
                Err(status) => bail!("GetTask for {task_id} failed: {status}"),
                Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
    .await
}

/// Asserts that `result` is an error with `code` whose message contains `field`.
pub fn assert_rejected<T: std::fmt::Debug>(
    case: &str,
    result: Result<T, tonic::Status>,
    code: tonic::Code,
    field: &str,
) {
    let status = match result {
        Ok(value) => panic!("{case}: expected {code:?}, but the request succeeded with {value:?}"),
        Err(status) => status,
    };
    assert_eq!(
        status.code(),
        code,
        "{case}: wrong status code, message {:?}",
        status.message()
    );
    assert!(
        status.message().contains(field),
        "{case}: message {:?} does not name the field {field:?}",
        status.message()
    );
}

/// Converts a protobuf timestamp to the system clock's type.
pub fn system_time(timestamp: &prost_types::Timestamp) -> SystemTime {
    SystemTime::try_from(*timestamp).expect("timestamp within the range of SystemTime")
}

/// Returns `later - earlier` as a signed number of seconds, negative if `later` is
/// earlier.
pub fn seconds_between(earlier: SystemTime, later: SystemTime) -> f64 {
    match later.duration_since(earlier) {
        Ok(duration) => duration.as_secs_f64(),
        Err(error) => -error.duration().as_secs_f64(),
    }
}

/// Converts a duration to the protobuf type.
pub fn proto_duration(duration: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(duration.as_secs()).expect("duration fits in i64 seconds"),
        nanos: i32::try_from(duration.subsec_nanos()).expect("nanoseconds fit in i32"),
    }
}

/// Converts a system time to the protobuf type.
pub fn proto_timestamp(time: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(time)
}

/// Returns the value of the header `key` of a delivered task, or `None` if the delivery
/// has no task or the task no such header.
pub fn header<'a>(delivery: &'a Delivery, key: &str) -> Option<&'a str> {
    delivery
        .task
        .as_ref()
        .and_then(|task| task.headers.get(key))
        .map(String::as_str)
}

/// An open Subscribe stream.
pub struct Subscription {
    stream: Streaming<v1::SubscribeResponse>,
    /// Number of heartbeats received so far, including those skipped while waiting for
    /// a delivery.
    pub heartbeats: usize,
}

impl Subscription {
    /// Opens a stream on `queues` with `max_in_flight` and an optional lease duration.
    pub async fn open(
        client: &mut BrokerClient<Channel>,
        queues: &[&str],
        max_in_flight: u32,
        lease_duration: Option<Duration>,
    ) -> Result<Self, tonic::Status> {
        let request = SubscribeRequest {
            queues: queues.iter().map(|queue| queue.to_string()).collect(),
            max_in_flight,
            lease_duration: lease_duration.map(proto_duration),
            weights: HashMap::new(),
        };
        Self::open_request(client, request).await
    }

    /// Opens a stream with the full request, for example one that sets queue weights.
    ///
    /// The broker may reject an invalid request in the call itself or as the first
    /// message of the stream. In the second case this returns the stream, and the error
    /// arrives with the first event.
    pub async fn open_request(
        client: &mut BrokerClient<Channel>,
        request: SubscribeRequest,
    ) -> Result<Self, tonic::Status> {
        let stream = match timeout(WAIT, client.subscribe(request)).await {
            Ok(response) => response?.into_inner(),
            Err(_) => {
                return Err(tonic::Status::deadline_exceeded(format!(
                    "Subscribe timed out after {WAIT:?}"
                )));
            }
        };
        Ok(Subscription {
            stream,
            heartbeats: 0,
        })
    }

    /// Waits up to `limit` for the next event, failing if the stream ends or errors.
    pub async fn next_event(&mut self, limit: Duration) -> Result<Event> {
        within(limit, "a Subscribe event", async {
            loop {
                let message = self
                    .stream
                    .message()
                    .await
                    .context("Subscribe stream failed")?
                    .ok_or_else(|| anyhow!("Subscribe stream ended"))?;
                match message.event {
                    Some(Event::Heartbeat(heartbeat)) => {
                        self.heartbeats += 1;
                        return Ok(Event::Heartbeat(heartbeat));
                    }
                    Some(event) => return Ok(event),
                    // An event kind newer than this client: ignored, as the contract requires.
                    None => continue,
                }
            }
        })
        .await
    }

    /// Waits up to [`WAIT`] for the next delivery, skipping heartbeats.
    pub async fn next_delivery(&mut self) -> Result<Delivery> {
        let deadline = Instant::now() + WAIT;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match self.next_event(remaining).await {
                Ok(Event::Delivery(delivery)) => return Ok(delivery),
                Ok(Event::Heartbeat(_) | Event::CancelNotice(_)) => continue,
                Err(error) => return Err(error.context("no delivery arrived")),
            }
        }
    }

    /// Waits up to [`WAIT`] for the next cancel notice, skipping heartbeats and failing
    /// on a delivery.
    pub async fn next_cancel_notice(&mut self) -> Result<CancelNotice> {
        let deadline = Instant::now() + WAIT;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match self.next_event(remaining).await {
                Ok(Event::CancelNotice(notice)) => return Ok(notice),
                Ok(Event::Heartbeat(_)) => continue,
                Ok(Event::Delivery(delivery)) => bail!(
                    "delivery with lease {} arrived while waiting for a cancel notice",
                    delivery.lease_id
                ),
                Err(error) => return Err(error.context("no cancel notice arrived")),
            }
        }
    }

    /// Receives `count` deliveries, each within [`WAIT`].
    pub async fn next_deliveries(&mut self, count: usize) -> Result<Vec<Delivery>> {
        let mut deliveries = Vec::with_capacity(count);
        for received in 0..count {
            let delivery = self
                .next_delivery()
                .await
                .with_context(|| format!("after {received} of {count} deliveries"))?;
            deliveries.push(delivery);
        }
        Ok(deliveries)
    }

    /// Watches the stream for `period` and fails if a delivery arrives or the stream
    /// ends. Heartbeats are allowed.
    pub async fn expect_no_delivery(&mut self, period: Duration) -> Result<()> {
        let deadline = Instant::now() + period;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Ok(());
            }
            match timeout(remaining, self.stream.message()).await {
                Err(_) => return Ok(()),
                Ok(Err(status)) => bail!("Subscribe stream failed: {status}"),
                Ok(Ok(None)) => bail!("Subscribe stream ended"),
                Ok(Ok(Some(message))) => match message.event {
                    Some(Event::Delivery(delivery)) => {
                        let task_id = delivery.task.map(|task| task.id).unwrap_or_default();
                        bail!(
                            "unexpected delivery of task {task_id} (attempt {})",
                            delivery.attempt
                        );
                    }
                    Some(Event::Heartbeat(_)) => self.heartbeats += 1,
                    Some(Event::CancelNotice(_)) | None => {}
                },
            }
        }
    }
}

/// Returns the task id of a delivery, failing if the delivery carries no task.
pub fn delivered_task_id(delivery: &Delivery) -> Result<String> {
    delivery
        .task
        .as_ref()
        .map(|task| task.id.clone())
        .ok_or_else(|| anyhow!("delivery with lease {} has no task", delivery.lease_id))
}

/// Enqueues `count` single-attempt tasks to `queue`, receives them, and nacks each with
/// `error`, so that all of them are DEAD on return. Returns their ids in enqueue order.
pub async fn make_dead_tasks(
    client: &mut BrokerClient<Channel>,
    queue: &str,
    count: usize,
    error: &str,
) -> Result<Vec<String>> {
    /// The broker's default limit of tasks per Enqueue and items per Nack.
    const BATCH: usize = 1000;
    let mut ids = Vec::with_capacity(count);
    let indices: Vec<usize> = (0..count).collect();
    for chunk in indices.chunks(BATCH) {
        let tasks = chunk
            .iter()
            .map(|index| {
                let mut task = new_task(queue, "doomed", format!("task-{index}"));
                task.max_attempts = 1;
                task
            })
            .collect();
        ids.extend(enqueue(client, tasks).await?);
    }

    let in_flight = u32::try_from(count.clamp(1, BATCH)).unwrap_or(1000);
    let mut subscription = Subscription::open(client, &[queue], in_flight, None).await?;
    let mut dead = 0;
    while dead < count {
        let batch = (count - dead).min(BATCH);
        let deliveries = subscription.next_deliveries(batch).await?;
        let nacks = deliveries
            .iter()
            .map(|delivery| v1::NegativeAcknowledgement {
                lease_id: delivery.lease_id.clone(),
                error: error.to_string(),
                ..Default::default()
            })
            .collect();
        for result in nack_items(client, nacks).await? {
            if result.state() != TaskState::Dead {
                bail!(
                    "Nack of lease {} left the task {:?} ({}), not DEAD",
                    result.lease_id,
                    result.state(),
                    result.message
                );
            }
        }
        dead += batch;
    }
    Ok(ids)
}
