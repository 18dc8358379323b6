//! RLS policy expressions, as `pg_policies.qual` prints them, compiled into
//! predicates evaluated on a decoded row with no query.
//!
//! Only shapes whose result is certain without PostgreSQL compile: a column
//! compared with `auth.uid()`, a JWT claim, `auth.role()` or a constant;
//! `IS [NOT] NULL/TRUE/FALSE`; `= ANY (ARRAY[…])`; `AND`, `OR`, `NOT`; and
//! membership through another table (`col IN (SELECT m.k FROM s.m WHERE m.u =
//! auth.uid())`, or its `EXISTS` form). Anything else (a function, a text
//! ordering that depends on collation, a type we do not model) is refused with
//! the reason, and the table is evaluated in PostgreSQL instead.
//!
//! The text comes from PostgreSQL, so nothing here may panic on it: parsing is
//! bounded in depth and every unexpected token is an error.

use std::borrow::Cow;
use std::collections::HashMap;

use aether_core::changes::{Relation, Row};
use aether_core::principal::Principal;
use serde_json::Value;

/// How deep an expression may nest before we refuse it.
const MAX_DEPTH: usize = 48;

// ---------------------------------------------------------------- tokens

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    /// A bare word (lower-cased) or a quoted identifier (as written).
    Ident(String, bool),
    Str(String),
    Num(String),
    Punct(&'static str),
}

fn tokenize(s: &str) -> Result<Vec<Tok>, String> {
    let b = s.as_bytes();
    let mut i = 0;
    let mut out = Vec::new();
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        if c == b'\'' {
            let mut v = Vec::new();
            i += 1;
            loop {
                match b.get(i) {
                    None => return Err("unterminated string".into()),
                    Some(b'\'') if b.get(i + 1) == Some(&b'\'') => {
                        v.push(b'\'');
                        i += 2;
                    }
                    Some(b'\'') => {
                        i += 1;
                        break;
                    }
                    Some(&x) => {
                        v.push(x);
                        i += 1;
                    }
                }
            }
            out.push(Tok::Str(String::from_utf8(v).map_err(|_| "bad string")?));
            continue;
        }
        if c == b'"' {
            let mut v = Vec::new();
            i += 1;
            loop {
                match b.get(i) {
                    None => return Err("unterminated identifier".into()),
                    Some(b'"') if b.get(i + 1) == Some(&b'"') => {
                        v.push(b'"');
                        i += 2;
                    }
                    Some(b'"') => {
                        i += 1;
                        break;
                    }
                    Some(&x) => {
                        v.push(x);
                        i += 1;
                    }
                }
            }
            out.push(Tok::Ident(
                String::from_utf8(v).map_err(|_| "bad identifier")?,
                true,
            ));
            continue;
        }
        if c.is_ascii_digit() {
            let start = i;
            while i < b.len() && (b[i].is_ascii_digit() || b[i] == b'.') {
                i += 1;
            }
            out.push(Tok::Num(s[start..i].to_owned()));
            continue;
        }
        if c.is_ascii_alphabetic() || c == b'_' {
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b'$') {
                i += 1;
            }
            if b.get(i) == Some(&b'\'') {
                // E'…', B'…', U&'…': escapes we do not model.
                return Err(format!("a {} string", &s[start..i]));
            }
            out.push(Tok::Ident(s[start..i].to_ascii_lowercase(), false));
            continue;
        }
        const PUNCT: [&str; 16] = [
            "->>", "->", "::", "<>", "!=", "<=", ">=", "=", "<", ">", "(", ")", ",", "[", "]", ".",
        ];
        match PUNCT.iter().find(|p| s[i..].starts_with(**p)) {
            Some(p) => {
                out.push(Tok::Punct(p));
                i += p.len();
            }
            None => {
                let ch = s[i..].chars().next().unwrap_or('?');
                return Err(format!("operator or symbol {ch:?}"));
            }
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------- syntax

/// The expression as written, before it is checked against the table.
#[derive(Debug, Clone, PartialEq)]
enum Node {
    And(Vec<Node>),
    Or(Vec<Node>),
    Not(Box<Node>),
    Cmp(&'static str, Box<Node>, Box<Node>),
    /// `x = ANY (ARRAY[…])`.
    AnyOf(Box<Node>, Vec<Node>),
    /// `x IN (SELECT …)` or `x = ANY (ARRAY(SELECT …))`.
    InSelect(Box<Node>, Box<Select>),
    Exists(Box<Select>),
    /// `x IS [NOT] NULL|TRUE|FALSE`: (operand, what, negated).
    Is(Box<Node>, Option<bool>, bool),
    /// A column: `name` or `qualifier.name`.
    Column(Vec<String>),
    Func(Vec<String>),
    Str(String),
    Num(String),
    Bool(bool),
    Null,
    Cast(Box<Node>, String),
    /// `->` (false) or `->>` (true).
    Json(Box<Node>, Box<Node>, bool),
    /// `( SELECT x AS y )` with no FROM: just `x`.
    Scalar(Box<Select>),
}

#[derive(Debug, Clone, PartialEq)]
struct Select {
    target: Node,
    /// (schema, table, alias)
    from: Option<(String, String, String)>,
    filter: Option<Node>,
}

struct Parser {
    toks: Vec<Tok>,
    at: usize,
    depth: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.at)
    }

    fn next(&mut self) -> Option<Tok> {
        let t = self.toks.get(self.at).cloned();
        self.at += 1;
        t
    }

    fn is_kw(&self, kw: &str) -> bool {
        matches!(self.peek(), Some(Tok::Ident(w, false)) if w == kw)
    }

    fn is_punct(&self, p: &str) -> bool {
        matches!(self.peek(), Some(Tok::Punct(q)) if *q == p)
    }

    fn eat_kw(&mut self, kw: &str) -> bool {
        let yes = self.is_kw(kw);
        if yes {
            self.at += 1;
        }
        yes
    }

    fn eat_punct(&mut self, p: &str) -> bool {
        let yes = self.is_punct(p);
        if yes {
            self.at += 1;
        }
        yes
    }

    fn expect_punct(&mut self, p: &str) -> Result<(), String> {
        if self.eat_punct(p) {
            Ok(())
        } else {
            Err(format!("expected {p:?} at {:?}", self.peek()))
        }
    }

    fn deeper(&mut self) -> Result<(), String> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err("nested too deeply".into());
        }
        Ok(())
    }

    fn or(&mut self) -> Result<Node, String> {
        self.deeper()?;
        let mut parts = vec![self.and()?];
        while self.eat_kw("or") {
            parts.push(self.and()?);
        }
        self.depth -= 1;
        Ok(if parts.len() == 1 {
            parts.remove(0)
        } else {
            Node::Or(parts)
        })
    }

    fn and(&mut self) -> Result<Node, String> {
        let mut parts = vec![self.not()?];
        while self.eat_kw("and") {
            parts.push(self.not()?);
        }
        Ok(if parts.len() == 1 {
            parts.remove(0)
        } else {
            Node::And(parts)
        })
    }

    fn not(&mut self) -> Result<Node, String> {
        if self.eat_kw("not") {
            self.deeper()?;
            let inner = self.not()?;
            self.depth -= 1;
            return Ok(Node::Not(Box::new(inner)));
        }
        self.is()
    }

    fn is(&mut self) -> Result<Node, String> {
        let left = self.cmp()?;
        if self.eat_kw("is") {
            let negated = self.eat_kw("not");
            let what = match self.next() {
                Some(Tok::Ident(w, false)) if w == "null" => None,
                Some(Tok::Ident(w, false)) if w == "true" => Some(true),
                Some(Tok::Ident(w, false)) if w == "false" => Some(false),
                t => return Err(format!("IS {t:?}")),
            };
            return Ok(Node::Is(Box::new(left), what, negated));
        }
        Ok(left)
    }

    fn cmp(&mut self) -> Result<Node, String> {
        let left = self.json()?;
        if self.eat_kw("in") {
            self.expect_punct("(")?;
            if self.is_kw("select") {
                let sel = self.select()?;
                self.expect_punct(")")?;
                return Ok(Node::InSelect(Box::new(left), Box::new(sel)));
            }
            let mut items = vec![self.json()?];
            while self.eat_punct(",") {
                items.push(self.json()?);
            }
            self.expect_punct(")")?;
            return Ok(Node::AnyOf(Box::new(left), items));
        }
        for op in ["=", "<>", "!=", "<=", ">=", "<", ">"] {
            if self.eat_punct(op) {
                let op = if op == "!=" { "<>" } else { op };
                if op == "=" && self.eat_kw("any") {
                    self.expect_punct("(")?;
                    if !self.eat_kw("array") {
                        return Err("= ANY of something other than an ARRAY".into());
                    }
                    let node = if self.eat_punct("[") {
                        let mut items = vec![self.json()?];
                        while self.eat_punct(",") {
                            items.push(self.json()?);
                        }
                        self.expect_punct("]")?;
                        Node::AnyOf(Box::new(left), items)
                    } else {
                        self.expect_punct("(")?;
                        let sel = self.select()?;
                        self.expect_punct(")")?;
                        Node::InSelect(Box::new(left), Box::new(sel))
                    };
                    self.expect_punct(")")?;
                    return Ok(node);
                }
                let right = self.json()?;
                return Ok(Node::Cmp(op, Box::new(left), Box::new(right)));
            }
        }
        Ok(left)
    }

    fn json(&mut self) -> Result<Node, String> {
        let start = self.depth;
        let mut left = self.postfix()?;
        loop {
            let text = if self.eat_punct("->>") {
                true
            } else if self.eat_punct("->") {
                false
            } else {
                self.depth = start;
                return Ok(left);
            };
            // Each step nests the tree one deeper: bounded like parentheses.
            self.deeper()?;
            let right = self.postfix()?;
            left = Node::Json(Box::new(left), Box::new(right), text);
        }
    }

    fn postfix(&mut self) -> Result<Node, String> {
        let start = self.depth;
        let mut node = self.primary()?;
        while self.eat_punct("::") {
            self.deeper()?;
            node = Node::Cast(Box::new(node), self.type_name()?);
        }
        self.depth = start;
        Ok(node)
    }

    fn type_name(&mut self) -> Result<String, String> {
        let mut words = Vec::new();
        while let Some(Tok::Ident(w, _)) = self.peek() {
            // `double precision`, `character varying`, `timestamp with time zone`.
            words.push(w.clone());
            self.at += 1;
            if self.eat_punct(".") {
                words.push(".".into());
            }
            if !matches!(
                words.last().map(String::as_str),
                Some("double" | "character" | ".")
            ) {
                break;
            }
        }
        if self.is_punct("(") || self.is_punct("[") {
            return Err("a type with modifiers or an array type".into());
        }
        if words.is_empty() {
            return Err("a cast to nothing".into());
        }
        Ok(words.join(" ").replace(" . ", "."))
    }

    fn primary(&mut self) -> Result<Node, String> {
        match self.next() {
            Some(Tok::Str(s)) => Ok(Node::Str(s)),
            Some(Tok::Num(n)) => Ok(Node::Num(n)),
            Some(Tok::Punct("(")) => {
                self.deeper()?;
                let node = if self.is_kw("select") {
                    let sel = self.select()?;
                    Node::Scalar(Box::new(sel))
                } else {
                    self.or()?
                };
                self.expect_punct(")")?;
                self.depth -= 1;
                Ok(node)
            }
            Some(Tok::Ident(w, false)) if w == "true" => Ok(Node::Bool(true)),
            Some(Tok::Ident(w, false)) if w == "false" => Ok(Node::Bool(false)),
            Some(Tok::Ident(w, false)) if w == "null" => Ok(Node::Null),
            Some(Tok::Ident(w, false)) if w == "exists" => {
                self.expect_punct("(")?;
                let sel = self.select()?;
                self.expect_punct(")")?;
                Ok(Node::Exists(Box::new(sel)))
            }
            Some(Tok::Ident(first, _)) => {
                let mut parts = vec![first];
                while self.eat_punct(".") {
                    match self.next() {
                        Some(Tok::Ident(w, _)) => parts.push(w),
                        t => return Err(format!("a name part {t:?}")),
                    }
                }
                if self.eat_punct("(") {
                    if !self.eat_punct(")") {
                        return Err(format!("function {} with arguments", parts.join(".")));
                    }
                    return Ok(Node::Func(parts));
                }
                Ok(Node::Column(parts))
            }
            t => Err(format!("unexpected {t:?}")),
        }
    }

    /// `SELECT target [AS alias] [FROM schema.table [alias] [WHERE cond]]`.
    fn select(&mut self) -> Result<Select, String> {
        if !self.eat_kw("select") {
            return Err("expected SELECT".into());
        }
        self.deeper()?;
        let target = self.or()?;
        if self.eat_kw("as") {
            self.next();
        }
        let mut from = None;
        let mut filter = None;
        if self.eat_kw("from") {
            let (schema, table) = match (self.next(), self.eat_punct("."), self.next()) {
                (Some(Tok::Ident(s, _)), true, Some(Tok::Ident(t, _))) => (s, t),
                _ => return Err("FROM a table not named schema.table".into()),
            };
            let alias = match self.peek() {
                Some(Tok::Ident(a, quoted)) if *quoted || !matches!(a.as_str(), "where") => {
                    let a = a.clone();
                    self.at += 1;
                    a
                }
                _ => table.clone(),
            };
            from = Some((schema, table, alias));
            if self.eat_kw("where") {
                filter = Some(self.or()?);
            }
        }
        self.depth -= 1;
        if !self.is_punct(")") {
            return Err(format!(
                "a subquery with more than SELECT … FROM … WHERE: {:?}",
                self.peek()
            ));
        }
        Ok(Select {
            target,
            from,
            filter,
        })
    }
}

fn parse(text: &str) -> Result<Node, String> {
    let mut p = Parser {
        toks: tokenize(text)?,
        at: 0,
        depth: 0,
    };
    let node = p.or()?;
    if p.at != p.toks.len() {
        return Err(format!("trailing {:?}", p.peek()));
    }
    Ok(node)
}

// ---------------------------------------------------------------- compiled

/// The kinds of value a compiled predicate compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ty {
    Bool,
    Num,
    Text,
    Uuid,
}

impl Ty {
    /// A column type we model, by `pg_type.typname`.
    pub(crate) fn of_typname(name: &str) -> Option<Ty> {
        Some(match name {
            "bool" => Ty::Bool,
            "int2" | "int4" | "int8" | "float4" | "float8" | "numeric" | "oid" => Ty::Num,
            "text" | "varchar" | "name" => Ty::Text,
            "uuid" => Ty::Uuid,
            _ => return None,
        })
    }

    fn of_cast(name: &str) -> Option<Ty> {
        Some(match name {
            "boolean" | "bool" => Ty::Bool,
            "integer" | "bigint" | "smallint" | "numeric" | "int" | "int4" | "int8" | "int2"
            | "double precision" | "real" => Ty::Num,
            "text" | "character varying" | "varchar" | "name" => Ty::Text,
            "uuid" => Ty::Uuid,
            _ => return None,
        })
    }
}

/// Where a membership policy looks: `key` of rows of `table` whose `user`
/// column is the viewer's id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct MembershipSpec {
    /// `schema.table`.
    pub table: String,
    pub user: String,
    pub key: String,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Operand {
    Column(String),
    Uid,
    Role,
    /// A claim of the token, by path; as text (`->>`) or JSON (`->`).
    Claim(Vec<String>, bool),
    Const(Val),
    Cast(Box<Operand>, Ty),
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Val {
    Null,
    Bool(bool),
    /// An integer, compared exactly (a bigint beyond 2^53 included).
    Int(i64),
    Num(f64),
    Text(String),
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Pred {
    Const(bool),
    And(Vec<Pred>),
    Or(Vec<Pred>),
    Not(Box<Pred>),
    Cmp(&'static str, Operand, Operand),
    AnyOf(Operand, Vec<Operand>),
    Is(Operand, Option<bool>, bool),
    Truthy(Operand),
    /// The operand is among the keys of the viewer's memberships (index
    /// `usize`); `true`: the `EXISTS` form, never NULL (`IN` is NULL for a
    /// NULL operand, or a NULL key, when nothing matches).
    Member(Operand, usize, bool),
}

/// What the compiler knows of the table: its name and column types.
pub(crate) struct TableShape<'a> {
    pub schema: &'a str,
    pub name: &'a str,
    /// Column name → its type, when we model it (`None`: a type we do not).
    pub columns: &'a HashMap<String, Option<Ty>>,
}

/// Membership specs the compiled predicates refer to, by index.
#[derive(Default, Debug)]
pub(crate) struct Specs(pub Vec<MembershipSpec>);

impl Specs {
    fn id(&mut self, spec: MembershipSpec) -> usize {
        match self.0.iter().position(|s| *s == spec) {
            Some(i) => i,
            None => {
                self.0.push(spec);
                self.0.len() - 1
            }
        }
    }
}

/// Compiles one policy's `qual` text. `specs` collects the membership tables
/// it needs.
pub(crate) fn compile(
    text: &str,
    table: &TableShape<'_>,
    specs: &mut Specs,
) -> Result<Pred, String> {
    let node = parse(text)?;
    let mut c = Compiler { table, specs };
    c.pred(&node)
}

struct Compiler<'a, 'b> {
    table: &'a TableShape<'b>,
    specs: &'a mut Specs,
}

impl Compiler<'_, '_> {
    fn pred(&mut self, n: &Node) -> Result<Pred, String> {
        Ok(match n {
            Node::Bool(b) => Pred::Const(*b),
            Node::Null => Pred::Const(false),
            Node::And(v) => Pred::And(v.iter().map(|x| self.pred(x)).collect::<Result<_, _>>()?),
            Node::Or(v) => Pred::Or(v.iter().map(|x| self.pred(x)).collect::<Result<_, _>>()?),
            Node::Not(x) => Pred::Not(Box::new(self.pred(x)?)),
            Node::Cmp(op, a, b) => {
                let (a, ta) = self.operand(a)?;
                let (b, tb) = self.operand(b)?;
                let ty = unify(ta, tb).ok_or_else(|| format!("{ta:?} compared with {tb:?}"))?;
                if *op != "=" && *op != "<>" && ty != Some(Ty::Num) {
                    return Err(format!(
                        "{op} on {ty:?} values (text order follows the collation)"
                    ));
                }
                Pred::Cmp(op, a, b)
            }
            Node::AnyOf(a, items) => {
                let (a, ta) = self.operand(a)?;
                let mut out = Vec::new();
                for i in items {
                    let (i, ti) = self.operand(i)?;
                    unify(ta, ti).ok_or_else(|| format!("{ta:?} among {ti:?}"))?;
                    out.push(i);
                }
                Pred::AnyOf(a, out)
            }
            Node::Is(x, what, neg) => {
                let (x, t) = self.operand(x)?;
                if what.is_some() && !matches!(t, Some(Ty::Bool) | None) {
                    return Err("IS TRUE/FALSE on a value that is not boolean".into());
                }
                Pred::Is(x, *what, *neg)
            }
            Node::InSelect(x, sel) => {
                let (x, tx) = self.operand(x)?;
                let spec = self.membership_in(sel)?;
                if !matches!(tx, Some(Ty::Num | Ty::Text | Ty::Uuid) | None) {
                    return Err("membership on a value that is not a key".into());
                }
                Pred::Member(x, self.specs.id(spec), false)
            }
            Node::Exists(sel) => {
                let (outer, spec) = self.membership_exists(sel)?;
                Pred::Member(outer, self.specs.id(spec), true)
            }
            Node::Column(_) | Node::Cast(..) => {
                let (x, t) = self.operand(n)?;
                if t != Some(Ty::Bool) {
                    return Err("a value used as a condition is not boolean".into());
                }
                Pred::Truthy(x)
            }
            other => return Err(format!("{other:?} as a condition")),
        })
    }

    /// An operand and its static type (`None`: an untyped literal or NULL).
    fn operand(&mut self, n: &Node) -> Result<(Operand, Option<Ty>), String> {
        Ok(match n {
            Node::Column(parts) => {
                let name = self.own_column(parts)?;
                let ty = match self.table.columns.get(&name) {
                    None => return Err(format!("no column {name}")),
                    Some(None) => return Err(format!("column {name} has a type we do not model")),
                    Some(Some(t)) => *t,
                };
                (Operand::Column(name), Some(ty))
            }
            Node::Func(f) if f == &["auth", "uid"] => (Operand::Uid, Some(Ty::Uuid)),
            Node::Func(f) if f == &["auth", "role"] => (Operand::Role, Some(Ty::Text)),
            Node::Func(f) => return Err(format!("function {}()", f.join("."))),
            Node::Scalar(sel) if sel.from.is_none() && sel.filter.is_none() => {
                self.operand(&sel.target)?
            }
            Node::Str(s) => (Operand::Const(Val::Text(s.clone())), None),
            Node::Num(x) => (
                Operand::Const(match x.parse::<i64>() {
                    Ok(i) => Val::Int(i),
                    Err(_) => Val::Num(x.parse().map_err(|_| format!("number {x}"))?),
                }),
                Some(Ty::Num),
            ),
            Node::Bool(b) => (Operand::Const(Val::Bool(*b)), Some(Ty::Bool)),
            Node::Null => (Operand::Const(Val::Null), None),
            Node::Cast(x, ty) => {
                let to = Ty::of_cast(ty).ok_or_else(|| format!("a cast to {ty}"))?;
                let (x, from) = self.operand(x)?;
                // A literal cast is folded now, so a bad one fails here.
                if let Operand::Const(v) = &x {
                    let v = cast(v, to).map_err(|e| format!("constant: {e}"))?;
                    return Ok((Operand::Const(v), Some(to)));
                }
                match (from, to) {
                    (Some(f), t) if f == t => return Ok((x, Some(t))),
                    (Some(Ty::Num), Ty::Num) | (None, _) => {}
                    (Some(Ty::Uuid), Ty::Text) | (Some(Ty::Text), Ty::Uuid) => {}
                    (Some(Ty::Text), Ty::Num | Ty::Bool) => {}
                    (f, t) => return Err(format!("a cast from {f:?} to {t:?}")),
                }
                (Operand::Cast(Box::new(x), to), Some(to))
            }
            Node::Json(_, _, text) => {
                if !*text {
                    return Err("a JSON value compared as JSON (->, not ->>)".into());
                }
                let mut path = Vec::new();
                let mut at: &Node = n;
                loop {
                    match at {
                        Node::Json(b, k, t) => {
                            if *t && !std::ptr::eq(at, n) {
                                return Err("->> in the middle of a path".into());
                            }
                            match k.as_ref() {
                                Node::Str(s) => path.push(s.clone()),
                                Node::Cast(inner, ty) if ty == "text" => match inner.as_ref() {
                                    Node::Str(s) => path.push(s.clone()),
                                    other => return Err(format!("JSON key {other:?}")),
                                },
                                other => return Err(format!("JSON key {other:?}")),
                            }
                            at = b;
                        }
                        Node::Func(f) if f == &["auth", "jwt"] => break,
                        other => return Err(format!("-> on {other:?}")),
                    }
                }
                path.reverse();
                (Operand::Claim(path, true), Some(Ty::Text))
            }
            other => return Err(format!("{other:?} as a value")),
        })
    }

    /// A column of the policy's own table: `c` or `table.c`.
    fn own_column(&self, parts: &[String]) -> Result<String, String> {
        match parts {
            [c] => Ok(c.clone()),
            [t, c] if t == self.table.name => Ok(c.clone()),
            [s, t, c] if s == self.table.schema && t == self.table.name => Ok(c.clone()),
            _ => Err(format!("column {}", parts.join("."))),
        }
    }

    /// `SELECT m.key FROM s.m WHERE m.user = auth.uid()`.
    fn membership_in(&mut self, sel: &Select) -> Result<MembershipSpec, String> {
        let Some((schema, table, alias)) = &sel.from else {
            return Err("a subquery without FROM".into());
        };
        let key = sub_column(&sel.target, alias)?;
        let user = match &sel.filter {
            Some(Node::Cmp("=", a, b)) => uid_side(a, b, alias)?,
            _ => return Err("a membership subquery other than WHERE user = auth.uid()".into()),
        };
        Ok(MembershipSpec {
            table: format!("{schema}.{table}"),
            user,
            key,
        })
    }

    /// `EXISTS (SELECT 1 FROM s.m WHERE m.key = t.col AND m.user = auth.uid())`.
    fn membership_exists(&mut self, sel: &Select) -> Result<(Operand, MembershipSpec), String> {
        let Some((schema, table, alias)) = &sel.from else {
            return Err("EXISTS without FROM".into());
        };
        let Some(Node::And(conds)) = &sel.filter else {
            return Err("EXISTS other than WHERE key = col AND user = auth.uid()".into());
        };
        let [Node::Cmp("=", a1, b1), Node::Cmp("=", a2, b2)] = conds.as_slice() else {
            return Err("EXISTS other than WHERE key = col AND user = auth.uid()".into());
        };
        let (user, (l, r)) = match uid_side(a1, b1, alias) {
            Ok(u) => (u, (a2, b2)),
            Err(_) => (uid_side(a2, b2, alias)?, (a1, b1)),
        };
        // One side is the member table's key, the other a column of ours.
        let (key, outer) = match (sub_column(l, alias), sub_column(r, alias)) {
            (Ok(k), Err(_)) => (k, r),
            (Err(_), Ok(k)) => (k, l),
            _ => return Err("EXISTS whose join is not member.key = table.column".into()),
        };
        let (outer, ty) = self.operand(outer)?;
        if !matches!(outer, Operand::Column(_))
            || !matches!(ty, Some(Ty::Num | Ty::Text | Ty::Uuid))
        {
            return Err("EXISTS joined on something other than a key column".into());
        }
        Ok((
            outer,
            MembershipSpec {
                table: format!("{schema}.{table}"),
                user,
                key,
            },
        ))
    }
}

/// `alias.col` (or a bare `col`) of the subquery's table.
fn sub_column(n: &Node, alias: &str) -> Result<String, String> {
    match n {
        Node::Column(p) if p.len() == 2 && p[0] == alias => Ok(p[1].clone()),
        _ => Err(format!("{n:?} is not a column of {alias}")),
    }
}

/// Which side of `a = b` is `alias.user` with the other `auth.uid()`.
fn uid_side(a: &Node, b: &Node, alias: &str) -> Result<String, String> {
    let is_uid = |n: &Node| match n {
        Node::Func(f) => f == &["auth", "uid"],
        Node::Scalar(s) => {
            s.from.is_none() && matches!(&s.target, Node::Func(f) if f == &["auth", "uid"])
        }
        _ => false,
    };
    if is_uid(b) {
        sub_column(a, alias)
    } else if is_uid(a) {
        sub_column(b, alias)
    } else {
        Err("no auth.uid() side".into())
    }
}

/// Two static types that may be compared: the same, or one untyped.
fn unify(a: Option<Ty>, b: Option<Ty>) -> Option<Option<Ty>> {
    match (a, b) {
        (Some(x), Some(y)) if x == y => Some(Some(x)),
        (Some(_), Some(_)) => None,
        (x, None) | (None, x) => Some(x),
    }
}

// ---------------------------------------------------------------- evaluation

/// Why a predicate has no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stop {
    /// A value the row does not hold (only its key was sent).
    Unknown,
    /// PostgreSQL would fail the read: a bad cast, a column the table no
    /// longer has. Nothing is visible.
    Failed,
}

/// What a viewer's memberships hold for one index.
pub(crate) trait Memberships {
    /// Is `key` among the viewer's keys of index `spec`?
    fn contains(&self, spec: usize, key: &str) -> bool;
    /// (the viewer has any row in index `spec`, one of them with a NULL key).
    fn rows(&self, spec: usize) -> (bool, bool);
}

/// What a predicate is evaluated against.
pub(crate) struct Scope<'a> {
    pub relation: &'a Relation,
    pub row: &'a Row,
    pub principal: &'a Principal,
    pub member: &'a dyn Memberships,
}

/// SQL's three values, with `None` for NULL.
type Truth = Option<bool>;

impl Pred {
    /// `Ok(Some(true))` when the row is visible; an evaluation error (a bad
    /// cast) is `Ok(None)`, as PostgreSQL would fail the read for this viewer.
    pub(crate) fn eval(&self, s: &Scope<'_>) -> Result<Truth, Stop> {
        Ok(match self {
            Pred::Const(b) => Some(*b),
            Pred::And(v) => {
                let mut out = Some(true);
                for p in v {
                    match p.eval(s)? {
                        Some(false) => return Ok(Some(false)),
                        None => out = None,
                        Some(true) => {}
                    }
                }
                out
            }
            Pred::Or(v) => {
                let mut out = Some(false);
                for p in v {
                    match p.eval(s)? {
                        Some(true) => return Ok(Some(true)),
                        None => out = None,
                        Some(false) => {}
                    }
                }
                out
            }
            Pred::Not(p) => p.eval(s)?.map(|b| !b),
            Pred::Cmp(op, a, b) => {
                let (Some(a), Some(b)) = (a.eval(s)?, b.eval(s)?) else {
                    return Ok(None);
                };
                compare(op, &a, &b)
            }
            Pred::AnyOf(a, items) => {
                let Some(a) = a.eval(s)? else { return Ok(None) };
                let mut out = Some(false);
                for i in items {
                    match i.eval(s)? {
                        Some(v) => match compare("=", &a, &v) {
                            Some(true) => return Ok(Some(true)),
                            None => out = None,
                            Some(false) => {}
                        },
                        None => out = None,
                    }
                }
                out
            }
            Pred::Is(x, what, neg) => {
                let v = x.eval(s)?;
                let yes = match (what, &v) {
                    (None, v) => v.is_none(),
                    (Some(w), Some(Val::Bool(b))) => w == b,
                    (Some(_), _) => false,
                };
                Some(yes != *neg)
            }
            Pred::Truthy(x) => match x.eval(s)? {
                Some(Val::Bool(b)) => Some(b),
                _ => None,
            },
            Pred::Member(x, spec, exists) => {
                // No viewer id: the subquery has no row; IN and EXISTS are false.
                if s.principal.user_id.is_none() {
                    return Ok(Some(false));
                }
                // A column's key as the member table prints it (a bigint
                // exactly, not through a float).
                let key = match x {
                    Operand::Column(c) => {
                        let i = s.relation.column_index(c).ok_or(Stop::Failed)?;
                        match s.row.get(i) {
                            Some(Some(v)) => super::members::key_text(v).map(Cow::Owned),
                            _ => return Err(Stop::Unknown),
                        }
                    }
                    other => other
                        .eval(s)?
                        .as_ref()
                        .and_then(text_of)
                        .map(|c| Cow::Owned(c.into_owned())),
                };
                if let Some(k) = &key
                    && s.member.contains(*spec, k)
                {
                    return Ok(Some(true));
                }
                // No match: EXISTS is false; IN is NULL when the operand is
                // NULL and there are rows, or a row's key is NULL.
                let (any, nulls) = s.member.rows(*spec);
                if *exists || !(nulls || (key.is_none() && any)) {
                    Some(false)
                } else {
                    None
                }
            }
        })
    }

    /// The column that must equal the viewer's id in every visible row, if
    /// this predicate requires one (`col = auth.uid()`, alone or in an AND).
    pub(crate) fn uid_column(&self) -> Option<&str> {
        match self {
            Pred::Cmp("=", Operand::Column(c), Operand::Uid)
            | Pred::Cmp("=", Operand::Uid, Operand::Column(c)) => Some(c),
            Pred::And(v) => v.iter().find_map(Pred::uid_column),
            Pred::Or(v) if v.len() == 1 => v[0].uid_column(),
            _ => None,
        }
    }
}

impl Operand {
    fn eval(&self, s: &Scope<'_>) -> Result<Option<Val>, Stop> {
        Ok(match self {
            Operand::Column(c) => {
                // A column the table no longer has: PostgreSQL fails the read.
                let i = s.relation.column_index(c).ok_or(Stop::Failed)?;
                match s.row.get(i) {
                    Some(Some(v)) => json_val(v),
                    // Not sent: the old row is only its key.
                    _ => return Err(Stop::Unknown),
                }
            }
            Operand::Uid => s.principal.user_id.clone().map(Val::Text),
            Operand::Role => Some(Val::Text(s.principal.role.database_role().to_owned())),
            Operand::Claim(path, _) => claim(s.principal, path),
            Operand::Const(v) => match v {
                Val::Null => None,
                v => Some(v.clone()),
            },
            Operand::Cast(x, ty) => match x.eval(s)? {
                // PostgreSQL fails the read: nothing visible.
                Some(v) => Some(cast(&v, *ty).map_err(|_| Stop::Failed)?),
                None => None,
            },
        })
    }
}

/// The claims Aether's tokens carry, as `auth.jwt()` returns them in a
/// `/rest/v1` request (`Principal::jwt_claims`).
fn claim(p: &Principal, path: &[String]) -> Option<Val> {
    let [key] = path else { return None };
    match key.as_str() {
        "role" => Some(Val::Text(p.role.database_role().to_owned())),
        "sub" => p.user_id.clone().map(Val::Text),
        "aud" => p
            .user_id
            .as_ref()
            .map(|_| Val::Text("authenticated".into())),
        "email" => p.email.clone().map(Val::Text),
        "session_id" => p.session_id.map(|s| Val::Text(s.to_string())),
        "exp" => p.expires_at.map(|x| Val::Text(x.to_string())),
        _ => None,
    }
}

fn json_val(v: &Value) -> Option<Val> {
    match v {
        Value::Null => None,
        Value::Bool(b) => Some(Val::Bool(*b)),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Some(Val::Int(i)),
            None => n.as_f64().map(Val::Num),
        },
        Value::String(s) => Some(Val::Text(s.clone())),
        other => Some(Val::Text(other.to_string())),
    }
}

fn text_of(v: &Val) -> Option<Cow<'_, str>> {
    match v {
        Val::Text(s) => Some(Cow::Borrowed(s)),
        Val::Int(i) => Some(Cow::Owned(i.to_string())),
        Val::Num(n) => Some(Cow::Owned(num_text(*n))),
        Val::Bool(b) => Some(Cow::Borrowed(if *b { "true" } else { "false" })),
        Val::Null => None,
    }
}

/// How a key number is written: integers without a fraction, as `key_of`.
fn num_text(n: f64) -> String {
    if n.fract() == 0.0 && n.abs() < 9.0e15 {
        format!("{}", n as i64)
    } else {
        n.to_string()
    }
}

fn cast(v: &Val, to: Ty) -> Result<Val, String> {
    Ok(match (v, to) {
        (Val::Null, _) => Val::Null,
        (Val::Bool(b), Ty::Bool) => Val::Bool(*b),
        (Val::Num(n), Ty::Num) => Val::Num(*n),
        (Val::Int(i), Ty::Num) => Val::Int(*i),
        (Val::Num(n), Ty::Text) => Val::Text(num_text(*n)),
        (Val::Int(i), Ty::Text) => Val::Text(i.to_string()),
        (Val::Text(s), Ty::Text) => Val::Text(s.clone()),
        (Val::Text(s), Ty::Uuid) => Val::Text(
            uuid::Uuid::parse_str(s.trim())
                .map_err(|_| format!("{s:?} is not a uuid"))?
                .to_string(),
        ),
        (Val::Text(s), Ty::Num) => match s.trim().parse::<i64>() {
            Ok(i) => Val::Int(i),
            Err(_) => Val::Num(
                s.trim()
                    .parse::<f64>()
                    .map_err(|_| format!("{s:?} is not a number"))?,
            ),
        },
        (Val::Text(s), Ty::Bool) => match s.trim().to_ascii_lowercase().as_str() {
            "t" | "true" | "yes" | "on" | "1" => Val::Bool(true),
            "f" | "false" | "no" | "off" | "0" => Val::Bool(false),
            _ => return Err(format!("{s:?} is not a boolean")),
        },
        (Val::Bool(b), Ty::Text) => Val::Text(if *b { "true" } else { "false" }.into()),
        (v, t) => return Err(format!("{v:?} as {t:?}")),
    })
}

fn compare(op: &str, a: &Val, b: &Val) -> Truth {
    use std::cmp::Ordering::*;
    let float = |v: &Val| match v {
        Val::Int(i) => Some(*i as f64),
        Val::Num(n) => Some(*n),
        Val::Text(t) => t.parse::<f64>().ok(),
        _ => None,
    };
    let ord = match (a, b) {
        (Val::Int(x), Val::Int(y)) => x.cmp(y),
        (Val::Int(x), Val::Text(y)) if y.parse::<i64>().is_ok() => x.cmp(&y.parse::<i64>().ok()?),
        (Val::Text(x), Val::Int(y)) if x.parse::<i64>().is_ok() => x.parse::<i64>().ok()?.cmp(y),
        (Val::Int(_) | Val::Num(_), Val::Int(_) | Val::Num(_) | Val::Text(_))
        | (Val::Text(_), Val::Int(_) | Val::Num(_)) => float(a)?.partial_cmp(&float(b)?)?,
        (Val::Text(x), Val::Text(y)) => {
            return match op {
                "=" => Some(x == y),
                "<>" => Some(x != y),
                _ => None,
            };
        }
        (Val::Bool(x), Val::Bool(y)) => x.cmp(y),
        _ => return None,
    };
    Some(match op {
        "=" => ord == Equal,
        "<>" => ord != Equal,
        "<" => ord == Less,
        "<=" => ord != Greater,
        ">" => ord == Greater,
        ">=" => ord != Less,
        _ => return None,
    })
}

#[cfg(test)]
mod tests;
