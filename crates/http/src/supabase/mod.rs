//! A Supabase-compatible facade, so `@supabase/supabase-js` can point
//! `createClient(url, anonKey)` at Aether: `/auth/v1` (GoTrue's email/password
//! routes) and `/storage/v1` (the storage API) over the same auth and storage
//! cores as the seed routes, and `/realtime/v1/websocket` (Phoenix channels,
//! in `aether_realtime::phoenix`) over the same router.
//!
//! Keys work as in Supabase: any JWT signed with `JWT_SECRET` whose `role` is
//! `anon` or `service_role` is a valid `apikey` ([`JwtKeys::api_key`] mints the
//! ones printed at start). `Authorization: Bearer` names who acts: a user's
//! access token, or an API key itself (a `service_role` key bypasses per-user
//! authorization). Wire shapes are matched against the client's shipped
//! source; see docs/supabase.md.
//!
//! [`JwtKeys::api_key`]: aether_auth::JwtKeys::api_key

pub(crate) mod auth;
pub(crate) mod realtime;
pub(crate) mod rest;
pub(crate) mod storage;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::request::Parts;
use axum::middleware;
use axum::routing::{get, post, put};

use crate::AppState;
use aether_auth::{Principal, Role};

/// The `/auth/v1` and `/storage/v1` routes.
pub(crate) fn routes(state: &AppState) -> Router<AppState> {
    let limited_auth = Router::new()
        .route("/auth/v1/signup", post(auth::signup))
        .route("/auth/v1/token", post(auth::token))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            crate::rate_limit::auth,
        ));
    let auth = Router::new()
        .route("/auth/v1/user", get(auth::user).put(auth::update_user))
        .route(
            "/auth/v1/admin/users",
            get(auth::admin_list_users).post(auth::admin_create_user),
        )
        .route(
            "/auth/v1/admin/users/{id}",
            get(auth::admin_get_user)
                .put(auth::admin_update_user)
                .delete(auth::admin_delete_user),
        )
        .route("/auth/v1/{*rest}", axum::routing::any(auth::not_found))
        .route("/auth/v1/logout", post(auth::logout))
        .route("/auth/v1/settings", get(auth::settings))
        .merge(limited_auth);
    let storage = Router::new()
        .route(
            "/storage/v1/bucket",
            get(storage::list_buckets).post(storage::create_bucket),
        )
        .route(
            "/storage/v1/bucket/{bucket}",
            get(storage::get_bucket)
                .put(storage::update_bucket)
                .delete(storage::delete_bucket),
        )
        .route(
            "/storage/v1/bucket/{bucket}/empty",
            post(storage::empty_bucket),
        )
        .route("/storage/v1/object/sign/{bucket}", post(storage::sign_many))
        .route("/storage/v1/object/list/{bucket}", post(storage::list))
        .route(
            "/storage/v1/object/list-v2/{bucket}",
            post(storage::list_v2),
        )
        .route("/storage/v1/object/move", post(storage::move_object))
        .route("/storage/v1/object/copy", post(storage::copy_object))
        .route(
            "/storage/v1/object/upload/sign/{bucket}/{*path}",
            post(storage::sign_upload)
                .merge(put(storage::upload_signed).layer(DefaultBodyLimit::disable())),
        )
        .route(
            "/storage/v1/object/sign/{bucket}/{*path}",
            post(storage::sign).get(storage::signed_get),
        )
        .route(
            "/storage/v1/object/public/{bucket}/{*path}",
            get(storage::public_get),
        )
        .route(
            "/storage/v1/render/image/authenticated/{bucket}/{*path}",
            get(storage::render_authenticated),
        )
        .route(
            "/storage/v1/render/image/public/{bucket}/{*path}",
            get(storage::render_public),
        )
        .route(
            "/storage/v1/render/image/sign/{bucket}/{*path}",
            get(storage::render_signed),
        )
        .route(
            "/storage/v1/object/authenticated/{bucket}/{*path}",
            get(storage::get_object),
        )
        .route(
            "/storage/v1/object/info/{bucket}/{*path}",
            get(storage::info),
        )
        .route(
            "/storage/v1/object/{bucket}",
            axum::routing::delete(storage::remove),
        )
        .route(
            "/storage/v1/object/{bucket}/{*path}",
            get(storage::get_object)
                .head(storage::get_object)
                .post(storage::upload)
                .put(storage::update)
                .layer(DefaultBodyLimit::disable()),
        )
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            crate::rate_limit::storage,
        ));
    Router::new()
        .merge(auth)
        .merge(storage)
        .merge(rest::routes())
}

/// Why an API key was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyError {
    Missing,
    Invalid,
}

impl KeyError {
    pub(crate) fn message(self) -> &'static str {
        match self {
            KeyError::Missing => "No API key found in request",
            KeyError::Invalid => "Invalid API key",
        }
    }
}

/// Checks an `apikey`: a JWT signed with `JWT_SECRET` whose role is `anon` or
/// `service_role`.
pub(crate) fn check_api_key(state: &AppState, key: Option<&str>) -> Result<Principal, KeyError> {
    let key = key.map(str::trim).filter(|k| !k.is_empty());
    let key = key.ok_or(KeyError::Missing)?;
    let p = state.jwt.verify(key).map_err(|_| KeyError::Invalid)?;
    match p.role {
        Role::Anon | Role::Service => Ok(p),
        Role::Authenticated => Err(KeyError::Invalid),
    }
}

/// The request's key: its `apikey`, or, when it has none, a valid bearer token
/// (Supabase's own services accept the bearer token alone). A user's token
/// stands for the anon key here; who acts is decided from the bearer token.
pub(crate) fn request_key(state: &AppState, parts: &Parts) -> Result<Principal, KeyError> {
    match api_key_of(parts) {
        Some(key) => check_api_key(state, Some(&key)),
        None => {
            let token = crate::extract::bearer_token(&parts.headers).ok_or(KeyError::Missing)?;
            let p = state.jwt.verify(token).map_err(|_| KeyError::Invalid)?;
            Ok(match p.role {
                Role::Anon | Role::Service => p,
                Role::Authenticated => Principal::anonymous(),
            })
        }
    }
}

/// The `apikey` header, else the `apikey` query parameter (what browsers use
/// for WebSockets and `<img src>`).
pub(crate) fn api_key_of(parts: &Parts) -> Option<String> {
    if let Some(v) = parts.headers.get("apikey").and_then(|v| v.to_str().ok()) {
        return Some(v.to_owned());
    }
    query_param(parts.uri.query().unwrap_or(""), "apikey")
}

pub(crate) fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then(|| decode_component(v))
    })
}

/// One percent-encoded query component (`+` is a space).
pub(crate) fn decode_component(s: &str) -> String {
    percent_encoding::percent_decode_str(&s.replace('+', " "))
        .decode_utf8_lossy()
        .into_owned()
}
