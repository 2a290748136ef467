//! The broker's gRPC service while the store is still being recovered.

use std::convert::Infallible;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use docket_proto::v1::broker_server::BrokerServer;
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::{BoxFuture, Service, http};
use tonic::server::NamedService;

use super::BrokerService;

/// Serves `docket.v1.Broker` once the broker is ready, and fails every call before then
/// with `UNAVAILABLE`, so that the port, the health service and reflection work while the
/// store is recovered.
#[derive(Clone)]
pub struct WhenReady {
    ready: Arc<OnceLock<BrokerServer<BrokerService>>>,
}

impl WhenReady {
    /// Creates the gate; calls go through once `ready` is set.
    pub fn new(ready: Arc<OnceLock<BrokerServer<BrokerService>>>) -> Self {
        WhenReady { ready }
    }
}

impl Service<http::Request<Body>> for WhenReady {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        match self.ready.get() {
            Some(server) => {
                let mut server = server.clone();
                Box::pin(async move { server.call(request).await })
            }
            None => {
                let status = Status::unavailable(
                    "the broker is starting and recovers its store; retry shortly",
                );
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}

impl NamedService for WhenReady {
    const NAME: &'static str = <BrokerServer<BrokerService> as NamedService>::NAME;
}
