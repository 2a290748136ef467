//! Connections to the broker and the scheduler for client commands, with the TLS and
//! bearer-token flags that every client command shares.

use std::path::{Path, PathBuf};
use std::time::Duration;

use docket::proto::broker_client::BrokerClient;
use docket::proto::scheduler_client::SchedulerClient;
use docket::{CallCredentials, GrpcChannel};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

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
    pub connection: ConnectionArgs,
}

/// TLS and bearer-token flags, used for the broker and the scheduler alike.
#[derive(Debug, Clone, clap::Args)]
pub struct ConnectionArgs {
    /// Bearer token sent as `authorization: Bearer TOKEN` on every call. Prefer
    /// --token-file, because other users can see command lines.
    #[arg(
        long,
        global = true,
        env = "DOCKET_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true,
        conflicts_with = "token_file"
    )]
    pub token: Option<String>,

    /// File that contains the bearer token; surrounding whitespace is ignored.
    #[arg(long, global = true, env = "DOCKET_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,

    /// PEM CA certificates that the server certificates of https:// URLs must chain to.
    /// Without it, the system's root certificates are used.
    #[arg(long, global = true, env = "DOCKET_CA_CERT", value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,

    /// PEM client certificate for servers that require one (mutual TLS). Needs
    /// --client-key.
    #[arg(
        long,
        global = true,
        env = "DOCKET_CLIENT_CERT",
        value_name = "FILE",
        requires = "client_key"
    )]
    pub client_cert: Option<PathBuf>,

    /// PEM private key of --client-cert.
    #[arg(
        long,
        global = true,
        env = "DOCKET_CLIENT_KEY",
        value_name = "FILE",
        requires = "client_cert"
    )]
    pub client_key: Option<PathBuf>,
}

impl ConnectionArgs {
    /// Reads the token, if one is set, and returns the credentials to send.
    fn credentials(&self) -> Result<CallCredentials, CliError> {
        let token = match (&self.token, &self.token_file) {
            (Some(token), _) => token.clone(),
            (None, Some(path)) => read_text("--token-file", path)?,
            (None, None) => return Ok(CallCredentials::default()),
        };
        CallCredentials::bearer(&token).map_err(|err| CliError::Usage(err.to_string()))
    }

    /// Applies the TLS flags to `endpoint` of `service` at `url`.
    fn apply_tls(
        &self,
        service: Service,
        url: &str,
        endpoint: Endpoint,
    ) -> Result<Endpoint, CliError> {
        if endpoint.uri().scheme_str() != Some("https") {
            if self.ca_cert.is_some() || self.client_cert.is_some() {
                return Err(CliError::Usage(format!(
                    "--ca-cert and --client-cert need an https:// {service} URL, not {url:?}"
                )));
            }
            return Ok(endpoint);
        }
        let mut tls = ClientTlsConfig::new();
        tls = match &self.ca_cert {
            Some(path) => tls.ca_certificate(Certificate::from_pem(read("--ca-cert", path)?)),
            None => tls.with_native_roots(),
        };
        if let (Some(cert), Some(key)) = (&self.client_cert, &self.client_key) {
            tls = tls.identity(Identity::from_pem(
                read("--client-cert", cert)?,
                read("--client-key", key)?,
            ));
        }
        endpoint.tls_config(tls).map_err(|err| {
            CliError::Usage(format!(
                "invalid TLS settings for the {service} at {url}: {}",
                error_chain(&err)
            ))
        })
    }
}

fn read(flag: &str, path: &Path) -> Result<Vec<u8>, CliError> {
    std::fs::read(path)
        .map_err(|err| CliError::Usage(format!("cannot read {flag} {}: {err}", path.display())))
}

fn read_text(flag: &str, path: &Path) -> Result<String, CliError> {
    std::fs::read_to_string(path)
        .map_err(|err| CliError::Usage(format!("cannot read {flag} {}: {err}", path.display())))
}

impl Context {
    /// Connects to the broker and waits until the connection is established.
    pub async fn broker(&self) -> Result<BrokerClient<GrpcChannel>, CliError> {
        let channel = connect(Service::Broker, &self.broker_url, &self.connection).await?;
        Ok(BrokerClient::new(
            self.connection.credentials()?.wrap(channel),
        ))
    }

    /// Connects to the scheduler and waits until the connection is established.
    pub async fn scheduler(&self) -> Result<SchedulerClient<GrpcChannel>, CliError> {
        let channel = connect(Service::Scheduler, &self.scheduler_url, &self.connection).await?;
        Ok(SchedulerClient::new(
            self.connection.credentials()?.wrap(channel),
        ))
    }

    /// Connects to the broker and returns an SDK client over that connection.
    pub async fn sdk_client(&self) -> Result<docket::Client, CliError> {
        let channel = connect(Service::Broker, &self.broker_url, &self.connection).await?;
        Ok(docket::Client::from_channel_with_credentials(
            channel,
            self.connection.credentials()?,
        ))
    }

    /// Connects to the broker for a call that may last as long as the task it follows,
    /// so without the per-call time limit.
    pub async fn watch_client(&self) -> Result<docket::Client, CliError> {
        let channel =
            connect_with(Service::Broker, &self.broker_url, &self.connection, None).await?;
        Ok(docket::Client::from_channel_with_credentials(
            channel,
            self.connection.credentials()?,
        ))
    }
}

/// Connects to `service` at `url`. A bare `host:port` means plain-text HTTP/2, as in the
/// SDK, and an `https://` URL means TLS.
async fn connect(
    service: Service,
    url: &str,
    connection: &ConnectionArgs,
) -> Result<Channel, CliError> {
    connect_with(service, url, connection, Some(REQUEST_TIMEOUT)).await
}

/// Connects to `service` at `url`, limiting each call to `request_timeout` if given.
async fn connect_with(
    service: Service,
    url: &str,
    connection: &ConnectionArgs,
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
    let mut endpoint = connection.apply_tls(service, url, endpoint)?;
    endpoint = endpoint.connect_timeout(CONNECT_TIMEOUT);
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
