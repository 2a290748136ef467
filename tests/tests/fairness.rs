//! Weighted fairness across the queues of one subscription: deliveries follow the
//! weights while every queue has ready tasks, and no queue with ready tasks starves.

use std::collections::HashMap;

use anyhow::Result;
use docket_proto::v1::broker_client::BrokerClient;
use docket_proto::v1::{Delivery, SubscribeRequest};
use docket_tests::{
    BrokerProcess, QUIET, Subscription, ack, assert_rejected, enqueue, new_task, temp_dir,
};
use tonic::transport::Channel;
use tonic::{Code, Status};

const HEAVY: &str = "heavy";
const LIGHT: &str = "light";

/// Tasks enqueued in each queue, more than any test receives, so that both queues keep a
/// backlog throughout.
const BACKLOG: usize = 60;

fn weighted_request(max_in_flight: u32, weights: &[(&str, u32)]) -> SubscribeRequest {
    SubscribeRequest {
        queues: vec![HEAVY.to_string(), LIGHT.to_string()],
        max_in_flight,
        lease_duration: None,
        weights: weights
            .iter()
            .map(|(queue, weight)| (queue.to_string(), *weight))
            .collect(),
    }
}

/// Enqueues [`BACKLOG`] tasks in each of `queues`, one queue after the other.
async fn fill_backlogs(client: &mut BrokerClient<Channel>, queues: &[&str]) -> Result<()> {
    for queue in queues {
        let tasks = (0..BACKLOG)
            .map(|index| new_task(queue, "job", format!("{queue}-{index}")))
            .collect();
        enqueue(client, tasks).await?;
    }
    Ok(())
}

fn queue_of(delivery: &Delivery) -> String {
    delivery
        .task
        .as_ref()
        .map(|task| task.queue.clone())
        .unwrap_or_default()
}

/// Asserts that `queues`, the queue of each delivery in order, follow a 3:1 share.
fn assert_three_to_one(case: &str, queues: &[String]) {
    let heavy = queues.iter().filter(|queue| *queue == HEAVY).count();
    let light = queues.iter().filter(|queue| *queue == LIGHT).count();
    assert_eq!(
        heavy + light,
        queues.len(),
        "{case}: deliveries from other queues: {queues:?}"
    );
    let expected_heavy = queues.len() * 3 / 4;
    assert!(
        heavy.abs_diff(expected_heavy) <= 3,
        "{case}: {heavy} of {} deliveries from weight 3, expected about {expected_heavy}; \
         order {queues:?}",
        queues.len()
    );
    let first_light = queues.iter().position(|queue| queue == LIGHT);
    assert!(
        first_light.is_some_and(|position| position < 4),
        "{case}: the weight-1 queue was not among the first 4 deliveries: {queues:?}"
    );
    // No run of the heavy queue is much longer than its weight allows.
    let longest_heavy_run = queues
        .split(|queue| queue == LIGHT)
        .map(<[String]>::len)
        .max()
        .unwrap_or(0);
    assert!(
        longest_heavy_run <= 6,
        "{case}: {longest_heavy_run} deliveries in a row from the weight-3 queue: {queues:?}"
    );
}

/// Opens a Subscribe stream and returns its error, whether the broker rejects the call
/// itself or ends the stream with an error as its first message.
async fn subscribe_status(
    client: &mut BrokerClient<Channel>,
    request: SubscribeRequest,
) -> Result<(), Status> {
    let mut stream = client.subscribe(request).await?.into_inner();
    match tokio::time::timeout(QUIET, stream.message()).await {
        Ok(Err(status)) => Err(status),
        _ => Ok(()),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn weights_share_deliveries_three_to_one() -> Result<()> {
    let data_dir = temp_dir();
    let broker = BrokerProcess::start(data_dir.path(), &[]).await?;
    let mut client = broker.client().await?;
    fill_backlogs(&mut client, &[HEAVY, LIGHT]).await?;

    let request = weighted_request(40, &[(HEAVY, 3), (LIGHT, 1)]);
    let mut subscription = Subscription::open_request(&mut client, request).await?;
    let deliveries = subscription.next_deliveries(40).await?;
    let queues: Vec<String> = deliveries.iter().map(queue_of).collect();
    assert_three_to_one("40 deliveries in flight at once", &queues);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn weights_hold_when_acked_one_by_one() -> Result<()> {
    let data_dir = temp_dir();
    let broker = BrokerProcess::start(data_dir.path(), &[]).await?;
    let mut client = broker.client().await?;
    fill_backlogs(&mut client, &[HEAVY, LIGHT]).await?;

    // One slot: each delivery waits for the Ack of the previous one, so the broker picks
    // a queue 24 separate times.
    let request = weighted_request(1, &[(HEAVY, 3), (LIGHT, 1)]);
    let mut subscription = Subscription::open_request(&mut client, request).await?;
    let mut queues = Vec::new();
    for _ in 0..24 {
        let delivery = subscription.next_delivery().await?;
        queues.push(queue_of(&delivery));
        ack(&mut client, &delivery.lease_id, "done").await?;
    }
    assert_three_to_one("24 deliveries acked one by one", &queues);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn lone_backlog_gets_every_delivery() -> Result<()> {
    let data_dir = temp_dir();
    let broker = BrokerProcess::start(data_dir.path(), &[]).await?;
    let mut client = broker.client().await?;

    // Only the weight-1 queue has tasks: its weight does not hold it back.
    fill_backlogs(&mut client, &[LIGHT]).await?;
    let request = weighted_request(20, &[(HEAVY, 100), (LIGHT, 1)]);
    let mut subscription = Subscription::open_request(&mut client, request).await?;
    let deliveries = subscription.next_deliveries(20).await?;
    let counts = deliveries
        .iter()
        .map(queue_of)
        .fold(HashMap::new(), |mut counts, queue| {
            *counts.entry(queue).or_insert(0) += 1;
            counts
        });
    assert_eq!(
        counts.get(LIGHT).copied(),
        Some(20),
        "deliveries from the only queue with tasks: {counts:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_weights_rejected() -> Result<()> {
    let data_dir = temp_dir();
    let broker = BrokerProcess::start(data_dir.path(), &[]).await?;
    let mut client = broker.client().await?;

    let cases = [
        (
            "weight for a queue not subscribed",
            weighted_request(1, &[(HEAVY, 2), ("elsewhere", 1)]),
        ),
        ("weight 0", weighted_request(1, &[(HEAVY, 0)])),
        ("weight 101", weighted_request(1, &[(LIGHT, 101)])),
    ];
    for (case, request) in cases {
        let result = subscribe_status(&mut client, request).await;
        assert_rejected(case, result, Code::InvalidArgument, "weights");
    }

    let limits = weighted_request(1, &[(HEAVY, 100), (LIGHT, 1)]);
    let accepted = subscribe_status(&mut client, limits).await;
    assert!(
        accepted.is_ok(),
        "weights 1 and 100, the documented bounds, were rejected: {accepted:?}"
    );
    Ok(())
}
