// Adds lockfile entries for platform-specific optional packages that the npm
// registry this machine can reach does not carry (it only has the Linux builds
// of rollup's native binary). Without them `npm ci` refuses the lockfile as out
// of sync. Each entry names its os/cpu/libc, so npm skips it on other
// platforms, exactly as it does with a lockfile written against the full
// registry. Run after `npm install` changes the lockfile; a no-op when nothing
// is missing.
import { readFileSync, writeFileSync } from 'node:fs';

const file = new URL('../package-lock.json', import.meta.url);
const lock = JSON.parse(readFileSync(file, 'utf8'));
let added = 0;
for (const [path, pkg] of Object.entries(lock.packages)) {
  for (const [name, version] of Object.entries(pkg.optionalDependencies ?? {})) {
    const key = `node_modules/${name}`;
    if (lock.packages[key]) continue;
    // @rollup/rollup-<os>-<cpu>[-<abi>]
    const m = /^@[^/]+\/[a-z]+-([a-z0-9]+)-([a-z0-9]+)(?:-([a-z0-9]+))?$/.exec(name);
    if (!m) throw new Error(`${path}: cannot tell the platform of ${name}`);
    const [, os, cpu, abi] = m;
    const entry = { version, dev: pkg.dev || undefined, license: pkg.license, optional: true, os: [os], cpu: [cpu] };
    if (os === 'linux' && abi) entry.libc = [abi.startsWith('musl') ? 'musl' : 'glibc'];
    lock.packages[key] = entry;
    added++;
  }
}
lock.packages = Object.fromEntries(Object.entries(lock.packages).sort(([a], [b]) => (a === '' ? -1 : b === '' ? 1 : a.localeCompare(b))));
writeFileSync(file, JSON.stringify(lock, null, 2) + '\n');
console.log(`complete-lockfile: ${added} entr${added === 1 ? 'y' : 'ies'} added`);
