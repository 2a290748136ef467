//! Conversions between stored records, the dispatcher's in-memory tasks and wire messages.

use std::sync::Arc;
use std::time::SystemTime;

use docket_proto::storage::{StateChangeRecord, TaskRecord, TaskRecordState};
use docket_proto::v1::{self, TaskState};

use super::timestamp_from_micros;
use crate::dispatch::{LeaseView, ReadyTask};
use crate::error::StoreError;
use crate::retry::RetryPolicy;
use crate::task::{QueueName, TaskId};

/// Returns whether a stored state is final: no further attempt follows.
pub fn is_final(state: TaskRecordState) -> bool {
    matches!(
        state,
        TaskRecordState::Succeeded | TaskRecordState::Dead | TaskRecordState::Cancelled
    )
}

/// Converts a stored state into the wire state.
pub fn wire_state(state: TaskRecordState) -> TaskState {
    match state {
        TaskRecordState::Unspecified => TaskState::Unspecified,
        TaskRecordState::Pending => TaskState::Pending,
        TaskRecordState::Succeeded => TaskState::Succeeded,
        TaskRecordState::Dead => TaskState::Dead,
        TaskRecordState::RetryWait => TaskState::RetryWait,
        TaskRecordState::Cancelled => TaskState::Cancelled,
        TaskRecordState::Leased => TaskState::Leased,
    }
}

/// Appends a state change to a record's history and makes it the current state, unless it
/// is LEASED, which is never a stored current state.
pub fn enter_state(record: &mut TaskRecord, state: TaskRecordState, at_us: i64) {
    record.state_history.push(StateChangeRecord {
        state: state.into(),
        at_us,
    });
    if state != TaskRecordState::Leased {
        record.set_state(state);
        record.updated_at_us = at_us;
    }
}

/// Builds the wire task from a record.
pub fn wire_task(task_id: TaskId, record: &TaskRecord) -> v1::Task {
    v1::Task {
        id: task_id.to_string(),
        queue: record.queue.clone(),
        kind: record.kind.clone(),
        payload: record.payload.clone(),
        headers: record.headers.clone(),
        priority: record.priority,
        max_attempts: record.max_attempts,
        created_at: Some(timestamp_from_micros(record.created_at_us)),
    }
}

/// Builds the in-memory form of a deliverable task from its record.
///
/// # Errors
///
/// `Corrupt` if the record's queue name is invalid, which validation at enqueue prevents.
pub fn ready_task(task_id: TaskId, record: &TaskRecord) -> Result<ReadyTask, StoreError> {
    let queue = QueueName::parse("queue", &record.queue).map_err(|_| StoreError::Corrupt {
        task_id,
        message: format!("invalid queue name {:?}", record.queue),
    })?;
    Ok(ready_task_in(queue, task_id, record))
}

/// Builds the in-memory form of a deliverable task from its record and its queue's name,
/// already validated.
pub fn ready_task_in(queue: QueueName, task_id: TaskId, record: &TaskRecord) -> ReadyTask {
    ReadyTask {
        id: task_id,
        queue,
        priority: record.priority,
        sequence: record.sequence,
        attempts: record.attempts,
        created_at_us: record.created_at_us,
        task: Arc::new(wire_task(task_id, record)),
    }
}

/// Builds a task's wire status from its record, with the live lease if it has one.
/// A retry wait that is over shows as PENDING.
pub fn task_status(
    task_id: TaskId,
    record: &TaskRecord,
    lease: Option<&LeaseView>,
    now_us: i64,
) -> v1::TaskStatus {
    let stored = record.state();
    let state = match (stored, lease) {
        (TaskRecordState::Pending | TaskRecordState::RetryWait, Some(_)) => TaskState::Leased,
        (TaskRecordState::RetryWait, None) if record.retry_at_us <= now_us => TaskState::Pending,
        (stored, _) => wire_state(stored),
    };

    let mut state_history: Vec<v1::StateChange> = record
        .state_history
        .iter()
        .map(|change| v1::StateChange {
            state: wire_state(change.state()).into(),
            at: Some(timestamp_from_micros(change.at_us)),
        })
        .collect();
    if let (TaskState::Leased, Some(lease)) = (state, lease) {
        state_history.push(v1::StateChange {
            state: TaskState::Leased.into(),
            at: Some(timestamp_from_micros(lease.started_at_us)),
        });
    }

    v1::TaskStatus {
        task: Some(wire_task(task_id, record)),
        state: state.into(),
        attempts: record.attempts,
        last_error: record.last_error.clone(),
        result: record.result.clone(),
        updated_at: Some(timestamp_from_micros(record.updated_at_us)),
        lease_deadline: lease
            .filter(|_| state == TaskState::Leased)
            .map(|lease| SystemTime::into(lease.deadline)),
        retry_at: (state == TaskState::RetryWait)
            .then(|| timestamp_from_micros(record.retry_at_us)),
        attempt_history: record
            .attempt_history
            .iter()
            .map(|attempt| v1::Attempt {
                number: attempt.number,
                started_at: Some(timestamp_from_micros(attempt.started_at_us)),
                finished_at: Some(timestamp_from_micros(attempt.finished_at_us)),
                error: attempt.error.clone(),
            })
            .collect(),
        state_history,
        cancel_requested: record.cancel_requested,
        retry_policy: record
            .retry_policy
            .as_ref()
            .map(|policy| RetryPolicy::from_record(policy).to_wire()),
        idempotency_key: record.idempotency_key.clone(),
    }
}
