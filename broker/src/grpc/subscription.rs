//! The response stream of one Subscribe call: deliveries from the dispatcher, heartbeats,
//! and an end with `UNAVAILABLE` when the broker shuts down.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::SystemTime;

use docket_proto::v1::{Heartbeat, SubscribeResponse, subscribe_response::Event};
use tokio::sync::mpsc;
use tokio::time::{Interval, MissedTickBehavior};
use tokio_stream::Stream;
use tokio_util::sync::WaitForCancellationFutureOwned;
use tonic::Status;

use crate::broker::Broker;
use crate::dispatch::SubscriberId;

/// Stream of one subscriber. Dropping it, as tonic does when the client goes away,
/// releases the subscriber's leases.
pub struct SubscriptionStream {
    id: SubscriberId,
    deliveries: mpsc::Receiver<SubscribeResponse>,
    heartbeat: Interval,
    shutdown: Pin<Box<WaitForCancellationFutureOwned>>,
    broker: Arc<Broker>,
    finished: bool,
}

impl SubscriptionStream {
    pub(crate) fn new(
        id: SubscriberId,
        deliveries: mpsc::Receiver<SubscribeResponse>,
        broker: Arc<Broker>,
    ) -> Self {
        let period = broker.heartbeat_interval();
        let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        SubscriptionStream {
            id,
            deliveries,
            heartbeat,
            shutdown: Box::pin(broker.shutdown.clone().cancelled_owned()),
            broker,
            finished: false,
        }
    }
}

impl Stream for SubscriptionStream {
    type Item = Result<SubscribeResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.finished {
            return Poll::Ready(None);
        }
        if self.shutdown.as_mut().poll(cx).is_ready() {
            self.finished = true;
            let status = Status::unavailable(
                "the broker is shutting down; reconnect to receive the remaining tasks",
            );
            return Poll::Ready(Some(Err(status)));
        }
        match self.deliveries.poll_recv(cx) {
            Poll::Ready(Some(delivery)) => return Poll::Ready(Some(Ok(delivery))),
            Poll::Ready(None) => {
                self.finished = true;
                return Poll::Ready(None);
            }
            Poll::Pending => {}
        }
        if self.heartbeat.poll_tick(cx).is_ready() {
            let heartbeat = SubscribeResponse {
                event: Some(Event::Heartbeat(Heartbeat {
                    server_time: Some(SystemTime::now().into()),
                })),
            };
            return Poll::Ready(Some(Ok(heartbeat)));
        }
        Poll::Pending
    }
}

impl Drop for SubscriptionStream {
    fn drop(&mut self) {
        tracing::debug!(subscriber = self.id, "subscription closed");
        self.broker.unsubscribe(self.id);
    }
}
