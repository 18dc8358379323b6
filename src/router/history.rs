//! Recently decoded changes, kept for `since` resumes, and the acknowledgement
//! position they allow.
//!
//! The slot's confirmed position trails the stream by this window: a transaction's
//! end LSN is released for confirmation only once all of its changes have left the
//! window. So after a crash or restart PostgreSQL re-sends the window, it is decoded
//! back into history, and a client can resume from any position inside it. A position
//! older than the window is answered with an explicit gap.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::changes::RowChange;
use crate::replication::lsn::{PgLsn, Position};

#[derive(Debug)]
struct TxMark {
    /// The last change of the transaction; `None` if it had none.
    last: Option<Position>,
    end_lsn: PgLsn,
}

#[derive(Debug, PartialEq, Eq)]
pub struct Gap {
    /// Changes at or before this position may be gone.
    pub floor: Position,
}

pub struct History {
    changes: VecDeque<(Instant, Arc<RowChange>)>,
    txs: VecDeque<TxMark>,
    /// Every change after `floor` is held.
    floor: Position,
    released: PgLsn,
    max_events: usize,
    max_age: Duration,
}

impl History {
    /// `confirmed` is the slot's confirmed position when streaming starts: every
    /// transaction that committed before it is gone for good.
    ///
    /// `floor` is the floor persisted before the last acknowledgement, when known:
    /// exact even when the slot was since confirmed forward on an idle stream.
    pub fn new(
        confirmed: PgLsn,
        floor: Option<Position>,
        max_events: usize,
        max_age: Duration,
    ) -> Self {
        History {
            changes: VecDeque::new(),
            txs: VecDeque::new(),
            // Changes of a transaction committed at `confirmed` itself would still be
            // re-sent, so without a persisted floor it is just below it.
            floor: floor.unwrap_or(Position::new(
                PgLsn(confirmed.0.saturating_sub(1)),
                u32::MAX,
            )),
            released: confirmed,
            max_events: max_events.max(1),
            max_age,
        }
    }

    pub fn push(&mut self, change: Arc<RowChange>, now: Instant) {
        self.changes.push_back((now, change));
        self.evict(now);
    }

    pub fn commit(&mut self, last: Option<Position>, end_lsn: PgLsn, now: Instant) {
        self.txs.push_back(TxMark { last, end_lsn });
        self.evict(now);
    }

    /// Drops what is over the size or age limit and releases transactions whose
    /// changes have all been dropped.
    pub fn evict(&mut self, now: Instant) {
        while let Some((at, c)) = self.changes.front() {
            let too_many = self.changes.len() > self.max_events;
            let too_old = now.duration_since(*at) > self.max_age;
            if !(too_many || too_old) {
                break;
            }
            self.floor = c.position;
            self.changes.pop_front();
        }
        while let Some(tx) = self.txs.front() {
            let gone = match tx.last {
                None => true,
                Some(last) => last <= self.floor,
            };
            if !gone {
                break;
            }
            self.released = self.released.max(tx.end_lsn);
            self.txs.pop_front();
        }
    }

    /// The end LSN PostgreSQL may forget up to.
    pub fn released(&self) -> PgLsn {
        self.released
    }

    /// No committed transaction is waiting to be released.
    pub fn all_released(&self) -> bool {
        self.txs.is_empty()
    }

    /// The changes after `since`, oldest first, or a gap if some may be missing.
    pub fn since(&self, since: Position) -> Result<impl Iterator<Item = &Arc<RowChange>>, Gap> {
        if since < self.floor {
            return Err(Gap { floor: self.floor });
        }
        let start = self.changes.partition_point(|(_, c)| c.position <= since);
        Ok(self.changes.range(start..).map(|(_, c)| c))
    }

    /// Every change after this position is held.
    pub fn floor(&self) -> Position {
        self.floor
    }

    /// The next change pushed evicts the oldest.
    pub fn is_full(&self) -> bool {
        self.changes.len() >= self.max_events
    }

    /// The oldest change held.
    pub fn front(&self) -> Option<Position> {
        self.changes.front().map(|(_, c)| c.position)
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
    use crate::changes::{ChangeKind, Relation, TableId};

    fn change(lsn: u64, ord: u32) -> Arc<RowChange> {
        let rel = Arc::new(Relation {
            id: TableId(1),
            schema: "public".into(),
            name: "t".into(),
            qualified: Arc::from("public.t"),
            replica_identity: b'f',
            columns: vec![],
        });
        Arc::new(RowChange::new(
            Position::new(PgLsn(lsn), ord),
            ChangeKind::Insert,
            rel,
            Some(vec![]),
            None,
            0,
        ))
    }

    #[test]
    fn release_trails_the_window_and_gaps_are_explicit() {
        let now = Instant::now();
        let mut h = History::new(PgLsn(100), None, 2, Duration::from_secs(60));
        assert!(h.since(Position::new(PgLsn(99), 0)).is_err());
        assert_eq!(h.since(Position::new(PgLsn(100), 0)).unwrap().count(), 0);
        h.push(change(100, 0), now);
        h.push(change(100, 1), now);
        h.commit(Some(Position::new(PgLsn(100), 1)), PgLsn(150), now);
        assert_eq!(h.released(), PgLsn(100));
        h.push(change(200, 0), now);
        // One change of tx 100 evicted: not yet releasable.
        assert_eq!(h.released(), PgLsn(100));
        h.commit(Some(Position::new(PgLsn(200), 0)), PgLsn(250), now);
        h.commit(None, PgLsn(260), now);
        h.push(change(300, 0), now);
        assert_eq!(h.released(), PgLsn(150));
        let ids: Vec<_> = h
            .since(Position::new(PgLsn(100), 1))
            .unwrap()
            .map(|c| c.position)
            .collect();
        assert_eq!(
            ids,
            vec![Position::new(PgLsn(200), 0), Position::new(PgLsn(300), 0)]
        );
        assert!(h.since(Position::new(PgLsn(100), 0)).is_err());
        // Age-based eviction releases the rest.
        h.evict(now + Duration::from_secs(61));
        assert_eq!(h.released(), PgLsn(260));
        assert!(h.all_released());
    }
}
