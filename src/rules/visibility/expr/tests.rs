//! The policy shapes PostgreSQL 15 prints (copied from `pg_policies.qual`
//! with `search_path = pg_catalog`), compiled and evaluated.

use std::collections::HashMap;
use std::sync::Arc;

use aether_core::changes::{Column, Relation, TableId};
use aether_core::principal::Role;
use serde_json::json;

use super::*;

const ALICE: &str = "6f9619ff-8b86-d011-b42d-00cf4fc964ff";
const BOB: &str = "0b3c2a40-2d7e-4a0e-9a55-2f1f8a8c4e01";

fn columns() -> HashMap<String, Option<Ty>> {
    [
        ("id", Some(Ty::Num)),
        ("user_id", Some(Ty::Uuid)),
        ("team_id", Some(Ty::Num)),
        ("is_public", Some(Ty::Bool)),
        ("status", Some(Ty::Text)),
        ("priority", Some(Ty::Num)),
        ("email", Some(Ty::Text)),
        ("archived", Some(Ty::Bool)),
        ("meta", None),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

fn relation() -> Relation {
    let names = [
        "id",
        "user_id",
        "team_id",
        "is_public",
        "status",
        "priority",
        "email",
        "archived",
    ];
    Relation {
        id: TableId(7),
        schema: "public".into(),
        name: "todos".into(),
        qualified: Arc::from("public.todos"),
        replica_identity: b'f',
        columns: names
            .iter()
            .map(|n| Column {
                name: (*n).into(),
                type_oid: 25,
                is_key: *n == "id",
                secret: false,
            })
            .collect(),
    }
}

fn compiled(text: &str) -> Result<(Pred, Specs), String> {
    let cols = columns();
    let shape = TableShape {
        schema: "public",
        name: "todos",
        columns: &cols,
    };
    let mut specs = Specs::default();
    compile(text, &shape, &mut specs).map(|p| (p, specs))
}

fn user(id: &str) -> Principal {
    Principal {
        role: Role::Authenticated,
        user_id: Some(id.into()),
        email: Some(format!("{}@example.com", &id[..4])),
        ..Principal::anonymous()
    }
}

/// The row `{user_id, team_id, is_public, status, priority, email, archived}`.
fn row(v: serde_json::Value) -> Row {
    relation()
        .columns
        .iter()
        .map(|c| match &v[&c.name] {
            serde_json::Value::Null if v.get(&c.name).is_none() => Some(serde_json::Value::Null),
            x => Some(x.clone()),
        })
        .collect()
}

/// (user, key) rows of a member table; `None`: a NULL key.
struct Teams<'a>(&'a [(&'a str, Option<&'a str>)], Option<&'a str>);

impl Memberships for Teams<'_> {
    fn contains(&self, _: usize, key: &str) -> bool {
        self.0
            .iter()
            .any(|(u, k)| Some(*u) == self.1 && *k == Some(key))
    }

    fn rows(&self, _: usize) -> (bool, bool) {
        let mine: Vec<_> = self.0.iter().filter(|(u, _)| Some(*u) == self.1).collect();
        (!mine.is_empty(), mine.iter().any(|(_, k)| k.is_none()))
    }
}

fn truth(
    p: &Pred,
    who: &Principal,
    r: &Row,
    teams: &[(&str, Option<&str>)],
) -> Result<Option<bool>, Stop> {
    let rel = relation();
    let member = Teams(teams, who.user_id.as_deref());
    let scope = Scope {
        relation: &rel,
        row: r,
        principal: who,
        member: &member,
    };
    p.eval(&scope)
}

fn sees(p: &Pred, who: &Principal, r: &Row, teams: &[(&str, &str)]) -> Result<bool, Stop> {
    let teams: Vec<(&str, Option<&str>)> = teams.iter().map(|(u, k)| (*u, Some(*k))).collect();
    Ok(truth(p, who, r, &teams)? == Some(true))
}

#[test]
fn owner_equal_to_the_viewer_in_every_spelling() {
    for text in [
        "(user_id = auth.uid())",
        "(auth.uid() = user_id)",
        "(( SELECT auth.uid() AS uid) = user_id)",
        "(todos.user_id = auth.uid())",
    ] {
        let (p, _) = compiled(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        let r = row(json!({"user_id": ALICE}));
        assert!(sees(&p, &user(ALICE), &r, &[]).unwrap(), "{text}");
        assert!(!sees(&p, &user(BOB), &r, &[]).unwrap(), "{text}");
        assert!(
            !sees(&p, &Principal::anonymous(), &r, &[]).unwrap(),
            "{text}"
        );
        assert_eq!(p.uid_column(), Some("user_id"), "{text}");
    }
}

#[test]
fn or_and_not_constants_and_lists() {
    let (p, _) = compiled("((auth.uid() = user_id) OR is_public)").unwrap();
    assert_eq!(p.uid_column(), None);
    let public = row(json!({"user_id": ALICE, "is_public": true}));
    let private = row(json!({"user_id": ALICE, "is_public": false}));
    assert!(sees(&p, &user(BOB), &public, &[]).unwrap());
    assert!(!sees(&p, &user(BOB), &private, &[]).unwrap());

    let (p, _) = compiled(
        "((status = ANY (ARRAY['a'::text, 'b'::text])) AND (priority > 3) AND (NOT archived))",
    )
    .unwrap();
    let r = |s: &str, pr: i64, a: bool| row(json!({"status": s, "priority": pr, "archived": a}));
    assert!(sees(&p, &user(BOB), &r("a", 4, false), &[]).unwrap());
    assert!(!sees(&p, &user(BOB), &r("c", 4, false), &[]).unwrap());
    assert!(!sees(&p, &user(BOB), &r("b", 3, false), &[]).unwrap());
    assert!(!sees(&p, &user(BOB), &r("b", 9, true), &[]).unwrap());

    let (p, _) =
        compiled("((is_public = true) AND (status <> 'x'::text) AND (status IS NOT NULL))")
            .unwrap();
    assert!(
        sees(
            &p,
            &user(BOB),
            &row(json!({"is_public": true, "status": "y"})),
            &[]
        )
        .unwrap()
    );
    assert!(
        !sees(
            &p,
            &user(BOB),
            &row(json!({"is_public": true, "status": null})),
            &[]
        )
        .unwrap()
    );

    let (p, _) = compiled(
        "((user_id = '6f9619ff-8b86-d011-b42d-00cf4fc964ff'::uuid) OR (priority = '-1'::integer) OR ((priority)::numeric >= 2.5))",
    )
    .unwrap();
    assert!(
        sees(
            &p,
            &user(BOB),
            &row(json!({"user_id": ALICE, "priority": 0})),
            &[]
        )
        .unwrap()
    );
    assert!(
        sees(
            &p,
            &user(BOB),
            &row(json!({"user_id": BOB, "priority": -1})),
            &[]
        )
        .unwrap()
    );
    assert!(
        sees(
            &p,
            &user(BOB),
            &row(json!({"user_id": BOB, "priority": 3})),
            &[]
        )
        .unwrap()
    );
    assert!(
        !sees(
            &p,
            &user(BOB),
            &row(json!({"user_id": BOB, "priority": 2})),
            &[]
        )
        .unwrap()
    );

    let (p, _) = compiled("true").unwrap();
    assert!(sees(&p, &Principal::anonymous(), &row(json!({})), &[]).unwrap());
}

#[test]
fn claims_and_role() {
    let (p, _) = compiled("(email = (auth.jwt() ->> 'email'::text))").unwrap();
    let who = user(ALICE);
    let mine = row(json!({"email": who.email.clone().unwrap()}));
    assert!(sees(&p, &who, &mine, &[]).unwrap());
    assert!(!sees(&p, &user(BOB), &mine, &[]).unwrap());

    let (p, _) = compiled("(auth.role() = 'authenticated'::text)").unwrap();
    assert!(sees(&p, &who, &mine, &[]).unwrap());
    assert!(!sees(&p, &Principal::anonymous(), &mine, &[]).unwrap());
}

#[test]
fn membership_through_another_table_in_its_three_spellings() {
    for text in [
        "(team_id IN ( SELECT members.team_id\n   FROM public.members\n  WHERE (members.user_id = auth.uid())))",
        "(team_id = ANY (ARRAY( SELECT members.team_id\n   FROM public.members\n  WHERE (members.user_id = auth.uid()))))",
        "(EXISTS ( SELECT 1\n   FROM public.members m\n  WHERE ((m.team_id = todos.team_id) AND (m.user_id = auth.uid()))))",
    ] {
        let (p, specs) = compiled(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        assert_eq!(
            specs.0,
            [MembershipSpec {
                table: "public.members".into(),
                user: "user_id".into(),
                key: "team_id".into()
            }],
            "{text}"
        );
        let r = row(json!({"team_id": 7}));
        assert!(
            sees(&p, &user(ALICE), &r, &[(ALICE, "7")]).unwrap(),
            "{text}"
        );
        assert!(
            !sees(&p, &user(BOB), &r, &[(ALICE, "7")]).unwrap(),
            "{text}"
        );
        assert!(
            !sees(&p, &user(ALICE), &r, &[(ALICE, "8")]).unwrap(),
            "{text}"
        );
    }
}

#[test]
fn what_cannot_be_decided_here_is_refused_with_a_reason() {
    for text in [
        "(created_at > now())",
        "(status > 'm'::text)",
        "(lower(status) = 'a'::text)",
        "(meta = '{}'::jsonb)",
        "(status ~~ 'a%'::text)",
        "(EXISTS ( SELECT 1\n   FROM public.members m\n  WHERE (m.user_id = auth.uid())))",
        "(user_id = auth.uid()",
        "(status = E'\\\\x'::text)",
    ] {
        let e = compiled(text).map(|_| ()).expect_err(text);
        assert!(!e.is_empty(), "{text}");
    }
}

#[test]
fn an_old_row_that_is_only_its_key_is_unknown_not_false() {
    let (p, _) = compiled("(user_id = auth.uid())").unwrap();
    let mut key_only = row(json!({"id": 1}));
    key_only[1] = None;
    assert_eq!(sees(&p, &user(ALICE), &key_only, &[]), Err(Stop::Unknown));
}

#[test]
fn a_bad_cast_or_a_vanished_column_fails_rather_than_reads_as_null() {
    // `(status)::uuid IS NULL` would show every row if a failed cast were NULL.
    let (p, _) = compiled("((status)::uuid IS NULL)").unwrap();
    let r = row(json!({"status": "not a uuid"}));
    assert_eq!(truth(&p, &user(ALICE), &r, &[]), Err(Stop::Failed));
    let (p, _) = compiled("(archived IS NULL)").unwrap();
    let mut rel = relation();
    rel.columns.retain(|c| c.name != "archived");
    let r: Row = rel.columns.iter().map(|_| Some(json!(null))).collect();
    let member = Teams(&[], None);
    let scope = Scope {
        relation: &rel,
        row: &r,
        principal: &Principal::anonymous(),
        member: &member,
    };
    assert_eq!(p.eval(&scope), Err(Stop::Failed));
}

#[test]
fn bigints_compare_exactly() {
    let (p, _) = compiled("(priority = '9007199254740993'::bigint)").unwrap();
    assert!(
        sees(
            &p,
            &user(ALICE),
            &row(json!({"priority": 9007199254740993i64})),
            &[]
        )
        .unwrap()
    );
    assert!(
        !sees(
            &p,
            &user(ALICE),
            &row(json!({"priority": 9007199254740992i64})),
            &[]
        )
        .unwrap()
    );
}

#[test]
fn membership_follows_sql_for_anon_nulls_and_not() {
    let in_form = "(team_id IN ( SELECT members.team_id\n   FROM public.members\n  WHERE (members.user_id = auth.uid())))";
    let exists_form = "(EXISTS ( SELECT 1\n   FROM public.members m\n  WHERE ((m.team_id = todos.team_id) AND (m.user_id = auth.uid()))))";
    let (in_p, _) = compiled(in_form).unwrap();
    let (ex_p, _) = compiled(exists_form).unwrap();
    let seven = row(json!({"team_id": 7}));
    let null = row(json!({"team_id": null}));
    // Anon: the subquery has no row; IN and EXISTS are false (NOT … is true).
    assert_eq!(
        truth(&in_p, &Principal::anonymous(), &seven, &[]),
        Ok(Some(false))
    );
    assert_eq!(
        truth(&ex_p, &Principal::anonymous(), &seven, &[]),
        Ok(Some(false))
    );
    // A NULL key in the member table: `7 IN (8, NULL)` is NULL; EXISTS false.
    let teams = [(ALICE, Some("8")), (ALICE, None)];
    assert_eq!(truth(&in_p, &user(ALICE), &seven, &teams), Ok(None));
    assert_eq!(truth(&ex_p, &user(ALICE), &seven, &teams), Ok(Some(false)));
    // A NULL operand: NULL against rows, false against none.
    assert_eq!(
        truth(&in_p, &user(ALICE), &null, &[(ALICE, Some("8"))]),
        Ok(None)
    );
    assert_eq!(
        truth(&in_p, &user(BOB), &null, &[(ALICE, Some("8"))]),
        Ok(Some(false))
    );
    assert_eq!(
        truth(&ex_p, &user(ALICE), &null, &[(ALICE, Some("8"))]),
        Ok(Some(false))
    );
}

#[test]
fn hostile_text_never_panics() {
    let deep = "(".repeat(10_000) + "true" + &")".repeat(10_000);
    assert!(compiled(&deep).is_err());
    // Chains that nest without parentheses are bounded too.
    let casts = "(title".to_owned() + &"::text".repeat(5_000) + " = 'x'::text)";
    assert!(compiled(&casts).is_err());
    let path =
        "(email = (auth.jwt()".to_owned() + &" -> 'a'::text".repeat(5_000) + " ->> 'b'::text))";
    assert!(compiled(&path).is_err());
    for text in [
        "",
        ")",
        "'",
        "\"",
        "a.",
        "x IS",
        "= ANY (",
        "SELECT",
        "(SELECT 1 FROM)",
        "é = 1",
    ] {
        let _ = compiled(text);
    }
}
