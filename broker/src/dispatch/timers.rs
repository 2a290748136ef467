//! Background loops driven by time: lease expiry with retry promotion, and the purge of
//! expired tasks and idempotency keys.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::Dispatcher;
use crate::store::now_micros;
use crate::store::writer::{Failure, WriteOp, WriterHandle};

/// Error stored on a task whose lease expired.
pub const LEASE_EXPIRED: &str = "lease expired";

/// Maximum sleep when no lease is live and no task waits for a retry. A new lease or retry
/// wakes the loop earlier.
const IDLE_SLEEP: Duration = Duration::from_secs(60);

/// Expires leases and promotes due retries until `shutdown` is cancelled. Each expired
/// lease is recorded as a failed attempt.
pub async fn run_leases_and_retries(
    dispatcher: Arc<Dispatcher>,
    writer: WriterHandle,
    shutdown: CancellationToken,
) {
    loop {
        let now = Instant::now();
        let wake_at = dispatcher
            .next_timer(now, now_micros())
            .unwrap_or(now + IDLE_SLEEP);
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = dispatcher.timers_changed() => continue,
            () = tokio::time::sleep_until(wake_at.into()) => {}
        }

        for settled in dispatcher.expire_due(Instant::now()) {
            let op = WriteOp::Fail {
                settled,
                failure: Failure::released(LEASE_EXPIRED),
                reply: None,
            };
            if writer.send(op).await.is_err() {
                return;
            }
        }
        let now_us = now_micros();
        if dispatcher.retry_due(now_us) && writer.send(WriteOp::Promote { now_us }).await.is_err() {
            return;
        }
    }
}

/// Asks the storage writer to purge expired tasks and idempotency keys every `interval`,
/// until `shutdown` is cancelled.
pub async fn run_purge(writer: WriterHandle, interval: Duration, shutdown: CancellationToken) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        if writer.send(WriteOp::Purge).await.is_err() {
            return;
        }
    }
}
