//! Cluster mode: three `aether` processes on one PostgreSQL and a real
//! `nats-server` with JetStream. The leader is SIGKILLed mid-stream; NATS is
//! killed and restarted under load.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)] // a test may panic; its helpers are `pub` for the other test files

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aether_changelog::natsd::NatsServer;
use common::*;
use serde_json::{Value, json};

struct Node {
    name: String,
    child: Option<Child>,
    addr: SocketAddr,
}

impl Node {
    fn spawn(db: &TestDb, nats: &NatsServer, name: &str) -> Node {
        let port = free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_aether"))
            .env("DATABASE_URL", &db.url)
            .env("WS_HOST", "127.0.0.1")
            .env("WS_PORT", port.to_string())
            .env("REPLICATION_SLOT", &db.name)
            .env("JWT_SECRET", SECRET)
            .env("DATA_DIR", db.data_dir.join(name))
            .env("NATS_URL", nats.url())
            .env("NODE_NAME", name)
            .env(
                "RUST_LOG",
                std::env::var("AETHER_CLUSTER_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::null())
            .spawn()
            .expect("aether binary starts");
        Node {
            name: name.into(),
            child: Some(child),
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
        }
    }

    fn sigkill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    async fn status(&self) -> Value {
        reqwest::get(format!("http://{}/ws/status", self.addr))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    async fn health(&self) -> Option<u16> {
        reqwest::get(format!("http://{}/health", self.addr))
            .await
            .ok()
            .map(|r| r.status().as_u16())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.sigkill();
    }
}

/// Waits until `check` holds, polling every 50 ms, for at most `limit`.
async fn until<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn leader_of(node: &Node) -> Option<String> {
    node.status().await["cluster"]["leader"]
        .as_str()
        .map(str::to_owned)
}

/// Three healthy nodes; `n1` leads.
async fn cluster(db: &TestDb, nats: &NatsServer) -> Vec<Node> {
    let n1 = Node::spawn(db, nats, "n1");
    wait_healthy(n1.addr).await;
    until(WAIT, "n1 to lead", || async {
        leader_of(&n1).await.as_deref() == Some("n1")
    })
    .await;
    let nodes = vec![n1, Node::spawn(db, nats, "n2"), Node::spawn(db, nats, "n3")];
    for n in &nodes {
        wait_healthy(n.addr).await;
    }
    until(WAIT, "three members", || async {
        nodes[0].status().await["cluster"]["nodes"] == json!(["n1", "n2", "n3"])
    })
    .await;
    nodes
}

fn name_of(change: &Value) -> String {
    change["new"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// Reads changes until one named `last` (inclusive).
async fn read_until(ws: &mut Ws, last: &str) -> Vec<Value> {
    let mut got = Vec::new();
    loop {
        let c = ws.change().await;
        let done = name_of(&c) == last;
        got.push(c);
        if done {
            return got;
        }
    }
}

fn names(changes: &[Value]) -> Vec<String> {
    changes.iter().map(name_of).collect()
}

fn numbered(range: std::ops::RangeInclusive<u32>) -> Vec<String> {
    range.map(|i| format!("r{i:03}")).collect()
}

async fn insert(sql: &tokio_postgres::Client, name: &str) {
    sql.batch_execute(&format!(
        "INSERT INTO public.files (bucket_id, path, name) VALUES ('pub', '{name}', '{name}')"
    ))
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_killed_mid_stream_loses_and_doubles_nothing_on_any_node() {
    let nats = NatsServer::start();
    let db = TestDb::new().await;
    let mut nodes = cluster(&db, &nats).await;
    let sql = db.client().await;
    bucket(&sql, "pub", true).await;
    let token = service_token();
    let mut subs = Vec::new();
    for n in &nodes {
        let mut ws = Ws::connect(n.addr, Some(&token)).await;
        ws.subscribe("s", json!({"table": "files"})).await;
        subs.push(ws);
    }

    // The survivors' subscribers read as rows arrive, noting when.
    let mut readers = Vec::new();
    for mut ws in subs.drain(1..) {
        readers.push(tokio::spawn(async move {
            let mut got = Vec::new();
            loop {
                let c = ws.change().await;
                let name = name_of(&c);
                got.push((name.clone(), Instant::now()));
                if name == "end" {
                    return (ws, got);
                }
            }
        }));
    }
    // A writer commits numbered rows, one per transaction.
    let writer = {
        let sql = db.client().await;
        tokio::spawn(async move {
            let mut committed = Vec::new();
            for i in 1..=60u32 {
                insert(&sql, &format!("r{i:03}")).await;
                committed.push(Instant::now());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            committed
        })
    };
    // The leader's subscriber has seen a third: the leader dies mid-stream.
    let mut before = Vec::new();
    while before.len() < 20 {
        before.push(subs[0].change().await);
    }
    let killed_at = Instant::now();
    nodes[0].sigkill();
    let committed = writer.await.unwrap();
    insert(&sql, "end").await;

    // Every row once, in order, on the surviving nodes; the first row
    // committed after the kill arrived within 5 s of its commit (the failover
    // included).
    let first_after = committed
        .iter()
        .position(|t| *t > killed_at)
        .expect("rows were committed after the kill");
    let mut survivors = Vec::new();
    for r in readers {
        let (ws, got) = r.await.unwrap();
        let mut want = numbered(1..=60);
        want.push("end".into());
        assert_eq!(got.iter().map(|g| g.0.clone()).collect::<Vec<_>>(), want);
        let took = got[first_after].1.duration_since(committed[first_after]);
        assert!(
            took < Duration::from_secs(5),
            "row {} committed after the kill arrived after {took:?}",
            first_after + 1
        );
        survivors.push(ws);
    }
    // The killed node's subscriber resumes on another node with `since`.
    let last_id = before.last().unwrap()["id"].as_str().unwrap().to_owned();
    let mut again = Ws::connect(nodes[2].addr, Some(&token)).await;
    again
        .subscribe("s", json!({"table": "files", "since": last_id}))
        .await;
    let missed = read_until(&mut again, "end").await;
    let mut want = numbered(21..=60);
    want.push("end".into());
    assert_eq!(names(&missed), want, "exactly what it missed");

    // A new leader took over; the dead node left the members.
    until(WAIT, "a new leader", || async {
        matches!(leader_of(&nodes[1]).await.as_deref(), Some("n2" | "n3"))
    })
    .await;
    let status = nodes[1].status().await;
    assert_eq!(status["cluster"]["nodes"], json!(["n2", "n3"]), "{status}");
    // Live again everywhere, nothing doubled since.
    insert(&sql, "live").await;
    for ws in survivors.iter_mut().chain([&mut again]) {
        assert_eq!(name_of(&ws.change().await), "live");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restarted_under_load_makes_nodes_unhealthy_then_loses_nothing() {
    let mut nats = NatsServer::start();
    let db = TestDb::new().await;
    let nodes = cluster(&db, &nats).await;
    let sql = db.client().await;
    bucket(&sql, "pub", true).await;
    let token = service_token();
    let mut ws = Ws::connect(nodes[1].addr, Some(&token)).await;
    ws.subscribe("s", json!({"table": "files"})).await;
    for i in 1..=10 {
        insert(&sql, &format!("r{i:03}")).await;
    }
    let seen = read_until(&mut ws, "r010").await;
    assert_eq!(names(&seen), numbered(1..=10));
    let last_id = seen[9]["id"].as_str().unwrap().to_owned();

    nats.kill();
    // Writes go on in PostgreSQL while NATS is gone.
    for i in 11..=30 {
        insert(&sql, &format!("r{i:03}")).await;
    }
    for n in &nodes {
        until(WAIT, "503 while NATS is gone", || async {
            n.health().await == Some(503)
        })
        .await;
    }
    // Cut off for long enough, a node sends its clients elsewhere (1001).
    let (code, _) = ws.until_close().await;
    assert_eq!(
        code,
        Some(1001),
        "a node without its change stream closes its sockets"
    );
    nats.restart();
    for n in &nodes {
        until(Duration::from_secs(30), "healthy again", || async {
            n.health().await == Some(200)
        })
        .await;
    }
    // The client comes back and resumes: nothing written meanwhile is lost.
    let mut ws = Ws::connect(nodes[1].addr, Some(&token)).await;
    ws.subscribe("s", json!({"table": "files", "since": last_id}))
        .await;
    insert(&sql, "end").await;
    let mut want = numbered(11..=30);
    want.push("end".into());
    assert_eq!(names(&read_until(&mut ws, "end").await), want);
    let _ = &nodes[0].name;
}

/// Frames of `ws` until `n` of them satisfy `keep` (others are dropped).
async fn collect(ws: &mut Ws, n: usize, keep: impl Fn(&Value) -> bool) -> Vec<Value> {
    let mut got = Vec::new();
    while got.len() < n {
        let v = ws.next().await;
        if keep(&v) {
            got.push(v);
        }
    }
    got
}

/// The user id (`sub`) a token names.
fn res_user_id(token: &str) -> String {
    keys().verify(token).unwrap().user_id.unwrap()
}

fn is_message(v: &Value) -> bool {
    v["type"] == "message" && v["action"] == "send"
}

/// (client, content, server_sequence) of relayed messages.
fn relayed(frames: &[Value]) -> Vec<(String, String, u64)> {
    frames
        .iter()
        .map(|v| {
            (
                v["data"]["client_id"].as_str().unwrap_or("-").to_owned(),
                v["data"]["content"].as_str().unwrap_or_default().to_owned(),
                v["data"]["metadata"]["server_sequence"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_broadcasts_and_revocations_cross_nodes() {
    let nats = NatsServer::start();
    let db = TestDb::new().await;
    let nodes = cluster(&db, &nats).await;
    let url = |n: &Node, q: &str| format!("ws://{}/ws?{q}", n.addr);

    // Aether channel members on each node; joins are announced everywhere.
    let mut a = Ws::connect_url(&url(&nodes[0], "client_id=a&channel=room")).await;
    assert_eq!(a.next().await["data"]["client_id"], "a");
    let mut b = Ws::connect_url(&url(&nodes[1], "client_id=b&channel=room")).await;
    assert_eq!(b.next().await["data"]["client_id"], "b");
    let mut c = Ws::connect_url(&url(&nodes[2], "client_id=c&channel=room")).await;
    assert_eq!(c.next().await["data"]["client_id"], "c");
    let joins = collect(&mut a, 2, |v| v["type"] == "connection").await;
    let mut joined: Vec<_> = joins
        .iter()
        .map(|v| v["data"]["client_id"].as_str().unwrap().to_owned())
        .collect();
    joined.sort();
    assert_eq!(
        joined,
        ["b", "c"],
        "a on n1 heard of the joins on n2 and n3"
    );

    // Messages sent on different nodes: one order and one numbering everywhere.
    let send = |text: &str, seq: i64| {
        json!({"type":"message","action":"send","data":{"channel":"room","content":text,
            "metadata":{"sequence":seq}}})
    };
    a.send(send("one", 1)).await;
    let first = collect(&mut c, 1, is_message).await;
    assert_eq!(relayed(&first), [("a".to_owned(), "one".to_owned(), 1)]);
    b.send(send("two", 1)).await;
    c.send(send("three", 1)).await;
    let mut orders = Vec::new();
    for (i, ws) in [&mut a, &mut b, &mut c].into_iter().enumerate() {
        // c already read the first message.
        let mut got = collect(ws, if i == 2 { 2 } else { 3 }, is_message).await;
        if i == 2 {
            got.insert(0, first[0].clone());
        }
        orders.push(relayed(&got));
    }
    assert_eq!(orders[0], orders[1], "n1 and n2 saw one order");
    assert_eq!(orders[0], orders[2], "n1 and n3 saw one order");
    assert_eq!(
        orders[0].iter().map(|m| m.2).collect::<Vec<_>>(),
        [1, 2, 3],
        "numbered without gaps across nodes: {:?}",
        orders[0]
    );

    // A retry of a's message through another node is relayed once.
    let mut a2 = Ws::connect_url(&url(&nodes[2], "client_id=a&channel=room")).await;
    assert_eq!(a2.next().await["data"]["client_id"], "a");
    a2.send(
        json!({"type":"message","action":"retry","data":{"channel":"room","content":"one",
        "metadata":{"sequence":1}}}),
    )
    .await;
    let ack = collect(&mut a2, 1, |v| v["action"] == "ack").await;
    assert_eq!(ack[0]["data"]["duplicate"], true, "{}", ack[0]);

    // An operator's broadcast on n1 reaches the channel's members on n2 and n3.
    let mut op = Ws::connect(nodes[0].addr, Some(&service_token())).await;
    op.send(json!({"type":"system","action":"broadcast","data":{"message":"hello all","severity":"info","channel":"room"}}))
        .await;
    for ws in [&mut b, &mut c] {
        let got = collect(ws, 1, |v| {
            v["type"] == "system" && v["action"] == "broadcast"
        })
        .await;
        assert_eq!(got[0]["data"]["message"], "hello all");
    }

    // A Supabase Realtime broadcast on n2 reaches a member on n3.
    let anon = keys().api_key("anon");
    let phx = |n: &Node| {
        format!(
            "ws://{}/realtime/v1/websocket?apikey={anon}&vsn=1.0.0",
            n.addr
        )
    };
    let join = json!({"topic":"realtime:game","event":"phx_join","ref":"1","join_ref":"1",
        "payload":{"config":{"broadcast":{"ack":true,"self":false},"presence":{"key":""},"postgres_changes":[]}}});
    let mut p3 = Ws::connect_url(&phx(&nodes[2])).await;
    p3.send(join.clone()).await;
    assert_eq!(p3.next().await["payload"]["status"], "ok");
    let mut p2 = Ws::connect_url(&phx(&nodes[1])).await;
    p2.send(join).await;
    assert_eq!(p2.next().await["payload"]["status"], "ok");
    p2.send(
        json!({"topic":"realtime:game","event":"broadcast","ref":"2","join_ref":"1",
        "payload":{"type":"broadcast","event":"move","payload":{"x":1}}}),
    )
    .await;
    let got = collect(&mut p3, 1, |v| v["event"] == "broadcast").await;
    assert_eq!(got[0]["payload"]["payload"], json!({"x": 1}), "{}", got[0]);

    // A session signed out on n1 closes its sockets on n2 and n3.
    let res = reqwest::Client::new()
        .post(format!("http://{}/auth/sign-up", nodes[0].addr))
        .json(&json!({"email": "x@example.com", "password": "correct horse 1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let token = res.json::<Value>().await.unwrap()["session"]["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let user_id = res_user_id(&token);
    // A KingShare notification for the user, sent through n1, reaches its
    // KingShare connection on n3.
    let mut ks = Ws::connect_url(&format!(
        "ws://{}/ws?protocol=kingshare&token={token}",
        nodes[2].addr
    ))
    .await;
    ks.skip_kingshare = false;
    let res = reqwest::Client::new()
        .post(format!("http://{}/api/v1/ws/notify", nodes[0].addr))
        .bearer_auth(service_token())
        .json(&json!({"message": "maintenance", "level": "Info", "user_id": user_id}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let got = collect(&mut ks, 1, |v| v["type"] == "SystemNotification").await;
    assert_eq!(got[0]["data"]["message"], "maintenance", "{}", got[0]);

    let mut on2 = Ws::connect(nodes[1].addr, Some(&token)).await;
    let mut on3 = Ws::connect(nodes[2].addr, Some(&token)).await;
    let res = reqwest::Client::new()
        .post(format!("http://{}/auth/sign-out", nodes[0].addr))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    for ws in [&mut on2, &mut on3] {
        let (close, frames) = ws.until_close().await;
        assert_eq!(close, Some(4001), "{frames:?}");
    }
}

/// A Phoenix socket on `node` joined to `topic` with presence key `key`; its
/// `presence_state` is returned too.
async fn presence_member(node: &Node, topic: &str, key: &str) -> (Ws, Value) {
    let url = format!(
        "ws://{}/realtime/v1/websocket?apikey={}&vsn=1.0.0",
        node.addr,
        keys().api_key("anon")
    );
    let mut ws = Ws::connect_url(&url).await;
    ws.send(json!({"topic": topic, "event":"phx_join","ref":"1","join_ref":"1",
        "payload":{"config":{"broadcast":{"self":false},"presence":{"key":key},"postgres_changes":[]}}}))
        .await;
    assert_eq!(ws.next().await["payload"]["status"], "ok");
    let state = collect(&mut ws, 1, |v| v["event"] == "presence_state").await;
    (ws, state[0]["payload"].clone())
}

async fn track(ws: &mut Ws, topic: &str, meta: Value) {
    ws.send(
        json!({"topic": topic, "event":"presence","ref":"2","join_ref":"1",
        "payload":{"type":"presence","event":"track","payload": meta}}),
    )
    .await;
}

fn diff_keys(v: &Value, side: &str) -> Vec<String> {
    let mut keys: Vec<String> = v["payload"][side]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    keys.sort();
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_crosses_nodes_and_a_dead_nodes_members_leave() {
    let nats = NatsServer::start();
    let db = TestDb::new().await;
    let mut nodes = cluster(&db, &nats).await;
    let topic = "realtime:lobby";
    let (mut alice, _) = presence_member(&nodes[0], topic, "alice").await;
    let (mut bob, _) = presence_member(&nodes[1], topic, "bob").await;
    track(&mut alice, topic, json!({"name": "alice"})).await;
    let d = collect(&mut bob, 1, |v| v["event"] == "presence_diff").await;
    assert_eq!(diff_keys(&d[0], "joins"), ["alice"], "{}", d[0]);
    track(&mut bob, topic, json!({"name": "bob"})).await;
    // Alice hears her own join, then bob's from n2.
    let d = collect(&mut alice, 2, |v| v["event"] == "presence_diff").await;
    assert_eq!(diff_keys(&d[1], "joins"), ["bob"], "{}", d[1]);

    // A member on n3 that joins later sees both in its presence_state; then
    // it tracks, and n3 dies.
    let (mut carol, state) = presence_member(&nodes[2], topic, "carol").await;
    let mut present: Vec<String> = state.as_object().unwrap().keys().cloned().collect();
    present.sort();
    assert_eq!(present, ["alice", "bob"], "{state}");
    track(&mut carol, topic, json!({"name": "carol"})).await;
    // (bob's own join comes first.)
    let d = collect(&mut bob, 1, |v| {
        v["event"] == "presence_diff" && diff_keys(v, "joins") != ["bob"]
    })
    .await;
    assert_eq!(diff_keys(&d[0], "joins"), ["carol"], "{}", d[0]);
    nodes[2].sigkill();
    let d = collect(&mut alice, 1, |v| {
        v["event"] == "presence_diff" && !diff_keys(v, "leaves").is_empty()
    })
    .await;
    assert_eq!(
        diff_keys(&d[0], "leaves"),
        ["carol"],
        "a dead node's members leave: {}",
        d[0]
    );

    // A member leaving n2 leaves on n1 too.
    bob.close().await;
    let d = collect(&mut alice, 1, |v| {
        v["event"] == "presence_diff" && !diff_keys(v, "leaves").is_empty()
    })
    .await;
    assert_eq!(diff_keys(&d[0], "leaves"), ["bob"]);
}

async fn active(node: &Node) -> u64 {
    node.status().await["connections"]["active"]
        .as_u64()
        .unwrap_or(0)
}

/// The seed's per-user connection limit (`RATE_LIMIT_CONNECTIONS`, 10) holds
/// across the cluster: a user's connections on other nodes count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_connection_limit_holds_across_nodes() {
    let nats = NatsServer::start();
    let db = TestDb::new().await;
    let nodes = cluster(&db, &nats).await;
    let sql = db.client().await;
    let uid = user(&sql, "limit@example.com").await;
    let token = user_token(&uid);
    let mut open = Vec::new();
    for (i, n) in [4, 3, 3].into_iter().enumerate() {
        for _ in 0..n {
            open.push(Ws::connect(nodes[i].addr, Some(&token)).await);
        }
        let node = &nodes[i];
        until(WAIT, "connections admitted", || async move {
            active(node).await == n
        })
        .await;
    }
    // The 11th, on a node holding 3 of them: refused once n3 has heard of the
    // others (an admitted one while the news travels is closed and tried again).
    let mut refused = None;
    for _ in 0..20 {
        let mut ws = Ws::connect(nodes[2].addr, Some(&token)).await;
        match tokio::time::timeout(Duration::from_secs(2), ws.next_or_close()).await {
            Ok(Ok(v)) if v["code"] == "connection_limit" => {
                refused = Some(v);
                break;
            }
            Ok(other) => panic!("unexpected: {other:?}"),
            Err(_) => {
                ws.close().await;
                until(WAIT, "the extra connection gone", || async {
                    active(&nodes[2]).await == 3
                })
                .await;
            }
        }
    }
    let refused = refused.expect("the 11th connection is refused");
    assert!(
        refused["message"].as_str().unwrap().contains("this user"),
        "{refused}"
    );
    // One closed on n1: there is room on n3.
    open.remove(0).close().await;
    until(WAIT, "n1 down to 3", || async {
        active(&nodes[0]).await == 3
    })
    .await;
    let mut admitted = false;
    for _ in 0..20 {
        let mut ws = Ws::connect(nodes[2].addr, Some(&token)).await;
        match tokio::time::timeout(Duration::from_secs(1), ws.next_or_close()).await {
            Err(_) => {
                admitted = true;
                break;
            }
            Ok(Ok(v)) if v["code"] == "connection_limit" => {}
            Ok(other) => panic!("unexpected: {other:?}"),
        }
    }
    assert!(
        admitted,
        "room again once a connection on another node closed"
    );
}

/// The load balancer of `docker-compose.cluster.yml` (HAProxy with
/// `deploy/haproxy.cfg`, servers pointed at local nodes): WebSockets pass
/// through it, and a dead node leaves its rotation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_passes_websockets_and_drops_a_dead_node() {
    let haproxy = ["/usr/sbin/haproxy", "/usr/bin/haproxy"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("HAProxy is needed (.ci/run installs Debian's haproxy)");
    let nats = NatsServer::start();
    let db = TestDb::new().await;
    let mut nodes = cluster(&db, &nats).await;
    let lb_port = free_port();
    let mut cfg = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/haproxy.cfg"))
            .unwrap()
            .replace("bind :8080", &format!("bind 127.0.0.1:{lb_port}"))
            .replace(" resolvers docker", "")
        // This machine allows 20,000 open files; HAProxy wants twice maxconn.
        .replace("maxconn 20000", "maxconn 4000");
    cfg.truncate(cfg.find("resolvers docker").unwrap_or(cfg.len()));
    for (i, n) in nodes.iter().enumerate() {
        cfg = cfg.replace(
            &format!("aether{0}:8080", i + 1),
            &format!("127.0.0.1:{}", n.addr.port()),
        );
    }
    let path = db.data_dir.join("haproxy.cfg");
    std::fs::create_dir_all(&db.data_dir).unwrap();
    std::fs::write(&path, cfg).unwrap();
    let mut lb = Command::new(haproxy)
        .arg("-db")
        .arg("-f")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lb_addr: SocketAddr = format!("127.0.0.1:{lb_port}").parse().unwrap();
    let result = async {
        wait_healthy(lb_addr).await;
        let sql = db.client().await;
        bucket(&sql, "pub", true).await;
        let mut ws = Ws::connect(lb_addr, Some(&service_token())).await;
        ws.subscribe("s", json!({"table": "files"})).await;
        insert(&sql, "through").await;
        assert_eq!(name_of(&ws.change().await), "through");
        // A node dies: after HAProxy's checks, every request finds a live one.
        nodes[2].sigkill();
        let url = format!("http://{lb_addr}/health");
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut in_a_row = 0;
        while in_a_row < 10 {
            assert!(
                Instant::now() < deadline,
                "ten healthy answers in a row through HAProxy"
            );
            if reqwest_lite(&url).await.ok() == Some(200) {
                in_a_row += 1;
            } else {
                in_a_row = 0;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    .await;
    let _ = lb.kill();
    let _ = lb.wait();
    result
}
