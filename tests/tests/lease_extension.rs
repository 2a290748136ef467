//! ExtendLease: a live lease's deadline moves, out-of-range extensions and stale leases
//! are rejected without effect, and an expired lease counts as a failed attempt.

use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use docket_proto::v1::{ExtendLeaseRequest, TaskState};
use docket_tests::{
    BrokerProcess, Subscription, ack, assert_rejected, delivered_task_id, enqueue, extend_lease,
    get_task, new_task, seconds_between, system_time, temp_dir, wait_for_state,
};
use tonic::Code;

const QUEUE: &str = "long-running";

/// Maximum lease length of the brokers in this file, so that the upper bound of an
/// extension is reachable with a small request.
const MAX_LEASE_ARGS: [&str; 2] = ["--max-lease-duration", "10s"];

#[tokio::test(flavor = "multi_thread")]
async fn extended_lease_outlives_original_deadline() -> Result<()> {
    let data_dir = temp_dir();
    let broker = BrokerProcess::start(data_dir.path(), &MAX_LEASE_ARGS).await?;
    let mut client = broker.client().await?;

    let id = enqueue(&mut client, vec![new_task(QUEUE, "slow", "input")])
        .await?
        .remove(0);
    let lease = Duration::from_secs(1);
    let mut subscription = Subscription::open(&mut client, &[QUEUE], 1, Some(lease)).await?;
    let delivery = subscription.next_delivery().await?;
    assert_eq!(delivered_task_id(&delivery)?, id, "delivered task");

    let before_extend = SystemTime::now();
    let extended = extend_lease(&mut client, &delivery.lease_id, Duration::from_secs(3)).await?;
    let deadline = system_time(
        extended
            .lease_deadline
            .as_ref()
            .context("ExtendLease returned no deadline")?,
    );
    let seconds_ahead = seconds_between(before_extend, deadline);
    assert!(
        (2.5..=4.0).contains(&seconds_ahead),
        "new deadline is {seconds_ahead:.3} s after the call, expected about 3 s"
    );
    assert!(
        !extended.cancel_requested,
        "ExtendLease reports a cancellation that nobody requested"
    );

    let status = get_task(&mut client, &id).await?;
    let stored_deadline = system_time(
        status
            .lease_deadline
            .as_ref()
            .context("GetTask of a leased task returned no lease deadline")?,
    );
    assert_eq!(
        stored_deadline, deadline,
        "GetTask's lease deadline differs from the one ExtendLease returned"
    );

    // The original 1 s lease would have expired by now, which would free the stream's
    // only in-flight slot and redeliver the task.
    subscription
        .expect_no_delivery(Duration::from_millis(1500))
        .await
        .context("the task was redelivered before its extended deadline")?;
    let status = get_task(&mut client, &id).await?;
    assert_eq!(
        status.state(),
        TaskState::Leased,
        "state 1.5 s into a lease extended to 3 s"
    );
    assert_eq!(
        status.attempts, 0,
        "finished attempts under the extended lease"
    );

    ack(&mut client, &delivery.lease_id, "done")
        .await
        .context("Ack under the extended lease failed")?;
    let status = get_task(&mut client, &id).await?;
    assert_eq!(status.state(), TaskState::Succeeded, "state after the Ack");
    assert_eq!(status.attempts, 1, "finished attempts after the Ack");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn out_of_range_extension_is_rejected() -> Result<()> {
    let data_dir = temp_dir();
    let broker = BrokerProcess::start(data_dir.path(), &MAX_LEASE_ARGS).await?;
    let mut client = broker.client().await?;

    let id = enqueue(&mut client, vec![new_task(QUEUE, "slow", "input")])
        .await?
        .remove(0);
    let mut subscription =
        Subscription::open(&mut client, &[QUEUE], 1, Some(Duration::from_secs(5))).await?;
    let delivery = subscription.next_delivery().await?;
    let original = get_task(&mut client, &id).await?;
    assert!(
        original.lease_deadline.is_some(),
        "GetTask of a leased task returned no lease deadline"
    );

    let above_max = extend_lease(&mut client, &delivery.lease_id, Duration::from_secs(11)).await;
    assert_rejected(
        "extension of 11 s above --max-lease-duration 10s",
        above_max,
        Code::InvalidArgument,
        "extension",
    );
    let below_min = extend_lease(&mut client, &delivery.lease_id, Duration::from_millis(500)).await;
    assert_rejected(
        "extension of 500 ms below the 1 s minimum",
        below_min,
        Code::InvalidArgument,
        "extension",
    );
    let missing = client
        .extend_lease(ExtendLeaseRequest {
            lease_id: delivery.lease_id.clone(),
            extension: None,
        })
        .await;
    assert_rejected(
        "ExtendLease without extension",
        missing,
        Code::InvalidArgument,
        "extension",
    );
    let negative = client
        .extend_lease(ExtendLeaseRequest {
            lease_id: delivery.lease_id.clone(),
            extension: Some(prost_types::Duration {
                seconds: -5,
                nanos: 0,
            }),
        })
        .await;
    assert_rejected(
        "negative extension",
        negative,
        Code::InvalidArgument,
        "extension",
    );

    let after = get_task(&mut client, &id).await?;
    assert_eq!(
        after.state(),
        TaskState::Leased,
        "state after rejected extensions"
    );
    assert_eq!(
        after.lease_deadline, original.lease_deadline,
        "a rejected extension moved the lease deadline"
    );

    // The maximum itself is accepted.
    let at_max = extend_lease(&mut client, &delivery.lease_id, Duration::from_secs(10)).await;
    assert!(
        at_max.is_ok(),
        "extension equal to --max-lease-duration was rejected: {at_max:?}"
    );
    ack(&mut client, &delivery.lease_id, "done").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn stale_lease_extension_changes_nothing() -> Result<()> {
    let data_dir = temp_dir();
    let broker = BrokerProcess::start(data_dir.path(), &MAX_LEASE_ARGS).await?;
    let mut client = broker.client().await?;

    let mut task = new_task(QUEUE, "slow", "input");
    task.max_attempts = 3;
    let id = enqueue(&mut client, vec![task]).await?.remove(0);

    // The first 1 s lease expires unsettled, which frees the stream's only slot, and the
    // task comes back under a second lease.
    let mut subscription =
        Subscription::open(&mut client, &[QUEUE], 1, Some(Duration::from_secs(1))).await?;
    let first = subscription.next_delivery().await?;
    let second = subscription.next_delivery().await?;
    assert_eq!(delivered_task_id(&second)?, id, "redelivered task");
    assert_eq!(second.attempt, 2, "attempt number of the redelivery");
    let before = get_task(&mut client, &id).await?;

    let expired = extend_lease(&mut client, &first.lease_id, Duration::from_secs(5)).await;
    assert_rejected(
        "ExtendLease of an expired lease",
        expired,
        Code::FailedPrecondition,
        "",
    );
    let after_expired = get_task(&mut client, &id).await?;
    assert_eq!(
        after_expired.state(),
        TaskState::Leased,
        "state after ExtendLease of the expired lease"
    );
    assert_eq!(
        after_expired.lease_deadline, before.lease_deadline,
        "ExtendLease of the expired lease moved the live lease's deadline"
    );
    assert_eq!(
        after_expired.attempts, before.attempts,
        "ExtendLease of the expired lease changed the attempt count"
    );

    ack(&mut client, &second.lease_id, "result").await?;
    let acked = get_task(&mut client, &id).await?;
    let after_ack = extend_lease(&mut client, &second.lease_id, Duration::from_secs(5)).await;
    assert_rejected(
        "ExtendLease of an acked lease",
        after_ack,
        Code::FailedPrecondition,
        "",
    );
    let unchanged = get_task(&mut client, &id).await?;
    assert_eq!(
        unchanged.state(),
        TaskState::Succeeded,
        "state after ExtendLease of its acked lease"
    );
    assert!(
        unchanged.lease_deadline.is_none(),
        "ExtendLease of an acked lease gave the task a lease deadline"
    );
    assert_eq!(
        unchanged.updated_at, acked.updated_at,
        "ExtendLease of an acked lease changed updated_at"
    );
    assert_eq!(
        unchanged.state_history.len(),
        acked.state_history.len(),
        "ExtendLease of an acked lease added a state change"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn expired_lease_records_failed_attempt() -> Result<()> {
    let data_dir = temp_dir();
    let broker = BrokerProcess::start(data_dir.path(), &MAX_LEASE_ARGS).await?;
    let mut client = broker.client().await?;

    let mut task = new_task(QUEUE, "slow", "input");
    task.max_attempts = 3;
    let id = enqueue(&mut client, vec![task]).await?.remove(0);

    let mut subscription =
        Subscription::open(&mut client, &[QUEUE], 1, Some(Duration::from_secs(1))).await?;
    let first = subscription.next_delivery().await?;
    let delivered_at = SystemTime::now();
    let second = subscription
        .next_delivery()
        .await
        .context("the task was not redelivered after its 1 s lease expired")?;
    assert_eq!(second.attempt, 2, "attempt number after the expiry");
    assert_ne!(second.lease_id, first.lease_id, "redelivery's lease id");

    let status = get_task(&mut client, &id).await?;
    assert_eq!(status.attempts, 1, "finished attempts after one expiry");
    assert_eq!(
        status.last_error, "lease expired",
        "last error after an expired lease"
    );
    assert_eq!(
        status.attempt_history.len(),
        1,
        "attempt history after one expiry: {:?}",
        status.attempt_history
    );
    let attempt = &status.attempt_history[0];
    assert_eq!(attempt.number, 1, "number of the expired attempt");
    assert_eq!(
        attempt.error, "lease expired",
        "error of the expired attempt"
    );
    let started = system_time(
        attempt
            .started_at
            .as_ref()
            .context("expired attempt has no started_at")?,
    );
    let finished = system_time(
        attempt
            .finished_at
            .as_ref()
            .context("expired attempt has no finished_at")?,
    );
    let lease_seconds = seconds_between(started, finished);
    assert!(
        lease_seconds >= 0.9,
        "the attempt finished {lease_seconds:.3} s after it started, before its 1 s lease \
         ended"
    );
    assert!(
        seconds_between(started, delivered_at) >= -1.0,
        "the attempt's started_at is later than the delivery"
    );

    ack(&mut client, &second.lease_id, "done").await?;
    let done = wait_for_state(&mut client, &id, TaskState::Succeeded).await?;
    assert_eq!(done.attempts, 2, "finished attempts after the Ack");
    assert_eq!(
        done.attempt_history.len(),
        2,
        "attempt history after the Ack"
    );
    assert!(
        done.attempt_history[1].error.is_empty(),
        "the successful attempt has an error: {:?}",
        done.attempt_history[1].error
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn extended_lease_expires_at_new_deadline() -> Result<()> {
    let data_dir = temp_dir();
    let broker = BrokerProcess::start(data_dir.path(), &MAX_LEASE_ARGS).await?;
    let mut client = broker.client().await?;

    let mut task = new_task(QUEUE, "slow", "input");
    task.max_attempts = 3;
    let id = enqueue(&mut client, vec![task]).await?.remove(0);
    let mut subscription =
        Subscription::open(&mut client, &[QUEUE], 1, Some(Duration::from_secs(1))).await?;
    let first = subscription.next_delivery().await?;

    let extended_at = tokio::time::Instant::now();
    extend_lease(&mut client, &first.lease_id, Duration::from_secs(2)).await?;

    // The worker never settles the extended lease: it expires 2 s after the extension.
    let second = subscription
        .next_delivery()
        .await
        .context("the task was not redelivered after its extended lease expired")?;
    let waited = extended_at.elapsed();
    assert!(
        waited >= Duration::from_secs(2),
        "the task was redelivered {waited:?} after a 2 s extension"
    );
    assert!(
        waited <= Duration::from_secs(5),
        "the task was redelivered {waited:?} after a 2 s extension, long after the new \
         deadline"
    );
    assert_eq!(delivered_task_id(&second)?, id, "redelivered task");
    assert_eq!(second.attempt, 2, "attempt number after the extended lease");
    let status = get_task(&mut client, &id).await?;
    assert_eq!(
        status.last_error, "lease expired",
        "last error after the extended lease expired"
    );
    Ok(())
}
