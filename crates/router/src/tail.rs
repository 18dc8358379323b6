//! The hot tail: the newest logged changes, in memory, bounded in bytes.
//!
//! Connections catching up near the head read from here with no i/o; anything
//! older is paged from the change log on disk. Evicting from the tail loses
//! nothing: the log still holds it.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use aether_core::lsn::Position;

use crate::routed::Routed;

pub struct Tail {
    /// With each change, its weight as counted when it came in (computed once:
    /// it walks every value).
    changes: VecDeque<(usize, Arc<Routed>)>,
    bytes: usize,
    /// Bytes of frames made beyond the one each weight counts, added by the
    /// edge as it encodes (see [`Routed::counted`]).
    extra: Arc<AtomicUsize>,
    max_bytes: usize,
    /// Every change after this position (up to the newest routed) is held.
    floor: Position,
}

impl Tail {
    /// An empty tail: nothing after `floor` has been routed yet.
    pub fn new(floor: Position, max_bytes: usize) -> Self {
        Tail {
            changes: VecDeque::new(),
            bytes: 0,
            extra: Arc::default(),
            max_bytes,
            floor,
        }
    }

    /// The counter a change must carry ([`Routed::counted`]) for its extra
    /// frames to count against this tail's bytes.
    pub fn counter(&self) -> Arc<AtomicUsize> {
        Arc::clone(&self.extra)
    }

    pub fn push(&mut self, change: Arc<Routed>) {
        let weight = change.approx_bytes();
        self.bytes += weight;
        self.changes.push_back((weight, change));
        while self.bytes() > self.max_bytes && self.changes.len() > 1 {
            if let Some((weight, old)) = self.changes.pop_front() {
                self.bytes -= weight;
                self.uncount(&old);
                self.floor = old.position;
            }
        }
    }

    fn uncount(&self, old: &Routed) {
        let extra = old.evict();
        let _ = self
            .extra
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                Some(n.saturating_sub(extra))
            });
    }

    /// Whether every change after `after` is here.
    pub fn covers(&self, after: Position) -> bool {
        after >= self.floor
    }

    /// The changes after `after`, oldest first.
    pub fn after(&self, after: Position) -> impl Iterator<Item = &Arc<Routed>> {
        let start = self.changes.partition_point(|(_, c)| c.position <= after);
        self.changes.range(start..).map(|(_, c)| c)
    }

    /// Forgets everything (the log was reset).
    pub fn clear(&mut self, floor: Position) {
        for (_, old) in std::mem::take(&mut self.changes) {
            self.uncount(&old);
        }
        self.bytes = 0;
        self.floor = floor;
    }

    /// What the held changes weigh, with the extra frames made from them.
    pub fn bytes(&self) -> usize {
        self.bytes + self.extra.load(Ordering::Acquire)
    }

    pub fn len(&self) -> usize {
        self.changes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aether_core::changes::ChangeKind;
    use aether_core::lsn::PgLsn;

    fn change(lsn: u64) -> Arc<Routed> {
        let rel = aether_core::changes::test_relation();
        Arc::new(Routed::new(Arc::new(aether_core::changes::RowChange::new(
            Position::new(PgLsn(lsn), 0),
            ChangeKind::Insert,
            rel,
            Some(vec![Some(serde_json::json!("x".repeat(100)))]),
            None,
            0,
        ))))
    }

    #[test]
    fn the_tail_is_bounded_in_bytes_and_knows_what_it_covers() {
        let one = change(1).approx_bytes();
        let mut t = Tail::new(Position::new(PgLsn(0), 0), one * 3);
        for i in 1..=10 {
            t.push(change(i));
        }
        assert_eq!(t.len(), 3);
        assert!(t.bytes() <= one * 3);
        assert!(!t.covers(Position::new(PgLsn(6), 0)));
        assert!(t.covers(Position::new(PgLsn(7), 0)));
        let after: Vec<u64> = t
            .after(Position::new(PgLsn(8), 0))
            .map(|c| c.position.commit_lsn.0)
            .collect();
        assert_eq!(after, [9, 10]);
    }

    #[test]
    fn frames_beyond_the_first_count_against_the_tail_until_evicted() {
        use crate::routed::FrameSlot;
        let one = change(1).approx_bytes();
        let mut t = Tail::new(Position::new(PgLsn(0), 0), one * 3);
        let counted = |t: &Tail, lsn: u64| {
            Arc::new(Routed::counted(
                Arc::clone(change(lsn).change()),
                t.counter(),
            ))
        };
        for i in 1..=3 {
            t.push(counted(&t, i));
        }
        assert_eq!(t.len(), 3);
        // The first slot is in each weight; a second one is counted as made.
        let newest = t.after(Position::new(PgLsn(2), 0)).next().unwrap().clone();
        newest.frame(FrameSlot::new(0), |_| "x".repeat(10));
        assert_eq!(t.bytes(), 3 * one);
        newest.frame(FrameSlot::new(1), |_| "y".repeat(one));
        assert_eq!(t.bytes(), 4 * one);
        // Over the bound: the oldest goes, and the tail is within bytes again.
        t.push(counted(&t, 4));
        assert!(t.bytes() <= 3 * one, "{} > {}", t.bytes(), 3 * one);
        assert_eq!(t.len(), 2);
        // Evicting the change that carried the extra frame gives its bytes back.
        t.push(counted(&t, 5));
        t.push(counted(&t, 6));
        assert_eq!(t.bytes(), 3 * one);
        assert_eq!(t.len(), 3);
        // A frame made after eviction is not counted.
        newest.frame(FrameSlot::new(2), |_| "z".repeat(one));
        assert_eq!(t.bytes(), 3 * one);
        t.clear(Position::new(PgLsn(6), 0));
        assert_eq!(t.bytes(), 0);
    }
}
