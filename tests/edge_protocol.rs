//! The edge of the server under hostile input (issue 13): request values that
//! PostgreSQL cannot store (NUL) or that no name may hold (control characters)
//! are a 400 in each route family's own error format; WebSocket protocol
//! violations close with their RFC 6455 code; garbage on the Phoenix endpoint
//! gets a Phoenix error reply; frames with unknown actions and empty filter
//! conditions get their documented codes.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)] // a test may panic; its helpers are `pub` for the other test files

mod common;

use common::*;
use reqwest::multipart::{Form, Part};
use reqwest::{Client, Response};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn http() -> Client {
    Client::new()
}

/// Asserts a native error (`{"error":{"code","status","message"}}`).
async fn native_error(res: Response, status: u16, code: &str) {
    let got = res.status().as_u16();
    let body: Value = res.json().await.unwrap();
    assert_eq!(
        (got, body["error"]["code"].as_str()),
        (status, Some(code)),
        "{body}"
    );
    assert_eq!(body["error"]["status"], status, "{body}");
}

/// Asserts a Supabase storage error (`{"statusCode","code","error","message"}`).
async fn storage_error(res: Response, status: u16, code: &str) {
    let got = res.status().as_u16();
    let body: Value = res.json().await.unwrap();
    assert_eq!((got, body["code"].as_str()), (status, Some(code)), "{body}");
    assert_eq!(body["statusCode"], status.to_string(), "{body}");
    assert!(
        body["message"].is_string() && body["error"].is_string(),
        "{body}"
    );
}

/// Asserts a GoTrue error (`{"code","message"}` and the API version header).
async fn gotrue_error(res: Response, status: u16, code: &str) {
    let got = res.status().as_u16();
    assert_eq!(
        res.headers()
            .get("x-supabase-api-version")
            .and_then(|v| v.to_str().ok()),
        Some("2024-01-01")
    );
    let body: Value = res.json().await.unwrap();
    assert_eq!((got, body["code"].as_str()), (status, Some(code)), "{body}");
    assert!(body["message"].is_string(), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_and_control_characters_are_400s_in_each_routes_format() {
    let t = TestServer::start().await;
    let (_, token) = t.sign_up("nul@example.com").await;
    let anon = t.server.state.jwt.api_key("anon");

    // Native storage: the bucket of a listing, a deletion, an upload form, a read.
    for bucket in ["%00x", "a%09b", "x%1B%5B31m"] {
        let res = http()
            .get(t.url(&format!("/storage/list?bucket={bucket}")))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        native_error(res, 400, "storage/invalid-bucket").await;
    }
    let res = http()
        .delete(t.url("/storage/delete"))
        .bearer_auth(&token)
        .json(&json!({"bucket": "fi\u{0}les", "path": "a.txt"}))
        .send()
        .await
        .unwrap();
    native_error(res, 400, "storage/invalid-bucket").await;
    let form = Form::new().text("bucket", "\u{0}x").part(
        "file",
        Part::bytes(b"hello".to_vec())
            .file_name("a.png")
            .mime_str("image/png")
            .unwrap(),
    );
    let res = http()
        .post(t.url("/storage/upload"))
        .bearer_auth(&token)
        .multipart(form)
        .send()
        .await
        .unwrap();
    native_error(res, 400, "storage/invalid-bucket").await;
    let res = http()
        .get(t.url(&format!(
            "/storage/object/%00/{}/a.txt",
            uuid::Uuid::new_v4()
        )))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    native_error(res, 400, "storage/invalid-bucket").await;
    // A NUL in a path keeps its own code; elsewhere it is invalid_characters.
    let res = http()
        .get(t.url("/storage/list?path=a%00b"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    native_error(res, 400, "storage/invalid-path").await;
    let res = http()
        .post(t.url("/auth/sign-in"))
        .json(&json!({"email": "nul\u{0}@example.com", "password": "x"}))
        .send()
        .await
        .unwrap();
    native_error(res, 400, "invalid_characters").await;
    let res = http()
        .post(t.url("/auth/sign-up"))
        .json(&json!({"email": "new@example.com", "password": "correct horse 1\u{0}"}))
        .send()
        .await
        .unwrap();
    native_error(res, 400, "invalid_characters").await;
    let res = http()
        .get(t.url("/storage/list?bucket=files&extra=%00"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    native_error(res, 400, "invalid_characters").await;
    // KingShare: a share token (looked up in SQL).
    let res = http().get(t.url("/share/ab%00cd")).send().await.unwrap();
    native_error(res, 400, "invalid_characters").await;
    let res = http()
        .post(t.url("/api/v1/ws/notify"))
        .bearer_auth(service_token())
        .json(&json!({"message": "hi\u{0}", "level": "Info"}))
        .send()
        .await
        .unwrap();
    native_error(res, 400, "invalid_characters").await;
    // Tabs and newlines are text.
    let res = http()
        .post(t.url("/api/v1/ws/notify"))
        .bearer_auth(service_token())
        .json(&json!({"message": "line 1\n\tline 2", "level": "Info"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);

    // Supabase storage: the bucket in the URL (list, upload), a JSON body.
    let res = http()
        .post(t.url("/storage/v1/object/list/%00x"))
        .header("apikey", &anon)
        .bearer_auth(&token)
        .json(&json!({"prefix": ""}))
        .send()
        .await
        .unwrap();
    storage_error(res, 400, "InvalidBucketName").await;
    let res = http()
        .post(t.url("/storage/v1/object/%00x/a.txt"))
        .header("apikey", &anon)
        .bearer_auth(&token)
        .header("content-type", "text/plain")
        .body("hello")
        .send()
        .await
        .unwrap();
    storage_error(res, 400, "InvalidBucketName").await;
    let res = http()
        .post(t.url("/storage/v1/bucket"))
        .header("apikey", &anon)
        .bearer_auth(&token)
        .json(&json!({"id": "b\u{0}", "public": true}))
        .send()
        .await
        .unwrap();
    storage_error(res, 400, "InvalidBucketName").await;
    let res = http()
        .post(t.url("/storage/v1/object/list/files"))
        .header("apikey", &anon)
        .bearer_auth(&token)
        .json(&json!({"prefix": "", "search": "a\u{0}"}))
        .send()
        .await
        .unwrap();
    storage_error(res, 400, "InvalidRequest").await;
    let res = http()
        .get(t.url("/storage/v1/object/files/a%00b"))
        .header("apikey", &anon)
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    storage_error(res, 400, "InvalidKey").await;

    // GoTrue: NUL in a credential, in user metadata, in a query parameter.
    let res = http()
        .post(t.url("/auth/v1/signup"))
        .header("apikey", &anon)
        .json(&json!({"email": "a\u{0}@example.com", "password": "correct horse 1"}))
        .send()
        .await
        .unwrap();
    gotrue_error(res, 400, "validation_failed").await;
    let res = http()
        .post(t.url("/auth/v1/signup"))
        .header("apikey", &anon)
        .json(&json!({"email": "meta@example.com", "password": "correct horse 1", "data": {"k\u{0}": "v"}}))
        .send()
        .await
        .unwrap();
    gotrue_error(res, 400, "validation_failed").await;
    let res = http()
        .post(t.url("/auth/v1/token?grant_type=password"))
        .header("apikey", &anon)
        .json(&json!({"email": "nul@example.com", "password": "\u{0}"}))
        .send()
        .await
        .unwrap();
    gotrue_error(res, 400, "validation_failed").await;
    let res = http()
        .post(t.url("/auth/v1/token?grant_type=pass%00word"))
        .header("apikey", &anon)
        .json(&json!({"email": "nul@example.com", "password": "x"}))
        .send()
        .await
        .unwrap();
    gotrue_error(res, 400, "validation_failed").await;

    // Nothing was stored by any of it, and the server is fine.
    let n: i64 = t
        .sql
        .query_one("SELECT count(*) FROM public.files", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
    assert_eq!(reqwest_lite(&t.url("/health")).await.unwrap(), 200);
}

/// A raw WebSocket connection: the handshake is made by hand so that any frame,
/// broken ones included, can be written.
struct RawWs {
    s: TcpStream,
    buf: Vec<u8>,
}

impl RawWs {
    async fn connect(t: &TestServer, path_and_query: &str) -> RawWs {
        let mut s = TcpStream::connect(t.addr()).await.unwrap();
        let req = format!(
            "GET {path_and_query} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let end = loop {
            let n = tokio::time::timeout(WAIT, s.read(&mut chunk))
                .await
                .expect("handshake answer")
                .unwrap();
            assert!(n > 0, "closed during the handshake");
            buf.extend_from_slice(&chunk[..n]);
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_string();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        RawWs {
            s,
            buf: buf[end..].to_vec(),
        }
    }

    /// A masked client frame with any first byte (FIN, RSV bits, opcode).
    fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x12u8, 0x34, 0x56, 0x78];
        let mut f = vec![first];
        match payload.len() {
            n if n < 126 => f.push(0x80 | n as u8),
            n if n <= 0xffff => {
                f.push(0x80 | 126);
                f.extend((n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend((n as u64).to_be_bytes());
            }
        }
        f.extend(mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        f
    }

    async fn send(&mut self, bytes: &[u8]) {
        // The server may close before reading everything (an over-long frame).
        let _ = self.s.write_all(bytes).await;
    }

    async fn read_more(&mut self) -> bool {
        let mut chunk = [0u8; 65536];
        match tokio::time::timeout(WAIT, self.s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
            Ok(_) => false,
            Err(_) => panic!("no frame and no close within {WAIT:?}"),
        }
    }

    /// The next server frame (opcode, payload); `None` when the socket ends.
    async fn next_frame(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if self.buf.len() >= 2 {
                let op = self.buf[0] & 0x0f;
                let (len, at) = match self.buf[1] & 0x7f {
                    126 if self.buf.len() >= 4 => {
                        (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4)
                    }
                    127 if self.buf.len() >= 10 => (
                        u64::from_be_bytes(self.buf[2..10].try_into().unwrap()) as usize,
                        10,
                    ),
                    n if n < 126 => (n as usize, 2),
                    _ => (usize::MAX, 0),
                };
                if len != usize::MAX && self.buf.len() >= at + len {
                    let payload = self.buf[at..at + len].to_vec();
                    self.buf.drain(..at + len);
                    return Some((op, payload));
                }
            }
            if !self.read_more().await {
                return None;
            }
        }
    }

    /// Reads until the server's Close: its code, and the text frames before it.
    async fn close_code(&mut self) -> (Option<u16>, Vec<String>) {
        let mut texts = Vec::new();
        while let Some((op, payload)) = self.next_frame().await {
            match op {
                0x1 => texts.push(String::from_utf8_lossy(&payload).into_owned()),
                0x8 => {
                    let code =
                        (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
                    // Complete the closing handshake, as a browser would.
                    let echo = RawWs::frame(0x88, &payload[..payload.len().min(2)]);
                    self.send(&echo).await;
                    return (code, texts);
                }
                _ => {}
            }
        }
        (None, texts)
    }

    /// The next text frame (pings skipped).
    async fn next_text(&mut self) -> Value {
        loop {
            let (op, payload) = self.next_frame().await.expect("a frame");
            match op {
                0x1 => return serde_json::from_slice(&payload).unwrap(),
                0x8 => panic!("closed: {payload:?}"),
                _ => {}
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_protocol_violations_close_with_their_codes() {
    let t = TestServer::start().await;
    let phoenix = format!(
        "/realtime/v1/websocket?apikey={}&vsn=1.0.0",
        t.server.state.jwt.api_key("anon")
    );
    for path in ["/ws?protocol=aether", phoenix.as_str()] {
        // Invalid UTF-8 in a text frame: 1007.
        let mut ws = RawWs::connect(&t, path).await;
        ws.send(&RawWs::frame(0x81, b"{\"a\":\"\xff\xfe\"}")).await;
        assert_eq!(ws.close_code().await.0, Some(1007), "{path}: invalid UTF-8");

        // A reserved data opcode, a reserved control opcode, an oversize
        // control frame, RSV bits without an extension: 1002.
        for first in [0x83u8, 0x8B, 0x89, 0xC1] {
            let mut ws = RawWs::connect(&t, path).await;
            let payload = if first == 0x89 {
                vec![b'p'; 126]
            } else {
                b"{}".to_vec()
            };
            ws.send(&RawWs::frame(first, &payload)).await;
            assert_eq!(
                ws.close_code().await.0,
                Some(1002),
                "{path}: first byte {first:#04x}"
            );
        }

        // A 1 MB text frame, over WS_MAX_FRAME_BYTES (64 KiB): 1009.
        let mut ws = RawWs::connect(&t, path).await;
        ws.send(&RawWs::frame(0x81, &vec![b'x'; 1_000_000])).await;
        let (code, texts) = ws.close_code().await;
        assert_eq!(code, Some(1009), "{path}: 1 MB frame");
        if path.starts_with("/ws") {
            assert!(
                texts.iter().any(|t| t.contains("frame_too_large")),
                "{texts:?}"
            );
        }

        // A frame header claiming 64 MiB: refused before any of it is buffered.
        let mut ws = RawWs::connect(&t, path).await;
        let mut header = vec![0x81u8, 0x80 | 127];
        header.extend((64u64 << 20).to_be_bytes());
        header.extend([1, 2, 3, 4]);
        header.extend([b'x'; 1024]);
        ws.send(&header).await;
        assert_eq!(ws.close_code().await.0, Some(1009), "{path}: 64 MiB header");
    }
    // The server took all of that in its stride.
    let mut ws = t.ws(None).await;
    ws.subscribe("still", json!({"table": "buckets"})).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn phoenix_garbage_gets_an_error_reply_and_bad_frames_their_codes() {
    let t = TestServer::start().await;
    let key = t.server.state.jwt.api_key("anon");
    let mut ws = RawWs::connect(
        &t,
        &format!("/realtime/v1/websocket?apikey={key}&vsn=2.0.0"),
    )
    .await;
    let reply = |v: &Value| (v[2].clone(), v[3].clone(), v[4]["status"].clone());

    // Not JSON at all: a reply on topic `phoenix`.
    ws.send(&RawWs::frame(0x81, b"explode")).await;
    let v = ws.next_text().await;
    assert_eq!(
        reply(&v),
        (json!("phoenix"), json!("phx_reply"), json!("error")),
        "{v}"
    );
    assert!(
        v[4]["response"]["reason"]
            .as_str()
            .unwrap()
            .contains("JSON"),
        "{v}"
    );
    // An array whose event is not a string: the reply keeps its refs and topic.
    ws.send(&RawWs::frame(0x81, br#"["1","7","realtime:room",42,{}]"#))
        .await;
    let v = ws.next_text().await;
    assert_eq!(
        reply(&v),
        (json!("realtime:room"), json!("phx_reply"), json!("error")),
        "{v}"
    );
    assert_eq!((&v[0], &v[1]), (&json!("1"), &json!("7")), "{v}");
    // A binary frame that is not a broadcast push.
    ws.send(&RawWs::frame(0x82, &[9, 9, 9])).await;
    let v = ws.next_text().await;
    assert_eq!(
        reply(&v),
        (json!("phoenix"), json!("phx_reply"), json!("error")),
        "{v}"
    );
    // A join whose filter has only empty conditions is refused, not unfiltered.
    ws.send(&RawWs::frame(
        0x81,
        json!(["2", "2", "realtime:f", "phx_join", {"config": {"postgres_changes": [
            {"event": "*", "schema": "public", "table": "buckets", "filter": "&&&"}]}}])
        .to_string()
        .as_bytes(),
    ))
    .await;
    let v = ws.next_text().await;
    assert_eq!(
        reply(&v),
        (json!("realtime:f"), json!("phx_reply"), json!("error")),
        "{v}"
    );
    assert!(
        v[4]["response"]["reason"]
            .as_str()
            .unwrap()
            .contains("empty condition"),
        "{v}"
    );
    // Still a working connection.
    ws.send(&RawWs::frame(
        0x81,
        br#"[null,"3","phoenix","heartbeat",{}]"#,
    ))
    .await;
    let v = ws.next_text().await;
    assert_eq!(
        reply(&v),
        (json!("phoenix"), json!("phx_reply"), json!("ok")),
        "{v}"
    );

    // The Aether endpoint: unknown actions, empty filter conditions, control
    // characters in names; tabs are legal in filter values.
    let mut ws = t.ws(Some(&service_token())).await;
    for (frame, code) in [
        (json!({"action": "explode"}), "unknown_action"),
        (
            json!({"type": "subscription", "action": "explode"}),
            "unknown_action",
        ),
        (
            json!({"type": "subscription", "action": "explode", "data": {}}),
            "unknown_action",
        ),
        (
            json!({"type": "subscription", "action": "subscribe", "data": {"id": "f", "table": "buckets", "filter": "&&&"}}),
            "invalid_filter",
        ),
        (
            json!({"type": "subscription", "action": "subscribe", "data": {"id": "f", "table": "buckets", "filter": "id=eq.a&&name=eq.b"}}),
            "invalid_filter",
        ),
        (
            json!({"type": "subscription", "action": "subscribe", "data": {"id": "f", "table": "buckets", "filter": "id=eq.a\u{0}"}}),
            "invalid_filter",
        ),
        (
            json!({"type": "subscription", "action": "subscribe", "data": {"id": "f", "table": "buck\u{0}ets"}}),
            "invalid_subscription",
        ),
        (
            json!({"type": "subscription", "action": "subscribe", "data": {"id": "f", "storage": "fi\u{1}les"}}),
            "invalid_filter",
        ),
        (
            json!({"type": "connection", "action": "join", "data": {"channel": "room\u{0}"}}),
            "invalid_channel",
        ),
    ] {
        ws.send(frame.clone()).await;
        let e = ws.next().await;
        assert_eq!(
            (&e["type"], &e["code"]),
            (&json!("error"), &json!(code)),
            "{frame} → {e}"
        );
    }
    ws.subscribe("tab", json!({"table": "buckets", "filter": "id=eq.a\tb"}))
        .await;
}
