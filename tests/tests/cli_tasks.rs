//! `docket task watch`, `docket enqueue --file`, `docket queue settings|configure`, JSON
//! errors and the placement of the `--broker` flag, against a real broker process.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use docket_tests::cli::{docket, docket_command, docket_json, docket_ok};
use docket_tests::v1::{GetQueueSettingsRequest, NegativeAcknowledgement};
use docket_tests::{
    BrokerProcess, Subscription, WAIT, ack, get_task, nack, nack_items, proto_duration,
    queue_stats, run_with_timeout, temp_dir,
};
use serde_json::{Value, json};

/// Queue of the tasks that these tests enqueue.
const QUEUE: &str = "jobs";

/// A task id that is a well-formed UUIDv7 but was never issued by the broker.
const UNKNOWN_TASK_ID: &str = "0190a1b2-c3d4-7e5f-8a6b-7c8d9e0f1a2b";

/// Runs `docket` with `args` and `input` on stdin, and returns its output.
async fn docket_with_stdin(args: &[&str], input: String) -> Result<Output> {
    let mut command = docket_command(args);
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().context("failed to start docket")?;
    let mut stdin = child.stdin.take().context("stdin is piped")?;
    let output = tokio::task::spawn_blocking(move || {
        stdin.write_all(input.as_bytes())?;
        drop(stdin);
        child.wait_with_output()
    });
    Ok(tokio::time::timeout(WAIT, output)
        .await
        .context("docket with stdin did not finish in time")???)
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Parses the JSON error object that `--json` prints on stderr, checking that stdout is
/// empty.
fn json_error(output: &Output) -> Result<Value> {
    if !output.stdout.is_empty() {
        bail!(
            "stdout is not empty: {}",
            String::from_utf8_lossy(&output.stdout)
        );
    }
    serde_json::from_str(stderr(output).trim())
        .with_context(|| format!("stderr is not one JSON object:\n{}", stderr(output)))
}

fn error_field<'a>(error: &'a Value, field: &str) -> &'a str {
    error
        .pointer(&format!("/error/{field}"))
        .and_then(Value::as_str)
        .unwrap_or_default()
}

/// A running `docket task watch` whose stdout lines arrive on a channel.
struct Watch {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Watch {
    fn start(args: &[&str]) -> Result<Self> {
        let mut child = docket_command(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("failed to start docket task watch")?;
        let stdout = child.stdout.take().context("stdout is piped")?;
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Watch { child, lines })
    }

    /// Waits for the next line of stdout.
    async fn next_line(&self) -> Result<String> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match self.lines.try_recv() {
                Ok(line) => return Ok(line),
                Err(mpsc::TryRecvError::Disconnected) => bail!("watch stdout closed"),
                Err(mpsc::TryRecvError::Empty) if tokio::time::Instant::now() >= deadline => {
                    bail!("no watch line within {WAIT:?}")
                }
                Err(mpsc::TryRecvError::Empty) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }

    /// Waits for the process to exit and returns its status with the lines not read yet.
    async fn finish(mut self) -> Result<(ExitStatus, Vec<String>)> {
        let deadline = tokio::time::Instant::now() + WAIT;
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("docket task watch did not exit within {WAIT:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let mut rest = Vec::new();
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
            rest.push(line);
        }
        Ok((status, rest))
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Enqueues one task with `max_attempts` through the command line and returns its id.
async fn enqueue_task(url: &str, max_attempts: &str) -> Result<String> {
    let document = docket_json(&[
        "--broker",
        url,
        "enqueue",
        QUEUE,
        "work",
        "--max-attempts",
        max_attempts,
    ])
    .await?;
    document
        .pointer("/task_id")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("no task id in {document:#}"))
}

#[tokio::test]
async fn task_watch_until_succeeded() -> Result<()> {
    let dir = temp_dir();
    let broker = BrokerProcess::start(dir.path(), &[]).await?;
    let url = broker.endpoint();
    let mut client = broker.client().await?;
    let task_id = enqueue_task(&url, "2").await?;

    let watch = Watch::start(&["task", "watch", &task_id, "--broker", &url])?;
    let first = watch.next_line().await?;
    assert!(first.contains("PENDING"), "{first}");
    assert!(first.contains("attempt 0/2"), "{first}");

    let mut subscription = Subscription::open(&mut client, &[QUEUE], 1, None).await?;
    let delivery = subscription.next_delivery().await?;
    let nacked = nack_items(
        &mut client,
        vec![NegativeAcknowledgement {
            lease_id: delivery.lease_id.clone(),
            error: "disk full\nat line 2".to_owned(),
            retry_delay: Some(proto_duration(Duration::from_millis(100))),
            ..Default::default()
        }],
    )
    .await?;
    assert_eq!(nacked.len(), 1);
    let retry = subscription.next_delivery().await?;
    ack(&mut client, &retry.lease_id, "ok").await?;

    let (status, rest) = watch.finish().await?;
    assert_eq!(status.code(), Some(0), "lines: {rest:?}");
    let leased = rest
        .iter()
        .find(|line| line.contains("LEASED"))
        .with_context(|| format!("no LEASED line in {rest:?}"))?;
    assert!(leased.contains("attempt 1/2"), "{leased}");
    let retry_wait = rest
        .iter()
        .find(|line| line.contains("RETRY_WAIT"))
        .with_context(|| format!("no RETRY_WAIT line in {rest:?}"))?;
    assert!(
        retry_wait.contains("error: disk full at line 2"),
        "{retry_wait}"
    );
    let last = rest.last().context("no final line")?;
    assert!(last.contains("SUCCEEDED"), "{rest:?}");
    assert!(last.contains("attempt 2/2"), "{last}");
    Ok(())
}

#[tokio::test]
async fn task_watch_json_dead_exits_5() -> Result<()> {
    let dir = temp_dir();
    let broker = BrokerProcess::start(dir.path(), &[]).await?;
    let url = broker.endpoint();
    let mut client = broker.client().await?;
    let task_id = enqueue_task(&url, "1").await?;

    let watch = Watch::start(&["--json", "--broker", &url, "task", "watch", &task_id])?;
    let first: Value = serde_json::from_str(&watch.next_line().await?)?;
    assert_eq!(first.pointer("/state"), Some(&Value::from("PENDING")));
    assert_eq!(
        first.pointer("/task_id"),
        Some(&Value::from(task_id.as_str()))
    );

    let mut subscription = Subscription::open(&mut client, &[QUEUE], 1, None).await?;
    let delivery = subscription.next_delivery().await?;
    nack(&mut client, &delivery.lease_id, "invalid address")
        .await
        .map_err(|status| anyhow!("Nack failed: {status}"))?;

    let (status, rest) = watch.finish().await?;
    assert_eq!(status.code(), Some(5), "lines: {rest:?}");
    let objects = rest
        .iter()
        .map(|line| serde_json::from_str::<Value>(line).with_context(|| line.clone()))
        .collect::<Result<Vec<_>>>()?;
    let last = objects.last().context("no final line")?;
    assert_eq!(last.pointer("/state"), Some(&Value::from("DEAD")));
    assert_eq!(
        last.pointer("/error"),
        Some(&Value::from("invalid address"))
    );
    assert_eq!(last.pointer("/attempt"), Some(&Value::from(1)));
    assert!(last.pointer("/time").and_then(Value::as_str).is_some());
    Ok(())
}

#[tokio::test]
async fn task_watch_cancelled_and_unknown() -> Result<()> {
    let dir = temp_dir();
    let broker = BrokerProcess::start(dir.path(), &[]).await?;
    let url = broker.endpoint();
    let task_id = enqueue_task(&url, "3").await?;

    let watch = Watch::start(&["--broker", &url, "task", "watch", &task_id])?;
    watch.next_line().await?;
    docket_ok(&["--broker", &url, "task", "cancel", &task_id]).await?;
    let (status, rest) = watch.finish().await?;
    assert_eq!(status.code(), Some(5), "lines: {rest:?}");
    assert!(
        rest.last().is_some_and(|line| line.contains("CANCELLED")),
        "{rest:?}"
    );

    let unknown = docket(&["--broker", &url, "task", "watch", UNKNOWN_TASK_ID]).await?;
    assert_eq!(unknown.status.code(), Some(4), "{}", stderr(&unknown));
    assert!(
        stderr(&unknown).contains("NOT_FOUND"),
        "{}",
        stderr(&unknown)
    );
    let unknown = docket(&["--json", "--broker", &url, "task", "watch", UNKNOWN_TASK_ID]).await?;
    assert_eq!(unknown.status.code(), Some(4), "{}", stderr(&unknown));
    let error = json_error(&unknown)?;
    assert_eq!(error_field(&error, "code"), "NOT_FOUND");
    assert!(!error_field(&error, "hint").is_empty(), "{error:#}");
    Ok(())
}

#[tokio::test]
async fn enqueue_file_thousands_of_lines() -> Result<()> {
    let dir = temp_dir();
    let broker = BrokerProcess::start(dir.path(), &[]).await?;
    let url = broker.endpoint();
    let mut client = broker.client().await?;
    // 2400 distinct tasks, then 100 lines that repeat the idempotency keys of the first
    // 100.
    let mut text = String::new();
    for index in 0..2500 {
        let key = format!("order-{}", index % 2400);
        let line = if index % 2 == 0 {
            json!({ "queue": "bulk", "kind": "import", "json": { "row": index },
                    "idempotency_key": key, "priority": index % 5 })
        } else {
            json!({ "queue": "bulk", "kind": "import", "payload": format!("row {index}"),
                    "headers": { "source": "file" }, "idempotency_key": key,
                    "max_attempts": 4 })
        };
        text.push_str(&line.to_string());
        text.push('\n');
    }
    let path = dir.path().join("tasks.jsonl");
    std::fs::write(&path, text)?;
    let path = path.to_string_lossy().into_owned();

    let output = docket(&["--broker", &url, "enqueue", "--file", &path]).await?;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let stdout = String::from_utf8(output.stdout.clone())?;
    let ids: Vec<&str> = stdout.lines().collect();
    assert_eq!(ids.len(), 2500);
    assert_eq!(
        ids[2400], ids[0],
        "a repeated key returns the first task's id"
    );
    assert!(
        stderr(&output).contains("2400 tasks enqueued, 100 duplicates"),
        "{}",
        stderr(&output)
    );
    let stats = queue_stats(&mut client, "bulk").await?;
    assert_eq!(stats.pending, 2400);

    let even = get_task(&mut client, ids[2]).await?;
    let task = even.task.context("GetTask returned no task")?;
    assert_eq!(task.payload.as_ref(), br#"{"row":2}"#);
    assert_eq!(
        task.headers.get("content-type").map(String::as_str),
        Some("application/json")
    );
    assert_eq!(task.priority, 2);
    let odd = get_task(&mut client, ids[3]).await?;
    let task = odd.task.context("GetTask returned no task")?;
    assert_eq!(task.payload.as_ref(), b"row 3");
    assert_eq!(task.headers.get("source").map(String::as_str), Some("file"));
    assert_eq!(task.max_attempts, 4);

    // The same file again: every line is a duplicate, reported in one JSON document.
    let again = docket_json(&["--broker", &url, "enqueue", "--file", &path]).await?;
    assert_eq!(again.pointer("/enqueued"), Some(&Value::from(0)));
    assert_eq!(again.pointer("/duplicates"), Some(&Value::from(2500)));
    assert_eq!(
        again.pointer("/tasks/2/task_id"),
        Some(&Value::from(ids[2]))
    );
    assert_eq!(again.pointer("/tasks/2/line"), Some(&Value::from(3)));
    assert_eq!(queue_stats(&mut client, "bulk").await?.pending, 2400);
    Ok(())
}

#[tokio::test]
async fn enqueue_file_from_stdin() -> Result<()> {
    let dir = temp_dir();
    let broker = BrokerProcess::start(dir.path(), &[]).await?;
    let url = broker.endpoint();
    let mut client = broker.client().await?;
    let input =
        "{\"payload\":\"a\"}\n\n{\"json\":[1,2]}\n{\"queue\":\"other\",\"payload\":\"c\"}\n";

    let output = docket_with_stdin(
        &[
            "--json", "--broker", &url, "enqueue", QUEUE, "work", "--file", "-",
        ],
        input.to_owned(),
    )
    .await?;

    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let document: Value = serde_json::from_slice(&output.stdout)?;
    assert_eq!(document.pointer("/enqueued"), Some(&Value::from(3)));
    assert_eq!(document.pointer("/duplicates"), Some(&Value::from(0)));
    assert_eq!(document.pointer("/tasks/1/line"), Some(&Value::from(3)));
    assert_eq!(queue_stats(&mut client, QUEUE).await?.pending, 2);
    assert_eq!(queue_stats(&mut client, "other").await?.pending, 1);
    let task_id = document
        .pointer("/tasks/2/task_id")
        .and_then(Value::as_str)
        .context("no third task id")?;
    let task = get_task(&mut client, task_id)
        .await?
        .task
        .context("no task")?;
    assert_eq!((task.queue.as_str(), task.kind.as_str()), ("other", "work"));
    Ok(())
}

#[tokio::test]
async fn enqueue_file_bad_line_exits_2() -> Result<()> {
    let dir = temp_dir();
    let broker = BrokerProcess::start(dir.path(), &[]).await?;
    let url = broker.endpoint();
    let mut client = broker.client().await?;
    let mut lines: Vec<String> = (0..10)
        .map(|index| {
            json!({ "queue": QUEUE, "kind": "work", "payload": index.to_string() }).to_string()
        })
        .collect();
    lines[6] = json!({ "queue": QUEUE, "kind": "work", "max_attempts": 500 }).to_string();
    let path = dir.path().join("bad.jsonl");
    std::fs::write(&path, lines.join("\n"))?;
    let path = path.to_string_lossy().into_owned();

    let output = docket(&["--broker", &url, "enqueue", "--file", &path]).await?;
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(stderr(&output).contains("line 7"), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("max_attempts"),
        "{}",
        stderr(&output)
    );
    assert!(output.stdout.is_empty());
    assert_eq!(queue_stats(&mut client, QUEUE).await?.pending, 0);

    let output = docket(&["--json", "--broker", &url, "enqueue", "--file", &path]).await?;
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    let error = json_error(&output)?;
    assert_eq!(error_field(&error, "code"), "USAGE");
    assert!(
        error_field(&error, "message").contains("line 7"),
        "{error:#}"
    );

    let not_json = dir.path().join("not-json.jsonl");
    std::fs::write(&not_json, format!("{}\n{{\"queue\":", lines[0]))?;
    let output = docket(&[
        "--broker",
        &url,
        "enqueue",
        "--file",
        &not_json.to_string_lossy(),
    ])
    .await?;
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("line 2: invalid JSON"),
        "{}",
        stderr(&output)
    );

    // A payload over the broker's 1 MiB limit passes the local checks; the broker's
    // error names the line.
    let big = dir.path().join("big.jsonl");
    let big_line = json!({ "queue": QUEUE, "kind": "work", "payload": "x".repeat(1_100_000) });
    std::fs::write(&big, format!("{}\n{big_line}\n", lines[0]))?;
    let output = docket(&[
        "--broker",
        &url,
        "enqueue",
        "--file",
        &big.to_string_lossy(),
    ])
    .await?;
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(stderr(&output).contains("line 2"), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("no task was enqueued"),
        "{}",
        stderr(&output)
    );
    assert_eq!(queue_stats(&mut client, QUEUE).await?.pending, 0);

    let missing = docket(&[
        "--broker",
        &url,
        "enqueue",
        "--file",
        "/nonexistent/tasks.jsonl",
    ])
    .await?;
    assert_eq!(missing.status.code(), Some(2), "{}", stderr(&missing));

    let unreachable = docket(&[
        "--broker",
        "http://127.0.0.1:1",
        "enqueue",
        "--file",
        &not_json.with_file_name("bad.jsonl").to_string_lossy(),
    ])
    .await?;
    assert_eq!(
        unreachable.status.code(),
        Some(2),
        "bad lines are found first"
    );
    Ok(())
}

#[tokio::test]
async fn queue_settings_and_configure() -> Result<()> {
    let dir = temp_dir();
    let broker = BrokerProcess::start(dir.path(), &[]).await?;
    let url = broker.endpoint();
    let mut client = broker.client().await?;

    let before = docket_json(&["--broker", &url, "queue", "settings", QUEUE]).await?;
    assert_eq!(before.pointer("/queue"), Some(&Value::from(QUEUE)));
    let multiplier = before
        .pointer("/retry_policy/multiplier")
        .and_then(Value::as_f64)
        .context("no multiplier")?;

    let after = docket_json(&[
        "--broker",
        &url,
        "queue",
        "configure",
        QUEUE,
        "--max-attempts",
        "7",
        "--initial-backoff",
        "2s",
        "--max-backoff",
        "1m",
        "--jitter",
        "0.5",
        "--retention",
        "2h",
    ])
    .await?;
    assert_eq!(after.pointer("/max_attempts"), Some(&Value::from(7)));
    assert_eq!(
        after.pointer("/retry_policy/initial_backoff_seconds"),
        Some(&Value::from(2.0))
    );
    assert_eq!(
        after.pointer("/retry_policy/max_backoff_seconds"),
        Some(&Value::from(60.0))
    );
    assert_eq!(
        after.pointer("/retry_policy/multiplier"),
        Some(&Value::from(multiplier)),
        "a retry field not given keeps its value"
    );
    assert_eq!(
        after.pointer("/retention_seconds"),
        Some(&Value::from(7200.0))
    );
    let stored = client
        .get_queue_settings(GetQueueSettingsRequest {
            queue: QUEUE.to_owned(),
        })
        .await?
        .into_inner()
        .settings
        .context("no settings")?;
    assert_eq!(stored.max_attempts, Some(7));
    let policy = stored.retry_policy.context("no retry policy")?;
    assert_eq!(
        policy.initial_backoff,
        Some(proto_duration(Duration::from_secs(2)))
    );
    assert_eq!(policy.jitter, 0.5);

    let text = docket_ok(&["queue", "settings", QUEUE, "--broker", &url]).await?;
    assert!(text.contains("max attempts:       7\n"), "{text}");
    assert!(text.contains("initial backoff:    2s\n"), "{text}");
    assert!(text.contains("retention:          2h\n"), "{text}");

    let shorter = docket(&[
        "--broker",
        &url,
        "queue",
        "configure",
        QUEUE,
        "--max-backoff",
        "1s",
    ])
    .await?;
    assert_eq!(shorter.status.code(), Some(2), "{}", stderr(&shorter));
    assert!(
        stderr(&shorter).contains("max backoff 1s is shorter than the initial backoff 2s"),
        "{}",
        stderr(&shorter)
    );
    let short_retention = docket(&[
        "--json",
        "--broker",
        &url,
        "queue",
        "configure",
        QUEUE,
        "--retention",
        "10s",
    ])
    .await?;
    assert_eq!(short_retention.status.code(), Some(2));
    let error = json_error(&short_retention)?;
    assert!(
        error_field(&error, "message").contains("--retention"),
        "{error:#}"
    );
    assert_eq!(error_field(&error, "hint"), "use 1m to 10 years");
    for args in [
        vec!["--max-attempts", "0"],
        vec!["--jitter", "1.5"],
        vec!["--backoff-multiplier", "0.5"],
        vec!["--lease-duration", "soon"],
        vec![],
    ] {
        let mut all = vec!["--broker", &url, "queue", "configure", QUEUE];
        all.extend(args.iter().copied());
        let output = docket(&all).await?;
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}",
            stderr(&output)
        );
    }
    let long_lease = docket(&[
        "--broker",
        &url,
        "queue",
        "configure",
        QUEUE,
        "--lease-duration",
        "5h",
    ])
    .await?;
    assert_eq!(long_lease.status.code(), Some(1), "{}", stderr(&long_lease));
    assert!(
        stderr(&long_lease).contains("settings.lease_duration"),
        "{}",
        stderr(&long_lease)
    );
    let unchanged = docket_json(&["--broker", &url, "queue", "settings", QUEUE]).await?;
    assert_eq!(unchanged.pointer("/max_attempts"), Some(&Value::from(7)));
    Ok(())
}

#[tokio::test]
async fn json_errors_on_stderr() -> Result<()> {
    for args in [
        vec!["queue", "list"],
        vec!["dead", "list"],
        vec!["task", "watch", UNKNOWN_TASK_ID],
    ] {
        let mut all = vec!["--json", "--broker", "http://127.0.0.1:1"];
        all.extend(args.iter().copied());
        let output = docket(&all).await?;
        assert_eq!(
            output.status.code(),
            Some(3),
            "{args:?}: {}",
            stderr(&output)
        );
        let error = json_error(&output)?;
        assert_eq!(error_field(&error, "code"), "CONNECT_FAILED");
        assert!(
            error_field(&error, "message").contains("127.0.0.1:1"),
            "{error:#}"
        );
        assert!(
            error_field(&error, "hint").contains("--broker"),
            "{error:#}"
        );
    }

    let usage = docket(&["--json", "dead", "list", "--limit", "5000"]).await?;
    assert_eq!(usage.status.code(), Some(2), "{}", stderr(&usage));
    let error = json_error(&usage)?;
    assert_eq!(error_field(&error, "code"), "USAGE");
    assert!(
        error_field(&error, "message").contains("--limit"),
        "{error:#}"
    );
    Ok(())
}

#[tokio::test]
async fn broker_flag_positions() -> Result<()> {
    let dev_help = docket_ok(&["dev", "--help"]).await?;
    assert!(!dev_help.contains("--broker <"), "{dev_help}");
    assert!(!dev_help.contains("--scheduler <"), "{dev_help}");
    assert!(dev_help.contains("--broker-listen"), "{dev_help}");
    let queue_help = docket_ok(&["queue", "list", "--help"]).await?;
    assert!(queue_help.contains("--broker <URL>"), "{queue_help}");
    assert!(queue_help.contains("DOCKET_BROKER"), "{queue_help}");
    assert!(!queue_help.contains("--scheduler <"), "{queue_help}");
    let enqueue_help = docket_ok(&["enqueue", "--help"]).await?;
    assert!(enqueue_help.contains("--scheduler <URL>"), "{enqueue_help}");

    let misplaced = docket(&["--broker", "http://127.0.0.1:9", "dev"]).await?;
    assert_eq!(misplaced.status.code(), Some(2), "{}", stderr(&misplaced));

    let dir = temp_dir();
    let broker = BrokerProcess::start(dir.path(), &[]).await?;
    let url = broker.endpoint();
    for args in [
        vec!["--broker", &url, "queue", "list"],
        vec!["queue", "--broker", &url, "list"],
        vec!["queue", "list", "--broker", &url],
    ] {
        docket_ok(&args).await?;
    }
    let mut with_env = docket_command(&["--json", "queue", "stats", QUEUE]);
    with_env.env("DOCKET_BROKER", &url);
    let output = run_with_timeout(&mut with_env, WAIT).await?;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    // A flag wins over the variable.
    let mut overridden = docket_command(&["queue", "stats", QUEUE, "--broker", &url]);
    overridden.env("DOCKET_BROKER", "http://127.0.0.1:1");
    let output = run_with_timeout(&mut overridden, WAIT).await?;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    Ok(())
}
