//! Client and worker SDK for Docket, a durable task queue.
//!
//! A [`Client`] enqueues [`Task`]s, looks them up, watches their state changes with
//! [`Client::watch_task`] and cancels them with [`Client::cancel_task`]. A [`Worker`]
//! subscribes to one or more queues and runs an async handler for each delivered task, a
//! bounded number at once. It acks the task when the handler returns `Ok` and nacks it
//! when the handler returns `Err` or panics.
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
//!     .build(|task: TaskContext| async move {
//!         let email: Email = task.json()?;
//!         println!(
//!             "sending {:?} to {}, attempt {}",
//!             email.subject,
//!             email.to,
//!             task.attempt()
//!         );
//!         Ok::<_, HandlerError>(None)
//!     })?;
//!
//! worker
//!     .run(async {
//!         let _ = tokio::signal::ctrl_c().await;
//!     })
//!     .await
//! # }
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod backoff;
mod client;
mod context;
mod error;
mod handler;
#[cfg(feature = "json")]
mod json;
mod schedule;
mod task;
mod watch;
mod worker;

pub use crate::client::Client;
pub use crate::context::TaskContext;
pub use crate::error::Error;
pub use crate::handler::{HandlerError, HandlerResult};
#[cfg(feature = "json")]
pub use crate::json::{CONTENT_TYPE_HEADER, JSON_CONTENT_TYPE};
pub use crate::schedule::ScheduledTask;
pub use crate::task::Task;
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
