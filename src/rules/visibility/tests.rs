//! The policy's own bookkeeping, driven step by step: what a snapshot of a
//! member table misses while it loads is replayed onto it, and an answer
//! from PostgreSQL for a connection's earlier principal is never used.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use aether_core::changes::{ChangeKind, Column, Relation, RowChange, TableId};
use aether_core::lsn::{PgLsn, Position};
use aether_core::principal::{Principal, Role};
use aether_router::policy::{Decision, Policy, Viewer};
use serde_json::json;

use super::catalog::{Catalog, MemberTable};
use super::expr::MembershipSpec;
use super::members::Membership;
use super::{Install, RowSecurity};

fn members() -> Arc<Relation> {
    let col = |name: &str| Column {
        name: name.into(),
        type_oid: 25,
        is_key: true,
        secret: false,
    };
    Arc::new(Relation {
        id: TableId(11),
        schema: "public".into(),
        name: "members".into(),
        qualified: Arc::from("public.members"),
        replica_identity: b'd',
        columns: vec![col("team_id"), col("user_id")],
    })
}

fn change(lsn: u64, kind: ChangeKind, team: i64, user: &str) -> Arc<RowChange> {
    let row = Some(vec![Some(json!(team)), Some(json!(user))]);
    let (new, old) = match kind {
        ChangeKind::Delete => (None, row),
        _ => (row, None),
    };
    Arc::new(RowChange::new(
        Position::new(PgLsn(lsn), 0),
        kind,
        members(),
        new,
        old,
        0,
    ))
}

fn table() -> MemberTable {
    MemberTable {
        spec: MembershipSpec {
            table: "public.members".into(),
            user: "user_id".into(),
            key: "team_id".into(),
        },
        key_columns: vec!["team_id".into(), "user_id".into()],
    }
}

#[test]
fn a_snapshot_gets_the_member_changes_made_while_it_loaded() {
    let (mut policy, _rx) = RowSecurity::empty(HashSet::new());
    let shared = Arc::clone(&policy.shared);
    // A load begins: the router keeps the member table's changes from now.
    *shared.buffer_tables.write().unwrap() = HashSet::from(["public.members".to_owned()]);
    shared.buffering.store(true, Ordering::SeqCst);
    // The snapshot saw bob in team 1, and not alice.
    let mut snapshot = Membership::new(table(), 1 << 20);
    snapshot
        .apply(&change(1, ChangeKind::Insert, 1, "bob"))
        .unwrap();
    // Meanwhile (committed after the snapshot): alice joins, bob leaves.
    policy.observe(&change(2, ChangeKind::Insert, 1, "alice"));
    policy.observe(&change(3, ChangeKind::Delete, 1, "bob"));
    // The load is handed over, and installed at the next change.
    *shared.next.lock().unwrap() = Some(Install {
        catalog: Catalog {
            members: vec![table()],
            ..Catalog::default()
        },
        members: vec![Ok(snapshot)],
    });
    shared.generation.fetch_add(1, Ordering::SeqCst);
    policy.observe(&change(4, ChangeKind::Insert, 9, "nobody"));
    let index = policy.members[0].as_ref().unwrap();
    assert!(index.contains("alice", "1"));
    assert!(!index.contains("bob", "1"));
    assert!(policy.buffer.is_empty());
    assert!(
        !shared.buffering.load(Ordering::SeqCst),
        "ended with the load taken"
    );
    // The next load may begin at once: its buffering is not undone.
    shared.buffering.store(true, Ordering::SeqCst);
    policy.observe(&change(5, ChangeKind::Insert, 2, "carol"));
    assert_eq!(policy.buffer.len(), 1);
    assert!(policy.members[0].as_ref().unwrap().contains("carol", "2"));
}

#[test]
fn an_answer_for_a_connections_earlier_principal_is_dropped() {
    let (mut policy, _rx) = RowSecurity::empty(HashSet::new());
    let c = change(7, ChangeKind::Insert, 1, "alice");
    let before = Arc::new(Principal {
        role: Role::Authenticated,
        user_id: Some("alice".into()),
        ..Principal::anonymous()
    });
    let ask = |policy: &mut RowSecurity, p: &Arc<Principal>| {
        policy.in_postgres(
            Viewer {
                connection: 1,
                principal: p,
            },
            &c,
            Arc::from("true"),
            Arc::from("members"),
            None,
        )
    };
    assert_eq!(ask(&mut policy, &before), Decision::Pending);
    let asked = policy.batch.pop().unwrap();
    // The token is renewed (the router forgets the connection) before the
    // answer comes back.
    policy.forget(1);
    let (epochs, answers) = (
        Arc::clone(&policy.shared.epochs),
        Arc::clone(&policy.shared.answers),
    );
    super::postgres::answer(&epochs, &answers, &asked, Decision::Allow);
    assert!(
        answers.lock().unwrap().is_empty(),
        "a stale answer is not kept"
    );
    let after = Arc::new(Principal {
        email: Some("new@example.com".into()),
        ..(*before).clone()
    });
    assert_eq!(ask(&mut policy, &after), Decision::Pending, "asked anew");
    let again = policy.batch.pop().unwrap();
    assert_ne!(again.epoch, asked.epoch);
    super::postgres::answer(&epochs, &answers, &again, Decision::Deny);
    assert_eq!(ask(&mut policy, &after), Decision::Deny);
}
