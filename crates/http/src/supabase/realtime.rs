//! The HTTP side of Supabase Realtime (`/realtime/v1`): the WebSocket upgrade
//! (the socket itself is `aether_realtime::phoenix`) and REST broadcast.

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Value, json};

use super::check_api_key;
use crate::AppState;
use crate::extract::ClientAddr;
use aether_core::principal::Principal;
use aether_realtime::engine;
use aether_realtime::phoenix::{self, Vsn};
use aether_realtime::phoenix_hub::{BroadcastPayload, PhxCommand};

#[derive(Deserialize)]
pub(crate) struct ConnectQuery {
    apikey: Option<String>,
    vsn: Option<String>,
}

/// `GET /realtime/v1/websocket?apikey=…&vsn=1.0.0|2.0.0`.
pub(crate) async fn websocket(
    State(state): State<AppState>,
    Query(q): Query<ConnectQuery>,
    ClientAddr(addr): ClientAddr,
    ws: WebSocketUpgrade,
) -> Response {
    let principal = match check_api_key(&state, q.apikey.as_deref()) {
        Ok(p) => p,
        Err(e) => {
            return (
                StatusCode::UNAUTHORIZED,
                axum::Json(json!({"message": e.message()})),
            )
                .into_response();
        }
    };
    let vsn = match q.vsn.as_deref() {
        None | Some("1.0.0") => Vsn::V1,
        Some("2.0.0") => Vsn::V2,
        Some(other) => {
            return (
                StatusCode::BAD_REQUEST,
                axum::Json(json!({"message": format!("unsupported vsn {other:?} (1.0.0, 2.0.0)")})),
            )
                .into_response();
        }
    };
    let max = state
        .settings
        .ws_max_frame_bytes
        .saturating_mul(16)
        .max(1 << 20);
    // The same caps as `/ws`: frames past `ws_max_frame_bytes` get a 1009 close
    // from the engine, and the same small read buffer.
    ws.max_message_size(max)
        .max_frame_size(max)
        .read_buffer_size(engine::READ_BUFFER_BYTES)
        .on_upgrade(move |socket| {
            phoenix::run(socket, state.realtime.clone(), principal, vsn, addr)
        })
}

fn rest_error(status: StatusCode, message: &str) -> Response {
    (
        status,
        axum::Json(json!({"error": message, "message": message})),
    )
        .into_response()
}

/// The `apikey` (header or query) and, when given, the bearer token of a REST
/// broadcast: a bad bearer token is refused like a bad key.
/// The caller of a broadcast route: the bearer token's, else the API key's.
async fn rest_caller(
    state: &AppState,
    headers: &HeaderMap,
    query: &str,
) -> Result<Principal, Response> {
    let key = headers
        .get("apikey")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| crate::supabase::query_param(query, "apikey"));
    check_api_key(state, key.as_deref())
        .map_err(|e| rest_error(StatusCode::UNAUTHORIZED, e.message()))?;
    if let Some(token) = crate::extract::bearer_token(headers)
        && Some(token) != key.as_deref().map(str::trim)
    {
        return state
            .auth
            .authenticate(token)
            .await
            .map_err(|e| rest_error(StatusCode::UNAUTHORIZED, &e.to_string()));
    }
    key.and_then(|k| state.jwt.verify(k.trim()).ok())
        .ok_or_else(|| {
            rest_error(
                StatusCode::UNAUTHORIZED,
                "an apikey or a bearer token is required",
            )
        })
}

/// A private channel's broadcast from the REST API: only with its policies'
/// write right for the caller.
async fn private_allowed(
    state: &AppState,
    caller: &Principal,
    sub_topic: &str,
) -> Result<(), Response> {
    match state
        .realtime
        .channel_policy
        .rights(caller, sub_topic)
        .await
    {
        Ok(r) if r.broadcast => Ok(()),
        Ok(_) => Err(rest_error(
            StatusCode::FORBIDDEN,
            &format!(
                "Unauthorized: You do not have permissions to write to this Channel topic: {sub_topic}"
            ),
        )),
        Err(why) => {
            tracing::error!(error = %why, "private channel authorization");
            Err(rest_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the channel's policies could not be checked",
            ))
        }
    }
}

async fn rest_relay(
    state: &AppState,
    sub_topic: &str,
    private: bool,
    event: String,
    payload: BroadcastPayload,
) {
    let _ = state
        .realtime
        .phoenix
        .send(PhxCommand::Broadcast {
            from: aether_realtime::phoenix_hub::Sender::Api,
            topic: aether_realtime::phoenix_hub::hub_topic(
                &format!("realtime:{sub_topic}"),
                private,
            ),
            event,
            payload,
        })
        .await;
}

/// `POST /realtime/v1/api/broadcast` `{"messages":[{topic, event, payload,
/// private}]}` (what `channel.send` falls back to when not joined): 202.
/// `topic` is the channel name without `realtime:`.
pub(crate) async fn http_broadcast(
    State(state): State<AppState>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let caller = match rest_caller(&state, &headers, uri.query().unwrap_or("")).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let Ok(v) = serde_json::from_slice::<Value>(&body) else {
        return rest_error(StatusCode::BAD_REQUEST, "the body is not JSON");
    };
    let Some(messages) = v.get("messages").and_then(Value::as_array) else {
        return rest_error(StatusCode::BAD_REQUEST, "expected {\"messages\": [...]}");
    };
    let mut relays = Vec::with_capacity(messages.len());
    for m in messages {
        let (Some(topic), Some(event)) = (
            m.get("topic").and_then(Value::as_str),
            m.get("event").and_then(Value::as_str),
        ) else {
            return rest_error(
                StatusCode::BAD_REQUEST,
                "every message needs a topic and an event",
            );
        };
        let private = m.get("private").and_then(Value::as_bool) == Some(true);
        if private && let Err(r) = private_allowed(&state, &caller, topic).await {
            return r;
        }
        let payload = m.get("payload").cloned().unwrap_or(json!({}));
        relays.push((topic.to_owned(), private, event.to_owned(), payload));
    }
    for (topic, private, event, payload) in relays {
        rest_relay(
            &state,
            &topic,
            private,
            event,
            BroadcastPayload::Json(payload),
        )
        .await;
    }
    StatusCode::ACCEPTED.into_response()
}

/// `POST /realtime/v1/api/broadcast/{topic}/events/{event}` (`channel.httpSend`):
/// the body is the payload, JSON or (`application/octet-stream`) bytes. 202.
pub(crate) async fn http_send(
    State(state): State<AppState>,
    axum::extract::Path((topic, event)): axum::extract::Path<(String, String)>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let query = uri.query().unwrap_or("");
    let caller = match rest_caller(&state, &headers, query).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let private = crate::supabase::query_param(query, "private").as_deref() == Some("true");
    if private && let Err(r) = private_allowed(&state, &caller, &topic).await {
        return r;
    }
    let binary = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/octet-stream"));
    let payload = if binary {
        BroadcastPayload::Binary(body)
    } else {
        match serde_json::from_slice(&body) {
            Ok(v) => BroadcastPayload::Json(v),
            Err(_) => return rest_error(StatusCode::BAD_REQUEST, "the body is not JSON"),
        }
    };
    rest_relay(&state, &topic, private, event, payload).await;
    StatusCode::ACCEPTED.into_response()
}
