//! PostgREST's error body `{code, message, details, hint}`, with PostgreSQL's
//! SQLSTATE where the database decided.

use super::*;

/// A PostgREST error response.
#[derive(Debug)]
pub(crate) struct RestError {
    status: StatusCode,
    code: String,
    message: String,
    details: Option<String>,
    hint: Option<String>,
}

impl RestError {
    pub(super) fn new(status: StatusCode, code: &str, message: impl Into<String>) -> RestError {
        RestError {
            status,
            code: code.to_owned(),
            message: message.into(),
            details: None,
            hint: None,
        }
    }

    pub(super) fn details(mut self, d: impl Into<String>) -> RestError {
        self.details = Some(d.into());
        self
    }

    /// A database error as PostgREST maps it; `anon` decides 401 against 403.
    pub(super) fn db(e: tokio_postgres::Error, anon: bool) -> RestError {
        let Some(db) = e.as_db_error() else {
            tracing::error!(error = %e, "rest: database unavailable");
            return unavailable();
        };
        let code = db.code().code();
        let status = match code {
            "42501" if anon => StatusCode::UNAUTHORIZED,
            "42501" => StatusCode::FORBIDDEN,
            "42P01" | "42883" => StatusCode::NOT_FOUND,
            "23505" | "23503" => StatusCode::CONFLICT,
            "57014" => StatusCode::INTERNAL_SERVER_ERROR,
            c if c.starts_with("22") || c.starts_with("23") || c.starts_with("42") => {
                StatusCode::BAD_REQUEST
            }
            "P0001" => StatusCode::BAD_REQUEST,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        RestError {
            status,
            code: code.to_owned(),
            message: db.message().to_owned(),
            details: db.detail().map(str::to_owned),
            hint: db.hint().map(str::to_owned),
        }
    }
}

/// The database cannot be reached: PostgREST's `PGRST000`.
pub(super) fn unavailable() -> RestError {
    RestError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "PGRST000",
        "Database connection error",
    )
}

impl IntoResponse for RestError {
    fn into_response(self) -> Response {
        let body = json!({
            "code": self.code, "message": self.message,
            "details": self.details, "hint": self.hint,
        });
        (self.status, axum::Json(body)).into_response()
    }
}

impl From<query::ParseError> for RestError {
    fn from(e: query::ParseError) -> RestError {
        RestError::new(StatusCode::BAD_REQUEST, "PGRST100", e.message).details(e.details)
    }
}

impl From<PlanError> for RestError {
    fn from(e: PlanError) -> RestError {
        match e {
            PlanError::NoRelationship(m) => RestError::new(StatusCode::BAD_REQUEST, "PGRST200", m),
            PlanError::Ambiguous(m) => RestError::new(StatusCode::MULTIPLE_CHOICES, "PGRST201", m),
            PlanError::NotEmbedded(m) => RestError::new(StatusCode::BAD_REQUEST, "PGRST108", m),
            PlanError::UnknownColumn(m) => RestError::new(StatusCode::BAD_REQUEST, "42703", m),
        }
    }
}
