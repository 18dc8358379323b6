-- The resume floor: every change after this position is still held by Aether or
-- will be decoded again by PostgreSQL. Written before each acknowledgement that
-- can move it, so `since` answers stay exact across restarts (no false gaps after
-- the slot was confirmed forward on an idle stream). Not published.
CREATE TABLE aether.replication_state (
    slot       text PRIMARY KEY,
    floor      text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
