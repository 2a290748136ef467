//! The benchmark scenarios. Each one prints its result rows as soon as it measures them.

use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use crate::load::{self, AckMode, ConsumeSpec, Payload, ProduceSpec, Workers};
use crate::spawn::{self, SpawnedServer};
use crate::stats::{Printer, Row, new_histogram};

/// Batch size of the Enqueue calls that prepare a backlog.
const BACKLOG_BATCH: usize = 1000;

/// Producers that prepare a backlog.
const BACKLOG_PRODUCERS: usize = 4;

/// State shared by the scenarios of one run.
pub struct Context {
    pub url: String,
    pub payload: Payload,
    pub queue_prefix: String,
    /// Hard bound of each phase.
    pub timeout: Duration,
    pub printer: Printer,
    pub spawned: Option<SpawnedServer>,
    /// Broker binary of --spawn. The scheduler binary is looked up beside it.
    pub broker_bin: PathBuf,
}

impl Context {
    /// Name of the queue of one phase, so that phases never see each other's tasks.
    pub fn queue(&self, phase: &str) -> String {
        format!("{}.{phase}", self.queue_prefix)
    }

    /// Runs `future` as the phase `name`, failing when it takes longer than the timeout.
    pub async fn phase<T>(&self, name: &str, future: impl Future<Output = Result<T>>) -> Result<T> {
        match tokio::time::timeout(self.timeout, future).await {
            Ok(result) => result.with_context(|| format!("phase {name} failed")),
            Err(_) => bail!(
                "phase {name} timed out after {} s (--timeout)",
                self.timeout.as_secs()
            ),
        }
    }

    /// Enqueues `n` tasks into `queue` in batches of [`BACKLOG_BATCH`].
    async fn prepare_backlog(&self, queue: &str, n: u64) -> Result<load::ProduceResult> {
        let spec = ProduceSpec {
            queue: queue.to_string(),
            total: n,
            until: None,
            producers: BACKLOG_PRODUCERS,
            inflight: 1,
            batch: BACKLOG_BATCH,
            connection_per_producer: false,
            stamp: false,
        };
        self.phase("backlog", load::produce(&self.url, &spec, &self.payload))
            .await
    }

    /// Starts workers on `spec.queue`, waits until `n` tasks are acknowledged, and stops them.
    /// Returns the time from the start of the workers to the last Ack, and the latency that
    /// the workers measured.
    async fn consume(
        &self,
        name: &str,
        spec: &ConsumeSpec,
        n: u64,
    ) -> Result<(Duration, Option<hdrhistogram::Histogram<u64>>)> {
        self.phase(name, async {
            let started = Instant::now();
            let mut workers = Workers::start(&self.url, spec).await?;
            let finished = workers.wait_for_acks(n).await?;
            let latency = workers.stop().await?;
            Ok((finished - started, latency))
        })
        .await
    }
}

/// Options of the `enqueue` scenario.
pub struct EnqueueOptions {
    pub n: u64,
    pub producers: usize,
    pub batch_sizes: Vec<usize>,
    pub inflight: usize,
    pub connection_per_producer: bool,
}

/// Enqueues `n` tasks per batch size and reports tasks/s and the latency of each call.
pub async fn enqueue(context: &mut Context, options: &EnqueueOptions) -> Result<()> {
    for &batch in &options.batch_sizes {
        let spec = ProduceSpec {
            queue: context.queue(&format!("enqueue-b{batch}")),
            total: options.n,
            until: None,
            producers: options.producers,
            inflight: options.inflight,
            batch,
            connection_per_producer: options.connection_per_producer,
            stamp: false,
        };
        let result = context
            .phase(
                &format!("enqueue batch={batch}"),
                load::produce(&context.url, &spec, &context.payload),
            )
            .await?;
        let row = Row::new(
            "enqueue",
            format!("batch={batch}"),
            result.tasks,
            result.elapsed,
        )
        .with_latency(&result.call_latency)
        .with(
            "calls_per_s",
            (result.calls as f64 / result.elapsed.as_secs_f64()).round() as u64,
        )
        .with("producers", options.producers)
        .with("inflight", options.inflight)
        .with(
            "connections",
            if options.connection_per_producer {
                options.producers
            } else {
                1
            },
        );
        context.printer.print(row);
    }
    Ok(())
}

/// Options of the `drain` scenario.
pub struct DrainOptions {
    pub n: u64,
    pub workers: usize,
    pub max_in_flight: u32,
    pub ack_batch: usize,
    pub ack_flush: Duration,
}

/// Prepares a backlog and drains it, once with one Ack call per task and once with batched
/// Ack calls.
pub async fn drain(context: &mut Context, options: &DrainOptions) -> Result<()> {
    let modes = [
        ("ack=per-task", AckMode::PerTask),
        (
            "ack=batch",
            AckMode::Batch {
                size: options.ack_batch,
                flush: options.ack_flush,
            },
        ),
    ];
    for (case, ack) in modes {
        let queue = context.queue(&format!("drain-{}", case.trim_start_matches("ack=")));
        context.prepare_backlog(&queue, options.n).await?;
        let spec = ConsumeSpec {
            queue,
            workers: options.workers,
            max_in_flight: options.max_in_flight,
            ack,
            handler_sleep: None,
            measure_latency: false,
            record_deliveries: false,
        };
        let (elapsed, _) = context
            .consume(&format!("drain {case}"), &spec, options.n)
            .await?;
        let mut row = Row::new("drain", case, options.n, elapsed)
            .with("workers", options.workers)
            .with("max_in_flight", options.max_in_flight);
        if let AckMode::Batch { size, flush } = ack {
            row = row
                .with("ack_batch", size)
                .with("ack_flush_ms", flush.as_secs_f64() * 1000.0);
        }
        context.printer.print(row);
    }
    Ok(())
}

/// Options of the `e2e` scenario.
pub struct E2eOptions {
    pub duration: Duration,
    pub producers: usize,
    pub batch: usize,
    pub inflight: usize,
    pub workers: usize,
    pub max_in_flight: u32,
    pub ack_batch: usize,
    pub ack_flush: Duration,
    pub rates: Vec<u64>,
    pub rate_outstanding: usize,
}

/// Runs producers and workers at once: first at full speed, then at each fixed rate.
pub async fn e2e(context: &mut Context, options: &E2eOptions) -> Result<()> {
    if context.payload.len() < load::STAMP_BYTES {
        bail!(
            "e2e needs --payload of at least {} bytes for the send-time stamp",
            load::STAMP_BYTES
        );
    }
    let ack = AckMode::Batch {
        size: options.ack_batch,
        flush: options.ack_flush,
    };
    let consume_spec = |queue: String| ConsumeSpec {
        queue,
        workers: options.workers,
        max_in_flight: options.max_in_flight,
        ack,
        handler_sleep: None,
        measure_latency: true,
        record_deliveries: false,
    };

    // Sustained: the producers flood for the whole duration, and the rate counts the tasks
    // acknowledged within it.
    let queue = context.queue("e2e-sustained");
    let spec = consume_spec(queue.clone());
    let (acked_in_window, enqueued, latency) = context
        .phase("e2e sustained", async {
            let mut workers = Workers::start(&context.url, &spec).await?;
            let started = Instant::now();
            let produce_spec = ProduceSpec {
                queue: queue.clone(),
                total: u64::MAX,
                until: Some(started + options.duration),
                producers: options.producers,
                inflight: options.inflight,
                batch: options.batch,
                connection_per_producer: false,
                stamp: true,
            };
            let produced = load::produce(&context.url, &produce_spec, &context.payload).await?;
            let remaining = options.duration.saturating_sub(started.elapsed());
            tokio::time::sleep(remaining).await;
            let acked_in_window = workers.acked();
            // Drain what the producers left, so that the queue ends empty.
            workers.wait_for_acks(produced.tasks).await?;
            let latency = workers.stop().await?;
            Ok((acked_in_window, produced.tasks, latency))
        })
        .await?;
    let row = Row::new("e2e", "sustained", acked_in_window, options.duration)
        .with_latency(&latency.unwrap_or_else(new_histogram))
        .with("enqueued", enqueued)
        .with("producers", options.producers)
        .with("batch", options.batch)
        .with("workers", options.workers);
    context.printer.print(row);

    for &rate in &options.rates {
        let queue = context.queue(&format!("e2e-rate{rate}"));
        let spec = consume_spec(queue.clone());
        let (produced, latency) = context
            .phase(&format!("e2e rate={rate}"), async {
                let mut workers = Workers::start(&context.url, &spec).await?;
                let produced = load::produce_paced(
                    &context.url,
                    &queue,
                    rate,
                    options.duration,
                    options.rate_outstanding,
                    &context.payload,
                )
                .await?;
                workers.wait_for_acks(produced.tasks).await?;
                let latency = workers.stop().await?;
                Ok((produced, latency))
            })
            .await?;
        let row = Row::new(
            "e2e",
            format!("rate={rate}"),
            produced.tasks,
            produced.elapsed,
        )
        .with_latency(&latency.unwrap_or_else(new_histogram))
        .with("target_rate", rate)
        .with(
            "enqueue_p99_us",
            produced.call_latency.value_at_quantile(0.99),
        );
        context.printer.print(row);
    }
    Ok(())
}

/// Options of the `campaign` scenario.
pub struct CampaignOptions {
    pub n: u64,
    pub workers: usize,
    pub concurrency: u32,
    pub handler: Duration,
    pub ack_batch: usize,
    pub ack_flush: Duration,
}

/// Runs the e-mail campaign: workers whose handler sleeps, and producers that enqueue the
/// whole campaign in batches. Reports the total time against the ideal.
pub async fn campaign(context: &mut Context, options: &CampaignOptions) -> Result<()> {
    let total_concurrency = options.workers as u64 * u64::from(options.concurrency);
    if total_concurrency == 0 {
        bail!("campaign needs at least one worker with a concurrency of at least 1");
    }
    let ideal = options
        .handler
        .mul_f64(options.n as f64 / total_concurrency as f64);
    let queue = context.queue("campaign");
    let spec = ConsumeSpec {
        queue: queue.clone(),
        workers: options.workers,
        max_in_flight: options.concurrency,
        ack: AckMode::Batch {
            size: options.ack_batch,
            flush: options.ack_flush,
        },
        handler_sleep: Some(options.handler),
        measure_latency: false,
        record_deliveries: false,
    };
    let (total, enqueue_elapsed) = context
        .phase("campaign", async {
            let mut workers = Workers::start(&context.url, &spec).await?;
            let started = Instant::now();
            let produce_spec = ProduceSpec {
                queue: queue.clone(),
                total: options.n,
                until: None,
                producers: BACKLOG_PRODUCERS,
                inflight: 1,
                batch: BACKLOG_BATCH,
                connection_per_producer: false,
                stamp: false,
            };
            let produced = load::produce(&context.url, &produce_spec, &context.payload).await?;
            let finished = workers.wait_for_acks(options.n).await?;
            workers.stop().await?;
            Ok((finished - started, produced.elapsed))
        })
        .await?;
    let row = Row::new("campaign", "sleep", options.n, total)
        .with("ideal_secs", ideal.as_secs_f64())
        .with(
            "ratio",
            (total.as_secs_f64() / ideal.as_secs_f64() * 1000.0).round() / 1000.0,
        )
        .with("enqueue_secs", round2(enqueue_elapsed.as_secs_f64()))
        .with("concurrency", total_concurrency)
        .with("handler_ms", options.handler.as_millis() as u64);
    context.printer.print(row);
    Ok(())
}

/// Options of the `backlog` scenario.
pub struct BacklogOptions {
    pub n: u64,
    pub workers: usize,
    pub max_in_flight: u32,
    pub ack_batch: usize,
    pub ack_flush: Duration,
}

/// Enqueues a large backlog, restarts the spawned broker, reports its memory and start
/// time, and drains the backlog.
pub async fn backlog(context: &mut Context, options: &BacklogOptions) -> Result<()> {
    let queue = context.queue("backlog");
    let produced = context.prepare_backlog(&queue, options.n).await?;
    let rss_before = context.broker_rss_mib()?;
    context.printer.print(
        Row::new("backlog", "enqueue", produced.tasks, produced.elapsed).with(
            "rss_mib",
            rss_before.map_or(serde_json::Value::Null, Into::into),
        ),
    );

    if let Some(broker) = context.spawned.as_mut() {
        let (stop, times) = context_phase_timeout(context.timeout, broker.restart()).await?;
        let rss_after = context.broker_rss_mib()?;
        context.printer.print(
            Row::new("backlog", "restart", options.n, times.serving)
                .with("stop_secs", round2(stop.as_secs_f64()))
                .with("listening_secs", round2(times.listening.as_secs_f64()))
                .with("serving_secs", round2(times.serving.as_secs_f64()))
                .with(
                    "rss_mib",
                    rss_after.map_or(serde_json::Value::Null, Into::into),
                ),
        );
        context.url = context.spawned.as_ref().expect("broker is spawned").url();
    } else {
        eprintln!("backlog: the broker was not started with --spawn, so it is not restarted");
    }

    let spec = ConsumeSpec {
        queue,
        workers: options.workers,
        max_in_flight: options.max_in_flight,
        ack: AckMode::Batch {
            size: options.ack_batch,
            flush: options.ack_flush,
        },
        handler_sleep: None,
        measure_latency: false,
        record_deliveries: false,
    };
    let (elapsed, _) = context.consume("backlog drain", &spec, options.n).await?;
    let rss_drained = context.broker_rss_mib()?;
    context
        .printer
        .print(Row::new("backlog", "drain", options.n, elapsed).with(
            "rss_mib",
            rss_drained.map_or(serde_json::Value::Null, Into::into),
        ));
    Ok(())
}

async fn context_phase_timeout<T>(
    timeout: Duration,
    future: impl Future<Output = Result<T>>,
) -> Result<T> {
    match tokio::time::timeout(timeout, future).await {
        Ok(result) => result.context("broker restart failed"),
        Err(_) => bail!("broker restart timed out after {} s", timeout.as_secs()),
    }
}

/// Options of the `peers` scenario.
pub struct PeersOptions {
    pub n: u64,
    pub inflight: usize,
    pub prefetch: u32,
    pub rate: u64,
    pub duration: Duration,
}

/// Runs the workload of the peers' benchmark under its phase names.
///
/// - `enqueue`: one task per call, with `inflight` calls outstanding on one connection.
/// - `drain`: one worker with `max_in_flight = prefetch` and one Ack call per task.
/// - `e2e`: the worker runs while the producer enqueues `n` tasks.
/// - `latency`: one task per call at a fixed rate.
pub async fn peers(context: &mut Context, options: &PeersOptions) -> Result<()> {
    let queue = context.queue("peers");
    let produce_spec = |stamp: bool| ProduceSpec {
        queue: queue.clone(),
        total: options.n,
        until: None,
        producers: 1,
        inflight: options.inflight,
        batch: 1,
        connection_per_producer: false,
        stamp,
    };
    let consume_spec = |measure_latency: bool| ConsumeSpec {
        queue: queue.clone(),
        workers: 1,
        max_in_flight: options.prefetch,
        ack: AckMode::PerTask,
        handler_sleep: None,
        measure_latency,
        record_deliveries: false,
    };

    let produced = context
        .phase(
            "peers enqueue",
            load::produce(&context.url, &produce_spec(false), &context.payload),
        )
        .await?;
    context.printer.print(Row::new(
        "enqueue",
        "peers",
        produced.tasks,
        produced.elapsed,
    ));

    let (elapsed, _) = context
        .consume("peers drain", &consume_spec(false), options.n)
        .await?;
    context
        .printer
        .print(Row::new("drain", "peers", options.n, elapsed));

    let (elapsed, latency) = context
        .phase("peers e2e", async {
            let mut workers = Workers::start(&context.url, &consume_spec(true)).await?;
            let started = Instant::now();
            load::produce(&context.url, &produce_spec(true), &context.payload).await?;
            let finished = workers.wait_for_acks(options.n).await?;
            let latency = workers.stop().await?;
            Ok((finished - started, latency))
        })
        .await?;
    context.printer.print(
        Row::new("e2e", "peers", options.n, elapsed)
            .with_latency(&latency.unwrap_or_else(new_histogram)),
    );

    let (produced, latency) = context
        .phase("peers latency", async {
            let mut workers = Workers::start(&context.url, &consume_spec(true)).await?;
            let produced = load::produce_paced(
                &context.url,
                &queue,
                options.rate,
                options.duration,
                options.inflight,
                &context.payload,
            )
            .await?;
            workers.wait_for_acks(produced.tasks).await?;
            let latency = workers.stop().await?;
            Ok((produced, latency))
        })
        .await?;
    context.printer.print(
        Row::new("latency", "peers", produced.tasks, produced.elapsed)
            .with_latency(&latency.unwrap_or_else(new_histogram))
            .with("target_rate", options.rate),
    );
    Ok(())
}

impl Context {
    /// Resident memory of the spawned broker in MiB, or `None` for a broker that this run
    /// did not start.
    pub fn broker_rss_mib(&self) -> Result<Option<f64>> {
        let Some(pid) = self.spawned.as_ref().and_then(SpawnedServer::pid) else {
            return Ok(None);
        };
        let kib = spawn::resident_kib(pid)?;
        Ok(Some(round2(kib as f64 / 1024.0)))
    }
}

pub fn round2(value: f64) -> f64 {
    (value * 100.0).round() / 100.0
}
