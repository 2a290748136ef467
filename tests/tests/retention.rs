//! Retention: succeeded, cancelled and dead tasks are purged once their retention ends,
//! while tasks that can still run are kept.

use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use docket_proto::v1::broker_client::BrokerClient;
use docket_proto::v1::{CancelTaskRequest, QueueSettings, TaskState, UpdateQueueSettingsRequest};
use docket_tests::{
    BrokerProcess, Subscription, ack, enqueue, get_task, nack, new_task, proto_duration,
    queue_stats, system_time, temp_dir, wait_for_not_found, wait_for_stats,
};
use tokio::time::Instant;
use tonic::transport::Channel;

const QUEUE: &str = "short-lived";
const IDLE_QUEUE: &str = "idle";
const KEPT_QUEUE: &str = "kept";

const RETENTION: Duration = Duration::from_secs(1);
const PURGE_INTERVAL: Duration = Duration::from_millis(300);

/// Slack on "purged within": the purge timer, the commit and a shared machine.
const LATE_PURGE_SLACK: Duration = Duration::from_secs(3);

/// Runs one task to SUCCEEDED and one to DEAD in `queue`, returning their ids.
async fn finish_two_tasks(
    client: &mut BrokerClient<Channel>,
    queue: &str,
) -> Result<(String, String)> {
    let mut doomed = new_task(queue, "job", "dies");
    doomed.max_attempts = 1;
    let ids = enqueue(client, vec![new_task(queue, "job", "succeeds"), doomed]).await?;
    let mut subscription = Subscription::open(client, &[queue], 10, None).await?;
    for delivery in subscription.next_deliveries(2).await? {
        let task_id = docket_tests::delivered_task_id(&delivery)?;
        if task_id == ids[0] {
            ack(client, &delivery.lease_id, "done").await?;
        } else {
            let state = nack(client, &delivery.lease_id, "fatal").await?;
            assert_eq!(state, TaskState::Dead, "Nack of a single-attempt task");
        }
    }
    Ok((ids[0].clone(), ids[1].clone()))
}

#[tokio::test(flavor = "multi_thread")]
async fn finished_tasks_purged_after_retention() -> Result<()> {
    let data_dir = temp_dir();
    let broker = BrokerProcess::start(
        data_dir.path(),
        &[
            "--retention",
            "1s",
            "--dead-retention",
            "1s",
            "--purge-interval",
            "300ms",
        ],
    )
    .await?;
    let mut client = broker.client().await?;

    let (succeeded, dead) = finish_two_tasks(&mut client, QUEUE).await?;
    let cancelled = enqueue(&mut client, vec![new_task(QUEUE, "job", "cancelled")])
        .await?
        .remove(0);
    client
        .cancel_task(CancelTaskRequest {
            task_id: cancelled.clone(),
        })
        .await?;
    let finished_at = Instant::now();
    let pending = enqueue(&mut client, vec![new_task(IDLE_QUEUE, "job", "waits")])
        .await?
        .remove(0);

    let stats = queue_stats(&mut client, QUEUE).await?;
    assert_eq!(
        (stats.succeeded, stats.dead, stats.cancelled),
        (1, 1, 1),
        "(succeeded, dead, cancelled) counts before the retention ends"
    );

    // Shortly before the retention ends, counted from the broker's record of the
    // finish, every finished task is still there.
    let succeeded_status = get_task(&mut client, &succeeded).await?;
    let finished_time = system_time(
        succeeded_status
            .updated_at
            .as_ref()
            .context("succeeded task without updated_at")?,
    );
    let almost_expired = finished_time + RETENTION - Duration::from_millis(300);
    if let Ok(wait) = almost_expired.duration_since(SystemTime::now()) {
        tokio::time::sleep(wait).await;
    }
    for (name, id) in [
        ("succeeded", &succeeded),
        ("dead", &dead),
        ("cancelled", &cancelled),
    ] {
        let status = get_task(&mut client, id)
            .await
            .with_context(|| format!("the {name} task was purged before its retention ended"))?;
        assert_ne!(
            status.state(),
            TaskState::Pending,
            "the {name} task is pending"
        );
    }

    for (name, id) in [
        ("succeeded", &succeeded),
        ("dead", &dead),
        ("cancelled", &cancelled),
    ] {
        wait_for_not_found(&mut client, id)
            .await
            .with_context(|| format!("the {name} task was not purged"))?;
        let elapsed = finished_at.elapsed();
        assert!(
            elapsed <= RETENTION + PURGE_INTERVAL + LATE_PURGE_SLACK,
            "the {name} task was purged {elapsed:?} after it finished, long after its \
             {RETENTION:?} retention"
        );
    }
    let stats = wait_for_stats(&mut client, QUEUE, "finished counts at 0", |stats| {
        stats.succeeded == 0 && stats.dead == 0 && stats.cancelled == 0
    })
    .await?;
    assert_eq!(stats.pending, 0, "pending count of the purged queue");

    // The pending task is older than the retention and has seen several purges.
    tokio::time::sleep(RETENTION).await;
    let status = get_task(&mut client, &pending).await?;
    assert_eq!(
        status.state(),
        TaskState::Pending,
        "a pending task after the retention"
    );
    assert_eq!(
        queue_stats(&mut client, IDLE_QUEUE).await?.pending,
        1,
        "pending count of the idle queue"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn tasks_kept_until_retention_ends() -> Result<()> {
    let data_dir = temp_dir();
    let broker = BrokerProcess::start(
        data_dir.path(),
        &[
            "--retention",
            "1s",
            "--dead-retention",
            "1h",
            "--purge-interval",
            "300ms",
        ],
    )
    .await?;
    let mut client = broker.client().await?;

    // The queue's own setting overrides the broker's 1 s retention.
    client
        .update_queue_settings(UpdateQueueSettingsRequest {
            queue: KEPT_QUEUE.to_string(),
            settings: Some(QueueSettings {
                retention: Some(proto_duration(Duration::from_secs(60))),
                ..QueueSettings::default()
            }),
        })
        .await?;

    let (succeeded, dead) = finish_two_tasks(&mut client, QUEUE).await?;
    let (kept_succeeded, _) = finish_two_tasks(&mut client, KEPT_QUEUE).await?;

    wait_for_not_found(&mut client, &succeeded)
        .await
        .context("the succeeded task was not purged after its 1 s retention")?;

    // Let two more purges run before checking what must stay.
    tokio::time::sleep(PURGE_INTERVAL * 2).await;
    let status = get_task(&mut client, &dead).await?;
    assert_eq!(
        status.state(),
        TaskState::Dead,
        "a dead task under a 1 h dead retention"
    );
    let status = get_task(&mut client, &kept_succeeded).await?;
    assert_eq!(
        status.state(),
        TaskState::Succeeded,
        "a succeeded task of a queue with a 1 minute retention"
    );
    let stats = queue_stats(&mut client, QUEUE).await?;
    assert_eq!(stats.succeeded, 0, "succeeded count after the purge");
    assert_eq!(stats.dead, 1, "dead count under a 1 h dead retention");
    Ok(())
}
