//! Typed change events: what the log stores and the router routes.

pub mod value;

use std::sync::Arc;

use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::Value;

use crate::lsn::{Epoch, PgLsn, Position, StreamId};

/// A table's OID as sent in Relation messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableId(pub u32);

/// Columns whose values never leave the server, whatever the subscriber's role.
pub fn is_secret_column(name: &str) -> bool {
    matches!(
        name,
        "encrypted_password" | "password_hash" | "token_hash" | "refresh_token_hash"
    )
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    pub type_oid: u32,
    pub is_key: bool,
    pub secret: bool,
}

/// A table as last described by a Relation message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub id: TableId,
    pub schema: String,
    pub name: String,
    /// `schema.table`, the key subscriptions are indexed by.
    pub qualified: Arc<str>,
    pub replica_identity: u8,
    pub columns: Vec<Column>,
}

impl Relation {
    pub fn column_index(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name == name)
    }

    /// The value of column `name` in `row` (a row of this relation), if the
    /// relation has that column and the value is not SQL NULL.
    pub fn value<'r>(&self, row: &'r Row, name: &str) -> Option<&'r Value> {
        row.get(self.column_index(name)?)?.as_ref()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChangeKind {
    Insert,
    Update,
    Delete,
    Truncate,
}

impl ChangeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Insert => "INSERT",
            ChangeKind::Update => "UPDATE",
            ChangeKind::Delete => "DELETE",
            ChangeKind::Truncate => "TRUNCATE",
        }
    }
}

/// One row's values, aligned with the relation's columns. `None` is a value the
/// server did not send and no old row could supply (an unchanged TOAST value of a
/// table without REPLICA IDENTITY FULL): it is left out of the JSON, never shown as null.
pub type Row = Vec<Option<Value>>;

/// One committed change. Shared by every subscriber it goes to.
#[derive(Debug)]
pub struct RowChange {
    pub position: Position,
    pub kind: ChangeKind,
    pub relation: Arc<Relation>,
    pub new: Option<Row>,
    pub old: Option<Row>,
    /// Commit time, milliseconds since the Unix epoch.
    pub commit_time_ms: i64,
    /// The change log this change's position belongs to.
    pub epoch: Epoch,
}

impl RowChange {
    pub fn new(
        position: Position,
        kind: ChangeKind,
        relation: Arc<Relation>,
        new: Option<Row>,
        old: Option<Row>,
        commit_time_ms: i64,
    ) -> Self {
        RowChange {
            position,
            kind,
            relation,
            new,
            old,
            commit_time_ms,
            epoch: Epoch::default(),
        }
    }

    /// The same change, stamped with the epoch of the log it goes into.
    pub fn in_epoch(mut self, epoch: Epoch) -> Self {
        self.epoch = epoch;
        self
    }

    /// The id clients see and resume from.
    pub fn id(&self) -> StreamId {
        StreamId {
            position: self.position,
            epoch: self.epoch,
        }
    }

    /// A rough count of the heap bytes this change holds, with the frames the
    /// edge encodes from it, for byte-bounded caches.
    pub fn approx_bytes(&self) -> usize {
        let row = |r: &Option<Row>| {
            r.as_ref().map_or(0, |r| {
                r.iter()
                    .map(|v| 32 + v.as_ref().map_or(0, value_bytes))
                    .sum::<usize>()
            })
        };
        // The struct, its Arc, and one frame the edge keeps beside it (about
        // the JSON size of the rows); the router's tail counts further frames
        // as they are made.
        let values = row(&self.new) + row(&self.old);
        160 + values + values / 2
    }

    pub fn commit_lsn(&self) -> PgLsn {
        self.position.commit_lsn
    }

    /// The row a filter or policy should look at for this kind of change.
    pub fn visible_row(&self) -> Option<&Row> {
        match self.kind {
            ChangeKind::Insert | ChangeKind::Update => self.new.as_ref(),
            ChangeKind::Delete => self.old.as_ref(),
            ChangeKind::Truncate => None,
        }
    }
}

/// Heap bytes of a JSON value, roughly (what `serde_json::Value` allocates).
fn value_bytes(v: &Value) -> usize {
    match v {
        Value::Null | Value::Bool(_) | Value::Number(_) => 0,
        Value::String(s) => s.len(),
        Value::Array(a) => a.iter().map(|v| 32 + value_bytes(v)).sum(),
        Value::Object(o) => o.iter().map(|(k, v)| 64 + k.len() + value_bytes(v)).sum(),
    }
}

/// `public.t` with no columns: the relation unit tests route and log changes of.
#[cfg(any(test, feature = "testing"))]
pub fn test_relation() -> Arc<Relation> {
    Arc::new(Relation {
        id: TableId(1),
        schema: "public".into(),
        name: "t".into(),
        qualified: Arc::from("public.t"),
        replica_identity: b'f',
        columns: vec![],
    })
}

/// Serializes a row as an object in column order, without secret columns.
pub struct RowJson<'a> {
    pub relation: &'a Relation,
    pub values: &'a [Option<Value>],
}

impl Serialize for RowJson<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        for (col, value) in self.relation.columns.iter().zip(self.values) {
            if col.secret {
                continue;
            }
            if let Some(v) = value {
                map.serialize_entry(&col.name, v)?;
            }
        }
        map.end()
    }
}
