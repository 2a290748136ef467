use chrono::TimeZone;

use super::*;

fn utc(text: &str) -> i64 {
    DateTime::parse_from_rfc3339(text)
        .expect("valid RFC 3339 time")
        .timestamp_nanos_opt()
        .expect("time within range")
}

fn cron(expression: &str, time_zone: &str) -> Recurrence {
    cron_with(expression, time_zone, v1::MissedRunPolicy::Skip, 0)
}

fn cron_with(
    expression: &str,
    time_zone: &str,
    policy: v1::MissedRunPolicy,
    max_missed_runs: u32,
) -> Recurrence {
    let wire = v1::Recurrence {
        rule: Some(recurrence::Rule::Cron(v1::CronRule {
            expression: expression.to_string(),
            time_zone: time_zone.to_string(),
        })),
        missed_runs: policy.into(),
        max_missed_runs,
    };
    Recurrence::from_request("recurrence", &wire, 0)
        .expect("valid recurrence")
        .0
}

fn interval(every_secs: i64, start: i64, policy: v1::MissedRunPolicy, max: u32) -> Recurrence {
    let wire = v1::Recurrence {
        rule: Some(recurrence::Rule::Interval(v1::IntervalRule {
            every: Some(prost_types::Duration {
                seconds: every_secs,
                nanos: 0,
            }),
            start_time: Some(nanos_timestamp(start)),
        })),
        missed_runs: policy.into(),
        max_missed_runs: max,
    };
    Recurrence::from_request("recurrence", &wire, 0)
        .expect("valid recurrence")
        .0
}

/// Returns the fire times of `recurrence` after `from` and before `until`.
fn fire_times(recurrence: &Recurrence, from: &str, until: &str) -> Vec<String> {
    let until = utc(until);
    let mut times = Vec::new();
    let mut time = utc(from);
    while let Some(next) = recurrence.rule.next_after(time) {
        if next >= until {
            break;
        }
        times.push(rfc3339(next));
        time = next;
    }
    times
}

#[test]
fn spring_gap_fires_once_after() {
    // On 2027-03-28 Berlin's clocks jump from 02:00 CET to 03:00 CEST, so 02:30 does not
    // exist; the job runs once, at 03:00 CEST.
    let rule = cron("0 30 2 * * *", "Europe/Berlin");
    assert_eq!(
        fire_times(&rule, "2027-03-26T12:00:00Z", "2027-03-30T12:00:00Z"),
        [
            "2027-03-27T01:30:00Z",
            "2027-03-28T01:00:00Z",
            "2027-03-29T00:30:00Z",
            "2027-03-30T00:30:00Z",
        ]
    );
}

#[test]
fn autumn_overlap_fires_once() {
    // On 2027-10-31 Berlin's clocks go back from 03:00 CEST to 02:00 CET, so 02:30 happens
    // twice; the job runs at the first, 00:30 UTC.
    let rule = cron("0 30 2 * * *", "Europe/Berlin");
    assert_eq!(
        fire_times(&rule, "2027-10-29T12:00:00Z", "2027-11-01T12:00:00Z"),
        [
            "2027-10-30T00:30:00Z",
            "2027-10-31T00:30:00Z",
            "2027-11-01T01:30:00Z",
        ]
    );
}

#[test]
fn new_york_changes_fire_once_each() {
    let rule = cron("0 30 2 * * *", "America/New_York");
    // 2027-03-14: 02:00 EST jumps to 03:00 EDT.
    assert_eq!(
        fire_times(&rule, "2027-03-13T12:00:00Z", "2027-03-15T12:00:00Z"),
        ["2027-03-14T07:00:00Z", "2027-03-15T06:30:00Z"]
    );
    // 2027-11-07: 02:00 EDT goes back to 01:00 EST; 02:30 happens once, in EST.
    assert_eq!(
        fire_times(&rule, "2027-11-06T12:00:00Z", "2027-11-08T12:00:00Z"),
        ["2027-11-07T07:30:00Z", "2027-11-08T07:30:00Z"]
    );
}

#[test]
fn hourly_rule_fires_both_passes() {
    let rule = cron("0 0 * * * *", "Europe/Berlin");
    let times = fire_times(&rule, "2027-10-30T22:30:00Z", "2027-10-31T03:30:00Z");
    // 00:00 CEST .. 02:00 CEST, then 02:00 CET again, then 03:00 and 04:00 CET: one fire
    // per real hour.
    assert_eq!(
        times,
        [
            "2027-10-30T23:00:00Z",
            "2027-10-31T00:00:00Z",
            "2027-10-31T01:00:00Z",
            "2027-10-31T02:00:00Z",
            "2027-10-31T03:00:00Z",
        ]
    );
}

#[test]
fn fire_times_follow_the_time_zone() {
    let rule = cron("0 0 2 * * *", "Europe/Berlin");
    let after = chrono_tz::Europe::Berlin
        .with_ymd_and_hms(2027, 1, 10, 12, 0, 0)
        .unwrap()
        .timestamp_nanos_opt()
        .unwrap();
    assert_eq!(
        rule.rule.next_after(after).map(rfc3339).as_deref(),
        Some("2027-01-11T01:00:00Z")
    );
}

#[test]
fn next_after_strict_whole_seconds() {
    let rule = cron("* * * * * *", "");
    let whole = utc("2027-05-01T10:00:00Z");
    assert_eq!(rule.rule.next_after(whole), Some(whole + NANOS_PER_SECOND));
    assert_eq!(
        rule.rule.next_after(whole + NANOS_PER_SECOND / 2),
        Some(whole + NANOS_PER_SECOND)
    );
    assert_eq!(
        rule.rule.next_after(whole - 1),
        Some(whole),
        "a fire time one nanosecond after `after` is found"
    );
}

#[test]
fn interval_fire_times_keep_their_phase() {
    let start = utc("2027-05-01T10:00:00Z");
    let rule = interval(60, start, v1::MissedRunPolicy::Skip, 0);
    assert_eq!(rule.rule.next_after(start - 1), Some(start));
    assert_eq!(
        rule.rule.next_after(start),
        Some(start + 60 * NANOS_PER_SECOND)
    );
    assert_eq!(
        rule.rule.next_after(start + 61 * NANOS_PER_SECOND),
        Some(start + 120 * NANOS_PER_SECOND)
    );
    assert_eq!(
        rule.rule.next_after(utc("2020-01-01T00:00:00Z")),
        Some(start),
        "before the start, the start is next"
    );
}

#[test]
fn plan_within_threshold_not_missed() {
    let start = utc("2027-05-01T10:00:00Z");
    let rule = interval(10, start, v1::MissedRunPolicy::Skip, 0);
    let plan = plan(
        &rule,
        start,
        start + 5 * NANOS_PER_SECOND,
        6 * NANOS_PER_SECOND,
    );
    assert_eq!(
        plan,
        Plan {
            fire: vec![start],
            next: Some(start + 10 * NANOS_PER_SECOND),
            skipped: 0
        }
    );
}

/// Plans a schedule every 10 s from 10:00:00, last released at 10:00:00, at 10:01:05 with
/// a 20 s threshold. The times 10:00:10 to 10:00:40 are missed (4 times). The times
/// 10:00:50 and 10:01:00 are late by less than the threshold, so 10:00:50 is next.
fn missed_runs_case(policy: v1::MissedRunPolicy, max: u32) -> Plan {
    let start = utc("2027-05-01T10:00:00Z");
    let rule = interval(10, start, policy, max);
    plan(
        &rule,
        start + 10 * NANOS_PER_SECOND,
        utc("2027-05-01T10:01:05Z"),
        20 * NANOS_PER_SECOND,
    )
}

#[test]
fn skip_releases_nothing_for_missed_runs() {
    assert_eq!(
        missed_runs_case(v1::MissedRunPolicy::Skip, 0),
        Plan {
            fire: vec![],
            next: Some(utc("2027-05-01T10:00:50Z")),
            skipped: 4
        }
    );
}

#[test]
fn unspecified_policy_skips() {
    assert_eq!(
        missed_runs_case(v1::MissedRunPolicy::Unspecified, 0),
        missed_runs_case(v1::MissedRunPolicy::Skip, 0)
    );
}

#[test]
fn run_once_releases_the_latest_missed_run() {
    assert_eq!(
        missed_runs_case(v1::MissedRunPolicy::RunOnce, 0),
        Plan {
            fire: vec![utc("2027-05-01T10:00:40Z")],
            next: Some(utc("2027-05-01T10:00:50Z")),
            skipped: 3
        }
    );
}

#[test]
fn run_all_releases_oldest_up_to_limit() {
    assert_eq!(
        missed_runs_case(v1::MissedRunPolicy::RunAll, 3),
        Plan {
            fire: vec![
                utc("2027-05-01T10:00:10Z"),
                utc("2027-05-01T10:00:20Z"),
                utc("2027-05-01T10:00:30Z"),
            ],
            next: Some(utc("2027-05-01T10:00:50Z")),
            skipped: 1
        }
    );
    assert_eq!(
        missed_runs_case(v1::MissedRunPolicy::RunAll, 10).fire.len(),
        4,
        "with room for all, every missed run is released"
    );
}

#[test]
fn cron_missed_runs_counted() {
    // Every minute, due at 10:00 and planned at 10:30 with a 1 minute threshold. The times
    // 10:00 to 10:28 are missed (29 times), so 10:29 is next.
    let rule = cron_with(
        "0 * * * * *",
        "Europe/Berlin",
        v1::MissedRunPolicy::RunOnce,
        0,
    );
    let plan = plan(
        &rule,
        utc("2027-05-01T10:00:00Z"),
        utc("2027-05-01T10:30:00Z"),
        60 * NANOS_PER_SECOND,
    );
    assert_eq!(
        plan,
        Plan {
            fire: vec![utc("2027-05-01T10:28:00Z")],
            next: Some(utc("2027-05-01T10:29:00Z")),
            skipped: 28
        }
    );
}

#[test]
fn invalid_rules_name_their_field_and_value() {
    let cases = [
        (v1::Recurrence::default(), "recurrence", "exactly one rule"),
        (
            v1::Recurrence {
                rule: Some(recurrence::Rule::Cron(v1::CronRule {
                    expression: "61 * * * * *".into(),
                    time_zone: String::new(),
                })),
                ..Default::default()
            },
            "recurrence.cron.expression",
            "\"61 * * * * *\"",
        ),
        (
            v1::Recurrence {
                rule: Some(recurrence::Rule::Cron(v1::CronRule {
                    expression: "*/5 * * * *".into(),
                    time_zone: String::new(),
                })),
                ..Default::default()
            },
            "recurrence.cron.expression",
            "six fields",
        ),
        (
            v1::Recurrence {
                rule: Some(recurrence::Rule::Cron(v1::CronRule {
                    expression: "0 0 2 * * *".into(),
                    time_zone: "Europe/Atlantis".into(),
                })),
                ..Default::default()
            },
            "recurrence.cron.time_zone",
            "\"Europe/Atlantis\"",
        ),
        (
            v1::Recurrence {
                rule: Some(recurrence::Rule::Interval(v1::IntervalRule {
                    every: Some(prost_types::Duration {
                        seconds: 0,
                        nanos: 500_000_000,
                    }),
                    start_time: None,
                })),
                ..Default::default()
            },
            "recurrence.interval.every",
            "500ms",
        ),
        (
            v1::Recurrence {
                rule: Some(recurrence::Rule::Interval(v1::IntervalRule {
                    every: Some(prost_types::Duration {
                        seconds: 60,
                        nanos: 0,
                    }),
                    start_time: None,
                })),
                missed_runs: v1::MissedRunPolicy::RunOnce.into(),
                max_missed_runs: 5000,
            },
            "recurrence.max_missed_runs",
            "5000",
        ),
    ];
    for (wire, field, value) in cases {
        let err = Recurrence::from_request("recurrence", &wire, 0)
            .expect_err("invalid recurrence is rejected");
        let message = err.to_string();
        assert!(
            matches!(&err, SchedulerError::InvalidArgument { field: f, .. } if f == field),
            "{message:?} should name {field}"
        );
        assert!(
            message.contains(value),
            "{message:?} should contain {value}"
        );
    }
}

#[test]
fn timestamps_outside_the_range_are_rejected() {
    let beyond = prost_types::Timestamp {
        seconds: 253_402_300_800,
        nanos: 0,
    };
    let message = timestamp_nanos("due_time", &beyond)
        .unwrap_err()
        .to_string();
    assert!(message.starts_with("due_time: "), "{message}");
    assert!(message.contains("253402300800s"), "{message}");
    let negative_nanos = prost_types::Timestamp {
        seconds: 0,
        nanos: -1,
    };
    assert!(timestamp_nanos("due_time", &negative_nanos).is_err());
    let ordinary = prost_types::Timestamp {
        seconds: 1_800_000_000,
        nanos: 5,
    };
    assert_eq!(
        timestamp_nanos("due_time", &ordinary).unwrap(),
        1_800_000_000 * NANOS_PER_SECOND + 5
    );
}

#[test]
fn rfc3339_shows_fractions_only_when_present() {
    assert_eq!(rfc3339(utc("2027-03-28T01:00:00Z")), "2027-03-28T01:00:00Z");
    assert_eq!(
        rfc3339(utc("2027-03-28T01:00:00Z") + 250_000_000),
        "2027-03-28T01:00:00.250Z"
    );
}

#[test]
fn list_in_hour_fields_follows_wall_clock() {
    // A list makes "0 0,30 2 * * *" a wall-clock rule, not a fixed time: it skips the
    // spring gap and fires in both passes of the repeated hour in autumn.
    let rule = cron("0 0,30 2 * * *", "Europe/Berlin");
    assert_eq!(
        fire_times(&rule, "2027-03-27T12:00:00Z", "2027-03-29T12:00:00Z"),
        ["2027-03-29T00:00:00Z", "2027-03-29T00:30:00Z"]
    );
    assert_eq!(
        fire_times(&rule, "2027-10-30T12:00:00Z", "2027-10-31T12:00:00Z"),
        [
            "2027-10-31T00:00:00Z",
            "2027-10-31T00:30:00Z",
            "2027-10-31T01:00:00Z",
            "2027-10-31T01:30:00Z",
        ]
    );
}
