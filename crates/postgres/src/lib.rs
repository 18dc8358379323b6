//! Aether's PostgreSQL side: the replication client and pgoutput decoder
//! ([`replication`]), the assembly of decoded messages into row changes
//! ([`decode`]), and the database itself ([`store`]: embedded cluster, pool,
//! migrations).

pub mod decode;
pub mod replication;
pub mod store;

/// An ordinary (non-replication) connection, its driver on a named task.
pub async fn connect(
    pg: &tokio_postgres::Config,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, conn) = pg.connect(tokio_postgres::NoTls).await?;
    aether_core::task::spawn_named("pg-connection", async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "setup connection closed");
        }
    });
    Ok(client)
}
