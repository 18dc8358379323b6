-- Aether's own tables under RLS (issue 15): through /rest/v1 a user reads
-- exactly what a realtime subscription shows them (docs/realtime.md,
-- Authorization), never a secret column; writes stay with the routes that
-- keep bytes and rows consistent (/rest/v1 refuses them whatever the grants).
--
-- Storage access is these policies too, as on Supabase (there on
-- storage.objects): the storage routes run their reads and writes of
-- public.files as the caller's role, so a DBA widens or narrows what users
-- may do per bucket with policies of their own. The defaults below are
-- Aether's documented rules: read your own objects and any in a public
-- bucket; create objects of your own anywhere but in another user's folder
-- (`<user id>/…`); replace, move and delete your own. storage.foldername(),
-- storage.filename() and storage.extension() are Supabase's helpers, so its
-- policies port with `name` read as `path` and `owner` as `owner_id`.

-- In a block of their own: a database that already has a `storage` schema
-- with other owners' functions of these names (a Supabase-managed one) keeps
-- them, with a warning.
DO $$
BEGIN
    CREATE SCHEMA IF NOT EXISTS storage;

    CREATE OR REPLACE FUNCTION storage.foldername(name text) RETURNS text[]
        LANGUAGE sql IMMUTABLE
        AS $f$ SELECT (string_to_array(name, '/'))[1:greatest(cardinality(string_to_array(name, '/')) - 1, 0)] $f$;

    CREATE OR REPLACE FUNCTION storage.filename(name text) RETURNS text
        LANGUAGE sql IMMUTABLE
        AS $f$ SELECT (string_to_array(name, '/'))[cardinality(string_to_array(name, '/'))] $f$;

    CREATE OR REPLACE FUNCTION storage.extension(name text) RETURNS text
        LANGUAGE sql IMMUTABLE
        AS $f$ SELECT CASE WHEN storage.filename(name) LIKE '%.%'
                          THEN lower(regexp_replace(storage.filename(name), '^.*\.', '')) ELSE '' END $f$;

    -- The user whose folder `path` is, or is in (its first segment is a user
    -- id), if any.
    CREATE OR REPLACE FUNCTION storage.home(path text) RETURNS uuid
        LANGUAGE sql IMMUTABLE
        AS $f$ SELECT CASE WHEN path ~ '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}(/|$)'
                          THEN split_part(path, '/', 1)::uuid END $f$;
EXCEPTION WHEN insufficient_privilege OR duplicate_function OR invalid_function_definition THEN
    RAISE WARNING 'aether: storage helper functions not set up (%)', SQLERRM;
END
$$;

-- The JWT claims the storage routes give a policy for `who_role` and
-- `who_sub`: role, sub, aud and the user's email, as in their token.
CREATE OR REPLACE FUNCTION aether.storage_claims(who_role text, who_sub text)
    RETURNS text LANGUAGE sql STABLE
    AS $$
SELECT (jsonb_build_object('role', who_role)
        || coalesce((SELECT jsonb_build_object('sub', u.id, 'aud', 'authenticated', 'email', u.email)
                     FROM auth.users u WHERE u.id = nullif(who_sub, '')::uuid), '{}'))::text
$$;
REVOKE EXECUTE ON FUNCTION aether.storage_claims(text, text) FROM PUBLIC;

-- Whether `who_role` with `who_claims` may read file `id`, in one statement:
-- the storage routes' read check. The role and claims are taken for its own
-- query and put back as they were; only Aether calls it.
CREATE OR REPLACE FUNCTION aether.storage_may_read(id uuid, who_role text, who_claims text, who_sub text)
    RETURNS boolean LANGUAGE plpgsql VOLATILE
    AS $$
DECLARE
    seen boolean;
    was_role text := current_setting('role');
    was_claims text := current_setting('request.jwt.claims', true);
    was_sub text := current_setting('request.jwt.claim.sub', true);
    was_claim_role text := current_setting('request.jwt.claim.role', true);
BEGIN
    PERFORM set_config('request.jwt.claims', who_claims, true),
            set_config('request.jwt.claim.sub', who_sub, true),
            set_config('request.jwt.claim.role', who_role, true),
            set_config('role', who_role, true);
    SELECT EXISTS (SELECT 1 FROM public.files f WHERE f.id = storage_may_read.id) INTO seen;
    PERFORM set_config('role', was_role, true),
            set_config('request.jwt.claims', coalesce(was_claims, ''), true),
            set_config('request.jwt.claim.sub', coalesce(was_sub, ''), true),
            set_config('request.jwt.claim.role', coalesce(was_claim_role, ''), true);
    RETURN seen;
END
$$;
REVOKE EXECUTE ON FUNCTION aether.storage_may_read(uuid, text, text, text) FROM PUBLIC;

ALTER TABLE public.files       ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.folders     ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.buckets     ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.auth_events ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.shares      ENABLE ROW LEVEL SECURITY;

DO $$
BEGIN
    GRANT USAGE ON SCHEMA storage TO anon, authenticated, service_role;
    GRANT EXECUTE ON FUNCTION storage.foldername(text), storage.filename(text),
        storage.extension(text), storage.home(text) TO anon, authenticated, service_role;

    CREATE POLICY aether_read ON public.buckets FOR SELECT TO anon, authenticated
        USING (public OR owner_id = auth.uid());
    GRANT SELECT ON public.buckets TO anon, authenticated;

    CREATE POLICY aether_read ON public.files FOR SELECT TO anon, authenticated
        USING (owner_id = auth.uid()
               OR EXISTS (SELECT 1 FROM public.buckets b WHERE b.id = bucket_id AND b.public));
    CREATE POLICY aether_create ON public.files FOR INSERT TO authenticated
        WITH CHECK (owner_id = auth.uid()
                    AND coalesce(storage.home(path) = auth.uid(), true));
    CREATE POLICY aether_change ON public.files FOR UPDATE TO authenticated
        USING (owner_id = auth.uid())
        WITH CHECK (owner_id = auth.uid()
                    AND coalesce(storage.home(path) = auth.uid(), true));
    CREATE POLICY aether_remove ON public.files FOR DELETE TO authenticated
        USING (owner_id = auth.uid());
    -- storage_key too: it locates bytes in Aether's own blob store, which
    -- only Aether reads, and it versions an object (`info().version`).
    GRANT SELECT ON public.files TO anon, authenticated;
    GRANT INSERT, UPDATE, DELETE ON public.files TO authenticated;

    -- A folder is seen by its owner, in a public bucket, and by whoever may
    -- read a file in it (so a DBA's policy on files widens folders too).
    CREATE POLICY aether_read ON public.folders FOR SELECT TO anon, authenticated
        USING (owner_id = auth.uid()
               OR EXISTS (SELECT 1 FROM public.buckets b WHERE b.id = bucket_id AND b.public)
               OR EXISTS (SELECT 1 FROM public.files x
                          WHERE x.bucket_id = folders.bucket_id
                            AND starts_with(x.path, folders.path || '/')));
    GRANT SELECT ON public.folders TO anon, authenticated;

    CREATE POLICY aether_read ON public.auth_events FOR SELECT TO authenticated
        USING (user_id = auth.uid());
    GRANT SELECT (id, user_id, event_type, session_id, created_at)
        ON public.auth_events TO authenticated;
    -- shares: the service role only (their tokens are the secret).
EXCEPTION WHEN insufficient_privilege OR undefined_object OR undefined_function
          OR invalid_schema_name THEN
    RAISE WARNING 'aether: storage policies not set up (%); see docs/supabase.md', SQLERRM;
END
$$;
