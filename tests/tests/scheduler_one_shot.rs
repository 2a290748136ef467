//! One-shot schedules: the scheduler releases the task into the broker once at its due
//! time and not before, releases it at once when the due time has passed, and never
//! releases a cancelled one.

use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use docket_proto::v1::schedule_task_request::Due;
use docket_proto::v1::scheduler_client::SchedulerClient;
use docket_proto::v1::{
    CancelScheduleRequest, CreateScheduleRequest, ListSchedulesRequest, NewTask, Schedule,
    ScheduleKind, ScheduleState, ScheduleTaskRequest,
};
use docket_tests::{
    FIRE_TIME_HEADER, QUIET, SCHEDULE_ID_HEADER, SCHEDULE_NAME_HEADER, SchedulerSetup,
    Subscription, assert_rejected, cron_recurrence, delivered_fire_time, delivered_task_id,
    enqueue, format_utc, get_schedule, get_schedule_by_name, header, new_task, proto_duration,
    proto_timestamp, schedule_idempotency_key, system_time, utc, wait_for_schedule,
};
use tokio::time::Instant;
use tonic::Code;
use tonic::transport::Channel;

const QUEUE: &str = "reminders";

/// Lease of the test's subscriptions, longer than any test, so that no delivery comes
/// back a second time because its lease ran out.
const LEASE: Duration = Duration::from_secs(300);

/// Allowed difference between a time the scheduler reports and the test's own reading of
/// the same clock, which covers rounding and the order of the two readings.
const CLOCK_TOLERANCE: Duration = Duration::from_millis(50);

/// Delay of the schedule whose release time the test measures.
const DELAY: Duration = Duration::from_secs(2);

/// How long the test watches for an early release of a schedule due after [`DELAY`].
const EARLY_WATCH: Duration = Duration::from_millis(1700);

/// Upper bound on the release of a task whose due time has passed: the scheduler
/// releases it at once, so this only absorbs a slow machine.
const PROMPT_RELEASE: Duration = Duration::from_secs(5);

/// Schedules `task` with `due` and returns the new schedule.
async fn schedule_task(
    client: &mut SchedulerClient<Channel>,
    task: NewTask,
    due: Due,
) -> Result<Schedule> {
    let request = ScheduleTaskRequest {
        task: Some(task),
        due: Some(due),
    };
    client
        .schedule_task(request)
        .await?
        .into_inner()
        .schedule
        .context("ScheduleTask returned no schedule")
}

async fn cancel_schedule(
    client: &mut SchedulerClient<Channel>,
    schedule_id: &str,
) -> Result<Schedule, tonic::Status> {
    let request = CancelScheduleRequest {
        schedule_id: schedule_id.to_string(),
    };
    let response = client.cancel_schedule(request).await?.into_inner();
    response
        .schedule
        .ok_or_else(|| tonic::Status::internal("CancelSchedule returned no schedule"))
}

fn due_time(schedule: &Schedule) -> Result<SystemTime> {
    let due = schedule
        .due_time
        .as_ref()
        .with_context(|| format!("schedule {} has no due_time", schedule.id))?;
    Ok(system_time(due))
}

#[tokio::test]
async fn one_shot_releases_after_delay() -> Result<()> {
    let setup = SchedulerSetup::start(&[]).await?;
    let mut broker = setup.broker.client().await?;
    let mut scheduler = setup.scheduler.client().await?;
    let mut subscription = Subscription::open(&mut broker, &[QUEUE], 10, Some(LEASE)).await?;

    let mut task = new_task(QUEUE, "send_reminder", "remind-1");
    task.headers
        .insert("content-type".to_string(), "text/plain".to_string());
    task.priority = 3;
    let called = SystemTime::now();
    let started = Instant::now();
    let schedule = schedule_task(&mut scheduler, task, Due::Delay(proto_duration(DELAY))).await?;
    let returned = SystemTime::now();

    assert!(!schedule.id.is_empty(), "schedule id is empty");
    assert_eq!(schedule.kind(), ScheduleKind::OneShot, "schedule kind");
    assert_eq!(schedule.state(), ScheduleState::Active, "schedule state");
    assert_eq!(schedule.name, "", "name of a one-shot schedule");
    let due = due_time(&schedule)?;
    assert!(
        due + CLOCK_TOLERANCE >= called + DELAY && due <= returned + DELAY + CLOCK_TOLERANCE,
        "due time {} is not {DELAY:?} after the call, which ran from {} to {}",
        format_utc(due),
        format_utc(called),
        format_utc(returned)
    );
    assert_eq!(
        schedule.next_fire_time, schedule.due_time,
        "next_fire_time of a pending one-shot schedule"
    );
    let template = schedule.task.as_ref().context("schedule has no task")?;
    assert_eq!(template.queue, QUEUE, "template queue");
    assert_eq!(template.kind, "send_reminder", "template kind");
    assert_eq!(&template.payload[..], b"remind-1", "template payload");

    subscription
        .expect_no_delivery(EARLY_WATCH.saturating_sub(started.elapsed()))
        .await
        .context("the task was released before its due time")?;
    let delivery = subscription.next_delivery().await?;
    let elapsed = started.elapsed();
    let received = SystemTime::now();
    assert!(
        elapsed + CLOCK_TOLERANCE >= DELAY,
        "task delivered {elapsed:?} after ScheduleTask, before the delay of {DELAY:?}"
    );
    assert!(
        received + CLOCK_TOLERANCE >= due,
        "task delivered at {} before its due time {}",
        format_utc(received),
        format_utc(due)
    );

    let delivered = delivery.task.as_ref().context("delivery has no task")?;
    assert_eq!(delivered.queue, QUEUE, "delivered queue");
    assert_eq!(delivered.kind, "send_reminder", "delivered kind");
    assert_eq!(&delivered.payload[..], b"remind-1", "delivered payload");
    assert_eq!(delivered.priority, 3, "delivered priority");
    assert_eq!(
        header(&delivery, "content-type"),
        Some("text/plain"),
        "header of the template"
    );
    assert_eq!(
        header(&delivery, SCHEDULE_ID_HEADER),
        Some(schedule.id.as_str()),
        "{SCHEDULE_ID_HEADER} header"
    );
    assert_eq!(
        delivered_fire_time(&delivery)?,
        due,
        "{FIRE_TIME_HEADER} header {:?} against the due time {}",
        header(&delivery, FIRE_TIME_HEADER),
        format_utc(due)
    );
    assert_eq!(
        header(&delivery, SCHEDULE_NAME_HEADER),
        None,
        "{SCHEDULE_NAME_HEADER} header on a one-shot task"
    );
    let created_at = system_time(delivered.created_at.as_ref().context("no created_at")?);
    assert!(
        created_at + CLOCK_TOLERANCE >= due,
        "broker created the task at {}, before its due time {}",
        format_utc(created_at),
        format_utc(due)
    );

    let task_id = delivered_task_id(&delivery)?;
    let fired = wait_for_schedule(&mut scheduler, &schedule.id, "state FIRED", |schedule| {
        schedule.state() == ScheduleState::Fired
    })
    .await?;
    let outcome = fired.last_outcome.as_ref().context("no last_outcome")?;
    assert_eq!(outcome.task_id, task_id, "last_outcome.task_id");
    assert_eq!(outcome.error, "", "last_outcome.error");
    assert_eq!(
        outcome.fire_time, schedule.due_time,
        "last_outcome.fire_time"
    );
    assert_eq!(fired.last_fire_time, schedule.due_time, "last_fire_time");
    assert_eq!(fired.fire_count, 1, "fire_count");
    assert_eq!(
        fired.next_fire_time, None,
        "next_fire_time after the firing"
    );

    // The task was enqueued with the documented idempotency key: enqueueing another task
    // with that key returns the released task's id and creates nothing.
    let mut repeat = new_task(QUEUE, "send_reminder", "repeat");
    repeat.idempotency_key = schedule_idempotency_key(&schedule.id, due);
    let repeat_ids = enqueue(&mut broker, vec![repeat]).await?;
    assert_eq!(
        repeat_ids,
        vec![task_id.clone()],
        "Enqueue with the key {:?}",
        schedule_idempotency_key(&schedule.id, due)
    );
    subscription
        .expect_no_delivery(QUIET)
        .await
        .context("a second task was released or created")?;
    Ok(())
}

#[tokio::test]
async fn past_due_time_releases_at_once() -> Result<()> {
    let setup = SchedulerSetup::start(&[]).await?;
    let mut broker = setup.broker.client().await?;
    let mut scheduler = setup.scheduler.client().await?;
    let mut subscription = Subscription::open(&mut broker, &[QUEUE], 10, Some(LEASE)).await?;

    // Years in the past, far beyond the misfire threshold, which applies only to
    // recurring schedules.
    let due = utc("2020-01-01T00:00:00Z");
    let started = Instant::now();
    let task = new_task(QUEUE, "send_reminder", "late");
    let schedule = schedule_task(&mut scheduler, task, Due::DueTime(proto_timestamp(due))).await?;
    assert_eq!(due_time(&schedule)?, due, "due time in the response");

    let delivery = subscription.next_delivery().await?;
    let elapsed = started.elapsed();
    assert!(
        elapsed <= PROMPT_RELEASE,
        "task due in the past took {elapsed:?} to arrive"
    );
    assert_eq!(
        header(&delivery, FIRE_TIME_HEADER),
        Some("2020-01-01T00:00:00Z"),
        "{FIRE_TIME_HEADER} header of a fire time without a fraction of a second"
    );
    assert_eq!(
        header(&delivery, SCHEDULE_ID_HEADER),
        Some(schedule.id.as_str()),
        "{SCHEDULE_ID_HEADER} header"
    );

    let task_id = delivered_task_id(&delivery)?;
    let fired = wait_for_schedule(&mut scheduler, &schedule.id, "state FIRED", |schedule| {
        schedule.state() == ScheduleState::Fired
    })
    .await?;
    let outcome = fired.last_outcome.as_ref().context("no last_outcome")?;
    assert_eq!(outcome.task_id, task_id, "last_outcome.task_id");
    assert_eq!(fired.skipped_count, 0, "skipped_count of a late one-shot");
    Ok(())
}

#[tokio::test]
async fn cancel_before_firing_never_releases() -> Result<()> {
    let setup = SchedulerSetup::start(&[]).await?;
    let mut broker = setup.broker.client().await?;
    let mut scheduler = setup.scheduler.client().await?;
    let mut subscription = Subscription::open(&mut broker, &[QUEUE], 10, Some(LEASE)).await?;

    let delay = Duration::from_secs(1);
    let task = new_task(QUEUE, "send_reminder", "cancelled");
    let schedule = schedule_task(&mut scheduler, task, Due::Delay(proto_duration(delay))).await?;
    let cancelled = cancel_schedule(&mut scheduler, &schedule.id).await?;
    assert_eq!(
        cancelled.state(),
        ScheduleState::Cancelled,
        "state in the response"
    );
    assert_eq!(
        cancelled.next_fire_time, None,
        "next_fire_time after cancel"
    );

    // Watch well past the due time.
    subscription
        .expect_no_delivery(delay + Duration::from_millis(1500))
        .await
        .context("a cancelled schedule released its task")?;

    let stored = get_schedule(&mut scheduler, &schedule.id).await?;
    assert_eq!(stored.state(), ScheduleState::Cancelled, "stored state");
    assert_eq!(stored.fire_count, 0, "fire_count of a cancelled schedule");
    assert_eq!(
        stored.last_outcome, None,
        "last_outcome of a cancelled schedule"
    );

    assert_rejected(
        "cancel a cancelled schedule",
        cancel_schedule(&mut scheduler, &schedule.id).await,
        Code::FailedPrecondition,
        &schedule.id,
    );
    Ok(())
}

#[tokio::test]
async fn cancel_after_firing_is_rejected() -> Result<()> {
    let setup = SchedulerSetup::start(&[]).await?;
    let mut broker = setup.broker.client().await?;
    let mut scheduler = setup.scheduler.client().await?;
    let mut subscription = Subscription::open(&mut broker, &[QUEUE], 10, Some(LEASE)).await?;

    let due = SystemTime::now() - Duration::from_secs(1);
    let task = new_task(QUEUE, "send_reminder", "fired");
    let schedule = schedule_task(&mut scheduler, task, Due::DueTime(proto_timestamp(due))).await?;
    let delivery = subscription.next_delivery().await?;
    let task_id = delivered_task_id(&delivery)?;
    wait_for_schedule(&mut scheduler, &schedule.id, "state FIRED", |schedule| {
        schedule.state() == ScheduleState::Fired
    })
    .await?;

    assert_rejected(
        "cancel a fired schedule",
        cancel_schedule(&mut scheduler, &schedule.id).await,
        Code::FailedPrecondition,
        &schedule.id,
    );
    let stored = get_schedule(&mut scheduler, &schedule.id).await?;
    assert_eq!(
        stored.state(),
        ScheduleState::Fired,
        "state after the cancel"
    );
    let outcome = stored.last_outcome.as_ref().context("no last_outcome")?;
    assert_eq!(outcome.task_id, task_id, "last_outcome.task_id");
    Ok(())
}

/// Lists schedules of `kind` page by page with `page_size`, and returns the pages.
async fn list_pages(
    client: &mut SchedulerClient<Channel>,
    kind: ScheduleKind,
    page_size: u32,
) -> Result<Vec<Vec<Schedule>>> {
    let mut pages = Vec::new();
    let mut page_token = String::new();
    loop {
        let request = ListSchedulesRequest {
            kind: kind as i32,
            page_size,
            page_token: page_token.clone(),
        };
        let response = client.list_schedules(request).await?.into_inner();
        pages.push(response.schedules);
        if response.next_page_token.is_empty() {
            return Ok(pages);
        }
        anyhow::ensure!(
            pages.len() < 20,
            "ListSchedules returned more than 20 pages; the last token was {:?}",
            response.next_page_token
        );
        page_token = response.next_page_token;
    }
}

fn ids(schedules: &[Schedule]) -> Vec<&str> {
    schedules
        .iter()
        .map(|schedule| schedule.id.as_str())
        .collect()
}

#[tokio::test]
async fn get_and_list_schedules() -> Result<()> {
    let setup = SchedulerSetup::start(&[]).await?;
    let mut scheduler = setup.scheduler.client().await?;

    let mut one_shots = Vec::new();
    for index in 0..5 {
        let task = new_task(QUEUE, "send_reminder", format!("later-{index}"));
        let delay = Duration::from_secs(3600);
        one_shots
            .push(schedule_task(&mut scheduler, task, Due::Delay(proto_duration(delay))).await?);
    }
    // Created out of name order, so that the list shows the sort.
    let mut recurring = Vec::new();
    for name in ["beta-report", "alpha-report"] {
        let request = CreateScheduleRequest {
            name: name.to_string(),
            recurrence: Some(cron_recurrence("0 0 0 1 1 *", "UTC")),
            task: Some(new_task(QUEUE, "report", name)),
            paused: false,
        };
        let schedule = scheduler
            .create_schedule(request)
            .await?
            .into_inner()
            .schedule
            .context("CreateSchedule returned no schedule")?;
        recurring.push(schedule);
    }
    recurring.reverse();

    for created in &one_shots {
        let stored = get_schedule(&mut scheduler, &created.id).await?;
        assert_eq!(&stored, created, "GetSchedule by id of {}", created.id);
    }
    for created in &recurring {
        let by_name = get_schedule_by_name(&mut scheduler, &created.name).await?;
        assert_eq!(&by_name, created, "GetSchedule by name {}", created.name);
        let by_id = get_schedule(&mut scheduler, &created.id).await?;
        assert_eq!(&by_id, created, "GetSchedule by id of {}", created.name);
    }

    let pages = list_pages(&mut scheduler, ScheduleKind::OneShot, 2).await?;
    let page_sizes: Vec<usize> = pages.iter().map(Vec::len).collect();
    assert_eq!(page_sizes, vec![2, 2, 1], "one-shot page sizes");
    let listed: Vec<Schedule> = pages.into_iter().flatten().collect();
    assert_eq!(
        ids(&listed),
        ids(&one_shots),
        "one-shot schedules in creation order"
    );
    assert!(
        listed
            .iter()
            .all(|schedule| schedule.kind() == ScheduleKind::OneShot),
        "kind filter ONE_SHOT listed another kind: {listed:?}"
    );

    let pages = list_pages(&mut scheduler, ScheduleKind::Recurring, 2).await?;
    assert_eq!(pages.len(), 1, "recurring pages");
    let names: Vec<&str> = pages[0]
        .iter()
        .map(|schedule| schedule.name.as_str())
        .collect();
    assert_eq!(
        names,
        vec!["alpha-report", "beta-report"],
        "recurring schedules in name order"
    );

    // Every kind: recurring ones first, with a page that crosses from one kind to the
    // other.
    let pages = list_pages(&mut scheduler, ScheduleKind::Unspecified, 3).await?;
    let page_sizes: Vec<usize> = pages.iter().map(Vec::len).collect();
    assert_eq!(page_sizes, vec![3, 3, 1], "page sizes of every kind");
    let listed: Vec<Schedule> = pages.into_iter().flatten().collect();
    let expected: Vec<&str> = ids(&recurring).into_iter().chain(ids(&one_shots)).collect();
    assert_eq!(ids(&listed), expected, "schedules of every kind");
    Ok(())
}
