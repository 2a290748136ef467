//! Delivery order: a higher priority first, and equal priorities in enqueue order.

use anyhow::{Context, Result};
use docket_proto::v1::{Delivery, NewTask};
use docket_tests::{BrokerProcess, QUIET, Subscription, ack, enqueue, nack, new_task, temp_dir};

const QUEUE: &str = "ordered";

fn task_with_priority(label: &str, priority: i32) -> NewTask {
    let mut task = new_task(QUEUE, "job", label.to_string());
    task.priority = priority;
    task
}

fn payload_text(delivery: &Delivery) -> Result<String> {
    let task = delivery.task.as_ref().context("delivery without a task")?;
    Ok(String::from_utf8_lossy(&task.payload).into_owned())
}

/// Receives every task one at a time, acknowledging each before the next is sent, and
/// returns the payloads in delivery order.
async fn delivery_order(broker: &BrokerProcess, count: usize) -> Result<Vec<String>> {
    let mut client = broker.client().await?;
    let mut subscription = Subscription::open(&mut client, &[QUEUE], 1, None).await?;
    let mut order = Vec::with_capacity(count);
    for _ in 0..count {
        let delivery = subscription.next_delivery().await?;
        order.push(payload_text(&delivery)?);
        ack(&mut client, &delivery.lease_id, "").await?;
    }
    subscription.expect_no_delivery(QUIET).await?;
    Ok(order)
}

#[tokio::test(flavor = "multi_thread")]
async fn higher_priority_delivered_first() -> Result<()> {
    let data_dir = temp_dir();
    let broker = BrokerProcess::start(data_dir.path(), &[]).await?;
    let mut client = broker.client().await?;

    // Two batches, so that the order also applies across Enqueue calls.
    enqueue(
        &mut client,
        vec![
            task_with_priority("p0-a", 0),
            task_with_priority("p5-a", 5),
            task_with_priority("p0-b", 0),
            task_with_priority("p-3-a", -3),
        ],
    )
    .await?;
    enqueue(
        &mut client,
        vec![
            task_with_priority("p10-a", 10),
            task_with_priority("p5-b", 5),
            task_with_priority("p0-c", 0),
            task_with_priority("p-3-b", -3),
            task_with_priority("pmax", i32::MAX),
            task_with_priority("pmin", i32::MIN),
        ],
    )
    .await?;

    let order = delivery_order(&broker, 10).await?;
    let expected = [
        "pmax", "p10-a", "p5-a", "p5-b", "p0-a", "p0-b", "p0-c", "p-3-a", "p-3-b", "pmin",
    ];
    assert_eq!(
        order, expected,
        "delivery order by priority, then enqueue order"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn equal_priority_delivered_in_enqueue_order() -> Result<()> {
    let data_dir = temp_dir();
    let broker = BrokerProcess::start(data_dir.path(), &[]).await?;
    let mut client = broker.client().await?;

    // Single-task calls and batches mixed: many tasks are created within the same
    // millisecond, so the order cannot come from timestamps alone.
    let mut expected = Vec::new();
    for call in 0..10 {
        let batch: Vec<NewTask> = (0..call % 3 + 1)
            .map(|index| {
                let label = format!("call-{call}-task-{index}");
                expected.push(label.clone());
                task_with_priority(&label, 1)
            })
            .collect();
        enqueue(&mut client, batch).await?;
    }

    let order = delivery_order(&broker, expected.len()).await?;
    assert_eq!(order, expected, "delivery order of equal-priority tasks");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn retried_task_keeps_its_priority() -> Result<()> {
    let data_dir = temp_dir();
    let broker = BrokerProcess::start(data_dir.path(), &[]).await?;
    let mut client = broker.client().await?;

    enqueue(
        &mut client,
        vec![
            task_with_priority("urgent", 9),
            task_with_priority("normal", 0),
        ],
    )
    .await?;

    let mut subscription = Subscription::open(&mut client, &[QUEUE], 1, None).await?;
    let first = subscription.next_delivery().await?;
    assert_eq!(payload_text(&first)?, "urgent", "first delivery");
    nack(&mut client, &first.lease_id, "try again").await?;

    let second = subscription.next_delivery().await?;
    assert_eq!(
        payload_text(&second)?,
        "urgent",
        "the nacked high-priority task is offered again before the lower one"
    );
    assert_eq!(second.attempt, 2, "attempt number of the retried task");
    Ok(())
}
