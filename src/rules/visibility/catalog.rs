//! The published tables' read rules as PostgreSQL holds them (grants, RLS,
//! `pg_policies`), per role, each compiled or kept as SQL for PostgreSQL to
//! evaluate, and why.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde::Serialize;

use super::expr::{self, MembershipSpec, Pred, Specs, TableShape, Ty};

/// How the rows of one table are judged for one role.
#[derive(Debug)]
pub(crate) enum Access {
    /// No row: no SELECT grant, or RLS with no policy that lets this role read.
    Nothing(String),
    /// Every row: SELECT granted and no RLS.
    Everything,
    /// The table's policies for this role.
    Rule(Rule),
}

#[derive(Debug)]
pub(crate) struct Rule {
    /// The policies as one SQL condition (permissive ones OR-ed, restrictive
    /// ones AND-ed), for PostgreSQL to evaluate over the decoded row.
    pub sql: Arc<str>,
    /// The same, compiled; or why it could not be.
    pub compiled: Result<Pred, String>,
    /// The membership indexes (of [`Catalog::members`]) the compiled rule reads.
    pub members: Vec<usize>,
    /// A function of Aether's made for this rule, so PostgreSQL plans it once
    /// per connection rather than for every subscriber (see `functions`).
    pub function: Option<Arc<str>>,
}

#[derive(Debug)]
pub(crate) struct TableAccess {
    /// The table's name: the row's alias in [`Rule::sql`].
    pub name: Arc<str>,
    pub oid: u32,
    pub anon: Access,
    pub authenticated: Access,
}

/// What a membership index needs to know of its table.
#[derive(Debug, Clone)]
pub(crate) struct MemberTable {
    pub spec: MembershipSpec,
    /// The primary key's columns: a DELETE's old row names the row by them.
    pub key_columns: Vec<String>,
}

#[derive(Debug, Default)]
pub(crate) struct Catalog {
    pub tables: HashMap<String, TableAccess>,
    /// The membership indexes compiled rules refer to (`Pred::Member(_, i)`).
    pub members: Vec<MemberTable>,
}

/// One role's verdict for `/ws/status`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub(crate) struct Report {
    /// `in_process`, `in_postgres`, `all_rows` or `no_rows`.
    pub decided: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub why: Option<String>,
}

impl Access {
    pub(crate) fn report(&self) -> Report {
        match self {
            Access::Nothing(why) => Report {
                decided: "no_rows",
                why: Some(why.clone()),
            },
            Access::Everything => Report {
                decided: "all_rows",
                why: Some("SELECT is granted and row level security is off".into()),
            },
            Access::Rule(Rule {
                compiled: Ok(_), ..
            }) => Report {
                decided: "in_process",
                why: None,
            },
            Access::Rule(Rule {
                compiled: Err(e), ..
            }) => Report {
                decided: "in_postgres",
                why: Some(e.clone()),
            },
        }
    }
}

struct Policy {
    permissive: bool,
    /// Whether it applies to anon, to authenticated: named, `public`, or a
    /// role they are members of.
    applies: [bool; 2],
    qual: Option<String>,
}

struct Table {
    oid: u32,
    schema: String,
    name: String,
    rls: bool,
    select: [bool; 2],
    columns: HashMap<String, Option<Ty>>,
    /// Column name → `pg_type.typname`.
    typnames: HashMap<String, String>,
    key: Vec<String>,
    policies: Vec<Policy>,
}

const ROLES: [&str; 2] = ["anon", "authenticated"];

/// Reads the rules of every table in `publication` except `skip` (the ones
/// the application decides itself), unless a policy other than Aether's own
/// `aether_read` reads that table ([`overridden`]). `pg_get_expr` prints names qualified
/// under `search_path = pg_catalog`, so the SQL kept means the same wherever
/// it runs.
pub(crate) async fn load(
    client: &mut tokio_postgres::Client,
    publication: &str,
    skip: fn(&str) -> bool,
) -> Result<Catalog, tokio_postgres::Error> {
    let tx = client.build_transaction().read_only(true).start().await?;
    tx.batch_execute("SET LOCAL search_path = pg_catalog")
        .await?;
    let rows = tx
        .query(
            "SELECT n.nspname::text, c.relname::text, c.relrowsecurity, c.oid,
                    CASE WHEN to_regrole('anon') IS NULL THEN false
                         ELSE has_table_privilege('anon', c.oid, 'SELECT') END,
                    CASE WHEN to_regrole('authenticated') IS NULL THEN false
                         ELSE has_table_privilege('authenticated', c.oid, 'SELECT') END,
                    ARRAY(SELECT a.attname::text FROM pg_attribute a
                           WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                           ORDER BY a.attnum),
                    ARRAY(SELECT t.typname::text FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
                           WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                           ORDER BY a.attnum),
                    ARRAY(SELECT a.attname::text FROM pg_index i
                            JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
                           WHERE i.indrelid = c.oid AND i.indisprimary ORDER BY a.attnum)
               FROM pg_publication_tables pt
               JOIN pg_namespace n ON n.nspname = pt.schemaname
               JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = pt.tablename
              WHERE pt.pubname = $1",
            &[&publication],
        )
        .await?;
    let mut tables: HashMap<String, Table> = HashMap::new();
    for r in rows {
        let names: Vec<String> = r.get(6);
        let types: Vec<String> = r.get(7);
        let t = Table {
            oid: r.get(3),
            schema: r.get(0),
            name: r.get(1),
            rls: r.get(2),
            select: [r.get(4), r.get(5)],
            columns: names
                .iter()
                .cloned()
                .zip(types.iter().map(|t| Ty::of_typname(t)))
                .collect(),
            typnames: names.into_iter().zip(types).collect(),
            key: r.get(8),
            policies: Vec::new(),
        };
        tables.insert(format!("{}.{}", t.schema, t.name), t);
    }
    let policies = tx
        .query(
            "SELECT p.schemaname::text, p.tablename::text, p.permissive = 'PERMISSIVE',
                    EXISTS (SELECT 1 FROM unnest(p.roles) r
                             WHERE r = 'public' OR (to_regrole('anon') IS NOT NULL
                                   AND to_regrole(r) IS NOT NULL AND pg_has_role('anon', r, 'MEMBER'))),
                    EXISTS (SELECT 1 FROM unnest(p.roles) r
                             WHERE r = 'public' OR (to_regrole('authenticated') IS NOT NULL
                                   AND to_regrole(r) IS NOT NULL AND pg_has_role('authenticated', r, 'MEMBER'))),
                    p.qual, p.policyname::text
               FROM pg_policies p WHERE p.cmd IN ('SELECT', 'ALL') ORDER BY p.policyname",
            &[],
        )
        .await?;
    let mut named = Vec::new();
    for p in policies {
        let key = format!("{}.{}", p.get::<_, String>(0), p.get::<_, String>(1));
        named.push((key.clone(), p.get::<_, String>(6)));
        if let Some(t) = tables.get_mut(&key) {
            t.policies.push(Policy {
                permissive: p.get(2),
                applies: [p.get(3), p.get(4)],
                qual: p.get(5),
            });
        }
    }
    tx.commit().await?;
    let overridden = overridden(&named);
    Ok(build(tables, |t| skip(t) && !overridden.contains(t)))
}

/// The storage tables a DBA's policy reads: those with a `SELECT` or `ALL`
/// policy besides 0017's `aether_read`, and `public.folders` whenever
/// `public.files` is one (a folder shows to whoever may read a file in it).
/// Realtime follows their policies, as `/rest/v1` and the storage routes do,
/// instead of the conventions, which state only Aether's own policy. Only
/// these: a `SELECT` policy on `realtime.messages` says who may join a
/// topic, not who may read its rows, and the other own tables (`auth.*`,
/// `auth_events`, `shares`, `aether.channels`) have no grants or only column
/// grants that a table-wide check would read as none.
pub(crate) fn overridden(policies: &[(String, String)]) -> HashSet<String> {
    const STORAGE: [&str; 3] = ["public.buckets", "public.files", "public.folders"];
    let mut out: HashSet<String> = policies
        .iter()
        .filter(|(table, name)| name != "aether_read" && STORAGE.contains(&table.as_str()))
        .map(|(table, _)| table.clone())
        .collect();
    if out.contains("public.files") {
        out.insert("public.folders".to_owned());
    }
    out
}

fn build(tables: HashMap<String, Table>, skip: impl Fn(&str) -> bool) -> Catalog {
    let mut specs = Specs::default();
    let mut out = HashMap::new();
    for (key, t) in &tables {
        if skip(key) {
            continue;
        }
        let [anon, authenticated] = [0, 1].map(|i| access(t, i, &mut specs));
        out.insert(
            key.clone(),
            TableAccess {
                name: Arc::from(t.name.as_str()),
                oid: t.oid,
                anon,
                authenticated,
            },
        );
    }
    // A membership index is kept from its table's changes: it must be
    // published, keyed, of key types we model, and read by the viewer without
    // RLS narrowing what the policy's subquery sees.
    let mut members = Vec::new();
    let mut broken: HashMap<usize, String> = HashMap::new();
    for (i, spec) in specs.0.iter().enumerate() {
        let why = match tables.get(&spec.table) {
            None => Some(format!(
                "{} is not in the publication, so its changes cannot keep the membership current",
                spec.table
            )),
            Some(m) if m.rls => Some(format!(
                "{} has row level security of its own: the policy's subquery sees only part of it",
                spec.table
            )),
            Some(m) if m.key.is_empty() => Some(format!("{} has no primary key", spec.table)),
            Some(m) => {
                // Types whose `::text` prints what the decoder gives (not
                // numeric: `5.00` against `5.0`).
                let keyish = |c: &str| {
                    matches!(
                        m.typnames.get(c).map(String::as_str),
                        Some("int2" | "int4" | "int8" | "text" | "varchar" | "uuid")
                    )
                };
                if [spec.user.as_str(), spec.key.as_str()]
                    .into_iter()
                    .chain(m.key.iter().map(String::as_str))
                    .all(keyish)
                {
                    None
                } else {
                    Some(format!(
                        "{}: a key or member column of a type we do not index",
                        spec.table
                    ))
                }
            }
        };
        if let Some(w) = why {
            broken.insert(i, w);
        }
        members.push(MemberTable {
            spec: spec.clone(),
            key_columns: tables
                .get(&spec.table)
                .map(|m| m.key.clone())
                .unwrap_or_default(),
        });
    }
    // Rules that need a membership that cannot be kept are evaluated in
    // PostgreSQL; so are those whose role may not read the member table (the
    // subquery fails there, and PostgreSQL says so).
    for t in out.values_mut() {
        for (role, a) in [&mut t.anon, &mut t.authenticated].into_iter().enumerate() {
            if let Access::Rule(rule) = a
                && rule.compiled.is_ok()
            {
                let why = rule.members.iter().find_map(|i| {
                    broken.get(i).cloned().or_else(|| {
                        let spec = &specs.0.get(*i)?;
                        let readable = tables.get(&spec.table).is_some_and(|m| m.select[role]);
                        (!readable)
                            .then(|| format!("{} has no SELECT on {}", ROLES[role], spec.table))
                    })
                });
                if let Some(why) = why {
                    rule.compiled = Err(why);
                }
            }
        }
    }
    Catalog {
        tables: out,
        members,
    }
}

/// The membership indexes a predicate refers to.
fn uses(p: &Pred) -> Vec<usize> {
    let mut out = Vec::new();
    fn walk(p: &Pred, out: &mut Vec<usize>) {
        match p {
            Pred::Member(_, i, _) => out.push(*i),
            Pred::And(v) | Pred::Or(v) => v.iter().for_each(|p| walk(p, out)),
            Pred::Not(p) => walk(p, out),
            _ => {}
        }
    }
    walk(p, &mut out);
    out
}

fn access(t: &Table, role: usize, specs: &mut Specs) -> Access {
    let name = ROLES[role];
    if !t.select[role] {
        return Access::Nothing(format!("{name} has no SELECT on the table"));
    }
    if !t.rls {
        return Access::Everything;
    }
    let mine: Vec<&Policy> = t.policies.iter().filter(|p| p.applies[role]).collect();
    // A policy without USING (only WITH CHECK) says nothing about reading:
    // PostgreSQL leaves it out, permissive or restrictive.
    let permissive: Vec<&str> = mine
        .iter()
        .filter(|p| p.permissive)
        .filter_map(|p| p.qual.as_deref())
        .collect();
    let restrictive: Vec<&str> = mine
        .iter()
        .filter(|p| !p.permissive)
        .filter_map(|p| p.qual.as_deref())
        .collect();
    if permissive.is_empty() {
        return Access::Nothing(format!(
            "row level security is on and no policy lets {name} read"
        ));
    }
    let sql = {
        let any = permissive
            .iter()
            .map(|q| format!("({q})"))
            .collect::<Vec<_>>()
            .join(" OR ");
        let mut all = vec![format!("({any})")];
        all.extend(restrictive.iter().map(|q| format!("({q})")));
        all.join(" AND ")
    };
    let shape = TableShape {
        schema: &t.schema,
        name: &t.name,
        columns: &t.columns,
    };
    let mut one = |q: &str| expr::compile(q, &shape, specs);
    let compiled = (|| {
        let any = permissive
            .iter()
            .map(|q| one(q))
            .collect::<Result<Vec<_>, _>>()?;
        let mut all = vec![Pred::Or(any)];
        for q in &restrictive {
            all.push(one(q)?);
        }
        Ok::<_, String>(if all.len() == 1 {
            all.remove(0)
        } else {
            Pred::And(all)
        })
    })();
    let members = compiled.as_ref().map(uses).unwrap_or_default();
    Access::Rule(Rule {
        sql: Arc::from(sql),
        compiled,
        members,
        function: None,
    })
}
