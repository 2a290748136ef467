//! SIGKILL with tasks in the newer states: a retry wait and a cancellation request are
//! stored, and a restarted broker honours them.

use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use docket_proto::v1::{CancelTaskRequest, TaskState};
use docket_tests::{
    BrokerProcess, QUIET, Subscription, delivered_task_id, enqueue, get_task, nack, new_task,
    queue_stats, seconds_between, system_time, temp_dir,
};

const QUEUE: &str = "durable";

/// A fixed 2 s backoff, long enough to kill and restart the broker inside it.
const BACKOFF_ARGS: [&str; 6] = [
    "--retry-initial-backoff",
    "2s",
    "--retry-max-backoff",
    "2s",
    "--retry-jitter",
    "0",
];

/// Tolerance for a delivery that arrives just before `retry_at`: timestamps are stored
/// with millisecond or microsecond precision, so a delivery at the same instant may
/// compare a fraction of a millisecond early.
const ROUNDING_SECONDS: f64 = 0.002;

#[tokio::test(flavor = "multi_thread")]
async fn retry_wait_survives_kill9() -> Result<()> {
    let data_dir = temp_dir();
    let mut first = BrokerProcess::start(data_dir.path(), &BACKOFF_ARGS).await?;
    let mut client = first.client().await?;

    let mut task = new_task(QUEUE, "job", "input");
    task.max_attempts = 3;
    let id = enqueue(&mut client, vec![task]).await?.remove(0);
    let mut subscription = Subscription::open(&mut client, &[QUEUE], 1, None).await?;
    let delivery = subscription.next_delivery().await?;
    let state = nack(&mut client, &delivery.lease_id, "failure before the crash").await?;
    assert_eq!(state, TaskState::RetryWait, "Nack result state");
    let waiting = get_task(&mut client, &id).await?;
    let retry_at = waiting
        .retry_at
        .context("a RETRY_WAIT task has no retry_at")?;
    drop(subscription);
    drop(client);
    first.kill9()?;

    let broker = BrokerProcess::start(data_dir.path(), &BACKOFF_ARGS).await?;
    let mut client = broker.client().await?;
    let restored = get_task(&mut client, &id).await?;
    assert_eq!(
        restored.state(),
        TaskState::RetryWait,
        "state after the restart"
    );
    assert_eq!(
        restored.retry_at,
        Some(retry_at),
        "retry_at after the restart"
    );
    assert_eq!(restored.attempts, 1, "finished attempts after the restart");
    assert_eq!(
        queue_stats(&mut client, QUEUE).await?.retry_wait,
        1,
        "retry_wait count after the restart"
    );

    let mut subscription = Subscription::open(&mut client, &[QUEUE], 1, None).await?;
    let retry_time = system_time(&retry_at);
    let quiet_until = retry_time - Duration::from_millis(200);
    if let Ok(quiet) = quiet_until.duration_since(SystemTime::now()) {
        subscription
            .expect_no_delivery(quiet)
            .await
            .context("the task was delivered before its retry_at after the restart")?;
    }
    let retried = subscription
        .next_delivery()
        .await
        .context("the retry-waiting task was not delivered after the restart")?;
    let early = seconds_between(SystemTime::now(), retry_time);
    assert!(
        early <= ROUNDING_SECONDS,
        "the task was delivered {early:.3} s before its retry_at"
    );
    assert_eq!(
        delivered_task_id(&retried)?,
        id,
        "task delivered after restart"
    );
    assert_eq!(retried.attempt, 2, "attempt number after the restart");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_request_survives_kill9() -> Result<()> {
    let data_dir = temp_dir();
    let mut first = BrokerProcess::start(data_dir.path(), &[]).await?;
    let mut client = first.client().await?;

    let mut task = new_task(QUEUE, "job", "input");
    task.max_attempts = 5;
    let id = enqueue(&mut client, vec![task]).await?.remove(0);
    let mut worker_client = first.client().await?;
    let mut subscription = Subscription::open(&mut worker_client, &[QUEUE], 1, None).await?;
    let delivery = subscription.next_delivery().await?;
    assert_eq!(delivered_task_id(&delivery)?, id, "delivered task");

    let state = client
        .cancel_task(CancelTaskRequest {
            task_id: id.clone(),
        })
        .await?
        .into_inner()
        .state();
    assert_eq!(state, TaskState::Leased, "CancelTask of a leased task");
    drop(subscription);
    drop(worker_client);
    drop(client);
    first.kill9()?;

    let broker = BrokerProcess::start(data_dir.path(), &[]).await?;
    let mut client = broker.client().await?;
    let restored = get_task(&mut client, &id).await?;
    assert_eq!(
        restored.state(),
        TaskState::Cancelled,
        "state after a restart of a task cancelled while leased"
    );
    assert!(
        restored.cancel_requested,
        "cancel_requested lost in the restart"
    );

    let mut subscription = Subscription::open(&mut client, &[QUEUE], 1, None).await?;
    subscription
        .expect_no_delivery(QUIET)
        .await
        .context("a task cancelled before the crash was delivered after the restart")?;
    let stats = queue_stats(&mut client, QUEUE).await?;
    assert_eq!(stats.cancelled, 1, "cancelled count after the restart");
    assert_eq!(stats.pending, 0, "pending count after the restart");
    assert_eq!(stats.leased, 0, "leased count after the restart");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn retry_time_passed_while_down_delivers() -> Result<()> {
    let args = [
        "--retry-initial-backoff",
        "500ms",
        "--retry-max-backoff",
        "500ms",
        "--retry-jitter",
        "0",
    ];
    let data_dir = temp_dir();
    let mut first = BrokerProcess::start(data_dir.path(), &args).await?;
    let mut client = first.client().await?;

    let mut task = new_task(QUEUE, "job", "input");
    task.max_attempts = 3;
    let id = enqueue(&mut client, vec![task]).await?.remove(0);
    let mut subscription = Subscription::open(&mut client, &[QUEUE], 1, None).await?;
    let delivery = subscription.next_delivery().await?;
    let state = nack(&mut client, &delivery.lease_id, "failure before the crash").await?;
    assert_eq!(state, TaskState::RetryWait, "Nack result state");
    drop(subscription);
    drop(client);
    first.kill9()?;

    // The retry time passes while no broker runs.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let broker = BrokerProcess::start(data_dir.path(), &args).await?;
    let mut client = broker.client().await?;
    let mut subscription = Subscription::open(&mut client, &[QUEUE], 1, None).await?;
    let retried = subscription
        .next_delivery()
        .await
        .context("a task whose retry time passed during the outage was not delivered")?;
    assert_eq!(
        delivered_task_id(&retried)?,
        id,
        "task delivered after restart"
    );
    assert_eq!(retried.attempt, 2, "attempt number after the restart");
    Ok(())
}
