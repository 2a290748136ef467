//! The `email_campaign` example end to end: it enqueues one message per opted-in customer
//! of a country, and its workers deliver each into a Maildir exactly once.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use docket_proto::v1::TaskState;
use docket_tests::{BrokerProcess, example_binary, get_task, run_with_timeout, temp_dir};

const COUNTRY: &str = "DE";

/// Upper bound on the example's run. With `--send-ms 5` it takes a few seconds.
const RUN_LIMIT: Duration = Duration::from_secs(120);

/// Connections that check the tasks' final states in parallel.
const STATUS_CHECKERS: usize = 8;

fn customers_csv() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../worker-sdk/examples/data/customers.csv")
}

/// Reads the e-mail addresses of the campaign's recipients with the example's filter:
/// opted in, and of the country, compared ignoring ASCII case.
fn expected_recipients(path: &Path, country: &str) -> Result<HashSet<String>> {
    let mut reader = csv::Reader::from_path(path)
        .with_context(|| format!("failed to open {}", path.display()))?;
    let headers = reader.headers()?.clone();
    let column = |name: &str| {
        headers
            .iter()
            .position(|header| header == name)
            .with_context(|| format!("{} has no column {name:?}", path.display()))
    };
    let email_column = column("email")?;
    let country_column = column("country")?;
    let opted_in_column = column("opted_in")?;

    let mut recipients = HashSet::new();
    for record in reader.records() {
        let record = record?;
        let opted_in = match &record[opted_in_column] {
            "true" => true,
            "false" => false,
            other => bail!("invalid opted_in value {other:?} in {}", path.display()),
        };
        if opted_in && record[country_column].eq_ignore_ascii_case(country) {
            let email = record[email_column].to_string();
            if !recipients.insert(email.clone()) {
                bail!("recipient {email} appears twice in {}", path.display());
            }
        }
    }
    Ok(recipients)
}

/// Returns the unfolded value of the first header `name` of an RFC 5322 message.
fn header_value(message: &str, name: &str) -> Option<String> {
    let header_block = message.split("\r\n\r\n").next()?;
    let mut unfolded: Vec<String> = Vec::new();
    for line in header_block.split("\r\n") {
        if line.starts_with([' ', '\t']) {
            if let Some(last) = unfolded.last_mut() {
                last.push_str(line);
            }
        } else {
            unfolded.push(line.to_string());
        }
    }
    unfolded.into_iter().find_map(|line| {
        let (field, value) = line.split_once(':')?;
        field
            .eq_ignore_ascii_case(name)
            .then(|| value.trim().to_string())
    })
}

/// Extracts the address inside the angle brackets of a mailbox such as
/// `=?utf-8?b?...?= <name@example.com>`.
fn angle_address(mailbox: &str) -> Option<String> {
    let start = mailbox.rfind('<')?;
    let end = mailbox[start..].find('>')? + start;
    Some(mailbox[start + 1..end].to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn email_campaign_delivers_one_message_per_recipient() -> Result<()> {
    let expected = expected_recipients(&customers_csv(), COUNTRY)?;
    assert!(
        !expected.is_empty(),
        "the customer file has no opted-in customer of {COUNTRY}"
    );

    let data_dir = temp_dir();
    let broker = BrokerProcess::start(data_dir.path(), &[]).await?;
    let mail_dir = temp_dir();
    let maildir = mail_dir.path().join("mail");

    let mut command = Command::new(example_binary("email_campaign"));
    command
        .arg("--broker")
        .arg(broker.endpoint())
        .arg("--maildir")
        .arg(&maildir)
        .arg("--customers")
        .arg(customers_csv())
        .arg("--country")
        .arg(COUNTRY)
        .arg("--send-ms")
        .arg("5")
        .arg("run");
    let output = run_with_timeout(&mut command, RUN_LIMIT).await?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "email_campaign exited with {}; stdout:\n{stdout}\nstderr:\n{stderr}",
        output.status
    );

    let count = expected.len();
    let summary = stdout
        .lines()
        .find(|line| line.starts_with("enqueued "))
        .with_context(|| format!("no summary line in stdout:\n{stdout}\nstderr:\n{stderr}"))?;
    let expected_prefix = format!("enqueued {count}, delivered {count}, failed 0, elapsed ");
    assert!(
        summary.starts_with(&expected_prefix),
        "summary line {summary:?} does not start with {expected_prefix:?}"
    );

    let tmp_entries = std::fs::read_dir(maildir.join("tmp"))?.count();
    assert_eq!(tmp_entries, 0, "files left in the Maildir's tmp/");

    let mut recipients_by_file: HashMap<String, String> = HashMap::new();
    for entry in std::fs::read_dir(maildir.join("new"))? {
        let entry = entry?;
        let file_name = entry.file_name().to_string_lossy().into_owned();
        let message = std::fs::read_to_string(entry.path())
            .with_context(|| format!("message {file_name} is not UTF-8 text"))?;
        let to = header_value(&message, "To")
            .with_context(|| format!("message {file_name} has no To header"))?;
        let address = angle_address(&to)
            .with_context(|| format!("To header {to:?} of {file_name} has no <address>"))?;
        recipients_by_file.insert(file_name, address);
    }
    assert_eq!(
        recipients_by_file.len(),
        count,
        "messages in new/, expected one per recipient"
    );

    let mut received: HashSet<String> = HashSet::new();
    for (file_name, address) in &recipients_by_file {
        assert!(
            received.insert(address.clone()),
            "{address} received more than one message (one of them is {file_name})"
        );
    }
    let unexpected: Vec<&String> = received.difference(&expected).collect();
    assert!(
        unexpected.is_empty(),
        "messages to addresses outside the campaign: {unexpected:?}"
    );
    let missing: Vec<&String> = expected.difference(&received).collect();
    assert!(
        missing.is_empty(),
        "recipients without a message: {missing:?}"
    );

    // Each file is named after its task, and the task's result is the file name. The
    // checks run on several connections at once to keep the test short.
    let file_names: Vec<String> = recipients_by_file.keys().cloned().collect();
    let mut checks = tokio::task::JoinSet::new();
    for chunk in file_names.chunks(file_names.len().div_ceil(STATUS_CHECKERS)) {
        let chunk = chunk.to_vec();
        let mut client = broker.client().await?;
        checks.spawn(async move {
            for file_name in chunk {
                let task_id = file_name.strip_suffix(".docket").with_context(|| {
                    format!("message file {file_name} is not named <task id>.docket")
                })?;
                let status = get_task(&mut client, task_id).await?;
                assert_eq!(
                    status.state(),
                    TaskState::Succeeded,
                    "state of the task of message {file_name}"
                );
                assert_eq!(
                    String::from_utf8_lossy(&status.result),
                    file_name,
                    "result of the task of message {file_name}"
                );
            }
            anyhow::Ok(())
        });
    }
    while let Some(check) = checks.join_next().await {
        check??;
    }
    Ok(())
}

#[test]
fn header_value_unfolds_continuation_lines() {
    let message = "From: a@example.com\r\nTo: =?utf-8?b?WsO2?=\r\n <z@example.com>\r\n\r\nTo: body";
    assert_eq!(
        header_value(message, "to").as_deref(),
        Some("=?utf-8?b?WsO2?= <z@example.com>")
    );
    assert_eq!(
        angle_address("=?utf-8?b?WsO2?= <z@example.com>").as_deref(),
        Some("z@example.com")
    );
}
