//! The dispatcher's state and the operations on it, all run under its mutex.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use docket_proto::v1::{self, SubscribeResponse, TaskState, subscribe_response::Event};
use tokio::sync::mpsc;

use super::watch::WatchRegistry;
use super::{
    Claim, Effect, FinalState, LeaseView, QueueCounts, ReadyTask, SettledLease, SubscriberId,
    Subscription,
};
use crate::store::now_micros;
use crate::task::{LeaseId, QueueName, TaskId};

/// Order of ready tasks in a queue: highest priority first, then enqueue order.
type ReadyKey = (Reverse<i32>, u64);

/// Order of retry-waiting tasks: earliest retry time first, then enqueue order.
type WaitKey = (i64, u64);

/// Room in a stream's channel beyond its credit, for cancellation notices.
const NOTICE_SLACK: usize = 64;

#[derive(Default)]
pub(super) struct State {
    queues: HashMap<QueueName, QueueState>,
    /// Ready tasks in all queues, paused ones included.
    ready_count: usize,
    /// Retry-waiting tasks of all queues.
    waiting: BTreeMap<WaitKey, Arc<ReadyTask>>,
    /// Location of each ready or waiting task, so that it can be removed by id.
    located: HashMap<TaskId, Location>,
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
}

#[derive(Default)]
struct QueueState {
    ready: BTreeMap<ReadyKey, Arc<ReadyTask>>,
    /// Enqueue time of each ready task by sequence, for the oldest pending age.
    ready_by_age: BTreeMap<u64, i64>,
    waiting: u64,
    leased: u64,
    succeeded: u64,
    dead: u64,
    cancelled: u64,
    paused: bool,
}

#[derive(Debug, Clone)]
enum Location {
    Ready(QueueName, ReadyKey),
    Waiting(WaitKey),
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
}

/// Result of extending a lease.
pub(super) struct Extended {
    pub deadline: SystemTime,
    pub cancel_requested: bool,
    pub earliest_moved: bool,
}

impl State {
    /// Applies one committed change. Returns whether a timer moved earlier.
    pub fn apply(&mut self, effect: Effect) -> bool {
        match effect {
            Effect::Ready(task) => {
                self.insert_ready(task);
                false
            }
            Effect::Wait { task, retry_at_us } => self.insert_waiting(task, retry_at_us),
            Effect::Forget(task_id) => {
                self.remove_located(task_id);
                false
            }
            Effect::CancelRequested(task_id) => {
                self.request_cancel(task_id);
                false
            }
            Effect::Count {
                queue,
                state,
                delta,
            } => {
                let queue = self.queues.entry(queue).or_default();
                let count = match state {
                    FinalState::Succeeded => &mut queue.succeeded,
                    FinalState::Dead => &mut queue.dead,
                    FinalState::Cancelled => &mut queue.cancelled,
                };
                *count = count.saturating_add_signed(delta);
                false
            }
            Effect::Paused { queue, paused } => {
                self.queues.entry(queue).or_default().paused = paused;
                false
            }
        }
    }

    fn insert_ready(&mut self, task: Arc<ReadyTask>) {
        let key = (Reverse(task.priority), task.sequence);
        let queue = self.queues.entry(task.queue.clone()).or_default();
        queue.ready_by_age.insert(task.sequence, task.created_at_us);
        self.located
            .insert(task.id, Location::Ready(task.queue.clone(), key));
        if queue.ready.insert(key, task).is_none() {
            self.ready_count += 1;
        }
    }

    /// Returns whether the task's retry is now the earliest.
    fn insert_waiting(&mut self, task: Arc<ReadyTask>, retry_at_us: i64) -> bool {
        let key = (retry_at_us, task.sequence);
        let earliest = self
            .waiting
            .first_key_value()
            .is_none_or(|(&first, _)| key < first);
        self.queues.entry(task.queue.clone()).or_default().waiting += 1;
        self.located.insert(task.id, Location::Waiting(key));
        self.waiting.insert(key, task);
        earliest
    }

    /// Removes a ready or waiting task by id and returns it with where it was.
    fn remove_located(&mut self, task_id: TaskId) -> Option<(Arc<ReadyTask>, Location)> {
        let location = self.located.remove(&task_id)?;
        match location {
            Location::Ready(ref queue_name, key) => {
                let queue = self.queues.get_mut(queue_name)?;
                let task = queue.ready.remove(&key)?;
                queue.ready_by_age.remove(&task.sequence);
                self.ready_count -= 1;
                Some((task, location))
            }
            Location::Waiting(key) => {
                let task = self.waiting.remove(&key)?;
                let queue = self.queues.entry(task.queue.clone()).or_default();
                queue.waiting = queue.waiting.saturating_sub(1);
                Some((task, location))
            }
        }
    }

    fn pop_ready(&mut self, queue_name: &QueueName) -> Option<Arc<ReadyTask>> {
        let queue = self.queues.get_mut(queue_name)?;
        if queue.paused {
            return None;
        }
        let (_, task) = queue.ready.pop_first()?;
        queue.ready_by_age.remove(&task.sequence);
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
            Some((task, Location::Ready(..))) => Claim::Ready(task),
            Some((task, Location::Waiting((retry_at_us, _)))) => {
                Claim::Waiting { task, retry_at_us }
            }
            None => Claim::Absent,
        }
    }

    pub fn take_pending(&mut self, queue_name: &QueueName) -> Vec<Arc<ReadyTask>> {
        let Some(queue) = self.queues.get_mut(queue_name) else {
            return Vec::new();
        };
        let ready = std::mem::take(&mut queue.ready);
        queue.ready_by_age.clear();
        queue.waiting = 0;
        self.ready_count -= ready.len();

        let waiting_keys: Vec<WaitKey> = self
            .waiting
            .iter()
            .filter(|(_, task)| &task.queue == queue_name)
            .map(|(&key, _)| key)
            .collect();
        let mut taken: Vec<Arc<ReadyTask>> = ready.into_values().collect();
        taken.extend(
            waiting_keys
                .iter()
                .filter_map(|key| self.waiting.remove(key)),
        );
        for task in &taken {
            self.located.remove(&task.id);
        }
        taken
    }

    /// Makes due retry-waiting tasks ready. Returns how many.
    pub fn promote_waiting(&mut self, now_us: i64, watchers: &WatchRegistry) -> usize {
        let mut promoted = 0;
        while let Some(entry) = self.waiting.first_entry() {
            if entry.key().0 > now_us {
                break;
            }
            let task = entry.remove();
            let queue = self.queues.entry(task.queue.clone()).or_default();
            queue.waiting = queue.waiting.saturating_sub(1);
            if watchers.is_watched(task.id) {
                watchers.publish_state(task.id, TaskState::Pending, None);
            }
            self.insert_ready(task);
            promoted += 1;
        }
        promoted
    }

    pub fn next_retry_at(&self) -> Option<i64> {
        self.waiting
            .first_key_value()
            .map(|(&(retry_at_us, _), _)| retry_at_us)
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
            },
        );
        (id, receiver)
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

    /// Removes a lease from every index and frees its subscriber's credit.
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

    pub fn finish_settling(&mut self, task_id: TaskId) {
        self.settling.remove(&task_id);
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
            pending: queue.ready.len() as u64,
            retry_wait: queue.waiting,
            leased: queue.leased,
            dead: queue.dead,
            succeeded: queue.succeeded,
            cancelled: queue.cancelled,
            oldest_pending_us: queue
                .ready_by_age
                .first_key_value()
                .map(|(_, &created)| created),
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
                started_at_us: now_micros(),
                cancel_requested: false,
            },
        );
        Some(earliest)
    }
}
