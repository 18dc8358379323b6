import { Endpoints } from './endpoints.js';
import { AetherError } from './errors.js';
import { AuthApi, StorageApi, type FetchLike, type HttpContext } from './http.js';
import { RealtimeClient, type RealtimeOptions } from './realtime.js';
import { TokenManager, type GetToken } from './token.js';

export { AetherError } from './errors.js';
export { AuthApi, StorageApi } from './http.js';
export type { UploadOptions, UploadProgress, FetchLike } from './http.js';
export { RealtimeClient } from './realtime.js';
export type {
  ConnectionState,
  RealtimeOptions,
  ShortcutOptions,
  StateChange,
  SubscribeInfo,
  SubscriptionHandlers,
  SubscriptionSpec,
  Unsubscribe,
  WebSocketConstructor,
  WebSocketLike,
} from './realtime.js';
export { TokenManager } from './token.js';
export type { GetToken } from './token.js';
export { backoffDelay } from './backoff.js';
export type { BackoffOptions } from './backoff.js';
export { decodeToken, tokenExpiresAt, renewalTime } from './jwt.js';
export type { TokenClaims } from './jwt.js';
export type * from './types.js';

export interface ClientOptions {
  /** Access token to start with (e.g. kept from an earlier sign-in). Sign-up and sign-in replace it. */
  token?: string | null;
  /**
   * Renews the token before it expires (see README: Aether has no refresh route,
   * so this typically signs in again). Without it, an expired token ends the
   * realtime connection (state `closed`) until a new token is set.
   */
  getToken?: GetToken;
  /** Renew this long before `exp` (ms; at most a quarter of the token's lifetime). Default 60 000. */
  refreshMarginMs?: number;
  /** `fetch` implementation; default `globalThis.fetch`. */
  fetch?: FetchLike;
  realtime?: RealtimeOptions;
}

export interface AetherClient {
  /** The HTTP origin in use (with several URLs: the node the client is on now). */
  readonly url: string;
  /** Every HTTP origin given, in the order they are tried. */
  readonly urls: readonly string[];
  readonly auth: AuthApi;
  readonly storage: StorageApi;
  readonly realtime: RealtimeClient;
  /** The current access token. */
  getToken(): string | null;
  /** Replaces the access token (REST calls and the realtime connection follow). */
  setToken(token: string | null): void;
  /** Listens to token changes (sign-in, sign-out, renewals). */
  onTokenChange(listener: (token: string | null) => void): () => void;
  /** Closes the realtime connection and stops token renewal. */
  close(): void;
}

/**
 * `createClient('http://localhost:8080', { token })`: one client per server and
 * user. `url` is the HTTP origin of Aether (the WebSocket URL is derived from it).
 *
 * Several nodes of one cluster (`NATS_URL`): `createClient(['http://a:8080',
 * 'http://b:8080'], …)`. The client uses one node at a time, the first to begin
 * with; when its connection fails or closes unexpectedly it moves to the next in
 * the list and resumes every subscription with `since` (README: "Several nodes").
 */
export function createClient(url: string | readonly string[], options: ClientOptions = {}): AetherClient {
  const given = typeof url === 'string' ? [url] : Array.isArray(url) ? (url as readonly unknown[]) : [url];
  if (given.length === 0) throw new AetherError('no server URL given: the list is empty', 'invalid_url');
  const origins = given.map((u) => {
    if (typeof u !== 'string' || !/^https?:\/\//i.test(u)) {
      throw new AetherError(`the client URL must be http(s)://…, got ${JSON.stringify(u)}`, 'invalid_url');
    }
    return u.replace(/\/+$/, '') + '/';
  });
  // Shared by the REST calls and the realtime connection: both use the current node.
  const nodes = new Endpoints(origins);
  let realtime: RealtimeClient | null = null;
  const tokens = new TokenManager(options.token ?? null, {
    getToken: options.getToken,
    refreshMarginMs: options.refreshMarginMs,
    onError: (e) => realtime?.reportError(e),
  });
  const fetchImpl: FetchLike = options.fetch ?? ((input, init) => globalThis.fetch(input, init));
  const ctx: HttpContext = {
    get baseUrl() {
      return nodes.current;
    },
    tokens,
    fetch: fetchImpl,
    unreachable: (base) => nodes.failedUrl(base),
  };
  realtime = new RealtimeClient(nodes, tokens, options.realtime);
  const rt = realtime;
  return {
    get url() {
      return nodes.current;
    },
    urls: nodes.list,
    auth: new AuthApi(ctx),
    storage: new StorageApi(ctx),
    realtime: rt,
    getToken: () => tokens.get(),
    setToken: (token) => tokens.set(token),
    onTokenChange: (listener) => tokens.onChange((t) => listener(t)),
    close: () => {
      tokens.stop();
      rt.disconnect();
    },
  };
}
