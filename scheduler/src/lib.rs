//! Docket's scheduler: holds tasks meant for the future and releases each into the broker
//! once when it falls due.
//!
//! A one-shot schedule releases one task at a due time. A recurring schedule releases a
//! copy of its task template at every fire time of a cron expression in an IANA time zone,
//! or of a fixed interval. Schedules live in the scheduler's own redb file.
//!
//! A loop sleeps until the earliest due time. It enqueues the due tasks into the broker
//! with an idempotency key made of the schedule id and the fire time, and then records
//! the firing. A crash between the two therefore cannot release a task twice.
//!
//! [`serve`] runs a scheduler until its shutdown token is cancelled. The
//! `docket-scheduler` binary is a thin wrapper around it that parses [`Config`] from flags
//! and environment.

#![forbid(unsafe_code)]

pub mod config;
pub mod error;
pub mod grpc;
pub mod metrics;
pub mod monitor;
pub mod release;
pub mod rule;
pub mod schedules;
pub mod security;
pub mod store;

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use docket_broker::task::Limits;
use docket_proto::v1::broker_client::BrokerClient;
use docket_proto::v1::scheduler_server::SchedulerServer;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::Endpoint;
use tonic::transport::server::TcpIncoming;

pub use crate::config::Config;
use crate::release::ReleaseConfig;
use crate::schedules::Schedules;
use crate::store::{Store, StoreOpenError, Writer};

/// Name under which the health service reports the scheduler.
pub const HEALTH_SERVICE_NAME: &str = "docket.v1.Scheduler";

/// Interval of HTTP/2 keepalive pings, on served connections and on the connection to the
/// broker, so that a dead peer is noticed.
const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);

/// Time to wait for a keepalive ping's acknowledgement before the connection is closed.
const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Time limit of connecting to the broker.
const BROKER_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Most write operations the store's writer commits in one transaction.
const MAX_COMMIT_BATCH: usize = 1024;

/// An error that stops the scheduler.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Opening the store failed.
    #[error(transparent)]
    Store(#[from] StoreOpenError),

    /// The broker URL is not valid.
    #[error("invalid broker URL {url:?}: {source}")]
    BrokerUrl {
        /// The URL from the configuration.
        url: String,
        /// The parse error.
        source: tonic::transport::Error,
    },

    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address from the configuration.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },

    /// A thread could not be started.
    #[error("cannot start the storage writer thread: {0}")]
    WriterThread(std::io::Error),

    /// The gRPC server failed.
    #[error("gRPC server failed: {}", docket_broker::tls::error_chain(.0))]
    Transport(#[from] tonic::transport::Error),

    /// A TLS or token file is invalid.
    #[error(transparent)]
    Security(#[from] docket_broker::tls::SecurityError),
}

/// Runs a scheduler with `config` until `shutdown` is cancelled.
///
/// Binds the listen address first and reports NOT_SERVING on the health service until the
/// store is open and the broker is reachable. On shutdown it reports NOT_SERVING, stops
/// accepting calls, lets a release in progress finish, and waits up to the configured
/// grace period for pending commits.
///
/// # Errors
///
/// Fails if the broker URL is invalid, the address cannot be bound, the store cannot be
/// opened, or the server fails.
pub async fn serve(config: Config, shutdown: CancellationToken) -> Result<(), ServeError> {
    let broker_endpoint = Endpoint::from_shared(config.broker.clone())
        .map_err(|source| ServeError::BrokerUrl {
            url: config.broker.clone(),
            source,
        })?
        .connect_timeout(BROKER_CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(HTTP2_KEEPALIVE_INTERVAL)
        .keep_alive_timeout(HTTP2_KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    let (broker_endpoint, broker_credentials) = config
        .security
        .broker_endpoint(&config.broker, broker_endpoint)?;
    let broker_channel = broker_endpoint.connect_lazy();
    let server_builder = docket_broker::tls::server_builder(&config.security.server_files())?;

    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: config.listen,
            source,
        })?;
    let local_addr = listener.local_addr().map_err(|source| ServeError::Bind {
        addr: config.listen,
        source,
    })?;
    let metrics_listener = docket_broker::metrics::bind(config.metrics_listen)
        .await
        .map_err(|err| ServeError::Bind {
            addr: err.addr,
            source: err.source,
        })?;
    let metrics = Arc::new(metrics::SchedulerMetrics::new());

    let (health, health_service) = docket_broker::health::health_service(HEALTH_SERVICE_NAME);
    let (reflection, reflection_alpha) =
        docket_broker::process::reflection_services(HEALTH_SERVICE_NAME);

    let ready = Arc::new(OnceLock::new());
    let service = SchedulerServer::new(grpc::SchedulerService::new(Arc::clone(&ready)))
        .max_decoding_message_size(config.max_message_bytes)
        .max_encoding_message_size(config.max_message_bytes);
    tracing::info!(addr = %local_addr, broker = %config.broker, "scheduler listening");
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let server = tokio::spawn(
        server_builder
            .http2_keepalive_interval(Some(HTTP2_KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(HTTP2_KEEPALIVE_TIMEOUT))
            .add_service(health_service)
            .add_service(reflection)
            .add_service(reflection_alpha)
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, shutdown.clone().cancelled_owned()),
    );

    let tasks = TaskTracker::new();

    let started = std::time::Instant::now();
    let data_dir = config.data_dir.clone();
    let path = config.database_path();
    let cache_bytes = config.cache_bytes;
    let opened = tokio::task::spawn_blocking(move || Store::open(&data_dir, &path, cache_bytes))
        .await
        .expect("opening the store does not panic");
    let store = match opened {
        Ok(store) => Arc::new(store),
        Err(err) => {
            shutdown.cancel();
            health.close();
            let _ = server.await;
            return Err(err.into());
        }
    };
    let (writer, writer_thread) =
        Writer::spawn(&store, MAX_COMMIT_BATCH).map_err(ServeError::WriterThread)?;
    let schedules = Arc::new(Schedules {
        store,
        writer,
        wake: Arc::new(Notify::new()),
        limits: Limits {
            max_payload_bytes: config.max_payload_bytes,
            max_result_bytes: 0,
            max_batch_size: 1,
            max_in_flight: 0,
            max_lease_duration: Duration::ZERO,
        },
        retention: i64::try_from(config.retention.as_nanos()).unwrap_or(i64::MAX),
    });
    let _ = ready.set(Arc::clone(&schedules));
    tracing::info!(
        path = %config.database_path().display(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "store open"
    );

    tasks.spawn(monitor::watch_broker(
        broker_channel.clone(),
        config.broker.clone(),
        health,
        shutdown.clone(),
    ));
    let release = tokio::spawn(release::run(
        Arc::clone(&schedules),
        BrokerClient::with_interceptor(broker_channel, broker_credentials)
            .max_decoding_message_size(config.max_message_bytes)
            .max_encoding_message_size(config.max_message_bytes),
        ReleaseConfig {
            misfire_threshold: i64::try_from(config.misfire_threshold.as_nanos())
                .unwrap_or(i64::MAX),
            batch: config.release_batch as usize,
            max_retry_delay: config.max_retry_delay,
            enqueue_timeout: config.enqueue_timeout,
            pause_after_enqueue: config.pause_after_enqueue,
            metrics: Arc::clone(&metrics),
        },
        shutdown.clone(),
    ));
    if let Some(listener) = metrics_listener {
        tasks.spawn(metrics::serve(listener, metrics, shutdown.clone()));
    }

    let served =
        docket_broker::process::drain_server(server, &shutdown, config.shutdown_grace).await;
    tracing::info!("scheduler stopping");
    shutdown.cancel();
    if tokio::time::timeout(config.shutdown_grace, release)
        .await
        .is_err()
    {
        tracing::warn!(
            grace_ms = config.shutdown_grace.as_millis() as u64,
            "the release in progress did not finish within the shutdown grace period; \
             it resumes at the next start"
        );
    }
    tasks.close();
    tasks.wait().await;
    drop(ready);
    drop(schedules);
    wait_for_writer(writer_thread, config.shutdown_grace).await;
    served?;
    tracing::info!("scheduler stopped");
    Ok(())
}

/// Waits for the writer thread to commit what it holds, for at most `grace`.
async fn wait_for_writer(thread: std::thread::JoinHandle<()>, grace: Duration) {
    let join = tokio::task::spawn_blocking(move || thread.join());
    if tokio::time::timeout(grace, join).await.is_err() {
        tracing::warn!(
            grace_ms = grace.as_millis() as u64,
            "storage writer did not finish within the shutdown grace period"
        );
    }
}
