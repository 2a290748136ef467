//! Prometheus metrics of the scheduler: firings released and failed by schedule kind,
//! the lag from fire time to enqueue, and Enqueue retries while the broker cannot be
//! reached. The HTTP server is the broker's, in [`docket_broker::metrics`].

use std::sync::Arc;

use docket_broker::metrics::AtomicHistogram;
use prometheus_client::encoding::text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Upper bounds, in seconds, of the release lag histogram. A firing is normally released
/// within milliseconds of its fire time. Lags of minutes or hours come from downtime of
/// the scheduler or the broker.
const LAG_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];

/// Label set of per-kind metrics: `kind`, `one_shot` or `recurring`.
type KindLabels = [(&'static str, &'static str); 1];

/// Handles of the metrics of one schedule kind.
#[derive(Clone, Debug)]
pub struct KindMetrics {
    /// Firings whose task the broker stored.
    pub released: Counter,
    /// Firings whose task the broker rejected.
    pub failed: Counter,
    /// Seconds from fire time to the enqueue's response.
    pub release_lag: AtomicHistogram,
}

/// The scheduler's counters and histograms.
#[derive(Debug)]
pub struct SchedulerMetrics {
    registry: Registry,
    one_shot: KindMetrics,
    recurring: KindMetrics,
    /// Enqueue calls repeated because the broker could not be reached, was starting or
    /// stopping, or timed out.
    pub enqueue_retries: Counter,
}

impl Default for SchedulerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl SchedulerMetrics {
    /// Creates the metrics, all zero, registered under the `docket_scheduler_` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("docket_scheduler");
        registry.register(
            "build",
            "Version of the running scheduler; the value is always 1",
            Info::new([("version", env!("CARGO_PKG_VERSION"))]),
        );
        let released = Family::<KindLabels, Counter>::default();
        registry.register(
            "firings_released",
            "Firings whose task the broker stored, by schedule kind",
            released.clone(),
        );
        let failed = Family::<KindLabels, Counter>::default();
        registry.register(
            "firings_failed",
            "Firings whose task the broker rejected, by schedule kind",
            failed.clone(),
        );
        let lag: Family<KindLabels, AtomicHistogram, fn() -> AtomicHistogram> =
            Family::new_with_constructor(lag_histogram);
        registry.register_with_unit(
            "release_lag",
            "Time from a firing's fire time to the broker's response to its enqueue, by schedule kind",
            Unit::Seconds,
            lag.clone(),
        );
        let enqueue_retries = Counter::default();
        registry.register(
            "enqueue_retries",
            "Enqueue calls that failed because the broker could not be reached or did not answer in time; each is retried",
            enqueue_retries.clone(),
        );

        let kind = |name: &'static str| {
            let labels = [("kind", name)];
            KindMetrics {
                released: released.get_or_create_owned(&labels),
                failed: failed.get_or_create_owned(&labels),
                release_lag: lag.get_or_create_owned(&labels),
            }
        };
        SchedulerMetrics {
            one_shot: kind("one_shot"),
            recurring: kind("recurring"),
            registry,
            enqueue_retries,
        }
    }

    /// Returns the handles of one schedule kind's metrics.
    pub fn kind(&self, recurring: bool) -> &KindMetrics {
        if recurring {
            &self.recurring
        } else {
            &self.one_shot
        }
    }

    /// Renders every metric in the OpenMetrics text format.
    pub fn render(&self) -> String {
        let mut output = String::new();
        // Writing to a String cannot fail, so an error here is a bug in a metric.
        if let Err(error) = text::encode(&mut output, &self.registry) {
            tracing::error!(%error, "encoding the scheduler's metrics failed");
        }
        output
    }
}

fn lag_histogram() -> AtomicHistogram {
    AtomicHistogram::new(LAG_BUCKETS)
}

/// Serves the scheduler's metrics on `listener` until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<SchedulerMetrics>,
    shutdown: CancellationToken,
) {
    let render = move || {
        let metrics = Arc::clone(&metrics);
        async move { metrics.render() }
    };
    docket_broker::metrics::serve_http(listener, render, shutdown).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_kind_at_zero() {
        let metrics = SchedulerMetrics::new();
        metrics.kind(true).released.inc();
        let output = metrics.render();
        for line in [
            "docket_scheduler_firings_released_total{kind=\"recurring\"} 1\n",
            "docket_scheduler_firings_released_total{kind=\"one_shot\"} 0\n",
            "docket_scheduler_firings_failed_total{kind=\"one_shot\"} 0\n",
            "docket_scheduler_enqueue_retries_total 0\n",
            "docket_scheduler_release_lag_seconds_count{kind=\"recurring\"} 0\n",
        ] {
            assert!(output.contains(line), "missing {line:?} in:\n{output}");
        }
        assert!(output.ends_with("# EOF\n"), "{output}");
    }
}
