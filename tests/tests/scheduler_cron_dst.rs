//! Cron rules in time zones with daylight saving time, checked through PreviewSchedule of
//! the real scheduler against exact instants.
//!
//! Berlin moves from 02:00 CET (UTC+1) to 03:00 CEST (UTC+2) on 2027-03-28 and from 03:00
//! CEST back to 02:00 CET on 2027-10-31. New York moves from 02:00 EST (UTC-5) to 03:00
//! EDT (UTC-4) on 2027-03-14 and from 02:00 EDT back to 01:00 EST on 2027-11-07.
//!
//! A fixed time inside the gap fires once at the first time after the gap, and a fixed
//! time inside the repeated hour fires once at its first occurrence. A rule with a
//! wildcard or step in the second, minute or hour field follows the wall clock: it skips
//! the gap and fires in both passes of the repeated hour.

use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use docket_proto::v1::scheduler_client::SchedulerClient;
use docket_proto::v1::{CreateScheduleRequest, PreviewScheduleRequest, Schedule};
use docket_tests::{
    SchedulerSetup, cron_recurrence, format_utc, get_schedule, new_task, preview, system_time, utc,
};
use tonic::transport::Channel;

const QUEUE: &str = "cron";

const HOUR: Duration = Duration::from_secs(3600);

/// Asks PreviewSchedule for the fire times of `expression` in `time_zone` after `after`,
/// and compares them with `expected`, all as RFC 3339 in UTC.
async fn assert_preview(
    client: &mut SchedulerClient<Channel>,
    expression: &str,
    time_zone: &str,
    after: &str,
    expected: &[&str],
) -> Result<()> {
    let count = u32::try_from(expected.len())?;
    let fire_times = preview(
        client,
        cron_recurrence(expression, time_zone),
        utc(after),
        count,
    )
    .await?;
    let actual: Vec<String> = fire_times.into_iter().map(format_utc).collect();
    assert_eq!(
        actual, expected,
        "fire times of {expression:?} in {time_zone} after {after}"
    );
    Ok(())
}

/// Returns `count` instants an hour apart from `first`, as RFC 3339 in UTC.
fn hourly(first: &str, count: u32) -> Vec<String> {
    (0..count)
        .map(|index| format_utc(utc(first) + index * HOUR))
        .collect()
}

#[tokio::test]
async fn berlin_fixed_time_in_gap_and_overlap() -> Result<()> {
    let setup = SchedulerSetup::start(&[]).await?;
    let mut scheduler = setup.scheduler.client().await?;

    // 02:30 does not exist on 2027-03-28: it fires once at 03:00 CEST, 01:00 UTC. The day
    // after, 02:30 CEST is 00:30 UTC.
    assert_preview(
        &mut scheduler,
        "0 30 2 * * *",
        "Europe/Berlin",
        "2027-03-27T12:00:00Z",
        &[
            "2027-03-28T01:00:00Z",
            "2027-03-29T00:30:00Z",
            "2027-03-30T00:30:00Z",
        ],
    )
    .await?;

    // 02:30 happens twice on 2027-10-31: it fires once, at 02:30 CEST, 00:30 UTC, and not
    // at 02:30 CET, 01:30 UTC. The day after, 02:30 CET is 01:30 UTC.
    assert_preview(
        &mut scheduler,
        "0 30 2 * * *",
        "Europe/Berlin",
        "2027-10-30T12:00:00Z",
        &[
            "2027-10-31T00:30:00Z",
            "2027-11-01T01:30:00Z",
            "2027-11-02T01:30:00Z",
        ],
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn new_york_fixed_time_in_gap_and_overlap() -> Result<()> {
    let setup = SchedulerSetup::start(&[]).await?;
    let mut scheduler = setup.scheduler.client().await?;

    // 02:30 does not exist on 2027-03-14: it fires once at 03:00 EDT, 07:00 UTC. The day
    // after, 02:30 EDT is 06:30 UTC.
    assert_preview(
        &mut scheduler,
        "0 30 2 * * *",
        "America/New_York",
        "2027-03-13T12:00:00Z",
        &[
            "2027-03-14T07:00:00Z",
            "2027-03-15T06:30:00Z",
            "2027-03-16T06:30:00Z",
        ],
    )
    .await?;

    // In New York the hour from 01:00 repeats: 01:30 on 2027-11-07 fires once, at 01:30
    // EDT, 05:30 UTC, and not at 01:30 EST, 06:30 UTC.
    assert_preview(
        &mut scheduler,
        "0 30 1 * * *",
        "America/New_York",
        "2027-11-06T12:00:00Z",
        &[
            "2027-11-07T05:30:00Z",
            "2027-11-08T06:30:00Z",
            "2027-11-09T06:30:00Z",
        ],
    )
    .await?;

    // 02:30 is outside the repeated hour and happens once, at 02:30 EST.
    assert_preview(
        &mut scheduler,
        "0 30 2 * * *",
        "America/New_York",
        "2027-11-06T12:00:00Z",
        &["2027-11-07T07:30:00Z", "2027-11-08T07:30:00Z"],
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn wildcard_hour_follows_wall_clock() -> Result<()> {
    let setup = SchedulerSetup::start(&[]).await?;
    let mut scheduler = setup.scheduler.client().await?;

    // The local day of 2027-10-31 runs from 00:00 CEST (2027-10-30T22:00Z) to 24:00 CET
    // (2027-10-31T23:00Z), 25 hours, and every one of them starts on the hour in UTC too.
    // Both 02:00 CEST (00:00Z) and 02:00 CET (01:00Z) fire.
    let expected = hourly("2027-10-30T22:00:00Z", 25);
    assert!(expected.contains(&"2027-10-31T00:00:00Z".to_string()));
    assert!(expected.contains(&"2027-10-31T01:00:00Z".to_string()));
    assert_eq!(
        expected.last().map(String::as_str),
        Some("2027-10-31T22:00:00Z")
    );
    let expected: Vec<&str> = expected.iter().map(String::as_str).collect();
    assert_preview(
        &mut scheduler,
        "0 0 * * * *",
        "Europe/Berlin",
        "2027-10-30T21:59:59Z",
        &expected,
    )
    .await?;

    // The local day of 2027-03-28 has 23 hours, 02:00 missing: from 00:00 CET
    // (2027-03-27T23:00Z) to 24:00 CEST (2027-03-28T22:00Z). No hour fires twice.
    let expected = hourly("2027-03-27T23:00:00Z", 24);
    let expected: Vec<&str> = expected.iter().map(String::as_str).collect();
    assert_preview(
        &mut scheduler,
        "0 0 * * * *",
        "Europe/Berlin",
        "2027-03-27T22:59:59Z",
        &expected,
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn minute_step_in_fixed_hour_follows_wall_clock() -> Result<()> {
    let setup = SchedulerSetup::start(&[]).await?;
    let mut scheduler = setup.scheduler.client().await?;

    // A step in the minute field fires in both passes of the repeated hour: 02:00 and
    // 02:30 CEST, then 02:00 and 02:30 CET.
    assert_preview(
        &mut scheduler,
        "0 */30 2 * * *",
        "Europe/Berlin",
        "2027-10-30T12:00:00Z",
        &[
            "2027-10-31T00:00:00Z",
            "2027-10-31T00:30:00Z",
            "2027-10-31T01:00:00Z",
            "2027-10-31T01:30:00Z",
            "2027-11-01T01:00:00Z",
        ],
    )
    .await?;

    // The same rule skips the gap: nothing fires on 2027-03-28.
    assert_preview(
        &mut scheduler,
        "0 */30 2 * * *",
        "Europe/Berlin",
        "2027-03-27T12:00:00Z",
        &["2027-03-29T00:00:00Z", "2027-03-29T00:30:00Z"],
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn preview_count_defaults_to_ten() -> Result<()> {
    let setup = SchedulerSetup::start(&[]).await?;
    let mut scheduler = setup.scheduler.client().await?;

    let fire_times = preview(
        &mut scheduler,
        cron_recurrence("@daily", "Europe/Berlin"),
        utc("2027-01-01T00:00:00Z"),
        0,
    )
    .await?;
    let expected: Vec<String> = (2..=11)
        .map(|day| format!("2027-01-{day:02}T00:00:00Z"))
        .map(|local_midnight| format_utc(utc(&local_midnight) - HOUR))
        .collect();
    let actual: Vec<String> = fire_times.into_iter().map(format_utc).collect();
    assert_eq!(actual, expected, "@daily in Berlin in January, count 0");
    Ok(())
}

async fn create_cron_schedule(
    client: &mut SchedulerClient<Channel>,
    name: &str,
    expression: &str,
    time_zone: &str,
) -> Result<Schedule> {
    let request = CreateScheduleRequest {
        name: name.to_string(),
        recurrence: Some(cron_recurrence(expression, time_zone)),
        task: Some(new_task(QUEUE, "report", name.to_string())),
        paused: false,
    };
    client
        .create_schedule(request)
        .await?
        .into_inner()
        .schedule
        .context("CreateSchedule returned no schedule")
}

#[tokio::test]
async fn schedule_next_fire_time_matches_preview() -> Result<()> {
    let setup = SchedulerSetup::start(&[]).await?;
    let mut scheduler = setup.scheduler.client().await?;

    let cases = [
        ("berlin-night", "0 30 2 * * *", "Europe/Berlin"),
        ("new-york-morning", "0 15 9 * * MON-FRI", "America/New_York"),
        ("tokyo-noon", "0 0 12 * * *", "Asia/Tokyo"),
    ];
    for (name, expression, time_zone) in cases {
        let created = create_cron_schedule(&mut scheduler, name, expression, time_zone).await?;
        let stored = get_schedule(&mut scheduler, &created.id).await?;
        let create_time = system_time(stored.create_time.as_ref().context("no create_time")?);
        let next = system_time(
            stored
                .next_fire_time
                .as_ref()
                .with_context(|| format!("schedule {name} has no next_fire_time"))?,
        );

        let previewed = preview(
            &mut scheduler,
            cron_recurrence(expression, time_zone),
            create_time,
            1,
        )
        .await?;
        assert_eq!(
            previewed
                .iter()
                .copied()
                .map(format_utc)
                .collect::<Vec<_>>(),
            vec![format_utc(next)],
            "{name}: preview after the create time against next_fire_time"
        );
        assert!(
            next > create_time && next <= create_time + 4 * 24 * HOUR,
            "{name}: next fire time {} is not within four days after the create time {}",
            format_utc(next),
            format_utc(create_time)
        );

        // PreviewSchedule without `after` starts from now, which is after the create time
        // and, unless a fire time passed in between, gives the same first fire time.
        let request = PreviewScheduleRequest {
            recurrence: Some(cron_recurrence(expression, time_zone)),
            after: None,
            count: 1,
        };
        let from_now = scheduler.preview_schedule(request).await?.into_inner();
        let first_from_now = from_now
            .fire_times
            .first()
            .map(system_time)
            .context("PreviewSchedule from now returned no fire time")?;
        assert!(
            first_from_now == next || SystemTime::now() >= next,
            "{name}: preview from now gave {}, next_fire_time is {}",
            format_utc(first_from_now),
            format_utc(next)
        );
    }
    Ok(())
}
