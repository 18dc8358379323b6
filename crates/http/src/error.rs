//! The JSON error body every HTTP route answers with:
//! `{"error":{"message","code","status"}}`. Internal causes are logged, never shown.

use axum::Json;
use axum::extract::multipart::{MultipartError, MultipartRejection};
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::json;
use utoipa::ToSchema;

use aether_auth::AuthError;
use aether_storage::StorageError;

#[derive(Debug, Clone)]
pub(crate) struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Extra response headers (`Retry-After`, `WWW-Authenticate`, `Content-Range`).
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

/// The error body, for the OpenAPI document.
#[derive(Serialize, ToSchema)]
pub(crate) struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct ErrorDetail {
    /// What went wrong, for people.
    #[schema(example = "invalid email or password")]
    pub message: String,
    /// Stable machine-readable code, e.g. `auth/invalid-credentials`.
    #[schema(example = "auth/invalid-credentials")]
    pub code: String,
    /// The HTTP status, repeated.
    #[schema(example = 401)]
    pub status: u16,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            headers: Vec::new(),
        }
    }

    pub(crate) fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// Logs `cause` and answers 500 without it.
    pub(crate) fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "internal server error",
        )
    }

    pub(crate) fn with_header(
        mut self,
        name: HeaderName,
        value: impl TryInto<HeaderValue>,
    ) -> Self {
        if let Ok(v) = value.try_into() {
            self.headers.push((name, v));
        }
        self
    }

    /// With `Connection: close`: for answers given while the request body is still
    /// arriving (refused uploads). The edge then reads a bounded rest and closes
    /// (see `crate::edge::conn::EdgeIo`) instead of reading the body to its end.
    pub(crate) fn closing(self) -> Self {
        self.with_header(header::CONNECTION, "close")
    }

    /// 401 with `WWW-Authenticate: Bearer`.
    pub(crate) fn unauthorized(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, code, message)
            .with_header(header::WWW_AUTHENTICATE, "Bearer")
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"message": self.message, "code": self.code, "status": self.status.as_u16()}});
        let mut res = (self.status, Json(body)).into_response();
        for (k, v) in self.headers {
            res.headers_mut().append(k, v);
        }
        res
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        let code = e.code();
        match e {
            AuthError::Internal(cause) => ApiError::internal(cause),
            AuthError::InvalidCredentials
            | AuthError::ExpiredToken
            | AuthError::RevokedToken
            | AuthError::InvalidToken(_) => ApiError::unauthorized(code, e.to_string()),
            AuthError::EmailAlreadyExists => {
                ApiError::new(StatusCode::CONFLICT, code, e.to_string())
            }
            AuthError::WeakPassword(_)
            | AuthError::InvalidEmail(_)
            | AuthError::RefreshTokenNotFound
            | AuthError::RefreshTokenReused => ApiError::bad_request(code, e.to_string()),
        }
    }
}

impl From<StorageError> for ApiError {
    fn from(e: StorageError) -> Self {
        let message = e.to_string();
        let (status, code) = match &e {
            StorageError::FileTooLarge { .. } => {
                (StatusCode::PAYLOAD_TOO_LARGE, "storage/file-too-large")
            }
            StorageError::InvalidType { .. } => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "storage/invalid-type")
            }
            StorageError::QuotaExceeded { .. } | StorageError::OwnersQuotaExceeded { .. } => {
                (StatusCode::PAYLOAD_TOO_LARGE, "storage/quota-exceeded")
            }
            StorageError::NotFound(_) => (StatusCode::NOT_FOUND, "storage/not-found"),
            StorageError::BucketNotFound(_) => (StatusCode::NOT_FOUND, "storage/bucket-not-found"),
            StorageError::InvalidPath(_) => (StatusCode::BAD_REQUEST, "storage/invalid-path"),
            StorageError::AlreadyExists(_) => (StatusCode::CONFLICT, "storage/already-exists"),
            StorageError::PathConflict(_) => (StatusCode::CONFLICT, "storage/conflict"),
            StorageError::FolderNotEmpty(_) => (StatusCode::CONFLICT, "storage/folder-not-empty"),
            StorageError::Forbidden(_) => (StatusCode::FORBIDDEN, "auth/forbidden"),
            StorageError::BucketAlreadyExists(_) => {
                (StatusCode::CONFLICT, "storage/bucket-already-exists")
            }
            StorageError::RangeNotSatisfiable { size } => {
                return ApiError::new(
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    "storage/range-not-satisfiable",
                    message,
                )
                .with_header(header::CONTENT_RANGE, format!("bytes */{size}"));
            }
            StorageError::AuthRequired => {
                return ApiError::unauthorized("auth/missing-token", message);
            }
            StorageError::Internal(cause) => return ApiError::internal(cause),
        };
        ApiError::new(status, code, message)
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        let (status, code) = match &r {
            JsonRejection::MissingJsonContentType(_) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
            }
            JsonRejection::JsonSyntaxError(_) => (StatusCode::BAD_REQUEST, "invalid_json"),
            JsonRejection::JsonDataError(_) => (StatusCode::BAD_REQUEST, "invalid_body"),
            _ if r.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
            }
            _ => (StatusCode::BAD_REQUEST, "invalid_body"),
        };
        let message = match &r {
            JsonRejection::MissingJsonContentType(_) => {
                "expected a JSON body with `Content-Type: application/json`".to_owned()
            }
            _ => r.body_text(),
        };
        ApiError::new(status, code, message)
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        ApiError::bad_request("invalid_query", r.body_text())
    }
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> Self {
        ApiError::bad_request("invalid_path", r.body_text())
    }
}

impl From<MultipartRejection> for ApiError {
    fn from(r: MultipartRejection) -> Self {
        ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!("expected a multipart/form-data body ({})", r.body_text()),
        )
    }
}

impl From<MultipartError> for ApiError {
    fn from(e: MultipartError) -> Self {
        let status = e.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            return ApiError::new(status, "payload_too_large", e.body_text());
        }
        ApiError::bad_request("invalid_body", e.body_text())
    }
}
