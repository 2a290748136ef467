//! `docket dev`: a broker and a scheduler in one process, sharing one data folder and one
//! shutdown token, for development.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Endpoint;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::args::DevArgs;

/// Interval between two health checks while the services start.
const READY_POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Time that the second service gets to stop after the first one stopped. It exceeds the
/// default shutdown grace periods: 10 s for the broker, and up to 10 s for a release in
/// progress plus 10 s for pending commits in the scheduler.
const STOP_DEADLINE: Duration = Duration::from_secs(30);

/// Runs the broker and the scheduler until SIGTERM or Ctrl-C. Returns 0 after a clean
/// stop and 1 if either service fails, with the error on stderr.
pub fn run(args: DevArgs) -> ExitCode {
    docket_broker::process::init_tracing();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("docket dev: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let exit_code = runtime.block_on(serve(args));
    // A service that missed the stop deadline may still run tasks, which are dropped here.
    runtime.shutdown_background();
    exit_code
}

async fn serve(args: DevArgs) -> ExitCode {
    // The scheduler needs the broker's address before either service has bound, so a
    // port 0 is replaced by a free port here.
    let (broker_addr, scheduler_addr) = match (
        pick_port(args.broker_listen),
        pick_port(args.scheduler_listen),
    ) {
        (Ok(broker), Ok(scheduler)) => (broker, scheduler),
        (Err(err), _) | (_, Err(err)) => {
            eprintln!("docket dev: {err}");
            return ExitCode::FAILURE;
        }
    };
    let broker_url = format!("http://{broker_addr}");
    let scheduler_url = format!("http://{scheduler_addr}");

    let shutdown = CancellationToken::new();
    tokio::spawn(docket_broker::process::cancel_on_signal(shutdown.clone()));

    let broker_config = docket_broker::Config::new(broker_addr, &args.data_dir);
    let scheduler_config =
        docket_scheduler::Config::new(scheduler_addr, &args.data_dir, broker_url.clone());
    let broker = tokio::spawn(docket_broker::serve(broker_config, shutdown.clone()));
    let scheduler = tokio::spawn(docket_scheduler::serve(scheduler_config, shutdown.clone()));

    let announcement = tokio::spawn({
        let shutdown = shutdown.clone();
        let data_dir = args.data_dir.display().to_string();
        async move {
            let both_ready = async {
                wait_until_serving(&broker_url, docket_broker::HEALTH_SERVICE_NAME).await;
                wait_until_serving(&scheduler_url, docket_scheduler::HEALTH_SERVICE_NAME).await;
            };
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = both_ready => println!(
                    "broker {broker_url}, scheduler {scheduler_url}, data in {data_dir}; \
                     press Ctrl-C to stop"
                ),
            }
        }
    });

    let failures = wait_for_both(broker, scheduler, &shutdown).await;
    announcement.abort();
    if failures.is_empty() {
        return ExitCode::SUCCESS;
    }
    for failure in failures {
        eprintln!("docket dev: {failure}");
    }
    ExitCode::FAILURE
}

/// Waits until both services have stopped, cancelling `shutdown` as soon as either one
/// stops, and returns the errors of those that failed.
async fn wait_for_both<BrokerError, SchedulerError>(
    mut broker: JoinHandle<Result<(), BrokerError>>,
    mut scheduler: JoinHandle<Result<(), SchedulerError>>,
    shutdown: &CancellationToken,
) -> Vec<String>
where
    BrokerError: std::fmt::Display,
    SchedulerError: std::fmt::Display,
{
    let mut failures = Vec::new();
    let mut broker_running = true;
    let mut scheduler_running = true;
    let mut deadline = None;
    while broker_running || scheduler_running {
        let stop_deadline = async {
            match deadline {
                Some(deadline) => tokio::time::sleep_until(deadline).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = stop_deadline => {
                let service = if broker_running { "broker" } else { "scheduler" };
                let failure = format!(
                    "{service} did not stop within {}s of the other service",
                    STOP_DEADLINE.as_secs()
                );
                tracing::error!(error = %failure, "giving up on a clean stop");
                failures.push(failure);
                break;
            }
            result = &mut broker, if broker_running => {
                broker_running = false;
                if let Some(failure) = failure("broker", result) {
                    tracing::error!(error = %failure, "broker failed; stopping the scheduler");
                    failures.push(failure);
                }
            }
            result = &mut scheduler, if scheduler_running => {
                scheduler_running = false;
                if let Some(failure) = failure("scheduler", result) {
                    tracing::error!(error = %failure, "scheduler failed; stopping the broker");
                    failures.push(failure);
                }
            }
        }
        shutdown.cancel();
        deadline.get_or_insert_with(|| tokio::time::Instant::now() + STOP_DEADLINE);
    }
    failures
}

/// Describes how a service task ended, or returns `None` if it stopped cleanly.
fn failure<E: std::fmt::Display>(
    service: &str,
    result: Result<Result<(), E>, tokio::task::JoinError>,
) -> Option<String> {
    match result {
        Ok(Ok(())) => None,
        Ok(Err(err)) => Some(format!("{service} failed: {err}")),
        Err(err) => Some(format!("{service} task failed: {err}")),
    }
}

/// Returns `addr`, or, if its port is 0, `addr` with a port that is free now.
///
/// NOTE: the port is found by binding and releasing it, so another process may take it
/// before the service binds it. The service then fails with "address in use".
fn pick_port(addr: SocketAddr) -> Result<SocketAddr, String> {
    if addr.port() != 0 {
        return Ok(addr);
    }
    let listener = std::net::TcpListener::bind(addr)
        .map_err(|err| format!("cannot find a free port on {}: {err}", addr.ip()))?;
    listener
        .local_addr()
        .map_err(|err| format!("cannot find a free port on {}: {err}", addr.ip()))
}

/// Polls the health service at `url` until it reports `service` as SERVING.
async fn wait_until_serving(url: &str, service: &str) {
    loop {
        if is_serving(url, service).await {
            return;
        }
        tokio::time::sleep(READY_POLL_INTERVAL).await;
    }
}

async fn is_serving(url: &str, service: &str) -> bool {
    let Ok(endpoint) = Endpoint::from_shared(url.to_owned()) else {
        return false;
    };
    let Ok(channel) = endpoint
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(1))
        .connect()
        .await
    else {
        return false;
    };
    let request = HealthCheckRequest {
        service: service.to_owned(),
    };
    match HealthClient::new(channel).check(request).await {
        Ok(response) => response.into_inner().status() == ServingStatus::Serving,
        Err(_) => false,
    }
}
