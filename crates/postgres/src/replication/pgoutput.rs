//! Decoder for the `pgoutput` logical replication protocol, version 1.
//!
//! Every read is checked: a short or malformed message is a [`DecodeError`], never a
//! panic, and a tag this decoder does not know is an error too (being conservative is
//! better than silently skipping a change). Values are kept as slices of the
//! received buffer, so decoding copies no row data.

use bytes::Bytes;

use aether_core::changes::TableId;
use aether_core::lsn::PgLsn;

/// Microseconds between the Unix epoch and PostgreSQL's epoch (2000-01-01).
pub const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("message truncated: needed {needed} more bytes for {what}")]
    Truncated { what: &'static str, needed: usize },
    #[error("unknown pgoutput message tag {0:#04x}")]
    UnknownTag(u8),
    #[error("unknown tuple value kind {0:#04x}")]
    UnknownValueKind(u8),
    #[error("unexpected byte {found:#04x} where {expected} was expected")]
    Unexpected { expected: &'static str, found: u8 },
    #[error("string is not NUL-terminated")]
    UnterminatedString,
    #[error("string is not valid UTF-8")]
    InvalidUtf8,
    #[error("negative length {0}")]
    NegativeLength(i32),
    #[error("{0} trailing bytes after message")]
    Trailing(usize),
}

#[derive(Debug, Clone, PartialEq)]
pub enum TupleValue {
    Null,
    /// An unchanged TOASTed value that the server did not resend.
    UnchangedToast,
    Text(Bytes),
    Binary(Bytes),
}

#[derive(Debug, Clone, PartialEq)]
pub struct RelationColumn {
    pub is_key: bool,
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RelationBody {
    pub id: TableId,
    pub namespace: String,
    pub name: String,
    pub replica_identity: u8,
    pub columns: Vec<RelationColumn>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum LogicalMessage {
    Begin {
        final_lsn: PgLsn,
        /// Microseconds since the PostgreSQL epoch.
        timestamp: i64,
        xid: u32,
    },
    Commit {
        flags: u8,
        commit_lsn: PgLsn,
        end_lsn: PgLsn,
        timestamp: i64,
    },
    Origin {
        commit_lsn: PgLsn,
        name: String,
    },
    Relation(RelationBody),
    Type {
        id: u32,
        namespace: String,
        name: String,
    },
    Insert {
        relation: TableId,
        new: Vec<TupleValue>,
    },
    Update {
        relation: TableId,
        /// The old row: the key columns (`K`) or, with REPLICA IDENTITY FULL, all of them (`O`).
        old: Option<Vec<TupleValue>>,
        new: Vec<TupleValue>,
    },
    Delete {
        relation: TableId,
        old: Vec<TupleValue>,
    },
    Truncate {
        options: u8,
        relations: Vec<TableId>,
    },
    /// A `pg_logical_emit_message` payload; carried through but not routed.
    Message {
        transactional: bool,
        lsn: PgLsn,
        prefix: String,
        content: Bytes,
    },
}

/// A bounds-checked cursor over one message.
struct Reader {
    buf: Bytes,
    pos: usize,
}

impl Reader {
    fn need(&self, n: usize, what: &'static str) -> Result<(), DecodeError> {
        let left = self.buf.len() - self.pos;
        if left < n {
            return Err(DecodeError::Truncated {
                what,
                needed: n - left,
            });
        }
        Ok(())
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        self.need(1, what)?;
        let v = self.buf[self.pos];
        self.pos += 1;
        Ok(v)
    }
    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DecodeError> {
        self.need(N, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(&self.buf[self.pos..self.pos + N]);
        self.pos += N;
        Ok(out)
    }
    fn i16(&mut self, what: &'static str) -> Result<i16, DecodeError> {
        Ok(i16::from_be_bytes(self.array(what)?))
    }
    fn i32(&mut self, what: &'static str) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.array(what)?))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }
    fn i64(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.array(what)?))
    }
    fn lsn(&mut self, what: &'static str) -> Result<PgLsn, DecodeError> {
        Ok(PgLsn(u64::from_be_bytes(self.array(what)?)))
    }
    fn bytes(&mut self, n: usize, what: &'static str) -> Result<Bytes, DecodeError> {
        self.need(n, what)?;
        let v = self.buf.slice(self.pos..self.pos + n);
        self.pos += n;
        Ok(v)
    }
    fn cstr(&mut self) -> Result<String, DecodeError> {
        let rest = &self.buf[self.pos..];
        let end = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or(DecodeError::UnterminatedString)?;
        let s = std::str::from_utf8(&rest[..end]).map_err(|_| DecodeError::InvalidUtf8)?;
        let s = s.to_owned();
        self.pos += end + 1;
        Ok(s)
    }
    fn len(&mut self, what: &'static str) -> Result<usize, DecodeError> {
        let n = self.i32(what)?;
        usize::try_from(n).map_err(|_| DecodeError::NegativeLength(n))
    }
    fn finish(self) -> Result<(), DecodeError> {
        match self.buf.len() - self.pos {
            0 => Ok(()),
            n => Err(DecodeError::Trailing(n)),
        }
    }

    fn tuple(&mut self) -> Result<Vec<TupleValue>, DecodeError> {
        let n = self.i16("tuple column count")?;
        let n = usize::try_from(n).map_err(|_| DecodeError::NegativeLength(i32::from(n)))?;
        // Each column takes at least one byte: cap the allocation by what is left.
        let mut values = Vec::with_capacity(n.min(self.buf.len() - self.pos));
        for _ in 0..n {
            let v = match self.u8("tuple value kind")? {
                b'n' => TupleValue::Null,
                b'u' => TupleValue::UnchangedToast,
                b't' => {
                    let len = self.len("text value length")?;
                    TupleValue::Text(self.bytes(len, "text value")?)
                }
                b'b' => {
                    let len = self.len("binary value length")?;
                    TupleValue::Binary(self.bytes(len, "binary value")?)
                }
                other => return Err(DecodeError::UnknownValueKind(other)),
            };
            values.push(v);
        }
        Ok(values)
    }

    fn relation_id(&mut self) -> Result<TableId, DecodeError> {
        Ok(TableId(self.u32("relation id")?))
    }

    fn expect(&mut self, expected_byte: u8, expected: &'static str) -> Result<(), DecodeError> {
        let found = self.u8(expected)?;
        if found != expected_byte {
            return Err(DecodeError::Unexpected { expected, found });
        }
        Ok(())
    }
}

/// Decodes one pgoutput message (the payload of an XLogData frame).
pub fn decode(buf: Bytes) -> Result<LogicalMessage, DecodeError> {
    let mut r = Reader { buf, pos: 0 };
    let msg = match r.u8("message tag")? {
        b'B' => LogicalMessage::Begin {
            final_lsn: r.lsn("begin final lsn")?,
            timestamp: r.i64("begin timestamp")?,
            xid: r.u32("begin xid")?,
        },
        b'C' => LogicalMessage::Commit {
            flags: r.u8("commit flags")?,
            commit_lsn: r.lsn("commit lsn")?,
            end_lsn: r.lsn("commit end lsn")?,
            timestamp: r.i64("commit timestamp")?,
        },
        b'O' => LogicalMessage::Origin {
            commit_lsn: r.lsn("origin lsn")?,
            name: r.cstr()?,
        },
        b'R' => {
            let id = r.relation_id()?;
            let namespace = r.cstr()?;
            let name = r.cstr()?;
            let replica_identity = r.u8("replica identity")?;
            let n = r.i16("relation column count")?;
            let n = usize::try_from(n).map_err(|_| DecodeError::NegativeLength(i32::from(n)))?;
            let mut columns = Vec::with_capacity(n.min(r.buf.len() - r.pos));
            for _ in 0..n {
                let flags = r.u8("column flags")?;
                let name = r.cstr()?;
                let type_oid = r.u32("column type")?;
                let type_modifier = r.i32("column type modifier")?;
                columns.push(RelationColumn {
                    is_key: flags & 1 == 1,
                    name,
                    type_oid,
                    type_modifier,
                });
            }
            LogicalMessage::Relation(RelationBody {
                id,
                namespace,
                name,
                replica_identity,
                columns,
            })
        }
        b'Y' => LogicalMessage::Type {
            id: r.u32("type id")?,
            namespace: r.cstr()?,
            name: r.cstr()?,
        },
        b'I' => {
            let relation = r.relation_id()?;
            r.expect(b'N', "'N' before the new tuple")?;
            LogicalMessage::Insert {
                relation,
                new: r.tuple()?,
            }
        }
        b'U' => {
            let relation = r.relation_id()?;
            let mut old = None;
            let mut kind = r.u8("update tuple kind")?;
            if kind == b'K' || kind == b'O' {
                old = Some(r.tuple()?);
                kind = r.u8("update new tuple kind")?;
            }
            if kind != b'N' {
                return Err(DecodeError::Unexpected {
                    expected: "'N' before the new tuple",
                    found: kind,
                });
            }
            LogicalMessage::Update {
                relation,
                old,
                new: r.tuple()?,
            }
        }
        b'D' => {
            let relation = r.relation_id()?;
            let kind = r.u8("delete tuple kind")?;
            if kind != b'K' && kind != b'O' {
                return Err(DecodeError::Unexpected {
                    expected: "'K' or 'O' before the old tuple",
                    found: kind,
                });
            }
            LogicalMessage::Delete {
                relation,
                old: r.tuple()?,
            }
        }
        b'T' => {
            let n = r.len("truncate relation count")?;
            let options = r.u8("truncate options")?;
            let mut relations = Vec::with_capacity(n.min(r.buf.len() - r.pos));
            for _ in 0..n {
                relations.push(r.relation_id()?);
            }
            LogicalMessage::Truncate { options, relations }
        }
        b'M' => {
            let flags = r.u8("message flags")?;
            let lsn = r.lsn("message lsn")?;
            let prefix = r.cstr()?;
            let len = r.len("message length")?;
            LogicalMessage::Message {
                transactional: flags & 1 == 1,
                lsn,
                prefix,
                content: r.bytes(len, "message content")?,
            }
        }
        other => return Err(DecodeError::UnknownTag(other)),
    };
    r.finish()?;
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tuple(vals: &[Option<&str>]) -> Vec<u8> {
        let mut b = (vals.len() as i16).to_be_bytes().to_vec();
        for v in vals {
            match v {
                None => b.push(b'n'),
                Some(s) => {
                    b.push(b't');
                    b.extend((s.len() as i32).to_be_bytes());
                    b.extend(s.as_bytes());
                }
            }
        }
        b
    }

    #[test]
    fn decodes_insert_update_delete() {
        let mut m = vec![b'I'];
        m.extend(16384u32.to_be_bytes());
        m.push(b'N');
        m.extend(tuple(&[Some("1"), None]));
        let msg = decode(Bytes::from(m)).unwrap();
        assert_eq!(
            msg,
            LogicalMessage::Insert {
                relation: TableId(16384),
                new: vec![TupleValue::Text(Bytes::from_static(b"1")), TupleValue::Null],
            }
        );

        let mut m = vec![b'U'];
        m.extend(7u32.to_be_bytes());
        m.push(b'O');
        m.extend(tuple(&[Some("a")]));
        m.push(b'N');
        m.extend([0, 1, b'u']);
        match decode(Bytes::from(m)).unwrap() {
            LogicalMessage::Update { old, new, .. } => {
                assert_eq!(old.unwrap().len(), 1);
                assert_eq!(new, vec![TupleValue::UnchangedToast]);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn decodes_begin_commit_relation_truncate_message() {
        let mut m = vec![b'B'];
        m.extend(0x10u64.to_be_bytes());
        m.extend(5i64.to_be_bytes());
        m.extend(9u32.to_be_bytes());
        assert!(matches!(
            decode(Bytes::from(m)).unwrap(),
            LogicalMessage::Begin { xid: 9, .. }
        ));

        let mut m = vec![b'R'];
        m.extend(1u32.to_be_bytes());
        m.extend(b"public\0files\0");
        m.push(b'f');
        m.extend(1i16.to_be_bytes());
        m.push(1);
        m.extend(b"id\0");
        m.extend(2950u32.to_be_bytes());
        m.extend((-1i32).to_be_bytes());
        match decode(Bytes::from(m)).unwrap() {
            LogicalMessage::Relation(r) => {
                assert_eq!(r.name, "files");
                assert!(r.columns[0].is_key);
                assert_eq!(r.columns[0].type_oid, 2950);
            }
            other => panic!("unexpected {other:?}"),
        }

        let mut m = vec![b'T'];
        m.extend(2i32.to_be_bytes());
        m.push(0);
        m.extend(1u32.to_be_bytes());
        m.extend(2u32.to_be_bytes());
        assert_eq!(
            decode(Bytes::from(m)).unwrap(),
            LogicalMessage::Truncate {
                options: 0,
                relations: vec![TableId(1), TableId(2)]
            }
        );

        let mut m = vec![b'M', 1];
        m.extend(3u64.to_be_bytes());
        m.extend(b"pfx\0");
        m.extend(2i32.to_be_bytes());
        m.extend(b"hi");
        assert!(matches!(
            decode(Bytes::from(m)).unwrap(),
            LogicalMessage::Message {
                transactional: true,
                ..
            }
        ));
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        assert!(matches!(
            decode(Bytes::from_static(b"Z")),
            Err(DecodeError::UnknownTag(b'Z'))
        ));
        assert!(decode(Bytes::new()).is_err());
        assert!(decode(Bytes::from_static(b"B\0\0")).is_err());
        // Negative value length.
        let mut m = vec![b'I', 0, 0, 0, 1, b'N', 0, 1, b't'];
        m.extend((-5i32).to_be_bytes());
        assert_eq!(decode(Bytes::from(m)), Err(DecodeError::NegativeLength(-5)));
        // Huge column count with no data behind it.
        let m = vec![b'I', 0, 0, 0, 1, b'N', 0x7f, 0xff];
        assert!(decode(Bytes::from(m)).is_err());
        // Trailing garbage.
        let mut m = vec![b'O'];
        m.extend(1u64.to_be_bytes());
        m.extend(b"x\0junk");
        assert_eq!(decode(Bytes::from(m)), Err(DecodeError::Trailing(4)));
    }

    /// Every prefix and every single-byte corruption of valid messages must decode
    /// to a value or an error, never panic.
    #[test]
    fn exhaustive_truncation_and_corruption_never_panics() {
        let mut samples: Vec<Vec<u8>> = Vec::new();
        let mut m = vec![b'U'];
        m.extend(7u32.to_be_bytes());
        m.push(b'O');
        m.extend(tuple(&[Some("abc"), None, Some("")]));
        m.push(b'N');
        m.extend(tuple(&[Some("xyz"), None, Some("q")]));
        samples.push(m);
        let mut m = vec![b'R'];
        m.extend(1u32.to_be_bytes());
        m.extend(b"s\0t\0f");
        m.extend(1i16.to_be_bytes());
        m.extend(b"\x01c\0\0\0\0\x17\xff\xff\xff\xff");
        samples.push(m);
        for s in samples {
            for cut in 0..s.len() {
                let _ = decode(Bytes::copy_from_slice(&s[..cut]));
            }
            for i in 0..s.len() {
                for b in [0u8, 1, 0x7f, 0x80, 0xff, b'n', b'u', b't', b'b'] {
                    let mut c = s.clone();
                    c[i] = b;
                    let _ = decode(Bytes::from(c));
                }
            }
        }
    }
}
