//! Extractors whose rejections are [`ApiError`]s, so no plain-text axum rejection
//! reaches a client, and the auth extractors.

use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Request};
use axum::http::header;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;
use uuid::Uuid;

use super::error::ApiError;
use super::validate::{self, Validate};
use crate::AppState;
use aether_auth::{ClientMeta, Principal, service::principal_user};

/// `axum::Json` with the JSON error body on rejection. The body is checked
/// before a handler sees it: the type's own field checks ([`Validate`]), then
/// no NUL in any string or key (PostgreSQL text cannot hold one).
pub(crate) struct ApiJson<T>(pub T);

impl<T: DeserializeOwned + Validate, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let axum::Json(v) = axum::Json::<serde_json::Value>::from_request(req, state)
            .await
            .map_err(ApiError::from)?;
        let t = T::deserialize(&v).map_err(|e| {
            ApiError::bad_request(
                "invalid_body",
                format!("Failed to deserialize the JSON body into the target type: {e}"),
            )
        })?;
        t.validate()?;
        validate::json(&v)?;
        Ok(ApiJson(t))
    }
}

/// `axum::extract::Query` with the JSON error body on rejection; checked like
/// [`ApiJson`] (field checks, then no NUL in any parameter).
pub(crate) struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned + Validate, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let q = axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map_err(ApiError::from)?;
        q.0.validate()?;
        if let Ok(axum::extract::Query(pairs)) =
            axum::extract::Query::<Vec<(String, String)>>::try_from_uri(&parts.uri)
        {
            validate::pairs(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())))?;
        }
        Ok(ApiQuery(q.0))
    }
}

/// `axum::extract::Path` with the JSON error body on rejection. Segments are
/// checked by name ([`validate::path_params`]): `bucket` as an identifier, a NUL
/// in `path` as a bad path, any other NUL as `invalid_characters`.
pub(crate) struct ApiPath<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let p = axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map_err(ApiError::from)?;
        if let Ok(raw) = axum::extract::RawPathParams::from_request_parts(parts, state).await {
            validate::path_params(raw.iter())?;
        }
        Ok(ApiPath(p.0))
    }
}

/// The token of an `Authorization: Bearer <token>` header (scheme in any case),
/// if there is a well-formed one. The one parser every route uses.
pub(crate) fn bearer_token(headers: &axum::http::HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = v.trim().split_once(' ')?;
    let t = rest.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !t.is_empty()).then_some(t)
}

/// The bearer token of a request: `Ok(None)` without an `Authorization` header.
pub(crate) fn bearer(parts: &Parts) -> Result<Option<&str>, ApiError> {
    if !parts.headers.contains_key(header::AUTHORIZATION) {
        return Ok(None);
    }
    bearer_token(&parts.headers).map(Some).ok_or_else(|| {
        ApiError::unauthorized(
            "auth/invalid-token",
            "the Authorization header must be `Bearer <access_token>`",
        )
    })
}

/// A signed-in user: a valid bearer token (signature, expiry), a live session (not
/// signed out) and an existing user. Rejects with 401 `auth/missing-token`,
/// `auth/invalid-token`, `auth/expired-token` or `auth/revoked-token`.
pub(crate) struct AuthUser {
    pub id: Uuid,
    pub principal: Principal,
}

impl FromRequestParts<AppState> for AuthUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = bearer(parts)?.ok_or_else(|| {
            ApiError::unauthorized(
                "auth/missing-token",
                "this route needs `Authorization: Bearer <access_token>`",
            )
        })?;
        let principal = state.auth.authenticate(token).await?;
        let id = principal_user(&principal)?;
        Ok(AuthUser { id, principal })
    }
}

/// Like [`AuthUser`] when an `Authorization` header is sent; `None` without one.
pub(crate) struct MaybeUser(pub Option<Principal>);

impl FromRequestParts<AppState> for MaybeUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        match bearer(parts)? {
            None => Ok(MaybeUser(None)),
            Some(token) => Ok(MaybeUser(Some(state.auth.authenticate(token).await?))),
        }
    }
}

/// The client's address, the one every per-address limit counts: what the HTTP
/// edge decided ([`crate::edge::ClientIp`]: the peer, or `X-Forwarded-For` behind
/// a trusted proxy), else the peer (`ConnectInfo`, a router served elsewhere).
pub(crate) fn client_ip(ext: &axum::http::Extensions) -> Option<IpAddr> {
    ext.get::<crate::edge::ClientIp>()
        .map(|c| c.0)
        .or_else(|| ext.get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip()))
}

/// [`client_ip`] as an extractor (never refuses).
pub(crate) struct ClientAddr(pub Option<IpAddr>);

impl<S: Send + Sync> FromRequestParts<S> for ClientAddr {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(ClientAddr(client_ip(&parts.extensions)))
    }
}

/// The client's address and user agent, for sessions and auth events.
pub(crate) struct Client(pub ClientMeta);

impl<S: Send + Sync> FromRequestParts<S> for Client {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let user_agent = parts
            .headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.chars().take(512).collect());
        Ok(Client(ClientMeta {
            ip: client_ip(&parts.extensions).map(|a| a.to_string()),
            user_agent,
        }))
    }
}
