-- /rest/v1's schema cache (issue 15) is told of DDL: an event trigger sends
-- NOTIFY aether_schema after every DDL command (CREATE/ALTER/DROP, GRANT and
-- REVOKE included), and Aether reloads the cache before the next request.
-- Event triggers need a superuser; without one this is skipped with a
-- warning and the cache reloads on a miss, at most once a second.
CREATE OR REPLACE FUNCTION aether.schema_changed() RETURNS event_trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- Temporary objects (an app's per-transaction temp tables) are no one's
    -- API: they do not make every request reload the cache.
    IF EXISTS (SELECT 1 FROM pg_event_trigger_ddl_commands() c
                WHERE c.schema_name IS NULL OR c.schema_name NOT LIKE 'pg\_temp%') THEN
        NOTIFY aether_schema;
    END IF;
END
$$;

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = 'aether_schema_changed') THEN
        CREATE EVENT TRIGGER aether_schema_changed ON ddl_command_end
            EXECUTE FUNCTION aether.schema_changed();
    END IF;
EXCEPTION WHEN insufficient_privilege THEN
    RAISE WARNING 'aether: no event trigger for schema changes (%); /rest/v1 reloads its schema cache on a miss', SQLERRM;
END
$$;
