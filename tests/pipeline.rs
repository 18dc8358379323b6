//! The change pipeline end to end: SQL typed into PostgreSQL reaches WebSocket
//! subscribers through the WAL, with the right rows, to the right people.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)] // a test may panic; its helpers are `pub` for the other test files

mod common;

use common::*;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dba_sql_insert_update_delete_truncate_arrive_live_with_old_and_new_rows() {
    let t = TestServer::start().await;
    let owner = user(&t.sql, "owner@example.com").await;
    bucket(&t.sql, "files", false).await;
    let mut ws = t.ws(Some(&service_token())).await;
    ws.subscribe(
        "s1",
        json!({"schema": "public", "table": "files", "event": "*"}),
    )
    .await;

    t.exec(&format!(
        "INSERT INTO public.files (bucket_id, path, name, size, mime_type, owner_id)
         VALUES ('files', 'a.txt', 'a.txt', 3, 'text/plain', '{owner}')"
    ))
    .await;
    let ins = ws.change().await;
    assert_eq!(ins["subscription"], "s1");
    assert_eq!(ins["eventType"], "INSERT");
    assert_eq!(
        (ins["schema"].as_str(), ins["table"].as_str()),
        (Some("public"), Some("files"))
    );
    assert_eq!(ins["new"]["name"], "a.txt");
    assert_eq!(ins["new"]["size"], 3);
    assert_eq!(ins["new"]["owner_id"], owner.as_str());
    assert_eq!(ins["old"], Value::Null);
    assert!(ins["timestamp"].as_i64().unwrap() > 1_700_000_000_000);
    let created = ins["new"]["created_at"].as_str().unwrap();
    assert!(
        created.ends_with('Z') && created.contains('T'),
        "ISO-8601: {created}"
    );

    t.exec("UPDATE public.files SET name = 'b.txt', size = 4")
        .await;
    let upd = ws.change().await;
    assert_eq!(upd["eventType"], "UPDATE");
    assert_eq!(upd["new"]["name"], "b.txt");
    assert_eq!(upd["old"]["name"], "a.txt");
    assert_eq!(upd["old"]["size"], 3);
    assert_eq!(upd["old"]["mime_type"], "text/plain", "old row is complete");
    assert!(
        upd["id"].as_str().unwrap() > ins["id"].as_str().unwrap(),
        "ids increase in commit order"
    );

    t.exec("DELETE FROM public.files").await;
    let del = ws.change().await;
    assert_eq!(del["eventType"], "DELETE");
    assert_eq!(del["new"], Value::Null);
    assert_eq!(del["old"]["name"], "b.txt");
    assert_eq!(del["old"]["bucket_id"], "files");

    // Logical decoding messages and origins in the stream are carried over, not fatal.
    t.exec(&format!(
        "BEGIN;
         SELECT pg_logical_emit_message(true, 'aether-test', 'transactional');
         INSERT INTO public.files (bucket_id, path, name, owner_id) VALUES ('files', 'c', 'c', '{owner}');
         COMMIT;
         SELECT pg_logical_emit_message(false, 'aether-test', 'not transactional');
         TRUNCATE public.files CASCADE"
    ))
    .await;
    assert_eq!(ws.change().await["eventType"], "INSERT");
    let tr = ws.change().await;
    assert_eq!(tr["eventType"], "TRUNCATE");
    assert_eq!(tr["table"], "files");
    assert_eq!(
        (tr["new"].clone(), tr["old"].clone()),
        (Value::Null, Value::Null)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_row_transaction_arrives_in_order_with_ordinals() {
    let t = TestServer::start().await;
    bucket(&t.sql, "pub", true).await;
    let mut ws = t.ws(Some(&service_token())).await;
    ws.subscribe("s", json!({"table": "files"})).await;
    t.exec(
        "BEGIN;
         INSERT INTO public.files (bucket_id, path, name, size) SELECT 'pub', 'f' || i, 'f' || i, i FROM generate_series(1, 50) i;
         COMMIT;
         INSERT INTO public.files (bucket_id, path, name, size) VALUES ('pub', 'last', 'last', 0);",
    )
    .await;
    let mut ids = Vec::new();
    for i in 1..=50 {
        let c = ws.change().await;
        assert_eq!(c["new"]["size"], i);
        ids.push(c["id"].as_str().unwrap().to_owned());
    }
    let last = ws.change().await;
    assert_eq!(last["new"]["name"], "last");
    ids.push(last["id"].as_str().unwrap().to_owned());
    let lsn_of = |id: &str| id.split('-').next().unwrap().to_owned();
    assert!(
        ids[..50].iter().all(|id| lsn_of(id) == lsn_of(&ids[0])),
        "one transaction, one commit LSN"
    );
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "strictly increasing ids"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_see_only_rows_they_may_see_and_secrets_never_leave() {
    let t = TestServer::start().await;
    let alice = user(&t.sql, "alice@example.com").await;
    let bob = user(&t.sql, "bob@example.com").await;
    bucket(&t.sql, "private", false).await;
    bucket(&t.sql, "public", true).await;
    let a_folder = folder(&t.sql, "private", &alice, "docs").await;
    t.sync().await;

    let mut a = t.ws(Some(&user_token(&alice))).await;
    let mut b = t.ws(Some(&user_token(&bob))).await;
    let mut anon = t.ws(None).await;
    let mut svc = t.ws(Some(&service_token())).await;
    a.subscribe("files", json!({"table": "files"})).await;
    a.subscribe("me", json!({"schema": "auth", "table": "users"}))
        .await;
    a.subscribe("ev", json!({"auth": alice})).await;
    b.subscribe("files", json!({"table": "files"})).await;
    b.subscribe("folder", json!({"files": a_folder})).await;
    anon.subscribe("files", json!({"table": "files"})).await;
    svc.subscribe("users", json!({"schema": "auth", "table": "users"}))
        .await;

    // Alice's private file: Alice only (and the service role).
    t.exec(&format!(
        "INSERT INTO public.files (bucket_id, folder_id, path, name, owner_id)
         VALUES ('private', '{a_folder}', 'docs/secret.pdf', 'secret.pdf', '{alice}')"
    ))
    .await;
    // An owner-less (service-role) file in a private bucket: the service role
    // only, no user.
    t.exec(
        "INSERT INTO public.files (bucket_id, path, name, owner_id)
         VALUES ('private', 'reports/secret.pdf', 'secret.pdf', NULL)",
    )
    .await;
    // A file in a public bucket: everyone, anonymous included.
    t.exec(&format!(
        "INSERT INTO public.files (bucket_id, path, name, owner_id) VALUES ('public', 'logo.png', 'logo.png', '{bob}')"
    ))
    .await;
    let c = a.change().await;
    assert_eq!(
        (c["subscription"].as_str(), c["new"]["name"].as_str()),
        (Some("files"), Some("secret.pdf"))
    );
    // Alice's next frame is the public file: the owner-less private row
    // (of the same name as hers) never reached her.
    assert_eq!(a.change().await["new"]["name"], "logo.png");
    // Bob's first frame is the public file: Alice's private row (even in the folder
    // he subscribed to by id) and the owner-less one never reached him.
    let c = b.change().await;
    assert_eq!(
        (c["subscription"].as_str(), c["new"]["name"].as_str()),
        (Some("files"), Some("logo.png"))
    );
    assert_eq!(anon.change().await["new"]["name"], "logo.png");

    // auth.users: Alice sees her own row without the password hash; the service role
    // sees every row, also without it.
    t.exec(&format!(
        "UPDATE auth.users SET encrypted_password = 'argon2-hash', last_sign_in_at = now() WHERE id = '{alice}';
         UPDATE auth.users SET encrypted_password = 'other-hash' WHERE id = '{bob}';
         INSERT INTO public.auth_events (user_id, event_type) VALUES ('{bob}', 'sign_in'), ('{alice}', 'sign_in');"
    ))
    .await;
    let me = a.change().await;
    assert_eq!(
        (me["subscription"].as_str(), me["new"]["id"].as_str()),
        (Some("me"), Some(alice.as_str()))
    );
    assert!(
        me["new"].get("encrypted_password").is_none()
            && me["old"].get("encrypted_password").is_none()
    );
    let ev = a.change().await;
    assert_eq!(
        (ev["subscription"].as_str(), ev["new"]["user_id"].as_str()),
        (Some("ev"), Some(alice.as_str()))
    );
    for _ in 0..2 {
        let u = svc.change().await;
        assert!(
            u["new"].get("encrypted_password").is_none(),
            "secret column leaked: {u}"
        );
    }

    // Filters on secret columns are refused like unknown columns.
    svc.send(json!({"type":"subscription","action":"subscribe","data":{"id":"x","schema":"auth","table":"users","filter":"encrypted_password=eq.x"}})).await;
    assert_eq!(svc.next().await["code"], "invalid_filter");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_select_rows_and_event_kinds() {
    let t = TestServer::start().await;
    bucket(&t.sql, "pub", true).await;
    let owner = user(&t.sql, "o@example.com").await;
    let f1 = folder(&t.sql, "pub", &owner, "one").await;
    let f2 = folder(&t.sql, "pub", &owner, "two").await;
    let mut ws = t.ws(Some(&service_token())).await;
    ws.subscribe(
        "big",
        json!({"table": "files", "filter": "size=gte.100&mime_type=in.(image/png,image/gif)"}),
    )
    .await;
    ws.subscribe(
        "f1",
        json!({"table": "files", "filter": format!("folder_id=eq.{f1}")}),
    )
    .await;
    ws.subscribe("del", json!({"table": "files", "event": "DELETE"}))
        .await;
    ws.subscribe("root", json!({"files": null})).await;
    ws.subscribe("other-bucket", json!({"storage": "elsewhere"}))
        .await;

    t.exec(&format!(
        "INSERT INTO public.files (bucket_id, folder_id, path, name, size, mime_type) VALUES
           ('pub', '{f2}', 'two/a', 'a', 10, 'image/png'),      -- nothing
           ('pub', '{f2}', 'two/b', 'b', 500, 'image/png'),     -- big
           ('pub', '{f1}', 'one/c', 'c', 1, 'text/plain'),      -- f1
           ('pub', NULL, 'd', 'd', 1, 'text/plain');            -- root"
    ))
    .await;
    let got: Vec<(String, String)> = [ws.change().await, ws.change().await, ws.change().await]
        .iter()
        .map(|c| {
            (
                c["subscription"].as_str().unwrap().to_owned(),
                c["new"]["name"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("big".into(), "b".into()),
            ("f1".into(), "c".into()),
            ("root".into(), "d".into())
        ]
    );

    // Moving a file out of folder one is news to folder one's subscribers.
    t.exec(&format!(
        "UPDATE public.files SET folder_id = '{f2}' WHERE name = 'c'"
    ))
    .await;
    let moved = ws.change().await;
    assert_eq!(
        (moved["subscription"].as_str(), moved["eventType"].as_str()),
        (Some("f1"), Some("UPDATE"))
    );
    assert_eq!(moved["new"]["folder_id"], f2.as_str());
    assert_eq!(moved["old"]["folder_id"], f1.as_str());

    t.exec("DELETE FROM public.files WHERE name = 'a'").await;
    let d = ws.change().await;
    assert_eq!(
        (d["subscription"].as_str(), d["old"]["name"].as_str()),
        (Some("del"), Some("a"))
    );

    // Unsubscribe: no more frames for that id; the reply comes after the last one.
    ws.send(json!({"type":"subscription","action":"unsubscribe","data":{"id":"del"}}))
        .await;
    assert_eq!(
        ws.next().await,
        json!({"type":"subscription","action":"unsubscribed","data":{"id":"del"}})
    );
    t.exec("DELETE FROM public.files WHERE name = 'd'; INSERT INTO public.files (bucket_id, path, name, size, mime_type) VALUES ('pub', 'z', 'z', 100, 'image/gif')").await;
    let root = ws.change().await;
    assert_eq!(
        (root["subscription"].as_str(), root["eventType"].as_str()),
        (Some("root"), Some("DELETE"))
    );
    let next = ws.change().await;
    assert_eq!(
        (next["subscription"].as_str(), next["eventType"].as_str()),
        (Some("big"), Some("INSERT"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_listed_type_becomes_the_right_json() {
    let t = TestServer::start().await;
    t.exec(
        "CREATE TYPE public.mood AS ENUM ('happy', 'sad');
         CREATE TABLE public.typed (
            id serial PRIMARY KEY, mood public.mood, b boolean, i2 smallint, i4 integer, i8 bigint, f4 real, f8 double precision,
            n_small numeric, n_big numeric, t text, v varchar(10), u uuid, ts timestamptz, tsn timestamp, d date,
            j json, jb jsonb, ai integer[], at text[], ajb jsonb[], by bytea, nul text, fnan double precision);
         ALTER TABLE public.typed REPLICA IDENTITY FULL;
         ALTER PUBLICATION aether_realtime ADD TABLE public.typed;",
    )
    .await;
    let mut ws = t.ws(Some(&service_token())).await;
    // The table was published after start: the catalog is refreshed on the miss.
    ws.subscribe("t", json!({"table": "typed"})).await;
    t.exec(
        r#"INSERT INTO public.typed (mood, b, i2, i4, i8, f4, f8, n_small, n_big, t, v, u, ts, tsn, d, j, jb, ai, at, ajb, by, nul, fnan)
           VALUES ('happy', true, -2, 2147483647, 9007199254740993, 1.5, 2.25, 12.50, 123456789012345678901234.5, 'héllo "q"', 'v',
                   'A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11', '2026-11-21 12:34:56.789+02', '2026-11-21 12:34:56', '2026-11-21',
                   '{"a": [1, 2]}', '{"k": {"n": null}}', '{1,NULL,3}', '{"a b","c,d",NULL}', ARRAY['{"x":1}'::jsonb],
                   '\x0102ff', NULL, 'NaN')"#,
    )
    .await;
    let c = ws.change().await;
    let n = &c["new"];
    assert_eq!(n["b"], true);
    assert_eq!(n["i2"], -2);
    assert_eq!(n["i4"], 2147483647);
    assert_eq!(n["i8"], 9007199254740993i64);
    assert_eq!(n["f4"], 1.5);
    assert_eq!(n["f8"], 2.25);
    assert_eq!(n["n_small"], 12.5);
    assert_eq!(
        n["n_big"], "123456789012345678901234.5",
        "numeric kept exact as a string"
    );
    assert_eq!(n["t"], "héllo \"q\"");
    assert_eq!(n["v"], "v");
    assert_eq!(n["u"], "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11");
    assert_eq!(n["ts"], "2026-11-21T10:34:56.789Z");
    assert_eq!(n["tsn"], "2026-11-21T12:34:56");
    assert_eq!(n["d"], "2026-11-21");
    assert_eq!(n["j"], json!({"a": [1, 2]}));
    assert_eq!(n["jb"], json!({"k": {"n": null}}));
    assert_eq!(n["ai"], json!([1, null, 3]));
    assert_eq!(n["at"], json!(["a b", "c,d", null]));
    assert_eq!(n["ajb"], json!([{"x": 1}]));
    assert_eq!(n["by"], "\\x0102ff");
    assert_eq!(n["nul"], Value::Null);
    assert_eq!(n["fnan"], "NaN");
    assert_eq!(n["id"], 1);
    assert_eq!(
        n["mood"], "happy",
        "custom types (announced by a Type message) as text"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_toast_values_are_filled_from_the_old_row() {
    let t = TestServer::start().await;
    t.exec(
        "CREATE TABLE public.docs (id int PRIMARY KEY, title text, body text);
         ALTER TABLE public.docs ALTER COLUMN body SET STORAGE EXTERNAL;
         ALTER TABLE public.docs REPLICA IDENTITY FULL;
         ALTER PUBLICATION aether_realtime ADD TABLE public.docs;",
    )
    .await;
    let mut ws = t.ws(Some(&service_token())).await;
    ws.subscribe("d", json!({"table": "docs"})).await;
    // 100 kB, stored out of line: an UPDATE that does not touch it sends 'unchanged TOAST'.
    t.exec("INSERT INTO public.docs VALUES (1, 'v1', repeat('0123456789', 10000))")
        .await;
    let ins = ws.change().await;
    assert_eq!(ins["new"]["body"].as_str().unwrap().len(), 100_000);
    t.exec("UPDATE public.docs SET title = 'v2' WHERE id = 1")
        .await;
    let upd = ws.change().await;
    assert_eq!(upd["new"]["title"], "v2");
    assert_eq!(
        upd["new"]["body"].as_str().map(str::len),
        Some(100_000),
        "TOAST value filled, not null"
    );
    assert_eq!(upd["old"]["body"].as_str().map(str::len), Some(100_000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_column_is_picked_up_without_a_restart() {
    let t = TestServer::start().await;
    bucket(&t.sql, "pub", true).await;
    let mut ws = t.ws(Some(&service_token())).await;
    ws.subscribe("all", json!({"table": "files"})).await;
    t.exec("INSERT INTO public.files (bucket_id, path, name) VALUES ('pub', 'a', 'a')")
        .await;
    assert!(ws.change().await["new"].get("tag").is_none());
    t.exec("ALTER TABLE public.files ADD COLUMN tag text DEFAULT 'none'")
        .await;
    t.exec("INSERT INTO public.files (bucket_id, path, name, tag) VALUES ('pub', 'b', 'b', 'red')")
        .await;
    assert_eq!(ws.change().await["new"]["tag"], "red");
    // The new column can be filtered on now.
    ws.subscribe("red", json!({"table": "files", "filter": "tag=eq.red"}))
        .await;
    t.exec("UPDATE public.files SET tag = 'red' WHERE name = 'a'")
        .await;
    let mut subs = [ws.change().await, ws.change().await];
    subs.sort_by_key(|c| c["subscription"].as_str().unwrap().to_owned());
    assert_eq!(subs[0]["subscription"], "all");
    assert_eq!(subs[1]["subscription"], "red");
    assert_eq!(subs[1]["old"]["tag"], "none");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_and_bad_subscriptions_get_errors_and_the_connection_stays_open() {
    let t = TestServer::start().await;
    bucket(&t.sql, "pub", true).await;
    let mut ws = t.ws(Some(&service_token())).await;
    let cases = [
        ("{not json", "invalid_json"),
        ("[1,2]", "invalid_message"),
        (r#"{"type":"bogus"}"#, "unknown_type"),
        (
            r#"{"type":"subscription","action":"subscribe","data":{"table":"files"}}"#,
            "invalid_subscription",
        ),
        (
            r#"{"type":"subscription","action":"subscribe","data":{"id":"a","table":"nope"}}"#,
            "unknown_table",
        ),
        (
            r#"{"type":"subscription","action":"subscribe","data":{"id":"a","schema":"aether","table":"schema_migrations"}}"#,
            "unknown_table",
        ),
        (
            r#"{"type":"subscription","action":"subscribe","data":{"id":"a","table":"files","filter":"nope=eq.1"}}"#,
            "invalid_filter",
        ),
        (
            r#"{"type":"subscription","action":"subscribe","data":{"id":"a","table":"files","filter":"size=like.1"}}"#,
            "invalid_filter",
        ),
        (
            r#"{"type":"subscription","action":"subscribe","data":{"id":"a","table":"files","filter":"size=eq.big"}}"#,
            "invalid_filter",
        ),
        (
            r#"{"type":"subscription","action":"subscribe","data":{"id":"a","table":"files","filter":"folder_id=eq.x"}}"#,
            "invalid_filter",
        ),
        (
            r#"{"type":"subscription","action":"subscribe","data":{"id":"a","table":"files","event":"UPSERT"}}"#,
            "invalid_event",
        ),
        (
            r#"{"type":"subscription","action":"subscribe","data":{"id":"a","table":"files","since":"yesterday"}}"#,
            "invalid_since",
        ),
        (
            r#"{"type":"subscription","action":"unsubscribe","data":{"id":"never"}}"#,
            "unknown_subscription",
        ),
    ];
    for (frame, code) in cases {
        ws.send_text(frame).await;
        let e = ws.next().await;
        assert_eq!(e["type"], "error", "{frame}");
        assert_eq!(e["code"], code, "{frame} → {e}");
        assert!(!e["message"].as_str().unwrap().is_empty());
        assert!(e["details"]["component"].is_string() && e["details"]["reason"].is_string());
    }
    // A frame over the size limit closes with 1009 on its own connection only.
    let mut big = t.ws(Some(&service_token())).await;
    big.send_text(&"x".repeat(200 * 1024)).await;
    let (code, _) = big.until_close().await;
    assert_eq!(code, Some(1009));
    // Still open and working.
    ws.subscribe("ok", json!({"table": "files"})).await;
    ws.subscribe("dup", json!({"table": "files"})).await;
    ws.send(json!({"type":"subscription","action":"subscribe","data":{"id":"ok","table":"files"}}))
        .await;
    assert_eq!(ws.next().await["code"], "duplicate_subscription");
    t.exec("INSERT INTO public.files (bucket_id, path, name) VALUES ('pub', 'a', 'a')")
        .await;
    assert_eq!(ws.change().await["new"]["name"], "a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_and_expired_tokens_get_an_error_frame_and_close() {
    let t = TestServer::start().await;
    for (tok, code) in [
        (
            token(
                Some(&uuid::Uuid::new_v4().to_string()),
                "authenticated",
                -10,
            ),
            "auth/expired-token",
        ),
        ("not-a-jwt".to_owned(), "auth/invalid-token"),
        (
            aether_auth::JwtKeys::new(
                "another-secret-another-secret-another",
                aether::config::JwtAlgorithm::HS256,
                60,
            )
            .sign(&aether_auth::Claims {
                sub: None,
                email: None,
                role: Some("service_role".into()),
                exp: chrono::Utc::now().timestamp() + 60,
                iat: None,
                session_id: None,
                aud: None,
            }),
            "auth/invalid-token",
        ),
    ] {
        let mut ws = t.ws(Some(&tok)).await;
        let (close, frames) = ws.until_close().await;
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0]["type"], "error");
        assert_eq!(frames[0]["code"], code);
        assert_eq!(close, Some(4001));
    }
    // A token that expires while connected: error frame, then close.
    let mut ws = t
        .ws(Some(&token(Some(&t.new_user().await), "authenticated", 2)))
        .await;
    let (close, frames) = ws.until_close().await;
    assert_eq!(frames.last().unwrap()["code"], "auth/expired-token");
    assert_eq!(close, Some(4001));
}

async fn insert_files(t: &TestServer, names: &[&str]) {
    for n in names {
        t.exec(&format!(
            "INSERT INTO public.files (bucket_id, path, name) VALUES ('pub', '{n}', '{n}')"
        ))
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn since_replays_exactly_the_missed_changes_then_goes_live() {
    let t = TestServer::start().await;
    bucket(&t.sql, "pub", true).await;
    let owner = user(&t.sql, "o@example.com").await;
    let mut ws = t.ws(Some(&service_token())).await;
    ws.subscribe("s", json!({"table": "files"})).await;
    insert_files(&t, &["a", "b", "c"]).await;
    let ids: Vec<String> = [ws.change().await, ws.change().await, ws.change().await]
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_owned())
        .collect();
    ws.close().await;

    // Missed while disconnected: an insert, an update and a delete (and a private
    // row of someone else, which an anonymous resume must not get).
    t.exec(&format!(
        "INSERT INTO public.files (bucket_id, path, name) VALUES ('pub', 'd', 'd');
         UPDATE public.files SET size = 7 WHERE name = 'a';
         DELETE FROM public.files WHERE name = 'b';
         INSERT INTO public.buckets (id, name) VALUES ('priv', 'priv');
         INSERT INTO public.files (bucket_id, path, name, owner_id) VALUES ('priv', 'x', 'x', '{owner}');"
    ))
    .await;
    t.sync().await;

    let mut ws = t.ws(Some(&service_token())).await;
    ws.subscribe("s", json!({"table": "files", "since": ids[2]}))
        .await;
    let replay: Vec<(String, String)> = [
        ws.change().await,
        ws.change().await,
        ws.change().await,
        ws.change().await,
    ]
    .iter()
    .map(|c| {
        let row = if c["eventType"] == "DELETE" {
            &c["old"]
        } else {
            &c["new"]
        };
        (
            c["eventType"].as_str().unwrap().to_owned(),
            row["name"].as_str().unwrap().to_owned(),
        )
    })
    .collect();
    assert_eq!(
        replay,
        [
            ("INSERT".into(), "d".into()),
            ("UPDATE".into(), "a".into()),
            ("DELETE".into(), "b".into()),
            ("INSERT".into(), "x".into())
        ]
    );
    // Then live, with no duplicate of the replayed changes.
    insert_files(&t, &["e"]).await;
    assert_eq!(ws.change().await["new"]["name"], "e");

    // An anonymous resume from the first id: replay is filtered and authorized too.
    let mut anon = t.ws(None).await;
    anon.subscribe(
        "s",
        json!({"table": "files", "event": "INSERT", "since": ids[0]}),
    )
    .await;
    let names: Vec<String> = [
        anon.change().await,
        anon.change().await,
        anon.change().await,
        anon.change().await,
    ]
    .iter()
    .map(|c| c["new"]["name"].as_str().unwrap().to_owned())
    .collect();
    assert_eq!(names, ["b", "c", "d", "e"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_position_older_than_the_log_gets_an_explicit_gap() {
    // A log of a few changes (a segment is an eighth of the budget, at least 256 B).
    let t = TestServer::start_with(|c| c.resume_retention_bytes = 600).await;
    bucket(&t.sql, "pub", true).await;
    let mut ws = t.ws(Some(&service_token())).await;
    ws.subscribe("s", json!({"table": "files"})).await;
    insert_files(&t, &["a", "b", "c", "d", "e", "f"]).await;
    let mut ids = Vec::new();
    for _ in 0..6 {
        ids.push(ws.change().await["id"].as_str().unwrap().to_owned());
    }
    // Retention runs after each fsync: wait until the change after the oldest
    // is gone too (a floor equal to `ids[0]` still answers `since = ids[0]`).
    let floor = || t.server.log.bounds().floor.to_string();
    tokio::time::timeout(WAIT, async {
        while floor().as_str() <= ids[0].split('.').next().unwrap() {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "retention drops the oldest segments: {:?} {ids:?}",
            t.server.log.bounds()
        )
    });
    ws.send(json!({"type":"subscription","action":"subscribe","data":{"id":"old","table":"files","since": ids[0]}})).await;
    let e = ws.next().await;
    assert_eq!(
        (
            e["type"].as_str(),
            e["code"].as_str(),
            e["subscription"].as_str()
        ),
        (Some("error"), Some("gap"), Some("old"))
    );
    // Inside the log it still works: from the oldest position it holds on.
    let floor = floor();
    let k = ids
        .iter()
        .position(|id| id.split('.').next().unwrap() >= floor.as_str())
        .unwrap();
    assert!(k < 5, "the log keeps a few changes: floor {floor}, {ids:?}");
    ws.subscribe("recent", json!({"table": "files", "since": ids[k]}))
        .await;
    for name in ["a", "b", "c", "d", "e", "f"].iter().skip(k + 1) {
        assert_eq!(ws.change().await["new"]["name"], *name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_is_closed_and_does_not_delay_a_fast_one() {
    // A tiny queue: the fast client overflows it too, and catches up from history.
    let t = TestServer::start_with(|c| {
        c.ws_queue_capacity = 8;
        c.ws_stall_timeout = std::time::Duration::from_secs(2);
    })
    .await;
    t.exec(
        "CREATE TABLE public.blobs (id serial PRIMARY KEY, body text);
         ALTER PUBLICATION aether_realtime ADD TABLE public.blobs;",
    )
    .await;
    let mut slow = Ws::connect_small_buffer(t.addr(), Some(&service_token())).await;
    let mut fast = t.ws(Some(&service_token())).await;
    slow.subscribe("s", json!({"table": "blobs"})).await;
    fast.subscribe("f", json!({"table": "blobs"})).await;
    // ~25 MB of changes: more than the slow client's socket buffers and queue hold.
    const N: i64 = 400;
    t.exec(&format!("INSERT INTO public.blobs (body) SELECT repeat(md5(i::text), 2000) FROM generate_series(1, {N}) i"))
        .await;
    for i in 1..=N {
        assert_eq!(fast.change().await["new"]["id"], i);
    }
    // The slow client drains nothing: the server gives up on it after the stall
    // timeout (only the fast connection stays registered)…
    tokio::time::timeout(WAIT, async {
        while t.server.state.realtime.registry.stats().active > 1 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the stalled connection is closed");
    // …and the slow client, reading at last, finds the reason and a 4008 close
    // after what was buffered.
    let (code, frames) = slow.until_close().await;
    assert_eq!(code, Some(4008));
    let last = frames.last().unwrap();
    assert_eq!(
        (last["type"].as_str(), last["code"].as_str()),
        (Some("error"), Some("slow_consumer"))
    );
    assert!(
        frames.len() < (N as usize) + 1,
        "the slow client did not get everything"
    );
    // The fast client is unaffected and still live.
    t.exec("INSERT INTO public.blobs (body) VALUES ('after')")
        .await;
    assert_eq!(fast.change().await["new"]["body"], "after");
}

/// A client that reads steadily but slower than the stream is produced, next to
/// a client that reads at full speed, with only about one change held in memory:
/// the slow one catches up from the change log on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_steady_reader_catches_up_from_the_log_and_never_holds_the_stream_back() {
    const N: i64 = 1500;
    let t = TestServer::start_with(|c| {
        c.ws_queue_capacity = 8;
        c.resume_memory_bytes = 1;
    })
    .await;
    t.exec(
        "CREATE TABLE public.blobs (id serial PRIMARY KEY, body text);
         ALTER PUBLICATION aether_realtime ADD TABLE public.blobs;",
    )
    .await;
    let mut reader = Ws::connect_small_buffer(t.addr(), Some(&service_token())).await;
    reader.subscribe("r", json!({"table": "blobs"})).await;
    let mut fast = t.ws(Some(&service_token())).await;
    fast.subscribe("f", json!({"table": "blobs"})).await;
    // ~24 MB of changes, committed faster than the reader takes them.
    t.exec(&format!(
        "INSERT INTO public.blobs (body) SELECT repeat(md5(i::text), 500) FROM generate_series(1, {N}) i"
    ))
    .await;
    // The fast client has everything while the slow one is still far behind.
    let mut fast_ids = Vec::new();
    while fast_ids.len() < N as usize {
        let v = fast.change().await;
        fast_ids.push(v["new"]["id"].as_i64().unwrap());
    }
    assert_eq!(fast_ids, (1..=N).collect::<Vec<_>>());
    let mut ids = Vec::new();
    while ids.len() < N as usize {
        match reader.next_or_close().await {
            Ok(v) if v["type"] == "change" => {
                ids.push(v["new"]["id"].as_i64().unwrap());
                // A steady reader, a few times slower than the server decodes.
                if ids.len() % 4 == 0 {
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                }
            }
            Ok(_) => {}
            Err(code) => panic!(
                "the reader was closed ({code:?}) after {} changes",
                ids.len()
            ),
        }
    }
    assert_eq!(ids, (1..=N).collect::<Vec<_>>());
    // Live again afterwards.
    t.exec("INSERT INTO public.blobs (body) VALUES ('after')")
        .await;
    assert_eq!(reader.change().await["new"]["body"], "after");
    assert_eq!(fast.change().await["new"]["body"], "after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_slot_is_confirmed_within_seconds_of_a_change_being_logged() {
    let t = TestServer::start().await;
    bucket(&t.sql, "pub", true).await;
    let mut ws = t.ws(Some(&service_token())).await;
    ws.subscribe("s", json!({"table": "files"})).await;
    insert_files(&t, &["a", "b", "c"]).await;
    let ids: Vec<String> = [ws.change().await, ws.change().await, ws.change().await]
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_owned())
        .collect();
    let lsn = |id: &str| u64::from_str_radix(id.split('-').next().unwrap(), 16).unwrap();
    let confirmed = || async {
        let row = t
            .sql
            .query_one(
                "SELECT (confirmed_flush_lsn - '0/0'::pg_lsn)::int8 FROM pg_replication_slots WHERE slot_name = $1",
                &[&t.db.name],
            )
            .await
            .unwrap();
        row.get::<_, i64>(0) as u64
    };
    // The last transaction is logged: the slot follows within seconds, however
    // long the log keeps it for resumes.
    tokio::time::timeout(std::time::Duration::from_secs(5), async {
        while confirmed().await <= lsn(&ids[2]) {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("slot confirmed past the last logged transaction");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_replication_connection_reconnects_without_loss_or_duplicates() {
    let t = TestServer::start().await;
    bucket(&t.sql, "pub", true).await;
    let mut ws = t.ws(Some(&service_token())).await;
    ws.subscribe("s", json!({"table": "files"})).await;
    insert_files(&t, &["before"]).await;
    assert_eq!(ws.change().await["new"]["name"], "before");
    // Kill the walsender: PostgreSQL will resend from the confirmed position, which
    // trails the resume window, so "before" comes again and must be recognized.
    let killed: bool = t
        .sql
        .query_one(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1",
            &[&t.db.name],
        )
        .await
        .unwrap()
        .get(0);
    assert!(killed);
    insert_files(&t, &["during", "after"]).await;
    assert_eq!(ws.change().await["new"]["name"], "during");
    assert_eq!(ws.change().await["new"]["name"], "after");
    // Health is back to connected.
    wait_healthy(t.addr()).await;
    insert_files(&t, &["last"]).await;
    assert_eq!(ws.change().await["new"]["name"], "last");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_subscribed_reply_gives_the_position_to_resume_from_before_any_change() {
    let t = TestServer::start().await;
    bucket(&t.sql, "pos", true).await;
    let insert = |name: &str| {
        format!(
            "INSERT INTO public.files (bucket_id, path, name) VALUES ('pos', '{name}', '{name}')"
        )
    };
    // Something routed before the subscription: its position is the start.
    t.exec(&insert("before")).await;
    t.sync().await;
    let mut ws = t.ws(Some(&service_token())).await;
    let reply = ws
        .subscribe("s", json!({"table": "files", "filter": "bucket_id=eq.pos"}))
        .await;
    let start = reply["data"]["position"].as_str().unwrap().to_owned();
    // The connection drops before the first change reaches it…
    ws.close().await;
    t.exec(&insert("missed")).await;
    // …and resuming from `position` gets exactly what it missed, nothing older.
    let mut again = t.ws(Some(&service_token())).await;
    again
        .subscribe(
            "s",
            json!({"table": "files", "filter": "bucket_id=eq.pos", "since": start}),
        )
        .await;
    let c = again.change().await;
    assert_eq!(c["new"]["name"], "missed");
    assert!(c["id"].as_str().unwrap() > start.as_str());
    t.exec(&insert("live")).await;
    assert_eq!(again.change().await["new"]["name"], "live");
}

/// Changes written straight to the socket by the router's writers, and what
/// goes through the connection's queue and task (the router's replies to
/// subscribes sent meanwhile), share one socket: every change arrives once
/// and in order, and every reply arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_writes_and_queued_replies_share_the_socket_in_order() {
    const N: i64 = 300;
    let t = TestServer::start().await;
    t.exec(
        "CREATE TABLE public.ticks (id serial PRIMARY KEY, n int);
         ALTER PUBLICATION aether_realtime ADD TABLE public.ticks;",
    )
    .await;
    let mut ws = t.ws(Some(&service_token())).await;
    ws.subscribe("t", json!({"table": "ticks"})).await;
    let commits = async {
        for i in 1..=N {
            t.exec(&format!("INSERT INTO public.ticks (n) VALUES ({i})"))
                .await;
        }
    };
    let reads = async {
        let (mut ns, mut replies, mut asked) = (Vec::new(), 0, 0);
        while ns.len() < N as usize || replies < asked {
            // Now and then, a request whose reply the router queues.
            if asked < 100 && ns.len() >= asked * 3 {
                let id = format!("o{asked}");
                ws.send(json!({"type": "subscription", "action": "subscribe",
                    "data": {"id": id, "table": "files"}}))
                    .await;
                asked += 1;
            }
            let v = ws.next().await;
            match (v["type"].as_str(), v["action"].as_str()) {
                (Some("change"), _) => ns.push(v["new"]["n"].as_i64().expect("n")),
                (Some("subscription"), Some("subscribed")) => replies += 1,
                _ => panic!("unexpected frame {v}"),
            }
        }
        (ns, replies, asked)
    };
    let ((), (ns, replies, asked)) = tokio::join!(commits, reads);
    assert_eq!(ns, (1..=N).collect::<Vec<_>>());
    assert_eq!(replies, asked);
    // Some changes did go around the queue: the router's writers wrote them.
    let direct = &t.server.state.realtime.stats.changes_direct;
    assert!(direct.load(std::sync::atomic::Ordering::Relaxed) > 0);
}
