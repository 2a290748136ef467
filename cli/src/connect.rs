//! Connections to the broker and the scheduler for client commands.

use std::time::Duration;

use docket::proto::broker_client::BrokerClient;
use docket::proto::scheduler_client::SchedulerClient;
use tonic::transport::{Channel, Endpoint};

use crate::error::{CliError, Service};

/// Time allowed to establish the TCP connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Time allowed for one call, after which the call fails with an error status.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The flags that every client command shares.
#[derive(Debug, Clone)]
pub struct Context {
    pub broker_url: String,
    pub scheduler_url: String,
    pub json: bool,
}

impl Context {
    /// Connects to the broker and waits until the connection is established.
    pub async fn broker(&self) -> Result<BrokerClient<Channel>, CliError> {
        let channel = connect(Service::Broker, &self.broker_url).await?;
        Ok(BrokerClient::new(channel))
    }

    /// Connects to the scheduler and waits until the connection is established.
    pub async fn scheduler(&self) -> Result<SchedulerClient<Channel>, CliError> {
        let channel = connect(Service::Scheduler, &self.scheduler_url).await?;
        Ok(SchedulerClient::new(channel))
    }

    /// Connects to the broker and returns an SDK client over that connection.
    pub async fn sdk_client(&self) -> Result<docket::Client, CliError> {
        let channel = connect(Service::Broker, &self.broker_url).await?;
        Ok(docket::Client::from_channel(channel))
    }

    /// Connects to the broker for a call that may last as long as the task it follows,
    /// so without the per-call time limit.
    pub async fn watch_client(&self) -> Result<docket::Client, CliError> {
        let channel = connect_with(Service::Broker, &self.broker_url, None).await?;
        Ok(docket::Client::from_channel(channel))
    }
}

/// Connects to `service` at `url`. A bare `host:port` means plain-text HTTP/2, as in the
/// SDK.
async fn connect(service: Service, url: &str) -> Result<Channel, CliError> {
    connect_with(service, url, Some(REQUEST_TIMEOUT)).await
}

/// Connects to `service` at `url`, limiting each call to `request_timeout` if given.
async fn connect_with(
    service: Service,
    url: &str,
    request_timeout: Option<Duration>,
) -> Result<Channel, CliError> {
    let full_url = if url.contains("://") {
        url.to_owned()
    } else {
        format!("http://{url}")
    };
    let endpoint = Endpoint::from_shared(full_url).map_err(|err| {
        CliError::Usage(format!(
            "invalid {service} URL {url:?}: {err}; expected a URL such as http://127.0.0.1:7070"
        ))
    })?;
    let mut endpoint = endpoint.connect_timeout(CONNECT_TIMEOUT);
    if let Some(timeout) = request_timeout {
        endpoint = endpoint.timeout(timeout);
    }
    endpoint.connect().await.map_err(|err| CliError::Connect {
        service,
        url: url.to_owned(),
        detail: error_chain(&err),
    })
}

/// Joins an error and its sources with `: `, because a transport error's own message,
/// `transport error`, hides the cause. A source whose message repeats the previous one,
/// as nested connector errors do, is left out.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut previous = text.clone();
    let mut source = error.source();
    while let Some(cause) = source {
        let message = cause.to_string();
        if message != previous {
            text.push_str(": ");
            text.push_str(&message);
        }
        previous = message;
        source = cause.source();
    }
    text
}
