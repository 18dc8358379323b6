//! A membership index: which keys (`team_id`) each user has through a table
//! like `members(user_id, team_id)`, kept in memory from a snapshot and then
//! from that table's own changes in the log, so a policy such as `team_id IN
//! (SELECT team_id FROM members WHERE user_id = auth.uid())` is decided with no
//! query. Bounded in bytes; past the bound the tables that need it are
//! evaluated in PostgreSQL instead.

use std::collections::HashMap;

use aether_core::changes::{ChangeKind, Relation, Row, RowChange};
use futures_util::{StreamExt, pin_mut};
use serde_json::Value;

use super::catalog::MemberTable;

/// Per index entry: its strings and the maps' own overhead, roughly.
const ENTRY_OVERHEAD: usize = 160;

#[derive(Debug)]
pub(crate) struct Membership {
    table: MemberTable,
    /// Primary key → (user, key) of that row (`None` where NULL).
    rows: HashMap<String, (Option<String>, Option<String>)>,
    by_user: HashMap<String, HashMap<String, u32>>,
    /// Rows of a user whose key is NULL (`key IN (…)` is then NULL, not false).
    nulls: HashMap<String, u32>,
    bytes: usize,
    limit: usize,
}

impl Membership {
    pub(crate) fn new(table: MemberTable, limit: usize) -> Self {
        Membership {
            table,
            rows: HashMap::new(),
            by_user: HashMap::new(),
            nulls: HashMap::new(),
            bytes: 0,
            limit,
        }
    }

    pub(crate) fn table(&self) -> &str {
        &self.table.spec.table
    }

    /// (`user` has rows, one of them with a NULL key).
    pub(crate) fn rows(&self, user: &str) -> (bool, bool) {
        let nulls = self.nulls.contains_key(user);
        (nulls || self.by_user.contains_key(user), nulls)
    }

    /// Does `user` have `key`?
    pub(crate) fn contains(&self, user: &str, key: &str) -> bool {
        self.by_user
            .get(user)
            .is_some_and(|keys| keys.contains_key(key))
    }

    fn put(&mut self, pk: String, user: Option<String>, key: Option<String>) -> Result<(), String> {
        self.remove(&pk);
        match (&user, &key) {
            (Some(u), Some(k)) => {
                *self
                    .by_user
                    .entry(u.clone())
                    .or_default()
                    .entry(k.clone())
                    .or_default() += 1;
            }
            (Some(u), None) => *self.nulls.entry(u.clone()).or_default() += 1,
            _ => {}
        }
        self.bytes += ENTRY_OVERHEAD
            + pk.len()
            + user.as_ref().map_or(0, String::len) * 2
            + key.as_ref().map_or(0, String::len) * 2;
        self.rows.insert(pk, (user, key));
        if self.bytes > self.limit {
            return Err(format!(
                "the membership index of {} is over {} bytes",
                self.table.spec.table, self.limit
            ));
        }
        Ok(())
    }

    fn remove(&mut self, pk: &str) {
        let Some((user, key)) = self.rows.remove(pk) else {
            return;
        };
        self.bytes = self.bytes.saturating_sub(
            ENTRY_OVERHEAD
                + pk.len()
                + user.as_ref().map_or(0, String::len) * 2
                + key.as_ref().map_or(0, String::len) * 2,
        );
        if let (Some(u), None) = (&user, &key)
            && let Some(n) = self.nulls.get_mut(u)
        {
            *n -= 1;
            if *n == 0 {
                self.nulls.remove(u);
            }
        }
        if let (Some(u), Some(k)) = (user, key)
            && let Some(keys) = self.by_user.get_mut(&u)
        {
            if let Some(n) = keys.get_mut(&k) {
                *n -= 1;
                if *n == 0 {
                    keys.remove(&k);
                }
            }
            if keys.is_empty() {
                self.by_user.remove(&u);
            }
        }
    }

    /// Follows one change of the member table. Applying a change the snapshot
    /// already reflects is harmless: rows are replaced by primary key, so
    /// replaying from before the snapshot ends where the table is.
    pub(crate) fn apply(&mut self, change: &RowChange) -> Result<(), String> {
        let rel = &change.relation;
        if *rel.qualified != *self.table.spec.table {
            return Ok(());
        }
        match change.kind {
            ChangeKind::Truncate => {
                self.rows.clear();
                self.by_user.clear();
                self.nulls.clear();
                self.bytes = 0;
            }
            ChangeKind::Delete => {
                if let Some(pk) = change.old.as_ref().and_then(|r| self.pk(rel, r)) {
                    self.remove(&pk);
                }
            }
            ChangeKind::Insert | ChangeKind::Update => {
                let Some(new) = &change.new else {
                    return Ok(());
                };
                if let Some(pk) = change.old.as_ref().and_then(|r| self.pk(rel, r)) {
                    self.remove(&pk);
                }
                let Some(pk) = self.pk(rel, new) else {
                    return Ok(());
                };
                let user = text(rel, new, &self.table.spec.user);
                let key = text(rel, new, &self.table.spec.key);
                self.put(pk, user, key)?;
            }
        }
        Ok(())
    }

    fn pk(&self, rel: &Relation, row: &Row) -> Option<String> {
        let mut parts = Vec::with_capacity(self.table.key_columns.len());
        for c in &self.table.key_columns {
            parts.push(text(rel, row, c)?);
        }
        Some(parts.join("\u{1f}"))
    }

    /// Reads the table now. `SELECT … ::text` prints integers, UUIDs and text
    /// as the decoder's values print (checked by the catalog's type test).
    pub(crate) async fn snapshot(
        client: &tokio_postgres::Client,
        table: MemberTable,
        limit: usize,
    ) -> Result<Membership, String> {
        let q = |c: &str| format!("\"{}\"", c.replace('"', "\"\""));
        let (schema, name) = table
            .spec
            .table
            .split_once('.')
            .ok_or("a table name without schema")?;
        let pk = table
            .key_columns
            .iter()
            .map(|c| format!("{}::text", q(c)))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "SELECT concat_ws(E'\\x1f', {pk}), {}::text, {}::text FROM {}.{}",
            q(&table.spec.user),
            q(&table.spec.key),
            q(schema),
            q(name)
        );
        let mut m = Membership::new(table, limit);
        let rows = client
            .query_raw(sql.as_str(), std::iter::empty::<&str>())
            .await
            .map_err(|e| format!("reading {}: {e}", m.table.spec.table))?;
        pin_mut!(rows);
        while let Some(r) = rows.next().await {
            let r = r.map_err(|e| format!("reading {}: {e}", m.table.spec.table))?;
            m.put(r.get(0), r.get(1), r.get(2))?;
        }
        Ok(m)
    }
}

/// A key column's value in `row`, as [`key_text`] writes it.
fn text(rel: &Relation, row: &Row, col: &str) -> Option<String> {
    key_text(rel.value(row, col)?)
}

/// A decoded key value as `::text` prints it (the catalog admits only
/// integer, text and uuid keys), as [`Membership::contains`] takes it.
pub(crate) fn key_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}
