//! Broker configuration: command-line flags, each with a `DOCKET_*` environment fallback.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

/// Configuration of one broker process.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "docket-broker",
    version,
    about = "Docket's durable task-queue broker"
)]
pub struct Config {
    /// Address and port to serve gRPC on. Port 0 picks a free port, which the broker logs.
    #[arg(long, env = "DOCKET_LISTEN", default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,

    /// Folder of the broker's redb file. Created if missing.
    #[arg(long, env = "DOCKET_DATA_DIR", default_value = "./docket-data")]
    pub data_dir: PathBuf,

    /// Interval between heartbeats on an idle or busy Subscribe stream.
    #[arg(long, env = "DOCKET_HEARTBEAT_INTERVAL", default_value = "15s", value_parser = parse_duration)]
    pub heartbeat_interval: Duration,

    /// Lease length of a delivery when the Subscribe request sets none.
    #[arg(long, env = "DOCKET_LEASE_DURATION", default_value = "30s", value_parser = parse_duration)]
    pub lease_duration: Duration,

    /// Maximum lease length that a Subscribe request may ask for.
    #[arg(long, env = "DOCKET_MAX_LEASE_DURATION", default_value = "1h", value_parser = parse_duration)]
    pub max_lease_duration: Duration,

    /// Maximum payload size of one task, in bytes.
    #[arg(long, env = "DOCKET_MAX_PAYLOAD_BYTES", default_value_t = 1024 * 1024)]
    pub max_payload_bytes: usize,

    /// Maximum size of the result that an Ack may store, in bytes.
    #[arg(long, env = "DOCKET_MAX_RESULT_BYTES", default_value_t = 64 * 1024)]
    pub max_result_bytes: usize,

    /// Maximum number of tasks in one Enqueue request.
    #[arg(long, env = "DOCKET_MAX_BATCH_SIZE", default_value_t = 1000)]
    pub max_batch_size: usize,

    /// Maximum `max_in_flight` that a Subscribe request may ask for.
    #[arg(long, env = "DOCKET_MAX_IN_FLIGHT", default_value_t = 10_000)]
    pub max_in_flight: u32,

    /// Maximum attempts of a task that was enqueued without its own limit.
    #[arg(long, env = "DOCKET_DEFAULT_MAX_ATTEMPTS", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=MAX_ATTEMPTS_LIMIT as i64))]
    pub default_max_attempts: u32,

    /// Delay after a task's first failed attempt, when neither the task nor its queue sets
    /// a retry policy.
    #[arg(long, env = "DOCKET_RETRY_INITIAL_BACKOFF", default_value = "1s", value_parser = parse_duration)]
    pub retry_initial_backoff: Duration,

    /// Growth factor of the retry delay per failed attempt, from 1.0 to 10.0.
    #[arg(long, env = "DOCKET_RETRY_MULTIPLIER", default_value_t = 2.0)]
    pub retry_multiplier: f64,

    /// Maximum retry delay.
    #[arg(long, env = "DOCKET_RETRY_MAX_BACKOFF", default_value = "10m", value_parser = parse_duration)]
    pub retry_max_backoff: Duration,

    /// Maximum fraction, from 0.0 to 1.0, by which a retry delay is randomly shortened.
    #[arg(long, env = "DOCKET_RETRY_JITTER", default_value_t = 0.2)]
    pub retry_jitter: f64,

    /// Time that succeeded and cancelled tasks are kept before they are purged, for queues
    /// without their own setting.
    #[arg(long, env = "DOCKET_RETENTION", default_value = "7days", value_parser = parse_duration)]
    pub retention: Duration,

    /// Time that dead tasks are kept before they are purged, for queues without their own
    /// setting.
    #[arg(long, env = "DOCKET_DEAD_RETENTION", default_value = "30days", value_parser = parse_duration)]
    pub dead_retention: Duration,

    /// Time that an idempotency key blocks a second task with the same key, for queues
    /// without their own setting.
    #[arg(long, env = "DOCKET_IDEMPOTENCY_WINDOW", default_value = "24h", value_parser = parse_duration)]
    pub idempotency_window: Duration,

    /// Interval between purges of expired tasks and idempotency keys.
    #[arg(long, env = "DOCKET_PURGE_INTERVAL", default_value = "1m", value_parser = parse_duration)]
    pub purge_interval: Duration,

    /// Number of ready tasks per queue that the dispatcher keeps in memory. The rest of a
    /// backlog stays in the store and is read in order as the window empties.
    #[arg(long, env = "DOCKET_DISPATCH_WINDOW", default_value_t = crate::dispatch::DEFAULT_WINDOW, value_parser = clap::value_parser!(usize))]
    pub dispatch_window: usize,

    /// Size of the database's page cache in memory, in bytes. A larger cache serves more
    /// reads from memory; the broker's resident memory grows up to it.
    #[arg(long, env = "DOCKET_CACHE_BYTES", default_value_t = 128 * 1024 * 1024)]
    pub cache_bytes: usize,

    /// Maximum size of one gRPC message that the broker accepts, in bytes.
    #[arg(long, env = "DOCKET_MAX_MESSAGE_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub max_message_bytes: usize,

    /// Capacity of the queue of write requests waiting for the storage writer.
    #[arg(long, env = "DOCKET_WRITE_QUEUE_CAPACITY", default_value_t = 4096)]
    pub write_queue_capacity: usize,

    /// Maximum number of write requests that the storage writer commits in one transaction.
    #[arg(long, env = "DOCKET_MAX_COMMIT_BATCH", default_value_t = 1024)]
    pub max_commit_batch: usize,

    /// Address and port to serve Prometheus metrics on, at `GET /metrics`. Unset turns the
    /// metrics server off. Port 0 picks a free port, which the broker logs.
    #[arg(long, env = "DOCKET_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// Time that shutdown waits for open calls to finish, and then again for pending
    /// commits, before it closes them: up to twice this value in all.
    #[arg(long, env = "DOCKET_SHUTDOWN_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    /// TLS and bearer-token settings.
    #[command(flatten)]
    pub security: crate::tls::SecurityArgs,

    /// Test hook: store recovery waits while this file exists, so that a test can observe
    /// the broker before its store is ready.
    #[arg(long, hide = true, value_name = "PATH")]
    pub hold_recovery_while_exists: Option<PathBuf>,

    /// Test hook: every commit fails while this file exists, so that a test can observe
    /// the broker while its store fails.
    #[arg(long, hide = true, value_name = "PATH")]
    pub fail_commits_while_exists: Option<PathBuf>,
}

/// Upper bound on any task's maximum attempts.
pub const MAX_ATTEMPTS_LIMIT: u32 = 100;

impl Config {
    /// Returns a configuration with every default, serving `listen` and storing in `data_dir`.
    pub fn new(listen: SocketAddr, data_dir: impl Into<PathBuf>) -> Self {
        let mut config = Config::parse_from(["docket-broker"]);
        config.listen = listen;
        config.data_dir = data_dir.into();
        config
    }

    /// Path of the redb file inside the data folder.
    pub fn database_path(&self) -> PathBuf {
        self.data_dir.join("broker.redb")
    }
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .map_err(|err| format!("invalid duration {text:?}: {err} (examples: 500ms, 15s, 1h)"))
}
