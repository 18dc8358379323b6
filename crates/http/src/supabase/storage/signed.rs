//! Signed URLs: download tokens (`sign`, `createSignedUrls`, their `GET`)
//! and upload tokens (`createSignedUploadUrl`, `uploadToSignedUrl`).

use axum::Json;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::download::serve;
use super::errors::StorageApiError;
use super::json_body;
use super::owners::{Caller, object_path, readable, writer};
use super::render::{Transform, open_and_render};
use super::upload::{UploadAnswer, do_upload, upload_answer, upsert_header};
use crate::AppState;
use crate::extract::ApiPath;
use crate::supabase::query_param;
use crate::validate::{self, Validate};
use aether_auth::Principal;
use aether_storage::{Actor, ObjectPath, WriteFacts};
use uuid::Uuid;

/// What a signed-URL token allows: download tokens say [`DOWNLOAD`] (or,
/// made before tokens had a scope, nothing), upload tokens [`UPLOAD`]; each
/// route takes its own kind only.
const DOWNLOAD: &str = "download";
const UPLOAD: &str = "upload";

#[derive(Serialize, Deserialize)]
struct SignedClaims {
    /// `bucket/path`, as in Supabase's signed URLs.
    url: String,
    /// The object signed: the URL serves it and nothing else that later
    /// takes its name. Tokens made before objects were named by bucket and
    /// path have none and are refused (their path meant another object).
    #[serde(default)]
    id: Option<Uuid>,
    /// Set: the URL serves the image transformed so (`/render/image/sign/…`);
    /// it cannot be changed once signed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    transform: Option<Transform>,
    #[serde(default)]
    scope: Option<String>,
    iat: i64,
    exp: i64,
}

#[derive(Deserialize)]
pub(crate) struct SignBody {
    #[serde(rename = "expiresIn")]
    expires_in: Option<i64>,
    /// storage-js's `transform` option: a URL of the transformed image.
    transform: Option<Transform>,
}

impl Validate for SignBody {}

/// `POST /storage/v1/object/sign/{bucket}/{path}` → `{"signedURL": "/object/sign/…?token=…"}`.
pub(crate) async fn sign(
    State(state): State<AppState>,
    Caller(p): Caller,
    ApiPath((bucket, path)): ApiPath<(String, String)>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, StorageApiError> {
    let b: SignBody = json_body(&body)?;
    let expires_in = expires_in(b.expires_in)?;
    if let Some(t) = &b.transform {
        t.check()?;
    }
    let url = signed_url(&state, &p, &bucket, &path, expires_in, b.transform).await?;
    // Not percent-encoded: storage-js runs `encodeURI` over it.
    Ok(Json(json!({ "signedURL": url })))
}

/// `expiresIn` (default 60 s), which must be positive.
fn expires_in(v: Option<i64>) -> Result<i64, StorageApiError> {
    match v.unwrap_or(60) {
        s if s > 0 => Ok(s),
        _ => Err(StorageApiError::invalid(
            "expiresIn must be a positive number of seconds",
        )),
    }
}

/// `/object/sign/{bucket}/{path}?token=…` for the object `viewer` reads there.
async fn signed_url(
    state: &AppState,
    viewer: &Principal,
    bucket: &str,
    raw: &str,
    expires_in: i64,
    transform: Option<Transform>,
) -> Result<String, StorageApiError> {
    let path = object_path(raw)?;
    let file = readable(state, viewer, bucket, &path).await?;
    let now = chrono::Utc::now().timestamp();
    let url = format!("{bucket}/{path}");
    let token = state.jwt.sign_json(&SignedClaims {
        url: url.clone(),
        id: Some(file.id),
        transform: transform.clone(),
        scope: Some(DOWNLOAD.into()),
        iat: now,
        exp: now.saturating_add(expires_in),
    });
    let route = if transform.is_some() {
        "render/image/sign"
    } else {
        "object/sign"
    };
    Ok(format!("/{route}/{url}?token={token}"))
}

fn bad_signature(m: &str) -> StorageApiError {
    StorageApiError::new(
        StatusCode::BAD_REQUEST,
        "InvalidSignature",
        "InvalidSignature",
        m,
    )
}

/// The claims of the `token` query parameter: signed by us, not expired.
fn verify_signed<T: serde::de::DeserializeOwned>(
    state: &AppState,
    uri: &axum::http::Uri,
) -> Result<T, StorageApiError> {
    let token = query_param(uri.query().unwrap_or(""), "token").unwrap_or_default();
    state.jwt.verify_json(&token).map_err(|e| match e {
        aether_auth::TokenError::Expired => bad_signature("jwt expired"),
        aether_auth::TokenError::Invalid(_) => bad_signature("The signature is invalid"),
    })
}

/// A download token's claims for `bucket/path` (its object named: `id` is
/// set), the path, and whom it reads as: the service role, until the token
/// expires.
fn signed_download(
    state: &AppState,
    uri: &axum::http::Uri,
    bucket: &str,
    raw: &str,
) -> Result<(SignedClaims, ObjectPath, Principal), StorageApiError> {
    let claims: SignedClaims = verify_signed(state, uri)?;
    if claims.scope.as_deref().is_some_and(|s| s != DOWNLOAD) {
        return Err(bad_signature("The token is not for downloads"));
    }
    let path = object_path(raw)?;
    if claims.url != format!("{bucket}/{path}") {
        return Err(bad_signature("The URL does not match the signature"));
    }
    if claims.id.is_none() {
        return Err(bad_signature(
            "The token was made before objects were named by bucket and path: sign the URL again",
        ));
    }
    let service = Principal {
        expires_at: Some(claims.exp),
        ..Principal::service()
    };
    Ok((claims, path, service))
}

/// `GET /storage/v1/object/sign/{bucket}/{path}?token=…`: no key needed.
pub(crate) async fn signed_get(
    State(state): State<AppState>,
    ApiPath((bucket, path)): ApiPath<(String, String)>,
    uri: axum::http::Uri,
    method: axum::http::Method,
    headers: HeaderMap,
) -> Result<Response, StorageApiError> {
    let (claims, path, service) = signed_download(&state, &uri, &bucket, &path)?;
    // A URL signed for a transformed image does not give the original.
    if claims.transform.is_some() {
        return Err(bad_signature(
            "The token is for a transformed image: use its /render/image/sign/ URL",
        ));
    }
    let head_only = method == axum::http::Method::HEAD;
    serve(
        &state, &service, &bucket, &path, &headers, head_only, claims.id,
    )
    .await
}

/// `GET /storage/v1/render/image/sign/{bucket}/{path}?token=…`: the image
/// transformed as the token says (query parameters other than the token
/// change nothing).
pub(crate) async fn render_signed(
    State(state): State<AppState>,
    ApiPath((bucket, path)): ApiPath<(String, String)>,
    uri: axum::http::Uri,
) -> Result<Response, StorageApiError> {
    let (claims, path, service) = signed_download(&state, &uri, &bucket, &path)?;
    let t = claims.transform.unwrap_or_default();
    open_and_render(&state, &service, &bucket, &path, t, claims.id).await
}

#[derive(Deserialize)]
pub(crate) struct SignManyBody {
    #[serde(rename = "expiresIn")]
    expires_in: Option<i64>,
    paths: Vec<String>,
}

impl Validate for SignManyBody {}

/// `POST /storage/v1/object/sign/{bucket}` (`createSignedUrls`): one entry per
/// path, with its own error when that path cannot be signed.
pub(crate) async fn sign_many(
    State(state): State<AppState>,
    Caller(p): Caller,
    ApiPath(bucket): ApiPath<String>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, StorageApiError> {
    let b: SignManyBody = json_body(&body)?;
    let expires_in = expires_in(b.expires_in)?;
    if b.paths.len() > 1000 {
        return Err(StorageApiError::invalid("at most 1000 paths at once"));
    }
    let mut out = Vec::with_capacity(b.paths.len());
    for raw in b.paths {
        let signed = signed_url(&state, &p, &bucket, &raw, expires_in, None).await;
        out.push(match signed {
            Ok(u) => json!({"error": null, "path": raw, "signedURL": u}),
            Err(e) => json!({"error": e.message, "path": raw, "signedURL": null}),
        });
    }
    Ok(Json(Value::Array(out)))
}

/// The version of upload tokens (see [`UploadClaims::v`]).
const UPLOAD_TOKEN_VERSION: u8 = 2;

/// How long a signed upload URL lasts (Supabase's default).
const SIGNED_UPLOAD_SECS: i64 = 2 * 60 * 60;

#[derive(Serialize, Deserialize)]
struct UploadClaims {
    /// `bucket/path`: the one object this token may write.
    url: String,
    /// Who signed: the upload is theirs (`None`: the service role's, an
    /// owner-less object).
    #[serde(default)]
    owner: Option<Uuid>,
    /// Whether it may replace an object there.
    upsert: bool,
    /// 2: made since objects are named by bucket and path; earlier tokens
    /// (none) named a per-owner path and are refused.
    #[serde(default)]
    v: Option<u8>,
    /// [`UPLOAD`].
    scope: String,
    iat: i64,
    exp: i64,
}

/// `POST /storage/v1/object/upload/sign/{bucket}/{path}` (`createSignedUploadUrl`,
/// `x-upsert` for `{upsert: true}`) → `{"url": "/object/upload/sign/…?token=…",
/// "token"}`: anyone holding the URL may upload that one object, as the
/// signer, for two hours.
pub(crate) async fn sign_upload(
    State(state): State<AppState>,
    Caller(p): Caller,
    ApiPath((bucket, path)): ApiPath<(String, String)>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<Value>, StorageApiError> {
    // storage-js sends `{}`; nothing in it is used.
    if !body.iter().all(u8::is_ascii_whitespace) {
        let v: Value = serde_json::from_slice(&body)
            .map_err(|e| StorageApiError::invalid(format!("invalid JSON body: {e}")))?;
        validate::json(&v)?;
    }
    let path = object_path(&path)?;
    let actor = writer(&p)?;
    state.storage.bucket(&bucket).await?;
    let upsert = upsert_header(&headers);
    state
        .storage
        .check_write(actor, &bucket, &path, upsert, &WriteFacts::default())
        .await?;
    let now = chrono::Utc::now().timestamp();
    let url = format!("{bucket}/{path}");
    let token = state.jwt.sign_json(&UploadClaims {
        url: url.clone(),
        owner: actor.owner(),
        upsert,
        v: Some(UPLOAD_TOKEN_VERSION),
        scope: UPLOAD.into(),
        iat: now,
        exp: now.saturating_add(SIGNED_UPLOAD_SECS),
    });
    // Not percent-encoded, as for `createSignedUrl`.
    Ok(Json(json!({
        "url": format!("/object/upload/sign/{url}?token={token}"),
        "token": token,
    })))
}

/// `PUT /storage/v1/object/upload/sign/{bucket}/{path}?token=…`
/// (`uploadToSignedUrl`): no key needed; the token names the object, its
/// owner and whether it may be replaced.
pub(crate) async fn upload_signed(
    State(state): State<AppState>,
    ApiPath((bucket, path)): ApiPath<(String, String)>,
    uri: axum::http::Uri,
    req: Request,
) -> Result<Json<UploadAnswer>, StorageApiError> {
    let claims: UploadClaims = verify_signed(&state, &uri)?;
    if claims.scope != UPLOAD {
        return Err(bad_signature("The token is not for uploads"));
    }
    let path = object_path(&path)?;
    if claims.url != format!("{bucket}/{path}") {
        return Err(bad_signature("The URL does not match the signature"));
    }
    if claims.v != Some(UPLOAD_TOKEN_VERSION) {
        return Err(bad_signature(
            "The token was made before objects were named by bucket and path: sign the URL again",
        ));
    }
    let actor = claims.owner.map_or(Actor::Service, Actor::User);
    let f = do_upload(state, actor, bucket.clone(), path, claims.upsert, req).await?;
    Ok(upload_answer(&bucket, &f))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_made_when_objects_were_per_owner_read_as_such() {
        // They parse (so the routes can refuse them with a reason)...
        let uid = Uuid::new_v4();
        let old: SignedClaims = serde_json::from_value(
            json!({"url": "b/p", "owner": uid, "scope": "download", "iat": 1, "exp": 2}),
        )
        .unwrap();
        assert_eq!((old.url.as_str(), old.id), ("b/p", None));
        let up: UploadClaims = serde_json::from_value(
            json!({"url": "b/p", "owner": null, "upsert": false, "scope": "upload", "iat": 1, "exp": 2}),
        )
        .unwrap();
        assert_eq!((up.owner, up.v), (None, None));
        // ...and new ones carry what the routes require.
        let id = Uuid::new_v4();
        let new = SignedClaims {
            url: "b/p".into(),
            id: Some(id),
            transform: None,
            scope: Some(DOWNLOAD.into()),
            iat: 1,
            exp: 2,
        };
        let back: SignedClaims =
            serde_json::from_value(serde_json::to_value(&new).unwrap()).unwrap();
        assert_eq!(back.id, Some(id));
    }
}
