-- Realtime authorized by RLS (issue 17): a table whose policies Aether cannot
-- compile is judged here, over the decoded row values (never by reading the
-- table again, which a later commit or the DELETE itself has changed), for
-- every candidate subscriber of one change in one call.
--
-- `expr` is the table's policies for the role, as `pg_policies` prints them
-- with `search_path = pg_catalog`; `alias` is the table's name, which the
-- policies use for its columns. Each viewer is judged as a SELECT by them
-- would be: as their role, with their claims, so `auth.uid()`, `auth.jwt()`
-- and the RLS of tables a policy reads answer as for them. One viewer's error
-- is theirs alone: 'e' and the message, in their place.
--
-- Returns, viewer by viewer and for each row in `rows`: 't', 'f' or 'e…'.
CREATE OR REPLACE FUNCTION aether.rls_visible(
    tbl regclass, alias text, expr text, rows text[], roles text[], claims text[]
) RETURNS text[]
LANGUAGE plpgsql SET search_path = pg_catalog AS $f$
DECLARE
    out text[] := '{}';
    q text := format('SELECT EXISTS (SELECT 1 FROM jsonb_populate_record(NULL::%s, $1) AS %I WHERE %s)',
                     tbl, alias, expr);
    seen boolean;
    v int;
    r int;
BEGIN
    FOR v IN 1 .. coalesce(array_length(claims, 1), 0) LOOP
        FOR r IN 1 .. coalesce(array_length(rows, 1), 0) LOOP
            BEGIN
                PERFORM set_config('request.jwt.claims', claims[v], true),
                        set_config('request.jwt.claim.sub', coalesce(claims[v]::jsonb ->> 'sub', ''), true),
                        set_config('request.jwt.claim.role', roles[v], true),
                        set_config('role', roles[v], true);
                EXECUTE q INTO seen USING rows[r]::jsonb;
                RESET ROLE;
                out := out || CASE WHEN seen THEN 't' ELSE 'f' END;
            EXCEPTION WHEN OTHERS THEN
                -- The subtransaction is undone, the role with it.
                out := out || ('e' || SQLERRM);
            END;
        END LOOP;
    END LOOP;
    RETURN out;
END
$f$;

REVOKE ALL ON FUNCTION aether.rls_visible(regclass, text, text, text[], text[], text[]) FROM PUBLIC;
