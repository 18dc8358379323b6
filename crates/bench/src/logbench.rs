//! `aether-bench changelog`: the local change log on its own, in-process, for the
//! storage decision (docs/decisions.md): append throughput with an fsync per
//! batch (as the pump does), recovery time after a torn tail, read by position
//! (a `since` lookup), and sequential page reads (a client catching up).

use std::sync::Arc;
use std::time::{Duration, Instant};

use aether_changelog::ChangeLog;
use aether_changelog::local::{LogOptions, floor_for_slot, open_ready};
use aether_core::changes::{ChangeKind, Column, Relation, RowChange, TableId};
use aether_core::lsn::{PgLsn, Position};
use serde_json::json;

use crate::RunArgs;

/// A `public.files`-like row: uuids, text, numbers, timestamps.
fn relation() -> Arc<Relation> {
    let cols = [
        ("id", 2950),
        ("bucket_id", 25),
        ("owner_id", 2950),
        ("folder_id", 2950),
        ("path", 25),
        ("name", 25),
        ("size", 20),
        ("mime_type", 25),
        ("created_at", 1184),
        ("updated_at", 1184),
    ];
    Arc::new(Relation {
        id: TableId(16_384),
        schema: "public".into(),
        name: "files".into(),
        qualified: Arc::from("public.files"),
        replica_identity: b'f',
        columns: cols
            .iter()
            .map(|(n, t)| Column {
                name: (*n).into(),
                type_oid: *t,
                is_key: *n == "id",
                secret: false,
            })
            .collect(),
    })
}

fn change(rel: &Arc<Relation>, i: u64) -> Arc<RowChange> {
    let uuid = |k: u64| format!("{:08x}-0000-4000-8000-{:012x}", k, i);
    let row = vec![
        Some(json!(uuid(1))),
        Some(json!("files")),
        Some(json!(uuid(2))),
        Some(json!(uuid(3))),
        Some(json!(format!("docs/report-{i}.pdf"))),
        Some(json!(format!("report-{i}.pdf"))),
        Some(json!(i * 37)),
        Some(json!("application/pdf")),
        Some(json!("2026-11-26T10:34:56.789Z")),
        Some(json!("2026-11-26T10:34:56.789Z")),
    ];
    Arc::new(RowChange::new(
        Position::new(PgLsn(1_000 + i * 64), 0),
        ChangeKind::Insert,
        Arc::clone(rel),
        Some(row),
        None,
        1_795_305_099_749,
    ))
}

pub fn run(a: &RunArgs) -> anyhow::Result<()> {
    let n: u64 = if a.quick { 100_000 } else { 1_000_000 };
    let dir = tempfile_dir(&a.work_dir)?;
    let floor = floor_for_slot(PgLsn(1_000));
    let rel = relation();

    // Append: batches of 1,024 (the pump's batch), fsync after each.
    let (log, _) = open_ready(&dir, LogOptions::default(), floor)?;
    let t = Instant::now();
    let mut fsync = Duration::ZERO;
    let mut batch = Vec::with_capacity(1024);
    for i in 1..=n {
        batch.push(change(&rel, i));
        if batch.len() == 1024 || i == n {
            log.append(&batch)?;
            batch.clear();
            let s = Instant::now();
            log.sync()?;
            fsync += s.elapsed();
        }
    }
    let append = t.elapsed();
    let bounds = log.bounds();
    drop(log);

    // Recovery: reopen as after a SIGKILL, then with the last record torn.
    let t = Instant::now();
    let (log, _) = open_ready(&dir, LogOptions::default(), floor)?;
    let reopen = t.elapsed();
    drop(log);
    let last_seg = std::fs::read_dir(&dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .max()
        .ok_or_else(|| anyhow::anyhow!("no segment"))?;
    let len = std::fs::metadata(&last_seg)?.len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&last_seg)?
        .set_len(len - 7)?;
    let t = Instant::now();
    let (log, _) = open_ready(&dir, LogOptions::default(), floor)?;
    let torn = t.elapsed();
    let recovered_newest = log.bounds().newest;
    anyhow::ensure!(
        recovered_newest == Some(change(&rel, n - 1).position),
        "the torn record was not cut"
    );

    // Read by position: the first page after a random position (a `since`).
    let lookups = 200u64;
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let t = Instant::now();
    for _ in 0..lookups {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let i = 1 + x % (n - 2);
        let p = log.read_after(change(&rel, i).position, 64 << 10, usize::MAX, None)?;
        anyhow::ensure!(
            p.changes.first().map(|c| c.position) == Some(change(&rel, i + 1).position)
        );
    }
    let lookup = t.elapsed() / lookups as u32;

    // Sequential: everything, in 512 KiB pages with hints (a lagging client).
    let t = Instant::now();
    let mut at = floor;
    let mut hint = None;
    let mut read = 0u64;
    loop {
        let p = log.read_after(at, 512 << 10, usize::MAX, hint.as_ref())?;
        read += p.changes.len() as u64;
        if let Some(c) = p.changes.last() {
            at = c.position;
        }
        hint = p.hint;
        if p.end {
            break;
        }
    }
    let scan = t.elapsed();
    drop(log);
    if !a.keep {
        let _ = std::fs::remove_dir_all(&dir);
    }

    let per_s = |d: Duration, k: u64| k as f64 / d.as_secs_f64();
    let mib = bounds.bytes as f64 / (1 << 20) as f64;
    println!(
        "changelog ({n} files-like changes, {:.0} MiB on disk, {:.0} B per change)",
        mib,
        bounds.bytes as f64 / n as f64
    );
    println!(
        "  append + fsync per 1,024: {:>10.0} changes/s  {:>7.1} MiB/s  (fsync {:.1}% of the time, {} fsyncs, {:.2} ms each)",
        per_s(append, n),
        mib / append.as_secs_f64(),
        100.0 * fsync.as_secs_f64() / append.as_secs_f64(),
        n.div_ceil(1024),
        fsync.as_secs_f64() * 1000.0 / n.div_ceil(1024) as f64
    );
    println!(
        "  reopen (clean):           {:>10.1} ms",
        reopen.as_secs_f64() * 1000.0
    );
    println!(
        "  reopen (torn last record): {:>9.1} ms, torn record cut",
        torn.as_secs_f64() * 1000.0
    );
    println!(
        "  read by position (since): {:>10.2} ms per lookup ({lookups} random)",
        lookup.as_secs_f64() * 1000.0
    );
    println!(
        "  sequential pages:         {:>10.0} changes/s ({read} read)",
        per_s(scan, read)
    );
    let result = json!({
        "changelog": {
            "changes": n, "bytes": bounds.bytes, "bytes_per_change": bounds.bytes as f64 / n as f64,
            "append_changes_per_s": per_s(append, n), "fsync_share": fsync.as_secs_f64() / append.as_secs_f64(),
            "reopen_ms": reopen.as_secs_f64() * 1000.0, "reopen_torn_ms": torn.as_secs_f64() * 1000.0,
            "lookup_ms": lookup.as_secs_f64() * 1000.0, "sequential_changes_per_s": per_s(scan, read),
        }
    });
    println!("{result}");
    Ok(())
}

fn tempfile_dir(base: &std::path::Path) -> anyhow::Result<std::path::PathBuf> {
    let d = base.join(format!("aether-logbench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d)?;
    Ok(d)
}
