-- Channel configuration for the Aether WebSocket API (`POST /ws/channels`).
-- Published, so a DBA's UPDATE here takes effect live, like any change.
CREATE TABLE aether.channels (
    name               text PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9:._-]{0,127}$'),
    max_connections    integer CHECK (max_connections > 0),
    message_rate_limit integer CHECK (message_rate_limit > 0),
    require_auth       boolean NOT NULL DEFAULT false,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now()
);
CREATE TRIGGER channels_touch BEFORE UPDATE ON aether.channels
    FOR EACH ROW EXECUTE FUNCTION public.aether_touch_updated_at();
ALTER TABLE aether.channels REPLICA IDENTITY FULL;
ALTER PUBLICATION aether_realtime ADD TABLE aether.channels;
