import { AetherError } from './errors.js';
import type { TokenManager } from './token.js';
import type {
  AuthResponse,
  Credentials,
  ListResult,
  UploadResult,
} from './types.js';

export type FetchLike = typeof fetch;

export interface HttpContext {
  /** The origin requests go to (with several nodes: the current one; read per request). */
  baseUrl: string;
  tokens: TokenManager;
  fetch: FetchLike;
  /**
   * A request to `baseUrl` got no response (a network error, not an abort): with
   * several nodes, the next one becomes current. The request is not retried.
   */
  unreachable?: (baseUrl: string) => void;
}

interface RequestOptions {
  json?: unknown;
  /** A raw body (e.g. `FormData`), instead of `json`. */
  body?: BodyInit;
  headers?: Record<string, string>;
  query?: Record<string, string | undefined>;
  auth?: boolean;
  signal?: AbortSignal;
}

async function readBody(res: Response): Promise<unknown> {
  const text = await res.text();
  if (text === '') return null;
  try {
    return JSON.parse(text);
  } catch {
    return text;
  }
}

export function resolveUrl(baseUrl: string, path: string): string {
  return new URL(path, baseUrl.endsWith('/') ? baseUrl : `${baseUrl}/`).toString();
}

export async function request<T>(ctx: HttpContext, method: string, path: string, opts: RequestOptions = {}): Promise<T> {
  const base = ctx.baseUrl;
  const url = new URL(resolveUrl(base, path.replace(/^\//, '')));
  for (const [k, v] of Object.entries(opts.query ?? {})) {
    if (v !== undefined) url.searchParams.set(k, v);
  }
  const headers: Record<string, string> = { ...opts.headers };
  if (opts.json !== undefined) headers['content-type'] = 'application/json';
  if (opts.auth) {
    const token = await ctx.tokens.fresh();
    if (token) headers.authorization = `Bearer ${token}`;
  }
  let res: Response;
  try {
    res = await ctx.fetch(url, {
      method,
      headers,
      body: opts.json === undefined ? opts.body : JSON.stringify(opts.json),
      signal: opts.signal,
    });
  } catch (e) {
    if ((e as { name?: string })?.name === 'AbortError') throw new AetherError('request aborted', 'aborted', 0, { cause: e });
    ctx.unreachable?.(base);
    throw new AetherError(`network error: ${(e as Error)?.message ?? e}`, 'network_error', 0, { cause: e });
  }
  const body = await readBody(res);
  if (!res.ok) throw AetherError.fromHttp(res.status, body, res.headers.get('retry-after'));
  return body as T;
}

/** `client.auth`: accounts. A successful sign-up or sign-in makes its token the client's. */
export class AuthApi {
  private current: AuthResponse | null = null;

  constructor(private readonly ctx: HttpContext) {}

  /** The user of the last sign-up / sign-in of this client, until sign-out. */
  get user(): AuthResponse['user'] | null {
    return this.current?.user ?? null;
  }

  /** `POST /auth/sign-up` (201). */
  async signUp(credentials: Credentials): Promise<AuthResponse> {
    return this.adopt(await request<AuthResponse>(this.ctx, 'POST', '/auth/sign-up', { json: credentials }));
  }

  /** `POST /auth/sign-in`. */
  async signIn(credentials: Credentials): Promise<AuthResponse> {
    return this.adopt(await request<AuthResponse>(this.ctx, 'POST', '/auth/sign-in', { json: credentials }));
  }

  /**
   * `POST /auth/sign-out`: revokes the session of the current token, then clears
   * it (the realtime connection reconnects anonymously). The token is cleared
   * even when the server call fails.
   */
  async signOut(): Promise<{ success: boolean }> {
    try {
      return await request<{ success: boolean }>(this.ctx, 'POST', '/auth/sign-out', { auth: true });
    } finally {
      this.current = null;
      this.ctx.tokens.set(null);
    }
  }

  private adopt(res: AuthResponse): AuthResponse {
    this.current = res;
    this.ctx.tokens.set(res.session.access_token);
    return res;
  }
}

export interface UploadProgress {
  /** Bytes of the request body sent so far (multipart framing included). */
  loaded: number;
  /** Total bytes of the request body, when known. */
  total: number;
  /** `loaded / total`, 0…1. */
  fraction: number;
}

export interface UploadOptions {
  /** Defaults to the server's `UPLOAD_BUCKET`. */
  bucket?: string;
  /** Where to store the file, e.g. `docs/a.pdf`; empty or ending in `/` appends the file's name. */
  path?: string;
  /** Replace an existing file at the path (`x-upsert: true`). */
  upsert?: boolean;
  /** File name sent for a `Blob` that is not a `File`. Default: the last segment of `path`, else `file`. */
  fileName?: string;
  /** Progress of the request body: fine-grained with `XMLHttpRequest` (browsers), start and end only with `fetch`. */
  onProgress?: (p: UploadProgress) => void;
  signal?: AbortSignal;
  /** `auto` (default): XMLHttpRequest when the platform has it, else fetch. */
  transport?: 'auto' | 'xhr' | 'fetch';
}

/** `client.storage`: files. */
export class StorageApi {
  constructor(private readonly ctx: HttpContext) {}

  /** `POST /storage/upload`. Fields go in the order the server checks them: `bucket`, `path`, then `file`. */
  async upload(file: Blob, opts: UploadOptions = {}): Promise<UploadResult> {
    const name =
      (file as Partial<File>).name ||
      opts.fileName ||
      (opts.path && !opts.path.endsWith('/') ? opts.path.split('/').pop() : undefined) ||
      'file';
    const form = new FormData();
    if (opts.bucket !== undefined) form.append('bucket', opts.bucket);
    if (opts.path !== undefined) form.append('path', opts.path);
    form.append('file', file, name);
    const token = await this.ctx.tokens.fresh();
    const headers: Record<string, string> = {};
    if (token) headers.authorization = `Bearer ${token}`;
    if (opts.upsert) headers['x-upsert'] = 'true';
    const base = this.ctx.baseUrl;
    const url = resolveUrl(base, 'storage/upload');
    const useXhr =
      opts.transport === 'xhr' || ((opts.transport ?? 'auto') === 'auto' && typeof XMLHttpRequest === 'function');
    if (useXhr) return uploadWithXhr(url, form, headers, file.size, opts, () => this.ctx.unreachable?.(base));
    opts.onProgress?.({ loaded: 0, total: file.size, fraction: 0 });
    const res = await request<UploadResult>(this.ctx, 'POST', '/storage/upload', {
      body: form,
      headers,
      signal: opts.signal,
    });
    opts.onProgress?.({ loaded: file.size, total: file.size, fraction: 1 });
    return res;
  }

  /** `GET /storage/list`: the caller's files and folders directly under `path`. */
  list(opts: { bucket?: string; path?: string; signal?: AbortSignal } = {}): Promise<ListResult> {
    return request<ListResult>(this.ctx, 'GET', '/storage/list', {
      auth: true,
      query: { bucket: opts.bucket, path: opts.path },
      signal: opts.signal,
    });
  }

  /** `DELETE /storage/delete`: a file, or an empty folder. */
  delete(opts: { bucket?: string; path: string; signal?: AbortSignal }): Promise<{ success: boolean }> {
    const json: Record<string, string> = { path: opts.path };
    if (opts.bucket !== undefined) json.bucket = opts.bucket;
    return request<{ success: boolean }>(this.ctx, 'DELETE', '/storage/delete', { auth: true, json, signal: opts.signal });
  }

  /** Absolute URL of a file `url` as uploads and listings return it (path-absolute unless `PUBLIC_URL` is set). */
  publicUrl(url: string): string {
    return resolveUrl(this.ctx.baseUrl, url);
  }

  /** Reads a file with the client's token (private buckets cannot be read by a bare `<img src>`). */
  async download(url: string, signal?: AbortSignal): Promise<Blob> {
    const token = await this.ctx.tokens.fresh();
    const base = this.ctx.baseUrl;
    const target = resolveUrl(base, url);
    let res: Response;
    try {
      res = await this.ctx.fetch(target, {
        headers: token ? { authorization: `Bearer ${token}` } : {},
        signal,
      });
    } catch (e) {
      // A file on another origin (`PUBLIC_URL`) says nothing about the node.
      if ((e as { name?: string })?.name !== 'AbortError' && target.startsWith(base)) this.ctx.unreachable?.(base);
      throw new AetherError(`network error: ${(e as Error)?.message ?? e}`, 'network_error', 0, { cause: e });
    }
    if (!res.ok) throw AetherError.fromHttp(res.status, await readBody(res), res.headers.get('retry-after'));
    return res.blob();
  }
}

function uploadWithXhr(
  url: string,
  form: FormData,
  headers: Record<string, string>,
  size: number,
  opts: UploadOptions,
  unreachable: () => void,
): Promise<UploadResult> {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open('POST', url);
    for (const [k, v] of Object.entries(headers)) xhr.setRequestHeader(k, v);
    let lastTotal = size;
    xhr.upload.onprogress = (e: ProgressEvent) => {
      const total = e.lengthComputable && e.total > 0 ? e.total : size;
      lastTotal = total;
      opts.onProgress?.({ loaded: e.loaded, total, fraction: total > 0 ? Math.min(1, e.loaded / total) : 0 });
    };
    const onAbort = () => xhr.abort();
    opts.signal?.addEventListener('abort', onAbort, { once: true });
    const done = () => opts.signal?.removeEventListener('abort', onAbort);
    xhr.onload = () => {
      done();
      let body: unknown = null;
      try {
        body = xhr.responseText ? JSON.parse(xhr.responseText) : null;
      } catch {
        body = xhr.responseText;
      }
      if (xhr.status >= 200 && xhr.status < 300) {
        opts.onProgress?.({ loaded: lastTotal, total: lastTotal, fraction: 1 });
        resolve(body as UploadResult);
      } else {
        reject(AetherError.fromHttp(xhr.status, body, xhr.getResponseHeader('retry-after')));
      }
    };
    xhr.onerror = () => {
      done();
      unreachable();
      reject(new AetherError('network error during upload', 'network_error'));
    };
    xhr.onabort = () => {
      done();
      reject(new AetherError('upload aborted', 'aborted'));
    };
    if (opts.signal?.aborted) {
      xhr.abort();
      return;
    }
    xhr.send(form);
  });
}
