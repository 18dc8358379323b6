//! Named tasks: every task runs in a span carrying its name, so its logs say who
//! they are.

use tracing::Instrument as _;

/// Spawns a task inside a span carrying its name.
pub fn spawn_named<F>(name: &'static str, fut: F) -> tokio::task::JoinHandle<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    tokio::spawn(fut.instrument(tracing::info_span!("task", name)))
}
