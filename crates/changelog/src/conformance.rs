//! What every [`ChangeLog`] backend must do, as functions the backends' tests call
//! on a fresh log (the local store's tests here; a distributed backend's next to it).

use std::sync::Arc;

use serde_json::json;

use super::{ChangeLog, LogError};
use aether_core::changes::{ChangeKind, Column, Relation, RowChange, TableId};
use aether_core::lsn::{PgLsn, Position};

fn relation(columns: usize) -> Arc<Relation> {
    Arc::new(Relation {
        id: TableId(7),
        schema: "public".into(),
        name: "conformance".into(),
        qualified: Arc::from("public.conformance"),
        replica_identity: b'f',
        columns: (0..columns)
            .map(|i| Column {
                name: format!("c{i}"),
                type_oid: 25,
                is_key: i == 0,
                secret: false,
            })
            .collect(),
    })
}

fn change(rel: &Arc<Relation>, lsn: u64, ord: u32) -> Arc<RowChange> {
    let row = (0..rel.columns.len())
        .map(|i| Some(json!(format!("{lsn}/{ord}/{i}"))))
        .collect();
    Arc::new(RowChange::new(
        Position::new(PgLsn(lsn), ord),
        ChangeKind::Insert,
        Arc::clone(rel),
        Some(row),
        None,
        lsn as i64,
    ))
}

/// Everything after `after`, page by page.
pub(crate) fn read_all(log: &dyn ChangeLog, after: Position, page: usize) -> Vec<Arc<RowChange>> {
    let mut out: Vec<Arc<RowChange>> = Vec::new();
    let mut hint = None;
    let mut at = after;
    loop {
        let p = log.read_after(at, page, usize::MAX, hint.as_ref()).unwrap();
        if let Some(last) = p.changes.last() {
            at = last.position;
        }
        out.extend(p.changes);
        hint = p.hint;
        if p.end {
            return out;
        }
    }
}

/// `log` is new and empty, its floor below LSN 100.
pub(crate) fn appends_read_back_in_order_with_their_values(log: &dyn ChangeLog) {
    let floor = log.bounds().floor;
    let rel = relation(3);
    let changes: Vec<_> = (1..=40)
        .flat_map(|i| (0..3).map(move |o| (100 * i, o)))
        .map(|(l, o)| change(&rel, l, o))
        .collect();
    for chunk in changes.chunks(7) {
        log.append(chunk).unwrap();
    }
    log.sync().unwrap();
    let b = log.bounds();
    assert_eq!(b.newest, Some(changes[119].position));
    assert_eq!(b.records, 120);
    for page in [1, 200, 1 << 20] {
        let back = read_all(log, floor, page);
        assert_eq!(back.len(), 120);
        for (a, b) in back.iter().zip(&changes) {
            assert_eq!(
                (a.position, &a.new, a.commit_time_ms),
                (b.position, &b.new, b.commit_time_ms)
            );
            assert_eq!(a.epoch, log.bounds().epoch);
            assert_eq!(a.relation.qualified, b.relation.qualified);
        }
    }
    let five = log.read_after(floor, usize::MAX, 5, None).unwrap();
    assert_eq!(five.changes.len(), 5);
    assert!(!five.end);
    let from = changes[57].position;
    let rest: Vec<_> = read_all(log, from, 300)
        .iter()
        .map(|c| c.position)
        .collect();
    assert_eq!(
        rest,
        changes[58..].iter().map(|c| c.position).collect::<Vec<_>>()
    );
    assert!(
        log.read_after(changes[119].position, 100, usize::MAX, None)
            .unwrap()
            .end
    );
}

/// `log` is new and empty, its floor below LSN 100.
pub(crate) fn appends_are_refused_out_of_order_and_old_positions_are_gaps(log: &dyn ChangeLog) {
    let rel = relation(1);
    log.append(&[change(&rel, 200, 0), change(&rel, 200, 1)])
        .unwrap();
    assert!(matches!(
        log.append(&[change(&rel, 200, 1)]),
        Err(LogError::OutOfOrder { .. })
    ));
    assert!(matches!(
        log.append(&[change(&rel, 150, 0)]),
        Err(LogError::OutOfOrder { .. })
    ));
    let below = Position::new(PgLsn(0), 0);
    if below < log.bounds().floor {
        assert!(matches!(
            log.read_after(below, 100, usize::MAX, None),
            Err(LogError::Gap { .. })
        ));
    }
}

/// `log` holds anything; after a reset it holds nothing, in a new epoch.
pub(crate) fn a_reset_starts_a_new_epoch_after_its_floor(log: &dyn ChangeLog) {
    let rel = relation(2);
    log.append(&[change(&rel, 1_000, 0)]).unwrap();
    let before = log.bounds().epoch;
    let floor = Position::new(PgLsn(5_000), u32::MAX);
    let epoch = log.reset(floor).unwrap();
    assert_ne!(epoch, before);
    let b = log.bounds();
    assert_eq!(
        (b.epoch, b.floor, b.newest, b.records),
        (epoch, floor, None, 0)
    );
    log.append(&[change(&rel, 6_000, 0)]).unwrap();
    let back = read_all(log, floor, 100);
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].epoch, epoch);
}
