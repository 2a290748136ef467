//! W3C Trace Context in the SDK against a real broker and scheduler.
//!
//! The worker runs each handler inside a `docket.task` span whose fields carry the task
//! and the trace of its `traceparent` header. The client sets `traceparent` on every
//! enqueue path: a new trace outside a handler, the handler's trace inside one. With
//! OpenTelemetry, the exported task span is a child of the header's remote parent.
//!
//! The tests run on tokio's current-thread runtime, so the worker's futures run on the
//! test's thread, where `tracing::subscriber::set_default` installs the capturing
//! subscriber.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use docket::proto::NewTask;
use docket::{
    Client, HandlerResult, TRACEPARENT_HEADER, Task, TaskContext, TaskState, TaskStatus, Worker,
};
use docket_tests::{BrokerProcess, SchedulerProcess, TempDir, WAIT, temp_dir, within};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

const QUEUE: &str = "traced";
const TASK_SPAN: &str = "docket.task";

/// Events and spans of the SDK and of this test, without those of tonic, hyper and h2.
fn docket_targets() -> Targets {
    Targets::new()
        .with_target("docket", Level::TRACE)
        .with_target("sdk_tracing", Level::TRACE)
}

// ---------------------------------------------------------------------------------------
// Capturing subscriber
// ---------------------------------------------------------------------------------------

/// A span as the capturing layer saw it, with the fields given at creation and recorded
/// later.
#[derive(Debug, Clone)]
struct CapturedSpan {
    name: String,
    fields: HashMap<String, String>,
}

impl CapturedSpan {
    fn field(&self, name: &str) -> Option<&str> {
        self.fields.get(name).map(String::as_str)
    }
}

/// An event with the fields of the innermost `docket.task` span it happened in.
#[derive(Debug, Clone)]
struct CapturedEvent {
    message: String,
    task_span: Option<HashMap<String, String>>,
}

/// Everything the capturing layer saw, shared with the test.
#[derive(Debug, Clone, Default)]
struct Capture {
    spans: Arc<Mutex<Vec<CapturedSpan>>>,
    events: Arc<Mutex<Vec<CapturedEvent>>>,
}

impl Capture {
    /// Returns the `docket.task` spans of `task_id`, one per attempt.
    fn task_spans(&self, task_id: &str) -> Vec<CapturedSpan> {
        self.spans
            .lock()
            .unwrap()
            .iter()
            .filter(|span| span.name == TASK_SPAN && span.field("task_id") == Some(task_id))
            .cloned()
            .collect()
    }

    /// Returns the events with `message` that happened inside the task span of `task_id`.
    fn events_in_task(&self, task_id: &str, message: &str) -> Vec<CapturedEvent> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|event| event.message == message)
            .filter(|event| {
                event
                    .task_span
                    .as_ref()
                    .and_then(|fields| fields.get("task_id"))
                    .is_some_and(|id| id == task_id)
            })
            .cloned()
            .collect()
    }

    /// Waits until the worker has logged the ack of `task_id` inside its task span, which
    /// happens after the broker reports the task SUCCEEDED.
    async fn wait_for_ack_log(&self, task_id: &str) -> Result<()> {
        let description = format!("the \"acked\" log of task {task_id} in its span");
        within(WAIT, &description, async {
            while self.events_in_task(task_id, "acked").is_empty() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok(())
        })
        .await
    }

    /// Returns the single `docket.task` span of `task_id`.
    fn single_task_span(&self, task_id: &str) -> Result<CapturedSpan> {
        let mut spans = self.task_spans(task_id);
        ensure!(
            spans.len() == 1,
            "expected one {TASK_SPAN} span for task {task_id}, found {spans:?}"
        );
        Ok(spans.remove(0))
    }
}

/// Index of a span's entry in [`Capture::spans`], kept in the span's extensions.
struct SpanIndex(usize);

/// A layer that records span names and fields, and events with their task span.
struct CaptureLayer(Capture);

impl<S> Layer<S> for CaptureLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attributes: &Attributes<'_>, id: &Id, context: Context<'_, S>) {
        let mut fields = FieldMap::default();
        attributes.record(&mut fields);
        let mut spans = self.0.spans.lock().unwrap();
        spans.push(CapturedSpan {
            name: attributes.metadata().name().to_owned(),
            fields: fields.0,
        });
        if let Some(span) = context.span(id) {
            span.extensions_mut().insert(SpanIndex(spans.len() - 1));
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, context: Context<'_, S>) {
        let Some(span) = context.span(id) else {
            return;
        };
        let extensions = span.extensions();
        let Some(SpanIndex(index)) = extensions.get::<SpanIndex>() else {
            return;
        };
        let mut fields = FieldMap::default();
        values.record(&mut fields);
        self.0.spans.lock().unwrap()[*index].fields.extend(fields.0);
    }

    fn on_event(&self, event: &Event<'_>, context: Context<'_, S>) {
        let mut fields = FieldMap::default();
        event.record(&mut fields);
        let message = fields.0.remove("message").unwrap_or_default();

        let spans = self.0.spans.lock().unwrap();
        let task_span = context.event_scope(event).and_then(|scope| {
            scope
                .filter(|span| span.name() == TASK_SPAN)
                .find_map(|span| {
                    let extensions = span.extensions();
                    let SpanIndex(index) = extensions.get::<SpanIndex>()?;
                    Some(spans[*index].fields.clone())
                })
        });
        drop(spans);

        self.0
            .events
            .lock()
            .unwrap()
            .push(CapturedEvent { message, task_span });
    }
}

/// Field values as strings, by field name.
#[derive(Default)]
struct FieldMap(HashMap<String, String>);

impl Visit for FieldMap {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_owned(), value.to_string());
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().to_owned(), value.to_string());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
}

/// Installs a capturing subscriber on this thread until the guard is dropped.
fn capture_on_this_thread() -> (Capture, tracing::subscriber::DefaultGuard) {
    let capture = Capture::default();
    let subscriber = tracing_subscriber::registry()
        .with(docket_targets())
        .with(CaptureLayer(capture.clone()));
    let guard = tracing::subscriber::set_default(subscriber);
    (capture, guard)
}

// ---------------------------------------------------------------------------------------
// Broker, worker and trace helpers
// ---------------------------------------------------------------------------------------

/// A broker on its own store, with an SDK client connected to it.
struct Setup {
    broker: BrokerProcess,
    client: Client,
    _data_dir: TempDir,
}

impl Setup {
    async fn start() -> Result<Self> {
        let data_dir = temp_dir();
        let broker = BrokerProcess::start(data_dir.path(), &[]).await?;
        let client = within(WAIT, "SDK connect", async {
            Ok(Client::connect(broker.endpoint()).await?)
        })
        .await?;
        Ok(Setup {
            broker,
            client,
            _data_dir: data_dir,
        })
    }

    async fn enqueue(&self, task: impl Into<NewTask>) -> Result<String> {
        let task = task.into();
        within(WAIT, "SDK enqueue", async {
            Ok(self.client.enqueue(task).await?)
        })
        .await
    }

    /// Polls GetTask until the task reaches `state`, and returns its status then.
    async fn wait_for_state(&self, task_id: &str, state: TaskState) -> Result<TaskStatus> {
        wait_for_state(&self.client, task_id, state).await
    }
}

/// Polls GetTask through `client` until the task reaches `state`, and returns its status.
async fn wait_for_state(client: &Client, task_id: &str, state: TaskState) -> Result<TaskStatus> {
    let description = format!("task {task_id} to reach state {state:?}");
    within(WAIT, &description, async {
        loop {
            let status = client.get_task(task_id).await?;
            if status.state() == state {
                return Ok(status);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
}

/// A worker on [`QUEUE`] running in the background until it is stopped.
struct RunningWorker {
    stop: oneshot::Sender<()>,
    running: JoinHandle<Result<(), docket::Error>>,
}

impl RunningWorker {
    fn start<F, Fut>(client: &Client, handler: F) -> Result<Self>
    where
        F: Fn(TaskContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = HandlerResult> + Send + 'static,
    {
        let worker = Worker::builder(client.clone())
            .queue(QUEUE)
            .concurrency(2)
            .shutdown_grace(Duration::from_secs(5))
            // Acks go out at once, so the "acked" log follows the handler quickly.
            .settle_batch(1, Duration::from_millis(10))
            .build(handler)?;
        let (stop, stopped) = oneshot::channel::<()>();
        let running = tokio::spawn(worker.run(async {
            let _ = stopped.await;
        }));
        Ok(RunningWorker { stop, running })
    }

    /// Stops the worker and returns the result of `Worker::run`.
    async fn stop(self) -> Result<()> {
        let _ = self.stop.send(());
        within(WAIT, "the worker to stop", async {
            Ok(self.running.await.context("the worker task panicked")??)
        })
        .await
    }
}

/// A handler that logs "handler ran" and succeeds.
async fn logging_handler(task: TaskContext) -> HandlerResult {
    tracing::info!(task_id = task.id(), "handler ran");
    Ok(None)
}

/// The three fields of a version 00 `traceparent`, read without the SDK's parser.
#[derive(Debug, Clone, PartialEq, Eq)]
struct HeaderFields {
    trace_id: String,
    parent_id: String,
    flags: String,
}

/// Splits a version 00 `traceparent` into its fields, checking the W3C format: lowercase
/// hex of the right lengths, and ids that are not all zeros.
fn header_fields(value: &str) -> Result<HeaderFields> {
    let parts: Vec<&str> = value.split('-').collect();
    let [version, trace_id, parent_id, flags] = parts[..] else {
        bail!("traceparent {value:?} does not have 4 fields");
    };
    let lower_hex = |part: &str, length: usize| {
        part.len() == length && part.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    ensure!(version == "00", "traceparent {value:?} is not version 00");
    ensure!(
        lower_hex(trace_id, 32),
        "trace id of {value:?} is not 32 hex digits"
    );
    ensure!(
        lower_hex(parent_id, 16),
        "parent id of {value:?} is not 16 hex digits"
    );
    ensure!(
        lower_hex(flags, 2),
        "flags of {value:?} are not 2 hex digits"
    );
    ensure!(
        trace_id.bytes().any(|b| b != b'0'),
        "trace id of {value:?} is zero"
    );
    ensure!(
        parent_id.bytes().any(|b| b != b'0'),
        "parent id of {value:?} is zero"
    );
    Ok(HeaderFields {
        trace_id: trace_id.to_owned(),
        parent_id: parent_id.to_owned(),
        flags: flags.to_owned(),
    })
}

/// Returns the fields of the `traceparent` header that the broker stored for a task.
fn stored_traceparent(status: &TaskStatus) -> Result<HeaderFields> {
    let task = status.task.as_ref().context("GetTask returned no task")?;
    let value = task
        .headers
        .get(TRACEPARENT_HEADER)
        .with_context(|| format!("task {} has no traceparent header", task.id))?;
    header_fields(value)
}

/// Returns a `traceparent` with random ids, so that no run can match a fixed value.
fn random_traceparent(flags: u8) -> (String, HeaderFields) {
    let trace_id = format!("{:032x}", rand::random::<u128>() | 1);
    let parent_id = format!("{:016x}", rand::random::<u64>() | 1);
    let flags = format!("{flags:02x}");
    let value = format!("00-{trace_id}-{parent_id}-{flags}");
    let fields = HeaderFields {
        trace_id,
        parent_id,
        flags,
    };
    (value, fields)
}

/// Checks that a task span's own `span_id` is 16 hex digits and not zero.
fn span_id_of(span: &CapturedSpan) -> Result<String> {
    let span_id = span
        .field("span_id")
        .with_context(|| format!("span without span_id: {span:?}"))?;
    ensure!(
        span_id.len() == 16 && u64::from_str_radix(span_id, 16).is_ok_and(|id| id != 0),
        "span_id {span_id:?} is not 16 hex digits or is zero"
    );
    Ok(span_id.to_owned())
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn task_span_carries_task_and_traceparent() -> Result<()> {
    let (capture, _guard) = capture_on_this_thread();
    let setup = Setup::start().await?;
    let worker = RunningWorker::start(&setup.client, logging_handler)?;
    let (traceparent, expected) = random_traceparent(0x01);

    let task_id = setup
        .enqueue(Task::new(QUEUE, "render_report").header(TRACEPARENT_HEADER, &traceparent))
        .await?;
    let status = setup.wait_for_state(&task_id, TaskState::Succeeded).await?;
    capture.wait_for_ack_log(&task_id).await?;
    worker.stop().await?;

    let span = capture.single_task_span(&task_id)?;
    assert_eq!(span.field("kind"), Some("render_report"), "{span:?}");
    assert_eq!(span.field("queue"), Some(QUEUE), "{span:?}");
    assert_eq!(span.field("attempt"), Some("1"), "{span:?}");
    assert_eq!(
        span.field("trace_id"),
        Some(expected.trace_id.as_str()),
        "{span:?}"
    );
    assert_eq!(
        span.field("parent_span_id"),
        Some(expected.parent_id.as_str()),
        "{span:?}"
    );
    let span_id = span_id_of(&span)?;
    assert_ne!(span_id, expected.parent_id);

    let handler_events = capture.events_in_task(&task_id, "handler ran");
    assert_eq!(handler_events.len(), 1, "{handler_events:?}");
    assert_eq!(
        stored_traceparent(&status)?,
        expected,
        "the client changed the traceparent that the task had"
    );
    Ok(())
}

#[tokio::test]
async fn client_starts_trace_outside_handler() -> Result<()> {
    let (capture, _guard) = capture_on_this_thread();
    let setup = Setup::start().await?;
    let worker = RunningWorker::start(&setup.client, logging_handler)?;

    let single_id = setup.enqueue(Task::new(QUEUE, "single")).await?;
    let batch_ids = within(WAIT, "SDK enqueue_batch", async {
        Ok(setup
            .client
            .enqueue_batch([Task::new(QUEUE, "batched"), Task::new(QUEUE, "batched")])
            .await?)
    })
    .await?;

    let mut trace_ids = Vec::new();
    for task_id in std::iter::once(&single_id).chain(&batch_ids) {
        let status = setup.wait_for_state(task_id, TaskState::Succeeded).await?;
        let header = stored_traceparent(&status)?;
        assert_eq!(header.flags, "01", "a new trace is sampled: {header:?}");

        capture.wait_for_ack_log(task_id).await?;
        let span = capture.single_task_span(task_id)?;
        assert_eq!(span.field("trace_id"), Some(header.trace_id.as_str()));
        assert_eq!(
            span.field("parent_span_id"),
            Some(header.parent_id.as_str())
        );
        trace_ids.push(header.trace_id);
    }
    worker.stop().await?;

    trace_ids.sort();
    trace_ids.dedup();
    assert_eq!(trace_ids.len(), 3, "each task starts its own trace");
    Ok(())
}

#[tokio::test]
async fn handler_enqueue_continues_its_trace() -> Result<()> {
    let (capture, _guard) = capture_on_this_thread();
    let setup = Setup::start().await?;
    let (children, mut child_ids) = mpsc::unbounded_channel::<Result<String, String>>();
    let client = setup.client.clone();
    let worker = RunningWorker::start(&setup.client, move |task: TaskContext| {
        let client = client.clone();
        let children = children.clone();
        async move {
            if task.kind() == "parent" {
                let enqueued = client.enqueue(Task::new(QUEUE, "child")).await;
                let _ = children.send(enqueued.map_err(|error| error.to_string()));
            }
            Ok(None)
        }
    })?;
    // Unsampled, so the test also checks that the child keeps the flags.
    let (traceparent, incoming) = random_traceparent(0x00);

    let parent_id = setup
        .enqueue(Task::new(QUEUE, "parent").header(TRACEPARENT_HEADER, &traceparent))
        .await?;
    let child_id = within(WAIT, "the handler to enqueue the child", async {
        child_ids
            .recv()
            .await
            .ok_or_else(|| anyhow!("the handler dropped its channel"))?
            .map_err(|error| anyhow!("enqueue in the handler failed: {error}"))
    })
    .await?;
    let child_status = setup
        .wait_for_state(&child_id, TaskState::Succeeded)
        .await?;
    capture.wait_for_ack_log(&parent_id).await?;
    capture.wait_for_ack_log(&child_id).await?;
    worker.stop().await?;

    let parent_span = capture.single_task_span(&parent_id)?;
    let parent_span_id = span_id_of(&parent_span)?;
    let child_header = stored_traceparent(&child_status)?;
    assert_eq!(child_header.trace_id, incoming.trace_id);
    assert_eq!(child_header.parent_id, parent_span_id);
    assert_eq!(child_header.flags, incoming.flags);

    let child_span = capture.single_task_span(&child_id)?;
    assert_eq!(
        child_span.field("trace_id"),
        Some(incoming.trace_id.as_str())
    );
    assert_eq!(
        child_span.field("parent_span_id"),
        Some(parent_span_id.as_str())
    );
    Ok(())
}

#[tokio::test]
async fn invalid_traceparent_is_ignored() -> Result<()> {
    let (capture, _guard) = capture_on_this_thread();
    let setup = Setup::start().await?;
    let worker = RunningWorker::start(&setup.client, logging_handler)?;
    let invalid = [
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "not a traceparent",
    ];

    for value in invalid {
        let task_id = setup
            .enqueue(Task::new(QUEUE, "render_report").header(TRACEPARENT_HEADER, value))
            .await?;
        let status = setup.wait_for_state(&task_id, TaskState::Succeeded).await?;
        capture.wait_for_ack_log(&task_id).await?;

        let task = status.task.as_ref().context("GetTask returned no task")?;
        assert_eq!(
            task.headers.get(TRACEPARENT_HEADER).map(String::as_str),
            Some(value),
            "the client replaced the caller's header"
        );
        assert_eq!(status.attempts, 1, "{value:?}: {status:?}");
        let span = capture.single_task_span(&task_id)?;
        assert_eq!(span.field("parent_span_id"), None, "{value:?}: {span:?}");
        let trace_id = span.field("trace_id").context("span without trace_id")?;
        assert_eq!(trace_id.len(), 32, "{value:?}: {span:?}");
        assert!(!value.contains(trace_id), "{value:?}: {span:?}");
        assert_eq!(
            capture.events_in_task(&task_id, "handler ran").len(),
            1,
            "{value:?}"
        );
    }
    worker.stop().await?;

    let ignored = capture
        .events
        .lock()
        .unwrap()
        .iter()
        .filter(|event| event.message == "ignoring the invalid traceparent header")
        .count();
    assert_eq!(ignored, invalid.len());
    Ok(())
}

#[tokio::test]
async fn scheduled_task_keeps_caller_trace() -> Result<()> {
    let setup = Setup::start().await?;
    let scheduler_dir = temp_dir();
    let scheduler =
        SchedulerProcess::start(scheduler_dir.path(), &setup.broker.endpoint(), &[]).await?;
    let client = setup.client.clone().with_scheduler(scheduler.endpoint())?;
    let (traceparent, expected) = random_traceparent(0x01);

    let scheduled = within(WAIT, "SDK enqueue_at and enqueue_in", async {
        let now = SystemTime::now();
        Ok([
            client.enqueue_at(Task::new(QUEUE, "at"), now).await?,
            client
                .enqueue_in(Task::new(QUEUE, "in"), Duration::ZERO)
                .await?,
            client
                .enqueue_in(
                    Task::new(QUEUE, "kept").header(TRACEPARENT_HEADER, &traceparent),
                    Duration::ZERO,
                )
                .await?,
        ])
    })
    .await?;

    let mut scheduler_grpc = client.scheduler_grpc()?;
    let mut headers = Vec::new();
    for schedule in &scheduled {
        let task_id = within(WAIT, "the scheduler to release the task", async {
            loop {
                let response = scheduler_grpc
                    .get_schedule(docket::proto::GetScheduleRequest {
                        name: String::new(),
                        schedule_id: schedule.schedule_id().to_owned(),
                    })
                    .await?
                    .into_inner();
                let task_id = response
                    .schedule
                    .and_then(|schedule| schedule.last_outcome)
                    .map(|outcome| outcome.task_id)
                    .filter(|task_id| !task_id.is_empty());
                if let Some(task_id) = task_id {
                    return Ok(task_id);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await?;
        let status = setup.client.get_task(&task_id).await?;
        headers.push(stored_traceparent(&status)?);
    }

    assert_eq!(headers[0].flags, "01");
    assert_eq!(headers[1].flags, "01");
    assert_ne!(headers[0].trace_id, headers[1].trace_id);
    assert_eq!(headers[2], expected);
    Ok(())
}

#[tokio::test]
async fn opentelemetry_span_has_remote_parent() -> Result<()> {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(docket_targets())
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("docket-tests")));
    let _guard = tracing::subscriber::set_default(subscriber);

    let setup = Setup::start().await?;
    let (children, mut child_ids) = mpsc::unbounded_channel::<Result<String, String>>();
    let client = setup.client.clone();
    let worker = RunningWorker::start(&setup.client, move |task: TaskContext| {
        let client = client.clone();
        let children = children.clone();
        async move {
            if task.kind() == "parent" {
                let enqueued = client.enqueue(Task::new(QUEUE, "child")).await;
                let _ = children.send(enqueued.map_err(|error| error.to_string()));
            }
            Ok(None)
        }
    })?;
    let (traceparent, incoming) = random_traceparent(0x01);

    let parent_id = setup
        .enqueue(Task::new(QUEUE, "parent").header(TRACEPARENT_HEADER, &traceparent))
        .await?;
    let child_id = within(WAIT, "the handler to enqueue the child", async {
        child_ids
            .recv()
            .await
            .ok_or_else(|| anyhow!("the handler dropped its channel"))?
            .map_err(|error| anyhow!("enqueue in the handler failed: {error}"))
    })
    .await?;
    let child_status = setup
        .wait_for_state(&child_id, TaskState::Succeeded)
        .await?;
    let parent_span = wait_for_exported_task_span(&exporter, &parent_id).await?;
    let child_span = wait_for_exported_task_span(&exporter, &child_id).await?;
    worker.stop().await?;

    assert_eq!(
        format!("{:032x}", parent_span.span_context.trace_id()),
        incoming.trace_id
    );
    assert_eq!(
        format!("{:016x}", parent_span.parent_span_id),
        incoming.parent_id
    );
    assert!(parent_span.parent_span_is_remote, "{parent_span:?}");

    // The client inside the handler takes the exported span as the child's parent.
    let child_header = stored_traceparent(&child_status)?;
    let exported_parent_id = format!("{:016x}", parent_span.span_context.span_id());
    assert_eq!(child_header.trace_id, incoming.trace_id);
    assert_eq!(child_header.parent_id, exported_parent_id);
    assert_eq!(
        child_span.span_context.trace_id(),
        parent_span.span_context.trace_id()
    );
    assert_eq!(
        child_span.parent_span_id,
        parent_span.span_context.span_id()
    );
    Ok(())
}

/// Waits until the exporter has the ended `docket.task` span of `task_id`, and returns
/// it. A span ends after the worker settles its lease.
async fn wait_for_exported_task_span(
    exporter: &InMemorySpanExporter,
    task_id: &str,
) -> Result<SpanData> {
    let description = format!("the exported {TASK_SPAN} span of task {task_id}");
    within(WAIT, &description, async {
        loop {
            let spans = exporter.get_finished_spans()?;
            let found = spans.into_iter().find(|span| {
                span.name == TASK_SPAN
                    && span.attributes.iter().any(|attribute| {
                        attribute.key.as_str() == "task_id" && attribute.value.as_str() == task_id
                    })
            });
            if let Some(span) = found {
                return Ok(span);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}
