// End-to-end test of the Docket broker from Node.js, with @grpc/grpc-js and
// @grpc/proto-loader loading proto/ at run time, so nothing generated is committed. The
// broker must already run. Its address comes from the environment variable DOCKET_BROKER,
// as HOST:PORT or http://HOST:PORT:
//
//   npm ci --prefix tests/clients/node
//   DOCKET_BROKER=127.0.0.1:7070 node --test tests/clients/node/broker.test.js
//
// tests/tests/other_languages.rs starts a broker with a 200 ms heartbeat interval and runs
// this file. The worker code (`runDelivery`, `work` and `workForever`) is the one
// docs/clients.md shows.
'use strict';

const assert = require('node:assert/strict');
const crypto = require('node:crypto');
const path = require('node:path');
const { setTimeout: sleep } = require('node:timers/promises');
const { after, before, describe, test } = require('node:test');

const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_DIR = path.resolve(__dirname, '../../../proto');

// Upper bound on any wait of the test: a call, a delivery, a task reaching a state.
const WAIT_MS = 20_000;

// Suffix of this run's queue names, so that a rerun against the same broker starts empty.
const RUN_ID = crypto.randomUUID().slice(0, 8);

const packageDefinition = protoLoader.loadSync(
  ['docket/v1/broker.proto', 'docket/v1/scheduler.proto'],
  { includeDirs: [PROTO_DIR], keepCase: true, longs: String, enums: String, defaults: true, oneofs: true },
);
const docket = grpc.loadPackageDefinition(packageDefinition).docket.v1;

function brokerAddress() {
  const address = process.env.DOCKET_BROKER;
  if (!address) {
    throw new Error("DOCKET_BROKER is not set: set it to the broker's HOST:PORT");
  }
  return address.replace(/^http:\/\//, '');
}

// Returns a google.protobuf.Duration of `seconds`, which may have a fraction.
function duration(seconds) {
  const whole = Math.floor(seconds);
  return { seconds: whole, nanos: Math.round((seconds - whole) * 1e9) };
}

// Calls a unary method and resolves with its response, with a deadline of `seconds`.
function unary(client, method, request, seconds = 10) {
  return new Promise((resolve, reject) => {
    const deadline = Date.now() + seconds * 1000;
    client[method](request, { deadline }, (error, response) => (error ? reject(error) : resolve(response)));
  });
}

// ---- Worker code, as docs/clients.md shows it ----

// A failure that no retry can fix: the task is dead-lettered at once.
class PermanentError extends Error {}

// No message arrived on the Subscribe stream for longer than the heartbeat timeout.
class StreamSilent extends Error {}

// A failure worth retrying after `delay` seconds instead of the task's backoff.
class RetryLater extends Error {
  constructor(message, delay) {
    super(message);
    this.delay = delay;
  }
}

// Runs `handler` on one delivery, extends its lease while it runs, then settles it.
// Resolves with the broker's SettleResult. Its code is 9 (FAILED_PRECONDITION) when the
// lease was lost, for example because it expired: the task is then offered again,
// possibly to another worker, so handlers must be idempotent.
async function runDelivery(client, delivery, handler, leaseSeconds) {
  const leaseId = delivery.lease_id;
  // Extending at a third of the lease length leaves two tries before the deadline.
  const extender = setInterval(() => {
    const request = { lease_id: leaseId, extension: duration(leaseSeconds) };
    unary(client, 'ExtendLease', request, 5).catch((error) => {
      console.warn(`extending lease ${leaseId} failed: ${error.message}`);
      if (error.code === grpc.status.FAILED_PRECONDITION) {
        clearInterval(extender); // The lease is gone: settling it will fail too.
      }
    });
  }, (leaseSeconds * 1000) / 3);

  let settle;
  try {
    const result = await handler(delivery);
    settle = () => unary(client, 'Ack', { acks: [{ lease_id: leaseId, result }] });
  } catch (error) {
    const nack = { lease_id: leaseId, error: String(error.message ?? error) };
    if (error instanceof PermanentError) {
      nack.no_retry = true;
    } else if (error instanceof RetryLater) {
      nack.retry_delay = duration(error.delay);
    } // Any other failure follows the task's retry policy.
    settle = () => unary(client, 'Nack', { nacks: [nack] });
  } finally {
    clearInterval(extender);
  }
  const response = await settle();
  return response.results[0];
}

// Receives and runs tasks from `queues` one at a time until the AbortSignal `stop` fires.
// On stop, it stops deliveries, waits for the running task, releases the deliveries it
// received but never started, and closes the stream. It throws StreamSilent when no
// message, not even a heartbeat (every 15 s by default), arrives for
// `heartbeatTimeoutSeconds` between tasks. `onEvent(kind, value)` observes heartbeats and
// settle results.
async function work(client, queues, handler, stop, options = {}) {
  const { leaseSeconds = 30, heartbeatTimeoutSeconds = 45, onEvent = () => {} } = options;
  const call = client.Subscribe({ queues, max_in_flight: 1, lease_duration: duration(leaseSeconds) });
  const subscriptionId = await new Promise((resolve, reject) => {
    call.once('metadata', (metadata) => resolve(metadata.get('docket-subscription-id')[0]));
    call.once('error', reject); // For example UNAVAILABLE.
  });

  let stopping = false;
  let running = Promise.resolve();
  const shutDown = async () => {
    stopping = true;
    try {
      await unary(client, 'StopDeliveries', { subscription_id: subscriptionId }, 5);
      await running.catch(() => {});
      await sleep(500); // A delivery sent before StopDeliveries took effect is released.
    } catch (error) {
      // Closing the stream releases its leases as well, as failed attempts.
      console.warn(`shutdown of subscription ${subscriptionId} failed: ${error.message}`);
    } finally {
      call.cancel();
    }
  };
  stop.addEventListener('abort', shutDown, { once: true });
  if (stop.aborted) shutDown();

  // The silence timer is paused while a task runs, because the loop reads no message then.
  let silent = false;
  let silenceTimer;
  const watchSilence = () => {
    clearTimeout(silenceTimer);
    silenceTimer = setTimeout(() => {
      silent = true;
      call.cancel();
    }, heartbeatTimeoutSeconds * 1000);
  };

  const cancelled = new Set();
  watchSilence();
  try {
    for await (const response of call) {
      clearTimeout(silenceTimer);
      if (response.event === 'delivery') {
        const delivery = response.delivery;
        if (stopping || cancelled.has(delivery.task.id)) {
          await unary(client, 'Nack', { nacks: [{ lease_id: delivery.lease_id, release: true }] });
        } else {
          running = runDelivery(client, delivery, handler, leaseSeconds);
          const result = await running;
          if (result.code !== 0) console.warn(`task ${delivery.task.id} not settled: ${result.message}`);
          onEvent('settled', result);
        }
      } else if (response.event === 'cancel_notice') {
        cancelled.add(response.cancel_notice.task_id);
      } else if (response.event === 'heartbeat') {
        onEvent('heartbeat', response.heartbeat);
      } // Kinds added to the contract later are ignored.
      watchSilence();
    }
  } catch (error) {
    if (silent) throw new StreamSilent(`no message for ${heartbeatTimeoutSeconds} s`);
    if (!(stopping && error.code === grpc.status.CANCELLED)) throw error;
  } finally {
    clearTimeout(silenceTimer);
    stop.removeEventListener('abort', shutDown);
  }
}

// Runs `work` until `stop` fires, reconnecting with exponential backoff and full jitter
// while the broker is UNAVAILABLE or the stream falls silent.
async function workForever(address, queues, handler, stop, options) {
  let backoffMs = 100;
  while (!stop.aborted) {
    const client = new docket.Broker(address, grpc.credentials.createInsecure());
    try {
      await work(client, queues, handler, stop, options);
      backoffMs = 100;
    } catch (error) {
      if (!(error instanceof StreamSilent) && error.code !== grpc.status.UNAVAILABLE) throw error;
      console.warn(`reconnecting to ${address} within ${backoffMs} ms: ${error.message}`);
    } finally {
      client.close();
    }
    await sleep(Math.random() * backoffMs, undefined, { signal: stop }).catch(() => {});
    backoffMs = Math.min(backoffMs * 2, 10_000);
  }
}

// ---- Helpers of the tests ----

// A raw Subscribe stream whose events are read with a timeout.
class Subscription {
  constructor(client, queues, maxInFlight, leaseSeconds) {
    this.call = client.Subscribe({ queues, max_in_flight: maxInFlight, lease_duration: duration(leaseSeconds) });
    this.events = [];
    this.waiters = [];
    this.error = null;
    this.subscriptionId = new Promise((resolve, reject) => {
      this.call.once('metadata', (metadata) => resolve(metadata.get('docket-subscription-id')[0]));
      this.call.once('error', reject);
    });
    this.call.on('data', (response) => this.push(response));
    this.call.on('error', (error) => {
      this.error = error;
      this.push(null);
    });
  }

  push(event) {
    const waiter = this.waiters.shift();
    if (waiter) waiter(event);
    else this.events.push(event);
  }

  // Resolves with the next SubscribeResponse, or null if none arrives within `ms`.
  async nextEvent(ms) {
    let event;
    if (this.events.length > 0) {
      event = this.events.shift();
    } else {
      event = await new Promise((resolve) => {
        const waiter = (value) => {
          clearTimeout(timer);
          resolve(value);
        };
        const timer = setTimeout(() => {
          this.waiters.splice(this.waiters.indexOf(waiter), 1);
          resolve(null);
        }, ms);
        this.waiters.push(waiter);
      });
    }
    if (event === null && this.error) throw this.error;
    return event;
  }

  // Resolves with the next `count` deliveries, skipping heartbeats.
  async deliveries(count) {
    const found = [];
    const deadline = Date.now() + WAIT_MS;
    while (found.length < count) {
      const remaining = deadline - Date.now();
      assert.ok(remaining > 0, `timed out after ${WAIT_MS} ms: received ${found.length} of ${count} deliveries`);
      const event = await this.nextEvent(remaining);
      if (event?.event === 'delivery') found.push(event.delivery);
    }
    return found;
  }

  close() {
    this.call.cancel();
  }
}

function newTask(queue, kind, payload, fields = {}) {
  return { queue, kind, payload: Buffer.from(payload), ...fields };
}

// Collects the statuses of a WatchTask stream. `first` resolves with the first one.
function watchTask(client, taskId) {
  const call = client.WatchTask({ task_id: taskId }, { deadline: Date.now() + WAIT_MS });
  const statuses = [];
  let resolveFirst;
  const first = new Promise((resolve) => (resolveFirst = resolve));
  const done = new Promise((resolve, reject) => {
    call.on('data', (response) => {
      statuses.push(response.status);
      resolveFirst(response.status);
    });
    call.on('end', () => resolve(statuses));
    call.on('error', reject);
  });
  return { first, done };
}

describe('Docket broker from Node.js', () => {
  let client;

  before(async () => {
    client = new docket.Broker(brokerAddress(), grpc.credentials.createInsecure());
    await new Promise((resolve, reject) =>
      client.waitForReady(Date.now() + WAIT_MS, (error) => (error ? reject(error) : resolve())),
    );
  });

  after(() => client.close());

  const getTask = async (taskId) => (await unary(client, 'GetTask', { task_id: taskId })).status;

  async function waitUntilFinal(taskIds) {
    const final = new Set(['TASK_STATE_SUCCEEDED', 'TASK_STATE_DEAD', 'TASK_STATE_CANCELLED']);
    const deadline = Date.now() + WAIT_MS;
    for (;;) {
      const states = await Promise.all(taskIds.map(async (id) => (await getTask(id)).state));
      if (states.every((state) => final.has(state))) return;
      assert.ok(Date.now() < deadline, `tasks not final within ${WAIT_MS} ms: ${states}`);
      await sleep(50);
    }
  }

  test('enqueue and get task', async () => {
    const task = {
      queue: `node-emails-${RUN_ID}`,
      kind: 'send_email',
      payload: Buffer.from('{"to": "zoe@example.com"}'),
      headers: { 'content-type': 'application/json' },
      max_attempts: 5,
      idempotency_key: 'welcome:zoe@example.com',
    };
    const response = await unary(client, 'Enqueue', { tasks: [task] });
    const taskId = response.task_ids[0];
    const { status } = await unary(client, 'GetTask', { task_id: taskId });

    assert.equal(status.state, 'TASK_STATE_PENDING');
    assert.equal(status.task.payload.toString(), '{"to": "zoe@example.com"}');
    assert.deepEqual(status.task.headers, { 'content-type': 'application/json' });
    assert.equal(status.task.max_attempts, 5);
    assert.deepEqual(response.duplicates, [false]);

    // The same idempotency key returns the first task instead of a new one.
    const again = await unary(client, 'Enqueue', { tasks: [task] });
    assert.deepEqual(again.task_ids, [taskId]);
    assert.deepEqual(again.duplicates, [true]);
  });

  test('scheduler request round trip', () => {
    // Encodes and decodes a request with the Scheduler service's own serializers.
    const method = docket.Scheduler.service.ScheduleTask;
    const request = { task: newTask('exams', 'grade_exam', 'exam-4711'), delay: duration(90 * 60) };
    const decoded = method.requestDeserialize(method.requestSerialize(request));
    assert.equal(decoded.due, 'delay');
    assert.equal(decoded.delay.seconds, '5400');
    assert.equal(decoded.task.kind, 'grade_exam');
  });

  test('silent stream detected', async () => {
    // The broker sends a heartbeat every 200 ms, so a 50 ms timeout must trip.
    const stop = new AbortController();
    const handler = async () => Buffer.alloc(0);
    await assert.rejects(
      work(client, [`node-silent-${RUN_ID}`], handler, stop.signal, { heartbeatTimeoutSeconds: 0.05 }),
      StreamSilent,
    );
  });

  test('worker settles each outcome', async () => {
    const queue = `node-outcomes-${RUN_ID}`;
    const tasks = [
      newTask(queue, 'send', 'ok-1'),
      newTask(queue, 'send', 'ok-2'),
      newTask(queue, 'send', 'bounce'),
      newTask(queue, 'send', 'busy', { max_attempts: 3 }),
      newTask(queue, 'send', 'slow'),
    ];
    const response = await unary(client, 'Enqueue', { tasks });
    assert.equal(response.task_ids.length, tasks.length);
    assert.deepEqual(response.duplicates, [false, false, false, false, false]);
    const [ok1, ok2, bounce, busy, slow] = response.task_ids;

    // The watch starts before the worker, so it receives every state of the retried task.
    const watch = watchTask(client, busy);
    assert.equal((await watch.first).state, 'TASK_STATE_PENDING');

    const leaseSeconds = 1.5;
    const handler = async (delivery) => {
      const payload = delivery.task.payload.toString();
      if (payload === 'bounce') throw new PermanentError('mailbox does not exist');
      if (payload === 'busy' && delivery.attempt === 1) throw new RetryLater('server busy', 0.2);
      if (payload === 'slow') {
        // Outlives two lease lengths, so it succeeds only if ExtendLease works.
        await sleep((2 * leaseSeconds + 0.5) * 1000);
      }
      return Buffer.from(`sent:${payload}`);
    };

    const settled = [];
    const heartbeats = [];
    const onEvent = (kind, value) => (kind === 'settled' ? settled : heartbeats).push(value);

    const stop = new AbortController();
    const worker = workForever(brokerAddress(), [queue], handler, stop.signal, { leaseSeconds, onEvent });
    let watched;
    try {
      watched = await watch.done;
      await waitUntilFinal(response.task_ids);
    } finally {
      stop.abort();
      await worker;
    }

    // Six settlements: four acks, one dead-letter, one retried attempt.
    assert.equal(settled.length, 6, JSON.stringify(settled));
    assert.deepEqual(
      settled.map((result) => result.code),
      [0, 0, 0, 0, 0, 0],
    );
    assert.deepEqual(settled.map((result) => result.state).sort(), [
      'TASK_STATE_DEAD',
      'TASK_STATE_RETRY_WAIT',
      'TASK_STATE_SUCCEEDED',
      'TASK_STATE_SUCCEEDED',
      'TASK_STATE_SUCCEEDED',
      'TASK_STATE_SUCCEEDED',
    ]);
    assert.ok(heartbeats.length > 0, 'no heartbeat on the Subscribe stream');

    for (const [taskId, payload] of [[ok1, 'ok-1'], [ok2, 'ok-2'], [slow, 'slow']]) {
      const status = await getTask(taskId);
      assert.equal(status.state, 'TASK_STATE_SUCCEEDED', payload);
      assert.equal(status.attempts, 1, payload);
      assert.equal(status.result.toString(), `sent:${payload}`);
    }

    const dead = await getTask(bounce);
    assert.equal(dead.state, 'TASK_STATE_DEAD');
    assert.equal(dead.attempts, 1);
    assert.equal(dead.last_error, 'mailbox does not exist');

    const retried = await getTask(busy);
    assert.equal(retried.state, 'TASK_STATE_SUCCEEDED');
    assert.equal(retried.attempts, 2);
    assert.equal(retried.result.toString(), 'sent:busy');
    assert.equal(retried.last_error, 'server busy');
    assert.deepEqual(
      retried.attempt_history.map((attempt) => attempt.error),
      ['server busy', ''],
    );

    const watchedStates = watched.map((status) => status.state);
    assert.equal(watchedStates[0], 'TASK_STATE_PENDING', watchedStates.join());
    assert.ok(watchedStates.includes('TASK_STATE_RETRY_WAIT'), watchedStates.join());
    assert.equal(watchedStates.at(-1), 'TASK_STATE_SUCCEEDED', watchedStates.join());
    assert.equal(watched.at(-1).result.toString(), 'sent:busy');
  });

  test('stop deliveries then release', async () => {
    const queue = `node-shutdown-${RUN_ID}`;
    const tasks = [0, 1, 2].map((n) => newTask(queue, 'send', `task-${n}`));
    const { task_ids: taskIds } = await unary(client, 'Enqueue', { tasks });

    const subscription = new Subscription(client, [queue], 3, 30);
    try {
      const deliveries = await subscription.deliveries(3);
      assert.deepEqual(deliveries.map((d) => d.task.id).sort(), [...taskIds].sort());
      assert.deepEqual(deliveries.map((d) => d.attempt), [1, 1, 1]);

      const subscriptionId = await subscription.subscriptionId;
      const stopped = await unary(client, 'StopDeliveries', { subscription_id: subscriptionId });
      assert.equal(stopped.leases_held, 3);

      const releases = deliveries.map((d) => ({ lease_id: d.lease_id, release: true }));
      const { results } = await unary(client, 'Nack', { nacks: releases });
      assert.deepEqual(results.map((r) => r.code), [0, 0, 0]);
      assert.deepEqual(results.map((r) => r.state), ['TASK_STATE_PENDING', 'TASK_STATE_PENDING', 'TASK_STATE_PENDING']);

      // The released tasks are pending again, but the stopped stream gets only heartbeats.
      const kinds = [];
      const deadline = Date.now() + 1000;
      while (Date.now() < deadline) {
        const event = await subscription.nextEvent(100);
        if (event) kinds.push(event.event);
      }
      assert.ok(!kinds.includes('delivery'), kinds.join());
      assert.ok(kinds.includes('heartbeat'), kinds.join());
    } finally {
      subscription.close();
    }

    for (const taskId of taskIds) {
      const status = await getTask(taskId);
      assert.equal(status.state, 'TASK_STATE_PENDING');
      assert.equal(status.attempts, 0);
    }
  });

  test('settled lease is fenced', async () => {
    const queue = `node-fencing-${RUN_ID}`;
    const { task_ids: taskIds } = await unary(client, 'Enqueue', { tasks: [newTask(queue, 'send', 'once')] });

    const subscription = new Subscription(client, [queue], 1, 30);
    try {
      const [delivery] = await subscription.deliveries(1);
      assert.equal(delivery.task.id, taskIds[0]);

      const ack = { acks: [{ lease_id: delivery.lease_id }] };
      const first = (await unary(client, 'Ack', ack)).results[0];
      assert.equal(first.code, 0, first.message);

      // The lease is settled, so a second Ack and an ExtendLease are both rejected.
      const second = (await unary(client, 'Ack', ack)).results[0];
      assert.equal(second.code, grpc.status.FAILED_PRECONDITION);
      assert.ok(second.message.includes(delivery.lease_id), second.message);

      await assert.rejects(
        unary(client, 'ExtendLease', { lease_id: delivery.lease_id, extension: duration(10) }),
        (error) => error.code === grpc.status.FAILED_PRECONDITION,
      );
    } finally {
      subscription.close();
    }
  });

  test('cancel pending task', async () => {
    const queue = `node-cancel-${RUN_ID}`;
    const { task_ids: taskIds } = await unary(client, 'Enqueue', { tasks: [newTask(queue, 'send', 'x')] });
    const response = await unary(client, 'CancelTask', { task_id: taskIds[0] });
    assert.equal(response.state, 'TASK_STATE_CANCELLED');

    const watched = await watchTask(client, taskIds[0]).done;
    assert.deepEqual(watched.map((status) => status.state), ['TASK_STATE_CANCELLED']);
  });

  test('invalid queue name rejected', async () => {
    const request = { tasks: [newTask('no spaces allowed', 'send', '')] };
    await assert.rejects(unary(client, 'Enqueue', request), (error) => {
      assert.equal(error.code, grpc.status.INVALID_ARGUMENT);
      assert.ok(error.details.includes('no spaces allowed'), error.details);
      return true;
    });
  });

  test('unknown task not found', async () => {
    await assert.rejects(
      getTask('01890000-0000-7000-8000-000000000000'),
      (error) => error.code === grpc.status.NOT_FOUND,
    );
  });
});
