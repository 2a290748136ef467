//! An e-mail campaign: send one message to every opted-in customer of a country.
//!
//! The producer reads a customer CSV, filters it and enqueues one `send_email` task per
//! recipient. Workers render each message with `lettre` and deliver it into a Maildir,
//! after a simulated sending latency. Delivery is idempotent: the file name is built
//! from the task id, so a redelivered task replaces its earlier file.
//!
//! Start a broker on loopback, then run the whole campaign in one process:
//!
//! ```text
//! cargo run -p docket --example email_campaign -- --maildir /tmp/mail run
//! ```
//!
//! or produce and work in separate processes:
//!
//! ```text
//! cargo run -p docket --example email_campaign -- produce
//! cargo run -p docket --example email_campaign -- --maildir /tmp/mail work
//! ```

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use docket::{Bytes, Client, HandlerError, HandlerResult, Task, TaskContext, Worker};
use lettre::Message;
use lettre::message::Mailbox;
use lettre::message::header::ContentType;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

/// Task kind of one campaign message.
const KIND: &str = "send_email";

/// Tasks per Enqueue call, below the broker's default batch limit of 1000.
const BATCH_SIZE: usize = 500;

/// Sender of every campaign message.
const SENDER: &str = "Docket Campaigns <campaigns@example.com>";

/// Domain part of generated Message-ID headers.
const MESSAGE_ID_DOMAIN: &str = "campaigns.example.com";

const DEFAULT_CUSTOMERS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/data/customers.csv");

/// Send a campaign e-mail to every opted-in customer of a country, through Docket.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// Broker endpoint.
    #[arg(long, global = true, default_value = "http://127.0.0.1:7070")]
    broker: String,

    /// Maildir to deliver messages into, created if missing. Required by `work` and
    /// `run`.
    #[arg(long, global = true)]
    maildir: Option<PathBuf>,

    /// Simulated sending latency per message, in milliseconds.
    #[arg(long, global = true, default_value_t = 200)]
    send_ms: u64,

    /// Country code of the recipients, such as DE or FR. Only opted-in customers
    /// receive the message.
    #[arg(long, global = true, default_value = "DE")]
    country: String,

    /// Queue to enqueue to and work from.
    #[arg(long, global = true, default_value = "emails")]
    queue: String,

    /// Maximum number of messages a worker sends at once.
    #[arg(long, global = true, default_value_t = 200)]
    concurrency: usize,

    /// Customer CSV with columns id,name,email,country,opted_in,signup_date.
    #[arg(long, global = true, default_value = DEFAULT_CUSTOMERS)]
    customers: PathBuf,

    /// Subject line of the campaign.
    #[arg(long, global = true, default_value = "Our spring offers")]
    subject: String,

    /// Maximum delivery attempts per message, including the first.
    #[arg(long, global = true, default_value_t = 3)]
    max_attempts: u32,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Clone, Copy, Subcommand)]
enum Command {
    /// Enqueue one task per recipient, print the count and exit.
    Produce,
    /// Deliver messages into the Maildir until Ctrl-C or SIGTERM.
    Work,
    /// Produce, then work until every enqueued task is delivered or failed (the default).
    Run,
}

/// One row of the customer CSV.
#[derive(Debug, Deserialize)]
struct Customer {
    id: u64,
    name: String,
    email: String,
    country: String,
    opted_in: bool,
    // Parsed to validate the file. The campaign does not filter on it.
    #[allow(dead_code)]
    signup_date: String,
}

/// Payload of a `send_email` task.
#[derive(Debug, Serialize, Deserialize)]
struct EmailJob {
    recipient_id: u64,
    name: String,
    email: String,
    subject: String,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(io::stderr)
        .with_ansi(io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,docket=info".into()),
        )
        .init();

    let cli = Cli::parse();
    match run_command(&cli).await {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run_command(cli: &Cli) -> anyhow::Result<ExitCode> {
    match cli.command.unwrap_or(Command::Run) {
        Command::Produce => {
            let client = connect(cli).await?;
            let task_ids = produce(&client, cli).await?;
            println!(
                "enqueued {} send_email tasks to queue {:?}",
                task_ids.len(),
                cli.queue
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Work => {
            work(cli).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Run => run(cli).await,
    }
}

async fn connect(cli: &Cli) -> anyhow::Result<Client> {
    Client::connect(cli.broker.as_str()).await.with_context(|| {
        format!(
            "no broker is reachable at {} (start one, or pass --broker URL)",
            cli.broker
        )
    })
}

/// Reads the customers that receive the campaign: opted in and of the chosen country.
fn read_recipients(path: &Path, country: &str) -> anyhow::Result<Vec<Customer>> {
    let mut reader = csv::Reader::from_path(path)
        .with_context(|| format!("failed to open customer file {}", path.display()))?;

    let mut recipients = Vec::new();
    for (index, row) in reader.deserialize::<Customer>().enumerate() {
        // Line 1 is the header, so data row `index` is on line `index + 2`.
        let customer = row.with_context(|| {
            format!(
                "invalid customer on line {} of {}",
                index + 2,
                path.display()
            )
        })?;
        if customer.opted_in && customer.country.eq_ignore_ascii_case(country) {
            recipients.push(customer);
        }
    }
    Ok(recipients)
}

/// Enqueues one task per recipient in batches and returns the task ids.
async fn produce(client: &Client, cli: &Cli) -> anyhow::Result<Vec<String>> {
    let recipients = read_recipients(&cli.customers, &cli.country)?;

    let mut task_ids = Vec::with_capacity(recipients.len());
    for batch in recipients.chunks(BATCH_SIZE) {
        let mut tasks = Vec::with_capacity(batch.len());
        for customer in batch {
            let job = EmailJob {
                recipient_id: customer.id,
                name: customer.name.clone(),
                email: customer.email.clone(),
                subject: cli.subject.clone(),
            };
            let task = Task::new(cli.queue.as_str(), KIND)
                .payload(serde_json::to_vec(&job)?)
                .header("content-type", "application/json")
                .max_attempts(cli.max_attempts);
            tasks.push(task);
        }
        let ids = client
            .enqueue_batch(tasks)
            .await
            .with_context(|| format!("failed to enqueue to queue {:?}", cli.queue))?;
        task_ids.extend(ids);
    }
    Ok(task_ids)
}

/// Runs workers until Ctrl-C or SIGTERM, printing counts once per second while they
/// change.
async fn work(cli: &Cli) -> anyhow::Result<()> {
    let maildir = open_maildir(cli)?;
    let client = Client::connect_lazy(cli.broker.as_str())?;
    let tally = Arc::new(Tally::new(None));

    let reporter = tokio::spawn(report_progress(Arc::clone(&tally)));
    let worker = build_worker(client, cli, maildir, Arc::clone(&tally))?;
    let result = worker.run(stop_signal()).await;
    reporter.abort();

    let (delivered, failed) = tally.totals();
    eprintln!("stopped: delivered {delivered}, failed {failed}");
    Ok(result?)
}

/// Produces the campaign, then works until every task of it is delivered or failed.
async fn run(cli: &Cli) -> anyhow::Result<ExitCode> {
    let maildir = open_maildir(cli)?;
    let client = connect(cli).await?;
    let started = Instant::now();

    let task_ids = produce(&client, cli).await?;
    let enqueued = task_ids.len();
    eprintln!(
        "enqueued {enqueued} send_email tasks to queue {:?}",
        cli.queue
    );

    let tally = Arc::new(Tally::new(Some(task_ids.into_iter().collect())));
    let mut interrupted = false;
    if !tally.is_finished() {
        let reporter = tokio::spawn(report_progress(Arc::clone(&tally)));
        let worker = build_worker(client, cli, maildir, Arc::clone(&tally))?;
        let finished = Arc::clone(&tally);
        let shutdown = async move {
            tokio::select! {
                () = finished.wait_finished() => {}
                () = stop_signal() => {}
            }
        };
        worker.run(shutdown).await?;
        reporter.abort();
        interrupted = !tally.is_finished();
    }

    let (delivered, failed) = tally.campaign_counts();
    println!(
        "enqueued {enqueued}, delivered {delivered}, failed {failed}, elapsed {:.1} s",
        started.elapsed().as_secs_f64()
    );
    if interrupted {
        eprintln!(
            "interrupted with {} tasks unfinished",
            enqueued - delivered - failed
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn open_maildir(cli: &Cli) -> anyhow::Result<Arc<Maildir>> {
    let Some(root) = &cli.maildir else {
        bail!("missing --maildir DIR: `work` and `run` deliver messages into a Maildir");
    };
    let maildir = Maildir::create(root)
        .with_context(|| format!("failed to create Maildir {}", root.display()))?;
    Ok(Arc::new(maildir))
}

fn build_worker(
    client: Client,
    cli: &Cli,
    maildir: Arc<Maildir>,
    tally: Arc<Tally>,
) -> anyhow::Result<Worker> {
    let send_delay = Duration::from_millis(cli.send_ms);
    let worker = Worker::builder(client)
        .queue(cli.queue.as_str())
        .concurrency(cli.concurrency)
        .build(move |task: TaskContext| {
            let maildir = Arc::clone(&maildir);
            let tally = Arc::clone(&tally);
            async move {
                let result = send_email(&task, &maildir, send_delay).await;
                match &result {
                    Ok(_) => tally.record_delivered(task.id()),
                    Err(_) if task.is_last_attempt() => tally.record_failed(task.id()),
                    Err(_) => {}
                }
                result
            }
        })?;
    Ok(worker)
}

/// Renders the message of one task, waits the simulated latency and delivers it into
/// the Maildir. Returns the delivered file name as the task result.
async fn send_email(task: &TaskContext, maildir: &Arc<Maildir>, delay: Duration) -> HandlerResult {
    if task.kind() != KIND {
        return Err(HandlerError::msg(format!(
            "unknown task kind {:?}, expected {KIND:?}",
            task.kind()
        )));
    }
    let job: EmailJob = serde_json::from_slice(task.payload())?;
    let message = render_message(&job, task.id())?;

    tokio::time::sleep(delay).await;

    let maildir = Arc::clone(maildir);
    let task_id = task.id().to_owned();
    let file_name =
        tokio::task::spawn_blocking(move || maildir.deliver(&task_id, &message.formatted()))
            .await??;
    Ok(Some(Bytes::from(file_name)))
}

/// Renders an RFC 5322 message. Non-ASCII display names and subjects are encoded by
/// `lettre` as RFC 2047 encoded words, and the body as quoted-printable or base64.
fn render_message(job: &EmailJob, task_id: &str) -> Result<Message, HandlerError> {
    let address = job.email.parse().map_err(|error| {
        HandlerError::msg(format!(
            "invalid e-mail address {:?} of customer {}: {error}",
            job.email, job.recipient_id
        ))
    })?;
    let recipient = Mailbox::new(Some(job.name.clone()), address);
    let body = format!(
        "Hello {},\n\nour spring offers are here. You receive this message because you \
         opted in to news from us.\n\nCustomer number: {}\n",
        job.name, job.recipient_id
    );

    let message = Message::builder()
        .from(SENDER.parse()?)
        .to(recipient)
        .subject(job.subject.as_str())
        // A Message-ID derived from the task id is the same on every attempt.
        .message_id(Some(format!("<{task_id}@{MESSAGE_ID_DOMAIN}>")))
        .header(ContentType::TEXT_PLAIN)
        .body(body)?;
    Ok(message)
}

/// A Maildir: `tmp/` for files being written, `new/` for delivered unread messages and
/// `cur/` for messages a reader has seen.
#[derive(Debug)]
struct Maildir {
    root: PathBuf,
    /// Distinguishes concurrent writes of the same task in `tmp/`.
    sequence: AtomicU64,
}

impl Maildir {
    /// Opens the Maildir at `root`, creating it and its subdirectories if missing.
    fn create(root: &Path) -> io::Result<Self> {
        for subdirectory in ["tmp", "new", "cur"] {
            fs::create_dir_all(root.join(subdirectory))?;
        }
        Ok(Maildir {
            root: root.to_owned(),
            sequence: AtomicU64::new(0),
        })
    }

    /// Delivers `message` as `new/<task_id>.docket` and returns that file name.
    ///
    /// The message is written to a unique file in `tmp/`, synced, and renamed into
    /// `new/`, so readers never see a partial file. The name depends only on the task
    /// id, so delivering the same task again replaces the earlier file. The file keeps
    /// the CRLF line endings of RFC 5322 as `lettre` formats them.
    ///
    // NOTE: a redelivery after a mail reader has moved the message to `cur/` adds a
    // second copy to `new/`.
    fn deliver(&self, task_id: &str, message: &[u8]) -> io::Result<String> {
        let file_name = maildir_name(task_id)?;
        let sequence = self.sequence.fetch_add(1, Ordering::Relaxed);
        let tmp_path = self
            .root
            .join("tmp")
            .join(format!("{file_name}.{}_{sequence}", std::process::id()));
        let new_path = self.root.join("new").join(&file_name);

        let result = write_synced(&tmp_path, message)
            .and_then(|()| fs::rename(&tmp_path, &new_path))
            // Syncing the directory makes the rename itself durable.
            .and_then(|()| File::open(self.root.join("new"))?.sync_all());
        if result.is_err() {
            let _ = fs::remove_file(&tmp_path);
        }
        result.map(|()| file_name)
    }
}

/// Builds the Maildir file name of a task. Task ids are UUIDs, and anything outside
/// `A-Z a-z 0-9 - _` is rejected so that the name cannot contain `/`, or `:`, which
/// starts the Maildir info suffix.
fn maildir_name(task_id: &str) -> io::Result<String> {
    let valid = !task_id.is_empty()
        && task_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !valid {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("task id {task_id:?} is not usable in a Maildir file name"),
        ));
    }
    Ok(format!("{task_id}.docket"))
}

fn write_synced(path: &Path, contents: &[u8]) -> io::Result<()> {
    let mut file = OpenOptions::new().write(true).create_new(true).open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}

/// Counts of finished tasks, shared by the handlers and the progress reporter.
///
/// With a campaign, the ids of its tasks are tracked so that a task delivered twice
/// counts once and tasks left in the queue by earlier runs are not counted.
#[derive(Debug)]
struct Tally {
    campaign: Option<HashSet<String>>,
    state: Mutex<CampaignState>,
    delivered_total: AtomicU64,
    failed_total: AtomicU64,
    finished: Notify,
}

#[derive(Debug, Default)]
struct CampaignState {
    delivered: HashSet<String>,
    failed: HashSet<String>,
}

impl Tally {
    fn new(campaign: Option<HashSet<String>>) -> Self {
        Tally {
            campaign,
            state: Mutex::default(),
            delivered_total: AtomicU64::new(0),
            failed_total: AtomicU64::new(0),
            finished: Notify::new(),
        }
    }

    fn record_delivered(&self, task_id: &str) {
        self.delivered_total.fetch_add(1, Ordering::Relaxed);
        self.record(task_id, |state| {
            state.failed.remove(task_id);
            state.delivered.insert(task_id.to_owned());
        });
    }

    fn record_failed(&self, task_id: &str) {
        self.failed_total.fetch_add(1, Ordering::Relaxed);
        self.record(task_id, |state| {
            if !state.delivered.contains(task_id) {
                state.failed.insert(task_id.to_owned());
            }
        });
    }

    fn record(&self, task_id: &str, update: impl FnOnce(&mut CampaignState)) {
        let Some(campaign) = &self.campaign else {
            return;
        };
        if !campaign.contains(task_id) {
            return;
        }
        let finished = {
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            update(&mut state);
            state.delivered.len() + state.failed.len() >= campaign.len()
        };
        if finished {
            self.finished.notify_one();
        }
    }

    /// Returns the campaign's delivered and failed task counts, each task counted once.
    fn campaign_counts(&self) -> (usize, usize) {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        (state.delivered.len(), state.failed.len())
    }

    /// Returns the handler outcomes of this process, redeliveries included.
    fn totals(&self) -> (u64, u64) {
        (
            self.delivered_total.load(Ordering::Relaxed),
            self.failed_total.load(Ordering::Relaxed),
        )
    }

    fn is_finished(&self) -> bool {
        let expected = self.campaign.as_ref().map_or(0, HashSet::len);
        let (delivered, failed) = self.campaign_counts();
        delivered + failed >= expected
    }

    /// Waits until every task of the campaign is delivered or failed.
    async fn wait_finished(&self) {
        // `notify_one` stores a permit when no task waits, so a notification sent before
        // this call is not lost.
        while !self.is_finished() {
            self.finished.notified().await;
        }
    }
}

/// Prints the counts to stderr once per second while they change.
async fn report_progress(tally: Arc<Tally>) {
    let mut interval = tokio::time::interval(Duration::from_secs(1));
    interval.tick().await;
    let mut last = None;
    loop {
        interval.tick().await;
        let line = match &tally.campaign {
            Some(campaign) => {
                let (delivered, failed) = tally.campaign_counts();
                format!(
                    "progress: delivered {delivered}/{}, failed {failed}",
                    campaign.len()
                )
            }
            None => {
                let (delivered, failed) = tally.totals();
                format!("progress: delivered {delivered}, failed {failed}")
            }
        };
        if last.as_ref() != Some(&line) {
            eprintln!("{line}");
            last = Some(line);
        }
    }
}

/// Completes on Ctrl-C, or on SIGTERM on Unix.
async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};

        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = terminate.recv() => {}
                }
                return;
            }
            Err(error) => {
                tracing::warn!(%error, "failed to install the SIGTERM handler, so only Ctrl-C stops the worker");
            }
        }
    }
    if let Err(error) = tokio::signal::ctrl_c().await {
        tracing::warn!(%error, "failed to listen for Ctrl-C, so the worker stops now");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TASK_ID: &str = "0190a5f0-1234-7abc-8def-0123456789ab";

    fn write_csv(dir: &Path, rows: &str) -> PathBuf {
        let path = dir.join("customers.csv");
        fs::write(
            &path,
            format!("id,name,email,country,opted_in,signup_date\n{rows}"),
        )
        .unwrap();
        path
    }

    fn job(name: &str) -> EmailJob {
        EmailJob {
            recipient_id: 7,
            name: name.to_owned(),
            email: "zoe.muller.7@example.com".to_owned(),
            subject: "Grüße aus Köln".to_owned(),
        }
    }

    fn files_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn recipients_are_opted_in_of_country() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_csv(
            dir.path(),
            "1,Zoë Müller,zoe@example.com,DE,true,2021-01-02\n\
             2,José Núñez,jose@example.org,ES,true,2022-03-04\n\
             3,Jörg Weiß,jorg@example.com,DE,false,2023-05-06\n\
             4,Anna Groß,anna@example.net,de,true,2024-07-08\n",
        );

        let recipients = read_recipients(&path, "DE").unwrap();

        let ids: Vec<u64> = recipients.iter().map(|customer| customer.id).collect();
        assert_eq!(ids, [1, 4]);
        assert_eq!(recipients[0].name, "Zoë Müller");
    }

    #[test]
    fn invalid_row_names_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_csv(
            dir.path(),
            "1,Zoë Müller,zoe@example.com,DE,true,2021-01-02\n\
             2,José Núñez,jose@example.org,ES,maybe,2022-03-04\n",
        );

        let error = read_recipients(&path, "DE").unwrap_err();

        assert!(format!("{error:#}").contains("line 3"), "{error:#}");
    }

    #[test]
    fn bundled_customers_parse() {
        let recipients = read_recipients(Path::new(DEFAULT_CUSTOMERS), "DE").unwrap();

        assert!(!recipients.is_empty());
        assert!(recipients.iter().all(|customer| customer.opted_in));
    }

    #[test]
    fn message_encodes_non_ascii_headers() {
        let message = render_message(&job("Zoë Müller"), TASK_ID).unwrap();
        let text = String::from_utf8(message.formatted()).unwrap();

        assert!(text.is_ascii(), "{text}");
        assert!(text.contains("=?utf-8?"), "{text}");
        assert!(text.contains(&format!("Message-ID: <{TASK_ID}@{MESSAGE_ID_DOMAIN}>")));
        assert!(text.contains("<zoe.muller.7@example.com>"));
        assert!(text.contains("Date: "));
    }

    #[test]
    fn message_rejects_invalid_address() {
        let mut invalid = job("Zoë Müller");
        invalid.email = "not an address".to_owned();

        let error = render_message(&invalid, TASK_ID).unwrap_err();

        assert!(
            error
                .to_string()
                .starts_with("invalid e-mail address \"not an address\" of customer 7"),
            "{error}"
        );
    }

    #[test]
    fn maildir_delivery_lands_in_new() {
        let dir = tempfile::tempdir().unwrap();
        let maildir = Maildir::create(dir.path()).unwrap();

        let name = maildir
            .deliver(TASK_ID, b"Subject: hi\r\n\r\nbody\r\n")
            .unwrap();

        assert_eq!(name, format!("{TASK_ID}.docket"));
        assert_eq!(
            files_in(&dir.path().join("new")),
            std::slice::from_ref(&name)
        );
        assert!(files_in(&dir.path().join("tmp")).is_empty());
        assert!(files_in(&dir.path().join("cur")).is_empty());
        let contents = fs::read(dir.path().join("new").join(&name)).unwrap();
        assert_eq!(contents, b"Subject: hi\r\n\r\nbody\r\n");
    }

    #[test]
    fn maildir_redelivery_replaces_file() {
        let dir = tempfile::tempdir().unwrap();
        let maildir = Maildir::create(dir.path()).unwrap();

        maildir.deliver(TASK_ID, b"first").unwrap();
        let name = maildir.deliver(TASK_ID, b"second").unwrap();

        assert_eq!(
            files_in(&dir.path().join("new")),
            std::slice::from_ref(&name)
        );
        let contents = fs::read(dir.path().join("new").join(&name)).unwrap();
        assert_eq!(contents, b"second");
    }

    #[test]
    fn maildir_name_rejects_separators() {
        for task_id in ["", "a/b", "a:2,S", "../x", "id with space"] {
            assert!(maildir_name(task_id).is_err(), "{task_id:?} was accepted");
        }
    }

    #[test]
    fn tally_counts_each_campaign_task_once() {
        let campaign = HashSet::from(["a".to_owned(), "b".to_owned()]);
        let tally = Tally::new(Some(campaign));

        tally.record_delivered("a");
        tally.record_delivered("a");
        tally.record_delivered("other");

        assert_eq!(tally.campaign_counts(), (1, 0));
        assert!(!tally.is_finished());

        tally.record_failed("b");

        assert_eq!(tally.campaign_counts(), (1, 1));
        assert!(tally.is_finished());
        assert_eq!(tally.totals(), (3, 1));
    }
}
