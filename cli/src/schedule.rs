//! `docket schedule` subcommands, which call the scheduler.

use docket::proto::{
    CancelScheduleRequest, CreateScheduleRequest, CronRule, DeleteScheduleRequest,
    GetScheduleRequest, IntervalRule, ListSchedulesRequest, MissedRunPolicy, PauseScheduleRequest,
    Recurrence, ResumeScheduleRequest, Schedule, recurrence,
};
use serde_json::{Map, Value, json};

use crate::args::{MissedRuns, ScheduleAddArgs, ScheduleCommand};
use crate::connect::Context;
use crate::enqueue::{new_task, proto_duration};
use crate::error::{CliError, Service};
use crate::output::{
    bytes_text, duration_text, enum_name, fields_text, headers_json, headers_text, insert_bytes,
    print, table_text, timestamp_json, timestamp_text,
};

/// Number of schedules requested per ListSchedules page, the scheduler's maximum.
const LIST_PAGE_SIZE: u32 = 1000;

/// Runs one `docket schedule` subcommand.
pub async fn run(context: &Context, command: ScheduleCommand) -> Result<(), CliError> {
    // NOTE: clap 4.6 accepts `--every 1h --tz UTC` despite `requires = "cron"` on --tz,
    // so the usage error is raised here, before connecting.
    if let ScheduleCommand::Add(args) = &command
        && args.tz.is_some()
        && args.cron.is_none()
    {
        return Err(CliError::Usage(
            "invalid flag --tz: it sets the time zone of --cron and cannot be used with --every"
                .to_owned(),
        ));
    }

    let mut scheduler = context.scheduler().await?;
    let failed = |status| CliError::status(Service::Scheduler, status);
    let missing = |call: &str| CliError::InvalidResponse {
        service: Service::Scheduler,
        detail: format!("{call} returned no schedule"),
    };
    match command {
        ScheduleCommand::Add(args) => {
            let request = create_request(args)?;
            let schedule = scheduler
                .create_schedule(request)
                .await
                .map_err(failed)?
                .into_inner()
                .schedule
                .ok_or_else(|| missing("CreateSchedule"))?;
            print(
                context.json,
                &schedule_json(&schedule),
                &schedule_text(&schedule),
            );
        }
        ScheduleCommand::List => {
            let mut schedules = Vec::new();
            let mut page_token = String::new();
            loop {
                let page = scheduler
                    .list_schedules(ListSchedulesRequest {
                        page_size: LIST_PAGE_SIZE,
                        page_token,
                        ..ListSchedulesRequest::default()
                    })
                    .await
                    .map_err(failed)?
                    .into_inner();
                schedules.extend(page.schedules);
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
            let document =
                json!({ "schedules": schedules.iter().map(schedule_json).collect::<Vec<_>>() });
            print(context.json, &document, &list_text(&schedules));
        }
        ScheduleCommand::Get { name, id } => {
            let schedule = scheduler
                .get_schedule(GetScheduleRequest {
                    schedule_id: id.unwrap_or_default(),
                    name: name.unwrap_or_default(),
                })
                .await
                .map_err(failed)?
                .into_inner()
                .schedule
                .ok_or_else(|| missing("GetSchedule"))?;
            print(
                context.json,
                &schedule_json(&schedule),
                &schedule_text(&schedule),
            );
        }
        ScheduleCommand::Pause { name } => {
            let schedule = scheduler
                .pause_schedule(PauseScheduleRequest { name })
                .await
                .map_err(failed)?
                .into_inner()
                .schedule
                .ok_or_else(|| missing("PauseSchedule"))?;
            print(
                context.json,
                &schedule_json(&schedule),
                &schedule_text(&schedule),
            );
        }
        ScheduleCommand::Resume { name } => {
            let schedule = scheduler
                .resume_schedule(ResumeScheduleRequest { name })
                .await
                .map_err(failed)?
                .into_inner()
                .schedule
                .ok_or_else(|| missing("ResumeSchedule"))?;
            print(
                context.json,
                &schedule_json(&schedule),
                &schedule_text(&schedule),
            );
        }
        ScheduleCommand::Cancel { id } => {
            let schedule = scheduler
                .cancel_schedule(CancelScheduleRequest {
                    schedule_id: id.clone(),
                })
                .await
                .map_err(failed)?
                .into_inner()
                .schedule
                .ok_or_else(|| missing("CancelSchedule"))?;
            print(
                context.json,
                &schedule_json(&schedule),
                &schedule_text(&schedule),
            );
        }
        ScheduleCommand::Delete { name } => {
            scheduler
                .delete_schedule(DeleteScheduleRequest { name: name.clone() })
                .await
                .map_err(failed)?;
            let text = format!("schedule {name} deleted\n");
            print(
                context.json,
                &json!({ "name": name, "deleted": true }),
                &text,
            );
        }
    }
    Ok(())
}

fn create_request(args: ScheduleAddArgs) -> Result<CreateScheduleRequest, CliError> {
    let task = new_task(args.queue, args.kind, &args.task)?;
    let rule = match (args.cron, args.every) {
        (Some(expression), _) => recurrence::Rule::Cron(CronRule {
            expression,
            time_zone: args.tz.unwrap_or_default(),
        }),
        (None, Some(every)) => recurrence::Rule::Interval(IntervalRule {
            every: Some(proto_duration(every)?),
            start_time: None,
        }),
        (None, None) => {
            return Err(CliError::Usage(
                "missing rule: give --cron or --every".to_owned(),
            ));
        }
    };
    let missed_runs = match args.missed {
        MissedRuns::Skip => MissedRunPolicy::Skip,
        MissedRuns::RunOnce => MissedRunPolicy::RunOnce,
        MissedRuns::RunAll => MissedRunPolicy::RunAll,
    };
    Ok(CreateScheduleRequest {
        name: args.name,
        recurrence: Some(Recurrence {
            rule: Some(rule),
            missed_runs: missed_runs.into(),
            max_missed_runs: 0,
        }),
        task: Some(task),
        paused: args.paused,
    })
}

/// Returns a rule as text, such as `cron "0 0 2 * * *" in Europe/Berlin` or `every 15m`.
fn rule_text(recurrence: Option<&Recurrence>) -> String {
    match recurrence.and_then(|recurrence| recurrence.rule.as_ref()) {
        Some(recurrence::Rule::Cron(cron)) => {
            let zone = if cron.time_zone.is_empty() {
                "UTC"
            } else {
                &cron.time_zone
            };
            format!("cron {:?} in {zone}", cron.expression)
        }
        Some(recurrence::Rule::Interval(interval)) => {
            format!("every {}", duration_text(interval.every.as_ref()))
        }
        None => "-".to_owned(),
    }
}

fn rule_json(recurrence: Option<&Recurrence>) -> Value {
    let Some(recurrence) = recurrence else {
        return Value::Null;
    };
    let rule = match &recurrence.rule {
        Some(recurrence::Rule::Cron(cron)) => json!({
            "cron": cron.expression,
            "time_zone": if cron.time_zone.is_empty() { "UTC" } else { &cron.time_zone },
        }),
        Some(recurrence::Rule::Interval(interval)) => json!({
            "every_seconds": crate::output::duration_seconds(interval.every.as_ref()),
            "start_time": timestamp_json(interval.start_time.as_ref()),
        }),
        None => Value::Null,
    };
    json!({
        "rule": rule,
        "missed_runs": missed_name(recurrence.missed_runs()),
        "max_missed_runs": recurrence.max_missed_runs,
    })
}

fn missed_name(policy: MissedRunPolicy) -> &'static str {
    match policy {
        MissedRunPolicy::Unspecified | MissedRunPolicy::Skip => "skip",
        MissedRunPolicy::RunOnce => "run-once",
        MissedRunPolicy::RunAll => "run-all",
    }
}

fn state_name(schedule: &Schedule) -> &'static str {
    enum_name(schedule.state().as_str_name(), "SCHEDULE_STATE_")
}

fn kind_name(schedule: &Schedule) -> &'static str {
    enum_name(schedule.kind().as_str_name(), "SCHEDULE_KIND_")
}

/// Returns a schedule as one JSON object.
pub fn schedule_json(schedule: &Schedule) -> Value {
    let task = schedule.task.clone().unwrap_or_default();
    let mut task_object = Map::new();
    task_object.insert("queue".to_owned(), json!(task.queue));
    task_object.insert("kind".to_owned(), json!(task.kind));
    insert_bytes(&mut task_object, "payload", &task.payload);
    task_object.insert("headers".to_owned(), headers_json(&task.headers));
    task_object.insert("priority".to_owned(), json!(task.priority));
    task_object.insert("max_attempts".to_owned(), json!(task.max_attempts));

    let last_outcome = schedule
        .last_outcome
        .as_ref()
        .map_or(Value::Null, |outcome| {
            json!({
                "fire_time": timestamp_json(outcome.fire_time.as_ref()),
                "release_time": timestamp_json(outcome.release_time.as_ref()),
                "task_id": outcome.task_id,
                "error": outcome.error,
            })
        });
    json!({
        "id": schedule.id,
        "name": schedule.name,
        "kind": kind_name(schedule),
        "state": state_name(schedule),
        "due_time": timestamp_json(schedule.due_time.as_ref()),
        "recurrence": rule_json(schedule.recurrence.as_ref()),
        "task": Value::Object(task_object),
        "next_fire_time": timestamp_json(schedule.next_fire_time.as_ref()),
        "last_fire_time": timestamp_json(schedule.last_fire_time.as_ref()),
        "last_outcome": last_outcome,
        "fire_count": schedule.fire_count,
        "skipped_count": schedule.skipped_count,
        "create_time": timestamp_json(schedule.create_time.as_ref()),
        "update_time": timestamp_json(schedule.update_time.as_ref()),
    })
}

/// Returns a schedule as aligned `key: value` lines.
fn schedule_text(schedule: &Schedule) -> String {
    let task = schedule.task.clone().unwrap_or_default();
    let mut fields = vec![("id", schedule.id.clone())];
    if !schedule.name.is_empty() {
        fields.push(("name", schedule.name.clone()));
    }
    fields.push(("kind", kind_name(schedule).to_owned()));
    fields.push(("state", state_name(schedule).to_owned()));
    if let Some(recurrence) = &schedule.recurrence {
        fields.push(("rule", rule_text(Some(recurrence))));
        fields.push((
            "missed runs",
            missed_name(recurrence.missed_runs()).to_owned(),
        ));
    } else {
        fields.push(("due time", timestamp_text(schedule.due_time.as_ref())));
    }
    fields.extend([
        ("queue", task.queue.clone()),
        ("task kind", task.kind.clone()),
        ("payload", bytes_text(&task.payload)),
        ("headers", headers_text(&task.headers)),
        (
            "next fire",
            timestamp_text(schedule.next_fire_time.as_ref()),
        ),
        (
            "last fire",
            timestamp_text(schedule.last_fire_time.as_ref()),
        ),
        ("fired", schedule.fire_count.to_string()),
        ("skipped", schedule.skipped_count.to_string()),
    ]);
    if let Some(outcome) = &schedule.last_outcome {
        if !outcome.task_id.is_empty() {
            fields.push(("last task id", outcome.task_id.clone()));
        }
        if !outcome.error.is_empty() {
            fields.push(("last error", outcome.error.clone()));
        }
    }
    fields_text(&fields)
}

fn list_text(schedules: &[Schedule]) -> String {
    if schedules.is_empty() {
        return "no schedules\n".to_owned();
    }
    let rows: Vec<Vec<String>> = schedules
        .iter()
        .map(|schedule| {
            let task = schedule.task.clone().unwrap_or_default();
            let name = if schedule.name.is_empty() {
                schedule.id.clone()
            } else {
                schedule.name.clone()
            };
            let rule = if schedule.recurrence.is_some() {
                rule_text(schedule.recurrence.as_ref())
            } else {
                format!("at {}", timestamp_text(schedule.due_time.as_ref()))
            };
            vec![
                name,
                kind_name(schedule).to_owned(),
                state_name(schedule).to_owned(),
                task.queue,
                task.kind,
                rule,
                timestamp_text(schedule.next_fire_time.as_ref()),
            ]
        })
        .collect();
    table_text(
        &[
            "NAME OR ID",
            "KIND",
            "STATE",
            "QUEUE",
            "TASK KIND",
            "RULE",
            "NEXT FIRE",
        ],
        &rows,
    )
}
