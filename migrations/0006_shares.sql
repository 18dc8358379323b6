-- KingShare shares: a random, unguessable token grants access to one file without
-- an account. Expiry is data (`expires_at`); a job marks passed shares
-- (`expired_at`), so expiry survives restarts and reaches owners through the WAL
-- as ShareExpired. Accesses are counted here, which yields ShareAccessed.
CREATE TABLE public.shares (
    id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    file_id          uuid NOT NULL REFERENCES public.files (id) ON DELETE CASCADE,
    owner_id         uuid NOT NULL REFERENCES auth.users (id) ON DELETE CASCADE,
    -- Optional: the user the file is shared with (presence is told between them).
    shared_with      uuid REFERENCES auth.users (id) ON DELETE CASCADE,
    token            text NOT NULL UNIQUE,
    -- The file's name when shared, for ShareAccessed without a lookup.
    filename         text NOT NULL,
    expires_at       timestamptz,
    expired_at       timestamptz,
    revoked_at       timestamptz,
    access_count     bigint NOT NULL DEFAULT 0,
    last_accessed_at timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX shares_owner_idx ON public.shares (owner_id);
CREATE INDEX shares_shared_with_idx ON public.shares (shared_with);
CREATE INDEX shares_pending_expiry_idx ON public.shares (expires_at)
    WHERE expired_at IS NULL AND revoked_at IS NULL AND expires_at IS NOT NULL;
ALTER TABLE public.shares REPLICA IDENTITY FULL;
ALTER PUBLICATION aether_realtime ADD TABLE public.shares;
