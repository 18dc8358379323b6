import { fileURLToPath } from 'node:url';
import { defineConfig } from 'vite';

const client = fileURLToPath(new URL('../../clients/js/src/index.ts', import.meta.url));

// The client package is used from source: no separate build step, and edits to
// clients/js show up in `npm run dev` at once.
export default defineConfig({
  resolve: { alias: { '@aether/client': client } },
  server: { fs: { allow: ['.', '../../clients/js'] } },
  build: { target: 'es2022', sourcemap: true },
});
