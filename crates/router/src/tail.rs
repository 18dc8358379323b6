//! The hot tail: the newest logged changes, in memory, bounded in bytes.
//!
//! Connections catching up near the head read from here with no i/o; anything
//! older is paged from the change log on disk. Evicting from the tail loses
//! nothing: the log still holds it.

use std::collections::VecDeque;
use std::sync::Arc;

use aether_core::lsn::Position;

use crate::routed::Routed;

pub struct Tail {
    /// With each change, its weight as counted when it came in (computed once:
    /// it walks every value).
    changes: VecDeque<(usize, Arc<Routed>)>,
    bytes: usize,
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
            max_bytes,
            floor,
        }
    }

    pub fn push(&mut self, change: Arc<Routed>) {
        let weight = change.approx_bytes();
        self.bytes += weight;
        self.changes.push_back((weight, change));
        while self.bytes > self.max_bytes && self.changes.len() > 1 {
            if let Some((weight, old)) = self.changes.pop_front() {
                self.bytes -= weight;
                self.floor = old.position;
            }
        }
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
        self.changes.clear();
        self.bytes = 0;
        self.floor = floor;
    }

    pub fn bytes(&self) -> usize {
        self.bytes
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
}
