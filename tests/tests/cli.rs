//! The `docket` command line against real broker and scheduler processes: its output in
//! text and JSON, its exit codes, and `docket dev`, which runs both services in one
//! process.

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, anyhow, bail};
use docket_tests::cli::{docket, docket_json, docket_ok, text_at};
use docket_tests::{
    BrokerProcess, SchedulerSetup, WAIT, cli_binary, get_schedule_by_name, get_task, queue_stats,
    temp_dir, utc, wait_for_stats,
};
use serde_json::Value;

/// Returns the number at `pointer` in `document`, failing if it is missing.
fn number_at(document: &Value, pointer: &str) -> Result<u64> {
    document
        .pointer(pointer)
        .and_then(Value::as_u64)
        .ok_or_else(|| anyhow!("no unsigned number at {pointer} in {document:#}"))
}

fn exit_code(output: &Output) -> Option<i32> {
    output.status.code()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test]
async fn enqueue_then_get_task() -> Result<()> {
    let dir = temp_dir();
    let broker = BrokerProcess::start(dir.path(), &[]).await?;
    let url = broker.endpoint();

    let stdout = docket_ok(&[
        "--broker",
        &url,
        "enqueue",
        "emails",
        "send_email",
        "--payload",
        "zoe@example.com",
        "--header",
        "content-type=text/plain",
        "--priority",
        "-3",
        "--max-attempts",
        "7",
    ])
    .await?;
    let task_id = stdout.trim().to_owned();
    let stored = get_task(&mut broker.client().await?, &task_id).await?;
    let stored_task = stored.task.context("GetTask returned no task")?;
    assert_eq!(stored_task.payload.as_ref(), b"zoe@example.com");
    assert_eq!(
        stored_task.headers.get("content-type").map(String::as_str),
        Some("text/plain")
    );
    assert_eq!(stored_task.priority, -3);
    assert_eq!(stored_task.max_attempts, 7);

    let text = docket_ok(&["--broker", &url, "task", "get", &task_id]).await?;
    assert!(text.contains(&format!("id:         {task_id}")), "{text}");
    assert!(text.contains("state:      PENDING"), "{text}");
    assert!(text.contains("attempts:   0 of 7"), "{text}");
    assert!(text.contains("payload:    zoe@example.com"), "{text}");

    let document = docket_json(&["--broker", &url, "task", "get", &task_id]).await?;
    assert_eq!(text_at(&document, "/id")?, task_id);
    assert_eq!(text_at(&document, "/queue")?, "emails");
    assert_eq!(text_at(&document, "/kind")?, "send_email");
    assert_eq!(text_at(&document, "/state")?, "PENDING");
    assert_eq!(text_at(&document, "/payload")?, "zoe@example.com");
    assert_eq!(text_at(&document, "/headers/content-type")?, "text/plain");
    assert_eq!(document.pointer("/priority"), Some(&Value::from(-3)));
    assert_eq!(number_at(&document, "/max_attempts")?, 7);
    assert_eq!(text_at(&document, "/state_history/0/state")?, "PENDING");
    Ok(())
}

#[tokio::test]
async fn task_cancel_then_cancel_again() -> Result<()> {
    let dir = temp_dir();
    let broker = BrokerProcess::start(dir.path(), &[]).await?;
    let url = broker.endpoint();
    let enqueued = docket_json(&["--broker", &url, "enqueue", "emails", "send_email"]).await?;
    let task_id = text_at(&enqueued, "/task_id")?.to_owned();

    let cancelled = docket_json(&["--broker", &url, "task", "cancel", &task_id]).await?;
    assert_eq!(text_at(&cancelled, "/state")?, "CANCELLED");
    let stored = get_task(&mut broker.client().await?, &task_id).await?;
    assert_eq!(stored.state(), docket_tests::v1::TaskState::Cancelled);

    let again = docket(&["--broker", &url, "task", "cancel", &task_id]).await?;
    assert_eq!(exit_code(&again), Some(1), "{}", stderr(&again));
    assert!(
        stderr(&again).contains("FAILED_PRECONDITION"),
        "{}",
        stderr(&again)
    );
    Ok(())
}

#[tokio::test]
async fn enqueue_at_schedules_for_that_time() -> Result<()> {
    let setup = SchedulerSetup::start(&[]).await?;
    let url = setup.scheduler.endpoint();

    let scheduled = docket_json(&[
        "--scheduler",
        &url,
        "enqueue",
        "reports",
        "yearly",
        "--at",
        "2030-01-01T09:00:00+01:00",
    ])
    .await?;

    assert_eq!(
        text_at(&scheduled, "/due_time")?,
        "2030-01-01T08:00:00.000Z"
    );
    let schedule_id = text_at(&scheduled, "/schedule_id")?;
    let stored =
        docket_json(&["--scheduler", &url, "schedule", "get", "--id", schedule_id]).await?;
    assert_eq!(text_at(&stored, "/kind")?, "ONE_SHOT");
    assert_eq!(text_at(&stored, "/state")?, "ACTIVE");
    assert_eq!(text_at(&stored, "/task/queue")?, "reports");
    Ok(())
}

#[tokio::test]
async fn enqueue_json_reports_duplicate_key() -> Result<()> {
    let dir = temp_dir();
    let broker = BrokerProcess::start(dir.path(), &[]).await?;
    let url = broker.endpoint();
    let args = [
        "--broker",
        &url,
        "enqueue",
        "emails",
        "send_email",
        "--idempotency-key",
        "order-17",
    ];

    let first = docket_json(&args).await?;
    let second = docket_json(&args).await?;

    assert_eq!(first.pointer("/duplicate"), Some(&Value::Bool(false)));
    assert_eq!(second.pointer("/duplicate"), Some(&Value::Bool(true)));
    assert_eq!(text_at(&second, "/task_id")?, text_at(&first, "/task_id")?);
    Ok(())
}

#[tokio::test]
async fn enqueue_in_releases_task_later() -> Result<()> {
    let setup = SchedulerSetup::start(&[]).await?;
    let broker_url = setup.broker.endpoint();
    let scheduler_url = setup.scheduler.endpoint();
    let before = SystemTime::now();

    let scheduled = docket_json(&[
        "--broker",
        &broker_url,
        "--scheduler",
        &scheduler_url,
        "enqueue",
        "reminders",
        "remind",
        "--payload",
        "later",
        "--in",
        "1s",
    ])
    .await?;
    let schedule_id = text_at(&scheduled, "/schedule_id")?.to_owned();
    let due_time = utc(text_at(&scheduled, "/due_time")?);
    assert!(
        due_time >= before + Duration::from_secs(1),
        "due time {due_time:?} is less than 1s after {before:?}"
    );

    let mut broker = setup.broker.client().await?;
    wait_for_stats(&mut broker, "reminders", "one pending task", |stats| {
        stats.pending == 1
    })
    .await?;
    let released = docket_json(&[
        "--scheduler",
        &scheduler_url,
        "schedule",
        "get",
        "--id",
        &schedule_id,
    ])
    .await?;
    let task_id = text_at(&released, "/last_outcome/task_id")?;
    let task = docket_json(&["--broker", &broker_url, "task", "get", task_id]).await?;
    assert_eq!(text_at(&task, "/payload")?, "later");
    assert_eq!(text_at(&task, "/headers/docket-schedule-id")?, schedule_id);
    Ok(())
}

#[tokio::test]
async fn schedule_cancel_withdraws_delayed_task() -> Result<()> {
    let setup = SchedulerSetup::start(&[]).await?;
    let broker_url = setup.broker.endpoint();
    let scheduler_url = setup.scheduler.endpoint();

    let scheduled = docket_json(&[
        "--broker",
        &broker_url,
        "--scheduler",
        &scheduler_url,
        "enqueue",
        "reminders",
        "remind",
        "--in",
        "1h",
    ])
    .await?;
    let schedule_id = text_at(&scheduled, "/schedule_id")?.to_owned();

    let cancelled = docket_json(&[
        "--scheduler",
        &scheduler_url,
        "schedule",
        "cancel",
        &schedule_id,
    ])
    .await?;
    assert_eq!(text_at(&cancelled, "/id")?, schedule_id);
    assert_eq!(text_at(&cancelled, "/state")?, "CANCELLED");

    // A second cancel finds nothing left to cancel, and an unknown id is not found.
    let again = docket(&[
        "--scheduler",
        &scheduler_url,
        "schedule",
        "cancel",
        &schedule_id,
    ])
    .await?;
    assert_eq!(again.status.code(), Some(1), "{again:?}");
    let unknown = docket(&[
        "--scheduler",
        &scheduler_url,
        "schedule",
        "cancel",
        "0190a1b2-c3d4-7e5f-8a6b-7c8d9e0f1a2b",
    ])
    .await?;
    assert_eq!(unknown.status.code(), Some(4), "{unknown:?}");
    Ok(())
}

#[tokio::test]
async fn queue_commands_change_the_queue() -> Result<()> {
    let dir = temp_dir();
    let broker = BrokerProcess::start(dir.path(), &[]).await?;
    let url = broker.endpoint();
    let mut client = broker.client().await?;
    for payload in ["a", "b"] {
        docket_ok(&[
            "--broker",
            &url,
            "enqueue",
            "jobs",
            "run",
            "--payload",
            payload,
        ])
        .await?;
    }

    let list = docket_json(&["--broker", &url, "queue", "list"]).await?;
    assert_eq!(text_at(&list, "/queues/0/queue")?, "jobs");
    assert_eq!(number_at(&list, "/queues/0/pending")?, 2);
    let table = docket_ok(&["--broker", &url, "queue", "list"]).await?;
    assert!(table.starts_with("QUEUE "), "{table}");
    assert!(table.contains("\njobs "), "{table}");

    docket_ok(&["--broker", &url, "queue", "pause", "jobs"]).await?;
    let paused = docket_json(&["--broker", &url, "queue", "stats", "jobs"]).await?;
    assert_eq!(paused.pointer("/paused"), Some(&Value::Bool(true)));
    assert!(queue_stats(&mut client, "jobs").await?.paused);

    docket_ok(&["--broker", &url, "queue", "resume", "jobs"]).await?;
    let resumed = docket_json(&["--broker", &url, "queue", "stats", "jobs"]).await?;
    assert_eq!(resumed.pointer("/paused"), Some(&Value::Bool(false)));

    let purged = docket_json(&["--broker", &url, "queue", "purge", "jobs"]).await?;
    assert_eq!(number_at(&purged, "/purged")?, 2);
    let stats = docket_ok(&["--broker", &url, "queue", "stats", "jobs"]).await?;
    assert!(stats.contains("pending:        0"), "{stats}");
    assert_eq!(queue_stats(&mut client, "jobs").await?.pending, 0);
    Ok(())
}

#[tokio::test]
async fn schedule_commands_manage_schedules() -> Result<()> {
    let setup = SchedulerSetup::start(&[]).await?;
    let url = setup.scheduler.endpoint();
    let mut scheduler = setup.scheduler.client().await?;

    let nightly = docket_json(&[
        "--scheduler",
        &url,
        "schedule",
        "add",
        "nightly-report",
        "--queue",
        "reports",
        "--kind",
        "nightly_report",
        "--payload",
        "sales",
        "--cron",
        "0 0 2 * * *",
        "--tz",
        "Europe/Berlin",
    ])
    .await?;
    assert_eq!(text_at(&nightly, "/name")?, "nightly-report");
    assert_eq!(text_at(&nightly, "/kind")?, "RECURRING");
    assert_eq!(text_at(&nightly, "/state")?, "ACTIVE");
    assert_eq!(text_at(&nightly, "/recurrence/rule/cron")?, "0 0 2 * * *");
    assert_eq!(text_at(&nightly, "/task/payload")?, "sales");
    let stored = get_schedule_by_name(&mut scheduler, "nightly-report").await?;
    assert_eq!(stored.id, text_at(&nightly, "/id")?);

    let hourly = docket_json(&[
        "--scheduler",
        &url,
        "schedule",
        "add",
        "hourly-sync",
        "--queue",
        "sync",
        "--kind",
        "sync",
        "--every",
        "1h",
        "--missed",
        "run-once",
        "--paused",
    ])
    .await?;
    assert_eq!(text_at(&hourly, "/state")?, "PAUSED");
    assert_eq!(text_at(&hourly, "/recurrence/missed_runs")?, "run-once");
    assert_eq!(
        hourly.pointer("/recurrence/rule/every_seconds"),
        Some(&Value::from(3600.0))
    );

    let list = docket_json(&["--scheduler", &url, "schedule", "list"]).await?;
    assert_eq!(text_at(&list, "/schedules/0/name")?, "hourly-sync");
    assert_eq!(text_at(&list, "/schedules/1/name")?, "nightly-report");
    assert_eq!(list.pointer("/schedules/2"), None);
    let table = docket_ok(&["--scheduler", &url, "schedule", "list"]).await?;
    assert!(
        table.contains("cron \"0 0 2 * * *\" in Europe/Berlin"),
        "{table}"
    );

    let paused = docket_json(&["--scheduler", &url, "schedule", "pause", "nightly-report"]).await?;
    assert_eq!(text_at(&paused, "/state")?, "PAUSED");
    let resumed =
        docket_json(&["--scheduler", &url, "schedule", "resume", "nightly-report"]).await?;
    assert_eq!(text_at(&resumed, "/state")?, "ACTIVE");
    let got = docket_json(&["--scheduler", &url, "schedule", "get", "nightly-report"]).await?;
    assert_eq!(text_at(&got, "/state")?, "ACTIVE");
    assert_eq!(
        text_at(&got, "/recurrence/rule/time_zone")?,
        "Europe/Berlin"
    );

    let deleted =
        docket_json(&["--scheduler", &url, "schedule", "delete", "nightly-report"]).await?;
    assert_eq!(deleted.pointer("/deleted"), Some(&Value::Bool(true)));
    let missing = docket(&["--scheduler", &url, "schedule", "get", "nightly-report"]).await?;
    assert_eq!(exit_code(&missing), Some(4), "{}", stderr(&missing));
    Ok(())
}

#[tokio::test]
async fn unknown_task_exits_4() -> Result<()> {
    let dir = temp_dir();
    let broker = BrokerProcess::start(dir.path(), &[]).await?;
    let unknown_id = uuid::Uuid::now_v7().to_string();

    let output = docket(&["--broker", &broker.endpoint(), "task", "get", &unknown_id]).await?;

    assert_eq!(exit_code(&output), Some(4), "{}", stderr(&output));
    assert!(stderr(&output).contains("NOT_FOUND"), "{}", stderr(&output));
    assert!(output.stdout.is_empty());
    Ok(())
}

#[tokio::test]
async fn unreachable_broker_exits_3() -> Result<()> {
    let output = docket(&["--broker", "http://127.0.0.1:1", "queue", "list"]).await?;

    assert_eq!(exit_code(&output), Some(3), "{}", stderr(&output));
    let message = stderr(&output);
    assert!(message.contains("http://127.0.0.1:1"), "{message}");
    assert!(message.contains("is the broker running?"), "{message}");
    assert!(message.contains("docket dev"), "{message}");
    Ok(())
}

#[tokio::test]
async fn bad_usage_exits_2() -> Result<()> {
    let cases: [&[&str]; 7] = [
        &["enqueue", "emails"],
        &["enqueue", "emails", "send", "--priority", "high"],
        &["enqueue", "emails", "send", "--in", "soon"],
        &[
            "enqueue",
            "emails",
            "send",
            "--in",
            "1s",
            "--idempotency-key",
            "a",
        ],
        &[
            "enqueue",
            "emails",
            "send",
            "--payload-file",
            "/nonexistent/payload",
        ],
        &["schedule", "add", "name", "--queue", "q", "--kind", "k"],
        &[
            "schedule", "add", "name", "--queue", "q", "--kind", "k", "--every", "1h", "--tz",
            "UTC",
        ],
    ];
    for args in cases {
        let output = docket(args).await?;
        assert_eq!(exit_code(&output), Some(2), "{args:?}: {}", stderr(&output));
        assert!(!stderr(&output).is_empty(), "{args:?}: stderr is empty");
    }
    Ok(())
}

#[tokio::test]
async fn invalid_queue_name_exits_1() -> Result<()> {
    let dir = temp_dir();
    let broker = BrokerProcess::start(dir.path(), &[]).await?;

    let output = docket(&[
        "--broker",
        &broker.endpoint(),
        "enqueue",
        "bad queue!",
        "send",
    ])
    .await?;

    assert_eq!(exit_code(&output), Some(1), "{}", stderr(&output));
    let message = stderr(&output);
    assert!(message.contains("INVALID_ARGUMENT"), "{message}");
    assert!(message.contains("queue"), "{message}");
    assert!(message.contains("bad queue!"), "{message}");
    Ok(())
}

/// A running `docket dev` process with its stderr drained into memory.
struct DevProcess {
    child: Child,
    stdout_lines: mpsc::Receiver<String>,
    /// Reader of stderr, taken when the process has exited.
    stderr: Option<std::thread::JoinHandle<Vec<u8>>>,
}

impl DevProcess {
    fn start(args: &[&str]) -> Result<Self> {
        let mut command = Command::new(cli_binary());
        command
            .arg("dev")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("DOCKET_") {
                command.env_remove(name);
            }
        }
        let mut child = command.spawn().context("failed to start docket dev")?;

        let stdout = child.stdout.take().expect("stdout is piped");
        let (sender, stdout_lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        let mut stderr_pipe = child.stderr.take().expect("stderr is piped");
        let stderr = std::thread::spawn(move || {
            let mut contents = Vec::new();
            let _ = stderr_pipe.read_to_end(&mut contents);
            contents
        });
        Ok(DevProcess {
            child,
            stdout_lines,
            stderr: Some(stderr),
        })
    }

    /// Waits for the line that announces both services and returns the broker's and the
    /// scheduler's URL from it.
    fn ready_urls(&self) -> Result<(String, String)> {
        let line = self
            .stdout_lines
            .recv_timeout(WAIT)
            .context("docket dev printed no line on stdout")?;
        let url_after = |label: &str| {
            line.split(label)
                .nth(1)
                .and_then(|rest| rest.split([',', ';', ' ']).next())
                .map(str::to_owned)
                .ok_or_else(|| anyhow!("no {label:?} URL in {line:?}"))
        };
        assert!(line.contains("press Ctrl-C to stop"), "{line}");
        Ok((url_after("broker ")?, url_after("scheduler ")?))
    }

    fn terminate(&self) -> Result<()> {
        let pid = libc::pid_t::try_from(self.child.id()).context("pid out of range")?;
        // SAFETY: `kill` only sends a signal. `pid` is our own child, which cannot be
        // reused by another process before we reap it with `wait`.
        if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
            bail!(
                "failed to send SIGTERM: {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    }

    /// Waits up to [`WAIT`] for the process to exit and returns its status and stderr.
    async fn wait(&mut self) -> Result<(ExitStatus, String)> {
        let deadline = tokio::time::Instant::now() + WAIT;
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            if tokio::time::Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                let stderr = self.take_stderr();
                bail!(
                    "docket dev did not exit within {WAIT:?}; stderr:\n{}",
                    String::from_utf8_lossy(&stderr)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let stderr = self.take_stderr();
        Ok((status, String::from_utf8_lossy(&stderr).into_owned()))
    }

    fn take_stderr(&mut self) -> Vec<u8> {
        self.stderr
            .take()
            .and_then(|reader| reader.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for DevProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[tokio::test]
async fn dev_serves_both_and_stops_on_sigterm() -> Result<()> {
    let dir = temp_dir();
    let data_dir = dir.path().to_str().context("temporary path is not UTF-8")?;
    let mut dev = DevProcess::start(&[
        "--data-dir",
        data_dir,
        "--broker-listen",
        "127.0.0.1:0",
        "--scheduler-listen",
        "127.0.0.1:0",
    ])?;
    let (broker_url, scheduler_url) = dev.ready_urls()?;
    assert!(!broker_url.ends_with(":0"), "{broker_url}");
    assert!(!scheduler_url.ends_with(":0"), "{scheduler_url}");

    let task_id = docket_ok(&["--broker", &broker_url, "enqueue", "dev", "now"]).await?;
    let task = docket_json(&["--broker", &broker_url, "task", "get", task_id.trim()]).await?;
    assert_eq!(text_at(&task, "/state")?, "PENDING");

    // The scheduler inside `dev` releases into the broker inside `dev`.
    docket_ok(&[
        "--scheduler",
        &scheduler_url,
        "enqueue",
        "dev",
        "later",
        "--in",
        "1s",
    ])
    .await?;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let stats = docket_json(&["--broker", &broker_url, "queue", "stats", "dev"]).await?;
        if number_at(&stats, "/pending")? == 2 {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("the delayed task was not released within {WAIT:?}: {stats:#}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    dev.terminate()?;
    let (status, stderr) = dev.wait().await?;
    assert_eq!(status.code(), Some(0), "stderr:\n{stderr}");
    assert!(stderr.contains("broker stopped"), "{stderr}");
    assert!(stderr.contains("scheduler stopped"), "{stderr}");
    assert!(dir.path().join("broker.redb").is_file());
    assert!(dir.path().join("scheduler.redb").is_file());
    Ok(())
}

#[tokio::test]
async fn dev_exits_1_when_port_is_busy() -> Result<()> {
    let dir = temp_dir();
    let data_dir = dir.path().to_str().context("temporary path is not UTF-8")?;
    let busy = TcpListener::bind("127.0.0.1:0")?;
    let busy_addr = busy.local_addr()?.to_string();

    let mut dev = DevProcess::start(&[
        "--data-dir",
        data_dir,
        "--broker-listen",
        "127.0.0.1:0",
        "--scheduler-listen",
        &busy_addr,
    ])?;
    let (status, stderr) = dev.wait().await?;

    assert_eq!(status.code(), Some(1), "stderr:\n{stderr}");
    assert!(stderr.contains("scheduler failed"), "{stderr}");
    assert!(stderr.contains(&busy_addr), "{stderr}");
    assert!(stderr.contains("broker stopped"), "{stderr}");
    drop(busy);
    Ok(())
}
