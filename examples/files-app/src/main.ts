import {
  AetherError,
  createClient,
  tokenExpiresAt,
  type AuthEventRow,
  type FileObject,
  type FileRow,
  type SubscriptionHandlers,
  type Unsubscribe,
  type User,
} from '@aether/client';

import { checkFile, config, formatSize } from './config';
import './style.css';

// ---- session --------------------------------------------------------------

const SESSION_KEY = 'aether-files-app:session';
interface Saved {
  token: string;
  user: User;
}

function loadSession(): Saved | null {
  try {
    const saved = JSON.parse(localStorage.getItem(SESSION_KEY) ?? 'null') as Saved | null;
    const exp = tokenExpiresAt(saved?.token);
    return saved && (exp === null || exp > Date.now() + 10_000) ? saved : null;
  } catch {
    return null;
  }
}

// Aether has no refresh-token route: to renew before expiry this tab signs in
// again with the credentials typed into it (kept in memory only, never stored).
// After a reload there are none, and an expired session asks to sign in again.
let credentials: { email: string; password: string } | null = null;

const saved = loadSession();
const client = createClient(config.serverUrl, {
  token: saved?.token ?? config.anonKey,
  getToken: async (current) => {
    if (!credentials) return current;
    const other = createClient(config.serverUrl, { realtime: { watchNetwork: false } });
    try {
      return (await other.auth.signIn(credentials)).session.access_token;
    } finally {
      other.close();
    }
  },
});
(window as unknown as { aether: unknown }).aether = client; // for poking at it in devtools

let user: User | null = saved?.user ?? null;
client.onTokenChange((token) => {
  if (token && user) localStorage.setItem(SESSION_KEY, JSON.stringify({ token, user }));
  if (!token) localStorage.removeItem(SESSION_KEY);
});

// ---- tiny DOM helper ----------------------------------------------------

type Child = Node | string | null | undefined | false;
function h<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  attrs: Record<string, string | number | boolean | ((e: Event) => void) | undefined> = {},
  ...children: Child[]
): HTMLElementTagNameMap[K] {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === false) continue;
    if (typeof v === 'function') el.addEventListener(k.replace(/^on/, ''), v);
    else if (k in el && !k.startsWith('data') && k !== 'for') (el as unknown as Record<string, unknown>)[k] = v;
    else el.setAttribute(k, String(v));
  }
  for (const c of children) if (c !== null && c !== undefined && c !== false) el.append(c);
  return el;
}

const $ = <T extends HTMLElement>(id: string) => document.getElementById(id) as T;

// ---- state ----------------------------------------------------------------

interface FileView {
  id: string;
  name: string;
  path: string;
  size: number;
  mime_type: string | null;
  url: string;
}

let folderPath = new URLSearchParams(location.search).get('folder') ?? 'docs';
/** `undefined`: the folder does not exist (yet); `null`: the root. */
let folderId: string | null | undefined;
const files = new Map<string, FileView>();
const activity: Array<{ type: string; text: string }> = [];
let stopFolder: Unsubscribe[] = [];
let stopAuth: Unsubscribe | null = null;
const uploadProgress: number[] = [];
(window as unknown as { __uploadProgress: number[] }).__uploadProgress = uploadProgress;

// ---- views ----------------------------------------------------------------

function showError(err: unknown): void {
  const msg = err instanceof AetherError ? `${err.message} (${err.code})` : String((err as Error)?.message ?? err);
  const box = $('error');
  box.textContent = msg;
  box.hidden = false;
}

function clearError(): void {
  $('error').hidden = true;
}

function render(): void {
  const app = $('app');
  app.replaceChildren(
    h(
      'header',
      {},
      h('h1', {}, 'Aether files'),
      h('span', { id: 'conn', class: 'badge', 'data-testid': 'conn-state', 'data-state': client.realtime.state }, client.realtime.state),
      user
        ? h('span', { class: 'who' }, h('span', { 'data-testid': 'user-email' }, user.email), ' ', h('button', { onclick: signOut, 'data-testid': 'sign-out' }, 'Sign out'))
        : null,
    ),
    h('p', { id: 'error', class: 'error', role: 'alert', hidden: true }),
    user ? folderView() : authView(),
  );
}

function authView(): HTMLElement {
  const email = h('input', { type: 'email', name: 'email', placeholder: 'email', required: true, autocomplete: 'username', 'data-testid': 'email' });
  const password = h('input', { type: 'password', name: 'password', placeholder: 'password (8+ chars, a letter and a digit)', required: true, autocomplete: 'current-password', 'data-testid': 'password' });
  const submit = (kind: 'signUp' | 'signIn') => async (e: Event) => {
    e.preventDefault();
    clearError();
    const creds = { email: email.value, password: password.value };
    try {
      const res = await client.auth[kind](creds);
      credentials = creds;
      user = res.user;
      localStorage.setItem(SESSION_KEY, JSON.stringify({ token: res.session.access_token, user }));
      startSession();
    } catch (err) {
      showError(err);
    }
  };
  return h(
    'form',
    { class: 'auth', onsubmit: submit('signIn') },
    h('h2', {}, 'Sign in or sign up'),
    email,
    password,
    h('div', {}, h('button', { type: 'submit', 'data-testid': 'sign-in' }, 'Sign in'), ' ', h('button', { type: 'button', onclick: submit('signUp'), 'data-testid': 'sign-up' }, 'Sign up')),
  );
}

function folderView(): HTMLElement {
  const pathInput = h('input', { value: folderPath, placeholder: 'folder path (empty: root)', 'data-testid': 'folder-path' });
  const fileInput = h('input', {
    type: 'file',
    multiple: true,
    accept: config.allowedTypes.join(','),
    'data-testid': 'file-input',
    onchange: () => {
      void uploadAll([...(fileInput.files ?? [])]);
      fileInput.value = '';
    },
  });
  return h(
    'main',
    {},
    h(
      'section',
      { class: 'folder' },
      h(
        'form',
        {
          class: 'open',
          onsubmit: (e: Event) => {
            e.preventDefault();
            void openFolder(pathInput.value);
          },
        },
        h('label', {}, 'Folder ', pathInput),
        h('button', { type: 'submit', 'data-testid': 'open-folder' }, 'Open'),
        h('span', { id: 'folder-status', class: 'muted', 'data-testid': 'folder-status' }),
      ),
      h(
        'div',
        { class: 'upload' },
        h('label', { class: 'button' }, 'Upload files…', fileInput),
        h('progress', { id: 'progress', max: 100, value: 0, 'data-testid': 'upload-progress' }),
        h('span', { id: 'progress-text', 'data-testid': 'upload-percent' }),
        h('span', { class: 'muted' }, ` up to ${formatSize(config.maxFileSize)}: ${config.allowedTypes.join(', ')} → bucket ${config.bucket}`),
      ),
      h('ul', { id: 'files', class: 'files', 'data-testid': 'file-list' }),
    ),
    h('aside', {}, h('h2', {}, 'Activity'), h('ol', { id: 'activity', class: 'activity', 'data-testid': 'activity' })),
  );
}

function renderFiles(): void {
  const list = $('files');
  if (!list) return;
  const sorted = [...files.values()].sort((a, b) => a.name.localeCompare(b.name));
  list.replaceChildren(
    ...sorted.map((f) =>
      h(
        'li',
        { 'data-file-id': f.id, 'data-name': f.name },
        h('a', { href: '#', onclick: (e: Event) => { e.preventDefault(); void openFile(f); } }, f.name),
        h('span', { class: 'muted' }, ` ${formatSize(f.size)} ${f.mime_type ?? ''}`),
        h('button', { class: 'delete', 'data-testid': 'delete', onclick: () => void deleteFile(f) }, 'Delete'),
      ),
    ),
  );
  if (sorted.length === 0) list.append(h('li', { class: 'muted empty' }, folderId === undefined ? 'This folder does not exist yet: upload a file to create it.' : 'No files.'));
  const status = $('folder-status');
  if (status) status.textContent = `${folderPath || '/'} · ${sorted.length} file(s)${folderId === undefined ? ' · not created yet' : ''}`;
}

function renderActivity(): void {
  const list = $('activity');
  if (!list) return;
  list.replaceChildren(...activity.map((a) => h('li', { 'data-event': a.type }, a.text)));
}

// ---- folder: list + live changes -----------------------------------------

function fromObject(f: FileObject): FileView {
  return { id: f.id, name: f.name, path: f.path, size: f.size, mime_type: f.mime_type, url: f.url };
}

/** A row's path is its name in the bucket, `<owner id>/<path>`; the storage
 * routes take and give the part after the owner's folder. */
function ownPath(name: string): string {
  const home = `${user?.id ?? ''}/`;
  return name.startsWith(home) ? name.slice(home.length) : name;
}

function fromRow(row: FileRow): FileView {
  const url = `/storage/object/${[row.bucket_id, ...row.path.split('/')].map(encodeURIComponent).join('/')}`;
  return { id: row.id, name: row.name, path: ownPath(row.path), size: Number(row.size), mime_type: row.mime_type, url };
}

const fileHandlers: SubscriptionHandlers<FileRow> = {
  onInsert: (row) => {
    if (row.folder_id === (folderId ?? null) && row.bucket_id === config.bucket) files.set(row.id, fromRow(row));
    renderFiles();
  },
  // A rename (say, a DBA's UPDATE) keeps the id; a move out of the folder removes it.
  onUpdate: (row) => {
    if (row.folder_id === (folderId ?? null) && row.bucket_id === config.bucket) files.set(row.id, fromRow(row));
    else files.delete(row.id);
    renderFiles();
  },
  onDelete: (old) => {
    files.delete(old.id);
    renderFiles();
  },
  onSubscribed: (info) => {
    // After a reconnect that could not resume, changes may have been missed: reload.
    if (info.reconnected && !info.resumed) void loadFiles();
  },
  onError: (err) => {
    showError(err);
    if (err.code === 'gap') void loadFiles();
  },
};

function stopFolderSubscriptions(): void {
  for (const stop of stopFolder.splice(0)) stop();
}

async function loadFiles(): Promise<void> {
  if (folderId === undefined) return;
  try {
    const res = await client.storage.list({ bucket: config.bucket, path: folderPath });
    files.clear();
    for (const f of res.files) files.set(f.id, fromObject(f));
  } catch (err) {
    showError(err);
  }
  renderFiles();
}

/** Subscribes first, then lists: nothing falls between the two. */
async function adoptFolder(id: string | null, since?: string): Promise<void> {
  stopFolderSubscriptions();
  folderId = id;
  stopFolder.push(client.realtime.subscribeToFiles(id, fileHandlers, since ? { since } : {}));
  await loadFiles();
}

async function findFolderId(path: string): Promise<string | null | undefined> {
  if (path === '') return null;
  const parent = path.includes('/') ? path.slice(0, path.lastIndexOf('/')) : '';
  try {
    const res = await client.storage.list({ bucket: config.bucket, path: parent });
    return res.folders.find((f) => f.path === path)?.id;
  } catch (err) {
    if (err instanceof AetherError && err.code === 'storage/not-found') return undefined;
    throw err;
  }
}

async function openFolder(path: string): Promise<void> {
  clearError();
  folderPath = path.trim().replace(/^\/+|\/+$/g, '');
  stopFolderSubscriptions();
  files.clear();
  folderId = undefined;
  const url = new URL(location.href);
  url.searchParams.set('folder', folderPath);
  history.replaceState(null, '', url);
  if (!user) return;
  const owner = user.id;
  const wanted = folderPath;
  // Until the folder exists, watch for it: an upload here (from this tab, another
  // one, or SQL) creates it, with its first file in the same transaction, so the
  // file subscription resumes right after the folder's own change.
  const stopWatch = client.realtime.subscribe<Record<string, unknown>>(
    { table: 'folders', event: 'INSERT', filter: `owner_id=eq.${owner}` },
    {
      onInsert: (row, ev) => {
        if (folderId !== undefined || wanted !== folderPath) return;
        if (row.path === `${owner}/${wanted}` && row.bucket_id === config.bucket) void adoptFolder(String(row.id), ev.id);
      },
    },
  );
  stopFolder.push(stopWatch);
  try {
    const id = await findFolderId(wanted);
    if (wanted !== folderPath) return;
    if (id !== undefined && folderId === undefined) await adoptFolder(id);
  } catch (err) {
    showError(err);
  }
  renderFiles();
}

// ---- actions ---------------------------------------------------------------

async function uploadAll(list: File[]): Promise<void> {
  clearError();
  for (const file of list) {
    const problem = checkFile(file);
    if (problem) {
      showError(problem);
      continue;
    }
    const bar = $('progress') as HTMLProgressElement;
    const text = $('progress-text');
    uploadProgress.length = 0;
    bar.value = 0;
    try {
      const res = await client.storage.upload(file, {
        bucket: config.bucket,
        path: folderPath ? `${folderPath}/` : '',
        onProgress: (p) => {
          const pct = Math.round(p.fraction * 100);
          uploadProgress.push(pct);
          bar.value = pct;
          text.textContent = `${pct}%`;
        },
      });
      text.textContent = `${res.path} uploaded`;
      if (folderId === undefined) await adoptFolder(res.folder_id);
      else {
        files.set(res.id, { id: res.id, name: res.path.split('/').pop() ?? res.path, path: res.path, size: res.size, mime_type: res.mime_type, url: res.url });
        renderFiles();
      }
    } catch (err) {
      text.textContent = 'failed';
      showError(err);
    }
  }
}

async function deleteFile(f: FileView): Promise<void> {
  clearError();
  try {
    await client.storage.delete({ bucket: config.bucket, path: f.path });
    files.delete(f.id);
    renderFiles();
  } catch (err) {
    showError(err);
  }
}

async function openFile(f: FileView): Promise<void> {
  try {
    const blob = await client.storage.download(f.url);
    const url = URL.createObjectURL(blob);
    window.open(url, '_blank', 'noopener');
    setTimeout(() => URL.revokeObjectURL(url), 60_000);
  } catch (err) {
    showError(err);
  }
}

async function signOut(): Promise<void> {
  stopFolderSubscriptions();
  stopAuth?.();
  stopAuth = null;
  try {
    await client.auth.signOut();
  } catch {
    // Signed out locally anyway.
  }
  credentials = null;
  user = null;
  files.clear();
  activity.length = 0;
  localStorage.removeItem(SESSION_KEY);
  render();
}

function browserName(userAgent: string): string {
  for (const [token, name] of [['Edg/', 'Edge'], ['Firefox/', 'Firefox'], ['Chrome/', 'Chrome'], ['Safari/', 'Safari'], ['node', 'Node.js']]) {
    if (userAgent.includes(token!)) return name!;
  }
  return userAgent.slice(0, 24);
}

function startSession(): void {
  render();
  if (!user) return;
  stopAuth?.();
  stopAuth = client.realtime.subscribeToAuth(user.id, {
    onInsert: (row: AuthEventRow) => {
      const when = new Date(row.created_at).toLocaleTimeString();
      const agent = row.user_agent ? ` · ${browserName(row.user_agent)}` : '';
      activity.unshift({ type: row.event_type, text: `${when} · ${row.event_type.replace('_', ' ')}${row.ip ? ` from ${row.ip}` : ''}${agent}` });
      activity.length = Math.min(activity.length, 20);
      renderActivity();
    },
  });
  void openFolder(folderPath);
}

client.realtime.onStateChange((s) => {
  const badge = document.getElementById('conn');
  if (badge) {
    badge.textContent = s.state === 'reconnecting' && s.delayMs !== undefined ? `reconnecting (attempt ${s.attempt})` : s.state;
    badge.dataset.state = s.state;
  }
  if (s.state === 'closed' && s.error?.code.startsWith('auth/') && user) {
    showError(new AetherError('your session has ended: sign in again', s.error.code));
    void signOut();
  }
});

render();
if (user) startSession();
