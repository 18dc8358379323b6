-- Private channels (issue 17): Supabase's Realtime Authorization. A member may
-- join a private channel, send to it or track presence on it when the RLS
-- policies on `realtime.messages` allow it, asked as that member with
-- `realtime.topic()` the channel's topic (src/rules/channels.rs). As on
-- Supabase, RLS is on and there are no policies: no one may, until the DBA
-- writes them, for example:
--
--   CREATE POLICY "members read" ON realtime.messages FOR SELECT TO authenticated
--     USING (realtime.topic() = 'room:' || auth.uid());
--
-- A Supabase-restored `realtime.messages` has all this already: left alone.
CREATE SCHEMA IF NOT EXISTS realtime;

CREATE OR REPLACE FUNCTION realtime.topic() RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT nullif(current_setting('realtime.topic', true), '')::text
$$;

DO $setup$
BEGIN
    -- Ours is a plain table; Supabase's is partitioned and has its own setup.
    IF (SELECT c.relkind FROM pg_class c WHERE c.oid = to_regclass('realtime.messages')) = 'r'
       AND NOT EXISTS (SELECT 1 FROM pg_class c
                       WHERE c.oid = to_regclass('realtime.messages') AND c.relrowsecurity) THEN
        ALTER TABLE realtime.messages ENABLE ROW LEVEL SECURITY;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'service_role')
       AND EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'authenticated')
       AND EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'anon')
       AND to_regclass('realtime.messages') IS NOT NULL THEN
        GRANT USAGE ON SCHEMA realtime TO anon, authenticated, service_role;
        GRANT EXECUTE ON FUNCTION realtime.topic() TO anon, authenticated, service_role;
        -- What policies decide over; nothing passes without one.
        GRANT SELECT, INSERT ON realtime.messages TO anon, authenticated;
        GRANT ALL ON realtime.messages TO service_role;
        IF to_regclass('realtime.messages_id_seq') IS NOT NULL THEN
            GRANT USAGE ON SEQUENCE realtime.messages_id_seq TO anon, authenticated, service_role;
        END IF;
    END IF;
END
$setup$;
