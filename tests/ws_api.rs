//! The Aether WebSocket API (seed 000, the side after `<<<<<<< HEAD`): connection,
//! channel messages, system messages, limits and the operations endpoints.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)] // a test may panic; its helpers are `pub` for the other test files

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

fn send(channel: &str, content: &str, sequence: i64) -> Value {
    json!({"type": "message", "action": "send", "data": {
        "content": content, "channel": channel,
        "metadata": {"sequence": sequence, "timestamp": "2026-11-21T00:00:00.000Z"}}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_confirms_and_members_hear_of_joins_and_leaves() {
    let t = TestServer::start().await;
    let uid = t.new_user().await;
    let mut a = t
        .ws_query(&format!(
            "token={}&client_id=alpha&channel=main",
            user_token(&uid)
        ))
        .await;
    assert_eq!(
        a.next().await,
        json!({"type":"connection","action":"connect","data":{"client_id":"alpha","user_id":uid,"channel":"main"}})
    );
    let mut b = t.ws_query("client_id=beta&channel=main").await;
    assert_eq!(
        b.next().await,
        json!({"type":"connection","action":"connect","data":{"client_id":"beta","user_id":null,"channel":"main"}})
    );
    let announced = a.next().await;
    assert_eq!(
        (
            announced["action"].as_str(),
            announced["data"]["client_id"].as_str()
        ),
        (Some("connect"), Some("beta"))
    );

    // Joining and leaving further channels in-band.
    b.send(json!({"type":"connection","action":"join","data":{"channel":"side"}}))
        .await;
    let j = b.next().await;
    assert_eq!(
        (j["action"].as_str(), j["data"]["channel"].as_str()),
        (Some("connect"), Some("side"))
    );
    b.send(json!({"type":"connection","action":"leave","data":{"channel":"side"}}))
        .await;
    let l = b.next().await;
    assert_eq!(
        (l["action"].as_str(), l["data"]["channel"].as_str()),
        (Some("disconnect"), Some("side"))
    );
    b.send(json!({"type":"connection","action":"leave","data":{"channel":"side"}}))
        .await;
    assert_eq!(b.next().await["code"], "not_a_member");
    b.send(json!({"type":"connection","action":"join","data":{"channel":"bad name"}}))
        .await;
    assert_eq!(b.next().await["code"], "invalid_channel");

    // A connection without client_id gets one generated; one without channel is
    // confirmed with channel null.
    let mut c = t.ws_query("client_id=gamma").await;
    assert_eq!(c.next().await["data"]["channel"], Value::Null);

    b.close().await;
    let gone = a.next().await;
    assert_eq!(
        (gone["action"].as_str(), gone["data"]["client_id"].as_str()),
        (Some("disconnect"), Some("beta"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_receive_a_channels_messages_in_one_order_and_retries_are_delivered_once() {
    let t = TestServer::start().await;
    let mut a = t.ws_query("client_id=a&channel=room").await;
    a.next().await;
    let mut b = t.ws_query("client_id=b&channel=room").await;
    b.next().await;
    a.next().await; // b joined
    // Both send at once; both see the same single order.
    let (ra, rb) = tokio::join!(
        async {
            for i in 0..20 {
                a.send(send("room", &format!("a{i}"), i)).await;
            }
        },
        async {
            for i in 0..20 {
                b.send(send("room", &format!("b{i}"), i)).await;
            }
        }
    );
    let _ = (ra, rb);
    let mut seen_a = Vec::new();
    let mut seen_b = Vec::new();
    for _ in 0..40 {
        seen_a.push(a.next_of("message").await);
        seen_b.push(b.next_of("message").await);
    }
    let order = |v: &[Value]| {
        v.iter()
            .map(|m| m["data"]["content"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(order(&seen_a), order(&seen_b), "one order for every member");
    let seqs: Vec<u64> = seen_a
        .iter()
        .map(|m| m["data"]["metadata"]["server_sequence"].as_u64().unwrap())
        .collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1));
    let m = &seen_a[0];
    assert_eq!(m["action"], "send");
    assert_eq!(m["data"]["channel"], "room");
    assert!(
        m["data"]["metadata"]["sequence"].is_i64()
            && m["data"]["metadata"]["timestamp"].is_string()
    );
    // Each sender's own messages keep its order.
    let mine: Vec<String> = order(&seen_a)
        .into_iter()
        .filter(|c| c.starts_with('a'))
        .collect();
    assert_eq!(mine, (0..20).map(|i| format!("a{i}")).collect::<Vec<_>>());

    // A retry of a message already relayed is not relayed again: the sender is told.
    a.send(json!({"type":"message","action":"retry","data":{"content":"a0","channel":"room","metadata":{"sequence":0}}})).await;
    let ack = a.next().await;
    assert_eq!(
        ack,
        json!({"type":"message","action":"ack","data":{"channel":"room","sequence":0,"duplicate":true,"retry":true}})
    );
    // A retry of a message the server never got is relayed, once.
    a.send(json!({"type":"message","action":"retry","data":{"content":"late","channel":"room","metadata":{"sequence":77}}})).await;
    a.send(json!({"type":"message","action":"retry","data":{"content":"late","channel":"room","metadata":{"sequence":77}}})).await;
    assert_eq!(b.next_of("message").await["data"]["content"], "late");
    a.send(send("room", "after", 78)).await;
    assert_eq!(
        b.next_of("message").await["data"]["content"],
        "after",
        "the duplicate retry was not relayed"
    );
    // Another user naming the same client id is another sender: its sequence 78
    // is not a duplicate of a's.
    let other = user_token(&t.new_user().await);
    let mut m = t
        .ws_query(&format!("token={other}&client_id=a&channel=room"))
        .await;
    m.next().await;
    m.send(send("room", "not a duplicate", 78)).await;
    assert_eq!(
        b.next_of("message").await["data"]["content"],
        "not a duplicate"
    );
    // Sending to a channel one has not joined is refused.
    a.send(send("elsewhere", "x", 1)).await;
    let e = a.next_of("error").await;
    assert_eq!(e["code"], "not_a_member");
    assert_eq!(e["details"]["component"], "subscription");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn system_status_and_operator_broadcasts() {
    let t = TestServer::start().await;
    let mut member = t.ws_query("client_id=m&channel=news").await;
    member.next().await;
    let mut outsider = t.ws_query("client_id=o").await;
    outsider.next().await;
    let mut op = t
        .ws_query(&format!("token={}&client_id=op", service_token()))
        .await;
    op.next().await;

    outsider
        .send(json!({"type":"system","action":"status"}))
        .await;
    let s = outsider.next().await;
    assert_eq!(
        (s["type"].as_str(), s["action"].as_str()),
        (Some("system"), Some("status"))
    );
    assert_eq!(s["data"]["severity"], "info");
    assert_eq!(s["data"]["status"]["status"], "healthy");

    // Only service_role may broadcast.
    outsider
        .send(
            json!({"type":"system","action":"broadcast","data":{"message":"hi","severity":"info"}}),
        )
        .await;
    assert_eq!(outsider.next().await["code"], "forbidden");

    op.send(json!({"type":"system","action":"broadcast","data":{"message":"to news","severity":"warning","channel":"news"}})).await;
    op.send(json!({"type":"system","action":"broadcast","data":{"message":"to all","severity":"error"}})).await;
    assert_eq!(
        member.next().await,
        json!({"type":"system","action":"broadcast","data":{"message":"to news","severity":"warning","channel":"news"}})
    );
    assert_eq!(member.next().await["data"]["message"], "to all");
    // The outsider only hears the broadcast to everyone.
    assert_eq!(
        outsider.next().await,
        json!({"type":"system","action":"broadcast","data":{"message":"to all","severity":"error"}})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_are_configured_over_rest_stored_in_postgres_and_enforced() {
    let t = TestServer::start().await;
    let http = reqwest::Client::new();
    let body =
        json!({"name": "vip", "max_connections": 1, "message_rate_limit": 2, "require_auth": true});
    let r = http
        .post(t.url("/ws/channels"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["status"], 401);
    let uid = t.new_user().await;
    let r = http
        .post(t.url("/ws/channels"))
        .bearer_auth(user_token(&uid))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = http
        .post(t.url("/ws/channels"))
        .bearer_auth(service_token())
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let c: Value = r.json().await.unwrap();
    assert_eq!(
        (
            c["name"].as_str(),
            c["max_connections"].as_i64(),
            c["require_auth"].as_bool()
        ),
        (Some("vip"), Some(1), Some(true))
    );
    let r = http
        .post(t.url("/ws/channels"))
        .bearer_auth(service_token())
        .json(&json!({"name": "bad name"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = http
        .post(t.url("/ws/channels"))
        .bearer_auth(service_token())
        .body("{")
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let row = t
        .sql
        .query_one(
            "SELECT max_connections, require_auth FROM aether.channels WHERE name = 'vip'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (row.get::<_, Option<i32>>(0), row.get::<_, bool>(1)),
        (Some(1), true)
    );

    // require_auth: an anonymous join is refused (and the connection closed, since
    // it asked for that channel when connecting).
    let mut anon = t.ws_query("client_id=anon&channel=vip").await;
    let (code, frames) = anon.until_close().await;
    assert_eq!(frames[0]["code"], "auth_required");
    assert_eq!(code, Some(4003));
    // max_connections: the second member is refused.
    let mut first = t
        .ws_query(&format!(
            "token={}&client_id=one&channel=vip",
            user_token(&uid)
        ))
        .await;
    first.next().await;
    let mut second = t.ws(Some(&user_token(&t.new_user().await))).await;
    second
        .send(json!({"type":"connection","action":"join","data":{"channel":"vip"}}))
        .await;
    assert_eq!(second.next().await["code"], "channel_full");
    // message_rate_limit: the third message in the window is refused and not relayed.
    for i in 0..3 {
        first.send(send("vip", &format!("m{i}"), i)).await;
    }
    assert_eq!(first.next().await["data"]["content"], "m0");
    assert_eq!(first.next().await["data"]["content"], "m1");
    let e = first.next().await;
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str()),
        (Some("error"), Some("rate_limited"))
    );

    // A DBA's UPDATE applies live, through the WAL.
    t.exec("UPDATE aether.channels SET max_connections = 5 WHERE name = 'vip'")
        .await;
    t.sync().await;
    second
        .send(json!({"type":"connection","action":"join","data":{"channel":"vip"}}))
        .await;
    assert_eq!(second.next().await["action"], "connect");
    // …and survives a restart: it is read from PostgreSQL at start.
    let r = http
        .post(t.url("/ws/channels"))
        .bearer_auth(service_token())
        .json(&json!({"name": "vip", "require_auth": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "reconfiguring an existing channel");
}

/// Waits until the server has admitted `n` connections.
async fn wait_active(t: &TestServer, n: usize) {
    tokio::time::timeout(WAIT, async {
        while t.server.state.realtime.registry.stats().active != n {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("connections admitted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_and_message_limits_are_enforced_with_clear_errors() {
    let t = TestServer::start_with(|c| {
        c.rate_limit_connections = 2;
        c.ws_max_connections = 4;
        c.rate_limit_messages = 3;
    })
    .await;
    let uid = t.new_user().await;
    let tok = user_token(&uid);
    let mut c1 = t
        .ws_query(&format!("token={tok}&client_id=c1&channel=x"))
        .await;
    c1.next().await;
    let _c2 = t.ws(Some(&tok)).await;
    // Admission runs after the handshake: count c2 before c3 tries.
    wait_active(&t, 2).await;
    let mut c3 = t.ws(Some(&tok)).await;
    let (code, frames) = c3.until_close().await;
    assert_eq!(
        (code, frames[0]["code"].as_str()),
        (Some(4029), Some("connection_limit"))
    );
    assert!(frames[0]["message"].as_str().unwrap().contains("this user"));
    // The global cap.
    let _o1 = t.ws(None).await;
    let _o2 = t.ws(Some(&service_token())).await;
    wait_active(&t, 4).await;
    let mut over = t.ws(Some(&user_token(&t.new_user().await))).await;
    let (code, frames) = over.until_close().await;
    assert_eq!(
        (code, frames[0]["code"].as_str()),
        (Some(4029), Some("connection_limit"))
    );
    // RATE_LIMIT_MESSAGES per window, per client per channel.
    for i in 0..4 {
        c1.send(send("x", "m", i)).await;
    }
    for _ in 0..3 {
        assert_eq!(c1.next().await["type"], "message");
    }
    assert_eq!(c1.next().await["code"], "rate_limited");
}

/// `/realtime/v1/websocket` (Phoenix) counts against the same limits as `/ws`, is
/// pinged, closed when idle and released from the registry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn phoenix_sockets_are_admitted_pinged_and_released() {
    let t = TestServer::start_with(|c| {
        c.rate_limit_connections = 1;
        c.ws_ping_interval = Duration::from_millis(100);
        c.ws_idle_timeout = Duration::from_millis(300);
    })
    .await;
    let url = format!(
        "ws://{}/realtime/v1/websocket?apikey={}&vsn=1.0.0",
        t.addr(),
        t.server.state.jwt.api_key("anon")
    );
    let mut first = Ws::connect_url(&url).await;
    wait_active(&t, 1).await;
    // The same anonymous address, over RATE_LIMIT_CONNECTIONS.
    let mut second = Ws::connect_url(&url).await;
    assert_eq!(second.until_close().await.0, Some(4029));
    // A peer that neither sends nor answers pings (it is not read) is closed as idle.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(first.until_close().await.0, Some(4000));
    wait_active(&t, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_checked_on_every_message_and_renewed_in_band() {
    let t = TestServer::start().await;
    let uid = t.new_user().await;
    let mut ws = t
        .ws_query(&format!(
            "token={}&client_id=r&channel=c",
            token(Some(&uid), "authenticated", 2)
        ))
        .await;
    ws.next().await;
    // Renew before expiry: the connection outlives the first token.
    ws.send(json!({"type":"connection","action":"refresh","data":{"token": token(Some(&uid), "authenticated", 3600)}})).await;
    let r = ws.next().await;
    assert_eq!(
        (r["action"].as_str(), r["data"]["user_id"].as_str()),
        (Some("refreshed"), Some(uid.as_str()))
    );
    // A token for another user is refused; so is garbage.
    ws.send(json!({"type":"connection","action":"refresh","data":{"token": user_token(&t.new_user().await)}})).await;
    assert_eq!(ws.next().await["code"], "forbidden");
    ws.send(json!({"type":"connection","action":"refresh","data":{"token": "x.y.z"}}))
        .await;
    assert_eq!(ws.next().await["code"], "auth/invalid-token");
    // Past the first token's expiry, messages still work.
    let mut other = t.ws_query("client_id=o&channel=c").await;
    other.next().await;
    ws.next().await; // o joined
    // Token expiry is wall-clock: let the first token's two seconds pass.
    tokio::time::sleep(Duration::from_millis(3100)).await;
    ws.send(send("c", "still here", 1)).await;
    assert_eq!(ws.next_of("message").await["data"]["content"], "still here");
    ws.send(json!({"type":"system","action":"status"})).await;
    assert_eq!(ws.next_of("system").await["action"], "status");
    // Without renewal, the next message after expiry gets an error and a close.
    let mut short = t.ws(Some(&token(Some(&uid), "authenticated", 1))).await;
    let (code, frames) = short.until_close().await;
    assert_eq!(
        (code, frames.last().unwrap()["code"].as_str()),
        (Some(4001), Some("auth/expired-token"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_peers_are_reaped_by_the_heartbeat() {
    let t = TestServer::start_with(|c| {
        c.ws_ping_interval = Duration::from_millis(300);
        c.ws_idle_timeout = Duration::from_secs(1);
    })
    .await;
    // A peer that never reads never answers pings.
    let mut silent = Ws::connect_small_buffer(t.addr(), None).await;
    // An attentive peer (reading, so its library answers pings) stays.
    let mut alive = t.ws(None).await;
    // Both are admitted before the wait below: counting one not yet admitted
    // would end it at once, and a silent peer that then reads answers pings.
    tokio::time::timeout(WAIT, async {
        while t.server.state.realtime.registry.stats().active < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("both peers are admitted");
    // Read (so its pings are answered) until the end of the test: any frame
    // but a ping would be a close or an error.
    let stop = tokio_util::sync::CancellationToken::new();
    let watch_alive = tokio::spawn({
        let stop = stop.clone();
        async move {
            let got = tokio::select! {
                _ = stop.cancelled() => None,
                m = alive.next_message() => Some(m),
            };
            (got, alive)
        }
    });
    tokio::time::timeout(WAIT, async {
        while t.server.state.realtime.registry.stats().active > 1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the silent peer is reaped");
    let (code, _) = silent.until_close().await;
    assert_eq!(code, Some(4000));
    assert_eq!(t.server.state.realtime.registry.stats().active, 1);
    stop.cancel();
    let (got, _alive) = watch_alive.await.unwrap();
    assert!(got.is_none(), "the attentive peer got {got:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_metrics_endpoints() {
    let t = TestServer::start().await;
    let http = reqwest::Client::new();
    let mut ws = t.ws_query("client_id=s&channel=stats").await;
    ws.next().await;
    ws.send_text("{oops").await;
    assert_eq!(ws.next().await["code"], "invalid_json");
    ws.send(send("stats", "hello", 1)).await;
    ws.next_of("message").await;

    let s: Value = http
        .get(t.url("/ws/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(s["status"], "healthy");
    assert_eq!(s["connections"]["active"], 1);
    assert!(s["connections"]["total"].as_u64().unwrap() >= 1);
    assert_eq!(s["channels"]["active"], 1);
    assert!(s["channels"]["messages_per_second"].is_number());
    assert_eq!(s["replication"]["connected"], true);
    assert!(s["replication"]["lag_bytes"].is_i64() && s["replication"]["lag_seconds"].is_number());
    // Published tables whose old rows are only their keys are named.
    t.exec(
        "CREATE TABLE public.notes (id int PRIMARY KEY, body text);
         ALTER PUBLICATION aether_realtime ADD TABLE public.notes;",
    )
    .await;
    let s: Value = http
        .get(t.url("/ws/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let partial = s["tables_without_full_identity"].as_array().unwrap();
    assert!(partial.contains(&json!("public.notes")), "{s}");
    assert!(!partial.contains(&json!("public.files")), "{s}");

    let get = |path: &'static str| {
        let http = http.clone();
        let url = t.url(path);
        async move {
            http.get(url)
                .bearer_auth(service_token())
                .send()
                .await
                .unwrap()
        }
    };
    let c: Value = get("/metrics/connections").await.json().await.unwrap();
    assert_eq!(c["active"], 1);
    let m: Value = get("/metrics/messages").await.json().await.unwrap();
    assert!(
        m["frames_in"].as_u64().unwrap() >= 2 && m["channel_messages_total"].as_u64() == Some(1)
    );
    let ch: Value = get("/metrics/channels").await.json().await.unwrap();
    assert_eq!(ch["members"]["stats"], 1);
    let e: Value = get("/metrics/errors").await.json().await.unwrap();
    assert_eq!(e["by_code"]["invalid_json"], 1);
    // Operators only: user ids are in there.
    let r = http
        .get(t.url("/metrics/connections"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = http.get(t.url("/nope")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_found");
    let r = http.delete(t.url("/ws/status")).send().await.unwrap();
    assert_eq!(r.status(), 405);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["status"], 405);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_flooding_frames_is_told_to_slow_down() {
    let t = TestServer::start().await;
    let mut ws = t.ws(Some(&service_token())).await;
    // Each of these costs the router a lookup; past the burst they are refused.
    let frame = json!({"type":"subscription","action":"unsubscribe","data":{"id":"nope"}});
    for _ in 0..1100 {
        ws.send(frame.clone()).await;
    }
    let mut codes = std::collections::HashMap::new();
    for _ in 0..1100 {
        let v = ws.next().await;
        *codes
            .entry(v["code"].as_str().unwrap_or_default().to_owned())
            .or_insert(0) += 1;
    }
    assert!(
        codes.get("rate_limited").copied().unwrap_or(0) >= 50,
        "{codes:?}"
    );
    assert!(
        codes.get("unknown_subscription").copied().unwrap_or(0) >= 1000,
        "{codes:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn phoenix_sockets_have_the_same_frame_budget_and_message_rate_limit_as_ws() {
    let t = TestServer::start_with(|c| c.rate_limit_messages = 3).await;
    let url = format!(
        "ws://{}/realtime/v1/websocket?apikey={}&vsn=1.0.0",
        t.addr(),
        t.server.state.jwt.api_key("anon")
    );
    let reason = |v: &Value| {
        v["payload"]["response"]["reason"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    // Frames past the burst are refused with a reply, as on /ws.
    let mut ws = Ws::connect_url(&url).await;
    let beat = json!({"topic":"phoenix","event":"heartbeat","payload":{},"ref":"1"});
    for _ in 0..1100 {
        ws.send(beat.clone()).await;
    }
    let mut limited = 0;
    for _ in 0..1100 {
        let v = ws.next().await;
        if reason(&v).starts_with("rate_limited") {
            limited += 1;
        }
    }
    assert!(limited >= 50, "{limited} frames refused");
    ws.close().await;

    // Broadcasts: RATE_LIMIT_MESSAGES per window on a topic.
    let mut ws = Ws::connect_url(&url).await;
    ws.send(json!({"topic":"realtime:room","event":"phx_join","ref":"1","join_ref":"1",
        "payload":{"config":{"broadcast":{"ack":true,"self":false},"presence":{"key":""},"postgres_changes":[]}}}))
        .await;
    let joined = ws.next().await;
    assert_eq!(joined["payload"]["status"], "ok", "{joined}");
    let mut statuses = Vec::new();
    for i in 0..5 {
        ws.send(json!({"topic":"realtime:room","event":"broadcast","ref": format!("b{i}"),"join_ref":"1",
            "payload":{"type":"broadcast","event":"e","payload":{"i": i}}}))
            .await;
        loop {
            let v = ws.next().await;
            if v["event"] == "phx_reply" && v["ref"] == format!("b{i}") {
                statuses.push((
                    v["payload"]["status"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                    reason(&v),
                ));
                break;
            }
        }
    }
    let ok = statuses.iter().filter(|(s, _)| s == "ok").count();
    let limited = statuses
        .iter()
        .filter(|(s, r)| s == "error" && r.starts_with("rate_limited"))
        .count();
    assert_eq!((ok, limited), (3, 2), "{statuses:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_sent_from_the_database_reach_the_channels_members_in_its_order() {
    let t = TestServer::start().await;
    let mut a = t.ws_query("client_id=a&channel=dbroom").await;
    a.next().await;
    let mut other = t.ws_query("client_id=o&channel=elsewhere").await;
    other.next().await;
    // A client's message and the database's share the channel's one order.
    a.send(send("dbroom", "from a", 1)).await;
    let first = a.next_of("message").await;
    t.exec(
        "SELECT realtime.send('{\"n\": 1}'::jsonb, 'note', 'dbroom', false);
         SELECT realtime.send('{\"n\": 2}'::jsonb, 'note', 'dbroom');
         SELECT realtime.send('{\"n\": 3}'::jsonb, 'note', 'dbroom', false);",
    )
    .await;
    let m = a.next_of("message").await;
    assert_eq!(m["action"], "send");
    assert_eq!(m["data"]["content"], json!({"n": 1}));
    assert_eq!(m["data"]["channel"], "dbroom");
    assert_eq!(m["data"]["client_id"], Value::Null);
    assert_eq!(m["data"]["metadata"]["event"], "note");
    assert_eq!(
        m["data"]["metadata"]["server_sequence"].as_u64(),
        first["data"]["metadata"]["server_sequence"]
            .as_u64()
            .map(|s| s + 1)
    );
    // The private one (the default) reaches no one: the next is n = 3.
    let m = a.next_of("message").await;
    assert_eq!(m["data"]["content"], json!({"n": 3}));
    // Another channel's member heard none of it.
    other.send(send("elsewhere", "ping", 1)).await;
    let own = other.next_of("message").await;
    assert_eq!(own["data"]["content"], "ping");
}

/// A Phoenix socket (anon API key), joined to `topic` as the holder of
/// `token` (none: anon); returns the join's reply.
async fn phx_join(t: &TestServer, topic: &str, private: bool, token: Option<&str>) -> (Ws, Value) {
    let url = format!(
        "ws://{}/realtime/v1/websocket?apikey={}&vsn=1.0.0",
        t.addr(),
        t.server.state.jwt.api_key("anon")
    );
    let mut ws = Ws::connect_url(&url).await;
    let mut payload = json!({"config":{"broadcast":{"self":false},"presence":{"key":""},
        "postgres_changes":[],"private":private}});
    if let Some(tok) = token {
        payload["access_token"] = json!(tok);
    }
    ws.send(
        json!({"topic": topic, "event":"phx_join","ref":"1","join_ref":"1","payload": payload}),
    )
    .await;
    let reply = ws.next().await;
    (ws, reply)
}

/// The next `broadcast` a Phoenix socket receives (replies and presence skipped).
async fn next_broadcast(ws: &mut Ws) -> Value {
    loop {
        let v = ws.next().await;
        if v["event"] == "broadcast" {
            return v["payload"].clone();
        }
    }
}

/// Private channels are opened by the `realtime.messages` RLS policies, asked
/// as the member with `realtime.topic()`; they are apart from the public
/// channel of the same topic; private database messages reach only them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_channels_follow_the_realtime_messages_policies() {
    let t = TestServer::start().await;
    t.exec(
        "CREATE POLICY read_rooms ON realtime.messages FOR SELECT TO authenticated
           USING (realtime.topic() = 'room:shared' OR realtime.topic() = 'room:' || auth.uid()::text);
         CREATE POLICY send_shared ON realtime.messages FOR INSERT TO authenticated
           WITH CHECK (realtime.topic() = 'room:shared' AND extension = 'broadcast');",
    )
    .await;
    let (alice, bob) = (t.new_user().await, t.new_user().await);
    let (ta, tb) = (user_token(&alice), user_token(&bob));
    let topic = "realtime:room:shared";
    let (mut a, reply) = phx_join(&t, topic, true, Some(&ta)).await;
    assert_eq!(reply["payload"]["status"], "ok", "{reply}");
    let (mut b, reply) = phx_join(&t, topic, true, Some(&tb)).await;
    assert_eq!(reply["payload"]["status"], "ok", "{reply}");
    let (mut public, reply) = phx_join(&t, topic, false, None).await;
    assert_eq!(reply["payload"]["status"], "ok", "{reply}");

    // Someone else's room, and anon, are refused in Supabase's words.
    let (_, reply) = phx_join(&t, &format!("realtime:room:{bob}"), true, Some(&ta)).await;
    assert_eq!(reply["payload"]["status"], "error");
    assert_eq!(
        reply["payload"]["response"]["reason"],
        format!(
            "Unauthorized: You do not have permissions to read from this Channel topic: room:{bob}"
        )
    );
    let (_, reply) = phx_join(&t, &format!("realtime:room:{bob}"), true, Some(&tb)).await;
    assert_eq!(
        reply["payload"]["status"], "ok",
        "bob may read his own room: {reply}"
    );
    let (_, reply) = phx_join(&t, topic, true, None).await;
    assert_eq!(
        reply["payload"]["status"], "error",
        "anon has no policy: {reply}"
    );

    // A private broadcast reaches private members, not the public channel.
    a.send(
        json!({"topic": topic, "event":"broadcast","ref":"2","join_ref":"1",
        "payload":{"type":"broadcast","event":"secret","payload":{"n":1}}}),
    )
    .await;
    assert_eq!(next_broadcast(&mut b).await["payload"], json!({"n": 1}));
    // Presence needs its own policy.
    a.send(
        json!({"topic": topic, "event":"presence","ref":"3","join_ref":"1",
        "payload":{"type":"presence","event":"track","payload":{"at":"desk"}}}),
    )
    .await;
    let refused = loop {
        let v = a.next().await;
        if v["ref"] == "3" {
            break v;
        }
    };
    assert_eq!(refused["payload"]["status"], "error", "{refused}");

    // From the database: private to the private members, public to the public.
    t.exec("SELECT realtime.send('{\"m\":\"private\"}'::jsonb, 'db', 'room:shared', true)")
        .await;
    assert_eq!(
        next_broadcast(&mut b).await["payload"],
        json!({"m": "private"})
    );
    t.exec("SELECT realtime.send('{\"m\":\"public\"}'::jsonb, 'db', 'room:shared', false)")
        .await;
    // The public member's first broadcast is the public one: nothing private
    // reached it.
    assert_eq!(
        next_broadcast(&mut public).await["payload"],
        json!({"m": "public"})
    );

    // The policies change; a renewed token asks them again: alice loses the
    // shared room (Supabase's reason, then phx_close).
    t.exec(
        "DROP POLICY read_rooms ON realtime.messages;
         CREATE POLICY read_own ON realtime.messages FOR SELECT TO authenticated
           USING (realtime.topic() = 'room:' || auth.uid()::text);",
    )
    .await;
    a.send(
        json!({"topic": topic, "event":"access_token","ref":"9","join_ref":"1",
        "payload":{"access_token": user_token(&alice)}}),
    )
    .await;
    let mut told = None;
    loop {
        let v = a.next().await;
        match v["event"].as_str() {
            Some("system") => told = Some(v),
            Some("phx_close") => break,
            _ => {}
        }
    }
    let told = told.expect("a system message before the close");
    assert_eq!(
        told["payload"]["message"],
        "Unauthorized: You do not have permissions to read from this Channel topic: room:shared",
        "{told}"
    );
}

/// `postgres_changes` bindings to every table of a schema (`table: '*'`) or
/// of every schema (`schema: '*'`), as Supabase allows; a filter needs a table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn phoenix_bindings_to_every_table_of_a_schema() {
    let t = TestServer::start().await;
    let url = format!(
        "ws://{}/realtime/v1/websocket?apikey={}&vsn=1.0.0",
        t.addr(),
        t.server.state.jwt.api_key("service_role")
    );
    let join = |topic: &str, bindings: Value| {
        json!({"topic": topic, "event":"phx_join","ref":"1","join_ref":"1",
            "payload":{"config":{"postgres_changes": bindings}}})
    };
    let mut ws = Ws::connect_url(&url).await;
    ws.send(join(
        "realtime:public",
        json!([{"event":"INSERT","schema":"public","table":"*"}]),
    ))
    .await;
    let reply = ws.next().await;
    assert_eq!(reply["payload"]["status"], "ok", "{reply}");
    let id = reply["payload"]["response"]["postgres_changes"][0]["id"].clone();
    let mut all = Ws::connect_url(&url).await;
    all.send(join("realtime:all", json!([{"event":"*","schema":"*"}])))
        .await;
    assert_eq!(all.next().await["payload"]["status"], "ok");
    let mut bad = Ws::connect_url(&url).await;
    bad.send(join(
        "realtime:bad",
        json!([{"event":"*","schema":"public","table":"*","filter":"id=eq.1"}]),
    ))
    .await;
    let refused = bad.next().await;
    assert_eq!(refused["payload"]["status"], "error", "{refused}");

    // Two tables of the schema, one transaction each.
    bucket(&t.sql, "wild", true).await;
    t.exec("INSERT INTO public.files (bucket_id, path, name) VALUES ('wild', 'w.txt', 'w.txt')")
        .await;
    let mut tables = Vec::new();
    while tables.len() < 2 {
        let v = ws.next().await;
        if v["event"] == "postgres_changes" {
            assert_eq!(v["payload"]["ids"], json!([id]), "{v}");
            tables.push(v["payload"]["data"]["table"].as_str().unwrap().to_owned());
        }
    }
    assert_eq!(tables, ["buckets", "files"]);
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let v = all.next().await;
        if v["event"] == "postgres_changes" {
            seen.push(v["payload"]["data"]["table"].as_str().unwrap().to_owned());
        }
    }
    assert_eq!(seen, ["buckets", "files"]);
}

/// A table a Supabase migration adds to `supabase_realtime` streams like one
/// of Aether's own publication: adopted into it when first subscribed to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_in_supabase_realtime_are_streamed() {
    let t = TestServer::start().await;
    t.exec(
        "CREATE TABLE public.todos (id int PRIMARY KEY, task text);
         ALTER TABLE public.todos REPLICA IDENTITY FULL;
         ALTER PUBLICATION supabase_realtime ADD TABLE public.todos;",
    )
    .await;
    let mut ws = t.ws(Some(&service_token())).await;
    // Catalog reloads for unknown tables happen at most once a second: an
    // `unknown_table` answer is asked again until the table is adopted.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        ws.send(json!({"type":"subscription","action":"subscribe",
            "data":{"id":"todos","schema":"public","table":"todos"}}))
            .await;
        let reply = ws.next().await;
        if reply["action"] == "subscribed" {
            break;
        }
        assert_eq!(reply["code"], "unknown_table", "{reply}");
        assert!(std::time::Instant::now() < deadline, "todos adopted");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    t.exec("INSERT INTO public.todos VALUES (1, 'write docs')")
        .await;
    let c = ws.change().await;
    assert_eq!(c["table"], "todos", "{c}");
    assert_eq!(c["new"]["task"], "write docs", "{c}");
}

/// `select` on a `postgres_changes` binding: its records carry those columns
/// only; the other bindings of the same change keep every column; a column
/// the table lacks refuses the join.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_changes_select_narrows_the_records_of_its_binding() {
    let t = TestServer::start().await;
    t.exec(
        "CREATE TABLE public.cards (id int PRIMARY KEY, title text, secret_note text);
         ALTER TABLE public.cards REPLICA IDENTITY FULL;
         ALTER PUBLICATION aether_realtime ADD TABLE public.cards;",
    )
    .await;
    t.sync().await;
    let url = format!(
        "ws://{}/realtime/v1/websocket?apikey={}&vsn=1.0.0",
        t.addr(),
        t.server.state.jwt.api_key("service_role")
    );
    let mut ws = Ws::connect_url(&url).await;
    let join = |topic: &str, bindings: Value| {
        json!({"topic": topic, "event":"phx_join","ref":"1","join_ref":"1",
               "payload": {"config": {"postgres_changes": bindings}}})
    };
    ws.send(join(
        "realtime:bad",
        json!([{"event":"*","schema":"public","table":"cards","select":"id,nope"}]),
    ))
    .await;
    let reply = ws.next().await;
    assert_eq!(reply["payload"]["status"], "error", "{reply}");
    assert_eq!(
        reply["payload"]["response"]["reason"],
        "column nope does not exist"
    );
    ws.send(join(
        "realtime:cards",
        json!([{"event":"*","schema":"public","table":"cards","select":"id, title"},
               {"event":"INSERT","schema":"public","table":"cards"},
               {"event":"*","schema":"public","table":"cards"}]),
    ))
    .await;
    loop {
        let v = ws.next().await;
        if v["event"] == "system" {
            break;
        }
    }
    t.exec("INSERT INTO public.cards VALUES (1, 'a card', 'hidden from the first binding')")
        .await;
    let mut records = Vec::new();
    while records.len() < 3 {
        let v = ws.next().await;
        if v["event"] == "postgres_changes" {
            let data = &v["payload"]["data"];
            let cols: Vec<&str> = data["columns"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["name"].as_str().unwrap())
                .collect();
            records.push((data["record"].clone(), cols.join(",")));
        }
    }
    records.sort_by_key(|r| r.1.len());
    assert_eq!(
        records,
        [
            (json!({"id": 1, "title": "a card"}), "id,title".to_owned()),
            (
                json!({"id": 1, "title": "a card", "secret_note": "hidden from the first binding"}),
                "id,title,secret_note".to_owned()
            ),
            // The same binding but for `select`: a binding of its own.
            (
                json!({"id": 1, "title": "a card", "secret_note": "hidden from the first binding"}),
                "id,title,secret_note".to_owned()
            )
        ]
    );
}

/// Broadcast replay reads the change log: a connection may ask for ten a
/// minute; the eleventh join is answered but its replay is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_replays_are_limited_per_connection() {
    let t = TestServer::start().await;
    t.exec(
        "CREATE POLICY read_replay ON realtime.messages FOR SELECT TO authenticated
           USING (realtime.topic() = 'room:replay');",
    )
    .await;
    let user = t.new_user().await;
    let url = format!(
        "ws://{}/realtime/v1/websocket?apikey={}&vsn=1.0.0",
        t.addr(),
        t.server.state.jwt.api_key("anon")
    );
    let mut ws = Ws::connect_url(&url).await;
    let topic = "realtime:room:replay";
    let mut refused = Vec::new();
    for i in 0..11 {
        let r = (i * 2 + 1).to_string();
        ws.send(
            json!({"topic": topic, "event": "phx_join", "ref": r, "join_ref": r,
            "payload": {"access_token": user_token(&user),
                        "config": {"private": true, "broadcast": {"replay": {"since": 0}}}}}),
        )
        .await;
        // Up to the join's reply, then whatever the join sends after it,
        // until the leave's reply.
        let leave = (i * 2 + 2).to_string();
        let mut left = false;
        let mut sent_leave = false;
        while !left {
            let v = ws.next().await;
            if v["event"] == "phx_reply" && v["ref"] == r.as_str() {
                assert_eq!(v["payload"]["status"], "ok", "{v}");
                ws.send(json!({"topic": topic, "event": "phx_leave", "ref": leave,
                    "join_ref": r, "payload": {}}))
                    .await;
                sent_leave = true;
            } else if v["event"] == "system" && v["payload"]["status"] == "error" {
                refused.push(i);
            } else if sent_leave && v["event"] == "phx_reply" && v["ref"] == leave.as_str() {
                left = true;
            }
        }
    }
    assert_eq!(refused, [10]);
}
