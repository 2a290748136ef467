use std::sync::Arc;
use std::time::{Duration, Instant};

use docket_proto::v1::{self, SubscribeResponse, subscribe_response::Event};
use tokio::sync::mpsc;

use super::{Claim, Dispatcher, Effect, ReadyTask, Redeliver, Subscription};
use crate::task::{LeaseId, QueueName, TaskId};

fn queue(name: &str) -> QueueName {
    QueueName::parse("queue", name).expect("valid queue name")
}

fn ready(queue_name: &str, priority: i32, sequence: u64) -> Arc<ReadyTask> {
    let id = TaskId::generate();
    Arc::new(ReadyTask {
        id,
        queue: queue(queue_name),
        priority,
        sequence,
        attempts: 0,
        created_at_us: sequence as i64,
        task: Arc::new(v1::Task {
            id: id.to_string(),
            queue: queue_name.to_owned(),
            kind: "test".to_owned(),
            priority,
            ..Default::default()
        }),
    })
}

fn subscription(queues: &[&str], max_in_flight: u32) -> Subscription {
    Subscription {
        queues: queues.iter().map(|name| (queue(name), 1)).collect(),
        max_in_flight,
        lease_duration: Some(Duration::from_secs(30)),
    }
}

fn dispatcher() -> Dispatcher {
    Dispatcher::new(8, |_| Duration::from_secs(30))
}

fn make_ready(dispatcher: &Dispatcher, tasks: Vec<Arc<ReadyTask>>) {
    dispatcher.apply(tasks.into_iter().map(Effect::Ready));
}

fn drain(receiver: &mut mpsc::Receiver<SubscribeResponse>) -> Vec<v1::Delivery> {
    let mut deliveries = Vec::new();
    while let Ok(message) = receiver.try_recv() {
        match message.event {
            Some(Event::Delivery(delivery)) => deliveries.push(delivery),
            other => panic!("expected a delivery, got {other:?}"),
        }
    }
    deliveries
}

fn lease(delivery: &v1::Delivery) -> LeaseId {
    LeaseId::parse("lease_id", &delivery.lease_id).expect("delivery has a lease id")
}

#[test]
fn delivers_higher_priority_first_then_enqueue_order() {
    let dispatcher = dispatcher();
    let tasks = vec![
        ready("q", 0, 1),
        ready("q", 5, 2),
        ready("q", 0, 3),
        ready("q", 5, 4),
    ];
    let expected: Vec<String> = [1, 3, 0, 2]
        .iter()
        .map(|&i| tasks[i].task.id.clone())
        .collect();
    make_ready(&dispatcher, tasks);

    let (_, mut receiver) = dispatcher.subscribe(subscription(&["q"], 10));
    let order: Vec<String> = drain(&mut receiver)
        .into_iter()
        .map(|d| d.task.expect("task").id)
        .collect();

    assert_eq!(order, expected);
}

#[test]
fn never_exceeds_max_in_flight() {
    let dispatcher = dispatcher();
    make_ready(&dispatcher, (0..10).map(|i| ready("q", 0, i)).collect());

    let (_, mut receiver) = dispatcher.subscribe(subscription(&["q"], 3));
    let first = drain(&mut receiver);
    assert_eq!(first.len(), 3, "credit of 3 allows 3 deliveries");

    dispatcher
        .settle(&lease(&first[0]), Redeliver::Now)
        .expect("lease is live");
    let second = drain(&mut receiver);
    assert_eq!(
        second.len(),
        1,
        "settling one lease frees exactly one credit"
    );
}

#[test]
fn serves_several_queues_in_turn() {
    let dispatcher = dispatcher();
    make_ready(&dispatcher, (0..5).map(|i| ready("busy", 0, i)).collect());
    make_ready(&dispatcher, vec![ready("quiet", 0, 100)]);

    let (_, mut receiver) = dispatcher.subscribe(subscription(&["busy", "quiet"], 2));
    let queues: Vec<String> = drain(&mut receiver)
        .into_iter()
        .map(|d| d.task.expect("task").queue)
        .collect();

    assert_eq!(queues, ["busy", "quiet"]);
}

#[test]
fn settled_lease_is_not_live_again() {
    let dispatcher = dispatcher();
    make_ready(&dispatcher, vec![ready("q", 0, 1)]);
    let (_, mut receiver) = dispatcher.subscribe(subscription(&["q"], 1));
    let delivery = drain(&mut receiver).remove(0);

    assert!(dispatcher.settle(&lease(&delivery), Redeliver::Now).is_ok());
    assert!(
        dispatcher
            .settle(&lease(&delivery), Redeliver::Now)
            .is_err(),
        "a second settle must fail"
    );
}

#[test]
fn expired_lease_returns_task_and_frees_credit() {
    let dispatcher = dispatcher();
    make_ready(&dispatcher, vec![ready("q", 0, 1), ready("q", 0, 2)]);
    let (_, mut receiver) = dispatcher.subscribe(subscription(&["q"], 1));
    let delivery = drain(&mut receiver).remove(0);

    assert!(
        dispatcher.expire_due(Instant::now()).is_empty(),
        "a fresh lease is not due"
    );
    let expired = dispatcher.expire_due(Instant::now() + Duration::from_secs(31));

    assert_eq!(expired.len(), 1);
    assert_eq!(
        expired[0].task.task.id,
        delivery.task.as_ref().expect("task").id
    );
    assert!(
        dispatcher
            .settle(&lease(&delivery), Redeliver::Now)
            .is_err(),
        "an expired lease must not settle"
    );
    assert_eq!(
        drain(&mut receiver).len(),
        1,
        "the freed credit takes the next task"
    );
}

#[test]
fn unsubscribe_returns_held_tasks() {
    let dispatcher = dispatcher();
    make_ready(&dispatcher, (0..4).map(|i| ready("q", 0, i)).collect());
    let (first, mut first_receiver) = dispatcher.subscribe(subscription(&["q"], 2));
    let held = drain(&mut first_receiver);
    let (_, mut second_receiver) = dispatcher.subscribe(subscription(&["q"], 10));
    assert_eq!(
        drain(&mut second_receiver).len(),
        2,
        "the second stream takes the rest"
    );

    let released = dispatcher.unsubscribe(first);

    let mut released_ids: Vec<String> = released
        .iter()
        .map(|settled| settled.task.task.id.clone())
        .collect();
    let mut held_ids: Vec<String> = held.into_iter().map(|d| d.task.expect("task").id).collect();
    released_ids.sort();
    held_ids.sort();
    assert_eq!(released_ids, held_ids);
}

#[test]
fn weights_share_deliveries_between_queues() {
    let dispatcher = dispatcher();
    make_ready(&dispatcher, (0..20).map(|i| ready("heavy", 0, i)).collect());
    make_ready(
        &dispatcher,
        (100..120).map(|i| ready("light", 0, i)).collect(),
    );
    let subscription = Subscription {
        queues: vec![(queue("heavy"), 3), (queue("light"), 1)],
        max_in_flight: 8,
        lease_duration: None,
    };

    let (_, mut receiver) = dispatcher.subscribe(subscription);
    let queues: Vec<String> = drain(&mut receiver)
        .into_iter()
        .map(|d| d.task.expect("task").queue)
        .collect();

    assert_eq!(
        queues,
        [
            "heavy", "heavy", "heavy", "light", "heavy", "heavy", "heavy", "light"
        ]
    );
}

#[test]
fn paused_queue_delivers_nothing_until_resumed() {
    let dispatcher = dispatcher();
    dispatcher.apply(vec![Effect::Paused {
        queue: queue("q"),
        paused: true,
    }]);
    make_ready(&dispatcher, vec![ready("q", 0, 1)]);
    let (_, mut receiver) = dispatcher.subscribe(subscription(&["q"], 5));
    assert!(
        drain(&mut receiver).is_empty(),
        "a paused queue must not deliver"
    );

    dispatcher.apply(vec![Effect::Paused {
        queue: queue("q"),
        paused: false,
    }]);
    assert_eq!(
        drain(&mut receiver).len(),
        1,
        "resuming delivers the waiting task"
    );
}

#[test]
fn claim_removes_ready_task() {
    let dispatcher = dispatcher();
    let ready_task = ready("q", 0, 1);
    make_ready(&dispatcher, vec![Arc::clone(&ready_task)]);

    assert!(matches!(dispatcher.claim(ready_task.id), Claim::Ready(_)));
    assert!(matches!(dispatcher.claim(ready_task.id), Claim::Absent));
}

#[test]
fn window_keeps_first_tasks_only() {
    let dispatcher = dispatcher();
    let tasks: Vec<_> = (0..12).map(|i| ready("q", 0, i)).collect();
    make_ready(&dispatcher, tasks.clone());
    make_ready(&dispatcher, vec![ready("q", 0, 100)]);

    let (_, mut receiver) = dispatcher.subscribe(subscription(&["q"], 20));
    let delivered: Vec<String> = drain(&mut receiver)
        .into_iter()
        .map(|d| d.task.expect("task").id)
        .collect();

    let first_eight: Vec<String> = tasks[..8].iter().map(|task| task.task.id.clone()).collect();
    assert_eq!(
        delivered, first_eight,
        "a window of 8 delivers the first 8 and leaves the rest to the store"
    );
}

#[test]
fn refill_extends_the_window() {
    let dispatcher = dispatcher();
    let tasks: Vec<_> = (0..12).map(|i| ready("q", 0, i)).collect();
    make_ready(&dispatcher, tasks.clone());
    let (_, mut receiver) = dispatcher.subscribe(subscription(&["q"], 20));
    assert_eq!(drain(&mut receiver).len(), 8);

    dispatcher.apply(vec![Effect::Refilled {
        queue: queue("q"),
        after: Some((0, 7)),
        tasks: tasks[8..].to_vec(),
        last: Some((0, 11)),
        exhausted: true,
    }]);

    let rest: Vec<String> = drain(&mut receiver)
        .into_iter()
        .map(|d| d.task.expect("task").id)
        .collect();
    let expected: Vec<String> = tasks[8..].iter().map(|task| task.task.id.clone()).collect();
    assert_eq!(
        rest, expected,
        "the refill delivers the tasks after the window in order"
    );
}

#[test]
fn extend_moves_the_deadline() {
    let dispatcher = dispatcher();
    make_ready(&dispatcher, vec![ready("q", 0, 1)]);
    let (_, mut receiver) = dispatcher.subscribe(subscription(&["q"], 1));
    let delivery = drain(&mut receiver).remove(0);

    dispatcher
        .extend(&lease(&delivery), Duration::from_secs(120))
        .expect("lease is live");

    let after_original_deadline = Instant::now() + Duration::from_secs(60);
    assert!(
        dispatcher.expire_due(after_original_deadline).is_empty(),
        "the extended lease must not expire"
    );
    assert_eq!(
        dispatcher
            .expire_due(Instant::now() + Duration::from_secs(121))
            .len(),
        1
    );
}
