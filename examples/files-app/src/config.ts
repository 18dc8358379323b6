// Settings from VITE_ variables (see .env.example), as in the seed document.

const env = import.meta.env;

function serverUrl(): string {
  // `?server=http://host:port` overrides the build-time value (handy for trying a build against another server).
  const fromQuery = new URLSearchParams(window.location.search).get('server');
  return (fromQuery || env.VITE_AETHER_URL || env.VITE_SUPABASE_URL || 'http://localhost:8080').trim();
}

export const config = {
  serverUrl: serverUrl(),
  anonKey: (env.VITE_AETHER_ANON_KEY || env.VITE_SUPABASE_ANON_KEY || '').trim() || null,
  maxFileSize: Number.parseInt(env.VITE_MAX_FILE_SIZE ?? '', 10) || 5 * 1024 * 1024,
  allowedTypes: (env.VITE_ALLOWED_FILE_TYPES ?? 'image/*,application/pdf,.doc,.docx')
    .split('#')[0]!
    .split(',')
    .map((t) => t.trim().toLowerCase())
    .filter(Boolean),
  bucket: (env.VITE_UPLOAD_BUCKET ?? '').split('#')[0]!.trim() || 'files',
};

/** Does the file match one of `image/*`, `application/pdf`, `.docx`, `*`? */
export function typeAllowed(file: { name: string; type: string }, allowed: string[]): boolean {
  const name = file.name.toLowerCase();
  const mime = (file.type || '').toLowerCase();
  return allowed.some((p) => {
    if (p === '*' || p === '*/*') return true;
    if (p.startsWith('.')) return name.endsWith(p);
    if (p.endsWith('/*')) return mime.startsWith(p.slice(0, -1));
    return mime === p;
  });
}

/** Why the file cannot be uploaded, or null. The server checks again. */
export function checkFile(file: File): string | null {
  if (file.size > config.maxFileSize) {
    return `${file.name} is ${formatSize(file.size)}; the limit is ${formatSize(config.maxFileSize)}`;
  }
  if (!typeAllowed(file, config.allowedTypes)) {
    return `${file.name}: type ${file.type || 'unknown'} is not allowed (${config.allowedTypes.join(', ')})`;
  }
  return null;
}

export function formatSize(n: number): string {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KB`;
  return `${(n / 1024 / 1024).toFixed(1)} MB`;
}
