//! Watchers of single tasks: the WatchTask streams waiting for a task's next state.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::SystemTime;

use docket_proto::v1::{self, TaskState};
use tokio::sync::mpsc;

use crate::task::TaskId;

/// Capacity of one watcher's channel. A task changes state a few times per attempt, so a
/// watcher that falls this far behind is dropped rather than buffered without bound.
const WATCHER_CAPACITY: usize = 64;

/// Identifies one watcher of a task.
pub type WatcherId = u64;

/// The watchers of every watched task, with each task's last published status.
#[derive(Default)]
pub struct WatchRegistry {
    /// Number of watched tasks, read without the lock on every state change.
    watched: AtomicUsize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    next_id: WatcherId,
    tasks: HashMap<TaskId, Watched>,
}

struct Watched {
    /// Last status sent, the base for changes that only the dispatcher observes.
    last: Option<v1::TaskStatus>,
    senders: Vec<(WatcherId, mpsc::Sender<v1::TaskStatus>)>,
}

impl WatchRegistry {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Registers a watcher of `task_id` and returns its id and the receiving end of its
    /// statuses.
    pub fn watch(&self, task_id: TaskId) -> (WatcherId, mpsc::Receiver<v1::TaskStatus>) {
        let (sender, receiver) = mpsc::channel(WATCHER_CAPACITY);
        let mut inner = self.lock();
        let id = inner.next_id;
        inner.next_id += 1;
        let watched = inner.tasks.entry(task_id).or_insert_with(|| {
            self.watched.fetch_add(1, Ordering::Relaxed);
            Watched {
                last: None,
                senders: Vec::new(),
            }
        });
        watched.senders.push((id, sender));
        (id, receiver)
    }

    /// Removes a watcher.
    pub fn unwatch(&self, task_id: TaskId, id: WatcherId) {
        let mut inner = self.lock();
        let Some(watched) = inner.tasks.get_mut(&task_id) else {
            return;
        };
        watched.senders.retain(|(watcher, _)| *watcher != id);
        if watched.senders.is_empty() {
            inner.tasks.remove(&task_id);
            self.watched.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Returns whether anyone watches `task_id`.
    pub fn is_watched(&self, task_id: TaskId) -> bool {
        self.watched.load(Ordering::Relaxed) > 0 && self.lock().tasks.contains_key(&task_id)
    }

    /// Stores the status that a new watcher read, unless a newer one was published since.
    pub fn seed(&self, task_id: TaskId, status: &v1::TaskStatus) {
        let mut inner = self.lock();
        if let Some(watched) = inner.tasks.get_mut(&task_id)
            && watched.last.is_none()
        {
            watched.last = Some(status.clone());
        }
    }

    /// Sends a task's committed status to its watchers.
    pub fn publish(&self, task_id: TaskId, status: v1::TaskStatus) {
        let mut inner = self.lock();
        let Some(watched) = inner.tasks.get_mut(&task_id) else {
            return;
        };
        send_to_all(watched, &status);
        watched.last = Some(status);
    }

    /// Sends a change that only the dispatcher observes (a delivery, or the end of a retry
    /// wait), derived from the last published status. Skipped when no status is known yet.
    pub fn publish_state(
        &self,
        task_id: TaskId,
        state: TaskState,
        lease_deadline: Option<SystemTime>,
    ) {
        let mut inner = self.lock();
        let Some(watched) = inner.tasks.get_mut(&task_id) else {
            return;
        };
        let Some(mut status) = watched.last.clone() else {
            return;
        };
        let now = SystemTime::now();
        status.state = state.into();
        status.lease_deadline = lease_deadline.map(Into::into);
        status.retry_at = None;
        status.state_history.push(v1::StateChange {
            state: state.into(),
            at: Some(now.into()),
        });
        send_to_all(watched, &status);
        watched.last = Some(status);
    }
}

fn send_to_all(watched: &mut Watched, status: &v1::TaskStatus) {
    // A full channel drops its watcher, whose stream then ends.
    watched
        .senders
        .retain(|(_, sender)| sender.try_send(status.clone()).is_ok());
}
