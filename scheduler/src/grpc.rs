//! The `docket.v1.Scheduler` gRPC service: converts requests and records between the wire
//! and [`Schedules`].

use std::sync::{Arc, OnceLock};

use docket_proto::storage::ScheduleRecord;
use docket_proto::v1::scheduler_server::Scheduler;
use docket_proto::v1::{self, schedule_task_request};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::error::SchedulerError;
use crate::rule::nanos_timestamp;
use crate::schedules::{Due, Schedules};
use crate::store::Id;

/// The gRPC service. It returns UNAVAILABLE until the store is open.
pub struct SchedulerService {
    schedules: Arc<OnceLock<Arc<Schedules>>>,
}

impl SchedulerService {
    /// Creates the service over `schedules`, which is set once the store is open.
    pub fn new(schedules: Arc<OnceLock<Arc<Schedules>>>) -> Self {
        SchedulerService { schedules }
    }

    fn schedules(&self) -> Result<Arc<Schedules>, Status> {
        self.schedules
            .get()
            .cloned()
            .ok_or_else(|| SchedulerError::Unavailable("starting").into())
    }
}

/// Converts a stored schedule to the wire.
pub fn wire_schedule(id: Id, record: ScheduleRecord) -> v1::Schedule {
    let due_time =
        (record.kind() == v1::ScheduleKind::OneShot).then(|| nanos_timestamp(record.due_nanos));
    v1::Schedule {
        id: Uuid::from_u128(id).to_string(),
        name: record.name,
        kind: record.kind,
        state: record.state,
        due_time,
        recurrence: record.recurrence,
        task: record.task,
        next_fire_time: record.next_fire_nanos.map(nanos_timestamp),
        last_fire_time: record.last_fire_nanos.map(nanos_timestamp),
        last_outcome: record.last_outcome.map(|outcome| v1::FireOutcome {
            fire_time: Some(nanos_timestamp(outcome.fire_nanos)),
            release_time: Some(nanos_timestamp(outcome.release_nanos)),
            task_id: outcome.task_id,
            error: outcome.error,
        }),
        fire_count: record.fire_count,
        skipped_count: record.skipped_count,
        create_time: Some(nanos_timestamp(record.create_nanos)),
        update_time: Some(nanos_timestamp(record.update_nanos)),
    }
}

#[tonic::async_trait]
impl Scheduler for SchedulerService {
    async fn schedule_task(
        &self,
        request: Request<v1::ScheduleTaskRequest>,
    ) -> Result<Response<v1::ScheduleTaskResponse>, Status> {
        let request = request.into_inner();
        let due = request.due.map(|due| match due {
            schedule_task_request::Due::DueTime(time) => Due::At(time),
            schedule_task_request::Due::Delay(delay) => Due::In(delay),
        });
        let (id, record) = self.schedules()?.schedule_task(request.task, due).await?;
        Ok(Response::new(v1::ScheduleTaskResponse {
            schedule: Some(wire_schedule(id, record)),
        }))
    }

    async fn cancel_schedule(
        &self,
        request: Request<v1::CancelScheduleRequest>,
    ) -> Result<Response<v1::CancelScheduleResponse>, Status> {
        let request = request.into_inner();
        let schedules = self.schedules()?;
        let (id, record) = schedules
            .cancel("schedule_id", &request.schedule_id)
            .await?;
        Ok(Response::new(v1::CancelScheduleResponse {
            schedule: Some(wire_schedule(id, record)),
        }))
    }

    async fn create_schedule(
        &self,
        request: Request<v1::CreateScheduleRequest>,
    ) -> Result<Response<v1::CreateScheduleResponse>, Status> {
        let request = request.into_inner();
        let (id, record) = self
            .schedules()?
            .create(
                request.name,
                request.recurrence,
                request.task,
                request.paused,
            )
            .await?;
        Ok(Response::new(v1::CreateScheduleResponse {
            schedule: Some(wire_schedule(id, record)),
        }))
    }

    async fn update_schedule(
        &self,
        request: Request<v1::UpdateScheduleRequest>,
    ) -> Result<Response<v1::UpdateScheduleResponse>, Status> {
        let request = request.into_inner();
        let (id, record) = self
            .schedules()?
            .update(request.name, request.recurrence, request.task)
            .await?;
        Ok(Response::new(v1::UpdateScheduleResponse {
            schedule: Some(wire_schedule(id, record)),
        }))
    }

    async fn pause_schedule(
        &self,
        request: Request<v1::PauseScheduleRequest>,
    ) -> Result<Response<v1::PauseScheduleResponse>, Status> {
        let (id, record) = self.schedules()?.pause(request.into_inner().name).await?;
        Ok(Response::new(v1::PauseScheduleResponse {
            schedule: Some(wire_schedule(id, record)),
        }))
    }

    async fn resume_schedule(
        &self,
        request: Request<v1::ResumeScheduleRequest>,
    ) -> Result<Response<v1::ResumeScheduleResponse>, Status> {
        let (id, record) = self.schedules()?.resume(request.into_inner().name).await?;
        Ok(Response::new(v1::ResumeScheduleResponse {
            schedule: Some(wire_schedule(id, record)),
        }))
    }

    async fn delete_schedule(
        &self,
        request: Request<v1::DeleteScheduleRequest>,
    ) -> Result<Response<v1::DeleteScheduleResponse>, Status> {
        self.schedules()?.delete(request.into_inner().name).await?;
        Ok(Response::new(v1::DeleteScheduleResponse {}))
    }

    async fn get_schedule(
        &self,
        request: Request<v1::GetScheduleRequest>,
    ) -> Result<Response<v1::GetScheduleResponse>, Status> {
        let request = request.into_inner();
        let schedules = self.schedules()?;
        let (id, record) = match (request.schedule_id.as_str(), request.name.as_str()) {
            (id, "") if !id.is_empty() => schedules.get_by_id("schedule_id", id)?,
            ("", name) if !name.is_empty() => schedules.get_by_name("name", name)?,
            _ => {
                return Err(SchedulerError::invalid(
                    "schedule_id",
                    "set exactly one of schedule_id and name",
                )
                .into());
            }
        };
        Ok(Response::new(v1::GetScheduleResponse {
            schedule: Some(wire_schedule(id, record)),
        }))
    }

    async fn list_schedules(
        &self,
        request: Request<v1::ListSchedulesRequest>,
    ) -> Result<Response<v1::ListSchedulesResponse>, Status> {
        let request = request.into_inner();
        let kind = v1::ScheduleKind::try_from(request.kind).map_err(|_| {
            SchedulerError::invalid("kind", format!("unknown schedule kind {}", request.kind))
        })?;
        let (page, next_page_token) =
            self.schedules()?
                .list(kind, request.page_size, &request.page_token)?;
        Ok(Response::new(v1::ListSchedulesResponse {
            schedules: page
                .into_iter()
                .map(|(id, record)| wire_schedule(id, record))
                .collect(),
            next_page_token,
        }))
    }

    async fn preview_schedule(
        &self,
        request: Request<v1::PreviewScheduleRequest>,
    ) -> Result<Response<v1::PreviewScheduleResponse>, Status> {
        let request = request.into_inner();
        let times = self
            .schedules()?
            .preview(request.recurrence, request.after, request.count)?;
        Ok(Response::new(v1::PreviewScheduleResponse {
            fire_times: times.into_iter().map(nanos_timestamp).collect(),
        }))
    }
}
