use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use docket_proto::storage::TaskRecordState;
use prost::bytes::Bytes;
use tokio::sync::oneshot;

use super::Store;
use super::writer::{self, Failure, WriteOp};
use crate::dispatch::{Dispatcher, Effect, SettledLease};
use crate::retry::RetryPolicy;
use crate::settings::{Defaults, SettingsCache};
use crate::task::{NewTask, QueueName};

fn defaults() -> Defaults {
    Defaults {
        max_attempts: 2,
        retry_policy: RetryPolicy {
            initial_backoff: Duration::ZERO,
            multiplier: 1.0,
            max_backoff: Duration::ZERO,
            jitter: 0.0,
        },
        lease_duration: Duration::from_secs(30),
        retention: Duration::from_secs(3600),
        dead_retention: Duration::from_secs(3600),
        idempotency_window: Duration::from_secs(3600),
    }
}

fn new_task(payload: &'static [u8], key: Option<&str>) -> NewTask {
    NewTask {
        queue: QueueName::parse("queue", "q").expect("valid queue"),
        kind: "test".to_owned(),
        payload: Bytes::from_static(payload),
        headers: HashMap::new(),
        priority: 0,
        max_attempts: None,
        retry_policy: None,
        idempotency_key: key.map(str::to_owned),
    }
}

fn ready_tasks(effects: &[Effect]) -> Vec<SettledLease> {
    effects
        .iter()
        .flat_map(|effect| match effect {
            Effect::Refilled { tasks, .. } => tasks.clone(),
            _ => Vec::new(),
        })
        .map(|task| SettledLease {
            task,
            started_at_us: 0,
        })
        .collect()
}

#[tokio::test]
async fn committed_tasks_survive_reopen_with_their_state() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("broker.redb");
    let store = Arc::new(Store::open(dir.path(), &path, 16 << 20).expect("open store"));
    let dispatcher = Arc::new(Dispatcher::new(64, |_| Duration::from_secs(30)));
    let settings = SettingsCache::new(defaults(), HashMap::new());
    let (handle, thread) = writer::spawn(store.clone(), dispatcher.clone(), settings, 1, 16, 16)
        .expect("spawn writer");

    let (reply, response) = oneshot::channel();
    let tasks = vec![
        new_task(b"one", None),
        new_task(b"two", None),
        new_task(b"three", Some("key")),
    ];
    handle
        .send(WriteOp::Enqueue { tasks, reply })
        .await
        .expect("writer running");
    let enqueued = response.await.expect("reply").expect("enqueue committed");
    let ids: Vec<_> = enqueued.iter().map(|task| task.id).collect();
    assert_eq!(ids.len(), 3);

    let (reply, response) = oneshot::channel();
    let tasks = vec![new_task(b"again", Some("key"))];
    handle
        .send(WriteOp::Enqueue { tasks, reply })
        .await
        .expect("writer running");
    let repeated = response.await.expect("reply").expect("enqueue committed");
    assert!(repeated[0].duplicate, "a repeated key must be flagged");
    assert_eq!(
        repeated[0].id, ids[2],
        "a repeated key returns the first task's id"
    );

    let pending = ready_tasks(&store.recover(&defaults(), 64).expect("recover").effects);
    let first = pending
        .iter()
        .find(|settled| settled.task.id == ids[0])
        .expect("first task pending");
    let (reply, response) = oneshot::channel();
    let op = WriteOp::Complete {
        settled: first.clone(),
        result: Bytes::from_static(b"ok"),
        reply,
    };
    handle.send(op).await.expect("writer running");
    let outcome = response.await.expect("reply").expect("complete committed");
    assert_eq!(outcome.state, TaskRecordState::Succeeded);

    let second = pending
        .iter()
        .find(|settled| settled.task.id == ids[1])
        .expect("second task pending");
    for expected in [TaskRecordState::Pending, TaskRecordState::Dead] {
        let (reply, response) = oneshot::channel();
        let op = WriteOp::Fail {
            settled: second.clone(),
            failure: Failure::released("boom"),
            reply: Some(reply),
        };
        handle.send(op).await.expect("writer running");
        let outcome = response.await.expect("reply").expect("fail committed");
        assert_eq!(outcome.state, expected);
    }

    drop(handle);
    thread.join().expect("writer thread ends");
    drop(store);

    let reopened = Store::open(dir.path(), &path, 16 << 20).expect("reopen store");
    let recovered = reopened
        .recover(&defaults(), 64)
        .expect("recover after reopen");
    let pending: Vec<_> = ready_tasks(&recovered.effects)
        .iter()
        .map(|settled| settled.task.id)
        .collect();
    assert_eq!(
        pending,
        vec![ids[2]],
        "only the untouched task is still pending"
    );
    assert_eq!(recovered.next_sequence, 4, "sequences 1 to 3 are taken");

    let done = reopened
        .read_task(ids[0])
        .expect("read")
        .expect("task exists");
    assert_eq!(done.state(), TaskRecordState::Succeeded);
    assert_eq!(done.result.as_ref(), b"ok");
    let dead = reopened
        .read_task(ids[1])
        .expect("read")
        .expect("task exists");
    assert_eq!(dead.state(), TaskRecordState::Dead);
    assert_eq!(dead.attempts, 2);
    assert_eq!(dead.last_error, "boom");
    assert_eq!(dead.attempt_history.len(), 2, "every attempt is kept");
}
