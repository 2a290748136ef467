//! Broker down while one-shot schedules fall due: the scheduler reports NOT_SERVING,
//! keeps the schedules ACTIVE and retries, and once the broker is back on the same address
//! it releases each task exactly once and reports SERVING again.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail, ensure};
use docket_proto::v1::ScheduleState;
use docket_tests::{
    BrokerProcess, QUIET, SCHEDULE_ID_HEADER, SCHEDULER_SERVICE, SchedulerProcess, ServingStatus,
    Subscription, ack_all_and_expect_only_them, delivered_fire_time, delivered_task_id, format_utc,
    get_schedule, get_task, header, new_task, schedule_idempotency_key, system_time, temp_dir,
    wait_for_schedule,
};
use docket_tests::{schedule_at, sleep_until, whole_second_at_or_after};

const QUEUE: &str = "broker-down";

/// Minimum time from scheduling to the first due time. The broker is killed right after
/// the schedules are created, well before they fall due.
const LEAD: Duration = Duration::from_secs(2);

/// Time the test waits past the last due time before it checks that nothing fired.
const PAST_DUE: Duration = Duration::from_secs(1);

/// Returns the first line of `stderr` that reports a retry, names one of `schedule_ids`
/// and gives the error.
fn find_retry_line<'a>(stderr: &'a str, schedule_ids: &[&str]) -> Option<&'a str> {
    stderr.lines().find(|line| {
        let lower = line.to_lowercase();
        lower.contains("retr")
            && lower.contains("error")
            && schedule_ids.iter().any(|id| line.contains(id))
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn one_shots_wait_for_broker_restart() -> Result<()> {
    let broker_dir = temp_dir();
    let scheduler_dir = temp_dir();
    let mut broker = BrokerProcess::start(broker_dir.path(), &[]).await?;
    let broker_addr = broker.addr();
    let scheduler = SchedulerProcess::start(scheduler_dir.path(), &broker.endpoint(), &[]).await?;
    let mut client = scheduler.client().await?;

    // Whole-second due times have an exact RFC 3339 form, so the fire-time header can be
    // compared for equality.
    let first_due = whole_second_at_or_after(SystemTime::now() + LEAD);
    let due_times = [first_due, first_due, first_due + Duration::from_secs(1)];
    let last_due = due_times[due_times.len() - 1];
    let mut due_by_schedule: HashMap<String, SystemTime> = HashMap::new();
    for (index, due_time) in due_times.into_iter().enumerate() {
        let task = new_task(QUEUE, "notify", format!("broker-down-{index}"));
        let schedule = schedule_at(&mut client, task, due_time).await?;
        due_by_schedule.insert(schedule.id, due_time);
    }

    broker.kill9()?;
    let killed_at = SystemTime::now();
    ensure!(
        killed_at < first_due,
        "the broker was killed at {}, after the first due time {}; the test needs it down \
         before the schedules fall due",
        format_utc(killed_at),
        format_utc(first_due)
    );

    scheduler
        .wait_for_health(ServingStatus::NotServing)
        .await
        .context("scheduler health after the broker was killed")?;
    sleep_until(last_due + PAST_DUE).await;

    for (schedule_id, due_time) in &due_by_schedule {
        let schedule = get_schedule(&mut client, schedule_id).await?;
        assert_eq!(
            schedule.state(),
            ScheduleState::Active,
            "state of schedule {schedule_id}, due at {}, while the broker is down",
            format_utc(*due_time)
        );
        let task_id = schedule
            .last_outcome
            .as_ref()
            .map(|outcome| outcome.task_id.as_str())
            .unwrap_or_default();
        assert_eq!(
            task_id, "",
            "task id of schedule {schedule_id} while the broker is down"
        );
    }
    let health = scheduler.health(SCHEDULER_SERVICE).await?;
    assert_eq!(
        health,
        ServingStatus::NotServing,
        "scheduler health while the broker is still down"
    );

    // Tasks committed after this time were released by the retries.
    let broker_restarted_at = SystemTime::now();
    let restarted = BrokerProcess::start_on(broker_addr, broker_dir.path(), &[]).await?;
    let mut broker_client = restarted.client().await?;

    let mut task_by_schedule: HashMap<String, String> = HashMap::new();
    for schedule_id in due_by_schedule.keys() {
        let schedule = wait_for_schedule(&mut client, schedule_id, "state FIRED", |schedule| {
            schedule.state() == ScheduleState::Fired
        })
        .await
        .context("after the broker restart")?;
        let outcome = schedule
            .last_outcome
            .with_context(|| format!("fired schedule {schedule_id} has no last_outcome"))?;
        task_by_schedule.insert(schedule_id.clone(), outcome.task_id);
    }
    scheduler
        .wait_for_health(ServingStatus::Serving)
        .await
        .context("scheduler health after the broker restart")?;

    let mut subscription = Subscription::open(&mut broker_client, &[QUEUE], 100, None).await?;
    let deliveries = subscription.next_deliveries(due_by_schedule.len()).await?;
    subscription
        .expect_no_delivery(QUIET)
        .await
        .context("a schedule released more than one task")?;

    let mut delivered: HashMap<String, String> = HashMap::new();
    for delivery in &deliveries {
        let task_id = delivered_task_id(delivery)?;
        let schedule_id = header(delivery, SCHEDULE_ID_HEADER)
            .with_context(|| format!("task {task_id} has no {SCHEDULE_ID_HEADER} header"))?
            .to_string();
        let Some(due_time) = due_by_schedule.get(&schedule_id) else {
            bail!("task {task_id} names schedule {schedule_id}, which the test did not create");
        };
        if let Some(earlier) = delivered.insert(schedule_id.clone(), task_id.clone()) {
            panic!("schedule {schedule_id} released two tasks: {earlier} and {task_id}");
        }
        assert_eq!(
            task_by_schedule[&schedule_id], task_id,
            "last_outcome.task_id of schedule {schedule_id} against the delivered task"
        );
        assert_eq!(
            delivered_fire_time(delivery)?,
            *due_time,
            "fire-time header of the task of schedule {schedule_id}"
        );
        let task = delivery.task.as_ref().context("delivery without a task")?;
        let created_at = system_time(
            task.created_at
                .as_ref()
                .context("task without created_at")?,
        );
        assert!(
            created_at >= broker_restarted_at,
            "the task of schedule {schedule_id} was committed at {}, before the broker \
             restarted at {}",
            format_utc(created_at),
            format_utc(broker_restarted_at)
        );
        let status = get_task(&mut broker_client, &task_id).await?;
        assert_eq!(
            status.idempotency_key,
            schedule_idempotency_key(&schedule_id, *due_time),
            "idempotency key of the task of schedule {schedule_id}"
        );
    }

    ack_all_and_expect_only_them(&mut broker_client, QUEUE, &deliveries).await?;

    let schedule_ids: Vec<&str> = due_by_schedule.keys().map(String::as_str).collect();
    let stderr = scheduler.stderr_output();
    let Some(retry_line) = find_retry_line(&stderr, &schedule_ids) else {
        panic!(
            "the scheduler logged no retry naming one of the schedules {schedule_ids:?}; \
             stderr:\n{stderr}"
        );
    };
    println!("retry logged by the scheduler: {retry_line}");
    // Each firing is logged as waiting when it is claimed or, if it falls due during the
    // outage, at the next failed attempt. A firing due after the last failed attempt is
    // released without waiting, so not every schedule needs a line.
    let waiting: Vec<&str> = stderr
        .lines()
        .filter(|line| line.contains("firing waits until the broker can be reached"))
        .collect();
    assert!(
        !waiting.is_empty(),
        "the scheduler logged no waiting firing; stderr:\n{stderr}"
    );
    for line in &waiting {
        assert!(
            schedule_ids.iter().any(|id| line.contains(id)),
            "a waiting firing names none of the schedules {schedule_ids:?}: {line}"
        );
    }
    Ok(())
}
