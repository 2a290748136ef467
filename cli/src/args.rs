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
  2  usage error: invalid flags or arguments, or an unreadable --payload-file
  3  cannot connect to the broker or the scheduler
  4  not found: no task or schedule with that id or name";

/// Docket's command line.
#[derive(Debug, Parser)]
#[command(
    name = "docket",
    version,
    about = "Docket's command line: enqueue and inspect tasks, manage queues and schedules, \
             and run a development server",
    after_help = EXIT_CODES
)]
pub struct Cli {
    /// URL of the broker.
    #[arg(
        long,
        global = true,
        env = "DOCKET_BROKER",
        default_value = "http://127.0.0.1:7070"
    )]
    pub broker: String,

    /// URL of the scheduler, which delayed tasks and schedules go through.
    #[arg(
        long,
        global = true,
        env = "DOCKET_SCHEDULER",
        default_value = "http://127.0.0.1:7071"
    )]
    pub scheduler: String,

    /// Print one JSON document on stdout instead of text.
    #[arg(long, global = true)]
    pub json: bool,

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
    Enqueue(EnqueueArgs),

    /// Show or cancel a task.
    #[command(subcommand)]
    Task(TaskCommand),

    /// List queues, show their task counts, pause, resume or purge them.
    #[command(subcommand)]
    Queue(QueueCommand),

    /// Create, list, show, pause, resume or delete recurring schedules.
    #[command(subcommand)]
    Schedule(ScheduleCommand),
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
    /// Queue name, such as `emails`.
    pub queue: String,

    /// Task kind, the name of the handler that runs it, such as `send_email`.
    pub kind: String,

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
