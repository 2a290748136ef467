//! The `docket.v1.Broker` gRPC service: converts requests into domain calls and results
//! into responses. Validation of wire values happens here, once.

mod convert;
mod ready;
mod status;
mod subscription;
mod watch;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use docket_proto::SUBSCRIPTION_ID_HEADER;
use docket_proto::v1::{self, broker_server};
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status};

use crate::broker::{AckItem, Broker, NackItem};
use crate::dispatch::Subscription;
use crate::error::BrokerError;
use crate::store::writer::{DeadSelection, Failure};
use crate::task::{LeaseId, NewTask, QueueName, TaskId, truncate_error_message};

pub use subscription::SubscriptionStream;
pub use watch::{QueueStatsStream, TaskWatchStream};

/// Maximum weight of one queue in a subscription.
const MAX_WEIGHT: u32 = 100;

/// Maximum page size of ListDeadTasks, and the page size when the request sets none.
const MAX_PAGE_SIZE: usize = 1000;
const DEFAULT_PAGE_SIZE: usize = 100;

pub use self::ready::WhenReady;

/// The gRPC service over a shared [`Broker`].
pub struct BrokerService {
    broker: Arc<Broker>,
}

impl BrokerService {
    /// Wraps the broker for tonic.
    pub fn new(broker: Arc<Broker>) -> Self {
        BrokerService { broker }
    }

    fn check_batch_len(&self, field: &str, len: usize) -> Result<(), BrokerError> {
        let limit = self.broker.limits.max_batch_size;
        if len == 0 {
            return Err(BrokerError::invalid(
                field,
                "the batch is empty: send at least one item",
            ));
        }
        if len > limit {
            return Err(BrokerError::invalid(
                field,
                format!("batch of {len} items exceeds the limit of {limit}; split it"),
            ));
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl broker_server::Broker for BrokerService {
    async fn enqueue(
        &self,
        request: Request<v1::EnqueueRequest>,
    ) -> Result<Response<v1::EnqueueResponse>, Status> {
        let tasks = request.into_inner().tasks;
        self.check_batch_len("tasks", tasks.len())?;
        let limits = &self.broker.limits;
        let tasks = tasks
            .into_iter()
            .enumerate()
            .map(|(index, task)| NewTask::validate(index, task, limits))
            .collect::<Result<Vec<_>, _>>()?;

        let enqueued = self.broker.enqueue(tasks).await?;
        tracing::debug!(tasks = enqueued.len(), "enqueued");
        Ok(Response::new(v1::EnqueueResponse {
            task_ids: enqueued.iter().map(|task| task.id.to_string()).collect(),
            duplicates: enqueued.iter().map(|task| task.duplicate).collect(),
        }))
    }

    type SubscribeStream = SubscriptionStream;

    async fn subscribe(
        &self,
        request: Request<v1::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let subscription = self.validate_subscription(request.into_inner())?;
        self.broker.ensure_running()?;
        let (id, deliveries) = self.broker.subscribe(subscription);
        tracing::debug!(subscriber = id, "subscribed");
        let stop_token = self.broker.dispatcher.stop_token(id);
        let mut response = Response::new(SubscriptionStream::new(
            id,
            deliveries,
            Arc::clone(&self.broker),
        ));
        // The token is 32 hex digits, always a valid header value.
        if let Some(value) = stop_token.and_then(|token| MetadataValue::try_from(token).ok()) {
            response
                .metadata_mut()
                .insert(SUBSCRIPTION_ID_HEADER, value);
        }
        Ok(response)
    }

    async fn stop_deliveries(
        &self,
        request: Request<v1::StopDeliveriesRequest>,
    ) -> Result<Response<v1::StopDeliveriesResponse>, Status> {
        let subscription_id = request.into_inner().subscription_id;
        match self.broker.dispatcher.stop_deliveries(&subscription_id) {
            Some(leases_held) => {
                tracing::debug!(leases_held, "deliveries stopped on a subscription");
                Ok(Response::new(v1::StopDeliveriesResponse { leases_held }))
            }
            None => Err(Status::not_found(format!(
                "subscription_id {subscription_id:?} names no open Subscribe stream: use the \
                 {SUBSCRIPTION_ID_HEADER} header of a Subscribe response while its stream is open"
            ))),
        }
    }

    async fn ack(
        &self,
        request: Request<v1::AckRequest>,
    ) -> Result<Response<v1::AckResponse>, Status> {
        let acks = request.into_inner().acks;
        self.check_batch_len("acks", acks.len())?;
        let lease_ids: Vec<String> = acks.iter().map(|ack| ack.lease_id.clone()).collect();
        let items = acks
            .into_iter()
            .enumerate()
            .map(|(index, ack)| AckItem {
                lease_id: LeaseId::parse(&format!("acks[{index}].lease_id"), &ack.lease_id),
                result: ack.result,
            })
            .collect();

        let outcomes = self.broker.ack(items).await?;
        let results = lease_ids
            .into_iter()
            .zip(outcomes)
            .map(|(lease_id, outcome)| convert::settle_result(lease_id, outcome));
        Ok(Response::new(v1::AckResponse {
            results: results.collect(),
        }))
    }

    async fn nack(
        &self,
        request: Request<v1::NackRequest>,
    ) -> Result<Response<v1::NackResponse>, Status> {
        let nacks = request.into_inner().nacks;
        self.check_batch_len("nacks", nacks.len())?;
        let lease_ids: Vec<String> = nacks.iter().map(|nack| nack.lease_id.clone()).collect();
        let items = nacks
            .into_iter()
            .enumerate()
            .map(|(index, nack)| {
                let lease_id = LeaseId::parse(&format!("nacks[{index}].lease_id"), &nack.lease_id)
                    .and_then(|lease_id| {
                        let retry_delay = convert::retry_delay(
                            &format!("nacks[{index}].retry_delay"),
                            &nack.retry_delay,
                        )?;
                        if nack.release && (nack.no_retry || retry_delay.is_some()) {
                            return Err(BrokerError::invalid(
                                format!("nacks[{index}].release"),
                                "a released task was not started, so it cannot also set \
                                 no_retry or retry_delay",
                            ));
                        }
                        Ok((lease_id, retry_delay))
                    });
                match lease_id {
                    Ok((lease_id, retry_delay)) => NackItem {
                        lease_id: Ok(lease_id),
                        failure: Failure {
                            error: truncate_error_message(nack.error),
                            retry_delay,
                            no_retry: nack.no_retry,
                            release: nack.release,
                        },
                    },
                    Err(err) => NackItem {
                        lease_id: Err(err),
                        failure: Failure::released(""),
                    },
                }
            })
            .collect();

        let outcomes = self.broker.nack(items).await?;
        let results = lease_ids
            .into_iter()
            .zip(outcomes)
            .map(|(lease_id, outcome)| convert::settle_result(lease_id, outcome));
        Ok(Response::new(v1::NackResponse {
            results: results.collect(),
        }))
    }

    async fn extend_lease(
        &self,
        request: Request<v1::ExtendLeaseRequest>,
    ) -> Result<Response<v1::ExtendLeaseResponse>, Status> {
        let request = request.into_inner();
        let lease_id = LeaseId::parse("lease_id", &request.lease_id)?;
        let Some(extension) = &request.extension else {
            return Err(BrokerError::invalid(
                "extension",
                "missing: set the time from now until the new deadline",
            )
            .into());
        };
        let extension = convert::duration_in(
            "extension",
            extension,
            Duration::from_secs(1),
            self.broker.limits.max_lease_duration,
        )?;
        let (deadline, cancel_requested) = self.broker.extend_lease(&lease_id, extension)?;
        Ok(Response::new(v1::ExtendLeaseResponse {
            lease_deadline: Some(deadline.into()),
            cancel_requested,
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

    type WatchTaskStream = TaskWatchStream;

    async fn watch_task(
        &self,
        request: Request<v1::WatchTaskRequest>,
    ) -> Result<Response<Self::WatchTaskStream>, Status> {
        let task_id = TaskId::parse("task_id", &request.into_inner().task_id)?;
        let stream = TaskWatchStream::start(Arc::clone(&self.broker), task_id).await?;
        Ok(Response::new(stream))
    }

    async fn cancel_task(
        &self,
        request: Request<v1::CancelTaskRequest>,
    ) -> Result<Response<v1::CancelTaskResponse>, Status> {
        let task_id = TaskId::parse("task_id", &request.into_inner().task_id)?;
        let state = self.broker.cancel_task(task_id).await?;
        tracing::info!(%task_id, state = state.as_str_name(), "task cancelled");
        Ok(Response::new(v1::CancelTaskResponse {
            state: state.into(),
        }))
    }

    async fn list_queues(
        &self,
        _request: Request<v1::ListQueuesRequest>,
    ) -> Result<Response<v1::ListQueuesResponse>, Status> {
        Ok(Response::new(v1::ListQueuesResponse {
            queues: self.broker.list_queues().await?,
        }))
    }

    async fn get_queue_stats(
        &self,
        request: Request<v1::GetQueueStatsRequest>,
    ) -> Result<Response<v1::GetQueueStatsResponse>, Status> {
        let queue = QueueName::parse("queue", &request.into_inner().queue)?;
        Ok(Response::new(v1::GetQueueStatsResponse {
            stats: Some(self.broker.queue_stats(&queue).await?),
        }))
    }

    type WatchQueueStatsStream = QueueStatsStream;

    async fn watch_queue_stats(
        &self,
        request: Request<v1::WatchQueueStatsRequest>,
    ) -> Result<Response<Self::WatchQueueStatsStream>, Status> {
        let request = request.into_inner();
        let queue = QueueName::parse("queue", &request.queue)?;
        let interval = match &request.interval {
            None => Duration::from_secs(1),
            Some(interval) => convert::duration_in(
                "interval",
                interval,
                Duration::from_millis(100),
                Duration::from_secs(3600),
            )?,
        };
        Ok(Response::new(QueueStatsStream::new(
            Arc::clone(&self.broker),
            queue,
            interval,
        )))
    }

    async fn pause_queue(
        &self,
        request: Request<v1::PauseQueueRequest>,
    ) -> Result<Response<v1::PauseQueueResponse>, Status> {
        let queue = QueueName::parse("queue", &request.into_inner().queue)?;
        self.broker.set_paused(queue.clone(), true).await?;
        tracing::info!(%queue, "queue paused");
        Ok(Response::new(v1::PauseQueueResponse {}))
    }

    async fn resume_queue(
        &self,
        request: Request<v1::ResumeQueueRequest>,
    ) -> Result<Response<v1::ResumeQueueResponse>, Status> {
        let queue = QueueName::parse("queue", &request.into_inner().queue)?;
        self.broker.set_paused(queue.clone(), false).await?;
        tracing::info!(%queue, "queue resumed");
        Ok(Response::new(v1::ResumeQueueResponse {}))
    }

    async fn purge_queue(
        &self,
        request: Request<v1::PurgeQueueRequest>,
    ) -> Result<Response<v1::PurgeQueueResponse>, Status> {
        let queue = QueueName::parse("queue", &request.into_inner().queue)?;
        let purged = self.broker.purge_queue(&queue).await?;
        tracing::info!(%queue, purged, "queue purged");
        Ok(Response::new(v1::PurgeQueueResponse { purged }))
    }

    async fn get_queue_settings(
        &self,
        request: Request<v1::GetQueueSettingsRequest>,
    ) -> Result<Response<v1::GetQueueSettingsResponse>, Status> {
        let queue = QueueName::parse("queue", &request.into_inner().queue)?;
        let settings = self.broker.queue_settings(&queue);
        Ok(Response::new(v1::GetQueueSettingsResponse {
            settings: Some(convert::wire_settings(&settings)),
        }))
    }

    async fn update_queue_settings(
        &self,
        request: Request<v1::UpdateQueueSettingsRequest>,
    ) -> Result<Response<v1::UpdateQueueSettingsResponse>, Status> {
        let request = request.into_inner();
        let queue = QueueName::parse("queue", &request.queue)?;
        let Some(settings) = &request.settings else {
            return Err(
                BrokerError::invalid("settings", "missing: set the fields to change").into(),
            );
        };
        let patch = convert::settings_patch(settings, self.broker.limits.max_lease_duration)?;
        let settings = self
            .broker
            .update_queue_settings(queue.clone(), patch)
            .await?;
        tracing::info!(%queue, "queue settings updated");
        Ok(Response::new(v1::UpdateQueueSettingsResponse {
            settings: Some(convert::wire_settings(&settings)),
        }))
    }

    async fn list_dead_tasks(
        &self,
        request: Request<v1::ListDeadTasksRequest>,
    ) -> Result<Response<v1::ListDeadTasksResponse>, Status> {
        let request = request.into_inner();
        let queue = QueueName::parse("queue", &request.queue)?;
        let page_size = match request.page_size as usize {
            0 => DEFAULT_PAGE_SIZE,
            size if size > MAX_PAGE_SIZE => {
                return Err(BrokerError::invalid(
                    "page_size",
                    format!("page_size {size} exceeds the limit of {MAX_PAGE_SIZE}"),
                )
                .into());
            }
            size => size,
        };
        let after = parse_page_token(&request.page_token)?;
        let (tasks, next) = self.broker.list_dead(queue, after, page_size).await?;
        Ok(Response::new(v1::ListDeadTasksResponse {
            tasks,
            next_page_token: next
                .map(|(died_at, task)| format!("{died_at}.{task}"))
                .unwrap_or_default(),
        }))
    }

    async fn requeue_dead_tasks(
        &self,
        request: Request<v1::RequeueDeadTasksRequest>,
    ) -> Result<Response<v1::RequeueDeadTasksResponse>, Status> {
        let request = request.into_inner();
        let queue = QueueName::parse("queue", &request.queue)?;
        let selection = self.dead_selection(&request.task_ids, request.all)?;
        let requeued = self.broker.requeue_dead(queue.clone(), selection).await?;
        tracing::info!(%queue, requeued, "dead tasks requeued");
        Ok(Response::new(v1::RequeueDeadTasksResponse { requeued }))
    }

    async fn delete_dead_tasks(
        &self,
        request: Request<v1::DeleteDeadTasksRequest>,
    ) -> Result<Response<v1::DeleteDeadTasksResponse>, Status> {
        let request = request.into_inner();
        let queue = QueueName::parse("queue", &request.queue)?;
        let selection = self.dead_selection(&request.task_ids, request.all)?;
        let deleted = self.broker.delete_dead(queue.clone(), selection).await?;
        tracing::info!(%queue, deleted, "dead tasks deleted");
        Ok(Response::new(v1::DeleteDeadTasksResponse { deleted }))
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
            let weight = request.weights.get(name).copied().unwrap_or(1);
            if weight == 0 || weight > MAX_WEIGHT {
                return Err(BrokerError::invalid(
                    format!("weights[{name:?}]"),
                    format!("weight {weight} is out of range: use 1 to {MAX_WEIGHT}"),
                ));
            }
            queues.push((queue, weight));
        }
        if let Some(unknown) = request
            .weights
            .keys()
            .find(|name| !seen.iter().any(|queue| queue.as_str() == name.as_str()))
        {
            return Err(BrokerError::invalid(
                format!("weights[{unknown:?}]"),
                format!("queue {unknown:?} has a weight but is not in queues"),
            ));
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

        let lease_duration = match &request.lease_duration {
            None => None,
            Some(duration) => Some(convert::duration_in(
                "lease_duration",
                duration,
                Duration::from_secs(1),
                limits.max_lease_duration,
            )?),
        };

        Ok(Subscription {
            queues,
            max_in_flight,
            lease_duration,
        })
    }

    fn dead_selection(&self, task_ids: &[String], all: bool) -> Result<DeadSelection, BrokerError> {
        if all {
            if !task_ids.is_empty() {
                return Err(BrokerError::invalid(
                    "task_ids",
                    "must be empty when all is set",
                ));
            }
            return Ok(DeadSelection::All);
        }
        self.check_batch_len("task_ids", task_ids.len())?;
        let ids = task_ids
            .iter()
            .enumerate()
            .map(|(index, id)| TaskId::parse(&format!("task_ids[{index}]"), id))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(DeadSelection::Ids(ids))
    }
}

/// Parses a ListDeadTasks page token: the time of death and task key of the previous
/// page's last entry.
fn parse_page_token(token: &str) -> Result<Option<(i64, u128)>, BrokerError> {
    if token.is_empty() {
        return Ok(None);
    }
    let parsed = token
        .split_once('.')
        .and_then(|(died_at, task)| Some((died_at.parse().ok()?, task.parse().ok()?)));
    match parsed {
        Some(position) => Ok(Some(position)),
        None => Err(BrokerError::invalid(
            "page_token",
            format!("invalid page token {token:?}: pass next_page_token of the previous response"),
        )),
    }
}
