//! The log's record bodies: changes and relation descriptions, in a compact
//! binary form that decodes back to exactly the values that were logged.
//!
//! Every read is checked: a body that is short, has an unknown tag or a bad
//! length is a [`CodecError`], never a panic (a torn or corrupt record is found by
//! its CRC first, this is the second line).

use std::sync::Arc;

use serde_json::{Map, Number, Value};

use aether_core::changes::{
    ChangeKind, Column, Relation, Row, RowChange, TableId, is_secret_column,
};
use aether_core::lsn::{Epoch, PgLsn, Position};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("record body ends early")]
    Short,
    #[error("unknown tag {0} in a record body")]
    Tag(u8),
    #[error("text in a record body is not UTF-8")]
    Utf8,
    #[error("relation version {0} is not in the log")]
    UnknownRelation(u32),
    #[error("trailing bytes after a record body")]
    Trailing,
}

/// JSON nesting deeper than this is refused when decoding (PostgreSQL's own jsonb
/// limit is far lower in practice; this keeps recursion bounded).
const MAX_DEPTH: usize = 512;

mod tag {
    pub(super) const ABSENT: u8 = 0;
    pub(super) const NULL: u8 = 1;
    pub(super) const FALSE: u8 = 2;
    pub(super) const TRUE: u8 = 3;
    pub(super) const U64: u8 = 4;
    pub(super) const I64: u8 = 5;
    pub(super) const F64: u8 = 6;
    pub(super) const STRING: u8 = 7;
    pub(super) const ARRAY: u8 = 8;
    pub(super) const OBJECT: u8 = 9;
}

fn kind_byte(k: ChangeKind) -> u8 {
    match k {
        ChangeKind::Insert => 0,
        ChangeKind::Update => 1,
        ChangeKind::Delete => 2,
        ChangeKind::Truncate => 3,
    }
}

/// Offset of the position inside a change body: readers compare positions without
/// decoding the rest.
pub const POSITION_AT: usize = 1;

/// Appends the body of `change` (relation given by its logged version) to `out`.
pub fn encode_change(change: &RowChange, relation_version: u32, out: &mut Vec<u8>) {
    out.push(kind_byte(change.kind));
    out.extend_from_slice(&change.position.commit_lsn.0.to_le_bytes());
    out.extend_from_slice(&change.position.ordinal.to_le_bytes());
    out.extend_from_slice(&change.commit_time_ms.to_le_bytes());
    out.extend_from_slice(&relation_version.to_le_bytes());
    encode_row(change.new.as_deref(), out);
    encode_row(change.old.as_deref(), out);
}

/// The position of an encoded change body.
pub fn change_position(body: &[u8]) -> Result<Position, CodecError> {
    let mut r = Reader(body.get(POSITION_AT..).ok_or(CodecError::Short)?);
    Ok(Position::new(PgLsn(r.u64()?), r.u32()?))
}

fn encode_row(row: Option<&[Option<Value>]>, out: &mut Vec<u8>) {
    match row {
        None => out.push(0),
        Some(values) => {
            out.push(1);
            out.extend_from_slice(&(values.len() as u32).to_le_bytes());
            for v in values {
                match v {
                    None => out.push(tag::ABSENT),
                    Some(v) => encode_value(v, out),
                }
            }
        }
    }
}

fn encode_str(s: &str, out: &mut Vec<u8>) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn encode_value(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Null => out.push(tag::NULL),
        Value::Bool(false) => out.push(tag::FALSE),
        Value::Bool(true) => out.push(tag::TRUE),
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                out.push(tag::U64);
                out.extend_from_slice(&u.to_le_bytes());
            } else if let Some(i) = n.as_i64() {
                out.push(tag::I64);
                out.extend_from_slice(&i.to_le_bytes());
            } else {
                out.push(tag::F64);
                out.extend_from_slice(&n.as_f64().unwrap_or(0.0).to_bits().to_le_bytes());
            }
        }
        Value::String(s) => {
            out.push(tag::STRING);
            encode_str(s, out);
        }
        Value::Array(a) => {
            out.push(tag::ARRAY);
            out.extend_from_slice(&(a.len() as u32).to_le_bytes());
            for v in a {
                encode_value(v, out);
            }
        }
        Value::Object(o) => {
            out.push(tag::OBJECT);
            out.extend_from_slice(&(o.len() as u32).to_le_bytes());
            for (k, v) in o {
                encode_str(k, out);
                encode_value(v, out);
            }
        }
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], CodecError> {
        if self.0.len() < n {
            return Err(CodecError::Short);
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, CodecError> {
        Ok(self.take(1)?[0])
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], CodecError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u32(&mut self) -> Result<u32, CodecError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, CodecError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    fn i64(&mut self) -> Result<i64, CodecError> {
        Ok(i64::from_le_bytes(self.array()?))
    }
    /// A count of items that each take at least one byte: larger than what is
    /// left means corruption, and must not become a huge allocation.
    fn count(&mut self) -> Result<usize, CodecError> {
        let n = self.u32()? as usize;
        if n > self.0.len() {
            return Err(CodecError::Short);
        }
        Ok(n)
    }
    fn str(&mut self) -> Result<String, CodecError> {
        let n = self.u32()? as usize;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| CodecError::Utf8)
    }
    fn value(&mut self, depth: usize) -> Result<Value, CodecError> {
        if depth > MAX_DEPTH {
            return Err(CodecError::Tag(tag::ARRAY));
        }
        Ok(match self.u8()? {
            tag::NULL => Value::Null,
            tag::FALSE => Value::Bool(false),
            tag::TRUE => Value::Bool(true),
            tag::U64 => Value::Number(self.u64()?.into()),
            tag::I64 => Value::Number(self.i64()?.into()),
            tag::F64 => {
                let f = f64::from_bits(self.u64()?);
                Number::from_f64(f).map_or(Value::Null, Value::Number)
            }
            tag::STRING => Value::String(self.str()?),
            tag::ARRAY => {
                let n = self.count()?;
                let mut a = Vec::with_capacity(n);
                for _ in 0..n {
                    a.push(self.value(depth + 1)?);
                }
                Value::Array(a)
            }
            tag::OBJECT => {
                let n = self.count()?;
                let mut o = Map::new();
                for _ in 0..n {
                    let k = self.str()?;
                    o.insert(k, self.value(depth + 1)?);
                }
                Value::Object(o)
            }
            t => return Err(CodecError::Tag(t)),
        })
    }
    fn row(&mut self) -> Result<Option<Row>, CodecError> {
        match self.u8()? {
            0 => Ok(None),
            1 => {
                let n = self.count()?;
                let mut row = Vec::with_capacity(n);
                for _ in 0..n {
                    if self.0.first() == Some(&tag::ABSENT) {
                        self.take(1)?;
                        row.push(None);
                    } else {
                        row.push(Some(self.value(0)?));
                    }
                }
                Ok(Some(row))
            }
            t => Err(CodecError::Tag(t)),
        }
    }
}

/// Decodes a change body; `relation` resolves a logged relation version.
pub fn decode_change(
    body: &[u8],
    epoch: Epoch,
    relation: impl Fn(u32) -> Option<Arc<Relation>>,
) -> Result<RowChange, CodecError> {
    let mut r = Reader(body);
    let kind = match r.u8()? {
        0 => ChangeKind::Insert,
        1 => ChangeKind::Update,
        2 => ChangeKind::Delete,
        3 => ChangeKind::Truncate,
        t => return Err(CodecError::Tag(t)),
    };
    let position = Position::new(PgLsn(r.u64()?), r.u32()?);
    let commit_time_ms = r.i64()?;
    let version = r.u32()?;
    let rel = relation(version).ok_or(CodecError::UnknownRelation(version))?;
    let new = r.row()?;
    let old = r.row()?;
    if !r.0.is_empty() {
        return Err(CodecError::Trailing);
    }
    Ok(RowChange::new(position, kind, rel, new, old, commit_time_ms).in_epoch(epoch))
}

/// Appends the body of a relation description, logged once per version.
pub fn encode_relation(version: u32, rel: &Relation, out: &mut Vec<u8>) {
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&rel.id.0.to_le_bytes());
    out.push(rel.replica_identity);
    encode_str(&rel.schema, out);
    encode_str(&rel.name, out);
    out.extend_from_slice(&(rel.columns.len() as u32).to_le_bytes());
    for c in &rel.columns {
        encode_str(&c.name, out);
        out.extend_from_slice(&c.type_oid.to_le_bytes());
        out.push(u8::from(c.is_key));
    }
}

pub fn decode_relation(body: &[u8]) -> Result<(u32, Relation), CodecError> {
    let mut r = Reader(body);
    let version = r.u32()?;
    let id = TableId(r.u32()?);
    let replica_identity = r.u8()?;
    let schema = r.str()?;
    let name = r.str()?;
    let n = r.count()?;
    let mut columns = Vec::with_capacity(n);
    for _ in 0..n {
        let name = r.str()?;
        let type_oid = r.u32()?;
        let is_key = r.u8()? != 0;
        columns.push(Column {
            secret: is_secret_column(&name),
            name,
            type_oid,
            is_key,
        });
    }
    if !r.0.is_empty() {
        return Err(CodecError::Trailing);
    }
    Ok((
        version,
        Relation {
            id,
            qualified: Arc::from(format!("{schema}.{name}")),
            schema,
            name,
            replica_identity,
            columns,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn relation() -> Relation {
        Relation {
            id: TableId(42),
            schema: "public".into(),
            name: "files".into(),
            qualified: Arc::from("public.files"),
            replica_identity: b'f',
            columns: ["id", "name", "meta", "password_hash"]
                .iter()
                .map(|n| Column {
                    name: (*n).into(),
                    type_oid: 25,
                    is_key: *n == "id",
                    secret: is_secret_column(n),
                })
                .collect(),
        }
    }

    #[test]
    fn changes_and_relations_round_trip_exactly() {
        let rel = Arc::new(relation());
        let mut body = Vec::new();
        encode_relation(7, &rel, &mut body);
        let (v, back) = decode_relation(&body).unwrap();
        assert_eq!(v, 7);
        assert_eq!(back, *rel);

        let new = vec![
            Some(json!(u64::MAX)),
            Some(json!("naïve \u{0} \"quoted\"")),
            Some(json!({"a": [1, -2, 2.5, null, true, {"b": "c"}], "n": i64::MIN})),
            None,
        ];
        let old = vec![Some(json!(1)), Some(Value::Null), None, Some(json!(false))];
        let change = RowChange::new(
            Position::new(PgLsn(0xABCD_EF01_2345), 9),
            ChangeKind::Update,
            Arc::clone(&rel),
            Some(new.clone()),
            Some(old.clone()),
            1_795_305_099_749,
        );
        let mut body = Vec::new();
        encode_change(&change, 7, &mut body);
        assert_eq!(change_position(&body).unwrap(), change.position);
        let back = decode_change(&body, Epoch(5), |v| (v == 7).then(|| Arc::clone(&rel))).unwrap();
        assert_eq!(back.position, change.position);
        assert_eq!(back.kind, ChangeKind::Update);
        assert_eq!(back.new, Some(new));
        assert_eq!(back.old, Some(old));
        assert_eq!(back.commit_time_ms, change.commit_time_ms);
        assert_eq!(back.epoch, Epoch(5));
        assert_eq!(
            decode_change(&body, Epoch(5), |_| None).unwrap_err(),
            CodecError::UnknownRelation(7)
        );
    }

    #[test]
    fn every_truncation_of_a_body_is_an_error_not_a_panic() {
        let rel = Arc::new(relation());
        let change = RowChange::new(
            Position::new(PgLsn(1), 0),
            ChangeKind::Insert,
            Arc::clone(&rel),
            Some(vec![
                Some(json!({"k": [1, "x"]})),
                None,
                Some(json!(1.5)),
                None,
            ]),
            None,
            0,
        );
        let mut body = Vec::new();
        encode_change(&change, 1, &mut body);
        for n in 0..body.len() {
            assert!(decode_change(&body[..n], Epoch(1), |_| Some(Arc::clone(&rel))).is_err());
        }
        let mut corrupt = body.clone();
        // The `new` row's presence byte.
        corrupt[POSITION_AT + 24] = 0xFF;
        assert!(decode_change(&corrupt, Epoch(1), |_| Some(Arc::clone(&rel))).is_err());
    }
}
