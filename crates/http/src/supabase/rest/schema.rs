//! What `/rest/v1` knows of the database: the tables and views of the exposed
//! schemas, their columns (and which of the API roles may read each), primary
//! keys and foreign keys. Loaded at start and again on a miss (a table a DBA
//! just created), at most once a second.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock};

use aether_core::principal::Role;

/// One column.
#[derive(Debug, Clone)]
pub(crate) struct Column {
    pub name: String,
    /// Which API roles may read it: anon, authenticated, service_role.
    pub readable: [bool; 3],
    /// `format_type`: `bigint`, `text`, `timestamp with time zone`, …
    pub type_name: String,
    /// `NOT NULL` with no default: an insert must give it.
    pub required: bool,
}

/// A foreign key from `columns` of one table to `references` of another.
#[derive(Debug, Clone)]
pub(crate) struct ForeignKey {
    pub name: String,
    pub table: (String, String),
    pub columns: Vec<String>,
    pub target: (String, String),
    pub references: Vec<String>,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct Table {
    pub columns: Vec<Column>,
    pub primary_key: Vec<String>,
    /// Its `UNIQUE` constraints' columns: a foreign key onto one of them (or
    /// onto the primary key) relates at most one row.
    pub unique_keys: Vec<Vec<String>>,
}

/// The tables of the exposed schemas, by (schema, name).
#[derive(Debug, Default)]
pub(crate) struct Schema {
    pub tables: HashMap<(String, String), Table>,
    pub foreign_keys: Vec<ForeignKey>,
}

pub(crate) fn role_index(role: Role) -> usize {
    match role {
        Role::Anon => 0,
        Role::Authenticated => 1,
        Role::Service => 2,
    }
}

impl Table {
    /// The columns `role` may read: what `*` means for it.
    pub(crate) fn readable(&self, role: Role) -> impl Iterator<Item = &str> {
        let i = role_index(role);
        self.columns
            .iter()
            .filter(move |c| c.readable[i])
            .map(|c| c.name.as_str())
    }
}

impl Schema {
    async fn load(
        client: &tokio_postgres::Client,
        schemas: &[String],
    ) -> Result<Schema, tokio_postgres::Error> {
        let mut s = Schema::default();
        let rows = client
            .query(
                "SELECT n.nspname::text, c.relname::text, a.attname::text,
                        has_column_privilege('anon', c.oid, a.attnum, 'SELECT'),
                        has_column_privilege('authenticated', c.oid, a.attnum, 'SELECT'),
                        has_column_privilege('service_role', c.oid, a.attnum, 'SELECT'),
                        format_type(a.atttypid, a.atttypmod),
                        a.attnotnull AND NOT a.atthasdef AND a.attidentity = ''
                          AND a.attgenerated = ''
                   FROM pg_class c
                   JOIN pg_namespace n ON n.oid = c.relnamespace
                   JOIN pg_attribute a ON a.attrelid = c.oid
                  WHERE n.nspname = ANY($1) AND c.relkind IN ('r', 'v', 'm', 'p', 'f')
                    AND a.attnum > 0 AND NOT a.attisdropped
                  ORDER BY 1, 2, a.attnum",
                &[&schemas],
            )
            .await?;
        for r in rows {
            let key = (r.get::<_, String>(0), r.get::<_, String>(1));
            s.tables.entry(key).or_default().columns.push(Column {
                name: r.get(2),
                readable: [r.get(3), r.get(4), r.get(5)],
                type_name: r.get(6),
                required: r.get(7),
            });
        }
        let keys = client
            .query(
                "SELECT con.conname::text, con.contype::text,
                        n.nspname::text, c.relname::text,
                        array_agg(a.attname::text ORDER BY k.ord),
                        fn.nspname::text, fc.relname::text,
                        array_agg(fa.attname::text ORDER BY k.ord)
                   FROM pg_constraint con
                   JOIN pg_class c ON c.oid = con.conrelid
                   JOIN pg_namespace n ON n.oid = c.relnamespace
                   CROSS JOIN LATERAL unnest(con.conkey, coalesce(con.confkey, con.conkey))
                        WITH ORDINALITY AS k(attnum, fattnum, ord)
                   JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum
                   LEFT JOIN pg_class fc ON fc.oid = con.confrelid
                   LEFT JOIN pg_namespace fn ON fn.oid = fc.relnamespace
                   LEFT JOIN pg_attribute fa ON fa.attrelid = con.confrelid AND fa.attnum = k.fattnum
                  WHERE con.contype IN ('p', 'u', 'f') AND n.nspname = ANY($1)
                  GROUP BY con.oid, con.conname, con.contype, n.nspname, c.relname, fn.nspname, fc.relname",
                &[&schemas],
            )
            .await?;
        for r in keys {
            let table = (r.get::<_, String>(2), r.get::<_, String>(3));
            let columns: Vec<String> = r.get(4);
            match r.get::<_, String>(1).as_str() {
                "p" => {
                    if let Some(t) = s.tables.get_mut(&table) {
                        t.primary_key = columns;
                    }
                    continue;
                }
                "u" => {
                    if let Some(t) = s.tables.get_mut(&table) {
                        t.unique_keys.push(columns);
                    }
                    continue;
                }
                _ => {}
            }
            let (Some(ts), Some(tn)) =
                (r.get::<_, Option<String>>(5), r.get::<_, Option<String>>(6))
            else {
                continue;
            };
            s.foreign_keys.push(ForeignKey {
                name: r.get(0),
                table,
                columns,
                target: (ts, tn),
                references: r
                    .get::<_, Vec<Option<String>>>(7)
                    .into_iter()
                    .flatten()
                    .collect(),
            });
        }
        Ok(s)
    }
}

/// The cached schema and when it was last loaded.
pub(crate) struct SchemaCache {
    current: RwLock<Arc<Schema>>,
    loaded_ms: AtomicI64,
    /// DDL happened since the last load (the `aether_schema` notification).
    stale: std::sync::atomic::AtomicBool,
}

impl Default for SchemaCache {
    fn default() -> Self {
        SchemaCache {
            current: RwLock::new(Arc::new(Schema::default())),
            loaded_ms: AtomicI64::new(i64::MIN),
            stale: std::sync::atomic::AtomicBool::new(true),
        }
    }
}

impl SchemaCache {
    /// The schema changed: the next request loads it again, whenever the
    /// last load was.
    pub(crate) fn invalidate(&self) {
        self.stale.store(true, Ordering::SeqCst);
    }

    /// Whether DDL happened since the last load.
    pub(crate) fn is_stale(&self) -> bool {
        self.stale.load(Ordering::SeqCst)
    }

    pub(crate) fn get(&self) -> Arc<Schema> {
        Arc::clone(&self.current.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Reloads unless it was reloaded less than a second ago; `true` if it did.
    pub(crate) async fn reload(
        &self,
        client: &tokio_postgres::Client,
        schemas: &[String],
    ) -> Result<bool, tokio_postgres::Error> {
        let now = chrono::Utc::now().timestamp_millis();
        let last = self.loaded_ms.load(Ordering::Relaxed);
        // Cleared before reading, so DDL during the load marks it again; set
        // again when this reload does not happen or fails.
        let stale = self.stale.swap(false, Ordering::SeqCst);
        if (!stale && now.saturating_sub(last) < 1000)
            || self
                .loaded_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            if stale {
                self.stale.store(true, Ordering::SeqCst);
            }
            return Ok(false);
        }
        let fresh = match Schema::load(client, schemas).await {
            Ok(s) => Arc::new(s),
            Err(e) => {
                if stale {
                    self.stale.store(true, Ordering::SeqCst);
                }
                return Err(e);
            }
        };
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = fresh;
        Ok(true)
    }
}
