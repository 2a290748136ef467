//! Domain types of the broker: ids and names validated once at the wire boundary.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use prost::bytes::Bytes;
use uuid::Uuid;

use crate::config::MAX_ATTEMPTS_LIMIT;
use crate::error::BrokerError;
use crate::retry::RetryPolicy;

/// Maximum length of a queue name or task kind, in bytes.
pub const MAX_NAME_LEN: usize = 128;

/// Maximum size of all header keys and values of one task together, in bytes.
pub const MAX_HEADERS_BYTES: usize = 16 * 1024;

/// Maximum length of an idempotency key, in bytes.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 256;

/// Nack error messages longer than this many bytes are truncated before they are stored.
pub const MAX_ERROR_MESSAGE_BYTES: usize = 4096;

/// Id of a task: a UUIDv7, so ids sort by creation time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TaskId(Uuid);

impl TaskId {
    /// Creates a new id from the system's random source. Ids made by one process are
    /// strictly increasing. The storage writer uses a [`TaskIdGenerator`] instead, which
    /// needs no system call per id.
    pub fn generate() -> Self {
        TaskId(Uuid::now_v7())
    }

    /// Parses the id in request field `field`.
    pub fn parse(field: &str, text: &str) -> Result<Self, BrokerError> {
        match Uuid::try_parse(text) {
            Ok(uuid) => Ok(TaskId(uuid)),
            Err(_) => Err(BrokerError::invalid(
                field,
                format!("invalid task id {text:?}: expected a UUID as returned by Enqueue"),
            )),
        }
    }

    /// Returns the id as the key of the tasks table.
    pub fn as_key(self) -> u128 {
        self.0.as_u128()
    }

    /// Rebuilds an id from a tasks-table key.
    pub fn from_key(key: u128) -> Self {
        TaskId(Uuid::from_u128(key))
    }
}

/// Bits of a UUIDv7 below its 48-bit millisecond timestamp that are free for a counter:
/// 12 bits of `rand_a` and 62 bits of `rand_b`.
const COUNTER_BITS: u32 = 74;

/// Makes strictly increasing UUIDv7 task ids from a seeded generator.
///
/// Within one millisecond the ids count up from a random start below half of the counter
/// space, which leaves room for at least 2^73 ids. A new millisecond draws a new start. If
/// the clock goes back, the ids keep counting from the last one.
pub struct TaskIdGenerator<R> {
    rng: R,
    millis: u64,
    counter: u128,
}

impl<R: rand::RngCore> TaskIdGenerator<R> {
    /// Creates a generator that draws the random part of its ids from `rng`.
    pub fn new(rng: R) -> Self {
        TaskIdGenerator {
            rng,
            millis: 0,
            counter: 0,
        }
    }

    /// Returns the next id for a task created at `now_millis` since the Unix epoch.
    pub fn next(&mut self, now_millis: u64) -> TaskId {
        if now_millis > self.millis {
            self.millis = now_millis;
            let random = u128::from(self.rng.next_u64()) << 64 | u128::from(self.rng.next_u64());
            self.counter = random & ((1 << (COUNTER_BITS - 1)) - 1);
        } else {
            self.counter += 1;
            if self.counter >> COUNTER_BITS != 0 {
                self.millis += 1;
                self.counter = 0;
            }
        }
        let rand_a = (self.counter >> 62) & 0xfff;
        let rand_b = self.counter & ((1 << 62) - 1);
        let value = u128::from(self.millis & ((1 << 48) - 1)) << 80
            | 0x7 << 76
            | rand_a << 64
            | 0b10 << 62
            | rand_b;
        TaskId(Uuid::from_u128(value))
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

/// Id of one delivery of one attempt. Random, so a stale lease id is never reused.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LeaseId(Arc<str>);

impl LeaseId {
    /// Creates a new random lease id: a version-4 UUID from the thread's cryptographically
    /// secure generator, which `rand` seeds from the system once per thread rather than
    /// with a system call per id.
    pub fn generate() -> Self {
        let bytes: [u8; 16] = rand::random();
        let uuid = uuid::Builder::from_random_bytes(bytes).into_uuid();
        LeaseId(uuid.hyphenated().to_string().into())
    }

    /// Wraps the lease id in request field `field`. Any non-empty text is accepted: an id
    /// that names no live lease is rejected later as not live.
    pub fn parse(field: &str, text: &str) -> Result<Self, BrokerError> {
        if text.is_empty() {
            return Err(BrokerError::invalid(
                field,
                "missing lease id: pass the lease_id of the delivery",
            ));
        }
        Ok(LeaseId(text.into()))
    }

    /// Returns the id as sent on the wire.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A valid queue name: 1 to 128 characters of `A-Z a-z 0-9 . _ -`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueueName(Arc<str>);

impl QueueName {
    /// Validates the queue name in request field `field`.
    pub fn parse(field: &str, text: &str) -> Result<Self, BrokerError> {
        let valid_chars = text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if text.is_empty() || text.len() > MAX_NAME_LEN || !valid_chars {
            return Err(BrokerError::invalid(
                field,
                format!(
                    "invalid queue name {text:?}: use 1 to {MAX_NAME_LEN} characters of A-Z, a-z, 0-9, '.', '_' and '-'"
                ),
            ));
        }
        Ok(QueueName(text.into()))
    }

    /// Returns the name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for QueueName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Limits that input validation enforces.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Maximum payload size in bytes.
    pub max_payload_bytes: usize,
    /// Maximum Ack result size in bytes.
    pub max_result_bytes: usize,
    /// Maximum number of tasks in one Enqueue.
    pub max_batch_size: usize,
    /// Maximum `max_in_flight` of a Subscribe stream.
    pub max_in_flight: u32,
    /// Maximum lease length a Subscribe request or ExtendLease may ask for.
    pub max_lease_duration: Duration,
}

/// A task from an Enqueue request that passed validation.
#[derive(Debug, Clone)]
pub struct NewTask {
    /// Queue to add the task to.
    pub queue: QueueName,
    /// Handler name.
    pub kind: String,
    /// Opaque input.
    pub payload: Bytes,
    /// Headers passed to the worker.
    pub headers: HashMap<String, String>,
    /// Delivery priority; higher first.
    pub priority: i32,
    /// Maximum attempts, at least 1; `None` takes the queue's default.
    pub max_attempts: Option<u32>,
    /// Backoff between attempts; `None` takes the queue's default.
    pub retry_policy: Option<RetryPolicy>,
    /// Key that makes the enqueue idempotent within the queue's window.
    pub idempotency_key: Option<String>,
}

impl NewTask {
    /// Validates the wire task at `tasks[index]` against `limits`.
    pub fn validate(
        index: usize,
        task: docket_proto::v1::NewTask,
        limits: &Limits,
    ) -> Result<Self, BrokerError> {
        Self::validate_at(&format!("tasks[{index}]"), task, limits)
    }

    /// Validates a wire task found at the field path `path` of a request, such as `task`,
    /// against `limits`. Error messages name fields below `path`.
    pub fn validate_at(
        path: &str,
        task: docket_proto::v1::NewTask,
        limits: &Limits,
    ) -> Result<Self, BrokerError> {
        let field = |name: &str| format!("{path}.{name}");

        let queue = QueueName::parse(&field("queue"), &task.queue)?;
        validate_kind(&field("kind"), &task.kind)?;
        if task.payload.len() > limits.max_payload_bytes {
            return Err(BrokerError::invalid(
                field("payload"),
                format!(
                    "payload of {} bytes exceeds the limit of {} bytes",
                    task.payload.len(),
                    limits.max_payload_bytes
                ),
            ));
        }
        validate_headers(&field("headers"), &task.headers)?;
        let max_attempts = match task.max_attempts {
            0 => None,
            n if n > MAX_ATTEMPTS_LIMIT => {
                return Err(BrokerError::invalid(
                    field("max_attempts"),
                    format!("max_attempts {n} exceeds the limit of {MAX_ATTEMPTS_LIMIT}"),
                ));
            }
            n => Some(n),
        };
        let retry_policy = match &task.retry_policy {
            Some(policy) => Some(RetryPolicy::validate(&field("retry_policy"), policy)?),
            None => None,
        };
        let idempotency_key = match task.idempotency_key.as_str() {
            "" => None,
            key if key.len() > MAX_IDEMPOTENCY_KEY_LEN || key.chars().any(char::is_control) => {
                return Err(BrokerError::invalid(
                    field("idempotency_key"),
                    format!(
                        "invalid idempotency key {key:?}: use at most {MAX_IDEMPOTENCY_KEY_LEN} bytes without control characters"
                    ),
                ));
            }
            key => Some(key.to_owned()),
        };

        Ok(NewTask {
            queue,
            kind: task.kind,
            payload: task.payload,
            headers: task.headers,
            priority: task.priority,
            max_attempts,
            retry_policy,
            idempotency_key,
        })
    }
}

fn validate_kind(field: &str, kind: &str) -> Result<(), BrokerError> {
    let valid_chars = kind
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':' | b'/'));
    if kind.is_empty() || kind.len() > MAX_NAME_LEN || !valid_chars {
        return Err(BrokerError::invalid(
            field,
            format!(
                "invalid task kind {kind:?}: use 1 to {MAX_NAME_LEN} characters of A-Z, a-z, 0-9, '.', '_', '-', ':' and '/'"
            ),
        ));
    }
    Ok(())
}

fn validate_headers(field: &str, headers: &HashMap<String, String>) -> Result<(), BrokerError> {
    let mut total = 0;
    for (key, value) in headers {
        if key.is_empty() || key.len() > MAX_NAME_LEN || key.chars().any(char::is_control) {
            return Err(BrokerError::invalid(
                field,
                format!(
                    "invalid header key {key:?}: use 1 to {MAX_NAME_LEN} bytes without control characters"
                ),
            ));
        }
        if value.chars().any(char::is_control) {
            return Err(BrokerError::invalid(
                field,
                format!("value of header {key:?} contains a control character"),
            ));
        }
        total += key.len() + value.len();
    }
    if total > MAX_HEADERS_BYTES {
        return Err(BrokerError::invalid(
            field,
            format!("headers of {total} bytes exceed the limit of {MAX_HEADERS_BYTES} bytes"),
        ));
    }
    Ok(())
}

/// Truncates a Nack error message to at most `MAX_ERROR_MESSAGE_BYTES`, on a character
/// boundary.
pub fn truncate_error_message(mut message: String) -> String {
    if message.len() > MAX_ERROR_MESSAGE_BYTES {
        let mut end = MAX_ERROR_MESSAGE_BYTES;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_name_accepts_allowed_characters() {
        assert!(QueueName::parse("queue", "emails.high_priority-1").is_ok());
        assert!(QueueName::parse("queue", &"q".repeat(MAX_NAME_LEN)).is_ok());
    }

    #[test]
    fn queue_name_rejects_bad_values() {
        for bad in [
            "",
            "has space",
            "slash/queue",
            "ümlaut",
            &"q".repeat(MAX_NAME_LEN + 1),
        ] {
            let err = QueueName::parse("tasks[0].queue", bad).expect_err(bad);
            assert!(
                err.to_string()
                    .starts_with("tasks[0].queue: invalid queue name"),
                "{err}"
            );
        }
    }

    #[test]
    fn error_message_truncates_on_char_boundary() {
        let message = "é".repeat(MAX_ERROR_MESSAGE_BYTES);
        let truncated = truncate_error_message(message);
        assert!(truncated.len() <= MAX_ERROR_MESSAGE_BYTES);
        assert!(truncated.chars().all(|c| c == 'é'));
    }

    #[test]
    fn task_id_round_trips_through_key() {
        let id = TaskId::generate();
        assert_eq!(TaskId::from_key(id.as_key()), id);
        assert_eq!(
            TaskId::parse("task_id", &id.to_string()).expect("valid id"),
            id
        );
    }

    #[test]
    fn task_ids_increase() {
        let first = TaskId::generate();
        let second = TaskId::generate();
        assert!(second > first);
    }

    #[test]
    fn lease_ids_are_distinct_version_4_uuids() {
        let first = LeaseId::generate();
        let second = LeaseId::generate();
        assert_ne!(first, second);
        let uuid = Uuid::try_parse(&first.0).expect("lease id is a UUID");
        assert_eq!(uuid.get_version_num(), 4);
        assert_eq!(uuid.get_variant(), uuid::Variant::RFC4122);
    }

    #[test]
    fn generated_ids_are_increasing_version_7_uuids() {
        use rand::SeedableRng;

        let mut ids = TaskIdGenerator::new(rand::rngs::StdRng::seed_from_u64(7));
        let millis = 1_780_000_000_000;
        let mut previous = ids.next(millis);
        // The same millisecond, a later one, and a clock that went back.
        for now in [
            millis,
            millis,
            millis + 1,
            millis + 1,
            millis - 5,
            millis + 2,
        ] {
            let id = ids.next(now);
            assert!(id > previous, "{id} follows {previous}");
            assert_eq!(id.0.get_version_num(), 7);
            assert_eq!(id.0.get_variant(), uuid::Variant::RFC4122);
            previous = id;
        }
        let (seconds, _) = previous.0.get_timestamp().expect("v7 timestamp").to_unix();
        assert_eq!(seconds, (millis + 2) / 1000);
    }

    #[test]
    fn generator_carries_into_the_next_millisecond() {
        use rand::SeedableRng;

        let mut ids = TaskIdGenerator::new(rand::rngs::StdRng::seed_from_u64(1));
        let first = ids.next(1000);
        ids.counter = (1 << COUNTER_BITS) - 1;
        let carried = ids.next(1000);
        assert!(carried > first);
        assert_eq!(ids.millis, 1001);
        let later = ids.next(1001);
        assert!(later > carried);
    }
}
