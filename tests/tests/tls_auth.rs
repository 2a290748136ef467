//! TLS, mutual TLS and bearer-token authentication of the broker and the scheduler, with
//! certificates made by rcgen at test time: raw gRPC clients, the SDK, the CLI, and the
//! scheduler's own connection to the broker.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use docket::{Client, TaskContext, Worker};
use docket_tests::cli::{docket, docket_json, text_at};
use docket_tests::v1::broker_client::BrokerClient;
use docket_tests::v1::subscribe_response::Event;
use docket_tests::v1::{
    AckRequest, Acknowledgement, EnqueueRequest, GetTaskRequest, ListQueuesRequest,
    PurgeQueueRequest, SubscribeRequest, TaskState,
};
use docket_tests::{
    BROKER_SERVICE, BrokerProcess, SCHEDULER_SERVICE, SchedulerProcess, ServingStatus, TempDir,
    WAIT, broker_binary, new_task, run_with_timeout, temp_dir, within,
};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tokio::time::Instant;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

const PRODUCER_TOKEN: &str = "producer-token-6f1c9a";
const WORKER_TOKEN: &str = "worker-token-2b7e44";
const ADMIN_TOKEN: &str = "admin-token-93d0c1";

/// A CA, a server certificate for 127.0.0.1 and localhost, a client certificate, and a
/// token file, written to a temporary folder.
struct Pki {
    dir: TempDir,
    ca_pem: String,
    client_cert_pem: String,
    client_key_pem: String,
}

impl Pki {
    fn new() -> Result<Self> {
        let dir = temp_dir();

        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "Docket test CA");
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca_params, ca_key);

        let server_key = KeyPair::generate()?;
        let mut server_params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?;
        server_params
            .distinguished_name
            .push(DnType::CommonName, "docket server");
        server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_cert = server_params.signed_by(&server_key, &issuer)?;

        let client_key = KeyPair::generate()?;
        let mut client_params = CertificateParams::new(Vec::<String>::new())?;
        client_params
            .distinguished_name
            .push(DnType::CommonName, "docket client");
        client_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client_cert = client_params.signed_by(&client_key, &issuer)?;

        let pki = Pki {
            ca_pem: ca_cert.pem(),
            client_cert_pem: client_cert.pem(),
            client_key_pem: client_key.serialize_pem(),
            dir,
        };
        pki.write("ca.pem", &pki.ca_pem)?;
        pki.write("server.pem", &server_cert.pem())?;
        pki.write("server.key", &server_key.serialize_pem())?;
        pki.write("client.pem", &pki.client_cert_pem)?;
        pki.write("client.key", &pki.client_key_pem)?;
        pki.write(
            "tokens",
            &format!(
                "# role token\nproducer {PRODUCER_TOKEN}\n\nworker {WORKER_TOKEN}\nadmin {ADMIN_TOKEN}\n"
            ),
        )?;
        Ok(pki)
    }

    fn write(&self, name: &str, text: &str) -> Result<()> {
        std::fs::write(self.path(name), text).with_context(|| format!("writing {name}"))
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn arg(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }

    /// Returns the server flags for TLS, and for mutual TLS and tokens if asked.
    fn server_args(&self, client_ca: bool, tokens: bool) -> Vec<String> {
        let mut args = vec![
            "--tls-cert".to_owned(),
            self.arg("server.pem"),
            "--tls-key".to_owned(),
            self.arg("server.key"),
        ];
        if client_ca {
            args.extend(["--tls-client-ca".to_owned(), self.arg("ca.pem")]);
        }
        if tokens {
            args.extend(["--auth-tokens".to_owned(), self.arg("tokens")]);
        }
        args
    }

    /// Returns a TLS configuration that trusts the test CA, with the client certificate if
    /// `identity` is set.
    fn client_tls(&self, identity: bool) -> ClientTlsConfig {
        let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&self.ca_pem));
        if identity {
            tls.identity(Identity::from_pem(
                &self.client_cert_pem,
                &self.client_key_pem,
            ))
        } else {
            tls
        }
    }
}

/// Starts a TLS broker with `args` added and waits until it reports SERVING over TLS.
async fn start_tls_broker(
    pki: &Pki,
    data: &Path,
    client_ca: bool,
    tokens: bool,
) -> Result<BrokerProcess> {
    let args = pki.server_args(client_ca, tokens);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let broker = BrokerProcess::start_unready(data, &args).await?;
    let url = https_url(&broker.endpoint());
    wait_for_tls_health(pki, &url, BROKER_SERVICE, client_ca).await?;
    Ok(broker)
}

/// Turns the harness's `http://127.0.0.1:PORT` into `https://127.0.0.1:PORT`.
fn https_url(endpoint: &str) -> String {
    endpoint.replacen("http://", "https://", 1)
}

async fn tls_channel(pki: &Pki, url: &str, identity: bool) -> Result<Channel> {
    let channel = Endpoint::from_shared(url.to_owned())?
        .connect_timeout(Duration::from_secs(5))
        .tls_config(pki.client_tls(identity))?
        .connect()
        .await
        .with_context(|| format!("TLS connection to {url}"))?;
    Ok(channel)
}

/// Polls the health service at `url` over TLS, without a token, until `service` is
/// SERVING.
async fn wait_for_tls_health(pki: &Pki, url: &str, service: &str, identity: bool) -> Result<()> {
    let deadline = Instant::now() + WAIT;
    let mut last = String::from("no answer");
    while Instant::now() < deadline {
        match health_over_tls(pki, url, service, identity).await {
            Ok(ServingStatus::Serving) => return Ok(()),
            Ok(status) => last = format!("status {status:?}"),
            Err(error) => last = format!("{error:#}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("{service} at {url} not SERVING within {WAIT:?}: {last}")
}

async fn health_over_tls(
    pki: &Pki,
    url: &str,
    service: &str,
    identity: bool,
) -> Result<ServingStatus> {
    let channel = tls_channel(pki, url, identity).await?;
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await?;
    Ok(response.into_inner().status())
}

/// Returns `request` with `authorization: Bearer token`.
fn with_token<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    let value: MetadataValue<_> = format!("Bearer {token}").parse().expect("ASCII token");
    request.metadata_mut().insert("authorization", value);
    request
}

fn enqueue_request(queue: &str) -> EnqueueRequest {
    EnqueueRequest {
        tasks: vec![new_task(queue, "tls", "payload")],
    }
}

fn subscribe_request(queue: &str) -> SubscribeRequest {
    SubscribeRequest {
        queues: vec![queue.to_owned()],
        max_in_flight: 1,
        ..Default::default()
    }
}

fn exit_code(output: &Output) -> Option<i32> {
    output.status.code()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test]
async fn tls_client_works_and_plaintext_fails() -> Result<()> {
    let pki = Pki::new()?;
    let data = temp_dir();
    let broker = start_tls_broker(&pki, data.path(), false, false).await?;
    let url = https_url(&broker.endpoint());

    let mut client = BrokerClient::new(tls_channel(&pki, &url, false).await?);
    let ids = client
        .enqueue(enqueue_request("tls"))
        .await?
        .into_inner()
        .task_ids;
    assert_eq!(ids.len(), 1);

    // A plaintext HTTP/2 client cannot complete a call against the TLS port.
    let plaintext = async {
        let channel = Endpoint::from_shared(broker.endpoint())?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(5))
            .connect()
            .await?;
        BrokerClient::new(channel)
            .enqueue(enqueue_request("tls"))
            .await?;
        anyhow::Ok(())
    };
    assert!(
        plaintext.await.is_err(),
        "a plaintext call to the TLS broker succeeded"
    );

    // The failed handshake did not hurt the server.
    let status = client
        .get_task(GetTaskRequest {
            task_id: ids[0].clone(),
        })
        .await?
        .into_inner()
        .status
        .context("GetTask returned no status")?;
    assert_eq!(status.state(), TaskState::Pending);
    Ok(())
}

#[tokio::test]
async fn mtls_requires_client_certificate() -> Result<()> {
    let pki = Pki::new()?;
    let data = temp_dir();
    let broker = start_tls_broker(&pki, data.path(), true, false).await?;
    let url = https_url(&broker.endpoint());

    let without_certificate = async {
        let channel = tls_channel(&pki, &url, false).await?;
        BrokerClient::new(channel)
            .enqueue(enqueue_request("mtls"))
            .await?;
        anyhow::Ok(())
    };
    assert!(
        within(WAIT, "the call without a client certificate", async {
            Ok(without_certificate.await)
        })
        .await?
        .is_err(),
        "a client without a certificate was accepted"
    );

    let mut client = BrokerClient::new(tls_channel(&pki, &url, true).await?);
    let ids = client
        .enqueue(enqueue_request("mtls"))
        .await?
        .into_inner()
        .task_ids;
    assert_eq!(ids.len(), 1);
    Ok(())
}

#[tokio::test]
async fn tokens_authenticate_and_authorize() -> Result<()> {
    let pki = Pki::new()?;
    let data = temp_dir();
    let broker = start_tls_broker(&pki, data.path(), false, true).await?;
    let url = https_url(&broker.endpoint());
    let mut client = BrokerClient::new(tls_channel(&pki, &url, false).await?);

    let missing = client
        .enqueue(enqueue_request("auth"))
        .await
        .expect_err("a call without a token succeeded");
    assert_eq!(missing.code(), tonic::Code::Unauthenticated, "{missing:?}");
    assert!(missing.message().contains("bearer token"), "{missing:?}");

    let wrong = client
        .enqueue(with_token(enqueue_request("auth"), "not-a-known-token"))
        .await
        .expect_err("a call with an unknown token succeeded");
    assert_eq!(wrong.code(), tonic::Code::Unauthenticated, "{wrong:?}");

    let ids = client
        .enqueue(with_token(enqueue_request("auth"), PRODUCER_TOKEN))
        .await?
        .into_inner()
        .task_ids;
    assert_eq!(ids.len(), 1);

    let denied = client
        .subscribe(with_token(subscribe_request("auth"), PRODUCER_TOKEN))
        .await
        .expect_err("a producer token opened a Subscribe stream");
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
    assert!(
        denied.message().contains("/docket.v1.Broker/Subscribe"),
        "{denied:?}"
    );
    assert!(denied.message().contains("worker, admin"), "{denied:?}");

    let purge = PurgeQueueRequest {
        queue: "auth".to_owned(),
    };
    let denied = client
        .purge_queue(with_token(purge.clone(), PRODUCER_TOKEN))
        .await
        .expect_err("a producer token purged a queue");
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
    assert!(denied.message().contains("PurgeQueue"), "{denied:?}");

    let denied = client
        .enqueue(with_token(enqueue_request("auth"), WORKER_TOKEN))
        .await
        .expect_err("a worker token enqueued a task");
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");

    // A worker token subscribes and acks.
    let mut stream = client
        .subscribe(with_token(subscribe_request("auth"), WORKER_TOKEN))
        .await?
        .into_inner();
    let delivery = within(WAIT, "a delivery", async {
        loop {
            match stream.message().await? {
                Some(response) => {
                    if let Some(Event::Delivery(delivery)) = response.event {
                        return Ok(delivery);
                    }
                }
                None => bail!("the Subscribe stream ended"),
            }
        }
    })
    .await?;
    let acked = client
        .ack(with_token(
            AckRequest {
                acks: vec![Acknowledgement {
                    lease_id: delivery.lease_id.clone(),
                    ..Default::default()
                }],
            },
            WORKER_TOKEN,
        ))
        .await?
        .into_inner();
    assert_eq!(acked.results.len(), 1);
    assert_eq!(acked.results[0].code, tonic::Code::Ok as i32, "{acked:?}");
    drop(stream);

    // An admin token calls producer, worker and admin methods.
    client
        .enqueue(with_token(enqueue_request("auth"), ADMIN_TOKEN))
        .await?;
    client
        .get_task(with_token(
            GetTaskRequest {
                task_id: ids[0].clone(),
            },
            ADMIN_TOKEN,
        ))
        .await?;
    client
        .list_queues(with_token(ListQueuesRequest::default(), ADMIN_TOKEN))
        .await?;
    client.purge_queue(with_token(purge, ADMIN_TOKEN)).await?;
    client
        .subscribe(with_token(subscribe_request("auth"), ADMIN_TOKEN))
        .await?;
    Ok(())
}

#[tokio::test]
async fn health_and_reflection_need_no_token() -> Result<()> {
    let pki = Pki::new()?;
    let data = temp_dir();
    let broker = start_tls_broker(&pki, data.path(), false, true).await?;
    let url = https_url(&broker.endpoint());

    let status = health_over_tls(&pki, &url, BROKER_SERVICE, false).await?;
    assert_eq!(status, ServingStatus::Serving);

    let channel = tls_channel(&pki, &url, false).await?;
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter([request]))
        .await?
        .into_inner();
    let answer = within(WAIT, "a reflection answer", async {
        stream
            .message()
            .await?
            .context("the reflection stream ended without an answer")
    })
    .await?;
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        bail!("ListServices answered {answer:?}");
    };
    let names: Vec<String> = list
        .service
        .into_iter()
        .map(|service| service.name)
        .collect();
    assert!(names.iter().any(|name| name == BROKER_SERVICE), "{names:?}");
    Ok(())
}

#[tokio::test]
async fn sdk_with_token_and_ca_runs_worker() -> Result<()> {
    let pki = Pki::new()?;
    let data = temp_dir();
    let broker = start_tls_broker(&pki, data.path(), true, true).await?;
    let url = https_url(&broker.endpoint());

    let producer = Client::builder(&url)
        .bearer_token(PRODUCER_TOKEN)
        .ca_certificate(pki.ca_pem.clone())
        .identity(pki.client_cert_pem.clone(), pki.client_key_pem.clone())
        .connect()
        .await?;
    let task_id = producer
        .enqueue(docket::Task::new("sdk-tls", "greet").payload("ada"))
        .await?;

    let worker_client = Client::builder(&url)
        .bearer_token(WORKER_TOKEN)
        .ca_certificate(pki.ca_pem.clone())
        .identity(pki.client_cert_pem.clone(), pki.client_key_pem.clone())
        .connect_lazy()?;
    let worker =
        Worker::builder(worker_client)
            .queue("sdk-tls")
            .build(|task: TaskContext| async move {
                Ok(Some(
                    format!("hello {}", String::from_utf8_lossy(task.payload())).into(),
                ))
            })?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(worker.run(async {
        let _ = stopped.await;
    }));

    let status = within(WAIT, "the task to succeed", async {
        loop {
            let status = producer.get_task(&task_id).await?;
            if status.state() == TaskState::Succeeded {
                return Ok(status);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await?;
    assert_eq!(status.result.as_ref(), b"hello ada");

    // The producer token may not run a worker: its Subscribe is denied.
    let denied = producer
        .grpc()
        .subscribe(subscribe_request("sdk-tls"))
        .await
        .expect_err("a producer token opened a Subscribe stream");
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");

    let _ = stop.send(());
    within(WAIT, "the worker to stop", async {
        Ok(running.await.context("the worker task panicked")??)
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn sdk_rejects_tls_settings_for_http() -> Result<()> {
    let error = Client::builder("http://127.0.0.1:1")
        .ca_certificate(b"not used".to_vec())
        .connect_lazy()
        .expect_err("a CA certificate for an http:// endpoint was accepted");
    assert!(
        matches!(error, docket::Error::InvalidClientConfig(_)),
        "{error:?}"
    );

    let error = Client::builder("http://127.0.0.1:1")
        .bearer_token("has space")
        .connect_lazy()
        .expect_err("a token with a space was accepted");
    assert!(!error.to_string().contains("has space"), "{error}");
    Ok(())
}

#[tokio::test]
async fn cli_with_token_and_ca() -> Result<()> {
    let pki = Pki::new()?;
    let data = temp_dir();
    let broker = start_tls_broker(&pki, data.path(), false, true).await?;
    let url = https_url(&broker.endpoint());
    pki.write("producer.token", &format!("{PRODUCER_TOKEN}\n"))?;
    let token_file = pki.arg("producer.token");
    let ca = pki.arg("ca.pem");

    let enqueued = docket_json(&[
        "--broker",
        &url,
        "--token-file",
        &token_file,
        "--ca-cert",
        &ca,
        "enqueue",
        "cli-tls",
        "report",
    ])
    .await?;
    let task_id = text_at(&enqueued, "/task_id")?.to_owned();

    let task = docket_json(&[
        "--broker",
        &url,
        "--token",
        PRODUCER_TOKEN,
        "--ca-cert",
        &ca,
        "task",
        "get",
        &task_id,
    ])
    .await?;
    assert_eq!(text_at(&task, "/state")?, "PENDING");

    let unauthenticated =
        docket(&["--broker", &url, "--ca-cert", &ca, "task", "get", &task_id]).await?;
    assert_eq!(
        exit_code(&unauthenticated),
        Some(6),
        "{}",
        stderr(&unauthenticated)
    );
    let message = stderr(&unauthenticated);
    assert!(message.contains("UNAUTHENTICATED"), "{message}");
    assert!(message.contains("--token"), "{message}");

    let denied = docket(&[
        "--broker",
        &url,
        "--token",
        PRODUCER_TOKEN,
        "--ca-cert",
        &ca,
        "queue",
        "purge",
        "cli-tls",
    ])
    .await?;
    assert_eq!(exit_code(&denied), Some(6), "{}", stderr(&denied));
    assert!(
        stderr(&denied).contains("PERMISSION_DENIED"),
        "{}",
        stderr(&denied)
    );

    let no_ca = docket(&[
        "--broker",
        &url,
        "--token",
        PRODUCER_TOKEN,
        "task",
        "get",
        &task_id,
    ])
    .await?;
    assert_ne!(
        exit_code(&no_ca),
        Some(0),
        "a server certificate from an unknown CA was accepted"
    );
    Ok(())
}

#[tokio::test]
async fn scheduler_releases_into_secure_broker() -> Result<()> {
    let pki = Pki::new()?;
    let data = temp_dir();
    let broker = start_tls_broker(&pki, data.path(), true, true).await?;
    let broker_url = format!("https://localhost:{}", broker.addr().port());
    pki.write("scheduler.token", &format!("{PRODUCER_TOKEN}\n"))?;

    let mut args = pki.server_args(false, true);
    args.extend([
        "--broker-token-file".to_owned(),
        pki.arg("scheduler.token"),
        "--broker-ca-cert".to_owned(),
        pki.arg("ca.pem"),
        "--broker-client-cert".to_owned(),
        pki.arg("client.pem"),
        "--broker-client-key".to_owned(),
        pki.arg("client.key"),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let scheduler_data = temp_dir();
    let scheduler =
        SchedulerProcess::start_unready(scheduler_data.path(), &broker_url, &args).await?;
    let scheduler_url = https_url(&scheduler.endpoint());
    // SERVING means the scheduler reached the broker's health service over mutual TLS.
    wait_for_tls_health(&pki, &scheduler_url, SCHEDULER_SERVICE, false).await?;

    let client = Client::builder(https_url(&broker.endpoint()))
        .bearer_token(ADMIN_TOKEN)
        .ca_certificate(pki.ca_pem.clone())
        .identity(pki.client_cert_pem.clone(), pki.client_key_pem.clone())
        .scheduler(&scheduler_url)
        .connect()
        .await?;
    let scheduled = client
        .enqueue_in(
            docket::Task::new("scheduled-tls", "remind"),
            Duration::from_millis(300),
        )
        .await?;
    assert!(!scheduled.schedule_id().is_empty());

    let anonymous = Client::builder(https_url(&broker.endpoint()))
        .ca_certificate(pki.ca_pem.clone())
        .identity(pki.client_cert_pem.clone(), pki.client_key_pem.clone())
        .scheduler(&scheduler_url)
        .connect_lazy()?;
    let error = anonymous
        .enqueue_in(
            docket::Task::new("scheduled-tls", "remind"),
            Duration::from_secs(60),
        )
        .await
        .expect_err("the scheduler accepted a call without a token");
    assert_eq!(
        error.code(),
        Some(tonic::Code::Unauthenticated),
        "{error:?}"
    );

    let mut grpc = client.grpc();
    let released = within(WAIT, "the scheduled task to reach the broker", async {
        loop {
            let queues = grpc
                .list_queues(ListQueuesRequest::default())
                .await?
                .into_inner();
            if queues
                .queues
                .iter()
                .any(|queue| queue.queue == "scheduled-tls")
            {
                return Ok(queues);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await?;
    assert!(!released.queues.is_empty());
    assert!(
        !scheduler.stderr_output().contains(PRODUCER_TOKEN),
        "the scheduler logged its broker token"
    );
    Ok(())
}

#[tokio::test]
async fn startup_errors_name_the_file() -> Result<()> {
    let pki = Pki::new()?;
    let other_key = KeyPair::generate()?;
    pki.write("other.key", &other_key.serialize_pem())?;
    pki.write("bad-tokens", "producer ok-token\nreader secret-value\n")?;
    pki.write("not-pem.pem", "this is not a certificate\n")?;

    let cases: [(&[&str], &str, &str); 4] = [
        (
            &["--tls-cert", "missing.pem", "--tls-key", "server.key"],
            "missing.pem",
            "cannot read the TLS certificate file",
        ),
        (
            &["--tls-cert", "not-pem.pem", "--tls-key", "server.key"],
            "not-pem.pem",
            "contains no PEM certificate",
        ),
        (
            &["--tls-cert", "server.pem", "--tls-key", "other.key"],
            "other.key",
            "does not match the certificate",
        ),
        (
            &["--auth-tokens", "bad-tokens"],
            "line 2",
            "unknown role \"reader\"",
        ),
    ];
    for (flags, names, problem) in cases {
        let data = temp_dir();
        let mut command = std::process::Command::new(broker_binary());
        command
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(data.path())
            .env_remove("DOCKET_LOG");
        for flag in flags {
            if flag.starts_with("--") {
                command.arg(flag);
            } else {
                command.arg(pki.path(flag));
            }
        }
        let output = run_with_timeout(&mut command, WAIT).await?;
        let message = stderr(&output);
        assert!(!output.status.success(), "{flags:?} started: {message}");
        assert!(message.contains(names), "{flags:?}: {message}");
        assert!(message.contains(problem), "{flags:?}: {message}");
        assert!(
            !message.contains("secret-value"),
            "{flags:?} logged a token: {message}"
        );
    }
    Ok(())
}
