//! The Auth & Files API end to end over real sockets: routes and their shapes,
//! every documented error code, revocation on REST and WebSocket, rate limits,
//! streaming limits, ranges, and REST writes reaching realtime subscribers
//! through the WAL.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)] // a test may panic; its helpers are `pub` for the other test files

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use reqwest::header::{
    ACCEPT_RANGES, AUTHORIZATION, CONTENT_RANGE, CONTENT_TYPE, HeaderMap, RANGE, RETRY_AFTER,
};
use reqwest::multipart::{Form, Part};
use reqwest::{Client, Response, StatusCode};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const PASSWORD: &str = "correct horse 1";

fn http() -> Client {
    Client::new()
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// Asserts an error answer in the documented shape; returns its message.
async fn expect_error(res: Response, status: u16, code: &str) -> String {
    let got = res.status().as_u16();
    let ct = res
        .headers()
        .get(CONTENT_TYPE)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let text = res.text().await.unwrap();
    assert_eq!(got, status, "status (body {text})");
    assert!(
        ct.starts_with("application/json"),
        "JSON content type, got {ct:?}: {text}"
    );
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("JSON body: {text}"));
    assert_eq!(v["error"]["code"], code, "code in {v}");
    assert_eq!(v["error"]["status"], status, "status in {v}");
    let msg = v["error"]["message"].as_str().expect("message").to_owned();
    assert!(!msg.is_empty());
    assert_eq!(v.as_object().unwrap().len(), 1, "only `error` in {v}");
    msg
}

async fn json_ok(res: Response, status: u16) -> Value {
    let got = res.status().as_u16();
    let text = res.text().await.unwrap();
    assert_eq!(got, status, "status (body {text})");
    serde_json::from_str(&text).unwrap()
}

async fn post_auth(t: &TestServer, route: &str, email: &str, password: &str) -> Response {
    http()
        .post(t.url(route))
        .json(&json!({"email": email, "password": password}))
        .send()
        .await
        .unwrap()
}

/// Signs up; returns (user id, access token).
async fn sign_up(t: &TestServer, email: &str) -> (String, String) {
    let v = json_ok(post_auth(t, "/auth/sign-up", email, PASSWORD).await, 201).await;
    (
        v["user"]["id"].as_str().unwrap().to_owned(),
        v["session"]["access_token"].as_str().unwrap().to_owned(),
    )
}

fn file_part(bytes: Vec<u8>, name: &str, mime: &str) -> Part {
    Part::bytes(bytes)
        .file_name(name.to_owned())
        .mime_str(mime)
        .unwrap()
}

async fn upload(
    t: &TestServer,
    token: &str,
    bucket: Option<&str>,
    path: Option<&str>,
    file: Part,
) -> Response {
    let mut form = Form::new();
    if let Some(b) = bucket {
        form = form.text("bucket", b.to_owned());
    }
    if let Some(p) = path {
        form = form.text("path", p.to_owned());
    }
    form = form.part("file", file);
    http()
        .post(t.url("/storage/upload"))
        .header(AUTHORIZATION, bearer(token))
        .multipart(form)
        .send()
        .await
        .unwrap()
}

async fn list(t: &TestServer, token: &str, query: &[(&str, &str)]) -> Response {
    http()
        .get(t.url("/storage/list"))
        .header(AUTHORIZATION, bearer(token))
        .query(query)
        .send()
        .await
        .unwrap()
}

async fn delete(t: &TestServer, token: &str, body: Value) -> Response {
    http()
        .delete(t.url("/storage/delete"))
        .header(AUTHORIZATION, bearer(token))
        .json(&body)
        .send()
        .await
        .unwrap()
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

fn storage_dir(t: &TestServer) -> PathBuf {
    t.config.data_dir.join("storage")
}

/// Every regular file under `dir` (blobs and in-progress upload parts).
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out.sort();
    out
}

/// Waits (with a timeout) until `cond` holds.
async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    tokio::time::timeout(WAIT, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

async fn count(t: &TestServer, sql: &str) -> i64 {
    t.sql.query_one(sql, &[]).await.unwrap().get(0)
}

/// The next change frame for which `want` holds. Changes committed just before a
/// subscription may still reach it (it is live from the moment the router handles
/// it, and the WAL can lag the REST answer), so earlier rows are skipped.
async fn change_where(ws: &mut Ws, want: impl Fn(&Value) -> bool) -> Value {
    loop {
        let c = ws.change().await;
        if want(&c) {
            return c;
        }
    }
}

/// Sends raw bytes and reads the status line's code (for URLs a client library
/// would normalize).
async fn raw_status(t: &TestServer, request: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(t.addr()).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code = text.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = text
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_owned())
        .unwrap_or_default();
    (code, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_up_sign_in_sign_out_with_their_shapes_and_errors() {
    let t = TestServer::start().await;

    let before = chrono::Utc::now().timestamp();
    let res = post_auth(&t, "/auth/sign-up", "  Alice@Example.COM ", PASSWORD).await;
    let v = json_ok(res, 201).await;
    let uid = v["user"]["id"].as_str().unwrap().to_owned();
    uuid::Uuid::parse_str(&uid).unwrap();
    assert_eq!(v["user"]["email"], "alice@example.com");
    let created = v["user"]["created_at"].as_str().unwrap();
    chrono::DateTime::parse_from_rfc3339(created).unwrap();
    let token_a = v["session"]["access_token"].as_str().unwrap().to_owned();
    let exp = v["session"]["expires_at"].as_i64().unwrap();
    assert!(
        (before + 3590..=before + 3610).contains(&exp),
        "expires_at {exp}"
    );
    assert_eq!(v.as_object().unwrap().len(), 2);
    assert_eq!(v["user"].as_object().unwrap().len(), 3);
    assert_eq!(v["session"].as_object().unwrap().len(), 2);

    // The token: sub, email, role, exp, iat, session_id, signed with JWT_SECRET.
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    validation.validate_aud = false;
    let claims = jsonwebtoken::decode::<Value>(
        &token_a,
        &jsonwebtoken::DecodingKey::from_secret(SECRET.as_bytes()),
        &validation,
    )
    .unwrap()
    .claims;
    assert_eq!(claims["sub"], uid.as_str());
    assert_eq!(claims["email"], "alice@example.com");
    assert_eq!(claims["role"], "authenticated");
    assert_eq!(claims["exp"], exp);
    assert!(claims["iat"].as_i64().unwrap() >= before);
    let sid_a = claims["session_id"].as_str().unwrap().to_owned();

    // Stored: an argon2id hash, a session row, a sign_up event (no secrets).
    let hash: String = t
        .sql
        .query_one("SELECT encrypted_password FROM auth.users", &[])
        .await
        .unwrap()
        .get(0);
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    let ev = t
        .sql
        .query_one(
            "SELECT event_type, user_id::text, session_id::text, ip FROM public.auth_events",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(ev.get::<_, String>(0), "sign_up");
    assert_eq!(ev.get::<_, String>(1), uid);
    assert_eq!(ev.get::<_, String>(2), sid_a);
    assert_eq!(ev.get::<_, Option<String>>(3).as_deref(), Some("127.0.0.1"));

    // Duplicate (case-insensitively), weak password, bad email.
    let res = post_auth(&t, "/auth/sign-up", "ALICE@example.com", PASSWORD).await;
    expect_error(res, 409, "auth/email-already-exists").await;
    // By default the rule is a length (PASSWORD_MIN_LENGTH); character classes
    // are off unless PASSWORD_REQUIRE_LETTER_AND_DIGIT asks for them.
    let res = post_auth(&t, "/auth/sign-up", "bob@example.com", "passwor").await;
    let msg = expect_error(res, 400, "auth/weak-password").await;
    assert!(msg.contains("8 characters"), "the reason is given: {msg}");
    let res = post_auth(&t, "/auth/sign-up", "bob@example.com", "short1").await;
    let msg = expect_error(res, 400, "auth/weak-password").await;
    assert!(msg.contains("8 characters"), "{msg}");
    let res = post_auth(&t, "/auth/sign-up", "not-an-email", PASSWORD).await;
    expect_error(res, 400, "auth/invalid-email").await;

    // Wrong password and unknown email fail alike.
    let res = post_auth(&t, "/auth/sign-in", "alice@example.com", "wrong horse 1").await;
    let m1 = expect_error(res, 401, "auth/invalid-credentials").await;
    let res = post_auth(&t, "/auth/sign-in", "nobody@example.com", PASSWORD).await;
    let m2 = expect_error(res, 401, "auth/invalid-credentials").await;
    assert_eq!(m1, m2, "same message for unknown email and wrong password");

    // Sign in (email compared case-insensitively): a second session.
    let v = json_ok(
        post_auth(&t, "/auth/sign-in", "ALICE@example.com", PASSWORD).await,
        200,
    )
    .await;
    assert_eq!(v["user"]["id"], uid.as_str());
    assert_eq!(v["user"]["email"], "alice@example.com");
    let token_b = v["session"]["access_token"].as_str().unwrap().to_owned();
    assert_ne!(token_a, token_b);
    assert_eq!(count(&t, "SELECT count(*) FROM auth.sessions").await, 2);

    // Sign out of session A: its token is refused everywhere, B still works.
    let res = http()
        .post(t.url("/auth/sign-out"))
        .header(AUTHORIZATION, bearer(&token_a))
        .send()
        .await
        .unwrap();
    assert_eq!(json_ok(res, 200).await, json!({"success": true}));
    let revoked: bool = t
        .sql
        .query_one(
            "SELECT revoked_at IS NOT NULL FROM auth.sessions WHERE id = $1::text::uuid",
            &[&sid_a],
        )
        .await
        .unwrap()
        .get(0);
    assert!(revoked);
    expect_error(list(&t, &token_a, &[]).await, 401, "auth/revoked-token").await;
    let res = http()
        .post(t.url("/auth/sign-out"))
        .header(AUTHORIZATION, bearer(&token_a))
        .send()
        .await
        .unwrap();
    expect_error(res, 401, "auth/revoked-token").await;
    json_ok(list(&t, &token_b, &[]).await, 200).await;

    let mut ws = t.ws(Some(&token_a)).await;
    let (close, frames) = ws.until_close().await;
    assert_eq!(close, Some(4001));
    assert_eq!(frames[0]["type"], "error");
    assert_eq!(frames[0]["code"], "auth/revoked-token");
    let mut ws = t.ws(Some(&token_b)).await;
    ws.subscribe("mine", json!({"auth": uid})).await;
    ws.close().await;

    let events: Vec<String> = t
        .sql
        .query(
            "SELECT event_type FROM public.auth_events ORDER BY created_at, event_type",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(events, ["sign_up", "sign_in", "sign_out"]);

    // Missing, malformed, expired and foreign tokens.
    let res = http().get(t.url("/storage/list")).send().await.unwrap();
    assert_eq!(res.headers()["www-authenticate"], "Bearer");
    expect_error(res, 401, "auth/missing-token").await;
    expect_error(list(&t, "garbage", &[]).await, 401, "auth/invalid-token").await;
    let expired = token(Some(&uid), "authenticated", -10);
    expect_error(list(&t, &expired, &[]).await, 401, "auth/expired-token").await;
    let res = http()
        .post(t.url("/auth/sign-out"))
        .header(AUTHORIZATION, bearer(&expired))
        .send()
        .await
        .unwrap();
    expect_error(res, 401, "auth/expired-token").await;
    let stranger = user_token(&uuid::Uuid::new_v4().to_string());
    expect_error(list(&t, &stranger, &[]).await, 401, "auth/invalid-token").await;
    // One token check for routes and sockets: a well-signed token for a user who
    // does not exist (no session id) is refused on /ws too.
    let mut ws = t.ws(Some(&stranger)).await;
    let (close, frames) = ws.until_close().await;
    assert_eq!(close, Some(4001));
    assert_eq!(frames[0]["code"], "auth/invalid-token");
    let res = http()
        .get(t.url("/storage/list"))
        .header(AUTHORIZATION, "Basic abc")
        .send()
        .await
        .unwrap();
    expect_error(res, 401, "auth/invalid-token").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sign_in_reaches_the_users_auth_subscription_live() {
    let t = TestServer::start().await;
    let (uid, token) = sign_up(&t, "carol@example.com").await;
    let mut ws = t.ws(Some(&token)).await;
    ws.subscribe("auth", json!({"auth": uid})).await;

    let v = json_ok(
        post_auth(&t, "/auth/sign-in", "carol@example.com", PASSWORD).await,
        200,
    )
    .await;
    let second = v["session"]["access_token"].as_str().unwrap().to_owned();
    let c = change_where(&mut ws, |c| c["new"]["event_type"] != "sign_up").await;
    assert_eq!(c["subscription"], "auth");
    assert_eq!(c["eventType"], "INSERT");
    assert_eq!(
        (c["schema"].as_str(), c["table"].as_str()),
        (Some("public"), Some("auth_events"))
    );
    assert_eq!(c["new"]["event_type"], "sign_in");
    assert_eq!(c["new"]["user_id"], uid.as_str());
    assert!(c["new"]["session_id"].is_string());
    let text = c.to_string();
    assert!(
        !text.contains("argon2") && !text.contains(PASSWORD),
        "no secrets: {text}"
    );

    let res = http()
        .post(t.url("/auth/sign-out"))
        .header(AUTHORIZATION, bearer(&second))
        .send()
        .await
        .unwrap();
    json_ok(res, 200).await;
    let c = change_where(&mut ws, |c| c["new"]["event_type"] != "sign_in").await;
    assert_eq!(c["new"]["event_type"], "sign_out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_list_read_ranges_overwrite_and_delete() {
    let t = TestServer::start().await;
    let (uid, token) = sign_up(&t, "dave@example.com").await;
    let (_, other) = sign_up(&t, "erin@example.com").await;
    let data = pattern(1000);

    let res = upload(
        &t,
        &token,
        Some("files"),
        Some("docs/2024/report.pdf"),
        file_part(data.clone(), "local-name.pdf", "application/pdf"),
    )
    .await;
    let up = json_ok(res, 201).await;
    assert_eq!(up["path"], "docs/2024/report.pdf");
    assert_eq!(up["size"], 1000);
    assert_eq!(up["mime_type"], "application/pdf");
    chrono::DateTime::parse_from_rfc3339(up["created_at"].as_str().unwrap()).unwrap();
    let url = up["url"].as_str().unwrap().to_owned();
    assert_eq!(
        url,
        format!("/storage/object/files/{uid}/docs/2024/report.pdf")
    );

    // Folders were created parents first; the file points at its folder.
    let rows = t
        .sql
        .query(
            "SELECT path, name, id::text, parent_id::text FROM public.folders ORDER BY path",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 2);
    let (docs, y2024) = (&rows[0], &rows[1]);
    // Rows are named in the bucket: under the user's home folder, which has
    // no row of its own (its content has no parent).
    assert_eq!(
        (docs.get::<_, String>(0), docs.get::<_, String>(1)),
        (format!("{uid}/docs"), "docs".into())
    );
    assert_eq!(docs.get::<_, Option<String>>(3), None);
    assert_eq!(y2024.get::<_, String>(0), format!("{uid}/docs/2024"));
    assert_eq!(
        y2024.get::<_, Option<String>>(3),
        Some(docs.get::<_, String>(2))
    );
    assert_eq!(up["folder_id"], y2024.get::<_, String>(2).as_str());
    let stored = files_under(&storage_dir(&t));
    assert_eq!(stored.len(), 1, "{stored:?}");

    // Listing: directly under a path, own files only.
    let root = json_ok(list(&t, &token, &[]).await, 200).await;
    assert_eq!(root["files"], json!([]));
    assert_eq!(root["folders"][0]["name"], "docs");
    assert_eq!(root["folders"][0]["path"], "docs");
    let docs_listing = json_ok(
        list(&t, &token, &[("bucket", "files"), ("path", "docs")]).await,
        200,
    )
    .await;
    assert_eq!(docs_listing["folders"].as_array().unwrap().len(), 1);
    assert_eq!(docs_listing["folders"][0]["path"], "docs/2024");
    let inner = json_ok(list(&t, &token, &[("path", "docs/2024/")]).await, 200).await;
    let f = &inner["files"][0];
    assert_eq!(f["name"], "report.pdf");
    assert_eq!(f["path"], "docs/2024/report.pdf");
    assert_eq!(f["size"], 1000);
    assert_eq!(f["mime_type"], "application/pdf");
    assert_eq!(f["url"], url.as_str());
    assert!(f["created_at"].is_string());
    let others = json_ok(list(&t, &other, &[]).await, 200).await;
    assert_eq!(others, json!({"files": [], "folders": []}));
    expect_error(
        list(&t, &token, &[("path", "nope")]).await,
        404,
        "storage/not-found",
    )
    .await;
    expect_error(
        list(&t, &token, &[("bucket", "nope")]).await,
        404,
        "storage/bucket-not-found",
    )
    .await;

    // Reading: the owner, whole and in ranges.
    let get = |range: Option<&str>, tok: Option<&str>| {
        let mut req = http().get(t.url(&url));
        if let Some(r) = range {
            req = req.header(RANGE, r);
        }
        if let Some(tok) = tok {
            req = req.header(AUTHORIZATION, bearer(tok));
        }
        req.send()
    };
    let res = get(None, Some(&token)).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()[CONTENT_TYPE], "application/pdf");
    assert_eq!(res.headers()[ACCEPT_RANGES], "bytes");
    assert_eq!(res.bytes().await.unwrap().as_ref(), &data[..]);
    let res = get(Some("bytes=10-19"), Some(&token)).await.unwrap();
    assert_eq!(res.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(res.headers()[CONTENT_RANGE], "bytes 10-19/1000");
    assert_eq!(res.bytes().await.unwrap().as_ref(), &data[10..20]);
    let res = get(Some("bytes=-5"), Some(&token)).await.unwrap();
    assert_eq!(res.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(res.headers()[CONTENT_RANGE], "bytes 995-999/1000");
    assert_eq!(res.bytes().await.unwrap().as_ref(), &data[995..]);
    let res = get(Some("bytes=990-"), Some(&token)).await.unwrap();
    assert_eq!(res.bytes().await.unwrap().as_ref(), &data[990..]);
    let res = get(Some("bytes=5000-"), Some(&token)).await.unwrap();
    assert_eq!(res.headers()[CONTENT_RANGE], "bytes */1000");
    expect_error(res, 416, "storage/range-not-satisfiable").await;
    // Private bucket: no token → 401; someone else's token → 404.
    expect_error(get(None, None).await.unwrap(), 401, "auth/missing-token").await;
    expect_error(
        get(None, Some(&other)).await.unwrap(),
        404,
        "storage/not-found",
    )
    .await;
    let res = get(None, Some(&service_token())).await.unwrap();
    assert_eq!(
        res.status(),
        StatusCode::OK,
        "service_role reads everything"
    );

    // Overwrite: refused unless asked; then the old bytes go.
    let res = upload(
        &t,
        &token,
        None,
        Some("docs/2024/report.pdf"),
        file_part(pattern(10), "x.pdf", "application/pdf"),
    )
    .await;
    expect_error(res, 409, "storage/already-exists").await;
    let form = Form::new().text("path", "docs/2024/report.pdf").part(
        "file",
        file_part(b"%PDF-new".to_vec(), "x.pdf", "application/pdf"),
    );
    let res = http()
        .post(t.url("/storage/upload"))
        .header(AUTHORIZATION, bearer(&token))
        .header("x-upsert", "true")
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(json_ok(res, 201).await["size"], 8);
    let res = get(None, Some(&token)).await.unwrap();
    assert_eq!(res.bytes().await.unwrap().as_ref(), b"%PDF-new");
    wait_for("the replaced bytes to go", || {
        files_under(&storage_dir(&t)).len() == 1
            && !files_under(&storage_dir(&t)).contains(&stored[0])
    })
    .await;

    // A folder path (trailing '/') or none: the file's own name is used; the type
    // may come from the extension, the MIME type guessed from the name.
    let res = upload(
        &t,
        &token,
        None,
        Some("docs/"),
        Part::bytes(b"PK..".to_vec()).file_name("Notes.DOCX"),
    )
    .await;
    let v = json_ok(res, 201).await;
    assert_eq!(v["path"], "docs/Notes.DOCX");
    assert_eq!(
        v["mime_type"],
        "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
    );
    let v = json_ok(
        upload(
            &t,
            &token,
            None,
            None,
            file_part(pattern(3), "top.png", "image/png"),
        )
        .await,
        201,
    )
    .await;
    assert_eq!(v["path"], "top.png");
    assert_eq!(v["folder_id"], Value::Null);
    // A file where a folder is, or a folder through a file: conflicts.
    let res = upload(
        &t,
        &token,
        None,
        Some("docs"),
        file_part(pattern(3), "a.png", "image/png"),
    )
    .await;
    expect_error(res, 409, "storage/conflict").await;
    let res = upload(
        &t,
        &token,
        None,
        Some("top.png/x.png"),
        file_part(pattern(3), "a.png", "image/png"),
    )
    .await;
    expect_error(res, 409, "storage/conflict").await;

    // Public buckets are readable by anyone.
    bucket(&t.sql, "pub", true).await;
    let v = json_ok(
        upload(
            &t,
            &token,
            Some("pub"),
            Some("cat.png"),
            file_part(pattern(50), "cat.png", "image/png"),
        )
        .await,
        201,
    )
    .await;
    let res = http()
        .get(t.url(v["url"].as_str().unwrap()))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()[CONTENT_TYPE], "image/png");
    assert_eq!(res.bytes().await.unwrap().len(), 50);
    let res = upload(
        &t,
        &token,
        Some("nope"),
        Some("a.png"),
        file_part(pattern(3), "a.png", "image/png"),
    )
    .await;
    expect_error(res, 404, "storage/bucket-not-found").await;

    // Delete: row and bytes; then not found. Folders: only when empty.
    let res = delete(
        &t,
        &token,
        json!({"bucket": "files", "path": "docs/2024/report.pdf"}),
    )
    .await;
    assert_eq!(json_ok(res, 200).await, json!({"success": true}));
    expect_error(
        delete(
            &t,
            &token,
            json!({"bucket": "files", "path": "docs/2024/report.pdf"}),
        )
        .await,
        404,
        "storage/not-found",
    )
    .await;
    expect_error(
        get(None, Some(&token)).await.unwrap(),
        404,
        "storage/not-found",
    )
    .await;
    assert_eq!(
        count(
            &t,
            "SELECT count(*) FROM public.files WHERE path LIKE '%/docs/2024/report.pdf'"
        )
        .await,
        0
    );
    expect_error(
        delete(&t, &other, json!({"bucket": "files", "path": "top.png"})).await,
        404,
        "storage/not-found",
    )
    .await;
    expect_error(
        delete(&t, &token, json!({"bucket": "files", "path": "docs"})).await,
        409,
        "storage/folder-not-empty",
    )
    .await;
    json_ok(
        delete(&t, &token, json!({"bucket": "files", "path": "docs/2024"})).await,
        200,
    )
    .await;
    let blobs = count(&t, "SELECT count(*) FROM public.files").await;
    wait_for("deleted bytes to go", || {
        files_under(&storage_dir(&t)).len() as i64 == blobs
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn size_type_quota_and_path_checks_leave_nothing_behind() {
    let t = TestServer::start_with(|c| {
        c.max_file_size = 64 * 1024;
        c.storage_quota_bytes = 100 * 1024;
    })
    .await;
    let (uid, token) = sign_up(&t, "frank@example.com").await;

    let res = upload(
        &t,
        &token,
        None,
        Some("big.png"),
        file_part(pattern(100 * 1024), "big.png", "image/png"),
    )
    .await;
    let msg = expect_error(res, 413, "storage/file-too-large").await;
    assert!(msg.contains("65536"), "{msg}");
    let res = upload(
        &t,
        &token,
        None,
        Some("x.html"),
        file_part(b"<script>".to_vec(), "x.html", "text/html"),
    )
    .await;
    expect_error(res, 415, "storage/invalid-type").await;
    let res = upload(
        &t,
        &token,
        None,
        Some("x.bin"),
        Part::bytes(b"MZ".to_vec()).file_name("x.exe"),
    )
    .await;
    expect_error(res, 415, "storage/invalid-type").await;

    json_ok(
        upload(
            &t,
            &token,
            None,
            Some("a.png"),
            file_part(pattern(60 * 1024), "a.png", "image/png"),
        )
        .await,
        201,
    )
    .await;
    let res = upload(
        &t,
        &token,
        None,
        Some("b.png"),
        file_part(pattern(60 * 1024), "b.png", "image/png"),
    )
    .await;
    expect_error(res, 413, "storage/quota-exceeded").await;
    // Exactly what is left still fits.
    json_ok(
        upload(
            &t,
            &token,
            None,
            Some("c.png"),
            file_part(pattern(40 * 1024), "c.png", "image/png"),
        )
        .await,
        201,
    )
    .await;
    let res = upload(
        &t,
        &token,
        None,
        Some("d.png"),
        file_part(pattern(1), "d.png", "image/png"),
    )
    .await;
    expect_error(res, 413, "storage/quota-exceeded").await;

    for bad in [
        "../etc/passwd",
        "/etc/passwd",
        "a/../../b.png",
        "./a.png",
        "a//b.png",
        "a\\b.png",
        "a\u{0}.png",
        "a/\u{7}.png",
        "..",
    ] {
        let res = upload(
            &t,
            &token,
            None,
            Some(bad),
            file_part(pattern(3), "x.png", "image/png"),
        )
        .await;
        expect_error(res, 400, "storage/invalid-path").await;
        expect_error(
            list(&t, &token, &[("path", bad)]).await,
            400,
            "storage/invalid-path",
        )
        .await;
        expect_error(
            delete(&t, &token, json!({"path": bad})).await,
            400,
            "storage/invalid-path",
        )
        .await;
    }
    // Dot segments a client library would normalize away, sent raw.
    let (code, body) = raw_status(
        &t,
        &format!(
            "GET /storage/object/files/{uid}/a/../a.png HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
        ),
    )
    .await;
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("storage/invalid-path"), "{body}");
    let (code, body) = raw_status(
        &t,
        &format!(
            "GET /storage/object/files/{uid}/%2e%2e/%2e%2e/etc/passwd HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
        ),
    )
    .await;
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("storage/invalid-path"), "{body}");

    // Only the two accepted files exist, as rows and as bytes.
    assert_eq!(count(&t, "SELECT count(*) FROM public.files").await, 2);
    wait_for("refused uploads' bytes to go", || {
        files_under(&storage_dir(&t)).len() == 2
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_reaches_files_and_storage_subscribers_live() {
    let t = TestServer::start().await;
    let (uid, token) = sign_up(&t, "gina@example.com").await;
    let mut ws = t.ws(Some(&token)).await;
    ws.subscribe("bucket", json!({"storage": "files"})).await;
    let first = json_ok(
        upload(
            &t,
            &token,
            None,
            Some("photos/a.png"),
            file_part(pattern(10), "a.png", "image/png"),
        )
        .await,
        201,
    )
    .await;
    let c = ws.change().await;
    assert_eq!(c["subscription"], "bucket");
    assert_eq!(c["new"]["id"], first["id"]);
    // The router has handled a.png, so no change of it can come before the next
    // subscription's reply.
    let folder_id = first["folder_id"].as_str().unwrap().to_owned();
    let listed = json_ok(list(&t, &token, &[]).await, 200).await;
    assert_eq!(listed["folders"][0]["id"], folder_id.as_str());
    ws.subscribe("folder", json!({"files": folder_id})).await;
    let up = json_ok(
        upload(
            &t,
            &token,
            None,
            Some("photos/b.png"),
            file_part(pattern(20), "b.png", "image/png"),
        )
        .await,
        201,
    )
    .await;
    let mut seen = Vec::new();
    for _ in 0..2 {
        let c = ws.change().await;
        assert_eq!(c["eventType"], "INSERT");
        assert_eq!(c["table"], "files");
        assert_eq!(c["new"]["id"], up["id"]);
        assert_eq!(c["new"]["name"], "b.png");
        // Events carry the row: its path is the object's name in the bucket,
        // under the owner's home folder.
        assert_eq!(c["new"]["path"], format!("{uid}/photos/b.png"));
        assert_eq!(c["new"]["size"], 20);
        assert_eq!(c["new"]["folder_id"], folder_id.as_str());
        assert_eq!(c["new"]["owner_id"], uid.as_str());
        seen.push(c["subscription"].as_str().unwrap().to_owned());
    }
    seen.sort();
    assert_eq!(seen, ["bucket", "folder"]);

    json_ok(
        delete(&t, &token, json!({"path": "photos/b.png"})).await,
        200,
    )
    .await;
    let c = change_where(&mut ws, |c| c["eventType"] == "DELETE").await;
    assert_eq!(c["eventType"], "DELETE");
    assert_eq!(c["old"]["name"], "b.png");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_aborted_mid_body_leaves_no_row_and_no_bytes() {
    let t = TestServer::start().await;
    let (_, token) = sign_up(&t, "hank@example.com").await;
    let dir = storage_dir(&t);

    let boundary = "aetherboundary";
    let head = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"bucket\"\r\n\r\nfiles\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"path\"\r\n\r\nbig/half.pdf\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"half.pdf\"\r\n\
         Content-Type: application/pdf\r\n\r\n"
    );
    let declared = head.len() + 4 * 1024 * 1024;
    let mut s = tokio::net::TcpStream::connect(t.addr()).await.unwrap();
    s.write_all(
        format!(
            "POST /storage/upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
             Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {declared}\r\n\r\n{head}"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    // Part of the body: enough for parts to be written to the blob store.
    s.write_all(&pattern(1024 * 1024)).await.unwrap();
    s.flush().await.unwrap();
    wait_for("bytes of the upload in progress", || {
        !files_under(&dir).is_empty()
    })
    .await;
    drop(s);

    wait_for("the aborted upload's bytes to go", || {
        files_under(&dir).is_empty()
    })
    .await;
    assert_eq!(count(&t, "SELECT count(*) FROM public.files").await, 0);
    assert_eq!(count(&t, "SELECT count(*) FROM public.folders").await, 0);

    // The server is fine afterwards, and a file over axum's default 2 MiB body
    // limit (under MAX_FILE_SIZE) goes through whole.
    let whole = pattern(3 * 1024 * 1024 + 7);
    let v = json_ok(
        upload(
            &t,
            &token,
            None,
            Some("big/whole.pdf"),
            file_part(whole.clone(), "w.pdf", "application/pdf"),
        )
        .await,
        201,
    )
    .await;
    assert_eq!(v["size"], whole.len());
    assert_eq!(files_under(&dir).len(), 1);
    let res = http()
        .get(t.url(v["url"].as_str().unwrap()))
        .header(AUTHORIZATION, bearer(&token))
        .send()
        .await
        .unwrap();
    assert!(res.bytes().await.unwrap() == whole, "bytes read back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_is_json_and_cors_and_openapi_are_served() {
    let t = TestServer::start().await;
    let (_, token) = sign_up(&t, "ivy@example.com").await;

    let res = http().get(t.url("/no/such/route")).send().await.unwrap();
    expect_error(res, 404, "not_found").await;
    let res = http().get(t.url("/auth/sign-in")).send().await.unwrap();
    assert!(res.headers().get("allow").is_some(), "405 keeps Allow");
    expect_error(res, 405, "method_not_allowed").await;
    let res = http().put(t.url("/storage/list")).send().await.unwrap();
    expect_error(res, 405, "method_not_allowed").await;
    let res = http()
        .post(t.url("/auth/sign-in"))
        .header(CONTENT_TYPE, "application/json")
        .body("{\"email\": ")
        .send()
        .await
        .unwrap();
    expect_error(res, 400, "invalid_json").await;
    let res = http()
        .post(t.url("/auth/sign-in"))
        .header(CONTENT_TYPE, "text/plain")
        .body("hello")
        .send()
        .await
        .unwrap();
    expect_error(res, 415, "unsupported_media_type").await;
    let res = http()
        .post(t.url("/auth/sign-up"))
        .json(&json!({"email": "x@example.com"}))
        .send()
        .await
        .unwrap();
    let msg = expect_error(res, 400, "invalid_body").await;
    assert!(msg.contains("password"), "{msg}");
    let res = http()
        .post(t.url("/storage/upload"))
        .header(AUTHORIZATION, bearer(&token))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    expect_error(res, 415, "unsupported_media_type").await;
    let res = http()
        .post(t.url("/storage/upload"))
        .header(AUTHORIZATION, bearer(&token))
        .multipart(Form::new().text("path", "a.png"))
        .send()
        .await
        .unwrap();
    expect_error(res, 400, "storage/invalid-request").await;
    let res = http()
        .delete(t.url("/storage/delete"))
        .header(AUTHORIZATION, bearer(&token))
        .header(CONTENT_TYPE, "application/json")
        .body("[]")
        .send()
        .await
        .unwrap();
    expect_error(res, 400, "invalid_body").await;
    let res = http()
        .get(t.url("/storage/object/files/not-a-uuid/a.png"))
        .header(AUTHORIZATION, bearer(&token))
        .send()
        .await
        .unwrap();
    expect_error(res, 404, "storage/not-found").await;

    // CORS for a dev server on another origin: preflight and actual request.
    let res = http()
        .request(reqwest::Method::OPTIONS, t.url("/storage/upload"))
        .header("origin", "http://localhost:5173")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization,content-type",
        )
        .send()
        .await
        .unwrap();
    assert!(res.status().is_success(), "{}", res.status());
    let h: &HeaderMap = res.headers();
    assert_eq!(h["access-control-allow-origin"], "*");
    let methods = h["access-control-allow-methods"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        methods.contains("POST") && methods.contains("DELETE"),
        "{methods}"
    );
    let allowed = h["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(
        allowed.contains("authorization") && allowed.contains("content-type"),
        "{allowed}"
    );
    let res = http()
        .post(t.url("/auth/sign-in"))
        .header("origin", "http://localhost:5173")
        .json(&json!({"email": "ivy@example.com", "password": "wrong one 1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["access-control-allow-origin"], "*");
    expect_error(res, 401, "auth/invalid-credentials").await;

    // The OpenAPI document lists every REST route.
    let doc = json_ok(
        http().get(t.url("/openapi.json")).send().await.unwrap(),
        200,
    )
    .await;
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for (path, method) in [
        ("/auth/sign-up", "post"),
        ("/auth/sign-in", "post"),
        ("/auth/sign-out", "post"),
        ("/storage/upload", "post"),
        ("/storage/list", "get"),
        ("/storage/delete", "delete"),
        ("/storage/object/{bucket}/{owner}/{path}", "get"),
        ("/health", "get"),
        ("/ws/status", "get"),
        ("/ws/channels", "post"),
        ("/metrics/connections", "get"),
        ("/metrics/messages", "get"),
        ("/metrics/channels", "get"),
        ("/metrics/errors", "get"),
        ("/api/v1/shares", "post"),
        ("/api/v1/shares", "get"),
        ("/api/v1/shares/{id}", "delete"),
        ("/share/{token}", "get"),
        ("/api/v1/ws/stats", "get"),
        ("/api/v1/ws/cleanup", "post"),
        ("/api/v1/ws/notify", "post"),
    ] {
        assert!(
            doc["paths"][path][method].is_object(),
            "{method} {path} in the OpenAPI document"
        );
    }
    assert!(doc["components"]["schemas"]["ErrorBody"].is_object());
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_answer_429_with_retry_after() {
    // Budgets refill one request per 30 s and 20 s: far longer than this test.
    let t = TestServer::start_with(|c| {
        c.rate_limit_auth_per_min = 2;
        c.rate_limit_storage_per_min = 3;
    })
    .await;
    let (_, token) = sign_up(&t, "judy@example.com").await;
    let res = post_auth(&t, "/auth/sign-in", "judy@example.com", "wrong pass 1").await;
    expect_error(res, 401, "auth/invalid-credentials").await;
    let res = post_auth(&t, "/auth/sign-in", "judy@example.com", PASSWORD).await;
    let retry: u64 = res.headers()[RETRY_AFTER]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "Retry-After {retry}");
    expect_error(res, 429, "rate-limit/exceeded").await;
    let res = http()
        .post(t.url("/auth/sign-out"))
        .header(AUTHORIZATION, bearer(&token))
        .send()
        .await
        .unwrap();
    expect_error(res, 429, "rate-limit/exceeded").await;

    // Storage: per user.
    for _ in 0..3 {
        json_ok(list(&t, &token, &[]).await, 200).await;
    }
    let res = list(&t, &token, &[]).await;
    assert!(res.headers().get(RETRY_AFTER).is_some());
    expect_error(res, 429, "rate-limit/exceeded").await;
    let other = user(&t.sql, "kim@example.com").await;
    json_ok(list(&t, &user_token(&other), &[]).await, 200).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_out_session_closes_its_live_websockets_whoever_signs_it_out() {
    let t = TestServer::start().await;
    let (user_id, token) = sign_up(&t, "revoke@example.com").await;
    // Sign-out through the API: the open connection is closed at once.
    let mut ws = t.ws(Some(&token)).await;
    ws.subscribe("me", serde_json::json!({"auth": user_id}))
        .await;
    let res = http()
        .post(t.url("/auth/sign-out"))
        .header("authorization", bearer(&token))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let (code, frames) = ws.until_close().await;
    assert_eq!(code, Some(4001));
    assert_eq!(frames.last().unwrap()["code"], "auth/revoked-token");
    // A DBA's UPDATE does the same.
    let res = post_auth(&t, "/auth/sign-in", "revoke@example.com", PASSWORD).await;
    let body = json_ok(res, 200).await;
    let token2 = body["session"]["access_token"].as_str().unwrap().to_owned();
    let mut ws = t.ws(Some(&token2)).await;
    ws.subscribe("me", serde_json::json!({"auth": user_id}))
        .await;
    t.exec(&format!("UPDATE auth.sessions SET revoked_at = now() WHERE user_id = '{user_id}' AND revoked_at IS NULL"))
        .await;
    let (code, frames) = ws.until_close().await;
    assert_eq!(code, Some(4001));
    assert_eq!(frames.last().unwrap()["code"], "auth/revoked-token");
}

/// Migration 0016: rows of the per-owner layout (unique per owner and path)
/// move to one name per object, under their owner's folder, so the seed
/// routes see what they saw; names that would clash keep both objects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_owner_storage_rows_migrate_to_one_name_per_object() {
    const NAMESPACE: &str = "0016_storage_namespace";
    let db = TestDb::new().await;
    let mut c = db.client().await;
    // Everything before 0016, then rows as the old layout allowed them.
    c.batch_execute(&format!(
        "CREATE SCHEMA aether;
         CREATE TABLE aether.schema_migrations (version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now());
         INSERT INTO aether.schema_migrations (version) VALUES ('{NAMESPACE}');"
    ))
    .await
    .unwrap();
    aether_postgres::store::migrate::migrate(&mut c)
        .await
        .unwrap();
    let (alice, bob) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    c.batch_execute(&format!(
        "INSERT INTO auth.users (id, email) VALUES ('{alice}', 'alice@example.com'), ('{bob}', 'bob@example.com');
         INSERT INTO public.buckets (id, name) VALUES ('b', 'b');
         -- Seed-route rows: alice's docs/2024/r.pdf and docs/r.pdf, bob's docs/r.pdf.
         INSERT INTO public.folders (id, bucket_id, path, name, owner_id) VALUES
           ('00000000-0000-0000-0000-00000000000a', 'b', 'docs', 'docs', '{alice}'),
           ('00000000-0000-0000-0000-00000000000b', 'b', 'docs', 'docs', '{bob}');
         INSERT INTO public.folders (id, bucket_id, parent_id, path, name, owner_id) VALUES
           ('00000000-0000-0000-0000-00000000000c', 'b', '00000000-0000-0000-0000-00000000000a', 'docs/2024', '2024', '{alice}');
         INSERT INTO public.files (id, bucket_id, folder_id, path, name, owner_id) VALUES
           ('10000000-0000-0000-0000-000000000001', 'b', '00000000-0000-0000-0000-00000000000c', 'docs/2024/r.pdf', 'r.pdf', '{alice}'),
           ('20000000-0000-0000-0000-000000000002', 'b', '00000000-0000-0000-0000-00000000000a', 'docs/r.pdf', 'r.pdf', '{alice}'),
           ('30000000-0000-0000-0000-000000000003', 'b', '00000000-0000-0000-0000-00000000000b', 'docs/r.pdf', 'r.pdf', '{bob}');
         -- /storage/v1 rows: the service role's <alice>/docs/r.pdf (a folder
         -- and a name alice's rows will land on), alice's own <alice>/top.png
         -- in a row for her home folder.
         INSERT INTO public.folders (id, bucket_id, path, name, owner_id) VALUES
           ('00000000-0000-0000-0000-0000000000d0', 'b', '{alice}', '{alice}', NULL),
           ('00000000-0000-0000-0000-0000000000e0', 'b', '{alice}', '{alice}', '{alice}');
         INSERT INTO public.folders (id, bucket_id, parent_id, path, name, owner_id) VALUES
           ('00000000-0000-0000-0000-0000000000d1', 'b', '00000000-0000-0000-0000-0000000000d0', '{alice}/docs', 'docs', NULL);
         INSERT INTO public.files (id, bucket_id, folder_id, path, name, owner_id) VALUES
           ('40000000-0000-0000-0000-000000000004', 'b', '00000000-0000-0000-0000-0000000000d1', '{alice}/docs/r.pdf', 'r.pdf', NULL),
           ('50000000-0000-0000-0000-000000000005', 'b', '00000000-0000-0000-0000-0000000000e0', '{alice}/top.png', 'top.png', '{alice}'),
           ('60000000-0000-0000-0000-000000000006', 'b', '00000000-0000-0000-0000-0000000000d0', '{alice}/top.png', 'top.png', NULL);
         DELETE FROM aether.schema_migrations WHERE version = '{NAMESPACE}';"
    ))
    .await
    .unwrap();
    assert_eq!(
        aether_postgres::store::migrate::migrate(&mut c)
            .await
            .unwrap(),
        [NAMESPACE]
    );

    let file = |id: &'static str| {
        let c = &c;
        async move {
            let r = c
                .query_one(
                    "SELECT path, name, folder_id::text FROM public.files WHERE id = $1::text::uuid",
                    &[&id],
                )
                .await
                .unwrap();
            (
                r.get::<_, String>(0),
                r.get::<_, String>(1),
                r.get::<_, Option<String>>(2),
            )
        }
    };
    let folder_of = |path: String| {
        let c = &c;
        async move {
            let r = c
                .query_one(
                    "SELECT id::text, parent_id::text FROM public.folders WHERE bucket_id = 'b' AND path = $1",
                    &[&path],
                )
                .await
                .unwrap();
            (r.get::<_, String>(0), r.get::<_, Option<String>>(1))
        }
    };
    // Alice's docs and the service role's <alice>/docs are one folder now:
    // hers (it is her folder they are in); home rows are gone.
    let (docs, docs_parent) = folder_of(format!("{alice}/docs")).await;
    assert_eq!(docs, "00000000-0000-0000-0000-00000000000a");
    assert_eq!(docs_parent, None, "a home folder has no row");
    let (y2024, y2024_parent) = folder_of(format!("{alice}/docs/2024")).await;
    assert_eq!(y2024_parent.as_deref(), Some(docs.as_str()));
    assert_eq!(
        file("10000000-0000-0000-0000-000000000001").await,
        (
            format!("{alice}/docs/2024/r.pdf"),
            "r.pdf".into(),
            Some(y2024)
        )
    );
    // Two objects of one name: alice's keeps it (it is in her folder), the
    // service role's is renamed, in the merged folder.
    assert_eq!(
        file("20000000-0000-0000-0000-000000000002").await,
        (
            format!("{alice}/docs/r.pdf"),
            "r.pdf".into(),
            Some(docs.clone())
        )
    );
    assert_eq!(
        file("40000000-0000-0000-0000-000000000004").await,
        (
            format!("{alice}/docs/r (40000000).pdf"),
            "r (40000000).pdf".into(),
            Some(docs)
        )
    );
    // The same for two rows that did not move.
    assert_eq!(
        file("60000000-0000-0000-0000-000000000006").await,
        (
            format!("{alice}/top (60000000).png"),
            "top (60000000).png".into(),
            None
        )
    );
    let (bob_docs, _) = folder_of(format!("{bob}/docs")).await;
    assert_eq!(
        file("30000000-0000-0000-0000-000000000003").await,
        (format!("{bob}/docs/r.pdf"), "r.pdf".into(), Some(bob_docs))
    );
    // Already under its owner's folder: unchanged, now directly in the home.
    assert_eq!(
        file("50000000-0000-0000-0000-000000000005").await,
        (format!("{alice}/top.png"), "top.png".into(), None)
    );
    let homes: i64 = c
        .query_one(
            &format!("SELECT count(*) FROM public.folders WHERE path = '{alice}'"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(homes, 0);
    // One object per name, whoever owns it.
    let taken = c
        .execute(
            &format!(
                "INSERT INTO public.files (bucket_id, path, name, owner_id) VALUES ('b', '{bob}/docs/r.pdf', 'r.pdf', '{alice}')"
            ),
            &[],
        )
        .await
        .unwrap_err();
    assert_eq!(
        taken.code(),
        Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION)
    );
}

/// A signed URL serves the object it was made for, not one that later takes
/// its name; tokens made when objects were per owner (they named a path in
/// their owner's space) are refused rather than read as names in a shared one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_urls_serve_their_object_and_per_owner_tokens_are_refused() {
    let t = TestServer::start().await;
    let (uid, tok) = sign_up(&t, "signer@example.com").await;
    let apikey = token(None, "anon", 3600);
    let put = |bytes: Vec<u8>| {
        upload(
            &t,
            &tok,
            None,
            Some("s.png"),
            file_part(bytes, "s.png", "image/png"),
        )
    };
    json_ok(put(pattern(10)).await, 201).await;
    let signed = json_ok(
        http()
            .post(t.url(&format!("/storage/v1/object/sign/files/{uid}/s.png")))
            .header("apikey", &apikey)
            .header(AUTHORIZATION, bearer(&tok))
            .json(&json!({"expiresIn": 60}))
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    let url = t.url(&format!(
        "/storage/v1{}",
        signed["signedURL"].as_str().unwrap()
    ));
    let res = http().get(&url).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.bytes().await.unwrap().len(), 10);
    // Deleted, and another object of that name uploaded: not the signed one.
    json_ok(delete(&t, &tok, json!({"path": "s.png"})).await, 200).await;
    json_ok(put(pattern(20)).await, 201).await;
    assert_eq!(http().get(&url).send().await.unwrap().status(), 404);

    let now = chrono::Utc::now().timestamp();
    let old_download = keys().sign_json(&json!({
        "url": format!("files/{uid}/s.png"), "owner": uid, "scope": "download",
        "iat": now, "exp": now + 60,
    }));
    let res = http()
        .get(t.url(&format!(
            "/storage/v1/object/sign/files/{uid}/s.png?token={old_download}"
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    assert_eq!(
        res.json::<Value>().await.unwrap()["code"],
        "InvalidSignature"
    );
    let old_upload = keys().sign_json(&json!({
        "url": format!("files/{uid}/s.png"), "owner": uid, "upsert": true,
        "scope": "upload", "iat": now, "exp": now + 60,
    }));
    let res = http()
        .put(t.url(&format!(
            "/storage/v1/object/upload/sign/files/{uid}/s.png?token={old_upload}"
        )))
        .header(CONTENT_TYPE, "image/png")
        .body(pattern(5))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    assert_eq!(
        res.json::<Value>().await.unwrap()["code"],
        "InvalidSignature"
    );
}

/// One object per name, whoever races for it: of two users creating the
/// same names at once through `/storage/v1` (and a file and a folder of one
/// name), exactly one wins each, the loser is told so, and no bytes are left
/// without a row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_writers_get_one_object_per_name_and_leave_no_bytes() {
    let t = TestServer::start().await;
    let (_a, alice) = sign_up(&t, "racer-a@example.com").await;
    let (_b, bob) = sign_up(&t, "racer-b@example.com").await;
    let apikey = token(None, "anon", 3600);
    let put = |tok: String, name: String, body: &'static [u8]| {
        let (url, apikey) = (
            t.url(&format!("/storage/v1/object/files/{name}")),
            apikey.clone(),
        );
        async move {
            http()
                .post(url)
                .header("apikey", apikey)
                .header(AUTHORIZATION, bearer(&tok))
                .header(CONTENT_TYPE, "text/plain")
                .body(body)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    for i in 0..20 {
        // The same name, and a file against a folder of one name.
        let (a, b) = tokio::join!(
            put(alice.clone(), format!("race/{i}.txt"), b"alice"),
            put(bob.clone(), format!("race/{i}.txt"), b"bob"),
        );
        let mut got = [a, b];
        got.sort_unstable();
        assert_eq!(
            got,
            [200, 409],
            "round {i}: one wins, the other is told the name is taken"
        );
        let (f, d) = tokio::join!(
            put(alice.clone(), format!("clash/{i}"), b"file"),
            put(bob.clone(), format!("clash/{i}/inside.txt"), b"in a folder"),
        );
        assert!(
            matches!((f, d), (200, 409) | (409, 200)),
            "round {i}: a file and a folder of one name cannot both be: {f} {d}"
        );
    }
    assert_eq!(
        count(
            &t,
            "SELECT count(*) FROM public.files WHERE path LIKE 'race/%'"
        )
        .await,
        20
    );
    assert_eq!(
        count(
            &t,
            "SELECT count(*) FROM public.files WHERE path LIKE 'clash/%'"
        )
        .await,
        20
    );
    // Every stored blob has its row (refused uploads removed theirs).
    let rows = count(
        &t,
        "SELECT count(*) FROM public.files WHERE storage_key IS NOT NULL",
    )
    .await;
    wait_for("refused uploads' bytes to go", || {
        files_under(&storage_dir(&t)).len() as i64 == rows
    })
    .await;
}

/// A DBA's policy lets one user replace another's object: the object keeps its
/// owner, so its bytes count against that owner's quota, not the writer's, in
/// every check (before, while and after the bytes arrive, and for a copy).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_object_counts_against_its_owners_quota() {
    let t = TestServer::start_with(|c| c.storage_quota_bytes = 100 * 1024).await;
    let (alice, alice_tok) = sign_up(&t, "quota-owner@example.com").await;
    let (bob, bob_tok) = sign_up(&t, "quota-writer@example.com").await;
    t.sql
        .batch_execute(
            "CREATE POLICY team_read ON public.files FOR SELECT TO authenticated USING (true);
             CREATE POLICY team_change ON public.files FOR UPDATE TO authenticated
               USING (true) WITH CHECK (true);",
        )
        .await
        .unwrap();
    let seed_upload = |tok: &str, name: &'static str, size: usize| {
        let tok = tok.to_owned();
        let t = &t;
        async move {
            let part = file_part(pattern(size), name, "image/png");
            json_ok(upload(t, &tok, None, Some(name), part).await, 201).await;
        }
    };
    seed_upload(&alice_tok, "a.png", 90 * 1024).await;
    seed_upload(&alice_tok, "b.png", 8 * 1024).await;
    seed_upload(&bob_tok, "bob.png", 9 * 1024).await;
    let apikey = token(None, "anon", 3600);
    let replace = |size: usize| {
        http()
            .post(t.url(&format!("/storage/v1/object/files/{alice}/a.png")))
            .header("apikey", &apikey)
            .header(AUTHORIZATION, bearer(&bob_tok))
            .header("x-upsert", "true")
            .header("content-type", "image/png")
            .body(pattern(size))
            .send()
    };
    let size_of =
        |name: &str| format!("SELECT size FROM public.files WHERE path = '{alice}/{name}'");
    // Alice would hold 95 + 8 KiB: over her quota, though Bob's has room. The
    // refusal does not tell Bob how much Alice stores.
    let res = replace(95 * 1024).await.unwrap();
    assert_eq!(res.status(), 413);
    let body = res.text().await.unwrap();
    assert!(body.contains("owner") && !body.contains("8192"), "{body}");
    assert_eq!(count(&t, &size_of("a.png")).await, 90 * 1024, "unchanged");
    // Bob's own quota nearly full (99 KiB) does not matter: 92 + 8 KiB fits
    // Alice's exactly.
    seed_upload(&bob_tok, "big.png", 90 * 1024).await;
    let res = replace(92 * 1024).await.unwrap();
    assert_eq!(res.status(), 200, "{}", res.text().await.unwrap());
    assert_eq!(count(&t, &size_of("a.png")).await, 92 * 1024);
    // A copy over Alice's b.png (8 -> 9 KiB) would put her at 101 KiB.
    let res = http()
        .post(t.url("/storage/v1/object/copy"))
        .header("apikey", &apikey)
        .header(AUTHORIZATION, bearer(&bob_tok))
        .header("x-upsert", "true")
        .json(
            &json!({"bucketId": "files", "sourceKey": format!("{bob}/bob.png"),
                      "destinationKey": format!("{alice}/b.png")}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 413, "{}", res.text().await.unwrap());
    assert_eq!(count(&t, &size_of("b.png")).await, 8 * 1024, "unchanged");
    let owned = count(
        &t,
        &format!("SELECT count(*) FROM public.files WHERE starts_with(path, '{alice}/') AND owner_id = '{alice}'"),
    )
    .await;
    assert_eq!(owned, 2, "replaced objects keep their owner");
}

/// A folder is readable to whoever may read a file under it (the
/// `aether_read` policy on `public.folders`). That check is an index range
/// over the bucket's files, not a scan of them per folder: listing the
/// folders of a large bucket stays cheap. Its meaning is unchanged: a folder
/// with a readable file under it is seen, one without is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn folder_reads_find_their_files_by_index() {
    let t = TestServer::start().await;
    let (alice, alice_tok) = sign_up(&t, "folders-owner@example.com").await;
    let (bob, _) = sign_up(&t, "folders-reader@example.com").await;
    let part = file_part(pattern(10), "x.png", "image/png");
    json_ok(
        upload(&t, &alice_tok, None, Some("shared/x.png"), part).await,
        201,
    )
    .await;
    let part = file_part(pattern(10), "y.png", "image/png");
    json_ok(
        upload(&t, &alice_tok, None, Some("private/y.png"), part).await,
        201,
    )
    .await;
    t.sql
        .batch_execute(&format!(
            "CREATE POLICY team_read ON public.files FOR SELECT TO authenticated
               USING (starts_with(path, '{alice}/shared/'));
             INSERT INTO public.files (bucket_id, path, name, owner_id)
               SELECT 'files', '{alice}/bulk/' || i || '.bin', i || '.bin', '{alice}'
                 FROM generate_series(1, 20000) i;
             ANALYZE public.files; ANALYZE public.folders;"
        ))
        .await
        .unwrap();
    let as_bob = |sql: &str| {
        format!(
            "BEGIN; SET LOCAL ROLE authenticated;
             SET LOCAL request.jwt.claims = '{{\"sub\":\"{bob}\",\"role\":\"authenticated\"}}';
             {sql}"
        )
    };
    let rows = t
        .sql
        .simple_query(&as_bob("SELECT path FROM public.folders ORDER BY path"))
        .await;
    t.sql.batch_execute("ROLLBACK").await.unwrap();
    let seen: Vec<String> = rows
        .unwrap()
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .collect();
    assert_eq!(
        seen,
        vec![format!("{alice}/shared")],
        "only the folder with a file Bob may read"
    );
    let plan = t
        .sql
        .simple_query(&as_bob("EXPLAIN SELECT path FROM public.folders"))
        .await;
    t.sql.batch_execute("ROLLBACK").await.unwrap();
    let plan: String = plan
        .unwrap()
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(|l| format!("{l}\n")),
            _ => None,
        })
        .collect();
    assert!(plan.contains("files_bucket_path_bytes"), "{plan}");
}

/// A listing's prefix is also an index range (`path >= p AND path < p'`, p'
/// the least string above everything starting with p). The range must keep
/// exactly what `starts_with` keeps at its edges: a last character of two,
/// three or four bytes, the last one before the surrogates, and U+10FFFF,
/// which has no successor.
#[tokio::test]
async fn a_listing_prefix_keeps_exactly_the_paths_that_start_with_it() {
    let t = TestServer::start().await;
    let paths = [
        "p/a",
        "p/é",
        "p/é/x",
        "p/éa",
        "p/ê",
        "p/\u{D7FF}",
        "p/\u{D7FF}x",
        "p/\u{E000}",
        "p/\u{FFFF}",
        "p/\u{10000}",
        "p/\u{10FFFF}",
        "p/\u{10FFFF}z",
        "p/\u{10FFFF}\u{10FFFF}",
        "p0",
        "q/a",
    ];
    for p in paths {
        t.sql
            .execute(
                "INSERT INTO public.files (bucket_id, path, name) VALUES ('files', $1, $1)",
                &[&p],
            )
            .await
            .unwrap();
    }
    let service = service_token();
    for prefix in [
        "p/é",
        "p/\u{D7FF}",
        "p/\u{FFFF}",
        "p/\u{10FFFF}",
        "p/\u{10FFFF}\u{10FFFF}",
        "p/",
        "p",
        "",
    ] {
        let v = json_ok(
            http()
                .post(t.url("/storage/v1/object/list-v2/files"))
                .header("apikey", &service)
                .bearer_auth(&service)
                .json(&json!({"prefix": prefix, "limit": 1000}))
                .send()
                .await
                .unwrap(),
            200,
        )
        .await;
        let mut got: Vec<String> = v["objects"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["name"].as_str().unwrap().to_owned())
            .collect();
        got.sort();
        let mut want: Vec<String> = paths
            .iter()
            .filter(|p| p.starts_with(prefix))
            .map(|p| (*p).to_owned())
            .collect();
        want.sort();
        assert_eq!(got, want, "prefix {prefix:?}");
    }
}

/// A replacement's bytes count against the object's owner, under that
/// owner's account lock. The owner is read before the locks (so they are
/// taken in one order); when the object changes hands before the name lock,
/// the new owner's account is locked too, not skipped.
#[tokio::test]
async fn a_replacement_locks_the_account_of_an_owner_who_arrived_late() {
    let t = TestServer::start().await;
    let x = t.new_user().await;
    let y = t.new_user().await;
    t.sql
        .execute(
            "INSERT INTO public.files (bucket_id, path, name, size, owner_id)
             VALUES ('files', 'shared/q.bin', 'q.bin', 1, $1::text::uuid)",
            &[&x],
        )
        .await
        .unwrap();
    // Tests share the cluster: only this database's waiters count.
    let waiting = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted
                   AND database = (SELECT oid FROM pg_database WHERE datname = current_database())";
    let wait_for_a_waiter = || async {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let n: i64 = t.sql.query_one(waiting, &[]).await.unwrap().get(0);
            if n > 0 {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "nobody waits for a lock"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    // A second session holds the name, so the upload stops at its name lock,
    // having read X as the owner.
    let other = t.db.client().await;
    other
        .batch_execute(
            "BEGIN; SELECT pg_advisory_xact_lock(hashtextextended('files/shared', 7490))",
        )
        .await
        .unwrap();
    let url = t.url("/storage/v1/object/files/shared/q.bin");
    let service = t.server.state.jwt.api_key("service_role");
    let upload = tokio::spawn(async move {
        let res = http()
            .post(url)
            .header("apikey", &service)
            .bearer_auth(&service)
            .header("x-upsert", "true")
            .header(CONTENT_TYPE, "application/octet-stream")
            .body(vec![7u8; 10])
            .send()
            .await
            .unwrap();
        let status = res.status().as_u16();
        (status, res.text().await.unwrap())
    });
    wait_for_a_waiter().await;
    // The object passes to Y, whose account the second session keeps locked
    // past its commit; the commit lets the name go.
    other
        .batch_execute(&format!(
            "UPDATE public.files SET owner_id = '{y}' WHERE path = 'shared/q.bin';
             SELECT pg_advisory_lock(hashtextextended('{y}', 7489));
             COMMIT;"
        ))
        .await
        .unwrap();
    // The upload now waits for Y's account.
    wait_for_a_waiter().await;
    assert!(!upload.is_finished());
    other
        .batch_execute(&format!(
            "SELECT pg_advisory_unlock(hashtextextended('{y}', 7489))"
        ))
        .await
        .unwrap();
    let (status, body) = upload.await.unwrap();
    assert_eq!(status, 200, "{body}");
    let row = t
        .sql
        .query_one(
            "SELECT owner_id::text, size FROM public.files WHERE path = 'shared/q.bin'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!((row.get::<_, String>(0), row.get::<_, i64>(1)), (y, 10));
}
