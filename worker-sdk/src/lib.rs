//! Client and worker SDK for Docket, a durable task queue.
//!
//! A [`Client`] enqueues [`Task`]s and looks them up. A [`Worker`] subscribes to one or
//! more queues and runs an async handler for each delivered task, a bounded number at
//! once. It acks the task when the handler returns `Ok` and nacks it when the handler
//! returns `Err` or panics.
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
//! ```no_run
//! use docket::{Client, HandlerError, Task, TaskContext, Worker};
//!
//! # async fn example() -> Result<(), docket::Error> {
//! let client = Client::connect("http://127.0.0.1:7070").await?;
//!
//! let task = Task::new("emails", "send_email").payload("zoe@example.com");
//! let task_id = client.enqueue(task).await?;
//! println!("enqueued {task_id}");
//!
//! let worker = Worker::builder(client)
//!     .queue("emails")
//!     .concurrency(50)
//!     .build(|task: TaskContext| async move {
//!         let recipient = std::str::from_utf8(task.payload())?;
//!         println!("sending to {recipient}, attempt {}", task.attempt());
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
mod schedule;
mod task;
mod worker;

pub use crate::client::Client;
pub use crate::context::TaskContext;
pub use crate::error::Error;
pub use crate::handler::{HandlerError, HandlerResult};
pub use crate::schedule::ScheduledTask;
pub use crate::task::Task;
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
