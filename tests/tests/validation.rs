//! Invalid requests: each is rejected with its status code and a message that names the
//! field, changes nothing, and leaves the broker serving.

use std::fmt::Debug;
use std::time::Duration;

use anyhow::{Context, Result};
use docket_proto::v1::broker_client::BrokerClient;
use docket_proto::v1::{
    AckRequest, EnqueueRequest, GetTaskRequest, NackRequest, NewTask, SubscribeRequest, TaskState,
};
use docket_tests::{
    BrokerProcess, QUIET, Subscription, ack, enqueue, get_task, nack, new_task, proto_duration,
    temp_dir,
};
use tonic::transport::Channel;
use tonic::{Code, Status};

const QUEUE: &str = "valid";
const MAX_PAYLOAD_BYTES: usize = 1024;
const MAX_BATCH_SIZE: usize = 10;
const MAX_IN_FLIGHT: u32 = 100;
const MAX_RESULT_BYTES: usize = 16;

/// Arguments that lower the broker's limits, so that the tests reach them with small
/// requests.
const LIMIT_ARGS: [&str; 8] = [
    "--max-payload-bytes",
    "1024",
    "--max-batch-size",
    "10",
    "--max-in-flight",
    "100",
    "--max-result-bytes",
    "16",
];

/// A task id that is a well-formed UUIDv7 but was never issued by the broker.
const UNKNOWN_TASK_ID: &str = "0190a1b2-c3d4-7e5f-8a6b-7c8d9e0f1a2b";

/// A lease id that was never issued by the broker.
const UNKNOWN_LEASE_ID: &str = "0190a1b2-c3d4-7e5f-8a6b-000000000000";

/// Asserts that `result` is an error with `code` whose message contains `field`.
fn assert_rejected<T: Debug>(case: &str, result: Result<T, Status>, code: Code, field: &str) {
    let status = match result {
        Ok(value) => panic!("{case}: expected {code:?}, but the request succeeded with {value:?}"),
        Err(status) => status,
    };
    assert_eq!(
        status.code(),
        code,
        "{case}: wrong status code, message {:?}",
        status.message()
    );
    assert!(
        status.message().contains(field),
        "{case}: message {:?} does not name the field {field:?}",
        status.message()
    );
}

async fn enqueue_status(
    client: &mut BrokerClient<Channel>,
    tasks: Vec<NewTask>,
) -> Result<Vec<String>, Status> {
    client
        .enqueue(EnqueueRequest { tasks })
        .await
        .map(|response| response.into_inner().task_ids)
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

fn subscribe_request(queues: &[&str], max_in_flight: u32) -> SubscribeRequest {
    SubscribeRequest {
        queues: queues.iter().map(|queue| queue.to_string()).collect(),
        max_in_flight,
        lease_duration: None,
        weights: Default::default(),
    }
}

/// Enqueues a valid task and fetches it, to show that the broker still serves.
async fn assert_still_serving(client: &mut BrokerClient<Channel>) -> Result<()> {
    let id = enqueue(client, vec![new_task(QUEUE, "job", "still serving")])
        .await
        .context("a valid Enqueue failed after invalid requests")?
        .remove(0);
    let status = get_task(client, &id).await?;
    assert_eq!(
        status.state(),
        TaskState::Pending,
        "state of a valid task enqueued after invalid requests"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_enqueue_rejected() -> Result<()> {
    let data_dir = temp_dir();
    let broker = BrokerProcess::start(data_dir.path(), &LIMIT_ARGS).await?;
    let mut client = broker.client().await?;
    let invalid = Code::InvalidArgument;

    assert_rejected(
        "empty batch",
        enqueue_status(&mut client, Vec::new()).await,
        invalid,
        "tasks",
    );

    let oversize_batch = (0..=MAX_BATCH_SIZE)
        .map(|index| new_task(QUEUE, "job", format!("{index}")))
        .collect();
    assert_rejected(
        "batch of max-batch-size + 1 tasks",
        enqueue_status(&mut client, oversize_batch).await,
        invalid,
        "tasks",
    );

    let long_queue = "q".repeat(129);
    for queue in [
        "",
        "has space",
        long_queue.as_str(),
        "ünïcode",
        "slash/name",
        "colon:name",
    ] {
        let case = format!("queue name {queue:?}");
        assert_rejected(
            &case,
            enqueue_status(&mut client, vec![new_task(queue, "job", "x")]).await,
            invalid,
            "queue",
        );
    }
    let status = enqueue_status(&mut client, vec![new_task("has space", "job", "x")])
        .await
        .expect_err("queue name with a space was accepted");
    assert!(
        status.message().contains("has space"),
        "message {:?} does not name the invalid queue value",
        status.message()
    );

    let long_kind = "k".repeat(129);
    for kind in ["", "has space", long_kind.as_str(), "tab\tkind"] {
        let case = format!("kind {kind:?}");
        assert_rejected(
            &case,
            enqueue_status(&mut client, vec![new_task(QUEUE, kind, "x")]).await,
            invalid,
            "kind",
        );
    }

    assert_rejected(
        "payload of max-payload-bytes + 1",
        enqueue_status(
            &mut client,
            vec![new_task(QUEUE, "job", vec![7u8; MAX_PAYLOAD_BYTES + 1])],
        )
        .await,
        invalid,
        "payload",
    );

    let long_key = "h".repeat(129);
    let header_cases: [(&str, String, String); 4] = [
        ("empty header key", String::new(), "value".to_string()),
        (
            "header key of 129 characters",
            long_key,
            "value".to_string(),
        ),
        (
            "header key with a control character",
            "bell\u{7}".to_string(),
            "v".to_string(),
        ),
        (
            "headers over 16 KiB",
            "big".to_string(),
            "v".repeat(16 * 1024 + 1),
        ),
    ];
    for (case, key, value) in header_cases {
        let mut task = new_task(QUEUE, "job", "x");
        task.headers.insert(key, value);
        assert_rejected(
            case,
            enqueue_status(&mut client, vec![task]).await,
            invalid,
            "header",
        );
    }

    // One invalid task rejects the whole batch, so its valid neighbour is not stored.
    let atomic_queue = "atomic";
    let batch = vec![
        new_task(atomic_queue, "job", "valid neighbour"),
        new_task(atomic_queue, "", "empty kind"),
    ];
    assert_rejected(
        "batch with one invalid task",
        enqueue_status(&mut client, batch).await,
        invalid,
        "kind",
    );
    let mut subscription = Subscription::open(&mut client, &[atomic_queue], 10, None).await?;
    subscription
        .expect_no_delivery(QUIET)
        .await
        .context("a task from a rejected batch was stored")?;

    // Values at the limits are accepted.
    let boundary = vec![
        new_task(
            &"q".repeat(128),
            &"k".repeat(128),
            vec![1u8; MAX_PAYLOAD_BYTES],
        ),
        new_task("A-Z.a_z-0.9", "namespace:send/email", "x"),
    ];
    let ids = enqueue_status(&mut client, boundary).await;
    assert!(ids.is_ok(), "tasks at the limits were rejected: {ids:?}");
    let full_batch = (0..MAX_BATCH_SIZE)
        .map(|index| new_task(QUEUE, "job", format!("{index}")))
        .collect();
    let ids = enqueue_status(&mut client, full_batch).await;
    assert!(
        ids.is_ok(),
        "a batch of max-batch-size tasks was rejected: {ids:?}"
    );

    assert_still_serving(&mut client).await
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_subscribe_rejected() -> Result<()> {
    let data_dir = temp_dir();
    let broker = BrokerProcess::start(data_dir.path(), &LIMIT_ARGS).await?;
    let mut client = broker.client().await?;
    let invalid = Code::InvalidArgument;

    assert_rejected(
        "Subscribe without queues",
        subscribe_status(&mut client, subscribe_request(&[], 1)).await,
        invalid,
        "queues",
    );
    assert_rejected(
        "Subscribe with an invalid queue name",
        subscribe_status(&mut client, subscribe_request(&[QUEUE, "bad name"], 1)).await,
        invalid,
        "queue",
    );
    assert_rejected(
        "Subscribe with a repeated queue",
        subscribe_status(&mut client, subscribe_request(&[QUEUE, QUEUE], 1)).await,
        invalid,
        "queue",
    );
    assert_rejected(
        "Subscribe with max_in_flight 0",
        subscribe_status(&mut client, subscribe_request(&[QUEUE], 0)).await,
        invalid,
        "max_in_flight",
    );
    assert_rejected(
        "Subscribe with max_in_flight over the limit",
        subscribe_status(&mut client, subscribe_request(&[QUEUE], MAX_IN_FLIGHT + 1)).await,
        invalid,
        "max_in_flight",
    );

    for (case, lease) in [
        ("lease_duration under 1 s", Duration::from_millis(500)),
        (
            "lease_duration over the 1 h maximum",
            Duration::from_secs(2 * 3600),
        ),
    ] {
        let mut request = subscribe_request(&[QUEUE], 1);
        request.lease_duration = Some(proto_duration(lease));
        assert_rejected(
            case,
            subscribe_status(&mut client, request).await,
            invalid,
            "lease_duration",
        );
    }

    let at_limit = subscribe_status(&mut client, subscribe_request(&[QUEUE], MAX_IN_FLIGHT)).await;
    assert!(
        at_limit.is_ok(),
        "Subscribe with max_in_flight at the limit was rejected: {at_limit:?}"
    );

    assert_still_serving(&mut client).await
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_task_and_lease_ids_rejected() -> Result<()> {
    let data_dir = temp_dir();
    let broker = BrokerProcess::start(data_dir.path(), &LIMIT_ARGS).await?;
    let mut client = broker.client().await?;

    let malformed = client
        .get_task(GetTaskRequest {
            task_id: "not-a-uuid".to_string(),
        })
        .await
        .map(|response| response.into_inner());
    assert_rejected(
        "GetTask with a malformed id",
        malformed.clone(),
        Code::InvalidArgument,
        "task_id",
    );
    assert!(
        malformed.unwrap_err().message().contains("not-a-uuid"),
        "GetTask with a malformed id: message does not name the value"
    );

    let unknown = client
        .get_task(GetTaskRequest {
            task_id: UNKNOWN_TASK_ID.to_string(),
        })
        .await
        .map(|response| response.into_inner());
    assert_rejected(
        "GetTask with an unknown id",
        unknown,
        Code::NotFound,
        UNKNOWN_TASK_ID,
    );

    let empty_ack = ack(&mut client, "", "").await;
    assert_rejected(
        "Ack with an empty lease id",
        empty_ack,
        Code::InvalidArgument,
        "acks[0].lease_id",
    );
    let empty_nack = nack(&mut client, "", "failed").await;
    assert_rejected(
        "Nack with an empty lease id",
        empty_nack,
        Code::InvalidArgument,
        "nacks[0].lease_id",
    );
    let no_acks = client.ack(AckRequest { acks: Vec::new() }).await;
    assert_rejected("Ack with no leases", no_acks, Code::InvalidArgument, "acks");
    let no_nacks = client.nack(NackRequest { nacks: Vec::new() }).await;
    assert_rejected(
        "Nack with no leases",
        no_nacks,
        Code::InvalidArgument,
        "nacks",
    );

    let unknown_ack = ack(&mut client, UNKNOWN_LEASE_ID, "").await;
    let status = unknown_ack.expect_err("Ack of an unknown lease succeeded");
    assert_eq!(
        status.code(),
        Code::FailedPrecondition,
        "Ack of an unknown lease: {status:?}"
    );
    let unknown_nack = nack(&mut client, UNKNOWN_LEASE_ID, "failed").await;
    let status = unknown_nack.expect_err("Nack of an unknown lease succeeded");
    assert_eq!(
        status.code(),
        Code::FailedPrecondition,
        "Nack of an unknown lease: {status:?}"
    );

    assert_still_serving(&mut client).await
}

#[tokio::test(flavor = "multi_thread")]
async fn oversize_result_keeps_lease_live() -> Result<()> {
    let data_dir = temp_dir();
    let broker = BrokerProcess::start(data_dir.path(), &LIMIT_ARGS).await?;
    let mut client = broker.client().await?;

    let id = enqueue(&mut client, vec![new_task(QUEUE, "job", "x")])
        .await?
        .remove(0);
    let mut subscription = Subscription::open(&mut client, &[QUEUE], 1, None).await?;
    let delivery = subscription.next_delivery().await?;

    assert_rejected(
        "Ack with a result of max-result-bytes + 1",
        ack(
            &mut client,
            &delivery.lease_id,
            vec![b'r'; MAX_RESULT_BYTES + 1],
        )
        .await,
        Code::InvalidArgument,
        "result",
    );
    let leased = get_task(&mut client, &id).await?;
    assert_eq!(
        leased.state(),
        TaskState::Leased,
        "state after an Ack rejected for its result size"
    );

    let at_limit = ack(
        &mut client,
        &delivery.lease_id,
        vec![b'r'; MAX_RESULT_BYTES],
    )
    .await;
    assert!(
        at_limit.is_ok(),
        "Ack with a result of max-result-bytes failed after the oversize one: {at_limit:?}"
    );
    let done = get_task(&mut client, &id).await?;
    assert_eq!(
        done.state(),
        TaskState::Succeeded,
        "state after the valid Ack"
    );
    assert_eq!(done.result.len(), MAX_RESULT_BYTES, "stored result length");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn long_nack_error_truncated() -> Result<()> {
    let data_dir = temp_dir();
    let broker = BrokerProcess::start(data_dir.path(), &[]).await?;
    let mut client = broker.client().await?;

    let id = enqueue(&mut client, vec![new_task(QUEUE, "job", "x")])
        .await?
        .remove(0);
    let mut subscription = Subscription::open(&mut client, &[QUEUE], 1, None).await?;
    let delivery = subscription.next_delivery().await?;

    let long_error = "e".repeat(10 * 1024);
    let state = nack(&mut client, &delivery.lease_id, &long_error).await?;
    assert_eq!(
        state,
        TaskState::Pending,
        "state after the first failed attempt"
    );

    let status = get_task(&mut client, &id).await?;
    assert!(
        !status.last_error.is_empty(),
        "a 10 KiB Nack error was stored as empty"
    );
    assert!(
        status.last_error.len() <= 4 * 1024,
        "stored error is {} bytes, over the 4 KiB limit",
        status.last_error.len()
    );
    assert!(
        long_error.starts_with(&status.last_error),
        "stored error is not a prefix of the Nack error"
    );
    Ok(())
}
