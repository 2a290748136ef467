//! The release loop: sleeps until the earliest due time, then claims the due schedules,
//! enqueues their tasks into the broker, and records each firing.
//!
//! The claim is committed before the enqueue, and each task carries the idempotency key
//! `schedule:<id>:<fire time>`. If the scheduler stops between enqueue and record, the
//! next run finds the claim, enqueues the same keys again, and the broker returns the
//! tasks it already contains instead of creating new ones.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use docket_proto::storage::FireOutcomeRecord;
use docket_proto::v1::broker_client::BrokerClient;
use docket_proto::v1::{EnqueueRequest, NewTask};
use prost::Message;
use rand::Rng;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};
use uuid::Uuid;

use crate::metrics::SchedulerMetrics;
use crate::rule::{now_nanos, rfc3339};
use crate::schedules::{self, Claimed, Schedules};
use crate::security::BrokerChannel;
use crate::store::Id;

/// Maximum sleep of the release loop. It wakes at least this often even when nothing is
/// due, so that a jump of the system clock delays no firing by more than this.
const MAX_SLEEP: Duration = Duration::from_secs(60);

/// Maximum encoded size of one Enqueue request, well below the broker's message limit.
const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;

/// Maximum number of firings logged one by one as waiting during one broker outage. Past
/// it, the retry lines still give the number of tasks of the batch being retried.
const MAX_LOGGED_WAITING: usize = 10_000;

/// First delay before an enqueue is retried after the broker could not be reached.
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(100);

/// Header that names the schedule a released task came from.
pub const SCHEDULE_ID_HEADER: &str = "docket-schedule-id";

/// Header that contains the name of the recurring schedule a released task came from.
pub const SCHEDULE_NAME_HEADER: &str = "docket-schedule-name";

/// Header that contains the fire time a released task is for, in RFC 3339.
pub const FIRE_TIME_HEADER: &str = "docket-fire-time";

/// Settings of the release loop.
#[derive(Debug, Clone)]
pub struct ReleaseConfig {
    /// Fire times later than this, in nanoseconds, are missed runs.
    pub misfire_threshold: i64,
    /// Maximum number of schedules claimed at once, and of tasks in one Enqueue request.
    pub batch: usize,
    /// Maximum delay between two attempts to reach the broker.
    pub max_retry_delay: Duration,
    /// Time limit of one Enqueue call.
    pub enqueue_timeout: Duration,
    /// Test hook: time to wait between a successful enqueue and its record.
    pub pause_after_enqueue: Option<Duration>,
    /// Counters and histograms of the releases.
    pub metrics: Arc<SchedulerMetrics>,
}

/// Runs the release loop until `shutdown` is cancelled. A release in progress finishes
/// first, unless the broker cannot be reached; its claim then stays stored and the next
/// run releases it.
pub async fn run(
    schedules: Arc<Schedules>,
    broker: BrokerClient<BrokerChannel>,
    config: ReleaseConfig,
    shutdown: CancellationToken,
) {
    let releaser = Releaser {
        schedules,
        broker,
        config,
        shutdown,
        waiting: Mutex::new(WaitingFirings::default()),
    };
    releaser.run().await;
}

struct Releaser {
    schedules: Arc<Schedules>,
    broker: BrokerClient<BrokerChannel>,
    config: ReleaseConfig,
    shutdown: CancellationToken,
    /// Firings logged as waiting for the broker during the current outage.
    waiting: Mutex<WaitingFirings>,
}

/// The due-index entries, (fire time, schedule id), that were logged as waiting for an
/// unreachable broker, so that each is logged once per outage.
#[derive(Default)]
struct WaitingFirings {
    logged: HashSet<(i64, Id)>,
    /// Set once `MAX_LOGGED_WAITING` firings were logged.
    full: bool,
}

impl Releaser {
    /// Runs the loop as a pipeline of two batches. While the tasks of one batch are
    /// enqueued, a single transaction records the batch before it and claims the batch
    /// after it, so the broker and the scheduler's store work at the same time.
    async fn run(&self) {
        // Releases whose tasks were enqueued, recorded by the next cycle.
        let mut finished: Vec<schedules::Finished> = Vec::new();
        // Schedules claimed by the last cycle, whose tasks are enqueued next.
        let mut claimed: Vec<Claimed> = Vec::new();
        while !self.shutdown.is_cancelled() {
            let now = now_nanos();
            let in_flight: HashSet<Id> = claimed.iter().map(|schedule| schedule.id).collect();
            let recorded: Vec<(i64, Id)> = finished
                .iter()
                .map(|(schedule, _)| (schedule.due, schedule.id))
                .collect();
            let to_record = std::mem::take(&mut finished);
            let (cycle, outcomes) = tokio::join!(
                self.cycle(to_record, in_flight, now),
                self.enqueue(&claimed)
            );

            let enqueued = std::mem::take(&mut claimed);
            match outcomes {
                Some(outcomes) => {
                    self.pause_after_enqueue(&enqueued).await;
                    finished = enqueued.into_iter().zip(outcomes).collect();
                }
                None => tracing::info!(
                    schedules = enqueued.len(),
                    "shutdown while the broker was unreachable; the release resumes at the next start"
                ),
            }
            match cycle {
                Ok(cycle) => {
                    self.forget_waiting(&recorded);
                    claimed = cycle.claimed;
                    self.waiting
                        .lock()
                        .expect("the waiting log is not poisoned")
                        .logged
                        .extend(claimed.iter().map(|schedule| (schedule.due, schedule.id)));
                    if claimed.is_empty() && finished.is_empty() {
                        self.idle(now, cycle.earliest_due).await;
                    }
                }
                Err(err) => {
                    // The releases stay stored, so a later cycle claims them again and
                    // their tasks are enqueued with the same idempotency keys.
                    tracing::error!(error = %err, "release loop failed; retrying in 1s");
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                        () = self.shutdown.cancelled() => {}
                    }
                }
            }
        }
        self.record_last(finished).await;
    }

    /// Records the releases of `finished` and claims up to a batch of the schedules that
    /// are due at `now`, other than those of `in_flight`, in one transaction.
    async fn cycle(
        &self,
        finished: Vec<schedules::Finished>,
        in_flight: HashSet<Id>,
        now: i64,
    ) -> Result<schedules::Cycle, crate::error::SchedulerError> {
        let threshold = self.config.misfire_threshold;
        let limit = self.config.batch;
        let retention = self.schedules.retention;
        self.schedules
            .writer
            .run(move |tables| {
                schedules::cycle(
                    tables, &finished, &in_flight, now, threshold, limit, retention,
                )
            })
            .await
    }

    /// Purges expired schedules, then sleeps until `earliest_due`, a change of the
    /// schedules, or shutdown.
    async fn idle(&self, now: i64, earliest_due: Option<i64>) {
        if let Err(err) = self.purge_expired(now).await {
            tracing::warn!(error = %err, "cannot delete expired one-shot schedules");
        }
        let sleep = match earliest_due {
            Some(time) => Duration::from_nanos(time.saturating_sub(now).max(0) as u64),
            None => MAX_SLEEP,
        };
        tokio::select! {
            () = tokio::time::sleep(sleep.min(MAX_SLEEP)) => {}
            () = self.schedules.wake.notified() => {}
            () = self.shutdown.cancelled() => {}
        }
    }

    /// Waits between an enqueue and its record when the test hook is set.
    async fn pause_after_enqueue(&self, enqueued: &[Claimed]) {
        let Some(pause) = self.config.pause_after_enqueue else {
            return;
        };
        if enqueued.is_empty() {
            return;
        }
        for schedule in enqueued {
            tracing::warn!(
                schedule_id = %Uuid::from_u128(schedule.id),
                pause_ms = pause.as_millis() as u64,
                "test hook: paused between enqueue and record"
            );
        }
        tokio::time::sleep(pause).await;
    }

    /// Records the releases that were enqueued before shutdown.
    async fn record_last(&self, finished: Vec<schedules::Finished>) {
        if finished.is_empty() {
            return;
        }
        let retention = self.schedules.retention;
        let recorded = finished.len();
        let result = self
            .schedules
            .writer
            .run(move |tables| {
                for (claimed, outcomes) in &finished {
                    schedules::record(tables, claimed, outcomes, retention)?;
                }
                Ok(())
            })
            .await;
        match result {
            Ok(()) => tracing::info!(
                schedules = recorded,
                "recorded the last release before shutdown"
            ),
            Err(err) => tracing::error!(
                error = %err,
                schedules = recorded,
                "cannot record the last release before shutdown; it is enqueued again at the next start"
            ),
        }
    }

    /// Forgets the waiting firings of releases that were recorded.
    fn forget_waiting(&self, recorded: &[(i64, Id)]) {
        let mut waiting = self
            .waiting
            .lock()
            .expect("the waiting log is not poisoned");
        for entry in recorded {
            waiting.logged.remove(entry);
        }
        if waiting.logged.is_empty() {
            waiting.full = false;
        }
    }

    /// Deletes one-shot schedules whose retention has passed, a bounded number at a time.
    async fn purge_expired(&self, now: i64) -> Result<(), crate::error::SchedulerError> {
        if !self.schedules.store.any_expired(now)? {
            return Ok(());
        }
        let purged = self
            .schedules
            .writer
            .run(move |tables| tables.purge_expired(now, 1000))
            .await?;
        if purged > 0 {
            tracing::debug!(purged, "deleted expired one-shot schedules");
        }
        Ok(())
    }

    /// Enqueues a task for every fire time of `claimed`, in as few requests as fit, and
    /// returns the outcomes per schedule. Returns `None` if shutdown began while the
    /// broker could not be reached.
    async fn enqueue(&self, claimed: &[Claimed]) -> Option<Vec<Vec<FireOutcomeRecord>>> {
        if claimed.is_empty() {
            return Some(Vec::new());
        }
        let mut outcomes = vec![Vec::new(); claimed.len()];
        // Each firing as (index of its schedule in `claimed`, fire time), and its task.
        let mut firings = Vec::new();
        let mut tasks = Vec::new();
        for (index, schedule) in claimed.iter().enumerate() {
            for &fire in &schedule.release.fire_nanos {
                firings.push((index, fire));
                tasks.push(released_task(schedule, fire));
            }
        }
        let mut start = 0;
        while start < firings.len() {
            let mut end = start;
            let mut bytes = 0;
            while end < firings.len() && end - start < self.config.batch {
                let size = tasks[end].encoded_len();
                if end > start && bytes + size > MAX_REQUEST_BYTES {
                    break;
                }
                bytes += size;
                end += 1;
            }
            let results = self.enqueue_chunk(&tasks[start..end]).await?;
            let release_nanos = now_nanos();
            let mut released = 0;
            for (&(index, fire), result) in firings[start..end].iter().zip(results) {
                let schedule = &claimed[index];
                let (task_id, error) = match result {
                    Ok(task_id) => {
                        released += 1;
                        tracing::debug!(
                            schedule_id = %Uuid::from_u128(schedule.id),
                            name = %schedule.name,
                            fire_time = %rfc3339(fire),
                            task_id = %task_id,
                            "released"
                        );
                        (task_id, String::new())
                    }
                    Err(error) => {
                        tracing::warn!(
                            schedule_id = %Uuid::from_u128(schedule.id),
                            name = %schedule.name,
                            fire_time = %rfc3339(fire),
                            error = %error,
                            "the broker rejected the task of a firing"
                        );
                        (String::new(), error)
                    }
                };
                let kind = self.config.metrics.kind(!schedule.name.is_empty());
                if error.is_empty() {
                    kind.released.inc();
                    let lag_nanos = release_nanos.saturating_sub(fire).max(0);
                    kind.release_lag.observe(lag_nanos as f64 / 1e9);
                } else {
                    kind.failed.inc();
                }
                outcomes[index].push(FireOutcomeRecord {
                    fire_nanos: fire,
                    release_nanos,
                    task_id,
                    error,
                });
            }
            tracing::info!(tasks = released, "released due tasks into the broker");
            start = end;
        }
        Some(outcomes)
    }

    /// Enqueues one request's worth of firings, retrying while the broker cannot be
    /// reached. A request the broker rejects is split, so that each rejection is
    /// attributed to its own firing. Returns each firing's task id or the broker's error, or `None` on shutdown.
    async fn enqueue_chunk(&self, chunk: &[NewTask]) -> Option<Vec<Result<String, String>>> {
        match self.enqueue_with_retry(chunk).await? {
            Ok(ids) if ids.len() == chunk.len() => Some(ids.into_iter().map(Ok).collect()),
            Ok(ids) => {
                let error = format!(
                    "the broker returned {} task ids for {} tasks",
                    ids.len(),
                    chunk.len()
                );
                Some(vec![Err(error); chunk.len()])
            }
            Err(status) if chunk.len() == 1 => Some(vec![Err(describe(&status))]),
            Err(_) => {
                let mut results = Vec::with_capacity(chunk.len());
                for task in chunk {
                    match self.enqueue_with_retry(std::slice::from_ref(task)).await? {
                        Ok(mut ids) if ids.len() == 1 => results.push(Ok(ids.remove(0))),
                        Ok(ids) => results.push(Err(format!(
                            "the broker returned {} task ids for 1 task",
                            ids.len()
                        ))),
                        Err(status) => results.push(Err(describe(&status))),
                    }
                }
                Some(results)
            }
        }
    }

    /// Calls Enqueue until the broker returns something other than a transient
    /// failure. Returns `None` if shutdown begins first.
    async fn enqueue_with_retry(&self, tasks: &[NewTask]) -> Option<Result<Vec<String>, Status>> {
        let mut delay = FIRST_RETRY_DELAY;
        let mut failures = 0u32;
        loop {
            let mut broker = self.broker.clone();
            let request = EnqueueRequest {
                tasks: tasks.to_vec(),
            };
            let result = tokio::select! {
                result = tokio::time::timeout(self.config.enqueue_timeout, broker.enqueue(request)) => result,
                () = self.shutdown.cancelled() => return None,
            };
            let status = match result {
                Ok(Ok(response)) => {
                    if failures > 0 {
                        tracing::info!(
                            tasks = tasks.len(),
                            failures,
                            "the broker is reachable again; the waiting firings were released"
                        );
                    }
                    return Some(Ok(response.into_inner().task_ids));
                }
                Ok(Err(status)) => status,
                Err(_) => Status::deadline_exceeded(format!(
                    "Enqueue took longer than {:?}",
                    self.config.enqueue_timeout
                )),
            };
            if !is_transient(&status) {
                return Some(Err(status));
            }
            failures += 1;
            self.config.metrics.enqueue_retries.inc();
            if failures == 1 {
                for task in tasks {
                    tracing::warn!(
                        schedule_id = task
                            .headers
                            .get(SCHEDULE_ID_HEADER)
                            .map(String::as_str)
                            .unwrap_or_default(),
                        fire_time = task
                            .headers
                            .get(FIRE_TIME_HEADER)
                            .map(String::as_str)
                            .unwrap_or_default(),
                        "firing waits until the broker can be reached"
                    );
                }
            }
            self.log_newly_due();
            let jittered = delay.mul_f64(rand::rng().random_range(0.5..=1.0));
            tracing::warn!(
                tasks = tasks.len(),
                first_schedule = tasks
                    .first()
                    .and_then(|task| task.headers.get(SCHEDULE_ID_HEADER))
                    .map(String::as_str)
                    .unwrap_or_default(),
                attempt = failures,
                retry_in_ms = jittered.as_millis() as u64,
                error = %describe(&status),
                "cannot reach the broker; the firings wait and are retried"
            );
            tokio::select! {
                () = tokio::time::sleep(jittered) => {}
                () = self.shutdown.cancelled() => return None,
            }
            delay = (delay * 2).min(self.config.max_retry_delay);
        }
    }
}

impl Releaser {
    /// Logs each schedule that fell due while the release loop waits for the broker, once
    /// per outage. Such firings wait behind the batch being retried.
    fn log_newly_due(&self) {
        let mut waiting = self
            .waiting
            .lock()
            .expect("the waiting log is not poisoned");
        if waiting.full {
            return;
        }
        let due = match self.schedules.store.due(now_nanos(), self.config.batch) {
            Ok(due) => due,
            Err(err) => {
                tracing::warn!(error = %err, "cannot read the due schedules to log them");
                return;
            }
        };
        for entry in due {
            if waiting.logged.len() >= MAX_LOGGED_WAITING {
                waiting.full = true;
                tracing::warn!(
                    logged = MAX_LOGGED_WAITING,
                    "more firings wait for the broker than are logged one by one"
                );
                return;
            }
            if waiting.logged.insert(entry) {
                tracing::warn!(
                    schedule_id = %Uuid::from_u128(entry.1),
                    fire_time = %rfc3339(entry.0),
                    "firing waits until the broker can be reached"
                );
            }
        }
    }
}

/// Builds the task that `schedule` releases for `fire`: its template with the firing's
/// idempotency key and headers.
fn released_task(schedule: &Claimed, fire: i64) -> NewTask {
    let mut task = schedule.task.clone();
    task.idempotency_key = format!("schedule:{}:{fire}", Uuid::from_u128(schedule.id));
    let mut headers = HashMap::with_capacity(task.headers.len() + 3);
    headers.extend(task.headers.drain());
    headers.insert(
        SCHEDULE_ID_HEADER.to_string(),
        Uuid::from_u128(schedule.id).to_string(),
    );
    headers.insert(FIRE_TIME_HEADER.to_string(), rfc3339(fire));
    if !schedule.name.is_empty() {
        headers.insert(SCHEDULE_NAME_HEADER.to_string(), schedule.name.clone());
    }
    task.headers = headers;
    task
}

/// Returns whether a failed Enqueue may succeed if it is repeated unchanged, because the
/// broker was unreachable, starting, stopping or overloaded rather than rejecting the
/// tasks. A rejected token is transient too: it is the scheduler's configuration, not the
/// tasks, that is wrong, and a restart with the right token releases them.
fn is_transient(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Unknown
            | Code::Internal
            | Code::Aborted
            | Code::Cancelled
            | Code::Unauthenticated
            | Code::PermissionDenied
    )
}

fn describe(status: &Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}
