//! The command line's flags and subcommands, parsed by clap.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use chrono::{DateTime, FixedOffset};
use clap::{Args, Parser, Subcommand, ValueEnum};

/// Exit codes, shown after `--help`.
const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  the broker or the scheduler returned an error; stderr shows its gRPC code and message
  2  usage error: invalid flags or arguments, an unreadable --payload-file, or a bad line
     in an `enqueue --file` file
  3  cannot connect to the broker or the scheduler
  4  not found: no task or schedule with that id or name
  5  `task watch` only: the task ended DEAD or CANCELLED
  6  the broker or the scheduler rejected the credentials: UNAUTHENTICATED (missing or
     invalid token) or PERMISSION_DENIED (the token's role may not call the method)

With --json, results go to stdout as one JSON document (`task watch --json` prints one
JSON object per line instead), and errors go to stderr as one JSON object
{\"error\":{\"code\":...,\"message\":...,\"hint\":...}} with stdout left empty.";

/// Default URL of the broker.
pub const DEFAULT_BROKER: &str = "http://127.0.0.1:7070";

/// Default URL of the scheduler.
pub const DEFAULT_SCHEDULER: &str = "http://127.0.0.1:7071";

/// Docket's command line.
#[derive(Debug, Parser)]
#[command(
    name = "docket",
    version,
    about = "Docket's command line: enqueue and inspect tasks, manage queues, dead tasks and \
             schedules, and run a development server",
    after_help = EXIT_CODES
)]
pub struct Cli {
    /// URL of the broker, accepted before the subcommand as well as after it.
    #[arg(long, hide = true, value_name = "URL")]
    pub broker: Option<String>,

    /// URL of the scheduler, accepted before the subcommand as well as after it.
    #[arg(long, hide = true, value_name = "URL")]
    pub scheduler: Option<String>,

    /// Print one JSON document on stdout instead of text, and errors as JSON on stderr.
    #[arg(long, global = true)]
    pub json: bool,

    /// TLS and bearer-token settings for the broker and the scheduler.
    #[command(flatten)]
    pub connection: crate::connect::ConnectionArgs,

    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a broker and a scheduler in this process, for development, until Ctrl-C or
    /// SIGTERM.
    Dev(DevArgs),

    /// Add a task to a queue, now or, with --in or --at, through the scheduler later.
    /// With --file, add many tasks from a file of JSON lines.
    Enqueue(EnqueueArgs),

    /// Show, follow or cancel a task.
    Task(TaskGroup),

    /// List queues, show their task counts and settings, change settings, pause, resume
    /// or purge them.
    Queue(QueueGroup),

    /// List, requeue or delete dead tasks: tasks that used all their attempts.
    Dead(DeadGroup),

    /// Create, list, show, pause, resume or delete recurring schedules.
    Schedule(ScheduleGroup),
}

/// The broker's URL, for the commands that call the broker.
#[derive(Debug, Args)]
pub struct BrokerUrl {
    /// URL of the broker.
    #[arg(
        long = "broker",
        global = true,
        value_name = "URL",
        env = "DOCKET_BROKER",
        default_value = DEFAULT_BROKER
    )]
    pub broker: String,
}

/// The scheduler's URL, for the commands that call the scheduler.
#[derive(Debug, Args)]
pub struct SchedulerUrl {
    /// URL of the scheduler, which delayed tasks and schedules go through.
    #[arg(
        long = "scheduler",
        global = true,
        value_name = "URL",
        env = "DOCKET_SCHEDULER",
        default_value = DEFAULT_SCHEDULER
    )]
    pub scheduler: String,
}

/// `docket task` with its broker URL.
#[derive(Debug, Args)]
pub struct TaskGroup {
    #[command(flatten)]
    pub broker: BrokerUrl,

    #[command(subcommand)]
    pub command: TaskCommand,
}

/// `docket queue` with its broker URL.
#[derive(Debug, Args)]
pub struct QueueGroup {
    #[command(flatten)]
    pub broker: BrokerUrl,

    #[command(subcommand)]
    pub command: QueueCommand,
}

/// `docket dead` with its broker URL.
#[derive(Debug, Args)]
pub struct DeadGroup {
    #[command(flatten)]
    pub broker: BrokerUrl,

    #[command(subcommand)]
    pub command: DeadCommand,
}

/// `docket schedule` with its scheduler URL.
#[derive(Debug, Args)]
pub struct ScheduleGroup {
    #[command(flatten)]
    pub scheduler: SchedulerUrl,

    #[command(subcommand)]
    pub command: ScheduleCommand,
}

/// Flags of `docket dev`.
#[derive(Debug, Args)]
pub struct DevArgs {
    /// Folder of the data files, `broker.redb` and `scheduler.redb`. Created if missing.
    #[arg(long, env = "DOCKET_DATA_DIR", default_value = "./docket-data")]
    pub data_dir: PathBuf,

    /// Address and port the broker serves gRPC on. Port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub broker_listen: SocketAddr,

    /// Address and port the scheduler serves gRPC on. Port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:7071")]
    pub scheduler_listen: SocketAddr,
}

/// The payload of a task: inline text or the contents of a file.
#[derive(Debug, Args)]
pub struct PayloadArgs {
    /// Task payload as text.
    #[arg(long, conflicts_with = "payload_file")]
    pub payload: Option<String>,

    /// File whose bytes are the task payload.
    #[arg(long)]
    pub payload_file: Option<PathBuf>,
}

/// Flags that describe a task, shared by `enqueue` and `schedule add`.
#[derive(Debug, Args)]
pub struct TaskArgs {
    #[command(flatten)]
    pub payload: PayloadArgs,

    /// Header passed to the worker, as KEY=VALUE. Repeat for several headers.
    #[arg(long = "header", value_name = "KEY=VALUE", value_parser = parse_header)]
    pub headers: Vec<(String, String)>,

    /// Delivery priority within the queue: a higher value is delivered first.
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    pub priority: i32,

    /// Maximum number of attempts, including the first, at most 100. 0 takes the queue's
    /// default.
    #[arg(long, default_value_t = 0)]
    pub max_attempts: u32,
}

/// Arguments of `docket enqueue`.
#[derive(Debug, Args)]
pub struct EnqueueArgs {
    #[command(flatten)]
    pub broker: BrokerUrl,

    #[command(flatten)]
    pub scheduler: SchedulerUrl,

    /// Queue name, such as `emails`. With --file, the queue of lines that name none.
    #[arg(required_unless_present = "file")]
    pub queue: Option<String>,

    /// Task kind, the name of the handler that runs it, such as `send_email`. With
    /// --file, the kind of lines that name none.
    #[arg(required_unless_present = "file")]
    pub kind: Option<String>,

    #[command(flatten)]
    pub task: TaskArgs,

    /// Key that makes the enqueue idempotent: a second task with the same queue and key
    /// within the queue's idempotency window is not created. Not allowed with --in or
    /// --at, because the scheduler sets the key of the tasks it releases.
    #[arg(long, conflicts_with_all = ["delay", "at"])]
    pub idempotency_key: Option<String>,

    /// Release the task after this delay, through the scheduler, such as `90s` or `2h`.
    #[arg(long = "in", id = "delay", value_name = "DURATION", value_parser = parse_duration, conflicts_with = "at")]
    pub delay: Option<Duration>,

    /// Release the task at this time, through the scheduler, in RFC 3339 such as
    /// `2030-01-01T09:00:00+01:00`.
    #[arg(long, value_name = "RFC3339", value_parser = parse_time)]
    pub at: Option<DateTime<FixedOffset>>,

    /// Enqueue many tasks from a file of JSON lines, `-` for stdin: one object per line
    /// with the fields queue, kind, payload (a string) or json (any JSON value, sent with
    /// the header content-type=application/json), headers, priority, max_attempts and
    /// idempotency_key. Every line is checked before the first task is sent.
    #[arg(
        long,
        value_name = "PATH",
        conflicts_with_all = [
            "payload", "payload_file", "headers", "priority", "max_attempts",
            "idempotency_key", "delay", "at",
        ]
    )]
    pub file: Option<PathBuf>,
}

/// Subcommands of `docket task`.
#[derive(Debug, Subcommand)]
pub enum TaskCommand {
    /// Show a task with its state, attempts and history.
    Get {
        /// Task id, as `enqueue` printed it.
        id: String,
    },
    /// Cancel a task. A waiting task is cancelled at once, and a running one's worker
    /// gets a cancellation notice.
    Cancel {
        /// Task id, as `enqueue` printed it.
        id: String,
    },
    /// Follow a task's state changes, one line per change, until it ends. With --json,
    /// each line is one JSON object. Exits 0 when the task SUCCEEDED and 5 when it ended
    /// DEAD or CANCELLED.
    Watch {
        /// Task id, as `enqueue` printed it.
        id: String,
    },
}

/// Subcommands of `docket queue`.
#[derive(Debug, Subcommand)]
pub enum QueueCommand {
    /// List every queue with its task counts.
    List,
    /// Show one queue's task counts.
    Stats {
        /// Queue name.
        queue: String,
    },
    /// Stop deliveries from a queue. Enqueue still works.
    Pause {
        /// Queue name.
        queue: String,
    },
    /// Resume deliveries from a paused queue.
    Resume {
        /// Queue name.
        queue: String,
    },
    /// Delete every pending and retry-waiting task of a queue.
    Purge {
        /// Queue name.
        queue: String,
    },
    /// Show a queue's settings, with the broker's defaults filled in.
    Settings {
        /// Queue name.
        queue: String,
    },
    /// Change some of a queue's settings and keep the others. The settings apply to
    /// tasks enqueued afterwards.
    Configure(QueueConfigureArgs),
}

/// Arguments of `docket queue configure`.
#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("setting").required(true).multiple(true).args([
    "max_attempts", "initial_backoff", "max_backoff", "backoff_multiplier", "jitter",
    "lease_duration", "retention", "dead_retention", "idempotency_window",
]))]
pub struct QueueConfigureArgs {
    /// Queue name.
    pub queue: String,

    /// Maximum attempts of a task enqueued without its own, 1 to 100.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=100))]
    pub max_attempts: Option<u32>,

    /// Retry delay after the first failed attempt, 0s to 1 day.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub initial_backoff: Option<Duration>,

    /// Maximum retry delay, at least --initial-backoff and at most 1 day.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub max_backoff: Option<Duration>,

    /// Growth factor of the retry delay per failed attempt, 1.0 to 10.0.
    #[arg(long, value_name = "FACTOR", value_parser = parse_multiplier)]
    pub backoff_multiplier: Option<f64>,

    /// Largest fraction, 0.0 to 1.0, by which a retry delay is randomly shortened.
    #[arg(long, value_name = "FRACTION", value_parser = parse_jitter)]
    pub jitter: Option<f64>,

    /// Lease length of deliveries whose worker sets none, from 1s to the broker's
    /// maximum lease length.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub lease_duration: Option<Duration>,

    /// Time that succeeded and cancelled tasks are kept, 1 minute to 10 years.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub retention: Option<Duration>,

    /// Time that dead tasks are kept, 1 minute to 10 years.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub dead_retention: Option<Duration>,

    /// Time an idempotency key blocks a second task with the same key, 1s to 10 years.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub idempotency_window: Option<Duration>,
}

/// Subcommands of `docket dead`.
#[derive(Debug, Subcommand)]
pub enum DeadCommand {
    /// List dead tasks, oldest death first, one page at a time.
    List(DeadListArgs),
    /// Make dead tasks pending again with their attempts reset to 0.
    Requeue(DeadSelectArgs),
    /// Delete dead tasks.
    Delete(DeadSelectArgs),
}

/// Arguments of `docket dead list`.
#[derive(Debug, Args)]
pub struct DeadListArgs {
    /// Queue whose dead tasks to list. Without it, the dead tasks of every queue, queue
    /// by queue in name order.
    #[arg(long)]
    pub queue: Option<String>,

    /// Maximum number of tasks to show, 1 to 1000.
    #[arg(long, value_name = "N", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub limit: u32,

    /// Token that the previous page printed, to show the next page. Pass the same
    /// --queue as for the previous page.
    #[arg(long, value_name = "TOKEN")]
    pub page_token: Option<String>,
}

/// The dead tasks that `docket dead requeue` and `docket dead delete` act on.
#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("selection").required(true).args(["ids", "all"]))]
pub struct DeadSelectArgs {
    /// Ids of dead tasks. Ids that name no dead task are skipped and counted.
    #[arg(value_name = "ID")]
    pub ids: Vec<String>,

    /// Every dead task of --queue.
    #[arg(long, requires = "queue")]
    pub all: bool,

    /// Queue of the dead tasks; required with --all. With ids and no --queue, each task's
    /// queue is looked up first.
    #[arg(long)]
    pub queue: Option<String>,
}

/// Subcommands of `docket schedule`.
#[derive(Debug, Subcommand)]
pub enum ScheduleCommand {
    /// Create a recurring schedule.
    Add(ScheduleAddArgs),
    /// List every schedule: recurring ones by name, then one-shot ones.
    List,
    /// Show one schedule, by name or, with --id, by id.
    Get {
        /// Name of a recurring schedule.
        #[arg(required_unless_present = "id", conflicts_with = "id")]
        name: Option<String>,
        /// Id of any schedule, such as a one-shot schedule made by `enqueue --in`.
        #[arg(long)]
        id: Option<String>,
    },
    /// Stop a recurring schedule from firing until it is resumed.
    Pause {
        /// Name of the recurring schedule.
        name: String,
    },
    /// Resume a paused recurring schedule from its next fire time.
    Resume {
        /// Name of the recurring schedule.
        name: String,
    },
    /// Cancel a one-shot schedule, such as a task enqueued with --in or --at, before it
    /// fires.
    Cancel {
        /// Id of the one-shot schedule, as `enqueue --in` or `--at` printed it.
        id: String,
    },
    /// Delete a recurring schedule. Tasks it released stay in the broker.
    Delete {
        /// Name of the recurring schedule.
        name: String,
    },
}

/// Arguments of `docket schedule add`.
#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("rule").required(true).args(["cron", "every"]))]
pub struct ScheduleAddArgs {
    /// Unique name of the schedule.
    pub name: String,

    /// Queue the released tasks go to.
    #[arg(long)]
    pub queue: String,

    /// Kind of the released tasks.
    #[arg(long)]
    pub kind: String,

    #[command(flatten)]
    pub task: TaskArgs,

    /// Cron expression with a seconds field, such as `0 0 2 * * *` for 02:00 every day.
    #[arg(long, value_name = "EXPR")]
    pub cron: Option<String>,

    /// IANA time zone of the cron expression, such as `Europe/Berlin`. Default UTC.
    #[arg(long, value_name = "ZONE", requires = "cron")]
    pub tz: Option<String>,

    /// Fixed interval between fire times, such as `15m`. The first fire time is one
    /// interval after the schedule is created.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub every: Option<Duration>,

    /// Policy for fire times missed while the scheduler was down or the broker was
    /// unreachable.
    #[arg(long, value_enum, default_value_t = MissedRuns::Skip)]
    pub missed: MissedRuns,

    /// Create the schedule paused.
    #[arg(long)]
    pub paused: bool,
}

/// Missed-run policy of a recurring schedule.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum MissedRuns {
    /// Release nothing for missed fire times.
    Skip,
    /// Release one task for all missed fire times together.
    RunOnce,
    /// Release one task per missed fire time, oldest first, at most 10.
    RunAll,
}

fn parse_header(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!(
            "invalid header {text:?}: expected KEY=VALUE, such as content-type=text/plain"
        )),
    }
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .map_err(|err| format!("invalid duration {text:?}: {err} (examples: 500ms, 15s, 1h)"))
}

fn parse_multiplier(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(value) if (1.0..=10.0).contains(&value) => Ok(value),
        _ => Err(format!(
            "invalid multiplier {text:?}: use a number from 1.0 to 10.0, such as 2"
        )),
    }
}

fn parse_jitter(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(value) if (0.0..=1.0).contains(&value) => Ok(value),
        _ => Err(format!(
            "invalid jitter {text:?}: use a fraction from 0.0 to 1.0, such as 0.2"
        )),
    }
}

fn parse_time(text: &str) -> Result<DateTime<FixedOffset>, String> {
    DateTime::parse_from_rfc3339(text).map_err(|err| {
        format!("invalid time {text:?}: {err} (expected RFC 3339, such as 2030-01-01T09:00:00Z)")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_valid() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn header_splits_at_first_equals_sign() {
        assert_eq!(
            parse_header("a=b=c"),
            Ok(("a".to_owned(), "b=c".to_owned()))
        );
        assert!(parse_header("novalue").is_err());
        assert!(parse_header("=value").is_err());
    }
}
