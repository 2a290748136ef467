//! `docket queue` subcommands.

use docket::proto::{
    GetQueueStatsRequest, ListQueuesRequest, PauseQueueRequest, PurgeQueueRequest, QueueStats,
    ResumeQueueRequest,
};
use serde_json::{Value, json};

use crate::args::QueueCommand;
use crate::connect::Context;
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
    }
    Ok(())
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
