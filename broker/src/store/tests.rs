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

/// A store with its writer, as the broker runs them, for tests that drive the writer.
struct Running {
    store: Arc<Store>,
    handle: writer::WriterHandle,
    thread: std::thread::JoinHandle<()>,
}

impl Running {
    fn open(dir: &std::path::Path) -> Running {
        let path = dir.join("broker.redb");
        let store = Arc::new(Store::open(dir, &path, 16 << 20).expect("open store"));
        let dispatcher = Arc::new(Dispatcher::new(64, |_| Duration::from_secs(30)));
        let settings = SettingsCache::new(defaults(), HashMap::new());
        let (handle, thread) =
            writer::spawn(store.clone(), dispatcher, settings, 1, 16, 16).expect("spawn writer");
        Running {
            store,
            handle,
            thread,
        }
    }

    async fn enqueue(&self, queue: &str, count: usize) -> Vec<crate::task::TaskId> {
        let tasks = (0..count)
            .map(|_| NewTask {
                queue: QueueName::parse("queue", queue).expect("valid queue"),
                ..new_task(b"payload", None)
            })
            .collect();
        let (reply, response) = oneshot::channel();
        self.handle
            .send(WriteOp::Enqueue { tasks, reply })
            .await
            .expect("writer running");
        let enqueued = response.await.expect("reply").expect("enqueue committed");
        enqueued.iter().map(|task| task.id).collect()
    }

    /// Fails the delivery of a pending task with a retry in a minute.
    async fn fail_for_later(&self, task_id: crate::task::TaskId) {
        let pending = ready_tasks(
            &self
                .store
                .recover(&defaults(), 64)
                .expect("recover")
                .effects,
        );
        let settled = pending
            .into_iter()
            .find(|settled| settled.task.id == task_id)
            .expect("task pending");
        let (reply, response) = oneshot::channel();
        let failure = Failure {
            error: "later".to_owned(),
            retry_delay: Some(Duration::from_secs(60)),
            no_retry: false,
            release: false,
        };
        self.handle
            .send(WriteOp::Fail {
                settled,
                failure,
                reply: Some(reply),
            })
            .await
            .expect("writer running");
        let outcome = response.await.expect("reply").expect("fail committed");
        assert_eq!(outcome.state, TaskRecordState::RetryWait);
    }

    fn stop(self) -> Arc<Store> {
        drop(self.handle);
        self.thread.join().expect("writer thread ends");
        self.store
    }
}

#[tokio::test]
async fn purge_includes_retry_waiting_tasks() {
    let dir = tempfile::tempdir().expect("temp dir");
    let running = Running::open(dir.path());
    let purged_ids = running.enqueue("q", 3).await;
    let kept_ids = running.enqueue("other", 2).await;
    running.fail_for_later(purged_ids[0]).await;
    running.fail_for_later(kept_ids[0]).await;

    let (reply, response) = oneshot::channel();
    running
        .handle
        .send(WriteOp::PurgeQueue {
            queue: QueueName::parse("queue", "q").expect("valid queue"),
            reply,
        })
        .await
        .expect("writer running");
    let purged = response.await.expect("reply").expect("purge committed");
    assert_eq!(purged, 3, "two pending tasks and one retry-waiting task");

    let store = running.stop();
    for id in &purged_ids {
        assert!(store.read_task(*id).expect("read").is_none(), "{id} purged");
    }
    for id in &kept_ids {
        assert!(store.read_task(*id).expect("read").is_some(), "{id} kept");
    }
    store.check_indexes().expect("read").expect("indexes match");
}

#[tokio::test]
async fn version_2_upgrade_cleans_ready_index() {
    use redb::{ReadableDatabase, ReadableTableMetadata};

    let dir = tempfile::tempdir().expect("temp dir");
    let running = Running::open(dir.path());
    let ids = running.enqueue("q", 2).await;
    running.fail_for_later(ids[0]).await;
    let store = running.stop();

    // Rewrite the file as version 2 left it: the retry-waiting task in READY, and the
    // table of pending tasks by age.
    let waiting = store.read_task(ids[0]).expect("read").expect("task exists");
    let txn = store.db.begin_write().expect("write transaction");
    {
        let mut ready = txn.open_table(super::READY).expect("ready table");
        ready
            .insert(
                super::index::ready_key("q", waiting.priority, waiting.sequence),
                ids[0].as_key(),
            )
            .expect("insert");
        let mut ages = txn.open_table(super::PENDING_AGE_V2).expect("age table");
        ages.insert(("q", 2), (0, ids[1].as_key())).expect("insert");
        txn.open_table(super::META)
            .expect("meta table")
            .insert("schema", 2)
            .expect("insert");
    }
    txn.commit().expect("commit");
    assert!(
        store.check_indexes().expect("read").is_err(),
        "the version 2 layout differs from the current one"
    );
    drop(store);

    let path = dir.path().join("broker.redb");
    let reopened = Store::open(dir.path(), &path, 16 << 20).expect("reopen store");
    reopened
        .check_indexes()
        .expect("read")
        .expect("indexes match after the upgrade");
    let txn = reopened.db.begin_read().expect("read transaction");
    assert!(
        txn.open_table(super::PENDING_AGE_V2).is_err(),
        "the age table is deleted"
    );
    assert_eq!(
        txn.open_table(super::READY)
            .expect("ready table")
            .len()
            .expect("len"),
        1,
        "only the pending task is ready"
    );
    let recovered = reopened.recover(&defaults(), 64).expect("recover");
    let pending: Vec<_> = ready_tasks(&recovered.effects)
        .iter()
        .map(|settled| settled.task.id)
        .collect();
    assert_eq!(pending, vec![ids[1]]);
}
