//! Generated requests against the Supabase facade (`/auth/v1`, `/storage/v1`),
//! which the OpenAPI document (and so tests/schemathesis.rs) does not cover:
//! any route of theirs, with hostile path segments, queries, bodies, content
//! types, keys and tokens, to a real server. None may get a 5xx, and every
//! error must have the facade's shape: GoTrue's `{code, message}` with
//! `X-Supabase-Api-Version`, the storage API's `{statusCode, code, error,
//! message}`.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)] // a test may panic; its helpers are `pub` for the other test files

mod common;

use std::sync::OnceLock;

use common::*;
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use proptest::prelude::*;
use serde_json::{Value, json};

const CASES: u32 = 256;

struct World {
    rt: tokio::runtime::Runtime,
    t: TestServer,
    anon: String,
    service: String,
    user: String,
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (t, user) = rt.block_on(async {
            let t = TestServer::start().await;
            let (_, user) = t.sign_up("facade@example.com").await;
            t.upload(&user, "docs/a.png", vec![1, 2, 3], "image/png")
                .await;
            (t, user)
        });
        let anon = t.server.state.jwt.api_key("anon");
        let service = t.server.state.jwt.api_key("service_role");
        World {
            rt,
            t,
            anon,
            service,
            user,
        }
    })
}

fn nasty() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("files".to_owned()),
        Just("docs/a.png".to_owned()),
        "\\PC{0,12}",
        "[\\x00-\\x1f\\x7f&=.,/\\\\%?# a-z0-9]{0,12}",
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        nasty().prop_map(Value::String),
    ];
    leaf.prop_recursive(2, 12, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
            prop::collection::btree_map(nasty(), inner, 0..3)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A body the routes would read: their own fields, with any values.
fn body() -> impl Strategy<Value = Vec<u8>> {
    let fields = prop::sample::subsequence(
        vec![
            "email",
            "password",
            "data",
            "refresh_token",
            "id",
            "name",
            "public",
            "file_size_limit",
            "allowed_mime_types",
            "prefix",
            "limit",
            "offset",
            "sortBy",
            "search",
            "expiresIn",
            "prefixes",
        ],
        0..5,
    );
    prop_oneof![
        (fields, prop::collection::vec(json_value(), 5)).prop_map(|(keys, values)| {
            let m: serde_json::Map<String, Value> = keys
                .into_iter()
                .zip(values)
                .map(|(k, v)| (k.to_owned(), v))
                .collect();
            Value::Object(m).to_string().into_bytes()
        }),
        json_value().prop_map(|v| v.to_string().into_bytes()),
        prop::collection::vec(any::<u8>(), 0..64),
    ]
}

/// (method, path template): every route of the two facades.
const ROUTES: &[(&str, &str)] = &[
    ("POST", "/auth/v1/signup"),
    ("POST", "/auth/v1/token"),
    ("GET", "/auth/v1/user"),
    ("POST", "/auth/v1/logout"),
    ("GET", "/auth/v1/settings"),
    ("GET", "/storage/v1/bucket"),
    ("POST", "/storage/v1/bucket"),
    ("GET", "/storage/v1/bucket/{bucket}"),
    ("POST", "/storage/v1/object/list/{bucket}"),
    ("POST", "/storage/v1/object/sign/{bucket}/{path}"),
    ("GET", "/storage/v1/object/sign/{bucket}/{path}"),
    ("GET", "/storage/v1/object/public/{bucket}/{path}"),
    ("GET", "/storage/v1/object/authenticated/{bucket}/{path}"),
    ("GET", "/storage/v1/object/info/{bucket}/{path}"),
    ("DELETE", "/storage/v1/object/{bucket}"),
    ("GET", "/storage/v1/object/{bucket}/{path}"),
    ("HEAD", "/storage/v1/object/{bucket}/{path}"),
    ("POST", "/storage/v1/object/{bucket}/{path}"),
    ("PUT", "/storage/v1/object/{bucket}/{path}"),
    // Not routes: the facade's shape for 404 and 405 too.
    ("PATCH", "/auth/v1/user"),
    ("GET", "/auth/v1/no-such-route"),
    ("PATCH", "/storage/v1/bucket"),
];

#[derive(Debug, Clone)]
struct Req {
    method: &'static str,
    path: String,
    query: String,
    apikey: Option<usize>,
    bearer: Option<usize>,
    content_type: Option<&'static str>,
    body: Vec<u8>,
}

fn request() -> impl Strategy<Value = Req> {
    (
        prop::sample::select(ROUTES),
        nasty(),
        prop::collection::vec(nasty(), 1..3),
        prop::collection::vec((nasty(), nasty()), 0..3),
        prop::option::of(0usize..4),
        prop::option::of(0usize..4),
        prop::option::of(prop::sample::select(vec![
            "application/json",
            "text/plain",
            "image/png",
            "application/octet-stream",
            "multipart/form-data",
            "multipart/form-data; boundary=x",
        ])),
        body(),
    )
        .prop_map(
            |((method, template), bucket, path, query, apikey, bearer, content_type, body)| {
                let enc = |s: &str| utf8_percent_encode(s, NON_ALPHANUMERIC).to_string();
                let path_text = path.iter().map(|s| enc(s)).collect::<Vec<_>>().join("/");
                let query = query
                    .iter()
                    .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
                    .chain(
                        // The query parameters the routes read.
                        template
                            .ends_with("/token")
                            .then(|| format!("grant_type={}", enc(&path[0]))),
                    )
                    .collect::<Vec<_>>()
                    .join("&");
                Req {
                    method,
                    path: template
                        .replace("{bucket}", &enc(&bucket))
                        .replace("{path}", &path_text),
                    query,
                    apikey,
                    bearer,
                    content_type,
                    body,
                }
            },
        )
}

async fn send(w: &World, r: &Req) -> (u16, Option<String>, Vec<u8>) {
    let credential = |i: usize| match i {
        0 => w.anon.clone(),
        1 => w.service.clone(),
        2 => w.user.clone(),
        _ => "not.a.jwt".to_owned(),
    };
    let mut url = w.t.url(&r.path);
    if !r.query.is_empty() {
        url.push('?');
        url.push_str(&r.query);
    }
    let method = reqwest::Method::from_bytes(r.method.as_bytes()).unwrap();
    let mut req = reqwest::Client::new()
        .request(method, url)
        .body(r.body.clone());
    if let Some(i) = r.apikey {
        req = req.header("apikey", credential(i));
    }
    if let Some(i) = r.bearer {
        req = req.bearer_auth(credential(i));
    }
    if let Some(ct) = r.content_type {
        req = req.header("content-type", ct);
    }
    let res = req.send().await.expect("the server answers");
    let status = res.status().as_u16();
    let version = res
        .headers()
        .get("x-supabase-api-version")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    (status, version, res.bytes().await.unwrap().to_vec())
}

proptest! {
    #![proptest_config(ProptestConfig {
        failure_persistence: Some(Box::new(
            proptest::test_runner::FileFailurePersistence::Direct(
                "tests/proptest-regressions/facade_fuzz.txt",
            ),
        )),
        ..ProptestConfig::with_cases(CASES)
    })]

    #[test]
    fn facade_requests_get_no_5xx_and_errors_in_the_facades_shape(r in request()) {
        let w = world();
        let (status, version, body) = w.rt.block_on(send(w, &r));
        prop_assert!(status < 500, "{r:?} → {status} {}", String::from_utf8_lossy(&body));
        if status < 400 || r.method == "HEAD" {
            return Ok(());
        }
        let v: Value = serde_json::from_slice(&body)
            .map_err(|e| TestCaseError::fail(format!("{r:?} → {status}: not JSON ({e}): {}", String::from_utf8_lossy(&body))))?;
        if r.path.starts_with("/auth/v1") {
            prop_assert!(v["code"].is_string() && v["message"].is_string(), "{r:?} → {status} {v}");
            prop_assert_eq!(version.as_deref(), Some("2024-01-01"), "{:?} → {}", r, v);
        } else {
            let expected = status.to_string();
            prop_assert_eq!(v["statusCode"].as_str(), Some(expected.as_str()), "{:?} → {}", r, v);
            prop_assert!(
                v["code"].is_string() && v["error"].is_string() && v["message"].is_string(),
                "{r:?} → {status} {v}"
            );
        }
    }
}
