//! Prometheus metrics: the broker and the scheduler serve `GET /metrics` on their own
//! port when started with `--metrics-listen`, and the counters, gauges and histograms
//! match the traffic that the test drives.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail, ensure};
use docket_proto::v1::{
    CancelTaskRequest, CreateScheduleRequest, NegativeAcknowledgement, TaskState,
};
use docket_tests::{
    BrokerProcess, SchedulerProcess, Subscription, WAIT, ack, delivered_task_id, enqueue,
    interval_recurrence, nack_items, new_task, schedule_at, temp_dir, wait_for_state,
};
use tokio::time::Instant;

const METRICS_LISTEN: [&str; 2] = ["--metrics-listen", "127.0.0.1:0"];

/// Lease of the subscription whose lease the test lets expire: the shortest the broker
/// accepts.
const SHORT_LEASE: Duration = Duration::from_secs(1);

/// Sends `GET path` to `addr` and returns the status line, the headers in lower case and
/// the body.
async fn http_get(addr: SocketAddr, path: &str) -> Result<(String, String, String)> {
    http_get_with_method(addr, "GET", path).await
}

/// Sends a request without a body to `addr`, like [`http_get`] with another method.
async fn http_get_with_method(
    addr: SocketAddr,
    method: &str,
    path: &str,
) -> Result<(String, String, String)> {
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\n\
         Connection: close\r\n\r\n"
    );
    let response = tokio::task::spawn_blocking(move || -> Result<String> {
        let mut stream = TcpStream::connect_timeout(&addr, WAIT)?;
        stream.set_read_timeout(Some(WAIT))?;
        stream.write_all(request.as_bytes())?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response)?;
        Ok(String::from_utf8(response)?)
    })
    .await??;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .with_context(|| format!("HTTP response without a blank line: {response:?}"))?;
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    Ok((
        status.to_string(),
        headers.to_ascii_lowercase(),
        body.to_string(),
    ))
}

/// Scrapes `GET /metrics` and checks the status and content type.
async fn scrape(addr: SocketAddr) -> Result<String> {
    let (status, headers, body) = http_get(addr, "/metrics").await?;
    ensure!(
        status == "HTTP/1.1 200 OK",
        "scrape returned {status:?}: {body}"
    );
    ensure!(
        headers.contains("content-type: application/openmetrics-text"),
        "scrape has no OpenMetrics content type: {headers}"
    );
    ensure!(
        body.ends_with("# EOF\n"),
        "scrape does not end with # EOF: {body}"
    );
    Ok(body)
}

/// Returns the value of the sample `series`, a metric name with its labels as the
/// exposition writes them, such as `x_total{queue="a"}`.
fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines().find_map(|line| {
        let (key, value) = line.rsplit_once(' ')?;
        if key == series {
            value.parse().ok()
        } else {
            None
        }
    })
}

/// Returns the value of `series`, failing with the whole scrape if it is missing.
fn value(body: &str, series: &str) -> Result<f64> {
    sample(body, series).with_context(|| format!("no sample {series} in:\n{body}"))
}

/// Scrapes until `series` has `expected`, because a change that a client saw committed
/// may reach the counters a moment later, and returns that scrape.
async fn wait_for_sample(addr: SocketAddr, series: &str, expected: f64) -> Result<String> {
    let deadline = Instant::now() + WAIT;
    loop {
        let body = scrape(addr).await?;
        if sample(&body, series) == Some(expected) {
            return Ok(body);
        }
        if Instant::now() >= deadline {
            bail!("{series} is not {expected} within {WAIT:?}; last scrape:\n{body}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn queue_series(name: &str, queue: &str) -> String {
    format!("{name}{{queue=\"{queue}\"}}")
}

fn depth_series(queue: &str, state: &str) -> String {
    format!("docket_broker_queue_tasks{{queue=\"{queue}\",state=\"{state}\"}}")
}

/// Expected counter values of one queue, by metric name without the prefix.
fn assert_counters(body: &str, queue: &str, expected: &[(&str, f64)]) -> Result<()> {
    for &(name, want) in expected {
        let series = queue_series(&format!("docket_broker_tasks_{name}_total"), queue);
        let got = value(body, &series)?;
        assert_eq!(got, want, "{series}");
    }
    Ok(())
}

#[tokio::test]
async fn broker_counts_every_state_change() -> Result<()> {
    let dir = temp_dir();
    let broker = BrokerProcess::start(dir.path(), &METRICS_LISTEN).await?;
    let metrics = broker.metrics_addr().await?;
    assert!(metrics.ip().is_loopback(), "metrics on {metrics}");
    assert_ne!(metrics, broker.addr());
    let mut client = broker.client().await?;

    // Queue "work": three tasks, and a second enqueue of the first one's idempotency key,
    // which stores nothing.
    let mut first = new_task("work", "job", "a");
    first.idempotency_key = "key-a".to_string();
    let mut second = new_task("work", "job", "b");
    second.max_attempts = 3;
    let third = new_task("work", "job", "c");
    let ids = enqueue(&mut client, vec![first.clone(), second, third]).await?;
    let duplicate = enqueue(&mut client, vec![first]).await?;
    assert_eq!(duplicate[0], ids[0]);

    let mut workers = Subscription::open(&mut client, &["work"], 10, None).await?;
    let deliveries = workers.next_deliveries(3).await?;
    let lease_of = |task_id: &str| -> Result<String> {
        for delivery in &deliveries {
            if delivered_task_id(delivery)? == task_id {
                return Ok(delivery.lease_id.clone());
            }
        }
        bail!("task {task_id} was not delivered")
    };

    // a succeeds, b is dead-lettered by a Nack with no_retry, c is released and comes
    // back, then succeeds.
    ack(&mut client, &lease_of(&ids[0])?, "done").await?;
    let nacks = vec![
        NegativeAcknowledgement {
            lease_id: lease_of(&ids[1])?,
            error: "bad input".to_string(),
            no_retry: true,
            ..Default::default()
        },
        NegativeAcknowledgement {
            lease_id: lease_of(&ids[2])?,
            release: true,
            ..Default::default()
        },
    ];
    let results = nack_items(&mut client, nacks).await?;
    assert_eq!(results[0].state(), TaskState::Dead, "{:?}", results[0]);
    assert_eq!(results[1].state(), TaskState::Pending, "{:?}", results[1]);
    let again = workers.next_delivery().await?;
    assert_eq!(delivered_task_id(&again)?, ids[2]);
    ack(&mut client, &again.lease_id, "done").await?;

    // Queue "idle" has no worker: one task is cancelled and one stays pending. Queue
    // "slow" gets a single-attempt task whose lease expires, so it dies. One batch contains
    // all three, switching queues twice.
    let mut slow_task = new_task("slow", "job", "f");
    slow_task.max_attempts = 1;
    let mixed = enqueue(
        &mut client,
        vec![
            new_task("idle", "job", "d"),
            slow_task,
            new_task("idle", "job", "e"),
        ],
    )
    .await?;
    let idle = [mixed[0].clone(), mixed[2].clone()];
    let slow = [mixed[1].clone()];
    client
        .cancel_task(CancelTaskRequest {
            task_id: idle[0].clone(),
        })
        .await?;

    let mut sleeper = Subscription::open(&mut client, &["slow"], 1, Some(SHORT_LEASE)).await?;
    let unsettled = sleeper.next_delivery().await?;
    assert_eq!(delivered_task_id(&unsettled)?, slow[0]);
    wait_for_state(&mut client, &slow[0], TaskState::Dead).await?;

    let body = wait_for_sample(
        metrics,
        &queue_series("docket_broker_tasks_expired_total", "slow"),
        1.0,
    )
    .await?;

    assert_counters(
        &body,
        "work",
        &[
            ("enqueued", 3.0),
            ("delivered", 4.0),
            ("acked", 2.0),
            ("nacked", 1.0),
            ("released", 1.0),
            ("expired", 0.0),
            ("dead_lettered", 1.0),
            ("cancelled", 0.0),
        ],
    )?;
    assert_counters(
        &body,
        "idle",
        &[("enqueued", 2.0), ("delivered", 0.0), ("cancelled", 1.0)],
    )?;
    assert_counters(
        &body,
        "slow",
        &[
            ("enqueued", 1.0),
            ("delivered", 1.0),
            ("acked", 0.0),
            ("nacked", 0.0),
            ("expired", 1.0),
            ("dead_lettered", 1.0),
        ],
    )?;

    let depth = [
        ("work", "pending", 0.0),
        ("work", "leased", 0.0),
        ("work", "succeeded", 2.0),
        ("work", "dead", 1.0),
        ("idle", "pending", 1.0),
        ("idle", "cancelled", 1.0),
        ("idle", "retry_wait", 0.0),
        ("slow", "dead", 1.0),
    ];
    for (queue, state, want) in depth {
        let series = depth_series(queue, state);
        assert_eq!(value(&body, &series)?, want, "{series}");
    }
    let idle_age = value(
        &body,
        &queue_series("docket_broker_queue_oldest_pending_age_seconds", "idle"),
    )?;
    assert!(
        idle_age > 0.0 && idle_age < WAIT.as_secs_f64() * 3.0,
        "{idle_age}"
    );
    let work_age = value(
        &body,
        &queue_series("docket_broker_queue_oldest_pending_age_seconds", "work"),
    )?;
    assert_eq!(work_age, 0.0);

    // The enqueue-to-delivery histogram counts deliveries of tasks without a finished
    // attempt: a, b, c and c again after its release, which did not count as an attempt.
    let delivery_count = queue_series("docket_broker_delivery_latency_seconds_count", "work");
    assert_eq!(value(&body, &delivery_count)?, 4.0);
    let ack_count = queue_series("docket_broker_ack_latency_seconds_count", "work");
    assert_eq!(value(&body, &ack_count)?, 2.0);
    let ack_inf = "docket_broker_ack_latency_seconds_bucket{le=\"+Inf\",queue=\"work\"}";
    let ack_inf_alt = "docket_broker_ack_latency_seconds_bucket{queue=\"work\",le=\"+Inf\"}";
    let inf = sample(&body, ack_inf).or_else(|| sample(&body, ack_inf_alt));
    assert_eq!(inf, Some(2.0), "no +Inf bucket of 2 in:\n{body}");

    let commits = value(&body, "docket_broker_commit_batch_size_count")?;
    let requests = value(&body, "docket_broker_commit_batch_size_sum")?;
    // At least the 3 enqueues, 2 acks, 1 nack batch of 2, 1 cancel and 1 expiry.
    assert!(commits >= 1.0, "{commits} commits");
    assert!(requests >= 9.0, "{requests} requests in {commits} commits");
    assert_eq!(
        value(&body, "docket_broker_commit_duration_seconds_count")?,
        commits
    );
    assert_eq!(value(&body, "docket_broker_commit_failures_total")?, 0.0);
    let version = format!(
        "docket_broker_build_info{{version=\"{}\"}}",
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(value(&body, &version)?, 1.0);
    Ok(())
}

#[tokio::test]
async fn broker_metrics_reject_other_paths() -> Result<()> {
    let dir = temp_dir();
    let broker = BrokerProcess::start(dir.path(), &METRICS_LISTEN).await?;
    let metrics = broker.metrics_addr().await?;

    let (status, _, body) = http_get(metrics, "/").await?;
    assert_eq!(status, "HTTP/1.1 404 Not Found", "{body}");
    assert!(body.contains("/metrics"), "{body}");

    let (status, headers, body) = http_get_with_method(metrics, "POST", "/metrics").await?;
    assert_eq!(status, "HTTP/1.1 405 Method Not Allowed", "{body}");
    assert!(headers.contains("allow: get, head"), "{headers}");

    // A fresh broker has no queue, so it leaves out the per-queue families, which have
    // no series yet.
    let body = scrape(metrics).await?;
    assert!(body.contains("# TYPE docket_broker_build info"), "{body}");
    assert!(
        body.contains("# TYPE docket_broker_commit_batch_size histogram"),
        "{body}"
    );
    assert!(
        !body.contains("docket_broker_tasks_enqueued_total{"),
        "{body}"
    );
    Ok(())
}

#[tokio::test]
async fn broker_without_flag_serves_no_metrics() -> Result<()> {
    let dir = temp_dir();
    let broker = BrokerProcess::start(dir.path(), &[]).await?;
    let stderr = broker.stderr_output();
    assert!(!stderr.contains("metrics listening"), "{stderr}");
    Ok(())
}

#[tokio::test]
async fn scheduler_counts_firings() -> Result<()> {
    let broker_dir = temp_dir();
    let scheduler_dir = temp_dir();
    // The broker rejects payloads over 16 bytes, so that one firing fails.
    let broker = BrokerProcess::start(broker_dir.path(), &["--max-payload-bytes", "16"]).await?;
    let scheduler =
        SchedulerProcess::start(scheduler_dir.path(), &broker.endpoint(), &METRICS_LISTEN).await?;
    let metrics = scheduler.metrics_addr().await?;
    assert!(metrics.ip().is_loopback(), "metrics on {metrics}");
    let mut client = scheduler.client().await?;

    let now = SystemTime::now();
    schedule_at(&mut client, new_task("timed", "job", "small"), now).await?;
    schedule_at(
        &mut client,
        new_task("timed", "job", "a payload well over sixteen bytes"),
        now,
    )
    .await?;
    // A recurring schedule whose first fire time comes in a second and whose second one
    // is an hour later, so that it fires exactly once during the test.
    let start = now + Duration::from_secs(1);
    client
        .create_schedule(CreateScheduleRequest {
            name: "hourly".to_string(),
            recurrence: Some(interval_recurrence(Duration::from_secs(3600), Some(start))),
            task: Some(new_task("timed", "job", "tick")),
            paused: false,
        })
        .await?;

    let released_recurring = "docket_scheduler_firings_released_total{kind=\"recurring\"}";
    let body = wait_for_sample(metrics, released_recurring, 1.0).await?;
    let body = if sample(
        &body,
        "docket_scheduler_firings_failed_total{kind=\"one_shot\"}",
    ) == Some(1.0)
    {
        body
    } else {
        wait_for_sample(
            metrics,
            "docket_scheduler_firings_failed_total{kind=\"one_shot\"}",
            1.0,
        )
        .await?
    };

    let expected = [
        (
            "docket_scheduler_firings_released_total{kind=\"one_shot\"}",
            1.0,
        ),
        (
            "docket_scheduler_firings_failed_total{kind=\"one_shot\"}",
            1.0,
        ),
        (released_recurring, 1.0),
        (
            "docket_scheduler_firings_failed_total{kind=\"recurring\"}",
            0.0,
        ),
        (
            "docket_scheduler_release_lag_seconds_count{kind=\"one_shot\"}",
            1.0,
        ),
        (
            "docket_scheduler_release_lag_seconds_count{kind=\"recurring\"}",
            1.0,
        ),
        ("docket_scheduler_enqueue_retries_total", 0.0),
    ];
    for (series, want) in expected {
        assert_eq!(value(&body, series)?, want, "{series}");
    }
    let lag = value(
        &body,
        "docket_scheduler_release_lag_seconds_sum{kind=\"recurring\"}",
    )?;
    assert!((0.0..WAIT.as_secs_f64()).contains(&lag), "lag {lag}");
    let version = format!(
        "docket_scheduler_build_info{{version=\"{}\"}}",
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(value(&body, &version)?, 1.0);

    // The broker stored two tasks: the small one-shot task and the recurring one.
    let mut broker_client = broker.client().await?;
    let mut workers = Subscription::open(&mut broker_client, &["timed"], 10, None).await?;
    let deliveries = workers.next_deliveries(2).await?;
    assert_eq!(deliveries.len(), 2);
    Ok(())
}

#[tokio::test]
async fn scheduler_counts_enqueue_retries() -> Result<()> {
    let broker_dir = temp_dir();
    let scheduler_dir = temp_dir();
    let mut broker = BrokerProcess::start(broker_dir.path(), &[]).await?;
    let broker_addr = broker.addr();
    let scheduler = SchedulerProcess::start(
        scheduler_dir.path(),
        &broker.endpoint(),
        &[
            METRICS_LISTEN[0],
            METRICS_LISTEN[1],
            "--max-retry-delay",
            "200ms",
        ],
    )
    .await?;
    let metrics = scheduler.metrics_addr().await?;
    let mut client = scheduler.client().await?;

    broker.stop().await?;
    schedule_at(
        &mut client,
        new_task("timed", "job", "late"),
        SystemTime::now(),
    )
    .await?;
    scheduler
        .wait_for_log("cannot reach the broker; the firings wait and are retried")
        .await?;
    let body = scrape(metrics).await?;
    let retries = value(&body, "docket_scheduler_enqueue_retries_total")?;
    assert!(retries >= 1.0, "{retries} retries");
    assert_eq!(
        value(
            &body,
            "docket_scheduler_firings_released_total{kind=\"one_shot\"}"
        )?,
        0.0
    );

    let _broker = BrokerProcess::start_on(broker_addr, broker_dir.path(), &[]).await?;
    wait_for_sample(
        metrics,
        "docket_scheduler_firings_released_total{kind=\"one_shot\"}",
        1.0,
    )
    .await?;
    Ok(())
}

/// The Grafana dashboard in docs/, which must query only metrics that the services expose.
const DASHBOARD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../docs/grafana-dashboard.json"
);

/// Collects every PromQL text of a dashboard: panel queries (`expr`) and variable queries
/// (`definition`).
fn collect_queries(value: &serde_json::Value, queries: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(fields) => {
            for (key, field) in fields {
                match (key.as_str(), field) {
                    ("expr" | "definition", serde_json::Value::String(text)) => {
                        queries.push(text.clone());
                    }
                    _ => collect_queries(field, queries),
                }
            }
        }
        serde_json::Value::Array(items) => {
            for item in items {
                collect_queries(item, queries);
            }
        }
        _ => {}
    }
}

/// Returns the identifiers of `text` that start with `prefix`, such as metric names in a
/// PromQL expression, or variable names after `$`.
fn identifiers_with_prefix(text: &str, prefix: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(prefix) {
        let before = rest[..start].chars().next_back();
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':' || c == '$'))
            .unwrap_or(tail.len());
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            found.push(tail[..end].to_string());
        }
        rest = &tail[end.max(1)..];
    }
    found
}

/// Returns the sample names of a scrape, without labels.
fn sample_names(body: &str) -> BTreeSet<String> {
    body.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.split(['{', ' ']).next())
        .filter(|name| !name.is_empty())
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn dashboard_queries_exposed_metrics() -> Result<()> {
    let text =
        std::fs::read_to_string(DASHBOARD).with_context(|| format!("cannot read {DASHBOARD}"))?;
    let dashboard: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{DASHBOARD} is not valid JSON"))?;
    let mut queries = Vec::new();
    collect_queries(&dashboard, &mut queries);
    assert!(
        queries.len() >= 10,
        "only {} queries in {DASHBOARD}",
        queries.len()
    );

    // Every variable that a query uses is defined, except Grafana's built-in ones.
    let variables: BTreeSet<String> = dashboard["templating"]["list"]
        .as_array()
        .context("the dashboard has no templating list")?
        .iter()
        .filter_map(|variable| variable["name"].as_str())
        .map(|name| format!("${name}"))
        .collect();
    assert!(variables.contains("$datasource"), "{variables:?}");
    assert!(variables.contains("$queue"), "{variables:?}");
    for query in &queries {
        for variable in identifiers_with_prefix(query, "$") {
            if !variable.starts_with("$__") {
                assert!(variables.contains(&variable), "{variable} in {query}");
            }
        }
    }

    // One task gives the broker a queue, so that every per-queue series exists.
    let broker_dir = temp_dir();
    let scheduler_dir = temp_dir();
    let broker = BrokerProcess::start(broker_dir.path(), &METRICS_LISTEN).await?;
    let scheduler =
        SchedulerProcess::start(scheduler_dir.path(), &broker.endpoint(), &METRICS_LISTEN).await?;
    let mut client = broker.client().await?;
    enqueue(&mut client, vec![new_task("work", "job", "a")]).await?;
    let broker_body = wait_for_sample(
        broker.metrics_addr().await?,
        &depth_series("work", "pending"),
        1.0,
    )
    .await?;
    let scheduler_body = scrape(scheduler.metrics_addr().await?).await?;
    let mut exposed = sample_names(&broker_body);
    exposed.extend(sample_names(&scheduler_body));

    let mut used = BTreeSet::new();
    for query in &queries {
        used.extend(identifiers_with_prefix(query, "docket_"));
    }
    let unknown: Vec<&String> = used.difference(&exposed).collect();
    assert!(
        unknown.is_empty(),
        "the dashboard queries metrics that no service exposes: {unknown:?}; exposed: {exposed:?}"
    );

    // Every counter and histogram has a panel.
    let unused: Vec<&String> = exposed
        .iter()
        .filter(|name| name.ends_with("_total") || name.ends_with("_bucket"))
        .filter(|name| !used.contains(*name))
        .collect();
    assert!(unused.is_empty(), "no panel shows {unused:?}");
    Ok(())
}
