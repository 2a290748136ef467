use std::collections::HashMap;
use std::sync::Arc;

use docket_proto::storage::TaskRecordState;
use prost::bytes::Bytes;
use tokio::sync::oneshot;

use super::Store;
use super::writer::{self, WriteOp};
use crate::dispatch::Dispatcher;
use crate::task::{NewTask, QueueName};

fn new_task(payload: &'static [u8]) -> NewTask {
    NewTask {
        queue: QueueName::parse("queue", "q").expect("valid queue"),
        kind: "test".to_owned(),
        payload: Bytes::from_static(payload),
        headers: HashMap::new(),
        priority: 0,
        max_attempts: 2,
    }
}

#[tokio::test]
async fn committed_tasks_survive_reopen_with_their_state() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("broker.redb");
    let store = Arc::new(Store::open(dir.path(), &path).expect("open store"));
    let dispatcher = Arc::new(Dispatcher::default());
    let (handle, thread) =
        writer::spawn(store.clone(), dispatcher.clone(), 1, 16, 16).expect("spawn writer");

    let (reply, response) = oneshot::channel();
    let op = WriteOp::Enqueue {
        tasks: vec![new_task(b"one"), new_task(b"two"), new_task(b"three")],
        reply,
    };
    handle.send(op).await.expect("writer running");
    let ids = response.await.expect("reply").expect("enqueue committed");
    assert_eq!(ids.len(), 3);

    let recovered = store.recover().expect("recover");
    let task = recovered
        .pending
        .iter()
        .find(|task| task.id == ids[0])
        .expect("first task pending")
        .clone();

    let (reply, response) = oneshot::channel();
    handle
        .send(WriteOp::Complete {
            task,
            result: Bytes::from_static(b"ok"),
            reply,
        })
        .await
        .expect("writer running");
    response.await.expect("reply").expect("complete committed");

    let task = recovered
        .pending
        .iter()
        .find(|task| task.id == ids[1])
        .expect("second task pending")
        .clone();
    for expected in [TaskRecordState::Pending, TaskRecordState::Dead] {
        let (reply, response) = oneshot::channel();
        let op = WriteOp::Fail {
            task: task.clone(),
            error: "boom".to_owned(),
            reply: Some(reply),
        };
        handle.send(op).await.expect("writer running");
        let state = response.await.expect("reply").expect("fail committed");
        assert_eq!(state, expected);
    }

    drop(handle);
    thread.join().expect("writer thread ends");
    drop(store);

    let reopened = Store::open(dir.path(), &path).expect("reopen store");
    let recovered = reopened.recover().expect("recover after reopen");
    let pending: Vec<_> = recovered.pending.iter().map(|task| task.id).collect();
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
}
