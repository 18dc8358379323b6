//! Named tasks: every task runs in a span carrying its name, so its logs say who
//! they are.

use tracing::Instrument as _;

/// Lets the calling thread run on every CPU the process may use (the main
/// thread's set). A thread starts with its parent's CPU set, and the binary
/// pins each runtime worker to one CPU: a thread (or a child process) started
/// from a worker would otherwise be stuck on that worker's CPU. Called first
/// by every long-lived thread and by each new blocking thread.
pub fn unpin_current_thread() {
    use nix::sched::{sched_getaffinity, sched_setaffinity};
    use nix::unistd::{Pid, getpid};
    // The process id names the main thread, which is never pinned.
    if let Ok(all) = sched_getaffinity(getpid()) {
        let _ = sched_setaffinity(Pid::from_raw(0), &all);
    }
}

/// Spawns a task inside a span carrying its name.
pub fn spawn_named<F>(name: &'static str, fut: F) -> tokio::task::JoinHandle<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    tokio::spawn(fut.instrument(tracing::info_span!("task", name)))
}
