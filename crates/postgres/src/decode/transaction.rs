//! Turns the pgoutput message stream into typed changes, checking transaction framing.

use std::sync::Arc;

use bytes::Bytes;
use serde_json::Value;

use super::RelationCache;
use crate::replication::pgoutput::{LogicalMessage, PG_EPOCH_OFFSET_US, TupleValue};
use aether_core::changes::value::text_to_json;
use aether_core::changes::{ChangeKind, Relation, Row, RowChange, TableId};
use aether_core::lsn::{Epoch, PgLsn, Position};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChangeError {
    #[error("Begin at {0} while a transaction is open")]
    NestedBegin(PgLsn),
    #[error("{0} outside a transaction")]
    OutsideTransaction(&'static str),
    #[error("Commit LSN {commit} does not match Begin's final LSN {begin}")]
    CommitMismatch { begin: PgLsn, commit: PgLsn },
    #[error("row for relation {0:?} before its Relation message")]
    UnknownRelation(TableId),
    #[error("row has {got} columns, relation {table} has {expected}")]
    ColumnCount {
        table: String,
        expected: usize,
        got: usize,
    },
    #[error("binary tuple values were not requested")]
    BinaryValue,
}

/// What the router acts on.
#[derive(Debug)]
pub enum Output {
    Begin {
        commit_lsn: PgLsn,
    },
    Change(Arc<RowChange>),
    Commit {
        commit_lsn: PgLsn,
        end_lsn: PgLsn,
        /// Milliseconds since the Unix epoch.
        commit_time_ms: i64,
    },
    Relation(Arc<Relation>),
}

#[derive(Debug)]
struct OpenTx {
    final_lsn: PgLsn,
    commit_time_ms: i64,
    next_ordinal: u32,
}

#[derive(Debug, Default)]
pub struct Assembler {
    relations: RelationCache,
    tx: Option<OpenTx>,
    /// Stamped on every change: the epoch of the log they go into.
    epoch: Epoch,
}

impl Assembler {
    pub fn new() -> Self {
        Self::default()
    }

    /// An assembler whose changes belong to the log of `epoch`.
    pub fn in_epoch(epoch: Epoch) -> Self {
        Assembler {
            epoch,
            ..Self::default()
        }
    }

    /// Forgets any half-received transaction: after a reconnect the server resends it whole.
    pub fn reset_transaction(&mut self) {
        self.tx = None;
    }

    pub fn in_transaction(&self) -> bool {
        self.tx.is_some()
    }

    pub fn push(&mut self, msg: LogicalMessage, out: &mut Vec<Output>) -> Result<(), ChangeError> {
        match msg {
            LogicalMessage::Begin {
                final_lsn,
                timestamp,
                ..
            } => {
                if self.tx.is_some() {
                    return Err(ChangeError::NestedBegin(final_lsn));
                }
                self.tx = Some(OpenTx {
                    final_lsn,
                    commit_time_ms: (timestamp.saturating_add(PG_EPOCH_OFFSET_US)) / 1000,
                    next_ordinal: 0,
                });
                out.push(Output::Begin {
                    commit_lsn: final_lsn,
                });
            }
            LogicalMessage::Commit {
                commit_lsn,
                end_lsn,
                ..
            } => {
                let tx = self
                    .tx
                    .take()
                    .ok_or(ChangeError::OutsideTransaction("Commit"))?;
                if tx.final_lsn != commit_lsn {
                    return Err(ChangeError::CommitMismatch {
                        begin: tx.final_lsn,
                        commit: commit_lsn,
                    });
                }
                out.push(Output::Commit {
                    commit_lsn,
                    end_lsn,
                    commit_time_ms: tx.commit_time_ms,
                });
            }
            LogicalMessage::Relation(body) => {
                let rel = self.relations.upsert(body);
                out.push(Output::Relation(rel));
            }
            LogicalMessage::Insert { relation, new } => {
                let rel = self.relation(relation)?;
                let new = convert(&rel, new, None)?;
                self.emit(ChangeKind::Insert, rel, Some(new), None, out)?;
            }
            LogicalMessage::Update { relation, old, new } => {
                let rel = self.relation(relation)?;
                let old = old
                    .map(|o| convert(&rel, o, None).map(|r| key_only(&rel, r)))
                    .transpose()?;
                let new = convert(&rel, new, old.as_ref())?;
                self.emit(ChangeKind::Update, rel, Some(new), old, out)?;
            }
            LogicalMessage::Delete { relation, old } => {
                let rel = self.relation(relation)?;
                let old = key_only(&rel, convert(&rel, old, None)?);
                self.emit(ChangeKind::Delete, rel, None, Some(old), out)?;
            }
            LogicalMessage::Truncate { relations, .. } => {
                for id in relations {
                    let rel = self.relation(id)?;
                    self.emit(ChangeKind::Truncate, rel, None, None, out)?;
                }
            }
            // Types are only announced for non-built-in types, which are sent as
            // text and shown as strings; origins and logical messages carry no rows.
            LogicalMessage::Type { .. }
            | LogicalMessage::Origin { .. }
            | LogicalMessage::Message { .. } => {}
        }
        Ok(())
    }

    fn relation(&self, id: TableId) -> Result<Arc<Relation>, ChangeError> {
        self.relations
            .get(id)
            .cloned()
            .ok_or(ChangeError::UnknownRelation(id))
    }

    fn emit(
        &mut self,
        kind: ChangeKind,
        relation: Arc<Relation>,
        new: Option<Row>,
        old: Option<Row>,
        out: &mut Vec<Output>,
    ) -> Result<(), ChangeError> {
        let tx = self
            .tx
            .as_mut()
            .ok_or(ChangeError::OutsideTransaction(kind.as_str()))?;
        let position = Position::new(tx.final_lsn, tx.next_ordinal);
        tx.next_ordinal = tx.next_ordinal.saturating_add(1);
        out.push(Output::Change(Arc::new(
            RowChange::new(position, kind, relation, new, old, tx.commit_time_ms)
                .in_epoch(self.epoch),
        )));
        Ok(())
    }
}

/// Converts a tuple to JSON values. Unchanged TOAST values come from `old` when it
/// has them (REPLICA IDENTITY FULL sends the old row detoasted).
fn convert(rel: &Relation, tuple: Vec<TupleValue>, old: Option<&Row>) -> Result<Row, ChangeError> {
    if tuple.len() != rel.columns.len() {
        return Err(ChangeError::ColumnCount {
            table: rel.qualified.to_string(),
            expected: rel.columns.len(),
            got: tuple.len(),
        });
    }
    tuple
        .into_iter()
        .zip(&rel.columns)
        .enumerate()
        .map(|(i, (v, col))| {
            Ok(match v {
                TupleValue::Null => Some(Value::Null),
                TupleValue::Text(b) => Some(text(col.type_oid, &b)),
                TupleValue::UnchangedToast => old.and_then(|o| o.get(i).cloned().flatten()),
                TupleValue::Binary(_) => return Err(ChangeError::BinaryValue),
            })
        })
        .collect()
}

/// Without `REPLICA IDENTITY FULL` an old tuple carries the key and NULL in
/// every other column: those were not sent, and are not NULL in the row, so
/// they become "not sent" (left out of the JSON, unknown to policies).
fn key_only(rel: &Relation, mut row: Row) -> Row {
    if rel.replica_identity != b'f' {
        for (v, col) in row.iter_mut().zip(&rel.columns) {
            if !col.is_key {
                *v = None;
            }
        }
    }
    row
}

fn text(type_oid: u32, b: &Bytes) -> Value {
    text_to_json(type_oid, b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::pgoutput::{RelationBody, RelationColumn};

    fn rel() -> LogicalMessage {
        LogicalMessage::Relation(RelationBody {
            id: TableId(1),
            namespace: "public".into(),
            name: "t".into(),
            replica_identity: b'f',
            columns: vec![
                RelationColumn {
                    is_key: true,
                    name: "id".into(),
                    type_oid: 23,
                    type_modifier: -1,
                },
                RelationColumn {
                    is_key: false,
                    name: "body".into(),
                    type_oid: 25,
                    type_modifier: -1,
                },
            ],
        })
    }

    fn t(s: &'static str) -> TupleValue {
        TupleValue::Text(Bytes::from_static(s.as_bytes()))
    }

    #[test]
    fn positions_are_commit_lsn_and_ordinal_and_toast_is_filled() {
        let mut a = Assembler::new();
        let mut out = Vec::new();
        a.push(rel(), &mut out).unwrap();
        a.push(
            LogicalMessage::Begin {
                final_lsn: PgLsn(100),
                timestamp: 0,
                xid: 1,
            },
            &mut out,
        )
        .unwrap();
        a.push(
            LogicalMessage::Insert {
                relation: TableId(1),
                new: vec![t("1"), t("big")],
            },
            &mut out,
        )
        .unwrap();
        a.push(
            LogicalMessage::Update {
                relation: TableId(1),
                old: Some(vec![t("1"), t("big")]),
                new: vec![t("2"), TupleValue::UnchangedToast],
            },
            &mut out,
        )
        .unwrap();
        a.push(
            LogicalMessage::Commit {
                flags: 0,
                commit_lsn: PgLsn(100),
                end_lsn: PgLsn(120),
                timestamp: 0,
            },
            &mut out,
        )
        .unwrap();
        let changes: Vec<_> = out
            .iter()
            .filter_map(|o| match o {
                Output::Change(c) => Some(c.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(changes[0].position, Position::new(PgLsn(100), 0));
        assert_eq!(changes[1].position, Position::new(PgLsn(100), 1));
        assert_eq!(
            changes[1].new.as_ref().unwrap()[1],
            Some(Value::String("big".into()))
        );
        assert_eq!(changes[0].commit_time_ms, PG_EPOCH_OFFSET_US / 1000);
        let new = aether_core::changes::RowJson {
            relation: &changes[1].relation,
            values: changes[1].new.as_deref().unwrap(),
        };
        assert_eq!(
            serde_json::to_string(&new).unwrap(),
            r#"{"id":2,"body":"big"}"#
        );
    }

    #[test]
    fn framing_errors() {
        let mut a = Assembler::new();
        let mut out = Vec::new();
        assert_eq!(
            a.push(
                LogicalMessage::Insert {
                    relation: TableId(9),
                    new: vec![]
                },
                &mut out
            ),
            Err(ChangeError::UnknownRelation(TableId(9)))
        );
        a.push(rel(), &mut out).unwrap();
        assert_eq!(
            a.push(
                LogicalMessage::Insert {
                    relation: TableId(1),
                    new: vec![t("1"), t("x")]
                },
                &mut out
            ),
            Err(ChangeError::OutsideTransaction("INSERT"))
        );
        let begin = LogicalMessage::Begin {
            final_lsn: PgLsn(5),
            timestamp: 0,
            xid: 1,
        };
        a.push(begin.clone(), &mut out).unwrap();
        assert_eq!(
            a.push(begin, &mut out),
            Err(ChangeError::NestedBegin(PgLsn(5)))
        );
        assert!(matches!(
            a.push(
                LogicalMessage::Insert {
                    relation: TableId(1),
                    new: vec![t("1")]
                },
                &mut out
            ),
            Err(ChangeError::ColumnCount { .. })
        ));
        assert!(matches!(
            a.push(
                LogicalMessage::Commit {
                    flags: 0,
                    commit_lsn: PgLsn(6),
                    end_lsn: PgLsn(7),
                    timestamp: 0
                },
                &mut out
            ),
            Err(ChangeError::CommitMismatch { .. })
        ));
    }
}
