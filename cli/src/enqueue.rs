//! `docket enqueue`: adds a task to the broker now, or through the scheduler later.

use chrono::{DateTime, FixedOffset};
use docket::proto::{EnqueueRequest, NewTask, ScheduleTaskRequest, schedule_task_request::Due};
use serde_json::json;

use crate::args::{EnqueueArgs, TaskArgs};
use crate::connect::Context;
use crate::error::{CliError, Service};
use crate::output::{print, timestamp_json, timestamp_text};

/// Runs `docket enqueue`.
pub async fn run(context: &Context, args: EnqueueArgs) -> Result<(), CliError> {
    let mut task = new_task(args.queue, args.kind, &args.task)?;
    task.idempotency_key = args.idempotency_key.unwrap_or_default();

    let due = match (args.delay, args.at) {
        (Some(delay), _) => Some(Due::Delay(proto_duration(delay)?)),
        (None, Some(at)) => Some(Due::DueTime(proto_timestamp(at))),
        (None, None) => None,
    };
    match due {
        Some(due) => schedule(context, task, due).await,
        None => enqueue_now(context, task).await,
    }
}

/// Builds the task that `enqueue` and `schedule add` send, reading the payload file if
/// one is given.
pub fn new_task(queue: String, kind: String, args: &TaskArgs) -> Result<NewTask, CliError> {
    let payload = match (&args.payload.payload, &args.payload.payload_file) {
        (Some(text), _) => text.clone().into_bytes(),
        (None, Some(path)) => std::fs::read(path).map_err(|err| {
            CliError::Usage(format!(
                "cannot read the payload file {}: {err}",
                path.display()
            ))
        })?,
        (None, None) => Vec::new(),
    };
    Ok(NewTask {
        queue,
        kind,
        payload: payload.into(),
        headers: args.headers.iter().cloned().collect(),
        priority: args.priority,
        max_attempts: args.max_attempts,
        ..NewTask::default()
    })
}

async fn enqueue_now(context: &Context, task: NewTask) -> Result<(), CliError> {
    let queue = task.queue.clone();
    let mut broker = context.broker().await?;
    let response = broker
        .enqueue(EnqueueRequest { tasks: vec![task] })
        .await
        .map_err(|status| CliError::status(Service::Broker, status))?
        .into_inner();
    let (Some(task_id), duplicate) = (
        response.task_ids.first().cloned(),
        response.duplicates.first().copied().unwrap_or(false),
    ) else {
        return Err(CliError::InvalidResponse {
            service: Service::Broker,
            detail: "Enqueue returned no task id".to_owned(),
        });
    };

    let text = if duplicate {
        format!("{task_id}\n(duplicate: the idempotency key matched this earlier task)\n")
    } else {
        format!("{task_id}\n")
    };
    let document = json!({ "task_id": task_id, "queue": queue, "duplicate": duplicate });
    print(context.json, &document, &text);
    Ok(())
}

async fn schedule(context: &Context, task: NewTask, due: Due) -> Result<(), CliError> {
    let queue = task.queue.clone();
    let mut scheduler = context.scheduler().await?;
    let schedule = scheduler
        .schedule_task(ScheduleTaskRequest {
            task: Some(task),
            due: Some(due),
        })
        .await
        .map_err(|status| CliError::status(Service::Scheduler, status))?
        .into_inner()
        .schedule
        .ok_or_else(|| CliError::InvalidResponse {
            service: Service::Scheduler,
            detail: "ScheduleTask returned no schedule".to_owned(),
        })?;

    let text = format!(
        "{}\nscheduled for {}; `docket schedule get --id {}` shows the task id once it is \
         released\n",
        schedule.id,
        timestamp_text(schedule.due_time.as_ref()),
        schedule.id
    );
    let document = json!({
        "schedule_id": schedule.id,
        "queue": queue,
        "due_time": timestamp_json(schedule.due_time.as_ref()),
    });
    print(context.json, &document, &text);
    Ok(())
}

/// Converts a delay to the protobuf type, rejecting delays longer than it can carry.
pub fn proto_duration(delay: std::time::Duration) -> Result<prost_types::Duration, CliError> {
    let too_long = || {
        CliError::Usage(format!(
            "invalid duration {delay:?}: longer than a protobuf Duration can carry"
        ))
    };
    Ok(prost_types::Duration {
        seconds: i64::try_from(delay.as_secs()).map_err(|_| too_long())?,
        nanos: i32::try_from(delay.subsec_nanos()).map_err(|_| too_long())?,
    })
}

fn proto_timestamp(time: DateTime<FixedOffset>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: time.timestamp(),
        // chrono represents a leap second as nanoseconds from 1e9 up, which protobuf does
        // not allow, so such a time becomes the last nanosecond of the second before.
        nanos: i32::try_from(time.timestamp_subsec_nanos().min(999_999_999))
            .expect("at most 999999999 fits in i32"),
    }
}
