//! The gRPC health service, `grpc.health.v1.Health`, of the broker and the scheduler.
//!
//! It reports one status for the whole server, `""`, and for the service it names. Unlike
//! tonic-health's server, it ends every Watch stream at shutdown after sending the final
//! NOT_SERVING, so that the server's graceful shutdown does not wait for health watchers.

use std::pin::Pin;

use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};
use tonic_health::ServingStatus;
use tonic_health::pb::health_check_response::ServingStatus as WireStatus;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

/// Sets the status that the health service reports. Dropping it, or calling
/// [`HealthStatus::close`], ends every Watch stream after its last status.
#[derive(Debug)]
pub struct HealthStatus {
    sender: watch::Sender<ServingStatus>,
}

impl HealthStatus {
    /// Reports `status` for the server and its service.
    pub fn set(&self, status: ServingStatus) {
        self.sender.send_if_modified(|current| {
            let changed = *current != status;
            *current = status;
            changed
        });
    }

    /// Returns the status reported now.
    pub fn get(&self) -> ServingStatus {
        *self.sender.borrow()
    }

    /// Reports NOT_SERVING for good and ends every Watch stream after it.
    pub fn close(self) {
        self.set(ServingStatus::NotServing);
    }
}

/// Creates the health service of the server that serves `service_name`, reporting
/// NOT_SERVING until [`HealthStatus::set`] changes it.
pub fn health_service(service_name: &'static str) -> (HealthStatus, HealthServer<HealthService>) {
    let (sender, receiver) = watch::channel(ServingStatus::NotServing);
    let service = HealthService {
        service_name,
        status: receiver,
    };
    (HealthStatus { sender }, HealthServer::new(service))
}

/// The `grpc.health.v1.Health` implementation.
#[derive(Debug)]
pub struct HealthService {
    service_name: &'static str,
    status: watch::Receiver<ServingStatus>,
}

impl HealthService {
    fn knows(&self, service: &str) -> bool {
        service.is_empty() || service == self.service_name
    }
}

fn response(status: ServingStatus) -> HealthCheckResponse {
    HealthCheckResponse {
        status: WireStatus::from(status).into(),
    }
}

#[tonic::async_trait]
impl Health for HealthService {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        let service = request.into_inner().service;
        if !self.knows(&service) {
            return Err(Status::not_found(format!(
                "service {service:?} is unknown: ask for \"\" or {:?}",
                self.service_name
            )));
        }
        Ok(Response::new(response(*self.status.borrow())))
    }

    type WatchStream =
        Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send + 'static>>;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let service = request.into_inner().service;
        if !self.knows(&service) {
            // The protocol keeps the call open with SERVICE_UNKNOWN. This server's set of
            // services never changes, so nothing follows, and the call ends at shutdown.
            let unknown = HealthCheckResponse {
                status: WireStatus::ServiceUnknown.into(),
            };
            let until_closed = WatchStream::new(self.status.clone())
                .filter_map(|_| None::<Result<HealthCheckResponse, Status>>);
            let stream = tokio_stream::once(Ok(unknown)).chain(until_closed);
            return Ok(Response::new(Box::pin(stream)));
        }
        let stream = WatchStream::new(self.status.clone()).map(|status| Ok(response(status)));
        Ok(Response::new(Box::pin(stream)))
    }
}
