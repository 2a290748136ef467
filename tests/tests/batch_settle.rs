//! Ack and Nack batches: every item is settled on its own, so a stale, unknown or
//! malformed lease fails alone, and results come back in request order.

use std::time::Duration;

use anyhow::Result;
use docket_proto::v1::{
    Acknowledgement, Delivery, NegativeAcknowledgement, SettleResult, TaskState,
};
use docket_tests::{
    BrokerProcess, Subscription, ack, ack_items, delivered_task_id, enqueue, get_task, new_task,
    proto_duration, temp_dir,
};
use tonic::Code;

const QUEUE: &str = "batch";

/// A lease id that is well-formed but was never issued by the broker.
const UNKNOWN_LEASE_ID: &str = "0190a1b2-c3d4-7e5f-8a6b-000000000000";

/// Enqueues `count` tasks with 3 attempts each and receives them all on one stream.
async fn deliver_tasks(
    broker: &BrokerProcess,
    count: usize,
) -> Result<(Subscription, Vec<String>, Vec<Delivery>)> {
    let mut client = broker.client().await?;
    let tasks = (0..count)
        .map(|index| {
            let mut task = new_task(QUEUE, "job", format!("task-{index}"));
            task.max_attempts = 3;
            task
        })
        .collect();
    let ids = enqueue(&mut client, tasks).await?;
    let mut subscription = Subscription::open(&mut client, &[QUEUE], 100, None).await?;
    let deliveries = subscription.next_deliveries(count).await?;
    Ok((subscription, ids, deliveries))
}

/// Asserts that `result` echoes `lease_id` and has `code`.
fn assert_result(case: &str, result: &SettleResult, lease_id: &str, code: Code) {
    assert_eq!(
        result.lease_id, lease_id,
        "{case}: result does not echo the lease id"
    );
    assert_eq!(
        result.code, code as i32,
        "{case}: result code, message {:?}",
        result.message
    );
    if code == Code::Ok {
        assert!(
            result.message.is_empty(),
            "{case}: a settled lease has the message {:?}",
            result.message
        );
    } else {
        assert!(
            !result.message.is_empty(),
            "{case}: a failed item has no message"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn ack_batch_settles_around_stale_lease() -> Result<()> {
    let data_dir = temp_dir();
    let broker = BrokerProcess::start(data_dir.path(), &[]).await?;
    let mut client = broker.client().await?;
    let (_subscription, _ids, deliveries) = deliver_tasks(&broker, 3).await?;

    // The second delivery's lease is settled before the batch, which makes it stale.
    ack(&mut client, &deliveries[1].lease_id, "early").await?;
    let stale_task = delivered_task_id(&deliveries[1])?;
    let stale_before = get_task(&mut client, &stale_task).await?;

    let lease_ids = [
        deliveries[0].lease_id.clone(),
        deliveries[1].lease_id.clone(),
        UNKNOWN_LEASE_ID.to_string(),
        deliveries[2].lease_id.clone(),
    ];
    let acks = lease_ids
        .iter()
        .enumerate()
        .map(|(index, lease_id)| Acknowledgement {
            lease_id: lease_id.clone(),
            result: format!("result-{index}").into(),
        })
        .collect();
    let results = ack_items(&mut client, acks).await?;
    assert_eq!(results.len(), 4, "one result per acknowledgement");

    assert_result("first live lease", &results[0], &lease_ids[0], Code::Ok);
    assert_result(
        "lease acked before",
        &results[1],
        &lease_ids[1],
        Code::FailedPrecondition,
    );
    assert_result(
        "unknown lease",
        &results[2],
        &lease_ids[2],
        Code::FailedPrecondition,
    );
    assert_result("last live lease", &results[3], &lease_ids[3], Code::Ok);
    assert_eq!(
        results[0].state(),
        TaskState::Succeeded,
        "state in the first live lease's result"
    );
    assert_eq!(
        results[3].state(),
        TaskState::Succeeded,
        "state in the last live lease's result"
    );

    for (delivery, expected_result) in [(&deliveries[0], "result-0"), (&deliveries[2], "result-3")]
    {
        let task_id = delivered_task_id(delivery)?;
        let status = get_task(&mut client, &task_id).await?;
        assert_eq!(status.state(), TaskState::Succeeded, "task {task_id} state");
        assert_eq!(
            &status.result[..],
            expected_result.as_bytes(),
            "task {task_id} result"
        );
    }
    let stale_after = get_task(&mut client, &stale_task).await?;
    assert_eq!(
        &stale_after.result[..],
        b"early",
        "the stale acknowledgement replaced the stored result"
    );
    assert_eq!(
        stale_after.updated_at, stale_before.updated_at,
        "the stale acknowledgement changed the task"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn nack_batch_settles_around_stale_lease() -> Result<()> {
    let data_dir = temp_dir();
    let broker = BrokerProcess::start(data_dir.path(), &[]).await?;
    let mut client = broker.client().await?;
    let (_subscription, _ids, deliveries) = deliver_tasks(&broker, 3).await?;

    ack(&mut client, &deliveries[0].lease_id, "early").await?;
    let stale_task = delivered_task_id(&deliveries[0])?;

    let lease_ids = [
        deliveries[0].lease_id.clone(),
        deliveries[1].lease_id.clone(),
        UNKNOWN_LEASE_ID.to_string(),
        deliveries[2].lease_id.clone(),
    ];
    let nacks = lease_ids
        .iter()
        .enumerate()
        .map(|(index, lease_id)| NegativeAcknowledgement {
            lease_id: lease_id.clone(),
            error: format!("failure {index}"),
            ..Default::default()
        })
        .collect();
    let results = docket_tests::nack_items(&mut client, nacks).await?;
    assert_eq!(results.len(), 4, "one result per negative acknowledgement");

    assert_result(
        "lease acked before",
        &results[0],
        &lease_ids[0],
        Code::FailedPrecondition,
    );
    assert_result("first live lease", &results[1], &lease_ids[1], Code::Ok);
    assert_result(
        "unknown lease",
        &results[2],
        &lease_ids[2],
        Code::FailedPrecondition,
    );
    assert_result("last live lease", &results[3], &lease_ids[3], Code::Ok);

    // With the harness's zero backoff the failed tasks are ready again at once.
    for (index, delivery) in [(1, &deliveries[1]), (3, &deliveries[2])] {
        let task_id = delivered_task_id(delivery)?;
        assert!(
            matches!(
                results[index].state(),
                TaskState::Pending | TaskState::RetryWait
            ),
            "state in the result of task {task_id}: {:?}",
            results[index].state()
        );
        let status = get_task(&mut client, &task_id).await?;
        assert_eq!(status.attempts, 1, "task {task_id} finished attempts");
        assert_eq!(
            status.last_error,
            format!("failure {index}"),
            "task {task_id} last error"
        );
    }
    let stale = get_task(&mut client, &stale_task).await?;
    assert_eq!(
        stale.state(),
        TaskState::Succeeded,
        "the stale negative acknowledgement changed the acked task's state"
    );
    assert!(
        stale.last_error.is_empty(),
        "the stale negative acknowledgement stored the error {:?}",
        stale.last_error
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_item_fails_alone() -> Result<()> {
    let data_dir = temp_dir();
    let broker = BrokerProcess::start(data_dir.path(), &[]).await?;
    let mut client = broker.client().await?;
    let (_subscription, _ids, deliveries) = deliver_tasks(&broker, 5).await?;

    let acks = vec![
        Acknowledgement {
            lease_id: String::new(),
            result: Default::default(),
        },
        Acknowledgement {
            lease_id: deliveries[0].lease_id.clone(),
            result: "ok".into(),
        },
        Acknowledgement {
            lease_id: "not-a-lease-id".to_string(),
            result: Default::default(),
        },
        Acknowledgement {
            lease_id: deliveries[1].lease_id.clone(),
            result: "ok".into(),
        },
    ];
    let results = ack_items(&mut client, acks).await?;
    assert_eq!(results.len(), 4, "one Ack result per item");
    assert_result(
        "Ack with empty lease id",
        &results[0],
        "",
        Code::InvalidArgument,
    );
    assert!(
        results[0].message.contains("lease_id"),
        "Ack with empty lease id: message {:?} does not name lease_id",
        results[0].message
    );
    assert_result(
        "Ack of a live lease",
        &results[1],
        &deliveries[0].lease_id,
        Code::Ok,
    );
    // Lease ids are opaque, so any non-empty text is well-formed and names no lease.
    assert_result(
        "Ack with a lease id the broker never issued",
        &results[2],
        "not-a-lease-id",
        Code::FailedPrecondition,
    );
    assert_result(
        "second Ack of a live lease",
        &results[3],
        &deliveries[1].lease_id,
        Code::Ok,
    );

    let nacks = vec![
        NegativeAcknowledgement {
            lease_id: deliveries[2].lease_id.clone(),
            error: "failure".to_string(),
            ..Default::default()
        },
        NegativeAcknowledgement {
            lease_id: String::new(),
            error: "failure".to_string(),
            ..Default::default()
        },
        NegativeAcknowledgement {
            lease_id: deliveries[3].lease_id.clone(),
            error: "failure".to_string(),
            ..Default::default()
        },
        NegativeAcknowledgement {
            lease_id: deliveries[4].lease_id.clone(),
            error: "failure".to_string(),
            retry_delay: Some(proto_duration(Duration::from_secs(2 * 24 * 60 * 60))),
            no_retry: false,
            release: false,
        },
    ];
    let results = docket_tests::nack_items(&mut client, nacks).await?;
    assert_eq!(results.len(), 4, "one Nack result per item");
    assert_result(
        "Nack of a live lease",
        &results[0],
        &deliveries[2].lease_id,
        Code::Ok,
    );
    assert_result(
        "Nack with empty lease id",
        &results[1],
        "",
        Code::InvalidArgument,
    );
    assert!(
        results[1].message.contains("lease_id"),
        "Nack with empty lease id: message {:?} does not name lease_id",
        results[1].message
    );
    assert_result(
        "second Nack of a live lease",
        &results[2],
        &deliveries[3].lease_id,
        Code::Ok,
    );
    assert_result(
        "Nack with a retry_delay over 1 day",
        &results[3],
        &deliveries[4].lease_id,
        Code::InvalidArgument,
    );
    assert!(
        results[3].message.contains("retry_delay"),
        "Nack with a retry_delay over 1 day: message {:?} does not name retry_delay",
        results[3].message
    );

    for delivery in &deliveries[..2] {
        let task_id = delivered_task_id(delivery)?;
        let status = get_task(&mut client, &task_id).await?;
        assert_eq!(
            status.state(),
            TaskState::Succeeded,
            "task {task_id} acked next to a malformed item"
        );
    }
    for delivery in &deliveries[2..4] {
        let task_id = delivered_task_id(delivery)?;
        let status = get_task(&mut client, &task_id).await?;
        assert_eq!(
            status.attempts, 1,
            "task {task_id} nacked next to a malformed item: finished attempts"
        );
    }

    // The malformed item settled nothing, so its lease is still live.
    let untouched = delivered_task_id(&deliveries[4])?;
    let status = get_task(&mut client, &untouched).await?;
    assert_eq!(
        status.state(),
        TaskState::Leased,
        "state of the task whose Nack was malformed"
    );
    assert_eq!(
        status.attempts, 0,
        "finished attempts of the task whose Nack was malformed"
    );
    ack(&mut client, &deliveries[4].lease_id, "ok")
        .await
        .expect("Ack of the lease whose Nack was malformed");
    Ok(())
}
