//! PostgREST's URL grammar, parsed into a plan the SQL builder renders: no SQL
//! text is made here, and nothing from the URL reaches SQL except as a quoted
//! identifier, a checked type name or a bound parameter.

use std::fmt;

/// A parse error: PostgREST's `PGRST100` with what failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ParseError {
    pub message: String,
    pub details: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.message, self.details)
    }
}

fn fail(message: &str, details: impl Into<String>) -> ParseError {
    ParseError {
        message: message.to_owned(),
        details: details.into(),
    }
}

/// One item of `select=`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Item {
    /// `*`: every column the caller may read.
    Star,
    /// `alias:column::cast`.
    Column {
        name: String,
        alias: Option<String>,
        cast: Option<String>,
    },
    /// `alias:table!hint(items)`: rows of another table joined by a foreign key.
    Embed {
        table: String,
        alias: Option<String>,
        hint: Option<String>,
        /// `!inner`: only rows that have a (matching) embedded row.
        inner: bool,
        /// `...table(items)`: the embedded columns become the row's own (a
        /// value for a to-one relationship, an array of values for a to-many).
        spread: bool,
        items: Vec<Item>,
    },
}

/// A comparison operator of a filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Eq,
    Neq,
    Gt,
    Gte,
    Lt,
    Lte,
    Like,
    Ilike,
    Is,
    In,
    Cs,
    Cd,
    /// `match`, `imatch`: POSIX regular expressions (`~`, `~*`).
    Match,
    Imatch,
    /// Range operators: `sl` `<<`, `sr` `>>`, `nxr` `&<`, `nxl` `&>`, `adj`
    /// `-|-`, `ov` `&&` (ranges and arrays).
    Sl,
    Sr,
    Nxr,
    Nxl,
    Adj,
    Ov,
    /// Full-text search: `fts` (`to_tsquery`), `plfts` (`plainto_tsquery`),
    /// `phfts` (`phraseto_tsquery`), `wfts` (`websearch_to_tsquery`), each
    /// with an optional text search configuration: `fts(english).cat`.
    Fts(Fts),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fts {
    Query,
    Plain,
    Phrase,
    Web,
}

impl Fts {
    pub(crate) fn function(self) -> &'static str {
        match self {
            Fts::Query => "to_tsquery",
            Fts::Plain => "plainto_tsquery",
            Fts::Phrase => "phraseto_tsquery",
            Fts::Web => "websearch_to_tsquery",
        }
    }
}

impl Op {
    fn parse(s: &str) -> Option<Op> {
        Some(match s {
            "match" => Op::Match,
            "imatch" => Op::Imatch,
            "sl" => Op::Sl,
            "sr" => Op::Sr,
            "nxr" => Op::Nxr,
            "nxl" => Op::Nxl,
            "adj" => Op::Adj,
            "ov" => Op::Ov,
            "fts" => Op::Fts(Fts::Query),
            "plfts" => Op::Fts(Fts::Plain),
            "phfts" => Op::Fts(Fts::Phrase),
            "wfts" => Op::Fts(Fts::Web),
            "eq" => Op::Eq,
            "neq" => Op::Neq,
            "gt" => Op::Gt,
            "gte" => Op::Gte,
            "lt" => Op::Lt,
            "lte" => Op::Lte,
            "like" => Op::Like,
            "ilike" => Op::Ilike,
            "is" => Op::Is,
            "in" => Op::In,
            "cs" => Op::Cs,
            "cd" => Op::Cd,
            _ => return None,
        })
    }
}

/// The right-hand side of a filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Operand {
    One(String),
    /// A full-text query and its configuration, if named.
    Search {
        config: Option<String>,
        query: String,
    },
    List(Vec<String>),
    /// `is.null|true|false|unknown`.
    Is(IsValue),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IsValue {
    Null,
    True,
    False,
    Unknown,
}

/// A condition on rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Cond {
    Filter {
        column: String,
        negated: bool,
        op: Op,
        operand: Operand,
    },
    And(Vec<Cond>, bool),
    Or(Vec<Cond>, bool),
}

/// One term of `order=`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Order {
    pub column: String,
    pub desc: bool,
    /// `Some(true)`: `nullsfirst`; `Some(false)`: `nullslast`.
    pub nulls_first: Option<bool>,
}

/// Filters, order and paging of an embedded resource (`todos.done=eq.true`,
/// `todos.order=title`, `todos.limit=2`), by its name in `select` (alias or
/// table), and of the resources embedded in it (`lists.todos.done=…`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Embedded {
    pub filters: Vec<Cond>,
    pub order: Vec<Order>,
    pub limit: Option<u64>,
    pub offset: Option<u64>,
    pub embedded: std::collections::BTreeMap<String, Embedded>,
}

/// What the URL asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Query {
    pub select: Vec<Item>,
    pub filters: Vec<Cond>,
    pub order: Vec<Order>,
    pub limit: Option<u64>,
    pub offset: Option<u64>,
    pub on_conflict: Option<Vec<String>>,
    pub columns: Option<Vec<String>>,
    pub embedded: std::collections::BTreeMap<String, Embedded>,
}

/// Parameters that are not filters.
const RESERVED: &[&str] = &[
    "select",
    "order",
    "limit",
    "offset",
    "on_conflict",
    "columns",
    "apikey",
];

/// Parses a query string (still percent-encoded).
pub(crate) fn parse(query: &str) -> Result<Query, ParseError> {
    let mut q = Query::default();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let k = super::super::decode_component(k);
        let v = super::super::decode_component(v);
        match k.as_str() {
            "select" => q.select = parse_select(&v, 0)?,
            "order" => q.order = parse_order(&v)?,
            "limit" => q.limit = Some(number("limit", &v)?),
            "offset" => q.offset = Some(number("offset", &v)?),
            "on_conflict" => q.on_conflict = Some(names(&v)?),
            "columns" => q.columns = Some(names(&v)?),
            _ if RESERVED.contains(&k.as_str()) => {}
            "or" | "and" | "not.or" | "not.and" => q.filters.push(logic_tree(&k, &k, &v)?),
            _ => match embedded_path(&k)? {
                // `todos.done=eq.true`, `todos.order=…`, `lists.todos.limit=…`:
                // an embedded resource's (a dot inside a JSON path,
                // `data->>a.b`, is the key's).
                (ref path, rest) if let Some((first, below)) = path.split_first() => {
                    let mut e = q.embedded.entry((*first).to_owned()).or_default();
                    for name in below {
                        e = e.embedded.entry((*name).to_owned()).or_default();
                    }
                    match rest {
                        "order" => e.order = parse_order(&v)?,
                        "limit" => e.limit = Some(number("limit", &v)?),
                        "offset" => e.offset = Some(number("offset", &v)?),
                        "or" | "and" | "not.or" | "not.and" => {
                            e.filters.push(logic_tree(rest, &k, &v)?);
                        }
                        column => {
                            ident(column)?;
                            e.filters.push(parse_filter(column.to_owned(), &v)?);
                        }
                    }
                }
                _ => {
                    ident(&k)?;
                    q.filters.push(parse_filter(k, &v)?);
                }
            },
        }
    }
    Ok(q)
}

/// Splits `a.b.rest` into the embedded resources' path (`a`, `b`) and what is
/// given for the last of them: `order`, `limit`, `offset`, `or`, `and`,
/// `not.or`, `not.and` or a column. A segment with `->` starts a JSON path,
/// which may hold dots, so the path ends before it.
fn embedded_path(k: &str) -> Result<(Vec<&str>, &str), ParseError> {
    const GIVEN: &[&str] = &["order", "limit", "offset", "or", "and", "not.or", "not.and"];
    let mut path = Vec::new();
    let mut rest = k;
    while let Some((head, tail)) = rest.split_once('.') {
        if head.is_empty() || head.contains("->") || GIVEN.contains(&rest) {
            break;
        }
        path.push(ident(head)?);
        rest = tail;
    }
    too_deep(path.len(), "an embedded resource's path")?;
    Ok((path, rest))
}

fn number(name: &str, v: &str) -> Result<u64, ParseError> {
    v.parse()
        .map_err(|_| fail(&format!("failed to parse {name} parameter"), v))
}

/// A column name with a JSON path, as PostgREST writes it: `data->a->>b` is
/// the column `data`, then the steps (`->>`: as text) and their keys. A plain
/// name has no steps. A key of digits (with an optional `-`) is an array
/// index.
pub(crate) fn json_path(name: &str) -> (&str, Vec<(bool, &str)>) {
    let Some(first) = name.find("->") else {
        return (name, Vec::new());
    };
    let mut steps = Vec::new();
    let mut rest = &name[first..];
    while let Some(r) = rest.strip_prefix("->") {
        let (text, r) = match r.strip_prefix('>') {
            Some(r) => (true, r),
            None => (false, r),
        };
        let end = r.find("->").unwrap_or(r.len());
        steps.push((text, &r[..end]));
        rest = &r[end..];
    }
    (&name[..first], steps)
}

/// The name a selected column is returned under: its last JSON key, or itself.
pub(crate) fn output_name(name: &str) -> &str {
    match json_path(name).1.last() {
        Some((_, key)) => key,
        None => name,
    }
}

/// A column or table name: anything printable but the grammar's punctuation.
/// A column may carry a JSON path (`data->a->>b`); each key must be non-empty.
fn ident(s: &str) -> Result<&str, ParseError> {
    let bad = |c: char| c.is_control() || matches!(c, ',' | '(' | ')' | ':' | '"' | '!');
    let (base, steps) = json_path(s);
    if base.is_empty()
        || base.len() > 63
        || s.len() > 255
        || s.contains(bad)
        || steps
            .iter()
            .any(|(_, k)| k.is_empty() || k.len() > 63 || k.contains('\\'))
    {
        return Err(fail("failed to parse name", s));
    }
    Ok(s)
}

/// A name as the client wrote it: bare, or in double quotes (postgrest-js
/// quotes the `columns` of a bulk insert).
fn name(s: &str) -> Result<String, ParseError> {
    let s = s.trim();
    let bare = s
        .strip_prefix('"')
        .and_then(|r| r.strip_suffix('"'))
        .unwrap_or(s);
    ident(bare).map(str::to_owned)
}

fn names(v: &str) -> Result<Vec<String>, ParseError> {
    v.split(',').map(name).collect()
}

/// A type name for `::cast`: one word (with `[]`), or a few known multi-word ones.
fn cast_type(s: &str) -> Result<String, ParseError> {
    const MULTI: &[&str] = &[
        "double precision",
        "character varying",
        "timestamp with time zone",
        "timestamp without time zone",
        "time with time zone",
        "time without time zone",
    ];
    let lower = s.trim().to_ascii_lowercase();
    let base = lower.strip_suffix("[]").unwrap_or(&lower);
    let word = !base.is_empty()
        && base.len() <= 63
        && base.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && base
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if word || MULTI.contains(&base) {
        Ok(lower)
    } else {
        Err(fail("failed to parse cast", s))
    }
}

/// Splits at commas outside parentheses and double quotes.
/// `or=(…)`, `and=(…)`, `not.or=(…)`, `not.and=(…)`: `op` is which, `key`
/// the whole key (for the error).
fn logic_tree(op: &str, key: &str, v: &str) -> Result<Cond, ParseError> {
    let negated = op.starts_with("not.");
    let inner = v
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| fail("failed to parse logic tree", format!("{key}={v}")))?;
    let conds = split_top(inner)?
        .iter()
        .map(|t| parse_tree_term(t, 0))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(if op.ends_with("or") {
        Cond::Or(conds, negated)
    } else {
        Cond::And(conds, negated)
    })
}

fn split_top(s: &str) -> Result<Vec<String>, ParseError> {
    let mut out = Vec::new();
    let (mut depth, mut quoted, mut cur) = (0usize, false, String::new());
    for c in s.chars() {
        match c {
            '"' => quoted = !quoted,
            '(' if !quoted => depth += 1,
            ')' if !quoted => {
                depth = depth
                    .checked_sub(1)
                    .ok_or_else(|| fail("unbalanced parentheses", s))?
            }
            ',' if !quoted && depth == 0 => {
                out.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    if depth != 0 || quoted {
        return Err(fail("unbalanced parentheses or quotes", s));
    }
    out.push(cur);
    Ok(out)
}

/// How deep `select` embeds and `or`/`and` trees may nest: parsing recurses, and
/// a URL of a few kilobytes could otherwise overflow the stack.
const MAX_DEPTH: usize = 16;

fn too_deep(depth: usize, what: &str) -> Result<(), ParseError> {
    if depth > MAX_DEPTH {
        return Err(fail(
            &format!("{what} nests too deeply"),
            format!("at most {MAX_DEPTH} levels"),
        ));
    }
    Ok(())
}

fn parse_select(v: &str, depth: usize) -> Result<Vec<Item>, ParseError> {
    too_deep(depth, "select")?;
    if v.trim().is_empty() {
        return Ok(vec![Item::Star]);
    }
    split_top(v)?
        .iter()
        .map(|t| parse_item(t.trim(), depth))
        .collect()
}

fn parse_item(t: &str, depth: usize) -> Result<Item, ParseError> {
    if t == "*" {
        return Ok(Item::Star);
    }
    // `...table(items)`: a spread embed, which has no name of its own.
    if let Some(rest) = t.strip_prefix("...") {
        // One spread, not a chain of them (each would recurse).
        if rest.starts_with('.') {
            return Err(fail("failed to parse select parameter", t));
        }
        return match parse_item(rest, depth)? {
            Item::Embed {
                table,
                alias: None,
                hint,
                inner,
                spread: false,
                items,
            } => Ok(Item::Embed {
                table,
                alias: None,
                hint,
                inner,
                spread: true,
                items,
            }),
            _ => Err(fail(
                "failed to parse select parameter",
                format!("{t}: only an embedded resource without an alias can be spread"),
            )),
        };
    }
    // `alias:rest`, the alias before the first `:` that is not part of `::`
    // and not inside an embed's parentheses (`books(t:title)`).
    let head = &t[..t.find('(').unwrap_or(t.len())];
    let (alias, rest) = match head.find(':') {
        Some(i) if !t[i..].starts_with("::") => {
            (Some(ident(t[..i].trim())?.to_owned()), &t[i + 1..])
        }
        _ => (None, t),
    };
    if let Some(open) = rest.find('(') {
        let inner = rest[open + 1..]
            .strip_suffix(')')
            .ok_or_else(|| fail("failed to parse select parameter", t))?;
        // `table!hint!inner`: a foreign key (or column) hint and the join kind.
        let mut parts = rest[..open].split('!');
        let table = parts.next().unwrap_or_default();
        let (mut hint, mut inner_join) = (None, false);
        for p in parts {
            match p {
                "inner" => inner_join = true,
                "left" => inner_join = false,
                h if hint.is_none() => hint = Some(ident(h)?.to_owned()),
                _ => return Err(fail("failed to parse select parameter", t)),
            }
        }
        return Ok(Item::Embed {
            table: ident(table.trim())?.to_owned(),
            alias,
            hint,
            inner: inner_join,
            spread: false,
            items: parse_select(inner, depth + 1)?,
        });
    }
    let (name, cast) = match rest.split_once("::") {
        Some((n, c)) => (n, Some(cast_type(c)?)),
        None => (rest, None),
    };
    Ok(Item::Column {
        name: self::name(name)?,
        alias,
        cast,
    })
}

fn parse_order(v: &str) -> Result<Vec<Order>, ParseError> {
    v.split(',')
        .filter(|t| !t.is_empty())
        .map(|t| {
            let mut parts = t.split('.');
            let column = ident(parts.next().unwrap_or_default())?.to_owned();
            let mut o = Order {
                column,
                desc: false,
                nulls_first: None,
            };
            for p in parts {
                match p {
                    "asc" => o.desc = false,
                    "desc" => o.desc = true,
                    "nullsfirst" => o.nulls_first = Some(true),
                    "nullslast" => o.nulls_first = Some(false),
                    _ => return Err(fail("failed to parse order", t)),
                }
            }
            Ok(o)
        })
        .collect()
}

/// `column=op.value` (or `not.op.value`).
fn parse_filter(column: String, v: &str) -> Result<Cond, ParseError> {
    let (negated, v) = match v.strip_prefix("not.") {
        Some(rest) => (true, rest),
        None => (false, v),
    };
    let (op, value) = v
        .split_once('.')
        .ok_or_else(|| fail("failed to parse filter", format!("{column}={v}")))?;
    // `fts(english)`: the operator and its text search configuration.
    let (op, config) = match op.split_once('(') {
        Some((name, rest)) => match rest.strip_suffix(')') {
            Some(cfg) if !cfg.is_empty() => (name, Some(cfg.to_owned())),
            _ => return Err(fail("failed to parse filter", format!("{column}={v}"))),
        },
        None => (op, None),
    };
    let op =
        Op::parse(op).ok_or_else(|| fail("unknown operator", format!("{op} in {column}={v}")))?;
    if config.is_some() && !matches!(op, Op::Fts(_)) {
        return Err(fail(
            "failed to parse filter",
            format!("only full-text operators take a configuration: {column}={v}"),
        ));
    }
    let operand = match op {
        Op::Fts(_) => Operand::Search {
            config,
            query: value.to_owned(),
        },
        Op::In => {
            let inner = value
                .strip_prefix('(')
                .and_then(|r| r.strip_suffix(')'))
                .ok_or_else(|| fail("failed to parse in list", value))?;
            let items = if inner.is_empty() {
                Vec::new()
            } else {
                split_top(inner)?.into_iter().map(unquote).collect()
            };
            Operand::List(items)
        }
        Op::Is => Operand::Is(match value.to_ascii_lowercase().as_str() {
            "null" => IsValue::Null,
            "true" => IsValue::True,
            "false" => IsValue::False,
            "unknown" => IsValue::Unknown,
            _ => return Err(fail("failed to parse is value", value)),
        }),
        Op::Like | Op::Ilike => Operand::One(value.replace('*', "%")),
        _ => Operand::One(value.to_owned()),
    };
    Ok(Cond::Filter {
        column,
        negated,
        op,
        operand,
    })
}

fn unquote(s: String) -> String {
    match s.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
        Some(inner) => inner.replace("\\\"", "\"").replace("\\\\", "\\"),
        None => s,
    }
}

/// A term inside `or=(…)`: `column.op.value`, or a nested `and(…)`/`or(…)`.
fn parse_tree_term(t: &str, depth: usize) -> Result<Cond, ParseError> {
    too_deep(depth, "logic tree")?;
    let t = t.trim();
    for (prefix, or, negated) in [
        ("or(", true, false),
        ("and(", false, false),
        ("not.or(", true, true),
        ("not.and(", false, true),
    ] {
        if let Some(inner) = t.strip_prefix(prefix).and_then(|r| r.strip_suffix(')')) {
            let conds = split_top(inner)?
                .iter()
                .map(|x| parse_tree_term(x, depth + 1))
                .collect::<Result<Vec<_>, _>>()?;
            return Ok(if or {
                Cond::Or(conds, negated)
            } else {
                Cond::And(conds, negated)
            });
        }
    }
    let (column, rest) = t
        .split_once('.')
        .ok_or_else(|| fail("failed to parse logic tree", t))?;
    ident(column)?;
    parse_filter(column.to_owned(), rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn col(name: &str) -> Item {
        Item::Column {
            name: name.into(),
            alias: None,
            cast: None,
        }
    }

    #[test]
    fn selects_with_renames_casts_and_embeds() {
        let q = parse("select=id,title:name,n::text,owner:users!owner_id(id,email)").unwrap();
        assert_eq!(
            q.select,
            vec![
                col("id"),
                Item::Column {
                    name: "name".into(),
                    alias: Some("title".into()),
                    cast: None
                },
                Item::Column {
                    name: "n".into(),
                    alias: None,
                    cast: Some("text".into())
                },
                Item::Embed {
                    table: "users".into(),
                    alias: Some("owner".into()),
                    hint: Some("owner_id".into()),
                    inner: false,
                    spread: false,
                    items: vec![col("id"), col("email")],
                },
            ]
        );
        let q = parse("select=title,...authors!fk!inner(n:name)").unwrap();
        assert_eq!(
            q.select[1],
            Item::Embed {
                table: "authors".into(),
                alias: None,
                hint: Some("fk".into()),
                inner: true,
                spread: true,
                items: vec![Item::Column {
                    name: "name".into(),
                    alias: Some("n".into()),
                    cast: None
                }],
            }
        );
        assert!(parse("select=...a:authors(name)").is_err());
        assert!(parse("select=...title").is_err());
        // A chain of spreads is refused before it recurses.
        assert!(parse(&format!("select={}a(b)", ".".repeat(60_000))).is_err());
        assert_eq!(parse("").unwrap().select, vec![]);
        assert!(parse("select=n::text;drop").is_err());
        assert!(parse("select=n::text union select 1").is_err());
        assert!(parse("select=n::double precision").is_ok());
        let q = parse("columns=%22title%22,%22rank%22&select=%22title%22").unwrap();
        assert_eq!(q.columns, Some(vec!["title".to_owned(), "rank".to_owned()]));
        assert_eq!(q.select, vec![col("title")]);
    }

    #[test]
    fn filters_logic_trees_and_order() {
        let q = parse("age=gte.18&name=not.like.A*&id=in.(1,2,\"a,b\")&done=is.null&or=(a.eq.1,and(b.gt.2,c.lt.3))&order=age.desc.nullslast,name&limit=10&offset=5")
            .unwrap();
        assert_eq!(q.filters.len(), 5);
        assert_eq!(
            q.filters[1],
            Cond::Filter {
                column: "name".into(),
                negated: true,
                op: Op::Like,
                operand: Operand::One("A%".into())
            }
        );
        assert_eq!(
            q.filters[2],
            Cond::Filter {
                column: "id".into(),
                negated: false,
                op: Op::In,
                operand: Operand::List(vec!["1".into(), "2".into(), "a,b".into()])
            }
        );
        assert!(matches!(&q.filters[4], Cond::Or(v, false) if v.len() == 2));
        assert_eq!(
            q.order[0],
            Order {
                column: "age".into(),
                desc: true,
                nulls_first: Some(false)
            }
        );
        assert_eq!((q.limit, q.offset), (Some(10), Some(5)));
        assert!(parse("age=between.1").is_err());
        assert!(parse("or=(a.eq.1").is_err());
        assert!(parse("limit=ten").is_err());
        // Deep nesting is refused, not recursed into.
        let deep = format!("select={}a{}", "a(".repeat(5000), ")".repeat(5000));
        assert!(parse(&deep).is_err());
        let deep = format!("or=({}a.eq.1{})", "or(".repeat(5000), ")".repeat(5000));
        assert!(parse(&deep).is_err());
        assert!(parse(&format!("select={}a{}", "a(".repeat(10), ")".repeat(10))).is_ok());
    }

    #[test]
    fn an_alias_inside_an_embed_is_the_embedded_columns() {
        let q = parse("select=books(t:title,n:count),w:books!inner(y:year::text)").unwrap();
        let Item::Embed { alias, items, .. } = &q.select[0] else {
            panic!("{:?}", q.select)
        };
        assert_eq!(alias, &None);
        assert_eq!(
            items[0],
            Item::Column {
                name: "title".into(),
                alias: Some("t".into()),
                cast: None
            }
        );
        let Item::Embed {
            alias,
            inner,
            items,
            ..
        } = &q.select[1]
        else {
            panic!("{:?}", q.select)
        };
        assert_eq!((alias.as_deref(), *inner), (Some("w"), true));
        assert!(
            matches!(&items[0], Item::Column { alias: Some(a), cast: Some(_), .. } if a == "y")
        );
    }

    #[test]
    fn embedded_resources_at_any_depth() {
        let q = parse(
            "lists.todos.done=eq.true&lists.todos.order=rank.desc&lists.todos.limit=2\
             &lists.todos.not.or=(a.eq.1,b.eq.2)&lists.name=eq.x&lists.offset=1\
             &lists.todos.data->>a.b=eq.1&data->>x.y=eq.2",
        )
        .unwrap();
        let lists = &q.embedded["lists"];
        assert_eq!((lists.filters.len(), lists.offset), (1, Some(1)));
        let todos = &lists.embedded["todos"];
        assert_eq!((todos.filters.len(), todos.limit), (3, Some(2)));
        assert!(matches!(&todos.filters[1], Cond::Or(v, true) if v.len() == 2));
        assert!(matches!(&todos.filters[2], Cond::Filter { column, .. } if column == "data->>a.b"));
        assert!(todos.order[0].desc);
        // A dot inside a JSON path is the key's, at the top level too.
        assert!(matches!(&q.filters[..], [Cond::Filter { column, .. }] if column == "data->>x.y"));
        // A path is as deep as a select may nest, no deeper.
        assert!(parse(&format!("{}c=eq.1", "a.".repeat(16))).is_ok());
        assert!(parse(&format!("{}c=eq.1", "a.".repeat(17))).is_err());
        assert!(parse("a(b.c=eq.1").is_err());
    }

    proptest::proptest! {
        /// Whatever the URL, parsing ends in a plan or an error, and every name
        /// in a plan is free of the characters that could end a quoted identifier.
        #[test]
        fn any_query_parses_or_fails_cleanly(s in "\\PC{0,120}") {
            if let Ok(q) = parse(&s) {
                for c in &q.filters {
                    if let Cond::Filter { column, .. } = c {
                        proptest::prop_assert!(!column.contains('"'));
                    }
                }
            }
        }
    }
}
