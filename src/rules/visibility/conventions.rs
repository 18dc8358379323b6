//! Who may see a row, decided in-process from the decoded row: no query per
//! subscriber per change.
//!
//! Rules (documented in docs/realtime.md):
//! - `service_role` sees every row of every published table.
//! - `auth.users`: a user sees their own row (`id`); password hashes never leave.
//! - Tables with `owner_id` (files, folders, …): the owner; plus everyone, anonymous
//!   included, when the row's `bucket_id` names a public bucket. A NULL
//!   `owner_id` (an owner-less, service-role object) is nobody's own row.
//! - `public.buckets`: public buckets are seen by all; private ones by their owner.
//! - Tables with `user_id` (auth_events, …): that user.
//! - `auth.sessions`, `public.shares` (their tokens are the secret),
//!   `aether.channels`, `realtime.messages` and any other published table:
//!   `service_role` only.
//!
//! INSERT and UPDATE are judged on the new row, DELETE on the old row.

use std::collections::HashSet;
use std::sync::Arc;

use aether_core::changes::{ChangeKind, Relation, Row, RowChange};
use aether_core::principal::Principal;

use aether_router::policy::{Decision, Policy, Viewer};

/// The rules above as the router's policy, with the set of public buckets it
/// keeps current from `public.buckets` changes.
pub(crate) struct TableRules {
    public_buckets: HashSet<String>,
}

impl TableRules {
    /// `public_buckets`: the public buckets when the log's feed starts.
    pub(crate) fn new(public_buckets: HashSet<String>) -> Self {
        TableRules { public_buckets }
    }
}

impl Policy for TableRules {
    fn observe(&mut self, change: &RowChange) {
        let rel = &change.relation;
        if change.kind == ChangeKind::Truncate && *rel.qualified == *"public.buckets" {
            self.public_buckets.clear();
            return;
        }
        track_buckets(
            rel,
            change.new.as_ref(),
            change.old.as_ref(),
            &mut self.public_buckets,
        );
    }

    fn decide(&mut self, viewer: Viewer<'_>, change: &Arc<RowChange>) -> Decision {
        let seen = change.visible_row().is_some_and(|row| {
            visible(
                viewer.principal,
                &change.relation,
                row,
                &self.public_buckets,
            )
        });
        if seen {
            Decision::Allow
        } else {
            Decision::Deny
        }
    }
}

fn text_at<'r>(relation: &Relation, row: &'r Row, column: &str) -> Option<&'r str> {
    relation.value(row, column)?.as_str()
}

fn bool_at(relation: &Relation, row: &Row, column: &str) -> Option<bool> {
    relation.value(row, column)?.as_bool()
}

fn visible(
    principal: &Principal,
    relation: &Relation,
    row: &Row,
    public_buckets: &HashSet<String>,
) -> bool {
    if principal.is_service() {
        return true;
    }
    let uid = principal.user_id.as_deref();
    let is_user = |col: &str| uid.is_some() && text_at(relation, row, col) == uid;
    match (relation.schema.as_str(), relation.name.as_str()) {
        ("auth", "users") => is_user("id"),
        // An owner or user column does not make these anyone's to read.
        ("auth", "sessions") | ("public", "shares") | ("aether", "channels") | ("realtime", _) => {
            false
        }
        ("public", "buckets") => {
            bool_at(relation, row, "public") == Some(true) || is_user("owner_id")
        }
        _ => {
            if relation.column_index("owner_id").is_some() {
                is_user("owner_id")
                    || text_at(relation, row, "bucket_id")
                        .is_some_and(|b| public_buckets.contains(b))
            } else if relation.column_index("user_id").is_some() {
                is_user("user_id")
            } else {
                false
            }
        }
    }
}

/// Keeps the set of public buckets current from changes to `public.buckets`.
fn track_buckets(
    relation: &Relation,
    new: Option<&Row>,
    old: Option<&Row>,
    set: &mut HashSet<String>,
) {
    if relation.schema != "public" || relation.name != "buckets" {
        return;
    }
    if let Some(old) = old
        && let Some(id) = text_at(relation, old, "id")
    {
        set.remove(id);
    }
    if let Some(new) = new
        && let Some(id) = text_at(relation, new, "id")
    {
        if bool_at(relation, new, "public") == Some(true) {
            set.insert(id.to_owned());
        } else {
            set.remove(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aether_core::changes::{Column, TableId};
    use aether_core::principal::Role;
    use serde_json::json;

    fn relation(schema: &str, name: &str, columns: &[&str]) -> Relation {
        Relation {
            id: TableId(1),
            schema: schema.into(),
            name: name.into(),
            qualified: Arc::from(format!("{schema}.{name}")),
            replica_identity: b'f',
            columns: columns
                .iter()
                .map(|c| Column {
                    name: (*c).into(),
                    type_oid: 25,
                    is_key: false,
                    secret: false,
                })
                .collect(),
        }
    }

    #[test]
    fn own_rows_public_buckets_and_service_only_tables() {
        let me = Principal {
            role: Role::Authenticated,
            user_id: Some("u1".into()),
            ..Principal::service()
        };
        let buckets = HashSet::from(["open".to_owned()]);
        let seen = |schema: &str, name: &str, cols: &[&str], vals: serde_json::Value| {
            let row: Row = vals
                .as_array()
                .unwrap()
                .iter()
                .map(|v| Some(v.clone()))
                .collect();
            visible(&me, &relation(schema, name, cols), &row, &buckets)
        };
        let file = ["owner_id", "bucket_id"];
        assert!(seen("public", "files", &file, json!(["u1", "files"])));
        assert!(seen("public", "files", &file, json!(["u2", "open"])));
        assert!(!seen("public", "files", &file, json!(["u2", "files"])));
        assert!(seen("auth", "users", &["id"], json!(["u1"])));
        assert!(seen("public", "auth_events", &["user_id"], json!(["u1"])));
        // What the docs say is the service role's alone stays so, whatever
        // columns name the viewer.
        assert!(!seen("auth", "sessions", &["user_id"], json!(["u1"])));
        assert!(!seen(
            "public",
            "shares",
            &["owner_id", "token"],
            json!(["u1", "t"])
        ));
        assert!(!seen("realtime", "messages", &["user_id"], json!(["u1"])));
        assert!(!seen("public", "anything", &["x"], json!([1])));
        assert!(visible(
            &Principal::service(),
            &relation("auth", "sessions", &["user_id"]),
            &vec![Some(json!("u9"))],
            &buckets
        ));
    }
}
