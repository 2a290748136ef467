//! SIGKILL at random moments, again and again, while producers enqueue and workers ack,
//! nack and drop their streams. After the last restart the workers drain the queue, and
//! the test checks every outcome that a client saw as OK against the store:
//!
//! - every task whose Enqueue returned OK reaches SUCCEEDED or DEAD;
//! - a task whose Ack returned OK is SUCCEEDED with that Ack's result, and is never
//!   delivered again after the Ack's response;
//! - a Nack that returned OK stays recorded: its attempt keeps its error, and no later
//!   delivery repeats that attempt number;
//! - a DEAD task used all its attempts, unless a Nack with `no_retry` was sent for it;
//! - an idempotency key that an OK Enqueue stored always returns the same task.
//!
//! The run is random but seeded: the seed is printed, and `DOCKET_CRASH_SEED` replays
//! the same choices (the timing of the processes still differs between runs).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use docket_proto::v1::broker_client::BrokerClient;
use docket_proto::v1::subscribe_response::Event;
use docket_proto::v1::{
    AckRequest, Acknowledgement, EnqueueRequest, NackRequest, NegativeAcknowledgement,
    SubscribeRequest, TaskState,
};
use docket_tests::{
    BrokerProcess, get_task, new_task, proto_duration, queue_stats, temp_dir, within,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::watch;
use tokio::time::{Instant, sleep, timeout};
use tonic::transport::{Channel, Endpoint};

const QUEUE: &str = "crash-loop";
/// Environment variable that sets the seed of the random choices.
const SEED_VARIABLE: &str = "DOCKET_CRASH_SEED";
const KILLS: usize = 20;
const PRODUCERS: usize = 2;
const WORKERS: usize = 3;
/// Upper bound on the tasks that the producers send in total.
const MAX_TASKS: usize = 2500;
/// Idempotency keys per producer. Keys repeat, so some enqueues are duplicates.
const KEYS_PER_PRODUCER: usize = 20;
/// Lease length of every stream: long enough that no lease expires while a worker
/// handles a delivery.
const LEASE: Duration = Duration::from_secs(30);
/// Bound on one RPC; a call to a killed broker fails long before it.
const CALL_LIMIT: Duration = Duration::from_secs(5);
/// Bound on the wait for the queue to drain after the last restart.
const DRAIN_LIMIT: Duration = Duration::from_secs(40);
/// Bound on the whole test.
const TEST_LIMIT: Duration = Duration::from_secs(120);

/// The broker that clients should talk to: its incarnation (0 for the first start, one
/// more per restart) and its endpoint.
type Current = (u64, String);

/// A delivery as the worker received it.
#[derive(Debug, Clone)]
struct DeliveryRecord {
    task_id: String,
    attempt: u32,
    incarnation: u64,
    at: Instant,
}

/// An Ack whose item result was OK.
#[derive(Debug, Clone)]
struct AckRecord {
    attempt: u32,
    result: Vec<u8>,
    incarnation: u64,
    at: Instant,
}

/// A Nack whose item result was OK.
#[derive(Debug, Clone)]
struct NackRecord {
    task_id: String,
    attempt: u32,
    error: String,
    state: TaskState,
    incarnation: u64,
    at: Instant,
}

/// Everything the clients observed.
#[derive(Default)]
struct Log {
    /// Task ids that an OK Enqueue returned, with the max_attempts sent for new tasks
    /// (`None` for duplicates, whose original request may not have returned OK).
    committed: HashMap<String, Option<u32>>,
    /// Task id that the first OK Enqueue returned for each idempotency key.
    keys: HashMap<String, String>,
    deliveries: Vec<DeliveryRecord>,
    acks: HashMap<String, AckRecord>,
    nacks: Vec<NackRecord>,
    /// Tasks for which a Nack with `no_retry` was sent, whatever its outcome.
    no_retry: HashSet<String>,
    /// Outcomes that no crash explains, such as an unknown lease while no kill happened.
    unexpected: Vec<String>,
    /// Enqueue, Ack and Nack calls that failed because the broker was killed, whose
    /// outcome the client cannot know.
    interrupted_calls: usize,
}

/// State shared by the producers, the workers and the test.
struct Shared {
    log: Mutex<Log>,
    /// Incremented just before each kill, so a client can tell whether a kill happened
    /// during its call.
    kills: AtomicU64,
    /// Tasks sent so far by all producers, OK or not.
    sent: AtomicUsize,
    /// Set after the last restart: producers stop.
    stop_producing: AtomicBool,
    /// Set after the final checks' drain: workers stop.
    stop_working: AtomicBool,
}

impl Shared {
    fn unexpected(&self, message: String) {
        self.log.lock().unwrap().unexpected.push(message);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_loop_keeps_settled_outcomes() -> Result<()> {
    let seed = match std::env::var(SEED_VARIABLE) {
        Ok(text) => text
            .parse()
            .with_context(|| format!("{SEED_VARIABLE}={text:?} is not an unsigned integer"))?,
        Err(_) => rand::random::<u64>(),
    };
    println!("crash loop seed {seed}; replay with {SEED_VARIABLE}={seed}");
    let result = timeout(TEST_LIMIT, run(seed)).await;
    match result {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => Err(error.context(format!("crash loop failed with seed {seed}"))),
        Err(_) => bail!("crash loop with seed {seed} did not finish within {TEST_LIMIT:?}"),
    }
}

async fn run(seed: u64) -> Result<()> {
    let data_dir = temp_dir();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut broker = BrokerProcess::start(data_dir.path(), &[]).await?;
    let (current_sender, current) = watch::channel::<Current>((0, broker.endpoint()));
    let shared = Arc::new(Shared {
        log: Mutex::new(Log::default()),
        kills: AtomicU64::new(0),
        sent: AtomicUsize::new(0),
        stop_producing: AtomicBool::new(false),
        stop_working: AtomicBool::new(false),
    });

    let mut producers = Vec::new();
    for index in 0..PRODUCERS {
        let rng = StdRng::seed_from_u64(rng.random());
        producers.push(tokio::spawn(produce(
            index,
            rng,
            Arc::clone(&shared),
            current.clone(),
        )));
    }
    let mut workers = Vec::new();
    for index in 0..WORKERS {
        let rng = StdRng::seed_from_u64(rng.random());
        workers.push(tokio::spawn(work(
            index,
            rng,
            Arc::clone(&shared),
            current.clone(),
        )));
    }

    for incarnation in 1..=KILLS as u64 {
        sleep(Duration::from_millis(rng.random_range(50..=400))).await;
        shared.kills.fetch_add(1, Ordering::SeqCst);
        broker.kill9()?;
        broker = BrokerProcess::start(data_dir.path(), &[])
            .await
            .with_context(|| format!("restart {incarnation} after SIGKILL"))?;
        current_sender.send_replace((incarnation, broker.endpoint()));
    }
    shared.stop_producing.store(true, Ordering::SeqCst);
    for producer in producers {
        within(Duration::from_secs(30), "a producer to stop", async {
            Ok(producer.await?)
        })
        .await?;
    }

    // The workers keep running on the last broker until every task is final.
    let mut client = connect(&broker.endpoint()).await?;
    // A Nack's task is briefly in no count, between the settle of its lease and the
    // commit that makes it pending again, so the counts must be empty twice in a row.
    let drained = within(
        DRAIN_LIMIT,
        "the queue to drain after the last restart",
        async {
            let mut empty_polls = 0;
            loop {
                let stats = queue_stats(&mut client, QUEUE).await?;
                if stats.pending == 0 && stats.retry_wait == 0 && stats.leased == 0 {
                    empty_polls += 1;
                    if empty_polls == 2 {
                        return Ok(stats);
                    }
                } else {
                    empty_polls = 0;
                }
                sleep(Duration::from_millis(250)).await;
            }
        },
    )
    .await?;
    shared.stop_working.store(true, Ordering::SeqCst);
    for worker in workers {
        within(Duration::from_secs(30), "a worker to stop", async {
            Ok(worker.await?)
        })
        .await?;
    }

    let log = std::mem::take(&mut *shared.log.lock().unwrap());
    println!(
        "{KILLS} kills; {} tasks sent, {} committed, {} deliveries, {} acks and {} nacks OK, \
         {} calls interrupted by a kill; final counts: {} succeeded, {} dead",
        shared.sent.load(Ordering::SeqCst),
        log.committed.len(),
        log.deliveries.len(),
        log.acks.len(),
        log.nacks.len(),
        log.interrupted_calls,
        drained.succeeded,
        drained.dead,
    );
    check(&mut client, &log).await?;
    broker.stop().await?;
    Ok(())
}

/// Connects a client to `endpoint`, failing fast if nothing listens there.
async fn connect(endpoint: &str) -> Result<BrokerClient<Channel>> {
    let channel = Endpoint::from_shared(endpoint.to_string())?
        .connect_timeout(Duration::from_secs(2))
        .timeout(CALL_LIMIT)
        .connect()
        .await
        .with_context(|| format!("failed to connect to {endpoint}"))?;
    Ok(BrokerClient::new(channel))
}

/// Waits until the broker incarnation differs from `seen`, or up to `limit`.
async fn wait_for_restart(current: &mut watch::Receiver<Current>, seen: u64, limit: Duration) {
    let _ = timeout(
        limit,
        current.wait_for(|(incarnation, _)| *incarnation != seen),
    )
    .await;
}

/// Enqueues random batches until the test stops producing or `MAX_TASKS` were sent.
async fn produce(
    index: usize,
    mut rng: StdRng,
    shared: Arc<Shared>,
    mut current: watch::Receiver<Current>,
) {
    let mut call = 0;
    while !shared.stop_producing.load(Ordering::SeqCst) {
        let (incarnation, endpoint) = current.borrow_and_update().clone();
        let Ok(mut client) = connect(&endpoint).await else {
            wait_for_restart(&mut current, incarnation, Duration::from_secs(1)).await;
            continue;
        };
        while !shared.stop_producing.load(Ordering::SeqCst) {
            let size = rng.random_range(1..=50);
            if shared.sent.fetch_add(size, Ordering::SeqCst) + size > MAX_TASKS {
                return;
            }
            let mut tasks = Vec::with_capacity(size);
            for position in 0..size {
                let payload = format!("producer-{index}-call-{call}-task-{position}");
                let mut task = new_task(QUEUE, "crash-loop", payload);
                task.max_attempts = [0, 1, 2, 3, 5][rng.random_range(0..5)];
                if rng.random_bool(0.08) {
                    let key = rng.random_range(0..KEYS_PER_PRODUCER);
                    task.idempotency_key = format!("producer-{index}-key-{key}");
                }
                tasks.push(task);
            }
            call += 1;

            let request = EnqueueRequest {
                tasks: tasks.clone(),
            };
            match client.enqueue(request).await {
                Ok(response) => record_enqueue(&shared, &tasks, response.into_inner()),
                Err(status) if status.code() == tonic::Code::InvalidArgument => {
                    shared.unexpected(format!("Enqueue rejected a valid batch: {status}"));
                }
                // The broker was killed, so the batch may or may not be committed.
                Err(_) => {
                    shared.log.lock().unwrap().interrupted_calls += 1;
                    break;
                }
            }
            sleep(Duration::from_millis(rng.random_range(20..=150))).await;
        }
        wait_for_restart(&mut current, incarnation, Duration::from_secs(1)).await;
    }
}

fn record_enqueue(
    shared: &Shared,
    tasks: &[docket_proto::v1::NewTask],
    response: docket_proto::v1::EnqueueResponse,
) {
    let mut log = shared.log.lock().unwrap();
    if response.task_ids.len() != tasks.len() || response.duplicates.len() != tasks.len() {
        log.unexpected.push(format!(
            "Enqueue of {} tasks returned {} ids and {} duplicate flags",
            tasks.len(),
            response.task_ids.len(),
            response.duplicates.len()
        ));
        return;
    }
    for ((task, id), duplicate) in tasks.iter().zip(response.task_ids).zip(response.duplicates) {
        if duplicate {
            log.committed.entry(id.clone()).or_insert(None);
        } else {
            log.committed.insert(id.clone(), Some(task.max_attempts));
        }
        if task.idempotency_key.is_empty() {
            continue;
        }
        let first = log
            .keys
            .entry(task.idempotency_key.clone())
            .or_insert_with(|| id.clone())
            .clone();
        if first != id {
            log.unexpected.push(format!(
                "idempotency key {:?} returned task {id} (duplicate {duplicate}), but an \
                 earlier OK Enqueue returned task {first}",
                task.idempotency_key
            ));
        }
    }
}

/// What a worker does with one delivery.
enum Action {
    Ack,
    Nack {
        no_retry: bool,
        retry_delay: Option<Duration>,
    },
    DropStream,
}

fn choose_action(rng: &mut StdRng) -> Action {
    let roll = rng.random_range(0..100);
    match roll {
        0..80 => Action::Ack,
        80..95 => Action::Nack {
            no_retry: rng.random_bool(0.15),
            retry_delay: rng.random_bool(0.3).then_some(Duration::ZERO),
        },
        _ => Action::DropStream,
    }
}

/// Subscribes and handles deliveries until the test stops the workers, reconnecting
/// after each kill and after each stream it drops on purpose.
async fn work(
    index: usize,
    mut rng: StdRng,
    shared: Arc<Shared>,
    mut current: watch::Receiver<Current>,
) {
    while !shared.stop_working.load(Ordering::SeqCst) {
        let (incarnation, endpoint) = current.borrow_and_update().clone();
        let Ok(mut client) = connect(&endpoint).await else {
            wait_for_restart(&mut current, incarnation, Duration::from_secs(1)).await;
            continue;
        };
        let request = SubscribeRequest {
            queues: vec![QUEUE.to_string()],
            max_in_flight: rng.random_range(1..=20),
            lease_duration: Some(proto_duration(LEASE)),
            weights: HashMap::new(),
        };
        let mut stream = match client.subscribe(request).await {
            Ok(response) => response.into_inner(),
            Err(_) => {
                wait_for_restart(&mut current, incarnation, Duration::from_secs(1)).await;
                continue;
            }
        };

        let stream_broken = loop {
            if shared.stop_working.load(Ordering::SeqCst) {
                return;
            }
            let message = match timeout(Duration::from_millis(200), stream.message()).await {
                Err(_) => continue,
                Ok(Ok(Some(message))) => message,
                Ok(Ok(None) | Err(_)) => break true,
            };
            let Some(Event::Delivery(delivery)) = message.event else {
                continue;
            };
            let Some(task) = delivery.task.clone() else {
                shared.unexpected(format!(
                    "worker {index}: delivery with lease {} has no task",
                    delivery.lease_id
                ));
                continue;
            };
            shared.log.lock().unwrap().deliveries.push(DeliveryRecord {
                task_id: task.id.clone(),
                attempt: delivery.attempt,
                incarnation,
                at: Instant::now(),
            });

            let settled = match choose_action(&mut rng) {
                Action::Ack => ack(&shared, &mut client, incarnation, &task.id, &delivery).await,
                Action::Nack {
                    no_retry,
                    retry_delay,
                } => {
                    nack(
                        &shared,
                        &mut client,
                        incarnation,
                        &task.id,
                        &delivery,
                        no_retry,
                        retry_delay,
                    )
                    .await
                }
                Action::DropStream => break false,
            };
            if !settled {
                break true;
            }
        };
        drop(stream);
        if stream_broken {
            wait_for_restart(&mut current, incarnation, Duration::from_millis(500)).await;
        }
    }
}

/// Acks one delivery and records an OK outcome. Returns false if the call failed, which
/// means the broker is gone.
async fn ack(
    shared: &Shared,
    client: &mut BrokerClient<Channel>,
    incarnation: u64,
    task_id: &str,
    delivery: &docket_proto::v1::Delivery,
) -> bool {
    let kills_before = shared.kills.load(Ordering::SeqCst);
    let result = format!("result of lease {}", delivery.lease_id).into_bytes();
    let request = AckRequest {
        acks: vec![Acknowledgement {
            lease_id: delivery.lease_id.clone(),
            result: result.clone().into(),
        }],
    };
    let Ok(response) = client.ack(request).await else {
        shared.log.lock().unwrap().interrupted_calls += 1;
        return false;
    };
    let at = Instant::now();
    let results = response.into_inner().results;
    let Some(item) = results.first() else {
        shared.unexpected(format!("Ack of task {task_id} returned no result"));
        return true;
    };
    if item.code == tonic::Code::Ok as i32 {
        shared.log.lock().unwrap().acks.insert(
            task_id.to_string(),
            AckRecord {
                attempt: delivery.attempt,
                result,
                incarnation,
                at,
            },
        );
    } else if shared.kills.load(Ordering::SeqCst) == kills_before {
        shared.unexpected(format!(
            "Ack of task {task_id} attempt {} failed with code {} ({}) while no kill happened",
            delivery.attempt, item.code, item.message
        ));
    }
    true
}

/// Nacks one delivery and records an OK outcome. Returns false if the call failed, which
/// means the broker is gone.
async fn nack(
    shared: &Shared,
    client: &mut BrokerClient<Channel>,
    incarnation: u64,
    task_id: &str,
    delivery: &docket_proto::v1::Delivery,
    no_retry: bool,
    retry_delay: Option<Duration>,
) -> bool {
    let kills_before = shared.kills.load(Ordering::SeqCst);
    let error = format!("failure under lease {}", delivery.lease_id);
    if no_retry {
        shared
            .log
            .lock()
            .unwrap()
            .no_retry
            .insert(task_id.to_string());
    }
    let request = NackRequest {
        nacks: vec![NegativeAcknowledgement {
            lease_id: delivery.lease_id.clone(),
            error: error.clone(),
            retry_delay: retry_delay.map(proto_duration),
            no_retry,
            release: false,
        }],
    };
    let Ok(response) = client.nack(request).await else {
        shared.log.lock().unwrap().interrupted_calls += 1;
        return false;
    };
    let at = Instant::now();
    let results = response.into_inner().results;
    let Some(item) = results.first() else {
        shared.unexpected(format!("Nack of task {task_id} returned no result"));
        return true;
    };
    if item.code == tonic::Code::Ok as i32 {
        shared.log.lock().unwrap().nacks.push(NackRecord {
            task_id: task_id.to_string(),
            attempt: delivery.attempt,
            error,
            state: item.state(),
            incarnation,
            at,
        });
    } else if shared.kills.load(Ordering::SeqCst) == kills_before {
        shared.unexpected(format!(
            "Nack of task {task_id} attempt {} failed with code {} ({}) while no kill happened",
            delivery.attempt, item.code, item.message
        ));
    }
    true
}

/// Returns whether a delivery came after an event that a client saw at `at` from broker
/// incarnation `incarnation`. A delivery from an earlier incarnation was sent before
/// that broker was killed, so it came before.
fn delivered_after(delivery: &DeliveryRecord, incarnation: u64, at: Instant) -> bool {
    delivery.incarnation > incarnation || (delivery.incarnation == incarnation && delivery.at > at)
}

async fn check(client: &mut BrokerClient<Channel>, log: &Log) -> Result<()> {
    assert!(
        log.unexpected.is_empty(),
        "{} outcomes that no kill explains, first ones: {:#?}",
        log.unexpected.len(),
        &log.unexpected[..log.unexpected.len().min(10)]
    );
    assert!(!log.acks.is_empty(), "no Ack returned OK during the run");

    let mut deliveries_by_task: HashMap<&str, Vec<&DeliveryRecord>> = HashMap::new();
    for delivery in &log.deliveries {
        deliveries_by_task
            .entry(delivery.task_id.as_str())
            .or_default()
            .push(delivery);
    }

    let mut ids: Vec<&String> = log.committed.keys().collect();
    ids.sort();
    let mut statuses = HashMap::new();
    for id in ids {
        let status = get_task(client, id)
            .await
            .with_context(|| format!("GetTask of committed task {id}"))?;
        let state = status.state();
        assert!(
            matches!(state, TaskState::Succeeded | TaskState::Dead),
            "committed task {id} ended {state:?} with {} attempts, not SUCCEEDED or DEAD",
            status.attempts
        );
        let max_attempts = status.task.as_ref().map_or(0, |task| task.max_attempts);
        if let Some(Some(sent)) = log.committed.get(id)
            && *sent != 0
        {
            assert_eq!(
                max_attempts, *sent,
                "task {id} stores max_attempts {max_attempts}, but Enqueue sent {sent}"
            );
        }
        let beyond_limit: Vec<u32> = deliveries_by_task
            .get(id.as_str())
            .into_iter()
            .flatten()
            .map(|delivery| delivery.attempt)
            .filter(|&attempt| attempt == 0 || attempt > max_attempts)
            .collect();
        assert!(
            beyond_limit.is_empty(),
            "task {id} with max_attempts {max_attempts} was delivered with attempt numbers \
             {beyond_limit:?}"
        );
        if state == TaskState::Dead && !log.no_retry.contains(id) {
            assert_eq!(
                status.attempts, max_attempts,
                "task {id} is DEAD after {} of {max_attempts} attempts without a no_retry Nack",
                status.attempts
            );
            assert_eq!(
                status.attempt_history.len(),
                max_attempts as usize,
                "DEAD task {id} has {} attempts in its history, expected {max_attempts}",
                status.attempt_history.len()
            );
        }
        statuses.insert(id.clone(), status);
    }

    for (task_id, acked) in &log.acks {
        let status = match statuses.get(task_id) {
            Some(status) => status.clone(),
            None => get_task(client, task_id).await?,
        };
        assert_eq!(
            status.state(),
            TaskState::Succeeded,
            "task {task_id} was acked OK at attempt {}, but ended {:?}",
            acked.attempt,
            status.state()
        );
        assert_eq!(
            status.result, acked.result,
            "task {task_id} stores another result than its OK Ack sent"
        );
        assert_eq!(
            status.attempts, acked.attempt,
            "task {task_id} was acked OK at attempt {}, but stores {} attempts",
            acked.attempt, status.attempts
        );
        let later: Vec<String> = deliveries_by_task
            .get(task_id.as_str())
            .into_iter()
            .flatten()
            .filter(|delivery| delivered_after(delivery, acked.incarnation, acked.at))
            .map(|delivery| {
                format!(
                    "attempt {} from broker incarnation {}",
                    delivery.attempt, delivery.incarnation
                )
            })
            .collect();
        assert!(
            later.is_empty(),
            "task {task_id} was acked OK at attempt {} (broker incarnation {}) and \
             delivered again afterwards: {later:?}",
            acked.attempt,
            acked.incarnation
        );
    }

    for nacked in &log.nacks {
        let task_id = &nacked.task_id;
        let status = match statuses.get(task_id) {
            Some(status) => status.clone(),
            None => get_task(client, task_id).await?,
        };
        let recorded = status
            .attempt_history
            .get(nacked.attempt as usize - 1)
            .map(|attempt| attempt.error.as_str());
        assert_eq!(
            recorded,
            Some(nacked.error.as_str()),
            "task {task_id}: attempt {} was nacked OK, but its history entry differs \
             ({} attempts stored)",
            nacked.attempt,
            status.attempt_history.len()
        );
        if nacked.state == TaskState::Dead {
            assert_eq!(
                status.state(),
                TaskState::Dead,
                "task {task_id} was nacked OK into DEAD, but ended {:?}",
                status.state()
            );
        }
        let repeated: Vec<String> = deliveries_by_task
            .get(task_id.as_str())
            .into_iter()
            .flatten()
            .filter(|delivery| delivered_after(delivery, nacked.incarnation, nacked.at))
            .filter(|delivery| delivery.attempt <= nacked.attempt)
            .map(|delivery| {
                format!(
                    "attempt {} from broker incarnation {}",
                    delivery.attempt, delivery.incarnation
                )
            })
            .collect();
        assert!(
            repeated.is_empty(),
            "task {task_id}: attempt {} was nacked OK (broker incarnation {}), but later \
             deliveries repeat its number: {repeated:?}",
            nacked.attempt,
            nacked.incarnation
        );
    }
    Ok(())
}
