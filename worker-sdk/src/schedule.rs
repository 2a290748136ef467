//! Delayed tasks, which the scheduler keeps until they are due and then enqueues.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use docket_proto::v1::schedule_task_request::Due;
use docket_proto::v1::scheduler_client::SchedulerClient;
use docket_proto::v1::{
    CancelScheduleRequest, NewTask, Schedule, ScheduleTaskRequest, ScheduleTaskResponse,
};

use crate::trace::fill_traceparent;
use crate::{Client, Error};

/// Largest `seconds` of a protobuf `Timestamp`, 9999-12-31T23:59:59Z.
const MAX_TIMESTAMP_SECONDS: u64 = 253_402_300_799;

/// Largest `seconds` of a protobuf `Duration`, about 10,000 years.
const MAX_DURATION_SECONDS: u64 = 315_576_000_000;

/// A task that the scheduler keeps until its due time, as [`Client::enqueue_at`] and
/// [`Client::enqueue_in`] return it.
///
/// The scheduler enqueues the task into the broker once the due time has passed, with
/// the header `docket-schedule-id` set to [`ScheduledTask::schedule_id`]. The broker
/// assigns the task id only then.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduledTask {
    schedule_id: String,
    due_time: SystemTime,
}

impl ScheduledTask {
    /// Returns the id of the one-shot schedule, a UUIDv7 string, which
    /// [`Client::cancel_scheduled`] takes.
    pub fn schedule_id(&self) -> &str {
        &self.schedule_id
    }

    /// Returns the time at which the scheduler releases the task, by the scheduler's
    /// clock.
    pub fn due_time(&self) -> SystemTime {
        self.due_time
    }
}

impl Client {
    /// Schedules `task` to be enqueued at `due_time` and returns the schedule.
    ///
    /// The scheduler, not the broker, keeps the task until then, so the client needs the
    /// scheduler's address from [`Client::with_scheduler`]. A due time in the past
    /// enqueues the task at once. To wait a duration from now by the scheduler's clock,
    /// use [`Client::enqueue_in`].
    ///
    /// A task without a `traceparent` header gets one now, as in [`Client::enqueue`], so
    /// the task keeps the trace of the code that scheduled it.
    ///
    /// # Errors
    ///
    /// Returns [`Error::SchedulerNotConfigured`] if the client has no scheduler address,
    /// [`Error::InvalidDueTime`] if `due_time` is before the Unix epoch or after the year
    /// 9999, and [`Error::Status`] if the scheduler rejects the task or the call fails.
    /// The scheduler rejects an invalid task field, or a task with an idempotency key,
    /// with [`tonic::Code::InvalidArgument`], because it sets the key itself.
    pub async fn enqueue_at(
        &self,
        task: impl Into<NewTask>,
        due_time: SystemTime,
    ) -> Result<ScheduledTask, Error> {
        let scheduler = self.scheduler_grpc()?;
        let due = Due::DueTime(timestamp_from(due_time)?);
        schedule_task(scheduler, task.into(), due).await
    }

    /// Schedules `task` to be enqueued once `delay` has passed and returns the schedule.
    ///
    /// The broker assigns the task id only at release; the scheduler's `GetSchedule`, through
    /// [`Client::scheduler_grpc`], returns it then as `last_outcome.task_id`.
    ///
    /// The delay counts from the moment the scheduler receives the call, by its own
    /// clock, so a skewed client clock does not shift it. The scheduler accepts delays of
    /// at most 100 years. The client needs the scheduler's address from
    /// [`Client::with_scheduler`]. The task gets a `traceparent` header as in
    /// [`Client::enqueue_at`].
    ///
    /// ```no_run
    /// use std::time::Duration;
    ///
    /// use docket::{Client, Task};
    ///
    /// # async fn example() -> Result<(), docket::Error> {
    /// let client = Client::connect("http://127.0.0.1:7070")
    ///     .await?
    ///     .with_scheduler("http://127.0.0.1:7071")?;
    ///
    /// let task = Task::new("emails", "send_reminder").payload("zoe@example.com");
    /// let scheduled = client.enqueue_in(task, Duration::from_secs(15 * 60)).await?;
    /// println!("reminder {} is due at {:?}", scheduled.schedule_id(), scheduled.due_time());
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// Returns [`Error::SchedulerNotConfigured`] if the client has no scheduler address,
    /// [`Error::InvalidDelay`] if `delay` does not fit a protobuf `Duration`, and
    /// [`Error::Status`] if the scheduler rejects the task or the call fails, as
    /// [`Client::enqueue_at`] describes.
    pub async fn enqueue_in(
        &self,
        task: impl Into<NewTask>,
        delay: Duration,
    ) -> Result<ScheduledTask, Error> {
        let scheduler = self.scheduler_grpc()?;
        let due = Due::Delay(duration_from(delay)?);
        schedule_task(scheduler, task.into(), due).await
    }

    /// Cancels a task scheduled with [`Client::enqueue_at`] or [`Client::enqueue_in`]
    /// before it is due, so that it is never enqueued.
    ///
    /// # Errors
    ///
    /// Returns [`Error::SchedulerNotConfigured`] if the client has no scheduler address,
    /// and [`Error::Status`] if the call fails: with [`tonic::Code::NotFound`] for an
    /// unknown id, and with [`tonic::Code::FailedPrecondition`] if the task was already
    /// enqueued.
    pub async fn cancel_scheduled(&self, schedule_id: impl Into<String>) -> Result<(), Error> {
        let mut scheduler = self.scheduler_grpc()?;
        scheduler
            .cancel_schedule(CancelScheduleRequest {
                schedule_id: schedule_id.into(),
            })
            .await?;
        Ok(())
    }
}

/// Calls ScheduleTask and checks that the response carries the schedule's id and due
/// time.
async fn schedule_task(
    mut scheduler: SchedulerClient<crate::GrpcChannel>,
    mut task: NewTask,
    due: Due,
) -> Result<ScheduledTask, Error> {
    fill_traceparent(&mut task);
    let request = ScheduleTaskRequest {
        task: Some(task),
        due: Some(due),
    };
    let response = scheduler.schedule_task(request).await?.into_inner();
    scheduled_task(response)
}

/// Extracts the schedule id and due time from a ScheduleTask response.
fn scheduled_task(response: ScheduleTaskResponse) -> Result<ScheduledTask, Error> {
    let Some(Schedule {
        id,
        due_time: Some(due_time),
        ..
    }) = response.schedule
    else {
        return Err(Error::InvalidResponse(
            "ScheduleTask returned no schedule or no due time".to_owned(),
        ));
    };
    if id.is_empty() {
        return Err(Error::InvalidResponse(
            "ScheduleTask returned a schedule with an empty id".to_owned(),
        ));
    }
    let due_time = SystemTime::try_from(due_time).map_err(|error| {
        Error::InvalidResponse(format!(
            "ScheduleTask returned the invalid due time {due_time:?} for schedule {id}: {error}"
        ))
    })?;
    Ok(ScheduledTask {
        schedule_id: id,
        due_time,
    })
}

/// Converts a due time to a protobuf `Timestamp`, rejecting times before the Unix epoch
/// and after the end of year 9999 instead of panicking as `Timestamp::from` can.
fn timestamp_from(due_time: SystemTime) -> Result<prost_types::Timestamp, Error> {
    let invalid = || Error::InvalidDueTime { due_time };
    let since_epoch = due_time.duration_since(UNIX_EPOCH).map_err(|_| invalid())?;
    if since_epoch.as_secs() > MAX_TIMESTAMP_SECONDS {
        return Err(invalid());
    }
    Ok(prost_types::Timestamp {
        seconds: i64::try_from(since_epoch.as_secs()).map_err(|_| invalid())?,
        nanos: i32::try_from(since_epoch.subsec_nanos()).map_err(|_| invalid())?,
    })
}

/// Converts a delay to a protobuf `Duration`, rejecting delays longer than its range.
fn duration_from(delay: Duration) -> Result<prost_types::Duration, Error> {
    let invalid = || Error::InvalidDelay { delay };
    if delay.as_secs() > MAX_DURATION_SECONDS {
        return Err(invalid());
    }
    Ok(prost_types::Duration {
        seconds: i64::try_from(delay.as_secs()).map_err(|_| invalid())?,
        nanos: i32::try_from(delay.subsec_nanos()).map_err(|_| invalid())?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Task;

    /// Returns a client whose broker address is never dialed, because every call these
    /// tests make fails before reaching a server.
    fn client_without_scheduler() -> Client {
        Client::connect_lazy("http://127.0.0.1:1").unwrap()
    }

    #[tokio::test]
    async fn enqueue_in_without_scheduler_fails() {
        let client = client_without_scheduler();

        let error = client
            .enqueue_in(Task::new("emails", "send"), Duration::from_secs(1))
            .await
            .unwrap_err();

        assert!(matches!(error, Error::SchedulerNotConfigured), "{error:?}");
        assert!(error.to_string().contains("with_scheduler"), "{error}");
    }

    #[tokio::test]
    async fn enqueue_at_without_scheduler_fails() {
        let client = client_without_scheduler();

        let error = client
            .enqueue_at(Task::new("emails", "send"), SystemTime::now())
            .await
            .unwrap_err();

        assert!(matches!(error, Error::SchedulerNotConfigured), "{error:?}");
    }

    #[tokio::test]
    async fn cancel_without_scheduler_fails() {
        let client = client_without_scheduler();

        let error = client.cancel_scheduled("some-id").await.unwrap_err();

        assert!(matches!(error, Error::SchedulerNotConfigured), "{error:?}");
    }

    #[tokio::test]
    async fn scheduler_grpc_without_scheduler_fails() {
        let client = client_without_scheduler();

        let error = client.scheduler_grpc().unwrap_err();

        assert!(matches!(error, Error::SchedulerNotConfigured), "{error:?}");
    }

    #[tokio::test]
    async fn with_scheduler_rejects_invalid_uri() {
        let error = client_without_scheduler()
            .with_scheduler("not a uri")
            .unwrap_err();

        assert!(matches!(error, Error::InvalidEndpoint { .. }), "{error:?}");
    }

    #[tokio::test]
    async fn enqueue_at_before_epoch_fails_before_dialing() {
        // Nothing listens on port 1, so reaching the network would fail with a status.
        let client = client_without_scheduler()
            .with_scheduler("http://127.0.0.1:1")
            .unwrap();
        let due_time = UNIX_EPOCH - Duration::from_secs(1);

        let error = client
            .enqueue_at(Task::new("emails", "send"), due_time)
            .await
            .unwrap_err();

        assert!(
            matches!(error, Error::InvalidDueTime { due_time: given } if given == due_time),
            "{error:?}"
        );
        assert!(
            error.to_string().contains("1s before the Unix epoch"),
            "{error}"
        );
    }

    #[test]
    fn timestamp_from_accepts_range_ends() {
        let epoch = timestamp_from(UNIX_EPOCH).unwrap();
        let last = UNIX_EPOCH + Duration::new(MAX_TIMESTAMP_SECONDS, 999_999_999);
        let end = timestamp_from(last).unwrap();

        assert_eq!((epoch.seconds, epoch.nanos), (0, 0));
        assert_eq!((end.seconds, end.nanos), (253_402_300_799, 999_999_999));
    }

    #[test]
    fn timestamp_from_rejects_times_out_of_range() {
        let before_epoch = UNIX_EPOCH - Duration::from_nanos(1);
        let after_9999 = UNIX_EPOCH + Duration::from_secs(MAX_TIMESTAMP_SECONDS + 1);

        for due_time in [before_epoch, after_9999] {
            let error = timestamp_from(due_time).unwrap_err();
            assert!(
                matches!(error, Error::InvalidDueTime { due_time: given } if given == due_time),
                "{due_time:?}: {error:?}"
            );
        }
    }

    #[test]
    fn timestamp_from_keeps_nanoseconds() {
        let due_time = UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789);

        let timestamp = timestamp_from(due_time).unwrap();

        assert_eq!(timestamp.seconds, 1_700_000_000);
        assert_eq!(timestamp.nanos, 123_456_789);
    }

    #[test]
    fn duration_from_converts_and_bounds() {
        let delay = duration_from(Duration::new(90, 500_000_000)).unwrap();
        let longest = duration_from(Duration::from_secs(MAX_DURATION_SECONDS)).unwrap();
        let too_long = Duration::from_secs(MAX_DURATION_SECONDS + 1);
        let error = duration_from(too_long).unwrap_err();

        assert_eq!((delay.seconds, delay.nanos), (90, 500_000_000));
        assert_eq!(longest.seconds, 315_576_000_000);
        assert!(
            matches!(error, Error::InvalidDelay { delay } if delay == too_long),
            "{error:?}"
        );
        assert!(error.to_string().contains("315576000001s"), "{error}");
    }

    #[test]
    fn duration_from_rejects_max_duration() {
        let error = duration_from(Duration::MAX).unwrap_err();

        assert!(matches!(error, Error::InvalidDelay { .. }), "{error:?}");
    }

    #[test]
    fn response_without_due_time_is_invalid() {
        let response = ScheduleTaskResponse {
            schedule: Some(Schedule {
                id: "0198a1b2-0000-7000-8000-000000000000".to_owned(),
                ..Schedule::default()
            }),
        };

        let error = scheduled_task(response).unwrap_err();

        assert!(matches!(error, Error::InvalidResponse(_)), "{error:?}");
    }

    #[test]
    fn response_carries_id_and_due_time() {
        let response = ScheduleTaskResponse {
            schedule: Some(Schedule {
                id: "0198a1b2-0000-7000-8000-000000000000".to_owned(),
                due_time: Some(prost_types::Timestamp {
                    seconds: 1_700_000_000,
                    nanos: 5,
                }),
                ..Schedule::default()
            }),
        };

        let scheduled = scheduled_task(response).unwrap();

        assert_eq!(
            scheduled.schedule_id(),
            "0198a1b2-0000-7000-8000-000000000000"
        );
        assert_eq!(
            scheduled.due_time(),
            UNIX_EPOCH + Duration::new(1_700_000_000, 5)
        );
    }
}
