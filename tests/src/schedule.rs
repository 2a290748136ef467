//! Helpers for tests of the scheduler: building rules, reading schedules, and reading the
//! headers that the scheduler puts on the tasks it releases.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow};
use docket_proto::v1::broker_client::BrokerClient;
use docket_proto::v1::scheduler_client::SchedulerClient;
use docket_proto::v1::{
    CronRule, Delivery, GetScheduleRequest, IntervalRule, NewTask, PreviewScheduleRequest,
    QueueStats, Recurrence, Schedule, ScheduleTaskRequest, recurrence, schedule_task_request,
};
use tonic::transport::Channel;

use crate::{
    BrokerProcess, SchedulerProcess, TempDir, WAIT, ack, header, proto_duration, proto_timestamp,
    system_time, temp_dir, wait_for_stats, within,
};

/// Header with the id of the schedule that released a task.
pub const SCHEDULE_ID_HEADER: &str = "docket-schedule-id";

/// Header with the fire time of the firing that released a task, RFC 3339 in UTC.
pub const FIRE_TIME_HEADER: &str = "docket-fire-time";

/// Header with the name of the recurring schedule that released a task.
pub const SCHEDULE_NAME_HEADER: &str = "docket-schedule-name";

/// A broker and a scheduler that releases tasks into it, each with its store in its own
/// temporary directory.
///
/// The fields drop in order: the scheduler is killed before the broker, and the
/// directories are deleted last.
pub struct SchedulerSetup {
    pub scheduler: SchedulerProcess,
    pub broker: BrokerProcess,
    pub scheduler_dir: TempDir,
    pub broker_dir: TempDir,
}

impl SchedulerSetup {
    /// Starts a broker with default flags, then a scheduler with `scheduler_args` pointed
    /// at it, and waits until both report SERVING.
    pub async fn start(scheduler_args: &[&str]) -> Result<Self> {
        let broker_dir = temp_dir();
        let scheduler_dir = temp_dir();
        let broker = BrokerProcess::start(broker_dir.path(), &[]).await?;
        let scheduler =
            SchedulerProcess::start(scheduler_dir.path(), &broker.endpoint(), scheduler_args)
                .await?;
        Ok(SchedulerSetup {
            scheduler,
            broker,
            scheduler_dir,
            broker_dir,
        })
    }
}

/// Parses an RFC 3339 time in UTC, such as `2027-03-28T01:00:00Z`, panicking if it is
/// invalid. For constants in tests.
pub fn utc(text: &str) -> SystemTime {
    humantime::parse_rfc3339(text)
        .unwrap_or_else(|error| panic!("invalid RFC 3339 time {text:?}: {error}"))
}

/// Formats a time as RFC 3339 in UTC, with nine fractional digits only when the time has
/// a fraction of a second.
pub fn format_utc(time: SystemTime) -> String {
    humantime::format_rfc3339(time).to_string()
}

/// Returns the number of nanoseconds between the Unix epoch and `time`, negative before
/// the epoch.
pub fn unix_nanos(time: SystemTime) -> i128 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(duration) => i128::try_from(duration.as_nanos()).expect("nanoseconds fit in i128"),
        Err(error) => {
            -i128::try_from(error.duration().as_nanos()).expect("nanoseconds fit in i128")
        }
    }
}

/// Returns the idempotency key that the scheduler gives the task of `schedule_id` at
/// `fire_time`: `schedule:<schedule id>:<fire time in Unix nanoseconds>`.
pub fn schedule_idempotency_key(schedule_id: &str, fire_time: SystemTime) -> String {
    format!("schedule:{schedule_id}:{}", unix_nanos(fire_time))
}

/// Returns the fire time in the `docket-fire-time` header of a delivered task.
pub fn delivered_fire_time(delivery: &Delivery) -> Result<SystemTime> {
    let value = header(delivery, FIRE_TIME_HEADER).ok_or_else(|| {
        anyhow!(
            "delivery with lease {} has no {FIRE_TIME_HEADER} header",
            delivery.lease_id
        )
    })?;
    humantime::parse_rfc3339(value)
        .with_context(|| format!("{FIRE_TIME_HEADER} header {value:?} is not RFC 3339 in UTC"))
}

/// Returns a recurrence with a cron rule, skipping missed runs.
pub fn cron_recurrence(expression: &str, time_zone: &str) -> Recurrence {
    Recurrence {
        rule: Some(recurrence::Rule::Cron(CronRule {
            expression: expression.to_string(),
            time_zone: time_zone.to_string(),
        })),
        ..Recurrence::default()
    }
}

/// Returns a recurrence with an interval rule, skipping missed runs. A `start_time` of
/// `None` starts one interval after the schedule is created or updated.
pub fn interval_recurrence(every: Duration, start_time: Option<SystemTime>) -> Recurrence {
    Recurrence {
        rule: Some(recurrence::Rule::Interval(IntervalRule {
            every: Some(proto_duration(every)),
            start_time: start_time.map(proto_timestamp),
        })),
        ..Recurrence::default()
    }
}

/// Returns the schedule with the id `schedule_id`.
pub async fn get_schedule(
    client: &mut SchedulerClient<Channel>,
    schedule_id: &str,
) -> Result<Schedule> {
    let request = GetScheduleRequest {
        schedule_id: schedule_id.to_string(),
        name: String::new(),
    };
    let response = within(WAIT, "GetSchedule", async {
        Ok(client.get_schedule(request).await?)
    })
    .await?;
    response
        .into_inner()
        .schedule
        .ok_or_else(|| anyhow!("GetSchedule for {schedule_id} returned no schedule"))
}

/// Returns the recurring schedule named `name`.
pub async fn get_schedule_by_name(
    client: &mut SchedulerClient<Channel>,
    name: &str,
) -> Result<Schedule> {
    let request = GetScheduleRequest {
        schedule_id: String::new(),
        name: name.to_string(),
    };
    let response = within(WAIT, "GetSchedule", async {
        Ok(client.get_schedule(request).await?)
    })
    .await?;
    response
        .into_inner()
        .schedule
        .ok_or_else(|| anyhow!("GetSchedule for name {name:?} returned no schedule"))
}

/// Polls `GetSchedule` until `condition` holds for the schedule `schedule_id`, and returns
/// the schedule then.
pub async fn wait_for_schedule(
    client: &mut SchedulerClient<Channel>,
    schedule_id: &str,
    description: &str,
    condition: impl Fn(&Schedule) -> bool,
) -> Result<Schedule> {
    let description = format!("schedule {schedule_id}: {description}");
    within(WAIT, &description, async {
        loop {
            let schedule = get_schedule(client, schedule_id).await?;
            if condition(&schedule) {
                return Ok(schedule);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
}

/// Returns the next `count` fire times of `recurrence` strictly after `after`, as
/// `PreviewSchedule` computes them.
pub async fn preview(
    client: &mut SchedulerClient<Channel>,
    recurrence: Recurrence,
    after: SystemTime,
    count: u32,
) -> Result<Vec<SystemTime>> {
    let request = PreviewScheduleRequest {
        recurrence: Some(recurrence),
        after: Some(proto_timestamp(after)),
        count,
    };
    let response = within(WAIT, "PreviewSchedule", async {
        Ok(client.preview_schedule(request).await?)
    })
    .await?;
    Ok(response
        .into_inner()
        .fire_times
        .iter()
        .map(system_time)
        .collect())
}

/// Returns the first whole second of Unix time at or after `time`.
pub fn whole_second_at_or_after(time: SystemTime) -> SystemTime {
    let since_epoch = time
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after the Unix epoch");
    let mut seconds = since_epoch.as_secs();
    if since_epoch.subsec_nanos() > 0 {
        seconds += 1;
    }
    UNIX_EPOCH + Duration::from_secs(seconds)
}

/// Returns the last whole second of Unix time at or before `time`.
pub fn whole_second_at_or_before(time: SystemTime) -> SystemTime {
    let since_epoch = time
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after the Unix epoch");
    UNIX_EPOCH + Duration::from_secs(since_epoch.as_secs())
}

/// Sleeps until the wall clock reaches `time`.
pub async fn sleep_until(time: SystemTime) {
    if let Ok(remaining) = time.duration_since(SystemTime::now()) {
        tokio::time::sleep(remaining).await;
    }
}

/// Returns the number of tasks of a queue in any state.
pub fn total_tasks(stats: &QueueStats) -> u64 {
    stats.pending + stats.retry_wait + stats.leased + stats.dead + stats.succeeded + stats.cancelled
}

/// Schedules `task` as a one-shot schedule due at `due_time` and returns the new schedule.
pub async fn schedule_at(
    client: &mut SchedulerClient<Channel>,
    task: NewTask,
    due_time: SystemTime,
) -> Result<Schedule> {
    let request = ScheduleTaskRequest {
        task: Some(task),
        due: Some(schedule_task_request::Due::DueTime(proto_timestamp(
            due_time,
        ))),
    };
    let response = within(WAIT, "ScheduleTask", async {
        Ok(client.schedule_task(request).await?)
    })
    .await?;
    response
        .into_inner()
        .schedule
        .context("ScheduleTask returned no schedule")
}

/// Acks `deliveries` from `queue`, waits until every one of them has succeeded, and
/// checks that the queue contains no other task.
pub async fn ack_all_and_expect_only_them(
    client: &mut BrokerClient<Channel>,
    queue: &str,
    deliveries: &[Delivery],
) -> Result<()> {
    for delivery in deliveries {
        ack(client, &delivery.lease_id, "done").await?;
    }
    let count = deliveries.len() as u64;
    let stats = wait_for_stats(client, queue, "every released task succeeded", |stats| {
        stats.succeeded == count
    })
    .await?;
    assert_eq!(
        total_tasks(&stats),
        count,
        "tasks in queue {queue}, one per delivery: {stats:?}"
    );
    Ok(())
}
