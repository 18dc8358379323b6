//! `/auth/*`: thin handlers over [`aether_auth::AuthService`].

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use chrono::SecondsFormat;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody};
use super::extract::{ApiJson, AuthUser, Client};
use crate::AppState;
use aether_auth::{Session, User};

#[derive(Deserialize, ToSchema)]
pub(crate) struct Credentials {
    #[schema(example = "alice@example.com")]
    pub email: String,
    #[schema(example = "correct horse 1")]
    pub password: String,
}

impl super::validate::Validate for Credentials {}

#[derive(Serialize, ToSchema)]
pub(crate) struct UserBody {
    #[schema(format = Uuid)]
    pub id: String,
    pub email: String,
    /// RFC 3339, UTC.
    #[schema(example = "2025-01-31T12:00:00.000Z")]
    pub created_at: String,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct SessionBody {
    /// A JWT: send it as `Authorization: Bearer …` and as `/ws?token=…`.
    pub access_token: String,
    /// Seconds since the Unix epoch.
    pub expires_at: i64,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct AuthResponse {
    pub user: UserBody,
    pub session: SessionBody,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct SuccessBody {
    pub success: bool,
}

pub(crate) fn timestamp(t: &chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn auth_response(user: User, session: Session) -> AuthResponse {
    AuthResponse {
        user: UserBody {
            id: user.id.hyphenated().to_string(),
            email: user.email,
            created_at: timestamp(&user.created_at),
        },
        session: SessionBody {
            access_token: session.access_token,
            expires_at: session.expires_at,
        },
    }
}

/// Create an account and sign in.
#[utoipa::path(
    post, path = "/auth/sign-up", tag = "auth",
    request_body = Credentials,
    responses(
        (status = 201, description = "Account created, session opened", body = AuthResponse),
        (status = 400, description = "`auth/weak-password`, `auth/invalid-email`, `invalid_json`, `invalid_body`, `invalid_characters`", body = ErrorBody),
        (status = 409, description = "`auth/email-already-exists`", body = ErrorBody),
        (status = 413, description = "`payload_too_large`: a body over 2 MB", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`: not JSON", body = ErrorBody),
        (status = 429, description = "`rate-limit/exceeded`", body = ErrorBody),
    )
)]
pub(crate) async fn sign_up(
    State(state): State<AppState>,
    Client(meta): Client,
    ApiJson(body): ApiJson<Credentials>,
) -> Result<(StatusCode, Json<AuthResponse>), ApiError> {
    let (user, session) = state
        .auth
        .sign_up(&body.email, &body.password, &meta)
        .await?;
    Ok((StatusCode::CREATED, Json(auth_response(user, session))))
}

/// Sign in with email and password.
#[utoipa::path(
    post, path = "/auth/sign-in", tag = "auth",
    request_body = Credentials,
    responses(
        (status = 200, description = "Session opened", body = AuthResponse),
        (status = 400, description = "`invalid_json`, `invalid_body`, `invalid_characters`", body = ErrorBody),
        (status = 401, description = "`auth/invalid-credentials`", body = ErrorBody),
        (status = 413, description = "`payload_too_large`: a body over 2 MB", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`: not JSON", body = ErrorBody),
        (status = 429, description = "`rate-limit/exceeded`", body = ErrorBody),
    )
)]
pub(crate) async fn sign_in(
    State(state): State<AppState>,
    Client(meta): Client,
    ApiJson(body): ApiJson<Credentials>,
) -> Result<Json<AuthResponse>, ApiError> {
    let (user, session) = state
        .auth
        .sign_in(&body.email, &body.password, &meta)
        .await?;
    Ok(Json(auth_response(user, session)))
}

/// Sign out: the token's session is revoked, and the token is refused from now on
/// by every route and by the WebSocket server.
#[utoipa::path(
    post, path = "/auth/sign-out", tag = "auth",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Signed out", body = SuccessBody),
        (status = 401, description = "`auth/missing-token`, `auth/invalid-token`, `auth/expired-token`, `auth/revoked-token`", body = ErrorBody),
        (status = 429, description = "`rate-limit/exceeded`", body = ErrorBody),
    )
)]
pub(crate) async fn sign_out(
    State(state): State<AppState>,
    user: AuthUser,
    Client(meta): Client,
) -> Result<Json<SuccessBody>, ApiError> {
    state.auth.sign_out(&user.principal, &meta).await?;
    Ok(Json(SuccessBody { success: true }))
}
