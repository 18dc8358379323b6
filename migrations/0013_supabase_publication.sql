-- Supabase's publication (issue 17): Supabase migrations add the tables an app
-- wants in realtime with `ALTER PUBLICATION supabase_realtime ADD TABLE …`.
-- Aether adds its tables to its own `aether_realtime` (at start, and when a
-- subscription names a table it does not know), so they work unchanged.
-- Created empty; a database restored from Supabase has it already.
DO $setup$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'supabase_realtime') THEN
        CREATE PUBLICATION supabase_realtime;
    END IF;
END
$setup$;
