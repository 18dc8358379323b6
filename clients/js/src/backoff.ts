export interface BackoffOptions {
  /** Delay before the first retry, before jitter (ms). Default 500. */
  baseMs?: number;
  /** Largest delay, before jitter (ms). Default 30 000. */
  maxMs?: number;
  /** Source of randomness in [0, 1); default `Math.random`. */
  random?: () => number;
}

/**
 * Exponential backoff with "equal jitter": the ceiling doubles with every failed
 * attempt (`baseMs · 2^attempt`, capped at `maxMs`), and the delay is drawn
 * uniformly from the upper half of it. Half keeps clients from retrying at once
 * after a server restart; the other half guarantees the delay still grows.
 *
 * `attempt` counts failures since the last good connection, from 0.
 */
export function backoffDelay(attempt: number, opts: BackoffOptions = {}): number {
  const base = opts.baseMs ?? 500;
  const max = opts.maxMs ?? 30_000;
  const random = opts.random ?? Math.random;
  const ceiling = Math.min(max, base * 2 ** Math.min(Math.max(0, attempt), 30));
  return Math.round(ceiling / 2 + random() * (ceiling / 2));
}
