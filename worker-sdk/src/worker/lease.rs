//! Lease extension while a handler runs, and the registry that routes cancellation
//! notices to running handlers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use docket_proto::v1::ExtendLeaseRequest;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::Client;

/// Shortest extension the broker accepts.
const MIN_EXTENSION: Duration = Duration::from_secs(1);

/// Lease length assumed for a delivery without a deadline, the broker's default.
const DEFAULT_LEASE: Duration = Duration::from_secs(30);

/// Shortest wait between two ExtendLease calls, so that a lease that is about to expire
/// is not extended in a busy loop.
const MIN_EXTEND_INTERVAL: Duration = Duration::from_millis(100);

/// Cancellation senders of the running deliveries, by lease id.
#[derive(Debug, Clone, Default)]
pub(super) struct CancelRegistry {
    running: Arc<Mutex<HashMap<String, Arc<watch::Sender<bool>>>>>,
}

impl CancelRegistry {
    /// Registers a running delivery. It stays registered until the returned guard is
    /// dropped.
    pub(super) fn register(
        &self,
        lease_id: &str,
        cancellation: Arc<watch::Sender<bool>>,
    ) -> Registration {
        self.lock().insert(lease_id.to_owned(), cancellation);
        Registration {
            registry: self.clone(),
            lease_id: lease_id.to_owned(),
        }
    }

    /// Marks the delivery under `lease_id` as cancelled. Returns `false` if no delivery
    /// under that lease runs.
    pub(super) fn cancel(&self, lease_id: &str) -> bool {
        match self.lock().get(lease_id) {
            Some(cancellation) => {
                cancellation.send_replace(true);
                true
            }
            None => false,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<watch::Sender<bool>>>> {
        // The map stays consistent even if a holder panicked, because every change is a
        // single insert or remove.
        self.running.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Removes a delivery from the [`CancelRegistry`] when dropped.
pub(super) struct Registration {
    registry: CancelRegistry,
    lease_id: String,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.lease_id);
    }
}

/// Extends one lease for as long as the future runs, and marks the delivery as
/// cancelled when the broker reports a cancellation or rejects the lease as expired or
/// settled.
pub(super) struct LeaseKeeper<'a> {
    pub(super) client: &'a Client,
    pub(super) task_id: &'a str,
    pub(super) lease_id: &'a str,
    /// Lease length the worker asked for in Subscribe, or `None` for the broker's default.
    pub(super) lease_duration: Option<Duration>,
    pub(super) cancellation: &'a watch::Sender<bool>,
}

impl LeaseKeeper<'_> {
    /// Calls ExtendLease each time half of the time left on the lease has passed,
    /// extending it by the lease length, and stores each new deadline in `deadline`.
    ///
    /// The future stops extending only after the broker rejects the lease with
    /// FAILED_PRECONDITION, and then never completes. The caller drops it when the
    /// handler ends.
    pub(super) async fn run(&self, deadline: &mut Option<SystemTime>) {
        // NOTE: the time left is the broker's deadline minus this host's clock, so clock
        // skew between the two hosts shortens or lengthens the first wait.
        let remaining = time_left(*deadline).unwrap_or(DEFAULT_LEASE);
        // Without a configured length, the time left on the delivery approximates the
        // broker's default lease length.
        let extension = self.lease_duration.unwrap_or(remaining).max(MIN_EXTENSION);
        let mut local_deadline = Instant::now() + remaining;

        loop {
            let left = local_deadline.saturating_duration_since(Instant::now());
            tokio::time::sleep((left / 2).max(MIN_EXTEND_INTERVAL)).await;

            let called_at = Instant::now();
            let request = ExtendLeaseRequest {
                lease_id: self.lease_id.to_owned(),
                extension: prost_types::Duration::try_from(extension).ok(),
            };
            match self.client.grpc().extend_lease(request).await {
                Ok(response) => {
                    let response = response.into_inner();
                    local_deadline = called_at + extension;
                    *deadline = response
                        .lease_deadline
                        .and_then(|deadline| SystemTime::try_from(deadline).ok());
                    debug!(
                        task_id = self.task_id,
                        lease_id = self.lease_id,
                        extension_ms = extension.as_millis(),
                        "lease extended"
                    );
                    if response.cancel_requested && !self.cancellation.send_replace(true) {
                        info!(
                            task_id = self.task_id,
                            lease_id = self.lease_id,
                            "task cancelled while running; signalling the handler"
                        );
                    }
                }
                Err(status) if status.code() == tonic::Code::FailedPrecondition => {
                    warn!(
                        task_id = self.task_id, lease_id = self.lease_id,
                        error = %status.message(),
                        "lease extension rejected: the lease expired or was settled; \
                         signalling the handler to stop"
                    );
                    self.cancellation.send_replace(true);
                    return std::future::pending().await;
                }
                Err(status) => {
                    // The next try comes after half of the time still left.
                    warn!(
                        task_id = self.task_id, lease_id = self.lease_id,
                        code = ?status.code(), error = %status.message(),
                        "lease extension failed; retrying"
                    );
                }
            }
        }
    }
}

/// Returns the time from now until `deadline`, or `None` if there is no deadline.
fn time_left(deadline: Option<SystemTime>) -> Option<Duration> {
    let deadline = deadline?;
    Some(
        deadline
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_cancels_only_registered_leases() {
        let registry = CancelRegistry::default();
        let cancellation = Arc::new(watch::Sender::new(false));

        let registration = registry.register("lease-1", Arc::clone(&cancellation));
        assert!(!registry.cancel("lease-2"));
        assert!(!*cancellation.borrow());
        assert!(registry.cancel("lease-1"));
        assert!(*cancellation.borrow());

        drop(registration);
        assert!(!registry.cancel("lease-1"));
    }
}
