-- Broadcast from the database (issue 17): Supabase's `realtime.send` and
-- `realtime.broadcast_changes`. A call inserts a row into `realtime.messages`;
-- the row travels through the WAL and the change log like any change, and
-- Aether relays it to the topic's members on `/realtime/v1`. Rows are pruned
-- once the change log holds them, so the table stays small.
--
-- A database restored from Supabase has its own `realtime.messages`
-- (partitioned by day, partitions made by Supabase's Realtime server): it is
-- left alone, with a warning, and database broadcast is not set up there.
CREATE SCHEMA IF NOT EXISTS realtime;

DO $setup$
BEGIN
    IF to_regclass('realtime.messages') IS NOT NULL THEN
        RAISE WARNING 'aether: realtime.messages exists already; broadcast from the database is not set up (docs/supabase.md)';
        RETURN;
    END IF;

    CREATE TABLE realtime.messages (
        id          bigserial PRIMARY KEY,
        topic       text NOT NULL,
        extension   text NOT NULL DEFAULT 'broadcast',
        event       text,
        payload     jsonb,
        private     boolean NOT NULL DEFAULT false,
        inserted_at timestamptz NOT NULL DEFAULT now()
    );

    -- Supabase's signature: `private` defaults to true (a private channel).
    -- SECURITY DEFINER, so a trigger fired by any role's write (a `/rest/v1`
    -- insert as `authenticated`, say) can broadcast without rights on the table.
    CREATE FUNCTION realtime.send(payload jsonb, event text, topic text, private boolean DEFAULT true)
    RETURNS void
    LANGUAGE sql SECURITY DEFINER SET search_path = '' AS $f$
        INSERT INTO realtime.messages (topic, extension, event, payload, private)
        VALUES ($3, 'broadcast', $2, $1, $4);
    $f$;

    -- For a trigger: `PERFORM realtime.broadcast_changes('room:' || NEW.room_id,
    -- TG_OP, TG_OP, TG_TABLE_NAME, TG_TABLE_SCHEMA, NEW, OLD)`. As on Supabase,
    -- the message goes to a private channel.
    CREATE FUNCTION realtime.broadcast_changes(
        topic_name text, event_name text, operation text, table_name text, table_schema text,
        new record, old record, level text DEFAULT 'ROW'
    ) RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $f$
    DECLARE
        row_data jsonb;
    BEGIN
        IF level = 'STATEMENT' THEN
            row_data := jsonb_build_object('operation', operation, 'table', table_name,
                                           'schema', table_schema);
        ELSE
            row_data := jsonb_build_object(
                'record', CASE WHEN operation = 'DELETE' THEN NULL ELSE to_jsonb(new) END,
                'old_record', CASE WHEN operation = 'INSERT' THEN NULL ELSE to_jsonb(old) END,
                'operation', operation, 'table', table_name, 'schema', table_schema);
        END IF;
        PERFORM realtime.send(row_data, event_name, topic_name, true);
    END $f$;

    -- Who may broadcast from the database: the roles a write runs as
    -- (triggers), through these two functions only; `realtime` is never a
    -- `/rest/v1` schema. The roles exist only where 0009 could create them.
    REVOKE ALL ON SCHEMA realtime FROM PUBLIC;
    REVOKE ALL ON FUNCTION realtime.send(jsonb, text, text, boolean) FROM PUBLIC;
    REVOKE ALL ON FUNCTION
        realtime.broadcast_changes(text, text, text, text, text, record, record, text) FROM PUBLIC;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'service_role')
       AND EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'authenticated')
       AND EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'anon') THEN
        GRANT USAGE ON SCHEMA realtime TO anon, authenticated, service_role;
        GRANT EXECUTE ON FUNCTION realtime.send(jsonb, text, text, boolean)
            TO anon, authenticated, service_role;
        GRANT EXECUTE ON FUNCTION
            realtime.broadcast_changes(text, text, text, text, text, record, record, text)
            TO anon, authenticated, service_role;
    END IF;

    IF NOT EXISTS (SELECT 1 FROM pg_publication_tables
                    WHERE pubname = 'aether_realtime'
                      AND schemaname = 'realtime' AND tablename = 'messages') THEN
        ALTER PUBLICATION aether_realtime ADD TABLE realtime.messages;
    END IF;
END
$setup$;
