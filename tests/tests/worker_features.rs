//! The SDK worker's lease extension, cancellation signal and retry control against a
//! real broker.
//!
//! A handler that runs three times its lease is not offered again, because the worker
//! extends the lease. `Client::cancel_task` on a running task completes
//! `TaskContext::cancelled`. `HandlerError::no_retry` dead-letters the task after one
//! attempt, and `HandlerError::retry_after` delays the next attempt.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use docket::proto::{NewTask, RetryPolicy};
use docket::{
    Client, HandlerError, HandlerResult, Task, TaskContext, TaskState, TaskStatus, Worker,
};
use docket_tests::{BrokerProcess, QUIET, TempDir, WAIT, proto_duration, temp_dir, within};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

const QUEUE: &str = "reports";
const KIND: &str = "render_report";

/// A broker on its own store, with an SDK client connected to it.
struct Setup {
    _broker: BrokerProcess,
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
            _broker: broker,
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
        let description = format!("task {task_id} to reach state {state:?}");
        within(WAIT, &description, async {
            loop {
                let status = self.client.get_task(task_id).await?;
                if status.state() == state {
                    return Ok(status);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
    }
}

/// A worker running in the background until it is stopped.
struct RunningWorker {
    stop: oneshot::Sender<()>,
    running: JoinHandle<Result<(), docket::Error>>,
}

impl RunningWorker {
    /// Starts a worker on [`QUEUE`] with `lease_duration`, if given, that runs `handler`.
    fn start<F, Fut>(client: &Client, lease_duration: Option<Duration>, handler: F) -> Result<Self>
    where
        F: Fn(TaskContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = HandlerResult> + Send + 'static,
    {
        let mut builder = Worker::builder(client.clone())
            .queue(QUEUE)
            .concurrency(2)
            .shutdown_grace(Duration::from_secs(5));
        if let Some(lease_duration) = lease_duration {
            builder = builder.lease_duration(lease_duration);
        }
        let worker = builder.build(handler)?;

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

/// Waits for the next report a handler sent on `reports`.
async fn next_report<T>(reports: &mut mpsc::UnboundedReceiver<T>, description: &str) -> Result<T> {
    within(WAIT, description, async {
        reports
            .recv()
            .await
            .ok_or_else(|| anyhow!("the handler dropped its report channel"))
    })
    .await
}

#[tokio::test]
async fn long_handler_keeps_its_lease() -> Result<()> {
    let setup = Setup::start().await?;
    let lease = Duration::from_secs(1);
    let runs = Arc::new(AtomicU32::new(0));
    let handler_runs = Arc::clone(&runs);
    let worker = RunningWorker::start(&setup.client, Some(lease), move |_task| {
        handler_runs.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::time::sleep(lease * 3).await;
            Ok(None)
        }
    })?;

    let task_id = setup
        .enqueue(Task::new(QUEUE, KIND).max_attempts(3))
        .await?;
    let status = setup.wait_for_state(&task_id, TaskState::Succeeded).await?;
    // A redelivery after an expired lease would start the handler again.
    tokio::time::sleep(QUIET).await;
    worker.stop().await?;

    assert_eq!(status.attempts, 1, "attempts of {task_id}: {status:?}");
    assert_eq!(
        status.attempt_history.len(),
        1,
        "attempt history of {task_id}: {:?}",
        status.attempt_history
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1, "handler runs of {task_id}");
    Ok(())
}

/// What the cancellation test's handler observed.
#[derive(Debug)]
enum CancelReport {
    Started,
    Cancelled { is_cancelled: bool },
    TimedOut,
}

#[tokio::test]
async fn cancel_task_signals_running_handler() -> Result<()> {
    let setup = Setup::start().await?;
    let (reports, mut received) = mpsc::unbounded_channel();
    let worker = RunningWorker::start(&setup.client, None, move |task: TaskContext| {
        let reports = reports.clone();
        async move {
            let _ = reports.send(CancelReport::Started);
            let waited = tokio::time::timeout(WAIT, task.cancelled()).await;
            let report = match waited {
                Ok(()) => CancelReport::Cancelled {
                    is_cancelled: task.is_cancelled(),
                },
                Err(_) => CancelReport::TimedOut,
            };
            let _ = reports.send(report);
            Err(HandlerError::msg("stopped early: the task was cancelled"))
        }
    })?;

    let task_id = setup.enqueue(Task::new(QUEUE, KIND)).await?;
    let started = next_report(&mut received, "the handler to start").await?;
    assert!(
        matches!(started, CancelReport::Started),
        "first report: {started:?}"
    );

    let cancelled_at = Instant::now();
    let state = within(WAIT, "SDK cancel_task", async {
        Ok(setup.client.cancel_task(&task_id).await?)
    })
    .await?;
    assert_eq!(state, TaskState::Leased, "cancel_task of a running task");

    let report = next_report(&mut received, "the handler to see the cancellation").await?;
    let signal_delay = cancelled_at.elapsed();
    assert!(
        matches!(report, CancelReport::Cancelled { is_cancelled: true }),
        "handler report after cancel_task: {report:?}"
    );
    assert!(
        signal_delay < Duration::from_secs(5),
        "cancelled() completed {signal_delay:?} after cancel_task"
    );

    let status = setup.wait_for_state(&task_id, TaskState::Cancelled).await?;
    worker.stop().await?;

    assert_eq!(status.attempts, 1, "attempts of {task_id}: {status:?}");
    Ok(())
}

#[tokio::test]
async fn no_retry_dead_letters_at_once() -> Result<()> {
    let setup = Setup::start().await?;
    let runs = Arc::new(AtomicU32::new(0));
    let handler_runs = Arc::clone(&runs);
    let worker = RunningWorker::start(&setup.client, None, move |_task| {
        handler_runs.fetch_add(1, Ordering::SeqCst);
        async { Err(HandlerError::msg("invalid report id 0").no_retry()) }
    })?;

    let task_id = setup
        .enqueue(Task::new(QUEUE, KIND).max_attempts(5))
        .await?;
    let status = setup.wait_for_state(&task_id, TaskState::Dead).await?;
    tokio::time::sleep(QUIET).await;
    worker.stop().await?;

    assert_eq!(status.attempts, 1, "attempts of {task_id}: {status:?}");
    assert_eq!(status.last_error, "invalid report id 0");
    assert_eq!(runs.load(Ordering::SeqCst), 1, "handler runs of {task_id}");
    Ok(())
}

#[tokio::test]
async fn retry_after_delays_next_attempt() -> Result<()> {
    let setup = Setup::start().await?;
    let retry_delay = Duration::from_secs(2);
    let (reports, mut received) = mpsc::unbounded_channel();
    let worker = RunningWorker::start(&setup.client, None, move |task: TaskContext| {
        let reports = reports.clone();
        async move {
            let attempt = task.attempt();
            let _ = reports.send((attempt, Instant::now()));
            if attempt == 1 {
                Err(HandlerError::msg("report service busy").retry_after(retry_delay))
            } else {
                Ok(None)
            }
        }
    })?;

    // The task's own policy retries after 100 ms, so only the handler's delay can hold
    // the second attempt back for 2 s.
    let mut task = Task::new(QUEUE, KIND).max_attempts(3).into_proto();
    task.retry_policy = Some(RetryPolicy {
        initial_backoff: Some(proto_duration(Duration::from_millis(100))),
        multiplier: 1.0,
        max_backoff: Some(proto_duration(Duration::from_millis(100))),
        jitter: 0.0,
    });
    let task_id = setup.enqueue(task).await?;

    let (first_attempt, first_at) = next_report(&mut received, "the first attempt").await?;
    let (second_attempt, second_at) = next_report(&mut received, "the second attempt").await?;
    let gap = second_at - first_at;
    let status = setup.wait_for_state(&task_id, TaskState::Succeeded).await?;
    worker.stop().await?;

    assert_eq!(first_attempt, 1);
    assert_eq!(second_attempt, 2);
    // The first report comes before the Nack is sent, so the gap includes the Nack's
    // round trip and is never shorter than the broker's delay. 100 ms allows for timer
    // rounding.
    assert!(
        gap >= retry_delay - Duration::from_millis(100),
        "second attempt came {gap:?} after the first"
    );
    assert!(
        gap < retry_delay + Duration::from_secs(5),
        "second attempt came {gap:?} after the first"
    );
    assert_eq!(status.attempts, 2, "attempts of {task_id}: {status:?}");
    Ok(())
}
