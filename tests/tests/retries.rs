//! Nack and dead-lettering: a task is offered again until it has used its maximum
//! attempts, then it is DEAD with its last error.

use anyhow::{Context, Result};
use docket_proto::v1::TaskState;
use docket_tests::{
    BrokerProcess, QUIET, Subscription, delivered_task_id, enqueue, get_task, nack, new_task,
    temp_dir,
};

const QUEUE: &str = "jobs";

#[tokio::test(flavor = "multi_thread")]
async fn nacked_task_dies_after_max_attempts() -> Result<()> {
    let data_dir = temp_dir();
    let broker = BrokerProcess::start(data_dir.path(), &[]).await?;
    let mut client = broker.client().await?;

    let max_attempts = 3;
    let mut task = new_task(QUEUE, "flaky", "input");
    task.max_attempts = max_attempts;
    let id = enqueue(&mut client, vec![task]).await?.remove(0);

    let mut subscription = Subscription::open(&mut client, &[QUEUE], 1, None).await?;
    for attempt in 1..=max_attempts {
        let delivery = subscription
            .next_delivery()
            .await
            .with_context(|| format!("waiting for attempt {attempt}"))?;
        assert_eq!(delivered_task_id(&delivery)?, id, "delivered task id");
        assert_eq!(delivery.attempt, attempt, "delivery's attempt number");

        let error = format!("failure {attempt}");
        let state = nack(&mut client, &delivery.lease_id, &error).await?;
        let expected_state = if attempt < max_attempts {
            TaskState::Pending
        } else {
            TaskState::Dead
        };
        assert_eq!(
            state, expected_state,
            "Nack of attempt {attempt} of {max_attempts} returned the wrong state"
        );

        let status = get_task(&mut client, &id).await?;
        assert_eq!(
            status.attempts, attempt,
            "finished attempts after Nack of attempt {attempt}"
        );
        assert_eq!(
            status.last_error, error,
            "last error after Nack of attempt {attempt}"
        );
    }

    subscription
        .expect_no_delivery(QUIET)
        .await
        .context("a DEAD task was delivered again")?;

    let status = get_task(&mut client, &id).await?;
    assert_eq!(
        status.state(),
        TaskState::Dead,
        "state after the last attempt"
    );
    assert_eq!(
        status.attempts, max_attempts,
        "finished attempts of the dead task"
    );
    assert_eq!(
        status.last_error,
        format!("failure {max_attempts}"),
        "the dead task keeps the error of its last attempt"
    );
    assert!(status.result.is_empty(), "a dead task has a result");
    assert!(
        status.lease_deadline.is_none(),
        "a dead task still has a lease deadline"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn zero_max_attempts_takes_broker_default() -> Result<()> {
    let data_dir = temp_dir();
    let broker = BrokerProcess::start(data_dir.path(), &["--default-max-attempts", "2"]).await?;
    let mut client = broker.client().await?;

    let task = new_task(QUEUE, "flaky", "input");
    assert_eq!(
        task.max_attempts, 0,
        "the test task must ask for the default"
    );
    let id = enqueue(&mut client, vec![task]).await?.remove(0);

    let mut subscription = Subscription::open(&mut client, &[QUEUE], 1, None).await?;
    let first = subscription.next_delivery().await?;
    let delivered = first.task.clone().context("delivery without a task")?;
    assert_eq!(
        delivered.max_attempts, 2,
        "max_attempts of a task enqueued with 0 under --default-max-attempts 2"
    );
    let state = nack(&mut client, &first.lease_id, "first failure").await?;
    assert_eq!(
        state,
        TaskState::Pending,
        "state after the first of 2 attempts"
    );

    let second = subscription.next_delivery().await?;
    assert_eq!(second.attempt, 2, "attempt number of the second delivery");
    let state = nack(&mut client, &second.lease_id, "second failure").await?;
    assert_eq!(
        state,
        TaskState::Dead,
        "state after the second of 2 attempts"
    );

    let status = get_task(&mut client, &id).await?;
    assert_eq!(status.state(), TaskState::Dead, "final state");
    assert_eq!(status.attempts, 2, "finished attempts");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn nack_then_ack_succeeds_on_retry() -> Result<()> {
    let data_dir = temp_dir();
    let broker = BrokerProcess::start(data_dir.path(), &[]).await?;
    let mut client = broker.client().await?;

    let mut task = new_task(QUEUE, "flaky", "input");
    task.max_attempts = 5;
    let id = enqueue(&mut client, vec![task]).await?.remove(0);

    let mut subscription = Subscription::open(&mut client, &[QUEUE], 1, None).await?;
    let first = subscription.next_delivery().await?;
    let state = nack(&mut client, &first.lease_id, "temporary failure").await?;
    assert_eq!(
        state,
        TaskState::Pending,
        "state after the first failed attempt"
    );

    let late_nack = nack(&mut client, &first.lease_id, "again").await;
    let status = late_nack.expect_err("a second Nack of a settled lease succeeded");
    assert_eq!(
        status.code(),
        tonic::Code::FailedPrecondition,
        "second Nack of a settled lease: {status:?}"
    );

    let second = subscription.next_delivery().await?;
    assert_eq!(second.attempt, 2, "attempt number of the retry");
    assert_ne!(
        second.lease_id, first.lease_id,
        "the retry reuses the first lease id"
    );
    docket_tests::ack(&mut client, &second.lease_id, "ok").await?;

    let status = get_task(&mut client, &id).await?;
    assert_eq!(
        status.state(),
        TaskState::Succeeded,
        "state after the retry's Ack"
    );
    assert_eq!(status.attempts, 2, "finished attempts");
    assert_eq!(
        status.last_error, "temporary failure",
        "last error keeps the failed attempt's error after success"
    );
    assert_eq!(&status.result[..], b"ok", "stored result");
    Ok(())
}
