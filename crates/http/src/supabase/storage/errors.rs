//! The storage API's error: its Supabase body, and what each error of the
//! shared layers becomes in it.

use axum::Json;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::supabase::KeyError;
use crate::validate;
use aether_auth::AuthError;
use aether_storage::StorageError;

/// An error in the storage API's shape.
#[derive(Debug)]
pub(crate) struct StorageApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub error: &'static str,
    pub message: String,
    /// Answer with `Connection: close` (see [`StorageApiError::closing`]).
    pub close: bool,
}

impl StorageApiError {
    pub(crate) fn new(
        status: StatusCode,
        code: &'static str,
        error: &'static str,
        message: impl Into<String>,
    ) -> Self {
        StorageApiError {
            status,
            code,
            error,
            message: message.into(),
            close: false,
        }
    }

    /// For answers given while the request body is still arriving: the rest is
    /// not read (the HTTP edge lingers briefly, then closes the connection).
    pub(crate) fn closing(mut self) -> Self {
        self.close = true;
        self
    }

    pub(super) fn no_such_key() -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "NoSuchKey",
            "not_found",
            "Object not found",
        )
    }

    pub(super) fn denied(message: &str) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "AccessDenied",
            "Unauthorized",
            message,
        )
    }

    pub(super) fn invalid(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "InvalidRequest",
            "invalid_request",
            message,
        )
    }
}

impl IntoResponse for StorageApiError {
    fn into_response(self) -> Response {
        let body = json!({
            "statusCode": self.status.as_u16().to_string(),
            "code": self.code,
            "error": self.error,
            "message": self.message,
        });
        let mut res = (self.status, Json(body)).into_response();
        if self.close {
            res.headers_mut().insert(
                header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
        }
        res
    }
}

impl From<StorageError> for StorageApiError {
    fn from(e: StorageError) -> Self {
        let msg = e.to_string();
        use StatusCode as S;
        match e {
            StorageError::NotFound(_) => Self::no_such_key(),
            StorageError::BucketNotFound(_) => Self::new(
                S::NOT_FOUND,
                "NoSuchBucket",
                "Bucket not found",
                "Bucket not found",
            ),
            StorageError::InvalidPath(_) => {
                Self::new(S::BAD_REQUEST, "InvalidKey", "Invalid Input", msg)
            }
            StorageError::AlreadyExists(_) | StorageError::BucketAlreadyExists(_) => Self::new(
                S::CONFLICT,
                "Duplicate",
                "Duplicate",
                "The resource already exists",
            ),
            StorageError::PathConflict(_) | StorageError::FolderNotEmpty(_) => {
                Self::new(S::CONFLICT, "ResourceConflict", "Conflict", msg)
            }
            StorageError::FileTooLarge { .. }
            | StorageError::QuotaExceeded { .. }
            | StorageError::OwnersQuotaExceeded { .. } => Self::new(
                S::PAYLOAD_TOO_LARGE,
                "EntityTooLarge",
                "Payload too large",
                msg,
            ),
            StorageError::InvalidType { .. } => Self::new(
                S::UNSUPPORTED_MEDIA_TYPE,
                "InvalidMimeType",
                "invalid_mime_type",
                msg,
            ),
            StorageError::RangeNotSatisfiable { .. } => Self::new(
                S::RANGE_NOT_SATISFIABLE,
                "InvalidRange",
                "invalid_range",
                msg,
            ),
            StorageError::AuthRequired => Self::no_such_key(),
            StorageError::Forbidden(m) => Self::denied(&m),
            StorageError::Internal(cause) => {
                tracing::error!(error = %cause, "internal error");
                Self::new(
                    S::INTERNAL_SERVER_ERROR,
                    "InternalError",
                    "internal",
                    "Internal Server Error",
                )
            }
        }
    }
}

impl From<AuthError> for StorageApiError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Internal(cause) => StorageError::Internal(cause).into(),
            AuthError::ExpiredToken => Self::new(
                StatusCode::BAD_REQUEST,
                "InvalidJWT",
                "Unauthorized",
                "\"exp\" claim timestamp check failed",
            ),
            e => Self::new(
                StatusCode::BAD_REQUEST,
                "InvalidJWT",
                "Unauthorized",
                e.to_string(),
            ),
        }
    }
}

impl From<KeyError> for StorageApiError {
    fn from(e: KeyError) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "InvalidJWT",
            "Unauthorized",
            e.message(),
        )
    }
}

impl From<crate::error::ApiError> for StorageApiError {
    fn from(e: crate::error::ApiError) -> Self {
        // The extractors' checks (`crate::validate`) keep their meaning here.
        let (code, error) = code_for_native(e.status, e.code);
        Self::new(e.status, code, error, e.message)
    }
}

impl From<validate::Invalid> for StorageApiError {
    fn from(e: validate::Invalid) -> Self {
        crate::error::ApiError::from(e).into()
    }
}

/// The storage API's code (and `error`) for an error that a shared layer
/// answered in Aether's own shape (rate limits, extractors, unknown routes):
/// the storage API's own codes only.
pub(crate) fn code_for_native(status: StatusCode, native: &str) -> (&'static str, &'static str) {
    match native {
        validate::CODE_BUCKET => ("InvalidBucketName", "Invalid Input"),
        "storage/invalid-path" => ("InvalidKey", "Invalid Input"),
        "rate-limit/exceeded" => ("SlowDown", "Too Many Requests"),
        _ if status == StatusCode::PAYLOAD_TOO_LARGE => ("EntityTooLarge", "Payload too large"),
        _ if status.is_server_error() => ("InternalError", "internal"),
        _ => ("InvalidRequest", "invalid_request"),
    }
}
