import { backoffDelay } from './backoff.js';
import { Endpoints } from './endpoints.js';
import { AetherError } from './errors.js';
import { decodeToken } from './jwt.js';
import { asError, type TokenManager } from './token.js';
import type { AuthEventRow, ChangeEvent, EventType, FileRow, Row } from './types.js';

/**
 * - `idle`: never connected (nothing subscribed yet, `connect()` not called).
 * - `connecting`: the first connection is being opened.
 * - `open`: connected; subscriptions are (re)established on entry.
 * - `reconnecting`: the connection was lost; waiting for the next attempt or opening it.
 * - `closed`: `disconnect()` was called, the server refused the token (and no new one
 *   could be had), or `maxAttempts` ran out. `connect()` (or a new token) opens again.
 */
export type ConnectionState = 'idle' | 'connecting' | 'open' | 'reconnecting' | 'closed';

export interface StateChange {
  state: ConnectionState;
  previous: ConnectionState;
  /** Failed attempts since the last good connection (while reconnecting). */
  attempt?: number;
  /** Wait before the next attempt (while reconnecting). */
  delayMs?: number;
  /** Close code of the lost connection, when known. */
  code?: number;
  reason?: string;
  error?: AetherError;
  /**
   * WebSocket URL (without the token) of the connection (`open`) or of the next
   * attempt (`connecting`, `reconnecting`). With several URLs, it shows where a
   * failover goes.
   */
  url?: string;
}

/** The part of the standard `WebSocket` the client uses (browsers, Node ≥ 22, the `ws` package). */
export interface WebSocketLike {
  readonly readyState: number;
  onopen: ((ev: unknown) => void) | null;
  onclose: ((ev: { code: number; reason: string }) => void) | null;
  onerror: ((ev: unknown) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
  send(data: string): void;
  close(code?: number, reason?: string): void;
}
export type WebSocketConstructor = new (url: string) => WebSocketLike;

export interface RealtimeOptions {
  /**
   * WebSocket URL, or several (one per node, tried in turn; see the README's
   * "Several nodes"); default: the client URL(s) with `ws(s)://` and `path`.
   */
  url?: string | readonly string[];
  /** Default `/ws` (Aether's `WS_PATH`). */
  path?: string;
  /** WebSocket implementation; default `globalThis.WebSocket`. */
  WebSocket?: WebSocketConstructor;
  /** Reconnect backoff: first delay ceiling (ms). Default 500. */
  reconnectBaseMs?: number;
  /** Reconnect backoff: largest delay ceiling (ms). Default 30 000. */
  reconnectMaxMs?: number;
  /** Give up (state `closed`) after this many failed attempts in a row (each URL tried counts). Default: never. */
  maxAttempts?: number;
  /** Randomness for the jitter (tests). */
  random?: () => number;
  /** An application-level heartbeat (`system/status`) every this many ms; 0 disables. Default 25 000. */
  heartbeatIntervalMs?: number;
  /** The connection is considered dead when nothing arrives this long after a heartbeat. Default 10 000. */
  heartbeatTimeoutMs?: number;
  /** An attempt that has not opened after this long is abandoned. Default 10 000. */
  connectTimeoutMs?: number;
  /** Frames `send()` keeps while disconnected; the oldest are dropped beyond. Default 1 000. */
  queueLimit?: number;
  /** How long an in-band token renewal may take before the client reconnects instead. Default 10 000. */
  refreshTimeoutMs?: number;
  /** Follow the browser's `online`/`offline` events. Default true where they exist. */
  watchNetwork?: boolean;
}

export interface SubscribeInfo {
  /** The subscription was (re)made with `since`: nothing was missed. */
  resumed: boolean;
  /** This is a resubscription after a reconnect (or after a `gap`). */
  reconnected: boolean;
}

export interface SubscriptionHandlers<T extends Row = Row> {
  onInsert?: (row: T, event: ChangeEvent<T>) => void;
  onUpdate?: (newRow: T, oldRow: T | null, event: ChangeEvent<T>) => void;
  onDelete?: (oldRow: T, event: ChangeEvent<T>) => void;
  onTruncate?: (event: ChangeEvent<T>) => void;
  /** Every change, after the specific handler. */
  onChange?: (event: ChangeEvent<T>) => void;
  /** Refusals (`invalid_filter`, `unknown_table`, …: the subscription is dropped) and `gap` (it continues live). */
  onError?: (error: AetherError) => void;
  /**
   * The server confirmed the subscription. After a reconnect, `resumed: false`
   * means changes made while disconnected may be missing: reload the data.
   */
  onSubscribed?: (info: SubscribeInfo) => void;
}

export interface SubscriptionSpec {
  schema?: string;
  table: string;
  event?: EventType | '*';
  /** `column=op.value` conditions joined by `&`, e.g. `folder_id=eq.<uuid>`. */
  filter?: string;
  /** Resume after this change id. */
  since?: string;
}

export interface ShortcutOptions {
  event?: EventType | '*';
  since?: string;
}

export type Unsubscribe = () => void;

interface Sub {
  id: string;
  data: Record<string, unknown>;
  handlers: SubscriptionHandlers<any>;
  /** Newest change id handled; changes at or before it are duplicates. */
  lastId: string | null;
  /** The server confirmed it on the current connection. */
  active: boolean;
  /** Was confirmed at least once. */
  everSubscribed: boolean;
  /** Sent at least once (on any connection). */
  sent: boolean;
  /** Whether the pending subscribe frame carried `since`. */
  resumed: boolean;
  reconnected: boolean;
}

const OPEN = 1;
const CLOSE_AUTH = 4001;

type Listener<T> = (value: T) => void;

export class RealtimeClient {
  private ws: WebSocketLike | null = null;
  private gen = 0;
  private stateValue: ConnectionState = 'idle';
  private attempt = 0;
  private wantOpen = false;
  private authBlocked = false;
  private socketToken: string | null = null;
  private gotFrame = false;
  private readonly subs = new Map<string, Sub>();
  private nextSub = 1;
  /** Newest change id seen on any subscription: the resume point of subscriptions that saw none. */
  private maxSeen: string | null = null;
  private readonly queue: string[] = [];
  private reconnectTimer: ReturnType<typeof setTimeout> | null = null;
  private connectTimer: ReturnType<typeof setTimeout> | null = null;
  private heartbeatTimer: ReturnType<typeof setInterval> | null = null;
  private heartbeatDeadline: ReturnType<typeof setTimeout> | null = null;
  private lastReceived = 0;
  private lastAuthError: AetherError | null = null;
  private pendingRefresh: { token: string; resolve: () => void; reject: (e: AetherError) => void } | null = null;
  private readonly pings: Array<{ sent: number; resolve: (ms: number) => void }> = [];
  private readonly stateListeners = new Set<Listener<StateChange>>();
  private readonly errorListeners = new Set<Listener<AetherError>>();
  private readonly messageListeners = new Set<Listener<Record<string, unknown>>>();
  private readonly refreshedListeners = new Set<Listener<{ expires_at?: number; user_id?: string | null }>>();
  private readonly detachNetwork: () => void;
  /** The nodes: HTTP origins (the WebSocket URL is derived), or `opts.url`'s WebSocket URLs. */
  private readonly nodes: Endpoints;
  /** Position in `nodes` of the current (or last) connection attempt. */
  private connNode = 0;

  /**
   * `baseUrl`: Aether's HTTP origin, or several (one per node). `createClient`
   * passes the list it shares with the REST calls.
   */
  constructor(
    baseUrl: string | readonly string[] | Endpoints,
    private readonly tokens: TokenManager,
    private readonly opts: RealtimeOptions = {},
  ) {
    if (opts.url !== undefined) this.nodes = new Endpoints(opts.url);
    else this.nodes = baseUrl instanceof Endpoints ? baseUrl : new Endpoints(baseUrl);
    this.tokens.onChange((token) => this.tokenChanged(token));
    this.detachNetwork = this.watchNetwork();
  }

  /** The connection state; see {@link ConnectionState}. */
  get state(): ConnectionState {
    return this.stateValue;
  }

  /**
   * The WebSocket URL (without the token) in use: of the open connection, or the
   * one the next attempt goes to.
   */
  get url(): string {
    return this.wsUrl(this.ws ? this.connNode : this.nodes.index);
  }

  /** Ids of the change most recently handled per subscription (what a resume starts after). */
  get positions(): Record<string, string | null> {
    const out: Record<string, string | null> = {};
    for (const s of this.subs.values()) out[s.id] = s.lastId;
    return out;
  }

  onStateChange(listener: Listener<StateChange>): () => void {
    this.stateListeners.add(listener);
    return () => this.stateListeners.delete(listener);
  }

  /** Connection-level errors (auth refusals, slow-consumer closes, bad frames) and subscription errors. */
  onError(listener: Listener<AetherError>): () => void {
    this.errorListeners.add(listener);
    return () => this.errorListeners.delete(listener);
  }

  /** Frames that are not changes, subscription replies, heartbeats or refresh replies (e.g. channel messages). */
  onMessage(listener: Listener<Record<string, unknown>>): () => void {
    this.messageListeners.add(listener);
    return () => this.messageListeners.delete(listener);
  }

  /** The server accepted a renewed token in-band. */
  onTokenRefreshed(listener: Listener<{ expires_at?: number; user_id?: string | null }>): () => void {
    this.refreshedListeners.add(listener);
    return () => this.refreshedListeners.delete(listener);
  }

  /** Opens the connection (subscribing does it too). Idempotent. */
  connect(): void {
    this.wantOpen = true;
    this.authBlocked = false;
    if (this.ws || this.reconnectTimer !== null || this.stateValue === 'connecting') return;
    void this.open();
  }

  /** Closes the connection and stops reconnecting. Subscriptions are kept: `connect()` resumes them with `since`. */
  disconnect(): void {
    this.wantOpen = false;
    this.clearReconnect();
    const ws = this.ws;
    this.teardown();
    this.gen++;
    if (ws) safeClose(ws, 1000, 'client disconnect');
    this.setState('closed');
  }

  /** `disconnect()`, and forget subscriptions and listeners. */
  destroy(): void {
    this.disconnect();
    this.subs.clear();
    this.queue.length = 0;
    this.detachNetwork();
    this.stateListeners.clear();
    this.errorListeners.clear();
    this.messageListeners.clear();
    this.refreshedListeners.clear();
  }

  /** Any table of the `aether_realtime` publication. */
  subscribe<T extends Row = Row>(spec: SubscriptionSpec, handlers: SubscriptionHandlers<T> = {}): Unsubscribe {
    const data: Record<string, unknown> = { schema: spec.schema ?? 'public', table: spec.table, event: spec.event ?? '*' };
    if (spec.filter) data.filter = spec.filter;
    return this.add(data, handlers, spec.since);
  }

  /** Files of one folder (`folder_id` of an upload); `null` for files at the root. */
  subscribeToFiles(folderId: string | null, handlers: SubscriptionHandlers<FileRow> = {}, opts: ShortcutOptions = {}): Unsubscribe {
    return this.add({ files: folderId, event: opts.event ?? '*' }, handlers, opts.since);
  }

  /** Files of one bucket. */
  subscribeToStorage(bucket: string, handlers: SubscriptionHandlers<FileRow> = {}, opts: ShortcutOptions = {}): Unsubscribe {
    return this.add({ storage: bucket, event: opts.event ?? '*' }, handlers, opts.since);
  }

  /** Sign-ups, sign-ins and sign-outs of one user (`public.auth_events`). */
  subscribeToAuth(userId: string, handlers: SubscriptionHandlers<AuthEventRow> = {}, opts: ShortcutOptions = {}): Unsubscribe {
    return this.add({ auth: userId, event: opts.event ?? '*' }, handlers, opts.since);
  }

  /**
   * Sends a frame of the Aether WebSocket API (e.g. a channel `message/send`).
   * While disconnected it is queued (up to `queueLimit`) and sent, in order, once
   * the connection is back and subscriptions are re-established.
   */
  send(frame: Record<string, unknown>): void {
    const text = JSON.stringify(frame);
    if (this.ws && this.ws.readyState === OPEN && this.stateValue === 'open') {
      this.ws.send(text);
      return;
    }
    this.queue.push(text);
    const limit = this.opts.queueLimit ?? 1000;
    while (this.queue.length > limit) {
      this.queue.shift();
      this.emitError(new AetherError(`outgoing queue over ${limit} frames: the oldest was dropped`, 'queue_overflow'));
    }
    if (this.stateValue === 'idle') this.connect();
  }

  /** Frames waiting for the connection. */
  get queued(): number {
    return this.queue.length;
  }

  /** Round trip of one `system/status` heartbeat, in ms. Rejects if the connection is not open. */
  ping(timeoutMs = this.opts.heartbeatTimeoutMs ?? 10_000): Promise<number> {
    if (!this.ws || this.stateValue !== 'open') {
      return Promise.reject(new AetherError('not connected', 'not_connected'));
    }
    return new Promise((resolve, reject) => {
      const entry = { sent: Date.now(), resolve: (ms: number) => { clearTimeout(t); resolve(ms); } };
      const t = setTimeout(() => {
        const i = this.pings.indexOf(entry);
        if (i >= 0) this.pings.splice(i, 1);
        reject(new AetherError('no heartbeat reply', 'timeout'));
      }, timeoutMs);
      this.pings.push(entry);
      this.ws!.send(JSON.stringify({ type: 'system', action: 'status' }));
    });
  }

  /**
   * Sends the current token in-band (`connection/refresh`) and waits for the
   * server's `connection/refreshed`. Called automatically when the token changes
   * for the same user.
   */
  refreshToken(token = this.tokens.get()): Promise<void> {
    const ws = this.ws;
    if (!ws || this.stateValue !== 'open' || token === null) {
      return Promise.reject(new AetherError('not connected', 'not_connected'));
    }
    this.pendingRefresh?.reject(new AetherError('superseded by a newer token', 'superseded'));
    return new Promise<void>((resolve, reject) => {
      const t = setTimeout(() => {
        if (this.pendingRefresh?.token === token) this.pendingRefresh = null;
        reject(new AetherError('no reply to the token renewal', 'timeout'));
      }, this.opts.refreshTimeoutMs ?? 10_000);
      this.pendingRefresh = {
        token,
        resolve: () => { clearTimeout(t); resolve(); },
        reject: (e) => { clearTimeout(t); reject(e); },
      };
      ws.send(JSON.stringify({ type: 'connection', action: 'refresh', data: { token } }));
    });
  }

  // ---- internals ---------------------------------------------------------

  private add(data: Record<string, unknown>, handlers: SubscriptionHandlers<any>, since?: string): Unsubscribe {
    const sub: Sub = {
      id: `s${this.nextSub++}`,
      data,
      handlers,
      lastId: since ?? null,
      active: false,
      everSubscribed: false,
      sent: false,
      resumed: false,
      reconnected: false,
    };
    this.subs.set(sub.id, sub);
    if (this.stateValue === 'open') this.sendSubscribe(sub);
    else if (this.stateValue === 'idle') this.connect();
    return () => this.remove(sub);
  }

  private remove(sub: Sub): void {
    if (this.subs.get(sub.id) !== sub) return;
    this.subs.delete(sub.id);
    if (sub.sent && this.ws && this.stateValue === 'open') {
      this.ws.send(JSON.stringify({ type: 'subscription', action: 'unsubscribe', data: { id: sub.id } }));
    }
  }

  private sendSubscribe(sub: Sub, forceLive = false): void {
    // A first subscribe goes live (or resumes at the caller's `since`). A resubscribe
    // resumes after the last change handled, or after the position the server gave
    // when it confirmed the subscription. One that was never confirmed resumes after
    // the newest change seen on the connection (it may replay a little from before
    // it was made, never miss anything).
    let since: string | null = null;
    if (!forceLive) since = sub.sent ? sub.lastId ?? this.maxSeen : sub.lastId;
    if (since !== null && (sub.lastId === null || sub.lastId < since)) sub.lastId = since;
    sub.reconnected = sub.sent;
    sub.resumed = since !== null;
    sub.sent = true;
    sub.active = false;
    const data: Record<string, unknown> = { id: sub.id, ...sub.data };
    if (since !== null) data.since = since;
    this.ws!.send(JSON.stringify({ type: 'subscription', action: 'subscribe', data }));
  }

  private async open(): Promise<void> {
    this.clearReconnect();
    const gen = ++this.gen;
    const node = this.nodes.index;
    if (this.stateValue !== 'reconnecting') {
      this.setState(this.stateValue === 'open' ? 'reconnecting' : 'connecting', { url: this.wsUrl(node) });
    }
    const token = await this.tokens.fresh();
    if (gen !== this.gen || !this.wantOpen) return;
    const Ctor = this.opts.WebSocket ?? (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
    if (!Ctor) {
      this.wantOpen = false;
      const error = new AetherError(
        'no WebSocket implementation: pass realtime.WebSocket (e.g. from the `ws` package on Node < 22)',
        'no_websocket',
      );
      this.emitError(error);
      this.setState('closed', { error });
      return;
    }
    const url = this.socketUrl(token, node);
    this.connNode = node;
    let ws: WebSocketLike;
    try {
      ws = new Ctor(url);
    } catch (e) {
      this.lost(gen, 1006, `cannot open: ${asError(e).message}`);
      return;
    }
    this.ws = ws;
    this.socketToken = token;
    this.gotFrame = false;
    this.lastAuthError = null;
    this.connectTimer = setTimeout(() => {
      if (gen === this.gen && this.stateValue !== 'open') this.abandon(gen, 'connect timeout');
    }, this.opts.connectTimeoutMs ?? 10_000);
    ws.onopen = () => {
      if (gen === this.gen) this.opened();
    };
    ws.onmessage = (ev) => {
      if (gen === this.gen) this.frame(ev.data);
    };
    ws.onclose = (ev) => {
      if (gen === this.gen) this.lost(gen, ev.code, ev.reason);
    };
    ws.onerror = () => {
      // A close event follows.
    };
  }

  /** The WebSocket URL of node `index`, without the token. */
  private wsUrl(index: number): string {
    const base = this.nodes.list[index]!;
    if (this.opts.url !== undefined) return base;
    const u = new URL(this.opts.path ?? '/ws', base);
    u.protocol = u.protocol === 'https:' ? 'wss:' : u.protocol === 'http:' ? 'ws:' : u.protocol;
    return u.toString();
  }

  private socketUrl(token: string | null, node: number): string {
    const url = this.wsUrl(node);
    if (token === null) return url;
    const u = new URL(url);
    u.searchParams.set('token', token);
    return u.toString();
  }

  private opened(): void {
    if (this.connectTimer !== null) clearTimeout(this.connectTimer);
    this.connectTimer = null;
    this.lastReceived = Date.now();
    this.setState('open', { url: this.wsUrl(this.connNode) });
    for (const sub of [...this.subs.values()]) {
      if (this.subs.get(sub.id) === sub && this.ws) this.sendSubscribe(sub);
    }
    while (this.queue.length > 0 && this.ws && this.ws.readyState === OPEN) {
      this.ws.send(this.queue.shift()!);
    }
    this.startHeartbeat();
    // The token changed while this connection was being opened.
    if (this.tokens.get() !== this.socketToken) this.tokenChanged(this.tokens.get());
  }

  /** Gives up on a socket that is silent or will not open, without waiting for its close. */
  private abandon(gen: number, reason: string): void {
    const ws = this.ws;
    if (ws) {
      ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
      safeClose(ws, 4000, reason);
    }
    this.lost(gen, 1006, reason);
  }

  private lost(gen: number, code: number, reason: string): void {
    if (gen !== this.gen) return;
    this.gen++;
    this.teardown();
    if (!this.wantOpen) {
      this.setState('closed', { code, reason });
      return;
    }
    if (code === CLOSE_AUTH) {
      const error = this.lastAuthError ?? new AetherError(reason || 'the server refused the token', 'auth/invalid-token');
      void this.afterAuthClose(error, code, reason);
      return;
    }
    this.scheduleReconnect({ code, reason });
  }

  private async afterAuthClose(error: AetherError, code: number, reason: string): Promise<void> {
    const refused = this.socketToken;
    if (this.tokens.canRenew && refused !== null) {
      try {
        const fresh = await this.tokens.renew();
        if (fresh !== refused) {
          // The token, not the node, was refused: the same node again.
          if (this.wantOpen && this.ws === null && this.reconnectTimer === null) this.scheduleReconnect({ code, reason }, false);
          return;
        }
      } catch (e) {
        this.emitError(asError(e));
      }
    }
    if (!this.wantOpen || this.ws !== null || this.reconnectTimer !== null) return;
    // A new token (sign-in, setToken) opens again.
    this.authBlocked = true;
    this.setState('closed', { code, reason, error });
  }

  private teardown(): void {
    if (this.connectTimer !== null) clearTimeout(this.connectTimer);
    this.connectTimer = null;
    this.stopHeartbeat();
    this.ws = null;
    for (const sub of this.subs.values()) sub.active = false;
    if (this.pendingRefresh) {
      const p = this.pendingRefresh;
      this.pendingRefresh = null;
      // The next connection opens with the current token anyway.
      if (p.token === this.tokens.get()) p.resolve();
      else p.reject(new AetherError('connection lost', 'not_connected'));
    }
  }

  /**
   * After a failed attempt or a lost connection. `rotate`: the node failed, so the
   * next one in the list is tried, at once while the round (one try of each node
   * since the last good connection) is not over; after a full round, the backoff.
   * With one URL every attempt is a full round: the backoff as always.
   */
  private scheduleReconnect(info: { code?: number; reason?: string }, rotate = true): void {
    if (rotate) this.nodes.failed(this.connNode);
    const max = this.opts.maxAttempts ?? Infinity;
    if (this.attempt >= max) {
      this.wantOpen = false;
      const error = new AetherError(`gave up after ${this.attempt} attempts`, 'reconnect_failed');
      this.emitError(error);
      this.setState('closed', { ...info, error });
      return;
    }
    const n = this.nodes.size;
    const roundOver = (this.attempt + 1) % n === 0;
    const delayMs =
      rotate && !roundOver
        ? 0
        : backoffDelay(Math.floor(this.attempt / n), {
            baseMs: this.opts.reconnectBaseMs,
            maxMs: this.opts.reconnectMaxMs,
            random: this.opts.random,
          });
    this.attempt++;
    this.setState('reconnecting', { ...info, attempt: this.attempt, delayMs, url: this.url });
    this.reconnectTimer = setTimeout(() => {
      this.reconnectTimer = null;
      void this.open();
    }, delayMs);
  }

  private clearReconnect(): void {
    if (this.reconnectTimer !== null) clearTimeout(this.reconnectTimer);
    this.reconnectTimer = null;
  }

  /** Drops the current connection (if any) and opens a new one at once. */
  private reconnectNow(reason: string): void {
    const ws = this.ws;
    this.gen++;
    this.teardown();
    if (ws) safeClose(ws, 1000, reason);
    this.attempt = 0;
    if (this.wantOpen) void this.open();
  }

  private frame(raw: unknown): void {
    this.lastReceived = Date.now();
    if (!this.gotFrame) {
      // The server talked back: this connection counts as good.
      this.gotFrame = true;
      this.attempt = 0;
    }
    let msg: Record<string, unknown>;
    try {
      const parsed: unknown = JSON.parse(typeof raw === 'string' ? raw : String(raw));
      if (!parsed || typeof parsed !== 'object') throw new Error('not an object');
      msg = parsed as Record<string, unknown>;
    } catch {
      this.emitError(new AetherError('the server sent a frame that is not a JSON object', 'invalid_frame'));
      return;
    }
    const data = (msg.data ?? {}) as Record<string, unknown>;
    switch (msg.type) {
      case 'change':
        this.change(msg as unknown as ChangeEvent);
        return;
      case 'subscription': {
        const sub = this.subs.get(String(data.id));
        if (msg.action === 'subscribed' && sub) this.subscribed(sub, typeof data.position === 'string' ? data.position : null);
        return;
      }
      case 'error':
        this.errorFrame(AetherError.fromFrame(msg));
        return;
      case 'system':
        if (msg.action === 'status') {
          const now = Date.now();
          for (const p of this.pings.splice(0)) p.resolve(now - p.sent);
          return;
        }
        break;
      case 'connection':
        if (msg.action === 'refreshed') {
          const p = this.pendingRefresh;
          this.pendingRefresh = null;
          if (p) this.socketToken = p.token;
          p?.resolve();
          for (const l of [...this.refreshedListeners]) l(data as { expires_at?: number; user_id?: string | null });
          return;
        }
        if (msg.action === 'connect') return; // greeting
        break;
    }
    for (const l of [...this.messageListeners]) l(msg);
  }

  private subscribed(sub: Sub, position: string | null): void {
    sub.active = true;
    sub.everSubscribed = true;
    // Live from here. The server says after which change (`position`: the newest it
    // had routed when the subscription was registered); every change sent live comes
    // after it, and so does every change this connection has already seen. That is
    // where a subscription that receives nothing before a drop resumes from.
    if (sub.lastId === null) sub.lastId = maxId(position, this.maxSeen);
    call(() => sub.handlers.onSubscribed?.({ resumed: sub.resumed, reconnected: sub.reconnected }), (e) => this.emitError(e));
  }

  private change(ev: ChangeEvent): void {
    const sub = this.subs.get(ev.subscription);
    if (typeof ev.id === 'string' && (this.maxSeen === null || ev.id > this.maxSeen)) this.maxSeen = ev.id;
    if (!sub) return;
    if (sub.lastId !== null && typeof ev.id === 'string' && ev.id <= sub.lastId) return; // already handled
    if (typeof ev.id === 'string') sub.lastId = ev.id;
    const h = sub.handlers;
    const report = (e: AetherError) => this.emitError(e);
    call(() => {
      switch (ev.eventType) {
        case 'INSERT':
          h.onInsert?.(ev.new!, ev);
          break;
        case 'UPDATE':
          h.onUpdate?.(ev.new!, ev.old, ev);
          break;
        case 'DELETE':
          h.onDelete?.(ev.old!, ev);
          break;
        case 'TRUNCATE':
          h.onTruncate?.(ev);
          break;
      }
    }, report);
    if (h.onChange) call(() => h.onChange!(ev), report);
  }

  private errorFrame(err: AetherError): void {
    const sub = err.subscription ? this.subs.get(err.subscription) : undefined;
    if (!sub && err.code === 'unknown_subscription') return; // an unsubscribe of one the server had refused
    if (sub) {
      if (err.code === 'gap') {
        // Too old to resume: go live, and let the application reload (onSubscribed
        // follows with resumed: false).
        call(() => sub.handlers.onError?.(err), (e) => this.emitError(e));
        sub.lastId = null;
        if (this.ws && this.stateValue === 'open') this.sendSubscribe(sub, true);
        sub.reconnected = true;
        return;
      }
      if (err.code === 'duplicate_subscription') return;
      this.subs.delete(sub.id);
      call(() => sub.handlers.onError?.(err), (e) => this.emitError(e));
      this.emitError(err);
      return;
    }
    if (this.pendingRefresh && (err.code.startsWith('auth/') || err.code === 'forbidden')) {
      const p = this.pendingRefresh;
      this.pendingRefresh = null;
      p.reject(err);
      this.emitError(err);
      return;
    }
    if (err.code.startsWith('auth/')) this.lastAuthError = err;
    this.emitError(err);
  }

  private startHeartbeat(): void {
    this.stopHeartbeat();
    const every = this.opts.heartbeatIntervalMs ?? 25_000;
    if (every <= 0) return;
    const gen = this.gen;
    this.heartbeatTimer = setInterval(() => {
      const ws = this.ws;
      if (gen !== this.gen || !ws || ws.readyState !== OPEN) return;
      const sent = Date.now();
      try {
        ws.send(JSON.stringify({ type: 'system', action: 'status' }));
      } catch {
        this.abandon(gen, 'heartbeat send failed');
        return;
      }
      if (this.heartbeatDeadline !== null) return;
      this.heartbeatDeadline = setTimeout(() => {
        this.heartbeatDeadline = null;
        if (gen === this.gen && this.lastReceived < sent) this.abandon(gen, 'heartbeat timeout');
      }, this.opts.heartbeatTimeoutMs ?? 10_000);
    }, every);
  }

  private stopHeartbeat(): void {
    if (this.heartbeatTimer !== null) clearInterval(this.heartbeatTimer);
    if (this.heartbeatDeadline !== null) clearTimeout(this.heartbeatDeadline);
    this.heartbeatTimer = null;
    this.heartbeatDeadline = null;
  }

  private tokenChanged(token: string | null): void {
    if (!this.wantOpen) return;
    if (this.authBlocked) {
      this.authBlocked = false;
      this.attempt = 0;
      void this.open();
      return;
    }
    if (!this.ws || this.stateValue !== 'open' || token === this.socketToken) return;
    const sameUser =
      token !== null && this.socketToken !== null && decodeToken(token)?.sub === decodeToken(this.socketToken)?.sub;
    if (!sameUser) {
      // Someone else (or nobody): their subscriptions need a connection of their own.
      this.reconnectNow('token changed');
      return;
    }
    this.refreshToken(token).catch((e: unknown) => {
      const err = asError(e);
      if (err.code === 'superseded' || err.code === 'not_connected') return;
      // Refused or no answer: a new connection with the new token resumes everything.
      if (this.tokens.get() === token) this.reconnectNow('token renewal failed');
    });
  }

  private watchNetwork(): () => void {
    const g = globalThis as { addEventListener?: (t: string, l: () => void) => void; removeEventListener?: (t: string, l: () => void) => void };
    if (this.opts.watchNetwork === false || typeof g.addEventListener !== 'function' || typeof g.removeEventListener !== 'function') {
      return () => {};
    }
    const online = () => {
      // Back online: try now instead of waiting out the backoff.
      if (this.wantOpen && this.reconnectTimer !== null) {
        this.attempt = 0;
        void this.open();
      }
    };
    const offline = () => {
      // The socket is dead whatever it says; don't wait for the heartbeat to notice.
      if (this.ws) this.abandon(this.gen, 'offline');
    };
    g.addEventListener('online', online);
    g.addEventListener('offline', offline);
    return () => {
      g.removeEventListener!('online', online);
      g.removeEventListener!('offline', offline);
    };
  }

  private setState(state: ConnectionState, extra: Omit<StateChange, 'state' | 'previous'> = {}): void {
    const previous = this.stateValue;
    if (previous === state && state !== 'reconnecting') return;
    this.stateValue = state;
    const change: StateChange = { state, previous, ...extra };
    for (const l of [...this.stateListeners]) call(() => l(change), () => {});
  }

  /** Hands an error to the `onError` listeners (the client's token renewal reports through here). */
  reportError(err: AetherError): void {
    this.emitError(err);
  }

  private emitError(err: AetherError): void {
    for (const l of [...this.errorListeners]) call(() => l(err), () => {});
  }
}

function maxId(a: string | null, b: string | null): string | null {
  if (a === null) return b;
  if (b === null) return a;
  return a > b ? a : b;
}

function safeClose(ws: WebSocketLike, code: number, reason: string): void {
  try {
    ws.close(code, reason);
  } catch {
    // Already closing or never opened.
  }
}

/** Runs an application callback; its exceptions are reported, never thrown into the client. */
function call(f: () => void, report: (e: AetherError) => void): void {
  try {
    f();
  } catch (e) {
    report(new AetherError(`a handler threw: ${asError(e).message}`, 'handler_error', 0, { cause: e }));
  }
}
