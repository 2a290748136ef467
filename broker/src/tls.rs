//! TLS and bearer-token settings of a gRPC server, checked at startup so that a bad file
//! stops the process with a message that names the file and the problem.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::server::ServerTlsConfig;
use tonic::transport::{Certificate, Identity, Server};
use tower_layer::{Identity as NoLayer, Stack};

use crate::auth::{AuthLayer, TokenFileError, TokenTable};

/// Time allowed for a client's TLS handshake, so that a silent client cannot hold a
/// connection open.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Files that secure a server: its certificate and key, the CA of client certificates,
/// and the bearer-token file. Every field is optional. Without any, the server speaks
/// plain-text HTTP/2 and accepts every call.
#[derive(Debug, Clone, Default)]
pub struct SecurityFiles {
    /// PEM certificate chain of the server, leaf first.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of the server certificate.
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificates that client certificates must chain to. Setting it requires a
    /// client certificate on every connection.
    pub tls_client_ca: Option<PathBuf>,
    /// File of `ROLE TOKEN` lines, as [`crate::auth`] describes.
    pub auth_tokens: Option<PathBuf>,
}

/// The gRPC server builder type that [`server_builder`] returns.
pub type SecureServer = Server<Stack<AuthLayer, NoLayer>>;

/// An invalid TLS or token file.
#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    /// A file could not be read.
    #[error("cannot read the {file_kind} {path}: {source}")]
    Read {
        /// The file's purpose, such as "TLS certificate file".
        file_kind: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },

    /// A file's content cannot be used.
    #[error("invalid {file_kind} {path}: {reason}")]
    Invalid {
        /// The file's purpose.
        file_kind: &'static str,
        /// The file.
        path: PathBuf,
        /// The problem with the file.
        reason: String,
    },

    /// A certificate was given without its key, or the other way round.
    #[error("{0}")]
    Incomplete(String),

    /// The token file is invalid.
    #[error(transparent)]
    Tokens(#[from] TokenFileError),

    /// tonic rejected the TLS configuration.
    #[error("invalid TLS configuration: {}", error_chain(.0))]
    Transport(#[from] tonic::transport::Error),
}

/// Joins an error and its sources with `: `, because tonic's transport error shows only
/// `transport error` and keeps the cause, such as a rejected certificate, in its source.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let message = cause.to_string();
        if !text.ends_with(&message) {
            text.push_str(": ");
            text.push_str(&message);
        }
        source = cause.source();
    }
    text
}

/// Returns a server builder with TLS and token checks as `files` configure them.
///
/// # Errors
///
/// Fails if a file is missing or unreadable, a certificate or key is not valid PEM, the
/// key does not match the certificate, or the token file is invalid.
pub fn server_builder(files: &SecurityFiles) -> Result<SecureServer, SecurityError> {
    let tokens = files
        .auth_tokens
        .as_deref()
        .map(TokenTable::load)
        .transpose()?;
    let mut builder = Server::builder();
    if let Some(tls) = server_tls_config(files)? {
        builder = builder.tls_config(tls)?;
    }
    tracing::info!(
        tls = files.tls_cert.is_some(),
        client_certificates = files.tls_client_ca.is_some(),
        tokens = tokens.as_ref().map_or(0, TokenTable::len),
        "transport security configured"
    );
    Ok(builder.layer(AuthLayer::new(tokens)))
}

/// Loads and checks the server's TLS files, or returns `None` if TLS is off.
///
/// # Errors
///
/// See [`server_builder`].
pub fn server_tls_config(files: &SecurityFiles) -> Result<Option<ServerTlsConfig>, SecurityError> {
    let (cert_path, key_path) = match (&files.tls_cert, &files.tls_key) {
        (None, None) => {
            if files.tls_client_ca.is_some() {
                return Err(SecurityError::Incomplete(
                    "--tls-client-ca needs --tls-cert and --tls-key".to_owned(),
                ));
            }
            return Ok(None);
        }
        (Some(cert), Some(key)) => (cert, key),
        (Some(_), None) => {
            return Err(SecurityError::Incomplete(
                "--tls-cert needs --tls-key".to_owned(),
            ));
        }
        (None, Some(_)) => {
            return Err(SecurityError::Incomplete(
                "--tls-key needs --tls-cert".to_owned(),
            ));
        }
    };

    let cert_pem = read("TLS certificate file", cert_path)?;
    let key_pem = read("TLS private key file", key_path)?;
    let certs = parse_certificates("TLS certificate file", cert_path, &cert_pem)?;
    let key = parse_private_key(key_path, &key_pem)?;
    check_key_matches(cert_path, key_path, certs, key)?;

    let mut config = ServerTlsConfig::new()
        .identity(Identity::from_pem(cert_pem, key_pem))
        .timeout(HANDSHAKE_TIMEOUT);
    if let Some(ca_path) = &files.tls_client_ca {
        let ca_pem = read("TLS client CA file", ca_path)?;
        let roots = parse_certificates("TLS client CA file", ca_path, &ca_pem)?;
        let mut store = rustls::RootCertStore::empty();
        for root in roots {
            store
                .add(root)
                .map_err(|err| invalid("TLS client CA file", ca_path, err.to_string()))?;
        }
        config = config.client_ca_root(Certificate::from_pem(ca_pem));
    }
    Ok(Some(config))
}

fn read(file_kind: &'static str, path: &Path) -> Result<Vec<u8>, SecurityError> {
    std::fs::read(path).map_err(|source| SecurityError::Read {
        file_kind,
        path: path.to_path_buf(),
        source,
    })
}

fn invalid(file_kind: &'static str, path: &Path, reason: String) -> SecurityError {
    SecurityError::Invalid {
        file_kind,
        path: path.to_path_buf(),
        reason,
    }
}

/// Parses every PEM certificate in `pem`, failing if there is none.
pub fn parse_certificates(
    file_kind: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, SecurityError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| invalid(file_kind, path, format!("not valid PEM: {err}")))?;
    if certs.is_empty() {
        return Err(invalid(
            file_kind,
            path,
            "contains no PEM certificate (-----BEGIN CERTIFICATE-----)".to_owned(),
        ));
    }
    Ok(certs)
}

fn parse_private_key(path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, SecurityError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|err| {
        invalid(
            "TLS private key file",
            path,
            format!("contains no usable PEM private key (PKCS#8, PKCS#1 or SEC1): {err}"),
        )
    })
}

fn check_key_matches(
    cert_path: &Path,
    key_path: &Path,
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<(), SecurityError> {
    let signing_key = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|err| invalid("TLS private key file", key_path, err.to_string()))?;
    match rustls::sign::CertifiedKey::new(certs, signing_key).keys_match() {
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            Err(SecurityError::Incomplete(format!(
                "the private key in {} does not match the certificate in {}",
                key_path.display(),
                cert_path.display()
            )))
        }
        // `Unknown` means the key type cannot report its public key, so the handshake is
        // the first check.
        Ok(()) | Err(rustls::Error::InconsistentKeys(_)) => Ok(()),
        Err(err) => Err(invalid("TLS certificate file", cert_path, err.to_string())),
    }
}

/// The broker's TLS and bearer-token flags.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SecurityArgs {
    /// PEM certificate chain, leaf first, to serve gRPC over TLS with. Needs --tls-key.
    #[arg(
        long,
        env = "DOCKET_TLS_CERT",
        value_name = "FILE",
        requires = "tls_key"
    )]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(
        long,
        env = "DOCKET_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    pub tls_key: Option<PathBuf>,

    /// PEM CA certificates that client certificates must chain to. Every client must then
    /// present a certificate (mutual TLS). Needs --tls-cert.
    #[arg(
        long,
        env = "DOCKET_TLS_CLIENT_CA",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    pub tls_client_ca: Option<PathBuf>,

    /// File of `ROLE TOKEN` lines (roles: producer, worker, admin). Every Broker call then
    /// needs `authorization: Bearer TOKEN`; health and reflection stay open.
    #[arg(long, env = "DOCKET_AUTH_TOKENS", value_name = "FILE")]
    pub auth_tokens: Option<PathBuf>,
}

impl SecurityArgs {
    /// Returns the files that the flags name.
    pub fn files(&self) -> SecurityFiles {
        SecurityFiles {
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
            tls_client_ca: self.tls_client_ca.clone(),
            auth_tokens: self.auth_tokens.clone(),
        }
    }
}
