//! Docket's broker: a durable task queue served over gRPC and stored in redb.
//!
//! [`serve`] runs a broker until its shutdown token is cancelled. The `docket-broker`
//! binary is a thin wrapper around it that parses [`Config`] from flags and environment.

#![forbid(unsafe_code)]

pub mod auth;
pub mod broker;
pub mod config;
pub mod dispatch;
pub mod error;
pub mod grpc;
pub mod health;
pub mod metrics;
pub mod process;
pub mod retry;
pub mod settings;
pub mod store;
pub mod task;
pub mod tls;

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use docket_proto::v1::broker_server::BrokerServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;

pub use crate::config::Config;
use crate::dispatch::Dispatcher;
use crate::error::StoreError;
use crate::health::HealthStatus;
use crate::retry::RetryPolicy;
use crate::settings::{Defaults, SettingsCache};
use crate::store::Store;
use crate::task::Limits;

/// Interval of HTTP/2 keepalive pings on every connection, so that proxies keep idle
/// streams open and a dead peer is noticed.
const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);

/// Time to wait for a keepalive ping's acknowledgement before the connection is closed.
const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Name under which the health service reports the broker.
pub const HEALTH_SERVICE_NAME: &str = "docket.v1.Broker";

/// An error that stops the broker.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Opening or recovering the store failed.
    #[error(transparent)]
    Store(#[from] StoreError),

    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address from the configuration.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },

    /// The storage writer thread could not be started.
    #[error("cannot start the storage writer thread: {0}")]
    WriterThread(std::io::Error),

    /// The gRPC server failed.
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),

    /// A TLS or token file is invalid.
    #[error(transparent)]
    Security(#[from] tls::SecurityError),
}

/// Runs a broker with `config` until `shutdown` is cancelled.
///
/// Binds the listen address first and serves health checking and server reflection at
/// once, reporting NOT_SERVING, while it recovers the store; Broker calls meanwhile fail
/// with `UNAVAILABLE`. Then it reports SERVING, and NOT_SERVING again while commits fail
/// and from the first moment of shutdown. On shutdown it ends every Subscribe stream with
/// `UNAVAILABLE` and waits up to the configured grace period for pending commits.
///
/// # Errors
///
/// Fails if the address cannot be bound, the store cannot be opened or recovered, or the
/// server fails.
pub async fn serve(config: Config, shutdown: CancellationToken) -> Result<(), ServeError> {
    let server_builder = tls::server_builder(&config.security.files())?;
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
    let metrics_listener =
        metrics::bind(config.metrics_listen)
            .await
            .map_err(|err| ServeError::Bind {
                addr: err.addr,
                source: err.source,
            })?;

    let (health, health_service) = health::health_service(HEALTH_SERVICE_NAME);
    let (reflection, reflection_alpha) = process::reflection_services(HEALTH_SERVICE_NAME);
    let ready = Arc::new(OnceLock::new());
    tracing::info!(addr = %local_addr, "broker listening");
    // `Server::tcp_nodelay` applies only to listeners that tonic binds itself, so the
    // incoming stream sets it. Without it, Nagle's algorithm delays small responses.
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let server = tokio::spawn(
        server_builder
            .http2_keepalive_interval(Some(HTTP2_KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(HTTP2_KEEPALIVE_TIMEOUT))
            .add_service(health_service)
            .add_service(reflection)
            .add_service(reflection_alpha)
            .add_service(grpc::WhenReady::new(Arc::clone(&ready)))
            .serve_with_incoming_shutdown(incoming, shutdown.clone().cancelled_owned()),
    );

    let started = std::time::Instant::now();
    let recovered = tokio::select! {
        recovered = recover(&config) => recovered,
        () = shutdown.cancelled() => {
            health.close();
            process::drain_server(server, &shutdown, config.shutdown_grace).await?;
            tracing::info!("broker stopped before its store was ready");
            return Ok(());
        }
    };
    let (store, recovered) = match recovered {
        Ok(recovered) => recovered,
        Err(err) => {
            shutdown.cancel();
            health.close();
            let _ = process::drain_server(server, &shutdown, config.shutdown_grace).await;
            return Err(err.into());
        }
    };
    let store = Arc::new(store);
    tracing::info!(
        path = %config.database_path().display(),
        deliverable = recovered.deliverable,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "store recovered"
    );

    let settings = SettingsCache::new(defaults(&config), recovered.settings);
    let dispatcher = Arc::new(Dispatcher::new(config.dispatch_window, {
        let settings = settings.clone();
        move |queue| settings.get(queue).lease_duration
    }));
    dispatcher.apply(recovered.effects);
    let (writer, writer_thread) = store::writer::spawn(
        Arc::clone(&store),
        Arc::clone(&dispatcher),
        settings.clone(),
        recovered.next_sequence,
        config.write_queue_capacity,
        config.max_commit_batch,
    )
    .map_err(ServeError::WriterThread)?;
    dispatcher.connect_writer(&writer);

    let limits = Limits {
        max_payload_bytes: config.max_payload_bytes,
        max_result_bytes: config.max_result_bytes,
        max_batch_size: config.max_batch_size,
        max_in_flight: config.max_in_flight,
        max_lease_duration: config.max_lease_duration,
    };
    let broker = Arc::new(broker::Broker::new(
        Arc::clone(&dispatcher),
        writer.clone(),
        store,
        settings,
        limits,
        config.heartbeat_interval,
        shutdown.clone(),
    ));

    let tasks = TaskTracker::new();
    tasks.spawn(dispatch::timers::run_leases_and_retries(
        dispatcher,
        writer.clone(),
        shutdown.clone(),
    ));
    tasks.spawn(dispatch::timers::run_purge(
        writer.clone(),
        config.purge_interval,
        shutdown.clone(),
    ));
    if let Some(listener) = metrics_listener {
        tasks.spawn(metrics::serve(
            listener,
            Arc::clone(&broker),
            shutdown.clone(),
        ));
    }
    let service = BrokerServer::new(grpc::BrokerService::new(Arc::clone(&broker)))
        .max_decoding_message_size(config.max_message_bytes)
        .max_encoding_message_size(config.max_message_bytes);
    // `set` fails only if the cell is full, and only this line fills it.
    let _ = ready.set(service);
    // SERVING follows only once calls go through.
    tasks.spawn(report_health(health, writer.committing(), shutdown.clone()));
    drop(writer);

    let served = process::drain_server(server, &shutdown, config.shutdown_grace).await;
    tracing::info!("broker stopping");
    shutdown.cancel();
    tasks.close();
    tasks.wait().await;
    drop(ready);
    drop(broker);
    wait_for_writer(writer_thread, config.shutdown_grace).await;
    served?;
    tracing::info!("broker stopped");
    Ok(())
}

/// Opens and recovers the store, after the test hook's file is gone if one is set.
async fn recover(config: &Config) -> Result<(Store, store::Recovered), StoreError> {
    if let Some(path) = &config.hold_recovery_while_exists {
        tracing::info!(path = %path.display(), "test hook: recovery waits while this file exists");
        while path.exists() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let data_dir = config.data_dir.clone();
    let path = config.database_path();
    let recovery_defaults = defaults(config);
    let window = config.dispatch_window.max(2);
    let cache_bytes = config.cache_bytes;
    let fault_file = config.fail_commits_while_exists.clone();
    tokio::task::spawn_blocking(move || {
        let mut store = Store::open(&data_dir, &path, cache_bytes)?;
        if let Some(fault_file) = fault_file {
            store.fail_commits_while_exists(fault_file);
        }
        let recovered = store.recover(&recovery_defaults, window)?;
        Ok::<_, StoreError>((store, recovered))
    })
    .await
    .map_err(|_| StoreError::WriterStopped)?
}

/// Returns the defaults of queues without their own settings.
fn defaults(config: &Config) -> Defaults {
    Defaults {
        max_attempts: config.default_max_attempts,
        retry_policy: RetryPolicy {
            initial_backoff: config.retry_initial_backoff,
            multiplier: config.retry_multiplier,
            max_backoff: config.retry_max_backoff,
            jitter: config.retry_jitter,
        },
        lease_duration: config.lease_duration,
        retention: config.retention,
        dead_retention: config.dead_retention,
        idempotency_window: config.idempotency_window,
    }
}

/// Reports SERVING while commits succeed and NOT_SERVING while they fail, until shutdown
/// begins, which reports NOT_SERVING for good.
async fn report_health(
    health: HealthStatus,
    mut committing: watch::Receiver<bool>,
    shutdown: CancellationToken,
) {
    loop {
        let status = if *committing.borrow_and_update() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        if status != health.get() {
            tracing::info!(%status, "health changed");
        }
        health.set(status);
        tokio::select! {
            () = shutdown.cancelled() => break,
            changed = committing.changed() => if changed.is_err() {
                // The writer stopped, so nothing more can be stored.
                break;
            },
        }
    }
    health.close();
}

/// Waits for the writer thread to commit what it holds, for at most `grace`.
async fn wait_for_writer(thread: std::thread::JoinHandle<()>, grace: Duration) {
    let join = tokio::task::spawn_blocking(move || thread.join());
    match tokio::time::timeout(grace, join).await {
        Ok(_) => {}
        Err(_) => tracing::warn!(
            grace_ms = grace.as_millis() as u64,
            "storage writer did not finish within the shutdown grace period"
        ),
    }
}
