/** `user` of `POST /auth/sign-up|sign-in`. */
export interface User {
  id: string;
  email: string;
  created_at: string;
}

/** `session` of `POST /auth/sign-up|sign-in`; `expires_at` is seconds since the epoch. */
export interface Session {
  access_token: string;
  expires_at: number;
}

export interface AuthResponse {
  user: User;
  session: Session;
}

export interface Credentials {
  email: string;
  password: string;
}

/** Response of `POST /storage/upload`. */
export interface UploadResult {
  path: string;
  url: string;
  size: number;
  mime_type: string;
  created_at: string;
  id: string;
  bucket: string;
  /** What `subscribeToFiles` takes; `null` at the root. */
  folder_id: string | null;
}

export interface FileObject {
  name: string;
  path: string;
  size: number;
  mime_type: string | null;
  created_at: string;
  url: string;
  id: string;
}

export interface FolderObject {
  name: string;
  path: string;
  id: string;
}

export interface ListResult {
  files: FileObject[];
  folders: FolderObject[];
}

/** A row of `public.files` as change events carry it. */
export interface FileRow {
  id: string;
  bucket_id: string;
  folder_id: string | null;
  /** The object's name in its bucket: `<owner id>/<path>` for a file
   * uploaded through `/storage/upload`, whose answers give `<path>`. */
  path: string;
  name: string;
  size: number;
  mime_type: string | null;
  owner_id: string | null;
  metadata: Record<string, unknown>;
  created_at: string;
  updated_at: string;
  [column: string]: unknown;
}

/** A row of `public.auth_events`. */
export interface AuthEventRow {
  id: string;
  user_id: string;
  event_type: 'sign_up' | 'sign_in' | 'sign_out' | 'token_refreshed' | 'user_updated' | string;
  session_id: string | null;
  ip: string | null;
  user_agent: string | null;
  created_at: string;
  [column: string]: unknown;
}

export type Row = Record<string, unknown>;

export type EventType = 'INSERT' | 'UPDATE' | 'DELETE' | 'TRUNCATE';

/**
 * A change as the handlers receive it: the seed's event fields (`eventType`,
 * `table`, `schema`, `new`, `old`, `timestamp` = commit time in ms) plus the
 * position `id` and the `subscription` it was delivered for.
 */
export interface ChangeEvent<T extends Row = Row> {
  eventType: EventType;
  schema: string;
  table: string;
  new: T | null;
  old: T | null;
  timestamp: number;
  /** Position of the change: sortable as a string, usable as `since`. */
  id: string;
  subscription: string;
}
