//! W3C Trace Context for tasks: the `traceparent` header, the worker's task span and
//! the trace context that the client gives to the tasks it enqueues.

use std::fmt;
use std::future::Future;
use std::str::FromStr;

use docket_proto::v1::NewTask;
use tokio::task::futures::TaskLocalFuture;
use tracing::field::Empty;
use tracing::instrument::Instrumented;
use tracing::{Instrument, Span, debug};

use crate::TaskContext;

/// The header that carries a task's W3C Trace Context, in the `traceparent` format of
/// version 00: `00-{trace id}-{parent id}-{flags}` in lowercase hex.
pub const TRACEPARENT_HEADER: &str = "traceparent";

/// Length of a version 00 `traceparent` value: 2 + 1 + 32 + 1 + 16 + 1 + 2 characters.
const TRACEPARENT_LENGTH: usize = 55;

/// The `sampled` bit of the trace flags.
const SAMPLED: u8 = 0x01;

tokio::task_local! {
    /// The trace context that tasks enqueued from the running handler carry: the
    /// handler's trace id and flags, with the task span's `span_id` as parent id.
    static HANDLER_TRACE: TraceParent;
}

/// A parsed W3C Trace Context `traceparent` value: the trace id, the id of the parent
/// span and the trace flags.
///
/// [`FromStr`] accepts version 00 exactly as the W3C Trace Context specification
/// defines it: 55 characters, lowercase hex, a trace id and a parent id that are not all
/// zeros. It also accepts the later versions 01 to fe by the specification's rules for
/// them, which read the version 00 fields and keep only the `sampled` flag. Version ff
/// is invalid. [`Display`](fmt::Display) always writes version 00.
///
/// ```
/// use docket::TraceParent;
///
/// let parent: TraceParent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
///     .parse()
///     .unwrap();
/// assert_eq!(parent.trace_id(), 0x4bf92f3577b34da6a3ce929d0e0e4736);
/// assert_eq!(parent.parent_id(), 0x00f067aa0ba902b7);
/// assert!(parent.is_sampled());
/// assert_eq!(
///     parent.to_string(),
///     "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
/// );
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceParent {
    trace_id: u128,
    parent_id: u64,
    flags: u8,
}

impl TraceParent {
    /// Creates a trace context, or returns `None` if `trace_id` or `parent_id` is zero,
    /// which the specification forbids.
    pub fn new(trace_id: u128, parent_id: u64, flags: u8) -> Option<Self> {
        (trace_id != 0 && parent_id != 0).then_some(TraceParent {
            trace_id,
            parent_id,
            flags,
        })
    }

    /// Creates the context of a new trace: a random trace id, a random parent id and the
    /// `sampled` flag.
    pub fn new_root() -> Self {
        TraceParent {
            trace_id: random_trace_id(),
            parent_id: random_span_id(),
            flags: SAMPLED,
        }
    }

    /// Returns the trace id, never 0.
    pub fn trace_id(&self) -> u128 {
        self.trace_id
    }

    /// Returns the id of the parent span, never 0.
    pub fn parent_id(&self) -> u64 {
        self.parent_id
    }

    /// Returns the trace flags.
    pub fn flags(&self) -> u8 {
        self.flags
    }

    /// Returns `true` if the `sampled` flag is set.
    pub fn is_sampled(&self) -> bool {
        self.flags & SAMPLED != 0
    }

    /// Returns the context of a child of the span `span_id` in the same trace, with the
    /// same flags.
    fn child_of(&self, span_id: u64) -> Self {
        TraceParent {
            parent_id: span_id,
            ..*self
        }
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id, self.parent_id, self.flags
        )
    }
}

impl FromStr for TraceParent {
    type Err = ParseTraceParentError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let invalid = |reason| ParseTraceParentError {
            value: value.to_owned(),
            reason,
        };
        let bytes = value.as_bytes();
        if bytes.len() < TRACEPARENT_LENGTH {
            return Err(invalid("it is shorter than 55 characters"));
        }

        let version = parse_lower_hex(&bytes[0..2])
            .ok_or_else(|| invalid("the version is not 2 lowercase hex digits"))?;
        if version == 0xff {
            return Err(invalid("version ff is invalid"));
        }
        if bytes[2] != b'-' || bytes[35] != b'-' || bytes[52] != b'-' {
            return Err(invalid(
                "the fields are not separated by '-' after the version, trace id and parent id",
            ));
        }
        let trace_id = parse_lower_hex(&bytes[3..35])
            .ok_or_else(|| invalid("the trace id is not 32 lowercase hex digits"))?;
        let parent_id = parse_lower_hex(&bytes[36..52])
            .ok_or_else(|| invalid("the parent id is not 16 lowercase hex digits"))?;
        let flags = parse_lower_hex(&bytes[53..55])
            .ok_or_else(|| invalid("the flags are not 2 lowercase hex digits"))?;

        // Version 00 ends after the flags. A later version may append fields, each after
        // a '-', and of its flags only `sampled` is defined for version 00 too.
        let flags = if version == 0 {
            if bytes.len() != TRACEPARENT_LENGTH {
                return Err(invalid("version 00 is longer than 55 characters"));
            }
            flags
        } else {
            if bytes.len() > TRACEPARENT_LENGTH && bytes[TRACEPARENT_LENGTH] != b'-' {
                return Err(invalid("the flags are not followed by '-' or the end"));
            }
            flags & u128::from(SAMPLED)
        };

        if trace_id == 0 {
            return Err(invalid("the trace id is all zeros"));
        }
        let parent_id = u64::try_from(parent_id).expect("16 hex digits fit in a u64");
        if parent_id == 0 {
            return Err(invalid("the parent id is all zeros"));
        }
        Ok(TraceParent {
            trace_id,
            parent_id,
            flags: u8::try_from(flags).expect("2 hex digits fit in a u8"),
        })
    }
}

/// The error of parsing a `traceparent` value that is not valid W3C Trace Context.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid traceparent {value:?}: {reason}")]
pub struct ParseTraceParentError {
    value: String,
    reason: &'static str,
}

/// Parses ASCII lowercase hex digits, at most 32 of them. Uppercase digits are invalid
/// in `traceparent`.
fn parse_lower_hex(digits: &[u8]) -> Option<u128> {
    digits.iter().try_fold(0_u128, |value, &digit| {
        let nibble = match digit {
            b'0'..=b'9' => digit - b'0',
            b'a'..=b'f' => digit - b'a' + 10,
            _ => return None,
        };
        Some(value << 4 | u128::from(nibble))
    })
}

/// Returns a random trace id that is not zero.
fn random_trace_id() -> u128 {
    loop {
        let id = rand::random::<u128>();
        if id != 0 {
            return id;
        }
    }
}

/// Returns a random span id that is not zero.
fn random_span_id() -> u64 {
    loop {
        let id = rand::random::<u64>();
        if id != 0 {
            return id;
        }
    }
}

/// The `docket.task` span of one delivery and the trace context of the tasks that its
/// handler enqueues.
pub(crate) struct TaskTrace {
    span: Span,
    children: TraceParent,
}

impl TaskTrace {
    /// Creates the task span of a delivery, with the trace of its `traceparent` header.
    ///
    /// A missing or invalid header starts a new trace with a random trace id. An invalid
    /// one is logged at debug level and otherwise ignored. The span gets its own random
    /// `span_id`, which tasks enqueued from the handler carry as their parent id.
    pub(crate) fn start(context: &TaskContext) -> Self {
        let incoming = incoming_traceparent(context);
        let span_id = random_span_id();
        let span = tracing::info_span!(
            "docket.task",
            task_id = context.id(),
            kind = context.kind(),
            queue = context.queue(),
            attempt = context.attempt(),
            trace_id = Empty,
            parent_span_id = Empty,
            span_id = format!("{span_id:016x}").as_str(),
        );

        let trace = match incoming {
            Some(incoming) => {
                span.record(
                    "parent_span_id",
                    format!("{:016x}", incoming.parent_id).as_str(),
                );
                #[cfg(feature = "opentelemetry")]
                otel::set_remote_parent(&span, &incoming);
                incoming
            }
            None => TraceParent::new_root(),
        };
        span.record("trace_id", format!("{:032x}", trace.trace_id).as_str());

        TaskTrace {
            span,
            children: trace.child_of(span_id),
        }
    }

    /// Returns the task span.
    pub(crate) fn span(&self) -> &Span {
        &self.span
    }

    /// Calls `start` to create the handler's future, and runs both the call and the
    /// future inside the task span, with the trace context that [`Client`](crate::Client)
    /// gives to tasks enqueued from the handler.
    pub(crate) fn run_handler<F: Future>(
        &self,
        start: impl FnOnce() -> F,
    ) -> Instrumented<TaskLocalFuture<TraceParent, F>> {
        let future = self
            .span
            .in_scope(|| HANDLER_TRACE.sync_scope(self.children, start));
        HANDLER_TRACE
            .scope(self.children, future)
            .instrument(self.span.clone())
    }
}

/// Returns the trace context in the delivery's `traceparent` header, or `None` if it
/// has none or an invalid one.
fn incoming_traceparent(context: &TaskContext) -> Option<TraceParent> {
    let value = context.header(TRACEPARENT_HEADER)?;
    match value.parse() {
        Ok(traceparent) => Some(traceparent),
        Err(error) => {
            debug!(task_id = context.id(), %error, "ignoring the invalid traceparent header");
            None
        }
    }
}

/// Sets the `traceparent` header of a task about to be enqueued, unless the caller set
/// one. Any header that the caller set is kept as it is, even an invalid one.
///
/// The trace context comes from, in this order: the current span's OpenTelemetry context
/// with the `opentelemetry` feature, the handler that runs this code, or a new trace.
///
/// NOTE: the header adds 66 bytes, key and value, toward the broker's limit on all headers
/// of a task, so a task that was within 66 bytes of the limit is rejected.
pub(crate) fn fill_traceparent(task: &mut NewTask) {
    if task.headers.contains_key(TRACEPARENT_HEADER) {
        return;
    }
    task.headers.insert(
        TRACEPARENT_HEADER.to_owned(),
        outgoing_traceparent().to_string(),
    );
}

/// Returns the trace context for a task enqueued by the code that runs now.
fn outgoing_traceparent() -> TraceParent {
    #[cfg(feature = "opentelemetry")]
    if let Some(traceparent) = otel::current_span_traceparent() {
        return traceparent;
    }
    // The task-local is set only around a handler's own future. A task that the handler
    // spawns does not inherit it and starts a new trace.
    HANDLER_TRACE
        .try_with(|traceparent| *traceparent)
        .unwrap_or_else(|_| TraceParent::new_root())
}

/// The link between `traceparent` and OpenTelemetry span contexts.
#[cfg(feature = "opentelemetry")]
mod otel {
    use opentelemetry::Context;
    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
    };
    use tracing::{Span, debug};
    use tracing_opentelemetry::{OpenTelemetrySpanExt, SetParentError};

    use super::TraceParent;

    /// Sets the OpenTelemetry parent of `span` to the remote span context of `parent`.
    pub(super) fn set_remote_parent(span: &Span, parent: &TraceParent) {
        let remote = SpanContext::new(
            TraceId::from(parent.trace_id),
            SpanId::from(parent.parent_id),
            TraceFlags::new(parent.flags),
            true,
            TraceState::default(),
        );
        match span.set_parent(Context::new().with_remote_span_context(remote)) {
            // Without a `tracing-opentelemetry` layer, or with the span filtered out,
            // there is no OpenTelemetry span to set a parent on.
            Ok(()) | Err(SetParentError::LayerNotFound | SetParentError::SpanDisabled) => {}
            Err(error @ SetParentError::AlreadyStarted) => {
                debug!(%error, "could not set the OpenTelemetry parent of the task span");
            }
        }
    }

    /// Returns the OpenTelemetry span context of the current span as a `traceparent`,
    /// or `None` if it is invalid, as it is without a `tracing-opentelemetry` layer.
    pub(super) fn current_span_traceparent() -> Option<TraceParent> {
        let context = Span::current().context();
        let span = context.span();
        let span_context = span.span_context();
        if !span_context.is_valid() {
            return None;
        }
        TraceParent::new(
            u128::from_be_bytes(span_context.trace_id().to_bytes()),
            u64::from_be_bytes(span_context.span_id().to_bytes()),
            span_context.trace_flags().to_u8(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parse_reads_version_00() {
        let parsed: TraceParent = VALID.parse().unwrap();

        assert_eq!(parsed.trace_id(), 0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736);
        assert_eq!(parsed.parent_id(), 0x00f0_67aa_0ba9_02b7);
        assert_eq!(parsed.flags(), 0x01);
        assert!(parsed.is_sampled());
    }

    #[test]
    fn format_round_trips() {
        let unsampled = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";
        let parsed: TraceParent = unsampled.parse().unwrap();

        assert!(!parsed.is_sampled());
        assert_eq!(parsed.to_string(), unsampled);
        assert_eq!(VALID.parse::<TraceParent>().unwrap().to_string(), VALID);
    }

    #[test]
    fn format_pads_small_ids() {
        let traceparent = TraceParent::new(1, 2, 3).unwrap();

        assert_eq!(
            traceparent.to_string(),
            "00-00000000000000000000000000000001-0000000000000002-03"
        );
    }

    #[test]
    fn version_00_keeps_unknown_flags() {
        let parsed: TraceParent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-ff"
            .parse()
            .unwrap();

        assert_eq!(parsed.flags(), 0xff);
    }

    #[test]
    fn parse_rejects_invalid_values() {
        let cases = [
            ("", "shorter"),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
                "shorter",
            ),
            (
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                "trace id is all zeros",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
                "parent id is all zeros",
            ),
            (
                "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                "version ff",
            ),
            (
                "0G-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                "version",
            ),
            (
                "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
                "trace id",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00F067AA0BA902B7-01",
                "parent id",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0X",
                "flags",
            ),
            (
                "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
                "separated",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
                "separated",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
                "longer than 55",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
                "longer than 55",
            ),
            (
                " 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                "version",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01 ",
                "longer than 55",
            ),
            (
                "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-09what",
                "followed by '-'",
            ),
            (
                "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                "trace id",
            ),
        ];

        for (value, reason) in cases {
            let error = value.parse::<TraceParent>().unwrap_err();

            assert!(
                error.to_string().contains(reason),
                "{value:?}: expected {reason:?} in {error}"
            );
        }
    }

    #[test]
    fn error_names_the_value() {
        let value = "00-00000000000000000000000000000000-00f067aa0ba902b7-01";

        let error = value.parse::<TraceParent>().unwrap_err();

        assert_eq!(
            error.to_string(),
            format!("invalid traceparent {value:?}: the trace id is all zeros")
        );
    }

    #[test]
    fn later_versions_keep_only_sampled() {
        let exact = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-09";
        let extended = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-08-what-is-new";

        let exact: TraceParent = exact.parse().unwrap();
        let extended: TraceParent = extended.parse().unwrap();

        assert_eq!(exact.trace_id(), 0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736);
        assert_eq!(exact.parent_id(), 0x00f0_67aa_0ba9_02b7);
        assert_eq!(exact.flags(), 0x01);
        assert_eq!(extended.flags(), 0x00);
        assert_eq!(
            exact.to_string(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
    }

    #[test]
    fn new_rejects_zero_ids() {
        assert_eq!(TraceParent::new(0, 1, 1), None);
        assert_eq!(TraceParent::new(1, 0, 1), None);
        assert!(TraceParent::new(1, 1, 0).is_some());
    }

    #[test]
    fn new_root_is_random_and_sampled() {
        let first = TraceParent::new_root();
        let second = TraceParent::new_root();

        assert_ne!(first.trace_id(), second.trace_id());
        assert_ne!(first.parent_id(), second.parent_id());
        assert!(first.is_sampled());
        assert_eq!(first.flags(), SAMPLED);
        assert_eq!(first.to_string().parse::<TraceParent>(), Ok(first));
    }

    #[test]
    fn fill_keeps_header_set_by_caller() {
        let mut task = NewTask::default();
        task.headers.insert(
            TRACEPARENT_HEADER.to_owned(),
            "not a traceparent".to_owned(),
        );

        fill_traceparent(&mut task);

        assert_eq!(task.headers[TRACEPARENT_HEADER], "not a traceparent");
    }

    #[test]
    fn fill_outside_handler_starts_new_trace() {
        let mut first = NewTask::default();
        let mut second = NewTask::default();

        fill_traceparent(&mut first);
        fill_traceparent(&mut second);

        let first: TraceParent = first.headers[TRACEPARENT_HEADER].parse().unwrap();
        let second: TraceParent = second.headers[TRACEPARENT_HEADER].parse().unwrap();
        assert_ne!(first.trace_id(), second.trace_id());
        assert!(first.is_sampled());
    }

    #[tokio::test]
    async fn fill_inside_handler_uses_its_context() {
        let handler_trace: TraceParent = VALID.parse().unwrap();
        let child = handler_trace.child_of(0x1234);

        let header = HANDLER_TRACE
            .scope(child, async {
                let mut task = NewTask::default();
                fill_traceparent(&mut task);
                task.headers.remove(TRACEPARENT_HEADER)
            })
            .await;

        assert_eq!(
            header.as_deref(),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000001234-01")
        );
    }
}
