import { AetherError } from './errors.js';
import { decodeToken, renewalTime, tokenExpiresAt } from './jwt.js';

/**
 * Supplies a fresh access token before the current one expires. Called with the
 * current token; return the new one (or `null` to sign out). Aether has no
 * refresh-token route yet, so a typical implementation signs in again or asks
 * the application's own backend.
 */
export type GetToken = (current: string | null) => string | null | Promise<string | null>;

export type TokenListener = (token: string | null, previous: string | null) => void;

export interface TokenOptions {
  getToken?: GetToken;
  /** Renew this long before `exp` (ms; at most a quarter of the token's lifetime). Default 60 000. */
  refreshMarginMs?: number;
  /** Called when renewal fails (it is retried until the token expires). */
  onError?: (err: AetherError) => void;
}

/**
 * Holds the access token shared by the REST and realtime parts of a client and
 * renews it ahead of its expiry when a `getToken` callback is given.
 */
export class TokenManager {
  private token: string | null;
  private readonly listeners = new Set<TokenListener>();
  private timer: ReturnType<typeof setTimeout> | null = null;
  private renewing: Promise<string | null> | null = null;
  private stopped = false;

  constructor(token: string | null, private readonly opts: TokenOptions = {}) {
    this.token = token;
    this.schedule();
  }

  get(): string | null {
    return this.token;
  }

  /** The `sub` claim of the current token (the user id), if any. */
  subject(): string | null {
    return decodeToken(this.token)?.sub ?? null;
  }

  get canRenew(): boolean {
    return typeof this.opts.getToken === 'function';
  }

  set(token: string | null): void {
    const previous = this.token;
    this.token = token;
    this.schedule();
    if (previous !== token) {
      for (const l of [...this.listeners]) l(token, previous);
    }
  }

  onChange(listener: TokenListener): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  /** True when the token is missing `exp` or expires later than `withinMs` from now. */
  isFresh(withinMs = 0): boolean {
    const exp = tokenExpiresAt(this.token);
    return exp === null || exp - Date.now() > withinMs;
  }

  /**
   * Renews now through `getToken` (concurrent calls share one renewal) and
   * returns the new token; without `getToken` returns the current one.
   */
  renew(): Promise<string | null> {
    const getToken = this.opts.getToken;
    if (!getToken) return Promise.resolve(this.token);
    if (!this.renewing) {
      const current = this.token;
      this.renewing = (async () => {
        try {
          const fresh = await getToken(current);
          // Someone may have set a token meanwhile (e.g. signed in): keep theirs.
          if (this.token === current) this.set(fresh);
          return this.token;
        } finally {
          this.renewing = null;
        }
      })();
    }
    return this.renewing;
  }

  /** Returns a token that is not about to expire, renewing first when possible. */
  async fresh(withinMs = 5_000): Promise<string | null> {
    if (this.canRenew && this.token !== null && !this.isFresh(withinMs)) {
      try {
        return await this.renew();
      } catch (e) {
        this.opts.onError?.(asError(e));
      }
    }
    return this.token;
  }

  stop(): void {
    this.stopped = true;
    this.clear();
  }

  private clear(): void {
    if (this.timer !== null) clearTimeout(this.timer);
    this.timer = null;
  }

  private schedule(retryInMs?: number): void {
    this.clear();
    if (this.stopped || !this.canRenew || this.token === null) return;
    const at = renewalTime(this.token, this.opts.refreshMarginMs ?? 60_000);
    if (at === null) return;
    const exp = tokenExpiresAt(this.token)!;
    const delay = retryInMs ?? Math.max(0, at - Date.now());
    if (Date.now() + delay >= exp && retryInMs !== undefined) return; // expired: nothing left to renew
    this.timer = setTimeout(() => {
      this.timer = null;
      const before = this.token;
      this.renew().catch((e: unknown) => {
        this.opts.onError?.(asError(e));
        if (this.token === before) {
          // Retry until the token runs out, at most every 5 s.
          const left = exp - Date.now();
          if (left > 0) this.schedule(Math.min(5_000, Math.max(250, left / 2)));
        }
      });
    }, Math.min(delay, 2 ** 31 - 1));
    // A pending renewal alone must not keep a Node process alive.
    (this.timer as { unref?: () => void }).unref?.();
  }
}

export function asError(e: unknown): AetherError {
  if (e instanceof AetherError) return e;
  const message = e instanceof Error ? e.message : String(e);
  return new AetherError(message, 'client_error', 0, { cause: e });
}
