//! Schema migrations: the SQL files under `migrations/`, compiled in, applied in
//! order, each once, recorded in `aether.schema_migrations`. An advisory lock keeps
//! two starting servers from applying the same file twice.

use tokio_postgres::Client;

// Append only: never edit a released file, add a new one.
include!(concat!(env!("OUT_DIR"), "/migrations.rs"));

const LOCK_KEY: i64 = 0x0ae7_4e12;

/// Applies what is missing; returns the versions applied now.
pub async fn migrate(client: &mut Client) -> Result<Vec<&'static str>, tokio_postgres::Error> {
    client
        .batch_execute(
            "CREATE SCHEMA IF NOT EXISTS aether;
             CREATE TABLE IF NOT EXISTS aether.schema_migrations (
                 version    text PRIMARY KEY,
                 applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .await?;
    client
        .execute("SELECT pg_advisory_lock($1)", &[&LOCK_KEY])
        .await?;
    let result = apply_missing(client).await;
    client
        .execute("SELECT pg_advisory_unlock($1)", &[&LOCK_KEY])
        .await?;
    result
}

async fn apply_missing(client: &mut Client) -> Result<Vec<&'static str>, tokio_postgres::Error> {
    let mut applied = Vec::new();
    for (version, sql) in MIGRATIONS {
        let done = client
            .query_opt(
                "SELECT 1 FROM aether.schema_migrations WHERE version = $1",
                &[version],
            )
            .await?
            .is_some();
        if done {
            continue;
        }
        let tx = client.transaction().await?;
        tx.batch_execute(sql).await?;
        tx.execute(
            "INSERT INTO aether.schema_migrations (version) VALUES ($1)",
            &[version],
        )
        .await?;
        tx.commit().await?;
        tracing::info!(version, "migration applied");
        applied.push(*version);
    }
    Ok(applied)
}

/// The tables Aether's migrations create and its own rules govern (not a
/// DBA's): schema-qualified, as `schema.table`.
pub fn is_own_table(qualified: &str) -> bool {
    matches!(
        qualified,
        "auth.users"
            | "auth.sessions"
            | "public.auth_events"
            | "public.buckets"
            | "public.folders"
            | "public.files"
            | "public.shares"
            | "aether.channels"
            | "realtime.messages"
    )
}
