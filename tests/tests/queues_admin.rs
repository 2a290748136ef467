//! Queue administration: stats, pause and resume, purge, settings and the stats watch.

use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use docket_proto::v1::broker_client::BrokerClient;
use docket_proto::v1::{
    GetQueueSettingsRequest, ListQueuesRequest, NegativeAcknowledgement, PauseQueueRequest,
    PurgeQueueRequest, QueueSettings, ResumeQueueRequest, RetryPolicy, TaskState,
    UpdateQueueSettingsRequest, WatchQueueStatsRequest,
};
use docket_tests::{
    BrokerProcess, QUIET, Subscription, WAIT, ack, assert_rejected, delivered_task_id, enqueue,
    get_task, nack, nack_items, new_task, proto_duration, queue_stats, seconds_between,
    single_result, system_time, temp_dir, wait_for_not_found, within,
};
use tonic::Code;
use tonic::transport::Channel;

const QUEUE: &str = "admin";
const OTHER_QUEUE: &str = "another";

/// A retry backoff long enough that a nacked task stays in RETRY_WAIT for the whole test.
const LONG_BACKOFF_ARGS: [&str; 4] = ["--retry-initial-backoff", "1m", "--retry-max-backoff", "1m"];

async fn pause(client: &mut BrokerClient<Channel>, queue: &str) -> Result<()> {
    within(WAIT, "PauseQueue", async {
        Ok(client
            .pause_queue(PauseQueueRequest {
                queue: queue.to_string(),
            })
            .await?)
    })
    .await?;
    Ok(())
}

async fn resume(client: &mut BrokerClient<Channel>, queue: &str) -> Result<()> {
    within(WAIT, "ResumeQueue", async {
        Ok(client
            .resume_queue(ResumeQueueRequest {
                queue: queue.to_string(),
            })
            .await?)
    })
    .await?;
    Ok(())
}

async fn settings(client: &mut BrokerClient<Channel>, queue: &str) -> Result<QueueSettings> {
    let response = within(WAIT, "GetQueueSettings", async {
        Ok(client
            .get_queue_settings(GetQueueSettingsRequest {
                queue: queue.to_string(),
            })
            .await?)
    })
    .await?;
    response
        .into_inner()
        .settings
        .context("GetQueueSettings returned no settings")
}

async fn update_settings(
    client: &mut BrokerClient<Channel>,
    queue: &str,
    settings: QueueSettings,
) -> Result<QueueSettings, tonic::Status> {
    let request = UpdateQueueSettingsRequest {
        queue: queue.to_string(),
        settings: Some(settings),
    };
    client
        .update_queue_settings(request)
        .await?
        .into_inner()
        .settings
        .ok_or_else(|| tonic::Status::internal("UpdateQueueSettings returned no settings"))
}

fn retry_policy(initial: Duration, multiplier: f64, max: Duration, jitter: f64) -> RetryPolicy {
    RetryPolicy {
        initial_backoff: Some(proto_duration(initial)),
        multiplier,
        max_backoff: Some(proto_duration(max)),
        jitter,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn stats_count_every_state() -> Result<()> {
    let data_dir = temp_dir();
    let broker = BrokerProcess::start(data_dir.path(), &LONG_BACKOFF_ARGS).await?;
    let mut client = broker.client().await?;

    let tasks = (0..4)
        .map(|index| {
            let mut task = new_task(QUEUE, "job", format!("leased-{index}"));
            task.max_attempts = 3;
            task
        })
        .collect();
    enqueue(&mut client, tasks).await?;
    let mut subscription = Subscription::open(&mut client, &[QUEUE], 10, None).await?;
    let deliveries = subscription.next_deliveries(4).await?;
    // A queue that only a subscription names has neither tasks nor settings.
    let _idle = Subscription::open(&mut client, &["only-subscribed"], 10, None).await?;

    // Paused, the queue keeps the tasks enqueued below pending while the stream has
    // free slots.
    pause(&mut client, QUEUE).await?;
    ack(&mut client, &deliveries[0].lease_id, "done").await?;
    let state = nack(&mut client, &deliveries[1].lease_id, "retry later").await?;
    assert_eq!(state, TaskState::RetryWait, "Nack with a 1 minute backoff");
    let dead = single_result(
        nack_items(
            &mut client,
            vec![NegativeAcknowledgement {
                lease_id: deliveries[2].lease_id.clone(),
                error: "fatal".to_string(),
                no_retry: true,
                ..Default::default()
            }],
        )
        .await?,
    )?;
    assert_eq!(dead.state(), TaskState::Dead, "Nack with no_retry");

    let pending = enqueue(
        &mut client,
        vec![
            new_task(QUEUE, "job", "pending-0"),
            new_task(QUEUE, "job", "pending-1"),
            new_task(QUEUE, "job", "cancelled"),
        ],
    )
    .await?;
    let cancelled = client
        .cancel_task(docket_proto::v1::CancelTaskRequest {
            task_id: pending[2].clone(),
        })
        .await?
        .into_inner();
    assert_eq!(
        cancelled.state(),
        TaskState::Cancelled,
        "CancelTask of a pending task"
    );
    enqueue(&mut client, vec![new_task(OTHER_QUEUE, "job", "elsewhere")]).await?;
    tokio::time::sleep(Duration::from_millis(50)).await;

    let stats = queue_stats(&mut client, QUEUE).await?;
    assert_eq!(stats.queue, QUEUE, "queue name in the stats");
    assert_eq!(stats.pending, 2, "pending count");
    assert_eq!(stats.leased, 1, "leased count");
    assert_eq!(stats.retry_wait, 1, "retry_wait count");
    assert_eq!(stats.dead, 1, "dead count");
    assert_eq!(stats.succeeded, 1, "succeeded count");
    assert_eq!(stats.cancelled, 1, "cancelled count");
    assert!(stats.paused, "a paused queue's stats are not paused");
    let age = stats
        .oldest_pending_age
        .context("stats without oldest_pending_age")?;
    let age = Duration::try_from(age).context("negative oldest_pending_age")?;
    assert!(
        age >= Duration::from_millis(50),
        "oldest_pending_age {age:?} with a task pending for at least 50 ms"
    );
    assert!(
        age < WAIT,
        "oldest_pending_age {age:?} is older than the test"
    );

    let listed = client
        .list_queues(ListQueuesRequest {})
        .await?
        .into_inner()
        .queues;
    let names: Vec<&str> = listed.iter().map(|queue| queue.queue.as_str()).collect();
    assert_eq!(
        names,
        [QUEUE, OTHER_QUEUE],
        "ListQueues names, sorted by name, without the queue that only a subscription names"
    );
    let listed_admin = &listed[0];
    assert_eq!(
        (
            listed_admin.pending,
            listed_admin.leased,
            listed_admin.retry_wait,
            listed_admin.dead,
            listed_admin.succeeded,
            listed_admin.cancelled,
        ),
        (2, 1, 1, 1, 1, 1),
        "ListQueues counts of {QUEUE} (pending, leased, retry_wait, dead, succeeded, \
         cancelled)"
    );
    assert_eq!(
        listed[1].pending, 1,
        "ListQueues pending count of {OTHER_QUEUE}"
    );
    assert!(!listed[1].paused, "{OTHER_QUEUE} is paused");

    let empty = queue_stats(&mut client, "never-used").await?;
    assert_eq!(
        (empty.pending, empty.leased, empty.dead, empty.succeeded),
        (0, 0, 0, 0),
        "counts of a queue that was never used"
    );
    assert_eq!(
        empty.oldest_pending_age.map(Duration::try_from),
        Some(Ok(Duration::ZERO)),
        "oldest_pending_age of a queue with nothing pending"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn paused_queue_delivers_after_resume() -> Result<()> {
    let data_dir = temp_dir();
    let broker = BrokerProcess::start(data_dir.path(), &[]).await?;
    let mut client = broker.client().await?;

    // The stream is open and idle before the pause, so only the pause keeps tasks from it.
    let mut subscription = Subscription::open(&mut client, &[QUEUE, OTHER_QUEUE], 10, None).await?;
    pause(&mut client, QUEUE).await?;
    let ids = enqueue(
        &mut client,
        vec![
            new_task(QUEUE, "job", "held"),
            new_task(OTHER_QUEUE, "job", "free"),
        ],
    )
    .await
    .context("Enqueue into a paused queue failed")?;

    let other = subscription.next_delivery().await?;
    assert_eq!(
        delivered_task_id(&other)?,
        ids[1],
        "delivery from the queue that is not paused"
    );
    subscription
        .expect_no_delivery(QUIET)
        .await
        .context("a task of a paused queue was delivered")?;
    let stats = queue_stats(&mut client, QUEUE).await?;
    assert!(stats.paused, "stats of a paused queue");
    assert_eq!(stats.pending, 1, "pending count of the paused queue");

    resume(&mut client, QUEUE).await?;
    let resumed = subscription.next_delivery().await?;
    assert_eq!(
        delivered_task_id(&resumed)?,
        ids[0],
        "delivery after ResumeQueue"
    );
    assert!(
        !queue_stats(&mut client, QUEUE).await?.paused,
        "stats after ResumeQueue"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn pause_survives_kill9_restart() -> Result<()> {
    let data_dir = temp_dir();
    let mut first = BrokerProcess::start(data_dir.path(), &[]).await?;
    let mut client = first.client().await?;
    pause(&mut client, QUEUE).await?;
    let id = enqueue(&mut client, vec![new_task(QUEUE, "job", "held")])
        .await?
        .remove(0);
    drop(client);
    first.kill9()?;

    let broker = BrokerProcess::start(data_dir.path(), &[]).await?;
    let mut client = broker.client().await?;
    let stats = queue_stats(&mut client, QUEUE).await?;
    assert!(stats.paused, "stats after the restart");
    assert_eq!(stats.pending, 1, "pending count after the restart");
    assert!(
        settings(&mut client, QUEUE).await?.paused,
        "GetQueueSettings after the restart"
    );

    let mut subscription = Subscription::open(&mut client, &[QUEUE], 10, None).await?;
    subscription
        .expect_no_delivery(QUIET)
        .await
        .context("a task of a queue paused before the restart was delivered")?;
    resume(&mut client, QUEUE).await?;
    let delivery = subscription.next_delivery().await?;
    assert_eq!(
        delivered_task_id(&delivery)?,
        id,
        "delivery after ResumeQueue"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn purge_deletes_waiting_tasks_only() -> Result<()> {
    let data_dir = temp_dir();
    let broker = BrokerProcess::start(data_dir.path(), &LONG_BACKOFF_ARGS).await?;
    let mut client = broker.client().await?;

    let tasks = (0..3)
        .map(|index| {
            let mut task = new_task(QUEUE, "job", format!("delivered-{index}"));
            task.max_attempts = 3;
            task
        })
        .collect();
    let delivered_ids = enqueue(&mut client, tasks).await?;
    let mut subscription = Subscription::open(&mut client, &[QUEUE], 10, None).await?;
    let deliveries = subscription.next_deliveries(3).await?;
    pause(&mut client, QUEUE).await?;
    let by_task = |id: &str| {
        deliveries
            .iter()
            .find(|delivery| delivered_task_id(delivery).ok().as_deref() == Some(id))
            .cloned()
            .with_context(|| format!("task {id} was not delivered"))
    };
    let retrying = by_task(&delivered_ids[0])?;
    let leased = by_task(&delivered_ids[1])?;
    let succeeded = by_task(&delivered_ids[2])?;
    nack(&mut client, &retrying.lease_id, "retry later").await?;
    ack(&mut client, &succeeded.lease_id, "done").await?;
    let pending_ids = enqueue(
        &mut client,
        vec![
            new_task(QUEUE, "job", "pending-0"),
            new_task(QUEUE, "job", "pending-1"),
        ],
    )
    .await?;
    let other_id = enqueue(&mut client, vec![new_task(OTHER_QUEUE, "job", "elsewhere")])
        .await?
        .remove(0);

    let purged = client
        .purge_queue(PurgeQueueRequest {
            queue: QUEUE.to_string(),
        })
        .await?
        .into_inner()
        .purged;
    assert_eq!(purged, 3, "tasks purged: one retry-waiting and two pending");
    for id in [&delivered_ids[0], &pending_ids[0], &pending_ids[1]] {
        wait_for_not_found(&mut client, id).await?;
    }
    let leased_status = get_task(&mut client, &delivered_ids[1]).await?;
    assert_eq!(
        leased_status.state(),
        TaskState::Leased,
        "a leased task after PurgeQueue"
    );
    let succeeded_status = get_task(&mut client, &delivered_ids[2]).await?;
    assert_eq!(
        succeeded_status.state(),
        TaskState::Succeeded,
        "a succeeded task after PurgeQueue"
    );
    let other_status = get_task(&mut client, &other_id).await?;
    assert_eq!(
        other_status.state(),
        TaskState::Pending,
        "a task of another queue after PurgeQueue"
    );
    let stats = queue_stats(&mut client, QUEUE).await?;
    assert_eq!(stats.pending, 0, "pending count after PurgeQueue");
    assert_eq!(stats.retry_wait, 0, "retry_wait count after PurgeQueue");
    assert_eq!(stats.leased, 1, "leased count after PurgeQueue");

    ack(&mut client, &leased.lease_id, "done")
        .await
        .context("Ack of a lease that survived PurgeQueue failed")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn settings_apply_to_later_tasks() -> Result<()> {
    let data_dir = temp_dir();
    let broker = BrokerProcess::start(data_dir.path(), &["--default-max-attempts", "5"]).await?;
    let mut client = broker.client().await?;

    let defaults = settings(&mut client, QUEUE).await?;
    assert_eq!(defaults.max_attempts, Some(5), "default max_attempts");
    assert_eq!(
        defaults.lease_duration,
        Some(proto_duration(Duration::from_secs(30))),
        "default lease_duration"
    );
    assert!(
        defaults.retry_policy.is_some(),
        "GetQueueSettings without a retry policy"
    );
    assert!(!defaults.paused, "a new queue is paused");

    let before = enqueue(&mut client, vec![new_task(QUEUE, "job", "before")])
        .await?
        .remove(0);

    let updated = update_settings(
        &mut client,
        QUEUE,
        QueueSettings {
            max_attempts: Some(2),
            ..QueueSettings::default()
        },
    )
    .await?;
    assert_eq!(updated.max_attempts, Some(2), "max_attempts after update");
    assert_eq!(
        updated.lease_duration, defaults.lease_duration,
        "an update of max_attempts changed lease_duration"
    );
    assert_eq!(
        updated.retry_policy, defaults.retry_policy,
        "an update of max_attempts changed the retry policy"
    );

    let policy = retry_policy(Duration::from_millis(300), 3.0, Duration::from_secs(5), 0.0);
    let updated = update_settings(
        &mut client,
        QUEUE,
        QueueSettings {
            lease_duration: Some(proto_duration(Duration::from_secs(2))),
            retry_policy: Some(policy),
            ..QueueSettings::default()
        },
    )
    .await?;
    assert_eq!(
        updated.max_attempts,
        Some(2),
        "an update without max_attempts changed it"
    );
    assert_eq!(
        updated.lease_duration,
        Some(proto_duration(Duration::from_secs(2))),
        "lease_duration after update"
    );
    assert_eq!(
        updated.retry_policy,
        Some(policy),
        "retry policy after update"
    );
    assert_eq!(
        settings(&mut client, QUEUE).await?,
        updated,
        "GetQueueSettings differs from the UpdateQueueSettings response"
    );

    let after = enqueue(&mut client, vec![new_task(QUEUE, "job", "after")])
        .await?
        .remove(0);
    let before_status = get_task(&mut client, &before).await?;
    let after_status = get_task(&mut client, &after).await?;
    let max_attempts_of =
        |status: &docket_proto::v1::TaskStatus| status.task.as_ref().map(|task| task.max_attempts);
    assert_eq!(
        max_attempts_of(&before_status),
        Some(5),
        "max_attempts of a task enqueued before the update"
    );
    assert_eq!(
        max_attempts_of(&after_status),
        Some(2),
        "max_attempts of a task enqueued after the update"
    );
    assert_eq!(
        after_status.retry_policy,
        Some(policy),
        "retry policy of a task enqueued after the update"
    );

    // The stream sets no lease duration, so the queue's 2 s applies.
    let mut subscription = Subscription::open(&mut client, &[QUEUE], 10, None).await?;
    let deliveries = subscription.next_deliveries(2).await?;
    let received_at = SystemTime::now();
    for delivery in &deliveries {
        let deadline = system_time(
            delivery
                .lease_deadline
                .as_ref()
                .context("delivery without a lease deadline")?,
        );
        let lease = seconds_between(received_at, deadline);
        assert!(
            (0.5..=2.5).contains(&lease),
            "delivery's lease ends {lease:.3} s after it arrived, expected about 2 s"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn settings_persist_across_restart() -> Result<()> {
    let data_dir = temp_dir();
    let mut first = BrokerProcess::start(data_dir.path(), &[]).await?;
    let mut client = first.client().await?;
    let updated = update_settings(
        &mut client,
        QUEUE,
        QueueSettings {
            max_attempts: Some(7),
            retry_policy: Some(retry_policy(
                Duration::from_secs(2),
                1.5,
                Duration::from_secs(60),
                0.1,
            )),
            lease_duration: Some(proto_duration(Duration::from_secs(45))),
            retention: Some(proto_duration(Duration::from_secs(3600))),
            dead_retention: Some(proto_duration(Duration::from_secs(7200))),
            idempotency_window: Some(proto_duration(Duration::from_secs(90))),
            paused: false,
        },
    )
    .await?;
    drop(client);
    first.kill9()?;

    let broker = BrokerProcess::start(data_dir.path(), &[]).await?;
    let mut client = broker.client().await?;
    let restored = settings(&mut client, QUEUE).await?;
    assert_eq!(
        restored, updated,
        "GetQueueSettings after a restart differs from the update's response"
    );
    let listed = client
        .list_queues(ListQueuesRequest {})
        .await?
        .into_inner()
        .queues;
    assert!(
        listed.iter().any(|queue| queue.queue == QUEUE),
        "ListQueues omits a queue that has only settings: {listed:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_settings_rejected() -> Result<()> {
    let data_dir = temp_dir();
    let broker = BrokerProcess::start(data_dir.path(), &["--max-lease-duration", "10m"]).await?;
    let mut client = broker.client().await?;
    let original = settings(&mut client, QUEUE).await?;

    let seconds = |value: u64| Some(proto_duration(Duration::from_secs(value)));
    let millis = |value: u64| Some(proto_duration(Duration::from_millis(value)));
    let one_second = Duration::from_secs(1);
    let cases = [
        (
            "max_attempts 0",
            QueueSettings {
                max_attempts: Some(0),
                ..QueueSettings::default()
            },
            "settings.max_attempts",
        ),
        (
            "max_attempts 101",
            QueueSettings {
                max_attempts: Some(101),
                ..QueueSettings::default()
            },
            "settings.max_attempts",
        ),
        (
            "lease_duration 500 ms",
            QueueSettings {
                lease_duration: millis(500),
                ..QueueSettings::default()
            },
            "settings.lease_duration",
        ),
        (
            "lease_duration above --max-lease-duration",
            QueueSettings {
                lease_duration: seconds(601),
                ..QueueSettings::default()
            },
            "settings.lease_duration",
        ),
        (
            "retention 30 s",
            QueueSettings {
                retention: seconds(30),
                ..QueueSettings::default()
            },
            "settings.retention",
        ),
        (
            "dead_retention 30 s",
            QueueSettings {
                dead_retention: seconds(30),
                ..QueueSettings::default()
            },
            "settings.dead_retention",
        ),
        (
            "idempotency_window 500 ms",
            QueueSettings {
                idempotency_window: millis(500),
                ..QueueSettings::default()
            },
            "settings.idempotency_window",
        ),
        (
            "retry multiplier 0.5",
            QueueSettings {
                retry_policy: Some(retry_policy(one_second, 0.5, one_second, 0.0)),
                ..QueueSettings::default()
            },
            "settings.retry_policy",
        ),
        (
            "retry jitter 1.5",
            QueueSettings {
                retry_policy: Some(retry_policy(one_second, 2.0, one_second, 1.5)),
                ..QueueSettings::default()
            },
            "settings.retry_policy",
        ),
        (
            "retry max_backoff below initial_backoff",
            QueueSettings {
                retry_policy: Some(retry_policy(Duration::from_secs(10), 2.0, one_second, 0.0)),
                ..QueueSettings::default()
            },
            "settings.retry_policy",
        ),
        (
            "retry initial_backoff over 1 day",
            QueueSettings {
                retry_policy: Some(retry_policy(
                    Duration::from_secs(2 * 86_400),
                    2.0,
                    Duration::from_secs(2 * 86_400),
                    0.0,
                )),
                ..QueueSettings::default()
            },
            "settings.retry_policy",
        ),
        (
            // A valid field next to an invalid one: the whole update is rejected.
            "valid max_attempts with invalid retention",
            QueueSettings {
                max_attempts: Some(3),
                retention: seconds(1),
                ..QueueSettings::default()
            },
            "settings.retention",
        ),
    ];
    for (case, update, field) in cases {
        let result = update_settings(&mut client, QUEUE, update).await;
        assert_rejected(case, result, Code::InvalidArgument, field);
    }
    let missing = client
        .update_queue_settings(UpdateQueueSettingsRequest {
            queue: QUEUE.to_string(),
            settings: None,
        })
        .await;
    assert_rejected(
        "UpdateQueueSettings without settings",
        missing,
        Code::InvalidArgument,
        "settings",
    );

    assert_eq!(
        settings(&mut client, QUEUE).await?,
        original,
        "rejected updates changed the settings"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn settings_accept_documented_limits() -> Result<()> {
    let data_dir = temp_dir();
    let broker = BrokerProcess::start(data_dir.path(), &["--max-lease-duration", "10m"]).await?;
    let mut client = broker.client().await?;

    let cases = [
        (
            "max_attempts 1",
            QueueSettings {
                max_attempts: Some(1),
                ..QueueSettings::default()
            },
        ),
        (
            "max_attempts 100",
            QueueSettings {
                max_attempts: Some(100),
                ..QueueSettings::default()
            },
        ),
        (
            "lease_duration 1 s",
            QueueSettings {
                lease_duration: Some(proto_duration(Duration::from_secs(1))),
                ..QueueSettings::default()
            },
        ),
        (
            "lease_duration equal to --max-lease-duration",
            QueueSettings {
                lease_duration: Some(proto_duration(Duration::from_secs(600))),
                ..QueueSettings::default()
            },
        ),
        (
            "retention and dead_retention of 1 minute",
            QueueSettings {
                retention: Some(proto_duration(Duration::from_secs(60))),
                dead_retention: Some(proto_duration(Duration::from_secs(60))),
                ..QueueSettings::default()
            },
        ),
        (
            "idempotency_window 1 s",
            QueueSettings {
                idempotency_window: Some(proto_duration(Duration::from_secs(1))),
                ..QueueSettings::default()
            },
        ),
    ];
    for (case, update) in cases {
        let result = update_settings(&mut client, QUEUE, update).await;
        assert!(
            result.is_ok(),
            "{case}, within the documented range, was rejected: {result:?}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn stats_watch_follows_changes() -> Result<()> {
    let data_dir = temp_dir();
    let broker = BrokerProcess::start(data_dir.path(), &[]).await?;
    let mut client = broker.client().await?;
    let mut watch_client = broker.client().await?;

    let interval = Duration::from_millis(200);
    let mut stream = watch_client
        .watch_queue_stats(WatchQueueStatsRequest {
            queue: QUEUE.to_string(),
            interval: Some(proto_duration(interval)),
        })
        .await?
        .into_inner();
    let mut next_stats = async || {
        within(WAIT, "a WatchQueueStats message", async {
            let message = stream
                .message()
                .await?
                .context("WatchQueueStats stream ended")?;
            message
                .stats
                .context("WatchQueueStats message without stats")
        })
        .await
    };

    let started = tokio::time::Instant::now();
    let first = next_stats().await?;
    assert_eq!(first.queue, QUEUE, "queue name in the watched stats");
    assert_eq!(first.pending, 0, "pending count before any enqueue");

    enqueue(
        &mut client,
        vec![new_task(QUEUE, "job", "a"), new_task(QUEUE, "job", "b")],
    )
    .await?;
    let mut messages: u32 = 1;
    loop {
        let stats = next_stats().await?;
        messages += 1;
        if stats.pending == 2 {
            break;
        }
        assert!(messages < 20, "no message showed the 2 pending tasks");
    }

    let mut subscription = Subscription::open(&mut client, &[QUEUE], 10, None).await?;
    let deliveries = subscription.next_deliveries(2).await?;
    loop {
        let stats = next_stats().await?;
        messages += 1;
        if stats.leased == 2 && stats.pending == 0 {
            break;
        }
        assert!(messages < 40, "no message showed the 2 leased tasks");
    }
    for delivery in &deliveries {
        ack(&mut client, &delivery.lease_id, "done").await?;
    }
    loop {
        let stats = next_stats().await?;
        messages += 1;
        if stats.succeeded == 2 && stats.leased == 0 {
            break;
        }
        assert!(messages < 60, "no message showed the 2 succeeded tasks");
    }

    // Each message follows the 200 ms interval, so the messages cannot arrive faster.
    let elapsed = started.elapsed();
    let min_elapsed = interval * (messages - 2);
    assert!(
        elapsed >= min_elapsed,
        "{messages} messages arrived within {elapsed:?}, faster than one per {interval:?}"
    );

    let too_short = watch_client
        .watch_queue_stats(WatchQueueStatsRequest {
            queue: QUEUE.to_string(),
            interval: Some(proto_duration(Duration::from_millis(50))),
        })
        .await;
    assert_rejected(
        "WatchQueueStats with a 50 ms interval",
        too_short.map(|_| ()),
        Code::InvalidArgument,
        "interval",
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn purged_retry_task_stays_deleted() -> Result<()> {
    let data_dir = temp_dir();
    let broker = BrokerProcess::start(
        data_dir.path(),
        &[
            "--retry-initial-backoff",
            "500ms",
            "--retry-max-backoff",
            "500ms",
            "--retry-jitter",
            "0",
        ],
    )
    .await?;
    let mut client = broker.client().await?;

    let mut task = new_task(QUEUE, "job", "input");
    task.max_attempts = 3;
    let id = enqueue(&mut client, vec![task]).await?.remove(0);
    let mut subscription = Subscription::open(&mut client, &[QUEUE], 1, None).await?;
    let delivery = subscription.next_delivery().await?;
    let state = nack(&mut client, &delivery.lease_id, "retry later").await?;
    assert_eq!(state, TaskState::RetryWait, "Nack result state");

    let purged = client
        .purge_queue(PurgeQueueRequest {
            queue: QUEUE.to_string(),
        })
        .await?
        .into_inner()
        .purged;
    assert_eq!(purged, 1, "tasks purged: the retry-waiting one");

    // Watch past the 500 ms retry time: the purged task's retry must not fire.
    subscription
        .expect_no_delivery(Duration::from_millis(1000))
        .await
        .context("a purged retry-waiting task was delivered at its retry time")?;
    wait_for_not_found(&mut client, &id).await?;
    let stats = queue_stats(&mut client, QUEUE).await?;
    assert_eq!(
        (stats.pending, stats.retry_wait, stats.leased),
        (0, 0, 0),
        "(pending, retry_wait, leased) counts after the purge"
    );
    Ok(())
}
