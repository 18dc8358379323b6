//! The HTTP edge over real sockets: slowloris connections are timed out while
//! other addresses are served, idle keep-alive connections close but WebSockets
//! do not, per-address connection caps and trusted proxies, `accept` running out
//! of descriptors, and over-limit uploads answered at once instead of read to
//! their end. Client addresses are loopback aliases (127.0.0.2, 127.0.0.3) of
//! the same machine.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)] // a test may panic; its helpers are `pub` for the other test files

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

const MIB: u64 = 1024 * 1024;

/// A connection to `addr` from the loopback address `src`.
async fn connect_from(src: [u8; 4], addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((src, 0)))?;
    socket.connect(addr).await
}

#[derive(Debug)]
struct Answer {
    status: u16,
    /// Lower-case names.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|_| panic!("JSON body: {}", String::from_utf8_lossy(&self.body)))
    }
}

/// Reads one response: its head, then a `Content-Length` body.
async fn read_answer(r: &mut (impl AsyncRead + Unpin)) -> std::io::Result<Answer> {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = r.read(&mut tmp).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&tmp[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = buf[head_end..].to_vec();
    while body.len() < len {
        let n = r.read(&mut tmp).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        body.extend_from_slice(&tmp[..n]);
    }
    body.truncate(len);
    Ok(Answer {
        status,
        headers,
        body,
    })
}

/// Sends `request` from `src` and reads the answer.
async fn request_from(src: [u8; 4], addr: SocketAddr, request: &str) -> Answer {
    let mut s = connect_from(src, addr).await.expect("connects");
    s.write_all(request.as_bytes()).await.unwrap();
    tokio::time::timeout(WAIT, read_answer(&mut s))
        .await
        .expect("an answer within the timeout")
        .expect("an answer")
}

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: aether\r\nConnection: close\r\n\r\n")
}

/// Waits until the server ends the connection (EOF or reset); returns when.
async fn until_closed(s: &mut TcpStream) -> Instant {
    let mut tmp = [0u8; 4096];
    tokio::time::timeout(WAIT * 2, async {
        loop {
            match s.read(&mut tmp).await {
                Ok(0) | Err(_) => return Instant::now(),
                Ok(_) => {}
            }
        }
    })
    .await
    .expect("the server closes the connection within the timeout")
}

/// Waits (with a timeout) until the server counts `cond` of its open connections.
async fn wait_open(t: &TestServer, what: &str, cond: impl Fn(usize) -> bool) -> usize {
    tokio::time::timeout(WAIT * 2, async {
        loop {
            let n = t.server.state.http_connections.open();
            if cond(n) {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "timed out waiting for {what} ({} open)",
            t.server.state.http_connections.open()
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_connections_are_timed_out_while_other_addresses_are_served() {
    const CONNECTIONS: usize = 4000;
    // Long enough for this shared 2-core machine to open all 4,000 before the
    // first one times out (it takes about 2 s in a debug build).
    let header_timeout = Duration::from_secs(4);
    let t = TestServer::start_with(|c| {
        c.http_header_timeout = Some(header_timeout);
        // The per-address cap would refuse most of them at once: what is tested
        // here is that the ones let in do not stay.
        c.http_max_connections_per_addr = 0;
    })
    .await;
    let addr = t.addr();

    // 4,000 connections from 127.0.0.1, each stopping in the middle of a head.
    let opened = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let gate = Arc::new(tokio::sync::Semaphore::new(500));
    for _ in 0..CONNECTIONS {
        let gate = Arc::clone(&gate);
        tasks.spawn(async move {
            let _permit = gate.acquire().await.unwrap();
            let mut s = connect_from([127, 0, 0, 1], addr).await.expect("connects");
            s.write_all(b"GET /health HTTP/1.1\r\nHost: aether\r\nX-Slow: ")
                .await
                .unwrap();
            (Instant::now(), s)
        });
    }
    let mut socks = Vec::with_capacity(CONNECTIONS);
    while let Some(r) = tasks.join_next().await {
        socks.push(r.unwrap());
    }
    let open_took = opened.elapsed();
    // All of them are open on the server at once...
    let peak = wait_open(&t, "the half-open connections", |n| n >= CONNECTIONS).await;

    // ...and another address is served meanwhile.
    let health = request_from([127, 0, 0, 2], addr, &get("/health")).await;
    assert_eq!(health.status, 200, "{health:?}");
    let health_at = opened.elapsed();
    assert!(
        t.server.state.http_connections.open() >= CONNECTIONS - 1,
        "they were still open while /health was answered"
    );

    // Every one of them is closed by the server, not before the header timeout.
    let mut waits = tokio::task::JoinSet::new();
    for (connected, mut s) in socks {
        waits.spawn(async move { until_closed(&mut s).await.duration_since(connected) });
    }
    let mut lived = Vec::with_capacity(CONNECTIONS);
    while let Some(r) = waits.join_next().await {
        lived.push(r.unwrap());
    }
    lived.sort();
    eprintln!(
        "opened {CONNECTIONS} in {open_took:?} ({peak} open on the server); /health answered \
         at {health_at:?}; closed after {:?} (first) to {:?} (last)",
        lived[0],
        lived[CONNECTIONS - 1]
    );
    assert!(
        lived[0] >= header_timeout / 2,
        "closed early: {:?}",
        lived[0]
    );
    wait_open(&t, "the server to count them closed", |n| n == 0).await;
    // And the first address is served again.
    let again = request_from([127, 0, 0, 1], addr, &get("/health")).await;
    assert_eq!(again.status, 200);
    t.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_close_but_websockets_stay() {
    let t = TestServer::start_with(|c| {
        c.http_header_timeout = Some(Duration::from_secs(1));
        c.http_idle_timeout = Some(Duration::from_secs(3));
        c.ws_ping_interval = Duration::from_secs(1);
    })
    .await;
    let addr = t.addr();

    // A keep-alive connection that answered once is closed after the idle
    // timeout (not the shorter header timeout: no request was under way).
    let mut s = connect_from([127, 0, 0, 1], addr).await.unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: aether\r\n\r\n")
        .await
        .unwrap();
    let a = tokio::time::timeout(WAIT, read_answer(&mut s))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(a.status, 200);
    let answered = Instant::now();
    let idle = until_closed(&mut s).await.duration_since(answered);
    assert!(idle >= Duration::from_secs(2), "closed after {idle:?}");

    // A connection that starts a head and stops gets the header timeout.
    let mut s = connect_from([127, 0, 0, 1], addr).await.unwrap();
    let started = Instant::now();
    s.write_all(b"GET /health HTTP/1.1\r\n").await.unwrap();
    let waited = until_closed(&mut s).await.duration_since(started);
    assert!(
        waited >= Duration::from_millis(500),
        "closed after {waited:?}"
    );

    // An upgraded WebSocket outlives both timeouts: five server pings a second
    // apart, then it still answers a frame.
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
        .await
        .expect("websocket connects");
    let opened = Instant::now();
    let mut pings = 0;
    while pings < 5 {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a frame")
        {
            Some(Ok(Message::Ping(_))) => pings += 1,
            Some(Ok(_)) => {}
            other => panic!("websocket ended: {other:?}"),
        }
    }
    assert!(opened.elapsed() > Duration::from_secs(3));
    ws.send(Message::Text("not json".into())).await.unwrap();
    loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a reply")
        {
            Some(Ok(Message::Text(_))) => break,
            Some(Ok(_)) => {}
            other => panic!("websocket ended: {other:?}"),
        }
    }
    t.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_per_address_cap_are_refused_while_others_are_served() {
    const CAP: usize = 20;
    let t = TestServer::start_with(|c| {
        c.http_max_connections_per_addr = CAP;
        c.http_header_timeout = Some(Duration::from_secs(60));
    })
    .await;
    let addr = t.addr();

    // CAP keep-alive connections from 127.0.0.1, each served once (so admitted).
    let mut held = Vec::new();
    for _ in 0..CAP {
        let mut s = connect_from([127, 0, 0, 1], addr).await.unwrap();
        s.write_all(b"GET /health HTTP/1.1\r\nHost: aether\r\n\r\n")
            .await
            .unwrap();
        let a = tokio::time::timeout(WAIT, read_answer(&mut s))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(a.status, 200);
        held.push(s);
    }

    // One more from the same address is answered 429 without being read, and closed.
    let mut over = connect_from([127, 0, 0, 1], addr).await.unwrap();
    let a = tokio::time::timeout(WAIT, read_answer(&mut over))
        .await
        .unwrap()
        .expect("the refusal");
    assert_eq!(a.status, 429, "{a:?}");
    assert_eq!(a.json()["error"]["code"], "rate-limit/connections");
    assert_eq!(a.json()["error"]["status"], 429);
    assert_eq!(a.header("connection"), Some("close"));
    until_closed(&mut over).await;

    // Another address is served.
    let a = request_from([127, 0, 0, 2], addr, &get("/health")).await;
    assert_eq!(a.status, 200);

    // A place given back is usable again (once the server has seen the close).
    drop(held.pop());
    tokio::time::timeout(WAIT, async {
        loop {
            let mut s = connect_from([127, 0, 0, 1], addr).await.unwrap();
            s.write_all(get("/health").as_bytes()).await.unwrap();
            if let Ok(a) = read_answer(&mut s).await
                && a.status == 200
            {
                return;
            }
        }
    })
    .await
    .expect("a connection from the first address again");
    t.server.stop().await;
}

fn sign_in_request(forwarded_for: &str) -> String {
    let body = json!({"email": "nobody@example.com", "password": "wrong password 1"}).to_string();
    format!(
        "POST /auth/sign-in HTTP/1.1\r\nHost: aether\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nX-Forwarded-For: {forwarded_for}\r\n\r\n{body}",
        body.len()
    )
}

/// A WebSocket to `/ws` from `src`, claiming `forwarded_for`; the close code it
/// ends with, or `None` if it is still open after the first frame.
async fn ws_from(src: [u8; 4], addr: SocketAddr, forwarded_for: &str) -> Option<u16> {
    let stream = connect_from(src, addr).await.unwrap();
    let mut req = format!("ws://{addr}/ws").into_client_request().unwrap();
    req.headers_mut()
        .insert("x-forwarded-for", forwarded_for.parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::client_async(req, stream)
        .await
        .expect("websocket connects");
    // Refused connections get an error frame and a close; admitted ones answer.
    ws.send(Message::Text("not json".into())).await.unwrap();
    loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a frame")
        {
            Some(Ok(Message::Close(c))) => return c.map(|c| u16::from(c.code)),
            Some(Ok(Message::Text(t))) if !t.to_ascii_lowercase().contains("connection_limit") => {
                // Keep it open for the rest of the test.
                tokio::spawn(async move { while ws.next().await.is_some() {} });
                return None;
            }
            Some(Ok(_)) => {}
            None | Some(Err(_)) => return Some(0),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_trusted_proxy_limits_count_the_forwarded_client() {
    let proxy = [127, 0, 0, 3];
    let t = TestServer::start_with(|c| {
        c.trusted_proxies = aether_http::edge::TrustedProxies::parse("127.0.0.3").unwrap();
        c.http_max_connections_per_addr = 5;
        c.http_header_timeout = Some(Duration::from_secs(60));
        c.rate_limit_auth_per_min = 2;
        c.rate_limit_connections = 1;
    })
    .await;
    let addr = t.addr();

    // The proxy is not capped per address: it carries many clients.
    let mut held = Vec::new();
    for _ in 0..8 {
        let mut s = connect_from(proxy, addr).await.unwrap();
        s.write_all(b"GET /health HTTP/1.1\r\nHost: aether\r\n\r\n")
            .await
            .unwrap();
        let a = tokio::time::timeout(WAIT, read_answer(&mut s))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(a.status, 200);
        held.push(s);
    }

    // Auth rate limit: per forwarded client behind the proxy.
    let status = |a: Answer| a.status;
    for _ in 0..2 {
        let a = request_from(proxy, addr, &sign_in_request("198.51.100.7, 203.0.113.1")).await;
        assert_eq!(status(a), 401);
    }
    let a = request_from(proxy, addr, &sign_in_request("203.0.113.1")).await;
    assert_eq!(a.status, 429, "{a:?}");
    assert_eq!(a.json()["error"]["code"], "rate-limit/exceeded");
    let a = request_from(proxy, addr, &sign_in_request("203.0.113.2")).await;
    assert_eq!(
        a.status, 401,
        "another client behind the proxy has its own budget"
    );
    // From an untrusted peer the header is ignored: it spends 127.0.0.1's budget,
    // not 203.0.113.2's.
    for _ in 0..2 {
        let a = request_from([127, 0, 0, 1], addr, &sign_in_request("203.0.113.2")).await;
        assert_eq!(a.status, 401);
    }
    let a = request_from([127, 0, 0, 1], addr, &sign_in_request("203.0.113.2")).await;
    assert_eq!(a.status, 429);
    let a = request_from(proxy, addr, &sign_in_request("203.0.113.2")).await;
    assert_eq!(a.status, 401, "203.0.113.2 still had one left");

    // Anonymous WebSockets are counted per forwarded client too
    // (RATE_LIMIT_CONNECTIONS = 1).
    assert_eq!(ws_from(proxy, addr, "198.51.100.1").await, None);
    assert_eq!(ws_from(proxy, addr, "198.51.100.1").await, Some(4029));
    assert_eq!(ws_from(proxy, addr, "198.51.100.2").await, None);
    t.server.stop().await;
}

/// A client that sends `head` and `prefix`, then 1 MiB every 100 ms up to
/// `total` body bytes in all (chunked: it does not say how much in advance),
/// while reading the answer.
struct SlowUpload {
    answer: Answer,
    /// Body bytes the client had sent when the answer arrived.
    sent_at_answer: u64,
    answered_after: Duration,
}

async fn slow_upload(addr: SocketAddr, head: String, prefix: Vec<u8>, total: u64) -> SlowUpload {
    let stream = connect_from([127, 0, 0, 1], addr).await.unwrap();
    let (mut rd, mut wr) = stream.into_split();
    let sent = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let writer = {
        let sent = Arc::clone(&sent);
        tokio::spawn(async move {
            wr.write_all(head.as_bytes()).await?;
            if !prefix.is_empty() {
                wr.write_all(format!("{:x}\r\n", prefix.len()).as_bytes())
                    .await?;
                wr.write_all(&prefix).await?;
                wr.write_all(b"\r\n").await?;
            }
            sent.store(prefix.len() as u64, Ordering::SeqCst);
            let chunk = vec![0x5a_u8; MIB as usize];
            let mut pace = tokio::time::interval(Duration::from_millis(100));
            let mut done = prefix.len() as u64;
            while done < total {
                pace.tick().await;
                let n = (total - done).min(MIB) as usize;
                wr.write_all(format!("{n:x}\r\n").as_bytes()).await?;
                wr.write_all(&chunk[..n]).await?;
                wr.write_all(b"\r\n").await?;
                done += n as u64;
                sent.store(done, Ordering::SeqCst);
            }
            wr.write_all(b"0\r\n\r\n").await?;
            std::io::Result::Ok(())
        })
    };
    let answer = tokio::time::timeout(WAIT, read_answer(&mut rd))
        .await
        .expect("answered long before the body would end")
        .expect("an answer, not a reset");
    let sent_at_answer = sent.load(Ordering::SeqCst);
    let answered_after = started.elapsed();
    // The server then closes the connection: reads end, and the client's writes
    // fail long before its body would have ended (10 s per 100 MiB).
    let mut tmp = [0u8; 4096];
    tokio::time::timeout(WAIT, async {
        while let Ok(n) = rd.read(&mut tmp).await
            && n > 0
        {}
    })
    .await
    .expect("the server closes after answering");
    let written = tokio::time::timeout(WAIT, writer)
        .await
        .expect("the client's writes stop")
        .unwrap();
    assert!(
        written.is_err(),
        "the server read the whole body: {} bytes",
        sent.load(Ordering::SeqCst)
    );
    eprintln!(
        "answered {} after {answered_after:?}, {} MiB sent",
        answer.status,
        sent_at_answer as f64 / MIB as f64
    );
    SlowUpload {
        answer,
        sent_at_answer,
        answered_after,
    }
}

/// A multipart upload of `file_bytes`: (head, the form up to the file's bytes,
/// body size). `chunked`: the head says `Transfer-Encoding: chunked` instead of
/// a `Content-Length`.
fn multipart_upload(
    token: &str,
    mime: &str,
    file_bytes: u64,
    chunked: bool,
) -> (String, Vec<u8>, u64) {
    let boundary = "aetheredgeboundary";
    let prefix = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"path\"\r\n\r\nslow/big.png\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.png\"\r\n\
         Content-Type: {mime}\r\n\r\n"
    );
    let tail = format!("\r\n--{boundary}--\r\n");
    let declared = prefix.len() as u64 + file_bytes + tail.len() as u64;
    let length = if chunked {
        "Transfer-Encoding: chunked".to_owned()
    } else {
        format!("Content-Length: {declared}")
    };
    let head = format!(
        "POST /storage/upload HTTP/1.1\r\nHost: aether\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: multipart/form-data; boundary={boundary}\r\n{length}\r\n\r\n"
    );
    (head, prefix.into_bytes(), declared)
}

/// A raw-body upload through the Supabase facade; `declared: None` is chunked.
fn supabase_upload(anon_key: &str, token: &str, declared: Option<u64>) -> String {
    let length = match declared {
        Some(n) => format!("Content-Length: {n}"),
        None => "Transfer-Encoding: chunked".to_owned(),
    };
    format!(
        "POST /storage/v1/object/files/slow/big.png HTTP/1.1\r\nHost: aether\r\napikey: {anon_key}\r\n\
         Authorization: Bearer {token}\r\nContent-Type: image/png\r\n{length}\r\n\r\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_over_limit_uploads_are_answered_when_they_cross_the_limit() {
    const LIMIT: u64 = 8 * MIB;
    let t = TestServer::start_with(|c| c.max_file_size = LIMIT).await;
    let (_, token) = t.sign_up("slow@example.com").await;
    let anon = t.server.state.jwt.api_key("anon");
    let addr = t.addr();

    // Native multipart upload of a 200 MiB file (20 s at this pace).
    let (head, prefix, total) = multipart_upload(&token, "image/png", 200 * MIB, true);
    let up = slow_upload(addr, head, prefix, total).await;
    assert_eq!(up.answer.status, 413, "{:?}", up.answer);
    let v = up.answer.json();
    assert_eq!(v["error"]["code"], "storage/file-too-large");
    assert_eq!(v["error"]["status"], 413);
    assert_eq!(up.answer.header("connection"), Some("close"));
    // Right after crossing the limit (the old drain read up to LIMIT + 1 MiB more,
    // and past the current field to the end of the body).
    assert!(
        up.sent_at_answer <= LIMIT + 4 * MIB,
        "{} bytes sent before the answer",
        up.sent_at_answer
    );
    assert!(up.answered_after < Duration::from_secs(8));

    // A wrong type is answered before the file's bytes matter.
    let (head, prefix, total) = multipart_upload(&token, "text/html", 200 * MIB, true);
    let up = slow_upload(addr, head, prefix, total).await;
    assert_eq!(up.answer.status, 415, "{:?}", up.answer);
    assert_eq!(up.answer.json()["error"]["code"], "storage/invalid-type");
    assert!(up.sent_at_answer <= 4 * MIB, "{}", up.sent_at_answer);

    // The Supabase facade, raw body.
    let head = supabase_upload(&anon, &token, None);
    let up = slow_upload(addr, head, Vec::new(), 200 * MIB).await;
    assert_eq!(up.answer.status, 413, "{:?}", up.answer);
    assert_eq!(up.answer.json()["code"], "EntityTooLarge");
    assert_eq!(up.answer.header("connection"), Some("close"));
    assert!(
        up.sent_at_answer <= LIMIT + 4 * MIB,
        "{} bytes sent before the answer",
        up.sent_at_answer
    );

    // Nothing was stored, and the server serves on.
    let files: i64 = t
        .sql
        .query_one("SELECT count(*) FROM public.files", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(files, 0);
    let a = request_from([127, 0, 0, 1], addr, &get("/health")).await;
    assert_eq!(a.status, 200);
    t.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_declaring_too_much_are_refused_before_their_body() {
    const LIMIT: u64 = MIB;
    let t = TestServer::start_with(|c| c.max_file_size = LIMIT).await;
    let (_, token) = t.sign_up("declared@example.com").await;
    let anon = t.server.state.jwt.api_key("anon");
    let addr = t.addr();

    // Only the head is sent; no body byte.
    let (head, _, _) = multipart_upload(&token, "image/png", 100 * MIB, false);
    let mut s = connect_from([127, 0, 0, 1], addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    let a = tokio::time::timeout(WAIT, read_answer(&mut s))
        .await
        .expect("answered without a body")
        .unwrap();
    assert_eq!(a.status, 413, "{a:?}");
    assert_eq!(a.json()["error"]["code"], "storage/file-too-large");
    assert_eq!(a.json()["error"]["status"], 413);
    assert!(
        a.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&LIMIT.to_string())
    );
    assert_eq!(a.header("connection"), Some("close"));
    until_closed(&mut s).await;

    // The Supabase facade: a raw body one byte over the limit.
    let mut s = connect_from([127, 0, 0, 1], addr).await.unwrap();
    s.write_all(supabase_upload(&anon, &token, Some(LIMIT + 1)).as_bytes())
        .await
        .unwrap();
    let a = tokio::time::timeout(WAIT, read_answer(&mut s))
        .await
        .expect("answered without a body")
        .unwrap();
    assert_eq!(a.status, 413, "{a:?}");
    assert_eq!(a.json()["code"], "EntityTooLarge");
    until_closed(&mut s).await;

    // Exactly the limit is not refused up front (it is read, and stored).
    let mut s = connect_from([127, 0, 0, 1], addr).await.unwrap();
    s.write_all(supabase_upload(&anon, &token, Some(LIMIT)).as_bytes())
        .await
        .unwrap();
    s.write_all(&vec![0x89; LIMIT as usize]).await.unwrap();
    let a = tokio::time::timeout(WAIT, read_answer(&mut s))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(a.status, 200, "{a:?}");
    t.server.stop().await;
}

/// `accept` failing with EMFILE: the server (a child process with a small
/// open-files limit and no connection cap) backs off, logs at most about once a
/// second, and serves again once the header timeout frees descriptors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_accept_backs_off_and_recovers() {
    use std::os::unix::process::CommandExt as _;
    use tokio::io::AsyncBufReadExt as _;

    let db = TestDb::new().await;
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_aether"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", &db.url)
        .env("REPLICATION_SLOT", &db.name)
        .env("DATA_DIR", &db.data_dir)
        .env("JWT_SECRET", SECRET)
        .env("WS_HOST", "127.0.0.1")
        .env("WS_PORT", "0")
        .env("RUST_LOG", "warn")
        .env("HTTP_MAX_CONNECTIONS", "0")
        .env("HTTP_MAX_CONNECTIONS_PER_ADDR", "0")
        .env("HTTP_HEADER_TIMEOUT_S", "2");
    // SAFETY: setrlimit is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 256,
                rlim_max: 256,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = tokio::process::Command::from(cmd)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("aether starts");
    let mut stdout = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let addr: SocketAddr = tokio::time::timeout(WAIT, async {
        while let Some(line) = stdout.next_line().await.unwrap() {
            if let Some(a) = line.strip_prefix("aether listening on ") {
                return a.trim().parse().unwrap();
            }
        }
        panic!("aether exited before listening");
    })
    .await
    .expect("aether listens");
    let stderr = child.stderr.take().unwrap();
    let log = tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        let mut accept_failures = Vec::new();
        while let Ok(Some(l)) = lines.next_line().await {
            if l.contains("accept failed") {
                accept_failures.push(Instant::now());
            }
        }
        accept_failures
    });
    wait_healthy(addr).await;

    // More half-open connections than the server has descriptors.
    let flood_started = Instant::now();
    let mut socks = Vec::new();
    for _ in 0..400 {
        let mut s = connect_from([127, 0, 0, 1], addr).await.unwrap();
        s.write_all(b"GET /health HTTP/1.1\r\n").await.unwrap();
        socks.push(s);
    }
    // Another address is served again once the timed-out ones free descriptors.
    let a = request_from([127, 0, 0, 2], addr, &get("/health")).await;
    assert_eq!(a.status, 200);
    let recovered = flood_started.elapsed();
    // SIGTERM: a graceful stop.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id().unwrap() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let exit = tokio::time::timeout(WAIT, child.wait())
        .await
        .expect("aether stops on SIGTERM")
        .unwrap();
    assert!(exit.success(), "{exit:?}");
    let failures = log.await.unwrap();
    let span = failures
        .last()
        .map(|l| l.duration_since(failures[0]))
        .unwrap_or_default();
    eprintln!(
        "{} accept-failure log lines over {span:?}; /health served after {recovered:?}",
        failures.len()
    );
    assert!(!failures.is_empty(), "the server ran out of descriptors");
    assert!(
        failures.len() as u64 <= span.as_secs() + 2,
        "at most about one log line a second: {} in {span:?}",
        failures.len()
    );
    drop(socks);
}
