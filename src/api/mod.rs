//! HTTP routes. They read and write PostgreSQL and never push events themselves:
//! what subscribers see comes from the WAL.

pub mod error;
pub mod ops;

use axum::Router;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Query, State};
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use serde_json::json;

use crate::auth::{Principal, TokenError};
use crate::realtime::session;
use crate::server::AppState;
use error::ApiError;

/// The whole HTTP surface; tests build it around their own state.
pub fn app(state: AppState) -> Router {
    let ws_path = state.config.ws_path.clone();
    Router::new()
        .route("/health", get(health))
        .route(&ws_path, get(websocket))
        .route("/ws/status", get(ops::ws_status))
        .route("/ws/channels", axum::routing::post(ops::create_channel))
        .route("/metrics/connections", get(ops::metrics_connections))
        .route("/metrics/messages", get(ops::metrics_messages))
        .route("/metrics/channels", get(ops::metrics_channels))
        .route("/metrics/errors", get(ops::metrics_errors))
        .fallback(fallback)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
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

/// 200 once the replication stream is up and subscriptions are served; 503 before.
async fn health(State(state): State<AppState>) -> Response {
    let status = state.replication.borrow().clone();
    let body = json!({
        "status": if status.connected { "ok" } else { "starting" },
        "replication": {
            "connected": status.connected,
            "received_lsn": status.received.to_string(),
            "flushed_lsn": status.flushed.to_string(),
            "last_error": status.last_error,
        },
    });
    let code = if status.connected {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, axum::Json(body)).into_response()
}

#[derive(Deserialize)]
struct WsQuery {
    token: Option<String>,
    client_id: Option<String>,
    channel: Option<String>,
}

async fn websocket(
    State(state): State<AppState>,
    Query(q): Query<WsQuery>,
    axum::extract::ConnectInfo(addr): axum::extract::ConnectInfo<std::net::SocketAddr>,
    ws: WebSocketUpgrade,
) -> Response {
    // The session enforces `ws_max_frame_bytes` with an error frame and a 1009 close;
    // the library's own cap only stops absurd frames before they are buffered.
    let max = state
        .config
        .ws_max_frame_bytes
        .saturating_mul(16)
        .max(1 << 20);
    let ws = ws.max_message_size(max).max_frame_size(max);
    let principal = match q.token.as_deref().filter(|t| !t.is_empty()) {
        None => Ok(Principal::anonymous()),
        Some(token) => state.jwt.verify(token),
    };
    match principal {
        Ok(p) => {
            let params = session::ConnectParams {
                client_id: q.client_id,
                channel: q.channel,
                addr: Some(addr),
            };
            ws.on_upgrade(move |socket| session::run(socket, state, p, params))
        }
        Err(e) => {
            tracing::warn!(event = "token_refused", reason = %e, "websocket token refused");
            state.stats.error(match e {
                TokenError::Expired => "auth/expired-token",
                TokenError::Invalid(_) => "auth/invalid-token",
            });
            let code = match e {
                TokenError::Expired => "auth/expired-token",
                TokenError::Invalid(_) => "auth/invalid-token",
            };
            let message = e.to_string();
            ws.on_upgrade(move |socket| session::reject(socket, code, message))
        }
    }
}
