/// <reference types="vite/client" />

interface ImportMetaEnv {
  readonly VITE_AETHER_URL?: string;
  readonly VITE_SUPABASE_URL?: string;
  readonly VITE_AETHER_ANON_KEY?: string;
  readonly VITE_SUPABASE_ANON_KEY?: string;
  readonly VITE_MAX_FILE_SIZE?: string;
  readonly VITE_ALLOWED_FILE_TYPES?: string;
  readonly VITE_UPLOAD_BUCKET?: string;
}

interface ImportMeta {
  readonly env: ImportMetaEnv;
}
