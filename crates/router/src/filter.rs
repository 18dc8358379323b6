//! Row filters: `column=op.value`, joined by `&` (AND).
//!
//! Operators: `eq`, `neq`, `lt`, `lte`, `gt`, `gte`, `in.(a,b,c)`, `like`,
//! `ilike` (`%` any run, `_` one character, `*` as `%` as PostgREST allows),
//! `is.null`, `is.notnull`, `is.true`, `is.false`, and `not.` before any of
//! them (as in SQL, a NULL value matches neither `x` nor `not.x`, except
//! for `is`). Literals are converted with the column's type when the subscription
//! is made (a bad value is refused then, not silently never matched), using the same
//! conversion as the change stream, so equal values have equal index keys.

use std::borrow::Cow;
use std::cmp::Ordering;

use serde_json::Value;

use super::catalog::TableInfo;
use aether_core::changes::value::{oid, text_to_json};
use aether_core::changes::{Relation, Row};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FilterError {
    #[error("filter condition {0:?} is not of the form column=op.value")]
    Syntax(String),
    #[error("unknown column {column:?} in table {table}")]
    UnknownColumn { table: String, column: String },
    #[error(
        "unknown operator {0:?} (use eq, neq, lt, lte, gt, gte, in, like, ilike, is, and not. before any)"
    )]
    UnknownOperator(String),
    #[error("value {value:?} is not a valid {expected} for column {column:?}")]
    BadValue {
        column: String,
        value: String,
        expected: &'static str,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Eq,
    Neq,
    Lt,
    Lte,
    Gt,
    Gte,
    In,
    Like,
    ILike,
    IsNull,
    IsNotNull,
    IsTrue,
    IsFalse,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    pub column: String,
    pub type_oid: u32,
    pub op: Op,
    pub values: Vec<Value>,
    /// `not.`: the condition's opposite.
    pub negate: bool,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Filter {
    pub conditions: Vec<Condition>,
}

impl Filter {
    pub fn parse(text: &str, table: &TableInfo) -> Result<Self, FilterError> {
        let mut conditions = Vec::new();
        for part in text.split('&').filter(|p| !p.is_empty()) {
            let (column, rest) = part
                .split_once('=')
                .ok_or_else(|| FilterError::Syntax(part.to_owned()))?;
            let (negate, rest) = match rest.strip_prefix("not.") {
                Some(r) => (true, r),
                None => (false, rest),
            };
            let (op, literal) = rest
                .split_once('.')
                .ok_or_else(|| FilterError::Syntax(part.to_owned()))?;
            let col = table
                .column(column)
                .ok_or_else(|| FilterError::UnknownColumn {
                    table: table.qualified.to_string(),
                    column: column.to_owned(),
                })?;
            let op = match op {
                "eq" => Op::Eq,
                "neq" => Op::Neq,
                "lt" => Op::Lt,
                "lte" => Op::Lte,
                "gt" => Op::Gt,
                "gte" => Op::Gte,
                "in" => Op::In,
                // As in PostgreSQL, patterns match text columns only.
                "like" | "ilike" if !matches!(col.type_oid, 25 | 1043 | 1042 | 19) => {
                    return Err(FilterError::BadValue {
                        column: column.to_owned(),
                        value: literal.to_owned(),
                        expected: "pattern for a text column (like and ilike match text only)",
                    });
                }
                "like" => Op::Like,
                "ilike" => Op::ILike,
                "is" => match literal {
                    "null" => Op::IsNull,
                    "notnull" | "not_null" => Op::IsNotNull,
                    "true" if col.type_oid == oid::BOOL => Op::IsTrue,
                    "false" if col.type_oid == oid::BOOL => Op::IsFalse,
                    _ => {
                        return Err(FilterError::BadValue {
                            column: column.to_owned(),
                            value: literal.to_owned(),
                            expected: "null, notnull, or true or false for a boolean column",
                        });
                    }
                },
                other => return Err(FilterError::UnknownOperator(other.to_owned())),
            };
            let values = match op {
                Op::IsNull | Op::IsNotNull | Op::IsTrue | Op::IsFalse => Vec::new(),
                // A pattern is text whatever the column's type.
                Op::Like | Op::ILike => vec![Value::String(literal.replace('*', "%"))],
                Op::In => {
                    let inner = literal
                        .strip_prefix('(')
                        .and_then(|l| l.strip_suffix(')'))
                        .ok_or_else(|| FilterError::Syntax(part.to_owned()))?;
                    inner
                        .split(',')
                        .map(|v| typed_literal(column, col.type_oid, v.trim()))
                        .collect::<Result<_, _>>()?
                }
                _ => vec![typed_literal(column, col.type_oid, literal)?],
            };
            conditions.push(Condition {
                column: column.to_owned(),
                type_oid: col.type_oid,
                op,
                values,
                negate,
            });
        }
        Ok(Filter { conditions })
    }

    /// The first equality condition, used as this subscription's index key.
    pub fn index_key(&self) -> Option<(&str, String)> {
        self.conditions
            .iter()
            .find(|c| c.op == Op::Eq && !c.negate)
            .and_then(|c| Some((c.column.as_str(), key_of(c.values.first()?)?.into_owned())))
    }

    pub fn matches(&self, relation: &Relation, row: &Row) -> bool {
        self.conditions.iter().all(|c| {
            let value = relation
                .column_index(&c.column)
                .and_then(|i| row.get(i))
                .and_then(|v| v.as_ref());
            let Some(value) = value else {
                // Column missing (dropped) or value unknown: it cannot be shown to match.
                return false;
            };
            // `is` is true or false, never unknown: `not.` turns it over.
            let is = match c.op {
                Op::IsNull => Some(value.is_null()),
                Op::IsNotNull => Some(!value.is_null()),
                Op::IsTrue => Some(*value == Value::Bool(true)),
                Op::IsFalse => Some(*value == Value::Bool(false)),
                _ => None,
            };
            if let Some(is) = is {
                return is != c.negate;
            }
            // Any other comparison with NULL is unknown: no match, `not.` or not.
            if value.is_null() {
                return false;
            }
            let Some(first) = c.values.first() else {
                return false;
            };
            let ord = || compare(c.type_oid, value, first);
            let m = match c.op {
                Op::IsNull | Op::IsNotNull | Op::IsTrue | Op::IsFalse => false,
                Op::Eq => equal(value, first),
                Op::Neq => !equal(value, first),
                Op::In => c.values.iter().any(|v| equal(value, v)),
                Op::Lt => ord() == Some(Ordering::Less),
                Op::Lte => matches!(ord(), Some(Ordering::Less | Ordering::Equal)),
                Op::Gt => ord() == Some(Ordering::Greater),
                Op::Gte => matches!(ord(), Some(Ordering::Greater | Ordering::Equal)),
                Op::Like | Op::ILike => {
                    let (Some(pattern), Some(text)) = (first.as_str(), as_text(value)) else {
                        return false;
                    };
                    if c.op == Op::ILike {
                        like(&pattern.to_lowercase(), &text.to_lowercase())
                    } else {
                        like(pattern, &text)
                    }
                }
            };
            m != c.negate
        })
    }
}

/// A value as the text LIKE compares.
fn as_text(v: &Value) -> Option<Cow<'_, str>> {
    match v {
        Value::String(s) => Some(Cow::Borrowed(s)),
        Value::Number(n) => Some(Cow::Owned(n.to_string())),
        Value::Bool(b) => Some(Cow::Borrowed(if *b { "true" } else { "false" })),
        _ => None,
    }
}

/// SQL LIKE: `%` any run of characters, `_` one, `\` escapes the next.
/// Iterative with one backtrack point, so no pattern is exponential.
fn like(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        match p.get(pi) {
            Some('%') => {
                star = Some((pi, ti));
                pi += 1;
                continue;
            }
            Some('_') => {
                pi += 1;
                ti += 1;
                continue;
            }
            Some('\\') if p.get(pi + 1) == Some(&t[ti]) => {
                pi += 2;
                ti += 1;
                continue;
            }
            Some(c) if *c != '\\' && *c == t[ti] => {
                pi += 1;
                ti += 1;
                continue;
            }
            _ => {}
        }
        match star {
            Some((sp, st)) => {
                pi = sp + 1;
                ti = st + 1;
                star = Some((sp, st + 1));
            }
            None => return false,
        }
    }
    p[pi..].iter().all(|c| *c == '%')
}

/// The text a value is indexed under; `None` for values no equality filter can name.
pub fn key_of(v: &Value) -> Option<Cow<'_, str>> {
    match v {
        Value::String(s) => Some(Cow::Borrowed(s)),
        Value::Number(n) => Some(Cow::Owned(n.to_string())),
        Value::Bool(true) => Some(Cow::Borrowed("true")),
        Value::Bool(false) => Some(Cow::Borrowed("false")),
        _ => None,
    }
}

fn equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        _ => a == b,
    }
}

fn compare(type_oid: u32, a: &Value, b: &Value) -> Option<Ordering> {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(x), Some(y)) => Some(x.cmp(&y)),
            _ => x.as_f64()?.partial_cmp(&y.as_f64()?),
        },
        (Value::String(x), Value::String(y)) if type_oid == oid::TIMESTAMPTZ => {
            let x = chrono::DateTime::parse_from_rfc3339(x).ok()?;
            let y = chrono::DateTime::parse_from_rfc3339(y).ok()?;
            Some(x.cmp(&y))
        }
        (Value::String(x), Value::String(y)) if type_oid == oid::NUMERIC => {
            x.parse::<f64>().ok()?.partial_cmp(&y.parse::<f64>().ok()?)
        }
        (Value::String(x), Value::String(y)) => Some(x.cmp(y)),
        (Value::Bool(x), Value::Bool(y)) => Some(x.cmp(y)),
        (Value::Number(x), Value::String(y)) | (Value::String(y), Value::Number(x))
            if type_oid == oid::NUMERIC =>
        {
            let ord = x.as_f64()?.partial_cmp(&y.parse::<f64>().ok()?)?;
            Some(if matches!(a, Value::Number(_)) {
                ord
            } else {
                ord.reverse()
            })
        }
        _ => None,
    }
}

fn typed_literal(column: &str, type_oid: u32, literal: &str) -> Result<Value, FilterError> {
    let bad = |expected| FilterError::BadValue {
        column: column.to_owned(),
        value: literal.to_owned(),
        expected,
    };
    Ok(match type_oid {
        oid::INT2 | oid::INT4 | oid::INT8 | oid::OID => {
            Value::Number(literal.parse::<i64>().map_err(|_| bad("integer"))?.into())
        }
        oid::FLOAT4 | oid::FLOAT8 | oid::NUMERIC => {
            literal.parse::<f64>().map_err(|_| bad("number"))?;
            text_to_json(type_oid, literal.as_bytes())
        }
        oid::BOOL => match literal {
            "true" | "t" => Value::Bool(true),
            "false" | "f" => Value::Bool(false),
            _ => return Err(bad("boolean")),
        },
        oid::UUID => Value::String(
            uuid::Uuid::parse_str(literal)
                .map_err(|_| bad("uuid"))?
                .hyphenated()
                .to_string(),
        ),
        oid::TIMESTAMPTZ => {
            let dt = chrono::DateTime::parse_from_rfc3339(literal)
                .map_err(|_| bad("ISO-8601 timestamp with offset"))?;
            Value::String(
                dt.with_timezone(&chrono::Utc)
                    .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
            )
        }
        _ => Value::String(literal.to_owned()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::ColumnInfo;
    use aether_core::changes::{Column, TableId};
    use serde_json::json;
    use std::sync::Arc;

    fn table() -> TableInfo {
        TableInfo {
            schema: "public".into(),
            name: "files".into(),
            qualified: Arc::from("public.files"),
            columns: vec![
                ColumnInfo {
                    name: "id".into(),
                    type_oid: oid::UUID,
                },
                ColumnInfo {
                    name: "size".into(),
                    type_oid: oid::INT8,
                },
                ColumnInfo {
                    name: "name".into(),
                    type_oid: 25,
                },
                ColumnInfo {
                    name: "created_at".into(),
                    type_oid: oid::TIMESTAMPTZ,
                },
                ColumnInfo {
                    name: "encrypted_password".into(),
                    type_oid: 25,
                },
            ],
        }
    }

    fn relation() -> Relation {
        let t = table();
        Relation {
            id: TableId(1),
            schema: t.schema,
            name: t.name,
            qualified: t.qualified,
            replica_identity: b'f',
            columns: t
                .columns
                .into_iter()
                .map(|c| Column {
                    secret: c.name == "encrypted_password",
                    name: c.name,
                    type_oid: c.type_oid,
                    is_key: false,
                })
                .collect(),
        }
    }

    #[test]
    fn parse_and_match() {
        let id = uuid::Uuid::new_v4();
        let f = Filter::parse(
            &format!("id=eq.{}&size=gt.10", id.to_string().to_uppercase()),
            &table(),
        )
        .unwrap();
        assert_eq!(f.index_key(), Some(("id", id.to_string())));
        let rel = relation();
        let row = vec![
            Some(json!(id.to_string())),
            Some(json!(11)),
            Some(json!("a")),
            Some(json!("2026-01-01T00:00:00Z")),
            None,
        ];
        assert!(f.matches(&rel, &row));
        let small = vec![
            Some(json!(id.to_string())),
            Some(json!(10)),
            Some(json!("a")),
            None,
            None,
        ];
        assert!(!f.matches(&rel, &small));

        let f = Filter::parse(
            "name=in.(a,b)&created_at=lt.2026-06-01T00:00:00.5+02:00",
            &table(),
        )
        .unwrap();
        assert!(f.matches(&rel, &row));
        let f = Filter::parse("name=is.null", &table()).unwrap();
        assert!(!f.matches(&rel, &row));
    }

    /// Supabase's newer filters: `like`, `ilike`, `is.true`/`is.false` and
    /// `not.`, with SQL's NULL rules.
    #[test]
    fn like_ilike_is_and_not() {
        let rel = relation();
        let row = |name: Option<&str>| {
            vec![
                Some(json!(uuid::Uuid::nil().to_string())),
                Some(json!(5)),
                Some(name.map_or(Value::Null, |n| json!(n))),
                None,
                None,
            ]
        };
        let m = |f: &str, name: Option<&str>| {
            Filter::parse(f, &table())
                .unwrap()
                .matches(&rel, &row(name))
        };
        assert!(m("name=like.re%", Some("report.pdf")));
        assert!(m("name=like.%.pdf", Some("report.pdf")));
        assert!(m("name=like.r_port*", Some("report.pdf")), "* is %");
        assert!(
            !m("name=like.Re%", Some("report.pdf")),
            "like is case-sensitive"
        );
        assert!(m("name=ilike.RE%PDF", Some("report.pdf")));
        assert!(m("name=like.100\\%", Some("100%")), "an escaped %");
        assert!(!m("name=like.100\\%", Some("1000")));
        assert!(m("name=not.like.%.pdf", Some("notes.txt")));
        assert!(!m("name=not.like.%.pdf", None), "NULL matches neither");
        assert!(!m("name=like.%", None));
        assert!(m("name=not.eq.a", Some("b")));
        assert!(m("name=not.is.null", Some("b")));
        assert!(m("name=not.is.notnull", None));
        assert!(m("size=not.in.(1,2)", Some("x")));
        assert!(matches!(
            Filter::parse("size=like.1%", &table()),
            Err(FilterError::BadValue { .. })
        ));
        // No index key from a negated equality.
        assert_eq!(
            Filter::parse("name=not.eq.a", &table())
                .unwrap()
                .index_key(),
            None
        );
        // A pathological pattern stays linear-ish.
        let long = "a".repeat(5000);
        assert!(!m(&format!("name=like.{}b", "%a".repeat(50)), Some(&long)));
        assert!(matches!(
            Filter::parse("name=is.true", &table()),
            Err(FilterError::BadValue { .. })
        ));
    }

    #[test]
    fn errors_name_the_problem() {
        let t = table();
        assert!(matches!(
            Filter::parse("nope=eq.1", &t),
            Err(FilterError::UnknownColumn { .. })
        ));
        assert!(matches!(
            Filter::parse("encrypted_password=eq.x", &t),
            Err(FilterError::UnknownColumn { .. })
        ));
        assert!(matches!(
            Filter::parse("size=between.1", &t),
            Err(FilterError::UnknownOperator(_))
        ));
        assert!(matches!(
            Filter::parse("size=eq.abc", &t),
            Err(FilterError::BadValue { .. })
        ));
        assert!(matches!(
            Filter::parse("id=eq.not-a-uuid", &t),
            Err(FilterError::BadValue { .. })
        ));
        assert!(matches!(
            Filter::parse("size", &t),
            Err(FilterError::Syntax(_))
        ));
        assert!(matches!(
            Filter::parse("size=eq", &t),
            Err(FilterError::Syntax(_))
        ));
        assert!(matches!(
            Filter::parse("size=in.1,2", &t),
            Err(FilterError::Syntax(_))
        ));
    }
}
