//! The published tables and their columns, for validating subscriptions before any
//! change of that table has been seen. Loaded from PostgreSQL at start, refreshed on
//! a miss (a DBA may `ALTER PUBLICATION … ADD TABLE`), and updated from Relation
//! messages (so `ADD COLUMN` is known without a restart).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use aether_core::changes::{Relation, is_secret_column};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnInfo {
    pub name: String,
    pub type_oid: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableInfo {
    pub schema: String,
    pub name: String,
    pub qualified: Arc<str>,
    pub columns: Vec<ColumnInfo>,
}

impl TableInfo {
    pub fn column(&self, name: &str) -> Option<&ColumnInfo> {
        self.columns
            .iter()
            .find(|c| c.name == name && !is_secret_column(&c.name))
    }
}

#[derive(Debug, Default)]
pub struct Catalog {
    tables: HashMap<(String, String), Arc<TableInfo>>,
}

pub type SharedCatalog = Arc<RwLock<Catalog>>;

/// Adds the tables of publication `from` that `into` lacks to `into`, so
/// tables put in Supabase's `supabase_realtime` stream through Aether's own
/// publication. (Streaming both publications would break decoding: PostgreSQL
/// 15 refuses to decode WAL written before a named publication existed.) A
/// table that cannot be added (no privilege) is logged and left out.
pub async fn adopt_publication(client: &tokio_postgres::Client, from: &str, into: &str) {
    let rows = match client
        .query(
            "SELECT format('%I.%I', schemaname, tablename) FROM pg_publication_tables WHERE pubname = $1
             EXCEPT
             SELECT format('%I.%I', schemaname, tablename) FROM pg_publication_tables WHERE pubname = $2",
            &[&from, &into],
        )
        .await
    {
        Ok(rows) => rows,
        Err(e) => {
            tracing::warn!(error = %e, from, "reading a publication's tables");
            return;
        }
    };
    for r in rows {
        let table: String = r.get(0);
        let into_ident = format!("\"{}\"", into.replace('"', "\"\""));
        match client
            .batch_execute(&format!("ALTER PUBLICATION {into_ident} ADD TABLE {table}"))
            .await
        {
            Ok(()) => tracing::info!(%table, from, into, "table added to the realtime publication"),
            Err(e) => {
                tracing::warn!(error = %e, %table, from, into, "could not add a table to the realtime publication")
            }
        }
    }
}

impl Catalog {
    pub fn get(&self, schema: &str, table: &str) -> Option<Arc<TableInfo>> {
        self.tables
            .get(&(schema.to_owned(), table.to_owned()))
            .cloned()
    }

    pub fn update_from_relation(&mut self, rel: &Relation) {
        let info = TableInfo {
            schema: rel.schema.clone(),
            name: rel.name.clone(),
            qualified: Arc::clone(&rel.qualified),
            columns: rel
                .columns
                .iter()
                .map(|c| ColumnInfo {
                    name: c.name.clone(),
                    type_oid: c.type_oid,
                })
                .collect(),
        };
        self.tables
            .insert((rel.schema.clone(), rel.name.clone()), Arc::new(info));
    }

    /// Reads the publication's tables and columns.
    /// The tables of `publications` (one name, or several separated by
    /// commas; a table in two is one table).
    pub async fn load(
        client: &tokio_postgres::Client,
        publications: &str,
    ) -> Result<Self, tokio_postgres::Error> {
        let names: Vec<&str> = publications.split(',').map(str::trim).collect();
        let rows = client
            .query(
                "SELECT DISTINCT pt.schemaname::text, pt.tablename::text, a.attname::text,
                        a.atttypid::int8, a.attnum
                   FROM pg_publication_tables pt
                   JOIN pg_namespace n ON n.nspname = pt.schemaname
                   JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = pt.tablename
                   JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                  WHERE pt.pubname = ANY($1)
                  ORDER BY 1, 2, a.attnum",
                &[&names],
            )
            .await?;
        let mut grouped: HashMap<(String, String), Vec<ColumnInfo>> = HashMap::new();
        for row in rows {
            let schema: String = row.get(0);
            let table: String = row.get(1);
            let column: String = row.get(2);
            let type_oid: i64 = row.get(3);
            grouped
                .entry((schema, table))
                .or_default()
                .push(ColumnInfo {
                    name: column,
                    type_oid: u32::try_from(type_oid).unwrap_or(25),
                });
        }
        let tables = grouped
            .into_iter()
            .map(|((schema, name), columns)| {
                let info = TableInfo {
                    qualified: Arc::from(format!("{schema}.{name}")),
                    schema: schema.clone(),
                    name: name.clone(),
                    columns,
                };
                ((schema, name), Arc::new(info))
            })
            .collect();
        Ok(Catalog { tables })
    }

    pub fn replace_with(&mut self, other: Catalog) {
        self.tables = other.tables;
    }
}
