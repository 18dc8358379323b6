//! Aether's HTTP layer: the edge every connection goes through ([`edge`]), the
//! native routes (the seed APIs' auth, storage and KingShare routes, operations)
//! and the Supabase facade (`/auth/v1`, `/storage/v1`, `/rest/v1`,
//! `/realtime/v1`). Routes read and write PostgreSQL through the auth and
//! storage cores and never push events themselves: what subscribers see comes
//! from the WAL. Sockets are handed to the realtime crate's engine.
//!
//! Every error, axum's own rejections included, answers
//! `{"error":{"message","code","status"}}`: handlers use extractors whose
//! rejections are [`ApiError`]s, and [`json_errors`] rewrites any other error
//! response (405 from a method router, a panic, …) into that shape.

pub(crate) mod auth;
pub mod edge;
pub(crate) mod error;
pub(crate) mod extract;
pub(crate) mod kingshare;
pub(crate) mod openapi;
pub(crate) mod ops;
pub(crate) mod rate_limit;
mod state;
pub(crate) mod storage;
pub(crate) mod supabase;
pub(crate) mod validate;

pub use kingshare::expiry_job as share_expiry;
pub use ops::load_channels;
pub use rate_limit::{RateLimits, janitor as rate_limit_janitor};
pub use state::{AppState, ClusterNode, Operations, RowSecurityReport, Services, Settings};
pub use supabase::rest::listen_for_ddl;

use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Query, State};
use axum::http::{HeaderName, Method, StatusCode, Uri, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use serde::Deserialize;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::cors::{Any, CorsLayer};

use aether_auth::{AuthError, Principal};
use aether_realtime::session;
use error::ApiError;

/// The whole HTTP surface; tests build it around their own state.
pub fn app(state: AppState) -> Router {
    let ws_path = state.settings.ws_path.clone();
    let auth_routes = Router::new()
        .route("/auth/sign-up", post(auth::sign_up))
        .route("/auth/sign-in", post(auth::sign_in))
        .route("/auth/sign-out", post(auth::sign_out))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            rate_limit::auth,
        ));
    let storage_routes = Router::new()
        // Upload size is enforced while streaming (storage/file-too-large), not
        // by a body limit that would answer first.
        .route(
            "/storage/upload",
            post(storage::upload).layer(DefaultBodyLimit::disable()),
        )
        .route("/storage/list", get(storage::list))
        .route("/storage/delete", delete(storage::delete))
        .route(
            "/storage/object/{bucket}/{owner}/{*path}",
            get(storage::object),
        )
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            rate_limit::storage,
        ));
    Router::new()
        .route("/health", get(ops::health))
        .route("/openapi.json", get(openapi::serve))
        .route(&ws_path, get(websocket))
        .route(
            "/realtime/v1/websocket",
            get(crate::supabase::realtime::websocket),
        )
        .route(
            "/realtime/v1/api/broadcast",
            post(crate::supabase::realtime::http_broadcast),
        )
        .route(
            "/realtime/v1/api/broadcast/{topic}/events/{event}",
            post(crate::supabase::realtime::http_send),
        )
        .route("/ws/status", get(ops::ws_status))
        .route("/ws/channels", axum::routing::post(ops::create_channel))
        .route("/metrics/connections", get(ops::metrics_connections))
        .route("/metrics/messages", get(ops::metrics_messages))
        .route("/metrics/channels", get(ops::metrics_channels))
        .route("/metrics/errors", get(ops::metrics_errors))
        .route("/api/v1/ws/stats", get(kingshare::stats))
        .route("/api/v1/ws/cleanup", post(kingshare::cleanup))
        .route("/api/v1/ws/notify", post(kingshare::notify))
        .route(
            "/api/v1/shares",
            post(kingshare::create).get(kingshare::list),
        )
        .route("/api/v1/shares/{id}", delete(kingshare::revoke))
        .route("/share/{token}", get(kingshare::fetch))
        .merge(auth_routes)
        .merge(storage_routes)
        .merge(supabase::routes(&state))
        .fallback(fallback)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(json_errors))
        .layer(CatchPanicLayer::custom(|_| {
            ApiError::internal("a request handler panicked").into_response()
        }))
        .layer(cors())
        .with_state(state)
}

/// Browsers on other origins (a Vite dev server, …) may call every route.
fn cors() -> CorsLayer {
    CorsLayer::new()
        .allow_origin(Any)
        .allow_methods([
            Method::GET,
            Method::HEAD,
            Method::POST,
            Method::PUT,
            Method::DELETE,
            Method::OPTIONS,
        ])
        // `apikey`, `x-client-info`, `x-supabase-api-version`, `cache-control` and
        // `x-metadata` are what @supabase/supabase-js sends.
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::RANGE,
            header::CACHE_CONTROL,
            HeaderName::from_static("x-upsert"),
            HeaderName::from_static("apikey"),
            HeaderName::from_static("x-client-info"),
            HeaderName::from_static("x-supabase-api-version"),
            HeaderName::from_static("x-metadata"),
        ])
        .expose_headers([
            header::CONTENT_RANGE,
            header::CONTENT_LENGTH,
            header::ACCEPT_RANGES,
            header::CONTENT_DISPOSITION,
            header::RETRY_AFTER,
            HeaderName::from_static("x-supabase-api-version"),
        ])
        .max_age(Duration::from_secs(3600))
}

/// Which error format a route family answers in: Aether's own, GoTrue's under
/// `/auth/v1`, the storage API's under `/storage/v1` (docs/supabase.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Native,
    GoTrue,
    Storage,
}

impl Family {
    fn of(path: &str) -> Family {
        let under = |prefix: &str| {
            path.strip_prefix(prefix)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        };
        if under("/auth/v1") {
            Family::GoTrue
        } else if under("/storage/v1") {
            Family::Storage
        } else {
            Family::Native
        }
    }
}

/// Rewrites error responses into the route family's error body: axum's
/// plain-text rejections, the empty 405 of a layered route, and (under the
/// Supabase facades) Aether-shaped errors from shared layers such as the rate
/// limits or the extractors, keeping headers such as `Allow` and `Retry-After`.
/// Server-error text is never shown.
async fn json_errors(req: axum::extract::Request, next: middleware::Next) -> Response {
    let family = Family::of(req.uri().path());
    let res = next.run(req).await;
    let status = res.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return res;
    }
    let is_json = res
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json && family == Family::Native {
        return res;
    }
    let (parts, body) = res.into_parts();
    let bytes = axum::body::to_bytes(body, 64 * 1024)
        .await
        .unwrap_or_default();
    let native = if is_json {
        match serde_json::from_slice::<serde_json::Value>(&bytes) {
            // Already in the family's own shape.
            Ok(v) if !v["error"].is_object() => {
                return Response::from_parts(parts, axum::body::Body::from(bytes));
            }
            Ok(v) => Some(v),
            Err(_) => None,
        }
    } else {
        None
    };
    let (code, message) = match &native {
        Some(v) => (
            v["error"]["code"]
                .as_str()
                .unwrap_or("bad_request")
                .to_owned(),
            v["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        ),
        None => {
            let text = String::from_utf8_lossy(&bytes).trim().to_owned();
            let (code, default) = generic_error(status);
            let message = if text.is_empty() || status.is_server_error() {
                default.to_owned()
            } else {
                text
            };
            (code.to_owned(), message)
        }
    };
    let mut out = match family {
        Family::Native => ApiError::new(status, generic_error(status).0, message).into_response(),
        Family::GoTrue => supabase::auth::GoTrueError::new(
            status,
            supabase::auth::code_for_native(status, &code),
            message,
        )
        .into_response(),
        Family::Storage => {
            let (code, error) = supabase::storage::code_for_native(status, &code);
            supabase::storage::StorageApiError::new(status, code, error, message).into_response()
        }
    };
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE
            && name != header::CONTENT_LENGTH
            && !out.headers().contains_key(name)
        {
            out.headers_mut().append(name, value.clone());
        }
    }
    out
}

/// The code and message of an error response that has no body of its own.
fn generic_error(status: StatusCode) -> (&'static str, &'static str) {
    match status {
        StatusCode::NOT_FOUND => ("not_found", "no such route"),
        StatusCode::METHOD_NOT_ALLOWED => {
            ("method_not_allowed", "method not allowed on this route")
        }
        StatusCode::PAYLOAD_TOO_LARGE => ("payload_too_large", "request body too large"),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => {
            ("unsupported_media_type", "unsupported content type")
        }
        StatusCode::UNPROCESSABLE_ENTITY => ("invalid_body", "invalid request body"),
        StatusCode::TOO_MANY_REQUESTS => ("rate-limit/exceeded", "too many requests"),
        s if s.is_server_error() => ("internal_error", "internal server error"),
        _ => ("bad_request", "bad request"),
    }
}

async fn fallback(uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no route for {}", uri.path()),
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this route",
    )
}

#[derive(Deserialize)]
struct WsQuery {
    token: Option<String>,
    client_id: Option<String>,
    channel: Option<String>,
    /// `aether` or `kingshare` forces a dialect (also as a WebSocket subprotocol).
    protocol: Option<String>,
}

async fn websocket(
    State(state): State<AppState>,
    Query(q): Query<WsQuery>,
    extract::ClientAddr(addr): extract::ClientAddr,
    version: axum::http::Version,
    tcp: Option<axum::Extension<edge::Socket>>,
    ws: WebSocketUpgrade,
) -> Response {
    // Over HTTP/2 the TCP connection carries other streams too.
    let tcp = tcp
        .filter(|_| version == axum::http::Version::HTTP_11)
        .map(|t| t.0.0);
    // The session enforces `ws_max_frame_bytes` with an error frame and a 1009 close;
    // the library's own cap only stops absurd frames before they are buffered.
    let max = state
        .settings
        .ws_max_frame_bytes
        .saturating_mul(16)
        .max(1 << 20);
    // Client frames are small: see `engine::READ_BUFFER_BYTES`.
    let ws = ws
        .max_message_size(max)
        .max_frame_size(max)
        .read_buffer_size(aether_realtime::engine::READ_BUFFER_BYTES)
        .protocols(["kingshare", "aether"]);
    let subprotocol = ws
        .selected_protocol()
        .and_then(|p| p.to_str().ok())
        .map(str::to_owned);
    let vocabulary = session::Vocabulary::detect(
        q.protocol.as_deref().or(subprotocol.as_deref()),
        q.client_id.is_some(),
        q.channel.is_some(),
    );
    let principal = match q.token.as_deref().filter(|t| !t.is_empty()) {
        None => Ok(Principal::anonymous()),
        // A signed-out session's token, or a deleted user's, is refused like an
        // invalid one.
        Some(token) => state.auth.authenticate(token).await,
    };
    match principal {
        Ok(p) => {
            let params = session::ConnectParams {
                client_id: q.client_id,
                channel: q.channel,
                addr,
                vocabulary,
                tcp,
            };
            ws.on_upgrade(move |socket| session::run(socket, state.realtime.clone(), p, params))
        }
        Err(e) => {
            let (code, message) = match e {
                AuthError::Internal(cause) => {
                    tracing::error!(error = %cause, "websocket token check failed");
                    ("internal_error", "internal server error".to_owned())
                }
                e => {
                    tracing::warn!(event = "token_refused", reason = %e, "websocket token refused");
                    (e.code(), e.to_string())
                }
            };
            state.realtime.stats.error(code);
            ws.on_upgrade(move |socket| session::reject(socket, vocabulary, code, message))
        }
    }
}
