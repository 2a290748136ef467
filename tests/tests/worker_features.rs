//! The SDK worker against a real broker: lease extension, the cancellation signal,
//! retry control, handlers by kind, queue weights, the shutdown deadline, reconnection
//! after a broker restart, and the task options of `Task`.
//!
//! A handler that runs three times its lease is not offered again, because the worker
//! extends the lease. `Client::cancel_task` on a running task completes
//! `TaskContext::cancelled`. `HandlerError::no_retry` dead-letters the task after one
//! attempt, and `HandlerError::retry_after` delays the next attempt. Handlers cut off at
//! the end of the shutdown grace period are nacked for an immediate retry.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use docket::proto::NewTask;
use docket::{
    Bytes, Client, HandlerError, HandlerResult, RetryPolicy, Task, TaskContext, TaskState,
    TaskStatus, Worker,
};
use docket_tests::{BrokerProcess, QUIET, TempDir, WAIT, temp_dir, within};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

const QUEUE: &str = "reports";
const KIND: &str = "render_report";

/// A broker on its own store, with an SDK client connected to it.
struct Setup {
    broker: BrokerProcess,
    client: Client,
    data_dir: TempDir,
}

impl Setup {
    async fn start() -> Result<Self> {
        Self::start_with(&[]).await
    }

    /// Starts the broker with `extra_args` on its command line.
    async fn start_with(extra_args: &[&str]) -> Result<Self> {
        let data_dir = temp_dir();
        let broker = BrokerProcess::start(data_dir.path(), extra_args).await?;
        let client = within(WAIT, "SDK connect", async {
            Ok(Client::connect(broker.endpoint()).await?)
        })
        .await?;
        Ok(Setup {
            broker,
            client,
            data_dir,
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
    let task = Task::new(QUEUE, KIND)
        .max_attempts(3)
        .retry_policy(RetryPolicy::fixed(Duration::from_millis(100)));
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

/// Starts a worker with `configure` applied to a builder on `client`, until `stop`
/// is sent.
fn spawn_worker(
    client: &Client,
    configure: impl FnOnce(docket::WorkerBuilder) -> Result<Worker, docket::Error>,
) -> Result<RunningWorker> {
    let worker = configure(Worker::builder(client.clone()))?;
    let (stop, stopped) = oneshot::channel::<()>();
    let running = tokio::spawn(worker.run(async {
        let _ = stopped.await;
    }));
    Ok(RunningWorker { stop, running })
}

#[tokio::test]
async fn handlers_run_by_task_kind() -> Result<()> {
    let setup = Setup::start().await?;
    let worker = spawn_worker(&setup.client, |builder| {
        builder
            .queue(QUEUE)
            .handle("render_pdf", |task: TaskContext| async move {
                Ok(Some(Bytes::from(format!("pdf of {}", task.id()))))
            })
            .handle("render_csv", |task: TaskContext| async move {
                Ok(Some(Bytes::from(format!("csv of {}", task.id()))))
            })
            .build_handlers()
    })?;

    let pdf = setup.enqueue(Task::new(QUEUE, "render_pdf")).await?;
    let csv = setup.enqueue(Task::new(QUEUE, "render_csv")).await?;
    let unknown = setup
        .enqueue(Task::new(QUEUE, "render_xls").max_attempts(1))
        .await?;
    let pdf_status = setup.wait_for_state(&pdf, TaskState::Succeeded).await?;
    let csv_status = setup.wait_for_state(&csv, TaskState::Succeeded).await?;
    let unknown_status = setup.wait_for_state(&unknown, TaskState::Dead).await?;
    worker.stop().await?;

    assert_eq!(pdf_status.result, Bytes::from(format!("pdf of {pdf}")));
    assert_eq!(csv_status.result, Bytes::from(format!("csv of {csv}")));
    assert_eq!(
        unknown_status.last_error,
        "no handler for task kind \"render_xls\": this worker handles render_csv, render_pdf"
    );
    Ok(())
}

#[tokio::test]
async fn queue_weights_share_one_worker() -> Result<()> {
    const EACH: usize = 40;
    const FIRST: usize = 20;
    let setup = Setup::start().await?;
    for queue in ["urgent", "bulk"] {
        let tasks = (0..EACH).map(|_| Task::new(queue, KIND));
        within(WAIT, "SDK enqueue_batch", async {
            Ok(setup.client.enqueue_batch(tasks).await?)
        })
        .await?;
    }

    // One slot and no prefetch, so handlers run in the broker's delivery order.
    let (reports, mut received) = mpsc::unbounded_channel();
    let worker = spawn_worker(&setup.client, move |builder| {
        builder
            .queue_weighted("urgent", 3)
            .queue("bulk")
            .concurrency(1)
            .build(move |task: TaskContext| {
                let _ = reports.send(task.queue().to_owned());
                async { Ok(None) }
            })
    })?;
    let mut order = Vec::new();
    for _ in 0..2 * EACH {
        order.push(next_report(&mut received, "the next delivery").await?);
    }
    worker.stop().await?;

    let urgent = order[..FIRST]
        .iter()
        .filter(|queue| *queue == "urgent")
        .count();
    // Weight 3 to 1 gives 15 of the first 20; one off either way allows for where the
    // broker's rotation starts.
    assert!(
        (14..=16).contains(&urgent),
        "{urgent} of the first {FIRST} deliveries from the weight-3 queue: {order:?}"
    );
    assert_eq!(
        order.iter().filter(|queue| *queue == "bulk").count(),
        EACH,
        "deliveries: {order:?}"
    );
    Ok(())
}

#[tokio::test]
async fn shutdown_deadline_nacks_for_an_immediate_retry() -> Result<()> {
    // A failed attempt waits an hour under the broker's policy, so only the worker's
    // zero retry delay can bring the tasks back within the test.
    let setup =
        Setup::start_with(&["--retry-initial-backoff", "1h", "--retry-max-backoff", "1h"]).await?;
    let (reports, mut received) = mpsc::unbounded_channel();
    let stuck = spawn_worker(&setup.client, move |builder| {
        builder
            .queue(QUEUE)
            .concurrency(2)
            .shutdown_grace(Duration::from_millis(300))
            .build(move |task: TaskContext| {
                let _ = reports.send(task.id().to_owned());
                async {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    Ok(None)
                }
            })
    })?;
    let first = setup
        .enqueue(Task::new(QUEUE, KIND).max_attempts(3))
        .await?;
    let second = setup
        .enqueue(Task::new(QUEUE, KIND).max_attempts(3))
        .await?;
    next_report(&mut received, "the first handler to start").await?;
    next_report(&mut received, "the second handler to start").await?;

    let stopping = Instant::now();
    stuck.stop().await?;
    let stop_time = stopping.elapsed();
    for task_id in [&first, &second] {
        for _ in 0..4 {
            let st = setup.client.get_task(task_id.as_str()).await?;
            eprintln!(
                "DEBUG {:?} {:?} {:?}",
                st.state(),
                st.lease_deadline,
                st.state_history
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let status = setup.wait_for_state(task_id, TaskState::Pending).await?;
        assert_eq!(status.attempts, 1, "attempts of {task_id}: {status:?}");
        assert_eq!(
            status.last_error, "the worker shut down before the handler finished",
            "{task_id}: {status:?}"
        );
    }
    assert!(
        stop_time < Duration::from_secs(3),
        "the worker took {stop_time:?} to stop with a grace period of 300 ms"
    );

    let finisher = RunningWorker::start(&setup.client, None, |_task| async { Ok(None) })?;
    for task_id in [&first, &second] {
        let status = setup.wait_for_state(task_id, TaskState::Succeeded).await?;
        assert_eq!(status.attempts, 2, "attempts of {task_id}: {status:?}");
    }
    finisher.stop().await?;
    Ok(())
}

#[tokio::test]
async fn worker_resumes_after_broker_restarts() -> Result<()> {
    let mut setup = Setup::start().await?;
    let (reports, mut received) = mpsc::unbounded_channel();
    let worker = spawn_worker(&setup.client, move |builder| {
        builder
            .queue(QUEUE)
            .reconnect_backoff(Duration::from_millis(50), Duration::from_millis(500))
            .build(move |task: TaskContext| {
                let _ = reports.send(task.id().to_owned());
                async { Ok(None) }
            })
    })?;
    let before = setup.enqueue(Task::new(QUEUE, KIND)).await?;
    assert_eq!(next_report(&mut received, "the task before").await?, before);
    setup.wait_for_state(&before, TaskState::Succeeded).await?;

    // A graceful stop, then a crash: the worker reconnects after each restart on the
    // same address and store.
    for crash in [false, true] {
        let addr = setup.broker.addr();
        if crash {
            setup.broker.kill9()?;
        } else {
            setup.broker.stop().await?;
        }
        // The worker's reconnect attempts fail for a while.
        tokio::time::sleep(Duration::from_millis(700)).await;
        setup.broker = BrokerProcess::start_on(addr, setup.data_dir.path(), &[]).await?;

        let after = setup.enqueue(Task::new(QUEUE, KIND)).await?;
        let ran = next_report(&mut received, "the task after the restart").await?;
        assert_eq!(ran, after, "crash: {crash}");
        setup.wait_for_state(&after, TaskState::Succeeded).await?;
    }
    worker.stop().await?;
    Ok(())
}

#[tokio::test]
async fn idempotency_key_returns_the_first_task() -> Result<()> {
    let setup = Setup::start().await?;
    let task = Task::new(QUEUE, KIND)
        .payload("first")
        .idempotency_key("report-2026-12");

    let first = setup.enqueue(task.clone()).await?;
    let again = setup.enqueue(task.payload("second")).await?;
    let other = setup
        .enqueue(Task::new(QUEUE, KIND).idempotency_key("report-2027-01"))
        .await?;
    let status = within(WAIT, "SDK get_task", async {
        Ok(setup.client.get_task(&first).await?)
    })
    .await?;

    assert_eq!(again, first);
    assert_ne!(other, first);
    assert_eq!(
        status.task.map(|task| task.payload),
        Some(Bytes::from("first"))
    );
    Ok(())
}

#[tokio::test]
async fn panicking_handler_nacks_and_worker_survives() -> Result<()> {
    let setup = Setup::start().await?;
    let worker = RunningWorker::start(&setup.client, None, |task: TaskContext| async move {
        if task.attempt() == 1 {
            panic!("report template missing for {}", task.id());
        }
        Ok(Some(Bytes::from("rendered")))
    })?;

    let task_id = setup
        .enqueue(Task::new(QUEUE, KIND).max_attempts(3))
        .await?;
    let status = setup.wait_for_state(&task_id, TaskState::Succeeded).await?;
    worker.stop().await?;

    assert_eq!(status.attempts, 2, "attempts of {task_id}: {status:?}");
    assert_eq!(
        status.attempt_history[0].error,
        format!("handler panicked: report template missing for {task_id}")
    );
    assert_eq!(status.result, Bytes::from("rendered"));
    Ok(())
}
