//! Renders a parsed request as SQL: identifiers quoted, type names checked by the
//! parser, every value a bound parameter sent as text of unknown type, so
//! PostgreSQL reads it as the column's own type (as PostgREST does).

use std::error::Error;

use bytes::BytesMut;
use tokio_postgres::types::{Format, IsNull, ToSql, Type, to_sql_checked};

use super::query::{Cond, IsValue, Item, Op, Operand, Order, Query};
use super::schema::{Schema, Table};
use aether_auth::Role;

/// A value PostgreSQL parses as whatever type its place in the query has.
#[derive(Debug)]
pub(crate) struct Text(pub Option<String>);

impl ToSql for Text {
    fn to_sql(&self, _: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        match &self.0 {
            Some(s) => {
                out.extend_from_slice(s.as_bytes());
                Ok(IsNull::No)
            }
            None => Ok(IsNull::Yes),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    fn encode_format(&self, _: &Type) -> Format {
        Format::Text
    }

    to_sql_checked!();
}

/// A quoted identifier. The parser lets no `"` through; doubling it anyway
/// keeps this safe on its own.
pub(crate) fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

pub(crate) fn table_name(schema: &str, table: &str) -> String {
    format!("{}.{}", quote(schema), quote(table))
}

/// SQL text and its parameters, built together.
#[derive(Debug, Default)]
pub(crate) struct Sql {
    pub text: String,
    pub params: Vec<Text>,
}

impl Sql {
    fn param(&mut self, v: impl Into<String>) -> String {
        self.params.push(Text(Some(v.into())));
        format!("${}", self.params.len())
    }

    /// The parameters as tokio-postgres takes them.
    pub(crate) fn refs(&self) -> Vec<&(dyn ToSql + Sync)> {
        self.params.iter().map(|p| p as _).collect()
    }

    pub(crate) fn param_opt(&mut self, v: Option<String>) -> String {
        self.params.push(Text(v));
        format!("${}", self.params.len())
    }
}

/// Why a plan cannot be rendered (a name the schema does not have).
#[derive(Debug)]
pub(crate) enum PlanError {
    /// `PGRST200`: no foreign key relates the two tables (or the hint matches none).
    NoRelationship(String),
    /// `PGRST201`: more than one does; a `!hint` must choose.
    Ambiguous(String),
    /// `PGRST108`: a filter names an embedded resource the select does not.
    NotEmbedded(String),
    /// `42703`: an embedded resource's column that its table does not have.
    UnknownColumn(String),
}

/// 42703 for a column `t` does not have (its JSON path aside), before any
/// SQL is made: PostgreSQL would read `_e1."to_json"` as `to_json(_e1)`, a
/// function of the whole row. (The request's own table is checked likewise
/// before planning.)
fn known_column(t: &Table, key: &(String, String), name: &str) -> Result<(), PlanError> {
    let base = super::query::json_path(name).0;
    if t.columns.iter().any(|c| c.name == base) {
        Ok(())
    } else {
        Err(PlanError::UnknownColumn(format!(
            "column {}.{base} does not exist",
            key.1
        )))
    }
}

/// The columns a condition tree names.
fn cond_columns<'a>(c: &'a Cond, out: &mut Vec<&'a str>) {
    match c {
        Cond::Filter { column, .. } => out.push(column),
        Cond::And(v, _) | Cond::Or(v, _) => v.iter().for_each(|c| cond_columns(c, out)),
    }
}

/// A PostgreSQL array literal of `items`, each quoted.
fn array_literal(items: &[String]) -> String {
    let quoted: Vec<String> = items
        .iter()
        .map(|i| format!("\"{}\"", i.replace('\\', "\\\\").replace('"', "\\\"")))
        .collect();
    format!("{{{}}}", quoted.join(","))
}

/// `alias."column"`, followed by its JSON path (`->'a'->>'b'`, `->0`). Keys
/// are SQL string literals, quotes doubled (standard strings, no escapes).
pub(crate) fn column_ref(alias: &str, name: &str) -> String {
    let (base, steps) = super::query::json_path(name);
    let mut out = format!("{alias}.{}", quote(base));
    for (text, key) in steps {
        out.push_str(if text { "->>" } else { "->" });
        let digits = key.strip_prefix('-').unwrap_or(key);
        if !digits.is_empty() && digits.len() < 10 && digits.bytes().all(|b| b.is_ascii_digit()) {
            out.push_str(key);
        } else {
            out.push('\'');
            out.push_str(&key.replace('\'', "''"));
            out.push('\'');
        }
    }
    out
}

/// A filter's column type, where the table is known (`None`: unknown).
fn column_type<'t>(table: Option<&'t Table>, column: &str) -> Option<&'t str> {
    let (base, steps) = super::query::json_path(column);
    if !steps.is_empty() {
        return None;
    }
    table?
        .columns
        .iter()
        .find(|c| c.name == base)
        .map(|c| c.type_name.as_str())
}

fn cond(sql: &mut Sql, c: &Cond, alias: &str, table: Option<&Table>) -> String {
    match c {
        Cond::Filter {
            column,
            negated,
            op,
            operand,
        } => {
            let col = column_ref(alias, column);
            let expr = match (op, operand) {
                (Op::Is, Operand::Is(v)) => {
                    let v = match v {
                        IsValue::Null => "NULL",
                        IsValue::True => "TRUE",
                        IsValue::False => "FALSE",
                        IsValue::Unknown => "UNKNOWN",
                    };
                    format!("{col} IS {v}")
                }
                (Op::In, Operand::List(items)) if items.is_empty() => "FALSE".to_owned(),
                (Op::In, Operand::List(items)) => {
                    format!("{col} = ANY({})", sql.param(array_literal(items)))
                }
                (Op::Fts(kind), Operand::Search { config, query }) => {
                    // A tsvector column as it is (its index usable); any
                    // other as its text, parsed with the same configuration
                    // as the query (as PostgREST does). A column of a type
                    // not known here is told apart in SQL.
                    let ty = column_type(table, column);
                    let f = kind.function();
                    let (vector, tsquery) = match config {
                        Some(c) => {
                            let c = sql.param(c.clone());
                            let q = sql.param(query.clone());
                            (
                                format!("to_tsvector({c}::regconfig, {col}::text)"),
                                format!("{f}({c}::regconfig, {q})"),
                            )
                        }
                        None => (
                            format!("to_tsvector({col}::text)"),
                            format!("{f}({})", sql.param(query.clone())),
                        ),
                    };
                    match ty {
                        Some("tsvector") => format!("{col} @@ {tsquery}"),
                        Some(_) => format!("{vector} @@ {tsquery}"),
                        None => format!(
                            "(CASE WHEN pg_typeof({col}) = 'tsvector'::regtype \
                             THEN {col}::text::tsvector ELSE {vector} END) @@ {tsquery}"
                        ),
                    }
                }
                (op, Operand::One(v)) => {
                    let sym = match op {
                        Op::Eq => "=",
                        Op::Neq => "<>",
                        Op::Gt => ">",
                        Op::Gte => ">=",
                        Op::Lt => "<",
                        Op::Lte => "<=",
                        Op::Like => "LIKE",
                        Op::Ilike => "ILIKE",
                        Op::Cs => "@>",
                        Op::Cd => "<@",
                        Op::Match => "~",
                        Op::Imatch => "~*",
                        Op::Sl => "<<",
                        Op::Sr => ">>",
                        Op::Nxr => "&<",
                        Op::Nxl => "&>",
                        Op::Adj => "-|-",
                        Op::Ov => "&&",
                        Op::Is | Op::In | Op::Fts(_) => "=",
                    };
                    format!("{col} {sym} {}", sql.param(v.clone()))
                }
                // The parser pairs each operator with its operand.
                _ => "FALSE".to_owned(),
            };
            if *negated {
                format!("NOT ({expr})")
            } else {
                expr
            }
        }
        Cond::And(items, negated) | Cond::Or(items, negated) => {
            let (joiner, empty) = match c {
                Cond::And(..) => (" AND ", "TRUE"),
                _ => (" OR ", "FALSE"),
            };
            let parts: Vec<String> = items.iter().map(|i| cond(sql, i, alias, table)).collect();
            let expr = if parts.is_empty() {
                empty.to_owned()
            } else {
                format!("({})", parts.join(joiner))
            };
            if *negated {
                format!("NOT {expr}")
            } else {
                expr
            }
        }
    }
}

/// `WHERE …` for the request's filters ("" when there are none).
pub(crate) fn where_clause(sql: &mut Sql, q: &Query, alias: &str, table: Option<&Table>) -> String {
    if q.filters.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = q
        .filters
        .iter()
        .map(|c| cond(sql, c, alias, table))
        .collect();
    format!(" WHERE {}", parts.join(" AND "))
}

fn order_clause(order: &[Order], alias: &str) -> String {
    if order.is_empty() {
        return String::new();
    }
    let terms: Vec<String> = order
        .iter()
        .map(|o| {
            let mut t = column_ref(alias, &o.column);
            t.push_str(if o.desc { " DESC" } else { " ASC" });
            match o.nulls_first {
                Some(true) => t.push_str(" NULLS FIRST"),
                Some(false) => t.push_str(" NULLS LAST"),
                None => {}
            }
            t
        })
        .collect();
    format!(" ORDER BY {}", terms.join(", "))
}

/// What a level of a request adds to its embeds: their filters, order and
/// paging (and their embeds'), and (collected) the conditions of `!inner` ones.
pub(crate) struct Embeds<'a> {
    pub given: &'a std::collections::BTreeMap<String, super::query::Embedded>,
    pub inner: Vec<String>,
    /// Only the `!inner` conditions are wanted (a count): nothing else is
    /// rendered, so no parameter is bound that the statement does not use.
    pub count_only: bool,
}

/// A select list: its entries, each named.
fn joined(entries: &[(String, String)]) -> String {
    let list: Vec<String> = entries
        .iter()
        .map(|(expr, name)| format!("{expr} AS {name}"))
        .collect();
    list.join(", ")
}

/// The select list for `items` on the table `key` seen through `alias`:
/// each entry an expression and its (quoted) name.
#[allow(clippy::too_many_arguments)]
fn select_entries(
    sql: &mut Sql,
    schema: &Schema,
    key: &(String, String),
    table: &Table,
    items: &[Item],
    alias: &str,
    role: Role,
    depth: usize,
    mut embeds: Option<&mut Embeds<'_>>,
) -> Result<Vec<(String, String)>, PlanError> {
    // Every embedded resource a filter names must be in the select.
    if let Some(e) = embeds.as_deref()
        && let Some(name) = e.given.keys().find(|name| {
            !items.iter().any(|i| {
                matches!(i, Item::Embed { table, alias, .. }
                    if alias.as_deref().unwrap_or(table) == name.as_str())
            })
        })
    {
        return Err(PlanError::NotEmbedded(format!(
            "'{name}' is not an embedded resource in this request"
        )));
    }
    let mut out = Vec::new();
    let star = items.is_empty() || items.iter().any(|i| matches!(i, Item::Star));
    if star {
        let cols: Vec<&str> = table.readable(role).collect();
        // No column readable: name them all and let PostgreSQL refuse.
        let cols: Vec<&str> = if cols.is_empty() {
            table.columns.iter().map(|c| c.name.as_str()).collect()
        } else {
            cols
        };
        out.extend(
            cols.iter()
                .map(|c| (format!("{alias}.{}", quote(c)), quote(c))),
        );
    }
    for item in items {
        match item {
            Item::Star => {}
            Item::Column {
                name,
                alias: a,
                cast,
            } => {
                known_column(table, key, name)?;
                let mut e = column_ref(alias, name);
                if let Some(t) = cast {
                    e = format!("({e})::{t}");
                }
                let named = a.as_deref().unwrap_or(super::query::output_name(name));
                out.push((e, quote(named)));
            }
            Item::Embed { inner: false, .. } if embeds.as_deref().is_some_and(|e| e.count_only) => {
            }
            Item::Embed {
                table: target,
                alias: a,
                hint,
                inner,
                spread,
                items,
            } => {
                let name = a.as_deref().unwrap_or(target);
                let count_only = embeds.as_deref().is_some_and(|e| e.count_only);
                let given = embeds.as_deref().and_then(|e| e.given.get(name));
                let embedded = embed(
                    sql,
                    schema,
                    key,
                    alias,
                    (target, hint.as_deref()),
                    items,
                    given,
                    role,
                    (depth, !count_only),
                )?;
                if *inner && let Some(e) = embeds.as_deref_mut() {
                    e.inner.push(embedded.exists());
                }
                if *spread {
                    out.extend(embedded.spread());
                } else {
                    out.push((embedded.json(), quote(name)));
                }
            }
        }
    }
    Ok(out)
}

/// An embedded resource, rendered: its entries over the rows of `from`.
struct Embedded {
    /// `table alias WHERE <join> <filters>`.
    from: String,
    /// Its order (to-many only), as asked.
    order: String,
    /// What identifies its rows (the primary key, else `tableoid, ctid`):
    /// a spread orders by it last, as each of its columns is its own
    /// subquery and they must agree on which rows, in which order.
    row_key: String,
    /// `LIMIT`, `OFFSET` (to-many only).
    paging: String,
    /// An array (to-many) or one object (to-one).
    many: bool,
    /// `books(count)`: how many rows, under this (quoted) name.
    count_as: Option<String>,
    entries: Vec<(String, String)>,
}

impl Embedded {
    /// The embedded resource as one JSON value: an object (or null), or an array.
    fn json(&self) -> String {
        let Embedded {
            from,
            order,
            paging,
            ..
        } = self;
        let list = || joined(&self.entries);
        match (&self.count_as, self.many) {
            (Some(name), false) => {
                format!("(SELECT row_to_json(_x) FROM (SELECT count(*) AS {name} FROM {from}) _x)")
            }
            (Some(name), true) => format!(
                "(SELECT json_build_array(row_to_json(_x)) FROM (SELECT count(*) AS {name} FROM {from}) _x)"
            ),
            (None, false) => {
                format!(
                    "(SELECT row_to_json(_x) FROM (SELECT {} FROM {from}) _x)",
                    list()
                )
            }
            (None, true) => format!(
                "(SELECT coalesce(json_agg(_x), '[]') FROM (SELECT {} FROM {from}{order}{paging}) _x)",
                list()
            ),
        }
    }

    /// `...table(items)`: each entry as a column of the row embedding it,
    /// its value for a to-one relationship (null without a row), the array
    /// of its values for a to-many one (PostgREST 13); a count is a number.
    fn spread(&self) -> Vec<(String, String)> {
        let Embedded {
            from,
            order,
            row_key,
            paging,
            ..
        } = self;
        if let Some(name) = &self.count_as {
            return vec![(format!("(SELECT count(*) FROM {from})"), name.clone())];
        }
        let total_order = if order.is_empty() {
            format!(" ORDER BY {row_key}")
        } else {
            format!("{order}, {row_key}")
        };
        self.entries
            .iter()
            .map(|(e, n)| {
                let value = if self.many {
                    format!("(SELECT coalesce(json_agg(_x._v), '[]') FROM (SELECT {e} AS _v FROM {from}{total_order}{paging}) _x)")
                } else {
                    format!("(SELECT {e} FROM {from})")
                };
                (value, n.clone())
            })
            .collect()
    }

    /// That a (matching) embedded row exists: what `!inner` asks.
    fn exists(&self) -> String {
        format!("EXISTS (SELECT 1 FROM {})", self.from)
    }
}

/// One level of embedding through a foreign key, in either direction: the
/// subquery, and the condition that a (matching) embedded row exists (for
/// `!inner`).
#[allow(clippy::too_many_arguments)]
fn embed(
    sql: &mut Sql,
    schema: &Schema,
    from: &(String, String),
    from_alias: &str,
    (target, hint): (&str, Option<&str>),
    items: &[Item],
    given: Option<&super::query::Embedded>,
    role: Role,
    (depth, with_tail): (usize, bool),
) -> Result<Embedded, PlanError> {
    let target_key = (from.0.clone(), target.to_owned());
    let no_rel = || {
        PlanError::NoRelationship(format!(
            "Could not find a relationship between '{}' and '{}' in the schema cache",
            from.1, target
        ))
    };
    let t = schema.tables.get(&target_key).ok_or_else(no_rel)?;
    let hinted = |fk: &&super::schema::ForeignKey| {
        hint.is_none_or(|h| fk.name == h || fk.columns.iter().any(|c| c == h))
    };
    // Many-to-one: this table's key points at the target (an object).
    let to_one: Vec<_> = schema
        .foreign_keys
        .iter()
        .filter(|fk| &fk.table == from && fk.target == target_key)
        .filter(hinted)
        .collect();
    // One-to-many: the target's key points at this table (an array).
    let to_many: Vec<_> = schema
        .foreign_keys
        .iter()
        .filter(|fk| fk.table == target_key && &fk.target == from)
        .filter(hinted)
        .collect();
    let alias = format!("_e{depth}");
    // Embeds of this embed, with what the URL gives for them
    // (`books.reviews.stars=gt.3`); their `!inner` conditions narrow this
    // one's rows.
    let none = std::collections::BTreeMap::new();
    let mut nested = Embeds {
        given: given.map_or(&none, |g| &g.embedded),
        inner: Vec::new(),
        // A count renders only `!inner` conditions, at every level: anything
        // else would bind parameters the count's statement does not use.
        count_only: !with_tail,
    };
    // `books(count)` (or `books(n:count)`): how many rows match, instead of
    // the rows (PostgREST's embedded count), unless the table has a column
    // of that name. The rows' list is then not used (and names nothing, so
    // a filter for an embed below it is PGRST108).
    let count_as = match items {
        [
            Item::Column {
                name,
                alias: a,
                cast: None,
            },
        ] if name == "count" && !t.columns.iter().any(|c| c.name == "count") => {
            Some(quote(a.as_deref().unwrap_or("count")))
        }
        _ => None,
    };
    let entries = select_entries(
        sql,
        schema,
        &target_key,
        t,
        if count_as.is_some() { &[] } else { items },
        &alias,
        role,
        depth + 1,
        Some(&mut nested),
    )?;
    if let Some(e) = given {
        let mut names = Vec::new();
        e.filters.iter().for_each(|c| cond_columns(c, &mut names));
        names.extend(e.order.iter().map(|o| o.column.as_str()));
        for name in names {
            known_column(t, &target_key, name)?;
        }
    }
    let table = table_name(&target_key.0, &target_key.1);
    // The embedded resource's own filters, order and paging.
    let mut filters: String = nested.inner.iter().map(|c| format!(" AND {c}")).collect();
    // The join: (target's column, this row's column) pairs.
    let (pairs, many): (Vec<(&String, &String)>, bool) = match (
        to_one.as_slice(),
        to_many.as_slice(),
    ) {
        // Many-to-one: this row's columns point at the target's.
        ([fk], []) => (fk.references.iter().zip(&fk.columns).collect(), false),
        // One-to-many: the target's columns point at this row's; one-to-one
        // when they are the target's primary key or unique (one row each).
        ([], [fk]) => {
            fn sorted(cols: &[String]) -> Vec<&String> {
                let mut v: Vec<&String> = cols.iter().collect();
                v.sort();
                v
            }
            let key = sorted(&fk.columns);
            let one = std::iter::once(&t.primary_key)
                .chain(&t.unique_keys)
                .any(|u| sorted(u) == key);
            (fk.columns.iter().zip(&fk.references).collect(), !one)
        }
        ([], []) => return Err(no_rel()),
        _ => {
            return Err(PlanError::Ambiguous(format!(
                "Could not embed because more than one relationship was found for '{}' and '{}'; add !<foreign key or column> to choose",
                from.1, target
            )));
        }
    };
    let (mut order, mut paging) = (Vec::new(), String::new());
    if let Some(e) = given {
        for c in &e.filters {
            filters.push_str(" AND ");
            filters.push_str(&cond(sql, c, &alias, Some(t)));
        }
        // Order and paging mean something for an array (to-many) only; a
        // to-one embed binds none (an unused parameter fails the statement).
        if with_tail && many && count_as.is_none() {
            order.clone_from(&e.order);
            if let Some(l) = e.limit {
                paging.push_str(&format!(" LIMIT {}", sql.param(l.to_string())));
            }
            if let Some(o) = e.offset {
                paging.push_str(&format!(" OFFSET {}", sql.param(o.to_string())));
            }
        }
    }
    // What identifies a row: the primary key, else where the row is.
    let row_key: Vec<String> = if t.primary_key.is_empty() {
        vec![format!("{alias}.tableoid"), format!("{alias}.ctid")]
    } else {
        t.primary_key
            .iter()
            .map(|c| format!("{alias}.{}", quote(c)))
            .collect()
    };
    let on: Vec<String> = pairs
        .iter()
        .map(|(theirs, ours)| format!("{alias}.{} = {from_alias}.{}", quote(theirs), quote(ours)))
        .collect();
    Ok(Embedded {
        from: format!("{table} {alias} WHERE {}{filters}", on.join(" AND ")),
        order: order_clause(&order, &alias),
        row_key: row_key.join(", "),
        paging,
        many,
        count_as,
        entries,
    })
}

/// `SELECT json, count` of the rows the request reads.
pub(crate) fn read(
    schema: &Schema,
    key: &(String, String),
    table: &Table,
    q: &Query,
    role: Role,
) -> Result<Sql, PlanError> {
    let mut sql = Sql::default();
    let (list, inner) = top_list(&mut sql, schema, key, table, q, role, false)?;
    let filter = with_inner(where_clause(&mut sql, q, "_t", Some(table)), &inner);
    let mut tail = order_clause(&q.order, "_t");
    if let Some(l) = q.limit {
        let p = sql.param(l.to_string());
        tail.push_str(&format!(" LIMIT {p}"));
    }
    if let Some(o) = q.offset {
        let p = sql.param(o.to_string());
        tail.push_str(&format!(" OFFSET {p}"));
    }
    sql.text = format!(
        "SELECT coalesce(json_agg(_r), '[]')::text, count(*) FROM (SELECT {list} FROM {} _t{filter}{tail}) _r",
        table_name(&key.0, &key.1)
    );
    Ok(sql)
}

/// The request's own select list (as `_t`) and its `!inner` conditions;
/// with `count_only`, the conditions alone.
fn top_list(
    sql: &mut Sql,
    schema: &Schema,
    key: &(String, String),
    table: &Table,
    q: &Query,
    role: Role,
    count_only: bool,
) -> Result<(String, Vec<String>), PlanError> {
    let mut embeds = Embeds {
        given: &q.embedded,
        inner: Vec::new(),
        count_only,
    };
    let list = select_entries(
        sql,
        schema,
        key,
        table,
        &q.select,
        "_t",
        role,
        0,
        Some(&mut embeds),
    )?;
    Ok((joined(&list), embeds.inner))
}

/// Adds `!inner` embeds' conditions to a `WHERE` clause ("" when none).
fn with_inner(filter: String, inner: &[String]) -> String {
    match (filter.is_empty(), inner.is_empty()) {
        (_, true) => filter,
        (true, false) => format!(" WHERE {}", inner.join(" AND ")),
        (false, false) => format!("{filter} AND {}", inner.join(" AND ")),
    }
}

/// `SELECT count(*)` of every row the filters (and `!inner` embeds) match
/// (`Prefer: count=exact`).
pub(crate) fn count(
    schema: &Schema,
    key: &(String, String),
    table: &Table,
    q: &Query,
    role: Role,
) -> Result<Sql, PlanError> {
    let mut sql = Sql::default();
    // Only for the `!inner` conditions (and their parameters).
    let (_, inner) = top_list(&mut sql, schema, key, table, q, role, true)?;
    let filter = with_inner(where_clause(&mut sql, q, "_t", Some(table)), &inner);
    sql.text = format!(
        "SELECT count(*) FROM {} _t{filter}",
        table_name(&key.0, &key.1)
    );
    Ok(sql)
}

/// Wraps a data-changing statement that returns `_t.*` so it yields `json, count`.
pub(crate) fn returning(
    schema: &Schema,
    key: &(String, String),
    table: &Table,
    q: &Query,
    role: Role,
    mut sql: Sql,
    statement: &str,
) -> Result<Sql, PlanError> {
    let (list, _) = top_list(&mut sql, schema, key, table, q, role, false)?;
    sql.text = format!(
        "WITH _m AS ({statement} RETURNING _t.*) SELECT coalesce(json_agg(_r), '[]')::text, count(*) FROM (SELECT {list} FROM _m _t) _r"
    );
    Ok(sql)
}

pub(crate) enum Conflict {
    None,
    Merge(Vec<String>),
    Ignore(Vec<String>),
}

/// `"a", "b"`.
fn quoted_list(columns: &[String]) -> String {
    let quoted: Vec<String> = columns.iter().map(|c| quote(c)).collect();
    quoted.join(", ")
}

/// `INSERT … SELECT … FROM json_populate_recordset(…)` of `columns`: a key a
/// row lacks is NULL.
pub(crate) fn insert(
    key: &(String, String),
    columns: &[String],
    body: String,
    conflict: &Conflict,
) -> (Sql, String) {
    let mut sql = Sql::default();
    let name = table_name(&key.0, &key.1);
    let p = sql.param(body);
    let cols = quoted_list(columns);
    let stmt = format!(
        "INSERT INTO {name} AS _t ({cols}) SELECT {cols} FROM json_populate_recordset(NULL::{name}, {p}::json)"
    );
    (sql, on_conflict(stmt, columns, conflict))
}

/// The most rows one `missing=default` insert takes: each is a parameter
/// (PostgreSQL takes at most 65,535), and the statement names every cell.
pub(crate) const MAX_DEFAULTED_ROWS: usize = 10_000;

/// One row of an insert with `missing=default`: its JSON object, and which of
/// the insert's columns it gives.
pub(crate) struct DefaultedRow {
    pub json: String,
    pub present: Vec<bool>,
}

/// `INSERT … VALUES` of `columns` (`Prefer: missing=default`): a key a row
/// lacks is `DEFAULT`, so the column's default (an identity, `now()`,
/// `auth.uid()`) is computed for that row as PostgreSQL computes it; a given
/// value is read from the row, its own parameter, as `json_populate_record`
/// reads it (so the work is the body's size times the columns, not more).
pub(crate) fn insert_with_defaults(
    key: &(String, String),
    columns: &[String],
    rows: Vec<DefaultedRow>,
    conflict: &Conflict,
) -> (Sql, String) {
    let mut sql = Sql::default();
    let name = table_name(&key.0, &key.1);
    let rows: Vec<String> = rows
        .into_iter()
        .map(|row| {
            let present = row.present;
            let p = sql.param(row.json);
            let cells: Vec<String> = columns
                .iter()
                .zip(present)
                .map(|(c, has)| match has {
                    true => format!(
                        "(json_populate_record(NULL::{name}, {p}::json)).{}",
                        quote(c)
                    ),
                    false => "DEFAULT".to_owned(),
                })
                .collect();
            format!("({})", cells.join(", "))
        })
        .collect();
    let stmt = format!(
        "INSERT INTO {name} AS _t ({}) VALUES {}",
        quoted_list(columns),
        rows.join(", ")
    );
    (sql, on_conflict(stmt, columns, conflict))
}

/// `stmt` with its `ON CONFLICT` clause.
fn on_conflict(mut stmt: String, columns: &[String], conflict: &Conflict) -> String {
    match conflict {
        Conflict::None => {}
        Conflict::Ignore(on) => {
            let on: Vec<String> = on.iter().map(|c| quote(c)).collect();
            stmt.push_str(&format!(" ON CONFLICT ({}) DO NOTHING", on.join(", ")));
        }
        Conflict::Merge(on) => {
            let on_q: Vec<String> = on.iter().map(|c| quote(c)).collect();
            let set: Vec<String> = columns
                .iter()
                .filter(|c| !on.contains(c))
                .map(|c| format!("{} = EXCLUDED.{}", quote(c), quote(c)))
                .collect();
            if set.is_empty() {
                stmt.push_str(&format!(" ON CONFLICT ({}) DO NOTHING", on_q.join(", ")));
            } else {
                stmt.push_str(&format!(
                    " ON CONFLICT ({}) DO UPDATE SET {}",
                    on_q.join(", "),
                    set.join(", ")
                ));
            }
        }
    }
    stmt
}

/// `UPDATE … SET (columns) = (…)` of the rows the filters match.
pub(crate) fn update(
    key: &(String, String),
    columns: &[String],
    body: String,
    q: &Query,
) -> (Sql, String) {
    let mut sql = Sql::default();
    let name = table_name(&key.0, &key.1);
    let p = sql.param(body);
    let cols = quoted_list(columns);
    let filter = where_clause(&mut sql, q, "_t", None);
    let stmt = format!(
        "UPDATE {name} AS _t SET ({cols}) = (SELECT {cols} FROM json_populate_record(NULL::{name}, {p}::json)){filter}"
    );
    (sql, stmt)
}

/// `DELETE` of the rows the filters match.
pub(crate) fn delete(key: &(String, String), q: &Query) -> (Sql, String) {
    let mut sql = Sql::default();
    let filter = where_clause(&mut sql, q, "_t", None);
    let stmt = format!("DELETE FROM {} AS _t{filter}", table_name(&key.0, &key.1));
    (sql, stmt)
}

#[cfg(test)]
mod tests {
    use super::super::schema::{Column, ForeignKey, Table};
    use super::*;

    fn table(columns: &[&str], primary_key: &[&str]) -> Table {
        Table {
            columns: columns
                .iter()
                .map(|c| Column {
                    name: (*c).to_owned(),
                    readable: [true; 3],
                    type_name: "text".to_owned(),
                    required: false,
                })
                .collect(),
            primary_key: primary_key.iter().map(|c| (*c).to_owned()).collect(),
            unique_keys: Vec::new(),
        }
    }

    fn key(name: &str) -> (String, String) {
        ("public".to_owned(), name.to_owned())
    }

    /// Authors, their books (one-to-many) and their profile (one-to-one: its
    /// key is the author's).
    fn schema() -> Schema {
        let mut s = Schema::default();
        s.tables
            .insert(key("authors"), table(&["id", "name"], &["id"]));
        s.tables.insert(
            key("books"),
            table(&["id", "author_id", "title", "year"], &["id"]),
        );
        s.tables.insert(
            key("profiles"),
            table(&["author_id", "bio"], &["author_id"]),
        );
        for (name, t) in [("books_author", "books"), ("profiles_author", "profiles")] {
            s.foreign_keys.push(ForeignKey {
                name: name.to_owned(),
                table: key(t),
                columns: vec!["author_id".to_owned()],
                target: key("authors"),
                references: vec!["id".to_owned()],
            });
        }
        s
    }

    fn read_sql(query: &str) -> String {
        let s = schema();
        let q = super::super::query::parse(query).expect("a valid query");
        let authors = &s.tables[&key("authors")];
        read(&s, &key("authors"), authors, &q, Role::Anon)
            .expect("planned")
            .text
    }

    #[test]
    fn a_to_many_spreads_columns_agree_on_their_rows_and_order() {
        // Each column is its own subquery: ties in the asked order (and a
        // limit) must not let two of them pick or order rows differently.
        let text = read_sql("select=name,...books(id,title)&books.order=year&books.limit=2");
        let total = r#"ORDER BY _e0."year" ASC, _e0."id" LIMIT $1"#;
        assert_eq!(text.matches(total).count(), 2, "{text}");
        // Without an order, the key alone orders them.
        let text = read_sql("select=name,...books(id,title)");
        assert_eq!(text.matches(r#"ORDER BY _e0."id")"#).count(), 2, "{text}");
        // A plain embed keeps the order asked, and none when none is.
        let text = read_sql("select=name,books(id,title)");
        assert!(!text.contains("ORDER BY"), "{text}");
    }

    #[test]
    fn a_key_that_is_the_targets_primary_key_embeds_one_row() {
        let text = read_sql("select=name,profiles(bio),books(title)");
        assert!(
            text.contains(r#"(SELECT row_to_json(_x) FROM (SELECT _e0."bio" AS "bio" FROM "public"."profiles""#),
            "{text}"
        );
        assert!(
            text.contains(r#"(SELECT coalesce(json_agg(_x), '[]') FROM (SELECT _e0."title""#),
            "{text}"
        );
    }
}
