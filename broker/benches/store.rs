//! Benchmarks of the store's hot operations through the storage writer, as the broker
//! runs them: committing an enqueue batch, committing one Ack, and recovering the
//! dispatcher's state from a data file with a backlog.
//!
//! The data files live in RAM where the system has a RAM-backed folder, so that the
//! figures show the broker's own work rather than the disk's fsync latency. CI runs this
//! with `-- --quick` so that it keeps compiling and running.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use docket_broker::dispatch::{Dispatcher, Redeliver, Subscription};
use docket_broker::retry::RetryPolicy;
use docket_broker::settings::{Defaults, SettingsCache};
use docket_broker::store::Store;
use docket_broker::store::writer::{self, WriteOp, WriterHandle};
use docket_broker::task::{LeaseId, NewTask, QueueName};
use docket_proto::v1::subscribe_response::Event;
use prost::bytes::Bytes;
use tokio::runtime::Runtime;
use tokio::sync::{mpsc, oneshot};

// The allocator of the broker binary, so that the figures match it.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Page cache of the benchmark's stores, as small as the broker's default.
const CACHE_BYTES: usize = 128 << 20;

fn defaults() -> Defaults {
    Defaults {
        max_attempts: 5,
        retry_policy: RetryPolicy {
            initial_backoff: Duration::from_secs(1),
            multiplier: 2.0,
            max_backoff: Duration::from_secs(600),
            jitter: 0.2,
        },
        lease_duration: Duration::from_secs(300),
        retention: Duration::from_secs(7 * 24 * 60 * 60),
        dead_retention: Duration::from_secs(30 * 24 * 60 * 60),
        idempotency_window: Duration::from_secs(24 * 60 * 60),
    }
}

fn scratch_dir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        tempfile::tempdir_in(shm).expect("temporary folder in /dev/shm")
    } else {
        tempfile::tempdir().expect("temporary folder")
    }
}

fn task(queue: &QueueName) -> NewTask {
    NewTask {
        queue: queue.clone(),
        kind: "send_email".to_owned(),
        payload: Bytes::from(vec![7u8; 256]),
        headers: HashMap::new(),
        priority: 0,
        max_attempts: None,
        retry_policy: None,
        idempotency_key: None,
    }
}

/// A store with its writer and dispatcher, started as `serve` starts them.
struct System {
    dispatcher: Arc<Dispatcher>,
    writer: WriterHandle,
    thread: JoinHandle<()>,
}

impl System {
    fn start(dir: &Path) -> System {
        let path: PathBuf = dir.join("broker.redb");
        let store = Store::open(dir, &path, CACHE_BYTES).expect("store opens");
        let recovered = store.recover(&defaults(), 1024).expect("store recovers");
        let settings = SettingsCache::new(defaults(), recovered.settings);
        let dispatcher = Arc::new(Dispatcher::new(1024, |_| Duration::from_secs(300)));
        dispatcher.apply(recovered.effects);
        let (writer, thread) = writer::spawn(
            Arc::new(store),
            Arc::clone(&dispatcher),
            settings,
            recovered.next_sequence,
            4096,
            1024,
        )
        .expect("writer starts");
        dispatcher.connect_writer(&writer);
        System {
            dispatcher,
            writer,
            thread,
        }
    }

    async fn enqueue(&self, tasks: Vec<NewTask>) {
        let (reply, response) = oneshot::channel();
        self.writer
            .send(WriteOp::Enqueue { tasks, reply })
            .await
            .expect("writer runs");
        response
            .await
            .expect("writer replies")
            .expect("enqueue commits");
    }

    fn stop(self) {
        drop(self.writer);
        self.thread.join().expect("writer ends");
    }
}

fn enqueue_batch(c: &mut Criterion) {
    let runtime = Runtime::new().expect("runtime");
    let dir = scratch_dir();
    let system = System::start(dir.path());
    let queue = QueueName::parse("queue", "bench").expect("valid queue");

    let mut group = c.benchmark_group("enqueue");
    for size in [1usize, 100, 1000] {
        group.throughput(Throughput::Elements(size as u64));
        group.bench_function(format!("batch_{size}"), |b| {
            b.iter_batched(
                || (0..size).map(|_| task(&queue)).collect::<Vec<_>>(),
                |tasks| runtime.block_on(system.enqueue(tasks)),
                BatchSize::SmallInput,
            );
        });
    }
    group.finish();
    system.stop();
}

fn ack_one(c: &mut Criterion) {
    let runtime = Runtime::new().expect("runtime");
    let dir = scratch_dir();
    let system = System::start(dir.path());
    let queue = QueueName::parse("queue", "bench").expect("valid queue");
    let (_, mut deliveries) = system.dispatcher.subscribe(Subscription {
        queues: vec![(queue.clone(), 1)],
        max_in_flight: 10_000,
        lease_duration: Some(Duration::from_secs(3600)),
    });

    c.bench_function("ack_one", |b| {
        b.iter_batched(
            || {
                // Keep a stock of leases: enqueue and take deliveries when it runs out.
                next_lease(&runtime, &system, &queue, &mut deliveries)
            },
            |lease_id| {
                runtime.block_on(async {
                    let settled = system
                        .dispatcher
                        .settle(&lease_id, Redeliver::Now)
                        .expect("lease is live");
                    let (reply, response) = oneshot::channel();
                    system
                        .writer
                        .send(WriteOp::Complete {
                            settled,
                            result: Bytes::new(),
                            reply,
                        })
                        .await
                        .expect("writer runs");
                    response
                        .await
                        .expect("writer replies")
                        .expect("ack commits");
                })
            },
            BatchSize::SmallInput,
        );
    });
    system.stop();
}

fn next_lease(
    runtime: &Runtime,
    system: &System,
    queue: &QueueName,
    deliveries: &mut mpsc::Receiver<docket_proto::v1::SubscribeResponse>,
) -> LeaseId {
    loop {
        if let Ok(message) = deliveries.try_recv() {
            if let Some(Event::Delivery(delivery)) = message.event {
                return LeaseId::parse("lease_id", &delivery.lease_id).expect("lease id");
            }
            continue;
        }
        runtime.block_on(system.enqueue((0..1000).map(|_| task(queue)).collect()));
    }
}

fn recover_backlog(c: &mut Criterion) {
    let runtime = Runtime::new().expect("runtime");
    let dir = scratch_dir();
    let system = System::start(dir.path());
    let queue = QueueName::parse("queue", "bench").expect("valid queue");
    for _ in 0..100 {
        runtime.block_on(system.enqueue((0..1000).map(|_| task(&queue)).collect()));
    }
    system.stop();

    let path = dir.path().join("broker.redb");
    c.bench_function("recover_100k_backlog", |b| {
        b.iter(|| {
            let store = Store::open(dir.path(), &path, CACHE_BYTES).expect("store opens");
            store.recover(&defaults(), 1024).expect("store recovers")
        });
    });
}

criterion_group! {
    name = store;
    config = Criterion::default().sample_size(20);
    targets = enqueue_batch, ack_one, recover_backlog
}
criterion_main!(store);
