//! Broadcast replay from the change log: the private `realtime.messages` rows
//! of a topic since a time. The table itself is pruned as soon as the log holds
//! its rows, so the log is where they are, for as long as it retains changes.
//!
//! The log is ordered by position (commit order), and commit times follow it:
//! a binary search over positions finds where `since` begins (a few reads of
//! one change each), then pages are read forward, at most [`SCAN_BYTES`] of
//! changes in all: a replay reaching further back over a busy log stops there
//! and returns what it found.

use std::sync::Arc;

use aether_changelog::{ChangeLog, SharedLog};
use aether_core::changes::{ChangeKind, RowChange};
use aether_core::lsn::{PgLsn, Position};
use aether_realtime::{BoxFuture, BroadcastHistory, PastBroadcast};
use serde_json::Value;

/// How much of the log one replay may read.
const SCAN_BYTES: usize = 8 << 20;
/// Commit times follow the log's order only roughly (each is taken before
/// its commit record is written): the search starts this much earlier.
const CLOCK_SLACK_MS: i64 = 1_000;
const PAGE_BYTES: usize = 1 << 20;

pub(crate) struct LogHistory(pub SharedLog);

impl BroadcastHistory for LogHistory {
    fn since<'a>(
        &'a self,
        topic: &'a str,
        since_ms: i64,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<PastBroadcast>, String>> {
        let log = Arc::clone(&self.0);
        let topic = topic.to_owned();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || replay(&*log, &topic, since_ms, limit))
                .await
                .map_err(|e| e.to_string())?
        })
    }
}

/// The commit time of the first change after `after`, if any.
fn first_time(log: &dyn ChangeLog, after: Position) -> Result<Option<i64>, String> {
    let page = log
        .read_after(after, 4096, 1, None)
        .map_err(|e| e.to_string())?;
    Ok(page.changes.first().map(|c| c.commit_time_ms))
}

fn replay(
    log: &dyn ChangeLog,
    topic: &str,
    since_ms: i64,
    limit: usize,
) -> Result<Vec<PastBroadcast>, String> {
    let bounds = log.bounds();
    let Some(newest) = bounds.newest else {
        return Ok(Vec::new());
    };
    // The last position whose next change is older than `since` (or the floor).
    let (mut lo, mut hi) = (bounds.floor.commit_lsn.0, newest.commit_lsn.0);
    while hi > lo + 1 {
        let mid = lo + (hi - lo) / 2;
        match first_time(log, Position::new(PgLsn(mid), u32::MAX))? {
            Some(t) if t < since_ms.saturating_sub(CLOCK_SLACK_MS) => lo = mid,
            _ => hi = mid,
        }
    }
    let mut after = if lo == bounds.floor.commit_lsn.0 {
        bounds.floor
    } else {
        Position::new(PgLsn(lo), u32::MAX)
    };
    let mut out = Vec::new();
    let mut read = 0usize;
    let mut hint = None;
    while out.len() < limit && read < SCAN_BYTES {
        let page = log
            .read_after(after, PAGE_BYTES, 4096, hint.as_ref())
            .map_err(|e| e.to_string())?;
        let Some(last) = page.changes.last() else {
            break;
        };
        after = last.position;
        read += page.changes.iter().map(|c| c.approx_bytes()).sum::<usize>();
        for c in &page.changes {
            if c.commit_time_ms >= since_ms
                && let Some(b) = private_broadcast(c, topic)
            {
                out.push(b);
                if out.len() == limit {
                    break;
                }
            }
        }
        if page.end || after >= newest {
            break;
        }
        hint = page.hint;
    }
    Ok(out)
}

/// A private broadcast of `topic` (`realtime.send(…, private => true)`).
fn private_broadcast(c: &RowChange, topic: &str) -> Option<PastBroadcast> {
    let rel = &c.relation;
    if rel.schema != "realtime" || rel.name != "messages" || c.kind != ChangeKind::Insert {
        return None;
    }
    let row = c.new.as_ref()?;
    let text = |col| rel.value(row, col).and_then(Value::as_str);
    if text("topic") != Some(topic)
        || text("extension") != Some("broadcast")
        || text("event") == Some(super::channels::PROBE_EVENT)
        || rel.value(row, "private") != Some(&Value::Bool(true))
    {
        return None;
    }
    let id = match rel.value(row, "id")? {
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.clone(),
        _ => return None,
    };
    Some(PastBroadcast {
        id,
        event: text("event").unwrap_or_default().to_owned(),
        payload: match rel.value(row, "payload") {
            None | Some(Value::Null) => Value::Object(Default::default()),
            Some(v) => v.clone(),
        },
    })
}
