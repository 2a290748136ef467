//! `docket task get`, `docket task watch` and `docket task cancel`.

use docket::proto::{CancelTaskRequest, TaskState, TaskStatus};
use serde_json::{Map, Value, json};
use tokio_stream::StreamExt;

use crate::connect::Context;
use crate::error::{CliError, Service};
use crate::output::{
    bytes_text, enum_name, fields_text, headers_json, headers_text, insert_bytes, print,
    timestamp_json, timestamp_text, write_stdout,
};

/// Prints the task `id` with its state, attempts and history.
pub async fn get(context: &Context, id: String) -> Result<(), CliError> {
    let client = context.sdk_client().await?;
    let status = client
        .get_task(id)
        .await
        .map_err(|err| CliError::from_sdk(Service::Broker, err))?;
    print(context.json, &status_json(&status), &status_text(&status));
    Ok(())
}

/// Cancels the task `id` and prints its state after the call.
pub async fn cancel(context: &Context, id: String) -> Result<(), CliError> {
    let mut broker = context.broker().await?;
    let response = broker
        .cancel_task(CancelTaskRequest {
            task_id: id.clone(),
        })
        .await
        .map_err(|status| CliError::status(Service::Broker, status))?
        .into_inner();
    let state = state_name(response.state());
    let text = if response.state() == TaskState::Leased {
        format!(
            "task {id} is running, so its worker gets a cancellation notice; the task ends \
             CANCELLED unless the worker acks it\n"
        )
    } else {
        format!("task {id} {state}\n")
    };
    print(
        context.json,
        &json!({ "task_id": id, "state": state }),
        &text,
    );
    Ok(())
}

/// Prints one line per state change of the task `id` until it reaches a final state.
/// Returns [`CliError::TaskEnded`] when that state is DEAD or CANCELLED.
pub async fn watch(context: &Context, id: String) -> Result<(), CliError> {
    let client = context.watch_client().await?;
    let mut changes = client
        .watch_task(id)
        .await
        .map_err(|err| CliError::from_sdk(Service::Broker, err))?;
    let mut last_state = TaskState::Unspecified;
    while let Some(item) = changes.next().await {
        let status = item.map_err(|err| CliError::from_sdk(Service::Broker, err))?;
        last_state = status.state();
        let line = if context.json {
            change_json(&status).to_string()
        } else {
            change_text(&status)
        };
        write_stdout(&format!("{line}\n"));
    }
    match last_state {
        TaskState::Succeeded => Ok(()),
        _ => Err(CliError::TaskEnded),
    }
}

/// Returns the attempt that a status is about: the running one while LEASED, and the
/// last finished one otherwise.
fn current_attempt(status: &TaskStatus) -> u32 {
    if status.state() == TaskState::Leased {
        status.attempts + 1
    } else {
        status.attempts
    }
}

/// Returns the error worth showing with a status: the last attempt's error while the
/// task waits for a retry or after it died.
fn change_error(status: &TaskStatus) -> Option<&str> {
    let failed = matches!(status.state(), TaskState::RetryWait | TaskState::Dead);
    (failed && !status.last_error.is_empty()).then_some(status.last_error.as_str())
}

/// Returns one state change as a line: time, state, attempt and the error if any.
fn change_text(status: &TaskStatus) -> String {
    let max_attempts = status.task.as_ref().map_or(0, |task| task.max_attempts);
    let mut line = format!(
        "{}  {:<10}  attempt {}/{}",
        timestamp_text(status.updated_at.as_ref()),
        state_name(status.state()),
        current_attempt(status),
        max_attempts
    );
    if let Some(retry_at) = &status.retry_at
        && status.state() == TaskState::RetryWait
    {
        line.push_str(&format!("  retry at {}", timestamp_text(Some(retry_at))));
    }
    if let Some(error) = change_error(status) {
        line.push_str(&format!("  error: {}", one_line(error)));
    }
    line
}

/// Returns one state change as a JSON object for one line of NDJSON.
fn change_json(status: &TaskStatus) -> Value {
    let task = status.task.as_ref();
    json!({
        "time": timestamp_json(status.updated_at.as_ref()),
        "task_id": task.map(|task| task.id.as_str()),
        "queue": task.map(|task| task.queue.as_str()),
        "kind": task.map(|task| task.kind.as_str()),
        "state": state_name(status.state()),
        "attempt": current_attempt(status),
        "attempts": status.attempts,
        "max_attempts": task.map_or(0, |task| task.max_attempts),
        "retry_at": timestamp_json(status.retry_at.as_ref()),
        "error": change_error(status),
    })
}

/// Replaces line breaks so that a multi-line error stays on one line.
pub fn one_line(text: &str) -> String {
    text.replace(['\n', '\r'], " ")
}

/// Returns a task state's name, such as `PENDING`.
pub fn state_name(state: TaskState) -> &'static str {
    enum_name(state.as_str_name(), "TASK_STATE_")
}

/// Returns a task's status as one JSON object, with the task's own fields at the top.
pub fn status_json(status: &TaskStatus) -> Value {
    let task = status.task.clone().unwrap_or_default();
    let mut object = Map::new();
    object.insert("id".to_owned(), json!(task.id));
    object.insert("queue".to_owned(), json!(task.queue));
    object.insert("kind".to_owned(), json!(task.kind));
    object.insert("state".to_owned(), json!(state_name(status.state())));
    object.insert("attempts".to_owned(), json!(status.attempts));
    object.insert("max_attempts".to_owned(), json!(task.max_attempts));
    object.insert("priority".to_owned(), json!(task.priority));
    insert_bytes(&mut object, "payload", &task.payload);
    object.insert("headers".to_owned(), headers_json(&task.headers));
    object.insert("idempotency_key".to_owned(), json!(status.idempotency_key));
    object.insert(
        "created_at".to_owned(),
        timestamp_json(task.created_at.as_ref()),
    );
    object.insert(
        "updated_at".to_owned(),
        timestamp_json(status.updated_at.as_ref()),
    );
    object.insert(
        "lease_deadline".to_owned(),
        timestamp_json(status.lease_deadline.as_ref()),
    );
    object.insert(
        "retry_at".to_owned(),
        timestamp_json(status.retry_at.as_ref()),
    );
    object.insert(
        "cancel_requested".to_owned(),
        json!(status.cancel_requested),
    );
    object.insert("last_error".to_owned(), json!(status.last_error));
    insert_bytes(&mut object, "result", &status.result);

    let attempts: Vec<Value> = status
        .attempt_history
        .iter()
        .map(|attempt| {
            json!({
                "number": attempt.number,
                "started_at": timestamp_json(attempt.started_at.as_ref()),
                "finished_at": timestamp_json(attempt.finished_at.as_ref()),
                "error": attempt.error,
            })
        })
        .collect();
    object.insert("attempt_history".to_owned(), Value::Array(attempts));
    let changes: Vec<Value> = status
        .state_history
        .iter()
        .map(|change| {
            json!({
                "state": state_name(change.state()),
                "at": timestamp_json(change.at.as_ref()),
            })
        })
        .collect();
    object.insert("state_history".to_owned(), Value::Array(changes));
    Value::Object(object)
}

/// Returns a task's status as aligned `key: value` lines.
pub fn status_text(status: &TaskStatus) -> String {
    let task = status.task.clone().unwrap_or_default();
    let mut fields = vec![
        ("id", task.id.clone()),
        ("queue", task.queue.clone()),
        ("kind", task.kind.clone()),
        ("state", state_name(status.state()).to_owned()),
        (
            "attempts",
            format!("{} of {}", status.attempts, task.max_attempts),
        ),
        ("priority", task.priority.to_string()),
        ("payload", bytes_text(&task.payload)),
        ("headers", headers_text(&task.headers)),
        ("created at", timestamp_text(task.created_at.as_ref())),
        ("updated at", timestamp_text(status.updated_at.as_ref())),
    ];
    if !status.idempotency_key.is_empty() {
        fields.push(("idempotency key", status.idempotency_key.clone()));
    }
    if status.lease_deadline.is_some() {
        fields.push((
            "lease deadline",
            timestamp_text(status.lease_deadline.as_ref()),
        ));
    }
    if status.retry_at.is_some() {
        fields.push(("retry at", timestamp_text(status.retry_at.as_ref())));
    }
    if status.cancel_requested {
        fields.push(("cancel requested", "yes".to_owned()));
    }
    if !status.last_error.is_empty() {
        fields.push(("last error", status.last_error.clone()));
    }
    if !status.result.is_empty() {
        fields.push(("result", bytes_text(&status.result)));
    }
    for change in &status.state_history {
        fields.push((
            "history",
            format!(
                "{} {}",
                timestamp_text(change.at.as_ref()),
                state_name(change.state())
            ),
        ));
    }
    fields_text(&fields)
}
