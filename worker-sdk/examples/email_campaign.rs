//! An e-mail campaign: send one message to every opted-in customer of a country.
//!
//! The producer reads a customer CSV, filters it and enqueues one `send_email` task per
//! recipient. Workers render each message with `lettre` and either send it through an
//! SMTP server (`--smtp HOST:PORT`) or, offline, deliver it into a Maildir after a
//! simulated sending latency (`--maildir DIR`).
//!
//! The SMTP server's reply decides what happens to a failed attempt. A temporary failure
//! (a 4xx reply, a connection error or a timeout) fails the attempt, and the broker
//! retries the task after its backoff. A permanent failure (a 5xx reply) dead-letters
//! the task at once, with the server's reply code and text as its error.
//!
//! Every message carries a Message-ID derived from its task id, the same on every
//! attempt, so a receiving side can drop duplicates. SMTP itself can still deliver a
//! message twice: when a worker stops after the server accepted the message but before
//! the broker recorded the task's ack, the task runs again. In Maildir mode the file name
//! is the task id, so a redelivered task replaces its earlier file.
//!
//! Start a broker on loopback, then run the whole campaign in one process:
//!
//! ```text
//! cargo run -p docket --example email_campaign -- --smtp 127.0.0.1:2525 run
//! cargo run -p docket --example email_campaign -- --maildir /tmp/mail run
//! ```
//!
//! or produce and work in separate processes:
//!
//! ```text
//! cargo run -p docket --example email_campaign -- produce --wait
//! cargo run -p docket --example email_campaign -- --smtp 127.0.0.1:2525 work
//! ```

use std::collections::HashMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::future::Future;
use std::io::{self, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::process::ExitCode;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::error::ErrorKind;
use clap::{CommandFactory, Parser, Subcommand};
use docket::proto::{GetQueueStatsRequest, QueueStats, WatchQueueStatsRequest};
use docket::{
    Bytes, Client, HandlerError, HandlerResult, Task, TaskContext, TaskState, TaskStatus, Worker,
};
use lettre::message::Mailbox;
use lettre::message::header::ContentType;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Tls, TlsParameters};
use lettre::transport::smtp::response::Response;
use lettre::transport::smtp::{self, PoolConfig};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tokio::task::JoinSet;

/// Task kind of one campaign message.
const KIND: &str = "send_email";

/// Tasks per Enqueue call, below the broker's default batch limit of 1000.
const BATCH_SIZE: usize = 500;

/// Sender of every campaign message.
const SENDER: &str = "Docket Campaigns <campaigns@example.com>";

/// Domain part of generated Message-ID headers.
const MESSAGE_ID_DOMAIN: &str = "campaigns.example.com";

/// Environment variable that contains the SMTP password, so that it does not show in
/// the process list as a flag would.
const SMTP_PASSWORD_ENV: &str = "SMTP_PASSWORD";

/// Timeout of each SMTP connection attempt and command.
const SMTP_TIMEOUT: Duration = Duration::from_secs(30);

/// Interval of the broker's queue counts while the producer follows a campaign.
const STATS_INTERVAL: Duration = Duration::from_millis(500);

/// Minimum time between two lookups of the campaign's unfinished tasks.
const MIN_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Maximum time between two lookups of the campaign's unfinished tasks. Queue counts
/// include tasks of other campaigns, so they only hint at when to look.
const MAX_CHECK_INTERVAL: Duration = Duration::from_secs(10);

/// Concurrent GetTask calls of one lookup.
const CHECK_CONNECTIONS: usize = 8;

/// Delay before the producer reopens a broken WatchQueueStats stream.
const RECONNECT_DELAY: Duration = Duration::from_secs(1);

/// Minimum time between two progress lines when stderr is not a terminal.
const PLAIN_PROGRESS_INTERVAL: Duration = Duration::from_secs(2);

const DEFAULT_CUSTOMERS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/data/customers.csv");

/// Send a campaign e-mail to every opted-in customer of a country, through Docket.
///
/// `work` and `run` send through an SMTP server with --smtp HOST:PORT, or write files
/// into a Maildir with --maildir DIR: exactly one of the two.
#[derive(Debug, Parser)]
#[command(name = "email_campaign", version)]
struct Cli {
    /// Broker endpoint.
    #[arg(long, global = true, default_value = "http://127.0.0.1:7070")]
    broker: String,

    /// SMTP server to send the messages through, such as 127.0.0.1:2525 ([ADDRESS]:PORT
    /// for IPv6).
    #[arg(long, global = true, value_name = "HOST:PORT")]
    smtp: Option<SmtpAddress>,

    /// Require STARTTLS on every SMTP connection, and verify the server's certificate
    /// against the system's root certificates.
    #[arg(long, global = true)]
    smtp_starttls: bool,

    /// User name for SMTP authentication. The password is read from the environment
    /// variable SMTP_PASSWORD.
    #[arg(long, global = true, value_name = "USER")]
    smtp_user: Option<String>,

    /// Maximum number of SMTP connections that a worker process keeps open and reuses.
    #[arg(long, global = true, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    smtp_connections: u32,

    /// Maildir to deliver messages into instead of an SMTP server, created if missing.
    #[arg(long, global = true, value_name = "DIR")]
    maildir: Option<PathBuf>,

    /// Simulated sending latency per message in Maildir mode, in milliseconds.
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
    /// Enqueue one task per recipient and print the count. With --wait, also show the
    /// campaign's progress until every task is delivered or dead-lettered.
    Produce {
        /// Follow the campaign until it finishes, then print a summary.
        #[arg(long)]
        wait: bool,
    },
    /// Send messages until Ctrl-C or SIGTERM.
    Work,
    /// Produce, then work until every enqueued task is delivered or dead-lettered (the
    /// default).
    Run,
}

/// An SMTP server address given as `HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SmtpAddress {
    host: String,
    port: u16,
}

impl FromStr for SmtpAddress {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = |reason: &str| {
            format!(
                "invalid SMTP server {text:?}: {reason}, expected HOST:PORT such as 127.0.0.1:2525"
            )
        };
        let (host, port) = text
            .rsplit_once(':')
            .ok_or_else(|| invalid("missing port"))?;
        let host = match host.strip_prefix('[') {
            Some(bracketed) => bracketed
                .strip_suffix(']')
                .ok_or_else(|| invalid("missing ] after the IPv6 address"))?,
            None if host.contains(':') => {
                return Err(invalid("IPv6 addresses need brackets, as in [::1]:2525"));
            }
            None => host,
        };
        if host.is_empty() {
            return Err(invalid("missing host"));
        }
        let port = match port.parse::<u16>() {
            Ok(port) if port > 0 => port,
            _ => return Err(invalid("the port must be a number from 1 to 65535")),
        };
        Ok(SmtpAddress {
            host: host.to_owned(),
            port,
        })
    }
}

impl fmt::Display for SmtpAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Delivery target of `work` and `run`, as chosen on the command line.
enum DeliverySettings {
    Smtp(SmtpSettings),
    Maildir(PathBuf),
}

/// SMTP connection settings. It has no `Debug` because the credentials contain a
/// password.
struct SmtpSettings {
    address: SmtpAddress,
    starttls: bool,
    credentials: Option<Credentials>,
    connections: u32,
}

impl Cli {
    /// Checks the delivery flags of `work` and `run` and reads the SMTP password from the
    /// environment. Returns `None` for `produce`, which sends nothing.
    fn delivery_settings(&self, command: Command) -> Result<Option<DeliverySettings>, clap::Error> {
        if matches!(command, Command::Produce { .. }) {
            return Ok(None);
        }
        let usage_error = |kind, message: &str| Cli::command().error(kind, message);

        let smtp = match (&self.smtp, &self.maildir) {
            (Some(_), Some(_)) => {
                return Err(usage_error(
                    ErrorKind::ArgumentConflict,
                    "--smtp and --maildir cannot be used together: pass --smtp HOST:PORT to \
                     send through an SMTP server, or --maildir DIR to write files offline",
                ));
            }
            (None, None) => {
                return Err(usage_error(
                    ErrorKind::MissingRequiredArgument,
                    "`work` and `run` need --smtp HOST:PORT to send through an SMTP server, \
                     or --maildir DIR to write files offline",
                ));
            }
            (None, Some(maildir)) => {
                if self.smtp_starttls || self.smtp_user.is_some() {
                    return Err(usage_error(
                        ErrorKind::ArgumentConflict,
                        "--smtp-starttls and --smtp-user apply to --smtp, not to --maildir",
                    ));
                }
                return Ok(Some(DeliverySettings::Maildir(maildir.clone())));
            }
            (Some(smtp), None) => smtp,
        };

        let credentials = match &self.smtp_user {
            None => None,
            Some(user) => {
                let Ok(password) = std::env::var(SMTP_PASSWORD_ENV) else {
                    return Err(usage_error(
                        ErrorKind::MissingRequiredArgument,
                        &format!(
                            "--smtp-user needs the password in the environment variable \
                             {SMTP_PASSWORD_ENV}, which is not set or not valid Unicode"
                        ),
                    ));
                };
                Some(Credentials::new(user.clone(), password))
            }
        };
        Ok(Some(DeliverySettings::Smtp(SmtpSettings {
            address: smtp.clone(),
            starttls: self.smtp_starttls,
            credentials,
            connections: self.smtp_connections,
        })))
    }
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
    let command = cli.command.unwrap_or(Command::Run);
    let delivery = match cli.delivery_settings(command) {
        Ok(delivery) => delivery,
        Err(error) => error.exit(),
    };
    match run_command(&cli, command, delivery).await {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run_command(
    cli: &Cli,
    command: Command,
    delivery: Option<DeliverySettings>,
) -> anyhow::Result<ExitCode> {
    match (command, delivery) {
        (Command::Produce { wait }, _) => {
            let client = connect(cli).await?;
            let campaign = produce(&client, cli).await?;
            println!(
                "enqueued {} send_email tasks to queue {:?}",
                campaign.task_ids.len(),
                cli.queue
            );
            if !wait {
                return Ok(ExitCode::SUCCESS);
            }
            let outcome = follow_campaign(&client, &campaign, docket::shutdown_signal()).await;
            Ok(print_summary(&campaign, &outcome))
        }
        (Command::Work, Some(delivery)) => {
            work(cli, delivery).await?;
            Ok(ExitCode::SUCCESS)
        }
        (Command::Run, Some(delivery)) => run(cli, delivery).await,
        (Command::Work | Command::Run, None) => {
            bail!("`work` and `run` need --smtp or --maildir")
        }
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

/// The tasks of one campaign, with the queue's counts from just before they were
/// enqueued.
#[derive(Debug)]
struct Campaign {
    queue: String,
    task_ids: Vec<String>,
    baseline: QueueStats,
    started: Instant,
}

/// Enqueues one task per recipient in batches.
async fn produce(client: &Client, cli: &Cli) -> anyhow::Result<Campaign> {
    let recipients = read_recipients(&cli.customers, &cli.country)?;
    if recipients.is_empty() {
        tracing::warn!(
            country = %cli.country,
            customers = %cli.customers.display(),
            "no opted-in customer of this country; nothing to send (check --country)"
        );
    }
    let started = Instant::now();
    let baseline = queue_stats(client, &cli.queue).await?;

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
    Ok(Campaign {
        queue: cli.queue.clone(),
        task_ids,
        baseline,
        started,
    })
}

async fn queue_stats(client: &Client, queue: &str) -> anyhow::Result<QueueStats> {
    let response = client
        .grpc()
        .get_queue_stats(GetQueueStatsRequest {
            queue: queue.to_owned(),
        })
        .await
        .with_context(|| format!("failed to read the counts of queue {queue:?}"))?;
    Ok(response.into_inner().stats.unwrap_or_default())
}

/// Runs workers until Ctrl-C or SIGTERM, showing this process's counts while they
/// change.
async fn work(cli: &Cli, delivery: DeliverySettings) -> anyhow::Result<()> {
    let transport = open_transport(delivery, cli)?;
    let client = Client::connect_lazy(cli.broker.as_str())?;
    let tally = Arc::new(Tally::default());

    let reporter = tokio::spawn(report_tally(Arc::clone(&tally)));
    let worker = build_worker(client, cli, transport, Arc::clone(&tally))?;
    let result = worker.run(docket::shutdown_signal()).await;
    reporter.abort();
    let _ = reporter.await;

    if io::stderr().is_terminal() {
        // Ends the progress line that the reporter redraws in place.
        eprintln!();
    }
    eprintln!("stopped: {}", tally.summary());
    Ok(result?)
}

/// Produces the campaign, then works until every task of it is delivered or
/// dead-lettered, as the broker reports them.
async fn run(cli: &Cli, delivery: DeliverySettings) -> anyhow::Result<ExitCode> {
    // The transport is set up before producing, so that a bad setting enqueues nothing.
    let transport = open_transport(delivery, cli)?;
    let client = connect(cli).await?;
    let campaign = produce(&client, cli).await?;
    eprintln!(
        "enqueued {} send_email tasks to queue {:?}",
        campaign.task_ids.len(),
        cli.queue
    );

    let worker = build_worker(client.clone(), cli, transport, Arc::new(Tally::default()))?;
    let (stop_worker, worker_stopped) = oneshot::channel::<()>();
    let (worker_done, worker_finished) = oneshot::channel::<()>();
    let worker_task = tokio::spawn(async move {
        let result = worker
            .run(async {
                let _ = worker_stopped.await;
            })
            .await;
        let _ = worker_done.send(());
        result
    });

    // Following ends when the campaign finishes, on Ctrl-C or SIGTERM, or when the
    // worker stops on its own after a fatal error.
    let stop = async {
        tokio::select! {
            () = docket::shutdown_signal() => {}
            _ = worker_finished => {}
        }
    };
    let outcome = follow_campaign(&client, &campaign, stop).await;
    let _ = stop_worker.send(());
    worker_task.await.context("the worker panicked")??;

    Ok(print_summary(&campaign, &outcome))
}

/// Final states of a campaign's tasks, as the broker reports them.
#[derive(Debug, Default)]
struct Outcome {
    delivered: usize,
    /// Dead-lettered tasks, with their errors.
    dead: Vec<TaskStatus>,
    cancelled: usize,
    /// Tasks that the broker no longer has, because they were deleted or purged.
    missing: usize,
    /// Tasks not final when following stopped.
    unfinished: usize,
}

impl Outcome {
    fn finished(&self) -> usize {
        self.delivered + self.dead.len() + self.cancelled + self.missing
    }
}

/// Shows the campaign's progress until every task is final or `stop` completes.
///
/// The broker's queue counts drive the progress line. They include other tasks of the
/// queue, so the campaign's own tasks are looked up with GetTask whenever the counts
/// suggest that it may be done, and at least every `MAX_CHECK_INTERVAL`. Only the
/// lookups decide that the campaign is finished and fill the summary.
async fn follow_campaign(
    client: &Client,
    campaign: &Campaign,
    stop: impl Future<Output = ()>,
) -> Outcome {
    let total = campaign.task_ids.len();
    let mut unfinished = campaign.task_ids.clone();
    let mut outcome = Outcome::default();
    let mut display = ProgressDisplay::new(io::stderr().is_terminal());
    let mut watch = None;
    let started = Instant::now();
    let mut last_check: Option<Instant> = None;
    let mut stop = pin!(stop);

    while !unfinished.is_empty() {
        let stats = tokio::select! {
            () = &mut stop => break,
            stats = next_queue_stats(client, &campaign.queue, &mut watch) => stats,
        };

        let mut hint_done = false;
        if let Some(stats) = &stats {
            let progress = Progress::estimate(&campaign.baseline, stats, total, &outcome);
            display.show(progress.line());
            let active = stats.pending + stats.retry_wait + stats.leased;
            hint_done = active == 0 || progress.remaining == 0;
        }
        let may_check = last_check.is_none_or(|at| at.elapsed() >= MIN_CHECK_INTERVAL);
        let must_check = last_check.unwrap_or(started).elapsed() >= MAX_CHECK_INTERVAL;
        if (hint_done && may_check) || must_check {
            check_tasks(client, &mut unfinished, &mut outcome).await;
            last_check = Some(Instant::now());
        }
    }
    display.finish();

    if !unfinished.is_empty() {
        // Stopped early: one more lookup makes the summary as exact as it can be.
        check_tasks(client, &mut unfinished, &mut outcome).await;
    }
    outcome.unfinished = unfinished.len();
    outcome.dead.sort_by(|a, b| task_id(a).cmp(task_id(b)));
    outcome
}

/// Returns the next counts of `queue` from a WatchQueueStats stream, opening it first if
/// needed. Returns `None` after a failure, which is logged, with `watch` reset so that
/// the next call reopens the stream.
async fn next_queue_stats(
    client: &Client,
    queue: &str,
    watch: &mut Option<tonic::Streaming<docket::proto::WatchQueueStatsResponse>>,
) -> Option<QueueStats> {
    if watch.is_none() {
        let request = WatchQueueStatsRequest {
            queue: queue.to_owned(),
            interval: docket::prost_types::Duration::try_from(STATS_INTERVAL).ok(),
        };
        match client.grpc().watch_queue_stats(request).await {
            Ok(response) => *watch = Some(response.into_inner()),
            Err(status) => {
                tracing::warn!(queue, %status, "failed to watch the queue's counts, retrying");
                tokio::time::sleep(RECONNECT_DELAY).await;
                return None;
            }
        }
    }
    let stream = watch.as_mut()?;
    match stream.message().await {
        Ok(Some(response)) => response.stats,
        Ok(None) => {
            *watch = None;
            None
        }
        Err(status) => {
            tracing::warn!(queue, %status, "the queue's count stream failed, reopening it");
            *watch = None;
            tokio::time::sleep(RECONNECT_DELAY).await;
            None
        }
    }
}

/// Looks up every task in `unfinished` and moves those in a final state into `outcome`.
/// Tasks whose lookup fails stay in `unfinished`, and the failures are logged.
async fn check_tasks(client: &Client, unfinished: &mut Vec<String>, outcome: &mut Outcome) {
    let chunk_size = unfinished.len().div_ceil(CHECK_CONNECTIONS).max(1);
    let chunks: Vec<Vec<String>> = unfinished
        .chunks(chunk_size)
        .map(<[String]>::to_vec)
        .collect();
    let mut lookups = JoinSet::new();
    let mut chunk_of_lookup = HashMap::new();
    for (index, chunk) in chunks.iter().enumerate() {
        let chunk = chunk.clone();
        let client = client.clone();
        let handle = lookups.spawn(async move {
            let mut results = Vec::with_capacity(chunk.len());
            for task_id in chunk {
                let result = client.get_task(task_id.as_str()).await;
                results.push((task_id, result));
            }
            results
        });
        chunk_of_lookup.insert(handle.id(), index);
    }

    let mut still_unfinished = Vec::new();
    let mut failures = 0;
    let mut last_failure = None;
    while let Some(joined) = lookups.join_next().await {
        let results = match joined {
            Ok(results) => results,
            Err(error) => {
                // The chunk's tasks stay unfinished, so the next lookup retries them.
                tracing::warn!(%error, "a lookup of campaign tasks failed");
                still_unfinished.extend(chunks[chunk_of_lookup[&error.id()]].iter().cloned());
                continue;
            }
        };
        for (task_id, result) in results {
            match result {
                Ok(status) => match status.state() {
                    TaskState::Succeeded => outcome.delivered += 1,
                    TaskState::Dead => outcome.dead.push(status),
                    TaskState::Cancelled => outcome.cancelled += 1,
                    _ => still_unfinished.push(task_id),
                },
                Err(error) if error.code() == Some(tonic::Code::NotFound) => outcome.missing += 1,
                Err(error) => {
                    failures += 1;
                    last_failure = Some(error);
                    still_unfinished.push(task_id);
                }
            }
        }
    }
    if let Some(error) = last_failure {
        tracing::warn!(failures, %error, "failed to look up campaign tasks, retrying later");
    }
    *unfinished = still_unfinished;
}

fn task_id(status: &TaskStatus) -> &str {
    status.task.as_ref().map_or("", |task| task.id.as_str())
}

/// Campaign counts for the progress line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Progress {
    total: usize,
    delivered: usize,
    failed: usize,
    remaining: usize,
}

impl Progress {
    /// Estimates the campaign's counts from the growth of the queue's succeeded and dead
    /// counts since `baseline`, and from the tasks already looked up, whichever is
    /// higher.
    fn estimate(baseline: &QueueStats, stats: &QueueStats, total: usize, known: &Outcome) -> Self {
        let grown = |now: u64, before: u64| {
            usize::try_from(now.saturating_sub(before)).unwrap_or(usize::MAX)
        };
        let delivered = grown(stats.succeeded, baseline.succeeded)
            .max(known.delivered)
            .min(total);
        let known_failed = known.finished() - known.delivered;
        let failed = grown(stats.dead, baseline.dead)
            .max(known_failed)
            .min(total - delivered);
        Progress {
            total,
            delivered,
            failed,
            remaining: total - delivered - failed,
        }
    }

    fn line(&self) -> String {
        format!(
            "progress: delivered {}/{}, dead-lettered {}, remaining {}",
            self.delivered, self.total, self.failed, self.remaining
        )
    }
}

/// A progress line on stderr: redrawn in place on a terminal, and printed as plain lines,
/// at most one per `PLAIN_PROGRESS_INTERVAL`, otherwise.
#[derive(Debug)]
struct ProgressDisplay {
    terminal: bool,
    last_line: Option<String>,
    last_printed: Option<Instant>,
}

impl ProgressDisplay {
    fn new(terminal: bool) -> Self {
        ProgressDisplay {
            terminal,
            last_line: None,
            last_printed: None,
        }
    }

    fn show(&mut self, line: String) {
        if self.last_line.as_ref() == Some(&line) {
            return;
        }
        let mut stderr = io::stderr().lock();
        if self.terminal {
            // Carriage return, then "erase line", then the new text.
            let _ = write!(stderr, "\r\x1b[2K{line}");
            let _ = stderr.flush();
        } else {
            if self
                .last_printed
                .is_some_and(|at| at.elapsed() < PLAIN_PROGRESS_INTERVAL)
            {
                return;
            }
            let _ = writeln!(stderr, "{line}");
        }
        self.last_printed = Some(Instant::now());
        self.last_line = Some(line);
    }

    /// Ends the line redrawn on a terminal, so that later output starts on a new line.
    fn finish(&mut self) {
        if self.terminal && self.last_line.is_some() {
            eprintln!();
        }
        self.last_line = None;
    }
}

/// Prints the campaign's summary and its dead-lettered recipients to stdout. Returns
/// success only if every task was delivered.
fn print_summary(campaign: &Campaign, outcome: &Outcome) -> ExitCode {
    let enqueued = campaign.task_ids.len();
    println!(
        "enqueued {enqueued}, delivered {}, failed {}, elapsed {:.1} s",
        outcome.delivered,
        outcome.dead.len(),
        campaign.started.elapsed().as_secs_f64()
    );
    if outcome.cancelled > 0 {
        println!("cancelled {}", outcome.cancelled);
    }
    if outcome.missing > 0 {
        println!(
            "deleted from the broker before they were checked: {}",
            outcome.missing
        );
    }
    for status in &outcome.dead {
        let recipient = status
            .task
            .as_ref()
            .and_then(|task| serde_json::from_slice::<EmailJob>(&task.payload).ok())
            .map_or_else(|| "(unreadable payload)".to_owned(), |job| job.email);
        println!(
            "dead-lettered {recipient} (task {}, attempts {}): {}",
            task_id(status),
            status.attempts,
            status.last_error
        );
    }
    if outcome.unfinished > 0 {
        eprintln!(
            "stopped following with {} tasks unfinished; they stay in queue {:?}",
            outcome.unfinished, campaign.queue
        );
    }
    if outcome.delivered == enqueued {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Message delivery of one worker process, shared by its handlers.
enum Transport {
    /// An SMTP server, through a pool of reused connections.
    Smtp(SmtpSender),
    /// A Maildir, after a simulated sending latency per message.
    Maildir {
        maildir: Arc<Maildir>,
        latency: Duration,
    },
}

fn open_transport(delivery: DeliverySettings, cli: &Cli) -> anyhow::Result<Arc<Transport>> {
    let transport = match delivery {
        DeliverySettings::Smtp(settings) => Transport::Smtp(SmtpSender::new(settings)?),
        DeliverySettings::Maildir(root) => {
            let maildir = Maildir::create(&root)
                .with_context(|| format!("failed to create Maildir {}", root.display()))?;
            Transport::Maildir {
                maildir: Arc::new(maildir),
                latency: Duration::from_millis(cli.send_ms),
            }
        }
    };
    Ok(Arc::new(transport))
}

/// Sends messages through one SMTP server.
struct SmtpSender {
    address: SmtpAddress,
    transport: AsyncSmtpTransport<Tokio1Executor>,
}

impl SmtpSender {
    /// Sets up the connection pool. Connections are opened when messages are sent.
    fn new(settings: SmtpSettings) -> anyhow::Result<Self> {
        let SmtpSettings {
            address,
            starttls,
            credentials,
            connections,
        } = settings;
        let mut builder =
            AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(address.host.as_str())
                .port(address.port)
                .timeout(Some(SMTP_TIMEOUT))
                .pool_config(PoolConfig::new().max_size(connections));
        if starttls {
            let parameters = TlsParameters::new(address.host.clone())
                .with_context(|| format!("failed to set up TLS for SMTP server {address}"))?;
            builder = builder.tls(Tls::Required(parameters));
        }
        if let Some(credentials) = credentials {
            if !starttls {
                tracing::warn!(
                    server = %address,
                    "SMTP credentials without --smtp-starttls are sent unencrypted"
                );
            }
            builder = builder.credentials(credentials);
        }
        Ok(SmtpSender {
            address,
            transport: builder.build(),
        })
    }

    /// Sends `message` and returns the server's reply as the task result.
    async fn send(&self, message: Message) -> HandlerResult {
        match self.transport.send(message).await {
            Ok(response) => Ok(Some(Bytes::from(reply_text(&response)))),
            Err(error) => Err(smtp_failure(&self.address, &error)),
        }
    }
}

/// Returns a reply as its code and text, such as `250 2.0.0 OK`.
fn reply_text(response: &Response) -> String {
    let text = response.message().collect::<Vec<_>>().join(" ");
    format!("{} {text}", response.code()).trim_end().to_owned()
}

/// Turns a failed send into the attempt's error. A 5xx reply is permanent, so the task
/// is dead-lettered at once. Anything else, a 4xx reply, a connection error or a timeout,
/// fails only this attempt, and the broker retries the task after its backoff.
fn smtp_failure(server: &SmtpAddress, error: &smtp::Error) -> HandlerError {
    let reply = || {
        let code = error
            .status()
            .map(|code| code.to_string())
            .unwrap_or_default();
        let text = std::error::Error::source(error)
            .map(ToString::to_string)
            .unwrap_or_default();
        format!("{code} {text}").trim().to_owned()
    };
    if error.is_permanent() {
        HandlerError::msg(format!(
            "SMTP server {server} rejected the message permanently: {}",
            reply()
        ))
        .no_retry()
    } else if error.is_transient() {
        HandlerError::msg(format!(
            "SMTP server {server} rejected the message temporarily: {}",
            reply()
        ))
    } else {
        HandlerError::msg(format!(
            "failed to send through SMTP server {server}: {error}"
        ))
    }
}

/// Handler outcomes of one worker process, redeliveries included.
#[derive(Debug, Default)]
struct Tally {
    delivered: AtomicU64,
    retried: AtomicU64,
    dead: AtomicU64,
}

impl Tally {
    /// Counts the outcome of one attempt. A failure dead-letters the task when the
    /// handler asked for no retry or the attempt was the last.
    fn record(&self, result: &HandlerResult, last_attempt: bool) {
        let counter = match result {
            Ok(_) => &self.delivered,
            Err(error) if error.is_no_retry() || last_attempt => &self.dead,
            Err(_) => &self.retried,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn summary(&self) -> String {
        format!(
            "delivered {}, failed attempts to retry {}, dead-lettered {}",
            self.delivered.load(Ordering::Relaxed),
            self.retried.load(Ordering::Relaxed),
            self.dead.load(Ordering::Relaxed)
        )
    }
}

/// Shows the counts of a worker process on stderr while they change.
async fn report_tally(tally: Arc<Tally>) {
    let mut display = ProgressDisplay::new(io::stderr().is_terminal());
    let mut interval = tokio::time::interval(Duration::from_secs(1));
    interval.tick().await;
    loop {
        interval.tick().await;
        display.show(format!("progress: {}", tally.summary()));
    }
}

fn build_worker(
    client: Client,
    cli: &Cli,
    transport: Arc<Transport>,
    tally: Arc<Tally>,
) -> anyhow::Result<Worker> {
    let worker = Worker::builder(client)
        .queue(cli.queue.as_str())
        .concurrency(cli.concurrency)
        .build(move |task: TaskContext| {
            let transport = Arc::clone(&transport);
            let tally = Arc::clone(&tally);
            async move {
                // The worker logs failed attempts with the task id and the error.
                let result = send_email(&task, &transport).await;
                tally.record(&result, task.is_last_attempt());
                result
            }
        })?;
    Ok(worker)
}

/// Renders the message of one task and sends it. Returns the SMTP server's reply or the
/// Maildir file name as the task result.
async fn send_email(task: &TaskContext, transport: &Arc<Transport>) -> HandlerResult {
    if task.kind() != KIND {
        return Err(HandlerError::msg(format!(
            "unknown task kind {:?}, expected {KIND:?}",
            task.kind()
        )));
    }
    // Neither an unreadable payload nor an invalid address gets better on a retry.
    let job: EmailJob = serde_json::from_slice(task.payload()).map_err(|error| {
        HandlerError::msg(format!("invalid send_email payload: {error}")).no_retry()
    })?;
    let message = render_message(&job, task.id()).map_err(HandlerError::no_retry)?;

    match transport.as_ref() {
        Transport::Smtp(sender) => sender.send(message).await,
        Transport::Maildir { maildir, latency } => {
            tokio::time::sleep(*latency).await;
            let maildir = Arc::clone(maildir);
            let task_id = task.id().to_owned();
            let file_name = tokio::task::spawn_blocking(move || {
                maildir.deliver(&task_id, &message.formatted())
            })
            .await??;
            Ok(Some(Bytes::from(file_name)))
        }
    }
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
    fn tally_counts_dead_letters() {
        let tally = Tally::default();

        tally.record(&Ok(None), false);
        tally.record(&Err(HandlerError::msg("451 busy")), false);
        tally.record(&Err(HandlerError::msg("451 busy")), true);
        tally.record(&Err(HandlerError::msg("550 unknown").no_retry()), false);

        assert_eq!(
            tally.summary(),
            "delivered 1, failed attempts to retry 1, dead-lettered 2"
        );
    }

    #[test]
    fn smtp_address_parses_host_and_port() {
        let cases = [
            ("127.0.0.1:2525", "127.0.0.1", 2525),
            ("mail.example.com:587", "mail.example.com", 587),
            ("[::1]:25", "::1", 25),
        ];
        for (text, host, port) in cases {
            let address: SmtpAddress = text.parse().unwrap();
            assert_eq!(address.host, host, "host of {text}");
            assert_eq!(address.port, port, "port of {text}");
            assert_eq!(address.to_string(), text);
        }
    }

    #[test]
    fn smtp_address_rejects_invalid() {
        for text in [
            "localhost",
            ":25",
            "host:0",
            "host:99999",
            "::1:25",
            "[::1:25",
            "host:",
        ] {
            let error = text.parse::<SmtpAddress>().unwrap_err();
            assert!(
                error.starts_with(&format!("invalid SMTP server {text:?}")),
                "{error}"
            );
        }
    }

    #[test]
    fn delivery_needs_exactly_one_mode() {
        let settings = |args: &[&str]| {
            let cli = Cli::try_parse_from(args).unwrap();
            let command = cli.command.unwrap_or(Command::Run);
            cli.delivery_settings(command)
        };

        let both = settings(&[
            "email_campaign",
            "--smtp",
            "127.0.0.1:25",
            "--maildir",
            "m",
            "run",
        ]);
        assert_eq!(
            both.err().map(|error| error.kind()),
            Some(ErrorKind::ArgumentConflict)
        );

        let neither = settings(&["email_campaign", "work"]);
        assert_eq!(
            neither.err().map(|error| error.kind()),
            Some(ErrorKind::MissingRequiredArgument)
        );

        let starttls_with_maildir =
            settings(&["email_campaign", "--maildir", "m", "--smtp-starttls"]);
        assert_eq!(
            starttls_with_maildir.err().map(|error| error.kind()),
            Some(ErrorKind::ArgumentConflict)
        );

        let produce = settings(&["email_campaign", "produce", "--wait"]);
        assert!(matches!(produce, Ok(None)));

        let smtp = settings(&["email_campaign", "--smtp", "127.0.0.1:2525", "run"]);
        assert!(matches!(smtp, Ok(Some(DeliverySettings::Smtp(_)))));
    }

    #[test]
    fn progress_estimate_uses_counts_since_baseline() {
        let baseline = QueueStats {
            succeeded: 5,
            dead: 1,
            ..QueueStats::default()
        };
        let stats = QueueStats {
            succeeded: 7,
            dead: 2,
            pending: 1,
            ..QueueStats::default()
        };

        let progress = Progress::estimate(&baseline, &stats, 4, &Outcome::default());

        assert_eq!(
            progress,
            Progress {
                total: 4,
                delivered: 2,
                failed: 1,
                remaining: 1
            }
        );
        assert_eq!(
            progress.line(),
            "progress: delivered 2/4, dead-lettered 1, remaining 1"
        );
    }

    #[test]
    fn progress_estimate_stays_within_campaign() {
        // Tasks of other campaigns finished too, so the counts grew past this one.
        let stats = QueueStats {
            succeeded: 50,
            dead: 9,
            ..QueueStats::default()
        };
        let known = Outcome {
            delivered: 1,
            ..Outcome::default()
        };

        let progress = Progress::estimate(&QueueStats::default(), &stats, 3, &known);

        assert_eq!(progress.delivered, 3);
        assert_eq!(progress.failed, 0);
        assert_eq!(progress.remaining, 0);
    }

    /// Serves one SMTP session on loopback that replies to RCPT TO with `rcpt_reply`,
    /// and returns the server's address.
    fn scripted_smtp_server(rcpt_reply: &'static str) -> SmtpAddress {
        use std::io::{BufRead, BufReader};

        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut writer = stream;
            let mut reply = |text: &str| writer.write_all(format!("{text}\r\n").as_bytes());
            reply("220 scripted ESMTP").unwrap();
            let mut line = String::new();
            while reader.read_line(&mut line).unwrap_or(0) > 0 {
                let command = line.trim_end().to_ascii_uppercase();
                let answer = if command.starts_with("EHLO") || command.starts_with("MAIL") {
                    "250 OK"
                } else if command.starts_with("RCPT") {
                    rcpt_reply
                } else if command.starts_with("DATA") {
                    reply("354 end with <CRLF>.<CRLF>").unwrap();
                    let mut data = String::new();
                    while reader.read_line(&mut data).unwrap_or(0) > 0 && data != ".\r\n" {
                        data.clear();
                    }
                    "250 2.0.0 queued as 42"
                } else if command.starts_with("QUIT") {
                    let _ = reply("221 bye");
                    return;
                } else {
                    "250 OK"
                };
                if reply(answer).is_err() {
                    return;
                }
                line.clear();
            }
        });
        SmtpAddress {
            host: "127.0.0.1".to_owned(),
            port,
        }
    }

    async fn send_through(address: SmtpAddress) -> HandlerResult {
        let sender = SmtpSender::new(SmtpSettings {
            address,
            starttls: false,
            credentials: None,
            connections: 1,
        })
        .unwrap();
        let message = render_message(&job("Zoë Müller"), TASK_ID).unwrap();
        sender.send(message).await
    }

    #[tokio::test]
    async fn smtp_accepted_returns_reply() {
        let result = send_through(scripted_smtp_server("250 OK")).await;

        let reply = result.unwrap().unwrap();
        assert_eq!(reply, Bytes::from("250 2.0.0 queued as 42"));
    }

    #[tokio::test]
    async fn smtp_permanent_rejection_is_not_retried() {
        let result = send_through(scripted_smtp_server("550 5.1.1 No such user")).await;

        let error = result.unwrap_err();
        assert!(error.is_no_retry(), "{error}");
        assert!(
            error
                .to_string()
                .ends_with("rejected the message permanently: 550 5.1.1 No such user"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn smtp_temporary_rejection_is_retried() {
        let result = send_through(scripted_smtp_server("451 4.3.0 Try again later")).await;

        let error = result.unwrap_err();
        assert!(!error.is_no_retry(), "{error}");
        assert!(
            error
                .to_string()
                .ends_with("rejected the message temporarily: 451 4.3.0 Try again later"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn smtp_connection_failure_is_retried() {
        // A port that was just free is very likely still closed.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let address = SmtpAddress {
            host: "127.0.0.1".to_owned(),
            port,
        };

        let error = send_through(address).await.unwrap_err();

        assert!(!error.is_no_retry(), "{error}");
        assert!(
            error.to_string().starts_with(&format!(
                "failed to send through SMTP server 127.0.0.1:{port}"
            )),
            "{error}"
        );
    }
}
