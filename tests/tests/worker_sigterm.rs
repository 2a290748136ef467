//! A worker process stopped with SIGTERM while handlers run: the e-mail campaign example's
//! `work` command, whose worker runs until `docket::shutdown_signal`.
//!
//! The running handlers finish and are acked, the process exits 0, and the tasks it had
//! not started stay pending without a used attempt.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use docket_proto::v1::TaskState;
use docket_tests::{
    BrokerProcess, WAIT, example_binary, get_task, queue_stats, run_with_timeout, temp_dir, within,
};

const QUEUE: &str = "sigterm-campaign";
const RECIPIENTS: usize = 6;
const CONCURRENCY: usize = 2;

/// Writes a customer file with `RECIPIENTS` opted-in customers in Germany.
fn write_customers(dir: &Path) -> Result<std::path::PathBuf> {
    let mut rows = String::from("id,name,email,country,opted_in,signup_date\n");
    for index in 1..=RECIPIENTS {
        rows.push_str(&format!(
            "{index},Customer {index},customer.{index}@example.com,DE,true,2024-01-0{index}\n"
        ));
    }
    let path = dir.join("customers.csv");
    std::fs::write(&path, rows)?;
    Ok(path)
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_finishes_running_handlers_and_exits() -> Result<()> {
    let data_dir = temp_dir();
    let work_dir = temp_dir();
    let broker = BrokerProcess::start(data_dir.path(), &[]).await?;
    let mut client = broker.client().await?;
    let customers = write_customers(work_dir.path())?;
    let maildir = work_dir.path().join("mail");
    let campaign = |command: &str| {
        let mut campaign = Command::new(example_binary("email_campaign"));
        campaign
            .arg("--broker")
            .arg(broker.endpoint())
            .arg("--customers")
            .arg(&customers)
            .arg("--queue")
            .arg(QUEUE)
            .arg(command);
        campaign
    };

    let produced = run_with_timeout(&mut campaign("produce"), WAIT).await?;
    if !produced.status.success() {
        bail!(
            "produce failed: {}",
            String::from_utf8_lossy(&produced.stderr)
        );
    }

    // Each message takes 1.5 s, so the SIGTERM below arrives while two run.
    let mut worker = campaign("work")
        .arg("--maildir")
        .arg(&maildir)
        .arg("--send-ms")
        .arg("1500")
        .arg("--concurrency")
        .arg(CONCURRENCY.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("failed to start the campaign's worker")?;
    let leased = within(WAIT, "two running handlers", async {
        loop {
            let stats = queue_stats(&mut client, QUEUE).await?;
            if stats.leased == CONCURRENCY as u64 {
                return Ok(stats);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await?;
    assert_eq!(leased.succeeded, 0, "{leased:?}");

    let pid = libc::pid_t::try_from(worker.id())?;
    // SAFETY: `pid` is the worker process this test started and has not waited for.
    let sent = unsafe { libc::kill(pid, libc::SIGTERM) };
    assert_eq!(sent, 0, "kill(SIGTERM) failed");
    let status = within(WAIT, "the worker to exit", async {
        loop {
            if let Some(status) = worker.try_wait()? {
                return Ok(status);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let status = match status {
        Ok(status) => status,
        Err(error) => {
            let _ = worker.kill();
            let _ = worker.wait();
            return Err(error);
        }
    };
    let mut stderr = String::new();
    if let Some(mut pipe) = worker.stderr.take() {
        std::io::Read::read_to_string(&mut pipe, &mut stderr)?;
    }
    assert!(status.success(), "worker exit {status}; stderr:\n{stderr}");

    let stats = queue_stats(&mut client, QUEUE).await?;
    assert_eq!(
        (
            stats.succeeded,
            stats.pending,
            stats.leased,
            stats.retry_wait
        ),
        (CONCURRENCY as u64, (RECIPIENTS - CONCURRENCY) as u64, 0, 0),
        "{stats:?}; worker stderr:\n{stderr}"
    );
    let delivered = std::fs::read_dir(maildir.join("new"))?.count();
    assert_eq!(delivered, CONCURRENCY, "files in the Maildir");

    // A second worker sends the rest. No task lost an attempt at the SIGTERM, so each
    // succeeds on its first.
    let mut finisher = campaign("work")
        .arg("--maildir")
        .arg(&maildir)
        .arg("--send-ms")
        .arg("10")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("failed to start the second worker")?;
    let finished = within(WAIT, "every message to be sent", async {
        loop {
            let stats = queue_stats(&mut client, QUEUE).await?;
            if stats.succeeded == RECIPIENTS as u64 {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let _ = finisher.kill();
    let _ = finisher.wait();
    finished?;

    let mut task_ids = Vec::new();
    for entry in std::fs::read_dir(maildir.join("new"))? {
        let name = entry?
            .file_name()
            .into_string()
            .map_err(|name| anyhow!("{name:?}"))?;
        let task_id = name
            .strip_suffix(".docket")
            .with_context(|| format!("unexpected Maildir file {name}"))?;
        task_ids.push(task_id.to_owned());
    }
    assert_eq!(task_ids.len(), RECIPIENTS, "files in the Maildir");
    for task_id in &task_ids {
        let status = get_task(&mut client, task_id).await?;
        assert_eq!(status.state(), TaskState::Succeeded, "{status:?}");
        assert_eq!(status.attempts, 1, "attempts of {task_id}: {status:?}");
    }
    Ok(())
}
