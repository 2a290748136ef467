//! The shutdown signal of a worker process.

/// Completes when the process receives SIGTERM or SIGINT (Ctrl-C), or only Ctrl-C on
/// platforms without Unix signals. Pass it to [`Worker::run`](crate::Worker::run), so
/// that the worker shuts down gracefully when an orchestrator such as Kubernetes stops
/// the process:
///
/// ```no_run
/// # async fn example(worker: docket::Worker) -> Result<(), docket::Error> {
/// worker.run(docket::shutdown_signal()).await
/// # }
/// ```
///
/// If the handler of SIGTERM cannot be installed, only Ctrl-C completes it; if Ctrl-C
/// cannot be listened for either, it never completes. Both cases are logged as errors.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};

        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => tracing::info!("received Ctrl-C; shutting down"),
                    _ = terminate.recv() => tracing::info!("received SIGTERM; shutting down"),
                }
                return;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM; only Ctrl-C stops the worker");
            }
        }
    }
    match tokio::signal::ctrl_c().await {
        Ok(()) => tracing::info!("received Ctrl-C; shutting down"),
        Err(error) => {
            tracing::error!(%error, "cannot listen for Ctrl-C; no signal stops the worker");
            std::future::pending::<()>().await;
        }
    }
}
