-- Plain SQL a DBA can run against Aether's database (psql "$DATABASE_URL" -f …).
-- Every statement below reaches the subscribers allowed to see the rows, live,
-- through the WAL: there is nothing to call besides PostgreSQL.

-- A public bucket: its files are visible to every subscriber, anonymous included.
INSERT INTO public.buckets (id, name, public) VALUES ('assets', 'assets', true)
    ON CONFLICT (id) DO NOTHING;

-- Rename a file: `files` subscribers of its folder get an UPDATE with old and new rows.
-- UPDATE public.files SET name = 'renamed.pdf' WHERE id = '…';

-- Publish another table for realtime (give it REPLICA IDENTITY FULL for complete
-- old rows). Rows of tables without owner_id / user_id columns reach service_role only.
-- CREATE TABLE public.notes (id bigserial PRIMARY KEY, owner_id uuid, body text);
-- ALTER TABLE public.notes REPLICA IDENTITY FULL;
-- ALTER PUBLICATION aether_realtime ADD TABLE public.notes;

-- How far behind is the slot (bytes of WAL kept for Aether)?
SELECT slot_name, active, confirmed_flush_lsn,
       pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn) AS lag_bytes
  FROM pg_replication_slots;
