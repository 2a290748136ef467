//! Heartbeats: an idle Subscribe stream receives one at the configured interval.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use docket_proto::v1::subscribe_response::Event;
use docket_tests::{BrokerProcess, Subscription, ack, enqueue, new_task, temp_dir};

const QUEUE: &str = "idle";
const HEARTBEAT_COUNT: usize = 3;

#[tokio::test(flavor = "multi_thread")]
async fn idle_stream_receives_heartbeats() -> Result<()> {
    let data_dir = temp_dir();
    let broker = BrokerProcess::start(data_dir.path(), &["--heartbeat-interval", "200ms"]).await?;
    let mut client = broker.client().await?;

    let mut subscription = Subscription::open(&mut client, &[QUEUE], 1, None).await?;
    let started = tokio::time::Instant::now();
    for received in 0..HEARTBEAT_COUNT {
        // Three intervals of 200 ms leave room for scheduling delays on a loaded machine.
        let event = subscription.next_event(Duration::from_secs(5)).await?;
        let Event::Heartbeat(heartbeat) = event else {
            panic!("event {received} on a stream of an empty queue is not a heartbeat: {event:?}");
        };
        let server_time = heartbeat
            .server_time
            .expect("heartbeat without server_time");
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
        let now = i64::try_from(now)?;
        assert!(
            (server_time.seconds - now).abs() <= 5,
            "heartbeat server_time {} is more than 5 s from the local clock {now}",
            server_time.seconds
        );
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(300),
        "{HEARTBEAT_COUNT} heartbeats arrived in {elapsed:?}, faster than one per 200 ms"
    );
    assert_eq!(
        subscription.heartbeats, HEARTBEAT_COUNT,
        "heartbeats counted on the stream"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn stream_with_heartbeats_still_delivers() -> Result<()> {
    let data_dir = temp_dir();
    let broker = BrokerProcess::start(data_dir.path(), &["--heartbeat-interval", "200ms"]).await?;
    let mut client = broker.client().await?;

    let mut subscription = Subscription::open(&mut client, &[QUEUE], 1, None).await?;
    let first = subscription.next_event(Duration::from_secs(5)).await?;
    assert!(
        matches!(first, Event::Heartbeat(_)),
        "first event on an empty queue is not a heartbeat: {first:?}"
    );

    let id = enqueue(&mut client, vec![new_task(QUEUE, "job", "late")])
        .await?
        .remove(0);
    let delivery = subscription.next_delivery().await?;
    let task = delivery.task.as_ref().expect("delivery without a task");
    assert_eq!(task.id, id, "task delivered on a stream that was idle");
    ack(&mut client, &delivery.lease_id, "").await?;
    Ok(())
}
