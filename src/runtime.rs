//! The async runtime: one worker thread per CPU, each kept on a CPU of its own
//! (`RUNTIME_PIN_WORKERS`).
//!
//! Why pin: a change to 10,000 subscribers is written by every worker at once,
//! and each write wakes a reader somewhere. Left to itself, the kernel let both
//! of the fan-out's writing workers wait on one CPU's run queue for tens of
//! milliseconds while the other CPU ran readers and went idle in between (it
//! does not pull a task to a CPU whose idle spells are short). Pinned, each
//! worker keeps its CPU and everything else moves around them (BENCHMARKS.md,
//! docs/decisions.md). Only the workers are pinned: blocking threads (password
//! hashing, file I/O) go wherever the kernel has room.

use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
use nix::unistd::Pid;
use tokio::runtime::{Builder, Runtime};

/// The multi-threaded runtime, its workers pinned one per CPU when `pin` is
/// set and the process may run on exactly as many CPUs as it has workers (a
/// CPU quota smaller than the CPU set, say, leaves them unpinned: any CPU may
/// be the free one).
pub fn build(pin: bool) -> std::io::Result<Runtime> {
    let mut builder = Builder::new_multi_thread();
    builder.enable_all();
    let workers = worker_count();
    builder.worker_threads(workers);
    if let Some(cpus) = if pin { pinning_cpus(workers) } else { None } {
        let next = Arc::new(AtomicUsize::new(0));
        // Only workers park (blocking threads wait their own way), and every
        // worker parks as soon as it has nothing to run: the first park pins.
        // (`block_in_place` would hand a worker's place to a new thread,
        // pinned in turn, and keep the old one pinned: Aether does not use it.)
        builder.on_thread_park(move || pin_once(&cpus, &next));
        // A blocking thread is started by whichever thread needs it, often a
        // pinned worker, and would keep that worker's one CPU.
        builder.on_thread_start(aether_core::task::unpin_current_thread);
    }
    builder.build()
}

/// As tokio counts them: `TOKIO_WORKER_THREADS`, else one per CPU.
fn worker_count() -> usize {
    std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// The CPUs to pin `workers` workers to, one each, if there are exactly that
/// many to run on and more than one.
fn pinning_cpus(workers: usize) -> Option<Arc<[usize]>> {
    let cpus = allowed_cpus()?;
    (cpus.len() == workers && workers > 1).then(|| cpus.into())
}

thread_local! {
    static PINNED: Cell<bool> = const { Cell::new(false) };
}

fn pin_once(cpus: &[usize], next: &AtomicUsize) {
    if PINNED.with(|p| p.replace(true)) {
        return;
    }
    let Some(&cpu) = cpus.get(next.fetch_add(1, Ordering::Relaxed) % cpus.len().max(1)) else {
        return;
    };
    if let Err(e) = pin_current_thread(cpu) {
        tracing::warn!(cpu, error = %e, "could not pin a runtime worker to its CPU; it runs unpinned");
    }
}

/// The CPUs this process may run on.
fn allowed_cpus() -> Option<Vec<usize>> {
    let set = sched_getaffinity(Pid::from_raw(0)).ok()?;
    Some(
        (0..CpuSet::count())
            .filter(|&cpu| set.is_set(cpu).unwrap_or(false))
            .collect(),
    )
}

/// Pid 0: the calling thread.
fn pin_current_thread(cpu: usize) -> nix::Result<()> {
    let mut set = CpuSet::new();
    set.set(cpu)?;
    sched_setaffinity(Pid::from_raw(0), &set)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeSet, HashMap};
    use std::time::{Duration, Instant};

    /// The CPUs the calling thread may run on.
    fn mine() -> Vec<usize> {
        allowed_cpus().expect("sched_getaffinity")
    }

    #[test]
    fn each_worker_runs_on_a_cpu_of_its_own_and_blocking_threads_anywhere() {
        let all = mine();
        let rt = build(true).expect("runtime");
        let workers = worker_count();
        let seen: HashMap<std::thread::ThreadId, Vec<usize>> = rt.block_on(async {
            let mut seen = HashMap::new();
            let deadline = Instant::now() + Duration::from_secs(10);
            // Every worker parks once it is idle, and pins then: wait until
            // tasks have run on every worker and each has its CPU.
            loop {
                let mut tasks = Vec::new();
                for _ in 0..8 * workers {
                    tasks.push(tokio::spawn(async {
                        tokio::task::yield_now().await;
                        (std::thread::current().id(), mine())
                    }));
                }
                for t in tasks {
                    let (id, cpus) = t.await.expect("task");
                    seen.insert(id, cpus);
                }
                let done = seen.len() >= workers && seen.values().all(|c| c.len() == 1);
                if done || all.len() != workers || workers < 2 || Instant::now() > deadline {
                    return seen;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        // Started from a worker, pinned by now: the new thread is not.
        let blocking = rt
            .block_on(rt.spawn(async {
                tokio::task::spawn_blocking(mine)
                    .await
                    .expect("blocking task")
            }))
            .expect("task");
        assert_eq!(blocking, all, "a blocking thread may run on any CPU");
        if all.len() == workers && workers > 1 {
            assert_eq!(seen.len(), workers, "tasks ran on every worker: {seen:?}");
            let pinned: BTreeSet<usize> = seen
                .values()
                .map(|c| {
                    assert_eq!(c.len(), 1, "a worker on one CPU: {seen:?}");
                    c[0]
                })
                .collect();
            assert_eq!(pinned.len(), workers, "each on its own: {seen:?}");
            assert!(pinned.iter().all(|c| all.contains(c)), "{seen:?}");
        } else {
            // One CPU, or fewer workers than CPUs: nothing is pinned.
            assert!(seen.values().all(|c| *c == all), "{seen:?}");
        }
    }

    #[test]
    fn unpinned_workers_run_anywhere() {
        let all = mine();
        let rt = build(false).expect("runtime");
        let cpus = rt.block_on(rt.spawn(async { mine() })).expect("task");
        assert_eq!(cpus, all);
    }
}
