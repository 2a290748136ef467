//! Scheduler configuration: command-line flags, each with an environment fallback.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

/// Configuration of one scheduler process.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "docket-scheduler",
    version,
    about = "Docket's scheduler of delayed and recurring tasks"
)]
pub struct Config {
    /// Address and port to serve gRPC on. Port 0 picks a free port, which the scheduler
    /// logs.
    #[arg(
        long,
        env = "DOCKET_SCHEDULER_LISTEN",
        default_value = "127.0.0.1:7071"
    )]
    pub listen: SocketAddr,

    /// Folder of the scheduler's redb file, `scheduler.redb`. Created if missing. It may be
    /// the broker's folder, whose file has another name.
    #[arg(
        long,
        env = "DOCKET_SCHEDULER_DATA_DIR",
        default_value = "./docket-data"
    )]
    pub data_dir: PathBuf,

    /// URL of the broker that due tasks are released into.
    #[arg(long, env = "DOCKET_BROKER", default_value = "http://127.0.0.1:7070")]
    pub broker: String,

    /// A recurring schedule's fire time that the scheduler reaches more than this late,
    /// because the scheduler was down or the broker unreachable, is a missed run and
    /// follows the schedule's missed-run policy.
    #[arg(long, env = "DOCKET_SCHEDULER_MISFIRE_THRESHOLD", default_value = "1m", value_parser = parse_duration)]
    pub misfire_threshold: Duration,

    /// Time that a one-shot schedule is kept after it fired, failed or was cancelled.
    #[arg(long, env = "DOCKET_SCHEDULER_RETENTION", default_value = "7days", value_parser = parse_duration)]
    pub retention: Duration,

    /// Maximum number of schedules released together, which is also the maximum number of
    /// tasks in one Enqueue request. At most the broker's batch limit.
    #[arg(long, env = "DOCKET_SCHEDULER_RELEASE_BATCH", default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub release_batch: u32,

    /// Time limit of one Enqueue call to the broker.
    #[arg(long, env = "DOCKET_SCHEDULER_ENQUEUE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub enqueue_timeout: Duration,

    /// Maximum wait between two attempts to reach the broker.
    #[arg(long, env = "DOCKET_SCHEDULER_MAX_RETRY_DELAY", default_value = "10s", value_parser = parse_duration)]
    pub max_retry_delay: Duration,

    /// Maximum payload size of a task template, in bytes. Keep it at the broker's limit,
    /// so that a template the broker would reject is refused when it is scheduled.
    #[arg(long, env = "DOCKET_SCHEDULER_MAX_PAYLOAD_BYTES", default_value_t = 1024 * 1024)]
    pub max_payload_bytes: usize,

    /// Size of the database's page cache in memory, in bytes. The scheduler's memory stays
    /// bounded however many schedules it holds.
    #[arg(long, env = "DOCKET_SCHEDULER_CACHE_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub cache_bytes: usize,

    /// Maximum size of one gRPC message that the scheduler accepts, in bytes.
    #[arg(long, env = "DOCKET_SCHEDULER_MAX_MESSAGE_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub max_message_bytes: usize,

    /// Address and port to serve Prometheus metrics on, at `GET /metrics`. Unset turns the
    /// metrics server off. Port 0 picks a free port, which the scheduler logs.
    #[arg(long, env = "DOCKET_SCHEDULER_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// Time that shutdown waits for open calls, then for a release in progress, then for
    /// pending commits: each up to this value.
    #[arg(long, env = "DOCKET_SCHEDULER_SHUTDOWN_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    /// TLS and bearer-token settings of the scheduler's server and of its connection to
    /// the broker.
    #[command(flatten)]
    pub security: crate::security::SecurityArgs,

    /// Test hook: wait this long between a firing's enqueue and its record, so that a
    /// test can kill the process in between.
    #[arg(long, hide = true, value_parser = parse_duration)]
    pub pause_after_enqueue: Option<Duration>,
}

impl Config {
    /// Returns a configuration with every default, serving `listen`, storing in
    /// `data_dir`, and releasing into `broker`.
    pub fn new(
        listen: SocketAddr,
        data_dir: impl Into<PathBuf>,
        broker: impl Into<String>,
    ) -> Self {
        let mut config = Config::parse_from(["docket-scheduler"]);
        config.listen = listen;
        config.data_dir = data_dir.into();
        config.broker = broker.into();
        config
    }

    /// Path of the redb file inside the data folder.
    pub fn database_path(&self) -> PathBuf {
        self.data_dir.join("scheduler.redb")
    }
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .map_err(|err| format!("invalid duration {text:?}: {err} (examples: 500ms, 15s, 1h)"))
}
