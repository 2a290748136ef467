use super::*;
use crate::rule::NANOS_PER_SECOND;

struct Fixture {
    _dir: tempfile::TempDir,
    schedules: Schedules,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("temporary folder");
    let store =
        Store::open(dir.path(), &dir.path().join("scheduler.redb"), 1 << 20).expect("store opens");
    let (writer, _thread) = Writer::spawn(&store, 64).expect("writer starts");
    let schedules = Schedules {
        store: Arc::new(store),
        writer,
        wake: Arc::new(Notify::new()),
        limits: Limits {
            max_payload_bytes: 1024,
            max_result_bytes: 0,
            max_batch_size: 1,
            max_in_flight: 0,
            max_lease_duration: Duration::ZERO,
        },
        retention: 60 * NANOS_PER_SECOND,
    };
    Fixture {
        _dir: dir,
        schedules,
    }
}

fn task() -> v1::NewTask {
    v1::NewTask {
        queue: "reports".into(),
        kind: "send_report".into(),
        ..Default::default()
    }
}

fn every_second() -> v1::Recurrence {
    v1::Recurrence {
        rule: Some(v1::recurrence::Rule::Interval(v1::IntervalRule {
            every: Some(prost_types::Duration {
                seconds: 1,
                nanos: 0,
            }),
            start_time: None,
        })),
        missed_runs: v1::MissedRunPolicy::RunOnce.into(),
        max_missed_runs: 0,
    }
}

async fn claim_at(schedules: &Schedules, now: i64) -> Vec<Claimed> {
    let retention = schedules.retention;
    schedules
        .writer
        .run(move |tables| {
            cycle(
                tables,
                &[],
                &HashSet::new(),
                now,
                NANOS_PER_SECOND,
                100,
                retention,
            )
        })
        .await
        .expect("claim commits")
        .claimed
}

/// Returns the release in progress of schedule `id`.
async fn stored_release(schedules: &Schedules, id: Id) -> Option<Release> {
    schedules
        .writer
        .run(move |tables| tables.release(id))
        .await
        .expect("release reads")
}

fn recorded_id(schedules: &Schedules, name: &str) -> Id {
    schedules
        .get_by_name("name", name)
        .expect("schedule exists")
        .0
}

async fn record_released(schedules: &Schedules, claimed: Vec<Claimed>) {
    let retention = schedules.retention;
    schedules
        .writer
        .run(move |tables| {
            for schedule in &claimed {
                let outcomes: Vec<_> = schedule
                    .release
                    .fire_nanos
                    .iter()
                    .map(|&fire| FireOutcomeRecord {
                        fire_nanos: fire,
                        release_nanos: fire,
                        task_id: format!("task-{fire}"),
                        error: String::new(),
                    })
                    .collect();
                record(tables, schedule, &outcomes, retention)?;
            }
            Ok(())
        })
        .await
        .expect("record commits");
}

#[tokio::test]
async fn claim_survives_restart_unchanged() {
    let fixture = fixture();
    let schedules = &fixture.schedules;
    let (id, created) = schedules
        .create("nightly".into(), Some(every_second()), Some(task()), false)
        .await
        .unwrap();
    let due = created.next_fire_nanos.unwrap();

    // Ten seconds late: under RUN_ONCE the latest missed time is released.
    let first = claim_at(schedules, due + 10 * NANOS_PER_SECOND).await;
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].id, id);
    assert_eq!(first[0].release.fire_nanos, [due + 8 * NANOS_PER_SECOND]);

    // A restart five seconds later, before the release was recorded, plans nothing new:
    // the same fire time, and so the same idempotency key, is released again.
    let again = claim_at(schedules, due + 15 * NANOS_PER_SECOND).await;
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].release, first[0].release);

    record_released(schedules, again.clone()).await;
    // A release recorded twice, as after a failed commit of the step that follows it,
    // counts once.
    record_released(schedules, again).await;
    let (_, recorded) = schedules.get_by_name("name", "nightly").unwrap();
    assert_eq!(recorded.fire_count, 1);
    assert_eq!(recorded.skipped_count, 8);
    assert_eq!(recorded.last_fire_nanos, Some(due + 8 * NANOS_PER_SECOND));
    assert_eq!(recorded.next_fire_nanos, Some(due + 9 * NANOS_PER_SECOND));
    assert_eq!(
        stored_release(schedules, recorded_id(schedules, "nightly")).await,
        None
    );
    assert_eq!(
        schedules.store.earliest_due().unwrap(),
        Some(due + 9 * NANOS_PER_SECOND),
        "the due index follows the next fire time"
    );
}

#[tokio::test]
async fn one_shot_fired_then_expires() {
    let fixture = fixture();
    let schedules = &fixture.schedules;
    let (id, record) = schedules
        .schedule_task(
            Some(task()),
            Some(Due::In(prost_types::Duration {
                seconds: 0,
                nanos: 0,
            })),
        )
        .await
        .unwrap();
    let due = record.due_nanos;
    let claimed = claim_at(schedules, due).await;
    assert_eq!(claimed.len(), 1);

    let uuid = Uuid::from_u128(id).to_string();
    let err = schedules.cancel("schedule_id", &uuid).await.unwrap_err();
    assert!(
        err.to_string().contains("being released"),
        "a claimed schedule cannot be cancelled: {err}"
    );

    record_released(schedules, claimed).await;
    let (_, fired) = schedules.get_by_id("schedule_id", &uuid).unwrap();
    assert_eq!(fired.state(), ScheduleState::Fired);
    assert_eq!(fired.last_outcome.unwrap().task_id, format!("task-{due}"));
    assert_eq!(schedules.store.earliest_due().unwrap(), None);

    let expire = fired.expire_nanos.expect("a fired schedule expires");
    let purged = schedules
        .writer
        .run(move |tables| tables.purge_expired(expire, 10))
        .await
        .unwrap();
    assert_eq!(purged, 1);
    assert!(matches!(
        schedules.get_by_id("schedule_id", &uuid),
        Err(SchedulerError::NotFound(_))
    ));
}

#[tokio::test]
async fn update_during_release_wins() {
    let fixture = fixture();
    let schedules = &fixture.schedules;
    let (_, created) = schedules
        .create("sync".into(), Some(every_second()), Some(task()), false)
        .await
        .unwrap();
    let due = created.next_fire_nanos.unwrap();
    let claimed = claim_at(schedules, due).await;

    let mut hourly = every_second();
    if let Some(v1::recurrence::Rule::Interval(interval)) = &mut hourly.rule {
        interval.every = Some(prost_types::Duration {
            seconds: 3600,
            nanos: 0,
        });
    }
    let (_, updated) = schedules
        .update("sync".into(), Some(hourly), None)
        .await
        .unwrap();
    record_released(schedules, claimed).await;

    let (_, recorded) = schedules.get_by_name("name", "sync").unwrap();
    assert_eq!(recorded.fire_count, 1);
    assert_eq!(recorded.next_fire_nanos, updated.next_fire_nanos);
    assert_eq!(
        schedules.store.earliest_due().unwrap(),
        updated.next_fire_nanos
    );
}

#[tokio::test]
async fn paused_schedule_resumes_after_now() {
    let fixture = fixture();
    let schedules = &fixture.schedules;
    schedules
        .create("paused".into(), Some(every_second()), Some(task()), true)
        .await
        .unwrap();
    assert_eq!(schedules.store.earliest_due().unwrap(), None);
    let before = now_nanos();
    let (_, resumed) = schedules.resume("paused".into()).await.unwrap();
    assert_eq!(resumed.state(), ScheduleState::Active);
    assert!(resumed.next_fire_nanos.unwrap() > before);
    assert_eq!(
        schedules.store.earliest_due().unwrap(),
        resumed.next_fire_nanos
    );
}

#[tokio::test]
async fn list_pages_cover_all_once() {
    let fixture = fixture();
    let schedules = &fixture.schedules;
    for name in ["c", "a", "b"] {
        schedules
            .create(name.into(), Some(every_second()), Some(task()), false)
            .await
            .unwrap();
    }
    let err = schedules
        .create("a".into(), Some(every_second()), Some(task()), false)
        .await
        .unwrap_err();
    assert!(matches!(err, SchedulerError::AlreadyExists(_)), "{err}");
    for _ in 0..3 {
        schedules
            .schedule_task(
                Some(task()),
                Some(Due::In(prost_types::Duration {
                    seconds: 3600,
                    nanos: 0,
                })),
            )
            .await
            .unwrap();
    }

    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let (page, next) = schedules
            .list(ScheduleKind::Unspecified, 2, &token)
            .unwrap();
        assert!(page.len() <= 2);
        seen.extend(page.into_iter().map(|(id, record)| (id, record.name)));
        if next.is_empty() {
            break;
        }
        token = next;
    }
    let names: Vec<_> = seen.iter().map(|(_, name)| name.as_str()).collect();
    assert_eq!(names, ["a", "b", "c", "", "", ""]);
    let mut ids: Vec<_> = seen.iter().map(|(id, _)| *id).collect();
    ids.dedup();
    assert_eq!(ids.len(), 6, "no schedule is listed twice");
}
