//! Client and worker SDK for Docket, a durable task queue.
//!
//! A [`Client`] enqueues [`Task`]s, one or a batch, looks them up, watches their state
//! changes with [`Client::watch_task`] and cancels them with [`Client::cancel_task`]. A
//! task carries its options: priority, maximum attempts, a [`RetryPolicy`], an
//! idempotency key and headers.
//!
//! A [`Worker`] subscribes to one or more queues, with weights, and runs the async handler
//! of each delivered task's kind, a bounded number at once. It acks the task when the
//! handler returns `Ok` and nacks it when the handler returns `Err` or panics. A
//! [`HandlerError`] can ask for no retry or for a specific delay. While a handler runs,
//! the worker extends its lease, and passes on a cancellation with
//! [`TaskContext::cancelled`]. It reconnects with exponential backoff and jitter when the
//! broker goes away. [`Worker::run`] shuts down gracefully: it stops taking tasks, gives
//! running handlers a grace period, and nacks the ones still running at its end so that
//! another worker runs them at once.
//!
//! A payload is raw bytes, set with [`Task::payload`] and read with
//! [`TaskContext::payload`]. With the `json` feature, which is on by default,
//! `Task::json` encodes any `serde::Serialize` value and sets the header
//! `content-type: application/json`, and `TaskContext::json` decodes it. Turn the
//! feature off (`default-features = false`) to drop the serde and serde_json
//! dependencies.
//!
//! Tasks meant for a later time go through Docket's scheduler, a separate service with its
//! own address, because the broker only stores tasks that are ready now. A client created
//! with [`Client::with_scheduler`] can call [`Client::enqueue_in`] and
//! [`Client::enqueue_at`]: the scheduler keeps the task and enqueues it into the broker
//! when it is due, and [`Client::cancel_scheduled`] withdraws it before then.
//!
//! Delivery is at least once: a task whose lease expires, or whose stream breaks, is
//! offered again. Handlers should therefore be idempotent, for example by keying their
//! side effects on [`TaskContext::id`].
//!
//! # Tracing
//!
//! The worker runs each handler, and the ack or nack after it, inside an info-level
//! [`tracing`] span named `docket.task`. Its fields are `task_id`, `kind`, `queue`,
//! `attempt`, `trace_id`, `parent_span_id` and `span_id`, all ids in lowercase hex. The
//! trace comes from the task's W3C Trace Context header `traceparent`
//! ([`TRACEPARENT_HEADER`]): `trace_id` and `parent_span_id` are the header's trace id and
//! parent id. A task without a valid header gets a new random `trace_id` and no
//! `parent_span_id`, and an invalid header is logged at debug level and otherwise
//! ignored. `span_id` is a random id of the task span itself.
//!
//! [`Client::enqueue`], [`Client::enqueue_batch`], [`Client::enqueue_at`] and
//! [`Client::enqueue_in`] set `traceparent` on each task that has none. Inside a handler,
//! the value names the handler's trace, with the task span's `span_id` as parent id and the
//! same flags, so the new task continues that trace. The handler's context does not reach
//! tasks that the handler spawns with `tokio::spawn`. Elsewhere the value starts a new
//! trace with the `sampled` flag and random ids, so its parent id names no recorded span.
//! A `traceparent` that the task has already is sent unchanged, and [`TraceParent`] parses
//! and formats the header.
//!
//! The `opentelemetry` feature, which is off by default, links these spans to
//! OpenTelemetry through `tracing-opentelemetry`. The worker sets the OpenTelemetry parent
//! of the task span to the remote span context in `traceparent`. The client takes the
//! current span's OpenTelemetry context, when it is valid, before the handler's context.
//! Both need a `tracing_opentelemetry` layer in the subscriber. The exported span ids are
//! then the OpenTelemetry SDK's, not the `span_id` field, and so is the exported trace id
//! of a task without a valid `traceparent`.
//!
//! # Example
//!
#![cfg_attr(feature = "json", doc = "```no_run")]
#![cfg_attr(not(feature = "json"), doc = "```ignore")]
//! use docket::{Client, HandlerError, Task, TaskContext, Worker};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize)]
//! struct Email {
//!     to: String,
//!     subject: String,
//! }
//!
//! # async fn example() -> Result<(), docket::Error> {
//! let client = Client::connect("http://127.0.0.1:7070").await?;
//!
//! let email = Email {
//!     to: "zoe@example.com".to_owned(),
//!     subject: "Welcome".to_owned(),
//! };
//! let task = Task::new("emails", "send_email").json(&email)?;
//! let task_id = client.enqueue(task).await?;
//! println!("enqueued {task_id}");
//!
//! let worker = Worker::builder(client)
//!     .queue("emails")
//!     .concurrency(50)
//!     .handle("send_email", |task: TaskContext| async move {
//!         let email: Email = task.json()?;
//!         println!(
//!             "sending {:?} to {}, attempt {}",
//!             email.subject,
//!             email.to,
//!             task.attempt()
//!         );
//!         Ok::<_, HandlerError>(None)
//!     })
//!     .build_handlers()?;
//!
//! // Runs until SIGTERM or Ctrl-C, then lets running handlers finish.
//! worker.run(docket::shutdown_signal()).await
//! # }
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod backoff;
mod client;
mod connection;
mod context;
mod error;
mod handler;
#[cfg(feature = "json")]
mod json;
mod retry;
mod schedule;
mod signal;
mod task;
mod trace;
mod watch;
mod worker;

pub use crate::client::Client;
pub use crate::connection::{CallCredentials, ClientBuilder, GrpcChannel};
pub use crate::context::TaskContext;
pub use crate::error::Error;
pub use crate::handler::{HandlerError, HandlerResult};
#[cfg(feature = "json")]
pub use crate::json::{CONTENT_TYPE_HEADER, JSON_CONTENT_TYPE};
pub use crate::retry::RetryPolicy;
pub use crate::schedule::ScheduledTask;
pub use crate::signal::shutdown_signal;
pub use crate::task::Task;
pub use crate::trace::{ParseTraceParentError, TRACEPARENT_HEADER, TraceParent};
pub use crate::watch::TaskWatch;
pub use crate::worker::{Worker, WorkerBuilder};

pub use bytes::Bytes;
/// Protobuf well-known types, such as `Timestamp` and `Duration`, used by the messages of
/// [`proto`].
pub use prost_types;

/// The generated wire types of package `docket.v1`, such as [`proto::TaskStatus`] that
/// [`Client::get_task`] returns.
pub mod proto {
    pub use docket_proto::v1::*;
}

pub use docket_proto::v1::{TaskState, TaskStatus};
