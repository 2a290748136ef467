//! The `email_campaign` example sending through a real SMTP server on loopback.
//!
//! The server is `tests/smtp/server.py`, built on the Python package aiosmtpd, which
//! `tests/requirements.txt` pins. It records every accepted message, rejects some
//! recipients with 451 on their first attempt and others with 550 every time. The test
//! checks that each recipient gets exactly one message, that the temporary rejections
//! are retried once, and that the permanent ones are dead-lettered with the server's
//! reply.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use docket_proto::v1::{
    ListDeadTasksRequest, QueueSettings, RetryPolicy, TaskState, UpdateQueueSettingsRequest,
};
use docket_tests::{
    BrokerProcess, WAIT, example_binary, get_task, proto_duration, run_with_timeout, temp_dir,
};

const QUEUE: &str = "emails";

const COUNTRY: &str = "NL";

const SUBJECT: &str = "Frühlingsangebote für Sie";

/// Envelope sender of the example's messages.
const SENDER: &str = "campaigns@example.com";

/// Domain of the Message-ID that the example derives from the task id.
const MESSAGE_ID_DOMAIN: &str = "campaigns.example.com";

/// Customers of the campaign. Only the opted-in customers of `COUNTRY` are recipients.
const CUSTOMERS: &str = "\
id,name,email,country,opted_in,signup_date
1,Zoë de Vries,zoe.devries@example.com,NL,true,2021-01-02
2,Jan Jansen,jan.jansen@example.org,NL,true,2021-02-03
3,Sanne Bakker,sanne.bakker@example.net,NL,true,2021-03-04
4,Daan Visser,daan.visser@example.com,NL,true,2021-04-05
5,Eva Smit,eva.smit@example.org,NL,true,2021-05-06
6,Lotte Mulder,lotte.mulder@example.net,nl,true,2021-06-07
7,Bram de Boer,bram.deboer@example.com,NL,true,2021-07-08
8,Fleur Dekker,fleur.dekker@example.org,NL,true,2021-08-09
9,Ruud Meijer,ruud.meijer@example.com,NL,false,2021-09-10
10,Jörg Weiß,joerg.weiss@example.de,DE,true,2021-10-11
";

/// Recipients that the server rejects with 451 on their first attempt only.
const TEMPORARY: [&str; 2] = ["jan.jansen@example.org", "lotte.mulder@example.net"];

/// Recipients that the server rejects with 550 on every attempt.
const PERMANENT: [&str; 2] = ["daan.visser@example.com", "fleur.dekker@example.org"];

/// The server's reply to a permanently rejected recipient, as tests/smtp/server.py sends it.
const PERMANENT_REPLY: &str = "550 5.1.1 Mailbox unavailable";

/// The server's reply to a temporarily rejected recipient, as tests/smtp/server.py sends it.
const TEMPORARY_REPLY: &str = "451 4.3.0 Mailbox busy, try again later";

/// Upper bound on the example's run, which takes about a second.
const RUN_LIMIT: Duration = Duration::from_secs(60);

/// Delay before a retry, short so that the test stays quick.
const RETRY_BACKOFF: Duration = Duration::from_millis(200);

/// The Python SMTP server, killed by PID when dropped.
struct SmtpServer {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl SmtpServer {
    /// Starts tests/smtp/server.py on a free loopback port, writing its message log into
    /// `dir`, and waits until it accepts connections.
    fn start(dir: &Path, temporary: &[&str], permanent: &[&str]) -> Result<Self> {
        require_aiosmtpd()?;

        let log = dir.join("messages.jsonl");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("smtp/server.py");
        let mut command = Command::new("python3");
        command.arg(&script).arg("--log").arg(&log);
        for address in temporary {
            command.arg("--temporary").arg(address);
        }
        for address in permanent {
            command.arg("--permanent").arg(address);
        }
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("failed to start {command:?}"))?;

        // The first stdout line is "listening HOST PORT". A thread reads it, so that a
        // server that never prints cannot block the test past WAIT.
        let stdout = child.stdout.take().context("stdout is piped")?;
        let (sender, receiver) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = sender.send(line);
        });
        let mut server = SmtpServer {
            child,
            port: 0,
            log,
        };
        let line = receiver.recv_timeout(WAIT).with_context(|| {
            format!(
                "{} printed no listening line within {WAIT:?}",
                script.display()
            )
        })?;
        server.port = line
            .strip_prefix("listening 127.0.0.1 ")
            .and_then(|port| port.trim().parse().ok())
            .with_context(|| format!("unexpected first line from the SMTP server: {line:?}"))?;
        Ok(server)
    }

    fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Reads the accepted messages that the server logged.
    fn messages(&self) -> Result<Vec<LoggedMessage>> {
        let text = match std::fs::read_to_string(&self.log) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(error) => return Err(error).context("failed to read the SMTP server's log"),
        };
        text.lines().map(LoggedMessage::parse).collect()
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        // Child::kill sends SIGKILL to this child's PID only.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Fails with the install command when the Python package aiosmtpd is missing.
fn require_aiosmtpd() -> Result<()> {
    let output = Command::new("python3")
        .args(["-c", "import aiosmtpd"])
        .stdin(Stdio::null())
        .output()
        .context("failed to run python3, which this test needs for its SMTP server")?;
    if !output.status.success() {
        bail!(
            "the Python package aiosmtpd is not importable, and this test runs its SMTP \
             server with it: install it with `python3 -m pip install -r tests/requirements.txt`\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// One message that the server accepted.
#[derive(Debug)]
struct LoggedMessage {
    mail_from: String,
    rcpt_tos: Vec<String>,
    subject: String,
    message_id: String,
}

impl LoggedMessage {
    /// Parses one line of the server's log.
    fn parse(line: &str) -> Result<Self> {
        let invalid = || format!("invalid line in the SMTP server's log: {line}");
        let record: serde_json::Value = serde_json::from_str(line).with_context(invalid)?;
        let text = |field: &str| {
            record[field]
                .as_str()
                .map(str::to_owned)
                .with_context(invalid)
        };
        let rcpt_tos = record["rcpt_tos"]
            .as_array()
            .with_context(invalid)?
            .iter()
            .map(|address| address.as_str().map(str::to_owned).with_context(invalid))
            .collect::<Result<_>>()?;
        Ok(LoggedMessage {
            mail_from: text("mail_from")?,
            rcpt_tos,
            subject: text("subject")?,
            message_id: text("message_id")?,
        })
    }

    /// Returns the task id inside a Message-ID such as `<id@campaigns.example.com>`.
    fn task_id(&self) -> Result<&str> {
        self.message_id
            .strip_prefix('<')
            .and_then(|rest| rest.strip_suffix(&format!("@{MESSAGE_ID_DOMAIN}>")))
            .with_context(|| {
                format!(
                    "Message-ID {:?} is not <task id@{MESSAGE_ID_DOMAIN}>",
                    self.message_id
                )
            })
    }
}

/// Returns the recipient address in the payload of a `send_email` task.
fn payload_email(payload: &[u8]) -> Result<String> {
    let job: serde_json::Value = serde_json::from_slice(payload).context("payload is not JSON")?;
    job["email"]
        .as_str()
        .map(str::to_owned)
        .context("payload has no email")
}

#[tokio::test(flavor = "multi_thread")]
async fn email_campaign_sends_through_smtp() -> Result<()> {
    let temporary: HashSet<&str> = TEMPORARY.into_iter().collect();
    let permanent: HashSet<&str> = PERMANENT.into_iter().collect();
    let recipients: HashSet<&str> = [
        "zoe.devries@example.com",
        "jan.jansen@example.org",
        "sanne.bakker@example.net",
        "daan.visser@example.com",
        "eva.smit@example.org",
        "lotte.mulder@example.net",
        "bram.deboer@example.com",
        "fleur.dekker@example.org",
    ]
    .into_iter()
    .collect();
    let delivered: HashSet<&str> = recipients.difference(&permanent).copied().collect();

    let work_dir = temp_dir();
    let customers = work_dir.path().join("customers.csv");
    std::fs::write(&customers, CUSTOMERS)?;
    let smtp = SmtpServer::start(work_dir.path(), &TEMPORARY, &PERMANENT)?;

    let data_dir = temp_dir();
    let broker = BrokerProcess::start(data_dir.path(), &[]).await?;
    let mut client = broker.client().await?;
    // Tasks enqueued without a retry policy take the queue's, so retries come quickly.
    client
        .update_queue_settings(UpdateQueueSettingsRequest {
            queue: QUEUE.to_string(),
            settings: Some(QueueSettings {
                retry_policy: Some(RetryPolicy {
                    initial_backoff: Some(proto_duration(RETRY_BACKOFF)),
                    multiplier: 1.0,
                    max_backoff: Some(proto_duration(RETRY_BACKOFF)),
                    jitter: 0.0,
                }),
                ..QueueSettings::default()
            }),
        })
        .await?;

    let mut command = Command::new(example_binary("email_campaign"));
    command
        .arg("--broker")
        .arg(broker.endpoint())
        .arg("--smtp")
        .arg(smtp.address())
        .arg("--customers")
        .arg(&customers)
        .arg("--country")
        .arg(COUNTRY)
        .arg("--subject")
        .arg(SUBJECT)
        .arg("--queue")
        .arg(QUEUE)
        .arg("run");
    let output = run_with_timeout(&mut command, RUN_LIMIT).await?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let context = format!("stdout:\n{stdout}\nstderr:\n{stderr}");

    // Dead-lettered tasks make the campaign fail, with exit code 1.
    assert_eq!(output.status.code(), Some(1), "exit status; {context}");
    let summary = stdout
        .lines()
        .find(|line| line.starts_with("enqueued "))
        .with_context(|| format!("no summary line; {context}"))?;
    let expected_prefix = format!(
        "enqueued {}, delivered {}, failed {}, elapsed ",
        recipients.len(),
        delivered.len(),
        permanent.len()
    );
    assert!(
        summary.starts_with(&expected_prefix),
        "summary line {summary:?} does not start with {expected_prefix:?}"
    );
    assert!(
        stderr.contains("progress: delivered "),
        "no progress line; {context}"
    );

    // Exactly one message per delivered recipient, with the campaign's sender and subject.
    let messages = smtp.messages()?;
    let mut task_by_recipient: HashMap<String, String> = HashMap::new();
    for message in &messages {
        assert_eq!(message.mail_from, SENDER, "envelope sender of {message:?}");
        assert_eq!(message.subject, SUBJECT, "subject of {message:?}");
        let [recipient] = message.rcpt_tos.as_slice() else {
            bail!("message {message:?} does not have exactly one envelope recipient");
        };
        let previous = task_by_recipient.insert(recipient.clone(), message.task_id()?.to_owned());
        assert!(
            previous.is_none(),
            "{recipient} received more than one message"
        );
    }
    let received: HashSet<&str> = task_by_recipient.keys().map(String::as_str).collect();
    assert_eq!(received, delivered, "recipients of the accepted messages");

    // A temporary rejection fails only the first attempt, and the second one delivers.
    for (recipient, task_id) in &task_by_recipient {
        let status = get_task(&mut client, task_id).await?;
        assert_eq!(
            status.state(),
            TaskState::Succeeded,
            "state of the task of {recipient}"
        );
        let email = payload_email(&status.task.as_ref().context("status without task")?.payload)?;
        assert_eq!(&email, recipient, "payload of task {task_id}");
        assert!(
            String::from_utf8_lossy(&status.result).starts_with("250 2.0.0 Message accepted"),
            "result of the task of {recipient}: {:?}",
            String::from_utf8_lossy(&status.result)
        );
        if temporary.contains(recipient.as_str()) {
            assert_eq!(status.attempts, 2, "attempts of the task of {recipient}");
            let first_error = &status.attempt_history[0].error;
            assert!(
                first_error.contains(TEMPORARY_REPLY),
                "first attempt of {recipient} failed with {first_error:?}"
            );
        } else {
            assert_eq!(status.attempts, 1, "attempts of the task of {recipient}");
        }
    }

    // A permanent rejection dead-letters the task on its first attempt, with the reply.
    let dead = client
        .list_dead_tasks(ListDeadTasksRequest {
            queue: QUEUE.to_string(),
            page_size: 1000,
            page_token: String::new(),
        })
        .await?
        .into_inner()
        .tasks;
    let mut dead_recipients = HashSet::new();
    for status in &dead {
        let task = status.task.as_ref().context("dead status without task")?;
        let email = payload_email(&task.payload)?;
        assert_eq!(status.attempts, 1, "attempts of the dead task of {email}");
        assert!(
            status.last_error.contains(PERMANENT_REPLY),
            "error of the dead task of {email}: {:?}",
            status.last_error
        );
        let listed = format!("dead-lettered {email} (task {}, attempts 1): ", task.id);
        let line = stdout
            .lines()
            .find(|line| line.starts_with(&listed))
            .with_context(|| format!("no line starting with {listed:?}; {context}"))?;
        assert!(line.contains(PERMANENT_REPLY), "dead-letter line {line:?}");
        dead_recipients.insert(email);
    }
    let dead_recipients: HashSet<&str> = dead_recipients.iter().map(String::as_str).collect();
    assert_eq!(dead_recipients, permanent, "recipients of the dead tasks");
    ensure!(
        dead.len() == permanent.len(),
        "{} dead tasks, expected {}",
        dead.len(),
        permanent.len()
    );
    Ok(())
}
