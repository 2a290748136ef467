//! The `docket.v1.Broker` gRPC service: converts requests into domain calls and results
//! into responses. Validation of wire values happens here, once.

mod status;
mod subscription;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use docket_proto::storage::TaskRecordState;
use docket_proto::v1::{self, broker_server};
use tonic::{Request, Response, Status};

use crate::broker::Broker;
use crate::dispatch::Subscription;
use crate::error::BrokerError;
use crate::task::{LeaseId, NewTask, QueueName, TaskId};

pub use subscription::SubscriptionStream;

/// The gRPC service over a shared [`Broker`].
pub struct BrokerService {
    broker: Arc<Broker>,
}

impl BrokerService {
    /// Wraps the broker for tonic.
    pub fn new(broker: Arc<Broker>) -> Self {
        BrokerService { broker }
    }
}

#[tonic::async_trait]
impl broker_server::Broker for BrokerService {
    async fn enqueue(
        &self,
        request: Request<v1::EnqueueRequest>,
    ) -> Result<Response<v1::EnqueueResponse>, Status> {
        let tasks = request.into_inner().tasks;
        let limits = &self.broker.limits;
        if tasks.is_empty() {
            return Err(BrokerError::invalid(
                "tasks",
                "the batch is empty: send at least one task",
            )
            .into());
        }
        if tasks.len() > limits.max_batch_size {
            let message = format!(
                "batch of {} tasks exceeds the limit of {}; split it",
                tasks.len(),
                limits.max_batch_size
            );
            return Err(BrokerError::invalid("tasks", message).into());
        }
        let tasks = tasks
            .into_iter()
            .enumerate()
            .map(|(index, task)| NewTask::validate(index, task, limits))
            .collect::<Result<Vec<_>, _>>()?;

        let ids = self.broker.enqueue(tasks).await?;
        tracing::debug!(tasks = ids.len(), "enqueued");
        Ok(Response::new(v1::EnqueueResponse {
            task_ids: ids.iter().map(ToString::to_string).collect(),
        }))
    }

    type SubscribeStream = SubscriptionStream;

    async fn subscribe(
        &self,
        request: Request<v1::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let subscription = self.validate_subscription(request.into_inner())?;
        if self.broker.shutdown.is_cancelled() {
            return Err(BrokerError::ShuttingDown.into());
        }
        let (id, deliveries) = self.broker.subscribe(subscription);
        tracing::debug!(subscriber = id, "subscribed");
        Ok(Response::new(SubscriptionStream::new(
            id,
            deliveries,
            Arc::clone(&self.broker),
        )))
    }

    async fn ack(
        &self,
        request: Request<v1::AckRequest>,
    ) -> Result<Response<v1::AckResponse>, Status> {
        let request = request.into_inner();
        let lease_id = LeaseId::parse("lease_id", &request.lease_id)?;
        self.broker.ack(lease_id, request.result).await?;
        Ok(Response::new(v1::AckResponse {}))
    }

    async fn nack(
        &self,
        request: Request<v1::NackRequest>,
    ) -> Result<Response<v1::NackResponse>, Status> {
        let request = request.into_inner();
        let lease_id = LeaseId::parse("lease_id", &request.lease_id)?;
        let state = match self.broker.nack(lease_id, request.error).await? {
            TaskRecordState::Dead => v1::TaskState::Dead,
            _ => v1::TaskState::Pending,
        };
        Ok(Response::new(v1::NackResponse {
            state: state.into(),
        }))
    }

    async fn get_task(
        &self,
        request: Request<v1::GetTaskRequest>,
    ) -> Result<Response<v1::GetTaskResponse>, Status> {
        let task_id = TaskId::parse("task_id", &request.into_inner().task_id)?;
        let status = self.broker.get_task(task_id).await?;
        Ok(Response::new(v1::GetTaskResponse {
            status: Some(status),
        }))
    }
}

impl BrokerService {
    fn validate_subscription(
        &self,
        request: v1::SubscribeRequest,
    ) -> Result<Subscription, BrokerError> {
        let limits = &self.broker.limits;
        if request.queues.is_empty() {
            return Err(BrokerError::invalid(
                "queues",
                "no queue given: name at least one queue to receive from",
            ));
        }
        let mut seen = HashSet::new();
        let mut queues = Vec::with_capacity(request.queues.len());
        for (index, name) in request.queues.iter().enumerate() {
            let queue = QueueName::parse(&format!("queues[{index}]"), name)?;
            if !seen.insert(queue.clone()) {
                return Err(BrokerError::invalid(
                    format!("queues[{index}]"),
                    format!("queue {name:?} is named twice"),
                ));
            }
            queues.push(queue);
        }

        let max_in_flight = request.max_in_flight;
        if max_in_flight == 0 || max_in_flight > limits.max_in_flight {
            return Err(BrokerError::invalid(
                "max_in_flight",
                format!(
                    "max_in_flight {max_in_flight} is out of range: use 1 to {}",
                    limits.max_in_flight
                ),
            ));
        }

        let lease_duration = match request.lease_duration {
            None => limits.default_lease_duration,
            Some(duration) => {
                let valid = Duration::try_from(duration)
                    .ok()
                    .filter(|d| *d >= Duration::from_secs(1) && *d <= limits.max_lease_duration);
                let Some(valid) = valid else {
                    return Err(BrokerError::invalid(
                        "lease_duration",
                        format!(
                            "lease_duration {}.{:09}s is out of range: use 1s to {}",
                            duration.seconds,
                            duration.nanos,
                            humantime::format_duration(limits.max_lease_duration)
                        ),
                    ));
                };
                valid
            }
        };

        Ok(Subscription {
            queues,
            max_in_flight,
            lease_duration,
        })
    }
}
