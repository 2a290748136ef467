//! Scheduler restart on the same data directory: one-shot schedules survive a graceful stop
//! and a SIGKILL and are released once each, and recurring fire times missed while the
//! scheduler was down follow each schedule's missed-run policy.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use docket_proto::v1::broker_client::BrokerClient;
use docket_proto::v1::scheduler_client::SchedulerClient;
use docket_proto::v1::subscribe_response::Event;
use docket_proto::v1::{
    CreateScheduleRequest, Delivery, MissedRunPolicy, Schedule, ScheduleKind, ScheduleState,
};
use docket_tests::{
    BrokerProcess, QUIET, SCHEDULE_ID_HEADER, SCHEDULE_NAME_HEADER, SchedulerProcess, Subscription,
    WAIT, ack_all_and_expect_only_them, delivered_fire_time, delivered_task_id, format_utc,
    get_task, header, interval_recurrence, new_task, queue_stats, schedule_idempotency_key,
    system_time, temp_dir, wait_for_schedule, within,
};
use docket_tests::{schedule_at, sleep_until, total_tasks, whole_second_at_or_after};
use tonic::transport::Channel;

#[derive(Clone, Copy, Debug)]
enum StopMode {
    Graceful,
    Kill9,
}

const ONE_SHOT_QUEUE: &str = "one-shot-restart";

/// Minimum time from scheduling to the first due time. The scheduler must stop before the
/// first due time, so that the schedules are still pending when it goes down.
const ONE_SHOT_LEAD: Duration = Duration::from_secs(3);

/// How much earlier than its due time the broker may commit a released task. A scheduler
/// that sleeps on the monotonic clock until a wall-clock due time can wake a little early
/// when the two clocks drift apart while it sleeps.
const EARLY_RELEASE_TOLERANCE: Duration = Duration::from_millis(50);

/// Misfire threshold of the scheduler in the missed-run test: a fire time that the
/// scheduler gets to later than this is a missed run.
const MISFIRE_THRESHOLD: Duration = Duration::from_millis(500);
const MISFIRE_THRESHOLD_ARG: &str = "500ms";

/// Interval of the recurring schedules in the missed-run test.
const INTERVAL: Duration = Duration::from_secs(1);

/// Maximum missed runs that the RUN_ALL schedule releases at once.
const MAX_MISSED_RUNS: u64 = 3;

/// Minimum number of firings of each recurring schedule before the scheduler stops.
const FIRINGS_BEFORE_STOP: u64 = 2;

/// Offset of the restart from a fire time on the grid. At the restart, that grid time is
/// already more than the misfire threshold in the past, so it is certainly a missed run,
/// and the next one is due 400 ms after the restart.
const RESTART_PHASE: Duration = Duration::from_millis(600);

/// Length of the down time in intervals: the restart comes this many intervals plus
/// [`RESTART_PHASE`] after the first grid time that follows the stop.
const DOWN_INTERVALS: u32 = 4;

/// Time that each recurring schedule keeps firing after the restart before the test reads
/// its queue, so that it shows at least two firings on time after the missed runs.
const RUN_AFTER_RESTART: Duration = Duration::from_secs(2);

/// One recurring schedule of the missed-run test, with its own queue.
struct PolicyCase {
    name: &'static str,
    queue: &'static str,
    policy: MissedRunPolicy,
    max_missed_runs: u32,
}

const POLICY_CASES: [PolicyCase; 3] = [
    PolicyCase {
        name: "missed-skip",
        queue: "missed-skip",
        policy: MissedRunPolicy::Skip,
        max_missed_runs: 0,
    },
    PolicyCase {
        name: "missed-run-once",
        queue: "missed-run-once",
        policy: MissedRunPolicy::RunOnce,
        max_missed_runs: 0,
    },
    PolicyCase {
        name: "missed-run-all",
        queue: "missed-run-all",
        policy: MissedRunPolicy::RunAll,
        max_missed_runs: MAX_MISSED_RUNS as u32,
    },
];

/// Returns the first whole second of Unix time strictly after `time`.
fn whole_second_after(time: SystemTime) -> SystemTime {
    let since_epoch = time
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after the Unix epoch");
    UNIX_EPOCH + Duration::from_secs(since_epoch.as_secs() + 1)
}

/// A one-shot schedule created before the stop, and what its task must look like.
struct ExpectedOneShot {
    due_time: SystemTime,
    payload: String,
}

async fn one_shots_survive_restart(mode: StopMode) -> Result<()> {
    let broker_dir = temp_dir();
    let scheduler_dir = temp_dir();
    let broker = BrokerProcess::start(broker_dir.path(), &[]).await?;
    let mut first = SchedulerProcess::start(scheduler_dir.path(), &broker.endpoint(), &[]).await?;
    let mut scheduler = first.client().await?;

    // Whole-second due times have an exact RFC 3339 form, so the fire-time header can be
    // compared for equality whatever number of fractional digits the scheduler writes.
    let first_due = whole_second_at_or_after(SystemTime::now() + ONE_SHOT_LEAD);
    let due_times = [
        first_due,
        first_due,
        first_due + INTERVAL,
        first_due + INTERVAL,
    ];
    let mut expected: HashMap<String, ExpectedOneShot> = HashMap::new();
    for (index, due_time) in due_times.into_iter().enumerate() {
        let payload = format!("one-shot-{index}");
        let task = new_task(ONE_SHOT_QUEUE, "reminder", payload.clone());
        let schedule = schedule_at(&mut scheduler, task, due_time).await?;
        assert_eq!(
            schedule.kind(),
            ScheduleKind::OneShot,
            "kind of schedule {index}"
        );
        assert_eq!(
            schedule.state(),
            ScheduleState::Active,
            "state of schedule {index} after ScheduleTask"
        );
        let stored_due = schedule.due_time.as_ref().map(system_time);
        assert_eq!(
            stored_due,
            Some(due_time),
            "due time of schedule {index} after ScheduleTask"
        );
        expected.insert(schedule.id, ExpectedOneShot { due_time, payload });
    }
    drop(scheduler);

    match mode {
        StopMode::Graceful => {
            let status = first.stop().await?;
            assert!(
                status.success(),
                "scheduler exited with {status} after SIGTERM, expected success"
            );
        }
        StopMode::Kill9 => {
            first.kill9()?;
        }
    }
    let stopped_at = SystemTime::now();
    ensure!(
        stopped_at < first_due,
        "the scheduler stopped at {}, after the first due time {}; the test needs the \
         schedules still pending when the scheduler stops",
        format_utc(stopped_at),
        format_utc(first_due)
    );

    let mut broker_client = broker.client().await?;
    let stats = queue_stats(&mut broker_client, ONE_SHOT_QUEUE).await?;
    assert_eq!(
        total_tasks(&stats),
        0,
        "tasks in the queue after the stop and before the first due time: {stats:?}"
    );

    let second = SchedulerProcess::start(scheduler_dir.path(), &broker.endpoint(), &[]).await?;
    let mut scheduler = second.client().await?;

    let mut subscription =
        Subscription::open(&mut broker_client, &[ONE_SHOT_QUEUE], 100, None).await?;
    let deliveries = subscription.next_deliveries(expected.len()).await?;
    subscription
        .expect_no_delivery(QUIET)
        .await
        .context("a one-shot schedule released more than one task after the restart")?;

    let mut delivered: HashMap<String, String> = HashMap::new();
    for delivery in &deliveries {
        let task_id = delivered_task_id(delivery)?;
        let schedule_id = header(delivery, SCHEDULE_ID_HEADER)
            .with_context(|| format!("task {task_id} has no {SCHEDULE_ID_HEADER} header"))?
            .to_string();
        let Some(one_shot) = expected.get(&schedule_id) else {
            bail!("task {task_id} names schedule {schedule_id}, which the test did not create");
        };
        if let Some(earlier) = delivered.insert(schedule_id.clone(), task_id.clone()) {
            panic!("schedule {schedule_id} released two tasks: {earlier} and {task_id}");
        }
        check_one_shot_task(&mut broker_client, delivery, &schedule_id, one_shot).await?;
    }

    for (schedule_id, task_id) in &delivered {
        let schedule = wait_for_schedule(&mut scheduler, schedule_id, "state FIRED", |s| {
            s.state() == ScheduleState::Fired
        })
        .await?;
        let outcome = schedule
            .last_outcome
            .with_context(|| format!("fired schedule {schedule_id} has no last_outcome"))?;
        assert_eq!(
            &outcome.task_id, task_id,
            "last_outcome.task_id of schedule {schedule_id}"
        );
        assert_eq!(
            outcome.fire_time.as_ref().map(system_time),
            Some(expected[schedule_id].due_time),
            "last_outcome.fire_time of schedule {schedule_id}"
        );
        assert_eq!(
            outcome.error, "",
            "last_outcome.error of schedule {schedule_id}"
        );
    }

    ack_all_and_expect_only_them(&mut broker_client, ONE_SHOT_QUEUE, &deliveries).await?;
    Ok(())
}

/// Checks the headers, payload, idempotency key and release time of the task that the
/// one-shot schedule `schedule_id` released.
async fn check_one_shot_task(
    broker_client: &mut BrokerClient<Channel>,
    delivery: &Delivery,
    schedule_id: &str,
    one_shot: &ExpectedOneShot,
) -> Result<()> {
    let task = delivery.task.as_ref().context("delivery without a task")?;
    assert_eq!(
        delivered_fire_time(delivery)?,
        one_shot.due_time,
        "fire-time header of the task of schedule {schedule_id}"
    );
    assert_eq!(
        String::from_utf8_lossy(&task.payload),
        one_shot.payload,
        "payload of the task of schedule {schedule_id}"
    );
    assert_eq!(
        task.kind, "reminder",
        "kind of the task of schedule {schedule_id}"
    );
    assert_eq!(
        delivery.attempt, 1,
        "attempt of the task of schedule {schedule_id}"
    );

    let created_at = system_time(
        task.created_at
            .as_ref()
            .context("task without created_at")?,
    );
    assert!(
        created_at + EARLY_RELEASE_TOLERANCE >= one_shot.due_time,
        "the task of schedule {schedule_id} was committed at {}, before its due time {}",
        format_utc(created_at),
        format_utc(one_shot.due_time)
    );

    let status = get_task(broker_client, &task.id).await?;
    assert_eq!(
        status.idempotency_key,
        schedule_idempotency_key(schedule_id, one_shot.due_time),
        "idempotency key of the task of schedule {schedule_id}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn one_shots_survive_graceful_restart() -> Result<()> {
    one_shots_survive_restart(StopMode::Graceful).await
}

#[tokio::test(flavor = "multi_thread")]
async fn one_shots_survive_kill9_restart() -> Result<()> {
    one_shots_survive_restart(StopMode::Kill9).await
}

/// A task that a recurring schedule released, identified by its fire time.
#[derive(Debug)]
struct Release {
    task_id: String,
    fire_time: SystemTime,
    created_at: SystemTime,
}

/// Creates the recurring schedule of `case`, firing every [`INTERVAL`] from `start_time`.
async fn create_policy_schedule(
    client: &mut SchedulerClient<Channel>,
    case: &PolicyCase,
    start_time: SystemTime,
) -> Result<Schedule> {
    let mut recurrence = interval_recurrence(INTERVAL, Some(start_time));
    recurrence.missed_runs = case.policy as i32;
    recurrence.max_missed_runs = case.max_missed_runs;
    let request = CreateScheduleRequest {
        name: case.name.to_string(),
        recurrence: Some(recurrence),
        task: Some(new_task(case.queue, "tick", case.name)),
        paused: false,
    };
    let response = within(WAIT, "CreateSchedule", async {
        Ok(client.create_schedule(request).await?)
    })
    .await?;
    response
        .into_inner()
        .schedule
        .with_context(|| format!("CreateSchedule for {} returned no schedule", case.name))
}

/// Returns the index of `fire_time` on the grid `start_time + k * INTERVAL`, failing if it
/// lies off the grid.
fn grid_index(start_time: SystemTime, fire_time: SystemTime) -> Result<u64> {
    let offset = fire_time.duration_since(start_time).with_context(|| {
        format!(
            "fire time {} is before the start time {}",
            format_utc(fire_time),
            format_utc(start_time)
        )
    })?;
    ensure!(
        offset.as_nanos() % INTERVAL.as_nanos() == 0,
        "fire time {} is not a whole number of intervals after the start time {}",
        format_utc(fire_time),
        format_utc(start_time)
    );
    Ok(u64::try_from(offset.as_nanos() / INTERVAL.as_nanos())?)
}

/// Drains the queue of `case` and returns the tasks released for fire times up to the
/// schedule's `last_fire_time`, by grid index. Checks the headers and idempotency key of
/// each, and that no fire time was released twice.
async fn collect_releases(
    broker_client: &mut BrokerClient<Channel>,
    case: &PolicyCase,
    schedule: &Schedule,
    start_time: SystemTime,
) -> Result<BTreeMap<u64, Release>> {
    let last_fire_time = system_time(
        schedule
            .last_fire_time
            .as_ref()
            .with_context(|| format!("schedule {} has no last_fire_time", case.name))?,
    );
    let expected_count = usize::try_from(schedule.fire_count)?;

    // The schedule keeps firing while the test reads. Tasks for fire times after the
    // snapshot's last_fire_time are ignored. Every firing up to it was enqueued before it
    // was recorded, so all of them are in the queue already.
    let mut subscription = Subscription::open(broker_client, &[case.queue], 1000, None).await?;
    let mut releases: BTreeMap<u64, Release> = BTreeMap::new();
    let description = format!(
        "{expected_count} tasks of schedule {} with fire times up to {}",
        case.name,
        format_utc(last_fire_time)
    );
    let mut deliveries = Vec::new();
    within(WAIT, &description, async {
        let mut counted = 0;
        while counted < expected_count {
            let delivery = subscription.next_delivery().await?;
            if delivered_fire_time(&delivery)? <= last_fire_time {
                counted += 1;
            }
            deliveries.push(delivery);
        }
        Ok(())
    })
    .await?;
    // A task released twice for one fire time would already be pending and arrive now.
    loop {
        match subscription.next_event(QUIET).await {
            Ok(Event::Delivery(delivery)) => {
                deliveries.push(delivery);
            }
            Ok(_) => continue,
            Err(_) => break,
        }
    }

    for delivery in deliveries {
        let fire_time = delivered_fire_time(&delivery)?;
        if fire_time > last_fire_time {
            continue;
        }
        let task = delivery.task.context("delivery without a task")?;
        assert_eq!(
            task.headers.get(SCHEDULE_ID_HEADER),
            Some(&schedule.id),
            "{SCHEDULE_ID_HEADER} header of task {} of schedule {}",
            task.id,
            case.name
        );
        assert_eq!(
            task.headers.get(SCHEDULE_NAME_HEADER).map(String::as_str),
            Some(case.name),
            "{SCHEDULE_NAME_HEADER} header of task {} of schedule {}",
            task.id,
            case.name
        );
        let status = get_task(broker_client, &task.id).await?;
        assert_eq!(
            status.idempotency_key,
            schedule_idempotency_key(&schedule.id, fire_time),
            "idempotency key of task {} of schedule {}",
            task.id,
            case.name
        );
        let created_at = system_time(
            task.created_at
                .as_ref()
                .context("task without created_at")?,
        );
        let index = grid_index(start_time, fire_time)?;
        let release = Release {
            task_id: task.id,
            fire_time,
            created_at,
        };
        if let Some(earlier) = releases.insert(index, release) {
            panic!(
                "schedule {} released fire time {} twice: tasks {} and {}",
                case.name,
                format_utc(fire_time),
                earlier.task_id,
                releases[&index].task_id
            );
        }
    }
    Ok(releases)
}

/// Returns the number of grid indices in `range` without a released task.
fn unreleased(releases: &BTreeMap<u64, Release>, range: std::ops::RangeInclusive<u64>) -> u64 {
    range.filter(|index| !releases.contains_key(index)).count() as u64
}

/// Returns the grid indices released by the restarted scheduler after `last_before_stop`,
/// in order.
fn released_after(releases: &BTreeMap<u64, Release>, last_before_stop: u64) -> Vec<u64> {
    releases
        .range(last_before_stop + 1..)
        .map(|(index, _)| *index)
        .collect()
}

/// Checks that `indices` are consecutive grid indices, which is how a schedule fires when
/// nothing is missed.
fn assert_consecutive(case: &PolicyCase, indices: &[u64], description: &str) {
    for pair in indices.windows(2) {
        assert_eq!(
            pair[1],
            pair[0] + 1,
            "schedule {}: {description} skip from grid index {} to {}; released indices \
             {indices:?}",
            case.name,
            pair[0],
            pair[1]
        );
    }
}

/// Checks that `release` was committed more than the misfire threshold after its fire
/// time, as the release of a missed run must be.
fn assert_released_late(case: &PolicyCase, release: &Release) {
    let lateness = release
        .created_at
        .duration_since(release.fire_time)
        .unwrap_or_default();
    assert!(
        lateness > MISFIRE_THRESHOLD,
        "schedule {}: fire time {} was released as a missed run, but its task was \
         committed at {}, only {lateness:?} later, within the misfire threshold",
        case.name,
        format_utc(release.fire_time),
        format_utc(release.created_at)
    );
}

/// Checks the releases of one schedule against its missed-run policy, and returns the
/// number of missed fire times that the restarted scheduler found.
///
/// Fire times after the last one released before the stop form two runs: missed runs,
/// then firings on time. `definitely_missed` is the number of grid times that were missed
/// whatever the timing: later than the last release before the stop and more than the
/// misfire threshold before the restart. One or two more grid times near the restart may
/// be missed as well, depending on how fast the scheduler starts. So the number of missed
/// runs is read from the releases, and it must be at least `definitely_missed`.
fn check_policy(
    case: &PolicyCase,
    releases: &BTreeMap<u64, Release>,
    last_before_stop: u64,
    definitely_missed: u64,
) -> u64 {
    let after = released_after(releases, last_before_stop);
    let last_definitely_missed = last_before_stop + definitely_missed;
    assert!(
        !after.is_empty(),
        "schedule {}: nothing released after the restart",
        case.name
    );

    match case.policy {
        MissedRunPolicy::Skip => {
            // Nothing for the missed times, then every fire time on time.
            let first_on_time = after[0];
            assert!(
                first_on_time > last_definitely_missed,
                "schedule {}: SKIP released grid index {first_on_time}, a fire time missed \
                 while the scheduler was down (indices {} to {last_definitely_missed}); \
                 released after the stop: {after:?}",
                case.name,
                last_before_stop + 1
            );
            assert_consecutive(case, &after, "firings after the missed runs");
            first_on_time - last_before_stop - 1
        }
        MissedRunPolicy::RunOnce => {
            // One task with the latest missed fire time, then every fire time on time.
            let catch_up = after[0];
            let in_window = after
                .iter()
                .filter(|index| **index <= last_definitely_missed)
                .count();
            assert!(
                in_window <= 1,
                "schedule {}: RUN_ONCE released {in_window} tasks for the fire times missed \
                 while the scheduler was down (indices {} to {last_definitely_missed}); \
                 released after the stop: {after:?}",
                case.name,
                last_before_stop + 1
            );
            assert!(
                catch_up >= last_definitely_missed,
                "schedule {}: RUN_ONCE released grid index {catch_up}, older than the latest \
                 missed fire time {last_definitely_missed}; released after the stop: \
                 {after:?}",
                case.name
            );
            assert_released_late(case, &releases[&catch_up]);
            assert_consecutive(case, &after, "firings after the missed runs");
            catch_up - last_before_stop
        }
        MissedRunPolicy::RunAll => {
            // The oldest MAX_MISSED_RUNS missed times, then every fire time on time.
            let cap = usize::try_from(MAX_MISSED_RUNS).expect("MAX_MISSED_RUNS fits in usize");
            let oldest: Vec<u64> = (1..=MAX_MISSED_RUNS)
                .map(|offset| last_before_stop + offset)
                .collect();
            assert!(
                after.len() > cap,
                "schedule {}: RUN_ALL released only {after:?} after the stop",
                case.name
            );
            assert_eq!(
                after[..cap],
                oldest[..],
                "schedule {}: RUN_ALL must release the oldest {MAX_MISSED_RUNS} missed fire \
                 times; released after the stop: {after:?}",
                case.name
            );
            for index in &oldest {
                assert_released_late(case, &releases[index]);
            }
            let catch_up: Vec<SystemTime> = oldest
                .iter()
                .map(|index| releases[index].created_at)
                .collect();
            assert!(
                catch_up.is_sorted(),
                "schedule {}: RUN_ALL must release missed runs oldest first; commit times \
                 {:?}",
                case.name,
                catch_up
                    .iter()
                    .map(|time| format_utc(*time))
                    .collect::<Vec<_>>()
            );
            let first_on_time = after[cap];
            assert!(
                first_on_time > last_definitely_missed,
                "schedule {}: RUN_ALL released grid index {first_on_time}, beyond the \
                 {MAX_MISSED_RUNS} it may release for fire times missed while the scheduler \
                 was down (indices {} to {last_definitely_missed}); released after the \
                 stop: {after:?}",
                case.name,
                last_before_stop + 1
            );
            assert_consecutive(case, &after[cap..], "firings after the missed runs");
            first_on_time - last_before_stop - 1
        }
        MissedRunPolicy::Unspecified => unreachable!("every case sets a policy"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn missed_runs_follow_policy_after_restart() -> Result<()> {
    let broker_dir = temp_dir();
    let scheduler_dir = temp_dir();
    let broker = BrokerProcess::start(broker_dir.path(), &[]).await?;
    let scheduler_args = ["--misfire-threshold", MISFIRE_THRESHOLD_ARG];
    let mut first =
        SchedulerProcess::start(scheduler_dir.path(), &broker.endpoint(), &scheduler_args).await?;
    let mut scheduler = first.client().await?;

    // A start time on a whole second puts every fire time on a whole second, which the
    // fire-time header states exactly.
    let start_time = whole_second_at_or_after(SystemTime::now() + INTERVAL);
    let mut schedule_ids = Vec::new();
    for case in &POLICY_CASES {
        let schedule = create_policy_schedule(&mut scheduler, case, start_time).await?;
        assert_eq!(
            schedule.state(),
            ScheduleState::Active,
            "state of schedule {} after CreateSchedule",
            case.name
        );
        schedule_ids.push(schedule.id);
    }
    for (case, schedule_id) in POLICY_CASES.iter().zip(&schedule_ids) {
        wait_for_schedule(
            &mut scheduler,
            schedule_id,
            &format!("{FIRINGS_BEFORE_STOP} firings before the stop"),
            |schedule| schedule.fire_count >= FIRINGS_BEFORE_STOP,
        )
        .await
        .with_context(|| format!("schedule {} before the stop", case.name))?;
    }
    drop(scheduler);

    let status = first.stop().await?;
    assert!(
        status.success(),
        "scheduler exited with {status} after SIGTERM, expected success"
    );
    let stopped_at = SystemTime::now();

    // The restart comes RESTART_PHASE after a grid time, so that no grid time is close to
    // the edge between missed and on time at the moment the scheduler starts.
    let restart_at = whole_second_after(stopped_at) + INTERVAL * DOWN_INTERVALS + RESTART_PHASE;
    sleep_until(restart_at).await;
    // Recorded before the start: the restarted scheduler cannot get to any fire time
    // earlier than this.
    let restarted_at = SystemTime::now();
    let second =
        SchedulerProcess::start(scheduler_dir.path(), &broker.endpoint(), &scheduler_args).await?;
    let mut scheduler = second.client().await?;

    let run_until = restarted_at + RUN_AFTER_RESTART;
    let mut snapshots = Vec::new();
    for (case, schedule_id) in POLICY_CASES.iter().zip(&schedule_ids) {
        let schedule = wait_for_schedule(
            &mut scheduler,
            schedule_id,
            &format!("a firing at or after {}", format_utc(run_until)),
            |schedule| {
                schedule
                    .last_fire_time
                    .as_ref()
                    .is_some_and(|time| system_time(time) >= run_until)
            },
        )
        .await
        .with_context(|| format!("schedule {} after the restart", case.name))?;
        snapshots.push(schedule);
    }

    let mut broker_client = broker.client().await?;
    for (case, schedule) in POLICY_CASES.iter().zip(&snapshots) {
        let releases = collect_releases(&mut broker_client, case, schedule, start_time).await?;

        // Tasks committed before the restart came from the first scheduler.
        let last_before_stop = releases
            .iter()
            .filter(|(_, release)| release.created_at < restarted_at)
            .map(|(index, _)| *index)
            .max()
            .with_context(|| format!("schedule {}: nothing released before the stop", case.name))?;
        let first_not_missed = grid_index(
            start_time,
            whole_second_at_or_after(restarted_at - MISFIRE_THRESHOLD),
        )?;
        ensure!(
            first_not_missed > last_before_stop + MAX_MISSED_RUNS + 1,
            "schedule {}: the down time covers grid indices {} to {}, too few to exceed \
             max_missed_runs; the test's timing is wrong",
            case.name,
            last_before_stop + 1,
            first_not_missed - 1
        );
        let definitely_missed = first_not_missed - last_before_stop - 1;
        let missed = check_policy(case, &releases, last_before_stop, definitely_missed);
        assert!(
            missed >= definitely_missed,
            "schedule {}: {missed} missed fire times found, but {definitely_missed} fire \
             times were due while the scheduler was down",
            case.name
        );

        // Every grid time up to last_fire_time was either released or skipped.
        let last_fire_time = system_time(schedule.last_fire_time.as_ref().expect("checked"));
        let last_index = grid_index(start_time, last_fire_time)?;
        assert_eq!(
            releases.keys().next_back(),
            Some(&last_index),
            "schedule {}: the latest released fire time must be last_fire_time {}",
            case.name,
            format_utc(last_fire_time)
        );
        assert_eq!(
            schedule.fire_count,
            releases.len() as u64,
            "schedule {}: fire_count against the tasks in the queue",
            case.name
        );
        assert_eq!(
            schedule.skipped_count,
            unreleased(&releases, 0..=last_index),
            "schedule {}: skipped_count against the grid times from {} to {} without a task \
             (released: {:?}, {missed} missed after the stop)",
            case.name,
            format_utc(start_time),
            format_utc(last_fire_time),
            releases.keys().collect::<Vec<_>>()
        );
        let expected_skipped_after_stop = match case.policy {
            MissedRunPolicy::RunOnce => missed - 1,
            MissedRunPolicy::RunAll => missed - MAX_MISSED_RUNS,
            _ => missed,
        };
        assert_eq!(
            unreleased(&releases, last_before_stop + 1..=last_index),
            expected_skipped_after_stop,
            "schedule {}: fire times skipped after the stop",
            case.name
        );
        let next_fire_time = schedule.next_fire_time.as_ref().map(system_time);
        assert!(
            next_fire_time.is_some_and(|time| time > last_fire_time),
            "schedule {}: next_fire_time {:?} must follow last_fire_time {}",
            case.name,
            next_fire_time.map(format_utc),
            format_utc(last_fire_time)
        );
        println!(
            "schedule {}: released grid indices {:?}, stop after {last_before_stop}, \
             {definitely_missed} missed for certain, {missed} missed, skipped_count {}",
            case.name,
            releases.keys().collect::<Vec<_>>(),
            schedule.skipped_count
        );
    }
    Ok(())
}
