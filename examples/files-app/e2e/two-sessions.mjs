// End-to-end test of the files app in headless Chromium (Debian's, through
// playwright-core), driven by tests/browser_e2e.rs.
//
// Two browser sessions (separate contexts: separate storage, separate sockets)
// sign in as the same user and open the same folder. Session A uploads a file
// (with visible progress); B sees it appear. Then the Rust side renames the file
// with SQL, as a DBA would; both sessions must show the new name within a second.
// B deletes it; A sees it go. A's activity feed shows B's sign-in.
//
// JSON lines on stdout ({"event":"uploaded",…}, {"event":"result",…}); commands on
// stdin ({"cmd":"renamed","name":…}). A screenshot of each page is saved on failure.
//
// Env: APP_DIST (the built app), AETHER_URL, CHROMIUM (default /usr/bin/chromium),
// SCREENSHOT_DIR (default ./e2e-screenshots).

import { createServer } from 'node:http';
import { mkdir, readFile, stat } from 'node:fs/promises';
import { extname, join, normalize, resolve } from 'node:path';
import { createInterface } from 'node:readline';
import { chromium } from 'playwright-core';

const dist = resolve(process.env.APP_DIST ?? 'dist');
const chromiumPath = process.env.CHROMIUM ?? '/usr/bin/chromium';
const shots = resolve(process.env.SCREENSHOT_DIR ?? 'e2e-screenshots');
const out = (obj) => process.stdout.write(JSON.stringify(obj) + '\n');
const started = Date.now();
const step = (name) => out({ event: 'step', name, at_ms: Date.now() - started });

// ---- a tiny static server for the built app (SPA fallback to index.html)
const types = { '.html': 'text/html', '.js': 'text/javascript', '.css': 'text/css', '.map': 'application/json', '.svg': 'image/svg+xml' };
const server = createServer(async (req, res) => {
  const path = normalize(decodeURIComponent(new URL(req.url, 'http://x').pathname)).replace(/^(\.\.[/\\])+/, '');
  let file = join(dist, path);
  try {
    if (!(await stat(file)).isFile()) file = join(dist, 'index.html');
  } catch {
    file = join(dist, 'index.html');
  }
  try {
    const body = await readFile(file);
    res.writeHead(200, { 'content-type': types[extname(file)] ?? 'application/octet-stream' });
    res.end(body);
  } catch {
    res.writeHead(404).end();
  }
});
await new Promise((r) => server.listen(0, '127.0.0.1', r));
const appUrl = `http://127.0.0.1:${server.address().port}/?folder=docs`;

// ---- commands from the Rust side
const commands = [];
const waiting = [];
createInterface({ input: process.stdin }).on('line', (line) => {
  const cmd = JSON.parse(line);
  const w = waiting.findIndex((x) => x.cmd === cmd.cmd);
  if (w >= 0) waiting.splice(w, 1)[0].resolve(cmd);
  else commands.push(cmd);
});
function command(name, timeoutMs = 20_000) {
  const i = commands.findIndex((c) => c.cmd === name);
  if (i >= 0) return Promise.resolve(commands.splice(i, 1)[0]);
  return new Promise((resolve, reject) => {
    const entry = { cmd: name, resolve: (c) => { clearTimeout(t); resolve(c); } };
    const t = setTimeout(() => {
      waiting.splice(waiting.indexOf(entry), 1);
      reject(new Error(`no ${name} command within ${timeoutMs} ms`));
    }, timeoutMs);
    waiting.push(entry);
  });
}

const browser = await chromium.launch({
  executablePath: chromiumPath,
  headless: true,
  args: [
    '--headless',
    '--no-sandbox',
    '--disable-gpu',
    '--disable-quic',
    '--no-first-run',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
  ],
});
const pages = {};
const problems = [];

async function session(name) {
  // Each context is a fresh profile: its own storage, cookies and sockets.
  const context = await browser.newContext();
  const page = await context.newPage();
  page.setDefaultTimeout(10_000);
  page.on('pageerror', (e) => problems.push(`${name}: page error: ${e.message}`));
  page.on('console', (m) => {
    if (m.type() === 'error') problems.push(`${name}: console: ${m.text()}`);
  });
  pages[name] = page;
  await page.goto(appUrl);
  return page;
}

const fileItem = (page, name) => page.locator(`[data-testid=file-list] li[data-name="${name}"]`);

async function credentialsIn(page, email, password, button) {
  await page.getByTestId('email').fill(email);
  await page.getByTestId('password').fill(password);
  await page.getByTestId(button).click();
  await page.getByTestId('user-email').waitFor();
  await page.locator('[data-testid=conn-state][data-state=open]').waitFor();
  await page.getByTestId('folder-status').filter({ hasText: 'docs' }).waitFor();
}

try {
  const email = `e2e-${Date.now()}@example.com`;
  const password = 'browser-e2e-1';

  const a = await session('a');
  await credentialsIn(a, email, password, 'sign-up');
  step('a signed up');
  const b = await session('b');
  await credentialsIn(b, email, password, 'sign-in');
  step('b signed in');

  // A's activity feed (its auth subscription) hears of B's sign-in.
  await a.locator('[data-testid=activity] li[data-event=sign_in]').waitFor({ timeout: 5_000 });
  step('a saw b sign in');

  // Upload from A, throttled so that the progress bar has something to show.
  const cdp = await a.context().newCDPSession(a);
  await cdp.send('Network.enable');
  await cdp.send('Network.emulateNetworkConditions', { offline: false, latency: 0, downloadThroughput: -1, uploadThroughput: 1024 * 1024 });
  const size = 1024 * 1024 + 12345;
  await a.getByTestId('file-input').setInputFiles({ name: 'report.pdf', mimeType: 'application/pdf', buffer: Buffer.alloc(size, 7) });
  await fileItem(a, 'report.pdf').waitFor({ timeout: 15_000 });
  await cdp.send('Network.emulateNetworkConditions', { offline: false, latency: 0, downloadThroughput: -1, uploadThroughput: -1 });
  const progress = await a.evaluate(() => window.__uploadProgress);
  const bar = await a.getByTestId('upload-progress').evaluate((el) => el.value);
  if (bar !== 100 || progress.at(-1) !== 100) throw new Error(`upload progress did not end at 100: ${progress}`);
  if (!progress.some((p) => p > 0 && p < 100)) throw new Error(`no intermediate upload progress: ${progress}`);
  step('a uploaded');

  // B sees it appear, live.
  await fileItem(b, 'report.pdf').waitFor({ timeout: 5_000 });
  const fileId = await fileItem(b, 'report.pdf').getAttribute('data-file-id');
  step('b saw the upload');

  // A DBA renames it with SQL (the Rust side does): both see it within a second.
  out({ event: 'uploaded', file_id: fileId, name: 'report.pdf', progress });
  const renamed = await command('renamed');
  const t0 = Date.now();
  await Promise.all([
    fileItem(a, renamed.name).waitFor({ timeout: 1_000 }),
    fileItem(b, renamed.name).waitFor({ timeout: 1_000 }),
  ]);
  const renameMs = Date.now() - t0;
  for (const p of [a, b]) {
    if ((await fileItem(p, 'report.pdf').count()) !== 0) throw new Error('the old name is still shown');
  }
  step('both saw the rename');

  // B deletes it; A sees it go.
  await fileItem(b, renamed.name).getByTestId('delete').click();
  await fileItem(a, renamed.name).waitFor({ state: 'detached', timeout: 5_000 });
  await fileItem(b, renamed.name).waitFor({ state: 'detached', timeout: 5_000 });
  step('both saw the delete');

  if (problems.length) throw new Error(`errors in the pages:\n${problems.join('\n')}`);
  out({ event: 'result', ok: true, rename_ms: renameMs, progress, elapsed_ms: Date.now() - started });
  await browser.close();
  server.close();
  process.exit(0);
} catch (e) {
  await mkdir(shots, { recursive: true });
  const saved = [];
  for (const [name, page] of Object.entries(pages)) {
    const path = join(shots, `files-app-${name}.png`);
    try {
      await page.screenshot({ path, fullPage: true });
      saved.push(path);
    } catch {
      // The page may be gone.
    }
  }
  out({ event: 'result', ok: false, message: String(e?.stack ?? e), problems, screenshots: saved });
  await browser.close().catch(() => {});
  server.close();
  process.exit(1);
}
