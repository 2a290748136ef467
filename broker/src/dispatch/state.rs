//! The dispatcher's state and the operations on it, all run under its mutex.
//!
//! Each queue keeps a window of at most `window` ready tasks in memory, the first ones of
//! its ready index in the store. Every deliverable task of the index up to the window's
//! end (`loaded_until`) is in the window, leased, or being settled. Tasks after it are
//! only in the store until a refill reads them. A queue whose window contains every task
//! of its index is `complete`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use docket_proto::storage::TaskRecordState;
use docket_proto::v1::{self, SubscribeResponse, TaskState, subscribe_response::Event};
use tokio::sync::mpsc;

use super::watch::WatchRegistry;
use super::{
    Claim, Effect, LeaseView, QueueCounts, ReadyKey, ReadyTask, SettledLease, SubscriberId,
    Subscription,
};
use crate::metrics::{BrokerMetrics, QueueMetricsCache};
use crate::store::now_micros;
use crate::task::{LeaseId, QueueName, TaskId};

/// Room in a stream's channel beyond its credit, for cancellation notices.
const NOTICE_SLACK: usize = 64;

pub(super) struct State {
    /// Maximum ready tasks per queue in memory.
    window: usize,
    queues: HashMap<QueueName, QueueState>,
    /// Ready tasks in all windows, paused queues included.
    ready_count: usize,
    /// Queue and key of each task in a window, so that it can be removed by id.
    located: HashMap<TaskId, (QueueName, ReadyKey)>,
    /// Earliest retry time of a retry-waiting task, in microseconds since the Unix epoch.
    next_retry_at: Option<i64>,
    subscribers: BTreeMap<SubscriberId, Subscriber>,
    next_subscriber: SubscriberId,
    /// Subscriber served last, so the next dispatch round starts after it.
    last_served: SubscriberId,
    leases: HashMap<LeaseId, Lease>,
    lease_by_task: HashMap<TaskId, LeaseId>,
    /// Tasks whose lease was settled, expired or released and whose outcome the storage
    /// writer has not applied yet.
    settling: HashSet<TaskId>,
    /// Live leases by deadline; the serial breaks ties.
    deadlines: BTreeMap<(Instant, u64), LeaseId>,
    next_lease_serial: u64,
    /// Per-queue handles of the delivery metrics.
    metrics: QueueMetricsCache,
}

struct QueueState {
    window: BTreeMap<ReadyKey, Arc<ReadyTask>>,
    /// The window contains every deliverable task of the queue's index.
    complete: bool,
    /// Key of the last index entry that the window covers; meaningful when not complete.
    loaded_until: Option<ReadyKey>,
    /// A refill was requested and has not arrived.
    refill_pending: bool,
    leased: u64,
    /// Stored tasks by state number, as the store counts them.
    stored: HashMap<i32, u64>,
    paused: bool,
}

impl Default for QueueState {
    fn default() -> Self {
        QueueState {
            window: BTreeMap::new(),
            complete: true,
            loaded_until: None,
            refill_pending: false,
            leased: 0,
            stored: HashMap::new(),
            paused: false,
        }
    }
}

impl QueueState {
    fn stored(&self, state: TaskRecordState) -> u64 {
        self.stored.get(&(state as i32)).copied().unwrap_or(0)
    }

    /// Returns whether a task with `key` belongs in the window.
    fn covers(&self, key: ReadyKey) -> bool {
        self.complete || self.loaded_until.is_some_and(|until| key <= until)
    }
}

struct Lease {
    task: Arc<ReadyTask>,
    subscriber: SubscriberId,
    deadline: Instant,
    deadline_wall: SystemTime,
    serial: u64,
    started_at_us: i64,
    cancel_requested: bool,
}

struct Subscriber {
    /// Queues with their weights.
    queues: Vec<(QueueName, u32)>,
    max_in_flight: u32,
    outstanding: u32,
    lease_duration: Option<Duration>,
    sender: mpsc::Sender<SubscribeResponse>,
    /// Index into `queues` of the queue whose turn it is.
    turn: usize,
    /// Deliveries from the queue whose turn it is, in this turn.
    served_in_turn: u32,
    /// Set when the stream's channel was found closed; the stream's drop removes it.
    closed: bool,
    /// Random token that StopDeliveries names the stream by.
    stop_token: String,
}

/// Result of extending a lease.
pub(super) struct Extended {
    pub deadline: SystemTime,
    pub cancel_requested: bool,
    pub earliest_moved: bool,
}

fn key_of(task: &ReadyTask) -> ReadyKey {
    (-i64::from(task.priority), task.sequence)
}

impl State {
    pub fn new(window: usize, metrics: Arc<BrokerMetrics>) -> Self {
        State {
            window,
            queues: HashMap::new(),
            ready_count: 0,
            located: HashMap::new(),
            next_retry_at: None,
            subscribers: BTreeMap::new(),
            next_subscriber: 0,
            last_served: 0,
            leases: HashMap::new(),
            lease_by_task: HashMap::new(),
            settling: HashSet::new(),
            deadlines: BTreeMap::new(),
            next_lease_serial: 0,
            metrics: QueueMetricsCache::new(metrics),
        }
    }

    pub fn window(&self) -> usize {
        self.window
    }

    /// Applies one committed change. Returns whether a timer moved earlier.
    pub fn apply(&mut self, effect: Effect) -> bool {
        match effect {
            Effect::Ready(task) => {
                self.offer_ready(task);
                false
            }
            Effect::Refilled {
                queue,
                after,
                tasks,
                last,
                exhausted,
            } => {
                self.refilled(queue, after, tasks, last, exhausted);
                false
            }
            Effect::Forget(task_id) => {
                self.remove_located(task_id);
                false
            }
            Effect::CancelRequested(task_id) => {
                self.request_cancel(task_id);
                false
            }
            Effect::Counts(changes) => {
                for (queue, state, change) in changes {
                    let count = self
                        .queues
                        .entry(queue)
                        .or_default()
                        .stored
                        .entry(state)
                        .or_default();
                    *count = count.saturating_add_signed(change);
                }
                false
            }
            Effect::NextRetry(retry_at) => {
                let earlier = match (retry_at, self.next_retry_at) {
                    (Some(new), Some(old)) => new < old,
                    (Some(_), None) => true,
                    (None, _) => false,
                };
                self.next_retry_at = retry_at;
                earlier
            }
            Effect::Paused { queue, paused } => {
                self.queues.entry(queue).or_default().paused = paused;
                false
            }
        }
    }

    /// Puts a deliverable task into its queue's window if the window covers it. A task
    /// beyond the window stays in the store only, for a later refill.
    fn offer_ready(&mut self, task: Arc<ReadyTask>) {
        let key = key_of(&task);
        let queue = self.queues.entry(task.queue.clone()).or_default();
        if !queue.covers(key) || self.located.contains_key(&task.id) {
            return;
        }
        self.insert_ready(task);
    }

    fn insert_ready(&mut self, task: Arc<ReadyTask>) {
        let key = key_of(&task);
        let queue_name = task.queue.clone();
        let queue = self.queues.entry(queue_name.clone()).or_default();
        self.located.insert(task.id, (queue_name.clone(), key));
        if queue.window.insert(key, task).is_none() {
            self.ready_count += 1;
        }
        self.evict_overflow(&queue_name);
    }

    /// Shrinks a window that grew past its size, leaving its last tasks to the store.
    fn evict_overflow(&mut self, queue_name: &QueueName) {
        let Some(queue) = self.queues.get_mut(queue_name) else {
            return;
        };
        while queue.window.len() > self.window {
            let Some((_, evicted)) = queue.window.pop_last() else {
                break;
            };
            self.located.remove(&evicted.id);
            self.ready_count -= 1;
            queue.complete = false;
            queue.loaded_until = queue.window.last_key_value().map(|(&key, _)| key);
        }
    }

    fn refilled(
        &mut self,
        queue_name: QueueName,
        after: Option<ReadyKey>,
        tasks: Vec<Arc<ReadyTask>>,
        last: Option<ReadyKey>,
        exhausted: bool,
    ) {
        let queue = self.queues.entry(queue_name.clone()).or_default();
        queue.refill_pending = false;
        // A window that shrank since the request no longer ends where the read started.
        if !queue.complete && queue.loaded_until != after {
            return;
        }
        if queue.complete && after.is_some() {
            return;
        }
        if exhausted {
            queue.complete = true;
            queue.loaded_until = None;
        } else {
            queue.complete = false;
            queue.loaded_until = last.or(after);
        }
        for task in tasks {
            let held =
                self.lease_by_task.contains_key(&task.id) || self.settling.contains(&task.id);
            if held || self.located.contains_key(&task.id) {
                continue;
            }
            self.insert_ready(task);
        }
    }

    /// Returns the queues whose window ran low and that have more tasks in the store, with
    /// the window position to read after.
    pub fn queues_needing_refill(&self) -> Vec<(QueueName, Option<ReadyKey>)> {
        let low_water = self.window / 2;
        self.queues
            .iter()
            .filter(|(_, queue)| {
                !queue.complete && !queue.refill_pending && queue.window.len() < low_water
            })
            .map(|(name, queue)| (name.clone(), queue.loaded_until))
            .collect()
    }

    pub fn describe_queue(&self, queue_name: &QueueName) -> String {
        let Some(queue) = self.queues.get(queue_name) else {
            return "no queue".to_owned();
        };
        format!(
            "window {:?} complete {} loaded_until {:?} refill_pending {} ready_count {} subscribers {:?}",
            queue.window.keys().collect::<Vec<_>>(),
            queue.complete,
            queue.loaded_until,
            queue.refill_pending,
            self.ready_count,
            self.subscribers
                .iter()
                .map(|(id, s)| (*id, s.outstanding, s.max_in_flight, s.closed))
                .collect::<Vec<_>>()
        )
    }

    pub fn refills_outstanding(&self) -> bool {
        self.queues.values().any(|queue| queue.refill_pending)
            || !self.queues_needing_refill().is_empty()
    }

    pub fn mark_refill_pending(&mut self, queue_name: &QueueName) {
        if let Some(queue) = self.queues.get_mut(queue_name) {
            queue.refill_pending = true;
        }
    }

    /// Removes a task from its window by id and returns it.
    fn remove_located(&mut self, task_id: TaskId) -> Option<Arc<ReadyTask>> {
        let (queue_name, key) = self.located.remove(&task_id)?;
        let queue = self.queues.get_mut(&queue_name)?;
        let task = queue.window.remove(&key)?;
        self.ready_count -= 1;
        Some(task)
    }

    fn pop_ready(&mut self, queue_name: &QueueName) -> Option<Arc<ReadyTask>> {
        let queue = self.queues.get_mut(queue_name)?;
        if queue.paused {
            return None;
        }
        let (_, task) = queue.window.pop_first()?;
        self.located.remove(&task.id);
        self.ready_count -= 1;
        Some(task)
    }

    pub fn claim(&mut self, task_id: TaskId) -> Claim {
        if self.lease_by_task.contains_key(&task_id) {
            return Claim::Leased;
        }
        if self.settling.contains(&task_id) {
            return Claim::Settling;
        }
        match self.remove_located(task_id) {
            Some(task) => Claim::Ready(task),
            None => Claim::Absent,
        }
    }

    pub fn is_held(&self, task_id: TaskId) -> bool {
        self.lease_by_task.contains_key(&task_id) || self.settling.contains(&task_id)
    }

    pub fn next_retry_at(&self) -> Option<i64> {
        self.next_retry_at
    }

    pub fn next_lease_deadline(&self) -> Option<Instant> {
        self.deadlines
            .first_key_value()
            .map(|(&(deadline, _), _)| deadline)
    }

    pub fn add_subscriber(
        &mut self,
        subscription: Subscription,
    ) -> (SubscriberId, mpsc::Receiver<SubscribeResponse>) {
        // Credit accounting keeps at most `max_in_flight` deliveries in the channel; the
        // slack leaves room for cancellation notices.
        let (sender, receiver) = mpsc::channel(subscription.max_in_flight as usize + NOTICE_SLACK);
        let id = self.next_subscriber;
        self.next_subscriber += 1;
        for (queue, _) in &subscription.queues {
            self.queues.entry(queue.clone()).or_default();
        }
        self.subscribers.insert(
            id,
            Subscriber {
                queues: subscription.queues,
                max_in_flight: subscription.max_in_flight,
                outstanding: 0,
                lease_duration: subscription.lease_duration,
                sender,
                turn: 0,
                served_in_turn: 0,
                closed: false,
                stop_token: format!("{:032x}", rand::random::<u128>()),
            },
        );
        (id, receiver)
    }

    /// Returns the token that stops deliveries to a subscriber.
    pub fn stop_token(&self, id: SubscriberId) -> Option<&str> {
        self.subscribers
            .get(&id)
            .map(|subscriber| subscriber.stop_token.as_str())
    }

    /// Sends no further deliveries to the subscriber that `token` names, while its
    /// leases stay live. Returns the number of leases it still holds, or `None` if no
    /// open stream has that token.
    pub fn stop_deliveries(&mut self, token: &str) -> Option<u32> {
        let subscriber = self
            .subscribers
            .values_mut()
            .find(|subscriber| subscriber.stop_token == token)?;
        subscriber.max_in_flight = 0;
        Some(subscriber.outstanding)
    }

    pub fn remove_subscriber(&mut self, id: SubscriberId) -> Vec<SettledLease> {
        self.subscribers.remove(&id);
        let held: Vec<LeaseId> = self
            .leases
            .iter()
            .filter(|(_, lease)| lease.subscriber == id)
            .map(|(lease_id, _)| lease_id.clone())
            .collect();
        held.iter()
            .filter_map(|lease_id| self.remove_lease(lease_id))
            .collect()
    }

    /// Removes a lease from every index, frees its subscriber's credit, and marks its task
    /// as settling until the writer applies the outcome.
    pub fn remove_lease(&mut self, lease_id: &LeaseId) -> Option<SettledLease> {
        let lease = self.leases.remove(lease_id)?;
        self.deadlines.remove(&(lease.deadline, lease.serial));
        self.lease_by_task.remove(&lease.task.id);
        self.settling.insert(lease.task.id);
        if let Some(subscriber) = self.subscribers.get_mut(&lease.subscriber) {
            subscriber.outstanding = subscriber.outstanding.saturating_sub(1);
        }
        if let Some(queue) = self.queues.get_mut(&lease.task.queue) {
            queue.leased = queue.leased.saturating_sub(1);
        }
        Some(SettledLease {
            task: lease.task,
            started_at_us: lease.started_at_us,
        })
    }

    pub fn finish_settling(&mut self, task_id: TaskId) {
        self.settling.remove(&task_id);
    }

    pub fn extend_lease(&mut self, lease_id: &LeaseId, extension: Duration) -> Option<Extended> {
        let lease = self.leases.get_mut(lease_id)?;
        self.deadlines.remove(&(lease.deadline, lease.serial));
        lease.deadline = Instant::now() + extension;
        lease.deadline_wall = SystemTime::now() + extension;
        let earliest_moved = self
            .deadlines
            .first_key_value()
            .is_none_or(|(&(first, _), _)| lease.deadline < first);
        self.deadlines
            .insert((lease.deadline, lease.serial), lease_id.clone());
        Some(Extended {
            deadline: lease.deadline_wall,
            cancel_requested: lease.cancel_requested,
            earliest_moved,
        })
    }

    pub fn expire_leases(&mut self, now: Instant) -> Vec<SettledLease> {
        let mut expired = Vec::new();
        while let Some((&(deadline, _), lease_id)) = self.deadlines.first_key_value() {
            if deadline > now {
                break;
            }
            let lease_id = lease_id.clone();
            if let Some(settled) = self.remove_lease(&lease_id) {
                tracing::debug!(task_id = %settled.task.id, %lease_id, "lease expired");
                expired.push(settled);
            }
        }
        expired
    }

    fn request_cancel(&mut self, task_id: TaskId) {
        let Some(lease_id) = self.lease_by_task.get(&task_id) else {
            return;
        };
        let Some(lease) = self.leases.get_mut(lease_id) else {
            return;
        };
        lease.cancel_requested = true;
        let Some(subscriber) = self.subscribers.get(&lease.subscriber) else {
            return;
        };
        let notice = SubscribeResponse {
            event: Some(Event::CancelNotice(v1::CancelNotice {
                task_id: task_id.to_string(),
                lease_id: lease_id.as_str().to_owned(),
            })),
        };
        // A full channel loses the notice; ExtendLease and Ack still report it.
        if subscriber.sender.try_send(notice).is_err() {
            tracing::warn!(%task_id, %lease_id, "cancellation notice not sent: the stream is full or closed");
        }
    }

    pub fn lease_view(&self, task_id: TaskId) -> Option<LeaseView> {
        let lease_id = self.lease_by_task.get(&task_id)?;
        let lease = self.leases.get(lease_id)?;
        Some(LeaseView {
            deadline: lease.deadline_wall,
            started_at_us: lease.started_at_us,
        })
    }

    pub fn counts(&self, queue_name: &QueueName) -> QueueCounts {
        let Some(queue) = self.queues.get(queue_name) else {
            return QueueCounts::default();
        };
        QueueCounts {
            pending: queue
                .stored(TaskRecordState::Pending)
                .saturating_sub(queue.leased),
            retry_wait: queue.stored(TaskRecordState::RetryWait),
            leased: queue.leased,
            dead: queue.stored(TaskRecordState::Dead),
            succeeded: queue.stored(TaskRecordState::Succeeded),
            cancelled: queue.stored(TaskRecordState::Cancelled),
            paused: queue.paused,
        }
    }

    pub fn queue_names(&self) -> Vec<QueueName> {
        self.queues.keys().cloned().collect()
    }

    /// Delivers ready tasks to subscribers with free credit, one task per subscriber per
    /// round, until no delivery is possible. Returns whether a new lease has the earliest
    /// deadline.
    pub fn dispatch(
        &mut self,
        lease_duration_of: &dyn Fn(&QueueName) -> Duration,
        watchers: &WatchRegistry,
    ) -> bool {
        let mut earliest_moved = false;
        while self.ready_count > 0 {
            let order: Vec<SubscriberId> = {
                let after = self.last_served;
                let later = self.subscribers.range(after + 1..).map(|(&id, _)| id);
                let earlier = self.subscribers.range(..=after).map(|(&id, _)| id);
                later.chain(earlier).collect()
            };
            let mut delivered = false;
            for subscriber_id in order {
                if let Some(earliest) = self.deliver_one(subscriber_id, lease_duration_of, watchers)
                {
                    delivered = true;
                    earliest_moved |= earliest;
                    self.last_served = subscriber_id;
                }
            }
            if !delivered {
                break;
            }
        }
        earliest_moved
    }

    /// Delivers one ready task to the subscriber if it has credit. Queues take turns by
    /// weight, so that one busy queue cannot starve the others. Returns `None` if nothing
    /// was delivered, or whether the new lease has the earliest deadline.
    fn deliver_one(
        &mut self,
        subscriber_id: SubscriberId,
        lease_duration_of: &dyn Fn(&QueueName) -> Duration,
        watchers: &WatchRegistry,
    ) -> Option<bool> {
        let subscriber = self.subscribers.get(&subscriber_id)?;
        if subscriber.closed || subscriber.outstanding >= subscriber.max_in_flight {
            return None;
        }
        let queue_count = subscriber.queues.len();
        let mut turn = subscriber.turn;
        let mut served_in_turn = subscriber.served_in_turn;

        for _ in 0..=queue_count {
            let (queue, weight) = self.subscribers.get(&subscriber_id)?.queues[turn].clone();
            if served_in_turn >= weight {
                turn = (turn + 1) % queue_count;
                served_in_turn = 0;
                continue;
            }
            let Some(task) = self.pop_ready(&queue) else {
                turn = (turn + 1) % queue_count;
                served_in_turn = 0;
                continue;
            };
            let subscriber = self.subscribers.get_mut(&subscriber_id)?;
            subscriber.turn = turn;
            subscriber.served_in_turn = served_in_turn + 1;
            let lease_duration = subscriber
                .lease_duration
                .unwrap_or_else(|| lease_duration_of(&queue));
            return self.lease_to(subscriber_id, task, lease_duration, watchers);
        }
        None
    }

    fn lease_to(
        &mut self,
        subscriber_id: SubscriberId,
        task: Arc<ReadyTask>,
        lease_duration: Duration,
        watchers: &WatchRegistry,
    ) -> Option<bool> {
        let Some(subscriber) = self.subscribers.get_mut(&subscriber_id) else {
            self.insert_ready(task);
            return None;
        };
        let lease_id = LeaseId::generate();
        let deadline = Instant::now() + lease_duration;
        let deadline_wall = SystemTime::now() + lease_duration;
        let delivery = SubscribeResponse {
            event: Some(Event::Delivery(v1::Delivery {
                task: Some(v1::Task::clone(&task.task)),
                lease_id: lease_id.as_str().to_owned(),
                attempt: task.attempts + 1,
                lease_deadline: Some(deadline_wall.into()),
            })),
        };

        if let Err(err) = subscriber.sender.try_send(delivery) {
            // Full happens only while deliveries whose leases already expired are still
            // unread; the task waits for the next dispatch. Closed means the stream is
            // going away.
            if matches!(err, mpsc::error::TrySendError::Closed(_)) {
                subscriber.closed = true;
            }
            self.insert_ready(task);
            return None;
        }
        subscriber.outstanding += 1;

        let serial = self.next_lease_serial;
        self.next_lease_serial += 1;
        let earliest = self
            .deadlines
            .first_key_value()
            .is_none_or(|(&(first, _), _)| deadline < first);
        self.deadlines.insert((deadline, serial), lease_id.clone());
        self.lease_by_task.insert(task.id, lease_id.clone());
        self.queues.entry(task.queue.clone()).or_default().leased += 1;
        let started_at_us = now_micros();
        self.metrics
            .get(&task.queue)
            .record_delivery(&task, started_at_us);
        if watchers.is_watched(task.id) {
            watchers.publish_state(task.id, TaskState::Leased, Some(deadline_wall));
        }
        tracing::debug!(task_id = %task.id, %lease_id, subscriber = subscriber_id, "task delivered");
        self.leases.insert(
            lease_id,
            Lease {
                task,
                subscriber: subscriber_id,
                deadline,
                deadline_wall,
                serial,
                started_at_us,
                cancel_requested: false,
            },
        );
        Some(earliest)
    }
}
