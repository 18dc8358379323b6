//! Realtime on any published table, authorized by that table's grants and RLS
//! policies (issue 17): each user receives exactly what a SELECT of theirs
//! would return, for policies Aether compiles and for one PostgreSQL has to
//! evaluate. "Nothing else arrived" is shown by a marker row every viewer may
//! see, committed last: the next frame must be it.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)]

mod common;

use common::*;
use serde_json::{Value, json};

/// The row a change frame shows: the old one of a DELETE, else the new one.
fn shown_row(c: &Value) -> &Value {
    if c["eventType"] == "DELETE" {
        &c["old"]
    } else {
        &c["new"]
    }
}

/// Frames until (and without) the marker's INSERT, as (event, id).
async fn until_marker(ws: &mut Ws, marker: i64) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    loop {
        let c = ws.change().await;
        let row = shown_row(&c);
        if c["eventType"] == "INSERT" && row["id"] == marker {
            return out;
        }
        out.push((
            c["eventType"].as_str().unwrap().to_owned(),
            row["id"].clone(),
        ));
    }
}

fn ev(kind: &str, id: i64) -> (String, Value) {
    (kind.to_owned(), json!(id))
}

/// `/ws/status` once it reports on `table` (the rules are read again within
/// a second of a change to them).
async fn status(t: &TestServer, table: &str) -> Value {
    status_until(t, table, true).await
}

/// `/ws/status` once it does (`reported`) or does not report on `table`.
async fn status_until(t: &TestServer, table: &str, reported: bool) -> Value {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let s: Value = reqwest::get(t.url("/ws/status"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if s["row_security"].get(table).is_some() == reported {
            return s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{table} reported: {}, not {reported}: {s}",
            !reported
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// `owner = auth.uid()`: each user sees their rows; a row handed from one to
/// the other leaves the first user's view (a DELETE of the row they had) and
/// enters the second's (an INSERT); anon has no grant and sees nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_policy_is_compiled_and_rows_move_in_and_out_of_sight() {
    let t = TestServer::start().await;
    let alice = user(&t.sql, "alice@rls.test").await;
    let bob = user(&t.sql, "bob@rls.test").await;
    t.exec(
        "CREATE TABLE public.todos (id int PRIMARY KEY, owner uuid, title text, everyone boolean NOT NULL DEFAULT false);
         ALTER TABLE public.todos REPLICA IDENTITY FULL;
         GRANT SELECT ON public.todos TO authenticated;
         ALTER TABLE public.todos ENABLE ROW LEVEL SECURITY;
         CREATE POLICY mine ON public.todos FOR SELECT TO authenticated
           USING ((SELECT auth.uid()) = owner OR everyone);
         ALTER PUBLICATION aether_realtime ADD TABLE public.todos;",
    )
    .await;
    t.sync().await;
    let s = status(&t, "public.todos").await;
    assert_eq!(
        s["row_security"]["public.todos"],
        json!({"anon": {"decided": "no_rows", "why": "anon has no SELECT on the table"},
               "authenticated": {"decided": "in_process"}}),
        "{s}"
    );
    let mut a = t.ws(Some(&user_token(&alice))).await;
    let mut b = t.ws(Some(&user_token(&bob))).await;
    let mut anon = t.ws(None).await;
    for ws in [&mut a, &mut b, &mut anon] {
        ws.subscribe("t", json!({"table": "todos"})).await;
    }
    t.exec(&format!(
        "INSERT INTO public.todos (id, owner, title) VALUES (1, '{alice}', 'a1'), (2, '{bob}', 'b2');
         UPDATE public.todos SET title = 'a1 again' WHERE id = 1;
         UPDATE public.todos SET owner = '{bob}' WHERE id = 1;
         UPDATE public.todos SET owner = '{alice}' WHERE id = 2;
         UPDATE public.todos SET title = 'nobody' , owner = NULL WHERE id = 2;
         DELETE FROM public.todos WHERE id = 1;
         INSERT INTO public.todos (id, everyone) VALUES (99, true);"
    ))
    .await;
    assert_eq!(
        until_marker(&mut a, 99).await,
        [
            ev("INSERT", 1),
            ev("UPDATE", 1),
            ev("DELETE", 1),
            ev("INSERT", 2),
            ev("DELETE", 2)
        ]
    );
    assert_eq!(
        until_marker(&mut b, 99).await,
        [
            ev("INSERT", 2),
            ev("INSERT", 1),
            ev("DELETE", 2),
            ev("DELETE", 1)
        ]
    );
    // Anon may not read the table at all: not even the marker.
    t.exec("INSERT INTO public.todos (id, everyone) VALUES (100, true)")
        .await;
    // Everything is routed (in order, anon's decisions made in-process): the
    // reply to a request sent now is anon's next frame.
    t.sync().await;
    anon.send(json!({"type": "subscription", "action": "unsubscribe", "data": {"id": "probe"}}))
        .await;
    let next = anon.next().await;
    assert_eq!(next["code"], "unknown_subscription", "anon saw {next}");

    for ws in [&mut a, &mut b] {
        assert_eq!(ws.change().await["new"]["id"], 100);
    }
    // Moving in shows the new row only.
    t.exec(&format!(
        "INSERT INTO public.todos (id, owner, title) VALUES (3, '{bob}', 'secret of bob');
         UPDATE public.todos SET owner = '{alice}', title = 'now alice''s' WHERE id = 3;
         INSERT INTO public.todos (id, everyone) VALUES (102, true);"
    ))
    .await;
    let c = a.change().await;
    assert_eq!(
        (&c["eventType"], &c["new"]["title"], &c["old"]),
        (&json!("INSERT"), &json!("now alice's"), &Value::Null),
        "{c}"
    );
    assert_eq!(a.change().await["new"]["id"], 102);
}

/// A policy of JWT claims, constants and `AND`/`NOT`, and one for `anon`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_constants_and_anon_policies_are_compiled() {
    let t = TestServer::start().await;
    let alice = user(&t.sql, "alice@claims.test").await;
    t.exec(
        "CREATE TABLE public.posts (id int PRIMARY KEY, author_email text, published boolean, stars int);
         ALTER TABLE public.posts REPLICA IDENTITY FULL;
         GRANT SELECT ON public.posts TO anon, authenticated;
         ALTER TABLE public.posts ENABLE ROW LEVEL SECURITY;
         CREATE POLICY by_mail ON public.posts FOR SELECT TO authenticated
           USING (author_email = auth.jwt() ->> 'email');
         CREATE POLICY shown ON public.posts FOR SELECT
           USING (published AND NOT (stars < 3));
         ALTER PUBLICATION aether_realtime ADD TABLE public.posts;",
    )
    .await;
    t.sync().await;
    let s = status(&t, "public.posts").await;
    assert_eq!(
        s["row_security"]["public.posts"]["anon"]["decided"], "in_process",
        "{s}"
    );
    assert_eq!(
        s["row_security"]["public.posts"]["authenticated"]["decided"], "in_process",
        "{s}"
    );
    let now = chrono::Utc::now().timestamp();
    let with_mail = keys().sign(&aether_auth::Claims {
        sub: Some(alice.clone()),
        email: Some("alice@claims.test".into()),
        role: Some("authenticated".into()),
        exp: now + 3600,
        iat: Some(now),
        session_id: None,
        aud: None,
    });
    let mut a = t.ws(Some(&with_mail)).await;
    let mut anon = t.ws(None).await;
    for ws in [&mut a, &mut anon] {
        ws.subscribe("p", json!({"table": "posts"})).await;
    }
    // Post 4's `NOT (NULL < 3)` is NULL, as in SQL: not shown.
    t.exec(
        "INSERT INTO public.posts VALUES
           (1, 'alice@claims.test', false, 0),
           (2, 'bob@claims.test', true, 5),
           (3, 'bob@claims.test', true, 1),
           (4, 'bob@claims.test', true, NULL),
           (99, NULL, true, 3);",
    )
    .await;
    assert_eq!(
        until_marker(&mut a, 99).await,
        [ev("INSERT", 1), ev("INSERT", 2)]
    );
    assert_eq!(until_marker(&mut anon, 99).await, [ev("INSERT", 2)]);
}

/// `team_id IN (SELECT team_id FROM members WHERE user_id = auth.uid())`,
/// kept from `members`' own changes: joining or leaving a team counts from
/// the next change on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_through_another_table_follows_that_tables_changes() {
    let t = TestServer::start().await;
    let alice = user(&t.sql, "alice@team.test").await;
    let bob = user(&t.sql, "bob@team.test").await;
    t.exec(&format!(
        "CREATE TABLE public.members (team_id int, user_id uuid, PRIMARY KEY (team_id, user_id));
         INSERT INTO public.members VALUES (1, '{alice}');
         CREATE TABLE public.notes (id int PRIMARY KEY, team_id int, body text);
         ALTER TABLE public.notes REPLICA IDENTITY FULL;
         GRANT SELECT ON public.notes, public.members TO authenticated;
         ALTER TABLE public.notes ENABLE ROW LEVEL SECURITY;
         CREATE POLICY team ON public.notes FOR SELECT TO authenticated
           USING (team_id IN (SELECT team_id FROM public.members WHERE user_id = auth.uid()) OR team_id = 0);
         ALTER PUBLICATION aether_realtime ADD TABLE public.members, public.notes;"
    ))
    .await;
    t.sync().await;
    let s = status(&t, "public.notes").await;
    assert_eq!(
        s["row_security"]["public.notes"]["authenticated"]["decided"], "in_process",
        "{s}"
    );
    let mut a = t.ws(Some(&user_token(&alice))).await;
    let mut b = t.ws(Some(&user_token(&bob))).await;
    for ws in [&mut a, &mut b] {
        ws.subscribe("n", json!({"table": "notes"})).await;
    }
    t.exec(&format!(
        "INSERT INTO public.notes VALUES (1, 1, 'team one');
         INSERT INTO public.members VALUES (1, '{bob}');
         INSERT INTO public.notes VALUES (2, 1, 'bob joined');
         DELETE FROM public.members WHERE user_id = '{alice}';
         INSERT INTO public.notes VALUES (3, 1, 'alice left');
         UPDATE public.notes SET team_id = 2 WHERE id = 3;
         INSERT INTO public.notes VALUES (99, 0, 'marker');"
    ))
    .await;
    assert_eq!(
        until_marker(&mut a, 99).await,
        [ev("INSERT", 1), ev("INSERT", 2)]
    );
    assert_eq!(
        until_marker(&mut b, 99).await,
        [ev("INSERT", 2), ev("INSERT", 3), ev("DELETE", 3)]
    );
}

/// A policy calling a function cannot be compiled: PostgreSQL evaluates it
/// over the decoded rows, once per change for every subscriber. It raises for
/// carol alone: she gets nothing, the others go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_postgres_must_evaluate_is_exact_and_its_errors_stay_with_their_viewer() {
    let t = TestServer::start().await;
    let alice = user(&t.sql, "alice@pg.test").await;
    let bob = user(&t.sql, "bob@pg.test").await;
    let carol = user(&t.sql, "carol@pg.test").await;
    t.exec(&format!(
        "CREATE FUNCTION public.may_read(owner uuid) RETURNS boolean LANGUAGE plpgsql STABLE AS $$
         BEGIN
           IF auth.uid() = '{carol}' AND owner IS NOT NULL THEN
             RAISE EXCEPTION 'carol breaks this policy';
           END IF;
           RETURN owner = auth.uid() OR owner IS NULL;
         END $$;
         CREATE TABLE public.docs (id int PRIMARY KEY, owner uuid, body text);
         ALTER TABLE public.docs REPLICA IDENTITY FULL;
         GRANT SELECT ON public.docs TO authenticated;
         ALTER TABLE public.docs ENABLE ROW LEVEL SECURITY;
         CREATE POLICY fn ON public.docs FOR SELECT TO authenticated USING (public.may_read(owner));
         ALTER PUBLICATION aether_realtime ADD TABLE public.docs;"
    ))
    .await;
    t.sync().await;
    let s = status(&t, "public.docs").await;
    let report = &s["row_security"]["public.docs"]["authenticated"];
    assert_eq!(report["decided"], "in_postgres", "{s}");
    assert!(report["why"].as_str().unwrap().contains("may_read"), "{s}");
    let mut a = t.ws(Some(&user_token(&alice))).await;
    let mut b = t.ws(Some(&user_token(&bob))).await;
    let mut c = t.ws(Some(&user_token(&carol))).await;
    for ws in [&mut a, &mut b, &mut c] {
        ws.subscribe("d", json!({"table": "docs"})).await;
    }
    t.exec(&format!(
        "INSERT INTO public.docs VALUES (1, '{alice}', 'a'), (2, '{bob}', 'b');
         UPDATE public.docs SET owner = '{bob}' WHERE id = 1;
         UPDATE public.docs SET body = 'b again' WHERE id = 2;
         DELETE FROM public.docs WHERE id = 2;
         INSERT INTO public.docs VALUES (99, NULL, 'marker');"
    ))
    .await;
    assert_eq!(
        until_marker(&mut a, 99).await,
        [ev("INSERT", 1), ev("DELETE", 1)]
    );
    assert_eq!(
        until_marker(&mut b, 99).await,
        [
            ev("INSERT", 2),
            ev("INSERT", 1),
            ev("UPDATE", 2),
            ev("DELETE", 2)
        ]
    );
    // Carol's every evaluation failed but the marker's: she saw none of it,
    // and her connection is alive.
    assert_eq!(until_marker(&mut c, 99).await, []);
    // Bob, on the same policy, still gets what follows.
    t.exec(&format!(
        "INSERT INTO public.docs VALUES (5, '{bob}', 'later')"
    ))
    .await;
    assert_eq!(b.change().await["new"]["id"], 5);
}

/// A table with the default replica identity: a DELETE's old row is its key
/// only, and goes (as that key) to everyone the policies let read the table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_with_only_the_key_goes_to_the_tables_readers() {
    let t = TestServer::start().await;
    let alice = user(&t.sql, "alice@key.test").await;
    let bob = user(&t.sql, "bob@key.test").await;
    t.exec(
        "CREATE TABLE public.items (id int PRIMARY KEY, owner uuid, secret text);
         GRANT SELECT ON public.items TO authenticated;
         ALTER TABLE public.items ENABLE ROW LEVEL SECURITY;
         CREATE POLICY mine ON public.items FOR SELECT TO authenticated USING (owner = auth.uid());
         ALTER PUBLICATION aether_realtime ADD TABLE public.items;",
    )
    .await;
    t.sync().await;
    let mut a = t.ws(Some(&user_token(&alice))).await;
    let mut b = t.ws(Some(&user_token(&bob))).await;
    for ws in [&mut a, &mut b] {
        ws.subscribe("i", json!({"table": "items"})).await;
    }
    t.exec(&format!(
        "INSERT INTO public.items VALUES (1, '{alice}', 'only alice');
         DELETE FROM public.items WHERE id = 1;"
    ))
    .await;
    let c = a.change().await;
    assert_eq!(
        (&c["eventType"], &c["new"]["secret"]),
        (&json!("INSERT"), &json!("only alice"))
    );
    for ws in [&mut a, &mut b] {
        let c = ws.change().await;
        assert_eq!(
            (&c["eventType"], &c["old"]),
            (&json!("DELETE"), &json!({"id": 1})),
            "{c}"
        );
    }
}

/// Restrictive policies AND-ed (one with only WITH CHECK says nothing about
/// reading), a policy for a role `authenticated` is a member of, and a
/// filtered subscription: a row moving in or out is sent only if the row sent
/// passes the filter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restrictive_policies_inherited_roles_and_filters_on_moved_rows() {
    let t = TestServer::start().await;
    let alice = user(&t.sql, "alice@tasks.test").await;
    let bob = user(&t.sql, "bob@tasks.test").await;
    t.exec(
        "DO $$ BEGIN CREATE ROLE rls_team_role NOLOGIN;
         EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$;
         GRANT rls_team_role TO authenticated;
         CREATE TABLE public.tasks (id int PRIMARY KEY, owner uuid, status text, hidden boolean NOT NULL DEFAULT false);
         ALTER TABLE public.tasks REPLICA IDENTITY FULL;
         GRANT SELECT ON public.tasks TO authenticated;
         ALTER TABLE public.tasks ENABLE ROW LEVEL SECURITY;
         CREATE POLICY own ON public.tasks FOR SELECT TO rls_team_role USING (owner = auth.uid());
         CREATE POLICY shown ON public.tasks AS RESTRICTIVE FOR SELECT TO authenticated USING (NOT hidden);
         CREATE POLICY writes ON public.tasks AS RESTRICTIVE FOR ALL TO authenticated WITH CHECK (true);
         ALTER PUBLICATION aether_realtime ADD TABLE public.tasks;",
    )
    .await;
    t.sync().await;
    let s = status(&t, "public.tasks").await;
    assert_eq!(
        s["row_security"]["public.tasks"]["authenticated"]["decided"], "in_process",
        "{s}"
    );
    let mut a = t.ws(Some(&user_token(&alice))).await;
    let mut b = t.ws(Some(&user_token(&bob))).await;
    a.subscribe(
        "open",
        json!({"table": "tasks", "filter": "status=eq.open"}),
    )
    .await;
    b.subscribe("all", json!({"table": "tasks"})).await;
    t.exec(&format!(
        "INSERT INTO public.tasks VALUES (1, '{alice}', 'open');
         UPDATE public.tasks SET hidden = true WHERE id = 1;
         UPDATE public.tasks SET hidden = false, status = 'closed' WHERE id = 1;
         UPDATE public.tasks SET owner = '{bob}' WHERE id = 1;
         UPDATE public.tasks SET status = 'open' WHERE id = 1;
         INSERT INTO public.tasks VALUES (98, '{alice}', 'open'), (99, '{bob}', 'open');"
    ))
    .await;
    // Alice: in, hidden (out), back but closed (the row sent fails her
    // filter), handed to bob while closed (the row sent fails it again).
    assert_eq!(
        until_marker(&mut a, 98).await,
        [ev("INSERT", 1), ev("DELETE", 1)]
    );
    // Bob: in when it becomes his, then an ordinary update.
    assert_eq!(
        until_marker(&mut b, 99).await,
        [ev("INSERT", 1), ev("UPDATE", 1)]
    );
}

/// A table without row level security: every row, to the roles granted
/// SELECT on it, and to no one else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_without_rls_goes_to_the_roles_granted_select() {
    let t = TestServer::start().await;
    let alice = user(&t.sql, "alice@board.test").await;
    t.exec(
        "CREATE TABLE public.board (id int PRIMARY KEY, note text);
         GRANT SELECT ON public.board TO anon;
         ALTER PUBLICATION aether_realtime ADD TABLE public.board;",
    )
    .await;
    t.sync().await;
    let s = status(&t, "public.board").await;
    assert_eq!(
        s["row_security"]["public.board"]["anon"]["decided"], "all_rows",
        "{s}"
    );
    assert_eq!(
        s["row_security"]["public.board"]["authenticated"]["decided"], "no_rows",
        "{s}"
    );
    let mut anon = t.ws(None).await;
    let mut a = t.ws(Some(&user_token(&alice))).await;
    for ws in [&mut anon, &mut a] {
        ws.subscribe("b", json!({"table": "board"})).await;
    }
    t.exec("INSERT INTO public.board VALUES (1, 'hello')").await;
    assert_eq!(anon.change().await["new"]["note"], "hello");
    // Everything is routed in order: alice's next frame is the reply to a
    // request sent now, not the row.
    t.sync().await;
    a.send(json!({"type": "subscription", "action": "unsubscribe", "data": {"id": "probe"}}))
        .await;
    let next = a.next().await;
    assert_eq!(next["code"], "unknown_subscription", "alice saw {next}");
}

/// The changes until (and without) the INSERT of the file at `marker`, as
/// (table, event, path).
async fn storage_until(ws: &mut Ws, marker: &str) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    loop {
        let c = ws.change().await;
        let row = shown_row(&c);
        let path = row["path"].as_str().unwrap_or_default().to_owned();
        let table = c["table"].as_str().unwrap_or_default().to_owned();
        if table == "files" && c["eventType"] == "INSERT" && path == marker {
            return out;
        }
        out.push((table, c["eventType"].as_str().unwrap().to_owned(), path));
    }
}

/// Aether's own `files` follow its conventions (the owner; everyone in a
/// public bucket) while only Aether's `aether_read` policy reads them. Once a
/// DBA adds policies, realtime follows them as a SELECT would, as the storage
/// routes and `/rest/v1` do: a permissive one shows Bob Alice's shared files,
/// a restrictive one hides drafts even from their owner, and a folder holding
/// a file Bob may now read shows to him too. Dropped, the conventions again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dbas_policies_on_files_decide_their_realtime_too() {
    let t = TestServer::start().await;
    let alice = user(&t.sql, "alice@files-rls.test").await;
    let bob = user(&t.sql, "bob@files-rls.test").await;
    t.exec("INSERT INTO public.buckets (id, name, public) VALUES ('open', 'open', true)")
        .await;
    let mut a = t.ws(Some(&user_token(&alice))).await;
    let mut b = t.ws(Some(&user_token(&bob))).await;
    for ws in [&mut a, &mut b] {
        ws.subscribe("f", json!({"table": "files"})).await;
        ws.subscribe("d", json!({"table": "folders"})).await;
    }
    let file = |path: &str, bucket: &str| {
        format!(
            "INSERT INTO public.files (bucket_id, path, name, owner_id)
               VALUES ('{bucket}', '{alice}/{path}', 'x', '{alice}');"
        )
    };
    let folder = |path: &str| {
        format!(
            "INSERT INTO public.folders (bucket_id, path, name, owner_id)
               VALUES ('files', '{alice}/{path}', '{path}', '{alice}');"
        )
    };
    let seen = |list: &[(&str, &str, &str)]| -> Vec<(String, String, String)> {
        list.iter()
            .map(|(t, e, p)| (t.to_string(), e.to_string(), format!("{alice}/{p}")))
            .collect()
    };
    // Only Aether's policy: the conventions decide.
    t.exec(&format!(
        "{}{}{}{}",
        folder("shared"),
        file("shared/one", "files"),
        file("shared/one.draft", "files"),
        file("m1", "open")
    ))
    .await;
    let m1 = format!("{alice}/m1");
    assert_eq!(
        storage_until(&mut a, &m1).await,
        seen(&[
            ("folders", "INSERT", "shared"),
            ("files", "INSERT", "shared/one"),
            ("files", "INSERT", "shared/one.draft")
        ])
    );
    assert_eq!(storage_until(&mut b, &m1).await, []);

    t.exec(&format!(
        "CREATE POLICY team_read ON public.files FOR SELECT TO authenticated
           USING (starts_with(path, '{alice}/shared/'));
         CREATE POLICY no_drafts ON public.files AS RESTRICTIVE FOR SELECT TO authenticated
           USING (path NOT LIKE '%.draft');"
    ))
    .await;
    let s = status(&t, "public.files").await;
    assert_eq!(
        s["row_security"]["public.files"]["authenticated"]["decided"], "in_postgres",
        "{s}"
    );
    assert!(s["row_security"].get("public.folders").is_some(), "{s}");
    t.exec(&format!(
        "{}{}
         UPDATE public.files SET name = 'y' WHERE path = '{alice}/shared/one';
         UPDATE public.folders SET name = 'shared!' WHERE path = '{alice}/shared';
         {}{}",
        file("shared/two", "files"),
        file("shared/two.draft", "files"),
        folder("private"),
        file("m2", "open")
    ))
    .await;
    let m2 = format!("{alice}/m2");
    let both = seen(&[
        ("files", "INSERT", "shared/two"),
        ("files", "UPDATE", "shared/one"),
        ("folders", "UPDATE", "shared"),
    ]);
    let mut mine = both.clone();
    mine.extend(seen(&[("folders", "INSERT", "private")]));
    assert_eq!(
        storage_until(&mut a, &m2).await,
        mine,
        "the owner no longer sees drafts"
    );
    assert_eq!(
        storage_until(&mut b, &m2).await,
        both,
        "Bob sees the shared files and their folder, not the drafts nor the private folder"
    );

    // Back to Aether's policy alone: the conventions again.
    t.exec("DROP POLICY team_read ON public.files; DROP POLICY no_drafts ON public.files;")
        .await;
    status_until(&t, "public.files", false).await;
    t.exec(&format!(
        "{}{}",
        file("shared/three.draft", "files"),
        file("m3", "open")
    ))
    .await;
    let m3 = format!("{alice}/m3");
    assert_eq!(
        storage_until(&mut a, &m3).await,
        seen(&[("files", "INSERT", "shared/three.draft")])
    );
    assert_eq!(storage_until(&mut b, &m3).await, []);
}
