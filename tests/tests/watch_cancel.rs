//! WatchTask and CancelTask: a watcher receives each state change until a final state.
//! A cancelled task is not delivered again, and a worker that has it leased receives a
//! cancel notice.

use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, anyhow};
use docket_proto::v1::broker_client::BrokerClient;
use docket_proto::v1::{
    CancelTaskRequest, NegativeAcknowledgement, TaskState, TaskStatus, WatchTaskRequest,
    WatchTaskResponse,
};
use docket_tests::{
    BrokerProcess, QUIET, Subscription, WAIT, ack, ack_items, assert_rejected, delivered_task_id,
    enqueue, extend_lease, get_task, nack, nack_items, new_task, queue_stats, system_time,
    temp_dir, wait_for_state, within,
};
use tonic::transport::Channel;
use tonic::{Code, Streaming};

const QUEUE: &str = "reports";

/// A task id that is a well-formed UUIDv7 but was never issued by the broker.
const UNKNOWN_TASK_ID: &str = "0190a1b2-c3d4-7e5f-8a6b-7c8d9e0f1a2b";

async fn watch(
    client: &mut BrokerClient<Channel>,
    task_id: &str,
) -> Result<Streaming<WatchTaskResponse>, tonic::Status> {
    let request = WatchTaskRequest {
        task_id: task_id.to_string(),
    };
    Ok(client.watch_task(request).await?.into_inner())
}

/// Waits for the next status on a WatchTask stream, failing if the stream ends.
async fn next_status(stream: &mut Streaming<WatchTaskResponse>) -> Result<TaskStatus> {
    within(WAIT, "a WatchTask message", async {
        let message = stream
            .message()
            .await
            .context("WatchTask stream failed")?
            .ok_or_else(|| anyhow!("WatchTask stream ended"))?;
        message
            .status
            .ok_or_else(|| anyhow!("WatchTask message without status"))
    })
    .await
}

/// Waits for a WatchTask stream to end without another message.
async fn expect_end(stream: &mut Streaming<WatchTaskResponse>, case: &str) -> Result<()> {
    let message = within(WAIT, "the WatchTask stream to end", async {
        Ok(stream.message().await?)
    })
    .await
    .with_context(|| format!("{case}: the stream did not end cleanly"))?;
    assert!(
        message.is_none(),
        "{case}: message after the final state: {message:?}"
    );
    Ok(())
}

async fn cancel(
    client: &mut BrokerClient<Channel>,
    task_id: &str,
) -> Result<TaskState, tonic::Status> {
    let request = CancelTaskRequest {
        task_id: task_id.to_string(),
    };
    let response = client.cancel_task(request).await?.into_inner();
    Ok(response.state())
}

#[tokio::test(flavor = "multi_thread")]
async fn watch_streams_states_until_final() -> Result<()> {
    let data_dir = temp_dir();
    let broker = BrokerProcess::start(data_dir.path(), &[]).await?;
    let mut client = broker.client().await?;

    let id = enqueue(&mut client, vec![new_task(QUEUE, "build", "input")])
        .await?
        .remove(0);
    let mut watcher_client = broker.client().await?;
    let mut stream = watch(&mut watcher_client, &id).await?;
    let current = next_status(&mut stream).await?;
    assert_eq!(
        current.state(),
        TaskState::Pending,
        "first WatchTask message"
    );
    assert_eq!(
        current.task.as_ref().map(|task| task.id.as_str()),
        Some(id.as_str()),
        "task id in the first WatchTask message"
    );

    let mut subscription = Subscription::open(&mut client, &[QUEUE], 1, None).await?;
    let delivery = subscription.next_delivery().await?;
    let leased = next_status(&mut stream).await?;
    assert_eq!(
        leased.state(),
        TaskState::Leased,
        "WatchTask message after the delivery"
    );
    assert!(
        leased.lease_deadline.is_some(),
        "the LEASED status has no lease deadline"
    );

    ack(&mut client, &delivery.lease_id, "report").await?;
    let done = next_status(&mut stream).await?;
    assert_eq!(
        done.state(),
        TaskState::Succeeded,
        "WatchTask message after the Ack"
    );
    assert_eq!(&done.result[..], b"report", "result in the final status");
    expect_end(&mut stream, "watch of a succeeded task").await?;

    let states: Vec<TaskState> = done
        .state_history
        .iter()
        .map(|change| change.state())
        .collect();
    assert_eq!(
        states,
        [TaskState::Pending, TaskState::Leased, TaskState::Succeeded],
        "state history of a task run once"
    );
    let mut previous = SystemTime::UNIX_EPOCH;
    for change in &done.state_history {
        let at = system_time(
            change
                .at
                .as_ref()
                .with_context(|| format!("state change {:?} has no time", change.state()))?,
        );
        assert!(
            at >= previous,
            "state change {:?} is earlier than the one before it",
            change.state()
        );
        previous = at;
    }

    // A watch that starts on a final task returns its status and ends.
    let mut late = watch(&mut watcher_client, &id).await?;
    let status = next_status(&mut late).await?;
    assert_eq!(
        status.state(),
        TaskState::Succeeded,
        "first message of a watch on a succeeded task"
    );
    expect_end(&mut late, "watch started on a succeeded task").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_task_watch_and_cancel_rejected() -> Result<()> {
    let data_dir = temp_dir();
    let broker = BrokerProcess::start(data_dir.path(), &[]).await?;
    let mut client = broker.client().await?;

    assert_rejected(
        "WatchTask of an unknown task",
        watch(&mut client, UNKNOWN_TASK_ID).await,
        Code::NotFound,
        "",
    );
    assert_rejected(
        "WatchTask with a malformed id",
        watch(&mut client, "not-a-uuid").await,
        Code::InvalidArgument,
        "task_id",
    );
    assert_rejected(
        "CancelTask of an unknown task",
        cancel(&mut client, UNKNOWN_TASK_ID).await,
        Code::NotFound,
        "",
    );
    assert_rejected(
        "CancelTask with a malformed id",
        cancel(&mut client, "").await,
        Code::InvalidArgument,
        "task_id",
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn cancelled_pending_task_never_delivered() -> Result<()> {
    let data_dir = temp_dir();
    let broker = BrokerProcess::start(data_dir.path(), &[]).await?;
    let mut client = broker.client().await?;

    let ids = enqueue(
        &mut client,
        vec![
            new_task(QUEUE, "build", "cancelled"),
            new_task(QUEUE, "build", "kept"),
        ],
    )
    .await?;
    let state = cancel(&mut client, &ids[0]).await?;
    assert_eq!(state, TaskState::Cancelled, "CancelTask of a pending task");
    let status = get_task(&mut client, &ids[0]).await?;
    assert_eq!(status.state(), TaskState::Cancelled, "GetTask after cancel");
    assert!(
        !status.cancel_requested,
        "cancel_requested is set on a task cancelled while pending"
    );

    let mut subscription = Subscription::open(&mut client, &[QUEUE], 10, None).await?;
    let delivery = subscription.next_delivery().await?;
    assert_eq!(
        delivered_task_id(&delivery)?,
        ids[1],
        "the only delivery is the task that was not cancelled"
    );
    subscription
        .expect_no_delivery(QUIET)
        .await
        .context("a cancelled task was delivered")?;

    let stats = queue_stats(&mut client, QUEUE).await?;
    assert_eq!(stats.cancelled, 1, "cancelled count");
    assert_eq!(stats.pending, 0, "pending count");

    assert_rejected(
        "CancelTask of a cancelled task",
        cancel(&mut client, &ids[0]).await,
        Code::FailedPrecondition,
        "",
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn cancelled_retry_wait_task_never_delivered() -> Result<()> {
    let data_dir = temp_dir();
    let broker = BrokerProcess::start(
        data_dir.path(),
        &[
            "--retry-initial-backoff",
            "1s",
            "--retry-max-backoff",
            "1s",
            "--retry-jitter",
            "0",
        ],
    )
    .await?;
    let mut client = broker.client().await?;

    let mut task = new_task(QUEUE, "build", "input");
    task.max_attempts = 3;
    let id = enqueue(&mut client, vec![task]).await?.remove(0);
    let mut subscription = Subscription::open(&mut client, &[QUEUE], 1, None).await?;
    let delivery = subscription.next_delivery().await?;
    let state = nack(&mut client, &delivery.lease_id, "failure").await?;
    assert_eq!(state, TaskState::RetryWait, "Nack result state");

    let state = cancel(&mut client, &id).await?;
    assert_eq!(
        state,
        TaskState::Cancelled,
        "CancelTask of a retry-waiting task"
    );
    // Watch past the 1 s retry time.
    subscription
        .expect_no_delivery(Duration::from_millis(1500))
        .await
        .context("a cancelled retry-waiting task was delivered")?;
    let status = get_task(&mut client, &id).await?;
    assert_eq!(status.state(), TaskState::Cancelled, "GetTask after cancel");
    assert!(
        status.retry_at.is_none(),
        "a cancelled task still has a retry_at"
    );
    assert_eq!(
        status.attempts, 1,
        "finished attempts of the cancelled task"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn cancelled_leased_task_ends_on_nack() -> Result<()> {
    let data_dir = temp_dir();
    let broker = BrokerProcess::start(data_dir.path(), &[]).await?;
    let mut client = broker.client().await?;

    let mut task = new_task(QUEUE, "build", "input");
    task.max_attempts = 5;
    let id = enqueue(&mut client, vec![task]).await?.remove(0);
    let mut worker_client = broker.client().await?;
    let mut subscription = Subscription::open(&mut worker_client, &[QUEUE], 1, None).await?;
    let delivery = subscription.next_delivery().await?;

    let state = cancel(&mut client, &id).await?;
    assert_eq!(state, TaskState::Leased, "CancelTask of a leased task");
    let notice = subscription.next_cancel_notice().await?;
    assert_eq!(notice.task_id, id, "task id in the cancel notice");
    assert_eq!(
        notice.lease_id, delivery.lease_id,
        "lease id in the cancel notice"
    );

    let status = get_task(&mut client, &id).await?;
    assert_eq!(
        status.state(),
        TaskState::Leased,
        "state while the worker still holds the cancelled task"
    );
    assert!(
        status.cancel_requested,
        "GetTask does not show the requested cancellation"
    );
    let extended = extend_lease(
        &mut worker_client,
        &delivery.lease_id,
        Duration::from_secs(5),
    )
    .await
    .context("ExtendLease of a cancelled task's live lease failed")?;
    assert!(
        extended.cancel_requested,
        "ExtendLease of a cancelled task does not report cancel_requested"
    );

    let results = nack_items(
        &mut worker_client,
        vec![NegativeAcknowledgement {
            lease_id: delivery.lease_id.clone(),
            error: "stopped".to_string(),
            ..Default::default()
        }],
    )
    .await?;
    let result = docket_tests::single_result(results)?;
    assert_eq!(
        result.state(),
        TaskState::Cancelled,
        "Nack result state of a cancelled task"
    );
    assert!(
        result.cancel_requested,
        "Nack result of a cancelled task does not report cancel_requested"
    );
    let status = get_task(&mut client, &id).await?;
    assert_eq!(
        status.state(),
        TaskState::Cancelled,
        "state after the Nack of a cancelled task"
    );
    subscription
        .expect_no_delivery(QUIET)
        .await
        .context("a cancelled task was retried after its Nack")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn cancelled_leased_task_succeeds_on_ack() -> Result<()> {
    let data_dir = temp_dir();
    let broker = BrokerProcess::start(data_dir.path(), &[]).await?;
    let mut client = broker.client().await?;

    let id = enqueue(&mut client, vec![new_task(QUEUE, "build", "input")])
        .await?
        .remove(0);
    let mut worker_client = broker.client().await?;
    let mut subscription = Subscription::open(&mut worker_client, &[QUEUE], 1, None).await?;
    let delivery = subscription.next_delivery().await?;

    let state = cancel(&mut client, &id).await?;
    assert_eq!(state, TaskState::Leased, "CancelTask of a leased task");
    let notice = subscription.next_cancel_notice().await?;
    assert_eq!(notice.lease_id, delivery.lease_id, "cancel notice's lease");

    // The worker finished anyway: its Ack wins over the cancellation.
    let results = ack_items(
        &mut worker_client,
        vec![docket_proto::v1::Acknowledgement {
            lease_id: delivery.lease_id.clone(),
            result: "finished anyway".into(),
        }],
    )
    .await?;
    let result = docket_tests::single_result(results)?;
    assert_eq!(
        result.state(),
        TaskState::Succeeded,
        "Ack result state of a cancelled task"
    );
    assert!(
        result.cancel_requested,
        "Ack result of a cancelled task does not report cancel_requested"
    );
    let status = get_task(&mut client, &id).await?;
    assert_eq!(
        status.state(),
        TaskState::Succeeded,
        "state after the Ack of a cancelled task"
    );
    assert!(
        status.cancel_requested,
        "GetTask of the acked task lost cancel_requested"
    );
    assert_eq!(
        &status.result[..],
        b"finished anyway",
        "result stored by the Ack"
    );

    assert_rejected(
        "CancelTask of a succeeded task",
        cancel(&mut client, &id).await,
        Code::FailedPrecondition,
        "",
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn cancelled_lease_expiry_ends_cancelled() -> Result<()> {
    let data_dir = temp_dir();
    let broker = BrokerProcess::start(data_dir.path(), &[]).await?;
    let mut client = broker.client().await?;

    let mut task = new_task(QUEUE, "build", "input");
    task.max_attempts = 5;
    let id = enqueue(&mut client, vec![task]).await?.remove(0);
    let mut subscription =
        Subscription::open(&mut client, &[QUEUE], 1, Some(Duration::from_secs(1))).await?;
    let delivery = subscription.next_delivery().await?;
    let state = cancel(&mut client, &id).await?;
    assert_eq!(state, TaskState::Leased, "CancelTask of a leased task");

    // The worker never settles the lease, which expires after 1 s.
    let status = wait_for_state(&mut client, &id, TaskState::Cancelled).await?;
    assert_eq!(status.attempts, 1, "finished attempts after the expiry");
    subscription
        .expect_no_delivery(QUIET)
        .await
        .context("a cancelled task was retried after its lease expired")?;
    let late = ack(&mut client, &delivery.lease_id, "late").await;
    assert_rejected(
        "Ack of the expired lease of a cancelled task",
        late,
        Code::FailedPrecondition,
        "",
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn watcher_sees_cancellation_and_end() -> Result<()> {
    let data_dir = temp_dir();
    let broker = BrokerProcess::start(data_dir.path(), &[]).await?;
    let mut client = broker.client().await?;

    let id = enqueue(&mut client, vec![new_task(QUEUE, "build", "input")])
        .await?
        .remove(0);
    let mut watcher_client = broker.client().await?;
    let mut stream = watch(&mut watcher_client, &id).await?;
    let current = next_status(&mut stream).await?;
    assert_eq!(
        current.state(),
        TaskState::Pending,
        "first WatchTask message"
    );

    cancel(&mut client, &id).await?;
    let cancelled = next_status(&mut stream).await?;
    assert_eq!(
        cancelled.state(),
        TaskState::Cancelled,
        "WatchTask message after CancelTask"
    );
    let states: Vec<TaskState> = cancelled
        .state_history
        .iter()
        .map(|change| change.state())
        .collect();
    assert_eq!(
        states,
        [TaskState::Pending, TaskState::Cancelled],
        "state history of a task cancelled while pending"
    );
    expect_end(&mut stream, "watch of a cancelled task").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn cancelled_task_released_by_closed_stream() -> Result<()> {
    let data_dir = temp_dir();
    let broker = BrokerProcess::start(data_dir.path(), &[]).await?;
    let mut client = broker.client().await?;

    let mut task = new_task(QUEUE, "build", "input");
    task.max_attempts = 5;
    let id = enqueue(&mut client, vec![task]).await?.remove(0);
    let mut worker_client = broker.client().await?;
    let mut worker = Subscription::open(&mut worker_client, &[QUEUE], 1, None).await?;
    worker.next_delivery().await?;
    let state = cancel(&mut client, &id).await?;
    assert_eq!(state, TaskState::Leased, "CancelTask of a leased task");
    worker.next_cancel_notice().await?;

    // The worker stops without settling: its closed stream releases the lease.
    let mut other = Subscription::open(&mut client, &[QUEUE], 1, None).await?;
    drop(worker);
    drop(worker_client);
    let status = wait_for_state(&mut client, &id, TaskState::Cancelled).await?;
    assert_eq!(
        status.attempts, 1,
        "finished attempts after the closed stream"
    );
    other
        .expect_no_delivery(QUIET)
        .await
        .context("a cancelled task was delivered after its worker's stream closed")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_of_dead_task_rejected() -> Result<()> {
    let data_dir = temp_dir();
    let broker = BrokerProcess::start(data_dir.path(), &[]).await?;
    let mut client = broker.client().await?;

    let mut task = new_task(QUEUE, "build", "input");
    task.max_attempts = 1;
    let id = enqueue(&mut client, vec![task]).await?.remove(0);
    let mut watcher_client = broker.client().await?;
    let mut stream = watch(&mut watcher_client, &id).await?;
    let mut subscription = Subscription::open(&mut client, &[QUEUE], 1, None).await?;
    let delivery = subscription.next_delivery().await?;
    let state = nack(&mut client, &delivery.lease_id, "fatal").await?;
    assert_eq!(state, TaskState::Dead, "Nack of the only attempt");

    let mut states = Vec::new();
    loop {
        let status = next_status(&mut stream).await?;
        states.push(status.state());
        if status.state() == TaskState::Dead {
            break;
        }
        assert!(states.len() < 5, "watch did not reach DEAD: {states:?}");
    }
    assert_eq!(
        states,
        [TaskState::Pending, TaskState::Leased, TaskState::Dead],
        "states a watcher saw for a task that died on its only attempt"
    );
    expect_end(&mut stream, "watch of a dead task").await?;

    assert_rejected(
        "CancelTask of a dead task",
        cancel(&mut client, &id).await,
        Code::FailedPrecondition,
        "",
    );
    let status = get_task(&mut client, &id).await?;
    assert_eq!(
        status.state(),
        TaskState::Dead,
        "state after the rejected CancelTask"
    );
    Ok(())
}
