//! KingShare REST routes: shares of a file (create, list, revoke, fetch by token
//! without an account), WebSocket statistics and cleanup, operator notifications.
//! Share events reach owners through the WAL (see `realtime::kingshare`).

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

use super::error::ApiError;
use super::extract::{ApiJson, ApiPath, AuthUser};
use super::ops::ServiceRole;
use crate::AppState;
use aether_auth::Principal;
use aether_realtime::kingshare;
use aether_storage::FileRecord;
use aether_storage::path::ObjectPath;

/// Tells a file's owner that a download of it began.
pub(crate) fn download_started(state: &AppState, f: &FileRecord) {
    if let Some(owner) = f.owner_id {
        let frame = kingshare::message(
            "DownloadStarted",
            json!({"file_id": f.id.hyphenated().to_string(), "filename": f.name}),
        );
        state
            .realtime
            .kingshare
            .to_user(&owner.hyphenated().to_string(), &frame);
    }
}

fn share_error(status: StatusCode, code: &'static str, message: &str) -> ApiError {
    ApiError::new(status, code, message)
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub(crate) struct CreateShare {
    pub file_id: Uuid,
    /// Seconds from now; or `expires_at`.
    pub expires_in: Option<i64>,
    pub expires_at: Option<chrono::DateTime<chrono::Utc>>,
    pub shared_with: Option<Uuid>,
}

impl super::validate::Validate for CreateShare {}

const SHARE_COLUMNS: &str = "id::text, file_id::text, token, filename, shared_with::text,
    to_char(expires_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'),
    expired_at IS NOT NULL, revoked_at IS NOT NULL, access_count,
    to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')";

fn share_json(r: &tokio_postgres::Row) -> Value {
    let token: String = r.get(2);
    let expired: bool = r.get(6);
    let revoked: bool = r.get(7);
    json!({
        "id": r.get::<_, String>(0),
        "file_id": r.get::<_, String>(1),
        "token": token,
        "url": format!("/share/{token}"),
        "filename": r.get::<_, String>(3),
        "shared_with": r.get::<_, Option<String>>(4),
        "expires_at": r.get::<_, Option<String>>(5),
        "status": if revoked { "revoked" } else if expired { "expired" } else { "active" },
        "access_count": r.get::<_, i64>(8),
        "created_at": r.get::<_, String>(9),
    })
}

/// `POST /api/v1/shares`: share one of your files.
#[utoipa::path(post, path = "/api/v1/shares", tag = "shares", security(("bearer" = [])), request_body = CreateShare,
    responses((status = 201, description = "The share, with its token and url", body = serde_json::Value),
              (status = 400, description = "`share/invalid-expiry`, `share/invalid-user`, `invalid_json`, `invalid_body`, `invalid_characters`", body = super::error::ErrorBody),
              (status = 401, description = "`auth/*` token errors", body = super::error::ErrorBody),
              (status = 404, description = "`storage/not-found`: no such file of yours", body = super::error::ErrorBody),
              (status = 413, description = "`payload_too_large`: a body over 2 MB", body = super::error::ErrorBody),
              (status = 415, description = "`unsupported_media_type`: not JSON", body = super::error::ErrorBody)))]
pub(crate) async fn create(
    State(state): State<AppState>,
    user: AuthUser,
    ApiJson(req): ApiJson<CreateShare>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let expires_at = match (req.expires_in, req.expires_at) {
        (Some(s), _) if s <= 0 => {
            return Err(share_error(
                StatusCode::BAD_REQUEST,
                "share/invalid-expiry",
                "expires_in must be positive",
            ));
        }
        (Some(s), _) => {
            Some(chrono::Utc::now() + chrono::Duration::seconds(s.min(10 * 365 * 86_400)))
        }
        (None, Some(at)) if at <= chrono::Utc::now() => {
            return Err(share_error(
                StatusCode::BAD_REQUEST,
                "share/invalid-expiry",
                "expires_at is in the past",
            ));
        }
        (None, at) => at,
    };
    let client = state.pool.get().await.map_err(ApiError::internal)?;
    let row = client
        .query_opt(
            &format!(
                "INSERT INTO public.shares (file_id, owner_id, shared_with, token, filename, expires_at)
                 SELECT f.id, f.owner_id, $3::uuid, $4::text, f.name, $5::timestamptz FROM public.files f
                  WHERE f.id = $1 AND f.owner_id = $2
                 RETURNING {SHARE_COLUMNS}"
            ),
            &[&req.file_id, &user.id, &req.shared_with, &aether_auth::service::new_refresh_token(), &expires_at],
        )
        .await
        .map_err(|e| {
            if e.code() == Some(&tokio_postgres::error::SqlState::FOREIGN_KEY_VIOLATION) {
                share_error(StatusCode::BAD_REQUEST, "share/invalid-user", "shared_with is not a user")
            } else {
                ApiError::internal(e)
            }
        })?
        .ok_or_else(|| share_error(StatusCode::NOT_FOUND, "storage/not-found", "no such file of yours"))?;
    Ok((StatusCode::CREATED, Json(share_json(&row))))
}

/// `GET /api/v1/shares`: your shares, newest first.
#[utoipa::path(get, path = "/api/v1/shares", tag = "shares", security(("bearer" = [])),
    responses((status = 200, description = "Your shares", body = serde_json::Value),
              (status = 401, description = "`auth/*` token errors", body = super::error::ErrorBody)))]
pub(crate) async fn list(
    State(state): State<AppState>,
    user: AuthUser,
) -> Result<Json<Value>, ApiError> {
    let client = state.pool.get().await.map_err(ApiError::internal)?;
    let rows = client
        .query(
            &format!("SELECT {SHARE_COLUMNS} FROM public.shares WHERE owner_id = $1 ORDER BY created_at DESC LIMIT 1000"),
            &[&user.id],
        )
        .await
        .map_err(ApiError::internal)?;
    Ok(Json(
        json!({"shares": rows.iter().map(share_json).collect::<Vec<_>>()}),
    ))
}

/// `DELETE /api/v1/shares/{id}`: revoke one of your shares.
#[utoipa::path(delete, path = "/api/v1/shares/{id}", tag = "shares", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "Share id")),
    responses((status = 200, description = "Revoked", body = serde_json::Value),
              (status = 400, description = "`invalid_path`: not a share id", body = super::error::ErrorBody),
              (status = 401, description = "`auth/*` token errors", body = super::error::ErrorBody),
              (status = 404, description = "`share/not-found`", body = super::error::ErrorBody)))]
pub(crate) async fn revoke(
    State(state): State<AppState>,
    user: AuthUser,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<Value>, ApiError> {
    let client = state.pool.get().await.map_err(ApiError::internal)?;
    let n = client
        .execute(
            "UPDATE public.shares SET revoked_at = coalesce(revoked_at, now()) WHERE id = $1 AND owner_id = $2",
            &[&id, &user.id],
        )
        .await
        .map_err(ApiError::internal)?;
    if n == 0 {
        return Err(share_error(
            StatusCode::NOT_FOUND,
            "share/not-found",
            "no such share of yours",
        ));
    }
    Ok(Json(json!({"success": true})))
}

/// `GET /share/{token}`: the shared file's bytes, no account needed. Counts an
/// access (which the owner hears of as ShareAccessed).
#[utoipa::path(get, path = "/share/{token}", tag = "shares",
    params(("token" = String, Path, description = "Share token")),
    responses((status = 200, description = "The file's bytes, with their stored content type", content_type = "*/*", body = inline(super::openapi::FileBytes)),
              (status = 400, description = "`invalid_characters`: a NUL in the token", body = super::error::ErrorBody),
              (status = 404, description = "`share/not-found`", body = super::error::ErrorBody),
              (status = 410, description = "`share/expired`, `share/revoked`", body = super::error::ErrorBody)))]
pub(crate) async fn fetch(
    State(state): State<AppState>,
    ApiPath(token): ApiPath<String>,
) -> Result<Response, ApiError> {
    let client = state.pool.get().await.map_err(ApiError::internal)?;
    let row = client
        .query_opt(
            "UPDATE public.shares s SET access_count = access_count + 1, last_accessed_at = now()
               FROM public.files f
              WHERE s.token = $1 AND f.id = s.file_id
                AND s.revoked_at IS NULL AND s.expired_at IS NULL
                AND (s.expires_at IS NULL OR s.expires_at > now())
             RETURNING f.bucket_id, f.owner_id, f.path",
            &[&token],
        )
        .await
        .map_err(ApiError::internal)?;
    let Some(row) = row else {
        // Tell "gone" from "never existed".
        let state_row = client
            .query_opt(
                "SELECT revoked_at IS NOT NULL, expired_at IS NOT NULL OR expires_at <= now() FROM public.shares WHERE token = $1",
                &[&token],
            )
            .await
            .map_err(ApiError::internal)?;
        return Err(match state_row {
            Some(r) if r.get::<_, bool>(0) => {
                share_error(StatusCode::GONE, "share/revoked", "this share was revoked")
            }
            Some(_) => share_error(StatusCode::GONE, "share/expired", "this share has expired"),
            None => share_error(StatusCode::NOT_FOUND, "share/not-found", "no such share"),
        });
    };
    drop(client);
    let (bucket, path): (String, String) = (row.get(0), row.get(2));
    let path = ObjectPath::parse(&path).map_err(ApiError::internal)?;
    // The share is the permission: read as the service.
    let service = Principal::service();
    let read = state
        .storage
        .open(Some(&service), &bucket, &path, None)
        .await?;
    download_started(&state, &read.file);
    let f = &read.file;
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, &f.mime_type)
        .header(header::CONTENT_LENGTH, f.size)
        .header(header::X_CONTENT_TYPE_OPTIONS, "nosniff")
        .header(header::CACHE_CONTROL, "private, no-store")
        .header(
            header::CONTENT_DISPOSITION,
            format!(
                "attachment; filename*=UTF-8''{}",
                percent_encoding::utf8_percent_encode(&f.name, percent_encoding::NON_ALPHANUMERIC)
            ),
        )
        .body(Body::from_stream(read.body))
        .map_err(ApiError::internal)
        .map(IntoResponse::into_response)
}

/// `GET /api/v1/ws/stats` (service_role).
#[utoipa::path(get, path = "/api/v1/ws/stats", tag = "operations", security(("bearer" = [])),
    responses((status = 200, description = "total_connections, unique_users, connections_by_user", body = serde_json::Value),
              (status = 401, description = "No or bad token", body = super::error::ErrorBody),
              (status = 403, description = "`auth/forbidden`: not service_role", body = super::error::ErrorBody)))]
pub(crate) async fn stats(State(state): State<AppState>, _svc: ServiceRole) -> Json<Value> {
    let s = state.realtime.registry.stats();
    Json(json!({
        "total_connections": s.active,
        "unique_users": s.unique_users,
        "connections_by_user": s.connections_by_user,
    }))
}

/// `POST /api/v1/ws/cleanup` (service_role): closes connections that missed their
/// heartbeats (nothing heard for two ping intervals).
#[utoipa::path(post, path = "/api/v1/ws/cleanup", tag = "operations", security(("bearer" = [])),
    responses((status = 200, description = "removed_connections", body = serde_json::Value),
              (status = 401, description = "No or bad token", body = super::error::ErrorBody),
              (status = 403, description = "`auth/forbidden`: not service_role", body = super::error::ErrorBody)))]
pub(crate) async fn cleanup(State(state): State<AppState>, _svc: ServiceRole) -> Json<Value> {
    let removed = state
        .realtime
        .registry
        .reap(state.settings.ws_ping_interval * 2);
    Json(json!({"removed_connections": removed}))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub(crate) struct Notify {
    pub message: String,
    pub level: String,
    pub user_id: Option<Uuid>,
}

impl super::validate::Validate for Notify {}

/// `POST /api/v1/ws/notify` (service_role): a `SystemNotification` to every KingShare
/// connection, or to one user's.
#[utoipa::path(post, path = "/api/v1/ws/notify", tag = "operations", security(("bearer" = [])), request_body = Notify,
    responses((status = 200, description = "Sent", body = serde_json::Value),
              (status = 400, description = "`invalid_level`, `invalid_json`, `invalid_body`, `invalid_characters`", body = super::error::ErrorBody),
              (status = 401, description = "No or bad token", body = super::error::ErrorBody),
              (status = 403, description = "`auth/forbidden`: not service_role", body = super::error::ErrorBody),
              (status = 413, description = "`payload_too_large`: a body over 2 MB", body = super::error::ErrorBody),
              (status = 415, description = "`unsupported_media_type`: not JSON", body = super::error::ErrorBody)))]
pub(crate) async fn notify(
    State(state): State<AppState>,
    _svc: ServiceRole,
    ApiJson(req): ApiJson<Notify>,
) -> Result<Json<Value>, ApiError> {
    if !aether_realtime::kingshare::valid_level(&req.level) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_level",
            "level must be Info, Warning, Error or Success",
        ));
    }
    let frame = kingshare::message(
        "SystemNotification",
        json!({"message": req.message, "level": req.level}),
    );
    match req.user_id {
        Some(u) => state
            .realtime
            .kingshare
            .to_user(&u.hyphenated().to_string(), &frame),
        None => state.realtime.kingshare.to_all(&frame),
    }
    Ok(Json(json!({"success": true})))
}

/// Marks passed shares expired, every second; expiry is data, so this survives
/// restarts. Each marked share reaches its owner as ShareExpired through the WAL.
pub async fn expiry_job(
    pool: deadpool_postgres::Pool,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Ok(client) = pool.get().await else {
            continue;
        };
        if let Err(e) = client
            .execute(
                "UPDATE public.shares SET expired_at = now()
                  WHERE expired_at IS NULL AND revoked_at IS NULL AND expires_at <= now()",
                &[],
            )
            .await
        {
            let detail = e.as_db_error().map(|d| d.message().to_owned());
            tracing::warn!(error = %e, detail, "share expiry job");
        }
    }
}
