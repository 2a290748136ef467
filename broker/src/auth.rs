//! Bearer-token authentication and role checks for the Broker and Scheduler services.
//!
//! A token file has one `ROLE TOKEN` pair a line. Blank lines and lines that start with
//! `#` are ignored. A token listed on several lines gets every role of those lines.
//!
//! Every call to a Docket service needs the metadata `authorization: Bearer TOKEN` once a
//! token file is set. Health checking and server reflection stay open. The roles:
//!
//! | role       | methods |
//! |------------|---------|
//! | `producer` | Broker: Enqueue, GetTask, WatchTask, CancelTask. Scheduler: ScheduleTask, CancelSchedule, GetSchedule, ListSchedules, PreviewSchedule |
//! | `worker`   | Broker: Subscribe, Ack, Nack, ExtendLease, StopDeliveries, GetTask, WatchTask |
//! | `admin`    | every method |
//!
//! A missing, malformed or unknown token gets `UNAUTHENTICATED`. A known token without a
//! role that may call the method gets `PERMISSION_DENIED`. Tokens are compared in
//! constant time and never logged.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::Either;
use subtle::ConstantTimeEq;
use tonic::codegen::http;
use tower_layer::Layer;
use tower_service::Service;

/// A role that a token grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Adds, reads, follows and cancels tasks and one-shot schedules.
    Producer,
    /// Receives and settles tasks.
    Worker,
    /// Calls every method, including queue and dead-letter administration and recurring
    /// schedules.
    Admin,
}

impl Role {
    const ALL: [Role; 3] = [Role::Producer, Role::Worker, Role::Admin];

    /// Returns the role's name in token files.
    pub fn name(self) -> &'static str {
        match self {
            Role::Producer => "producer",
            Role::Worker => "worker",
            Role::Admin => "admin",
        }
    }

    fn bit(self) -> u8 {
        match self {
            Role::Producer => 1,
            Role::Worker => 2,
            Role::Admin => 4,
        }
    }

    fn parse(name: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|role| role.name() == name)
    }
}

/// A set of roles, one bit per role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Roles(u8);

impl Roles {
    fn contains(self, role: Role) -> bool {
        self.0 & role.bit() != 0
    }

    fn names(self) -> String {
        let names: Vec<&str> = Role::ALL
            .into_iter()
            .filter(|role| self.contains(*role))
            .map(Role::name)
            .collect();
        names.join(", ")
    }
}

/// Services whose methods need no token.
const OPEN_SERVICES: [&str; 3] = [
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// Methods that the producer role may call, as `/package.Service/Method` paths.
const PRODUCER_METHODS: [&str; 9] = [
    "/docket.v1.Broker/Enqueue",
    "/docket.v1.Broker/GetTask",
    "/docket.v1.Broker/WatchTask",
    "/docket.v1.Broker/CancelTask",
    "/docket.v1.Scheduler/ScheduleTask",
    "/docket.v1.Scheduler/CancelSchedule",
    "/docket.v1.Scheduler/GetSchedule",
    "/docket.v1.Scheduler/ListSchedules",
    "/docket.v1.Scheduler/PreviewSchedule",
];

/// Methods that the worker role may call.
const WORKER_METHODS: [&str; 7] = [
    "/docket.v1.Broker/Subscribe",
    "/docket.v1.Broker/Ack",
    "/docket.v1.Broker/Nack",
    "/docket.v1.Broker/ExtendLease",
    "/docket.v1.Broker/StopDeliveries",
    "/docket.v1.Broker/GetTask",
    "/docket.v1.Broker/WatchTask",
];

/// Returns whether the method at `path` needs no token.
pub fn is_open(path: &str) -> bool {
    let service = path.trim_start_matches('/').split('/').next().unwrap_or("");
    OPEN_SERVICES.contains(&service)
}

/// Returns the roles that may call the method at `path`. Admin may call every method.
fn allowed_roles(path: &str) -> Roles {
    let mut roles = Role::Admin.bit();
    if PRODUCER_METHODS.contains(&path) {
        roles |= Role::Producer.bit();
    }
    if WORKER_METHODS.contains(&path) {
        roles |= Role::Worker.bit();
    }
    Roles(roles)
}

/// An error in a token file, found at startup.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    /// The file could not be read.
    #[error("cannot read the token file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },

    /// A line is not a valid `ROLE TOKEN` pair. The message never contains the token.
    #[error("invalid line {line} of the token file {path}: {reason}")]
    InvalidLine {
        /// The file.
        path: PathBuf,
        /// The line number, from 1.
        line: usize,
        /// The problem with the line.
        reason: String,
    },

    /// The file has no token, which would reject every call.
    #[error("the token file {path} contains no tokens; expected lines of the form `ROLE TOKEN`")]
    Empty {
        /// The file.
        path: PathBuf,
    },
}

/// The tokens of a token file with their roles.
#[derive(Clone)]
pub struct TokenTable {
    entries: Vec<(Vec<u8>, Roles)>,
}

impl fmt::Debug for TokenTable {
    // Tokens are secrets, so only their number is shown.
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("TokenTable")
            .field("tokens", &self.entries.len())
            .finish()
    }
}

impl TokenTable {
    /// Reads and parses the token file at `path`.
    ///
    /// # Errors
    ///
    /// Fails if the file cannot be read, has an invalid line, or has no tokens.
    pub fn load(path: &Path) -> Result<Self, TokenFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokenFileError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses the text of a token file; `path` names the file in errors.
    ///
    /// # Errors
    ///
    /// Fails on the first invalid line, or if the text has no tokens.
    pub fn parse(text: &str, path: &Path) -> Result<Self, TokenFileError> {
        let mut entries: Vec<(Vec<u8>, Roles)> = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let invalid = |reason: String| TokenFileError::InvalidLine {
                path: path.to_path_buf(),
                line: index + 1,
                reason,
            };
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [role, token] = fields[..] else {
                return Err(invalid(format!(
                    "expected `ROLE TOKEN`, two fields separated by spaces, found {} fields",
                    fields.len()
                )));
            };
            let role = Role::parse(role).ok_or_else(|| {
                invalid(format!(
                    "unknown role {role:?}; expected producer, worker or admin"
                ))
            })?;
            if !token.bytes().all(|byte| byte.is_ascii_graphic()) {
                return Err(invalid(
                    "the token contains a character other than printable ASCII".to_owned(),
                ));
            }
            match entries
                .iter_mut()
                .find(|(known, _)| known.as_slice() == token.as_bytes())
            {
                Some((_, roles)) => roles.0 |= role.bit(),
                None => entries.push((token.as_bytes().to_vec(), Roles(role.bit()))),
            }
        }
        if entries.is_empty() {
            return Err(TokenFileError::Empty {
                path: path.to_path_buf(),
            });
        }
        Ok(TokenTable { entries })
    }

    /// Returns the number of distinct tokens.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Returns whether the table has no tokens, which [`TokenTable::parse`] rejects.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Returns the roles of `presented`, or `None` for an unknown token. Every entry is
    /// compared in constant time, so the time taken does not show which entry matched
    /// or how many leading bytes were right. It does show whether the lengths matched.
    fn roles_of(&self, presented: &[u8]) -> Option<Roles> {
        let mut found = 0u8;
        for (token, roles) in &self.entries {
            let matched = token.as_slice().ct_eq(presented);
            // Adds the entry's roles when `matched` is true, without a branch on it.
            found |= roles.0 & 0u8.wrapping_sub(matched.unwrap_u8());
        }
        (found != 0).then_some(Roles(found))
    }

    /// Checks the `authorization` header `value` of a call to the method at `path`.
    ///
    /// # Errors
    ///
    /// Returns `UNAUTHENTICATED` for a missing, malformed or unknown token, and
    /// `PERMISSION_DENIED` for a token without a role that may call the method.
    pub fn authorize(&self, path: &str, value: Option<&[u8]>) -> Result<(), tonic::Status> {
        let Some(value) = value else {
            return Err(tonic::Status::unauthenticated(format!(
                "{path} needs a bearer token: send the metadata `authorization: Bearer TOKEN`"
            )));
        };
        let token = bearer_token(value).ok_or_else(|| {
            tonic::Status::unauthenticated(
                "invalid authorization metadata: expected `Bearer TOKEN`",
            )
        })?;
        let roles = self
            .roles_of(token)
            .ok_or_else(|| tonic::Status::unauthenticated("invalid bearer token"))?;
        let allowed = allowed_roles(path);
        if roles.0 & allowed.0 == 0 {
            let noun = if roles.0.count_ones() == 1 {
                "role"
            } else {
                "roles"
            };
            return Err(tonic::Status::permission_denied(format!(
                "a token with the {noun} {} may not call {path}; roles that may: {}",
                roles.names(),
                allowed.names()
            )));
        }
        Ok(())
    }
}

/// Returns the token of an `authorization` header value `Bearer TOKEN`. The scheme is
/// case-insensitive, as HTTP authentication schemes are.
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let scheme = b"bearer ";
    if value.len() <= scheme.len() || !value[..scheme.len()].eq_ignore_ascii_case(scheme) {
        return None;
    }
    let token = value[scheme.len()..].trim_ascii();
    (!token.is_empty()).then_some(token)
}

/// A tower layer that checks the bearer token of every call before the call reaches its
/// service. Without a token table it lets every call through.
#[derive(Debug, Clone, Default)]
pub struct AuthLayer {
    tokens: Option<Arc<TokenTable>>,
}

impl AuthLayer {
    /// Returns a layer that checks calls against `tokens`, or checks nothing for `None`.
    pub fn new(tokens: Option<TokenTable>) -> Self {
        AuthLayer {
            tokens: tokens.map(Arc::new),
        }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            tokens: self.tokens.clone(),
        }
    }
}

/// The service that [`AuthLayer`] wraps around the server's routes.
#[derive(Debug, Clone)]
pub struct AuthService<S> {
    inner: S,
    tokens: Option<Arc<TokenTable>>,
}

impl<S, RequestBody, ResponseBody> Service<http::Request<RequestBody>> for AuthService<S>
where
    S: Service<http::Request<RequestBody>, Response = http::Response<ResponseBody>>,
    ResponseBody: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<std::future::Ready<Result<S::Response, S::Error>>, S::Future>;

    fn poll_ready(&mut self, context: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(context)
    }

    fn call(&mut self, request: http::Request<RequestBody>) -> Self::Future {
        if let Some(tokens) = &self.tokens {
            let path = request.uri().path();
            if !is_open(path) {
                let value = request
                    .headers()
                    .get(http::header::AUTHORIZATION)
                    .map(http::HeaderValue::as_bytes);
                if let Err(status) = tokens.authorize(path, value) {
                    tracing::debug!(
                        method = path,
                        code = ?status.code(),
                        reason = status.message(),
                        "call rejected"
                    );
                    return Either::Left(std::future::ready(Ok(status.into_http())));
                }
            }
        }
        Either::Right(self.inner.call(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> TokenTable {
        TokenTable::parse(text, Path::new("tokens")).expect("valid token file")
    }

    fn parse_error(text: &str) -> String {
        TokenTable::parse(text, Path::new("tokens"))
            .expect_err("invalid token file")
            .to_string()
    }

    #[test]
    fn parse_skips_comments_and_blank_lines() {
        let tokens = table("# comment\n\nproducer p-token\n  worker   w-token  \nadmin a\n");
        assert_eq!(tokens.len(), 3);
    }

    #[test]
    fn parse_merges_roles_of_repeated_token() {
        let tokens = table("producer shared\nworker shared\n");
        assert_eq!(tokens.len(), 1);
        assert!(
            tokens
                .authorize("/docket.v1.Broker/Enqueue", Some(b"Bearer shared"))
                .is_ok()
        );
        assert!(
            tokens
                .authorize("/docket.v1.Broker/Ack", Some(b"Bearer shared"))
                .is_ok()
        );
    }

    #[test]
    fn parse_rejects_unknown_role_with_line_number() {
        let message = parse_error("producer a\nreader secret-value\n");
        assert!(message.contains("line 2"), "{message}");
        assert!(message.contains("\"reader\""), "{message}");
        assert!(!message.contains("secret-value"), "{message}");
    }

    #[test]
    fn parse_rejects_wrong_field_count() {
        let message = parse_error("admin\n");
        assert!(message.contains("line 1"), "{message}");
        let message = parse_error("# ok\nadmin one two\n");
        assert!(message.contains("line 2"), "{message}");
        assert!(!message.contains("one two"), "{message}");
    }

    #[test]
    fn parse_rejects_file_without_tokens() {
        let message = parse_error("# nothing here\n");
        assert!(message.contains("contains no tokens"), "{message}");
    }

    #[test]
    fn authorize_checks_roles() {
        let tokens = table("producer p\nworker w\nadmin a\n");
        let cases: [(&str, &[u8], Option<tonic::Code>); 8] = [
            ("/docket.v1.Broker/Enqueue", b"Bearer p", None),
            (
                "/docket.v1.Broker/Subscribe",
                b"Bearer p",
                Some(tonic::Code::PermissionDenied),
            ),
            ("/docket.v1.Broker/Subscribe", b"bearer w", None),
            (
                "/docket.v1.Broker/Enqueue",
                b"Bearer w",
                Some(tonic::Code::PermissionDenied),
            ),
            ("/docket.v1.Broker/PurgeQueue", b"Bearer a", None),
            (
                "/docket.v1.Scheduler/CreateSchedule",
                b"Bearer p",
                Some(tonic::Code::PermissionDenied),
            ),
            ("/docket.v1.Scheduler/ScheduleTask", b"Bearer p", None),
            (
                "/docket.v1.Broker/Enqueue",
                b"Bearer unknown",
                Some(tonic::Code::Unauthenticated),
            ),
        ];
        for (path, header, expected) in cases {
            let result = tokens.authorize(path, Some(header));
            assert_eq!(result.err().map(|status| status.code()), expected, "{path}");
        }
    }

    #[test]
    fn authorize_rejects_missing_and_malformed_headers() {
        let tokens = table("admin a\n");
        for header in [None, Some(&b"a"[..]), Some(b"Basic a"), Some(b"Bearer ")] {
            let status = tokens
                .authorize("/docket.v1.Broker/Enqueue", header)
                .expect_err("rejected");
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{header:?}");
        }
    }

    #[test]
    fn permission_denied_names_method_and_roles() {
        let tokens = table("producer p\n");
        let status = tokens
            .authorize("/docket.v1.Broker/PurgeQueue", Some(b"Bearer p"))
            .expect_err("rejected");
        assert!(status.message().contains("/docket.v1.Broker/PurgeQueue"));
        assert!(status.message().contains("roles that may: admin"));
    }

    #[test]
    fn health_and_reflection_are_open() {
        assert!(is_open("/grpc.health.v1.Health/Check"));
        assert!(is_open(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
        ));
        assert!(!is_open("/docket.v1.Broker/Enqueue"));
    }
}
