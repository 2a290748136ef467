//! Idempotent enqueue: within a queue's idempotency window a second task with the same
//! queue and key is not created, and Enqueue returns the first task's id.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use docket_proto::v1::broker_client::BrokerClient;
use docket_proto::v1::{EnqueueRequest, EnqueueResponse, NewTask, TaskState};
use docket_tests::{
    BrokerProcess, QUIET, Subscription, WAIT, ack, assert_rejected, delivered_task_id, get_task,
    new_task, queue_stats, temp_dir, within,
};
use tokio::time::Instant;
use tonic::Code;
use tonic::transport::Channel;

const QUEUE: &str = "orders";
const OTHER_QUEUE: &str = "invoices";

fn keyed_task(queue: &str, key: &str, payload: &str) -> NewTask {
    let mut task = new_task(queue, "create_order", payload.to_string());
    task.idempotency_key = key.to_string();
    task
}

async fn enqueue_response(
    client: &mut BrokerClient<Channel>,
    tasks: Vec<NewTask>,
) -> Result<EnqueueResponse> {
    let response = within(WAIT, "Enqueue", async {
        Ok(client.enqueue(EnqueueRequest { tasks }).await?)
    })
    .await?;
    Ok(response.into_inner())
}

#[tokio::test(flavor = "multi_thread")]
async fn repeated_key_returns_first_task() -> Result<()> {
    let data_dir = temp_dir();
    let broker = BrokerProcess::start(data_dir.path(), &[]).await?;
    let mut client = broker.client().await?;

    let first = enqueue_response(&mut client, vec![keyed_task(QUEUE, "order-1", "first")]).await?;
    assert_eq!(first.duplicates, [false], "duplicates of the first enqueue");
    let second =
        enqueue_response(&mut client, vec![keyed_task(QUEUE, "order-1", "second")]).await?;
    assert_eq!(
        second.duplicates,
        [true],
        "duplicates of the repeated enqueue"
    );
    assert_eq!(
        second.task_ids, first.task_ids,
        "the repeated enqueue returned another task id"
    );
    let id = first.task_ids[0].clone();

    let status = get_task(&mut client, &id).await?;
    assert_eq!(
        &status.task.as_ref().context("status without task")?.payload[..],
        b"first",
        "the repeated enqueue changed the first task's payload"
    );
    assert_eq!(
        status.idempotency_key, "order-1",
        "GetTask's idempotency key"
    );
    assert_eq!(
        queue_stats(&mut client, QUEUE).await?.pending,
        1,
        "pending tasks after two enqueues with one key"
    );

    let mut subscription = Subscription::open(&mut client, &[QUEUE], 10, None).await?;
    let delivery = subscription.next_delivery().await?;
    assert_eq!(delivered_task_id(&delivery)?, id, "delivered task");
    subscription
        .expect_no_delivery(QUIET)
        .await
        .context("a second task was delivered for one idempotency key")?;
    ack(&mut client, &delivery.lease_id, "done").await?;

    // The key still blocks a new task after the first one succeeded.
    let after_success =
        enqueue_response(&mut client, vec![keyed_task(QUEUE, "order-1", "third")]).await?;
    assert_eq!(
        after_success.duplicates,
        [true],
        "duplicates of an enqueue after the first task succeeded"
    );
    assert_eq!(
        after_success.task_ids,
        std::slice::from_ref(&id),
        "task id of an enqueue after the first task succeeded"
    );
    let status = get_task(&mut client, &id).await?;
    assert_eq!(
        status.state(),
        TaskState::Succeeded,
        "a duplicate enqueue changed the succeeded task's state"
    );
    subscription
        .expect_no_delivery(QUIET)
        .await
        .context("a duplicate of a succeeded task was delivered")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn key_is_scoped_to_its_queue() -> Result<()> {
    let data_dir = temp_dir();
    let broker = BrokerProcess::start(data_dir.path(), &[]).await?;
    let mut client = broker.client().await?;

    let in_queue = enqueue_response(&mut client, vec![keyed_task(QUEUE, "shared", "a")]).await?;
    let in_other =
        enqueue_response(&mut client, vec![keyed_task(OTHER_QUEUE, "shared", "b")]).await?;
    assert_eq!(
        in_other.duplicates,
        [false],
        "the same key in another queue is a duplicate"
    );
    assert_ne!(
        in_other.task_ids, in_queue.task_ids,
        "the same key in another queue returned the first queue's task"
    );
    let other_status = get_task(&mut client, &in_other.task_ids[0]).await?;
    assert_eq!(
        other_status
            .task
            .as_ref()
            .context("status without task")?
            .queue,
        OTHER_QUEUE,
        "queue of the task created under the shared key"
    );

    // Tasks without a key are never duplicates of each other.
    let unkeyed = enqueue_response(
        &mut client,
        vec![
            new_task(QUEUE, "create_order", "x"),
            new_task(QUEUE, "create_order", "x"),
        ],
    )
    .await?;
    assert_eq!(
        unkeyed.duplicates,
        [false, false],
        "duplicates of two tasks without a key"
    );
    assert_ne!(
        unkeyed.task_ids[0], unkeyed.task_ids[1],
        "two tasks without a key share an id"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn duplicate_within_one_batch() -> Result<()> {
    let data_dir = temp_dir();
    let broker = BrokerProcess::start(data_dir.path(), &[]).await?;
    let mut client = broker.client().await?;

    let response = enqueue_response(
        &mut client,
        vec![
            keyed_task(QUEUE, "k1", "first"),
            keyed_task(QUEUE, "k2", "other"),
            keyed_task(QUEUE, "k1", "repeat"),
            keyed_task(OTHER_QUEUE, "k1", "other queue"),
        ],
    )
    .await?;
    assert_eq!(
        response.duplicates,
        [false, false, true, false],
        "duplicates of a batch that repeats a key"
    );
    assert_eq!(
        response.task_ids.len(),
        4,
        "one task id per task in the batch"
    );
    assert_eq!(
        response.task_ids[2], response.task_ids[0],
        "the repeated key in the batch returned another id"
    );
    assert_ne!(
        response.task_ids[1], response.task_ids[0],
        "different keys share a task"
    );
    assert_ne!(
        response.task_ids[3], response.task_ids[0],
        "the same key in another queue shares a task"
    );
    let status = get_task(&mut client, &response.task_ids[0]).await?;
    assert_eq!(
        &status.task.as_ref().context("status without task")?.payload[..],
        b"first",
        "the first task of the key in the batch is the one stored"
    );
    assert_eq!(
        queue_stats(&mut client, QUEUE).await?.pending,
        2,
        "pending tasks of a batch with two distinct keys in the queue"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn key_survives_kill9_restart() -> Result<()> {
    let data_dir = temp_dir();
    let mut first_broker = BrokerProcess::start(data_dir.path(), &[]).await?;
    let mut client = first_broker.client().await?;
    let first = enqueue_response(&mut client, vec![keyed_task(QUEUE, "durable", "a")]).await?;
    assert_eq!(first.duplicates, [false], "duplicates of the first enqueue");
    drop(client);
    first_broker.kill9()?;

    let broker = BrokerProcess::start(data_dir.path(), &[]).await?;
    let mut client = broker.client().await?;
    let again = enqueue_response(&mut client, vec![keyed_task(QUEUE, "durable", "b")]).await?;
    assert_eq!(
        again.duplicates,
        [true],
        "duplicates of the enqueue after the restart"
    );
    assert_eq!(
        again.task_ids, first.task_ids,
        "task id of the enqueue after the restart"
    );
    assert_eq!(
        queue_stats(&mut client, QUEUE).await?.pending,
        1,
        "pending tasks after the restart"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn expired_window_allows_new_task() -> Result<()> {
    let data_dir = temp_dir();
    let broker = BrokerProcess::start(
        data_dir.path(),
        &["--idempotency-window", "1s", "--purge-interval", "500ms"],
    )
    .await?;
    let mut client = broker.client().await?;

    let enqueued_at = Instant::now();
    let first = enqueue_response(&mut client, vec![keyed_task(QUEUE, "short", "a")]).await?;
    assert_eq!(first.duplicates, [false], "duplicates of the first enqueue");
    let early = enqueue_response(&mut client, vec![keyed_task(QUEUE, "short", "b")]).await?;
    assert_eq!(
        early.duplicates,
        [true],
        "duplicates of an enqueue inside the 1 s window"
    );

    // Retries the enqueue until the broker creates a task; each duplicate creates none.
    let (created, elapsed) = within(WAIT, "the idempotency window to end", async {
        loop {
            let response =
                enqueue_response(&mut client, vec![keyed_task(QUEUE, "short", "c")]).await?;
            match response.duplicates.as_slice() {
                [false] => return Ok((response, enqueued_at.elapsed())),
                [true] => tokio::time::sleep(Duration::from_millis(100)).await,
                other => bail!("Enqueue of one task returned duplicates {other:?}"),
            }
        }
    })
    .await?;
    assert!(
        elapsed >= Duration::from_secs(1),
        "a new task was created {elapsed:?} after the first, inside the 1 s window"
    );
    assert_ne!(
        created.task_ids, first.task_ids,
        "the enqueue after the window returned the first task's id"
    );
    let original = get_task(&mut client, &first.task_ids[0]).await?;
    assert_eq!(
        original.state(),
        TaskState::Pending,
        "the first task after its key expired"
    );
    assert_eq!(
        queue_stats(&mut client, QUEUE).await?.pending,
        2,
        "pending tasks after the window ended"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn oversize_key_rejected() -> Result<()> {
    let data_dir = temp_dir();
    let broker = BrokerProcess::start(data_dir.path(), &[]).await?;
    let mut client = broker.client().await?;

    let at_limit = "k".repeat(256);
    let accepted = enqueue_response(&mut client, vec![keyed_task(QUEUE, &at_limit, "a")]).await;
    assert!(
        accepted.is_ok(),
        "a 256-byte key, the documented maximum, was rejected: {accepted:?}"
    );

    let cases = [
        ("257 ASCII bytes", "k".repeat(257)),
        // 129 characters, but 258 bytes: the limit counts bytes.
        ("258 bytes of two-byte characters", "é".repeat(129)),
    ];
    for (case, key) in cases {
        let result = client
            .enqueue(EnqueueRequest {
                tasks: vec![keyed_task(QUEUE, &key, "b")],
            })
            .await;
        assert_rejected(
            &format!("idempotency key of {case}"),
            result,
            Code::InvalidArgument,
            "idempotency_key",
        );
    }
    assert_eq!(
        queue_stats(&mut client, QUEUE).await?.pending,
        1,
        "pending tasks after the rejected enqueues"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn rejected_batch_stores_no_key() -> Result<()> {
    let data_dir = temp_dir();
    let broker = BrokerProcess::start(data_dir.path(), &[]).await?;
    let mut client = broker.client().await?;

    // The second task is invalid, so the batch is rejected as a whole.
    let rejected = client
        .enqueue(EnqueueRequest {
            tasks: vec![
                keyed_task(QUEUE, "atomic", "a"),
                keyed_task("bad queue name", "other", "b"),
            ],
        })
        .await;
    assert_rejected(
        "batch with an invalid queue name",
        rejected,
        Code::InvalidArgument,
        "queue",
    );
    let retried = enqueue_response(&mut client, vec![keyed_task(QUEUE, "atomic", "a")]).await?;
    assert_eq!(
        retried.duplicates,
        [false],
        "the key of a rejected batch blocked a later enqueue"
    );
    assert_eq!(
        queue_stats(&mut client, QUEUE).await?.pending,
        1,
        "pending tasks after the rejected batch and its retry"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn queue_window_setting_overrides_flag() -> Result<()> {
    let data_dir = temp_dir();
    let broker = BrokerProcess::start(data_dir.path(), &["--purge-interval", "500ms"]).await?;
    let mut client = broker.client().await?;

    client
        .update_queue_settings(docket_proto::v1::UpdateQueueSettingsRequest {
            queue: QUEUE.to_string(),
            settings: Some(docket_proto::v1::QueueSettings {
                idempotency_window: Some(docket_tests::proto_duration(Duration::from_secs(1))),
                ..Default::default()
            }),
        })
        .await?;

    let enqueued_at = Instant::now();
    let first = enqueue_response(&mut client, vec![keyed_task(QUEUE, "brief", "a")]).await?;
    let other = enqueue_response(&mut client, vec![keyed_task(OTHER_QUEUE, "brief", "a")]).await?;
    let (created, elapsed) = within(WAIT, "the queue's 1 s idempotency window to end", async {
        loop {
            let response =
                enqueue_response(&mut client, vec![keyed_task(QUEUE, "brief", "b")]).await?;
            match response.duplicates.as_slice() {
                [false] => return Ok((response, enqueued_at.elapsed())),
                [true] => tokio::time::sleep(Duration::from_millis(100)).await,
                other => bail!("Enqueue of one task returned duplicates {other:?}"),
            }
        }
    })
    .await?;
    assert!(
        elapsed >= Duration::from_secs(1),
        "a new task was created {elapsed:?} after the first, inside the 1 s window"
    );
    assert_ne!(
        created.task_ids, first.task_ids,
        "the enqueue after the window returned the first task's id"
    );

    // The other queue keeps the broker's 24 h window.
    let again = enqueue_response(&mut client, vec![keyed_task(OTHER_QUEUE, "brief", "b")]).await?;
    assert_eq!(
        again.duplicates,
        [true],
        "a queue without its own window lost the key after 1 s"
    );
    assert_eq!(
        again.task_ids, other.task_ids,
        "task id in the queue with the default window"
    );
    Ok(())
}
