//! The SDK client's task calls against a real broker.
//!
//! `Client::watch_task` streams each state change until a final state.
//! `Client::cancel_task` cancels a pending task so that it is never delivered. A payload
//! written with `Task::json` reaches a `Worker` handler that reads it back with
//! `TaskContext::json`.

use anyhow::{Context, Result, anyhow};
use docket::{
    Client, Error, HandlerResult, Task, TaskContext, TaskState, TaskStatus, TaskWatch, Worker,
};
use docket_tests::{
    BrokerProcess, QUIET, Subscription, TempDir, WAIT, ack, delivered_task_id, get_task, nack,
    temp_dir, within,
};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;
use tonic::Code;

const QUEUE: &str = "invoices";
const KIND: &str = "send_invoice";

/// A task id that is a well-formed UUIDv7 but was never issued by the broker.
const UNKNOWN_TASK_ID: &str = "0190a1b2-c3d4-7e5f-8a6b-7c8d9e0f1a2b";

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

    /// Opens a Subscribe stream on [`QUEUE`] with the harness's raw client.
    async fn subscribe(&self) -> Result<Subscription> {
        let mut broker_client = self.broker.client().await?;
        Ok(Subscription::open(&mut broker_client, &[QUEUE], 10, None).await?)
    }

    async fn enqueue(&self, task: Task) -> Result<String> {
        within(WAIT, "SDK enqueue", async {
            Ok(self.client.enqueue(task).await?)
        })
        .await
    }

    async fn watch(&self, task_id: &str) -> Result<TaskWatch> {
        within(WAIT, "SDK watch_task", async {
            Ok(self.client.watch_task(task_id).await?)
        })
        .await
    }

    /// Cancels `task_id` and returns the SDK's result, so that a test can check errors.
    async fn cancel(&self, task_id: &str) -> Result<Result<TaskState, Error>> {
        within(WAIT, "SDK cancel_task", async {
            Ok(self.client.cancel_task(task_id).await)
        })
        .await
    }
}

/// Waits for the next status of a watch, failing if the stream ends or yields an error.
async fn next_status(statuses: &mut TaskWatch) -> Result<TaskStatus> {
    within(WAIT, "a status from watch_task", async {
        let status = statuses
            .next()
            .await
            .ok_or_else(|| anyhow!("the watch ended before the expected status"))?;
        Ok(status?)
    })
    .await
}

/// Waits for a watch to end, failing if it yields another item first.
async fn expect_end(statuses: &mut TaskWatch, case: &str) -> Result<()> {
    let item = within(WAIT, "the watch to end", async {
        Ok(statuses.next().await)
    })
    .await
    .with_context(|| format!("{case}: the watch did not end"))?;
    assert!(
        item.is_none(),
        "{case}: item after the final state: {item:?}"
    );
    Ok(())
}

fn task_id_of(status: &TaskStatus) -> Option<&str> {
    status.task.as_ref().map(|task| task.id.as_str())
}

/// Asserts that `result` is `Error::Status` with `code` and a message containing
/// `fragment`.
fn assert_status<T: std::fmt::Debug>(
    case: &str,
    result: Result<T, Error>,
    code: Code,
    fragment: &str,
) {
    let error = match result {
        Ok(value) => panic!("{case}: expected {code:?}, got Ok({value:?})"),
        Err(error) => error,
    };
    let Error::Status(status) = &error else {
        panic!("{case}: expected Error::Status, got {error:?}");
    };
    assert_eq!(status.code(), code, "{case}: status code of {status:?}");
    assert_eq!(error.code(), Some(code), "{case}: Error::code");
    assert!(
        status.message().contains(fragment),
        "{case}: message {:?} does not contain {fragment:?}",
        status.message()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn watch_task_streams_until_succeeded() -> Result<()> {
    let setup = Setup::start().await?;
    let task_id = setup
        .enqueue(Task::new(QUEUE, KIND).payload("march"))
        .await?;

    let mut statuses = setup.watch(&task_id).await?;
    let pending = next_status(&mut statuses).await?;
    assert_eq!(pending.state(), TaskState::Pending, "first status");
    assert_eq!(
        task_id_of(&pending),
        Some(task_id.as_str()),
        "task id in the first status"
    );

    let mut subscription = setup.subscribe().await?;
    let delivery = subscription.next_delivery().await?;
    assert_eq!(delivered_task_id(&delivery)?, task_id, "delivered task id");
    let leased = next_status(&mut statuses).await?;
    assert_eq!(
        leased.state(),
        TaskState::Leased,
        "status after the delivery"
    );
    assert!(
        leased.lease_deadline.is_some(),
        "the LEASED status has no lease deadline"
    );

    let mut broker_client = setup.broker.client().await?;
    ack(&mut broker_client, &delivery.lease_id, "sent").await?;
    let succeeded = next_status(&mut statuses).await?;
    assert_eq!(
        succeeded.state(),
        TaskState::Succeeded,
        "status after the Ack"
    );
    assert_eq!(&succeeded.result[..], b"sent", "result in the final status");
    assert_eq!(succeeded.attempts, 1, "attempts in the final status");
    expect_end(&mut statuses, "watch of a task that succeeded").await?;

    // A watch that starts on a final task yields that status alone.
    let mut late = setup.watch(&task_id).await?;
    let status = next_status(&mut late).await?;
    assert_eq!(
        status.state(),
        TaskState::Succeeded,
        "first status of a watch started after success"
    );
    expect_end(&mut late, "watch started after success").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_task_pending_never_delivered() -> Result<()> {
    let setup = Setup::start().await?;
    // Both tasks have the same priority, so without the cancellation the first one
    // enqueued would be delivered first.
    let cancelled_id = setup
        .enqueue(Task::new(QUEUE, KIND).payload("cancelled"))
        .await?;
    let kept_id = setup
        .enqueue(Task::new(QUEUE, KIND).payload("kept"))
        .await?;

    let state = setup.cancel(&cancelled_id).await??;
    assert_eq!(state, TaskState::Cancelled, "cancel_task of a pending task");

    let status = within(WAIT, "SDK get_task", async {
        Ok(setup.client.get_task(&cancelled_id).await?)
    })
    .await?;
    assert_eq!(
        status.state(),
        TaskState::Cancelled,
        "get_task after cancel_task"
    );

    let mut statuses = setup.watch(&cancelled_id).await?;
    let watched = next_status(&mut statuses).await?;
    assert_eq!(
        watched.state(),
        TaskState::Cancelled,
        "first status of a watch on a cancelled task"
    );
    expect_end(&mut statuses, "watch of a cancelled task").await?;

    let mut subscription = setup.subscribe().await?;
    let delivery = subscription.next_delivery().await?;
    assert_eq!(
        delivered_task_id(&delivery)?,
        kept_id,
        "the only task delivered is the one not cancelled"
    );
    subscription
        .expect_no_delivery(QUIET)
        .await
        .context("the cancelled task was delivered")?;

    assert_status(
        "second cancel_task of a cancelled task",
        setup.cancel(&cancelled_id).await?,
        Code::FailedPrecondition,
        &cancelled_id,
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_task_leased_notifies_worker() -> Result<()> {
    let setup = Setup::start().await?;
    let task_id = setup
        .enqueue(Task::new(QUEUE, KIND).payload("leased"))
        .await?;
    let mut subscription = setup.subscribe().await?;
    let delivery = subscription.next_delivery().await?;
    let mut statuses = setup.watch(&task_id).await?;
    let leased = next_status(&mut statuses).await?;
    assert_eq!(leased.state(), TaskState::Leased, "status before cancel");

    let state = setup.cancel(&task_id).await??;
    assert_eq!(state, TaskState::Leased, "cancel_task of a leased task");
    let notice = subscription.next_cancel_notice().await?;
    assert_eq!(notice.task_id, task_id, "task id of the cancel notice");

    // The worker gives up the attempt, so the task ends CANCELLED rather than retried.
    let mut broker_client = setup.broker.client().await?;
    nack(
        &mut broker_client,
        &delivery.lease_id,
        "cancelled by request",
    )
    .await?;
    let last = loop {
        let status = next_status(&mut statuses).await?;
        if status.state() != TaskState::Leased {
            break status;
        }
    };
    assert_eq!(
        last.state(),
        TaskState::Cancelled,
        "final status after the Nack"
    );
    expect_end(&mut statuses, "watch of a task cancelled while leased").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_task_id_not_found() -> Result<()> {
    let setup = Setup::start().await?;

    assert_status(
        "cancel_task of an unknown id",
        setup.cancel(UNKNOWN_TASK_ID).await?,
        Code::NotFound,
        UNKNOWN_TASK_ID,
    );
    assert_status(
        "cancel_task of a malformed id",
        setup.cancel("not-a-uuid").await?,
        Code::InvalidArgument,
        "task_id",
    );

    let watch = within(WAIT, "SDK watch_task", async {
        Ok(setup.client.watch_task(UNKNOWN_TASK_ID).await.map(|_| ()))
    })
    .await?;
    assert_status(
        "watch_task of an unknown id",
        watch,
        Code::NotFound,
        UNKNOWN_TASK_ID,
    );
    Ok(())
}

/// An invoice as (customer, amount in cents, line items). Standard library types
/// implement serde's traits, so this file needs no serde dependency of its own.
type Invoice = (String, u64, Vec<String>);

/// What the worker's handler saw in one delivery.
#[derive(Debug)]
struct Received {
    task_id: String,
    content_type: Option<String>,
    invoice: Result<Invoice, String>,
}

/// An SDK worker on [`QUEUE`] with [`handle_invoice`] as its handler.
struct InvoiceWorker {
    received: mpsc::Receiver<Received>,
    stop: oneshot::Sender<()>,
    running: JoinHandle<Result<(), Error>>,
}

impl InvoiceWorker {
    fn start(client: Client) -> Result<Self> {
        let (reports, received) = mpsc::channel(16);
        let worker = Worker::builder(client)
            .queue(QUEUE)
            .concurrency(2)
            .build(move |task: TaskContext| handle_invoice(task, reports.clone()))?;

        let (stop, stopped) = oneshot::channel::<()>();
        let running = tokio::spawn(worker.run(async {
            let _ = stopped.await;
        }));
        Ok(InvoiceWorker {
            received,
            stop,
            running,
        })
    }

    /// Waits for the handler's report on the next delivery.
    async fn next_received(&mut self) -> Result<Received> {
        within(WAIT, "the handler to run", async {
            self.received
                .recv()
                .await
                .ok_or_else(|| anyhow!("the worker stopped without running the handler"))
        })
        .await
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

/// Decodes the payload as an [`Invoice`], reports what it saw on `reports` and fails
/// the attempt if decoding failed.
async fn handle_invoice(task: TaskContext, reports: mpsc::Sender<Received>) -> HandlerResult {
    let invoice = task.json::<Invoice>();
    let report = Received {
        task_id: task.id().to_owned(),
        content_type: task.header("content-type").map(str::to_owned),
        invoice: match &invoice {
            Ok(invoice) => Ok(invoice.clone()),
            Err(error) => Err(error.to_string()),
        },
    };
    let _ = reports.send(report).await;

    let (customer, cents, _lines) = invoice?;
    let result = format!("{cents} cents for {customer}");
    Ok(Some(result.into()))
}

#[tokio::test(flavor = "multi_thread")]
async fn json_task_reaches_handler() -> Result<()> {
    let setup = Setup::start().await?;
    let mut worker = InvoiceWorker::start(setup.client.clone())?;
    let invoice: Invoice = (
        "Zoë & Co".to_owned(),
        12_345,
        vec!["hosting".to_owned(), "support \"gold\"".to_owned()],
    );

    let task = Task::new(QUEUE, KIND).json(&invoice)?;
    let task_id = setup.enqueue(task).await?;

    let report = worker.next_received().await?;
    assert_eq!(report.task_id, task_id, "task id in the handler");
    assert_eq!(
        report.content_type.as_deref(),
        Some("application/json"),
        "content-type header in the handler"
    );
    assert_eq!(
        report.invoice,
        Ok(invoice),
        "invoice decoded by the handler"
    );

    let mut broker_client = setup.broker.client().await?;
    let stored = get_task(&mut broker_client, &task_id).await?;
    let payload = stored.task.map(|task| task.payload).unwrap_or_default();
    assert_eq!(
        std::str::from_utf8(&payload)?,
        r#"["Zoë & Co",12345,["hosting","support \"gold\""]]"#,
        "payload on the wire"
    );

    let mut statuses = setup.watch(&task_id).await?;
    let last = loop {
        let status = next_status(&mut statuses).await?;
        if status.state() != TaskState::Pending && status.state() != TaskState::Leased {
            break status;
        }
    };
    assert_eq!(last.state(), TaskState::Succeeded, "final state");
    assert_eq!(
        &last.result[..],
        b"12345 cents for Zo\xc3\xab & Co",
        "result stored by the handler"
    );

    worker.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_content_type_fails_attempt() -> Result<()> {
    let setup = Setup::start().await?;
    let mut worker = InvoiceWorker::start(setup.client.clone())?;

    let task = Task::new(QUEUE, KIND)
        .payload("customer,cents\nacme,5\n")
        .header("content-type", "text/csv")
        .max_attempts(1);
    let task_id = setup.enqueue(task).await?;

    let report = worker.next_received().await?;
    let message = report
        .invoice
        .expect_err("a text/csv payload decoded as JSON");
    assert!(message.contains(&task_id), "{message}");
    assert!(message.contains("\"text/csv\""), "{message}");
    assert!(message.contains("expected application/json"), "{message}");

    let mut statuses = setup.watch(&task_id).await?;
    let last = loop {
        let status = next_status(&mut statuses).await?;
        if status.state() != TaskState::Pending && status.state() != TaskState::Leased {
            break status;
        }
    };
    assert_eq!(
        last.state(),
        TaskState::Dead,
        "state after the only attempt failed"
    );
    assert_eq!(last.last_error, message, "last error of the task");

    let mut broker_client = setup.broker.client().await?;
    let status = get_task(&mut broker_client, &task_id).await?;
    assert_eq!(status.attempts, 1, "attempts of the task");

    worker.stop().await
}
