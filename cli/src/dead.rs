//! `docket dead` subcommands: list, requeue and delete dead tasks.

use std::collections::BTreeMap;

use docket::GrpcChannel as Channel;
use docket::proto::broker_client::BrokerClient;
use docket::proto::{
    DeleteDeadTasksRequest, GetQueueStatsRequest, GetTaskRequest, ListDeadTasksRequest,
    ListQueuesRequest, RequeueDeadTasksRequest, TaskState, TaskStatus,
};
use serde_json::{Value, json};

use crate::args::{DeadCommand, DeadListArgs, DeadSelectArgs};
use crate::connect::Context;
use crate::error::{CliError, Service};
use crate::output::{print, table_text, timestamp_json, timestamp_text};
use crate::progress;
use crate::task::{one_line, status_json};

/// Number of ids sent per RequeueDeadTasks or DeleteDeadTasks call, the broker's limit.
const BATCH: usize = 1000;

/// Characters of the last error shown in the `dead list` table.
const ERROR_WIDTH: usize = 60;

/// Separates the queue from the broker's page token in a `dead list` token that spans
/// queues. Queue names never contain it.
const TOKEN_SEPARATOR: char = '/';

type Broker = BrokerClient<Channel>;

fn failed(status: tonic::Status) -> CliError {
    CliError::status(Service::Broker, status)
}

/// Runs one `docket dead` subcommand.
pub async fn run(context: &Context, command: DeadCommand) -> Result<(), CliError> {
    let mut broker = context.broker().await?;
    match command {
        DeadCommand::List(args) => list(context, &mut broker, args).await,
        DeadCommand::Requeue(args) => change(context, &mut broker, Action::Requeue, args).await,
        DeadCommand::Delete(args) => change(context, &mut broker, Action::Delete, args).await,
    }
}

async fn list_page(
    broker: &mut Broker,
    queue: &str,
    page_size: u32,
    page_token: String,
) -> Result<(Vec<TaskStatus>, String), CliError> {
    let page = broker
        .list_dead_tasks(ListDeadTasksRequest {
            queue: queue.to_owned(),
            page_size,
            page_token,
        })
        .await
        .map_err(failed)?
        .into_inner();
    Ok((page.tasks, page.next_page_token))
}

/// Lists one page of dead tasks, of one queue or of every queue.
async fn list(context: &Context, broker: &mut Broker, args: DeadListArgs) -> Result<(), CliError> {
    let token = args.page_token.unwrap_or_default();
    let (tasks, next_token) = match &args.queue {
        Some(queue) => list_page(broker, queue, args.limit, token).await?,
        None => list_every_queue(broker, args.limit, &token).await?,
    };

    let document = json!({
        "tasks": tasks.iter().map(dead_json).collect::<Vec<_>>(),
        "next_page_token": (!next_token.is_empty()).then_some(&next_token),
    });
    let mut text = if tasks.is_empty() {
        "no dead tasks\n".to_owned()
    } else {
        let rows: Vec<Vec<String>> = tasks.iter().map(dead_row).collect();
        table_text(
            &["ID", "QUEUE", "KIND", "ATTEMPTS", "DIED", "LAST_ERROR"],
            &rows,
        )
    };
    if !next_token.is_empty() {
        let queue_flag = args
            .queue
            .as_ref()
            .map(|queue| format!(" --queue {queue}"))
            .unwrap_or_default();
        text.push_str(&format!(
            "next page: docket dead list{queue_flag} --limit {} --page-token {next_token}\n",
            args.limit
        ));
    }
    print(context.json, &document, &text);
    Ok(())
}

/// Lists up to `limit` dead tasks across queues in name order, starting where `token`
/// points. The token is `QUEUE/BROKER_TOKEN`, or empty for the first page.
async fn list_every_queue(
    broker: &mut Broker,
    limit: u32,
    token: &str,
) -> Result<(Vec<TaskStatus>, String), CliError> {
    let (start_queue, mut broker_token) = if token.is_empty() {
        (String::new(), String::new())
    } else {
        let (queue, rest) = token
            .split_once(TOKEN_SEPARATOR)
            .ok_or_else(|| CliError::Input {
                message: format!("invalid --page-token {token:?}"),
                hint: "pass the token that the previous page printed, with the same --queue flag"
                    .to_owned(),
            })?;
        (queue.to_owned(), rest.to_owned())
    };
    let mut queues: Vec<String> = broker
        .list_queues(ListQueuesRequest {})
        .await
        .map_err(failed)?
        .into_inner()
        .queues
        .into_iter()
        .filter(|stats| stats.dead > 0 && stats.queue >= start_queue)
        .map(|stats| stats.queue)
        .collect();
    queues.sort();
    if queues.first() != Some(&start_queue) {
        broker_token.clear();
    }

    let mut tasks = Vec::new();
    for (index, queue) in queues.iter().enumerate() {
        loop {
            let remaining = limit - u32::try_from(tasks.len()).unwrap_or(limit);
            let (page, next) =
                list_page(broker, queue, remaining, std::mem::take(&mut broker_token)).await?;
            tasks.extend(page);
            let full = tasks.len() >= limit as usize;
            if !next.is_empty() {
                if full {
                    return Ok((tasks, format!("{queue}{TOKEN_SEPARATOR}{next}")));
                }
                broker_token = next;
                continue;
            }
            if full {
                let next_queue = queues
                    .get(index + 1)
                    .map(|next_queue| format!("{next_queue}{TOKEN_SEPARATOR}"))
                    .unwrap_or_default();
                return Ok((tasks, next_queue));
            }
            break;
        }
    }
    Ok((tasks, String::new()))
}

fn dead_json(status: &TaskStatus) -> Value {
    let mut object = status_json(status);
    if let Value::Object(fields) = &mut object {
        fields.insert(
            "died_at".to_owned(),
            timestamp_json(status.updated_at.as_ref()),
        );
    }
    object
}

fn dead_row(status: &TaskStatus) -> Vec<String> {
    let task = status.task.clone().unwrap_or_default();
    vec![
        task.id,
        task.queue,
        task.kind,
        format!("{}/{}", status.attempts, task.max_attempts),
        timestamp_text(status.updated_at.as_ref()),
        truncate(&one_line(&status.last_error), ERROR_WIDTH),
    ]
}

/// Returns at most `width` characters of `text`, ending with `...` if it was cut.
fn truncate(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        return text.to_owned();
    }
    let mut cut: String = text.chars().take(width.saturating_sub(3)).collect();
    cut.push_str("...");
    cut
}

/// The change that `dead requeue` or `dead delete` makes to the selected tasks.
#[derive(Debug, Clone, Copy)]
enum Action {
    Requeue,
    Delete,
}

impl Action {
    /// Returns the past participle that the output uses, such as `requeued`.
    fn done(self) -> &'static str {
        match self {
            Action::Requeue => "requeued",
            Action::Delete => "deleted",
        }
    }

    /// Requeues or deletes the dead tasks `ids` of `queue`, and returns how many there
    /// were.
    async fn apply(
        self,
        broker: &mut Broker,
        queue: &str,
        ids: Vec<String>,
    ) -> Result<u64, CliError> {
        let queue = queue.to_owned();
        match self {
            Action::Requeue => Ok(broker
                .requeue_dead_tasks(RequeueDeadTasksRequest {
                    queue,
                    task_ids: ids,
                    all: false,
                })
                .await
                .map_err(failed)?
                .into_inner()
                .requeued),
            Action::Delete => Ok(broker
                .delete_dead_tasks(DeleteDeadTasksRequest {
                    queue,
                    task_ids: ids,
                    all: false,
                })
                .await
                .map_err(failed)?
                .into_inner()
                .deleted),
        }
    }
}

/// A task id that was not acted on, and why.
struct Skipped {
    id: String,
    reason: String,
}

/// Runs `dead requeue` or `dead delete`.
async fn change(
    context: &Context,
    broker: &mut Broker,
    action: Action,
    args: DeadSelectArgs,
) -> Result<(), CliError> {
    // clap refuses --all without --queue already; the match needs the case anyway.
    let (changed, requested, skipped) = match (args.all, args.queue) {
        (true, None) => {
            return Err(CliError::Usage(
                "--all needs --queue: name the queue whose dead tasks to change".to_owned(),
            ));
        }
        (true, Some(queue)) => {
            let changed = change_all(context, broker, action, &queue).await?;
            (changed, changed, Vec::new())
        }
        (false, Some(queue)) => {
            let requested = args.ids.len() as u64;
            let changed = change_ids(context, broker, action, &queue, args.ids).await?;
            (changed, requested, Vec::new())
        }
        (false, None) => change_ids_anywhere(context, broker, action, args.ids).await?,
    };

    let skipped_count = requested - changed.min(requested) + skipped.len() as u64;
    let done = action.done();
    let mut text = format!("{changed} dead tasks {done}\n");
    if skipped_count > 0 {
        text.push_str(&format!(
            "{skipped_count} ids skipped: they name no dead task{}\n",
            if skipped.is_empty() {
                " of the queue"
            } else {
                ""
            }
        ));
        for item in &skipped {
            text.push_str(&format!("  {}: {}\n", item.id, item.reason));
        }
    }
    let document = json!({
        done: changed,
        "skipped": skipped_count,
        "skipped_ids": skipped
            .iter()
            .map(|item| json!({ "id": item.id, "reason": item.reason }))
            .collect::<Vec<_>>(),
    });
    print(context.json, &document, &text);
    Ok(())
}

/// Acts on the ids of one queue in batches, with a progress bar.
async fn change_ids(
    context: &Context,
    broker: &mut Broker,
    action: Action,
    queue: &str,
    ids: Vec<String>,
) -> Result<u64, CliError> {
    let bar = progress::bar(context.json, ids.len() as u64, action.done());
    let mut changed = 0;
    for batch in ids.chunks(BATCH) {
        changed += action.apply(broker, queue, batch.to_vec()).await?;
        bar.inc(batch.len() as u64);
    }
    bar.finish_and_clear();
    Ok(changed)
}

/// Acts on ids whose queue is not given: looks up each task's queue first and skips ids
/// of tasks that are unknown or not dead.
async fn change_ids_anywhere(
    context: &Context,
    broker: &mut Broker,
    action: Action,
    ids: Vec<String>,
) -> Result<(u64, u64, Vec<Skipped>), CliError> {
    let mut by_queue: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut skipped = Vec::new();
    let lookups = progress::bar(context.json, ids.len() as u64, "looked up");
    for id in ids {
        lookups.inc(1);
        let response = broker
            .get_task(GetTaskRequest {
                task_id: id.clone(),
            })
            .await;
        match response {
            Ok(response) => {
                let status = response.into_inner().status.unwrap_or_default();
                let queue = status.task.as_ref().map(|task| task.queue.clone());
                match (status.state(), queue) {
                    (TaskState::Dead, Some(queue)) => by_queue.entry(queue).or_default().push(id),
                    (state, _) => skipped.push(Skipped {
                        id,
                        reason: format!("the task is {}", crate::task::state_name(state)),
                    }),
                }
            }
            Err(status) if status.code() == tonic::Code::NotFound => skipped.push(Skipped {
                id,
                reason: "no task with this id".to_owned(),
            }),
            Err(status) => return Err(failed(status)),
        }
    }
    lookups.finish_and_clear();
    let mut changed = 0;
    let mut requested = 0;
    for (queue, ids) in by_queue {
        requested += ids.len() as u64;
        changed += change_ids(context, broker, action, &queue, ids).await?;
    }
    Ok((changed, requested, skipped))
}

/// Acts on every dead task of `queue`: pages through the dead tasks, oldest death first,
/// and acts on each page, with a progress bar over the queue's dead count.
async fn change_all(
    context: &Context,
    broker: &mut Broker,
    action: Action,
    queue: &str,
) -> Result<u64, CliError> {
    let dead = broker
        .get_queue_stats(GetQueueStatsRequest {
            queue: queue.to_owned(),
        })
        .await
        .map_err(failed)?
        .into_inner()
        .stats
        .map_or(0, |stats| stats.dead);
    let bar = progress::bar(context.json, dead, action.done());
    let mut changed = 0;
    let mut token = String::new();
    loop {
        // The page token marks a position in death order, so it stays valid after the
        // page's tasks leave the dead list.
        let (page, next) = list_page(broker, queue, BATCH as u32, token).await?;
        let ids: Vec<String> = page
            .into_iter()
            .filter_map(|status| status.task.map(|task| task.id))
            .collect();
        if !ids.is_empty() {
            let count = ids.len() as u64;
            changed += action.apply(broker, queue, ids).await?;
            if bar.position() + count > dead {
                bar.set_length(bar.position() + count);
            }
            bar.inc(count);
        }
        if next.is_empty() {
            break;
        }
        token = next;
    }
    bar.finish_and_clear();
    Ok(changed)
}
