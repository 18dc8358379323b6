-- Session revocations travel through the WAL like every other change: the router
-- closes live WebSocket connections of a signed-out session at once, whether the
-- sign-out came from the API or from a DBA's UPDATE. A user may subscribe to their
-- own sessions (no secrets in this table).
ALTER TABLE auth.sessions REPLICA IDENTITY FULL;
ALTER PUBLICATION aether_realtime ADD TABLE auth.sessions;
