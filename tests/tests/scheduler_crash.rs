//! SIGKILL of the scheduler after a firing's Enqueue succeeded and before the firing was
//! recorded: the restarted scheduler fires again with the same idempotency key, and the
//! broker keeps exactly one task for the firing.

use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use docket_proto::v1::broker_client::BrokerClient;
use docket_proto::v1::scheduler_client::SchedulerClient;
use docket_proto::v1::{CreateScheduleRequest, Delivery, ScheduleState};
use docket_tests::{
    BrokerProcess, QUIET, SCHEDULE_ID_HEADER, SCHEDULE_NAME_HEADER, SchedulerProcess, Subscription,
    WAIT, delivered_fire_time, delivered_task_id, format_utc, get_schedule, get_task, header,
    interval_recurrence, new_task, queue_stats, schedule_idempotency_key, system_time, temp_dir,
    wait_for_schedule, wait_for_stats, within,
};
use docket_tests::{schedule_at, total_tasks, whole_second_at_or_before};
use tonic::transport::Channel;

/// Test hook of the scheduler: after a firing's Enqueue succeeded, it logs
/// [`PAUSE_LOG`] and sleeps this long before it records the firing. The test kills the
/// scheduler long before the sleep ends.
const PAUSE_ARGS: [&str; 2] = ["--pause-after-enqueue", "30s"];

/// Part of the line that the scheduler logs when the test hook pauses a firing.
const PAUSE_LOG: &str = "paused between enqueue and record";

/// Interval of the recurring schedule. It is long, so that only its first fire time falls
/// within the test.
const RECURRING_INTERVAL: Duration = Duration::from_secs(3600);

/// Waits for the paused firing of `schedule_id`, and checks that the broker already
/// contains its task while the scheduler has not recorded the firing.
async fn wait_for_paused_firing(
    scheduler: &SchedulerProcess,
    scheduler_client: &mut SchedulerClient<Channel>,
    broker_client: &mut BrokerClient<Channel>,
    queue: &str,
    schedule_id: &str,
) -> Result<()> {
    let line = scheduler.wait_for_log(PAUSE_LOG).await?;
    assert!(
        line.contains(schedule_id),
        "the pause line does not name schedule {schedule_id}: {line}"
    );

    let stats = queue_stats(broker_client, queue).await?;
    assert_eq!(
        stats.pending, 1,
        "pending tasks while the scheduler pauses between enqueue and record: {stats:?}"
    );
    assert_eq!(
        total_tasks(&stats),
        1,
        "tasks while the scheduler pauses between enqueue and record: {stats:?}"
    );

    let schedule = get_schedule(scheduler_client, schedule_id).await?;
    assert_eq!(
        schedule.state(),
        ScheduleState::Active,
        "state of schedule {schedule_id} before the firing is recorded"
    );
    assert_eq!(
        schedule.fire_count, 0,
        "fire_count of schedule {schedule_id} before the firing is recorded"
    );
    Ok(())
}

/// Checks that the queue contains exactly one task after the restart and that a
/// subscription delivers it once and nothing after it. Returns the delivery.
async fn receive_only_task(
    broker_client: &mut BrokerClient<Channel>,
    queue: &str,
) -> Result<Delivery> {
    let stats = wait_for_stats(broker_client, queue, "one pending task", |stats| {
        stats.pending == 1
    })
    .await?;
    assert_eq!(
        total_tasks(&stats),
        1,
        "tasks in the queue after the restart, expected the one task of the firing: {stats:?}"
    );

    let mut subscription = Subscription::open(broker_client, &[queue], 10, None).await?;
    let delivery = subscription.next_delivery().await?;
    subscription
        .expect_no_delivery(QUIET)
        .await
        .context("the firing interrupted by SIGKILL was released twice")?;
    assert_eq!(delivery.attempt, 1, "attempt of the only task");
    Ok(delivery)
}

#[tokio::test(flavor = "multi_thread")]
async fn kill9_before_record_releases_one_shot_once() -> Result<()> {
    const QUEUE: &str = "crash-one-shot";
    let broker_dir = temp_dir();
    let scheduler_dir = temp_dir();
    let broker = BrokerProcess::start(broker_dir.path(), &[]).await?;
    let mut first =
        SchedulerProcess::start(scheduler_dir.path(), &broker.endpoint(), &PAUSE_ARGS).await?;
    let mut scheduler = first.client().await?;
    let mut broker_client = broker.client().await?;

    // A due time in the past fires at once. A whole second has an exact RFC 3339 form, so
    // the fire-time header can be compared for equality.
    let due_time = whole_second_at_or_before(SystemTime::now());
    let task = new_task(QUEUE, "invoice", "one-shot");
    let schedule = schedule_at(&mut scheduler, task, due_time).await?;
    wait_for_paused_firing(
        &first,
        &mut scheduler,
        &mut broker_client,
        QUEUE,
        &schedule.id,
    )
    .await?;
    drop(scheduler);
    first.kill9()?;

    let second = SchedulerProcess::start(scheduler_dir.path(), &broker.endpoint(), &[]).await?;
    let mut scheduler = second.client().await?;
    let fired = wait_for_schedule(&mut scheduler, &schedule.id, "state FIRED", |schedule| {
        schedule.state() == ScheduleState::Fired
    })
    .await?;

    let delivery = receive_only_task(&mut broker_client, QUEUE).await?;
    let task_id = delivered_task_id(&delivery)?;
    let outcome = fired
        .last_outcome
        .context("the schedule has no last_outcome after its firing was recorded")?;
    assert_eq!(
        outcome.task_id, task_id,
        "last_outcome.task_id against the task in the broker"
    );
    assert_eq!(
        outcome.fire_time.as_ref().map(system_time),
        Some(due_time),
        "last_outcome.fire_time"
    );
    assert_eq!(
        header(&delivery, SCHEDULE_ID_HEADER),
        Some(schedule.id.as_str()),
        "{SCHEDULE_ID_HEADER} header"
    );
    assert_eq!(
        delivered_fire_time(&delivery)?,
        due_time,
        "fire-time header, expected {}",
        format_utc(due_time)
    );
    let status = get_task(&mut broker_client, &task_id).await?;
    assert_eq!(
        status.idempotency_key,
        schedule_idempotency_key(&schedule.id, due_time),
        "idempotency key of the task"
    );
    assert!(
        !second.stderr_output().contains(PAUSE_LOG),
        "the scheduler restarted without the test hook paused a firing"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn kill9_before_record_releases_recurring_once() -> Result<()> {
    const QUEUE: &str = "crash-recurring";
    const NAME: &str = "crash-recurring-hourly";
    let broker_dir = temp_dir();
    let scheduler_dir = temp_dir();
    let broker = BrokerProcess::start(broker_dir.path(), &[]).await?;
    let mut first =
        SchedulerProcess::start(scheduler_dir.path(), &broker.endpoint(), &PAUSE_ARGS).await?;
    let mut scheduler = first.client().await?;
    let mut broker_client = broker.client().await?;

    // The first fire time is the next whole second, well within the default misfire
    // threshold of one minute when the restarted scheduler gets to it, so it fires again
    // instead of being treated as a missed run.
    let start_time = whole_second_at_or_before(SystemTime::now()) + Duration::from_secs(1);
    let request = CreateScheduleRequest {
        name: NAME.to_string(),
        recurrence: Some(interval_recurrence(RECURRING_INTERVAL, Some(start_time))),
        task: Some(new_task(QUEUE, "report", "recurring")),
        paused: false,
    };
    let schedule = within(WAIT, "CreateSchedule", async {
        Ok(scheduler.create_schedule(request).await?)
    })
    .await?
    .into_inner()
    .schedule
    .context("CreateSchedule returned no schedule")?;
    wait_for_paused_firing(
        &first,
        &mut scheduler,
        &mut broker_client,
        QUEUE,
        &schedule.id,
    )
    .await?;
    drop(scheduler);
    first.kill9()?;

    let second = SchedulerProcess::start(scheduler_dir.path(), &broker.endpoint(), &[]).await?;
    let mut scheduler = second.client().await?;
    let fired = wait_for_schedule(&mut scheduler, &schedule.id, "fire_count 1", |schedule| {
        schedule.fire_count >= 1
    })
    .await?;
    assert_eq!(fired.fire_count, 1, "fire_count after the restart");
    assert_eq!(fired.skipped_count, 0, "skipped_count after the restart");
    assert_eq!(
        fired.state(),
        ScheduleState::Active,
        "state of the recurring schedule after the restart"
    );
    assert_eq!(
        fired.last_fire_time.as_ref().map(system_time),
        Some(start_time),
        "last_fire_time after the restart"
    );
    assert_eq!(
        fired.next_fire_time.as_ref().map(system_time),
        Some(start_time + RECURRING_INTERVAL),
        "next_fire_time after the restart"
    );

    let delivery = receive_only_task(&mut broker_client, QUEUE).await?;
    let task_id = delivered_task_id(&delivery)?;
    let outcome = fired
        .last_outcome
        .context("the schedule has no last_outcome after its firing was recorded")?;
    assert_eq!(
        outcome.task_id, task_id,
        "last_outcome.task_id against the task in the broker"
    );
    assert_eq!(
        header(&delivery, SCHEDULE_ID_HEADER),
        Some(schedule.id.as_str()),
        "{SCHEDULE_ID_HEADER} header"
    );
    assert_eq!(
        header(&delivery, SCHEDULE_NAME_HEADER),
        Some(NAME),
        "{SCHEDULE_NAME_HEADER} header"
    );
    assert_eq!(
        delivered_fire_time(&delivery)?,
        start_time,
        "fire-time header, expected {}",
        format_utc(start_time)
    );
    let status = get_task(&mut broker_client, &task_id).await?;
    assert_eq!(
        status.idempotency_key,
        schedule_idempotency_key(&schedule.id, start_time),
        "idempotency key of the task"
    );
    Ok(())
}
