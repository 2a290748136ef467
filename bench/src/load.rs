//! Producers and workers that drive the broker through the generated gRPC client.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::{Bytes, BytesMut};
use docket_proto::v1::broker_client::BrokerClient;
use docket_proto::v1::subscribe_response::Event;
use docket_proto::v1::{AckRequest, Acknowledgement, EnqueueRequest, NewTask, SubscribeRequest};
use hdrhistogram::Histogram;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

use crate::stats::{new_histogram, record};

/// Task kind of every benchmark task.
const TASK_KIND: &str = "bench";

/// Seed of the payload bytes, fixed so that every run sends the same payload.
const PAYLOAD_SEED: u64 = 0x5eed_0000_d0c6_e7b1;

/// Size of the send-time stamp at the start of a stamped payload.
pub const STAMP_BYTES: usize = 8;

/// Opens a new HTTP/2 connection to `url`.
pub async fn connect(url: &str) -> Result<Channel> {
    Endpoint::from_shared(url.to_string())
        .with_context(|| format!("invalid broker URL {url:?}"))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("cannot connect to the broker at {url}"))
}

/// Returns nanoseconds since a base instant shared by every task of this process.
pub fn now_nanos() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    let base = *BASE.get_or_init(Instant::now);
    u64::try_from(base.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// The fixed payload of every task, generated from a seed.
#[derive(Clone)]
pub struct Payload {
    template: Bytes,
}

impl Payload {
    /// Creates a payload of `size` bytes from [`PAYLOAD_SEED`] with xorshift64.
    pub fn new(size: usize) -> Self {
        let mut state = PAYLOAD_SEED;
        let bytes = (0..size)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect::<Vec<_>>();
        Payload {
            template: Bytes::from(bytes),
        }
    }

    /// Size of the payload in bytes.
    pub fn len(&self) -> usize {
        self.template.len()
    }

    /// Returns the payload with its first [`STAMP_BYTES`] bytes replaced by the current
    /// [`now_nanos`], little-endian, or the plain payload when `stamp` is false.
    pub fn build(&self, stamp: bool) -> Bytes {
        if !stamp {
            return self.template.clone();
        }
        let mut bytes = BytesMut::from(&self.template[..]);
        bytes[..STAMP_BYTES].copy_from_slice(&now_nanos().to_le_bytes());
        bytes.freeze()
    }
}

/// Reads the send time that [`Payload::build`] stamped into `payload`.
pub fn read_stamp(payload: &[u8]) -> Option<u64> {
    let stamp = payload.get(..STAMP_BYTES)?;
    Some(u64::from_le_bytes(stamp.try_into().ok()?))
}

fn new_tasks(queue: &str, payload: &Payload, count: usize, stamp: bool) -> EnqueueRequest {
    let tasks = (0..count)
        .map(|_| NewTask {
            queue: queue.to_string(),
            kind: TASK_KIND.to_string(),
            payload: payload.build(stamp),
            ..NewTask::default()
        })
        .collect();
    EnqueueRequest { tasks }
}

/// A run of producers that enqueue a fixed number of tasks as fast as the broker takes them.
pub struct ProduceSpec {
    pub queue: String,
    /// Tasks to enqueue in all.
    pub total: u64,
    /// Stop producing at this time, even if fewer than `total` tasks were enqueued.
    pub until: Option<Instant>,
    pub producers: usize,
    /// Enqueue calls that each producer keeps outstanding.
    pub inflight: usize,
    /// Tasks per Enqueue call.
    pub batch: usize,
    /// One connection per producer, instead of one shared by all producers.
    pub connection_per_producer: bool,
    /// Stamp the send time into each payload.
    pub stamp: bool,
}

/// Counts and call latency of a run of producers.
pub struct ProduceResult {
    pub tasks: u64,
    pub calls: u64,
    pub elapsed: Duration,
    /// Latency of each Enqueue call.
    pub call_latency: Histogram<u64>,
}

/// Enqueues `spec.total` tasks with `spec.producers × spec.inflight` concurrent callers.
pub async fn produce(url: &str, spec: &ProduceSpec, payload: &Payload) -> Result<ProduceResult> {
    let shared = connect(url).await?;
    let claimed = Arc::new(AtomicU64::new(0));
    let enqueued = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut callers = JoinSet::new();
    for _ in 0..spec.producers {
        let channel = if spec.connection_per_producer {
            connect(url).await?
        } else {
            shared.clone()
        };
        for _ in 0..spec.inflight {
            let mut client = BrokerClient::new(channel.clone());
            let claimed = Arc::clone(&claimed);
            let enqueued = Arc::clone(&enqueued);
            let queue = spec.queue.clone();
            let payload = payload.clone();
            let (total, batch, until, stamp) =
                (spec.total, spec.batch as u64, spec.until, spec.stamp);
            callers.spawn(async move {
                let mut latency = new_histogram();
                let mut calls = 0u64;
                loop {
                    if until.is_some_and(|until| Instant::now() >= until) {
                        break;
                    }
                    let first = claimed.fetch_add(batch, Ordering::Relaxed);
                    if first >= total {
                        break;
                    }
                    let count = batch.min(total - first) as usize;
                    let request = new_tasks(&queue, &payload, count, stamp);
                    let call_started = Instant::now();
                    let response = client
                        .enqueue(request)
                        .await
                        .context("Enqueue failed")?
                        .into_inner();
                    record(&mut latency, call_started.elapsed());
                    if response.task_ids.len() != count {
                        bail!(
                            "Enqueue of {count} tasks returned {} ids",
                            response.task_ids.len()
                        );
                    }
                    enqueued.fetch_add(count as u64, Ordering::Relaxed);
                    calls += 1;
                }
                anyhow::Ok((latency, calls))
            });
        }
    }

    let mut call_latency = new_histogram();
    let mut calls = 0;
    while let Some(joined) = callers.join_next().await {
        let (latency, caller_calls) = joined.context("producer task panicked")??;
        call_latency
            .add(&latency)
            .expect("histograms have equal bounds");
        calls += caller_calls;
    }
    Ok(ProduceResult {
        tasks: enqueued.load(Ordering::Relaxed),
        calls,
        elapsed: started.elapsed(),
        call_latency,
    })
}

/// Enqueues one task per call at `rate` tasks per second for `duration`, with at most
/// `max_outstanding` calls outstanding. Each payload carries its send time.
///
/// When the broker falls behind and every call is outstanding, the producer waits, so the
/// achieved rate in the result can be lower than `rate`.
pub async fn produce_paced(
    url: &str,
    queue: &str,
    rate: u64,
    duration: Duration,
    max_outstanding: usize,
    payload: &Payload,
) -> Result<ProduceResult> {
    let channel = connect(url).await?;
    let permits = Arc::new(Semaphore::new(max_outstanding));

    let latency = Arc::new(Mutex::new(new_histogram()));
    let mut calls = JoinSet::new();
    let mut sent = 0u64;
    let started = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_millis(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);

    while started.elapsed() < duration {
        ticker.tick().await;
        let due = (started.elapsed().min(duration).as_secs_f64() * rate as f64) as u64;
        while sent < due {
            let permit = Arc::clone(&permits).acquire_owned().await?;
            let mut client = BrokerClient::new(channel.clone());
            let request = new_tasks(queue, payload, 1, true);
            let latency = Arc::clone(&latency);
            calls.spawn(async move {
                let call_started = Instant::now();
                client.enqueue(request).await.context("Enqueue failed")?;
                record(
                    &mut latency.lock().expect("latency lock"),
                    call_started.elapsed(),
                );
                drop(permit);
                anyhow::Ok(())
            });
            sent += 1;

            // Collect finished calls so that the set does not grow for the whole phase.
            while let Some(joined) = calls.try_join_next() {
                joined.context("producer task panicked")??;
            }
        }
    }
    while let Some(joined) = calls.join_next().await {
        joined.context("producer task panicked")??;
    }
    let elapsed = started.elapsed();
    let call_latency = latency.lock().expect("latency lock").clone();
    Ok(ProduceResult {
        tasks: sent,
        calls: sent,
        elapsed,
        call_latency,
    })
}

/// Acknowledgement strategy of the workers.
#[derive(Debug, Clone, Copy)]
pub enum AckMode {
    /// One Ack call per delivery.
    PerTask,
    /// Ack calls of up to `size` leases, sent when `size` leases are waiting or `flush`
    /// after the first lease of the batch arrived.
    Batch { size: usize, flush: Duration },
}

/// A set of workers that subscribe to one queue.
pub struct ConsumeSpec {
    pub queue: String,
    pub workers: usize,
    /// `max_in_flight` of each worker's Subscribe stream.
    pub max_in_flight: u32,
    pub ack: AckMode,
    /// Simulated handler time per task, a timer that uses no CPU.
    pub handler_sleep: Option<Duration>,
    /// Record enqueue-to-delivery latency from the stamp in each payload.
    pub measure_latency: bool,
    /// Keep a [`DeliveryRecord`] of every delivery, for [`Workers::stop_recorded`].
    pub record_deliveries: bool,
}

/// One delivery that a worker received.
pub struct DeliveryRecord {
    pub task_id: String,
    /// Value of the task's `docket-schedule-id` header; empty when it has none.
    pub schedule_id: String,
    pub received: Instant,
}

/// Header that the scheduler sets on every task it releases.
const SCHEDULE_ID_HEADER: &str = "docket-schedule-id";

/// Counters shared by the workers and their Ack calls.
#[derive(Default)]
struct Shared {
    acked: AtomicU64,
    ack_failures: AtomicU64,
    first_ack_error: Mutex<Option<String>>,
    /// Enqueue-to-delivery latency, recorded only when `ConsumeSpec::measure_latency` is set.
    latency: Mutex<Option<Histogram<u64>>>,
    /// Deliveries received, counted only when `ConsumeSpec::record_deliveries` is set.
    delivered: AtomicU64,
    /// Every delivery, kept only when `ConsumeSpec::record_deliveries` is set.
    deliveries: Mutex<Vec<DeliveryRecord>>,
}

impl Shared {
    fn fail_ack(&self, message: String) {
        self.ack_failures.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first_ack_error.lock().expect("error lock");
        first.get_or_insert(message);
    }
}

/// Running workers; [`Workers::stop`] ends them.
pub struct Workers {
    shared: Arc<Shared>,
    stop: CancellationToken,
    tasks: JoinSet<Result<()>>,
}

impl Workers {
    /// Connects `spec.workers` workers, each on its own connection, and opens their
    /// Subscribe streams.
    pub async fn start(url: &str, spec: &ConsumeSpec) -> Result<Self> {
        let shared = Arc::new(Shared::default());
        if spec.measure_latency {
            *shared.latency.lock().expect("latency lock") = Some(new_histogram());
        }
        let stop = CancellationToken::new();
        let mut tasks = JoinSet::new();
        for _ in 0..spec.workers {
            let channel = connect(url).await?;
            let mut client = BrokerClient::new(channel);
            let stream = client
                .subscribe(SubscribeRequest {
                    queues: vec![spec.queue.clone()],
                    max_in_flight: spec.max_in_flight,
                    ..SubscribeRequest::default()
                })
                .await
                .context("Subscribe failed")?
                .into_inner();
            let options = WorkerOptions {
                ack: spec.ack,
                handler_sleep: spec.handler_sleep,
                measure_latency: spec.measure_latency,
                record_deliveries: spec.record_deliveries,
            };
            tasks.spawn(run_worker(
                client,
                stream,
                options,
                Arc::clone(&shared),
                stop.clone(),
            ));
        }
        Ok(Workers {
            shared,
            stop,
            tasks,
        })
    }

    /// Tasks acknowledged so far.
    pub fn acked(&self) -> u64 {
        self.shared.acked.load(Ordering::Relaxed)
    }

    /// Deliveries received so far, counted only with `ConsumeSpec::record_deliveries`.
    pub fn delivered(&self) -> u64 {
        self.shared.delivered.load(Ordering::Relaxed)
    }

    /// Waits until `count` tasks are acknowledged and returns the time it happened. Fails
    /// when an Ack failed or a worker ended.
    pub async fn wait_for_acks(&mut self, count: u64) -> Result<Instant> {
        loop {
            self.check_health()?;
            if self.acked() >= count {
                return Ok(Instant::now());
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Fails when an Ack failed or a worker ended.
    pub fn check_health(&mut self) -> Result<()> {
        let failures = self.shared.ack_failures.load(Ordering::Relaxed);
        if failures > 0 {
            let first = self.shared.first_ack_error.lock().expect("error lock");
            bail!(
                "{failures} acknowledgements failed; first error: {}",
                first.as_deref().unwrap_or("unknown")
            );
        }
        if let Some(joined) = self.tasks.try_join_next() {
            joined.context("worker task panicked")??;
            bail!("a worker's Subscribe stream ended before the phase did");
        }
        Ok(())
    }

    /// Closes every Subscribe stream and returns the enqueue-to-delivery latency, if the
    /// workers measured it.
    pub async fn stop(mut self) -> Result<Option<Histogram<u64>>> {
        self.join().await?;
        Ok(self.shared.latency.lock().expect("latency lock").take())
    }

    /// Closes every Subscribe stream and returns every delivery in the order the workers
    /// recorded them; empty without `ConsumeSpec::record_deliveries`.
    pub async fn stop_recorded(mut self) -> Result<Vec<DeliveryRecord>> {
        self.join().await?;
        Ok(std::mem::take(
            &mut *self.shared.deliveries.lock().expect("deliveries lock"),
        ))
    }

    async fn join(&mut self) -> Result<()> {
        self.stop.cancel();
        while let Some(joined) = self.tasks.join_next().await {
            joined.context("worker task panicked")??;
        }
        Ok(())
    }
}

/// Settings of one worker: how it settles, times and records each delivery.
#[derive(Clone, Copy)]
struct WorkerOptions {
    ack: AckMode,
    handler_sleep: Option<Duration>,
    measure_latency: bool,
    record_deliveries: bool,
}

async fn run_worker(
    client: BrokerClient<Channel>,
    mut stream: tonic::Streaming<docket_proto::v1::SubscribeResponse>,
    options: WorkerOptions,
    shared: Arc<Shared>,
    stop: CancellationToken,
) -> Result<()> {
    let WorkerOptions {
        ack,
        handler_sleep,
        measure_latency,
        record_deliveries,
    } = options;
    let batch_sender = match ack {
        AckMode::PerTask => None,
        AckMode::Batch { size, flush } => {
            let (sender, receiver) = mpsc::unbounded_channel();
            tokio::spawn(run_batch_acker(
                client.clone(),
                receiver,
                size,
                flush,
                Arc::clone(&shared),
                stop.clone(),
            ));
            Some(sender)
        }
    };
    let mut local_latency = measure_latency.then(new_histogram);
    let mut unmerged = 0u32;

    loop {
        let message = tokio::select! {
            () = stop.cancelled() => break,
            message = stream.message() => message,
        };
        let Some(message) = message.context("Subscribe stream failed")? else {
            if stop.is_cancelled() {
                break;
            }
            bail!("the broker closed a Subscribe stream");
        };
        let Some(Event::Delivery(delivery)) = message.event else {
            continue;
        };
        if record_deliveries {
            record_delivery(&shared, &delivery);
        }
        if let Some(histogram) = local_latency.as_mut() {
            let payload = delivery.task.as_ref().map(|task| &task.payload[..]);
            if let Some(sent) = payload.and_then(read_stamp) {
                record(
                    histogram,
                    Duration::from_nanos(now_nanos().saturating_sub(sent)),
                );
            }
            // Merge now and then, so that a worker that is stopped loses little.
            unmerged += 1;
            if unmerged == 1024 {
                merge_latency(&shared, histogram);
                unmerged = 0;
            }
        }

        let lease_id = delivery.lease_id;
        let settle = {
            let client = client.clone();
            let shared = Arc::clone(&shared);
            let batch_sender = batch_sender.clone();
            async move {
                if let Some(sleep) = handler_sleep {
                    tokio::time::sleep(sleep).await;
                }
                match batch_sender {
                    Some(sender) => {
                        // The acker stops only when the run stops, so a closed channel
                        // loses nothing that is still counted.
                        let _ = sender.send(lease_id);
                    }
                    None => send_acks(client, vec![lease_id], &shared).await,
                }
            }
        };
        if handler_sleep.is_some() || batch_sender.is_none() {
            tokio::spawn(settle);
        } else {
            settle.await;
        }
    }

    if let Some(histogram) = local_latency.as_mut() {
        merge_latency(&shared, histogram);
    }
    Ok(())
}

fn record_delivery(shared: &Shared, delivery: &docket_proto::v1::Delivery) {
    let received = Instant::now();
    let (task_id, schedule_id) = match delivery.task.as_ref() {
        Some(task) => (
            task.id.clone(),
            task.headers
                .get(SCHEDULE_ID_HEADER)
                .cloned()
                .unwrap_or_default(),
        ),
        None => (String::new(), String::new()),
    };
    shared
        .deliveries
        .lock()
        .expect("deliveries lock")
        .push(DeliveryRecord {
            task_id,
            schedule_id,
            received,
        });
    shared.delivered.fetch_add(1, Ordering::Relaxed);
}

fn merge_latency(shared: &Shared, local: &mut Histogram<u64>) {
    if let Some(total) = shared.latency.lock().expect("latency lock").as_mut() {
        total.add(&*local).expect("histograms have equal bounds");
    }
    local.reset();
}

/// Collects leases into batches and sends each batch as one Ack call, without waiting for
/// earlier calls to return.
async fn run_batch_acker(
    client: BrokerClient<Channel>,
    mut receiver: mpsc::UnboundedReceiver<String>,
    size: usize,
    flush: Duration,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    loop {
        let first = tokio::select! {
            () = stop.cancelled() => return,
            first = receiver.recv() => first,
        };
        let Some(first) = first else { return };
        let mut batch = Vec::with_capacity(size);
        batch.push(first);
        let deadline = tokio::time::Instant::now() + flush;
        while batch.len() < size {
            match tokio::time::timeout_at(deadline, receiver.recv()).await {
                Ok(Some(lease_id)) => batch.push(lease_id),
                Ok(None) | Err(_) => break,
            }
        }
        let client = client.clone();
        let shared = Arc::clone(&shared);
        tokio::spawn(async move { send_acks(client, batch, &shared).await });
    }
}

async fn send_acks(mut client: BrokerClient<Channel>, lease_ids: Vec<String>, shared: &Shared) {
    let count = lease_ids.len();
    let acks = lease_ids
        .into_iter()
        .map(|lease_id| Acknowledgement {
            lease_id,
            result: Bytes::new(),
        })
        .collect();
    match client.ack(AckRequest { acks }).await {
        Ok(response) => {
            let results = response.into_inner().results;
            let settled = results.iter().filter(|result| result.code == 0).count();
            shared.acked.fetch_add(settled as u64, Ordering::Relaxed);
            if let Some(failed) = results.iter().find(|result| result.code != 0) {
                shared.fail_ack(format!(
                    "lease {} not settled: code {} {}",
                    failed.lease_id, failed.code, failed.message
                ));
            } else if results.len() != count {
                shared.fail_ack(format!(
                    "Ack of {count} leases returned {} results",
                    results.len()
                ));
            }
        }
        Err(status) => shared.fail_ack(format!("Ack of {count} leases failed: {status}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_is_fixed_for_a_size() {
        let first = Payload::new(256).build(false);
        let second = Payload::new(256).build(false);
        assert_eq!(first.len(), 256);
        assert_eq!(first, second);
    }

    #[test]
    fn stamp_round_trips() {
        let before = now_nanos();
        let payload = Payload::new(256).build(true);
        let stamp = read_stamp(&payload).expect("payload has a stamp");
        assert!(stamp >= before, "stamp {stamp} is before {before}");
        assert!(stamp <= now_nanos());
        assert_eq!(payload.len(), 256);
    }

    #[test]
    fn stamp_of_short_payload_is_none() {
        assert_eq!(read_stamp(&[1, 2, 3]), None);
    }
}
