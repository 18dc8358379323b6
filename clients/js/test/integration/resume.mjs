// Integration test against a real Aether, driven by tests/js_client.rs.
//
// The Rust side starts Aether, runs this script, inserts rows into the folder this
// script subscribes to, SIGKILLs Aether mid-stream, keeps inserting while it is
// down, restarts it on the same port and inserts more. This script checks that
// every row arrives exactly once, in commit order, and reports what it saw.
// With several nodes of a cluster (AETHER_URLS), the Rust side kills the node the
// client is on instead, and the client fails over to another one.
//
// Protocol: JSON lines. Out (stdout): {"event":"ready",…}, {"event":"state",…},
// {"event":"progress",…}, {"event":"result",…}. In (stdin):
// {"cmd":"progress","rows":n} (answered once n rows arrived), {"cmd":"expect","names":[…]}.
// Env: AETHER_URL (http://host:port), or AETHER_URLS (several, comma-separated).

import { createInterface } from 'node:readline';
import { createClient } from '../../dist/index.js';

const WebSocketImpl = globalThis.WebSocket ?? (await import('ws')).WebSocket;
const urls = (process.env.AETHER_URLS ?? process.env.AETHER_URL ?? '').split(',').filter(Boolean);
if (urls.length === 0) throw new Error('AETHER_URL (or AETHER_URLS) is not set');
// One URL is passed as a string, as before; several as the list.
const url = urls.length === 1 ? urls[0] : urls;

const out = (obj) => process.stdout.write(JSON.stringify(obj) + '\n');
const fail = (message, extra = {}) => {
  out({ event: 'result', ok: false, message, ...extra });
  process.exit(1);
};
const overall = setTimeout(() => fail('integration script timed out'), 90_000);

function waitFor(what, cond, timeoutMs = 20_000) {
  return new Promise((resolve, reject) => {
    const deadline = Date.now() + timeoutMs;
    const tick = () => {
      const v = cond();
      if (v) return resolve(v);
      if (Date.now() > deadline) return reject(new Error(`timed out waiting for ${what}`));
      setTimeout(tick, 10);
    };
    tick();
  });
}

const email = `resume-${Date.now()}-${Math.random().toString(36).slice(2, 8)}@example.com`;
const password = 'resume-test-1';
let renewals = 0;
const client = createClient(url, {
  // Aether has no refresh route: renewing means signing in again.
  getToken: async () => {
    renewals++;
    // The node the client is on now (after a failover, not the first).
    const fresh = createClient(client.url, { realtime: { watchNetwork: false } });
    const { session } = await fresh.auth.signIn({ email, password });
    fresh.close();
    return session.access_token;
  },
  realtime: {
    WebSocket: WebSocketImpl,
    reconnectBaseMs: 100,
    reconnectMaxMs: 800,
    heartbeatIntervalMs: 1_000,
    heartbeatTimeoutMs: 2_000,
    connectTimeoutMs: 3_000,
  },
});

const states = [];
const opened = []; // WebSocket URL of every connection that opened
client.realtime.onStateChange((s) => {
  states.push(s.state);
  if (s.state === 'open') opened.push(s.url);
  out({ event: 'state', state: s.state, attempt: s.attempt ?? null, code: s.code ?? null, url: s.url ?? null });
});
const errors = [];
client.realtime.onError((e) => errors.push(e.code));
let inBandRefreshes = 0;
client.realtime.onTokenRefreshed(() => inBandRefreshes++);

const { user } = await client.auth.signUp({ email, password });
// The first upload creates the folder `live` (its id is what subscribeToFiles takes).
const progress = [];
const first = await client.storage.upload(new Blob(['first'], { type: 'text/plain' }), {
  path: 'live/first.txt',
  onProgress: (p) => progress.push(p.fraction),
});
if (!first.folder_id) fail('upload returned no folder_id', { first });
if (progress.at(-1) !== 1) fail('upload progress did not reach 1', { progress });
const listed = await client.storage.list({ path: 'live' });
if (!listed.files.some((f) => f.name === 'first.txt')) fail('list misses the upload', { listed });

const received = []; // names of row-* inserts, in arrival order
const ids = [];
const updates = [];
let subscribed = 0;
let resumedAfterReconnect = 0;
client.realtime.subscribeToFiles(first.folder_id, {
  onInsert: (row, ev) => {
    if (!String(row.name).startsWith('row-')) return;
    received.push(row.name);
    ids.push(ev.id);
  },
  onUpdate: (row, old) => updates.push([old.name, row.name]),
  onSubscribed: (info) => {
    subscribed++;
    out({ event: 'subscribed', ...info });
    if (info.reconnected && info.resumed) resumedAfterReconnect++;
  },
  onError: (e) => fail(`subscription error ${e.code}: ${e.message}`),
});
const authEvents = [];
client.realtime.subscribeToAuth(user.id, { onInsert: (row) => authEvents.push(row.event_type) });
await waitFor('the files subscription', () => subscribed >= 1);

out({ event: 'ready', user_id: user.id, folder_id: first.folder_id, bucket: first.bucket, url: client.realtime.url });

const lines = createInterface({ input: process.stdin });
for await (const line of lines) {
  const cmd = JSON.parse(line);
  if (cmd.cmd === 'progress') {
    waitFor(`${cmd.rows} rows`, () => received.length >= cmd.rows, 30_000).then(
      () => out({ event: 'progress', rows: received.length, url: client.realtime.url }),
      (e) => fail(e.message, { received, states, errors }),
    );
    continue;
  }
  if (cmd.cmd !== 'expect') continue;
  const want = cmd.names;
  try {
    await waitFor(`${want.length} rows (have ${received.length})`, () => received.length >= want.length, 30_000);
    // A token lifetime is short in this test: at least one renewal went through in-band.
    if (cmd.renewals) {
      await waitFor('an in-band token renewal', () => inBandRefreshes >= 1, 30_000);
      // Renewing signs in again: the auth subscription hears of it through the WAL.
      await waitFor('the sign_in auth event', () => authEvents.includes('sign_in'), 15_000);
    }
  } catch (e) {
    fail(e.message, { received, states, errors });
  }
  // Anything extra (a duplicate) would show up within a heartbeat or two.
  await client.realtime.ping();
  const dupes = received.filter((n, i) => received.indexOf(n) !== i);
  const sortedIds = [...ids].sort();
  const ok =
    JSON.stringify(received) === JSON.stringify(want) &&
    dupes.length === 0 &&
    JSON.stringify(sortedIds) === JSON.stringify(ids);
  clearTimeout(overall);
  out({
    event: 'result',
    ok,
    message: ok ? 'all rows exactly once, in order' : 'rows lost, duplicated or out of order',
    received,
    missing: want.filter((n) => !received.includes(n)),
    duplicates: dupes,
    states,
    opened,
    errors,
    renewals,
    in_band_refreshes: inBandRefreshes,
    resumed_after_reconnect: resumedAfterReconnect,
    auth_events: authEvents,
    updates,
  });
  client.close();
  process.exit(ok ? 0 : 1);
}
