//! The database: the embedded cluster, connections and migrations.

pub mod embedded;
pub mod migrate;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};

/// A connection pool for ordinary (non-replication) queries.
pub fn pool(
    config: &tokio_postgres::Config,
    size: usize,
) -> Result<Pool, deadpool_postgres::BuildError> {
    let manager = Manager::from_config(
        config.clone(),
        tokio_postgres::NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager).max_size(size).build()
}
