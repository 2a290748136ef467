//! The operations of the Scheduler service on stored schedules: validation, and each
//! change as one write of the [`Writer`].

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use docket_broker::task::{Limits, NewTask as ValidTask};
use docket_proto::storage::{FireOutcomeRecord, Release, ScheduleRecord};
use docket_proto::v1::{self, ScheduleKind, ScheduleState};
use tokio::sync::Notify;
use uuid::Uuid;

use crate::error::SchedulerError;
use crate::rule::{self, Recurrence, now_nanos};
use crate::store::{Id, Store, Tables, Writer};

/// Maximum delay of a one-shot schedule.
pub const MAX_DELAY: Duration = Duration::from_secs(100 * 366 * 24 * 60 * 60);

/// Maximum length of a recurring schedule's name.
pub const MAX_NAME_LEN: usize = 128;

/// Number of schedules a page of ListSchedules holds when the request sets none.
pub const DEFAULT_PAGE_SIZE: usize = 100;

/// Largest page of ListSchedules.
pub const MAX_PAGE_SIZE: usize = 1000;

/// Largest number of fire times PreviewSchedule returns.
pub const MAX_PREVIEW: usize = 100;

/// The scheduler's state once its store is open.
pub struct Schedules {
    /// Reads.
    pub store: Arc<Store>,
    /// Writes.
    pub writer: Writer,
    /// Wakes the release loop when a schedule may have become due earlier.
    pub wake: Arc<Notify>,
    /// Limits that task templates must meet, as the broker checks them.
    pub limits: Limits,
    /// Time a one-shot schedule is kept after it fired, failed or was cancelled, in
    /// nanoseconds.
    pub retention: i64,
}

/// When a one-shot schedule is due.
pub enum Due {
    /// An absolute time.
    At(prost_types::Timestamp),
    /// A delay from now.
    In(prost_types::Duration),
}

impl Schedules {
    /// Stores a one-shot schedule for `task`.
    pub async fn schedule_task(
        &self,
        task: Option<v1::NewTask>,
        due: Option<Due>,
    ) -> Result<(Id, ScheduleRecord), SchedulerError> {
        let task = self.validate_task("task", task)?;
        let now = now_nanos();
        let due = match due {
            None => {
                return Err(SchedulerError::invalid(
                    "due",
                    "set due_time or delay to say when the task is released",
                ));
            }
            Some(Due::At(time)) => rule::timestamp_nanos("due_time", &time)?,
            Some(Due::In(delay)) => {
                let overflow = || {
                    SchedulerError::invalid(
                        "delay",
                        format!(
                            "delay of {} is out of range: use 0 to {} days",
                            rule::describe_duration(&delay),
                            MAX_DELAY.as_secs() / 86_400
                        ),
                    )
                };
                let delay = Duration::try_from(delay)
                    .ok()
                    .filter(|delay| *delay <= MAX_DELAY)
                    .ok_or_else(overflow)?;
                now.checked_add(delay.as_nanos() as i64)
                    .ok_or_else(overflow)?
            }
        };
        let id = Uuid::now_v7().as_u128();
        let record = ScheduleRecord {
            kind: ScheduleKind::OneShot.into(),
            state: ScheduleState::Active.into(),
            task: Some(task),
            due_nanos: due,
            next_fire_nanos: Some(due),
            create_nanos: now,
            update_nanos: now,
            ..Default::default()
        };
        let stored = record.clone();
        self.writer
            .run(move |tables| tables.put(id, &stored, None))
            .await?;
        self.wake.notify_one();
        Ok((id, record))
    }

    /// Cancels the one-shot schedule `id` before it fires.
    pub async fn cancel(
        &self,
        field: &str,
        id: &str,
    ) -> Result<(Id, ScheduleRecord), SchedulerError> {
        let id = parse_id(field, id)?;
        let retention = self.retention;
        self.writer
            .run(move |tables| {
                let previous = existing(tables, id)?;
                if previous.kind() != ScheduleKind::OneShot {
                    return Err(SchedulerError::FailedPrecondition(format!(
                        "schedule {} is the recurring schedule {:?}: delete it with DeleteSchedule",
                        Uuid::from_u128(id),
                        previous.name
                    )));
                }
                match previous.state() {
                    ScheduleState::Active if tables.release(id)?.is_some() => {
                        return Err(SchedulerError::FailedPrecondition(format!(
                            "schedule {} is being released into the broker and can no longer be cancelled",
                            Uuid::from_u128(id)
                        )));
                    }
                    ScheduleState::Active => {}
                    state => {
                        return Err(SchedulerError::FailedPrecondition(format!(
                            "schedule {} is already {}",
                            Uuid::from_u128(id),
                            state_name(state)
                        )));
                    }
                }
                let now = now_nanos();
                let mut record = previous.clone();
                record.set_state(ScheduleState::Cancelled);
                record.next_fire_nanos = None;
                record.update_nanos = now;
                record.revision += 1;
                record.expire_nanos = Some(now.saturating_add(retention));
                tables.put(id, &record, Some(&previous))?;
                Ok((id, record))
            })
            .await
    }

    /// Creates the recurring schedule `name`.
    pub async fn create(
        &self,
        name: String,
        recurrence: Option<v1::Recurrence>,
        task: Option<v1::NewTask>,
        paused: bool,
    ) -> Result<(Id, ScheduleRecord), SchedulerError> {
        validate_name("name", &name)?;
        let now = now_nanos();
        let wire = recurrence
            .ok_or_else(|| SchedulerError::invalid("recurrence", "the recurrence is required"))?;
        let (recurrence, stored_rule) = Recurrence::from_request("recurrence", &wire, now)?;
        let task = self.validate_task("task", task)?;
        let mut record = ScheduleRecord {
            name,
            kind: ScheduleKind::Recurring.into(),
            task: Some(task),
            recurrence: Some(stored_rule),
            create_nanos: now,
            update_nanos: now,
            ..Default::default()
        };
        set_running(&mut record, &recurrence, !paused, now);
        let id = Uuid::now_v7().as_u128();
        let stored = record.clone();
        self.writer
            .run(move |tables| {
                if tables.id_of(&stored.name)?.is_some() {
                    return Err(SchedulerError::AlreadyExists(stored.name.clone()));
                }
                tables.put(id, &stored, None)
            })
            .await?;
        self.wake.notify_one();
        Ok((id, record))
    }

    /// Replaces the rule or the task template of the recurring schedule `name`.
    pub async fn update(
        &self,
        name: String,
        recurrence: Option<v1::Recurrence>,
        task: Option<v1::NewTask>,
    ) -> Result<(Id, ScheduleRecord), SchedulerError> {
        validate_name("name", &name)?;
        let now = now_nanos();
        let recurrence = recurrence
            .map(|wire| Recurrence::from_request("recurrence", &wire, now))
            .transpose()?;
        let task = task
            .map(|task| self.validate_task("task", Some(task)))
            .transpose()?;
        let result = self
            .change_recurring(name, move |record| {
                if let Some(task) = task {
                    record.task = Some(task);
                }
                if let Some((recurrence, stored)) = recurrence {
                    record.recurrence = Some(stored);
                    let running = record.state() != ScheduleState::Paused;
                    set_running(record, &recurrence, running, now);
                }
                Ok(())
            })
            .await?;
        self.wake.notify_one();
        Ok(result)
    }

    /// Pauses the recurring schedule `name`.
    pub async fn pause(&self, name: String) -> Result<(Id, ScheduleRecord), SchedulerError> {
        validate_name("name", &name)?;
        self.change_recurring(name, |record| {
            if record.state() == ScheduleState::Active {
                record.set_state(ScheduleState::Paused);
                record.next_fire_nanos = None;
            }
            Ok(())
        })
        .await
    }

    /// Resumes the recurring schedule `name` from the next fire time after now.
    pub async fn resume(&self, name: String) -> Result<(Id, ScheduleRecord), SchedulerError> {
        validate_name("name", &name)?;
        let now = now_nanos();
        let result = self
            .change_recurring(name, move |record| {
                if record.state() == ScheduleState::Paused {
                    let recurrence = stored_recurrence(record)?;
                    set_running(record, &recurrence, true, now);
                }
                Ok(())
            })
            .await?;
        self.wake.notify_one();
        Ok(result)
    }

    /// Deletes the recurring schedule `name`.
    pub async fn delete(&self, name: String) -> Result<(), SchedulerError> {
        validate_name("name", &name)?;
        self.writer
            .run(move |tables| {
                let id = tables
                    .id_of(&name)?
                    .ok_or_else(|| SchedulerError::NotFound(format!("schedule named {name:?}")))?;
                let record = existing(tables, id)?;
                tables.delete(id, &record)
            })
            .await
    }

    /// Applies `change` to the recurring schedule `name` and stores it with a new revision.
    async fn change_recurring(
        &self,
        name: String,
        change: impl FnOnce(&mut ScheduleRecord) -> Result<(), SchedulerError> + Send + 'static,
    ) -> Result<(Id, ScheduleRecord), SchedulerError> {
        self.writer
            .run(move |tables| {
                let id = tables
                    .id_of(&name)?
                    .ok_or_else(|| SchedulerError::NotFound(format!("schedule named {name:?}")))?;
                let previous = existing(tables, id)?;
                let mut record = previous.clone();
                change(&mut record)?;
                record.update_nanos = now_nanos();
                record.revision += 1;
                tables.put(id, &record, Some(&previous))?;
                Ok((id, record))
            })
            .await
    }

    /// Returns the schedule with id `id`.
    pub fn get_by_id(&self, field: &str, id: &str) -> Result<(Id, ScheduleRecord), SchedulerError> {
        let key = parse_id(field, id)?;
        match self.store.get(key)? {
            Some(record) => Ok((key, record)),
            None => Err(SchedulerError::NotFound(format!("schedule {id:?}"))),
        }
    }

    /// Returns the recurring schedule named `name`.
    pub fn get_by_name(
        &self,
        field: &str,
        name: &str,
    ) -> Result<(Id, ScheduleRecord), SchedulerError> {
        validate_name(field, name)?;
        let found = match self.store.id_of(name)? {
            Some(id) => self.store.get(id)?.map(|record| (id, record)),
            None => None,
        };
        found.ok_or_else(|| SchedulerError::NotFound(format!("schedule named {name:?}")))
    }

    /// Returns one page of schedules of `kind` and the token of the next page.
    pub fn list(
        &self,
        kind: ScheduleKind,
        page_size: u32,
        token: &str,
    ) -> Result<(Vec<(Id, ScheduleRecord)>, String), SchedulerError> {
        let limit = match page_size as usize {
            0 => DEFAULT_PAGE_SIZE,
            size if size <= MAX_PAGE_SIZE => size,
            size => {
                return Err(SchedulerError::invalid(
                    "page_size",
                    format!("page size {size} exceeds the limit of {MAX_PAGE_SIZE}"),
                ));
            }
        };
        let position = PageToken::parse(token)?;
        let mut page = Vec::new();
        if kind != ScheduleKind::OneShot {
            if let PageToken::Start | PageToken::AfterName(_) = &position {
                let after = match &position {
                    PageToken::AfterName(name) => Some(name.as_str()),
                    _ => None,
                };
                page = self.store.recurring_after(after, limit + 1)?;
                if page.len() > limit {
                    page.truncate(limit);
                    let last = &page[limit - 1].1.name;
                    return Ok((page.clone(), format!("name:{last}")));
                }
            }
            if kind == ScheduleKind::Recurring {
                return Ok((page, String::new()));
            }
        }
        let after = match position {
            PageToken::AfterId(id) => Some(id),
            _ => None,
        };
        let room = limit - page.len();
        let mut one_shot = self.store.one_shot_after(after, room + 1)?;
        let mut next = String::new();
        if one_shot.len() > room {
            one_shot.truncate(room);
            let last = one_shot.last().map(|(id, _)| *id).or(after);
            next = match last {
                Some(id) => format!("id:{}", Uuid::from_u128(id)),
                // The page is full of recurring schedules; one-shot ones follow.
                None => "id:".to_string(),
            };
        }
        page.extend(one_shot);
        Ok((page, next))
    }

    /// Returns up to `count` fire times of `recurrence` after `after`.
    pub fn preview(
        &self,
        recurrence: Option<v1::Recurrence>,
        after: Option<prost_types::Timestamp>,
        count: u32,
    ) -> Result<Vec<i64>, SchedulerError> {
        let now = now_nanos();
        let after = match after {
            Some(time) => rule::timestamp_nanos("after", &time)?,
            None => now,
        };
        let count = match count as usize {
            0 => 10,
            count if count <= MAX_PREVIEW => count,
            count => {
                return Err(SchedulerError::invalid(
                    "count",
                    format!("count {count} exceeds the limit of {MAX_PREVIEW}"),
                ));
            }
        };
        let wire = recurrence
            .ok_or_else(|| SchedulerError::invalid("recurrence", "the recurrence is required"))?;
        let (recurrence, _) = Recurrence::from_request("recurrence", &wire, after)?;
        let mut times = Vec::with_capacity(count);
        let mut time = after;
        while times.len() < count {
            match recurrence.rule.next_after(time) {
                Some(next) => {
                    times.push(next);
                    time = next;
                }
                None => break,
            }
        }
        Ok(times)
    }

    /// Validates a task template: as the broker's Enqueue does, and without an
    /// idempotency key, which the scheduler sets for each firing.
    fn validate_task(
        &self,
        field: &str,
        task: Option<v1::NewTask>,
    ) -> Result<v1::NewTask, SchedulerError> {
        let task = task.ok_or_else(|| SchedulerError::invalid(field, "the task is required"))?;
        if !task.idempotency_key.is_empty() {
            return Err(SchedulerError::invalid(
                format!("{field}.idempotency_key"),
                format!(
                    "idempotency key {:?} is not allowed: the scheduler sets the key of each firing",
                    task.idempotency_key
                ),
            ));
        }
        ValidTask::validate_at(field, task.clone(), &self.limits).map_err(|err| match err {
            docket_broker::error::BrokerError::InvalidArgument { field, message } => {
                SchedulerError::InvalidArgument { field, message }
            }
            other => SchedulerError::invalid(field, other.to_string()),
        })?;
        Ok(task)
    }
}

/// Sets the state and next fire time of a recurring schedule that starts or resumes at
/// `now`, or is paused.
fn set_running(record: &mut ScheduleRecord, recurrence: &Recurrence, running: bool, now: i64) {
    if !running {
        record.set_state(ScheduleState::Paused);
        record.next_fire_nanos = None;
        return;
    }
    record.next_fire_nanos = recurrence.rule.next_after(now);
    let state = match record.next_fire_nanos {
        Some(_) => ScheduleState::Active,
        None => ScheduleState::Finished,
    };
    record.set_state(state);
}

/// Parses the recurrence that `record` stores.
pub fn stored_recurrence(record: &ScheduleRecord) -> Result<Recurrence, SchedulerError> {
    let wire = record
        .recurrence
        .as_ref()
        .ok_or_else(|| SchedulerError::Corrupt("recurring schedule without a rule".into()))?;
    Recurrence::from_stored(wire)
}

fn existing(tables: &Tables<'_>, id: Id) -> Result<ScheduleRecord, SchedulerError> {
    tables
        .get(id)?
        .ok_or_else(|| SchedulerError::NotFound(format!("schedule \"{}\"", Uuid::from_u128(id))))
}

/// Parses a schedule id from request field `field`.
pub fn parse_id(field: &str, text: &str) -> Result<Id, SchedulerError> {
    Uuid::try_parse(text).map(|id| id.as_u128()).map_err(|_| {
        SchedulerError::invalid(
            field,
            format!("invalid schedule id {text:?}: expected a UUID such as the one ScheduleTask returned"),
        )
    })
}

/// Validates the name of a recurring schedule in request field `field`.
pub fn validate_name(field: &str, name: &str) -> Result<(), SchedulerError> {
    let valid_chars = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if name.is_empty() || name.len() > MAX_NAME_LEN || !valid_chars {
        return Err(SchedulerError::invalid(
            field,
            format!(
                "invalid schedule name {name:?}: use 1 to {MAX_NAME_LEN} characters of A-Z, a-z, 0-9, '.', '_' and '-'"
            ),
        ));
    }
    Ok(())
}

/// The position a page of ListSchedules starts after.
enum PageToken {
    Start,
    AfterName(String),
    AfterId(Id),
}

impl PageToken {
    fn parse(token: &str) -> Result<Self, SchedulerError> {
        if token.is_empty() {
            return Ok(PageToken::Start);
        }
        if let Some(name) = token.strip_prefix("name:") {
            return Ok(PageToken::AfterName(name.to_string()));
        }
        match token.strip_prefix("id:") {
            Some("") => Ok(PageToken::AfterId(0)),
            Some(id) => Ok(PageToken::AfterId(parse_id("page_token", id)?)),
            None => Err(SchedulerError::invalid(
                "page_token",
                format!(
                    "invalid page token {token:?}: pass the next_page_token of the previous page"
                ),
            )),
        }
    }
}

/// Returns the wire name of a schedule state, for messages.
pub fn state_name(state: ScheduleState) -> &'static str {
    match state {
        ScheduleState::Unspecified => "in an unknown state",
        ScheduleState::Active => "active",
        ScheduleState::Paused => "paused",
        ScheduleState::Fired => "fired",
        ScheduleState::Cancelled => "cancelled",
        ScheduleState::Failed => "failed",
        ScheduleState::Finished => "finished",
    }
}

/// One schedule claimed for release: the fire times to enqueue, committed before any
/// enqueue so that a restart repeats them exactly.
#[derive(Debug, Clone)]
pub struct Claimed {
    /// The schedule.
    pub id: Id,
    /// The schedule's entry in the due index: the next fire time it was claimed at.
    pub due: i64,
    /// Its name, empty for a one-shot schedule.
    pub name: String,
    /// The task template.
    pub task: v1::NewTask,
    /// The planned release.
    pub release: Release,
}

/// A claimed release whose tasks were enqueued, with the outcome of each fire time.
pub type Finished = (Claimed, Vec<FireOutcomeRecord>);

/// The result of one [`cycle`].
pub struct Cycle {
    /// The schedules claimed for release.
    pub claimed: Vec<Claimed>,
    /// The earliest next fire time of any active schedule after the cycle.
    pub earliest_due: Option<i64>,
}

/// Runs one step of the release loop in a single transaction: records the releases of
/// `finished`, then claims up to `limit` schedules that are due at `now`, other than those
/// of `in_flight`, whose tasks are being enqueued.
pub fn cycle(
    tables: &mut Tables<'_>,
    finished: &[Finished],
    in_flight: &HashSet<Id>,
    now: i64,
    threshold: i64,
    limit: usize,
    retention: i64,
) -> Result<Cycle, SchedulerError> {
    for (claimed, outcomes) in finished {
        record(tables, claimed, outcomes, retention)?;
    }
    let mut due = tables.due(now, limit + in_flight.len())?;
    due.retain(|(_, id)| !in_flight.contains(id));
    due.truncate(limit);
    let claimed = claim(tables, &due, now, threshold)?;
    Ok(Cycle {
        claimed,
        earliest_due: tables.earliest_due()?,
    })
}

/// Claims the schedules of the due-index entries `due` that are due at `now`: plans each
/// one's release under its missed-run policy and stores the plan. A schedule that already
/// has a stored plan of its current revision, from a run that stopped before recording it,
/// keeps that plan.
pub fn claim(
    tables: &mut Tables<'_>,
    due: &[(i64, Id)],
    now: i64,
    threshold: i64,
) -> Result<Vec<Claimed>, SchedulerError> {
    let mut claimed = Vec::with_capacity(due.len());
    for &(time, id) in due {
        let previous = tables.get(id)?;
        let Some(previous) = previous.filter(|record| {
            record.state() == ScheduleState::Active && record.next_fire_nanos == Some(time)
        }) else {
            // The index contains exactly the active schedules by next fire time, so this
            // entry is stale. Left in place, it would be found due on every pass.
            tracing::warn!(
                schedule_id = %Uuid::from_u128(id),
                "removing a due-index entry that matches no active schedule"
            );
            tables.remove_due(time, id)?;
            continue;
        };
        let release = match tables.release(id)? {
            Some(release) if release.revision == previous.revision => release,
            _ => {
                let release = plan_release(&previous, time, now, threshold)?;
                tables.put_release(id, &release)?;
                release
            }
        };
        claimed.push(Claimed {
            id,
            due: time,
            name: previous.name,
            task: previous.task.unwrap_or_default(),
            release,
        });
    }
    Ok(claimed)
}

/// Plans the release of `record`, whose next fire time `due` has come, at `now`.
fn plan_release(
    record: &ScheduleRecord,
    due: i64,
    now: i64,
    threshold: i64,
) -> Result<Release, SchedulerError> {
    if record.kind() != ScheduleKind::Recurring {
        return Ok(Release {
            fire_nanos: vec![due],
            next_fire_nanos: None,
            skipped: 0,
            revision: record.revision,
        });
    }
    let recurrence = stored_recurrence(record)?;
    let plan = rule::plan(&recurrence, due, now, threshold);
    Ok(Release {
        fire_nanos: plan.fire,
        next_fire_nanos: plan.next,
        skipped: plan.skipped,
        revision: record.revision,
    })
}

/// Records the outcome of a claimed release: the firings, the skipped runs, and the next
/// fire time, unless a client changed the schedule since it was claimed. A release that
/// is no longer stored, because it was recorded already or its schedule was deleted, is
/// left alone.
pub fn record(
    tables: &mut Tables<'_>,
    claimed: &Claimed,
    outcomes: &[FireOutcomeRecord],
    retention: i64,
) -> Result<(), SchedulerError> {
    if tables.release(claimed.id)?.as_ref() != Some(&claimed.release) {
        return Ok(());
    }
    tables.remove_release(claimed.id)?;
    let Some(previous) = tables.get(claimed.id)? else {
        return Ok(());
    };
    let now = now_nanos();
    let mut record = previous.clone();
    record.fire_count += outcomes
        .iter()
        .filter(|outcome| outcome.error.is_empty())
        .count() as u64;
    record.skipped_count += claimed.release.skipped;
    if let Some(last) = outcomes.last() {
        record.last_fire_nanos = Some(last.fire_nanos);
        record.last_outcome = Some(last.clone());
    }
    if record.revision == claimed.release.revision {
        record.next_fire_nanos = claimed.release.next_fire_nanos;
        match record.kind() {
            ScheduleKind::Recurring => {
                if record.next_fire_nanos.is_none() {
                    record.set_state(ScheduleState::Finished);
                }
            }
            _ => {
                let rejected = outcomes.iter().any(|outcome| !outcome.error.is_empty());
                record.set_state(if rejected {
                    ScheduleState::Failed
                } else {
                    ScheduleState::Fired
                });
                record.expire_nanos = Some(now.saturating_add(retention));
            }
        }
    }
    record.update_nanos = now;
    tables.put(claimed.id, &record, Some(&previous))
}

#[cfg(test)]
mod tests;
