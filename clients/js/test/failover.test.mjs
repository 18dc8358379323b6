// Several nodes of one cluster: the client moves to the next URL when its
// connection fails or closes unexpectedly, and resumes every subscription there
// with `since`. Each fake "server" is the set of fake sockets opened to its host.
import { test, beforeEach, afterEach } from 'node:test';
import assert from 'node:assert/strict';

import { createClient } from '../dist/index.js';
import { FakeSocket, FAST, change, pos, tokenFor, waitFor } from './helpers.mjs';

const clients = [];
beforeEach(() => FakeSocket.reset());
afterEach(() => {
  for (const c of clients.splice(0)) c.close();
});

const A = 'http://a.test:8080';
const B = 'http://b.test:8080';
const C = 'http://c.test:8080';

function make(urls, extra = {}, realtime = {}) {
  const c = createClient(urls, { token: tokenFor('u1'), ...extra, realtime: { ...FAST, ...realtime } });
  clients.push(c);
  return c;
}

const host = (sock) => new URL(sock.url).host;
const server = (name) => FakeSocket.instances.filter((s) => host(s) === `${name}.test:8080`);

/** The socket opened after the `n` so far. */
async function nextSocket(n) {
  await waitFor(`socket ${n + 1}`, () => FakeSocket.instances.length > n);
  return FakeSocket.instances[n];
}

test('two servers: the first closes, the client moves to the second at once and resumes every subscription with since', async () => {
  const c = make([A, B]);
  const seen = [];
  const infos = [];
  const states = [];
  c.realtime.onStateChange((s) => states.push(s));
  c.realtime.subscribeToFiles('f1', { onInsert: (r) => seen.push(r.name), onSubscribed: (i) => infos.push(i) });
  c.realtime.subscribeToAuth('u1', {});
  const a = await nextSocket(0);
  assert.equal(host(a), 'a.test:8080');
  assert.match(a.url, /^ws:\/\/a\.test:8080\/ws\?token=ey/);
  a.accept();
  a.receive({ type: 'connection', action: 'connect', data: {} });
  const [files, auth] = a.subscribes().map((s) => s.id);
  a.receive({ type: 'subscription', action: 'subscribed', data: { id: files, position: pos(2) } });
  a.receive({ type: 'subscription', action: 'subscribed', data: { id: auth, position: pos(2) } });
  a.receive(change(files, pos(3), 'INSERT', { name: 'a' }));
  a.receive(change(files, pos(4), 'INSERT', { name: 'b' }));
  assert.equal(states.at(-1).url, 'ws://a.test:8080/ws');

  // Server A goes away mid-stream.
  a.drop(1006);
  const r = states.at(-1);
  assert.equal(r.state, 'reconnecting');
  assert.equal(r.attempt, 1);
  assert.equal(r.delayMs, 0, 'the next server is tried at once, not after the backoff');
  assert.equal(r.url, 'ws://b.test:8080/ws');

  const b = await nextSocket(1);
  assert.equal(host(b), 'b.test:8080');
  assert.equal(new URL(b.url).searchParams.get('token'), c.getToken());
  b.accept();
  // Every subscription, with the id of the last change it handled (or the
  // position A gave it, for the one that saw none).
  assert.deepEqual(b.subscribes(), [
    { id: files, files: 'f1', event: '*', since: pos(4) },
    { id: auth, auth: 'u1', event: '*', since: pos(2) },
  ]);
  b.receive({ type: 'subscription', action: 'subscribed', data: { id: files, position: pos(6) } });
  // B replays from after pos(4): an overlap is dropped, nothing is doubled.
  b.receive(change(files, pos(4), 'INSERT', { name: 'b' }));
  b.receive(change(files, pos(5), 'INSERT', { name: 'c' }));
  b.receive(change(files, pos(6), 'INSERT', { name: 'd' }));
  assert.deepEqual(seen, ['a', 'b', 'c', 'd']);
  assert.deepEqual(infos, [
    { resumed: false, reconnected: false },
    { resumed: true, reconnected: true },
  ]);
  assert.equal(c.realtime.state, 'open');
  assert.equal(states.at(-1).url, 'ws://b.test:8080/ws');
  assert.equal(c.realtime.url, 'ws://b.test:8080/ws');
  // REST calls follow: the client is on B now.
  assert.equal(c.url, `${B}/`);
  assert.deepEqual(c.urls, [`${A}/`, `${B}/`]);
  assert.equal(FakeSocket.instances.length, 2);
  assert.equal(server('a').length, 1);
});

test('the next URL in turn on every failure; the backoff only between full rounds; a good connection starts a new round', async () => {
  const base = 40;
  const c = make([A, B, C], {}, { reconnectBaseMs: base, reconnectMaxMs: 10_000, random: () => 0 });
  const reconnecting = [];
  c.realtime.onStateChange((s) => {
    if (s.state === 'reconnecting' && s.delayMs !== undefined) reconnecting.push([s.attempt, s.delayMs, new URL(s.url).host]);
  });
  c.realtime.connect();
  // Every server refuses, seven times over.
  for (let n = 0; n < 7; n++) (await nextSocket(n)).drop(1006);
  assert.deepEqual(
    FakeSocket.instances.map(host),
    ['a', 'b', 'c', 'a', 'b', 'c', 'a'].map((h) => `${h}.test:8080`),
  );
  // random() = 0: the backoff is the lower half of its ceiling, base·2^round / 2.
  assert.deepEqual(reconnecting, [
    [1, 0, 'b.test:8080'],
    [2, 0, 'c.test:8080'],
    [3, base / 2, 'a.test:8080'],
    [4, 0, 'b.test:8080'],
    [5, 0, 'c.test:8080'],
    [6, base, 'a.test:8080'],
    [7, 0, 'b.test:8080'],
  ]);
  // B takes it: the client stays there, and the count starts again.
  const b = await nextSocket(7);
  assert.equal(host(b), 'b.test:8080');
  b.accept();
  b.receive({ type: 'connection', action: 'connect', data: {} });
  assert.equal(c.realtime.state, 'open');
  b.drop(1001, 'server shutting down');
  assert.deepEqual(reconnecting.at(-1), [1, 0, 'c.test:8080']);
  const next = await nextSocket(8);
  assert.equal(host(next), 'c.test:8080');
});

test('a server that never opens or goes silent is left for the next one', async () => {
  const c = make([A, B], {}, { connectTimeoutMs: 20, heartbeatIntervalMs: 10, heartbeatTimeoutMs: 20 });
  c.realtime.subscribeToFiles('f', {});
  const a = await nextSocket(0);
  // A never answers the handshake.
  const b = await nextSocket(1);
  assert.deepEqual(a.closedWith, { code: 4000, reason: 'connect timeout' });
  assert.equal(host(b), 'b.test:8080');
  b.accept();
  const id = b.subscribes()[0].id;
  b.receive({ type: 'subscription', action: 'subscribed', data: { id } });
  b.receive(change(id, pos(8), 'INSERT', { name: 'x' }));
  // B goes silent (killed, no close frame): the heartbeat notices, and A is next.
  const a2 = await nextSocket(2);
  assert.deepEqual(b.closedWith, { code: 4000, reason: 'heartbeat timeout' });
  assert.equal(host(a2), 'a.test:8080');
  a2.accept();
  assert.equal(a2.subscribes()[0].since, pos(8));
});

test('a refused token (4001) is not the server failing: the renewed token goes to the same one', async () => {
  const c = make([A, B], { getToken: () => tokenFor('u1', { ttlS: 999 }) });
  c.realtime.subscribeToFiles('f', {});
  const a = await nextSocket(0);
  a.accept();
  a.drop(4001, 'auth/revoked-token');
  const again = await nextSocket(1);
  assert.equal(host(again), 'a.test:8080');
  assert.equal(new URL(again.url).searchParams.get('token'), c.getToken());
  // disconnect()/connect() stays too.
  again.accept();
  c.realtime.disconnect();
  c.realtime.connect();
  assert.equal(host(await nextSocket(2)), 'a.test:8080');
});

test('REST calls go to the current server; one that does not answer moves the client (REST and realtime) to the next', async () => {
  const calls = [];
  const fetch = async (url, init = {}) => {
    const u = new URL(url);
    calls.push(u.host);
    if (u.host === 'a.test:8080') throw new TypeError('fetch failed');
    const session = { access_token: tokenFor('u1'), expires_at: 1 };
    return new Response(JSON.stringify({ user: { id: 'u1', email: 'a@b.co', created_at: '' }, session }), { status: 200 });
  };
  const c = make([A, B], { fetch, token: null });
  assert.equal(c.url, `${A}/`);
  await assert.rejects(c.auth.signIn({ email: 'a@b.co', password: 'x' }), { code: 'network_error' });
  // Not retried by the client (a sign-up or an upload must not run twice)…
  assert.deepEqual(calls, ['a.test:8080']);
  // …but the next call, and the realtime connection, go to B.
  assert.equal(c.url, `${B}/`);
  await c.auth.signIn({ email: 'a@b.co', password: 'x' });
  assert.deepEqual(calls, ['a.test:8080', 'b.test:8080']);
  c.realtime.connect();
  assert.equal(host(await nextSocket(0)), 'b.test:8080');
});

test('realtime.url takes a list of WebSocket URLs of its own', async () => {
  const c = make('http://rest.test', {}, { url: ['ws://x.test/socket', 'wss://y.test/socket'] });
  c.realtime.connect();
  const x = await nextSocket(0);
  assert.match(x.url, /^ws:\/\/x\.test\/socket\?token=/);
  x.drop(1006);
  assert.match((await nextSocket(1)).url, /^wss:\/\/y\.test\/socket\?token=/);
  assert.equal(c.url, 'http://rest.test/');
});

test('one URL behaves as before; a list must be non-empty and all http(s)', () => {
  const c = make('http://aether.test:8080');
  assert.equal(c.url, 'http://aether.test:8080/');
  assert.deepEqual(c.urls, ['http://aether.test:8080/']);
  assert.equal(c.realtime.url, 'ws://aether.test:8080/ws');
  assert.throws(() => createClient([]), { code: 'invalid_url' });
  assert.throws(() => createClient([A, 'ws://b.test']), { code: 'invalid_url' });
  assert.throws(() => createClient('http://x', { realtime: { url: [] } }), { code: 'invalid_url' });
});
