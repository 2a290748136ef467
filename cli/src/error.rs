//! The errors of client commands, each with the exit code that scripts rely on.

use std::fmt;
use std::process::ExitCode;

/// One of the two services that client commands call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    Broker,
    Scheduler,
}

impl fmt::Display for Service {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(match self {
            Service::Broker => "broker",
            Service::Scheduler => "scheduler",
        })
    }
}

/// An error that ends a client command.
#[derive(Debug)]
pub enum CliError {
    /// The service could not be reached at `url`. Exit code 3.
    Connect {
        service: Service,
        url: String,
        detail: String,
    },
    /// The service returned a gRPC status other than OK. Exit code 4 for NOT_FOUND and 1
    /// for every other code.
    Status {
        service: Service,
        status: tonic::Status,
    },
    /// The command line is valid for clap but cannot be used, such as an unreadable
    /// payload file or a malformed URL. Exit code 2, as clap's own usage errors.
    Usage(String),
    /// The service returned a response that breaks the wire contract. Exit code 1.
    InvalidResponse { service: Service, detail: String },
    /// Input that the command cannot use, with what to do about it, such as a bad line
    /// of an `enqueue --file` file. Exit code 2.
    Input { message: String, hint: String },
    /// `task watch` saw the task end DEAD or CANCELLED. Exit code 5. Its output already
    /// shows the final state, so nothing more is printed.
    TaskEnded,
}

/// Exit code of a service error other than NOT_FOUND.
const EXIT_SERVER_ERROR: u8 = 1;
/// Exit code of a usage error; clap exits with the same code.
pub const EXIT_USAGE: u8 = 2;
/// Exit code when the broker or the scheduler cannot be reached.
const EXIT_CONNECT: u8 = 3;
/// Exit code of NOT_FOUND.
const EXIT_NOT_FOUND: u8 = 4;
/// Exit code of `task watch` when the task ended DEAD or CANCELLED.
const EXIT_TASK_FAILED: u8 = 5;
/// Exit code of UNAUTHENTICATED and PERMISSION_DENIED: the credentials were rejected.
const EXIT_AUTH: u8 = 6;

impl CliError {
    /// Wraps a status that `service` returned.
    pub fn status(service: Service, status: tonic::Status) -> Self {
        CliError::Status { service, status }
    }

    /// Converts an SDK error from a call to `service`.
    pub fn from_sdk(service: Service, error: docket::Error) -> Self {
        match error {
            docket::Error::Status(status) => CliError::Status {
                service,
                status: *status,
            },
            other => CliError::InvalidResponse {
                service,
                detail: other.to_string(),
            },
        }
    }

    /// Returns the process exit code for this error.
    pub fn exit_code(&self) -> ExitCode {
        let code = match self {
            CliError::Connect { .. } => EXIT_CONNECT,
            CliError::Status { status, .. } if status.code() == tonic::Code::NotFound => {
                EXIT_NOT_FOUND
            }
            CliError::Status { status, .. }
                if matches!(
                    status.code(),
                    tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
                ) =>
            {
                EXIT_AUTH
            }
            CliError::Status { .. } | CliError::InvalidResponse { .. } => EXIT_SERVER_ERROR,
            CliError::Usage(_) | CliError::Input { .. } => EXIT_USAGE,
            CliError::TaskEnded => EXIT_TASK_FAILED,
        };
        ExitCode::from(code)
    }

    /// Returns a short machine-readable name of the error: the gRPC code name for a
    /// status, and otherwise `CONNECT_FAILED`, `USAGE`, `INVALID_RESPONSE` or
    /// `TASK_ENDED`.
    pub fn code(&self) -> &'static str {
        match self {
            CliError::Connect { .. } => "CONNECT_FAILED",
            CliError::Status { status, .. } => code_name(status.code()),
            CliError::Usage(_) | CliError::Input { .. } => "USAGE",
            CliError::InvalidResponse { .. } => "INVALID_RESPONSE",
            CliError::TaskEnded => "TASK_ENDED",
        }
    }

    /// Returns what failed, in one sentence.
    pub fn message(&self) -> String {
        match self {
            CliError::Connect {
                service,
                url,
                detail,
            } => format!("cannot connect to the {service} at {url}: {detail}"),
            CliError::Status { service, status } => {
                // A status made from a transport error, such as a TLS handshake that the
                // server rejected, keeps its cause in the source chain.
                let mut message = status.message().to_owned();
                let mut source = std::error::Error::source(status);
                while let Some(cause) = source {
                    let text = cause.to_string();
                    if !message.ends_with(&text) {
                        message.push_str(": ");
                        message.push_str(&text);
                    }
                    source = cause.source();
                }
                format!(
                    "the {service} returned {}: {message}",
                    code_name(status.code())
                )
            }
            CliError::Usage(message) | CliError::Input { message, .. } => message.clone(),
            CliError::InvalidResponse { service, detail } => {
                format!("invalid response from the {service}: {detail}")
            }
            CliError::TaskEnded => "the task ended DEAD or CANCELLED".to_owned(),
        }
    }

    /// Returns what the user can do about the error, if there is advice to give.
    pub fn hint(&self) -> Option<String> {
        match self {
            CliError::Connect { service, .. } => Some(format!(
                "is the {service} running? start it with `docket dev`, or pass its URL with \
                 --{service} or DOCKET_{}",
                service.to_string().to_uppercase()
            )),
            CliError::Status { service, status } => Some(hint(*service, status.code())),
            CliError::Usage(_) => Some("run the command with --help for its usage".to_owned()),
            CliError::Input { hint, .. } => Some(hint.clone()),
            CliError::InvalidResponse { service, .. } => Some(format!(
                "check that the {service} and this command line are the same version"
            )),
            CliError::TaskEnded => None,
        }
    }

    /// Returns the error as the JSON object that `--json` prints on stderr.
    pub fn to_json(&self) -> serde_json::Value {
        let mut error = serde_json::Map::new();
        error.insert("code".to_owned(), self.code().into());
        error.insert("message".to_owned(), self.message().into());
        if let Some(hint) = self.hint() {
            error.insert("hint".to_owned(), hint.into());
        }
        match self {
            CliError::Connect { service, .. }
            | CliError::Status { service, .. }
            | CliError::InvalidResponse { service, .. } => {
                error.insert("service".to_owned(), service.to_string().into());
            }
            _ => {}
        }
        serde_json::json!({ "error": error })
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&self.message())?;
        match self.hint() {
            Some(hint) => write!(formatter, "\n{hint}"),
            None => Ok(()),
        }
    }
}

/// Returns the canonical name of a gRPC status code, such as `INVALID_ARGUMENT`.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Returns what the user can do about a status `code` from `service`.
fn hint(service: Service, code: tonic::Code) -> String {
    use tonic::Code;
    match code {
        Code::InvalidArgument => "fix the value that the message names and retry".to_owned(),
        Code::NotFound => match service {
            Service::Broker => "check the id; tasks are deleted after their queue's retention period".to_owned(),
            Service::Scheduler => "check the name or id: `docket schedule list` lists every schedule; pause, resume and delete take the name of a recurring schedule, and `schedule cancel` the id of a one-shot one".to_owned(),
        },
        Code::AlreadyExists => {
            "choose another name, or delete the existing schedule with `docket schedule delete NAME`"
                .to_owned()
        }
        Code::FailedPrecondition => {
            "the current state does not allow this change; show it with `docket task get` or `docket schedule get`"
                .to_owned()
        }
        Code::ResourceExhausted => {
            format!("a limit of the {service} was reached; send less or raise the limit")
        }
        Code::Unavailable => {
            format!("the {service} is starting, stopping or unreachable; retry in a moment")
        }
        Code::DeadlineExceeded => {
            format!("the {service} did not answer in time; check its log and retry")
        }
        Code::Unimplemented => {
            format!("the {service} does not support this call; check that it is up to date")
        }
        Code::Unauthenticated => format!(
            "the {service} requires a valid bearer token: pass it with --token or --token-file \
             (or DOCKET_TOKEN / DOCKET_TOKEN_FILE)"
        ),
        Code::PermissionDenied => {
            "use a token whose role may call this method; the message lists those roles"
                .to_owned()
        }
        _ => format!("check the {service}'s log"),
    }
}
