//! The broker's health service through its life: NOT_SERVING while it recovers its store,
//! SERVING once ready, NOT_SERVING while commits fail and SERVING again after, and
//! NOT_SERVING from the first moment of shutdown.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use docket_tests::v1::TaskState;
use docket_tests::{
    BROKER_SERVICE, BrokerProcess, ServingStatus, Subscription, WAIT, enqueue, get_task, new_task,
    temp_dir, within,
};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

const QUEUE: &str = "health";

#[tokio::test]
async fn not_serving_until_store_recovered() -> Result<()> {
    let data_dir = temp_dir();
    let hold = data_dir.path().join("hold-recovery");
    std::fs::write(&hold, "")?;
    let hold_arg = hold.to_str().context("temp path is not UTF-8")?;
    let broker =
        BrokerProcess::start_unready(data_dir.path(), &["--hold-recovery-while-exists", hold_arg])
            .await?;

    // The port responds at once: health and reflection work, Broker calls do not.
    for service in ["", BROKER_SERVICE] {
        assert_eq!(
            broker.health(service).await?,
            ServingStatus::NotServing,
            "health of {service:?} during recovery"
        );
    }
    let mut client = broker.client().await?;
    let refused = client
        .enqueue(docket_tests::v1::EnqueueRequest {
            tasks: vec![new_task(QUEUE, "job", "early")],
        })
        .await
        .expect_err("Enqueue before the store is ready");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(
        refused.message().contains("recovers its store"),
        "message: {}",
        refused.message()
    );

    std::fs::remove_file(&hold)?;
    broker.wait_for_health(ServingStatus::Serving).await?;
    assert_eq!(broker.health("").await?, ServingStatus::Serving);
    let task_ids = enqueue(&mut client, vec![new_task(QUEUE, "job", "ready")]).await?;
    assert_eq!(task_ids.len(), 1);
    Ok(())
}

#[tokio::test]
async fn not_serving_while_commits_fail() -> Result<()> {
    let data_dir = temp_dir();
    let fault = data_dir.path().join("fail-commits");
    let fault_arg = fault.to_str().context("temp path is not UTF-8")?;
    let broker =
        BrokerProcess::start(data_dir.path(), &["--fail-commits-while-exists", fault_arg]).await?;
    let mut client = broker.client().await?;
    let stored = enqueue(&mut client, vec![new_task(QUEUE, "job", "before")]).await?;

    std::fs::write(&fault, "")?;
    let failed = client
        .enqueue(docket_tests::v1::EnqueueRequest {
            tasks: vec![new_task(QUEUE, "job", "during")],
        })
        .await
        .expect_err("Enqueue while commits fail");
    assert!(
        failed.message().contains("commit failed"),
        "status: {failed:?}"
    );
    broker.wait_for_health(ServingStatus::NotServing).await?;
    assert_eq!(broker.health("").await?, ServingStatus::NotServing);

    // The next commit that succeeds makes the broker healthy again, and nothing stored
    // before the failure is lost.
    std::fs::remove_file(&fault)?;
    let after = enqueue(&mut client, vec![new_task(QUEUE, "job", "after")]).await?;
    broker.wait_for_health(ServingStatus::Serving).await?;
    for task_id in stored.iter().chain(&after) {
        let status = get_task(&mut client, task_id).await?;
        assert_eq!(status.state(), TaskState::Pending, "{status:?}");
    }
    Ok(())
}

#[tokio::test]
async fn shutdown_reports_not_serving_first() -> Result<()> {
    let data_dir = temp_dir();
    let mut broker = BrokerProcess::start(data_dir.path(), &[]).await?;
    let mut client = broker.client().await?;
    enqueue(&mut client, vec![new_task(QUEUE, "job", "held")]).await?;
    let mut subscription = Subscription::open(&mut client, &[QUEUE], 1, None).await?;
    subscription.next_delivery().await?;

    let mut health = HealthClient::new(broker.client_channel().await?);
    let mut watch = health
        .watch(HealthCheckRequest {
            service: BROKER_SERVICE.to_owned(),
        })
        .await?
        .into_inner();
    let first = within(WAIT, "the first health status", async {
        watch.message().await?.context("health watch ended")
    })
    .await?;
    assert_eq!(first.status(), ServingStatus::Serving);

    let status = broker.stop().await?;
    assert!(
        status.success(),
        "broker exit {status}; stderr:\n{}",
        broker.stderr_output()
    );

    // The watch saw NOT_SERVING before its stream ended with the server.
    let mut seen = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), watch.message()).await {
            Ok(Ok(Some(message))) => seen.push(message.status()),
            Ok(Ok(None) | Err(_)) => break,
            Err(_) => bail!("the health watch neither changed nor ended: {seen:?}"),
        }
    }
    assert_eq!(seen, [ServingStatus::NotServing], "statuses after SIGTERM");

    // A new call on the open connection is refused with UNAVAILABLE, which clients
    // retry elsewhere.
    let refused = client
        .enqueue(docket_tests::v1::EnqueueRequest {
            tasks: vec![new_task(QUEUE, "job", "late")],
        })
        .await
        .expect_err("Enqueue after SIGTERM");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");

    // The stream holding a lease ended with UNAVAILABLE, which workers treat as a reason
    // to reconnect.
    let ended = subscription
        .next_event(Duration::from_secs(5))
        .await
        .expect_err("the Subscribe stream outlived the broker");
    assert!(
        format!("{ended:#}").contains("shutting down"),
        "stream end: {ended:#}"
    );
    Ok(())
}
