//! TLS and bearer-token settings of the scheduler: those of its own gRPC server, served
//! as the broker serves them, and those of its connection to the broker.

use std::path::{Path, PathBuf};

use docket_broker::tls::{SecurityError, SecurityFiles, parse_certificates};
use tonic::codegen::http;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// The scheduler's TLS and bearer-token flags.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SecurityArgs {
    /// PEM certificate chain, leaf first, to serve gRPC over TLS with. Needs --tls-key.
    #[arg(
        long,
        env = "DOCKET_SCHEDULER_TLS_CERT",
        value_name = "FILE",
        requires = "tls_key"
    )]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(
        long,
        env = "DOCKET_SCHEDULER_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    pub tls_key: Option<PathBuf>,

    /// PEM CA certificates that client certificates must chain to. Every client must then
    /// present a certificate (mutual TLS). Needs --tls-cert.
    #[arg(
        long,
        env = "DOCKET_SCHEDULER_TLS_CLIENT_CA",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    pub tls_client_ca: Option<PathBuf>,

    /// File of `ROLE TOKEN` lines (roles: producer, worker, admin). Every Scheduler call
    /// then needs `authorization: Bearer TOKEN`; health and reflection stay open.
    #[arg(long, env = "DOCKET_SCHEDULER_AUTH_TOKENS", value_name = "FILE")]
    pub auth_tokens: Option<PathBuf>,

    /// File that contains the bearer token sent on every call to the broker. The broker
    /// must grant it the producer or admin role.
    #[arg(long, env = "DOCKET_SCHEDULER_BROKER_TOKEN_FILE", value_name = "FILE")]
    pub broker_token_file: Option<PathBuf>,

    /// PEM CA certificates that the broker's certificate must chain to, for an https://
    /// --broker URL. Without it, the system's root certificates are used.
    #[arg(long, env = "DOCKET_SCHEDULER_BROKER_CA_CERT", value_name = "FILE")]
    pub broker_ca_cert: Option<PathBuf>,

    /// PEM client certificate to present to a broker that requires one. Needs
    /// --broker-client-key.
    #[arg(
        long,
        env = "DOCKET_SCHEDULER_BROKER_CLIENT_CERT",
        value_name = "FILE",
        requires = "broker_client_key"
    )]
    pub broker_client_cert: Option<PathBuf>,

    /// PEM private key of --broker-client-cert.
    #[arg(
        long,
        env = "DOCKET_SCHEDULER_BROKER_CLIENT_KEY",
        value_name = "FILE",
        requires = "broker_client_cert"
    )]
    pub broker_client_key: Option<PathBuf>,
}

impl SecurityArgs {
    /// Returns the files that secure the scheduler's own server.
    pub fn server_files(&self) -> SecurityFiles {
        SecurityFiles {
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
            tls_client_ca: self.tls_client_ca.clone(),
            auth_tokens: self.auth_tokens.clone(),
        }
    }

    /// Applies the broker connection's TLS settings to `endpoint`, whose URL is
    /// `broker_url`, and returns the credentials to send on every call.
    ///
    /// # Errors
    ///
    /// Fails if a file is unreadable or invalid, or if TLS files are set for an http://
    /// URL.
    pub fn broker_endpoint(
        &self,
        broker_url: &str,
        endpoint: Endpoint,
    ) -> Result<(Endpoint, BrokerCredentials), SecurityError> {
        let credentials = match &self.broker_token_file {
            Some(path) => BrokerCredentials::from_token_file(path)?,
            None => BrokerCredentials::default(),
        };
        let https = endpoint.uri().scheme_str() == Some("https");
        let has_tls_files = self.broker_ca_cert.is_some() || self.broker_client_cert.is_some();
        if !https {
            if has_tls_files {
                return Err(SecurityError::Incomplete(format!(
                    "--broker-ca-cert and --broker-client-cert need an https:// --broker URL, \
                     not {broker_url:?}"
                )));
            }
            return Ok((endpoint, credentials));
        }

        let mut tls = ClientTlsConfig::new();
        match &self.broker_ca_cert {
            Some(path) => {
                let pem = read("broker CA certificate file", path)?;
                parse_certificates("broker CA certificate file", path, &pem)?;
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            None => tls = tls.with_native_roots(),
        }
        if let (Some(cert_path), Some(key_path)) =
            (&self.broker_client_cert, &self.broker_client_key)
        {
            let cert = read("broker client certificate file", cert_path)?;
            parse_certificates("broker client certificate file", cert_path, &cert)?;
            let key = read("broker client key file", key_path)?;
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        Ok((endpoint.tls_config(tls)?, credentials))
    }
}

fn read(file_kind: &'static str, path: &Path) -> Result<Vec<u8>, SecurityError> {
    std::fs::read(path).map_err(|source| SecurityError::Read {
        file_kind,
        path: path.to_path_buf(),
        source,
    })
}

/// The channel to the broker, with the bearer token added to every call.
pub type BrokerChannel = InterceptedService<Channel, BrokerCredentials>;

/// The bearer token that the scheduler sends to the broker, if any.
#[derive(Clone, Default)]
pub struct BrokerCredentials {
    authorization: Option<MetadataValue<Ascii>>,
}

impl std::fmt::Debug for BrokerCredentials {
    // The token is a secret, so only whether one is set is shown.
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("BrokerCredentials")
            .field("token", &self.authorization.is_some())
            .finish()
    }
}

impl BrokerCredentials {
    /// Reads a bearer token from `path`: the file's content without surrounding
    /// whitespace.
    ///
    /// # Errors
    ///
    /// Fails if the file cannot be read, is empty, or has characters other than
    /// printable ASCII.
    pub fn from_token_file(path: &Path) -> Result<Self, SecurityError> {
        let file_kind = "broker token file";
        let text = std::fs::read_to_string(path).map_err(|source| SecurityError::Read {
            file_kind,
            path: path.to_path_buf(),
            source,
        })?;
        let token = text.trim();
        if token.is_empty() {
            return Err(SecurityError::Invalid {
                file_kind,
                path: path.to_path_buf(),
                reason: "the file is empty".to_owned(),
            });
        }
        if !token.bytes().all(|byte| byte.is_ascii_graphic()) {
            return Err(SecurityError::Invalid {
                file_kind,
                path: path.to_path_buf(),
                reason: "the token contains a character other than printable ASCII".to_owned(),
            });
        }
        let mut value: MetadataValue<Ascii> =
            format!("Bearer {token}")
                .parse()
                .map_err(|_| SecurityError::Invalid {
                    file_kind,
                    path: path.to_path_buf(),
                    reason: "the token is not a valid header value".to_owned(),
                })?;
        value.set_sensitive(true);
        Ok(BrokerCredentials {
            authorization: Some(value),
        })
    }
}

impl Interceptor for BrokerCredentials {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.authorization {
            request
                .metadata_mut()
                .insert(http::header::AUTHORIZATION.as_str(), value.clone());
        }
        Ok(request)
    }
}
