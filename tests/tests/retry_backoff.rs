//! Retry backoff: a nacked task waits in RETRY_WAIT for its policy's delay before it is
//! delivered again, and per-task policies, Nack delays and `no_retry` change that wait.

use std::time::Duration;

use anyhow::{Context, Result};
use docket_proto::v1::broker_client::BrokerClient;
use docket_proto::v1::{NegativeAcknowledgement, RetryPolicy, SettleResult, TaskState, TaskStatus};
use docket_tests::{
    BrokerProcess, QUIET, Subscription, ack, delivered_task_id, enqueue, get_task, nack_items,
    new_task, proto_duration, seconds_between, single_result, system_time, temp_dir,
};
use tokio::time::Instant;
use tonic::transport::Channel;

const QUEUE: &str = "flaky";

/// Broker default policy: 1 s, then 2 s, 4 s and so on up to 10 s, without jitter.
const DEFAULT_POLICY_ARGS: [&str; 8] = [
    "--retry-initial-backoff",
    "1s",
    "--retry-multiplier",
    "2",
    "--retry-max-backoff",
    "10s",
    "--retry-jitter",
    "0",
];

/// Broker default policy of 10 s between attempts, so long that a redelivery within the
/// test's bounds shows that something else set the delay.
const SLOW_DEFAULT_ARGS: [&str; 6] = [
    "--retry-initial-backoff",
    "10s",
    "--retry-max-backoff",
    "10s",
    "--retry-jitter",
    "0",
];

/// Slack on a delay computed by the broker: the difference between the two clock
/// readings it takes while settling one lease.
const CLOCK_SLACK_SECONDS: f64 = 0.1;

/// Slack on "delivered within": the broker's timer, the stream and a shared machine.
const LATE_DELIVERY_SLACK: Duration = Duration::from_secs(3);

/// Fails the attempt under `lease_id` with `nack` settings and returns its result.
async fn nack_one(
    client: &mut BrokerClient<Channel>,
    lease_id: &str,
    error: &str,
    retry_delay: Option<Duration>,
    no_retry: bool,
) -> Result<SettleResult> {
    let results = nack_items(
        client,
        vec![NegativeAcknowledgement {
            lease_id: lease_id.to_string(),
            error: error.to_string(),
            retry_delay: retry_delay.map(proto_duration),
            no_retry,
            release: false,
        }],
    )
    .await?;
    Ok(single_result(results)?)
}

/// Returns the seconds between the end of the task's last attempt and its `retry_at`,
/// the delay the broker chose.
fn chosen_delay(status: &TaskStatus) -> Result<f64> {
    let retry_at = status
        .retry_at
        .as_ref()
        .context("a RETRY_WAIT task has no retry_at")?;
    let finished_at = status
        .attempt_history
        .last()
        .and_then(|attempt| attempt.finished_at.as_ref())
        .context("a failed task has no finished attempt")?;
    Ok(seconds_between(
        system_time(finished_at),
        system_time(retry_at),
    ))
}

/// Asserts that the broker chose a delay of `expected` seconds.
fn assert_delay(case: &str, status: &TaskStatus, expected: f64) -> Result<()> {
    let delay = chosen_delay(status)?;
    assert!(
        (delay - expected).abs() <= CLOCK_SLACK_SECONDS,
        "{case}: retry_at is {delay:.3} s after the failed attempt, expected {expected} s"
    );
    Ok(())
}

/// Waits for the next delivery and checks that it arrived no sooner than `min_wait` and
/// no later than `min_wait` plus [`LATE_DELIVERY_SLACK`] after `since`.
async fn expect_delivery_after(
    subscription: &mut Subscription,
    since: Instant,
    min_wait: Duration,
    case: &str,
) -> Result<docket_proto::v1::Delivery> {
    let delivery = subscription
        .next_delivery()
        .await
        .with_context(|| format!("{case}: no redelivery"))?;
    let waited = since.elapsed();
    assert!(
        waited >= min_wait,
        "{case}: delivered after {waited:?}, before the {min_wait:?} backoff ended"
    );
    assert!(
        waited <= min_wait + LATE_DELIVERY_SLACK,
        "{case}: delivered after {waited:?}, long after the {min_wait:?} backoff ended"
    );
    Ok(delivery)
}

#[tokio::test(flavor = "multi_thread")]
async fn default_backoff_doubles_per_failure() -> Result<()> {
    let data_dir = temp_dir();
    let broker = BrokerProcess::start(data_dir.path(), &DEFAULT_POLICY_ARGS).await?;
    let mut client = broker.client().await?;

    let mut task = new_task(QUEUE, "flaky", "input");
    task.max_attempts = 3;
    let id = enqueue(&mut client, vec![task]).await?.remove(0);
    let mut subscription = Subscription::open(&mut client, &[QUEUE], 1, None).await?;

    let first = subscription.next_delivery().await?;
    assert_eq!(first.attempt, 1, "first delivery's attempt number");
    let first_failed = Instant::now();
    let result = nack_one(&mut client, &first.lease_id, "failure 1", None, false).await?;
    assert_eq!(
        result.state(),
        TaskState::RetryWait,
        "Nack result state after attempt 1 of 3"
    );
    let waiting = get_task(&mut client, &id).await?;
    assert_eq!(
        waiting.state(),
        TaskState::RetryWait,
        "state after the first failure"
    );
    assert!(
        waiting.lease_deadline.is_none(),
        "a RETRY_WAIT task has a lease deadline"
    );
    assert_delay("first failure", &waiting, 1.0)?;

    let second = expect_delivery_after(
        &mut subscription,
        first_failed,
        Duration::from_secs(1),
        "after the first failure",
    )
    .await?;
    assert_eq!(delivered_task_id(&second)?, id, "redelivered task");
    assert_eq!(second.attempt, 2, "attempt number after the first backoff");

    let second_failed = Instant::now();
    let result = nack_one(&mut client, &second.lease_id, "failure 2", None, false).await?;
    assert_eq!(
        result.state(),
        TaskState::RetryWait,
        "Nack result state after attempt 2 of 3"
    );
    let waiting = get_task(&mut client, &id).await?;
    assert_delay("second failure", &waiting, 2.0)?;
    let third = expect_delivery_after(
        &mut subscription,
        second_failed,
        Duration::from_secs(2),
        "after the second failure",
    )
    .await?;
    assert_eq!(third.attempt, 3, "attempt number after the second backoff");

    let result = nack_one(&mut client, &third.lease_id, "failure 3", None, false).await?;
    assert_eq!(
        result.state(),
        TaskState::Dead,
        "Nack result state after the last attempt"
    );
    let dead = get_task(&mut client, &id).await?;
    assert_eq!(
        dead.state(),
        TaskState::Dead,
        "state after the last attempt"
    );
    assert!(dead.retry_at.is_none(), "a DEAD task has a retry_at");
    subscription
        .expect_no_delivery(QUIET)
        .await
        .context("a DEAD task was delivered again")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn task_policy_overrides_broker_default() -> Result<()> {
    let data_dir = temp_dir();
    let broker = BrokerProcess::start(data_dir.path(), &SLOW_DEFAULT_ARGS).await?;
    let mut client = broker.client().await?;

    let policy = RetryPolicy {
        initial_backoff: Some(proto_duration(Duration::from_millis(300))),
        multiplier: 2.0,
        max_backoff: Some(proto_duration(Duration::from_millis(500))),
        jitter: 0.0,
    };
    let mut task = new_task(QUEUE, "flaky", "input");
    task.max_attempts = 4;
    task.retry_policy = Some(policy);
    let id = enqueue(&mut client, vec![task]).await?.remove(0);

    let stored = get_task(&mut client, &id).await?;
    assert_eq!(
        stored.retry_policy,
        Some(policy),
        "GetTask's retry policy differs from the one given at enqueue"
    );

    let mut subscription = Subscription::open(&mut client, &[QUEUE], 1, None).await?;
    let mut delivery = subscription.next_delivery().await?;
    // Delays: 300 ms, then 600 ms capped at the 500 ms maximum, then 500 ms again.
    for (failure, delay_ms) in [(1, 300_u32), (2, 500), (3, 500)] {
        let failed = Instant::now();
        let error = format!("failure {failure}");
        let result = nack_one(&mut client, &delivery.lease_id, &error, None, false).await?;
        assert_eq!(
            result.state(),
            TaskState::RetryWait,
            "Nack result state after failure {failure}"
        );
        let waiting = get_task(&mut client, &id).await?;
        assert_delay(
            &format!("failure {failure} under the task's policy"),
            &waiting,
            f64::from(delay_ms) / 1000.0,
        )?;
        delivery = expect_delivery_after(
            &mut subscription,
            failed,
            Duration::from_millis(u64::from(delay_ms)),
            &format!("after failure {failure} under the task's policy"),
        )
        .await?;
        assert_eq!(
            delivery.attempt,
            failure + 1,
            "attempt number after failure {failure}"
        );
    }
    ack(&mut client, &delivery.lease_id, "done").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn nack_retry_delay_overrides_policy() -> Result<()> {
    let data_dir = temp_dir();
    let broker = BrokerProcess::start(data_dir.path(), &SLOW_DEFAULT_ARGS).await?;
    let mut client = broker.client().await?;

    let mut task = new_task(QUEUE, "flaky", "input");
    task.max_attempts = 3;
    task.retry_policy = Some(RetryPolicy {
        initial_backoff: Some(proto_duration(Duration::from_secs(20))),
        multiplier: 1.0,
        max_backoff: Some(proto_duration(Duration::from_secs(20))),
        jitter: 0.0,
    });
    let id = enqueue(&mut client, vec![task]).await?.remove(0);
    let mut subscription = Subscription::open(&mut client, &[QUEUE], 1, None).await?;

    let first = subscription.next_delivery().await?;
    let failed = Instant::now();
    let result = nack_one(
        &mut client,
        &first.lease_id,
        "try again soon",
        Some(Duration::from_millis(400)),
        false,
    )
    .await?;
    assert_eq!(
        result.state(),
        TaskState::RetryWait,
        "Nack result state with retry_delay"
    );
    let waiting = get_task(&mut client, &id).await?;
    assert_delay("Nack with retry_delay 400 ms", &waiting, 0.4)?;

    let second = expect_delivery_after(
        &mut subscription,
        failed,
        Duration::from_millis(400),
        "after a Nack with retry_delay 400 ms",
    )
    .await?;
    assert_eq!(second.attempt, 2, "attempt number after the Nack's delay");

    // Without retry_delay the task's own 20 s policy applies again.
    let result = nack_one(&mut client, &second.lease_id, "slow retry", None, false).await?;
    assert_eq!(
        result.state(),
        TaskState::RetryWait,
        "Nack result state without retry_delay"
    );
    let waiting = get_task(&mut client, &id).await?;
    assert_delay("Nack without retry_delay", &waiting, 20.0)?;
    subscription
        .expect_no_delivery(QUIET)
        .await
        .context("a task waiting out a 20 s backoff was delivered")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn no_retry_nack_dead_letters_at_once() -> Result<()> {
    let data_dir = temp_dir();
    let broker = BrokerProcess::start(data_dir.path(), &DEFAULT_POLICY_ARGS).await?;
    let mut client = broker.client().await?;

    let mut task = new_task(QUEUE, "flaky", "input");
    task.max_attempts = 5;
    let id = enqueue(&mut client, vec![task]).await?.remove(0);
    let mut subscription = Subscription::open(&mut client, &[QUEUE], 1, None).await?;

    let delivery = subscription.next_delivery().await?;
    let result = nack_one(&mut client, &delivery.lease_id, "fatal", None, true).await?;
    assert_eq!(
        result.state(),
        TaskState::Dead,
        "Nack result state with no_retry"
    );

    let dead = get_task(&mut client, &id).await?;
    assert_eq!(dead.state(), TaskState::Dead, "state after no_retry");
    assert_eq!(dead.attempts, 1, "finished attempts after no_retry");
    assert_eq!(dead.last_error, "fatal", "last error after no_retry");
    assert!(dead.retry_at.is_none(), "a DEAD task has a retry_at");
    subscription
        .expect_no_delivery(Duration::from_millis(1500))
        .await
        .context("a task dead-lettered with no_retry was delivered again")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn jitter_shortens_delay_within_bounds() -> Result<()> {
    let data_dir = temp_dir();
    let broker = BrokerProcess::start(data_dir.path(), &SLOW_DEFAULT_ARGS).await?;
    let mut client = broker.client().await?;

    const TASKS: usize = 8;
    let tasks = (0..TASKS)
        .map(|index| {
            let mut task = new_task(QUEUE, "flaky", format!("task-{index}"));
            task.max_attempts = 2;
            task.retry_policy = Some(RetryPolicy {
                initial_backoff: Some(proto_duration(Duration::from_secs(4))),
                multiplier: 2.0,
                max_backoff: Some(proto_duration(Duration::from_secs(8))),
                jitter: 0.5,
            });
            task
        })
        .collect();
    let ids = enqueue(&mut client, tasks).await?;
    let mut subscription = Subscription::open(&mut client, &[QUEUE], 100, None).await?;
    let deliveries = subscription.next_deliveries(TASKS).await?;
    for delivery in &deliveries {
        let result = nack_one(&mut client, &delivery.lease_id, "failure", None, false).await?;
        assert_eq!(
            result.state(),
            TaskState::RetryWait,
            "Nack result state with a 4 s backoff"
        );
    }

    // Jitter 0.5 shortens the 4 s delay by up to half: each delay is 2 s to 4 s.
    let mut delays = Vec::with_capacity(TASKS);
    for id in &ids {
        let status = get_task(&mut client, id).await?;
        let delay = chosen_delay(&status)?;
        assert!(
            delay >= 2.0 - CLOCK_SLACK_SECONDS,
            "task {id}: jittered delay {delay:.3} s is below 2 s"
        );
        assert!(
            delay <= 4.0 + CLOCK_SLACK_SECONDS,
            "task {id}: jittered delay {delay:.3} s is above 4 s"
        );
        delays.push(delay);
    }
    let spread = delays.iter().cloned().fold(f64::MIN, f64::max)
        - delays.iter().cloned().fold(f64::MAX, f64::min);
    assert!(
        spread > 0.01,
        "{TASKS} jittered delays are all equal: {delays:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn zero_retry_delay_makes_task_pending() -> Result<()> {
    let data_dir = temp_dir();
    let broker = BrokerProcess::start(data_dir.path(), &SLOW_DEFAULT_ARGS).await?;
    let mut client = broker.client().await?;

    let mut task = new_task(QUEUE, "flaky", "input");
    task.max_attempts = 2;
    let id = enqueue(&mut client, vec![task]).await?.remove(0);
    let mut subscription = Subscription::open(&mut client, &[QUEUE], 1, None).await?;

    // A retry_delay of zero is set, so it overrides the 10 s default.
    let first = subscription.next_delivery().await?;
    let failed = Instant::now();
    let result = nack_one(
        &mut client,
        &first.lease_id,
        "retry now",
        Some(Duration::ZERO),
        false,
    )
    .await?;
    assert_eq!(
        result.state(),
        TaskState::Pending,
        "Nack result state with retry_delay 0"
    );
    let second = expect_delivery_after(
        &mut subscription,
        failed,
        Duration::ZERO,
        "after a Nack with retry_delay 0",
    )
    .await?;
    assert_eq!(delivered_task_id(&second)?, id, "redelivered task");

    // On the last attempt a retry_delay cannot buy another attempt.
    let result = nack_one(
        &mut client,
        &second.lease_id,
        "last failure",
        Some(Duration::from_millis(300)),
        false,
    )
    .await?;
    assert_eq!(
        result.state(),
        TaskState::Dead,
        "Nack result state of the last attempt with retry_delay"
    );
    let dead = get_task(&mut client, &id).await?;
    assert_eq!(
        dead.state(),
        TaskState::Dead,
        "state after the last attempt"
    );
    subscription
        .expect_no_delivery(Duration::from_millis(800))
        .await
        .context("a task dead after its last attempt was delivered again")?;
    Ok(())
}
