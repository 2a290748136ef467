//! Connection settings of a [`Client`]: TLS, client certificates, and the bearer token
//! that goes with every call.

use std::fmt;
use std::time::Duration;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::{Client, Error};

/// Time allowed to establish a TCP connection to the broker or the scheduler.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The channel under a [`Client`]: a tonic [`Channel`] that adds the client's
/// [`CallCredentials`] to every call.
pub type GrpcChannel = InterceptedService<Channel, CallCredentials>;

/// The bearer token that a client sends as `authorization: Bearer TOKEN` on every call,
/// or none.
///
/// Its `Debug` output shows only whether a token is set.
#[derive(Clone, Default)]
pub struct CallCredentials {
    authorization: Option<MetadataValue<Ascii>>,
}

impl CallCredentials {
    /// Returns credentials that send `token` as a bearer token.
    ///
    /// # Errors
    ///
    /// Returns [`Error::InvalidClientConfig`] if the token is empty or has characters
    /// other than printable ASCII. The message does not contain the token.
    pub fn bearer(token: &str) -> Result<Self, Error> {
        let token = token.trim();
        if token.is_empty() {
            return Err(Error::InvalidClientConfig(
                "the bearer token is empty".to_owned(),
            ));
        }
        if !token.bytes().all(|byte| byte.is_ascii_graphic()) {
            return Err(Error::InvalidClientConfig(
                "the bearer token contains a character other than printable ASCII".to_owned(),
            ));
        }
        let mut value: MetadataValue<Ascii> = format!("Bearer {token}").parse().map_err(|_| {
            Error::InvalidClientConfig("the bearer token is not a valid header value".to_owned())
        })?;
        // Keeps the token out of HTTP/2 header compression tables.
        value.set_sensitive(true);
        Ok(CallCredentials {
            authorization: Some(value),
        })
    }

    /// Wraps `channel` so that every call on it carries these credentials.
    pub fn wrap(&self, channel: Channel) -> GrpcChannel {
        InterceptedService::new(channel, self.clone())
    }
}

impl fmt::Debug for CallCredentials {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("CallCredentials")
            .field("bearer_token", &self.authorization.is_some())
            .finish()
    }
}

impl Interceptor for CallCredentials {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.authorization {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// Connection settings for the broker and the scheduler: TLS settings, credentials and
/// timeouts. The scheduler connection of [`Client::with_scheduler`] uses the same ones.
#[derive(Clone)]
pub(crate) struct ConnectOptions {
    pub(crate) credentials: CallCredentials,
    pub(crate) ca_certificate: Option<Vec<u8>>,
    pub(crate) identity: Option<(Vec<u8>, Vec<u8>)>,
    pub(crate) connect_timeout: Duration,
    pub(crate) request_timeout: Option<Duration>,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            credentials: CallCredentials::default(),
            ca_certificate: None,
            identity: None,
            connect_timeout: CONNECT_TIMEOUT,
            request_timeout: None,
        }
    }
}

impl fmt::Debug for ConnectOptions {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("ConnectOptions")
            .field("credentials", &self.credentials)
            .field("ca_certificate", &self.ca_certificate.is_some())
            .field("identity", &self.identity.is_some())
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .finish()
    }
}

impl ConnectOptions {
    /// Parses `endpoint` and applies the options to it. A bare `host:port` means
    /// plain-text HTTP/2. An `https://` endpoint gets TLS, verified against the CA
    /// certificate if one is set and against the system's root certificates otherwise.
    pub(crate) fn endpoint(&self, endpoint: &str) -> Result<Endpoint, Error> {
        let url = if endpoint.contains("://") {
            endpoint.to_owned()
        } else {
            format!("http://{endpoint}")
        };
        let mut parsed = Endpoint::from_shared(url)
            .map_err(|source| Error::InvalidEndpoint {
                endpoint: endpoint.to_owned(),
                source,
            })?
            .connect_timeout(self.connect_timeout);
        if let Some(timeout) = self.request_timeout {
            parsed = parsed.timeout(timeout);
        }

        if parsed.uri().scheme_str() != Some("https") {
            if self.ca_certificate.is_some() || self.identity.is_some() {
                return Err(Error::InvalidClientConfig(format!(
                    "a CA certificate or client identity needs an https:// endpoint, not \
                     {endpoint:?}"
                )));
            }
            return Ok(parsed);
        }
        let mut tls = ClientTlsConfig::new();
        tls = match &self.ca_certificate {
            Some(pem) => tls.ca_certificate(Certificate::from_pem(pem)),
            None => tls.with_native_roots(),
        };
        if let Some((cert, key)) = &self.identity {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        parsed.tls_config(tls).map_err(|err| {
            Error::InvalidClientConfig(format!(
                "invalid TLS settings for {endpoint}: {}",
                error_chain(&err)
            ))
        })
    }
}

/// Joins an error and its sources with `: `, because a transport error's own message
/// hides the cause.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Builds a [`Client`] with TLS, a client certificate, a bearer token or timeouts.
///
/// ```no_run
/// # async fn example() -> Result<(), docket::Error> {
/// let ca = std::fs::read("/etc/docket/ca.pem").expect("CA file");
/// let client = docket::Client::builder("https://docket.internal:7070")
///     .bearer_token("s3cr3t-producer-token")
///     .ca_certificate(ca)
///     .scheduler("https://docket.internal:7071")
///     .connect()
///     .await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    endpoint: String,
    scheduler: Option<String>,
    token: Option<Token>,
    options: ConnectOptions,
}

/// A bearer token kept out of `Debug` output.
#[derive(Clone)]
struct Token(String);

impl fmt::Debug for Token {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("Token(..)")
    }
}

impl ClientBuilder {
    pub(crate) fn new(endpoint: String) -> Self {
        ClientBuilder {
            endpoint,
            scheduler: None,
            token: None,
            options: ConnectOptions::default(),
        }
    }

    /// Sends `token` as `authorization: Bearer TOKEN` on every call to the broker and the
    /// scheduler, including Subscribe streams.
    pub fn bearer_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(Token(token.into()));
        self
    }

    /// Verifies the server certificates of `https://` endpoints against these PEM CA
    /// certificates instead of the system's root certificates.
    pub fn ca_certificate(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.options.ca_certificate = Some(pem.into());
        self
    }

    /// Presents this PEM client certificate and private key to servers that require
    /// client certificates (mutual TLS).
    pub fn identity(mut self, cert_pem: impl Into<Vec<u8>>, key_pem: impl Into<Vec<u8>>) -> Self {
        self.options.identity = Some((cert_pem.into(), key_pem.into()));
        self
    }

    /// Sets the scheduler's address, as [`Client::with_scheduler`] does, with the same
    /// TLS settings and token as the broker.
    pub fn scheduler(mut self, endpoint: impl Into<String>) -> Self {
        self.scheduler = Some(endpoint.into());
        self
    }

    /// Sets the time allowed to establish a connection. The default is 10 seconds.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.options.connect_timeout = timeout;
        self
    }

    /// Limits every call to `timeout`, after which it fails with an error status. By
    /// default calls have no limit. The limit may also end streaming calls such as
    /// Subscribe, so leave it unset for workers.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.options.request_timeout = Some(timeout);
        self
    }

    /// Connects to the broker and waits until the connection is established. The
    /// scheduler, if set, is connected on its first call.
    ///
    /// # Errors
    ///
    /// Returns [`Error::InvalidEndpoint`] for an invalid URI,
    /// [`Error::InvalidClientConfig`] for an invalid token or TLS setting, and
    /// [`Error::Connect`] if the broker cannot be reached or the TLS handshake fails.
    pub async fn connect(self) -> Result<Client, Error> {
        let (endpoint, options, scheduler) = self.prepare()?;
        let channel = options
            .endpoint(&endpoint)?
            .connect()
            .await
            .map_err(|source| Error::Connect { endpoint, source })?;
        Client::from_parts(channel, options, scheduler)
    }

    /// Creates the client without connecting: the connection is made on the first call,
    /// which suits workers.
    ///
    /// # Errors
    ///
    /// Returns [`Error::InvalidEndpoint`] for an invalid URI and
    /// [`Error::InvalidClientConfig`] for an invalid token or TLS setting.
    pub fn connect_lazy(self) -> Result<Client, Error> {
        let (endpoint, options, scheduler) = self.prepare()?;
        let channel = options.endpoint(&endpoint)?.connect_lazy();
        Client::from_parts(channel, options, scheduler)
    }

    fn prepare(mut self) -> Result<(String, ConnectOptions, Option<String>), Error> {
        if let Some(Token(token)) = &self.token {
            self.options.credentials = CallCredentials::bearer(token)?;
        }
        Ok((self.endpoint, self.options, self.scheduler))
    }
}
