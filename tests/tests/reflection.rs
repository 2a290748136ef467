//! gRPC server reflection on the broker and the scheduler: each lists exactly the
//! services it provides and describes them, so tools such as grpcurl need no `.proto`
//! files.

use std::collections::BTreeSet;

use anyhow::{Context, Result, bail};
use docket_tests::{SchedulerSetup, WAIT, within};
use tonic::transport::Channel;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::{ServerReflectionRequest, ServerReflectionResponse};
use tonic_reflection::pb::v1alpha;

/// Sends one reflection request on a new stream and returns the response.
async fn ask(endpoint: &str, request: MessageRequest) -> Result<MessageResponse> {
    let channel = Channel::from_shared(endpoint.to_string())?
        .connect()
        .await?;
    let mut client = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    };
    let response = within(WAIT, "a reflection answer", async {
        let mut stream = client
            .server_reflection_info(tokio_stream::iter([request]))
            .await?
            .into_inner();
        let message: Option<ServerReflectionResponse> = stream.message().await?;
        message.context("the reflection stream ended without an answer")
    })
    .await?;
    response
        .message_response
        .context("the reflection answer is empty")
}

/// Returns the service names that the server at `endpoint` lists through reflection v1.
async fn listed_services(endpoint: &str) -> Result<BTreeSet<String>> {
    match ask(endpoint, MessageRequest::ListServices(String::new())).await? {
        MessageResponse::ListServicesResponse(list) => Ok(list
            .service
            .into_iter()
            .map(|service| service.name)
            .collect()),
        other => bail!("ListServices answered {other:?}"),
    }
}

/// Returns whether the server at `endpoint` finds the file that declares `symbol`.
async fn describes(endpoint: &str, symbol: &str) -> Result<bool> {
    match ask(
        endpoint,
        MessageRequest::FileContainingSymbol(symbol.into()),
    )
    .await?
    {
        MessageResponse::FileDescriptorResponse(files) => {
            Ok(!files.file_descriptor_proto.is_empty())
        }
        MessageResponse::ErrorResponse(_) => Ok(false),
        other => bail!("FileContainingSymbol({symbol}) answered {other:?}"),
    }
}

fn names(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|name| name.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn each_server_lists_its_own_services() -> Result<()> {
    let setup = SchedulerSetup::start(&[]).await?;
    let broker = setup.broker.endpoint();
    let scheduler = setup.scheduler.endpoint();

    assert_eq!(
        listed_services(&broker).await?,
        names(&[
            "docket.v1.Broker",
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
        ]),
        "services the broker lists"
    );
    assert_eq!(
        listed_services(&scheduler).await?,
        names(&[
            "docket.v1.Scheduler",
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
        ]),
        "services the scheduler lists"
    );

    for symbol in [
        "docket.v1.Broker",
        "docket.v1.EnqueueRequest",
        "grpc.health.v1.Health",
    ] {
        assert!(
            describes(&broker, symbol).await?,
            "the broker describes {symbol}"
        );
    }
    for symbol in [
        "docket.v1.Scheduler",
        "docket.v1.ScheduleTaskRequest",
        "docket.v1.NewTask",
        "grpc.health.v1.Health",
    ] {
        assert!(
            describes(&scheduler, symbol).await?,
            "the scheduler describes {symbol}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn v1alpha_lists_the_same_services() -> Result<()> {
    use v1alpha::server_reflection_client::ServerReflectionClient as AlphaClient;
    use v1alpha::server_reflection_request::MessageRequest as AlphaRequest;
    use v1alpha::server_reflection_response::MessageResponse as AlphaResponse;

    let setup = SchedulerSetup::start(&[]).await?;
    let channel = Channel::from_shared(setup.scheduler.endpoint())?
        .connect()
        .await?;
    let mut client = AlphaClient::new(channel);
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(AlphaRequest::ListServices(String::new())),
    };
    let response = within(WAIT, "a v1alpha reflection answer", async {
        let mut stream = client
            .server_reflection_info(tokio_stream::iter([request]))
            .await?
            .into_inner();
        stream
            .message()
            .await?
            .context("the reflection stream ended without an answer")
    })
    .await?;
    let Some(AlphaResponse::ListServicesResponse(list)) = response.message_response else {
        bail!("ListServices answered {:?}", response.message_response);
    };
    let listed: BTreeSet<String> = list
        .service
        .into_iter()
        .map(|service| service.name)
        .collect();
    assert_eq!(
        listed,
        names(&[
            "docket.v1.Scheduler",
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        ]),
        "services the scheduler lists through v1alpha"
    );
    Ok(())
}
