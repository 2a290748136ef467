//! The SDK's scheduling calls against a real broker and a real scheduler.
//!
//! A delayed task reaches a subscriber once its delay has passed and not before. A past
//! due time releases the task at once, and a cancelled task never arrives. A client
//! without a scheduler address gets an error that names the fix.

use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use docket::{Client, Error, ScheduledTask, Task};
use docket_proto::v1::{NewTask, ScheduleState};
use docket_tests::{
    BrokerProcess, QUIET, SCHEDULE_ID_HEADER, SchedulerProcess, Subscription, TempDir, WAIT,
    delivered_fire_time, get_schedule, header, seconds_between, temp_dir, wait_for_schedule,
    within,
};
use tonic::Code;

const QUEUE: &str = "reminders";
const KIND: &str = "send_reminder";

/// Delay of the task whose delivery time the tests measure.
const DELAY: Duration = Duration::from_millis(1500);

/// Delay of the tasks in the cancellation test, long enough for the test to schedule two
/// tasks and cancel one before the first is due.
const CANCEL_DELAY: Duration = Duration::from_secs(3);

/// Upper bound on the time from scheduling a past-due task to its delivery, generous
/// because the tests share the machine with builds.
const AT_ONCE: Duration = Duration::from_secs(5);

/// A broker and a scheduler that releases into it, each with its own store.
struct Services {
    scheduler: SchedulerProcess,
    broker: BrokerProcess,
    _scheduler_dir: TempDir,
    _broker_dir: TempDir,
}

impl Services {
    async fn start() -> Result<Self> {
        let broker_dir = temp_dir();
        let broker = BrokerProcess::start(broker_dir.path(), &[]).await?;
        let scheduler_dir = temp_dir();
        let scheduler =
            SchedulerProcess::start(scheduler_dir.path(), &broker.endpoint(), &[]).await?;
        Ok(Services {
            scheduler,
            broker,
            _scheduler_dir: scheduler_dir,
            _broker_dir: broker_dir,
        })
    }

    /// Connects an SDK client to the broker with the scheduler's address set.
    async fn sdk_client(&self) -> Result<Client> {
        let client = within(WAIT, "SDK connect", async {
            Ok(Client::connect(self.broker.endpoint()).await?)
        })
        .await?;
        Ok(client.with_scheduler(self.scheduler.endpoint())?)
    }

    /// Opens a Subscribe stream on [`QUEUE`] with the harness's raw client.
    async fn subscribe(&self) -> Result<Subscription> {
        let mut broker_client = self.broker.client().await?;
        Ok(Subscription::open(&mut broker_client, &[QUEUE], 10, None).await?)
    }
}

fn reminder(payload: &'static str) -> Task {
    Task::new(QUEUE, KIND).payload(payload)
}

async fn enqueue_in(client: &Client, task: Task, delay: Duration) -> Result<ScheduledTask> {
    within(WAIT, "enqueue_in", async {
        Ok(client.enqueue_in(task, delay).await?)
    })
    .await
}

async fn enqueue_at(client: &Client, task: Task, due_time: SystemTime) -> Result<ScheduledTask> {
    within(WAIT, "enqueue_at", async {
        Ok(client.enqueue_at(task, due_time).await?)
    })
    .await
}

/// Cancels `schedule_id` and returns the SDK's error, or `None` if the call succeeded.
async fn cancel_scheduled(client: &Client, schedule_id: &str) -> Result<Option<Error>> {
    within(WAIT, "cancel_scheduled", async {
        Ok(client.cancel_scheduled(schedule_id).await.err())
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn enqueue_in_delivers_after_delay() -> Result<()> {
    let services = Services::start().await?;
    let client = services.sdk_client().await?;
    let mut subscription = services.subscribe().await?;

    let sent_at = SystemTime::now();
    let started = Instant::now();
    let scheduled = enqueue_in(&client, reminder("delayed"), DELAY).await?;
    let returned_at = SystemTime::now();

    // The scheduler adds the delay to its own clock when the call arrives, which is
    // between `sent_at` and `returned_at` on this machine's clock.
    assert!(
        scheduled.due_time() >= sent_at + DELAY,
        "due time is {:.3}s after the call started, expected at least {DELAY:?}",
        seconds_between(sent_at, scheduled.due_time())
    );
    assert!(
        scheduled.due_time() <= returned_at + DELAY,
        "due time is {:.3}s after the call returned, expected at most {DELAY:?}",
        seconds_between(returned_at, scheduled.due_time())
    );

    let delivery = subscription
        .next_delivery()
        .await
        .context("the delayed task was not delivered")?;
    let elapsed = started.elapsed();
    let received_at = SystemTime::now();

    assert!(
        elapsed >= DELAY,
        "the task was delivered {elapsed:?} after enqueue_in, before its delay of {DELAY:?}"
    );
    assert!(
        received_at >= scheduled.due_time(),
        "the task was delivered {:.3}s before its due time",
        seconds_between(received_at, scheduled.due_time())
    );
    assert_eq!(
        header(&delivery, SCHEDULE_ID_HEADER),
        Some(scheduled.schedule_id()),
        "schedule id header of the delivered task"
    );
    let task = delivery.task.as_ref().context("delivery without task")?;
    assert_eq!(
        &task.payload[..],
        b"delayed",
        "payload of the delivered task"
    );
    assert_eq!(task.kind, KIND, "kind of the delivered task");

    // The fire time header may be written with less precision than the due time.
    let fire_time = delivered_fire_time(&delivery)?;
    let drift = seconds_between(scheduled.due_time(), fire_time).abs();
    assert!(
        drift < 1.0,
        "fire time header is {drift:.3}s away from the due time enqueue_in returned"
    );

    subscription
        .expect_no_delivery(QUIET)
        .await
        .context("a second task was delivered for one enqueue_in")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn enqueue_at_past_time_delivers_at_once() -> Result<()> {
    let services = Services::start().await?;
    let client = services.sdk_client().await?;
    let mut subscription = services.subscribe().await?;
    let due_time = SystemTime::now() - Duration::from_secs(60);

    let started = Instant::now();
    let scheduled = enqueue_at(&client, reminder("overdue"), due_time).await?;
    assert_eq!(
        scheduled.due_time(),
        due_time,
        "enqueue_at returned another due time than it sent"
    );

    let delivery = subscription
        .next_delivery()
        .await
        .context("the past-due task was not delivered")?;
    let elapsed = started.elapsed();

    assert!(
        elapsed < AT_ONCE,
        "the past-due task took {elapsed:?} to arrive, expected less than {AT_ONCE:?}"
    );
    assert_eq!(
        header(&delivery, SCHEDULE_ID_HEADER),
        Some(scheduled.schedule_id()),
        "schedule id header of the delivered task"
    );
    let task = delivery.task.as_ref().context("delivery without task")?;
    assert_eq!(
        &task.payload[..],
        b"overdue",
        "payload of the delivered task"
    );

    // Once the firing is recorded, the schedule can no longer be cancelled.
    let mut scheduler_client = services.scheduler.client().await?;
    wait_for_schedule(
        &mut scheduler_client,
        scheduled.schedule_id(),
        "state FIRED",
        |schedule| schedule.state() == ScheduleState::Fired,
    )
    .await?;
    let error = cancel_scheduled(&client, scheduled.schedule_id())
        .await?
        .context("cancel_scheduled of a fired schedule succeeded")?;
    assert_eq!(
        error.code(),
        Some(Code::FailedPrecondition),
        "cancel_scheduled of a fired schedule: {error}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_scheduled_prevents_delivery() -> Result<()> {
    let services = Services::start().await?;
    let client = services.sdk_client().await?;
    let mut subscription = services.subscribe().await?;

    // The uncancelled task is due after the cancelled one, so its delivery shows that the
    // scheduler was releasing tasks when the cancelled one fell due.
    let cancelled = enqueue_in(&client, reminder("cancelled"), CANCEL_DELAY).await?;
    let uncancelled = enqueue_in(&client, reminder("uncancelled"), CANCEL_DELAY + QUIET).await?;
    let error = cancel_scheduled(&client, cancelled.schedule_id()).await?;
    assert!(
        error.is_none(),
        "cancel_scheduled of a pending schedule failed: {error:?}"
    );

    let mut scheduler_client = services.scheduler.client().await?;
    let schedule = get_schedule(&mut scheduler_client, cancelled.schedule_id()).await?;
    assert_eq!(
        schedule.state(),
        ScheduleState::Cancelled,
        "state of the cancelled schedule"
    );

    let delivery = subscription
        .next_delivery()
        .await
        .context("the task that was not cancelled was not delivered")?;
    assert_eq!(
        header(&delivery, SCHEDULE_ID_HEADER),
        Some(uncancelled.schedule_id()),
        "the first delivered task is not the uncancelled one"
    );
    subscription
        .expect_no_delivery(QUIET)
        .await
        .context("the cancelled task was delivered")?;

    let schedule = get_schedule(&mut scheduler_client, cancelled.schedule_id()).await?;
    assert_eq!(
        schedule.state(),
        ScheduleState::Cancelled,
        "state of the cancelled schedule after its due time"
    );
    assert_eq!(
        schedule.fire_count, 0,
        "fire count of the cancelled schedule"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_scheduled_unknown_id_is_not_found() -> Result<()> {
    let services = Services::start().await?;
    let client = services.sdk_client().await?;
    let unknown_id = uuid::Uuid::now_v7().to_string();

    let error = cancel_scheduled(&client, &unknown_id)
        .await?
        .context("cancel_scheduled of an unknown id succeeded")?;

    assert_eq!(
        error.code(),
        Some(Code::NotFound),
        "cancel_scheduled of an unknown id: {error}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn idempotency_key_is_rejected() -> Result<()> {
    let services = Services::start().await?;
    let client = services.sdk_client().await?;
    let mut subscription = services.subscribe().await?;
    let task = NewTask {
        idempotency_key: "reminder-1".to_string(),
        ..reminder("keyed").into_proto()
    };

    let result = within(WAIT, "enqueue_in", async {
        Ok(client.enqueue_in(task, Duration::ZERO).await)
    })
    .await?;

    let error = result
        .err()
        .context("enqueue_in of a task with an idempotency key succeeded")?;
    assert!(matches!(error, Error::Status(_)), "{error:?}");
    assert_eq!(error.code(), Some(Code::InvalidArgument), "{error}");
    assert!(
        error.to_string().contains("task.idempotency_key"),
        "the error does not name the field task.idempotency_key: {error}"
    );
    subscription
        .expect_no_delivery(QUIET)
        .await
        .context("a rejected task was delivered")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn client_without_scheduler_gets_clear_error() -> Result<()> {
    let broker_dir = temp_dir();
    let broker = BrokerProcess::start(broker_dir.path(), &[]).await?;
    let mut broker_client = broker.client().await?;
    let mut subscription = Subscription::open(&mut broker_client, &[QUEUE], 10, None).await?;
    let client = within(WAIT, "SDK connect", async {
        Ok(Client::connect(broker.endpoint()).await?)
    })
    .await?;

    let errors = [
        (
            "enqueue_in",
            client
                .enqueue_in(reminder("no scheduler"), DELAY)
                .await
                .err(),
        ),
        (
            "enqueue_at",
            client
                .enqueue_at(reminder("no scheduler"), SystemTime::now())
                .await
                .err(),
        ),
        (
            "cancel_scheduled",
            client.cancel_scheduled("any-id").await.err(),
        ),
        ("scheduler_grpc", client.scheduler_grpc().err()),
    ];

    for (call, error) in errors {
        let error = error.with_context(|| format!("{call} without a scheduler succeeded"))?;
        assert!(
            matches!(error, Error::SchedulerNotConfigured),
            "{call}: {error:?}"
        );
        assert!(
            error.to_string().contains("Client::with_scheduler"),
            "{call}: the error does not name the fix: {error}"
        );
    }
    subscription
        .expect_no_delivery(QUIET)
        .await
        .context("a task reached the broker without a scheduler")?;
    Ok(())
}
