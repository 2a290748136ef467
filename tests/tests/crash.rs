//! SIGKILL during concurrent Enqueue calls: every task whose Enqueue returned OK was
//! durably committed and is delivered after a restart.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use docket_proto::v1::subscribe_response::Event;
use docket_tests::{
    BrokerProcess, QUIET, Subscription, WAIT, ack, delivered_task_id, enqueue, new_task, temp_dir,
    within,
};

const QUEUE: &str = "crash";
const PRODUCERS: usize = 4;
/// Upper bound on Enqueue calls per producer, so the test stops even if the kill fails.
const MAX_CALLS_PER_PRODUCER: usize = 500;
/// Committed tasks to wait for before the kill, so that it lands mid-stream.
const TASKS_BEFORE_KILL: usize = 100;

/// Results of the producers' Enqueue calls: the id and payload of each task whose Enqueue
/// returned OK, and the payloads of tasks whose Enqueue failed.
#[derive(Default)]
struct Outcomes {
    committed: HashMap<String, String>,
    failed_payloads: HashSet<String>,
    producers_with_error: usize,
}

#[tokio::test(flavor = "multi_thread")]
async fn kill9_loses_no_acknowledged_enqueue() -> Result<()> {
    let data_dir = temp_dir();
    let mut first = BrokerProcess::start(data_dir.path(), &[]).await?;
    let outcomes = Arc::new(Mutex::new(Outcomes::default()));

    let mut producers = Vec::new();
    for producer in 0..PRODUCERS {
        let mut client = first.client().await?;
        let outcomes = Arc::clone(&outcomes);
        producers.push(tokio::spawn(async move {
            for call in 0..MAX_CALLS_PER_PRODUCER {
                let payloads: Vec<String> = (0..call % 3 + 1)
                    .map(|index| format!("producer-{producer}-call-{call}-task-{index}"))
                    .collect();
                let tasks = payloads
                    .iter()
                    .map(|payload| new_task(QUEUE, "job", payload.clone()))
                    .collect();
                match enqueue(&mut client, tasks).await {
                    Ok(ids) => {
                        let mut outcomes = outcomes.lock().unwrap();
                        for (id, payload) in ids.into_iter().zip(payloads) {
                            outcomes.committed.insert(id, payload);
                        }
                    }
                    Err(_) => {
                        let mut outcomes = outcomes.lock().unwrap();
                        outcomes.failed_payloads.extend(payloads);
                        outcomes.producers_with_error += 1;
                        return;
                    }
                }
            }
        }));
    }

    within(WAIT, "producers to commit tasks before the kill", async {
        loop {
            if outcomes.lock().unwrap().committed.len() >= TASKS_BEFORE_KILL {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await?;
    first.kill9()?;

    within(WAIT, "producers to stop after the kill", async {
        for producer in producers {
            producer.await?;
        }
        Ok(())
    })
    .await?;

    let (committed, failed_payloads, producers_with_error) = {
        let outcomes = outcomes.lock().unwrap();
        (
            outcomes.committed.clone(),
            outcomes.failed_payloads.clone(),
            outcomes.producers_with_error,
        )
    };
    assert_eq!(
        producers_with_error, PRODUCERS,
        "producers still enqueueing when the broker was killed; the kill must interrupt \
         all of them"
    );

    let second = BrokerProcess::start(data_dir.path(), &[]).await?;
    let mut client = second.client().await?;
    let mut subscription = Subscription::open(&mut client, &[QUEUE], 1000, None).await?;

    // Drains until every committed task has arrived, then until the stream is quiet,
    // because tasks whose Enqueue failed may have been committed too.
    let mut delivered: HashMap<String, String> = HashMap::new();
    loop {
        let all_arrived = committed.keys().all(|id| delivered.contains_key(id));
        let limit = if all_arrived { QUIET } else { WAIT };
        let event = match subscription.next_event(limit).await {
            Ok(event) => event,
            Err(_) if all_arrived => break,
            Err(error) => {
                let missing = committed
                    .keys()
                    .filter(|id| !delivered.contains_key(*id))
                    .count();
                return Err(error.context(format!(
                    "{missing} of {} committed tasks not delivered after restart",
                    committed.len()
                )));
            }
        };
        let Event::Delivery(delivery) = event else {
            continue;
        };
        let task_id = delivered_task_id(&delivery)?;
        let task = delivery.task.as_ref().context("delivery without a task")?;
        let payload = String::from_utf8_lossy(&task.payload).into_owned();
        assert_eq!(
            delivery.attempt, 1,
            "task {task_id} ({payload}) delivered with attempt {} after restart",
            delivery.attempt
        );
        assert!(
            delivered.insert(task_id.clone(), payload).is_none(),
            "task {task_id} delivered twice after restart"
        );
        ack(&mut client, &delivery.lease_id, "")
            .await
            .with_context(|| format!("Ack of task {task_id} after restart"))?;
    }

    for (id, payload) in &committed {
        assert_eq!(
            delivered.get(id),
            Some(payload),
            "committed task {id} ({payload}) was lost or changed by the kill"
        );
    }
    for (id, payload) in &delivered {
        if committed.contains_key(id) {
            continue;
        }
        assert!(
            failed_payloads.contains(payload),
            "task {id} with payload {payload} was delivered but never enqueued"
        );
    }
    Ok(())
}
