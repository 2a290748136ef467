//! `docket dead list|requeue|delete` against a real broker process: pages of dead tasks
//! in text and JSON, requeue and delete by id or with `--all` over several pages, and
//! their exit codes.

use std::collections::HashSet;
use std::process::Output;

use anyhow::{Context, Result, anyhow};
use docket_tests::cli::{docket, docket_json, docket_ok};
use docket_tests::{
    BrokerProcess, enqueue, get_task, make_dead_tasks, new_task, queue_stats, temp_dir,
};
use serde_json::Value;

/// A task id that is a well-formed UUIDv7 but was never issued by the broker.
const UNKNOWN_TASK_ID: &str = "0190a1b2-c3d4-7e5f-8a6b-7c8d9e0f1a2b";

/// Returns the ids of the tasks in a `dead list --json` document.
fn listed_ids(document: &Value) -> Result<Vec<String>> {
    document
        .pointer("/tasks")
        .and_then(Value::as_array)
        .ok_or_else(|| anyhow!("no tasks array in {document:#}"))?
        .iter()
        .map(|task| {
            task.pointer("/id")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| anyhow!("task without id in {document:#}"))
        })
        .collect()
}

fn next_token(document: &Value) -> Option<String> {
    document
        .pointer("/next_page_token")
        .and_then(Value::as_str)
        .map(str::to_owned)
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test]
async fn dead_list_pages() -> Result<()> {
    let dir = temp_dir();
    let broker = BrokerProcess::start(dir.path(), &[]).await?;
    let url = broker.endpoint();
    let mut client = broker.client().await?;
    let long_error = format!("carrier rejected the message: {}", "x".repeat(150));
    let mail = make_dead_tasks(&mut client, "mail", 3, "smtp timeout").await?;
    let sms = make_dead_tasks(&mut client, "sms", 2, &long_error).await?;

    let whole = docket_json(&["--broker", &url, "dead", "list", "--queue", "mail"]).await?;
    let mut listed = listed_ids(&whole)?;
    listed.sort();
    let mut expected = mail.clone();
    expected.sort();
    assert_eq!(listed, expected);
    assert_eq!(next_token(&whole), None);
    assert_eq!(
        whole.pointer("/tasks/0/last_error"),
        Some(&Value::from("smtp timeout"))
    );
    assert_eq!(whole.pointer("/tasks/0/state"), Some(&Value::from("DEAD")));
    assert!(
        whole
            .pointer("/tasks/0/died_at")
            .and_then(Value::as_str)
            .is_some(),
        "{whole:#}"
    );

    // One queue, two pages.
    let first = docket_json(&[
        "dead", "list", "--queue", "mail", "--limit", "2", "--broker", &url,
    ])
    .await?;
    let token = next_token(&first).context("a first page of 2 of 3 has a next page token")?;
    let second = docket_json(&[
        "dead",
        "list",
        "--queue",
        "mail",
        "--limit",
        "2",
        "--page-token",
        &token,
        "--broker",
        &url,
    ])
    .await?;
    assert_eq!(listed_ids(&first)?.len(), 2);
    assert_eq!(listed_ids(&second)?.len(), 1);
    assert_eq!(next_token(&second), None);
    let paged: HashSet<String> = listed_ids(&first)?
        .into_iter()
        .chain(listed_ids(&second)?)
        .collect();
    assert_eq!(paged, mail.iter().cloned().collect::<HashSet<_>>());

    // Every queue: mail's 3 tasks, then sms's 2, in pages of 4.
    let first = docket_json(&["--broker", &url, "dead", "list", "--limit", "4"]).await?;
    let token = next_token(&first).context("4 of 5 dead tasks leave a next page")?;
    let second = docket_json(&[
        "--broker",
        &url,
        "dead",
        "list",
        "--limit",
        "4",
        "--page-token",
        &token,
    ])
    .await?;
    let first_ids = listed_ids(&first)?;
    assert_eq!(first_ids.len(), 4, "{first:#}");
    assert!(mail.iter().all(|id| first_ids.contains(id)), "{first:#}");
    let second_ids = listed_ids(&second)?;
    assert_eq!(second_ids.len(), 1, "{second:#}");
    assert_eq!(next_token(&second), None);
    let all: HashSet<String> = first_ids.into_iter().chain(second_ids).collect();
    assert_eq!(
        all,
        mail.iter().chain(&sms).cloned().collect::<HashSet<_>>()
    );

    // The table cuts long errors, while JSON keeps them whole.
    let table = docket_ok(&["--broker", &url, "dead", "list", "--queue", "sms"]).await?;
    assert!(table.starts_with("ID"), "{table}");
    assert!(table.contains("LAST_ERROR"), "{table}");
    assert!(sms.iter().all(|id| table.contains(id.as_str())), "{table}");
    assert!(
        table.contains("carrier rejected the message: xxx"),
        "{table}"
    );
    assert!(!table.contains(&long_error), "{table}");
    let document = docket_json(&["--broker", &url, "dead", "list", "--queue", "sms"]).await?;
    assert_eq!(
        document.pointer("/tasks/0/last_error"),
        Some(&Value::from(long_error.as_str()))
    );
    let paged_table = docket_ok(&[
        "--broker", &url, "dead", "list", "--queue", "mail", "--limit", "1",
    ])
    .await?;
    assert!(
        paged_table.contains("next page: docket dead list --queue mail --limit 1 --page-token "),
        "{paged_table}"
    );
    let empty = docket_ok(&["--broker", &url, "dead", "list", "--queue", "none"]).await?;
    assert_eq!(empty, "no dead tasks\n");
    Ok(())
}

#[tokio::test]
async fn dead_requeue_all_several_pages() -> Result<()> {
    let dir = temp_dir();
    let broker = BrokerProcess::start(dir.path(), &[]).await?;
    let url = broker.endpoint();
    let mut client = broker.client().await?;
    let mail = make_dead_tasks(&mut client, "mail", 1200, "smtp timeout").await?;
    make_dead_tasks(&mut client, "sms", 4, "no signal").await?;

    let result = docket_json(&[
        "--broker", &url, "dead", "requeue", "--all", "--queue", "mail",
    ])
    .await?;

    assert_eq!(result.pointer("/requeued"), Some(&Value::from(1200)));
    assert_eq!(result.pointer("/skipped"), Some(&Value::from(0)));
    let stats = queue_stats(&mut client, "mail").await?;
    assert_eq!((stats.dead, stats.pending), (0, 1200));
    let sms = queue_stats(&mut client, "sms").await?;
    assert_eq!(sms.dead, 4, "another queue's dead tasks stay dead");
    let requeued = get_task(&mut client, &mail[1100]).await?;
    assert_eq!(requeued.state(), docket_tests::v1::TaskState::Pending);
    assert_eq!(requeued.attempts, 0);
    Ok(())
}

#[tokio::test]
async fn dead_delete_all_several_pages() -> Result<()> {
    let dir = temp_dir();
    let broker = BrokerProcess::start(dir.path(), &[]).await?;
    let url = broker.endpoint();
    let mut client = broker.client().await?;
    let mail = make_dead_tasks(&mut client, "mail", 1100, "smtp timeout").await?;

    let text = docket_ok(&[
        "--broker", &url, "dead", "delete", "--all", "--queue", "mail",
    ])
    .await?;

    assert_eq!(text, "1100 dead tasks deleted\n");
    let stats = queue_stats(&mut client, "mail").await?;
    assert_eq!((stats.dead, stats.pending), (0, 0));
    let error = get_task(&mut client, &mail[1050])
        .await
        .expect_err("a deleted task is not found");
    let status = error
        .downcast_ref::<tonic::Status>()
        .context("GetTask failed without a status")?;
    assert_eq!(status.code(), tonic::Code::NotFound);
    Ok(())
}

#[tokio::test]
async fn dead_requeue_delete_by_id() -> Result<()> {
    let dir = temp_dir();
    let broker = BrokerProcess::start(dir.path(), &[]).await?;
    let url = broker.endpoint();
    let mut client = broker.client().await?;
    let dead = make_dead_tasks(&mut client, "mail", 3, "smtp timeout").await?;
    let pending = enqueue(&mut client, vec![new_task("mail", "send", "waiting")]).await?;

    // Without --queue, each id's queue is looked up.
    let requeued = docket_json(&["--broker", &url, "dead", "requeue", &dead[0]]).await?;
    assert_eq!(requeued.pointer("/requeued"), Some(&Value::from(1)));
    assert_eq!(requeued.pointer("/skipped"), Some(&Value::from(0)));
    let status = get_task(&mut client, &dead[0]).await?;
    assert_eq!(status.state(), docket_tests::v1::TaskState::Pending);

    let text = docket_ok(&[
        "--broker",
        &url,
        "dead",
        "delete",
        &dead[1],
        &pending[0],
        UNKNOWN_TASK_ID,
    ])
    .await?;
    assert!(text.starts_with("1 dead tasks deleted\n"), "{text}");
    assert!(text.contains("2 ids skipped"), "{text}");
    assert!(
        text.contains(&format!("{}: the task is PENDING", pending[0])),
        "{text}"
    );
    assert!(
        text.contains(&format!("{UNKNOWN_TASK_ID}: no task with this id")),
        "{text}"
    );

    // With --queue, the ids go to the broker as they are.
    let deleted = docket_json(&[
        "--broker",
        &url,
        "dead",
        "delete",
        "--queue",
        "mail",
        &dead[2],
        UNKNOWN_TASK_ID,
    ])
    .await?;
    assert_eq!(deleted.pointer("/deleted"), Some(&Value::from(1)));
    assert_eq!(deleted.pointer("/skipped"), Some(&Value::from(1)));
    let stats = queue_stats(&mut client, "mail").await?;
    assert_eq!((stats.dead, stats.pending), (0, 2));
    Ok(())
}

#[tokio::test]
async fn dead_commands_report_bad_input() -> Result<()> {
    let dir = temp_dir();
    let broker = BrokerProcess::start(dir.path(), &[]).await?;
    let url = broker.endpoint();

    let no_queue = docket(&["--broker", &url, "dead", "requeue", "--all"]).await?;
    assert_eq!(no_queue.status.code(), Some(2), "{}", stderr(&no_queue));
    assert!(
        stderr(&no_queue).contains("--queue"),
        "{}",
        stderr(&no_queue)
    );

    let nothing = docket(&["--broker", &url, "dead", "delete"]).await?;
    assert_eq!(nothing.status.code(), Some(2), "{}", stderr(&nothing));

    let bad_queue = docket(&["--broker", &url, "dead", "list", "--queue", "no spaces"]).await?;
    assert_eq!(bad_queue.status.code(), Some(1), "{}", stderr(&bad_queue));
    assert!(
        stderr(&bad_queue).contains("INVALID_ARGUMENT"),
        "{}",
        stderr(&bad_queue)
    );

    let bad_token = docket(&[
        "--json",
        "--broker",
        &url,
        "dead",
        "list",
        "--queue",
        "mail",
        "--page-token",
        "garbage",
    ])
    .await?;
    assert_eq!(bad_token.status.code(), Some(1), "{}", stderr(&bad_token));
    assert!(bad_token.stdout.is_empty());
    let error: Value = serde_json::from_str(&stderr(&bad_token))?;
    assert_eq!(
        error.pointer("/error/code"),
        Some(&Value::from("INVALID_ARGUMENT"))
    );
    assert!(
        error
            .pointer("/error/message")
            .and_then(Value::as_str)
            .is_some_and(|message| message.contains("page_token")),
        "{error:#}"
    );

    let unreachable = docket(&["--broker", "http://127.0.0.1:1", "dead", "list"]).await?;
    assert_eq!(
        unreachable.status.code(),
        Some(3),
        "{}",
        stderr(&unreachable)
    );
    Ok(())
}
