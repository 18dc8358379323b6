//! Operations endpoints of the Aether WebSocket API: status, channel management
//! and JSON metrics.

use std::time::Duration;

use axum::Json;
use axum::extract::{FromRequestParts, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse as _, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::oneshot;

use super::error::ApiError;
use crate::AppState;
use aether_realtime::hub::{ChannelConfig, HubCommand, HubStats, valid_channel_name};

/// A caller with a `service_role` token (`Authorization: Bearer …`): a
/// check, so the principal itself is not kept.
pub(crate) struct ServiceRole;

impl FromRequestParts<AppState> for ServiceRole {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = super::extract::bearer(parts)?.ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "auth/missing-token",
                "a bearer token is required",
            )
        })?;
        let refused = |e: aether_auth::AuthError| {
            tracing::warn!(event = "token_refused", reason = %e, "operations route");
            ApiError::from(e)
        };
        // The role first, from the signature alone: a user token is 403 here
        // without a query. A service_role token then takes the check every route
        // uses (no query unless it names a user or session).
        let role = state
            .jwt
            .verify(token)
            .map_err(|e| refused(aether_auth::AuthError::from(e)))?;
        let principal = if role.is_service() {
            state.auth.authenticate(token).await.map_err(refused)?
        } else {
            role
        };
        if !principal.is_service() {
            tracing::warn!(event = "forbidden", "operations route needs service_role");
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "auth/forbidden",
                "this route needs a service_role token",
            ));
        }
        Ok(ServiceRole)
    }
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Status {
    pub status: &'static str,
    pub connections: Connections,
    pub channels: Channels,
    pub replication: Replication,
    pub changelog: ChangeLogStatus,
    /// Cluster mode only: this node, the leader and every node, by name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<Value>,
    /// Published tables whose UPDATE and DELETE events carry only the key as
    /// the old row (no `REPLICA IDENTITY FULL`): a row moving out of a
    /// subscriber's view, or a DELETE, is judged on what the key says.
    pub tables_without_full_identity: Vec<String>,
    /// How the rows of each published table (other than Aether's own) are
    /// authorized, per role: `in_process` (its RLS policies compiled),
    /// `in_postgres` (evaluated by PostgreSQL over the decoded row, and why),
    /// `all_rows` or `no_rows`.
    pub row_security: std::collections::BTreeMap<String, Value>,
}

/// The durable change log, for operators: how far back `since` can go, how big
/// it is, how fast it appends.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ChangeLogStatus {
    pub epoch: String,
    /// Every change after this position is held.
    pub floor: String,
    pub oldest: Option<String>,
    pub newest: Option<String>,
    pub bytes: u64,
    pub records: u64,
    pub append_us: u64,
    pub fsync_us: u64,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Connections {
    pub active: usize,
    pub total: u64,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Channels {
    pub active: usize,
    pub messages_per_second: f64,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Replication {
    pub connected: bool,
    pub slot: String,
    pub lag_bytes: Option<i64>,
    pub lag_seconds: f64,
    pub received_lsn: String,
    pub flushed_lsn: String,
    /// WAL the slot makes PostgreSQL keep (from `pg_replication_slots`).
    pub wal_retained_bytes: Option<i64>,
    pub wal_status: Option<String>,
    /// Over `WAL_RETAINED_WARN_BYTES`.
    pub wal_warning: bool,
    pub last_error: Option<String>,
    pub advice: Option<String>,
}

pub(crate) async fn hub_stats(state: &AppState) -> HubStats {
    let (reply, rx) = oneshot::channel();
    if state
        .realtime
        .hub
        .send(HubCommand::Stats { reply })
        .await
        .is_err()
    {
        return HubStats::default();
    }
    tokio::time::timeout(Duration::from_secs(2), rx)
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default()
}

/// healthy | degraded (replication disconnected or behind) | down (shutting down).
/// [`status`], reused for a second: what a WebSocket client's `system/status`
/// frame gets, so a client sending them in a loop costs no query per frame.
pub(crate) async fn status_cached(state: &AppState) -> Status {
    if let Ok(c) = state.status_cache.lock()
        && let Some((at, s)) = c.as_ref()
        && at.elapsed() < std::time::Duration::from_secs(1)
    {
        return s.clone();
    }
    let s = status(state).await;
    if let Ok(mut c) = state.status_cache.lock() {
        *c = Some((std::time::Instant::now(), s.clone()));
    }
    s
}

/// The status a socket's `system`/`status` request gets: the server's, through
/// a weak handle (the server holds the realtime side that asks).
pub(crate) struct ServerStatusReport(pub(crate) std::sync::Weak<crate::state::Inner>);

impl aether_realtime::StatusReport for ServerStatusReport {
    fn status(&self) -> aether_realtime::BoxFuture<'_, aether_realtime::ServerStatus> {
        Box::pin(async move {
            let Some(state) = AppState::upgrade(&self.0) else {
                return aether_realtime::ServerStatus {
                    status: "down".into(),
                    report: json!({"status": "down"}),
                };
            };
            let s = status_cached(&state).await;
            aether_realtime::ServerStatus {
                status: s.status.into(),
                report: serde_json::to_value(&s).unwrap_or(Value::Null),
            }
        })
    }
}

pub(crate) async fn status(state: &AppState) -> Status {
    let ops = &state.operations;
    let conns = state.realtime.registry.stats();
    let hub = hub_stats(state).await;
    let repl = ops.replication.borrow().clone();
    let lag_bytes = match state.pool.get().await {
        Ok(client) => client
            .query_one(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::text::pg_lsn)::int8",
                &[&repl.received.to_string()],
            )
            .await
            .ok()
            .map(|r| r.get::<_, i64>(0).max(0)),
        Err(_) => None,
    };
    let lag_seconds = match (lag_bytes, repl.last_commit_ms) {
        (Some(b), Some(ms)) if b > 0 => {
            ((chrono::Utc::now().timestamp_millis() - ms).max(0) as f64) / 1000.0
        }
        _ => 0.0,
    };
    metrics::gauge!("aether_replication_lag_bytes").set(lag_bytes.unwrap_or(0) as f64);
    metrics::gauge!("aether_replication_lag_seconds").set(lag_seconds);
    let slot = ops.slot_health.borrow().clone();
    let log = ops.log_status.borrow().clone();
    let bounds = ops.log.bounds();
    metrics::gauge!("aether_changelog_bytes").set(bounds.bytes as f64);
    metrics::gauge!("aether_changelog_records").set(bounds.records as f64);
    let tables_without_full_identity = match state.pool.get().await {
        Ok(client) => client
            .query(
                "SELECT pt.schemaname || '.' || pt.tablename
                   FROM pg_publication_tables pt
                   JOIN pg_namespace n ON n.nspname = pt.schemaname
                   JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = pt.tablename
                  WHERE pt.pubname = $1 AND c.relreplident <> 'f'
                  ORDER BY 1",
                &[&state.settings.publication],
            )
            .await
            .map(|rows| rows.iter().map(|r| r.get::<_, String>(0)).collect())
            .unwrap_or_default(),
        Err(_) => Vec::new(),
    };
    let cluster = match &ops.cluster {
        Some(c) => Some(c.members(&state.pool).await),
        None => None,
    };
    let streams = ops.cluster.as_ref().is_none_or(|c| c.is_leader());
    let cluster_problem = ops.cluster.as_ref().and_then(|c| c.problem());
    let status = if ops.shutdown.is_cancelled() {
        "down"
    } else if (streams && !repl.connected)
        || cluster_problem.is_some()
        || lag_seconds > state.settings.degraded_lag.as_secs_f64()
        || slot.wal_warning
        || slot.db_error.is_some()
        || log.error.is_some()
    {
        "degraded"
    } else {
        "healthy"
    };
    Status {
        status,
        connections: Connections {
            active: conns.active,
            total: conns.total,
        },
        channels: Channels {
            active: hub.active,
            messages_per_second: hub.messages_per_second,
        },
        replication: Replication {
            connected: repl.connected,
            slot: state.settings.replication_slot.clone(),
            lag_bytes,
            lag_seconds,
            received_lsn: repl.received.to_string(),
            flushed_lsn: repl.flushed.to_string(),
            wal_retained_bytes: slot.wal_retained,
            wal_status: slot.wal_status,
            wal_warning: slot.wal_warning,
            last_error: repl.last_error,
            advice: repl.advice,
        },
        changelog: ChangeLogStatus {
            epoch: bounds.epoch.to_string(),
            floor: bounds.floor.to_string(),
            oldest: bounds.oldest.map(|p| p.to_string()),
            newest: bounds.newest.map(|p| p.to_string()),
            bytes: bounds.bytes,
            records: bounds.records,
            append_us: log.append_us,
            fsync_us: log.sync_us,
            error: log.error,
        },
        cluster,
        tables_without_full_identity,
        row_security: ops.row_security.report(),
    }
}

#[utoipa::path(get, path = "/ws/status", tag = "realtime",
    responses((status = 200, description = "healthy | degraded | down, connections, channels, replication lag", body = serde_json::Value)))]
pub(crate) async fn ws_status(State(state): State<AppState>) -> Json<Status> {
    Json(status(&state).await)
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub(crate) struct ChannelRequest {
    pub name: String,
    pub max_connections: Option<i64>,
    pub message_rate_limit: Option<i64>,
    #[serde(default)]
    pub require_auth: bool,
}

/// Creates or reconfigures a channel; stored in `aether.channels`.
#[utoipa::path(post, path = "/ws/channels", tag = "realtime", security(("bearer" = [])),
    request_body = ChannelRequest,
    responses(
        (status = 201, description = "Created", body = serde_json::Value),
        (status = 200, description = "Reconfigured", body = serde_json::Value),
        (status = 400, description = "`invalid_channel`, `invalid_request`", body = super::error::ErrorBody),
        (status = 401, description = "No or bad token", body = super::error::ErrorBody),
        (status = 403, description = "Not service_role", body = super::error::ErrorBody),
    ))]
pub(crate) async fn create_channel(
    State(state): State<AppState>,
    _svc: ServiceRole,
    body: Result<Json<ChannelRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let Json(req) =
        body.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", e.body_text()))?;
    if !valid_channel_name(&req.name) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_channel",
            "channel name must be 1-128 of letters, digits, ':', '.', '_', '-'",
        ));
    }
    let positive = |v: Option<i64>, field: &str| -> Result<Option<i32>, ApiError> {
        match v {
            None => Ok(None),
            Some(n) if n > 0 && n <= i64::from(i32::MAX) => Ok(Some(n as i32)),
            Some(_) => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                format!("{field} must be a positive number"),
            )),
        }
    };
    let max = positive(req.max_connections, "max_connections")?;
    let rate = positive(req.message_rate_limit, "message_rate_limit")?;
    let client = state.pool.get().await.map_err(ApiError::internal)?;
    let row = client
        .query_one(
            "INSERT INTO aether.channels (name, max_connections, message_rate_limit, require_auth)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (name) DO UPDATE SET max_connections = EXCLUDED.max_connections,
                 message_rate_limit = EXCLUDED.message_rate_limit, require_auth = EXCLUDED.require_auth
             RETURNING (xmax = 0) AS created, to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'),
                       to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')",
            &[&req.name, &max, &rate, &req.require_auth],
        )
        .await
        .map_err(ApiError::internal)?;
    // The WAL brings the same row to the router; applying it here as well means
    // the caller's next join already sees it.
    let config = ChannelConfig {
        max_connections: max.map(|n| n as u32),
        message_rate_limit: rate.map(|n| n as u32),
        require_auth: req.require_auth,
    };
    if let Ok(mut c) = state.channels.write() {
        c.insert(req.name.clone(), config);
    }
    let created: bool = row.get(0);
    let body = json!({
        "name": req.name, "max_connections": max, "message_rate_limit": rate, "require_auth": req.require_auth,
        "created_at": row.get::<_, String>(1), "updated_at": row.get::<_, String>(2),
    });
    Ok((
        if created {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        },
        Json(body),
    ))
}

#[utoipa::path(get, path = "/metrics/connections", tag = "operations", security(("bearer" = [])),
    responses((status = 200, description = "active, total, unique_users, connections_by_user", body = serde_json::Value),
              (status = 401, description = "No or bad token", body = super::error::ErrorBody),
              (status = 403, description = "Not service_role", body = super::error::ErrorBody)))]
pub(crate) async fn metrics_connections(
    State(state): State<AppState>,
    _svc: ServiceRole,
) -> Json<Value> {
    Json(json!(state.realtime.registry.stats()))
}

#[utoipa::path(get, path = "/metrics/messages", tag = "operations", security(("bearer" = [])),
    responses((status = 200, description = "frames in/out, changes delivered, channel messages", body = serde_json::Value),
              (status = 401, description = "No or bad token", body = super::error::ErrorBody),
              (status = 403, description = "Not service_role", body = super::error::ErrorBody)))]
pub(crate) async fn metrics_messages(
    State(state): State<AppState>,
    _svc: ServiceRole,
) -> Json<Value> {
    use std::sync::atomic::Ordering::Relaxed;
    let hub = hub_stats(&state).await;
    Json(json!({
        "frames_in": state.realtime.stats.frames_in.load(Relaxed),
        "frames_out": state.realtime.stats.frames_out.load(Relaxed),
        "changes_delivered": state.realtime.stats.changes_delivered.load(Relaxed),
        "changes_direct": state.realtime.stats.changes_direct.load(Relaxed),
        "channel_messages_total": hub.messages_total,
        "channel_messages_per_second": hub.messages_per_second,
    }))
}

#[utoipa::path(get, path = "/metrics/channels", tag = "operations", security(("bearer" = [])),
    responses((status = 200, description = "active channels, members, configuration", body = serde_json::Value),
              (status = 401, description = "No or bad token", body = super::error::ErrorBody),
              (status = 403, description = "Not service_role", body = super::error::ErrorBody)))]
pub(crate) async fn metrics_channels(
    State(state): State<AppState>,
    _svc: ServiceRole,
) -> Json<Value> {
    let hub = hub_stats(&state).await;
    let configs = state.channels.read().map(|c| c.clone()).unwrap_or_default();
    Json(json!({
        "active": hub.active,
        "messages_per_second": hub.messages_per_second,
        "members": hub.members,
        "configured": configs,
    }))
}

#[utoipa::path(get, path = "/metrics/errors", tag = "operations", security(("bearer" = [])),
    responses((status = 200, description = "error counts by code", body = serde_json::Value),
              (status = 401, description = "No or bad token", body = super::error::ErrorBody),
              (status = 403, description = "Not service_role", body = super::error::ErrorBody)))]
pub(crate) async fn metrics_errors(
    State(state): State<AppState>,
    _svc: ServiceRole,
) -> Json<Value> {
    let errors = state.realtime.stats.errors();
    let total: u64 = errors.values().sum();
    Json(json!({"total": total, "by_code": errors}))
}

/// Loads `aether.channels` at start.
pub async fn load_channels(
    client: &tokio_postgres::Client,
) -> Result<std::collections::HashMap<String, ChannelConfig>, tokio_postgres::Error> {
    Ok(client
        .query(
            "SELECT name, max_connections, message_rate_limit, require_auth FROM aether.channels",
            &[],
        )
        .await?
        .iter()
        .map(|r| {
            let max: Option<i32> = r.get(1);
            let rate: Option<i32> = r.get(2);
            (
                r.get::<_, String>(0),
                ChannelConfig {
                    max_connections: max.map(|n| n.max(1) as u32),
                    message_rate_limit: rate.map(|n| n.max(1) as u32),
                    require_auth: r.get(3),
                },
            )
        })
        .collect())
}

/// 200 once the replication stream is up and subscriptions are served; 503 before.
#[utoipa::path(
    get, path = "/health", tag = "system",
    responses(
        (status = 200, description = "Replication is connected", body = serde_json::Value),
        (status = 503, description = "Starting: replication not connected yet", body = serde_json::Value),
    )
)]
pub(crate) async fn health(State(state): State<AppState>) -> Response {
    let ops = &state.operations;
    let status = ops.replication.borrow().clone();
    let slot = ops.slot_health.borrow().clone();
    let log = ops.log_status.borrow().clone();
    // Every reason subscriptions cannot be served as promised right now.
    let mut reasons: Vec<String> = Vec::new();
    if let Some(why) = ops.failed.lock().ok().and_then(|f| f.clone()) {
        reasons.push(why);
    }
    if ops.shutdown.is_cancelled() {
        reasons.push("shutting down".into());
    }
    // A standby node has no replication stream of its own: it serves what the
    // leader appends to the cluster's stream, and is healthy while it reads it.
    let streams = ops.cluster.as_ref().is_none_or(|c| c.is_leader());
    if let Some(why) = ops.cluster.as_ref().and_then(|c| c.problem()) {
        reasons.push(why);
    }
    if streams && !status.connected {
        reasons.push(match (&status.last_error, &status.advice) {
            (Some(e), Some(a)) => format!("replication is not streaming: {e} ({a})"),
            (Some(e), None) => format!("replication is not streaming: {e}"),
            _ => "replication is not streaming yet".into(),
        });
    }
    if let Some(e) = &slot.db_error {
        reasons.push(format!("the database does not answer queries: {e}"));
    }
    if let Some(e) = &log.error {
        reasons.push(format!("the change log is not writable: {e}"));
    }
    let bounds = ops.log.bounds();
    let body = json!({
        "status": if reasons.is_empty() { "ok" } else { "unavailable" },
        "reasons": reasons,
        "replication": {
            "connected": status.connected,
            "received_lsn": status.received.to_string(),
            "flushed_lsn": status.flushed.to_string(),
            "last_error": status.last_error,
            "advice": status.advice,
            "wal_retained_bytes": slot.wal_retained,
        },
        "changelog": {
            "epoch": bounds.epoch.to_string(),
            "newest": bounds.newest.map(|p| p.to_string()),
        },
        "cluster": ops.cluster.as_ref().map(|c| json!({
            "node": c.node(),
            "leader": c.is_leader(),
        })),
    });
    let code = if reasons.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, axum::Json(body)).into_response()
}
