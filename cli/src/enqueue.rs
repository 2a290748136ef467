//! `docket enqueue`: adds a task to the broker now, or through the scheduler later, or
//! many tasks from a file of JSON lines.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use chrono::{DateTime, FixedOffset};
use docket::proto::{EnqueueRequest, NewTask, ScheduleTaskRequest, schedule_task_request::Due};
use serde_json::{Map, Value, json};

use crate::args::{EnqueueArgs, TaskArgs};
use crate::connect::Context;
use crate::error::{CliError, Service};
use crate::output::{print, timestamp_json, timestamp_text, write_stdout};
use crate::progress;

/// Number of tasks per Enqueue call of `enqueue --file`, half the broker's default limit.
const FILE_BATCH: usize = 500;

/// Maximum length of a queue name or kind that the broker accepts.
const MAX_NAME_LEN: usize = 128;

/// Largest max_attempts that the broker accepts.
const MAX_ATTEMPTS: u64 = 100;

/// Runs `docket enqueue`.
pub async fn run(context: &Context, args: EnqueueArgs) -> Result<(), CliError> {
    if let Some(path) = &args.file {
        return enqueue_file(context, path, args.queue, args.kind).await;
    }
    let (Some(queue), Some(kind)) = (args.queue, args.kind) else {
        return Err(CliError::Usage(
            "enqueue needs a QUEUE and a KIND, or --file".to_owned(),
        ));
    };
    let mut task = new_task(queue, kind, &args.task)?;
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

/// One task of an `enqueue --file` file, with the line it came from.
struct FileTask {
    line: usize,
    task: NewTask,
}

/// Runs `docket enqueue --file`: reads and checks every line, then sends the tasks in
/// batches.
async fn enqueue_file(
    context: &Context,
    path: &Path,
    default_queue: Option<String>,
    default_kind: Option<String>,
) -> Result<(), CliError> {
    let (name, text) = read_file(path)?;
    let defaults = (default_queue.as_deref(), default_kind.as_deref());
    let mut tasks = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let line_number = index + 1;
        let task = parse_line(line, defaults).map_err(|problem| CliError::Input {
            message: format!("{name}, line {line_number}: {problem}"),
            hint: "fix the line and run the command again; no task was sent".to_owned(),
        })?;
        tasks.push(FileTask {
            line: line_number,
            task,
        });
    }
    if tasks.is_empty() {
        return Err(CliError::Input {
            message: format!("{name} has no tasks"),
            hint: "write one JSON object per line, such as \
                   {\"queue\":\"emails\",\"kind\":\"send_email\",\"payload\":\"hi\"}"
                .to_owned(),
        });
    }

    let mut broker = context.broker().await?;
    let bar = progress::bar(context.json, tasks.len() as u64, "enqueued");
    let mut results: Vec<(usize, String, bool)> = Vec::with_capacity(tasks.len());
    for batch in tasks.chunks(FILE_BATCH) {
        let request = EnqueueRequest {
            tasks: batch.iter().map(|item| item.task.clone()).collect(),
        };
        let response = match broker.enqueue(request).await {
            Ok(response) => response.into_inner(),
            Err(status) => {
                bar.abandon();
                return Err(batch_failed(&name, batch, &results, status));
            }
        };
        if response.task_ids.len() != batch.len() {
            bar.abandon();
            return Err(CliError::InvalidResponse {
                service: Service::Broker,
                detail: format!(
                    "Enqueue returned {} task ids for {} tasks",
                    response.task_ids.len(),
                    batch.len()
                ),
            });
        }
        for (index, (item, task_id)) in batch.iter().zip(response.task_ids).enumerate() {
            let duplicate = response.duplicates.get(index).copied().unwrap_or(false);
            results.push((item.line, task_id, duplicate));
        }
        bar.inc(batch.len() as u64);
    }
    bar.finish_and_clear();

    let duplicates = results
        .iter()
        .filter(|(_, _, duplicate)| *duplicate)
        .count();
    let enqueued = results.len() - duplicates;
    if context.json {
        let document = json!({
            "enqueued": enqueued,
            "duplicates": duplicates,
            "tasks": results
                .iter()
                .map(|(line, task_id, duplicate)| json!({
                    "line": line,
                    "task_id": task_id,
                    "duplicate": duplicate,
                }))
                .collect::<Vec<_>>(),
        });
        print(true, &document, "");
    } else {
        let mut text = String::with_capacity(results.len() * 37);
        for (_, task_id, _) in &results {
            text.push_str(task_id);
            text.push('\n');
        }
        write_stdout(&text);
        // The summary goes to stderr so that stdout holds only task ids.
        let tasks = if enqueued == 1 { "task" } else { "tasks" };
        let matches = if duplicates == 1 {
            "duplicate of an earlier task"
        } else {
            "duplicates of earlier tasks"
        };
        eprintln!(
            "{enqueued} {tasks} enqueued, {duplicates} {matches} (matched by idempotency key), \
             from {name}"
        );
    }
    Ok(())
}

/// Reads the file at `path`, or stdin for `-`. Returns a name for messages and the text.
fn read_file(path: &Path) -> Result<(String, String), CliError> {
    let unreadable = |name: &str, err: std::io::Error| CliError::Input {
        message: format!("cannot read {name}: {err}"),
        hint: "pass a readable file of JSON lines, or - for stdin".to_owned(),
    };
    if path == Path::new("-") {
        let name = "stdin".to_owned();
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|err| unreadable(&name, err))?;
        Ok((name, text))
    } else {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|err| unreadable(&name, err))?;
        Ok((name, text))
    }
}

/// Converts a failed batch into an error that names the lines already committed, and
/// maps the broker's `tasks[N]` field names back to line numbers.
fn batch_failed(
    name: &str,
    batch: &[FileTask],
    results: &[(usize, String, bool)],
    status: tonic::Status,
) -> CliError {
    let mut message = status.message().to_owned();
    if let Some(rest) = message.strip_prefix("tasks[")
        && let Some((index, tail)) = rest.split_once(']')
        && let Ok(index) = index.parse::<usize>()
        && let Some(item) = batch.get(index)
    {
        message = format!("line {}: task{tail}", item.line);
    }
    let sent = match results.last() {
        Some((line, _, _)) => format!(
            "the tasks of lines 1 to {line} of {name} were enqueued; resend from line {}",
            batch.first().map_or(line + 1, |item| item.line)
        ),
        None => "no task was enqueued".to_owned(),
    };
    CliError::status(
        Service::Broker,
        tonic::Status::new(status.code(), format!("{message} ({sent})")),
    )
}

/// Parses one line of an `enqueue --file` file into a task, or returns what is wrong.
fn parse_line(line: &str, defaults: (Option<&str>, Option<&str>)) -> Result<NewTask, String> {
    let value: Value = serde_json::from_str(line).map_err(|err| format!("invalid JSON: {err}"))?;
    let Value::Object(mut object) = value else {
        return Err(
            "expected a JSON object, such as {\"queue\":\"emails\",\"kind\":\"send_email\"}"
                .to_owned(),
        );
    };

    let queue = take_string(&mut object, "queue")?
        .or_else(|| defaults.0.map(str::to_owned))
        .ok_or("missing field \"queue\" (or pass QUEUE on the command line)")?;
    check_name("queue", &queue, |c| {
        c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
    })?;
    let kind = take_string(&mut object, "kind")?
        .or_else(|| defaults.1.map(str::to_owned))
        .ok_or("missing field \"kind\" (or pass KIND on the command line)")?;
    check_name("kind", &kind, |c| {
        c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':' | '/')
    })?;

    let mut headers = HashMap::new();
    match object.remove("headers") {
        None | Some(Value::Null) => {}
        Some(Value::Object(entries)) => {
            for (key, value) in entries {
                let Value::String(value) = value else {
                    return Err(format!(
                        "field \"headers\": the value of {key:?} must be a string"
                    ));
                };
                headers.insert(key, value);
            }
        }
        Some(_) => return Err("field \"headers\" must be an object of strings".to_owned()),
    }

    let text_payload = take_string(&mut object, "payload")?;
    let json_payload = object.remove("json");
    let payload = match (text_payload, json_payload) {
        (Some(_), Some(_)) => {
            return Err("fields \"payload\" and \"json\" exclude each other: give one".to_owned());
        }
        (Some(text), None) => text.into_bytes(),
        (None, Some(value)) => {
            headers
                .entry("content-type".to_owned())
                .or_insert_with(|| "application/json".to_owned());
            serde_json::to_vec(&value).map_err(|err| format!("field \"json\": {err}"))?
        }
        (None, None) => Vec::new(),
    };

    let priority = match object.remove("priority") {
        None | Some(Value::Null) => 0,
        Some(value) => value
            .as_i64()
            .and_then(|number| i32::try_from(number).ok())
            .ok_or_else(|| format!("field \"priority\": {value} is not a 32-bit integer"))?,
    };
    let max_attempts = match object.remove("max_attempts") {
        None | Some(Value::Null) => 0,
        Some(value) => value
            .as_u64()
            .filter(|number| *number <= MAX_ATTEMPTS)
            .and_then(|number| u32::try_from(number).ok())
            .ok_or_else(|| {
                format!(
                    "field \"max_attempts\": {value} is out of range: use 0 (the queue's \
                     default) to {MAX_ATTEMPTS}"
                )
            })?,
    };
    let idempotency_key = take_string(&mut object, "idempotency_key")?.unwrap_or_default();

    if let Some(unknown) = object.keys().next() {
        return Err(format!(
            "unknown field {unknown:?}: use queue, kind, payload, json, headers, priority, \
             max_attempts and idempotency_key"
        ));
    }
    Ok(NewTask {
        queue,
        kind,
        payload: payload.into(),
        headers,
        priority,
        max_attempts,
        idempotency_key,
        ..NewTask::default()
    })
}

/// Removes the string field `key` from `object`; `null` counts as absent.
fn take_string(object: &mut Map<String, Value>, key: &str) -> Result<Option<String>, String> {
    match object.remove(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Ok(Some(text)),
        Some(other) => Err(format!("field {key:?} must be a string, not {other}")),
    }
}

/// Checks a queue name or kind: 1 to 128 characters that `allowed` accepts.
fn check_name(field: &str, value: &str, allowed: impl Fn(char) -> bool) -> Result<(), String> {
    if value.is_empty() || value.len() > MAX_NAME_LEN || !value.chars().all(allowed) {
        let extra = if field == "kind" { ", ':' and '/'" } else { "" };
        return Err(format!(
            "field {field:?}: invalid value {value:?}: use 1 to {MAX_NAME_LEN} characters of \
             A-Z, a-z, 0-9, '.', '_', '-'{extra}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_field_becomes_payload_with_content_type() {
        let task = parse_line(
            r#"{"queue":"q","kind":"k","json":{"a":[1,2]},"priority":-2,"max_attempts":3}"#,
            (None, None),
        )
        .expect("valid line");

        assert_eq!(task.payload.as_ref(), br#"{"a":[1,2]}"#);
        assert_eq!(
            task.headers.get("content-type").map(String::as_str),
            Some("application/json")
        );
        assert_eq!(task.priority, -2);
        assert_eq!(task.max_attempts, 3);
    }

    #[test]
    fn defaults_fill_missing_queue_and_kind() {
        let task = parse_line(r#"{"payload":"x"}"#, (Some("q"), Some("k"))).expect("valid line");

        assert_eq!((task.queue.as_str(), task.kind.as_str()), ("q", "k"));
        assert_eq!(task.payload.as_ref(), b"x");
    }

    #[test]
    fn bad_lines_say_what_is_wrong() {
        let cases = [
            ("not json", "invalid JSON"),
            ("[1]", "expected a JSON object"),
            (r#"{"kind":"k"}"#, "missing field \"queue\""),
            (r#"{"queue":"a b","kind":"k"}"#, "invalid value \"a b\""),
            (
                r#"{"queue":"q","kind":"k","payload":"x","json":1}"#,
                "exclude each other",
            ),
            (
                r#"{"queue":"q","kind":"k","max_attempts":101}"#,
                "out of range",
            ),
            (
                r#"{"queue":"q","kind":"k","headers":{"a":1}}"#,
                "must be a string",
            ),
            (
                r#"{"queue":"q","kind":"k","priorty":1}"#,
                "unknown field \"priorty\"",
            ),
        ];
        for (line, expected) in cases {
            let error = parse_line(line, (None, None)).expect_err(line);
            assert!(error.contains(expected), "{line}: {error}");
        }
    }
}
