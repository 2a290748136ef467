//! Recurring schedules: interval and cron rules fire at their exact fire times, once each,
//! and pause, resume, update and delete take effect from the time of the call.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use docket_proto::v1::scheduler_client::SchedulerClient;
use docket_proto::v1::subscribe_response::Event;
use docket_proto::v1::{
    CreateScheduleRequest, DeleteScheduleRequest, Delivery, GetScheduleRequest,
    PauseScheduleRequest, Recurrence, ResumeScheduleRequest, Schedule, ScheduleKind, ScheduleState,
    TaskState, UpdateScheduleRequest, recurrence,
};
use docket_tests::{
    FIRE_TIME_HEADER, SCHEDULE_ID_HEADER, SCHEDULE_NAME_HEADER, SchedulerSetup, Subscription, WAIT,
    assert_rejected, cron_recurrence, delivered_fire_time, delivered_task_id, format_utc,
    get_schedule, get_schedule_by_name, get_task, header, interval_recurrence, new_task,
    proto_duration, system_time, unix_nanos, wait_for_schedule,
};
use tonic::Code;
use tonic::transport::Channel;

const QUEUE: &str = "periodic";

/// Lease of the test's subscriptions, longer than any test, so that no delivery comes
/// back a second time because its lease ran out.
const LEASE: Duration = Duration::from_secs(300);

/// Allowed difference between a time the scheduler reports and the test's own reading of
/// the same clock.
const CLOCK_TOLERANCE: Duration = Duration::from_millis(50);

/// How long the test watches for a firing that must not happen after a pause or delete.
const STOPPED_WATCH: Duration = Duration::from_millis(2500);

const SECOND: Duration = Duration::from_secs(1);

async fn create_schedule(
    client: &mut SchedulerClient<Channel>,
    name: &str,
    recurrence: Recurrence,
) -> Result<Schedule, tonic::Status> {
    let request = CreateScheduleRequest {
        name: name.to_string(),
        recurrence: Some(recurrence),
        task: Some(new_task(QUEUE, "tick", name.to_string())),
        paused: false,
    };
    let response = client.create_schedule(request).await?.into_inner();
    response
        .schedule
        .ok_or_else(|| tonic::Status::internal("CreateSchedule returned no schedule"))
}

fn next_fire_time(schedule: &Schedule) -> Result<SystemTime> {
    let time = schedule
        .next_fire_time
        .as_ref()
        .with_context(|| format!("schedule {:?} has no next_fire_time", schedule.name))?;
    Ok(system_time(time))
}

/// Returns the first whole second at least `min_lead` from now.
fn whole_second_after(min_lead: Duration) -> SystemTime {
    let earliest = SystemTime::now() + min_lead;
    let since_epoch = earliest
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970");
    let seconds = since_epoch.as_secs() + u64::from(since_epoch.subsec_nanos() > 0);
    UNIX_EPOCH + Duration::from_secs(seconds)
}

/// Returns whether `time` lies a whole number of `step`s after `origin`.
fn on_grid(time: SystemTime, origin: SystemTime, step: Duration) -> bool {
    let offset = unix_nanos(time) - unix_nanos(origin);
    offset >= 0 && offset % i128::try_from(step.as_nanos()).expect("step fits in i128") == 0
}

/// Checks the headers that name the schedule on a delivered task, and returns its fire
/// time.
fn check_schedule_headers(delivery: &Delivery, schedule: &Schedule) -> Result<SystemTime> {
    ensure!(
        header(delivery, SCHEDULE_ID_HEADER) == Some(schedule.id.as_str()),
        "{SCHEDULE_ID_HEADER} header is {:?}, expected {:?}",
        header(delivery, SCHEDULE_ID_HEADER),
        schedule.id
    );
    ensure!(
        header(delivery, SCHEDULE_NAME_HEADER) == Some(schedule.name.as_str()),
        "{SCHEDULE_NAME_HEADER} header is {:?}, expected {:?}",
        header(delivery, SCHEDULE_NAME_HEADER),
        schedule.name
    );
    delivered_fire_time(delivery)
}

/// Watches `subscription` for `period` and fails on a delivery whose fire time is after
/// `boundary`. A delivery with an earlier fire time is a firing that was already under way
/// when the schedule stopped, and is counted. Returns the number of those.
async fn expect_no_firing_after(
    subscription: &mut Subscription,
    boundary: SystemTime,
    period: Duration,
) -> Result<usize> {
    let deadline = tokio::time::Instant::now() + period;
    let mut earlier_firings = 0;
    loop {
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        if remaining.is_zero() {
            return Ok(earlier_firings);
        }
        let Ok(event) = tokio::time::timeout(remaining, subscription.next_event(WAIT)).await else {
            return Ok(earlier_firings);
        };
        if let Event::Delivery(delivery) = event? {
            let fire_time = delivered_fire_time(&delivery)?;
            if fire_time > boundary {
                bail!(
                    "task with fire time {} delivered after the schedule stopped at {}",
                    format_utc(fire_time),
                    format_utc(boundary)
                );
            }
            earlier_firings += 1;
        }
    }
}

#[tokio::test]
async fn interval_fires_once_per_fire_time() -> Result<()> {
    let setup = SchedulerSetup::start(&[]).await?;
    let mut broker = setup.broker.client().await?;
    let mut scheduler = setup.scheduler.client().await?;
    let mut subscription = Subscription::open(&mut broker, &[QUEUE], 100, Some(LEASE)).await?;

    let start = whole_second_after(SECOND);
    let schedule = create_schedule(
        &mut scheduler,
        "every-second",
        interval_recurrence(SECOND, Some(start)),
    )
    .await?;
    assert_eq!(schedule.kind(), ScheduleKind::Recurring, "schedule kind");
    assert_eq!(schedule.state(), ScheduleState::Active, "schedule state");
    assert_eq!(next_fire_time(&schedule)?, start, "first fire time");

    // The window contains the fire times start, start + 1 s, start + 2 s and start + 3 s.
    // The broker delivers tasks of one priority in enqueue order and the scheduler fires
    // in order, so once a later fire time arrives, every fire time of the window has.
    let window_end = start + 3 * SECOND;
    let mut fire_times = Vec::new();
    loop {
        let delivery = subscription.next_delivery().await?;
        let received = SystemTime::now();
        let fire_time = check_schedule_headers(&delivery, &schedule)?;
        assert!(
            received + CLOCK_TOLERANCE >= fire_time,
            "task of fire time {} delivered early, at {}",
            format_utc(fire_time),
            format_utc(received)
        );
        fire_times.push(fire_time);
        if fire_time > window_end {
            break;
        }
    }

    let distinct: BTreeSet<SystemTime> = fire_times.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        fire_times.len(),
        "a fire time was released twice: {:?}",
        fire_times
            .iter()
            .map(|time| format_utc(*time))
            .collect::<Vec<_>>()
    );
    for fire_time in &fire_times {
        assert!(
            on_grid(*fire_time, start, SECOND),
            "fire time {} is not a whole number of seconds after the start {}",
            format_utc(*fire_time),
            format_utc(start)
        );
    }
    let in_window: Vec<SystemTime> = fire_times
        .iter()
        .copied()
        .filter(|time| *time >= start && *time <= window_end)
        .collect();
    let expected: Vec<SystemTime> = (0..4).map(|step| start + step * SECOND).collect();
    assert_eq!(
        in_window
            .iter()
            .map(|time| format_utc(*time))
            .collect::<Vec<_>>(),
        expected
            .iter()
            .map(|time| format_utc(*time))
            .collect::<Vec<_>>(),
        "fire times in the window"
    );
    Ok(())
}

#[tokio::test]
async fn cron_fires_on_even_seconds() -> Result<()> {
    let setup = SchedulerSetup::start(&[]).await?;
    let mut broker = setup.broker.client().await?;
    let mut scheduler = setup.scheduler.client().await?;
    let mut subscription = Subscription::open(&mut broker, &[QUEUE], 100, Some(LEASE)).await?;

    let created = SystemTime::now();
    let schedule = create_schedule(
        &mut scheduler,
        "even-seconds",
        cron_recurrence("*/2 * * * * *", ""),
    )
    .await?;
    let first = next_fire_time(&schedule)?;
    assert_eq!(
        unix_nanos(first) % 2_000_000_000,
        0,
        "first fire time {} is not an even second",
        format_utc(first)
    );
    assert!(
        first + CLOCK_TOLERANCE > created && first <= created + 2 * SECOND + CLOCK_TOLERANCE,
        "first fire time {} is not the next even second after {}",
        format_utc(first),
        format_utc(created)
    );

    let deliveries = subscription.next_deliveries(3).await?;
    let mut previous = None;
    for delivery in &deliveries {
        let fire_time = check_schedule_headers(delivery, &schedule)?;
        assert_eq!(
            header(delivery, FIRE_TIME_HEADER),
            Some(format_utc(fire_time).as_str()),
            "{FIRE_TIME_HEADER} header of a whole second"
        );
        assert_eq!(
            unix_nanos(fire_time) % 2_000_000_000,
            0,
            "fire time {} is not an even second",
            format_utc(fire_time)
        );
        if let Some(previous) = previous {
            assert_eq!(
                fire_time,
                previous + 2 * SECOND,
                "fire time {} does not follow {} by 2 s",
                format_utc(fire_time),
                format_utc(previous)
            );
        }
        previous = Some(fire_time);
    }
    assert_eq!(
        delivered_fire_time(&deliveries[0])?,
        first,
        "first delivered fire time against next_fire_time at creation"
    );

    // The scheduler records a firing after the broker accepted its task, so the record of
    // the third firing may trail its delivery.
    let last = previous.expect("three deliveries were checked");
    let stored = wait_for_schedule(
        &mut scheduler,
        &schedule.id,
        "fire_count of at least 3",
        |schedule| schedule.fire_count >= 3,
    )
    .await?;
    let last_fire_time = system_time(
        stored
            .last_fire_time
            .as_ref()
            .context("no last_fire_time")?,
    );
    assert!(
        last_fire_time >= last,
        "last_fire_time {} is before the last delivered fire time {}",
        format_utc(last_fire_time),
        format_utc(last)
    );
    assert_eq!(
        format_utc(next_fire_time(&stored)?),
        format_utc(last_fire_time + 2 * SECOND),
        "next_fire_time against last_fire_time"
    );
    Ok(())
}

#[tokio::test]
async fn pause_stops_firing_until_resume() -> Result<()> {
    let setup = SchedulerSetup::start(&[]).await?;
    let mut broker = setup.broker.client().await?;
    let mut scheduler = setup.scheduler.client().await?;
    let mut subscription = Subscription::open(&mut broker, &[QUEUE], 100, Some(LEASE)).await?;

    let schedule = create_schedule(
        &mut scheduler,
        "pausable",
        interval_recurrence(SECOND, None),
    )
    .await?;
    let origin = next_fire_time(&schedule)?;
    let first = subscription.next_delivery().await?;
    check_schedule_headers(&first, &schedule)?;

    let request = PauseScheduleRequest {
        name: schedule.name.clone(),
    };
    let paused = scheduler
        .pause_schedule(request)
        .await?
        .into_inner()
        .schedule
        .context("PauseSchedule returned no schedule")?;
    let pause_returned = SystemTime::now();
    assert_eq!(paused.state(), ScheduleState::Paused, "state after pause");

    let earlier = expect_no_firing_after(&mut subscription, pause_returned, STOPPED_WATCH)
        .await
        .context("a paused schedule fired")?;
    let stored = get_schedule(&mut scheduler, &schedule.id).await?;
    assert_eq!(stored.state(), ScheduleState::Paused, "stored state");
    assert_eq!(
        stored.fire_count,
        1 + u64::try_from(earlier)?,
        "fire_count against the tasks delivered"
    );

    let resume_called = SystemTime::now();
    let request = ResumeScheduleRequest {
        name: schedule.name.clone(),
    };
    let resumed = scheduler
        .resume_schedule(request)
        .await?
        .into_inner()
        .schedule
        .context("ResumeSchedule returned no schedule")?;
    let resume_returned = SystemTime::now();
    assert_eq!(resumed.state(), ScheduleState::Active, "state after resume");

    // Fire times that passed while paused are skipped: the next one is the first on the
    // interval's grid after the call.
    let next = next_fire_time(&resumed)?;
    assert!(
        on_grid(next, origin, SECOND),
        "next fire time {} after resume is off the grid of {}",
        format_utc(next),
        format_utc(origin)
    );
    assert!(
        next + CLOCK_TOLERANCE >= resume_called && next <= resume_returned + SECOND,
        "next fire time {} is not the first after the resume at {}",
        format_utc(next),
        format_utc(resume_called)
    );
    let delivery = subscription.next_delivery().await?;
    assert_eq!(
        format_utc(check_schedule_headers(&delivery, &schedule)?),
        format_utc(next),
        "fire time of the first task after resume"
    );
    Ok(())
}

#[tokio::test]
async fn update_changes_interval_and_task() -> Result<()> {
    let setup = SchedulerSetup::start(&[]).await?;
    let mut broker = setup.broker.client().await?;
    let mut scheduler = setup.scheduler.client().await?;
    let mut subscription = Subscription::open(&mut broker, &[QUEUE], 100, Some(LEASE)).await?;

    let schedule = create_schedule(
        &mut scheduler,
        "updatable",
        interval_recurrence(SECOND, None),
    )
    .await?;
    let first = subscription.next_delivery().await?;
    check_schedule_headers(&first, &schedule)?;

    let every = 2 * SECOND;
    let update_called = SystemTime::now();
    let request = UpdateScheduleRequest {
        name: schedule.name.clone(),
        recurrence: Some(interval_recurrence(every, None)),
        task: None,
    };
    let updated = scheduler
        .update_schedule(request)
        .await?
        .into_inner()
        .schedule
        .context("UpdateSchedule returned no schedule")?;
    let update_returned = SystemTime::now();

    let rule = updated
        .recurrence
        .as_ref()
        .and_then(|recurrence| recurrence.rule.as_ref());
    let Some(recurrence::Rule::Interval(interval)) = rule else {
        panic!("rule after the update is not an interval: {rule:?}");
    };
    assert_eq!(interval.every, Some(proto_duration(every)), "new interval");
    assert_eq!(
        updated.task, schedule.task,
        "task template after an update without one"
    );
    // An unset start time means the time of the update plus the interval.
    let next = next_fire_time(&updated)?;
    assert!(
        next + CLOCK_TOLERANCE >= update_called + every
            && next <= update_returned + every + CLOCK_TOLERANCE,
        "next fire time {} is not {every:?} after the update, which ran from {} to {}",
        format_utc(next),
        format_utc(update_called),
        format_utc(update_returned)
    );

    // Tasks of fire times up to the update may still arrive. The first one after it must
    // be `next`, and the one after that `every` later.
    let mut after_update = Vec::new();
    while after_update.len() < 2 {
        let delivery = subscription.next_delivery().await?;
        let fire_time = check_schedule_headers(&delivery, &schedule)?;
        if fire_time > update_returned {
            after_update.push(fire_time);
        }
    }
    assert_eq!(
        format_utc(after_update[0]),
        format_utc(next),
        "first fire time after the update"
    );
    assert_eq!(
        format_utc(after_update[1]),
        format_utc(next + every),
        "second fire time after the update"
    );

    // A new task template alone keeps the rule.
    let request = UpdateScheduleRequest {
        name: schedule.name.clone(),
        recurrence: None,
        task: Some(new_task(QUEUE, "tick", "template-2")),
    };
    let retemplated = scheduler
        .update_schedule(request)
        .await?
        .into_inner()
        .schedule
        .context("UpdateSchedule returned no schedule")?;
    let template_returned = SystemTime::now();
    assert_eq!(
        retemplated.recurrence, updated.recurrence,
        "rule after an update without one"
    );
    loop {
        let delivery = subscription.next_delivery().await?;
        let fire_time = check_schedule_headers(&delivery, &schedule)?;
        if fire_time <= template_returned {
            continue;
        }
        let task = delivery.task.as_ref().context("delivery has no task")?;
        assert_eq!(
            &task.payload[..],
            b"template-2",
            "payload of a task released after the template update"
        );
        assert!(
            on_grid(fire_time, next, every),
            "fire time {} after the template update is off the grid of {}",
            format_utc(fire_time),
            format_utc(next)
        );
        break;
    }
    Ok(())
}

#[tokio::test]
async fn delete_stops_firing() -> Result<()> {
    let setup = SchedulerSetup::start(&[]).await?;
    let mut broker = setup.broker.client().await?;
    let mut scheduler = setup.scheduler.client().await?;
    let mut subscription = Subscription::open(&mut broker, &[QUEUE], 100, Some(LEASE)).await?;

    let schedule = create_schedule(
        &mut scheduler,
        "deletable",
        interval_recurrence(SECOND, None),
    )
    .await?;
    let first = subscription.next_delivery().await?;
    check_schedule_headers(&first, &schedule)?;
    let released_task = delivered_task_id(&first)?;

    let request = DeleteScheduleRequest {
        name: schedule.name.clone(),
    };
    scheduler.delete_schedule(request).await?;
    let delete_returned = SystemTime::now();

    expect_no_firing_after(&mut subscription, delete_returned, STOPPED_WATCH)
        .await
        .context("a deleted schedule fired")?;

    let by_name = scheduler
        .get_schedule(GetScheduleRequest {
            schedule_id: String::new(),
            name: schedule.name.clone(),
        })
        .await;
    assert_rejected(
        "GetSchedule by name after delete",
        by_name,
        Code::NotFound,
        &schedule.name,
    );
    let by_id = scheduler
        .get_schedule(GetScheduleRequest {
            schedule_id: schedule.id.clone(),
            name: String::new(),
        })
        .await;
    assert_rejected(
        "GetSchedule by id after delete",
        by_id,
        Code::NotFound,
        &schedule.id,
    );
    let again = scheduler
        .delete_schedule(DeleteScheduleRequest {
            name: schedule.name.clone(),
        })
        .await;
    assert_rejected(
        "DeleteSchedule of a deleted schedule",
        again,
        Code::NotFound,
        &schedule.name,
    );

    // Tasks the schedule released stay in the broker.
    let status = get_task(&mut broker, &released_task).await?;
    assert_eq!(
        status.state(),
        TaskState::Leased,
        "released task {released_task} after the delete"
    );
    Ok(())
}

#[tokio::test]
async fn taken_name_is_rejected() -> Result<()> {
    let setup = SchedulerSetup::start(&[]).await?;
    let mut scheduler = setup.scheduler.client().await?;

    let original = create_schedule(
        &mut scheduler,
        "nightly",
        cron_recurrence("0 0 2 * * *", "Europe/Berlin"),
    )
    .await?;
    let duplicate = create_schedule(
        &mut scheduler,
        "nightly",
        interval_recurrence(Duration::from_secs(60), None),
    )
    .await;
    assert_rejected(
        "CreateSchedule with a taken name",
        duplicate,
        Code::AlreadyExists,
        "nightly",
    );

    let stored = get_schedule_by_name(&mut scheduler, "nightly").await?;
    assert_eq!(stored, original, "schedule after the rejected create");
    Ok(())
}
