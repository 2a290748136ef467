//! SIGTERM of the scheduler: a firing in progress is recorded before the process exits 0,
//! and a firing that waits for an unreachable broker is released after the restart.

use std::time::SystemTime;

use anyhow::{Context, Result};
use docket_proto::v1::ScheduleState;
use docket_tests::{
    BrokerProcess, QUIET, SchedulerProcess, Subscription, WAIT, delivered_task_id, get_schedule,
    new_task, queue_stats, schedule_at, temp_dir, wait_for_schedule, within,
};

/// Schedules a one-shot task into `queue`, due at once, and returns the schedule id.
async fn schedule_now(scheduler: &SchedulerProcess, queue: &str) -> Result<String> {
    let mut client = scheduler.client().await?;
    let task = new_task(queue, "report", "shutdown");
    Ok(schedule_at(&mut client, task, SystemTime::now()).await?.id)
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_records_firing_in_progress() -> Result<()> {
    const QUEUE: &str = "shutdown-in-progress";
    let broker_dir = temp_dir();
    let scheduler_dir = temp_dir();
    let broker = BrokerProcess::start(broker_dir.path(), &[]).await?;
    let mut scheduler = SchedulerProcess::start(
        scheduler_dir.path(),
        &broker.endpoint(),
        &["--pause-after-enqueue", "2s"],
    )
    .await?;
    let schedule_id = schedule_now(&scheduler, QUEUE).await?;
    scheduler
        .wait_for_log("paused between enqueue and record")
        .await?;

    // SIGTERM while the task is enqueued but its firing not yet recorded.
    let status = scheduler.stop().await?;
    assert!(
        status.success(),
        "scheduler exit status after SIGTERM: {status:?}"
    );

    // The next scheduler cannot reach any broker, so a FIRED state can only come from
    // the first process, which recorded the firing before it exited.
    let restarted =
        SchedulerProcess::start_unready(scheduler_dir.path(), "http://127.0.0.1:1", &[]).await?;
    let mut client = restarted.client().await?;
    let schedule = within(WAIT, "GetSchedule after the restart", async {
        loop {
            match get_schedule(&mut client, &schedule_id).await {
                Ok(schedule) => return Ok(schedule),
                // The store may still be opening.
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
            }
        }
    })
    .await?;
    assert_eq!(
        schedule.state(),
        ScheduleState::Fired,
        "state of the schedule whose firing was in progress at SIGTERM"
    );
    assert_eq!(schedule.fire_count, 1, "fire_count after SIGTERM");
    let outcome = schedule
        .last_outcome
        .context("the fired schedule has no last_outcome")?;

    let mut broker_client = broker.client().await?;
    let stats = queue_stats(&mut broker_client, QUEUE).await?;
    assert_eq!(stats.pending, 1, "tasks released for one firing: {stats:?}");
    let mut subscription = Subscription::open(&mut broker_client, &[QUEUE], 10, None).await?;
    let delivery = subscription.next_delivery().await?;
    assert_eq!(
        delivered_task_id(&delivery)?,
        outcome.task_id,
        "the recorded task id against the task in the broker"
    );
    subscription.expect_no_delivery(QUIET).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_keeps_waiting_firing() -> Result<()> {
    const QUEUE: &str = "shutdown-broker-down";
    let broker_dir = temp_dir();
    let scheduler_dir = temp_dir();
    let mut broker = BrokerProcess::start(broker_dir.path(), &[]).await?;
    let broker_addr = broker.addr();
    let broker_endpoint = broker.endpoint();
    let mut scheduler =
        SchedulerProcess::start(scheduler_dir.path(), &broker_endpoint, &[]).await?;
    broker.kill9()?;

    let schedule_id = schedule_now(&scheduler, QUEUE).await?;
    scheduler
        .wait_for_log("cannot reach the broker; the firings wait and are retried")
        .await?;
    let status = scheduler.stop().await?;
    assert!(
        status.success(),
        "scheduler exit status after SIGTERM: {status:?}"
    );
    assert!(
        scheduler
            .stderr_output()
            .contains("the release resumes at the next start"),
        "the scheduler did not log that the waiting release resumes at the next start"
    );

    let broker = BrokerProcess::start_on(broker_addr, broker_dir.path(), &[]).await?;
    let restarted = SchedulerProcess::start(scheduler_dir.path(), &broker_endpoint, &[]).await?;
    let mut client = restarted.client().await?;
    let fired = wait_for_schedule(&mut client, &schedule_id, "state FIRED", |schedule| {
        schedule.state() == ScheduleState::Fired
    })
    .await?;

    let mut broker_client = broker.client().await?;
    let mut subscription = Subscription::open(&mut broker_client, &[QUEUE], 10, None).await?;
    let delivery = subscription.next_delivery().await?;
    assert_eq!(
        Some(delivered_task_id(&delivery)?),
        fired.last_outcome.map(|outcome| outcome.task_id),
        "the recorded task id against the task in the broker"
    );
    subscription.expect_no_delivery(QUIET).await?;
    Ok(())
}
