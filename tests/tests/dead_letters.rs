//! Dead letters: a task that used every attempt is DEAD with its history, and operators
//! list, requeue and delete dead tasks.

use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use docket_proto::v1::broker_client::BrokerClient;
use docket_proto::v1::{
    DeleteDeadTasksRequest, ListDeadTasksRequest, ListDeadTasksResponse, RequeueDeadTasksRequest,
    TaskState,
};
use docket_tests::{
    BrokerProcess, QUIET, Subscription, ack, assert_rejected, delivered_task_id, enqueue, get_task,
    nack, new_task, queue_stats, system_time, temp_dir,
};
use tonic::Code;
use tonic::transport::Channel;

const QUEUE: &str = "mail";
const OTHER_QUEUE: &str = "sms";

/// A task id that is a well-formed UUIDv7 but was never issued by the broker.
const UNKNOWN_TASK_ID: &str = "0190a1b2-c3d4-7e5f-8a6b-7c8d9e0f1a2b";

/// Enqueues `count` single-attempt tasks, receives them, and nacks them in the order
/// `death_order` gives (indices into the enqueued tasks). Returns the task ids in enqueue
/// order; every task is DEAD on return.
async fn make_dead_tasks(
    client: &mut BrokerClient<Channel>,
    count: usize,
    death_order: &[usize],
) -> Result<Vec<String>> {
    let tasks = (0..count)
        .map(|index| {
            let mut task = new_task(QUEUE, "send", format!("task-{index}"));
            task.max_attempts = 1;
            task
        })
        .collect();
    let ids = enqueue(client, tasks).await?;

    let mut subscription = Subscription::open(client, &[QUEUE], 1000, None).await?;
    let deliveries = subscription.next_deliveries(count).await?;
    for &index in death_order {
        let delivery = deliveries
            .iter()
            .find(|delivery| delivered_task_id(delivery).ok().as_ref() == Some(&ids[index]))
            .with_context(|| format!("task {index} was not delivered"))?;
        let state = nack(
            client,
            &delivery.lease_id,
            &format!("failure of task {index}"),
        )
        .await?;
        assert_eq!(
            state,
            TaskState::Dead,
            "Nack result state of single-attempt task {index}"
        );
        // Distinct death times make "oldest death first" a strict order.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(ids)
}

async fn list_dead(
    client: &mut BrokerClient<Channel>,
    page_size: u32,
    page_token: &str,
) -> Result<ListDeadTasksResponse, tonic::Status> {
    let request = ListDeadTasksRequest {
        queue: QUEUE.to_string(),
        page_size,
        page_token: page_token.to_string(),
    };
    Ok(client.list_dead_tasks(request).await?.into_inner())
}

async fn requeue(
    client: &mut BrokerClient<Channel>,
    task_ids: &[String],
    all: bool,
) -> Result<u64, tonic::Status> {
    let request = RequeueDeadTasksRequest {
        queue: QUEUE.to_string(),
        task_ids: task_ids.to_vec(),
        all,
    };
    Ok(client
        .requeue_dead_tasks(request)
        .await?
        .into_inner()
        .requeued)
}

async fn delete(
    client: &mut BrokerClient<Channel>,
    task_ids: &[String],
    all: bool,
) -> Result<u64, tonic::Status> {
    let request = DeleteDeadTasksRequest {
        queue: QUEUE.to_string(),
        task_ids: task_ids.to_vec(),
        all,
    };
    Ok(client
        .delete_dead_tasks(request)
        .await?
        .into_inner()
        .deleted)
}

async fn assert_not_found(client: &mut BrokerClient<Channel>, task_id: &str) {
    let result = get_task(client, task_id).await;
    let error = result.expect_err("GetTask of a deleted task succeeded");
    let status = error
        .downcast_ref::<tonic::Status>()
        .unwrap_or_else(|| panic!("GetTask of {task_id} failed without a status: {error:#}"));
    assert_eq!(
        status.code(),
        Code::NotFound,
        "GetTask of deleted task {task_id}: {status:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn exhausted_task_keeps_attempt_history() -> Result<()> {
    let data_dir = temp_dir();
    let broker = BrokerProcess::start(data_dir.path(), &[]).await?;
    let mut client = broker.client().await?;

    let mut task = new_task(QUEUE, "send", "input");
    task.max_attempts = 3;
    let enqueued_before = SystemTime::now();
    let id = enqueue(&mut client, vec![task]).await?.remove(0);
    let mut subscription = Subscription::open(&mut client, &[QUEUE], 1, None).await?;
    for attempt in 1..=3 {
        let delivery = subscription.next_delivery().await?;
        assert_eq!(delivery.attempt, attempt, "delivery's attempt number");
        nack(
            &mut client,
            &delivery.lease_id,
            &format!("failure {attempt}"),
        )
        .await?;
    }

    let dead = get_task(&mut client, &id).await?;
    assert_eq!(dead.state(), TaskState::Dead, "state after 3 of 3 failures");
    assert_eq!(dead.attempts, 3, "finished attempts of the dead task");
    assert_eq!(
        dead.attempt_history.len(),
        3,
        "attempt history of the dead task: {:?}",
        dead.attempt_history
    );
    let mut previous_finish = enqueued_before;
    for (index, attempt) in dead.attempt_history.iter().enumerate() {
        let number = u32::try_from(index + 1)?;
        assert_eq!(attempt.number, number, "number of attempt {}", index + 1);
        assert_eq!(
            attempt.error,
            format!("failure {number}"),
            "error of attempt {number}"
        );
        let started = system_time(
            attempt
                .started_at
                .as_ref()
                .with_context(|| format!("attempt {number} has no started_at"))?,
        );
        let finished = system_time(
            attempt
                .finished_at
                .as_ref()
                .with_context(|| format!("attempt {number} has no finished_at"))?,
        );
        assert!(
            started >= previous_finish,
            "attempt {number} started before the previous attempt finished"
        );
        assert!(
            finished >= started,
            "attempt {number} finished before it started"
        );
        previous_finish = finished;
    }
    let last_change = dead
        .state_history
        .last()
        .context("the dead task has no state history")?;
    assert_eq!(
        last_change.state(),
        TaskState::Dead,
        "last entry of the state history"
    );
    assert_eq!(
        queue_stats(&mut client, QUEUE).await?.dead,
        1,
        "dead count in the queue stats"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn list_dead_tasks_pages_oldest_first() -> Result<()> {
    let data_dir = temp_dir();
    let broker = BrokerProcess::start(data_dir.path(), &[]).await?;
    let mut client = broker.client().await?;

    // Tasks die in an order unlike their enqueue order, so that the listing's order shows
    // death time and not task id.
    let death_order = [3, 0, 4, 1, 2];
    let ids = make_dead_tasks(&mut client, 5, &death_order).await?;
    let expected: Vec<String> = death_order
        .iter()
        .map(|&index| ids[index].clone())
        .collect();

    let mut listed = Vec::new();
    let mut page_sizes = Vec::new();
    let mut token = String::new();
    for page in 0.. {
        assert!(page < 5, "ListDeadTasks returned more pages than tasks");
        let response = list_dead(&mut client, 2, &token).await?;
        page_sizes.push(response.tasks.len());
        for status in &response.tasks {
            assert_eq!(
                status.state(),
                TaskState::Dead,
                "state of a listed dead task"
            );
            let task = status.task.as_ref().context("listed status has no task")?;
            listed.push(task.id.clone());
        }
        if response.next_page_token.is_empty() {
            break;
        }
        token = response.next_page_token;
    }
    assert_eq!(
        page_sizes,
        [2, 2, 1],
        "page sizes of 5 dead tasks with page_size 2"
    );
    assert_eq!(listed, expected, "dead tasks not listed oldest death first");

    let everything = list_dead(&mut client, 0, "").await?;
    assert_eq!(
        everything.tasks.len(),
        5,
        "page_size 0 (default 100) lists every dead task"
    );
    assert!(
        everything.next_page_token.is_empty(),
        "a page that holds every dead task has a next page token"
    );
    let at_limit = list_dead(&mut client, 1000, "").await;
    assert!(
        at_limit.is_ok(),
        "page_size 1000, the documented maximum, was rejected: {at_limit:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn requeued_dead_tasks_deliver_again() -> Result<()> {
    let data_dir = temp_dir();
    let broker = BrokerProcess::start(data_dir.path(), &[]).await?;
    let mut client = broker.client().await?;
    let ids = make_dead_tasks(&mut client, 3, &[0, 1, 2]).await?;
    assert_eq!(
        queue_stats(&mut client, QUEUE).await?.dead,
        3,
        "dead count before requeue"
    );

    // One known dead task and an id that names no task: the unknown id is skipped.
    let requeued = requeue(
        &mut client,
        &[ids[0].clone(), UNKNOWN_TASK_ID.to_string()],
        false,
    )
    .await?;
    assert_eq!(requeued, 1, "tasks requeued by id");
    let status = get_task(&mut client, &ids[0]).await?;
    assert_eq!(status.state(), TaskState::Pending, "state after requeue");
    assert_eq!(status.attempts, 0, "attempts after requeue");
    let stats = queue_stats(&mut client, QUEUE).await?;
    assert_eq!(stats.dead, 2, "dead count after requeue by id");
    assert_eq!(stats.pending, 1, "pending count after requeue by id");

    let mut subscription = Subscription::open(&mut client, &[QUEUE], 10, None).await?;
    let delivery = subscription.next_delivery().await?;
    assert_eq!(
        delivered_task_id(&delivery)?,
        ids[0],
        "delivered task after requeue by id"
    );
    assert_eq!(delivery.attempt, 1, "attempt number after requeue");
    subscription
        .expect_no_delivery(QUIET)
        .await
        .context("a dead task that was not requeued was delivered")?;
    ack(&mut client, &delivery.lease_id, "done").await?;

    let requeued = requeue(&mut client, &[], true).await?;
    assert_eq!(requeued, 2, "tasks requeued with all");
    let redelivered = subscription.next_deliveries(2).await?;
    let mut redelivered_ids: Vec<String> = redelivered
        .iter()
        .map(delivered_task_id)
        .collect::<Result<_>>()?;
    redelivered_ids.sort();
    let mut expected = vec![ids[1].clone(), ids[2].clone()];
    expected.sort();
    assert_eq!(
        redelivered_ids, expected,
        "tasks delivered after requeue all"
    );
    for delivery in &redelivered {
        assert_eq!(delivery.attempt, 1, "attempt number after requeue all");
        ack(&mut client, &delivery.lease_id, "done").await?;
    }
    let stats = queue_stats(&mut client, QUEUE).await?;
    assert_eq!(stats.dead, 0, "dead count after requeue all");
    assert_eq!(
        stats.succeeded, 3,
        "succeeded count after the requeued runs"
    );

    let nothing = requeue(&mut client, &[], true).await?;
    assert_eq!(nothing, 0, "requeue all with no dead tasks");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn deleted_dead_tasks_are_not_found() -> Result<()> {
    let data_dir = temp_dir();
    let broker = BrokerProcess::start(data_dir.path(), &[]).await?;
    let mut client = broker.client().await?;
    let ids = make_dead_tasks(&mut client, 4, &[0, 1, 2, 3]).await?;

    // A pending task of the same queue is not dead, so deleting it by id is skipped.
    let pending = enqueue(&mut client, vec![new_task(QUEUE, "send", "pending")])
        .await?
        .remove(0);

    let deleted = delete(&mut client, &[ids[0].clone(), pending.clone()], false).await?;
    assert_eq!(deleted, 1, "tasks deleted by id");
    assert_not_found(&mut client, &ids[0]).await;
    let still_pending = get_task(&mut client, &pending).await?;
    assert_eq!(
        still_pending.state(),
        TaskState::Pending,
        "a pending task named in DeleteDeadTasks"
    );
    assert_eq!(
        queue_stats(&mut client, QUEUE).await?.dead,
        3,
        "dead count after delete by id"
    );

    let deleted = delete(&mut client, &[], true).await?;
    assert_eq!(deleted, 3, "tasks deleted with all");
    for id in &ids[1..] {
        assert_not_found(&mut client, id).await;
    }
    let stats = queue_stats(&mut client, QUEUE).await?;
    assert_eq!(stats.dead, 0, "dead count after delete all");
    assert_eq!(stats.pending, 1, "pending count after delete all");
    let listed = list_dead(&mut client, 0, "").await?;
    assert!(
        listed.tasks.is_empty(),
        "ListDeadTasks after delete all: {} tasks",
        listed.tasks.len()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_dead_task_requests_rejected() -> Result<()> {
    let data_dir = temp_dir();
    let broker = BrokerProcess::start(data_dir.path(), &[]).await?;
    let mut client = broker.client().await?;
    let ids = make_dead_tasks(&mut client, 1, &[0]).await?;

    let with_ids = vec![ids[0].clone()];
    assert_rejected(
        "RequeueDeadTasks with all and ids",
        requeue(&mut client, &with_ids, true).await,
        Code::InvalidArgument,
        "task_ids",
    );
    assert_rejected(
        "DeleteDeadTasks with all and ids",
        delete(&mut client, &with_ids, true).await,
        Code::InvalidArgument,
        "task_ids",
    );
    let malformed = vec![ids[0].clone(), "not-a-uuid".to_string()];
    assert_rejected(
        "RequeueDeadTasks with a malformed id",
        requeue(&mut client, &malformed, false).await,
        Code::InvalidArgument,
        "task_ids[1]",
    );
    assert_rejected(
        "DeleteDeadTasks with a malformed id",
        delete(&mut client, &malformed, false).await,
        Code::InvalidArgument,
        "task_ids[1]",
    );
    let too_many = vec![UNKNOWN_TASK_ID.to_string(); 1001];
    assert_rejected(
        "RequeueDeadTasks with 1001 ids",
        requeue(&mut client, &too_many, false).await,
        Code::InvalidArgument,
        "task_ids",
    );
    assert_rejected(
        "ListDeadTasks with a bad page token",
        list_dead(&mut client, 2, "not-a-token").await,
        Code::InvalidArgument,
        "page_token",
    );
    assert_rejected(
        "ListDeadTasks with page_size 1001",
        list_dead(&mut client, 1001, "").await,
        Code::InvalidArgument,
        "page_size",
    );
    let bad_queue = client
        .list_dead_tasks(ListDeadTasksRequest {
            queue: "no spaces".to_string(),
            page_size: 0,
            page_token: String::new(),
        })
        .await;
    assert_rejected(
        "ListDeadTasks with an invalid queue name",
        bad_queue,
        Code::InvalidArgument,
        "queue",
    );

    // The rejected requests changed nothing.
    let status = get_task(&mut client, &ids[0]).await?;
    assert_eq!(
        status.state(),
        TaskState::Dead,
        "state after rejected requests"
    );
    assert_eq!(
        queue_stats(&mut client, QUEUE).await?.dead,
        1,
        "dead count after rejected requests"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn dead_task_admin_is_per_queue() -> Result<()> {
    let data_dir = temp_dir();
    let broker = BrokerProcess::start(data_dir.path(), &[]).await?;
    let mut client = broker.client().await?;
    let ids = make_dead_tasks(&mut client, 1, &[0]).await?;

    let mut task = new_task(OTHER_QUEUE, "send", "elsewhere");
    task.max_attempts = 1;
    let other_id = enqueue(&mut client, vec![task]).await?.remove(0);
    let mut subscription = Subscription::open(&mut client, &[OTHER_QUEUE], 1, None).await?;
    let delivery = subscription.next_delivery().await?;
    nack(&mut client, &delivery.lease_id, "fatal").await?;

    let listed = list_dead(&mut client, 0, "").await?;
    let listed_ids: Vec<String> = listed
        .tasks
        .iter()
        .filter_map(|status| status.task.as_ref().map(|task| task.id.clone()))
        .collect();
    assert_eq!(listed_ids, ids, "dead tasks listed for {QUEUE}");

    // The other queue's dead task is not a dead task of QUEUE, so it is skipped.
    let requeued = requeue(&mut client, std::slice::from_ref(&other_id), false).await?;
    assert_eq!(requeued, 0, "requeue of another queue's dead task");
    let deleted = delete(&mut client, std::slice::from_ref(&other_id), false).await?;
    assert_eq!(deleted, 0, "delete of another queue's dead task");
    let deleted = delete(&mut client, &[], true).await?;
    assert_eq!(deleted, 1, "delete all of {QUEUE}");
    let status = get_task(&mut client, &other_id).await?;
    assert_eq!(
        status.state(),
        TaskState::Dead,
        "another queue's dead task after requeue and delete in {QUEUE}"
    );
    assert_eq!(
        queue_stats(&mut client, OTHER_QUEUE).await?.dead,
        1,
        "dead count of the other queue"
    );
    Ok(())
}
