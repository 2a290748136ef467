//! Model-based test of the task state machine. Random sequences of operations run
//! against the real store, storage writer and dispatcher, without gRPC or processes.
//! After every step the store's records and the dispatcher's counts must match a small
//! in-memory model.
//!
//! The operations are those of the broker's RPCs and timers: enqueue (with and without
//! idempotency keys), subscribe, ack, nack (plain, with `no_retry`, with a zero or a long
//! retry delay), extend, lease expiry, closing a stream, cancel, promotion of due
//! retries, and a restart that reopens the store and recovers a fresh dispatcher as
//! `serve` does. Deliveries are checked as they arrive: only ready tasks, in priority
//! order within each queue, never past a stream's credit, and with the right attempt
//! number.
//!
//! The random steps never commit a CancelTask while a settled lease waits for its own
//! commit. `ack_racing_cancel_succeeds` and `nack_racing_cancel_keeps_attempt` cover that
//! order on their own.
//!
//! The run is seeded: the seed is printed, and `DOCKET_MODEL_SEED` replays it.
//! `DOCKET_MODEL_SEQUENCES` sets the number of sequences.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use docket_broker::broker::STREAM_CLOSED;
use docket_broker::dispatch::timers::LEASE_EXPIRED;
use docket_broker::dispatch::{Dispatcher, Redeliver, SettledLease, SubscriberId, Subscription};
use docket_broker::error::BrokerError;
use docket_broker::retry::RetryPolicy;
use docket_broker::settings::{Defaults, SettingsCache};
use docket_broker::store::writer::{
    self, Enqueued, Failure, Reply, SettleOutcome, WriteOp, WriterHandle,
};
use docket_broker::store::{Store, now_micros};
use docket_broker::task::{LeaseId, NewTask, QueueName, TaskId};
use docket_proto::storage::TaskRecordState;
use docket_proto::v1::subscribe_response::Event;
use docket_proto::v1::{SubscribeResponse, TaskState};
use prost::bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::{mpsc, oneshot};

const SEED_VARIABLE: &str = "DOCKET_MODEL_SEED";
const SEQUENCES_VARIABLE: &str = "DOCKET_MODEL_SEQUENCES";
const DEFAULT_SEQUENCES: usize = 200;
const QUEUES: [&str; 2] = ["alpha", "beta"];
/// Maximum attempts of a task that sets none.
const DEFAULT_MAX_ATTEMPTS: u32 = 3;
/// Lease length of every stream. Expiry is simulated by asking the dispatcher to expire
/// the leases due at a later time, so no lease expires while a sequence runs.
const LEASE: Duration = Duration::from_secs(30);
/// Extension given by ExtendLease: past `EXPIRE_SOME`, before `EXPIRE_ALL`.
const EXTENSION: Duration = Duration::from_secs(2 * 60 * 60);
/// Time from now at which an expiry step expires only leases that were never extended.
const EXPIRE_SOME: Duration = Duration::from_secs(10 * 60);
/// Time from now at which an expiry step expires every lease.
const EXPIRE_ALL: Duration = Duration::from_secs(24 * 60 * 60);
/// Retry delay that a Nack may request, long enough to stay RETRY_WAIT until promoted.
const LONG_RETRY: Duration = Duration::from_secs(60 * 60);
/// Maximum number of streams open at once.
const MAX_SUBSCRIBERS: usize = 4;

fn defaults() -> Defaults {
    Defaults {
        max_attempts: DEFAULT_MAX_ATTEMPTS,
        // Zero backoff: a failed task is pending again at once unless a Nack requests a
        // delay.
        retry_policy: RetryPolicy {
            initial_backoff: Duration::ZERO,
            multiplier: 1.0,
            max_backoff: Duration::ZERO,
            jitter: 0.0,
        },
        lease_duration: LEASE,
        retention: Duration::from_secs(7 * 24 * 60 * 60),
        dead_retention: Duration::from_secs(30 * 24 * 60 * 60),
        idempotency_window: Duration::from_secs(24 * 60 * 60),
    }
}

/// Where a task is in the dispatcher's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Live {
    Ready,
    Waiting,
    Leased,
    /// Its lease was taken from the dispatcher and its failure is not yet committed.
    Settling,
    /// In a final state: not in the dispatcher at all.
    Gone,
}

#[derive(Debug, Clone)]
struct ModelTask {
    queue: usize,
    priority: i32,
    sequence: u64,
    max_attempts: u32,
    attempts: u32,
    /// The state the store should hold. A leased task keeps its stored state, because
    /// deliveries are not stored.
    stored: TaskRecordState,
    live: Live,
    cancel_requested: bool,
    /// A Nack with `no_retry` dead-lettered the task.
    no_retry: bool,
    /// Error of each finished attempt, "" for the successful one.
    errors: Vec<String>,
}

impl ModelTask {
    fn ready_key(&self) -> (Reverse<i32>, u64) {
        (Reverse(self.priority), self.sequence)
    }
}

#[derive(Debug, Clone)]
struct ModelLease {
    task_id: TaskId,
    /// Index into `Sequence::subscribers`.
    subscriber: usize,
    extended: bool,
}

struct ModelSubscriber {
    id: SubscriberId,
    receiver: mpsc::Receiver<SubscribeResponse>,
    queues: Vec<usize>,
    max_in_flight: u32,
    /// Cancel notices this stream must receive, as (task id, lease id).
    expected_notices: Vec<(String, String)>,
    closed: bool,
}

/// Number of ready tasks per queue that the dispatcher keeps in memory. Small, so that
/// sequences run past the end of a window and depend on refills from the store.
fn window() -> usize {
    std::env::var("DOCKET_MODEL_WINDOW")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(4)
}

/// The system under test, rebuilt on each restart.
struct System {
    store: Arc<Store>,
    dispatcher: Arc<Dispatcher>,
    writer: WriterHandle,
    thread: JoinHandle<()>,
}

impl System {
    /// Opens the store in `dir`, recovers it and starts the writer, as `serve` does.
    /// Returns the number of deliverable tasks that recovery found.
    fn start(dir: &Path) -> (System, usize) {
        let store = Store::open(dir, &dir.join("broker.redb"), 16 << 20).expect("store opens");
        let recovered = store
            .recover(&defaults(), window())
            .expect("store recovers");
        let store = Arc::new(store);
        let settings = SettingsCache::new(defaults(), recovered.settings);
        let dispatcher = Arc::new(Dispatcher::new(window(), {
            let settings = settings.clone();
            move |queue| settings.get(queue).lease_duration
        }));
        dispatcher.apply(recovered.effects);
        let (writer, thread) = writer::spawn(
            Arc::clone(&store),
            Arc::clone(&dispatcher),
            settings,
            recovered.next_sequence,
            64,
            16,
        )
        .expect("writer thread starts");
        dispatcher.connect_writer(&writer);
        let system = System {
            store,
            dispatcher,
            writer,
            thread,
        };
        (system, recovered.deliverable as usize)
    }

    /// Stops the writer and closes the store, so that it can be opened again. Checks on the
    /// way that the store's secondary indexes match its records.
    fn stop(self) {
        let System {
            store,
            dispatcher,
            writer,
            thread,
        } = self;
        drop(writer);
        thread.join().expect("writer thread ends without panicking");
        let indexes = store.check_indexes().expect("the store can be read");
        assert_eq!(indexes, Ok(()), "secondary indexes match the records");
        drop(dispatcher);
        assert_eq!(
            Arc::strong_count(&store),
            1,
            "the store is still shared after the writer stopped"
        );
        drop(store);
    }

    async fn request<T>(
        &self,
        make_op: impl FnOnce(Reply<T>) -> WriteOp,
    ) -> Result<T, BrokerError> {
        let (reply, response) = oneshot::channel();
        self.send(make_op(reply)).await;
        response.await.expect("writer replies")
    }

    async fn send(&self, op: WriteOp) {
        if self.writer.send(op).await.is_err() {
            panic!("writer stopped");
        }
    }

    /// Waits until every request sent before is committed and applied to the dispatcher.
    /// The writer handles requests in order, and an empty enqueue changes nothing.
    async fn barrier(&self) {
        let enqueued = self
            .request(|reply| WriteOp::Enqueue {
                tasks: Vec::new(),
                reply,
            })
            .await
            .expect("empty enqueue succeeds");
        assert!(enqueued.is_empty());
    }
}

/// One random sequence: the system, the model, and the random source of the steps.
struct Sequence {
    dir: tempfile::TempDir,
    system: Option<System>,
    rng: StdRng,
    tasks: BTreeMap<TaskId, ModelTask>,
    keys: HashMap<(usize, String), TaskId>,
    next_sequence: u64,
    leases: HashMap<LeaseId, ModelLease>,
    /// Leases that are no longer live. Settling or extending them must fail.
    stale_leases: Vec<LeaseId>,
    subscribers: Vec<ModelSubscriber>,
    next_error: u64,
    /// Steps run so far and the name of the last one, for failure messages.
    step: usize,
    step_name: &'static str,
}

impl Sequence {
    fn new(seed: u64) -> Self {
        let dir = temp_dir();
        let (system, deliverable) = System::start(dir.path());
        assert_eq!(deliverable, 0);
        Sequence {
            dir,
            system: Some(system),
            rng: StdRng::seed_from_u64(seed),
            tasks: BTreeMap::new(),
            keys: HashMap::new(),
            next_sequence: 0,
            leases: HashMap::new(),
            stale_leases: Vec::new(),
            subscribers: Vec::new(),
            next_error: 0,
            step: 0,
            step_name: "start",
        }
    }

    fn system(&self) -> &System {
        self.system.as_ref().expect("system is running")
    }

    fn context(&self) -> String {
        format!("step {} ({})", self.step, self.step_name)
    }

    fn queue_name(queue: usize) -> QueueName {
        QueueName::parse("queue", QUEUES[queue]).expect("valid queue name")
    }

    async fn run(&mut self, steps: usize) {
        for step in 1..=steps {
            self.step = step;
            let roll = self.rng.random_range(0..100);
            match roll {
                0..20 => self.enqueue().await,
                20..28 => self.subscribe(),
                28..43 => self.ack().await,
                43..58 => self.nack().await,
                58..63 => self.extend(),
                63..70 => self.expire().await,
                70..75 => self.close_stream().await,
                75..82 => self.cancel().await,
                82..86 => self.promote().await,
                86..90 => self.settle_batch().await,
                90..93 => self.restart(),
                _ => self.settle_stale().await,
            }
            self.await_refills().await;
            self.check_all();
        }
        self.system.take().expect("system is running").stop();
    }

    /// Waits until the dispatcher has no window refill outstanding, then takes the
    /// deliveries that the refills made possible. Windows are small here, so a step can
    /// empty one; the writer then reads the next tasks of the queue from the store.
    async fn await_refills(&mut self) {
        while self.system().dispatcher.refills_outstanding() {
            self.system().barrier().await;
            self.take_deliveries();
        }
    }

    fn new_error(&mut self) -> String {
        self.next_error += 1;
        format!("failure {}", self.next_error)
    }

    fn pick_lease(&mut self) -> Option<LeaseId> {
        let mut live: Vec<&LeaseId> = self.leases.keys().collect();
        live.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        if live.is_empty() {
            return None;
        }
        let index = self.rng.random_range(0..live.len());
        Some(live[index].clone())
    }

    /// Removes a lease from the model after the dispatcher removed it.
    fn forget_lease(&mut self, lease_id: &LeaseId) -> ModelLease {
        let lease = self
            .leases
            .remove(lease_id)
            .unwrap_or_else(|| panic!("{}: lease {lease_id} is not in the model", self.context()));
        self.stale_leases.push(lease_id.clone());
        lease
    }

    async fn enqueue(&mut self) {
        self.step_name = "enqueue";
        let count = self.rng.random_range(1..=4);
        let mut tasks = Vec::with_capacity(count);
        for _ in 0..count {
            let queue = self.rng.random_range(0..QUEUES.len());
            let key = self
                .rng
                .random_bool(0.3)
                .then(|| format!("key-{}", self.rng.random_range(0..4)));
            let max_attempts = self
                .rng
                .random_bool(0.5)
                .then(|| self.rng.random_range(1..=4));
            tasks.push((
                queue,
                NewTask {
                    queue: Self::queue_name(queue),
                    kind: "model".to_owned(),
                    payload: Bytes::from_static(b"payload"),
                    headers: HashMap::new(),
                    priority: self.rng.random_range(-1..=2),
                    max_attempts,
                    retry_policy: None,
                    idempotency_key: key,
                },
            ));
        }
        let batch: Vec<NewTask> = tasks.iter().map(|(_, task)| task.clone()).collect();
        let enqueued: Vec<Enqueued> = self
            .system()
            .request(|reply| WriteOp::Enqueue {
                tasks: batch,
                reply,
            })
            .await
            .unwrap_or_else(|err| panic!("{}: enqueue failed: {err}", self.context()));
        assert_eq!(enqueued.len(), tasks.len(), "{}", self.context());

        for ((queue, task), result) in tasks.into_iter().zip(enqueued) {
            let existing = task
                .idempotency_key
                .as_ref()
                .and_then(|key| self.keys.get(&(queue, key.clone())).copied());
            match existing {
                Some(first) => {
                    assert!(
                        result.duplicate && result.id == first,
                        "{}: key {:?} of queue {} should return task {first} as a duplicate, \
                         got {} (duplicate {})",
                        self.context(),
                        task.idempotency_key,
                        QUEUES[queue],
                        result.id,
                        result.duplicate
                    );
                }
                None => {
                    assert!(
                        !result.duplicate,
                        "{}: new task {} reported as a duplicate",
                        self.context(),
                        result.id
                    );
                    assert!(
                        !self.tasks.contains_key(&result.id),
                        "{}: enqueue returned the existing id {} for a new task",
                        self.context(),
                        result.id
                    );
                    if let Some(key) = &task.idempotency_key {
                        self.keys.insert((queue, key.clone()), result.id);
                    }
                    self.tasks.insert(
                        result.id,
                        ModelTask {
                            queue,
                            priority: task.priority,
                            sequence: self.next_sequence,
                            max_attempts: task.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS),
                            attempts: 0,
                            stored: TaskRecordState::Pending,
                            live: Live::Ready,
                            cancel_requested: false,
                            no_retry: false,
                            errors: Vec::new(),
                        },
                    );
                    self.next_sequence += 1;
                }
            }
        }
        self.take_deliveries();
    }

    fn subscribe(&mut self) {
        self.step_name = "subscribe";
        if self.subscribers.iter().filter(|s| !s.closed).count() >= MAX_SUBSCRIBERS {
            return;
        }
        let queues: Vec<usize> = match self.rng.random_range(0..3) {
            0 => vec![0],
            1 => vec![1],
            _ => vec![0, 1],
        };
        let max_in_flight = self.rng.random_range(1..=4);
        let subscription = Subscription {
            queues: queues
                .iter()
                .map(|&queue| (Self::queue_name(queue), self.rng.random_range(1..=3)))
                .collect(),
            max_in_flight,
            lease_duration: Some(LEASE),
        };
        let (id, receiver) = self.system().dispatcher.subscribe(subscription);
        self.subscribers.push(ModelSubscriber {
            id,
            receiver,
            queues,
            max_in_flight,
            expected_notices: Vec::new(),
            closed: false,
        });
        self.take_deliveries();
    }

    async fn ack(&mut self) {
        self.step_name = "ack";
        let Some(lease_id) = self.pick_lease() else {
            return;
        };
        let settled = self
            .system()
            .dispatcher
            .settle(&lease_id, Redeliver::Now)
            .unwrap_or_else(|err| {
                panic!("{}: settle of a live lease failed: {err}", self.context())
            });
        let lease = self.forget_lease(&lease_id);
        assert_eq!(settled.task.id, lease.task_id, "{}", self.context());

        let outcome = self
            .system()
            .request(|reply| WriteOp::Complete {
                settled,
                result: Bytes::from_static(b"done"),
                reply,
            })
            .await
            .unwrap_or_else(|err| panic!("{}: ack failed: {err}", self.context()));

        let task = self.tasks.get_mut(&lease.task_id).expect("leased task");
        task.attempts += 1;
        task.errors.push(String::new());
        task.stored = TaskRecordState::Succeeded;
        task.live = Live::Gone;
        let cancel_requested = task.cancel_requested;
        self.assert_outcome(
            lease.task_id,
            outcome,
            TaskRecordState::Succeeded,
            cancel_requested,
        );
        self.take_deliveries();
    }

    async fn nack(&mut self) {
        self.step_name = "nack";
        let Some(lease_id) = self.pick_lease() else {
            return;
        };
        let failure = if self.rng.random_bool(0.15) {
            // The worker never started the task and returns it.
            Failure {
                release: true,
                ..Failure::released("")
            }
        } else {
            Failure {
                error: self.new_error(),
                retry_delay: match self.rng.random_range(0..4) {
                    0 => Some(Duration::ZERO),
                    1 => Some(LONG_RETRY),
                    _ => None,
                },
                no_retry: self.rng.random_bool(0.15),
                release: false,
            }
        };
        let settled = self
            .system()
            .dispatcher
            .settle(&lease_id, Redeliver::AfterCommit)
            .unwrap_or_else(|err| {
                panic!("{}: settle of a live lease failed: {err}", self.context())
            });
        let lease = self.forget_lease(&lease_id);
        assert_eq!(settled.task.id, lease.task_id, "{}", self.context());
        // A refill that the writer applies before this failure may deliver tasks of lower
        // priority while the failed task is not ready yet.
        self.await_refills().await;
        let expected = self.fail_in_model(lease.task_id, &failure);
        let outcome = self
            .system()
            .request(|reply| WriteOp::Fail {
                settled,
                failure,
                reply: Some(reply),
            })
            .await
            .unwrap_or_else(|err| panic!("{}: nack failed: {err}", self.context()));
        let cancel_requested = self.tasks[&lease.task_id].cancel_requested;
        self.assert_outcome(lease.task_id, outcome, expected, cancel_requested);
        self.take_deliveries();
    }

    /// Records a failed attempt in the model and returns the task's new stored state.
    fn fail_in_model(&mut self, task_id: TaskId, failure: &Failure) -> TaskRecordState {
        let task = self.tasks.get_mut(&task_id).expect("leased task");
        if failure.release {
            // A released task keeps its attempt count and error history.
            let (stored, live) = if task.cancel_requested {
                (TaskRecordState::Cancelled, Live::Gone)
            } else {
                (TaskRecordState::Pending, Live::Ready)
            };
            task.stored = stored;
            task.live = live;
            return stored;
        }
        task.attempts += 1;
        task.errors.push(failure.error.clone());
        let (stored, live) = if task.cancel_requested {
            (TaskRecordState::Cancelled, Live::Gone)
        } else if failure.no_retry || task.attempts >= task.max_attempts {
            task.no_retry |= failure.no_retry && task.attempts < task.max_attempts;
            (TaskRecordState::Dead, Live::Gone)
        } else if failure.retry_delay.is_some_and(|delay| !delay.is_zero()) {
            (TaskRecordState::RetryWait, Live::Waiting)
        } else {
            (TaskRecordState::Pending, Live::Ready)
        };
        task.stored = stored;
        task.live = live;
        stored
    }

    fn assert_outcome(
        &self,
        task_id: TaskId,
        outcome: SettleOutcome,
        state: TaskRecordState,
        cancel_requested: bool,
    ) {
        assert_eq!(
            outcome.state,
            state,
            "{}: settle outcome of task {task_id}",
            self.context()
        );
        assert_eq!(
            outcome.cancel_requested,
            cancel_requested,
            "{}: cancel_requested in the settle outcome of task {task_id}",
            self.context()
        );
    }

    fn extend(&mut self) {
        self.step_name = "extend";
        let stale = self.rng.random_bool(0.2) && !self.stale_leases.is_empty();
        if stale {
            let index = self.rng.random_range(0..self.stale_leases.len());
            let lease_id = self.stale_leases[index].clone();
            let result = self.system().dispatcher.extend(&lease_id, EXTENSION);
            assert!(
                matches!(result, Err(BrokerError::LeaseNotLive(_))),
                "{}: extend of stale lease {lease_id} returned {result:?}",
                self.context()
            );
            return;
        }
        let Some(lease_id) = self.pick_lease() else {
            return;
        };
        let (_, cancel_requested) = self
            .system()
            .dispatcher
            .extend(&lease_id, EXTENSION)
            .unwrap_or_else(|err| {
                panic!("{}: extend of a live lease failed: {err}", self.context())
            });
        let lease = self.leases.get_mut(&lease_id).expect("live lease");
        lease.extended = true;
        let task_id = lease.task_id;
        assert_eq!(
            cancel_requested,
            self.tasks[&task_id].cancel_requested,
            "{}: cancel_requested from extend of task {task_id}",
            self.context()
        );
    }

    /// Expires leases as the broker's timer loop does: the dispatcher hands back the
    /// expired leases, and each is recorded as a failed attempt without a reply.
    async fn expire(&mut self) {
        self.step_name = "expire";
        let all = self.rng.random_bool(0.5);
        let horizon = if all { EXPIRE_ALL } else { EXPIRE_SOME };
        let settled = self
            .system()
            .dispatcher
            .expire_due(Instant::now() + horizon);

        let mut expected: Vec<LeaseId> = self
            .leases
            .iter()
            .filter(|(_, lease)| all || !lease.extended)
            .map(|(lease_id, _)| lease_id.clone())
            .collect();
        let mut expired: Vec<TaskId> = settled.iter().map(|settled| settled.task.id).collect();
        let mut expected_tasks: Vec<TaskId> = expected
            .iter()
            .map(|lease_id| self.leases[lease_id].task_id)
            .collect();
        expired.sort();
        expected_tasks.sort();
        assert_eq!(
            expired,
            expected_tasks,
            "{}: tasks whose leases expired (all leases: {all})",
            self.context()
        );

        expected.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        for lease_id in &expected {
            let lease = self.forget_lease(lease_id);
            self.tasks
                .get_mut(&lease.task_id)
                .expect("leased task")
                .live = Live::Settling;
        }
        // Expiry frees credit, which the dispatcher uses for ready tasks at once.
        self.take_deliveries();
        self.record_released(settled, LEASE_EXPIRED).await;
    }

    /// Sends the failure of each released lease without a reply, as the broker does for
    /// expired leases and closed streams, and checks the deliveries after each commit.
    async fn record_released(&mut self, settled: Vec<SettledLease>, error: &str) {
        for settled in settled {
            let task_id = settled.task.id;
            let failure = Failure::released(error);
            self.await_refills().await;
            self.fail_in_model(task_id, &failure);
            self.system()
                .send(WriteOp::Fail {
                    settled,
                    failure,
                    reply: None,
                })
                .await;
            self.system().barrier().await;
            self.take_deliveries();
        }
    }

    async fn close_stream(&mut self) {
        self.step_name = "close stream";
        let open: Vec<usize> = (0..self.subscribers.len())
            .filter(|&index| !self.subscribers[index].closed)
            .collect();
        if open.is_empty() {
            return;
        }
        let index = open[self.rng.random_range(0..open.len())];
        let released = self
            .system()
            .dispatcher
            .unsubscribe(self.subscribers[index].id);
        let subscriber = &mut self.subscribers[index];
        subscriber.closed = true;
        subscriber.receiver.close();

        let mut held: Vec<LeaseId> = self
            .leases
            .iter()
            .filter(|(_, lease)| lease.subscriber == index)
            .map(|(lease_id, _)| lease_id.clone())
            .collect();
        held.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        let mut released_tasks: Vec<TaskId> =
            released.iter().map(|settled| settled.task.id).collect();
        let mut held_tasks: Vec<TaskId> = held
            .iter()
            .map(|lease_id| self.leases[lease_id].task_id)
            .collect();
        released_tasks.sort();
        held_tasks.sort();

        assert_eq!(
            released_tasks,
            held_tasks,
            "{}: leases released by closing a stream",
            self.context()
        );
        for lease_id in &held {
            let lease = self.forget_lease(lease_id);
            self.tasks
                .get_mut(&lease.task_id)
                .expect("leased task")
                .live = Live::Settling;
        }
        self.take_deliveries();
        self.record_released(released, STREAM_CLOSED).await;
    }

    async fn cancel(&mut self) {
        self.step_name = "cancel";
        let task_id = if self.tasks.is_empty() || self.rng.random_bool(0.05) {
            TaskId::generate()
        } else {
            let index = self.rng.random_range(0..self.tasks.len());
            *self.tasks.keys().nth(index).expect("index in range")
        };
        let result = self
            .system()
            .request(|reply| WriteOp::Cancel { task_id, reply })
            .await;
        let context = self.context();
        let Some(task) = self.tasks.get_mut(&task_id) else {
            assert!(
                matches!(result, Err(BrokerError::TaskNotFound(id)) if id == task_id),
                "{}: cancel of unknown task {task_id} returned {result:?}",
                context
            );
            return;
        };
        match task.live {
            Live::Gone => {
                assert!(
                    matches!(result, Err(BrokerError::TaskFinal { .. })),
                    "{}: cancel of final task {task_id} returned {result:?}",
                    context
                );
            }
            Live::Leased => {
                assert!(
                    matches!(result, Ok(TaskState::Leased)),
                    "{}: cancel of leased task {task_id} returned {result:?}",
                    context
                );
                task.cancel_requested = true;
                let (lease_id, lease) = self
                    .leases
                    .iter()
                    .find(|(_, lease)| lease.task_id == task_id)
                    .expect("leased task has a lease");
                let notice = (task_id.to_string(), lease_id.as_str().to_owned());
                self.subscribers[lease.subscriber]
                    .expected_notices
                    .push(notice);
            }
            Live::Ready | Live::Waiting => {
                assert!(
                    matches!(result, Ok(TaskState::Cancelled)),
                    "{}: cancel of deliverable task {task_id} returned {result:?}",
                    context
                );
                task.stored = TaskRecordState::Cancelled;
                task.live = Live::Gone;
            }
            Live::Settling => unreachable!("no failure is pending between steps"),
        }
        self.take_deliveries();
    }

    /// Makes every retry-waiting task pending, as the timer loop does once their time
    /// came, by asking the writer to promote them as of a time after every retry.
    async fn promote(&mut self) {
        self.step_name = "promote";
        let later = now_micros() + 2 * LONG_RETRY.as_micros() as i64;
        self.system().send(WriteOp::Promote { now_us: later }).await;
        self.system().barrier().await;
        for task in self.tasks.values_mut() {
            if task.live == Live::Waiting {
                task.live = Live::Ready;
                task.stored = TaskRecordState::Pending;
            }
        }
        self.take_deliveries();
    }

    /// Settles several leases at once, so that the writer may commit them in one batch:
    /// acks and Nacks with `no_retry`, neither of which makes a task ready again.
    async fn settle_batch(&mut self) {
        self.step_name = "settle batch";
        let mut live: Vec<LeaseId> = self.leases.keys().cloned().collect();
        live.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        let count = live.len().min(self.rng.random_range(2..=4));
        let mut pending = Vec::new();
        for lease_id in live.into_iter().take(count) {
            let ack = self.rng.random_bool(0.5);
            let redeliver = if ack {
                Redeliver::Now
            } else {
                Redeliver::AfterCommit
            };
            let settled = self
                .system()
                .dispatcher
                .settle(&lease_id, redeliver)
                .unwrap_or_else(|err| {
                    panic!("{}: settle of a live lease failed: {err}", self.context())
                });
            let lease = self.forget_lease(&lease_id);
            let (reply, response) = oneshot::channel();
            let expected = if ack {
                let task = self.tasks.get_mut(&lease.task_id).expect("leased task");
                task.attempts += 1;
                task.errors.push(String::new());
                task.stored = TaskRecordState::Succeeded;
                task.live = Live::Gone;
                self.system()
                    .send(WriteOp::Complete {
                        settled,
                        result: Bytes::from_static(b"done"),
                        reply,
                    })
                    .await;
                TaskRecordState::Succeeded
            } else {
                let failure = Failure {
                    error: self.new_error(),
                    retry_delay: None,
                    no_retry: true,
                    release: false,
                };
                let expected = self.fail_in_model(lease.task_id, &failure);
                self.system()
                    .send(WriteOp::Fail {
                        settled,
                        failure,
                        reply: Some(reply),
                    })
                    .await;
                expected
            };
            pending.push((lease.task_id, expected, response));
        }
        for (task_id, expected, response) in pending {
            let outcome = response
                .await
                .expect("writer replies")
                .unwrap_or_else(|err| panic!("{}: settle failed: {err}", self.context()));
            let cancel_requested = self.tasks[&task_id].cancel_requested;
            self.assert_outcome(task_id, outcome, expected, cancel_requested);
        }
        self.take_deliveries();
    }

    /// Acks or nacks a lease that is no longer live, which must fail without a change.
    async fn settle_stale(&mut self) {
        self.step_name = "settle stale lease";
        if self.stale_leases.is_empty() {
            return;
        }
        let index = self.rng.random_range(0..self.stale_leases.len());
        let lease_id = self.stale_leases[index].clone();
        let redeliver = if self.rng.random_bool(0.5) {
            Redeliver::Now
        } else {
            Redeliver::AfterCommit
        };
        let result = self.system().dispatcher.settle(&lease_id, redeliver);
        assert!(
            matches!(result, Err(BrokerError::LeaseNotLive(_))),
            "{}: settle of stale lease {lease_id} returned {result:?}",
            self.context()
        );
        self.take_deliveries();
    }

    /// Stops everything and recovers from the store, as after a crash: leases are lost
    /// without a recorded attempt, and streams are gone.
    fn restart(&mut self) {
        self.step_name = "restart";
        self.system.take().expect("system is running").stop();
        self.subscribers.clear();
        let lost: Vec<LeaseId> = self.leases.keys().cloned().collect();
        for lease_id in &lost {
            self.forget_lease(lease_id);
        }

        for task in self.tasks.values_mut() {
            if task.live == Live::Gone {
                continue;
            }
            if task.cancel_requested {
                task.stored = TaskRecordState::Cancelled;
                task.live = Live::Gone;
                continue;
            }
            task.live = match task.stored {
                TaskRecordState::Pending => Live::Ready,
                TaskRecordState::RetryWait => Live::Waiting,
                other => panic!("restart: task with live state but stored {other:?}"),
            };
        }

        let (system, deliverable) = System::start(self.dir.path());
        self.system = Some(system);
        let expected = self
            .tasks
            .values()
            .filter(|task| matches!(task.live, Live::Ready | Live::Waiting))
            .count();
        assert_eq!(
            deliverable,
            expected,
            "{}: deliverable tasks found by recovery",
            self.context()
        );
    }

    /// Receives everything the streams were sent and checks each delivery against the
    /// model: only ready tasks, best first within a queue, within each stream's credit.
    fn take_deliveries(&mut self) {
        let context = self.context();
        // A refill that the writer applies while the streams are read delivers after the
        // reads, so free credit is only checked if no refill was outstanding before them.
        let refilled_during_reads = self.system().dispatcher.refills_outstanding();
        let mut delivered: Vec<(usize, TaskId)> = Vec::new();
        for (index, subscriber) in self.subscribers.iter_mut().enumerate() {
            if subscriber.closed {
                continue;
            }
            let mut notices = Vec::new();
            while let Ok(message) = subscriber.receiver.try_recv() {
                match message.event {
                    Some(Event::Delivery(delivery)) => {
                        let task = delivery.task.expect("delivery has a task");
                        let task_id = TaskId::parse("task_id", &task.id).expect("valid task id");
                        let lease_id =
                            LeaseId::parse("lease_id", &delivery.lease_id).expect("lease id");
                        let model = self.tasks.get_mut(&task_id).unwrap_or_else(|| {
                            panic!("{context}: delivery of unknown task {task_id}")
                        });
                        assert_eq!(
                            model.live,
                            Live::Ready,
                            "{context}: task {task_id} delivered while not ready"
                        );
                        assert_eq!(
                            delivery.attempt,
                            model.attempts + 1,
                            "{context}: attempt number of the delivery of task {task_id}"
                        );
                        assert!(
                            subscriber.queues.contains(&model.queue),
                            "{context}: task {task_id} of queue {} delivered to a stream of \
                             queues {:?}",
                            QUEUES[model.queue],
                            subscriber.queues
                        );
                        model.live = Live::Leased;
                        self.leases.insert(
                            lease_id,
                            ModelLease {
                                task_id,
                                subscriber: index,
                                extended: false,
                            },
                        );
                        delivered.push((index, task_id));
                    }
                    Some(Event::CancelNotice(notice)) => {
                        notices.push((notice.task_id, notice.lease_id));
                    }
                    Some(Event::Heartbeat(_)) | None => {}
                }
            }
            let mut expected = std::mem::take(&mut subscriber.expected_notices);
            expected.sort();
            notices.sort();
            assert_eq!(
                notices, expected,
                "{context}: cancel notices of stream {index}"
            );
        }

        for (queue, name) in QUEUES.iter().enumerate() {
            let worst_delivered = delivered
                .iter()
                .map(|(_, task_id)| &self.tasks[task_id])
                .filter(|task| task.queue == queue)
                .map(ModelTask::ready_key)
                .max();
            let best_remaining = self
                .tasks
                .values()
                .filter(|task| task.queue == queue && task.live == Live::Ready)
                .map(ModelTask::ready_key)
                .min();
            if let (Some(worst), Some(best)) = (worst_delivered, best_remaining) {
                assert!(
                    worst < best,
                    "{context}: queue {name} delivered (priority {}, sequence {}) while \
                     (priority {}, sequence {}) stayed ready; dispatcher: {}",
                    worst.0.0,
                    worst.1,
                    best.0.0,
                    best.1,
                    self.system()
                        .dispatcher
                        .describe_queue(&Self::queue_name(queue))
                );
            }
        }

        // While a window refill is outstanding, tasks beyond the window wait for it, so
        // free credit is only checked once the refills have arrived.
        let refilling = refilled_during_reads || self.system().dispatcher.refills_outstanding();
        for (index, subscriber) in self.subscribers.iter().enumerate() {
            if subscriber.closed || refilling {
                continue;
            }
            let held_leases = self
                .leases
                .values()
                .filter(|lease| lease.subscriber == index)
                .count() as u32;
            assert!(
                held_leases <= subscriber.max_in_flight,
                "{context}: stream {index} holds {held_leases} leases, over its max_in_flight {}",
                subscriber.max_in_flight
            );
            if held_leases == subscriber.max_in_flight {
                continue;
            }
            for &queue in &subscriber.queues {
                let ready = self
                    .tasks
                    .values()
                    .filter(|task| task.queue == queue && task.live == Live::Ready)
                    .count();
                assert_eq!(
                    ready,
                    0,
                    "{context}: stream {index} has credit for {} more, but {ready} tasks of \
                     queue {} stay ready: {}",
                    subscriber.max_in_flight - held_leases,
                    QUEUES[queue],
                    self.system()
                        .dispatcher
                        .describe_queue(&Self::queue_name(queue))
                );
            }
        }
    }

    /// Compares every task's stored record, live lease and the queues' counts with the
    /// model.
    fn check_all(&self) {
        let context = self.context();
        let system = self.system();
        for (&task_id, task) in &self.tasks {
            let record = system
                .store
                .read_task(task_id)
                .unwrap_or_else(|err| panic!("{context}: read of task {task_id} failed: {err}"))
                .unwrap_or_else(|| panic!("{context}: task {task_id} is missing from the store"));
            assert_eq!(
                record.state(),
                task.stored,
                "{context}: stored state of task {task_id} (live {:?}, attempts {})",
                task.live,
                task.attempts
            );
            assert_eq!(
                record.attempts, task.attempts,
                "{context}: stored attempts of task {task_id} ({:?})",
                task.stored
            );
            let errors: Vec<&str> = record
                .attempt_history
                .iter()
                .map(|attempt| attempt.error.as_str())
                .collect();
            assert_eq!(
                errors, task.errors,
                "{context}: attempt history of task {task_id}"
            );
            for (position, attempt) in record.attempt_history.iter().enumerate() {
                assert_eq!(
                    attempt.number as usize,
                    position + 1,
                    "{context}: attempt numbers of task {task_id}"
                );
            }
            assert_eq!(
                record.max_attempts, task.max_attempts,
                "{context}: max_attempts of task {task_id}"
            );
            assert_eq!(
                record.cancel_requested, task.cancel_requested,
                "{context}: cancel_requested of task {task_id}"
            );
            if record.state() == TaskRecordState::Dead && !task.no_retry {
                assert_eq!(
                    record.attempts, record.max_attempts,
                    "{context}: task {task_id} is DEAD before using its attempts"
                );
            }
            assert!(
                task.attempts <= task.max_attempts,
                "{context}: task {task_id} has {} attempts of {}",
                task.attempts,
                task.max_attempts
            );
            assert_eq!(
                system.dispatcher.lease_of(task_id).is_some(),
                task.live == Live::Leased,
                "{context}: live lease of task {task_id} (model {:?})",
                task.live
            );
        }

        for (queue, name) in QUEUES.iter().enumerate() {
            let counts = system.dispatcher.counts(&Self::queue_name(queue));
            let of_queue = || self.tasks.values().filter(move |task| task.queue == queue);
            let live = |state: Live| of_queue().filter(|task| task.live == state).count() as u64;
            let stored = |state: TaskRecordState| {
                of_queue().filter(|task| task.stored == state).count() as u64
            };
            assert_eq!(
                counts.pending,
                live(Live::Ready),
                "{context}: pending of {name}"
            );
            assert_eq!(
                counts.retry_wait,
                live(Live::Waiting),
                "{context}: retry_wait of {name}"
            );
            assert_eq!(
                counts.leased,
                live(Live::Leased),
                "{context}: leased of {name}"
            );
            assert_eq!(
                counts.succeeded,
                stored(TaskRecordState::Succeeded),
                "{context}: succeeded of {name}"
            );
            assert_eq!(
                counts.dead,
                stored(TaskRecordState::Dead),
                "{context}: dead of {name}"
            );
            assert_eq!(
                counts.cancelled,
                stored(TaskRecordState::Cancelled),
                "{context}: cancelled of {name}"
            );
        }
    }
}

/// Creates a temporary folder for one sequence's store, in RAM where the system has a
/// RAM-backed folder: the test checks the state machine, not durability, and each commit
/// syncs the file.
fn temp_dir() -> tempfile::TempDir {
    let mut builder = tempfile::Builder::new();
    builder.prefix("docket-model-");
    let shm = Path::new("/dev/shm");
    if shm.is_dir()
        && let Ok(dir) = builder.tempdir_in(shm)
    {
        return dir;
    }
    builder
        .tempdir()
        .expect("failed to create a temporary folder")
}

fn env_number(name: &str) -> Option<u64> {
    let text = std::env::var(name).ok()?;
    Some(
        text.parse()
            .unwrap_or_else(|_| panic!("{name}={text:?} is not an unsigned integer")),
    )
}

#[tokio::test]
async fn state_machine_matches_model() {
    let seed = env_number(SEED_VARIABLE).unwrap_or_else(rand::random);
    let sequences = env_number(SEQUENCES_VARIABLE).map_or(DEFAULT_SEQUENCES, |n| n as usize);
    println!("model seed {seed}; replay with {SEED_VARIABLE}={seed}");
    let mut seeds = StdRng::seed_from_u64(seed);
    for index in 0..sequences {
        let sequence_seed: u64 = seeds.random();
        let steps = seeds.random_range(50..=200);
        let run = tokio::spawn(async move {
            let mut sequence = Sequence::new(sequence_seed);
            sequence.run(steps).await;
        });
        if let Err(error) = run.await {
            eprintln!(
                "model test failed in sequence {index} of {sequences} ({steps} steps); \
                 replay with {SEED_VARIABLE}={seed}"
            );
            match error.try_into_panic() {
                Ok(panic) => std::panic::resume_unwind(panic),
                Err(error) => panic!("sequence {index} did not finish: {error}"),
            }
        }
    }
}

/// Enqueues one task into the first queue, opens a stream with credit 1 and returns the
/// task's id with the lease of its delivery. The stream's receiver is returned too, so
/// that the stream stays open.
async fn deliver_one_task(system: &System) -> (TaskId, LeaseId, mpsc::Receiver<SubscribeResponse>) {
    let task = NewTask {
        queue: Sequence::queue_name(0),
        kind: "model".to_owned(),
        payload: Bytes::from_static(b"payload"),
        headers: HashMap::new(),
        priority: 0,
        max_attempts: None,
        retry_policy: None,
        idempotency_key: None,
    };
    let enqueued = system
        .request(|reply| WriteOp::Enqueue {
            tasks: vec![task],
            reply,
        })
        .await
        .expect("enqueue succeeds");
    let task_id = enqueued[0].id;
    let (_, mut receiver) = system.dispatcher.subscribe(Subscription {
        queues: vec![(Sequence::queue_name(0), 1)],
        max_in_flight: 1,
        lease_duration: Some(LEASE),
    });
    let Ok(SubscribeResponse {
        event: Some(Event::Delivery(delivery)),
    }) = receiver.try_recv()
    else {
        panic!("the task was not delivered to the stream with free credit");
    };
    let lease_id = LeaseId::parse("lease_id", &delivery.lease_id).expect("lease id");
    (task_id, lease_id, receiver)
}

/// A CancelTask that the writer commits after an Ack took the lease from the dispatcher,
/// but before the Ack's own commit, as when both requests wait in the writer's queue.
/// The Ack returned OK, so the task must end SUCCEEDED with its result, as the contract
/// promises for a leased task whose worker acks it.
#[tokio::test]
async fn ack_racing_cancel_succeeds() {
    let dir = temp_dir();
    let (system, _) = System::start(dir.path());
    let (task_id, lease_id, _stream) = deliver_one_task(&system).await;

    let settled = system
        .dispatcher
        .settle(&lease_id, Redeliver::Now)
        .expect("the lease is live");
    let (cancel_reply, cancel_response) = oneshot::channel();
    system
        .send(WriteOp::Cancel {
            task_id,
            reply: cancel_reply,
        })
        .await;
    let (ack_reply, ack_response) = oneshot::channel();
    system
        .send(WriteOp::Complete {
            settled,
            result: Bytes::from_static(b"result"),
            reply: ack_reply,
        })
        .await;
    let cancelled = cancel_response.await.expect("writer replies");
    let acked = ack_response
        .await
        .expect("writer replies")
        .expect("the ack commits");

    let record = system
        .store
        .read_task(task_id)
        .expect("read succeeds")
        .expect("task exists");
    assert_eq!(
        acked.state,
        TaskRecordState::Succeeded,
        "the Ack returned OK with state {:?} (the CancelTask returned {cancelled:?})",
        acked.state
    );
    assert_eq!(record.state(), TaskRecordState::Succeeded, "stored state");
    assert_eq!(record.attempts, 1, "stored attempts");
    assert_eq!(record.result.as_ref(), b"result", "stored result");
    system.stop();
}

/// A CancelTask that the writer commits after a Nack took the lease from the dispatcher,
/// but before the Nack's own commit. The task ends CANCELLED either way, and the nacked
/// attempt is a finished attempt, so it must be counted and kept in the history.
#[tokio::test]
async fn nack_racing_cancel_keeps_attempt() {
    let dir = temp_dir();
    let (system, _) = System::start(dir.path());
    let (task_id, lease_id, _stream) = deliver_one_task(&system).await;

    let settled = system
        .dispatcher
        .settle(&lease_id, Redeliver::AfterCommit)
        .expect("the lease is live");
    let (cancel_reply, cancel_response) = oneshot::channel();
    system
        .send(WriteOp::Cancel {
            task_id,
            reply: cancel_reply,
        })
        .await;
    let (nack_reply, nack_response) = oneshot::channel();
    system
        .send(WriteOp::Fail {
            settled,
            failure: Failure {
                error: "handler failed".to_owned(),
                retry_delay: None,
                no_retry: false,
                release: false,
            },
            reply: Some(nack_reply),
        })
        .await;
    let cancelled = cancel_response.await.expect("writer replies");
    let nacked = nack_response
        .await
        .expect("writer replies")
        .expect("the nack commits");

    let record = system
        .store
        .read_task(task_id)
        .expect("read succeeds")
        .expect("task exists");
    assert_eq!(
        nacked.state,
        TaskRecordState::Cancelled,
        "state after the Nack (the CancelTask returned {cancelled:?})"
    );
    assert_eq!(record.state(), TaskRecordState::Cancelled, "stored state");
    assert_eq!(
        record.attempts, 1,
        "stored attempts: the nacked attempt was not counted"
    );
    let errors: Vec<&str> = record
        .attempt_history
        .iter()
        .map(|attempt| attempt.error.as_str())
        .collect();
    assert_eq!(errors, ["handler failed"], "attempt history");
    system.stop();
}
