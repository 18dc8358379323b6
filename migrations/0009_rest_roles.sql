-- /rest/v1 (issue 15): the roles a request runs as, PostgREST's model as Supabase
-- has it, and the functions RLS policies written for Supabase call.
--
-- Nothing is granted on tables to anon or authenticated: a DBA grants what the
-- API should expose. service_role bypasses RLS (as on Supabase) and may read
-- Aether's own public tables, never their secret columns; it writes them only
-- through the routes that keep bytes and rows consistent.

CREATE OR REPLACE FUNCTION auth.jwt() RETURNS jsonb
    LANGUAGE sql STABLE
    AS $$ SELECT coalesce(nullif(current_setting('request.jwt.claims', true), ''), '{}')::jsonb $$;

CREATE OR REPLACE FUNCTION auth.uid() RETURNS uuid
    LANGUAGE sql STABLE
    AS $$ SELECT nullif(coalesce(nullif(current_setting('request.jwt.claim.sub', true), ''),
                                 auth.jwt() ->> 'sub'), '')::uuid $$;

CREATE OR REPLACE FUNCTION auth.role() RETURNS text
    LANGUAGE sql STABLE
    AS $$ SELECT coalesce(nullif(current_setting('request.jwt.claim.role', true), ''),
                          auth.jwt() ->> 'role') $$;

-- Creating roles needs CREATEROLE, and BYPASSRLS a superuser (the embedded
-- cluster has both). Without them Aether still starts; /rest/v1 then answers
-- that the role does not exist, and docs/supabase.md says what to grant.
DO $$
DECLARE cols text;
BEGIN
    -- Roles belong to the cluster, not the database: another database of the
    -- same cluster may be creating them at this moment (the loser of that race
    -- sees a unique violation, not duplicate_object).
    BEGIN
        CREATE ROLE anon NOLOGIN NOINHERIT;
    EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
    END;
    BEGIN
        CREATE ROLE authenticated NOLOGIN NOINHERIT;
    EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
    END;
    BEGIN
        CREATE ROLE service_role NOLOGIN NOINHERIT BYPASSRLS;
    EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
    END;
    -- Aether's own database user acts as each of them (SET LOCAL ROLE); a
    -- superuser already may.
    IF NOT pg_has_role(current_user, 'service_role', 'MEMBER') THEN
        GRANT anon, authenticated, service_role TO CURRENT_USER;
    END IF;
    GRANT USAGE ON SCHEMA public TO anon, authenticated, service_role;
    GRANT USAGE ON SCHEMA auth TO anon, authenticated, service_role;
    GRANT EXECUTE ON FUNCTION auth.jwt(), auth.uid(), auth.role()
        TO anon, authenticated, service_role;
    -- Tables the same database user creates later: service_role may do
    -- anything (it is the server's own key), the others nothing until granted.
    ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON TABLES TO service_role;
    ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON SEQUENCES TO service_role;
    ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT EXECUTE ON FUNCTIONS TO service_role;
    -- Aether's own tables: read-only for service_role, secret columns left out.
    GRANT SELECT ON public.buckets, public.folders, public.files TO service_role;
    GRANT SELECT (id, user_id, event_type, session_id, created_at)
        ON public.auth_events TO service_role;
    SELECT string_agg(quote_ident(attname), ', ') INTO cols
      FROM pg_attribute
     WHERE attrelid = 'public.shares'::regclass AND attnum > 0 AND NOT attisdropped
       AND attname <> 'token';
    EXECUTE format('GRANT SELECT (%s) ON public.shares TO service_role', cols);
EXCEPTION WHEN insufficient_privilege THEN
    RAISE WARNING 'aether: /rest/v1 roles not set up (%); see docs/supabase.md', SQLERRM;
END
$$;
