-- Refresh tokens for the Supabase-compatible `/auth/v1/token?grant_type=refresh_token`.
-- Only a SHA-256 hash of each token is stored (`token_hash`, a secret column that
-- never leaves the server). Tokens rotate: using one revokes it and issues its
-- child; presenting a revoked one again is reuse, and signs its session out.
CREATE TABLE auth.refresh_tokens (
    id          bigserial PRIMARY KEY,
    token_hash  text NOT NULL UNIQUE,
    user_id     uuid NOT NULL REFERENCES auth.users (id) ON DELETE CASCADE,
    session_id  uuid NOT NULL REFERENCES auth.sessions (id) ON DELETE CASCADE,
    parent_id   bigint REFERENCES auth.refresh_tokens (id) ON DELETE SET NULL,
    revoked_at  timestamptz,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX refresh_tokens_session_idx ON auth.refresh_tokens (session_id);
