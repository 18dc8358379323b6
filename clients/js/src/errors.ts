/**
 * Every failure the client reports is an `AetherError`: HTTP errors carry the
 * server's `{"error":{"message","code","status"}}` body, WebSocket errors the
 * `{"type":"error","code","message","details"}` frame, and client-side failures
 * use codes of their own (`network_error`, `aborted`, `timeout`, …).
 */
export class AetherError extends Error {
  /** Machine-readable code, e.g. `auth/invalid-credentials`, `storage/file-too-large`, `gap`. */
  readonly code: string;
  /** HTTP status; `0` for network and WebSocket errors. */
  readonly status: number;
  /** `details` of a WebSocket error frame, when any. */
  declare readonly details?: unknown;
  /** The subscription an error frame concerns, when any. */
  declare readonly subscription?: string;
  /** Seconds to wait, from `Retry-After` (rate limits). */
  declare readonly retryAfter?: number;

  constructor(
    message: string,
    code: string,
    status = 0,
    extra: { details?: unknown; subscription?: string; retryAfter?: number; cause?: unknown } = {},
  ) {
    super(message, extra.cause === undefined ? undefined : { cause: extra.cause });
    this.name = 'AetherError';
    this.code = code;
    this.status = status;
    if (extra.details !== undefined) this.details = extra.details;
    if (extra.subscription !== undefined) this.subscription = extra.subscription;
    if (extra.retryAfter !== undefined) this.retryAfter = extra.retryAfter;
  }

  /** Builds an error from a parsed HTTP error body (or anything else the server sent). */
  static fromHttp(status: number, body: unknown, retryAfter?: string | null): AetherError {
    const err = (body as { error?: { message?: unknown; code?: unknown } } | null)?.error;
    const message = typeof err?.message === 'string' ? err.message : `HTTP ${status}`;
    const code = typeof err?.code === 'string' ? err.code : `http_${status}`;
    const seconds = retryAfter != null && retryAfter !== '' ? Number(retryAfter) : undefined;
    return new AetherError(message, code, status, {
      retryAfter: seconds !== undefined && Number.isFinite(seconds) ? seconds : undefined,
    });
  }

  /** Builds an error from a WebSocket `{"type":"error",…}` frame. */
  static fromFrame(frame: { code?: unknown; message?: unknown; details?: unknown; subscription?: unknown }): AetherError {
    return new AetherError(
      typeof frame.message === 'string' ? frame.message : 'realtime error',
      typeof frame.code === 'string' ? frame.code : 'unknown_error',
      0,
      {
        details: frame.details,
        subscription: typeof frame.subscription === 'string' ? frame.subscription : undefined,
      },
    );
  }
}
