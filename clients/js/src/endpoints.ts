import { AetherError } from './errors.js';

/**
 * The URLs of the nodes a client may talk to, and which one it uses now.
 *
 * One list is shared by the REST calls and the realtime connection of a client
 * (unless `realtime.url` names WebSocket URLs of its own): they use the current
 * node, and whichever finds it unreachable moves both to the next one in the
 * list. The order is the caller's; it wraps around. The client stays on a node
 * that works: it never moves back to the first on its own.
 */
export class Endpoints {
  private i = 0;
  readonly list: readonly string[];

  constructor(urls: string | readonly string[]) {
    this.list = Object.freeze(typeof urls === 'string' ? [urls] : [...urls]);
    if (this.list.length === 0) throw new AetherError('no server URL given: the list is empty', 'invalid_url');
  }

  /** How many URLs there are (one round of failover tries each once). */
  get size(): number {
    return this.list.length;
  }

  /** Position of the current URL in the list. */
  get index(): number {
    return this.i;
  }

  /** The URL in use now. */
  get current(): string {
    return this.list[this.i]!;
  }

  /**
   * The URL at `index` could not be reached (or dropped the connection): the
   * next one becomes current. When something else already moved on from it,
   * nothing changes, so two failures of the same node skip only that node.
   */
  failed(index: number): void {
    if (index === this.i) this.i = (this.i + 1) % this.list.length;
  }

  /** {@link failed} by URL. */
  failedUrl(url: string): void {
    if (this.current === url) this.failed(this.i);
  }
}
