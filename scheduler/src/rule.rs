//! Fire times of recurring schedules, and what one firing releases under a schedule's
//! missed-run policy.
//!
//! Times are Unix nanoseconds in an `i64`, which covers the years 1678 to 2262. A rule has
//! no fire time beyond that range.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds};
use docket_proto::v1::{self, recurrence};

use crate::error::SchedulerError;

/// Nanoseconds in one second.
pub const NANOS_PER_SECOND: i64 = 1_000_000_000;

/// Shortest interval of an interval rule.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);

/// Maximum interval of an interval rule.
pub const MAX_INTERVAL: Duration = Duration::from_secs(366 * 24 * 60 * 60);

/// `max_missed_runs` when a RUN_ALL policy leaves it at 0.
pub const DEFAULT_MAX_MISSED_RUNS: u32 = 10;

/// Largest `max_missed_runs` a schedule may ask for.
pub const MAX_MISSED_RUNS_LIMIT: u32 = 1000;

/// Missed fire times of a cron rule are counted one by one for the schedule's skipped
/// count, up to this many per firing. An interval rule's are computed exactly.
const MAX_COUNTED_MISSES: u64 = 1_000_000;

/// When a recurring schedule fires.
#[derive(Debug, Clone)]
pub enum Rule {
    /// A cron expression evaluated in a time zone.
    Cron {
        /// The parsed expression.
        cron: Box<Cron>,
        /// The time zone of its wall-clock fields.
        zone: Tz,
    },
    /// `start`, `start + every`, and so on.
    Interval {
        /// Time between fire times, in nanoseconds, at least one second.
        every: i64,
        /// The first fire time.
        start: i64,
    },
}

/// The policy for fire times missed by more than the misfire threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MissedRuns {
    /// Release nothing for them.
    Skip,
    /// Release one task, for the latest of them.
    RunOnce,
    /// Release one task for each, oldest first, at most this many.
    RunAll(u32),
}

/// A parsed recurrence: the rule and its missed-run policy.
#[derive(Debug, Clone)]
pub struct Recurrence {
    /// When the schedule fires.
    pub rule: Rule,
    /// The policy for missed fire times.
    pub missed_runs: MissedRuns,
}

impl Recurrence {
    /// Validates a recurrence from a request, found at the field path `field`. An interval
    /// rule without a start time starts at `now` plus its interval.
    ///
    /// Returns the parsed recurrence and the wire form to store, with the start time filled
    /// in so that the interval keeps its phase across restarts.
    pub fn from_request(
        field: &str,
        wire: &v1::Recurrence,
        now: i64,
    ) -> Result<(Self, v1::Recurrence), SchedulerError> {
        let mut stored = wire.clone();
        let rule = match &wire.rule {
            None => {
                return Err(SchedulerError::invalid(
                    field,
                    "set exactly one rule: cron or interval",
                ));
            }
            Some(recurrence::Rule::Cron(cron)) => parse_cron(&format!("{field}.cron"), cron)?,
            Some(recurrence::Rule::Interval(interval)) => {
                let field = format!("{field}.interval");
                let every = parse_interval(&format!("{field}.every"), interval.every.as_ref())?;
                let start = match &interval.start_time {
                    Some(start) => timestamp_nanos(&format!("{field}.start_time"), start)?,
                    None => now.checked_add(every).ok_or_else(|| {
                        SchedulerError::invalid(&field, "the first fire time is out of range")
                    })?,
                };
                if let Some(recurrence::Rule::Interval(stored)) = &mut stored.rule {
                    stored.start_time = Some(nanos_timestamp(start));
                }
                Rule::Interval { every, start }
            }
        };
        let missed_runs = parse_missed_runs(field, wire)?;
        Ok((Recurrence { rule, missed_runs }, stored))
    }

    /// Parses a recurrence that the scheduler stored after validating it.
    pub fn from_stored(stored: &v1::Recurrence) -> Result<Self, SchedulerError> {
        // A stored interval rule always has its start time, so `now` is not used.
        Self::from_request("recurrence", stored, 0)
            .map(|(recurrence, _)| recurrence)
            .map_err(|err| SchedulerError::Corrupt(format!("stored recurrence: {err}")))
    }
}

fn parse_cron(field: &str, wire: &v1::CronRule) -> Result<Rule, SchedulerError> {
    let expression = wire.expression.trim();
    let cron = CronParser::builder()
        .seconds(Seconds::Required)
        .build()
        .parse(expression)
        .map_err(|err| {
            SchedulerError::invalid(
                format!("{field}.expression"),
                format!(
                    "invalid cron expression {:?}: {}. Use six fields, \
                     \"second minute hour day-of-month month day-of-week\", such as \
                     \"0 */5 * * * *\", and optionally a year",
                    wire.expression,
                    err.to_string().trim_end_matches('.')
                ),
            )
        })?;
    let zone = match wire.time_zone.as_str() {
        "" => Tz::UTC,
        name => Tz::from_str(name).map_err(|_| {
            SchedulerError::invalid(
                format!("{field}.time_zone"),
                format!(
                    "unknown time zone {name:?}: use an IANA time zone name such as \
                     \"Europe/Berlin\", or leave it empty for UTC"
                ),
            )
        })?,
    };
    Ok(Rule::Cron {
        cron: Box::new(cron),
        zone,
    })
}

fn parse_interval(
    field: &str,
    every: Option<&prost_types::Duration>,
) -> Result<i64, SchedulerError> {
    let Some(every) = every else {
        return Err(SchedulerError::invalid(field, "the interval is required"));
    };
    let valid = Duration::try_from(*every)
        .ok()
        .filter(|every| (MIN_INTERVAL..=MAX_INTERVAL).contains(every));
    match valid {
        Some(every) => Ok(every.as_nanos() as i64),
        None => Err(SchedulerError::invalid(
            field,
            format!(
                "interval of {} is out of range: use 1 second to 366 days",
                describe_duration(every)
            ),
        )),
    }
}

fn parse_missed_runs(field: &str, wire: &v1::Recurrence) -> Result<MissedRuns, SchedulerError> {
    let policy = v1::MissedRunPolicy::try_from(wire.missed_runs).map_err(|_| {
        SchedulerError::invalid(
            format!("{field}.missed_runs"),
            format!("unknown missed-run policy {}", wire.missed_runs),
        )
    })?;
    if wire.max_missed_runs > MAX_MISSED_RUNS_LIMIT {
        return Err(SchedulerError::invalid(
            format!("{field}.max_missed_runs"),
            format!(
                "max_missed_runs {} exceeds the limit of {MAX_MISSED_RUNS_LIMIT}",
                wire.max_missed_runs
            ),
        ));
    }
    match policy {
        v1::MissedRunPolicy::Unspecified | v1::MissedRunPolicy::Skip => Ok(MissedRuns::Skip),
        v1::MissedRunPolicy::RunOnce => Ok(MissedRuns::RunOnce),
        v1::MissedRunPolicy::RunAll => match wire.max_missed_runs {
            0 => Ok(MissedRuns::RunAll(DEFAULT_MAX_MISSED_RUNS)),
            n => Ok(MissedRuns::RunAll(n)),
        },
    }
}

/// Formats a protobuf duration for a message, such as `500ms`, or as seconds and
/// nanoseconds when it is negative or malformed.
pub fn describe_duration(duration: &prost_types::Duration) -> String {
    match Duration::try_from(*duration) {
        Ok(duration) => humantime::format_duration(duration).to_string(),
        Err(_) => format!("{}s and {}ns", duration.seconds, duration.nanos),
    }
}

impl Rule {
    /// Returns the first fire time strictly after `after`, or `None` if the rule has no
    /// further fire time within the supported range.
    pub fn next_after(&self, after: i64) -> Option<i64> {
        match self {
            Rule::Interval { every, start } => {
                if after < *start {
                    return Some(*start);
                }
                let steps = (after - start) / every + 1;
                steps.checked_mul(*every)?.checked_add(*start)
            }
            Rule::Cron { cron, zone } => {
                let after = DateTime::<Utc>::from_timestamp_nanos(after).with_timezone(zone);
                let next = cron.find_next_occurrence(&after, false).ok()?;
                next.timestamp_nanos_opt()
            }
        }
    }

    /// Returns the last fire time strictly before `before`, if it is not before `from`.
    fn last_before(&self, from: i64, before: i64) -> Option<i64> {
        let last = match self {
            Rule::Interval { every, start } => {
                if before <= *start {
                    return None;
                }
                start + (before - 1 - start) / every * every
            }
            Rule::Cron { cron, zone } => {
                let before = DateTime::<Utc>::from_timestamp_nanos(before).with_timezone(zone);
                cron.find_previous_occurrence(&before, false)
                    .ok()?
                    .timestamp_nanos_opt()?
            }
        };
        (last >= from).then_some(last)
    }

    /// Returns how many fire times lie in `from..before`, where `from` is a fire time.
    /// A cron rule's count stops at `MAX_COUNTED_MISSES`.
    fn count_between(&self, from: i64, before: i64) -> u64 {
        if before <= from {
            return 0;
        }
        match self {
            Rule::Interval { every, .. } => ((before - 1 - from) / every + 1) as u64,
            Rule::Cron { .. } => {
                let mut count = 1;
                let mut time = from;
                while count < MAX_COUNTED_MISSES {
                    match self.next_after(time) {
                        Some(next) if next < before => {
                            count += 1;
                            time = next;
                        }
                        _ => break,
                    }
                }
                count
            }
        }
    }
}

/// The plan of one firing: the fire times it releases, and the schedule's next fire time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Fire times to release a task for, oldest first.
    pub fire: Vec<i64>,
    /// The next fire time after this firing, or `None` if there is none.
    pub next: Option<i64>,
    /// Missed fire times that this firing skips.
    pub skipped: u64,
}

/// Plans the firing of a recurring schedule whose next fire time `due` has come, at time
/// `now`. Fire times earlier than `now - threshold` are missed and follow the policy. The
/// first fire time after them becomes the next one, even if it is already due.
pub fn plan(recurrence: &Recurrence, due: i64, now: i64, threshold: i64) -> Plan {
    let rule = &recurrence.rule;
    let cutoff = now.saturating_sub(threshold);
    if due >= cutoff {
        return Plan {
            fire: vec![due],
            next: rule.next_after(due),
            skipped: 0,
        };
    }
    let missed = rule.count_between(due, cutoff);
    let next = rule.next_after(cutoff.saturating_sub(1).max(due));
    match recurrence.missed_runs {
        MissedRuns::Skip => Plan {
            fire: Vec::new(),
            next,
            skipped: missed,
        },
        MissedRuns::RunOnce => Plan {
            fire: vec![rule.last_before(due, cutoff).unwrap_or(due)],
            next,
            skipped: missed.saturating_sub(1),
        },
        MissedRuns::RunAll(limit) => {
            let mut fire = vec![due];
            while fire.len() < limit as usize {
                match rule.next_after(*fire.last().expect("fire starts with due")) {
                    Some(time) if time < cutoff => fire.push(time),
                    _ => break,
                }
            }
            Plan {
                skipped: missed.saturating_sub(fire.len() as u64),
                fire,
                next,
            }
        }
    }
}

/// Converts a protobuf timestamp at `field` to Unix nanoseconds, rejecting one outside
/// the years 1678 to 2262 or with nanoseconds out of range.
pub fn timestamp_nanos(
    field: &str,
    timestamp: &prost_types::Timestamp,
) -> Result<i64, SchedulerError> {
    let nanos = u32::try_from(timestamp.nanos)
        .ok()
        .filter(|nanos| *nanos < NANOS_PER_SECOND as u32)
        .and_then(|nanos| DateTime::<Utc>::from_timestamp(timestamp.seconds, nanos))
        .and_then(|time| time.timestamp_nanos_opt());
    nanos.ok_or_else(|| {
        SchedulerError::invalid(
            field,
            format!(
                "time of {}s and {}ns since the Unix epoch is out of range: use a time \
                 between the years 1678 and 2262 with 0 to 999999999 nanoseconds",
                timestamp.seconds, timestamp.nanos
            ),
        )
    })
}

/// Converts Unix nanoseconds to a protobuf timestamp.
pub fn nanos_timestamp(nanos: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: nanos.div_euclid(NANOS_PER_SECOND),
        nanos: nanos.rem_euclid(NANOS_PER_SECOND) as i32,
    }
}

/// Formats Unix nanoseconds as RFC 3339 in UTC, with fractional seconds only when they
/// are not zero, such as `2027-03-28T01:00:00Z`.
pub fn rfc3339(nanos: i64) -> String {
    DateTime::<Utc>::from_timestamp_nanos(nanos)
        .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

/// Returns the current time in Unix nanoseconds.
pub fn now_nanos() -> i64 {
    Utc::now().timestamp_nanos_opt().unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests;
