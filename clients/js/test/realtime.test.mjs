import { test, beforeEach, afterEach } from 'node:test';
import assert from 'node:assert/strict';

import { createClient } from '../dist/index.js';
import { FakeSocket, FAST, change, pos, tokenFor, waitFor } from './helpers.mjs';

// Every client a test makes is closed after it, passed or failed: a leftover one
// would keep reconnecting into the next test's fake sockets.
const clients = [];
beforeEach(() => FakeSocket.reset());
afterEach(() => {
  for (const c of clients.splice(0)) c.close();
});

function make(url, options) {
  const c = createClient(url, options);
  clients.push(c);
  return c;
}

function client(extra = {}, realtime = {}) {
  return make('http://aether.test:8080', { token: tokenFor('u1'), ...extra, realtime: { ...FAST, ...realtime } });
}

/** Opens the fake connection and confirms every subscription it asked for. */
function acceptAndConfirm(sock) {
  sock.accept();
  sock.receive({ type: 'connection', action: 'connect', data: {} });
  for (const s of sock.subscribes()) sock.receive({ type: 'subscription', action: 'subscribed', data: { id: s.id } });
}

test('connects on the first subscription, with the token, and uses the seed shortcuts', async () => {
  const c = client();
  const states = [];
  c.realtime.onStateChange((s) => states.push(s.state));
  c.realtime.subscribeToFiles('f1', {});
  c.realtime.subscribeToFiles(null, {});
  c.realtime.subscribeToStorage('files', {});
  c.realtime.subscribeToAuth('u1', {}, { event: 'INSERT' });
  c.realtime.subscribe({ table: 'folders', filter: 'owner_id=eq.u1', event: 'DELETE' }, {});
  await waitFor('a socket', () => FakeSocket.last);
  const sock = FakeSocket.last;
  assert.match(sock.url, /^ws:\/\/aether\.test:8080\/ws\?token=ey/);
  assert.equal(FakeSocket.instances.length, 1);
  sock.accept();
  assert.deepEqual(
    sock.subscribes().map(({ id, ...rest }) => rest),
    [
      { files: 'f1', event: '*' },
      { files: null, event: '*' },
      { storage: 'files', event: '*' },
      { auth: 'u1', event: 'INSERT' },
      { schema: 'public', table: 'folders', event: 'DELETE', filter: 'owner_id=eq.u1' },
    ],
  );
  assert.deepEqual(states, ['connecting', 'open']);
  c.close();
  assert.equal(c.realtime.state, 'closed');
});

test('handlers get rows and the seed event; onUpdate(newFile, oldFile)', async () => {
  const c = client();
  const got = [];
  c.realtime.subscribeToFiles('f1', {
    onInsert: (row, ev) => got.push(['insert', row.name, ev.eventType, ev.table, ev.schema, ev.timestamp]),
    onUpdate: (row, old) => got.push(['update', row.name, old.name]),
    onDelete: (old) => got.push(['delete', old.name]),
    onChange: (ev) => got.push(['change', ev.id]),
  });
  await waitFor('a socket', () => FakeSocket.last);
  const sock = FakeSocket.last;
  acceptAndConfirm(sock);
  const id = sock.subscribes()[0].id;
  sock.receive(change(id, pos(1), 'INSERT', { name: 'a' }));
  sock.receive(change(id, pos(2), 'UPDATE', { name: 'b' }, { name: 'a' }));
  sock.receive(change(id, pos(3), 'DELETE', { name: 'b' }));
  assert.deepEqual(got, [
    ['insert', 'a', 'INSERT', 'files', 'public', 1700000000000],
    ['change', pos(1)],
    ['update', 'b', 'a'],
    ['change', pos(2)],
    ['delete', 'b'],
    ['change', pos(3)],
  ]);
  assert.deepEqual(c.realtime.positions, { [id]: pos(3) });
  c.close();
});

test('a dropped connection reconnects with backoff and resumes each subscription after its last change, without duplicates', async () => {
  const c = client();
  const seen = [];
  const infos = [];
  c.realtime.subscribeToFiles('f1', { onInsert: (r) => seen.push(r.name), onSubscribed: (i) => infos.push(i) });
  const states = [];
  c.realtime.onStateChange((s) => states.push(s));
  await waitFor('a socket', () => FakeSocket.last);
  const first = FakeSocket.last;
  acceptAndConfirm(first);
  const id = first.subscribes()[0].id;
  first.receive(change(id, pos(1), 'INSERT', { name: 'a' }));
  first.receive(change(id, pos(2), 'INSERT', { name: 'b' }));
  first.drop(1006);
  assert.equal(c.realtime.state, 'reconnecting');
  const r = states.find((s) => s.state === 'reconnecting');
  assert.equal(r.attempt, 1);
  assert.equal(r.code, 1006);
  assert.ok(r.delayMs >= 1 && r.delayMs <= 2, `delay ${r.delayMs}`);

  // The server is down for a few attempts: the delay grows.
  for (let n = 2; n <= 4; n++) {
    const before = FakeSocket.instances.length;
    await waitFor(`attempt ${n}`, () => FakeSocket.instances.length > before);
    FakeSocket.last.drop(1006);
    assert.equal(states.at(-1).attempt, n);
  }
  const delays = states.filter((s) => s.state === 'reconnecting' && s.delayMs !== undefined).map((s) => s.delayMs);
  assert.ok(delays[3] >= 5 && delays[3] <= 10, `delays ${delays}`);

  const before = FakeSocket.instances.length;
  await waitFor('the next attempt', () => FakeSocket.instances.length > before);
  const second = FakeSocket.last;
  second.accept();
  assert.deepEqual(second.subscribes(), [{ id, files: 'f1', event: '*', since: pos(2) }]);
  second.receive({ type: 'subscription', action: 'subscribed', data: { id } });
  // A replay overlapping what was handled is not handled twice.
  second.receive(change(id, pos(2), 'INSERT', { name: 'b' }));
  second.receive(change(id, pos(3), 'INSERT', { name: 'c' }));
  assert.deepEqual(seen, ['a', 'b', 'c']);
  assert.deepEqual(infos, [
    { resumed: false, reconnected: false },
    { resumed: true, reconnected: true },
  ]);
  assert.equal(c.realtime.state, 'open');
  c.close();
});

test('a subscription that saw no change resumes after the newest change seen on the connection; with none, it says so', async () => {
  const c = client();
  const quietInfos = [];
  c.realtime.subscribeToFiles('busy', {});
  c.realtime.subscribeToFiles('quiet', { onSubscribed: (i) => quietInfos.push(i) });
  await waitFor('a socket', () => FakeSocket.last);
  let sock = FakeSocket.last;
  acceptAndConfirm(sock);
  const [busy, quiet] = sock.subscribes().map((s) => s.id);

  // Nothing seen at all yet: a resubscribe cannot resume.
  sock.drop(1006);
  await waitFor('reconnect', () => FakeSocket.instances.length === 2);
  sock = FakeSocket.last;
  acceptAndConfirm(sock);
  assert.deepEqual(sock.subscribes().map((s) => s.since), [undefined, undefined]);
  assert.deepEqual(quietInfos.at(-1), { resumed: false, reconnected: true });

  sock.receive(change(busy, pos(7), 'INSERT', { name: 'x' }));
  sock.drop(1006);
  await waitFor('reconnect', () => FakeSocket.instances.length === 3);
  sock = FakeSocket.last;
  acceptAndConfirm(sock);
  assert.deepEqual(
    sock.subscribes().map((s) => [s.id, s.since]),
    [
      [busy, pos(7)],
      [quiet, pos(7)],
    ],
  );
  assert.deepEqual(quietInfos.at(-1), { resumed: true, reconnected: true });
  c.close();
});

test('the position of the subscribed reply is where a subscription that saw nothing resumes', async () => {
  const c = client();
  const infos = [];
  c.realtime.subscribeToFiles('quiet', { onSubscribed: (i) => infos.push(i) });
  await waitFor('a socket', () => FakeSocket.last);
  let sock = FakeSocket.last;
  sock.accept();
  const id = sock.subscribes()[0].id;
  sock.receive({ type: 'subscription', action: 'subscribed', data: { id, position: pos(9) } });
  assert.deepEqual(c.realtime.positions, { [id]: pos(9) });
  sock.drop(1006);
  await waitFor('reconnect', () => FakeSocket.instances.length === 2);
  sock = FakeSocket.last;
  sock.accept();
  assert.equal(sock.subscribes()[0].since, pos(9));
  sock.receive({ type: 'subscription', action: 'subscribed', data: { id, position: pos(12) } });
  assert.deepEqual(infos.at(-1), { resumed: true, reconnected: true });
  // The replay after pos(9) is handled; the position of the resubscription does not hide it.
  sock.receive(change(id, pos(10), 'INSERT', { name: 'missed' }));
  assert.deepEqual(c.realtime.positions[id], pos(10));
});

test('a new subscription is live, not a replay, and starts after what the connection has seen', async () => {
  const c = client();
  c.realtime.subscribeToFiles('a', {});
  await waitFor('a socket', () => FakeSocket.last);
  const sock = FakeSocket.last;
  acceptAndConfirm(sock);
  sock.receive(change(sock.subscribes()[0].id, pos(5), 'INSERT', { name: 'x' }));
  const got = [];
  c.realtime.subscribeToFiles('b', { onInsert: (r) => got.push(r.name) });
  const b = sock.subscribes()[1];
  assert.equal(b.since, undefined);
  sock.receive({ type: 'subscription', action: 'subscribed', data: { id: b.id } });
  sock.receive(change(b.id, pos(6), 'INSERT', { name: 'y' }));
  assert.deepEqual(got, ['y']);
  // An explicit `since` replays.
  c.realtime.subscribeToFiles('c', {}, { since: pos(1) });
  assert.equal(sock.subscribes()[2].since, pos(1));
  c.close();
});

test('unsubscribe stops delivery, tells the server, and is not resubscribed', async () => {
  const c = client();
  const got = [];
  const stop = c.realtime.subscribeToFiles('f', { onInsert: (r) => got.push(r.name) });
  c.realtime.subscribeToFiles('g', {});
  await waitFor('a socket', () => FakeSocket.last);
  let sock = FakeSocket.last;
  acceptAndConfirm(sock);
  const id = sock.subscribes()[0].id;
  sock.receive(change(id, pos(1), 'INSERT', { name: 'a' }));
  stop();
  stop();
  assert.deepEqual(sock.frames('subscription', 'unsubscribe'), [{ type: 'subscription', action: 'unsubscribe', data: { id } }]);
  sock.receive(change(id, pos(2), 'INSERT', { name: 'late' }));
  assert.deepEqual(got, ['a']);
  sock.drop(1006);
  await waitFor('reconnect', () => FakeSocket.instances.length === 2);
  sock = FakeSocket.last;
  sock.accept();
  assert.equal(sock.subscribes().length, 1);
  assert.notEqual(sock.subscribes()[0].id, id);
  c.close();
});

test('frames sent while disconnected are queued and flushed in order after resubscribing', async () => {
  const errors = [];
  const c = client({}, { queueLimit: 3 });
  c.realtime.onError((e) => errors.push(e.code));
  c.realtime.subscribeToFiles('f', {});
  await waitFor('a socket', () => FakeSocket.last);
  let sock = FakeSocket.last;
  c.realtime.send({ type: 'message', action: 'send', data: { channel: 'c', content: 1 } });
  assert.equal(c.realtime.queued, 1);
  sock.accept();
  assert.deepEqual(
    sock.sent.map((f) => f.type),
    ['subscription', 'message'],
  );
  assert.equal(c.realtime.queued, 0);
  sock.drop(1006);
  for (let n = 2; n <= 5; n++) c.realtime.send({ type: 'message', action: 'send', data: { channel: 'c', content: n } });
  assert.deepEqual(errors, ['queue_overflow']);
  await waitFor('reconnect', () => FakeSocket.instances.length === 2);
  sock = FakeSocket.last;
  sock.accept();
  assert.deepEqual(
    sock.sent.map((f) => (f.type === 'message' ? f.data.content : f.type)),
    ['subscription', 3, 4, 5],
  );
  // While open, sent at once.
  c.realtime.send({ type: 'system', action: 'status' });
  assert.equal(sock.sent.at(-1).type, 'system');
  c.close();
});

test('heartbeats: a status frame every interval; silence after one drops the connection and reconnects', async () => {
  const c = client({}, { heartbeatIntervalMs: 15, heartbeatTimeoutMs: 30 });
  c.realtime.subscribeToFiles('f', {});
  await waitFor('a socket', () => FakeSocket.last);
  const sock = FakeSocket.last;
  acceptAndConfirm(sock);
  await waitFor('a heartbeat', () => sock.frames('system', 'status').length >= 1);
  // Answered: still the same connection.
  sock.receive({ type: 'system', action: 'status', data: {} });
  assert.equal(FakeSocket.instances.length, 1);
  // Now the server goes silent (a dead network, no close event ever comes).
  const states = [];
  c.realtime.onStateChange((s) => states.push(s));
  await waitFor('a reconnect after silence', () => FakeSocket.instances.length === 2, 3000);
  assert.equal(states[0].state, 'reconnecting');
  assert.equal(states[0].reason, 'heartbeat timeout');
  assert.deepEqual(sock.closedWith, { code: 4000, reason: 'heartbeat timeout' });
  c.close();
});

test('ping() measures a status round trip', async () => {
  const c = client();
  c.realtime.connect();
  await waitFor('a socket', () => FakeSocket.last);
  const sock = FakeSocket.last;
  await assert.rejects(c.realtime.ping(), { code: 'not_connected' });
  sock.accept();
  const p = c.realtime.ping();
  assert.deepEqual(sock.sent.at(-1), { type: 'system', action: 'status' });
  sock.receive({ type: 'system', action: 'status', data: { message: 'server is healthy' } });
  assert.ok((await p) >= 0);
  c.close();
});

test('the token is renewed before it expires and sent in-band; no reconnect', async () => {
  let calls = 0;
  const c = make('http://aether.test', {
    // Issued 3 s ago, expires in 1 s: renewal is due now (a quarter of its lifetime before exp).
    token: tokenFor('u1', { ttlS: 1, ageS: 3 }),
    getToken: async () => {
      calls++;
      return tokenFor('u1', { ttlS: 3600 });
    },
    realtime: FAST,
  });
  const refreshed = [];
  c.realtime.onTokenRefreshed((d) => refreshed.push(d));
  c.realtime.subscribeToAuth('u1', {});
  await waitFor('a socket', () => FakeSocket.last);
  const sock = FakeSocket.last;
  // The connection itself opened with a renewed token (the old one was about to expire).
  const opened = new URL(sock.url).searchParams.get('token');
  assert.equal(opened, c.getToken());
  sock.accept();
  assert.equal(calls, 1);
  // Rotate again, as the renewal timer would.
  c.setToken(tokenFor('u1', { ttlS: 7200 }));
  const refresh = sock.frames('connection', 'refresh');
  assert.equal(refresh.length, 1);
  assert.equal(refresh[0].data.token, c.getToken());
  sock.receive({ type: 'connection', action: 'refreshed', data: { user_id: 'u1', expires_at: 1 } });
  assert.deepEqual(refreshed, [{ user_id: 'u1', expires_at: 1 }]);
  assert.equal(FakeSocket.instances.length, 1);
  c.close();
});

test('the renewal timer fires on its own and the connection follows', async () => {
  let calls = 0;
  const c = make('http://aether.test', {
    token: tokenFor('u1', { ttlS: 1, ageS: 3 }),
    getToken: () => {
      calls++;
      return tokenFor('u1');
    },
    realtime: FAST,
  });
  await waitFor('renewal', () => calls === 1);
  assert.equal(c.getToken().split('.').length, 3);
  c.close();
});

test('a refused renewal reconnects with the new token; a different user reconnects at once', async () => {
  const c = client();
  c.realtime.subscribeToFiles('f', {});
  await waitFor('a socket', () => FakeSocket.last);
  const sock = FakeSocket.last;
  acceptAndConfirm(sock);
  c.setToken(tokenFor('u1', { ttlS: 100 }));
  sock.receive({ type: 'error', code: 'auth/revoked-token', message: 'signed out', details: {} });
  await waitFor('a new socket', () => FakeSocket.instances.length === 2);
  assert.equal(new URL(FakeSocket.last.url).searchParams.get('token'), c.getToken());
  FakeSocket.last.accept();
  c.setToken(tokenFor('u2'));
  await waitFor('a socket for u2', () => FakeSocket.instances.length === 3);
  assert.equal(FakeSocket.last.sent.length, 0);
  // Signing out: anonymous.
  FakeSocket.last.accept();
  c.setToken(null);
  await waitFor('an anonymous socket', () => FakeSocket.instances.length === 4);
  assert.equal(FakeSocket.last.url, 'ws://aether.test:8080/ws');
  c.close();
});

test('close 4001 without a way to renew: closed with the error, until a new token is set', async () => {
  const c = client();
  const errors = [];
  const states = [];
  c.realtime.onError((e) => errors.push(e.code));
  c.realtime.onStateChange((s) => states.push(s));
  c.realtime.subscribeToFiles('f', {});
  await waitFor('a socket', () => FakeSocket.last);
  const sock = FakeSocket.last;
  sock.accept();
  sock.receive({ type: 'error', code: 'auth/expired-token', message: 'token has expired', details: {} });
  sock.drop(4001, 'auth/expired-token');
  await waitFor('closed', () => c.realtime.state === 'closed');
  assert.equal(states.at(-1).error.code, 'auth/expired-token');
  assert.deepEqual(errors, ['auth/expired-token']);
  assert.equal(FakeSocket.instances.length, 1);
  c.setToken(tokenFor('u1', { ttlS: 100 }));
  await waitFor('a new socket', () => FakeSocket.instances.length === 2);
  c.close();
});

test('close 4001 with getToken: renews and reconnects', async () => {
  const c = client({ getToken: () => tokenFor('u1', { ttlS: 999 }) });
  c.realtime.subscribeToFiles('f', {});
  await waitFor('a socket', () => FakeSocket.last);
  FakeSocket.last.accept();
  FakeSocket.last.drop(4001, 'auth/revoked-token');
  await waitFor('a new socket', () => FakeSocket.instances.length === 2);
  assert.equal(new URL(FakeSocket.last.url).searchParams.get('token'), c.getToken());
  c.close();
});

test('a gap goes live and tells the subscriber to reload; other refusals drop the subscription', async () => {
  const c = client();
  const errs = [];
  const infos = [];
  c.realtime.subscribeToFiles('f', { onError: (e) => errs.push(e.code), onSubscribed: (i) => infos.push(i) }, { since: pos(1) });
  c.realtime.subscribe({ table: 'files', filter: 'size=eq.big' }, { onError: (e) => errs.push(e.code) });
  await waitFor('a socket', () => FakeSocket.last);
  const sock = FakeSocket.last;
  sock.accept();
  const [a, b] = sock.subscribes().map((s) => s.id);
  sock.receive({ type: 'error', code: 'gap', subscription: a, message: 'too old', details: {} });
  sock.receive({ type: 'error', code: 'invalid_filter', subscription: b, message: 'bad', details: {} });
  assert.deepEqual(errs, ['gap', 'invalid_filter']);
  const again = sock.subscribes()[2];
  assert.equal(again.id, a);
  assert.equal(again.since, undefined);
  sock.receive({ type: 'subscription', action: 'subscribed', data: { id: a } });
  assert.deepEqual(infos, [{ resumed: false, reconnected: true }]);
  assert.deepEqual(Object.keys(c.realtime.positions), [a]);
  c.close();
});

test('disconnect() stops reconnecting; connect() resumes; a handler that throws is reported', async () => {
  const c = client();
  const errors = [];
  c.realtime.onError((e) => errors.push(e.code));
  c.realtime.subscribeToFiles('f', {
    onInsert: () => {
      throw new Error('boom');
    },
  });
  await waitFor('a socket', () => FakeSocket.last);
  const sock = FakeSocket.last;
  acceptAndConfirm(sock);
  const id = sock.subscribes()[0].id;
  sock.receive(change(id, pos(4), 'INSERT', { name: 'a' }));
  assert.deepEqual(errors, ['handler_error']);
  c.realtime.disconnect();
  assert.equal(c.realtime.state, 'closed');
  assert.deepEqual(sock.closedWith, { code: 1000, reason: 'client disconnect' });
  c.realtime.connect();
  await waitFor('a new socket', () => FakeSocket.instances.length === 2);
  FakeSocket.last.accept();
  assert.equal(FakeSocket.last.subscribes()[0].since, pos(4));
  c.close();
});

test('maxAttempts gives up with reconnect_failed', async () => {
  const c = client({}, { maxAttempts: 2 });
  c.realtime.connect();
  for (let n = 1; n <= 3; n++) {
    await waitFor(`attempt ${n}`, () => FakeSocket.instances.length === n);
    FakeSocket.last.drop(1006);
  }
  await waitFor('closed', () => c.realtime.state === 'closed');
  assert.equal(FakeSocket.instances.length, 3);
  c.close();
});

test('an attempt that never opens is abandoned after connectTimeoutMs', async () => {
  const c = client({}, { connectTimeoutMs: 20 });
  c.realtime.connect();
  await waitFor('a retry', () => FakeSocket.instances.length === 2);
  assert.deepEqual(FakeSocket.instances[0].closedWith, { code: 4000, reason: 'connect timeout' });
  c.close();
});
