//! In-memory delivery state: the ready tasks of each queue, the subscribers with their
//! credit, and the live leases.
//!
//! Everything here sits behind one mutex that is never held across an `.await`. Any
//! change that can make a delivery possible (tasks becoming ready, credit freed, a new
//! subscriber) runs [`State::dispatch`] before the lock is released, so there is no
//! separate dispatcher task to wake.

pub mod expiry;

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use docket_proto::v1::{self, SubscribeResponse, subscribe_response::Event};
use tokio::sync::{Notify, mpsc};

use crate::error::BrokerError;
use crate::task::{LeaseId, QueueName, TaskId};

/// A pending task in the dispatcher's memory, with every field needed to order and
/// deliver it without reading the store.
#[derive(Debug, Clone)]
pub struct ReadyTask {
    /// Task id.
    pub id: TaskId,
    /// Queue the task belongs to.
    pub queue: QueueName,
    /// Delivery priority; higher first.
    pub priority: i32,
    /// Enqueue sequence number; lower first among equal priorities.
    pub sequence: u64,
    /// Finished attempts so far.
    pub attempts: u32,
    /// The task as sent to workers.
    pub task: Arc<v1::Task>,
}

/// When a settled lease's credit is used for the next delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redeliver {
    /// At once.
    Now,
    /// At the storage writer's next commit.
    AfterCommit,
}

/// Identifies one Subscribe stream.
pub type SubscriberId = u64;

/// Order of ready tasks in a queue: highest priority first, then enqueue order.
type ReadyKey = (Reverse<i32>, u64);

/// The dispatcher's shared state.
pub struct Dispatcher {
    state: Mutex<State>,
    /// Woken when a lease gets a deadline earlier than every other.
    earliest_deadline_changed: Notify,
}

/// A lease that a subscriber holds on a task.
struct Lease {
    task: Arc<ReadyTask>,
    subscriber: SubscriberId,
    deadline: Instant,
    deadline_wall: SystemTime,
    serial: u64,
}

struct Subscriber {
    queues: Vec<QueueName>,
    max_in_flight: u32,
    outstanding: u32,
    lease_duration: Duration,
    sender: mpsc::Sender<SubscribeResponse>,
    /// Index into `queues` of the queue to try first at the next delivery.
    next_queue: usize,
    /// Set when the stream's channel was found closed; the stream's drop removes it.
    closed: bool,
}

#[derive(Default)]
struct State {
    ready: HashMap<QueueName, BTreeMap<ReadyKey, Arc<ReadyTask>>>,
    ready_count: usize,
    subscribers: BTreeMap<SubscriberId, Subscriber>,
    next_subscriber: SubscriberId,
    /// Subscriber served last, so the next dispatch pass starts after it.
    last_served: SubscriberId,
    leases: HashMap<LeaseId, Lease>,
    lease_by_task: HashMap<TaskId, LeaseId>,
    /// Live leases by deadline; `serial` breaks ties.
    deadlines: BTreeMap<(Instant, u64), LeaseId>,
    next_lease_serial: u64,
}

/// A subscription's parameters, validated.
pub struct Subscription {
    /// Queues to receive from, distinct.
    pub queues: Vec<QueueName>,
    /// Maximum unsettled deliveries.
    pub max_in_flight: u32,
    /// Lease length of each delivery.
    pub lease_duration: Duration,
}

impl Default for Dispatcher {
    fn default() -> Self {
        Dispatcher {
            state: Mutex::new(State::default()),
            earliest_deadline_changed: Notify::new(),
        }
    }
}

impl Dispatcher {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic under the lock leaves the state as the panicking step left it. Serving on
        // is better than failing every later request.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Adds tasks to their queues' ready sets and delivers what subscribers can take.
    /// Dispatches even when `tasks` is empty, since the caller may have freed credit.
    pub fn make_ready(&self, tasks: Vec<Arc<ReadyTask>>) {
        let mut state = self.lock();
        for task in tasks {
            state.insert_ready(task);
        }
        self.dispatch(&mut state);
    }

    /// Registers a stream and delivers what it can take at once. Returns the stream's id
    /// and the receiving end of its deliveries.
    pub fn subscribe(
        &self,
        subscription: Subscription,
    ) -> (SubscriberId, mpsc::Receiver<SubscribeResponse>) {
        // Credit accounting keeps at most `max_in_flight` deliveries in the channel.
        let (sender, receiver) = mpsc::channel(subscription.max_in_flight as usize);
        let mut state = self.lock();
        let id = state.next_subscriber;
        state.next_subscriber += 1;
        state.subscribers.insert(
            id,
            Subscriber {
                queues: subscription.queues,
                max_in_flight: subscription.max_in_flight,
                outstanding: 0,
                lease_duration: subscription.lease_duration,
                sender,
                next_queue: 0,
                closed: false,
            },
        );
        self.dispatch(&mut state);
        (id, receiver)
    }

    /// Removes a stream and returns the tasks it held leases on, which the caller must
    /// record as failed attempts.
    pub fn unsubscribe(&self, id: SubscriberId) -> Vec<Arc<ReadyTask>> {
        let mut state = self.lock();
        state.subscribers.remove(&id);
        let held: Vec<LeaseId> = state
            .leases
            .iter()
            .filter(|(_, lease)| lease.subscriber == id)
            .map(|(lease_id, _)| lease_id.clone())
            .collect();
        held.iter()
            .filter_map(|lease_id| state.remove_lease(lease_id))
            .map(|lease| lease.task)
            .collect()
    }

    /// Settles a live lease for Ack or Nack: removes it, frees the subscriber's credit and
    /// returns the leased task.
    ///
    /// With `Redeliver::Now` the freed credit is used at once. With `Redeliver::AfterCommit`
    /// it waits for the storage writer's next dispatch, so that a failed task that becomes
    /// ready again competes for the credit in its priority order.
    ///
    /// # Errors
    ///
    /// `LeaseNotLive` if the lease is unknown, expired or already settled.
    pub fn settle(
        &self,
        lease_id: &LeaseId,
        redeliver: Redeliver,
    ) -> Result<Arc<ReadyTask>, BrokerError> {
        let mut state = self.lock();
        let Some(lease) = state.remove_lease(lease_id) else {
            return Err(BrokerError::LeaseNotLive(lease_id.clone()));
        };
        if redeliver == Redeliver::Now {
            self.dispatch(&mut state);
        }
        Ok(lease.task)
    }

    /// Removes every lease whose deadline is at or before `now` and returns their tasks,
    /// which the caller must record as failed attempts.
    pub fn expire_due(&self, now: Instant) -> Vec<Arc<ReadyTask>> {
        let mut state = self.lock();
        let mut expired = Vec::new();
        while let Some((&(deadline, _), lease_id)) = state.deadlines.first_key_value() {
            if deadline > now {
                break;
            }
            let lease_id = lease_id.clone();
            if let Some(lease) = state.remove_lease(&lease_id) {
                tracing::debug!(task_id = %lease.task.id, %lease_id, "lease expired");
                expired.push(lease.task);
            }
        }
        if !expired.is_empty() {
            self.dispatch(&mut state);
        }
        expired
    }

    /// Returns the earliest deadline of any live lease.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.lock()
            .deadlines
            .first_key_value()
            .map(|(&(deadline, _), _)| deadline)
    }

    /// Waits until a lease gets a deadline earlier than all others.
    pub async fn earliest_deadline_changed(&self) {
        self.earliest_deadline_changed.notified().await;
    }

    /// Returns the deadline of the live lease on a task, if it is leased.
    pub fn lease_deadline(&self, task_id: TaskId) -> Option<SystemTime> {
        let state = self.lock();
        let lease_id = state.lease_by_task.get(&task_id)?;
        state.leases.get(lease_id).map(|lease| lease.deadline_wall)
    }

    /// Delivers ready tasks to subscribers with free credit, one task per subscriber per
    /// round, until no delivery is possible.
    fn dispatch(&self, state: &mut State) {
        let mut earliest_changed = false;
        while state.ready_count > 0 {
            let order: Vec<SubscriberId> = {
                let after = state.last_served;
                let later = state.subscribers.range(after + 1..).map(|(&id, _)| id);
                let earlier = state.subscribers.range(..=after).map(|(&id, _)| id);
                later.chain(earlier).collect()
            };
            let mut delivered = false;
            for subscriber_id in order {
                match state.deliver_one(subscriber_id) {
                    Delivered::Yes { earliest } => {
                        delivered = true;
                        earliest_changed |= earliest;
                        state.last_served = subscriber_id;
                    }
                    Delivered::No => {}
                }
            }
            if !delivered {
                break;
            }
        }
        if earliest_changed {
            self.earliest_deadline_changed.notify_one();
        }
    }
}

enum Delivered {
    Yes {
        /// The new lease has the earliest deadline of all.
        earliest: bool,
    },
    No,
}

impl State {
    fn insert_ready(&mut self, task: Arc<ReadyTask>) {
        let key = (Reverse(task.priority), task.sequence);
        let queue = self.ready.entry(task.queue.clone()).or_default();
        if queue.insert(key, task).is_none() {
            self.ready_count += 1;
        }
    }

    fn pop_ready(&mut self, queue: &QueueName) -> Option<Arc<ReadyTask>> {
        let tasks = self.ready.get_mut(queue)?;
        let (_, task) = tasks.pop_first()?;
        if tasks.is_empty() {
            self.ready.remove(queue);
        }
        self.ready_count -= 1;
        Some(task)
    }

    /// Delivers one ready task to the subscriber if it has credit, trying its queues in
    /// turn so that one busy queue cannot starve the others.
    fn deliver_one(&mut self, subscriber_id: SubscriberId) -> Delivered {
        let Some(subscriber) = self.subscribers.get(&subscriber_id) else {
            return Delivered::No;
        };
        if subscriber.closed || subscriber.outstanding >= subscriber.max_in_flight {
            return Delivered::No;
        }
        let queue_count = subscriber.queues.len();
        let first = subscriber.next_queue;
        let queues = subscriber.queues.clone();

        for offset in 0..queue_count {
            let index = (first + offset) % queue_count;
            let Some(task) = self.pop_ready(&queues[index]) else {
                continue;
            };
            return self.lease_to(subscriber_id, task, (index + 1) % queue_count);
        }
        Delivered::No
    }

    fn lease_to(
        &mut self,
        subscriber_id: SubscriberId,
        task: Arc<ReadyTask>,
        next_queue: usize,
    ) -> Delivered {
        let Some(subscriber) = self.subscribers.get_mut(&subscriber_id) else {
            self.insert_ready(task);
            return Delivered::No;
        };
        let lease_id = LeaseId::generate();
        let deadline = Instant::now() + subscriber.lease_duration;
        let deadline_wall = SystemTime::now() + subscriber.lease_duration;
        let delivery = SubscribeResponse {
            event: Some(Event::Delivery(v1::Delivery {
                task: Some(v1::Task::clone(&task.task)),
                lease_id: lease_id.as_str().to_owned(),
                attempt: task.attempts + 1,
                lease_deadline: Some(deadline_wall.into()),
            })),
        };

        match subscriber.sender.try_send(delivery) {
            Ok(()) => {}
            Err(err) => {
                // Full happens only while deliveries whose leases already expired are
                // still unread; the task waits for the next dispatch. Closed means the
                // stream is going away.
                if matches!(err, mpsc::error::TrySendError::Closed(_)) {
                    subscriber.closed = true;
                }
                self.insert_ready(task);
                return Delivered::No;
            }
        }
        subscriber.outstanding += 1;
        subscriber.next_queue = next_queue;

        let serial = self.next_lease_serial;
        self.next_lease_serial += 1;
        let earliest = self
            .deadlines
            .first_key_value()
            .is_none_or(|(&(first, _), _)| deadline < first);
        self.deadlines.insert((deadline, serial), lease_id.clone());
        self.lease_by_task.insert(task.id, lease_id.clone());
        tracing::debug!(task_id = %task.id, %lease_id, subscriber = subscriber_id, "task delivered");
        self.leases.insert(
            lease_id,
            Lease {
                task,
                subscriber: subscriber_id,
                deadline,
                deadline_wall,
                serial,
            },
        );
        Delivered::Yes { earliest }
    }

    /// Removes a lease from every index and frees its subscriber's credit.
    fn remove_lease(&mut self, lease_id: &LeaseId) -> Option<Lease> {
        let lease = self.leases.remove(lease_id)?;
        self.deadlines.remove(&(lease.deadline, lease.serial));
        self.lease_by_task.remove(&lease.task.id);
        if let Some(subscriber) = self.subscribers.get_mut(&lease.subscriber) {
            subscriber.outstanding = subscriber.outstanding.saturating_sub(1);
        }
        Some(lease)
    }
}

#[cfg(test)]
mod tests;
