//! Restart on the same data directory: every committed state change survives a graceful
//! stop and a SIGKILL alike.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use anyhow::{Context, Result};
use docket_proto::v1::TaskState;
use docket_proto::v1::broker_client::BrokerClient;
use docket_tests::{
    BrokerProcess, QUIET, Subscription, ack, delivered_task_id, enqueue, get_task, nack, new_task,
    temp_dir,
};
use tonic::transport::Channel;

const DONE_QUEUE: &str = "done";
const DOOMED_QUEUE: &str = "doomed";
const WAITING_QUEUE: &str = "waiting";
const HELD_QUEUE: &str = "held";

/// Lease of the task held when the broker stops. It is short so that the task comes back
/// within the test's wait whether the restarted broker releases leases at once or lets
/// them run out.
const HELD_LEASE: Duration = Duration::from_secs(2);

#[derive(Clone, Copy, Debug)]
enum StopMode {
    Graceful,
    Kill9,
}

/// Tasks in each state when the broker stops.
struct Fixture {
    acked: Vec<String>,
    dead: Vec<String>,
    pending: Vec<String>,
    held_task: String,
    /// The open stream that holds the lease of `held_task`, and its connection. Both stay open
    /// until the broker stops.
    held_stream: Subscription,
    held_client: BrokerClient<Channel>,
}

/// Brings tasks into every state: SUCCEEDED, DEAD, PENDING and LEASED.
async fn create_fixture(broker: &BrokerProcess) -> Result<Fixture> {
    let mut client = broker.client().await?;

    let done_tasks = (0..3)
        .map(|index| new_task(DONE_QUEUE, "job", format!("done-{index}")))
        .collect();
    let acked = enqueue(&mut client, done_tasks).await?;
    let doomed_tasks = (0..2)
        .map(|index| {
            let mut task = new_task(DOOMED_QUEUE, "job", format!("doomed-{index}"));
            task.max_attempts = 1;
            task
        })
        .collect();
    let dead = enqueue(&mut client, doomed_tasks).await?;
    let waiting_tasks = (0..4)
        .map(|index| new_task(WAITING_QUEUE, "job", format!("waiting-{index}")))
        .collect();
    let pending = enqueue(&mut client, waiting_tasks).await?;
    let held_task = enqueue(&mut client, vec![new_task(HELD_QUEUE, "job", "held")])
        .await?
        .remove(0);

    let mut done = Subscription::open(&mut client, &[DONE_QUEUE], 10, None).await?;
    for delivery in done.next_deliveries(acked.len()).await? {
        let task_id = delivered_task_id(&delivery)?;
        ack(
            &mut client,
            &delivery.lease_id,
            format!("result-of-{task_id}"),
        )
        .await?;
    }
    let mut doomed = Subscription::open(&mut client, &[DOOMED_QUEUE], 10, None).await?;
    for delivery in doomed.next_deliveries(dead.len()).await? {
        let state = nack(&mut client, &delivery.lease_id, "permanent failure").await?;
        assert_eq!(state, TaskState::Dead, "Nack of a task with max_attempts 1");
    }

    let mut held_client = broker.client().await?;
    let mut held_stream =
        Subscription::open(&mut held_client, &[HELD_QUEUE], 1, Some(HELD_LEASE)).await?;
    let held_delivery = held_stream.next_delivery().await?;
    assert_eq!(delivered_task_id(&held_delivery)?, held_task, "held task");

    for id in &acked {
        let status = get_task(&mut client, id).await?;
        assert_eq!(
            status.state(),
            TaskState::Succeeded,
            "acked task {id} before the stop"
        );
    }
    for id in &dead {
        let status = get_task(&mut client, id).await?;
        assert_eq!(
            status.state(),
            TaskState::Dead,
            "dead task {id} before the stop"
        );
    }
    Ok(Fixture {
        acked,
        dead,
        pending,
        held_task,
        held_stream,
        held_client,
    })
}

async fn restart_keeps_task_states(mode: StopMode) -> Result<()> {
    let data_dir = temp_dir();
    let mut first = BrokerProcess::start(data_dir.path(), &[]).await?;
    let fixture = create_fixture(&first).await?;

    // The stop happens while a stream is open and holds a lease, so a graceful stop must
    // also end open streams.
    match mode {
        StopMode::Graceful => {
            let status = first.stop().await?;
            assert!(
                status.success(),
                "broker exited with {status} after SIGTERM, expected success"
            );
        }
        StopMode::Kill9 => {
            first.kill9()?;
        }
    }
    drop(fixture.held_stream);
    drop(fixture.held_client);

    let second = BrokerProcess::start(data_dir.path(), &[]).await?;
    let mut client = second.client().await?;

    for id in &fixture.acked {
        let status = get_task(&mut client, id)
            .await
            .with_context(|| format!("acked task {id} after restart"))?;
        assert_eq!(
            status.state(),
            TaskState::Succeeded,
            "acked task {id} after restart"
        );
        assert_eq!(
            status.attempts, 1,
            "attempts of acked task {id} after restart"
        );
        assert_eq!(
            String::from_utf8_lossy(&status.result),
            format!("result-of-{id}"),
            "result of acked task {id} after restart"
        );
    }
    for id in &fixture.dead {
        let status = get_task(&mut client, id)
            .await
            .with_context(|| format!("dead task {id} after restart"))?;
        assert_eq!(
            status.state(),
            TaskState::Dead,
            "dead task {id} after restart"
        );
        assert_eq!(
            status.attempts, 1,
            "attempts of dead task {id} after restart"
        );
        assert_eq!(
            status.last_error, "permanent failure",
            "last error of dead task {id} after restart"
        );
    }
    for id in &fixture.pending {
        let status = get_task(&mut client, id)
            .await
            .with_context(|| format!("pending task {id} after restart"))?;
        assert_eq!(
            status.state(),
            TaskState::Pending,
            "pending task {id} after restart"
        );
        assert_eq!(
            status.attempts, 0,
            "attempts of pending task {id} after restart"
        );
        let task = status.task.context("status without a task")?;
        assert_eq!(
            task.queue, WAITING_QUEUE,
            "queue of pending task {id} after restart"
        );
    }

    let mut subscription = Subscription::open(
        &mut client,
        &[DONE_QUEUE, DOOMED_QUEUE, WAITING_QUEUE, HELD_QUEUE],
        100,
        None,
    )
    .await?;
    let expected_count = fixture.pending.len() + 1;
    let deliveries = subscription.next_deliveries(expected_count).await?;
    let mut attempts: HashMap<String, u32> = HashMap::new();
    for delivery in &deliveries {
        let task_id = delivered_task_id(delivery)?;
        assert!(
            attempts.insert(task_id.clone(), delivery.attempt).is_none(),
            "task {task_id} was delivered twice after restart"
        );
        ack(&mut client, &delivery.lease_id, "after restart").await?;
    }
    subscription
        .expect_no_delivery(QUIET)
        .await
        .context("an acked or dead task was delivered after restart")?;

    let mut expected: HashSet<String> = fixture.pending.iter().cloned().collect();
    expected.insert(fixture.held_task.clone());
    let delivered: HashSet<String> = attempts.keys().cloned().collect();
    assert_eq!(
        delivered, expected,
        "tasks delivered after restart, expected the pending and the held ones"
    );
    for id in &fixture.pending {
        assert_eq!(
            attempts[id], 1,
            "attempt number of pending task {id} after restart"
        );
    }
    let held_attempt = attempts[&fixture.held_task];
    match mode {
        // A graceful stop ends the open stream, which counts as a failed attempt.
        StopMode::Graceful => assert_eq!(
            held_attempt, 2,
            "attempt number of the task whose lease the graceful stop ended"
        ),
        // NOTE: the broker keeps leases in memory only, so after SIGKILL it does not know
        // that the interrupted attempt started, and the redelivery may repeat attempt 1.
        StopMode::Kill9 => assert!(
            (1..=2).contains(&held_attempt),
            "attempt number {held_attempt} of the task whose lease SIGKILL ended, \
             expected 1 or 2"
        ),
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn graceful_restart_keeps_task_states() -> Result<()> {
    restart_keeps_task_states(StopMode::Graceful).await
}

#[tokio::test(flavor = "multi_thread")]
async fn kill9_restart_keeps_task_states() -> Result<()> {
    restart_keeps_task_states(StopMode::Kill9).await
}
