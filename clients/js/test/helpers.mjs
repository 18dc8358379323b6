// Test doubles shared by the unit tests: a scriptable WebSocket, JWTs, waits.

export class FakeSocket {
  static instances = [];
  static reset() {
    FakeSocket.instances = [];
  }
  static get last() {
    return FakeSocket.instances[FakeSocket.instances.length - 1];
  }

  constructor(url) {
    this.url = url;
    this.readyState = 0;
    this.sent = [];
    this.closedWith = null;
    this.onopen = this.onclose = this.onerror = this.onmessage = null;
    FakeSocket.instances.push(this);
  }

  send(data) {
    if (this.readyState !== 1) throw new Error(`send on a socket in state ${this.readyState}`);
    this.sent.push(JSON.parse(data));
  }

  close(code = 1000, reason = '') {
    if (this.readyState >= 2) return;
    this.closedWith = { code, reason };
    this.readyState = 3;
    // Like a browser: the close event comes later.
    setTimeout(() => this.onclose?.({ code, reason }), 0);
  }

  // ---- the "server" side
  accept() {
    this.readyState = 1;
    this.onopen?.({});
  }
  receive(frame) {
    this.onmessage?.({ data: JSON.stringify(frame) });
  }
  drop(code = 1006, reason = '') {
    this.readyState = 3;
    this.onclose?.({ code, reason });
  }
  frames(type, action) {
    return this.sent.filter((f) => f.type === type && (action === undefined || f.action === action));
  }
  subscribes() {
    return this.frames('subscription', 'subscribe').map((f) => f.data);
  }
}

export function jwt(claims) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  return `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64(claims)}.c2ln`;
}

export function tokenFor(sub, { ttlS = 3600, ageS = 0 } = {}) {
  const now = Math.floor(Date.now() / 1000);
  return jwt({ sub, role: 'authenticated', iat: now - ageS, exp: now + ttlS });
}

/** Bounded polling of a condition (the tests never sleep a fixed time). */
export async function waitFor(what, cond, timeoutMs = 3000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = cond();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 2));
  }
}

export function change(subscription, id, eventType, row, old = null) {
  return {
    type: 'change',
    subscription,
    id,
    eventType,
    schema: 'public',
    table: 'files',
    new: eventType === 'DELETE' ? null : row,
    old: eventType === 'INSERT' ? null : old ?? (eventType === 'DELETE' ? row : null),
    timestamp: 1700000000000,
  };
}

export const pos = (n) => `00000000016B0000-${n.toString(16).toUpperCase().padStart(8, '0')}`;

/** Fast timings so the tests run in milliseconds. */
export const FAST = {
  WebSocket: FakeSocket,
  reconnectBaseMs: 2,
  reconnectMaxMs: 10,
  heartbeatIntervalMs: 0,
  connectTimeoutMs: 2000,
  watchNetwork: false,
};
