//! Watches the broker's health and reports the scheduler as NOT_SERVING while the broker
//! cannot be reached.

use std::time::Duration;

use docket_broker::health::HealthStatus;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic_health::ServingStatus;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus as WireStatus;
use tonic_health::pb::health_client::HealthClient;

/// Service name under which the broker reports its health.
const BROKER_SERVICE_NAME: &str = "docket.v1.Broker";

/// First delay before the watch is opened again after it failed.
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(200);

/// Maximum delay before the watch is opened again.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(2);

/// Watches the broker's health service on `channel` until `shutdown` is cancelled, and
/// sets the scheduler's health to match: SERVING while the broker reports SERVING,
/// NOT_SERVING otherwise. From the moment `shutdown` is cancelled the scheduler reports
/// NOT_SERVING for good.
pub async fn watch_broker(
    channel: Channel,
    broker: String,
    health: HealthStatus,
    shutdown: CancellationToken,
) {
    follow_broker(channel, &broker, &health, &shutdown).await;
    health.close();
}

async fn follow_broker(
    channel: Channel,
    broker: &str,
    health: &HealthStatus,
    shutdown: &CancellationToken,
) {
    let mut reachable = None;
    let mut delay = FIRST_RETRY_DELAY;
    while !shutdown.is_cancelled() {
        let mut client = HealthClient::new(channel.clone());
        let request = HealthCheckRequest {
            service: BROKER_SERVICE_NAME.to_string(),
        };
        // A peer that accepts the connection but never responds must not hold up shutdown.
        let watch = tokio::select! {
            watch = client.watch(request) => watch,
            () = shutdown.cancelled() => return,
        };
        let error = match watch {
            Ok(response) => {
                let mut stream = response.into_inner();
                loop {
                    let message = tokio::select! {
                        message = stream.next() => message,
                        () = shutdown.cancelled() => return,
                    };
                    match message {
                        Some(Ok(message)) => {
                            delay = FIRST_RETRY_DELAY;
                            let serving = message.status() == WireStatus::Serving;
                            let reason = format!("the broker reports {:?}", message.status());
                            if shutdown.is_cancelled() {
                                return;
                            }
                            report(health, &mut reachable, serving, broker, &reason);
                        }
                        Some(Err(status)) => break status.message().to_string(),
                        None => break "the broker ended the health watch".to_string(),
                    }
                }
            }
            Err(status) => format!("{:?}: {}", status.code(), status.message()),
        };
        report(health, &mut reachable, false, broker, &error);
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shutdown.cancelled() => return,
        }
        delay = (delay * 2).min(MAX_RETRY_DELAY);
    }
}

/// Sets the scheduler's health, and logs each change of the broker's reachability.
fn report(
    health: &HealthStatus,
    reachable: &mut Option<bool>,
    serving: bool,
    broker: &str,
    reason: &str,
) {
    if *reachable == Some(serving) {
        return;
    }
    let previous = reachable.replace(serving);
    let status = if serving {
        tracing::info!(broker, "the broker is reachable; scheduler serving");
        ServingStatus::Serving
    } else if previous.is_none() {
        // At start-up the broker is often still starting too.
        tracing::info!(
            broker,
            reason,
            "waiting for the broker; scheduler not serving yet"
        );
        ServingStatus::NotServing
    } else {
        tracing::warn!(
            broker,
            reason,
            "the broker cannot be reached; scheduler not serving"
        );
        ServingStatus::NotServing
    };
    health.set(status);
}
