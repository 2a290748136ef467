//! `docket queue` subcommands.

use std::time::Duration;

use docket::GrpcChannel as Channel;
use docket::proto::broker_client::BrokerClient;
use docket::proto::{
    GetQueueSettingsRequest, GetQueueStatsRequest, ListQueuesRequest, PauseQueueRequest,
    PurgeQueueRequest, QueueSettings, QueueStats, ResumeQueueRequest, RetryPolicy,
    UpdateQueueSettingsRequest,
};
use serde_json::{Value, json};

use crate::args::{QueueCommand, QueueConfigureArgs};
use crate::connect::Context;
use crate::enqueue::proto_duration;
use crate::error::{CliError, Service};
use crate::output::{duration_seconds, duration_text, fields_text, print, table_text};

/// Runs one `docket queue` subcommand.
pub async fn run(context: &Context, command: QueueCommand) -> Result<(), CliError> {
    let mut broker = context.broker().await?;
    let failed = |status| CliError::status(Service::Broker, status);
    match command {
        QueueCommand::List => {
            let queues = broker
                .list_queues(ListQueuesRequest {})
                .await
                .map_err(failed)?
                .into_inner()
                .queues;
            let document = json!({ "queues": queues.iter().map(stats_json).collect::<Vec<_>>() });
            print(context.json, &document, &list_text(&queues));
        }
        QueueCommand::Stats { queue } => {
            let stats = broker
                .get_queue_stats(GetQueueStatsRequest { queue })
                .await
                .map_err(failed)?
                .into_inner()
                .stats
                .ok_or_else(|| CliError::InvalidResponse {
                    service: Service::Broker,
                    detail: "GetQueueStats returned no stats".to_owned(),
                })?;
            print(context.json, &stats_json(&stats), &stats_text(&stats));
        }
        QueueCommand::Pause { queue } => {
            broker
                .pause_queue(PauseQueueRequest {
                    queue: queue.clone(),
                })
                .await
                .map_err(failed)?;
            let text = format!("queue {queue} paused; enqueue still works\n");
            print(
                context.json,
                &json!({ "queue": queue, "paused": true }),
                &text,
            );
        }
        QueueCommand::Resume { queue } => {
            broker
                .resume_queue(ResumeQueueRequest {
                    queue: queue.clone(),
                })
                .await
                .map_err(failed)?;
            let text = format!("queue {queue} resumed\n");
            print(
                context.json,
                &json!({ "queue": queue, "paused": false }),
                &text,
            );
        }
        QueueCommand::Purge { queue } => {
            let purged = broker
                .purge_queue(PurgeQueueRequest {
                    queue: queue.clone(),
                })
                .await
                .map_err(failed)?
                .into_inner()
                .purged;
            let text = format!("queue {queue}: {purged} waiting tasks deleted\n");
            print(
                context.json,
                &json!({ "queue": queue, "purged": purged }),
                &text,
            );
        }
        QueueCommand::Settings { queue } => {
            let settings = get_settings(&mut broker, &queue).await?;
            print(
                context.json,
                &settings_json(&queue, &settings),
                &settings_text(&queue, &settings),
            );
        }
        QueueCommand::Configure(args) => {
            let queue = args.queue.clone();
            let settings = configure(&mut broker, args).await?;
            print(
                context.json,
                &settings_json(&queue, &settings),
                &format!(
                    "queue {queue} updated; settings now:\n{}",
                    settings_text(&queue, &settings)
                ),
            );
        }
    }
    Ok(())
}

/// Shortest retention or dead retention that the broker accepts.
const MIN_RETENTION: Duration = Duration::from_secs(60);
/// Maximum retry delay that the broker accepts.
const MAX_BACKOFF: Duration = Duration::from_secs(24 * 60 * 60);
/// Maximum retention, dead retention or idempotency window that the broker accepts.
const MAX_KEEP: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);

async fn get_settings(
    broker: &mut BrokerClient<Channel>,
    queue: &str,
) -> Result<QueueSettings, CliError> {
    broker
        .get_queue_settings(GetQueueSettingsRequest {
            queue: queue.to_owned(),
        })
        .await
        .map_err(|status| CliError::status(Service::Broker, status))?
        .into_inner()
        .settings
        .ok_or_else(|| CliError::InvalidResponse {
            service: Service::Broker,
            detail: "GetQueueSettings returned no settings".to_owned(),
        })
}

/// Checks a duration flag against the range that the broker accepts.
fn check_range(
    flag: &str,
    value: Option<Duration>,
    min: Duration,
    max: Duration,
) -> Result<(), CliError> {
    match value {
        Some(value) if value < min || value > max => Err(CliError::Input {
            message: format!(
                "invalid --{flag} {}: out of range",
                humantime::format_duration(value)
            ),
            hint: format!("use {} to {}", range_end(min), range_end(max)),
        }),
        _ => Ok(()),
    }
}

/// Validates the flags of `queue configure`, sends the changes, and returns the settings
/// in force afterwards. The retry flags change one field of the retry policy, which the
/// broker takes whole, so the current policy fills in the fields not given.
async fn configure(
    broker: &mut BrokerClient<Channel>,
    args: QueueConfigureArgs,
) -> Result<QueueSettings, CliError> {
    check_range(
        "initial-backoff",
        args.initial_backoff,
        Duration::ZERO,
        MAX_BACKOFF,
    )?;
    check_range("max-backoff", args.max_backoff, Duration::ZERO, MAX_BACKOFF)?;
    check_range(
        "lease-duration",
        args.lease_duration,
        Duration::from_secs(1),
        MAX_KEEP,
    )?;
    check_range("retention", args.retention, MIN_RETENTION, MAX_KEEP)?;
    check_range(
        "dead-retention",
        args.dead_retention,
        MIN_RETENTION,
        MAX_KEEP,
    )?;
    check_range(
        "idempotency-window",
        args.idempotency_window,
        Duration::from_secs(1),
        MAX_KEEP,
    )?;

    let changes_policy = args.initial_backoff.is_some()
        || args.max_backoff.is_some()
        || args.backoff_multiplier.is_some()
        || args.jitter.is_some();
    let retry_policy = if changes_policy {
        let current = get_settings(broker, &args.queue)
            .await?
            .retry_policy
            .unwrap_or_default();
        let initial = match args.initial_backoff {
            Some(value) => value,
            None => proto_to_duration(current.initial_backoff.as_ref()),
        };
        let max = match args.max_backoff {
            Some(value) => value,
            None => proto_to_duration(current.max_backoff.as_ref()),
        };
        if max < initial {
            return Err(CliError::Input {
                message: format!(
                    "invalid retry policy: the max backoff {} is shorter than the initial \
                     backoff {}",
                    humantime::format_duration(max),
                    humantime::format_duration(initial)
                ),
                hint: "raise --max-backoff or lower --initial-backoff; `docket queue settings \
                       QUEUE` shows the current values"
                    .to_owned(),
            });
        }
        Some(RetryPolicy {
            initial_backoff: Some(proto_duration(initial)?),
            multiplier: args.backoff_multiplier.unwrap_or(current.multiplier),
            max_backoff: Some(proto_duration(max)?),
            jitter: args.jitter.unwrap_or(current.jitter),
        })
    } else {
        None
    };
    let optional = |value: Option<Duration>| value.map(proto_duration).transpose();
    let settings = QueueSettings {
        max_attempts: args.max_attempts,
        retry_policy,
        lease_duration: optional(args.lease_duration)?,
        retention: optional(args.retention)?,
        dead_retention: optional(args.dead_retention)?,
        idempotency_window: optional(args.idempotency_window)?,
        paused: false,
    };
    broker
        .update_queue_settings(UpdateQueueSettingsRequest {
            queue: args.queue,
            settings: Some(settings),
        })
        .await
        .map_err(|status| CliError::status(Service::Broker, status))?
        .into_inner()
        .settings
        .ok_or_else(|| CliError::InvalidResponse {
            service: Service::Broker,
            detail: "UpdateQueueSettings returned no settings".to_owned(),
        })
}

/// Formats an end of a range such as `1m`, with 10 years spelled out rather than in
/// humantime's calendar approximation.
fn range_end(value: Duration) -> String {
    if value == MAX_KEEP {
        "10 years".to_owned()
    } else {
        humantime::format_duration(value).to_string()
    }
}

fn proto_to_duration(duration: Option<&prost_types::Duration>) -> Duration {
    duration
        .and_then(|duration| Duration::try_from(*duration).ok())
        .unwrap_or_default()
}

fn settings_json(queue: &str, settings: &QueueSettings) -> Value {
    let policy = settings.retry_policy.unwrap_or_default();
    json!({
        "queue": queue,
        "max_attempts": settings.max_attempts,
        "retry_policy": {
            "initial_backoff_seconds": duration_seconds(policy.initial_backoff.as_ref()),
            "multiplier": policy.multiplier,
            "max_backoff_seconds": duration_seconds(policy.max_backoff.as_ref()),
            "jitter": policy.jitter,
        },
        "lease_duration_seconds": duration_seconds(settings.lease_duration.as_ref()),
        "retention_seconds": duration_seconds(settings.retention.as_ref()),
        "dead_retention_seconds": duration_seconds(settings.dead_retention.as_ref()),
        "idempotency_window_seconds": duration_seconds(settings.idempotency_window.as_ref()),
        "paused": settings.paused,
    })
}

fn settings_text(queue: &str, settings: &QueueSettings) -> String {
    let policy = settings.retry_policy.unwrap_or_default();
    fields_text(&[
        ("queue", queue.to_owned()),
        ("paused", yes_no(settings.paused).to_owned()),
        (
            "max attempts",
            settings
                .max_attempts
                .map_or_else(|| "-".to_owned(), |value| value.to_string()),
        ),
        (
            "initial backoff",
            duration_text(policy.initial_backoff.as_ref()),
        ),
        ("backoff multiplier", policy.multiplier.to_string()),
        ("max backoff", duration_text(policy.max_backoff.as_ref())),
        ("jitter", policy.jitter.to_string()),
        (
            "lease duration",
            duration_text(settings.lease_duration.as_ref()),
        ),
        ("retention", duration_text(settings.retention.as_ref())),
        (
            "dead retention",
            duration_text(settings.dead_retention.as_ref()),
        ),
        (
            "idempotency window",
            duration_text(settings.idempotency_window.as_ref()),
        ),
    ])
}

fn stats_json(stats: &QueueStats) -> Value {
    json!({
        "queue": stats.queue,
        "pending": stats.pending,
        "retry_wait": stats.retry_wait,
        "leased": stats.leased,
        "dead": stats.dead,
        "succeeded": stats.succeeded,
        "cancelled": stats.cancelled,
        "oldest_pending_age_seconds": duration_seconds(stats.oldest_pending_age.as_ref()),
        "paused": stats.paused,
    })
}

fn stats_text(stats: &QueueStats) -> String {
    fields_text(&[
        ("queue", stats.queue.clone()),
        ("paused", yes_no(stats.paused).to_owned()),
        ("pending", stats.pending.to_string()),
        ("retry wait", stats.retry_wait.to_string()),
        ("leased", stats.leased.to_string()),
        ("dead", stats.dead.to_string()),
        ("succeeded", stats.succeeded.to_string()),
        ("cancelled", stats.cancelled.to_string()),
        (
            "oldest pending",
            duration_text(stats.oldest_pending_age.as_ref()),
        ),
    ])
}

fn list_text(queues: &[QueueStats]) -> String {
    if queues.is_empty() {
        return "no queues\n".to_owned();
    }
    let rows: Vec<Vec<String>> = queues
        .iter()
        .map(|stats| {
            vec![
                stats.queue.clone(),
                stats.pending.to_string(),
                stats.retry_wait.to_string(),
                stats.leased.to_string(),
                stats.dead.to_string(),
                stats.succeeded.to_string(),
                stats.cancelled.to_string(),
                yes_no(stats.paused).to_owned(),
            ]
        })
        .collect();
    table_text(
        &[
            "QUEUE",
            "PENDING",
            "RETRY_WAIT",
            "LEASED",
            "DEAD",
            "SUCCEEDED",
            "CANCELLED",
            "PAUSED",
        ],
        &rows,
    )
}

fn yes_no(value: bool) -> &'static str {
    if value { "yes" } else { "no" }
}
