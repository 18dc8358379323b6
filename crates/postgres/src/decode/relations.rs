//! The relation cache.
//!
//! Invariants (from the pgoutput protocol, checked rather than assumed):
//! - In every replication session a Relation message precedes the first row change
//!   of that table, and is sent again whenever the table's definition changes
//!   (`ALTER TABLE … ADD COLUMN` included). So an entry is replaced wholesale, never
//!   patched, and rows decode against the definition in force when they were written.
//! - A row change for an id not in the cache is a protocol error: the assembler
//!   fails the stream (which restarts from the last acknowledged position) instead
//!   of guessing column names or skipping the change.
//! - A row's column count must equal the cached relation's; anything else is an error.

use std::collections::HashMap;
use std::sync::Arc;

use crate::replication::pgoutput::RelationBody;
use aether_core::changes::{Column, Relation, TableId, is_secret_column};

#[derive(Debug, Default)]
pub struct RelationCache {
    relations: HashMap<TableId, Arc<Relation>>,
}

impl RelationCache {
    pub fn upsert(&mut self, body: RelationBody) -> Arc<Relation> {
        let qualified: Arc<str> = Arc::from(format!("{}.{}", body.namespace, body.name));
        let columns = body
            .columns
            .into_iter()
            .map(|c| Column {
                secret: is_secret_column(&c.name),
                name: c.name,
                type_oid: c.type_oid,
                is_key: c.is_key,
            })
            .collect();
        let rel = Arc::new(Relation {
            id: body.id,
            schema: body.namespace,
            name: body.name,
            qualified,
            replica_identity: body.replica_identity,
            columns,
        });
        self.relations.insert(rel.id, Arc::clone(&rel));
        rel
    }

    pub fn get(&self, id: TableId) -> Option<&Arc<Relation>> {
        self.relations.get(&id)
    }
}
