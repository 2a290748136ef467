//! Invalid scheduler requests: each is rejected with its status code and a message that
//! names the field and value, changes nothing, and leaves the scheduler serving.

use std::time::Duration;

use anyhow::{Context, Result};
use docket_proto::v1::schedule_task_request::Due;
use docket_proto::v1::scheduler_client::SchedulerClient;
use docket_proto::v1::{
    CancelScheduleRequest, CreateScheduleRequest, DeleteScheduleRequest, GetScheduleRequest,
    ListSchedulesRequest, MissedRunPolicy, NewTask, PauseScheduleRequest, PreviewScheduleRequest,
    Recurrence, ResumeScheduleRequest, Schedule, ScheduleKind, ScheduleTaskRequest,
    UpdateScheduleRequest,
};
use docket_tests::{
    SCHEDULER_SERVICE, SchedulerSetup, ServingStatus, assert_rejected, cron_recurrence,
    get_schedule_by_name, interval_recurrence, new_task, proto_duration,
};
use tonic::transport::Channel;
use tonic::{Code, Status};

const QUEUE: &str = "valid";

/// A schedule id that is a well-formed UUIDv7 but was never issued by the scheduler.
const UNKNOWN_SCHEDULE_ID: &str = "0190a1b2-c3d4-7e5f-8a6b-7c8d9e0f1a2b";

/// Seconds of 10000-01-01T00:00:00Z, the first instant after year 9999.
const YEAR_10000_SECONDS: i64 = 253_402_300_800;

const DAY: Duration = Duration::from_secs(24 * 3600);

/// Asserts that `result` is an error with `code` whose message names `field` and quotes
/// `value`.
fn assert_rejected_value<T: std::fmt::Debug>(
    case: &str,
    result: Result<T, Status>,
    code: Code,
    field: &str,
    value: &str,
) {
    let message = match &result {
        Err(status) => status.message().to_string(),
        Ok(_) => String::new(),
    };
    assert_rejected(case, result, code, field);
    assert!(
        message.contains(&format!("\"{value}\"")),
        "{case}: message {message:?} does not quote the value {value:?}"
    );
}

fn valid_task() -> NewTask {
    new_task(QUEUE, "job", "payload")
}

fn create_request(
    name: &str,
    recurrence: Option<Recurrence>,
    task: NewTask,
) -> CreateScheduleRequest {
    CreateScheduleRequest {
        name: name.to_string(),
        recurrence,
        task: Some(task),
        paused: false,
    }
}

async fn create(
    client: &mut SchedulerClient<Channel>,
    request: CreateScheduleRequest,
) -> Result<Schedule, Status> {
    let response = client.create_schedule(request).await?.into_inner();
    response
        .schedule
        .ok_or_else(|| Status::internal("CreateSchedule returned no schedule"))
}

async fn schedule_task(
    client: &mut SchedulerClient<Channel>,
    task: Option<NewTask>,
    due: Option<Due>,
) -> Result<Schedule, Status> {
    let request = ScheduleTaskRequest { task, due };
    let response = client.schedule_task(request).await?.into_inner();
    response
        .schedule
        .ok_or_else(|| Status::internal("ScheduleTask returned no schedule"))
}

async fn preview_status(
    client: &mut SchedulerClient<Channel>,
    recurrence: Option<Recurrence>,
    count: u32,
) -> Result<Vec<prost_types::Timestamp>, Status> {
    let request = PreviewScheduleRequest {
        recurrence,
        after: None,
        count,
    };
    Ok(client
        .preview_schedule(request)
        .await?
        .into_inner()
        .fire_times)
}

/// Lists every schedule on one page.
async fn list_all(client: &mut SchedulerClient<Channel>) -> Result<Vec<Schedule>> {
    let request = ListSchedulesRequest {
        kind: ScheduleKind::Unspecified as i32,
        page_size: 1000,
        page_token: String::new(),
    };
    let response = client.list_schedules(request).await?.into_inner();
    anyhow::ensure!(
        response.next_page_token.is_empty(),
        "more than 1000 schedules"
    );
    Ok(response.schedules)
}

#[tokio::test]
async fn create_schedule_rejects_invalid_rules() -> Result<()> {
    let setup = SchedulerSetup::start(&[]).await?;
    let mut client = setup.scheduler.client().await?;

    for expression in ["61 * * * * *", "not a cron", "0 0 25 * * *", "* * * *"] {
        let request = create_request(
            "bad-cron",
            Some(cron_recurrence(expression, "UTC")),
            valid_task(),
        );
        assert_rejected_value(
            &format!("cron expression {expression:?}"),
            create(&mut client, request).await,
            Code::InvalidArgument,
            "recurrence.cron.expression",
            expression,
        );
        assert_rejected_value(
            &format!("preview of cron expression {expression:?}"),
            preview_status(&mut client, Some(cron_recurrence(expression, "UTC")), 1).await,
            Code::InvalidArgument,
            "recurrence.cron.expression",
            expression,
        );
    }

    for time_zone in ["Mars/Olympus_Mons", "Europe/Berlinn", "+02:00"] {
        let request = create_request(
            "bad-zone",
            Some(cron_recurrence("0 0 2 * * *", time_zone)),
            valid_task(),
        );
        assert_rejected_value(
            &format!("time zone {time_zone:?}"),
            create(&mut client, request).await,
            Code::InvalidArgument,
            "recurrence.cron.time_zone",
            time_zone,
        );
        assert_rejected_value(
            &format!("preview in time zone {time_zone:?}"),
            preview_status(
                &mut client,
                Some(cron_recurrence("0 0 2 * * *", time_zone)),
                1,
            )
            .await,
            Code::InvalidArgument,
            "recurrence.cron.time_zone",
            time_zone,
        );
    }

    let intervals = [
        ("zero interval", Duration::ZERO),
        ("interval of 500 ms", Duration::from_millis(500)),
        ("interval over 366 days", 367 * DAY),
    ];
    for (case, every) in intervals {
        let request = create_request(
            "bad-interval",
            Some(interval_recurrence(every, None)),
            valid_task(),
        );
        assert_rejected(
            case,
            create(&mut client, request).await,
            Code::InvalidArgument,
            "recurrence.interval.every",
        );
    }
    let mut no_every = interval_recurrence(Duration::from_secs(1), None);
    if let Some(docket_proto::v1::recurrence::Rule::Interval(rule)) = no_every.rule.as_mut() {
        rule.every = None;
    }
    let request = create_request("no-every", Some(no_every), valid_task());
    assert_rejected(
        "interval without every",
        create(&mut client, request).await,
        Code::InvalidArgument,
        "recurrence.interval.every",
    );

    let request = create_request("no-rule", Some(Recurrence::default()), valid_task());
    assert_rejected(
        "recurrence without a rule",
        create(&mut client, request).await,
        Code::InvalidArgument,
        "recurrence",
    );
    let request = create_request("no-recurrence", None, valid_task());
    assert_rejected(
        "no recurrence",
        create(&mut client, request).await,
        Code::InvalidArgument,
        "recurrence",
    );
    assert_rejected(
        "preview without a recurrence",
        preview_status(&mut client, None, 1).await,
        Code::InvalidArgument,
        "recurrence",
    );

    let mut too_many_missed = cron_recurrence("0 0 2 * * *", "UTC");
    too_many_missed.missed_runs = MissedRunPolicy::RunAll as i32;
    too_many_missed.max_missed_runs = 1001;
    let request = create_request("too-many-missed", Some(too_many_missed), valid_task());
    assert_rejected(
        "RUN_ALL with max_missed_runs of 1001",
        create(&mut client, request).await,
        Code::InvalidArgument,
        "recurrence.max_missed_runs",
    );

    assert_rejected(
        "preview count of 101",
        preview_status(
            &mut client,
            Some(cron_recurrence("0 0 2 * * *", "UTC")),
            101,
        )
        .await,
        Code::InvalidArgument,
        "count",
    );

    let created = list_all(&mut client).await?;
    assert!(
        created.is_empty(),
        "rejected requests created schedules: {created:?}"
    );
    assert_eq!(
        setup.scheduler.health(SCHEDULER_SERVICE).await?,
        ServingStatus::Serving,
        "health after the rejected requests"
    );
    Ok(())
}

#[tokio::test]
async fn create_schedule_rejects_invalid_names_and_templates() -> Result<()> {
    let setup = SchedulerSetup::start(&[]).await?;
    let mut client = setup.scheduler.client().await?;
    let rule = || Some(cron_recurrence("0 0 2 * * *", "UTC"));

    let too_long = "n".repeat(129);
    for (case, name) in [
        ("empty name", ""),
        ("name with a space and '!'", "bad name!"),
        ("name with a slash", "reports/daily"),
        ("name of 129 characters", too_long.as_str()),
    ] {
        let request = create_request(name, rule(), valid_task());
        assert_rejected(
            case,
            create(&mut client, request).await,
            Code::InvalidArgument,
            "name",
        );
    }

    let mut keyed = valid_task();
    keyed.idempotency_key = "my-key".to_string();
    let request = create_request("keyed", rule(), keyed.clone());
    assert_rejected(
        "template with an idempotency key",
        create(&mut client, request).await,
        Code::InvalidArgument,
        "task.idempotency_key",
    );

    let mut bad_queue = valid_task();
    bad_queue.queue = "bad queue!".to_string();
    let request = create_request("bad-queue", rule(), bad_queue.clone());
    assert_rejected_value(
        "template with an invalid queue name",
        create(&mut client, request).await,
        Code::InvalidArgument,
        "task.queue",
        "bad queue!",
    );

    let mut no_kind = valid_task();
    no_kind.kind = String::new();
    let request = create_request("no-kind", rule(), no_kind);
    assert_rejected(
        "template without a kind",
        create(&mut client, request).await,
        Code::InvalidArgument,
        "task.kind",
    );

    let mut request = create_request("no-task", rule(), valid_task());
    request.task = None;
    assert_rejected(
        "no task template",
        create(&mut client, request).await,
        Code::InvalidArgument,
        "task",
    );

    // ScheduleTask validates the task the same way.
    let delay = Some(Due::Delay(proto_duration(Duration::from_secs(60))));
    assert_rejected(
        "one-shot task with an idempotency key",
        schedule_task(&mut client, Some(keyed), delay).await,
        Code::InvalidArgument,
        "task.idempotency_key",
    );
    assert_rejected_value(
        "one-shot task with an invalid queue name",
        schedule_task(&mut client, Some(bad_queue), delay).await,
        Code::InvalidArgument,
        "task.queue",
        "bad queue!",
    );
    assert_rejected(
        "one-shot without a task",
        schedule_task(&mut client, None, delay).await,
        Code::InvalidArgument,
        "task",
    );

    // UpdateSchedule validates the new rule and template, and keeps the old ones.
    let request = create_request("valid-name", rule(), valid_task());
    let original = create(&mut client, request).await?;
    let request = UpdateScheduleRequest {
        name: original.name.clone(),
        recurrence: Some(cron_recurrence("61 * * * * *", "UTC")),
        task: None,
    };
    assert_rejected_value(
        "update with an invalid cron expression",
        client.update_schedule(request).await,
        Code::InvalidArgument,
        "recurrence.cron.expression",
        "61 * * * * *",
    );
    let mut keyed = valid_task();
    keyed.idempotency_key = "my-key".to_string();
    let request = UpdateScheduleRequest {
        name: original.name.clone(),
        recurrence: None,
        task: Some(keyed),
    };
    assert_rejected(
        "update with an idempotency key",
        client.update_schedule(request).await,
        Code::InvalidArgument,
        "task.idempotency_key",
    );
    let stored = get_schedule_by_name(&mut client, &original.name).await?;
    assert_eq!(stored, original, "schedule after the rejected updates");

    let listed = list_all(&mut client).await?;
    assert_eq!(
        listed,
        vec![original],
        "schedules after the rejected requests"
    );
    Ok(())
}

#[tokio::test]
async fn schedule_task_rejects_due_times_out_of_range() -> Result<()> {
    let setup = SchedulerSetup::start(&[]).await?;
    let mut client = setup.scheduler.client().await?;

    let two_hundred_years = prost_types::Duration {
        seconds: 200 * 366 * 24 * 3600,
        nanos: 0,
    };
    assert_rejected(
        "delay of 200 years",
        schedule_task(
            &mut client,
            Some(valid_task()),
            Some(Due::Delay(two_hundred_years)),
        )
        .await,
        Code::InvalidArgument,
        "delay",
    );
    let negative = prost_types::Duration {
        seconds: -60,
        nanos: 0,
    };
    assert_rejected(
        "negative delay",
        schedule_task(&mut client, Some(valid_task()), Some(Due::Delay(negative))).await,
        Code::InvalidArgument,
        "delay",
    );

    let due_times = [
        (
            "due time after year 9999",
            prost_types::Timestamp {
                seconds: YEAR_10000_SECONDS,
                nanos: 0,
            },
        ),
        (
            "due time at i64::MAX seconds",
            prost_types::Timestamp {
                seconds: i64::MAX,
                nanos: 0,
            },
        ),
        (
            "due time with negative nanos",
            prost_types::Timestamp {
                seconds: 1_800_000_000,
                nanos: -1,
            },
        ),
        (
            "due time with nanos of a whole second",
            prost_types::Timestamp {
                seconds: 1_800_000_000,
                nanos: 1_000_000_000,
            },
        ),
    ];
    for (case, due_time) in due_times {
        assert_rejected(
            case,
            schedule_task(
                &mut client,
                Some(valid_task()),
                Some(Due::DueTime(due_time)),
            )
            .await,
            Code::InvalidArgument,
            "due_time",
        );
    }

    assert_rejected(
        "neither due_time nor delay",
        schedule_task(&mut client, Some(valid_task()), None).await,
        Code::InvalidArgument,
        "due",
    );

    let created = list_all(&mut client).await?;
    assert!(
        created.is_empty(),
        "rejected requests created schedules: {created:?}"
    );
    Ok(())
}

#[tokio::test]
async fn unknown_schedules_are_not_found() -> Result<()> {
    let setup = SchedulerSetup::start(&[]).await?;
    let mut client = setup.scheduler.client().await?;

    let by_id = GetScheduleRequest {
        schedule_id: UNKNOWN_SCHEDULE_ID.to_string(),
        name: String::new(),
    };
    assert_rejected(
        "GetSchedule of an unknown id",
        client.get_schedule(by_id).await,
        Code::NotFound,
        UNKNOWN_SCHEDULE_ID,
    );
    let by_name = GetScheduleRequest {
        schedule_id: String::new(),
        name: "no-such-schedule".to_string(),
    };
    assert_rejected(
        "GetSchedule of an unknown name",
        client.get_schedule(by_name).await,
        Code::NotFound,
        "no-such-schedule",
    );
    let cancel = CancelScheduleRequest {
        schedule_id: UNKNOWN_SCHEDULE_ID.to_string(),
    };
    assert_rejected(
        "CancelSchedule of an unknown id",
        client.cancel_schedule(cancel).await,
        Code::NotFound,
        UNKNOWN_SCHEDULE_ID,
    );

    let name = "no-such-schedule".to_string();
    assert_rejected(
        "PauseSchedule of an unknown name",
        client
            .pause_schedule(PauseScheduleRequest { name: name.clone() })
            .await,
        Code::NotFound,
        &name,
    );
    assert_rejected(
        "ResumeSchedule of an unknown name",
        client
            .resume_schedule(ResumeScheduleRequest { name: name.clone() })
            .await,
        Code::NotFound,
        &name,
    );
    assert_rejected(
        "DeleteSchedule of an unknown name",
        client
            .delete_schedule(DeleteScheduleRequest { name: name.clone() })
            .await,
        Code::NotFound,
        &name,
    );
    let update = UpdateScheduleRequest {
        name: name.clone(),
        recurrence: Some(cron_recurrence("0 0 2 * * *", "UTC")),
        task: None,
    };
    assert_rejected(
        "UpdateSchedule of an unknown name",
        client.update_schedule(update).await,
        Code::NotFound,
        &name,
    );

    // An id that is not a UUID cannot name a schedule. Whether the scheduler calls that
    // invalid or not found, the message must show the value.
    let malformed = GetScheduleRequest {
        schedule_id: "not-a-uuid".to_string(),
        name: String::new(),
    };
    let status = client
        .get_schedule(malformed)
        .await
        .expect_err("GetSchedule of a malformed id succeeded");
    assert!(
        matches!(status.code(), Code::InvalidArgument | Code::NotFound),
        "GetSchedule of a malformed id: code {:?}, message {:?}",
        status.code(),
        status.message()
    );
    assert!(
        status.message().contains("not-a-uuid"),
        "GetSchedule of a malformed id: message {:?} does not show the id",
        status.message()
    );
    Ok(())
}

#[tokio::test]
async fn lookups_and_cancels_reject_wrong_targets() -> Result<()> {
    let setup = SchedulerSetup::start(&[]).await?;
    let mut client = setup.scheduler.client().await?;

    let request = create_request(
        "recurring",
        Some(cron_recurrence("0 0 2 * * *", "UTC")),
        valid_task(),
    );
    let recurring = create(&mut client, request).await?;

    let both = GetScheduleRequest {
        schedule_id: recurring.id.clone(),
        name: recurring.name.clone(),
    };
    assert_rejected(
        "GetSchedule with both id and name",
        client.get_schedule(both).await,
        Code::InvalidArgument,
        "schedule_id",
    );
    let neither = GetScheduleRequest::default();
    assert_rejected(
        "GetSchedule with neither id nor name",
        client.get_schedule(neither).await,
        Code::InvalidArgument,
        "schedule_id",
    );

    let cancel = CancelScheduleRequest {
        schedule_id: recurring.id.clone(),
    };
    assert_rejected(
        "CancelSchedule of a recurring schedule",
        client.cancel_schedule(cancel).await,
        Code::FailedPrecondition,
        &recurring.id,
    );

    let oversized_page = ListSchedulesRequest {
        kind: ScheduleKind::Unspecified as i32,
        page_size: 1001,
        page_token: String::new(),
    };
    assert_rejected(
        "ListSchedules with page_size 1001",
        client.list_schedules(oversized_page).await,
        Code::InvalidArgument,
        "page_size",
    );
    let bad_token = ListSchedulesRequest {
        kind: ScheduleKind::Unspecified as i32,
        page_size: 10,
        page_token: "not a token".to_string(),
    };
    assert_rejected(
        "ListSchedules with an invalid page_token",
        client.list_schedules(bad_token).await,
        Code::InvalidArgument,
        "page_token",
    );

    let stored = get_schedule_by_name(&mut client, &recurring.name).await?;
    assert_eq!(stored, recurring, "recurring schedule after the rejections");
    let listed = list_all(&mut client).await.context("ListSchedules")?;
    assert_eq!(listed, vec![recurring], "schedules after the rejections");
    assert_eq!(
        setup.scheduler.health(SCHEDULER_SERVICE).await?,
        ServingStatus::Serving,
        "health after the rejected requests"
    );
    Ok(())
}
