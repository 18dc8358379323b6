//! Counters behind `/metrics/*` (JSON). The same events also go to the `metrics`
//! facade for the Prometheus exporter.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default)]
pub struct Stats {
    pub frames_in: AtomicU64,
    pub frames_out: AtomicU64,
    pub changes_delivered: AtomicU64,
    /// Of those, written by the router's direct writers, not the connection's task.
    pub changes_direct: AtomicU64,
    errors: Mutex<HashMap<String, u64>>,
}

impl Stats {
    pub fn error(&self, code: &str) {
        metrics::counter!("aether_errors_total", "code" => code.to_owned()).increment(1);
        let mut g = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        *g.entry(code.to_owned()).or_insert(0) += 1;
    }

    pub fn errors(&self) -> HashMap<String, u64> {
        self.errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn frame_in(&self) {
        self.frames_in.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("aether_ws_frames_in_total").increment(1);
    }

    pub fn frames_out(&self, n: u64, changes: u64) {
        self.frames_out.fetch_add(n, Ordering::Relaxed);
        self.changes_delivered.fetch_add(changes, Ordering::Relaxed);
        metrics::counter!("aether_ws_frames_out_total").increment(n);
        if changes > 0 {
            metrics::counter!("aether_events_delivered_total").increment(changes);
        }
    }
}
