//! Prometheus metrics: the broker's counters and histograms, the gauges computed at scrape
//! time, and the HTTP server that serves them at `GET /metrics`.
//!
//! Counters and histograms change where a state change is committed. The storage writer
//! counts enqueues, acks, nacks, releases, expiries, dead letters and cancellations after
//! the commit that stores them and before any reply. The dispatcher counts deliveries
//! under its lock. A client that got its reply therefore finds the change in the next
//! scrape. Each update is an atomic addition on a handle that the caller looked up once
//! per queue ([`QueueMetricsCache`]), so the per-task path takes no lock of its own.
//!
//! The output is the OpenMetrics text format of `prometheus-client`, which Prometheus
//! scrapes natively.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{ALLOW, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet, text};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::{Registry, Unit};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::Broker;
use crate::dispatch::ReadyTask;
use crate::task::QueueName;

/// Content type of the OpenMetrics text format that `prometheus-client` writes.
pub const CONTENT_TYPE_OPENMETRICS: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Maximum number of metrics connections served at once. A Prometheus server keeps one
/// connection per target, so a few more leave room for people with curl.
const MAX_CONNECTIONS: usize = 16;

/// Time limit for a client to send its request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Time that shutdown waits for scrapes in progress.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Upper bounds, in seconds, of the task latency histograms. Queue waits range from
/// milliseconds on an idle broker to hours behind a backlog.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 900.0, 3600.0,
];

/// Upper bounds, in seconds, of the commit duration histogram. A commit is one fsync.
const COMMIT_SECONDS_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

/// Upper bounds of the commit batch size histogram, in write requests. The default
/// `--max-commit-batch` is 1024.
const BATCH_SIZE_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0,
];

/// Label set of per-queue metrics: `queue`.
pub type QueueLabels = [(&'static str, String); 1];

/// Label set of the queue depth gauge: `queue` and `state`.
type QueueStateLabels = [(&'static str, String); 2];

/// A per-label histogram family whose histograms share one set of bucket bounds.
type HistogramFamily<S> = Family<S, AtomicHistogram, fn() -> AtomicHistogram>;

/// A histogram with fixed bucket bounds whose observation is three atomic additions, so
/// that it can sit on the per-task path. `prometheus-client`'s own histogram takes a
/// mutex on every observation.
#[derive(Clone, Debug)]
pub struct AtomicHistogram {
    inner: Arc<HistogramCells>,
}

#[derive(Debug)]
struct HistogramCells {
    /// Upper bounds of the buckets, ascending. The `+Inf` bucket follows them.
    bounds: &'static [f64],
    /// Observations per bucket, not cumulative, with one bucket more than `bounds`.
    buckets: Box<[AtomicU64]>,
    /// Sum of the observations, as the bits of an `f64`.
    sum_bits: AtomicU64,
}

impl AtomicHistogram {
    /// Creates an empty histogram with `bounds`, which must be finite and ascending.
    pub fn new(bounds: &'static [f64]) -> Self {
        debug_assert!(bounds.windows(2).all(|pair| pair[0] < pair[1]));
        AtomicHistogram {
            inner: Arc::new(HistogramCells {
                bounds,
                buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
                sum_bits: AtomicU64::new(0f64.to_bits()),
            }),
        }
    }

    /// Records one observation. It goes to the first bucket whose bound is at least
    /// `value`, because Prometheus's `le` label means "less than or equal".
    pub fn observe(&self, value: f64) {
        let cells = &self.inner;
        let index = cells.bounds.partition_point(|&bound| bound < value);
        cells.buckets[index].fetch_add(1, Ordering::Relaxed);
        // A compare-and-swap loop, because there is no atomic addition of floats.
        let _ = cells
            .sum_bits
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + value).to_bits())
            });
    }

    /// Records a duration in seconds.
    pub fn observe_duration(&self, duration: Duration) {
        self.observe(duration.as_secs_f64());
    }

    /// Returns the number of observations and their sum.
    pub fn count_and_sum(&self) -> (u64, f64) {
        let cells = &self.inner;
        let count = cells
            .buckets
            .iter()
            .map(|bucket| bucket.load(Ordering::Relaxed))
            .sum();
        (
            count,
            f64::from_bits(cells.sum_bits.load(Ordering::Relaxed)),
        )
    }
}

impl TypedMetric for AtomicHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for AtomicHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), fmt::Error> {
        let cells = &self.inner;
        let buckets: Vec<(f64, u64)> = cells
            .bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(
                cells
                    .buckets
                    .iter()
                    .map(|bucket| bucket.load(Ordering::Relaxed)),
            )
            .collect();
        // The count is the sum of the buckets read here, so that the `+Inf` bucket equals
        // `_count` even while observations arrive.
        let count = buckets.iter().map(|&(_, observed)| observed).sum();
        let sum = f64::from_bits(cells.sum_bits.load(Ordering::Relaxed));
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

fn latency_histogram() -> AtomicHistogram {
    AtomicHistogram::new(LATENCY_BUCKETS)
}

/// Returns the labels of `queue`'s metrics.
pub fn queue_labels(queue: &QueueName) -> QueueLabels {
    [("queue", queue.as_str().to_owned())]
}

/// The broker's counters and histograms. Gauges of queue depth are computed at each
/// scrape from the dispatcher's counts instead.
#[derive(Debug)]
pub struct BrokerMetrics {
    registry: Registry,
    enqueued: Family<QueueLabels, Counter>,
    delivered: Family<QueueLabels, Counter>,
    acked: Family<QueueLabels, Counter>,
    nacked: Family<QueueLabels, Counter>,
    released: Family<QueueLabels, Counter>,
    expired: Family<QueueLabels, Counter>,
    dead_lettered: Family<QueueLabels, Counter>,
    cancelled: Family<QueueLabels, Counter>,
    delivery_latency: HistogramFamily<QueueLabels>,
    ack_latency: HistogramFamily<QueueLabels>,
    commit_batch_size: AtomicHistogram,
    commit_duration: AtomicHistogram,
    commit_failures: Counter,
}

impl Default for BrokerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl BrokerMetrics {
    /// Creates the metrics, all zero, registered under the `docket_broker_` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("docket_broker");
        registry.register(
            "build",
            "Version of the running broker; the value is always 1",
            Info::new([("version", env!("CARGO_PKG_VERSION"))]),
        );
        let mut counter = |name: &str, help: &str| {
            let family = Family::<QueueLabels, Counter>::default();
            registry.register(name, help, family.clone());
            family
        };
        let enqueued = counter(
            "tasks_enqueued",
            "Tasks stored by Enqueue, by queue; a duplicate of an idempotency key is not counted",
        );
        let delivered = counter(
            "tasks_delivered",
            "Deliveries to workers, by queue; every attempt and redelivery counts",
        );
        let acked = counter("tasks_acked", "Tasks that succeeded through Ack, by queue");
        let nacked = counter(
            "tasks_nacked",
            "Failed attempts reported by Nack without release, by queue",
        );
        let released = counter(
            "tasks_released",
            "Tasks returned to their queue by Nack with release, by queue",
        );
        let expired = counter(
            "tasks_expired",
            "Leases that expired before the worker settled them, by queue",
        );
        let dead_lettered = counter(
            "tasks_dead_lettered",
            "Tasks that became dead after their last failed attempt, by queue",
        );
        let cancelled = counter("tasks_cancelled", "Tasks that became cancelled, by queue");

        let delivery_latency: HistogramFamily<QueueLabels> =
            Family::new_with_constructor(latency_histogram);
        registry.register_with_unit(
            "delivery_latency",
            "Time from enqueue to a task's delivery before any finished attempt, by queue",
            Unit::Seconds,
            delivery_latency.clone(),
        );
        let ack_latency: HistogramFamily<QueueLabels> =
            Family::new_with_constructor(latency_histogram);
        registry.register_with_unit(
            "ack_latency",
            "Time from a delivery to the committed Ack of its task, by queue",
            Unit::Seconds,
            ack_latency.clone(),
        );

        let commit_batch_size = AtomicHistogram::new(BATCH_SIZE_BUCKETS);
        registry.register(
            "commit_batch_size",
            "Write requests applied in one committed storage transaction",
            commit_batch_size.clone(),
        );
        let commit_duration = AtomicHistogram::new(COMMIT_SECONDS_BUCKETS);
        registry.register_with_unit(
            "commit_duration",
            "Time to apply and commit one storage transaction, fsync included",
            Unit::Seconds,
            commit_duration.clone(),
        );
        let commit_failures = Counter::default();
        registry.register(
            "commit_failures",
            "Storage transactions that failed and were rolled back",
            commit_failures.clone(),
        );

        BrokerMetrics {
            registry,
            enqueued,
            delivered,
            acked,
            nacked,
            released,
            expired,
            dead_lettered,
            cancelled,
            delivery_latency,
            ack_latency,
            commit_batch_size,
            commit_duration,
            commit_failures,
        }
    }

    /// Looks up the handles of `queue`'s metrics, creating them at zero. Callers keep the
    /// result in a [`QueueMetricsCache`], since the lookup takes the families' locks.
    pub fn queue(&self, queue: &QueueName) -> QueueMetrics {
        let labels = queue_labels(queue);
        QueueMetrics {
            enqueued: self.enqueued.get_or_create_owned(&labels),
            delivered: self.delivered.get_or_create_owned(&labels),
            acked: self.acked.get_or_create_owned(&labels),
            nacked: self.nacked.get_or_create_owned(&labels),
            released: self.released.get_or_create_owned(&labels),
            expired: self.expired.get_or_create_owned(&labels),
            dead_lettered: self.dead_lettered.get_or_create_owned(&labels),
            cancelled: self.cancelled.get_or_create_owned(&labels),
            delivery_latency: self.delivery_latency.get_or_create_owned(&labels),
            ack_latency: self.ack_latency.get_or_create_owned(&labels),
        }
    }

    /// Records a committed storage transaction of `requests` write requests.
    pub fn record_commit(&self, requests: usize, elapsed: Duration) {
        self.commit_batch_size.observe(requests as f64);
        self.commit_duration.observe_duration(elapsed);
    }

    /// Records a storage transaction that failed.
    pub fn record_commit_failure(&self) {
        self.commit_failures.inc();
    }

    /// Appends the counters and histograms to `output`, without the closing `# EOF`.
    fn encode(&self, output: &mut String) {
        // Writing to a String cannot fail, so an error here is a bug in a metric.
        if let Err(error) = text::encode_registry(output, &self.registry) {
            tracing::error!(%error, "encoding the broker's metrics failed");
        }
    }
}

/// Handles of one queue's counters and histograms. Cloning shares the values.
#[derive(Clone, Debug)]
pub struct QueueMetrics {
    /// Tasks stored by Enqueue.
    pub enqueued: Counter,
    /// Deliveries to workers.
    pub delivered: Counter,
    /// Tasks that succeeded through Ack.
    pub acked: Counter,
    /// Failed attempts reported by Nack without release.
    pub nacked: Counter,
    /// Tasks returned by Nack with release.
    pub released: Counter,
    /// Leases that expired.
    pub expired: Counter,
    /// Tasks that became dead.
    pub dead_lettered: Counter,
    /// Tasks that became cancelled.
    pub cancelled: Counter,
    /// Seconds from enqueue to first delivery.
    pub delivery_latency: AtomicHistogram,
    /// Seconds from delivery to committed Ack.
    pub ack_latency: AtomicHistogram,
}

impl QueueMetrics {
    /// Records a delivery of `task` at `now_us`. Only a delivery of a task without a
    /// finished attempt adds to the enqueue-to-delivery histogram, so that it measures how
    /// long new tasks wait for a worker. A retry's wait would include its backoff.
    pub fn record_delivery(&self, task: &ReadyTask, now_us: i64) {
        self.delivered.inc();
        if task.attempts == 0 {
            self.delivery_latency
                .observe(micros_to_seconds(now_us.saturating_sub(task.created_at_us)));
        }
    }
}

/// Converts a span of microseconds to seconds, clamping a negative span, from a clock
/// step, to zero.
pub fn micros_to_seconds(micros: i64) -> f64 {
    micros.max(0) as f64 / 1e6
}

/// Per-queue metric handles of one owner, such as the storage writer or the dispatcher's
/// state, so that each queue's labels are looked up once.
#[derive(Debug)]
pub struct QueueMetricsCache {
    metrics: Arc<BrokerMetrics>,
    by_queue: HashMap<QueueName, QueueMetrics>,
}

impl QueueMetricsCache {
    /// Creates an empty cache over `metrics`.
    pub fn new(metrics: Arc<BrokerMetrics>) -> Self {
        QueueMetricsCache {
            metrics,
            by_queue: HashMap::new(),
        }
    }

    /// Returns the handles of `queue`'s metrics.
    pub fn get(&mut self, queue: &QueueName) -> &QueueMetrics {
        if !self.by_queue.contains_key(queue) {
            let handles = self.metrics.queue(queue);
            self.by_queue.insert(queue.clone(), handles);
        }
        &self.by_queue[queue]
    }

    /// Returns the metrics the cache takes its handles from.
    pub fn metrics(&self) -> &BrokerMetrics {
        &self.metrics
    }
}

/// Renders the broker's metrics: the counters and histograms, then the gauges of every
/// queue's depth by state and its oldest pending task's age, computed now as
/// GetQueueStats computes them.
pub async fn render(broker: &Broker) -> String {
    let mut output = String::new();
    broker.dispatcher.metrics().encode(&mut output);

    let mut gauges = Registry::with_prefix("docket_broker");
    let depth = Family::<QueueStateLabels, Gauge>::default();
    gauges.register(
        "queue_tasks",
        "Tasks in the queue by state, counted at scrape time",
        depth.clone(),
    );
    let oldest = Family::<QueueLabels, Gauge<f64, AtomicU64>>::default();
    gauges.register_with_unit(
        "queue_oldest_pending_age",
        "Age of the queue's oldest pending task, 0 when none is pending",
        Unit::Seconds,
        oldest.clone(),
    );
    let paused = Family::<QueueLabels, Gauge>::default();
    gauges.register(
        "queue_paused",
        "1 while deliveries from the queue are paused, else 0",
        paused.clone(),
    );

    match broker.list_queues().await {
        Ok(queues) => {
            for stats in queues {
                let states = [
                    ("pending", stats.pending),
                    ("retry_wait", stats.retry_wait),
                    ("leased", stats.leased),
                    ("dead", stats.dead),
                    ("succeeded", stats.succeeded),
                    ("cancelled", stats.cancelled),
                ];
                for (state, count) in states {
                    let labels = [("queue", stats.queue.clone()), ("state", state.to_owned())];
                    depth
                        .get_or_create(&labels)
                        .set(i64::try_from(count).unwrap_or(i64::MAX));
                }
                let labels = [("queue", stats.queue.clone())];
                let age = stats.oldest_pending_age.unwrap_or_default();
                let age_seconds = age.seconds as f64 + f64::from(age.nanos) / 1e9;
                oldest.get_or_create(&labels).set(age_seconds);
                paused.get_or_create(&labels).set(i64::from(stats.paused));
            }
        }
        Err(err) => {
            tracing::warn!(error = %err, "reading queue stats for a metrics scrape failed; the queue gauges are left out");
        }
    }
    let _ = text::encode_registry(&mut output, &gauges);
    let _ = text::encode_eof(&mut output);
    output
}

/// The metrics listen address could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} for metrics: {source}")]
pub struct BindError {
    /// The address from the configuration.
    pub addr: SocketAddr,
    /// The I/O error.
    pub source: std::io::Error,
}

/// Binds the metrics listen address, if one is set, and logs `metrics listening` with
/// the bound address.
///
/// # Errors
///
/// Fails if the address cannot be bound.
pub async fn bind(addr: Option<SocketAddr>) -> Result<Option<TcpListener>, BindError> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| BindError { addr, source })?;
    let local_addr = listener
        .local_addr()
        .map_err(|source| BindError { addr, source })?;
    tracing::info!(addr = %local_addr, "metrics listening");
    Ok(Some(listener))
}

/// Serves the broker's metrics on `listener` until `shutdown` is cancelled.
pub async fn serve(listener: TcpListener, broker: Arc<Broker>, shutdown: CancellationToken) {
    let render = move || {
        let broker = Arc::clone(&broker);
        async move { render(&broker).await }
    };
    serve_http(listener, render, shutdown).await;
}

/// Serves `GET /metrics` over HTTP/1.1 on `listener` with the text that `render`
/// returns, until `shutdown` is cancelled. Then it closes idle connections and waits up
/// to a few seconds for scrapes in progress.
pub async fn serve_http<R, F>(listener: TcpListener, render: R, shutdown: CancellationToken)
where
    R: Fn() -> F + Clone + Send + Sync + 'static,
    F: Future<Output = String> + Send + 'static,
{
    let connections = TaskTracker::new();
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Such as too many open files: waiting lets the condition pass.
                    tracing::warn!(error = %err, "accepting a metrics connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            tracing::debug!(%peer, limit = MAX_CONNECTIONS, "metrics connection closed: too many open");
            continue;
        };
        let render = render.clone();
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let _permit = permit;
            let service = service_fn(move |request| respond(request, render.clone()));
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT);
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                () = shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(err) = result {
                tracing::debug!(%peer, error = %err, "metrics connection failed");
            }
        });
    }
    connections.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            grace_ms = SHUTDOWN_GRACE.as_millis() as u64,
            "metrics scrapes did not finish within the shutdown grace period"
        );
    }
    tracing::debug!("metrics server stopped");
}

/// Builds the response to one HTTP request: the metrics for `GET /metrics` (or `HEAD`),
/// 404 for another path and 405 for another method.
async fn respond<R, F>(
    request: Request<Incoming>,
    render: R,
) -> Result<Response<Full<Bytes>>, Infallible>
where
    R: Fn() -> F,
    F: Future<Output = String>,
{
    if request.uri().path() != "/metrics" {
        return Ok(plain(
            StatusCode::NOT_FOUND,
            "not found: metrics are served at /metrics\n",
        ));
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = plain(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed: use GET /metrics\n",
        );
        response
            .headers_mut()
            .insert(ALLOW, hyper::header::HeaderValue::from_static("GET, HEAD"));
        return Ok(response);
    }
    let body = render().await;
    let mut response = Response::new(Full::new(Bytes::from(body)));
    response.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(CONTENT_TYPE_OPENMETRICS),
    );
    Ok(response)
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_by_upper_bound() {
        let histogram = AtomicHistogram::new(&[1.0, 2.0]);
        for value in [0.5, 1.0, 1.5, 2.0, 7.0] {
            histogram.observe(value);
        }
        let cells = &histogram.inner;
        let counts: Vec<u64> = cells
            .buckets
            .iter()
            .map(|bucket| bucket.load(Ordering::Relaxed))
            .collect();
        assert_eq!(counts, vec![2, 2, 1]);
        assert_eq!(histogram.count_and_sum(), (5, 12.0));
    }

    #[test]
    fn histogram_encodes_cumulative_buckets() {
        let mut registry = Registry::default();
        let histogram = AtomicHistogram::new(&[1.0, 2.0]);
        registry.register_with_unit("wait", "help", Unit::Seconds, histogram.clone());
        histogram.observe(0.5);
        histogram.observe(3.0);
        let mut output = String::new();
        text::encode(&mut output, &registry).unwrap();
        assert!(
            output.contains("wait_seconds_bucket{le=\"1.0\"} 1\n"),
            "{output}"
        );
        assert!(
            output.contains("wait_seconds_bucket{le=\"2.0\"} 1\n"),
            "{output}"
        );
        assert!(
            output.contains("wait_seconds_bucket{le=\"+Inf\"} 2\n"),
            "{output}"
        );
        assert!(output.contains("wait_seconds_count 2\n"), "{output}");
        assert!(output.contains("wait_seconds_sum 3.5\n"), "{output}");
    }

    #[test]
    fn queue_handles_share_values() {
        let metrics = Arc::new(BrokerMetrics::new());
        let queue = QueueName::parse("queue", "emails").unwrap();
        let mut cache = QueueMetricsCache::new(Arc::clone(&metrics));
        cache.get(&queue).enqueued.inc_by(3);
        assert_eq!(metrics.queue(&queue).enqueued.get(), 3);

        let mut output = String::new();
        metrics.encode(&mut output);
        assert!(
            output.contains("docket_broker_tasks_enqueued_total{queue=\"emails\"} 3\n"),
            "{output}"
        );
        assert!(
            output.contains("docket_broker_build_info{version=\""),
            "{output}"
        );
    }

    #[test]
    fn negative_span_is_zero_seconds() {
        assert_eq!(micros_to_seconds(-5), 0.0);
        assert_eq!(micros_to_seconds(1_500_000), 1.5);
    }
}
