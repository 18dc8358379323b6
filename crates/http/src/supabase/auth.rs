//! `/auth/v1`: GoTrue's email/password routes over [`aether_auth::AuthService`].
//!
//! Errors use GoTrue's 2024-01-01 body `{"code": "<error_code>", "message": …}`
//! with the `X-Supabase-Api-Version: 2024-01-01` header; auth-js only reads
//! `code` when that header is present (`handleError` in `lib/fetch.js`).

use axum::Json;
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{KeyError, check_api_key, request_key};
use crate::AppState;
use crate::auth::timestamp;
use crate::extract::bearer_token;
use crate::extract::{ApiQuery, Client};
use aether_auth::service::principal_user;
use aether_auth::{AuthError, Principal, Session, SignOutScope, UserProfile};

pub(crate) const API_VERSION: &str = "2024-01-01";

/// A GoTrue error: HTTP status, `code` (GoTrue's `ErrorCode`), message.
#[derive(Debug)]
pub(crate) struct GoTrueError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub weak_password: Option<Vec<&'static str>>,
}

impl GoTrueError {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        GoTrueError {
            status,
            code,
            message: message.into(),
            weak_password: None,
        }
    }
}

impl IntoResponse for GoTrueError {
    fn into_response(self) -> Response {
        let mut body = json!({"code": self.code, "message": self.message});
        if let Some(reasons) = self.weak_password {
            body["weak_password"] = json!({ "reasons": reasons });
        }
        let mut res = (self.status, Json(body)).into_response();
        res.headers_mut().insert(
            "x-supabase-api-version",
            HeaderValue::from_static(API_VERSION),
        );
        res
    }
}

/// GoTrue's code for an error that a shared layer answered in Aether's own
/// shape (rate limits, extractors, unknown routes): GoTrue's own codes only.
pub(crate) fn code_for_native(status: StatusCode, native: &str) -> &'static str {
    match native {
        "rate-limit/exceeded" => "over_request_rate_limit",
        "invalid_json" => "bad_json",
        _ if status.is_server_error() => "unexpected_failure",
        _ => "validation_failed",
    }
}

impl From<KeyError> for GoTrueError {
    fn from(e: KeyError) -> Self {
        GoTrueError::new(StatusCode::UNAUTHORIZED, "no_authorization", e.message())
    }
}

impl From<AuthError> for GoTrueError {
    fn from(e: AuthError) -> Self {
        let msg = e.to_string();
        match e {
            AuthError::InvalidCredentials => GoTrueError::new(
                StatusCode::BAD_REQUEST,
                "invalid_credentials",
                "Invalid login credentials",
            ),
            AuthError::EmailAlreadyExists => GoTrueError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "user_already_exists",
                "User already registered",
            ),
            AuthError::WeakPassword(why) => {
                let mut reasons = Vec::new();
                if why.contains("at least") || why.contains("at most") {
                    reasons.push("length");
                }
                if why.contains("include") {
                    reasons.push("characters");
                }
                GoTrueError {
                    status: StatusCode::UNPROCESSABLE_ENTITY,
                    code: "weak_password",
                    message: format!("Password is too weak: {why}"),
                    weak_password: Some(reasons),
                }
            }
            AuthError::InvalidEmail(why) => GoTrueError::new(
                StatusCode::BAD_REQUEST,
                "validation_failed",
                format!("Unable to validate email address: {why}"),
            ),
            AuthError::ExpiredToken => GoTrueError::new(
                StatusCode::FORBIDDEN,
                "bad_jwt",
                "invalid JWT: unable to parse or verify signature, token has invalid claims: token is expired",
            ),
            AuthError::InvalidToken(_) => GoTrueError::new(
                StatusCode::FORBIDDEN,
                "bad_jwt",
                format!("invalid JWT: unable to parse or verify signature, {msg}"),
            ),
            AuthError::RevokedToken => GoTrueError::new(
                StatusCode::FORBIDDEN,
                "session_not_found",
                "Session from session_id claim in JWT does not exist",
            ),
            AuthError::RefreshTokenNotFound => {
                GoTrueError::new(StatusCode::BAD_REQUEST, "refresh_token_not_found", msg)
            }
            AuthError::RefreshTokenReused => {
                GoTrueError::new(StatusCode::BAD_REQUEST, "refresh_token_already_used", msg)
            }
            AuthError::Internal(cause) => {
                tracing::error!(error = %cause, "internal error");
                GoTrueError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "unexpected_failure",
                    "Unexpected failure, please check server logs for more information",
                )
            }
        }
    }
}

/// A valid `apikey` (anon or service role): a check, nothing kept.
pub(crate) struct ApiKey;

impl FromRequestParts<AppState> for ApiKey {
    type Rejection = GoTrueError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, GoTrueError> {
        request_key(state, parts)?;
        Ok(ApiKey)
    }
}

/// A valid `apikey` and a signed-in user's access token in `Authorization`.
pub(crate) struct SignedIn(pub Principal);

impl FromRequestParts<AppState> for SignedIn {
    type Rejection = GoTrueError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, GoTrueError> {
        request_key(state, parts)?;
        let token = bearer_token(&parts.headers).ok_or_else(|| {
            GoTrueError::new(
                StatusCode::UNAUTHORIZED,
                "no_authorization",
                "This endpoint requires a valid Bearer token",
            )
        })?;
        let p = state.auth.authenticate(token).await?;
        if p.user_id.is_none() || p.role != aether_auth::Role::Authenticated {
            return Err(GoTrueError::new(
                StatusCode::FORBIDDEN,
                "bad_jwt",
                "invalid claim: missing sub claim",
            ));
        }
        Ok(SignedIn(p))
    }
}

/// GoTrue's user object.
pub(crate) fn user_json(u: &UserProfile) -> Value {
    let created = timestamp(&u.created_at);
    json!({
        "id": u.id.hyphenated().to_string(),
        "aud": "authenticated",
        "role": u.role,
        "email": u.email,
        "email_confirmed_at": created,
        "phone": "",
        "confirmed_at": created,
        "last_sign_in_at": u.last_sign_in_at.as_ref().map(timestamp),
        "app_metadata": u.app_metadata,
        "user_metadata": u.user_metadata,
        "identities": [],
        "created_at": created,
        "updated_at": timestamp(&u.updated_at),
        "is_anonymous": u.is_anonymous,
    })
}

async fn session_json(
    state: &AppState,
    user_id: uuid::Uuid,
    s: &Session,
) -> Result<Value, GoTrueError> {
    let profile = state
        .auth
        .profile(user_id)
        .await?
        .ok_or(AuthError::InvalidCredentials)?;
    let now = chrono::Utc::now().timestamp();
    Ok(json!({
        "access_token": s.access_token,
        "token_type": "bearer",
        "expires_in": (s.expires_at - now).max(1),
        "expires_at": s.expires_at,
        "refresh_token": s.refresh_token,
        "user": user_json(&profile),
    }))
}

fn invalid_body(message: &str) -> GoTrueError {
    GoTrueError::new(StatusCode::BAD_REQUEST, "bad_json", message)
}

/// Parses a JSON body; a NUL anywhere in it (which PostgreSQL text and jsonb
/// cannot hold) is GoTrue's `validation_failed`.
fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, GoTrueError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| invalid_body(&format!("Could not parse request body as JSON: {e}")))?;
    crate::validate::json(&v).map_err(validation_failed)?;
    T::deserialize(&v)
        .map_err(|e| invalid_body(&format!("Could not parse request body as JSON: {e}")))
}

fn validation_failed(e: impl std::fmt::Display) -> GoTrueError {
    GoTrueError::new(StatusCode::BAD_REQUEST, "validation_failed", e.to_string())
}

#[derive(Deserialize)]
pub(crate) struct SignupBody {
    email: Option<String>,
    phone: Option<String>,
    password: Option<String>,
    data: Option<Value>,
}

/// `POST /auth/v1/signup`: creates the user (email counts as confirmed: Aether
/// sends no mail) and answers with a session, as GoTrue does with autoconfirm.
pub(crate) async fn signup(
    State(state): State<AppState>,
    _key: ApiKey,
    Client(meta): Client,
    body: axum::body::Bytes,
) -> Result<Json<Value>, GoTrueError> {
    let b: SignupBody = parse_body(&body)?;
    if b.phone.is_some() && b.email.is_none() {
        return Err(GoTrueError::new(
            StatusCode::BAD_REQUEST,
            "phone_provider_disabled",
            "Phone signups are disabled",
        ));
    }
    let email = b.email.unwrap_or_default();
    let password = b.password.unwrap_or_default();
    // `signInAnonymously`: neither an email nor a password.
    if email.trim().is_empty() && password.is_empty() {
        let (user, session) = state
            .auth
            .sign_up_anonymously(b.data.as_ref(), &meta)
            .await?;
        return Ok(Json(session_json(&state, user.id, &session).await?));
    }
    if email.trim().is_empty() {
        return Err(GoTrueError::new(
            StatusCode::BAD_REQUEST,
            "validation_failed",
            "To signup, please provide your email",
        ));
    }
    if password.is_empty() {
        return Err(GoTrueError::new(
            StatusCode::BAD_REQUEST,
            "validation_failed",
            "Signup requires a valid password",
        ));
    }
    let (user, session) = state
        .auth
        .sign_up_with_metadata(&email, &password, b.data.as_ref(), &meta)
        .await?;
    Ok(Json(session_json(&state, user.id, &session).await?))
}

#[derive(Deserialize)]
pub(crate) struct TokenQuery {
    grant_type: Option<String>,
}

impl crate::validate::Validate for TokenQuery {}

#[derive(Deserialize)]
pub(crate) struct TokenBody {
    email: Option<String>,
    password: Option<String>,
    refresh_token: Option<String>,
}

/// `POST /auth/v1/token?grant_type=password|refresh_token`.
pub(crate) async fn token(
    State(state): State<AppState>,
    _key: ApiKey,
    Client(meta): Client,
    query: Result<ApiQuery<TokenQuery>, crate::error::ApiError>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, GoTrueError> {
    let grant = query
        .map_err(|e| validation_failed(e.message))?
        .0
        .grant_type
        .unwrap_or_default();
    let b: TokenBody = parse_body(&body)?;
    let (user, session) = match grant.as_str() {
        "password" => {
            let email = b.email.unwrap_or_default();
            let password = b.password.unwrap_or_default();
            state.auth.sign_in(&email, &password, &meta).await?
        }
        "refresh_token" => {
            let token = b.refresh_token.unwrap_or_default();
            if token.is_empty() {
                return Err(GoTrueError::new(
                    StatusCode::BAD_REQUEST,
                    "refresh_token_not_found",
                    "Invalid Refresh Token: Refresh Token Not Found",
                ));
            }
            state.auth.refresh(&token, &meta).await?
        }
        other => {
            return Err(GoTrueError::new(
                StatusCode::BAD_REQUEST,
                "validation_failed",
                format!("unsupported_grant_type: {other:?} (supported: password, refresh_token)"),
            ));
        }
    };
    Ok(Json(session_json(&state, user.id, &session).await?))
}

/// `GET /auth/v1/user`.
pub(crate) async fn user(
    State(state): State<AppState>,
    SignedIn(p): SignedIn,
) -> Result<Json<Value>, GoTrueError> {
    let id = principal_user(&p)?;
    let profile = state.auth.profile(id).await?.ok_or_else(|| {
        GoTrueError::new(
            StatusCode::NOT_FOUND,
            "user_not_found",
            "User from sub claim in JWT does not exist",
        )
    })?;
    Ok(Json(user_json(&profile)))
}

#[derive(Deserialize)]
pub(crate) struct LogoutQuery {
    scope: Option<String>,
}

impl crate::validate::Validate for LogoutQuery {}

/// `POST /auth/v1/logout?scope=global|local|others` → 204.
pub(crate) async fn logout(
    State(state): State<AppState>,
    Client(meta): Client,
    query: Result<ApiQuery<LogoutQuery>, crate::error::ApiError>,
    SignedIn(p): SignedIn,
) -> Result<StatusCode, GoTrueError> {
    let scope = match query
        .map_err(|e| validation_failed(e.message))?
        .0
        .scope
        .as_deref()
    {
        None | Some("global") => SignOutScope::Global,
        Some("local") => SignOutScope::Local,
        Some("others") => SignOutScope::Others,
        Some(other) => {
            return Err(GoTrueError::new(
                StatusCode::BAD_REQUEST,
                "validation_failed",
                format!("unsupported scope {other:?} (global, local, others)"),
            ));
        }
    };
    state.auth.sign_out_scoped(&p, scope, &meta).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /auth/v1/settings`: what this server offers.
pub(crate) async fn settings(_key: ApiKey) -> Json<Value> {
    Json(json!({
        "external": {"email": true, "phone": false},
        "disable_signup": false,
        "mailer_autoconfirm": true,
        "phone_autoconfirm": false,
        "sms_provider": "",
        "saml_enabled": false,
    }))
}

fn user_not_found() -> GoTrueError {
    GoTrueError::new(StatusCode::NOT_FOUND, "user_not_found", "User not found")
}

#[derive(Deserialize)]
pub(crate) struct UpdateUserBody {
    email: Option<String>,
    password: Option<String>,
    data: Option<Value>,
}

/// `PUT /auth/v1/user` (`auth.updateUser`): email, password, `data` (merged
/// into `user_metadata`).
pub(crate) async fn update_user(
    State(state): State<AppState>,
    Client(meta): Client,
    SignedIn(p): SignedIn,
    body: axum::body::Bytes,
) -> Result<Json<Value>, GoTrueError> {
    let b: UpdateUserBody = parse_body(&body)?;
    let id = principal_user(&p)?;
    let profile = state
        .auth
        .update_user(
            id,
            b.email.as_deref(),
            b.password.as_deref(),
            b.data.as_ref(),
            None,
            &meta,
        )
        .await?
        .ok_or_else(user_not_found)?;
    Ok(Json(user_json(&profile)))
}

/// A service-role key as `apikey` and as the bearer token: the admin API.
pub(crate) struct Admin;

impl FromRequestParts<AppState> for Admin {
    type Rejection = GoTrueError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, GoTrueError> {
        request_key(state, parts)?;
        let token = bearer_token(&parts.headers).unwrap_or_default();
        match check_api_key(state, Some(token)) {
            Ok(p) if p.is_service() => Ok(Admin),
            _ => Err(GoTrueError::new(
                StatusCode::FORBIDDEN,
                "not_admin",
                "User not allowed: the admin API needs a service_role key",
            )),
        }
    }
}

#[derive(Deserialize)]
pub(crate) struct AdminUserBody {
    email: Option<String>,
    password: Option<String>,
    user_metadata: Option<Value>,
    app_metadata: Option<Value>,
}

/// `POST /auth/v1/admin/users` (`auth.admin.createUser`).
pub(crate) async fn admin_create_user(
    State(state): State<AppState>,
    _admin: Admin,
    body: axum::body::Bytes,
) -> Result<Json<Value>, GoTrueError> {
    let b: AdminUserBody = parse_body(&body)?;
    let email = b.email.filter(|e| !e.trim().is_empty()).ok_or_else(|| {
        GoTrueError::new(
            StatusCode::BAD_REQUEST,
            "validation_failed",
            "To create a user, please provide an email",
        )
    })?;
    let profile = state
        .auth
        .create_user(
            &email,
            b.password.as_deref(),
            b.user_metadata.as_ref(),
            b.app_metadata.as_ref(),
        )
        .await
        .map_err(|e| match e {
            AuthError::EmailAlreadyExists => GoTrueError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "email_exists",
                "A user with this email address has already been registered",
            ),
            e => e.into(),
        })?;
    Ok(Json(user_json(&profile)))
}

#[derive(Deserialize)]
pub(crate) struct PageQuery {
    page: Option<i64>,
    per_page: Option<i64>,
}

impl crate::validate::Validate for PageQuery {}

/// `GET /auth/v1/admin/users?page=&per_page=` (`auth.admin.listUsers`).
pub(crate) async fn admin_list_users(
    State(state): State<AppState>,
    _admin: Admin,
    query: Result<ApiQuery<PageQuery>, crate::error::ApiError>,
) -> Result<Response, GoTrueError> {
    let q = query.map_err(|e| validation_failed(e.message))?.0;
    let page = q.page.unwrap_or(1).max(1);
    let per_page = q.per_page.unwrap_or(50).clamp(1, 1000);
    let (users, total) = state.auth.list_users(page, per_page).await?;
    let body = json!({
        "users": users.iter().map(user_json).collect::<Vec<_>>(),
        "aud": "authenticated",
    });
    let mut res = Json(body).into_response();
    if let Ok(v) = HeaderValue::from_str(&total.to_string()) {
        res.headers_mut().insert("x-total-count", v);
    }
    // GoTrue's pagination links; auth-js reads the total only beside them.
    let last = ((total + per_page - 1) / per_page).max(1);
    let link =
        |p: i64, rel: &str| format!("</admin/users?page={p}&per_page={per_page}>; rel=\"{rel}\"");
    let mut links = Vec::new();
    if page < last {
        links.push(link(page + 1, "next"));
    }
    links.push(link(last, "last"));
    if let Ok(v) = HeaderValue::from_str(&links.join(", ")) {
        res.headers_mut().insert("link", v);
    }
    Ok(res)
}

fn user_id(raw: &str) -> Result<uuid::Uuid, GoTrueError> {
    uuid::Uuid::parse_str(raw).map_err(|_| {
        GoTrueError::new(
            StatusCode::BAD_REQUEST,
            "validation_failed",
            "user id must be a UUID",
        )
    })
}

/// `GET /auth/v1/admin/users/{id}` (`auth.admin.getUserById`).
pub(crate) async fn admin_get_user(
    State(state): State<AppState>,
    _admin: Admin,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Json<Value>, GoTrueError> {
    let profile = state
        .auth
        .profile(user_id(&id)?)
        .await?
        .ok_or_else(user_not_found)?;
    Ok(Json(user_json(&profile)))
}

/// `PUT /auth/v1/admin/users/{id}` (`auth.admin.updateUserById`).
pub(crate) async fn admin_update_user(
    State(state): State<AppState>,
    _admin: Admin,
    Client(meta): Client,
    axum::extract::Path(id): axum::extract::Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, GoTrueError> {
    let b: AdminUserBody = parse_body(&body)?;
    let profile = state
        .auth
        .update_user(
            user_id(&id)?,
            b.email.as_deref(),
            b.password.as_deref(),
            b.user_metadata.as_ref(),
            b.app_metadata.as_ref(),
            &meta,
        )
        .await?
        .ok_or_else(user_not_found)?;
    Ok(Json(user_json(&profile)))
}

/// `DELETE /auth/v1/admin/users/{id}` (`auth.admin.deleteUser`): answers with
/// the user as it was.
pub(crate) async fn admin_delete_user(
    State(state): State<AppState>,
    _admin: Admin,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Json<Value>, GoTrueError> {
    let id = user_id(&id)?;
    let profile = state.auth.profile(id).await?.ok_or_else(user_not_found)?;
    state.storage.remove_owner(id).await.map_err(|e| {
        tracing::error!(error = %e, "removing a deleted user's files");
        GoTrueError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "unexpected_failure",
            "Unexpected failure, please check server logs for more information",
        )
    })?;
    if !state.auth.delete_user(id).await? {
        return Err(user_not_found());
    }
    Ok(Json(user_json(&profile)))
}

/// Any other `/auth/v1` path, in GoTrue's error format.
pub(crate) async fn not_found() -> GoTrueError {
    GoTrueError::new(StatusCode::NOT_FOUND, "not_found", "Not found")
}
