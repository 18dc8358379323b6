//! The edge of the server under hostile input (issue 13): request values that
//! PostgreSQL cannot store (NUL) or that no name may hold (control characters)
//! are a 400 in each route family's own error format.

mod common;

use common::*;
use reqwest::multipart::{Form, Part};
use reqwest::{Client, Response};
use serde_json::{Value, json};

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
