//! The lease expiry loop: sleeps until the earliest lease deadline, then records every
//! expired lease as a failed attempt so that its task is offered again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::Dispatcher;
use crate::store::writer::{WriteOp, WriterHandle};

/// Error stored on a task whose lease expired.
pub const LEASE_EXPIRED: &str = "lease expired";

/// Maximum sleep when no lease is live. A new lease wakes the loop earlier.
const IDLE_SLEEP: Duration = Duration::from_secs(60);

/// Runs until `shutdown` is cancelled.
pub async fn run(dispatcher: Arc<Dispatcher>, writer: WriterHandle, shutdown: CancellationToken) {
    loop {
        let wake_at = dispatcher
            .next_deadline()
            .unwrap_or_else(|| Instant::now() + IDLE_SLEEP);
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = dispatcher.earliest_deadline_changed() => continue,
            () = tokio::time::sleep_until(wake_at.into()) => {}
        }

        for task in dispatcher.expire_due(Instant::now()) {
            let op = WriteOp::Fail {
                task,
                error: LEASE_EXPIRED.to_owned(),
                reply: None,
            };
            if writer.send(op).await.is_err() {
                return;
            }
        }
    }
}
