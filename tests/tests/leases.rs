//! Leases that end without Ack or Nack: a closed stream or an expired deadline counts as a
//! failed attempt, and the task is offered again.

use std::collections::HashSet;
use std::time::Duration;

use anyhow::{Context, Result};
use docket_proto::v1::TaskState;
use docket_tests::{
    BrokerProcess, QUIET, Subscription, ack, delivered_task_id, enqueue, get_task, nack, new_task,
    temp_dir,
};

const QUEUE: &str = "work";

#[tokio::test(flavor = "multi_thread")]
async fn closed_stream_releases_leases_to_other_worker() -> Result<()> {
    let data_dir = temp_dir();
    let broker = BrokerProcess::start(data_dir.path(), &[]).await?;
    let mut producer = broker.client().await?;

    let tasks = (0..3)
        .map(|index| new_task(QUEUE, "job", format!("task-{index}")))
        .collect();
    let ids = enqueue(&mut producer, tasks).await?;
    let expected: HashSet<String> = ids.iter().cloned().collect();

    // The first worker takes every task and holds the leases, which last 30 s by
    // default, so only the closed stream can release them within the test's wait.
    let mut first_client = broker.client().await?;
    let mut first = Subscription::open(&mut first_client, &[QUEUE], 10, None).await?;
    let held_deliveries = first.next_deliveries(3).await?;
    let held_ids: HashSet<String> = held_deliveries
        .iter()
        .map(delivered_task_id)
        .collect::<Result<_>>()?;
    assert_eq!(held_ids, expected, "the first worker received other tasks");

    let mut second_client = broker.client().await?;
    let mut second = Subscription::open(&mut second_client, &[QUEUE], 10, None).await?;
    second
        .expect_no_delivery(QUIET)
        .await
        .context("a task leased by the first worker was delivered to the second")?;

    // Dropping the stream and its connection closes the worker's HTTP/2 stream.
    drop(first);
    drop(first_client);

    let redelivered = second.next_deliveries(3).await?;
    let mut redelivered_ids = HashSet::new();
    for delivery in &redelivered {
        let task_id = delivered_task_id(delivery)?;
        assert_eq!(
            delivery.attempt, 2,
            "attempt number of task {task_id} after the first worker's stream closed"
        );
        assert!(
            redelivered_ids.insert(task_id.clone()),
            "task {task_id} was redelivered twice"
        );
    }
    assert_eq!(
        redelivered_ids, expected,
        "the second worker did not receive the released tasks"
    );

    for delivery in &redelivered {
        ack(&mut second_client, &delivery.lease_id, "done").await?;
    }
    for id in &ids {
        let status = get_task(&mut producer, id).await?;
        assert_eq!(status.state(), TaskState::Succeeded, "task {id} state");
        assert_eq!(
            status.attempts, 2,
            "task {id} attempts: the closed stream counts as one failed attempt"
        );
        assert!(
            !status.last_error.is_empty(),
            "task {id} has no last error for the attempt lost with the closed stream"
        );
    }

    for delivery in &held_deliveries {
        let status = ack(&mut producer, &delivery.lease_id, "late")
            .await
            .expect_err("Ack of a lease released by a closed stream succeeded");
        assert_eq!(
            status.code(),
            tonic::Code::FailedPrecondition,
            "Ack of a lease released by a closed stream: {status:?}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn expired_lease_rejects_late_ack() -> Result<()> {
    let data_dir = temp_dir();
    let broker = BrokerProcess::start(data_dir.path(), &[]).await?;
    let mut client = broker.client().await?;

    let mut task = new_task(QUEUE, "slow", "input");
    task.max_attempts = 3;
    let id = enqueue(&mut client, vec![task]).await?.remove(0);

    let lease = Duration::from_secs(1);
    let mut subscription = Subscription::open(&mut client, &[QUEUE], 1, Some(lease)).await?;
    let first = subscription.next_delivery().await?;
    assert_eq!(delivered_task_id(&first)?, id, "first delivery's task");
    assert_eq!(first.attempt, 1, "first delivery's attempt number");

    // The worker does not settle the first lease. After 1 s it expires and the task is
    // offered again on the same stream, whose only in-flight slot the expiry freed.
    let second = subscription
        .next_delivery()
        .await
        .context("the task was not redelivered after its 1 s lease expired")?;
    assert_eq!(delivered_task_id(&second)?, id, "redelivered task");
    assert_eq!(second.attempt, 2, "attempt number after the lease expired");
    assert_ne!(
        second.lease_id, first.lease_id,
        "the redelivery reuses the expired lease id"
    );

    let expired = get_task(&mut client, &id).await?;
    assert_eq!(
        expired.state(),
        TaskState::Leased,
        "state under the second lease"
    );
    assert_eq!(
        expired.attempts, 1,
        "finished attempts: the expired lease counts as one"
    );
    assert!(
        !expired.last_error.is_empty(),
        "no last error recorded for the expired lease"
    );

    let late_ack = ack(&mut client, &first.lease_id, "late result")
        .await
        .expect_err("Ack of an expired lease succeeded");
    assert_eq!(
        late_ack.code(),
        tonic::Code::FailedPrecondition,
        "Ack of an expired lease: {late_ack:?}"
    );
    let late_nack = nack(&mut client, &first.lease_id, "late error")
        .await
        .expect_err("Nack of an expired lease succeeded");
    assert_eq!(
        late_nack.code(),
        tonic::Code::FailedPrecondition,
        "Nack of an expired lease: {late_nack:?}"
    );

    let after_late_ack = get_task(&mut client, &id).await?;
    assert_eq!(
        after_late_ack.state(),
        TaskState::Leased,
        "state after the rejected late Ack and Nack"
    );
    assert_eq!(
        after_late_ack.attempts, 1,
        "the rejected late Ack or Nack changed the attempt count"
    );
    assert!(
        after_late_ack.result.is_empty(),
        "the rejected late Ack stored a result"
    );
    assert_eq!(
        after_late_ack.last_error, expired.last_error,
        "the rejected late Nack changed the last error"
    );

    ack(&mut client, &second.lease_id, "result").await?;
    let done = get_task(&mut client, &id).await?;
    assert_eq!(
        done.state(),
        TaskState::Succeeded,
        "state after the live Ack"
    );
    assert_eq!(done.attempts, 2, "finished attempts after the live Ack");
    assert_eq!(&done.result[..], b"result", "stored result");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn expired_last_attempt_makes_task_dead() -> Result<()> {
    let data_dir = temp_dir();
    let broker = BrokerProcess::start(data_dir.path(), &[]).await?;
    let mut client = broker.client().await?;

    let mut task = new_task(QUEUE, "slow", "input");
    task.max_attempts = 1;
    let id = enqueue(&mut client, vec![task]).await?.remove(0);

    let lease = Duration::from_secs(1);
    let mut subscription = Subscription::open(&mut client, &[QUEUE], 1, Some(lease)).await?;
    let delivery = subscription.next_delivery().await?;
    assert_eq!(delivery.attempt, 1, "first delivery's attempt number");

    let status = docket_tests::wait_for_state(&mut client, &id, TaskState::Dead).await?;
    assert_eq!(status.attempts, 1, "finished attempts of the dead task");
    assert!(
        !status.last_error.is_empty(),
        "the task died of an expired lease without a last error"
    );
    subscription
        .expect_no_delivery(QUIET)
        .await
        .context("a task dead after an expired lease was delivered again")?;
    Ok(())
}
