-- The resume floor lives in the change log (DATA_DIR/changelog/meta) now: the
-- acknowledgement path never writes to the database.
DROP TABLE IF EXISTS aether.replication_state;
