//! `max_in_flight`: the broker never has more unsettled deliveries on a stream than the
//! subscriber allowed.

use std::collections::HashSet;

use anyhow::{Context, Result};
use docket_tests::{
    BrokerProcess, QUIET, Subscription, ack, delivered_task_id, enqueue, nack, new_task, temp_dir,
};

const QUEUE: &str = "bulk";
const TASK_COUNT: usize = 50;
const MAX_IN_FLIGHT: u32 = 5;

#[tokio::test(flavor = "multi_thread")]
async fn max_in_flight_limits_unsettled_deliveries() -> Result<()> {
    let data_dir = temp_dir();
    let broker = BrokerProcess::start(data_dir.path(), &[]).await?;
    let mut client = broker.client().await?;

    let tasks = (0..TASK_COUNT)
        .map(|index| new_task(QUEUE, "job", format!("task-{index}")))
        .collect();
    enqueue(&mut client, tasks).await?;

    let mut subscription = Subscription::open(&mut client, &[QUEUE], MAX_IN_FLIGHT, None).await?;
    let mut in_flight = subscription
        .next_deliveries(MAX_IN_FLIGHT as usize)
        .await
        .context("the first max_in_flight deliveries did not arrive")?;
    subscription
        .expect_no_delivery(QUIET)
        .await
        .context("a delivery past max_in_flight 5 arrived before any was settled")?;

    let mut seen: HashSet<String> = HashSet::new();
    for delivery in &in_flight {
        seen.insert(delivered_task_id(delivery)?);
    }

    // Settling one lease, by Ack, frees exactly one slot.
    let acked = in_flight.remove(0);
    ack(&mut client, &acked.lease_id, "done").await?;
    let next = subscription
        .next_delivery()
        .await
        .context("no delivery after an Ack freed a slot")?;
    assert!(
        seen.insert(delivered_task_id(&next)?),
        "the delivery after the Ack repeats a task already in flight"
    );
    in_flight.push(next);
    subscription
        .expect_no_delivery(QUIET)
        .await
        .context("more than one delivery arrived after one Ack")?;

    // Settling one lease by Nack frees exactly one slot too.
    let nacked = in_flight.remove(0);
    nack(&mut client, &nacked.lease_id, "retry later").await?;
    let next = subscription
        .next_delivery()
        .await
        .context("no delivery after a Nack freed a slot")?;
    in_flight.push(next);
    subscription
        .expect_no_delivery(QUIET)
        .await
        .context("more than one delivery arrived after one Nack")?;

    assert_eq!(
        in_flight.len(),
        MAX_IN_FLIGHT as usize,
        "deliveries held by the test"
    );
    Ok(())
}
