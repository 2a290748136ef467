//! Enqueue, Subscribe and Ack: the normal path of a task.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use docket_proto::SUBSCRIPTION_ID_HEADER;
use docket_proto::v1::subscribe_response::Event;
use docket_proto::v1::{
    NegativeAcknowledgement, NewTask, StopDeliveriesRequest, SubscribeRequest, TaskState,
};
use docket_tests::{
    BrokerProcess, QUIET, Subscription, WAIT, ack, assert_rejected, delivered_task_id, enqueue,
    get_task, nack_items, new_task, proto_duration, queue_stats, single_result, temp_dir,
    wait_for_state, within,
};

const QUEUE: &str = "emails";

/// Number of tasks in the exactly-once test, enqueued in batches of `BATCH`.
const TASK_COUNT: usize = 120;
const BATCH: usize = 25;

/// How long a worker of the exactly-once test waits for its next event.
const IDLE_LIMIT: Duration = Duration::from_secs(300);

fn unix_seconds_now() -> i64 {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    i64::try_from(now.as_secs()).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn enqueued_tasks_complete_exactly_once() -> Result<()> {
    let data_dir = temp_dir();
    let broker = BrokerProcess::start(data_dir.path(), &[]).await?;
    let mut producer = broker.client().await?;

    let mut enqueued: HashMap<String, NewTask> = HashMap::new();
    let mut all_ids = Vec::new();
    for batch_start in (0..TASK_COUNT).step_by(BATCH) {
        let tasks: Vec<NewTask> = (batch_start..(batch_start + BATCH).min(TASK_COUNT))
            .map(|index| {
                let mut task = new_task(QUEUE, "send_email", format!("payload-{index}"));
                task.headers
                    .insert("content-type".to_string(), "text/plain".to_string());
                task.headers.insert("index".to_string(), index.to_string());
                task.max_attempts = 3;
                task
            })
            .collect();
        let ids = enqueue(&mut producer, tasks.clone()).await?;
        for (id, task) in ids.iter().zip(tasks) {
            enqueued.insert(id.clone(), task);
        }
        all_ids.extend(ids);
    }

    let unique_ids: HashSet<&String> = all_ids.iter().collect();
    assert_eq!(
        unique_ids.len(),
        TASK_COUNT,
        "Enqueue returned duplicate task ids"
    );
    for id in &all_ids {
        let parsed =
            uuid::Uuid::parse_str(id).with_context(|| format!("task id {id:?} is not a UUID"))?;
        assert_eq!(parsed.get_version_num(), 7, "task id {id} is not a UUIDv7");
    }

    for id in &all_ids {
        let status = get_task(&mut producer, id).await?;
        assert_eq!(
            status.state(),
            TaskState::Pending,
            "task {id} is not PENDING before any subscriber"
        );
        assert_eq!(status.attempts, 0, "task {id} has attempts before delivery");
    }

    // Two workers on their own connections consume the queue concurrently. Each records
    // every delivery it receives and acknowledges it, until the test stops it.
    let (stop_sender, stop_receiver) = tokio::sync::watch::channel(false);
    let mut workers = Vec::new();
    for worker_index in 0..2 {
        let mut client = broker.client().await?;
        let mut stop = stop_receiver.clone();
        workers.push(tokio::spawn(async move {
            let mut subscription = Subscription::open(&mut client, &[QUEUE], 7, None).await?;
            let mut deliveries = Vec::new();
            loop {
                // The test itself fails on its own timeouts, so a worker waits without a
                // tight limit until it is stopped.
                let event = tokio::select! {
                    _ = stop.changed() => break,
                    event = subscription.next_event(IDLE_LIMIT) => event?,
                };
                let Event::Delivery(delivery) = event else {
                    continue;
                };
                let task_id = delivered_task_id(&delivery)?;
                let result = format!("done-by-{worker_index}:{task_id}");
                ack(&mut client, &delivery.lease_id, result)
                    .await
                    .with_context(|| format!("Ack of task {task_id} failed"))?;
                deliveries.push(delivery);
            }
            anyhow::Ok(deliveries)
        }));
    }

    let mut checker = broker.client().await?;
    for id in &all_ids {
        wait_for_state(&mut checker, id, TaskState::Succeeded).await?;
    }
    // A duplicate delivery would arrive within this period and be recorded.
    tokio::time::sleep(QUIET).await;
    stop_sender.send(true)?;
    let mut deliveries = Vec::new();
    for worker in workers {
        deliveries.extend(worker.await??);
    }

    let mut delivery_counts: HashMap<String, usize> = HashMap::new();
    for delivery in &deliveries {
        let task_id = delivered_task_id(delivery)?;
        assert_eq!(
            delivery.attempt, 1,
            "task {task_id} was delivered with attempt {}",
            delivery.attempt
        );
        *delivery_counts.entry(task_id).or_default() += 1;
    }
    let repeated: Vec<(&String, &usize)> = delivery_counts
        .iter()
        .filter(|(_, count)| **count > 1)
        .collect();
    assert!(
        repeated.is_empty(),
        "tasks delivered more than once: {repeated:?}"
    );
    let delivered: HashSet<&String> = delivery_counts.keys().collect();
    let missing: Vec<&&String> = unique_ids.difference(&delivered).collect();
    assert!(missing.is_empty(), "tasks never delivered: {missing:?}");
    let unknown: Vec<&&String> = delivered.difference(&unique_ids).collect();
    assert!(
        unknown.is_empty(),
        "deliveries of tasks never enqueued: {unknown:?}"
    );

    for id in &all_ids {
        let status = get_task(&mut checker, id).await?;
        let task = status.task.clone().context("status without a task")?;
        let sent = &enqueued[id];
        assert_eq!(status.state(), TaskState::Succeeded, "task {id} state");
        assert_eq!(
            status.attempts, 1,
            "task {id} took more than one attempt, so it was delivered more than once"
        );
        assert!(
            status.last_error.is_empty(),
            "task {id} has a last error {:?} without a failed attempt",
            status.last_error
        );
        let result = String::from_utf8_lossy(&status.result);
        assert!(
            result.starts_with("done-by-") && result.ends_with(&format!(":{id}")),
            "task {id} result is {result:?}, not the acknowledged result"
        );
        assert_eq!(task.id, *id, "GetTask returned another task's id");
        assert_eq!(task.queue, sent.queue, "task {id} queue");
        assert_eq!(task.kind, sent.kind, "task {id} kind");
        assert_eq!(task.payload, sent.payload, "task {id} payload");
        assert_eq!(task.headers, sent.headers, "task {id} headers");
        assert_eq!(task.priority, sent.priority, "task {id} priority");
        assert_eq!(
            task.max_attempts, sent.max_attempts,
            "task {id} max_attempts"
        );
        assert!(task.created_at.is_some(), "task {id} has no created_at");
        assert!(status.updated_at.is_some(), "task {id} has no updated_at");
        assert!(
            status.lease_deadline.is_none(),
            "task {id} is SUCCEEDED but still has a lease deadline"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn delivery_carries_task_and_lease() -> Result<()> {
    let data_dir = temp_dir();
    let broker = BrokerProcess::start(data_dir.path(), &[]).await?;
    let mut client = broker.client().await?;

    let mut task = new_task(QUEUE, "send_email", &b"\x00\x01binary payload"[..]);
    task.headers.insert(
        "content-type".to_string(),
        "application/octet-stream".to_string(),
    );
    task.priority = 7;
    task.max_attempts = 4;
    let id = enqueue(&mut client, vec![task.clone()]).await?.remove(0);

    let lease = Duration::from_secs(10);
    let before = unix_seconds_now();
    let mut subscription = Subscription::open(&mut client, &[QUEUE], 1, Some(lease)).await?;
    let delivery = subscription.next_delivery().await?;
    let delivered = delivery.task.clone().context("delivery without a task")?;

    assert_eq!(delivered.id, id, "delivered task id");
    assert_eq!(delivered.queue, task.queue, "delivered queue");
    assert_eq!(delivered.kind, task.kind, "delivered kind");
    assert_eq!(delivered.payload, task.payload, "delivered payload");
    assert_eq!(delivered.headers, task.headers, "delivered headers");
    assert_eq!(delivered.priority, task.priority, "delivered priority");
    assert_eq!(
        delivered.max_attempts, task.max_attempts,
        "delivered max_attempts"
    );
    assert_eq!(delivery.attempt, 1, "first delivery's attempt number");
    assert!(
        !delivery.lease_id.is_empty(),
        "delivery has an empty lease id"
    );

    let deadline = delivery
        .lease_deadline
        .context("delivery has no lease deadline")?;
    assert!(
        deadline.seconds >= before + 9,
        "lease deadline {} is less than the 10 s lease after {before}",
        deadline.seconds
    );
    assert!(
        deadline.seconds <= unix_seconds_now() + 11,
        "lease deadline {} is more than the 10 s lease from now",
        deadline.seconds
    );

    let leased = get_task(&mut client, &id).await?;
    assert_eq!(leased.state(), TaskState::Leased, "state while under lease");
    assert_eq!(
        leased.attempts, 0,
        "finished attempts while the first is running"
    );
    assert_eq!(
        leased.lease_deadline.map(|deadline| deadline.seconds),
        Some(deadline.seconds),
        "GetTask lease deadline differs from the delivery's"
    );

    ack(&mut client, &delivery.lease_id, "sent").await?;
    let done = get_task(&mut client, &id).await?;
    assert_eq!(done.state(), TaskState::Succeeded, "state after Ack");
    assert_eq!(done.attempts, 1, "finished attempts after Ack");
    assert_eq!(&done.result[..], b"sent", "stored result");

    let second_ack = ack(&mut client, &delivery.lease_id, "again").await;
    let status = second_ack.expect_err("a second Ack of a settled lease succeeded");
    assert_eq!(
        status.code(),
        tonic::Code::FailedPrecondition,
        "second Ack of a settled lease: {status:?}"
    );
    let unchanged = get_task(&mut client, &id).await?;
    assert_eq!(
        &unchanged.result[..],
        b"sent",
        "a rejected second Ack changed the stored result"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn subscription_reads_several_queues() -> Result<()> {
    let data_dir = temp_dir();
    let broker = BrokerProcess::start(data_dir.path(), &[]).await?;
    let mut client = broker.client().await?;

    let first = enqueue(&mut client, vec![new_task("first", "kind", "a")]).await?;
    let second = enqueue(&mut client, vec![new_task("second", "kind", "b")]).await?;
    let other = enqueue(&mut client, vec![new_task("other", "kind", "c")]).await?;

    let mut subscription = Subscription::open(&mut client, &["first", "second"], 10, None).await?;
    let deliveries = subscription.next_deliveries(2).await?;
    let delivered: HashSet<String> = deliveries
        .iter()
        .map(delivered_task_id)
        .collect::<Result<_>>()?;
    assert!(
        delivered.contains(&first[0]),
        "the task on queue `first` was not delivered"
    );
    assert!(
        delivered.contains(&second[0]),
        "the task on queue `second` was not delivered"
    );
    subscription
        .expect_no_delivery(QUIET)
        .await
        .context("a task from an unsubscribed queue was delivered")?;

    let untouched = get_task(&mut client, &other[0]).await?;
    assert_eq!(
        untouched.state(),
        TaskState::Pending,
        "the task on unsubscribed queue `other`"
    );
    Ok(())
}

#[tokio::test]
async fn released_delivery_returns_without_an_attempt() -> Result<()> {
    let data_dir = temp_dir();
    let broker = BrokerProcess::start(data_dir.path(), &[]).await?;
    let mut client = broker.client().await?;
    let mut task = new_task(QUEUE, "send_email", "release me");
    task.max_attempts = 1;
    let task_id = enqueue(&mut client, vec![task]).await?.remove(0);
    let mut subscription = Subscription::open(&mut client, &[QUEUE], 1, None).await?;
    let delivery = subscription.next_delivery().await?;

    // A release cannot also ask for a retry delay or for no retry.
    for (case, retry_delay, no_retry) in [
        (
            "release with retry_delay",
            Some(Duration::from_secs(1)),
            false,
        ),
        ("release with no_retry", None, true),
    ] {
        let results = nack_items(
            &mut client,
            vec![NegativeAcknowledgement {
                lease_id: delivery.lease_id.clone(),
                retry_delay: retry_delay.map(proto_duration),
                no_retry,
                release: true,
                ..NegativeAcknowledgement::default()
            }],
        )
        .await?;
        assert_rejected(
            case,
            single_result(results),
            tonic::Code::InvalidArgument,
            "nacks[0].release",
        );
    }

    let results = nack_items(
        &mut client,
        vec![NegativeAcknowledgement {
            lease_id: delivery.lease_id.clone(),
            error: "ignored".to_owned(),
            release: true,
            ..NegativeAcknowledgement::default()
        }],
    )
    .await?;
    let result = single_result(results)?;
    assert_eq!(result.state(), TaskState::Pending);

    // The only attempt was not used, so the task is delivered again as attempt 1, and
    // a failure now dead-letters it.
    let again = subscription.next_delivery().await?;
    assert_eq!(delivered_task_id(&again)?, task_id);
    assert_eq!(again.attempt, 1);
    let status = get_task(&mut client, &task_id).await?;
    assert_eq!(status.attempts, 0, "{status:?}");
    assert!(status.attempt_history.is_empty(), "{status:?}");
    assert_eq!(status.last_error, "", "{status:?}");
    let states: Vec<TaskState> = status
        .state_history
        .iter()
        .map(|change| change.state())
        .collect();
    // The released lease and its return, then the live second lease.
    assert_eq!(
        states,
        [
            TaskState::Pending,
            TaskState::Leased,
            TaskState::Pending,
            TaskState::Leased
        ]
    );

    let results = nack_items(
        &mut client,
        vec![NegativeAcknowledgement {
            lease_id: again.lease_id.clone(),
            error: "failed after all".to_owned(),
            ..NegativeAcknowledgement::default()
        }],
    )
    .await?;
    assert_eq!(single_result(results)?.state(), TaskState::Dead);
    Ok(())
}

#[tokio::test]
async fn stop_deliveries_keeps_live_leases() -> Result<()> {
    let data_dir = temp_dir();
    let broker = BrokerProcess::start(data_dir.path(), &["--heartbeat-interval", "200ms"]).await?;
    let mut client = broker.client().await?;
    let tasks = (0..4)
        .map(|index| new_task(QUEUE, "send_email", format!("payload-{index}")))
        .collect();
    enqueue(&mut client, tasks).await?;

    let request = SubscribeRequest {
        queues: vec![QUEUE.to_owned()],
        max_in_flight: 2,
        ..SubscribeRequest::default()
    };
    let response = client.subscribe(request).await?;
    let subscription_id = response
        .metadata()
        .get(SUBSCRIPTION_ID_HEADER)
        .context("no subscription id header")?
        .to_str()?
        .to_owned();
    let mut stream = response.into_inner();
    let mut leases = Vec::new();
    while leases.len() < 2 {
        let message = tokio::time::timeout(WAIT, stream.message()).await??;
        if let Some(Event::Delivery(delivery)) = message.and_then(|message| message.event) {
            leases.push(delivery.lease_id);
        }
    }

    let unknown = client
        .stop_deliveries(StopDeliveriesRequest {
            subscription_id: "0123456789abcdef0123456789abcdef".to_owned(),
        })
        .await;
    assert_rejected(
        "unknown subscription id",
        unknown,
        tonic::Code::NotFound,
        "subscription_id",
    );
    let stopped = client
        .stop_deliveries(StopDeliveriesRequest {
            subscription_id: subscription_id.clone(),
        })
        .await?
        .into_inner();
    assert_eq!(stopped.leases_held, 2);

    // The leases stay live, and settling them frees no credit for the two tasks left.
    for lease_id in &leases {
        ack(&mut client, lease_id, "").await?;
    }
    let quiet_until = tokio::time::Instant::now() + QUIET;
    while let Ok(message) = tokio::time::timeout_at(quiet_until, stream.message()).await {
        let event = message?.and_then(|message| message.event);
        assert!(
            !matches!(event, Some(Event::Delivery(_))),
            "a stopped stream got a delivery: {event:?}"
        );
    }
    let stats = queue_stats(&mut client, QUEUE).await?;
    assert_eq!((stats.pending, stats.succeeded), (2, 2), "{stats:?}");

    // Once the stream closes, its id stops working.
    drop(stream);
    let closed = within(WAIT, "StopDeliveries after close", async {
        loop {
            let result = client
                .stop_deliveries(StopDeliveriesRequest {
                    subscription_id: subscription_id.clone(),
                })
                .await;
            if result.is_err() {
                return Ok(result);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await?;
    assert_rejected(
        "closed stream",
        closed,
        tonic::Code::NotFound,
        "subscription_id",
    );
    Ok(())
}
