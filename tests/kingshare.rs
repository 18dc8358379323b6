//! The KingShare WebSocket API (seed 002) on the same server as the other
//! vocabularies: file and share events from the WAL, shares, presence, progress,
//! notifications, statistics and limits.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)] // a test may panic; its helpers are `pub` for the other test files

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

fn png(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

/// The next KingShare message of `kind` (others are skipped).
async fn next_ks(ws: &mut Ws, kind: &str) -> Value {
    loop {
        let v = ws.next().await;
        if v["type"] == kind {
            return v;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_authenticate_and_errors_as_documented() {
    let t = TestServer::start().await;
    let (uid, token) = t.sign_up("ks@example.com").await;
    let mut ws = t.kingshare(None).await;
    ws.send(json!({"type": "Ping"})).await;
    assert_eq!(ws.next().await, json!({"type": "Pong"}));
    ws.send(json!({"type": "Authenticate", "data": {"token": "nope"}}))
        .await;
    let r = ws.next().await;
    assert_eq!(
        (r["type"].as_str(), r["data"]["success"].as_bool()),
        (Some("AuthenticationResult"), Some(false))
    );
    ws.send(json!({"type": "Authenticate", "data": {"token": token}}))
        .await;
    assert_eq!(
        ws.next().await,
        json!({"type": "AuthenticationResult", "data": {"success": true, "message": "Authenticated successfully"}})
    );
    let stats: Value = reqwest::Client::new()
        .get(t.url("/api/v1/ws/stats"))
        .bearer_auth(service_token())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        stats["connections_by_user"][&uid], 1,
        "authenticated in-band: counted under the user"
    );
    for (frame, code) in [
        ("{not json", "INVALID_MESSAGE"),
        (
            r#"{"type":"subscription","action":"subscribe","data":{"id":"x","table":"files"}}"#,
            "INVALID_MESSAGE",
        ),
        (r#"{"type":"FileUploaded","data":{}}"#, "INVALID_MESSAGE"),
        (r#"{"type":"Bogus"}"#, "INVALID_MESSAGE"),
        (
            r#"{"type":"SystemNotification","data":{"message":"x","level":"Info"}}"#,
            "AUTHENTICATION_REQUIRED",
        ),
    ] {
        ws.send_text(frame).await;
        let e = ws.next().await;
        assert_eq!(e["type"], "Error", "{frame}");
        assert_eq!(e["data"]["code"], code, "{frame}");
        assert!(e["data"]["message"].is_string());
    }
    // A bad token on connect: Error INVALID_TOKEN, then close.
    let mut bad = t.kingshare(Some("garbage")).await;
    let (code, frames) = bad.until_close().await;
    assert_eq!(
        frames,
        vec![
            json!({"type":"Error","data":{"code":"INVALID_TOKEN","message":frames[0]["data"]["message"]}})
        ]
    );
    assert_eq!(code, Some(4001));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_events_come_from_the_wal_to_their_owner_only_and_both_dialects_coexist() {
    let t = TestServer::start().await;
    let (_a, a_tok) = t.sign_up("a@example.com").await;
    let (_b, b_tok) = t.sign_up("b@example.com").await;
    // A: a token-only connection speaks both vocabularies at once.
    let mut a_ws = t.ws(Some(&a_tok)).await;
    a_ws.skip_kingshare = false;
    a_ws.subscribe("mine", json!({"storage": "files"})).await;
    let mut b_ks = t.kingshare(Some(&b_tok)).await;
    // An Aether API client of A's gets no KingShare messages.
    let mut a_api = t
        .ws_query(&format!("token={a_tok}&client_id=api&channel=c"))
        .await;
    a_api.skip_kingshare = false;
    assert_eq!(a_api.next().await["type"], "connection");

    let up = t
        .upload(&a_tok, "docs/report.png", png(300_000), "image/png")
        .await;
    let file_id = up["id"].as_str().unwrap().to_owned();
    let progress = next_ks(&mut a_ws, "UploadProgress").await;
    assert_eq!(
        progress["data"]["file_id"],
        file_id.as_str(),
        "progress names the file the upload becomes"
    );
    let uploaded = next_ks(&mut a_ws, "FileUploaded").await;
    assert_eq!(
        uploaded,
        json!({"type":"FileUploaded","data":{"file_id": file_id, "filename":"report.png","size":300000}})
    );
    // The same connection also got its change subscription's frame.
    let mut got_change = false;
    for _ in 0..20 {
        let v = a_ws.next().await;
        if v["type"] == "change" {
            assert_eq!(v["new"]["id"], file_id.as_str());
            got_change = true;
            break;
        }
    }
    assert!(got_change);

    // A plain SQL delete is a FileDeleted too.
    t.exec(&format!("DELETE FROM public.files WHERE id = '{file_id}'"))
        .await;
    assert_eq!(
        next_ks(&mut a_ws, "FileDeleted").await,
        json!({"type":"FileDeleted","data":{"file_id": file_id, "filename":"report.png"}})
    );
    // B heard nothing of A's files: B's first message is about its own upload.
    let mine = t.upload(&b_tok, "b.png", png(10), "image/png").await;
    let first = b_ks.next().await;
    assert_eq!(
        first["data"]["file_id"], mine["id"],
        "B's first KingShare message is its own: {first}"
    );
    // A's Aether API connection got no KingShare message: its next frame is a channel message.
    a_api
        .send(json!({"type":"message","action":"send","data":{"content":"x","channel":"c"}}))
        .await;
    assert_eq!(a_api.next().await["type"], "message");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shares_are_created_fetched_without_an_account_counted_and_revoked() {
    let t = TestServer::start().await;
    let (uid, tok) = t.sign_up("owner@example.com").await;
    let mut ks = t.kingshare(Some(&tok)).await;
    let up = t.upload(&tok, "pic.png", png(1000), "image/png").await;
    let file_id = up["id"].as_str().unwrap().to_owned();
    next_ks(&mut ks, "FileUploaded").await;
    let http = reqwest::Client::new();
    let share: Value = http
        .post(t.url("/api/v1/shares"))
        .bearer_auth(&tok)
        .json(&json!({"file_id": file_id, "expires_in": 3600}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let share_id = share["id"].as_str().unwrap().to_owned();
    let token = share["token"].as_str().unwrap().to_owned();
    assert!(token.len() >= 64, "unguessable token");
    assert_eq!(
        next_ks(&mut ks, "FileShared").await,
        json!({"type":"FileShared","data":{"share_id": share_id, "file_id": file_id, "share_token": token}})
    );
    // A HEAD of the object (storage-js `exists`) is not a download: the next
    // KingShare frame is the answer to a ping.
    let res = http
        .head(t.url(&format!("/storage/v1/object/files/{uid}/pic.png")))
        .header("apikey", common::token(None, "anon", 3600))
        .bearer_auth(&tok)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    ks.send(json!({"type": "Ping"})).await;
    assert_eq!(ks.next().await, json!({"type": "Pong"}));
    // No account needed to fetch it.
    let res = http
        .get(t.url(&format!("/share/{token}")))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.bytes().await.unwrap().to_vec(), png(1000));
    // Both come, in either order: DownloadStarted straight from the
    // download, ShareAccessed from the share's counter through the WAL.
    let (mut started, mut accessed) = (None, None);
    while started.is_none() || accessed.is_none() {
        let v = ks.next().await;
        match v["type"].as_str() {
            Some("DownloadStarted") => started = Some(v),
            Some("ShareAccessed") => accessed = Some(v),
            _ => {}
        }
    }
    assert_eq!(started.unwrap()["data"]["file_id"], file_id.as_str());
    assert_eq!(
        accessed.unwrap(),
        json!({"type":"ShareAccessed","data":{"share_id": share_id, "file_id": file_id, "filename":"pic.png"}})
    );
    let list: Value = http
        .get(t.url("/api/v1/shares"))
        .bearer_auth(&tok)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["shares"][0]["access_count"], 1);
    assert_eq!(list["shares"][0]["status"], "active");
    // Someone else's file cannot be shared; another user cannot revoke.
    let (_o, other) = t.sign_up("other@example.com").await;
    let res = http
        .post(t.url("/api/v1/shares"))
        .bearer_auth(&other)
        .json(&json!({"file_id": file_id}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
    let res = http
        .delete(t.url(&format!("/api/v1/shares/{share_id}")))
        .bearer_auth(&other)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
    let res = http
        .delete(t.url(&format!("/api/v1/shares/{share_id}")))
        .bearer_auth(&tok)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let res = http
        .get(t.url(&format!("/share/{token}")))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 410);
    let e: Value = res.json().await.unwrap();
    assert_eq!(e["error"]["code"], "share/revoked");
    let res = http.get(t.url("/share/0000")).send().await.unwrap();
    assert_eq!(res.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_share_expires_after_a_restart_and_its_owner_hears_of_it() {
    let t = TestServer::start().await;
    let (_a, tok) = t.sign_up("exp@example.com").await;
    let up = t.upload(&tok, "e.png", png(10), "image/png").await;
    let http = reqwest::Client::new();
    let share: Value = http
        .post(t.url("/api/v1/shares"))
        .bearer_auth(&tok)
        .json(&json!({"file_id": up["id"], "expires_in": 4}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    // Aether restarts before the share expires: expiry is data, not a timer.
    let t = t.restart().await;
    let mut ks = t.kingshare(Some(&tok)).await;
    let expired = next_ks(&mut ks, "ShareExpired").await;
    assert_eq!(
        expired,
        json!({"type":"ShareExpired","data":{"share_id": share["id"], "file_id": up["id"]}})
    );
    let res = http
        .get(t.url(&format!("/share/{}", share["token"].as_str().unwrap())))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 410);
    let e: Value = res.json().await.unwrap();
    assert_eq!(e["error"]["code"], "share/expired");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_is_told_to_users_who_share_with_each_other_only() {
    let t = TestServer::start().await;
    let (a, a_tok) = t.sign_up("alice.k@example.com").await;
    let (b, b_tok) = t.sign_up("bob.k@example.com").await;
    let (c, c_tok) = t.sign_up("carol.k@example.com").await;
    let up = t.upload(&a_tok, "x.png", png(10), "image/png").await;
    let res = reqwest::Client::new()
        .post(t.url("/api/v1/shares"))
        .bearer_auth(&a_tok)
        .json(&json!({"file_id": up["id"], "shared_with": b}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let mut b_ks = t.kingshare(Some(&b_tok)).await;
    let mut c_ks = t.kingshare(Some(&c_tok)).await;
    let a_ks = t.kingshare(Some(&a_tok)).await;
    assert_eq!(
        next_ks(&mut b_ks, "UserOnline").await,
        json!({"type":"UserOnline","data":{"user_id": a, "username":"alice.k"}})
    );
    a_ks.close().await;
    assert_eq!(
        next_ks(&mut b_ks, "UserOffline").await,
        json!({"type":"UserOffline","data":{"user_id": a, "username":"alice.k"}})
    );
    // Carol shares nothing with Alice: her first message is a notification sent to her after all that.
    let res = reqwest::Client::new()
        .post(t.url("/api/v1/ws/notify"))
        .bearer_auth(service_token())
        .json(&json!({"message": "only carol", "level": "Info", "user_id": c}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        c_ks.next().await,
        json!({"type":"SystemNotification","data":{"message":"only carol","level":"Info"}})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_progress_arrives_in_steps_up_to_the_whole_file() {
    let t = TestServer::start().await;
    let (_a, tok) = t.sign_up("prog@example.com").await;
    let mut ks = t.kingshare(Some(&tok)).await;
    let size = 3 * 1024 * 1024;
    let up = t.upload(&tok, "big.png", png(size), "image/png").await;
    let mut last = 0.0;
    let mut steps = 0;
    loop {
        let p = next_ks(&mut ks, "UploadProgress").await;
        let d = &p["data"];
        assert_eq!(d["file_id"], up["id"]);
        let progress = d["progress"].as_f64().unwrap();
        assert!(progress >= last, "progress does not go back");
        assert!(d["bytes_uploaded"].as_u64().unwrap() <= d["total_bytes"].as_u64().unwrap());
        last = progress;
        steps += 1;
        if progress == 1.0 {
            assert_eq!(d["bytes_uploaded"], size);
            assert_eq!(d["total_bytes"], size);
            break;
        }
    }
    assert!((5..=15).contains(&steps), "sensible steps, got {steps}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_stats_cleanup_and_connection_limits() {
    let t = TestServer::start_with(|c| {
        c.ws_ping_interval = Duration::from_millis(200);
        c.ws_idle_timeout = Duration::from_secs(600);
    })
    .await;
    let http = reqwest::Client::new();
    let (u, tok) = t.sign_up("n@example.com").await;
    let mut ks = t.kingshare(Some(&tok)).await;
    let mut svc = t.kingshare(Some(&service_token())).await;
    // From an operator over the socket, and over REST.
    svc.send(json!({"type":"SystemNotification","data":{"message":"maintenance at 2","level":"Warning"}})).await;
    assert_eq!(
        ks.next().await,
        json!({"type":"SystemNotification","data":{"message":"maintenance at 2","level":"Warning"}})
    );
    for level in ["Info", "Error", "Success"] {
        let res = http
            .post(t.url("/api/v1/ws/notify"))
            .bearer_auth(service_token())
            .json(&json!({"message": level, "level": level}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(ks.next().await["data"]["level"], level);
    }
    let res = http
        .post(t.url("/api/v1/ws/notify"))
        .bearer_auth(service_token())
        .json(&json!({"message": "x", "level": "Loud"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    let res = http
        .post(t.url("/api/v1/ws/notify"))
        .bearer_auth(&tok)
        .json(&json!({"message": "x", "level": "Info"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);

    // Stats (service_role only).
    let res = http
        .get(t.url("/api/v1/ws/stats"))
        .bearer_auth(&tok)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
    let stats: Value = http
        .get(t.url("/api/v1/ws/stats"))
        .bearer_auth(service_token())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats["total_connections"], 2);
    assert_eq!(stats["unique_users"], 1);
    assert_eq!(stats["connections_by_user"][&u], 1);
    // The scheme is case-insensitive here as on every route; a signed-out
    // user's token is refused like on the others.
    let res = http
        .get(t.url("/api/v1/ws/stats"))
        .header("authorization", format!("bearer {}", service_token()))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);

    // Per-user limit (10): the eleventh gets CONNECTION_LIMIT in KingShare's format.
    let mut more = Vec::new();
    for _ in 0..9 {
        more.push(t.kingshare(Some(&tok)).await);
    }
    let mut over = t.kingshare(Some(&tok)).await;
    let (code, frames) = over.until_close().await;
    assert_eq!(frames[0]["type"], "Error");
    assert_eq!(frames[0]["data"]["code"], "CONNECTION_LIMIT");
    assert_eq!(code, Some(4029));

    // Cleanup closes connections that missed their heartbeats: none of these
    // clients reads, so none answers pings except those we keep reading.
    drop(more);
    let keep = tokio::spawn(async move {
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                ks.next_message().await;
            }
        })
        .await;
    });
    let removed = tokio::time::timeout(WAIT, async {
        loop {
            let r: Value = http
                .post(t.url("/api/v1/ws/cleanup"))
                .bearer_auth(service_token())
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if r["removed_connections"].as_u64().unwrap() > 0 {
                return r["removed_connections"].as_u64().unwrap();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("cleanup removes the silent connection");
    assert_eq!(
        removed, 1,
        "the operator's silent connection, not the one being read"
    );
    let _ = svc;
    keep.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_messages_are_rate_limited() {
    let t = TestServer::start_with(|c| c.rate_limit_messages = 3).await;
    let mut ws = t.kingshare(None).await;
    for _ in 0..4 {
        ws.send(json!({"type": "Ping"})).await;
    }
    for _ in 0..3 {
        assert_eq!(ws.next().await, json!({"type": "Pong"}));
    }
    let e = ws.next().await;
    assert_eq!(
        (e["type"].as_str(), e["data"]["code"].as_str()),
        (Some("Error"), Some("RATE_LIMITED"))
    );
}
