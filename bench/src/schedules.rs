//! The `schedules` scenario: a spawned scheduler that holds many one-shot schedules, its
//! memory before and after a restart, and the rate at which it releases schedules that
//! fall due at one instant into the broker.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, bail};
use docket_proto::v1::broker_client::BrokerClient;
use docket_proto::v1::schedule_task_request::Due;
use docket_proto::v1::scheduler_client::SchedulerClient;
use docket_proto::v1::{
    GetQueueStatsRequest, ListSchedulesRequest, NewTask, QueueStats, ScheduleKind, ScheduleState,
    ScheduleTaskRequest,
};
use hdrhistogram::Histogram;
use tokio::task::JoinSet;

use crate::load::{self, AckMode, ConsumeSpec, DeliveryRecord, Payload, Workers};
use crate::scenarios::{Context, round2};
use crate::spawn::{self, SpawnedServer};
use crate::stats::{Row, new_histogram, record};

/// Delay of the held schedules: long enough that none of them falls due during a run.
const HELD_DELAY: Duration = Duration::from_secs(24 * 60 * 60);

/// Shortest time from the end of creating the release schedules to their due instant.
const MIN_RELEASE_LEAD: Duration = Duration::from_secs(5);

/// Time that the drainer keeps its streams open after the last expected delivery, so that
/// a duplicate that arrives late is still counted.
const DUPLICATE_WAIT: Duration = Duration::from_secs(2);

/// Time after the due instant without a new delivery after which the undelivered tasks
/// count as missing.
const STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Task kind of every scheduled task.
const TASK_KIND: &str = "bench";

/// Options of the `schedules` scenario.
pub struct SchedulesOptions {
    /// Held schedules, due in [`HELD_DELAY`].
    pub count: u64,
    /// ScheduleTask calls in flight.
    pub concurrency: usize,
    /// Connections that the calls in flight share.
    pub connections: usize,
    /// Schedules due at one instant, whose release is timed.
    pub release_count: u64,
    pub scheduler_bin: PathBuf,
    pub workers: usize,
    pub max_in_flight: u32,
    pub ack_batch: usize,
    pub ack_flush: Duration,
}

/// Starts a scheduler beside the broker, creates `count` held schedules, restarts the
/// scheduler, and then times the release of `release_count` schedules due at one instant.
/// Prints one row per step, and fails when the release delivered a task twice, missed one
/// or released one early.
pub async fn schedules(context: &mut Context, options: &SchedulesOptions) -> Result<()> {
    let (mut scheduler, times) = context
        .phase(
            "scheduler start",
            SpawnedServer::start_scheduler(&options.scheduler_bin, &context.url),
        )
        .await?;
    eprintln!(
        "schedules: spawned {} at {} (pid {}, data {}, SERVING after {:.2} s)",
        options.scheduler_bin.display(),
        scheduler.url(),
        scheduler.pid().unwrap_or(0),
        scheduler.data_dir().display(),
        times.serving.as_secs_f64()
    );

    let create_rate = create_held(context, &scheduler, options).await?;
    restart(context, &mut scheduler, options.count).await?;
    let outcome = release(context, &scheduler, options, create_rate).await;

    if let Err(err) = scheduler.stop().await {
        eprintln!("warning: {err:#}");
    }
    outcome
}

/// Creates the held schedules and prints the `create` row. Returns the ScheduleTask
/// calls per second.
async fn create_held(
    context: &mut Context,
    scheduler: &SpawnedServer,
    options: &SchedulesOptions,
) -> Result<f64> {
    let rss_before = rss_mib(scheduler)?;
    let spec = ScheduleSpec {
        queue: context.queue("schedules-held"),
        count: options.count,
        concurrency: options.concurrency,
        connections: options.connections,
        due: Due::Delay(prost_types::Duration {
            seconds: HELD_DELAY.as_secs() as i64,
            nanos: 0,
        }),
        keep_ids: false,
    };
    let created = context
        .phase(
            "schedules create",
            schedule_tasks(&scheduler.url(), &spec, &context.payload),
        )
        .await?;
    let rate = created.calls as f64 / created.elapsed.as_secs_f64();
    context.printer.print(
        Row::new("schedules", "create", created.calls, created.elapsed)
            .with_latency(&created.call_latency)
            .with("concurrency", options.concurrency)
            .with("connections", options.connections)
            .with("rss_before_mib", rss_before)
            .with("rss_mib", rss_mib(scheduler)?)
            .with("peak_rss_mib", peak_rss_mib(scheduler)?)
            .with("db_mib", database_mib(scheduler)?),
    );
    Ok(rate)
}

/// Restarts the scheduler on its data folder, checks that it still contains the held
/// schedules, and prints the `restart` row.
async fn restart(context: &mut Context, scheduler: &mut SpawnedServer, count: u64) -> Result<()> {
    let (stop, times) = context
        .phase("scheduler restart", scheduler.restart())
        .await?;
    let rss_after = rss_mib(scheduler)?;
    let held = context
        .phase("held schedule check", first_held_state(&scheduler.url()))
        .await?;
    if held != ScheduleState::Active {
        bail!("after the restart the oldest held schedule is {held:?}, expected Active");
    }
    context.printer.print(
        Row::new("schedules", "restart", count, times.serving)
            .with("stop_secs", round2(stop.as_secs_f64()))
            .with("listening_secs", round2(times.listening.as_secs_f64()))
            .with("serving_secs", round2(times.serving.as_secs_f64()))
            .with("rss_mib", rss_after)
            .with("db_mib", database_mib(scheduler)?),
    );
    Ok(())
}

/// Returns the state of the oldest one-shot schedule, as ListSchedules orders them by
/// creation. It is a held one, since those are created first.
async fn first_held_state(url: &str) -> Result<ScheduleState> {
    let mut client = SchedulerClient::new(load::connect(url).await?);
    let page = client
        .list_schedules(ListSchedulesRequest {
            kind: ScheduleKind::OneShot.into(),
            page_size: 1,
            page_token: String::new(),
        })
        .await
        .context("ListSchedules failed")?
        .into_inner();
    let Some(first) = page.schedules.into_iter().next() else {
        bail!("after the restart the scheduler lists no one-shot schedule");
    };
    Ok(first.state())
}

/// Creates `release_count` schedules due at one instant into a fresh queue, drains the
/// queue with batched Acks, and prints the `release` row. `create_rate` is the
/// ScheduleTask calls per second of the create step, which sets how far ahead the
/// instant lies.
async fn release(
    context: &mut Context,
    scheduler: &SpawnedServer,
    options: &SchedulesOptions,
    create_rate: f64,
) -> Result<()> {
    let queue = context.queue("schedules-release");
    let estimate = Duration::from_secs_f64(options.release_count as f64 / create_rate.max(1.0));
    let lead = MIN_RELEASE_LEAD + estimate * 2;
    let due_at = SystemTime::now() + lead;
    let due_instant = Instant::now() + lead;
    let since_epoch = due_at
        .duration_since(UNIX_EPOCH)
        .context("the system clock is before 1970")?;
    let spec = ScheduleSpec {
        queue: queue.clone(),
        count: options.release_count,
        concurrency: options.concurrency,
        connections: options.connections,
        due: Due::DueTime(prost_types::Timestamp {
            seconds: since_epoch.as_secs() as i64,
            nanos: since_epoch.subsec_nanos() as i32,
        }),
        keep_ids: true,
    };
    let consume = ConsumeSpec {
        queue: queue.clone(),
        workers: options.workers,
        max_in_flight: options.max_in_flight,
        ack: AckMode::Batch {
            size: options.ack_batch,
            flush: options.ack_flush,
        },
        handler_sleep: None,
        measure_latency: false,
        record_deliveries: true,
    };

    let (created, deliveries, acked) = context
        .phase("schedules release", async {
            let mut workers = Workers::start(&context.url, &consume).await?;
            let created = schedule_tasks(&scheduler.url(), &spec, &context.payload).await?;
            if Instant::now() >= due_instant {
                bail!(
                    "creating {} schedules took {:.1} s, past their due instant {:.1} s after \
                     the start, which is {} s plus twice the time estimated from the create \
                     step's rate; run again or lower --release-count",
                    options.release_count,
                    created.elapsed.as_secs_f64(),
                    lead.as_secs_f64(),
                    MIN_RELEASE_LEAD.as_secs()
                );
            }
            wait_for_deliveries(&mut workers, options.release_count, due_instant).await?;
            tokio::time::sleep(DUPLICATE_WAIT).await;
            workers.check_health()?;
            let acked = workers.acked();
            let deliveries = workers.stop_recorded().await?;
            Ok((created, deliveries, acked))
        })
        .await?;

    let check = ReleaseCheck::new(&created.ids, &deliveries, due_instant);
    let stats = queue_stats(&context.url, &queue).await?;
    let held = queue_stats(&context.url, &context.queue("schedules-held")).await?;
    let elapsed = check.last_delivery.map_or(Duration::ZERO, |last| {
        last.saturating_duration_since(due_instant)
    });
    let first_delivery_ms = check
        .first_delivery
        .map_or(serde_json::Value::Null, |first| {
            round2(first.saturating_duration_since(due_instant).as_secs_f64() * 1000.0).into()
        });
    context.printer.print(
        Row::new("schedules", "release", options.release_count, elapsed)
            .with("first_delivery_ms", first_delivery_ms)
            .with("delivered", deliveries.len())
            .with("distinct_tasks", check.distinct_tasks)
            .with("duplicate_deliveries", check.duplicate_deliveries)
            .with("released_twice", check.released_twice)
            .with("missing", check.missing)
            .with("unexpected", check.unexpected)
            .with("early", check.early)
            .with("acked", acked)
            .with(
                "queue_left",
                stats.pending + stats.retry_wait + stats.leased,
            )
            .with("held_released", task_total(&held))
            .with("lead_secs", round2(lead.as_secs_f64()))
            .with("create_secs", round2(created.elapsed.as_secs_f64()))
            .with("rss_mib", rss_mib(scheduler)?)
            .with("peak_rss_mib", peak_rss_mib(scheduler)?)
            .with(
                "broker_rss_mib",
                context
                    .broker_rss_mib()?
                    .map_or(serde_json::Value::Null, Into::into),
            )
            .with("workers", options.workers)
            .with("ack_batch", options.ack_batch),
    );

    if !check.is_exact(options.release_count) {
        bail!(
            "the release of {} schedules delivered {} distinct tasks: {} deliveries of a task \
             already delivered, {} schedules released as two tasks, {} missing, {} unexpected, \
             {} before the due instant",
            options.release_count,
            check.distinct_tasks,
            check.duplicate_deliveries,
            check.released_twice,
            check.missing,
            check.unexpected,
            check.early
        );
    }
    if task_total(&held) > 0 {
        bail!(
            "{} held schedules due in {} s were released during the run",
            task_total(&held),
            HELD_DELAY.as_secs()
        );
    }
    Ok(())
}

/// Waits until the workers have received `count` deliveries, or until no delivery has
/// arrived for [`STALL_TIMEOUT`] after `due`.
async fn wait_for_deliveries(workers: &mut Workers, count: u64, due: Instant) -> Result<()> {
    let mut seen = 0;
    let mut last_progress = due;
    loop {
        workers.check_health()?;
        let delivered = workers.delivered();
        if delivered >= count {
            return Ok(());
        }
        let now = Instant::now();
        if delivered > seen {
            seen = delivered;
            last_progress = now.max(due);
        }
        if now > last_progress + STALL_TIMEOUT {
            eprintln!(
                "schedules: {delivered} of {count} tasks delivered and none for {} s; \
                 counting the rest as missing",
                STALL_TIMEOUT.as_secs()
            );
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Counts of the drainer's deliveries, checked against the schedules that were created.
struct ReleaseCheck {
    distinct_tasks: u64,
    /// Deliveries of a task id that was delivered before.
    duplicate_deliveries: u64,
    /// Schedules whose id came with more than one task id.
    released_twice: u64,
    /// Created schedules that no delivered task names.
    missing: u64,
    /// Delivered tasks that name no created schedule.
    unexpected: u64,
    /// Deliveries received before the due instant.
    early: u64,
    first_delivery: Option<Instant>,
    last_delivery: Option<Instant>,
}

impl ReleaseCheck {
    fn new(created: &[String], deliveries: &[DeliveryRecord], due: Instant) -> Self {
        let created: HashSet<&str> = created.iter().map(String::as_str).collect();
        let mut tasks = HashSet::with_capacity(deliveries.len());
        let mut tasks_per_schedule: HashMap<&str, HashSet<&str>> = HashMap::new();
        let mut unexpected = 0;
        let mut early = 0;
        for delivery in deliveries {
            if !tasks.insert(delivery.task_id.as_str()) {
                continue;
            }
            if delivery.received < due {
                early += 1;
            }
            if created.contains(delivery.schedule_id.as_str()) {
                tasks_per_schedule
                    .entry(delivery.schedule_id.as_str())
                    .or_default()
                    .insert(delivery.task_id.as_str());
            } else {
                unexpected += 1;
            }
        }
        ReleaseCheck {
            distinct_tasks: tasks.len() as u64,
            duplicate_deliveries: (deliveries.len() - tasks.len()) as u64,
            released_twice: tasks_per_schedule
                .values()
                .filter(|tasks| tasks.len() > 1)
                .count() as u64,
            missing: (created.len() - tasks_per_schedule.len()) as u64,
            unexpected,
            early,
            first_delivery: deliveries.iter().map(|delivery| delivery.received).min(),
            last_delivery: deliveries.iter().map(|delivery| delivery.received).max(),
        }
    }

    /// Returns whether every created schedule arrived as exactly one task, once, and none
    /// early.
    fn is_exact(&self, count: u64) -> bool {
        self.distinct_tasks == count
            && self.duplicate_deliveries == 0
            && self.released_twice == 0
            && self.missing == 0
            && self.unexpected == 0
            && self.early == 0
    }
}

/// A run of ScheduleTask calls, all for the same queue and due time.
struct ScheduleSpec {
    queue: String,
    count: u64,
    concurrency: usize,
    connections: usize,
    due: Due,
    /// Keep the id of every schedule created.
    keep_ids: bool,
}

/// Counts and call latency of a run of ScheduleTask calls.
struct ScheduleResult {
    calls: u64,
    elapsed: Duration,
    call_latency: Histogram<u64>,
    /// Ids of the created schedules, when `ScheduleSpec::keep_ids` is set.
    ids: Vec<String>,
}

/// Creates `spec.count` one-shot schedules with `spec.concurrency` ScheduleTask calls in
/// flight, spread over `spec.connections` connections.
async fn schedule_tasks(
    url: &str,
    spec: &ScheduleSpec,
    payload: &Payload,
) -> Result<ScheduleResult> {
    let mut channels = Vec::with_capacity(spec.connections);
    for _ in 0..spec.connections {
        channels.push(load::connect(url).await?);
    }
    let request = ScheduleTaskRequest {
        task: Some(NewTask {
            queue: spec.queue.clone(),
            kind: TASK_KIND.to_string(),
            payload: payload.build(false),
            ..NewTask::default()
        }),
        due: Some(spec.due),
    };
    let claimed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut callers = JoinSet::new();
    for caller in 0..spec.concurrency {
        let mut client = SchedulerClient::new(channels[caller % channels.len()].clone());
        let claimed = Arc::clone(&claimed);
        let request = request.clone();
        let (total, keep_ids) = (spec.count, spec.keep_ids);
        callers.spawn(async move {
            let mut latency = new_histogram();
            let mut ids = Vec::new();
            let mut calls = 0u64;
            while claimed.fetch_add(1, Ordering::Relaxed) < total {
                let call_started = Instant::now();
                let response = client
                    .schedule_task(request.clone())
                    .await
                    .context("ScheduleTask failed")?
                    .into_inner();
                record(&mut latency, call_started.elapsed());
                let id = response.schedule.map(|schedule| schedule.id);
                let Some(id) = id.filter(|id| !id.is_empty()) else {
                    bail!("ScheduleTask returned no schedule id");
                };
                if keep_ids {
                    ids.push(id);
                }
                calls += 1;
            }
            anyhow::Ok((latency, calls, ids))
        });
    }

    let mut call_latency = new_histogram();
    let mut calls = 0;
    let mut ids = Vec::new();
    while let Some(joined) = callers.join_next().await {
        let (latency, caller_calls, caller_ids) = joined.context("caller task panicked")??;
        call_latency
            .add(&latency)
            .expect("histograms have equal bounds");
        calls += caller_calls;
        ids.extend(caller_ids);
    }
    Ok(ScheduleResult {
        calls,
        elapsed: started.elapsed(),
        call_latency,
        ids,
    })
}

async fn queue_stats(url: &str, queue: &str) -> Result<QueueStats> {
    let mut client = BrokerClient::new(load::connect(url).await?);
    let response = client
        .get_queue_stats(GetQueueStatsRequest {
            queue: queue.to_string(),
        })
        .await
        .with_context(|| format!("GetQueueStats of {queue} failed"))?
        .into_inner();
    Ok(response.stats.unwrap_or_default())
}

/// Tasks of the queue in any state.
fn task_total(stats: &QueueStats) -> u64 {
    stats.pending + stats.retry_wait + stats.leased + stats.dead + stats.succeeded + stats.cancelled
}

fn rss_mib(server: &SpawnedServer) -> Result<f64> {
    let pid = server.pid().context("the scheduler is not running")?;
    Ok(round2(spawn::resident_kib(pid)? as f64 / 1024.0))
}

fn peak_rss_mib(server: &SpawnedServer) -> Result<f64> {
    let pid = server.pid().context("the scheduler is not running")?;
    Ok(round2(spawn::peak_resident_kib(pid)? as f64 / 1024.0))
}

fn database_mib(server: &SpawnedServer) -> Result<f64> {
    let path = server.database_path();
    let metadata =
        std::fs::metadata(&path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(round2(metadata.len() as f64 / (1024.0 * 1024.0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(task_id: &str, schedule_id: &str, received: Instant) -> DeliveryRecord {
        DeliveryRecord {
            task_id: task_id.to_string(),
            schedule_id: schedule_id.to_string(),
            received,
        }
    }

    fn ids(values: &[&str]) -> Vec<String> {
        values.iter().map(|value| (*value).to_string()).collect()
    }

    #[test]
    fn release_check_exact() {
        let due = Instant::now();
        let later = due + Duration::from_millis(5);
        let deliveries = [delivery("t1", "s1", later), delivery("t2", "s2", later)];
        let check = ReleaseCheck::new(&ids(&["s1", "s2"]), &deliveries, due);
        assert!(check.is_exact(2));
        assert_eq!(check.distinct_tasks, 2);
        assert_eq!(check.first_delivery, Some(later));
    }

    #[test]
    fn release_check_counts_redelivery() {
        let due = Instant::now();
        let deliveries = [
            delivery("t1", "s1", due),
            delivery("t1", "s1", due),
            delivery("t2", "s2", due),
        ];
        let check = ReleaseCheck::new(&ids(&["s1", "s2"]), &deliveries, due);
        assert_eq!(check.duplicate_deliveries, 1);
        assert_eq!(check.distinct_tasks, 2);
        assert!(!check.is_exact(2));
    }

    #[test]
    fn release_check_counts_second_task() {
        let due = Instant::now();
        let deliveries = [delivery("t1", "s1", due), delivery("t2", "s1", due)];
        let check = ReleaseCheck::new(&ids(&["s1"]), &deliveries, due);
        assert_eq!(check.released_twice, 1);
        assert_eq!(check.missing, 0);
        assert!(!check.is_exact(1));
    }

    #[test]
    fn release_check_counts_missing_unexpected_early() {
        let due = Instant::now() + Duration::from_secs(1);
        let deliveries = [
            delivery("t1", "s1", due - Duration::from_millis(10)),
            delivery("t9", "other", due),
        ];
        let check = ReleaseCheck::new(&ids(&["s1", "s2"]), &deliveries, due);
        assert_eq!(check.missing, 1);
        assert_eq!(check.unexpected, 1);
        assert_eq!(check.early, 1);
        assert!(!check.is_exact(2));
    }
}
