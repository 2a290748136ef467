//! Set-up that Docket's service binaries share: logging, shutdown signals, and server
//! reflection.

use std::io::IsTerminal;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic_reflection::server::v1::{ServerReflection, ServerReflectionServer};
use tonic_reflection::server::v1alpha::{
    ServerReflection as AlphaServerReflection,
    ServerReflectionServer as AlphaServerReflectionServer,
};
use tracing_subscriber::EnvFilter;

/// Sets up logging to stderr, with the filter from `DOCKET_LOG` (default `info`) and
/// colours only on a terminal.
pub fn init_tracing() {
    let filter = EnvFilter::try_from_env("DOCKET_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

/// Cancels `shutdown` on the first SIGTERM or SIGINT.
pub async fn cancel_on_signal(shutdown: CancellationToken) {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
    tracing::info!("shutdown signal received");
    shutdown.cancel();
}

/// Builds the gRPC server reflection services, v1 and v1alpha, of a server that serves
/// `service` beside health checking and reflection. They describe every message of
/// Docket's contract and advertise only the services this server provides.
pub fn reflection_services(
    service: &str,
) -> (
    ServerReflectionServer<impl ServerReflection>,
    AlphaServerReflectionServer<impl AlphaServerReflection>,
) {
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(docket_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name(service)
            .with_service_name(HEALTH_SERVICE)
    };
    let v1 = builder()
        .with_service_name(REFLECTION_SERVICE)
        .build_v1()
        .expect("the compiled descriptor sets are valid");
    let v1alpha = builder()
        .with_service_name(ALPHA_REFLECTION_SERVICE)
        .build_v1alpha()
        .expect("the compiled descriptor sets are valid");
    (v1, v1alpha)
}

/// Name of the gRPC health service.
const HEALTH_SERVICE: &str = "grpc.health.v1.Health";

/// Name of the gRPC server reflection service, version 1.
const REFLECTION_SERVICE: &str = "grpc.reflection.v1.ServerReflection";

/// Name of the gRPC server reflection service, version 1alpha.
const ALPHA_REFLECTION_SERVICE: &str = "grpc.reflection.v1alpha.ServerReflection";

/// Waits for the gRPC server to finish its graceful shutdown once `shutdown` is
/// cancelled, for at most `grace` from then, and stops it after that, so that calls that
/// never end cannot hold up the exit.
pub async fn drain_server(
    mut server: JoinHandle<Result<(), tonic::transport::Error>>,
    shutdown: &CancellationToken,
    grace: Duration,
) -> Result<(), tonic::transport::Error> {
    let joined = tokio::select! {
        joined = &mut server => joined,
        () = async {
            shutdown.cancelled().await;
            tokio::time::sleep(grace).await;
        } => {
            tracing::warn!(
                grace_ms = grace.as_millis() as u64,
                "open calls did not finish within the shutdown grace period; closing them"
            );
            server.abort();
            return Ok(());
        }
    };
    match joined {
        Ok(served) => served,
        Err(join_error) if join_error.is_panic() => {
            std::panic::resume_unwind(join_error.into_panic())
        }
        Err(_) => Ok(()),
    }
}
