-- Aether's schema: users and their auth events, buckets, folders and files, and the
-- publication that feeds the realtime stream.
--
-- Tables that reach subscribers have REPLICA IDENTITY FULL, so UPDATE and DELETE
-- events carry the complete old row (and unchanged TOAST values can be filled in).

CREATE SCHEMA IF NOT EXISTS auth;

CREATE TABLE auth.users (
    id                 uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    email              text NOT NULL CHECK (email = lower(email) AND length(email) BETWEEN 3 AND 320),
    encrypted_password text,
    role               text NOT NULL DEFAULT 'authenticated',
    user_metadata      jsonb NOT NULL DEFAULT '{}'::jsonb,
    app_metadata       jsonb NOT NULL DEFAULT '{"provider":"email","providers":["email"]}'::jsonb,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    last_sign_in_at    timestamptz
);
CREATE UNIQUE INDEX users_email_key ON auth.users (email);

-- One row per sign-in. Tokens name their session (`sid`); a revoked session's
-- tokens are refused everywhere even before they expire.
CREATE TABLE auth.sessions (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id     uuid NOT NULL REFERENCES auth.users (id) ON DELETE CASCADE,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    revoked_at  timestamptz,
    user_agent  text,
    ip          text
);
CREATE INDEX sessions_user_idx ON auth.sessions (user_id);

-- What the realtime `auth` subscription delivers: no secrets in here.
CREATE TABLE public.auth_events (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id     uuid NOT NULL REFERENCES auth.users (id) ON DELETE CASCADE,
    event_type  text NOT NULL CHECK (event_type IN ('sign_up', 'sign_in', 'sign_out', 'token_refreshed', 'user_updated')),
    session_id  uuid,
    ip          text,
    user_agent  text,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX auth_events_user_idx ON public.auth_events (user_id, created_at);

CREATE TABLE public.buckets (
    id                 text PRIMARY KEY CHECK (id ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$'),
    name               text NOT NULL,
    owner_id           uuid REFERENCES auth.users (id) ON DELETE SET NULL,
    public             boolean NOT NULL DEFAULT false,
    file_size_limit    bigint,
    allowed_mime_types text[],
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now()
);

-- Paths are per owner: two users may both have `docs/a.pdf` in one bucket.
CREATE TABLE public.folders (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    bucket_id   text NOT NULL REFERENCES public.buckets (id) ON DELETE CASCADE,
    parent_id   uuid REFERENCES public.folders (id) ON DELETE CASCADE,
    path        text NOT NULL,
    name        text NOT NULL,
    owner_id    uuid REFERENCES auth.users (id) ON DELETE CASCADE,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE NULLS NOT DISTINCT (bucket_id, owner_id, path)
);
CREATE INDEX folders_parent_idx ON public.folders (parent_id);

CREATE TABLE public.files (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    bucket_id   text NOT NULL REFERENCES public.buckets (id) ON DELETE CASCADE,
    folder_id   uuid REFERENCES public.folders (id) ON DELETE SET NULL,
    path        text NOT NULL,
    name        text NOT NULL,
    size        bigint NOT NULL DEFAULT 0 CHECK (size >= 0),
    mime_type   text,
    owner_id    uuid REFERENCES auth.users (id) ON DELETE CASCADE,
    storage_key text,
    metadata    jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE NULLS NOT DISTINCT (bucket_id, owner_id, path)
);
CREATE INDEX files_folder_idx ON public.files (folder_id);
CREATE INDEX files_owner_idx ON public.files (owner_id);

CREATE FUNCTION public.aether_touch_updated_at() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END $$;

CREATE TRIGGER users_touch BEFORE UPDATE ON auth.users
    FOR EACH ROW EXECUTE FUNCTION public.aether_touch_updated_at();
CREATE TRIGGER buckets_touch BEFORE UPDATE ON public.buckets
    FOR EACH ROW EXECUTE FUNCTION public.aether_touch_updated_at();
CREATE TRIGGER folders_touch BEFORE UPDATE ON public.folders
    FOR EACH ROW EXECUTE FUNCTION public.aether_touch_updated_at();
CREATE TRIGGER files_touch BEFORE UPDATE ON public.files
    FOR EACH ROW EXECUTE FUNCTION public.aether_touch_updated_at();

ALTER TABLE auth.users         REPLICA IDENTITY FULL;
ALTER TABLE public.auth_events REPLICA IDENTITY FULL;
ALTER TABLE public.buckets     REPLICA IDENTITY FULL;
ALTER TABLE public.folders     REPLICA IDENTITY FULL;
ALTER TABLE public.files       REPLICA IDENTITY FULL;

-- The realtime stream. A DBA may add tables: `ALTER PUBLICATION aether_realtime ADD TABLE …`
-- (give them REPLICA IDENTITY FULL for complete old rows).
CREATE PUBLICATION aether_realtime FOR TABLE
    auth.users, public.auth_events, public.buckets, public.folders, public.files;
