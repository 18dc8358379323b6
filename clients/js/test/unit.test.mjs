import { test } from 'node:test';
import assert from 'node:assert/strict';

import { AetherError, backoffDelay, createClient, decodeToken, renewalTime, tokenExpiresAt } from '../dist/index.js';
import { jwt, tokenFor } from './helpers.mjs';

test('backoff: exponential ceiling, equal jitter, capped', () => {
  const opts = (r) => ({ baseMs: 100, maxMs: 1000, random: () => r });
  assert.equal(backoffDelay(0, opts(0)), 50);
  assert.equal(backoffDelay(0, opts(0.999999)), 100);
  assert.equal(backoffDelay(1, opts(0)), 100);
  assert.equal(backoffDelay(3, opts(0.5)), 600);
  assert.equal(backoffDelay(4, opts(0)), 500);
  assert.equal(backoffDelay(50, opts(0.999999)), 1000);
  // Defaults, real randomness: always inside [ceiling/2, ceiling].
  for (let a = 0; a < 12; a++) {
    const ceiling = Math.min(30_000, 500 * 2 ** a);
    for (let i = 0; i < 50; i++) {
      const d = backoffDelay(a);
      assert.ok(d >= ceiling / 2 && d <= ceiling, `attempt ${a}: ${d}`);
    }
  }
  // Jitter spreads clients out.
  assert.ok(new Set(Array.from({ length: 20 }, () => backoffDelay(5))).size > 5);
});

test('tokens: claims, expiry and renewal time', () => {
  const t = jwt({ sub: 'u', exp: 2_000, iat: 1_000, role: 'authenticated', email: 'é@x' });
  assert.equal(decodeToken(t).sub, 'u');
  assert.equal(decodeToken(t).email, 'é@x');
  assert.equal(tokenExpiresAt(t), 2_000_000);
  // A quarter of the lifetime when shorter than the margin…
  assert.equal(renewalTime(t, 600_000), 2_000_000 - 250_000);
  // …else the margin.
  assert.equal(renewalTime(t, 60_000), 2_000_000 - 60_000);
  assert.equal(decodeToken('nope'), null);
  assert.equal(decodeToken('a.b.c'), null);
  assert.equal(tokenExpiresAt(null), null);
  assert.equal(renewalTime(jwt({ sub: 'u' }), 1000), null);
});

function fakeFetch(routes) {
  const calls = [];
  const f = async (url, init = {}) => {
    const u = new URL(url);
    calls.push({ url: u, init });
    const handler = routes[`${init.method ?? 'GET'} ${u.pathname}`];
    if (!handler) return new Response(JSON.stringify({ error: { message: 'no route', code: 'not_found', status: 404 } }), { status: 404 });
    const [status, body, headers] = await handler(u, init);
    return new Response(body === null ? null : JSON.stringify(body), { status, headers });
  };
  f.calls = calls;
  return f;
}

const authBody = (token) => ({
  user: { id: 'u1', email: 'a@b.co', created_at: '2025-01-01T00:00:00.000Z' },
  session: { access_token: token, expires_at: 1 },
});

test('auth: sign-up and sign-in adopt the token, sign-out clears it; errors keep code and status', async () => {
  const t1 = tokenFor('u1');
  const t2 = tokenFor('u1', { ttlS: 10 });
  const fetch = fakeFetch({
    'POST /auth/sign-up': () => [201, authBody(t1)],
    'POST /auth/sign-in': async (_u, init) => {
      const body = JSON.parse(init.body);
      if (body.password !== 'secret123') {
        return [401, { error: { message: 'invalid email or password', code: 'auth/invalid-credentials', status: 401 } }];
      }
      return [200, authBody(t2)];
    },
    'POST /auth/sign-out': () => [200, { success: true }],
  });
  const c = createClient('http://h:1', { fetch, realtime: { watchNetwork: false } });
  const tokens = [];
  c.onTokenChange((t) => tokens.push(t));
  const up = await c.auth.signUp({ email: 'a@b.co', password: 'secret123' });
  assert.equal(up.user.id, 'u1');
  assert.equal(c.getToken(), t1);
  assert.equal(c.auth.user.email, 'a@b.co');
  const err = await c.auth.signIn({ email: 'a@b.co', password: 'nope' }).catch((e) => e);
  assert.ok(err instanceof AetherError);
  assert.equal(err.code, 'auth/invalid-credentials');
  assert.equal(err.status, 401);
  assert.equal(err.message, 'invalid email or password');
  await c.auth.signIn({ email: 'a@b.co', password: 'secret123' });
  assert.equal(c.getToken(), t2);
  assert.deepEqual(await c.auth.signOut(), { success: true });
  const signOut = fetch.calls.at(-1);
  assert.equal(signOut.init.headers.authorization, `Bearer ${t2}`);
  assert.equal(c.getToken(), null);
  assert.equal(c.auth.user, null);
  assert.deepEqual(tokens, [t1, t2, null]);
  const req = fetch.calls[0];
  assert.equal(req.url.toString(), 'http://h:1/auth/sign-up');
  assert.equal(req.init.headers['content-type'], 'application/json');
  c.close();
});

test('storage over fetch: upload fields in order with coarse progress, list, delete, rate-limit errors', async () => {
  let uploaded;
  const fetch = fakeFetch({
    'POST /storage/upload': async (_u, init) => {
      uploaded = { form: [...init.body.entries()], headers: init.headers };
      return [201, { path: 'docs/a.txt', url: '/storage/object/files/u1/docs/a.txt', size: 5, mime_type: 'text/plain', created_at: 'x', id: 'i', bucket: 'files', folder_id: 'f1' }];
    },
    'GET /storage/list': (u) => [200, { files: [], folders: [{ name: 'docs', path: 'docs', id: 'f1' }], query: Object.fromEntries(u.searchParams) }],
    'DELETE /storage/delete': (_u, init) => [200, { success: true, echo: JSON.parse(init.body) }],
    'GET /storage/object/files/u1/docs/a.txt': () => [429, { error: { message: 'slow down', code: 'rate-limit/exceeded', status: 429 } }, { 'retry-after': '7' }],
  });
  const c = createClient('http://h:1/', { token: tokenFor('u1'), fetch, realtime: { watchNetwork: false } });
  const progress = [];
  const res = await c.storage.upload(new Blob(['hello'], { type: 'text/plain' }), {
    bucket: 'files',
    path: 'docs/a.txt',
    upsert: true,
    onProgress: (p) => progress.push(p.fraction),
  });
  assert.equal(res.folder_id, 'f1');
  assert.deepEqual(uploaded.form.map(([k]) => k), ['bucket', 'path', 'file']);
  assert.equal(uploaded.form[2][1].name, 'a.txt');
  assert.equal(uploaded.headers['x-upsert'], 'true');
  assert.equal(uploaded.headers.authorization, `Bearer ${c.getToken()}`);
  assert.deepEqual(progress, [0, 1]);

  const list = await c.storage.list({ bucket: 'files', path: 'docs' });
  assert.deepEqual(list.query, { bucket: 'files', path: 'docs' });
  const del = await c.storage.delete({ bucket: 'files', path: 'docs/a.txt' });
  assert.deepEqual(del.echo, { path: 'docs/a.txt', bucket: 'files' });
  assert.equal(c.storage.publicUrl(res.url), 'http://h:1/storage/object/files/u1/docs/a.txt');
  const err = await c.storage.download(res.url).catch((e) => e);
  assert.equal(err.code, 'rate-limit/exceeded');
  assert.equal(err.retryAfter, 7);
  const net = await createClient('http://h:1', { fetch: () => Promise.reject(new TypeError('fetch failed')), realtime: { watchNetwork: false } })
    .storage.list()
    .catch((e) => e);
  assert.equal(net.code, 'network_error');
  c.close();
});

test('upload over XMLHttpRequest reports fine-grained progress', async () => {
  const sent = [];
  class FakeXhr {
    constructor() {
      this.upload = {};
      this.headers = {};
      sent.push(this);
    }
    open(method, url) {
      this.method = method;
      this.url = url;
    }
    setRequestHeader(k, v) {
      this.headers[k] = v;
    }
    getResponseHeader() {
      return null;
    }
    abort() {
      this.onabort?.();
    }
    send(body) {
      this.body = body;
      queueMicrotask(() => {
        for (const loaded of [100, 600, 1100]) this.upload.onprogress({ loaded, total: 1100, lengthComputable: true });
        this.status = 201;
        this.responseText = JSON.stringify({ path: 'big.bin', folder_id: null });
        this.onload();
      });
    }
  }
  globalThis.XMLHttpRequest = FakeXhr;
  try {
    const c = createClient('http://h:1', { token: 't', realtime: { watchNetwork: false } });
    const fractions = [];
    const res = await c.storage.upload(new Blob([new Uint8Array(1000)]), { path: 'big.bin', onProgress: (p) => fractions.push(Math.round(p.fraction * 100)) });
    assert.equal(res.folder_id, null);
    assert.deepEqual(fractions, [9, 55, 100, 100]);
    assert.equal(sent[0].url, 'http://h:1/storage/upload');
    assert.equal(sent[0].headers.authorization, 'Bearer t');
    assert.deepEqual([...sent[0].body.keys()], ['path', 'file']);

    // An error answer becomes an AetherError; abort is reported as such.
    FakeXhr.prototype.send = function () {
      queueMicrotask(() => {
        this.status = 413;
        this.responseText = JSON.stringify({ error: { message: 'too big', code: 'storage/file-too-large', status: 413 } });
        this.onload();
      });
    };
    const err = await c.storage.upload(new Blob(['x']), { path: 'x' }).catch((e) => e);
    assert.equal(err.code, 'storage/file-too-large');
    FakeXhr.prototype.send = function () {};
    const ctl = new AbortController();
    const p = c.storage.upload(new Blob(['x']), { path: 'x', signal: ctl.signal });
    ctl.abort();
    assert.equal((await p.catch((e) => e)).code, 'aborted');
    c.close();
  } finally {
    delete globalThis.XMLHttpRequest;
  }
});

test('createClient refuses a non-HTTP URL', () => {
  assert.throws(() => createClient('ws://x'), { code: 'invalid_url' });
});
