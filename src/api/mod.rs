//! HTTP routes. They read and write PostgreSQL and never push events themselves:
//! what subscribers see comes from the WAL.

pub mod error;

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

/// Initial read buffer of a WebSocket connection.
const READ_BUFFER_BYTES: usize = 4 * 1024;

#[derive(Deserialize)]
struct WsQuery {
    token: Option<String>,
}

async fn websocket(
    State(state): State<AppState>,
    Query(q): Query<WsQuery>,
    ws: WebSocketUpgrade,
) -> Response {
    let max = state.config.ws_max_frame_bytes;
    // Client frames are small (subscribe, unsubscribe); tungstenite's default 128 KiB
    // read buffer is allocated and touched per connection, which made it most of a
    // connection's memory. The buffer still grows for a larger frame (up to `max`).
    let ws = ws
        .max_message_size(max)
        .max_frame_size(max)
        .read_buffer_size(READ_BUFFER_BYTES);
    let principal = match q.token.as_deref().filter(|t| !t.is_empty()) {
        None => Ok(Principal::anonymous()),
        Some(token) => state.jwt.verify(token),
    };
    match principal {
        Ok(p) => ws.on_upgrade(move |socket| session::run(socket, state, p)),
        Err(e) => {
            tracing::info!(reason = %e, "websocket token refused");
            let code = match e {
                TokenError::Expired => "auth/expired-token",
                TokenError::Invalid(_) => "auth/invalid-token",
            };
            let message = e.to_string();
            ws.on_upgrade(move |socket| session::reject(socket, code, message))
        }
    }
}
