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
            // The connection went (try again) or the client library refused
            // something (a defect here: retrying will not help).
            let lost = e.is_closed()
                || std::error::Error::source(&e).is_some_and(|s| s.is::<std::io::Error>());
            if lost {
                tracing::error!(error = %e, "rest: database unavailable");
                return unavailable();
            }
            tracing::error!(error = %e, "rest: database client error");
            return RestError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "PGRSTX00",
                "Internal database client error",
            );
        };
        let code = db.code().code();
        let status = status_of(code, anon);
        RestError {
            status,
            code: code.to_owned(),
            message: db.message().to_owned(),
            details: db.detail().map(str::to_owned),
            hint: db.hint().map(str::to_owned),
        }
    }
}

/// PostgREST's HTTP status for a SQLSTATE: its table, and `PTxyz` (raised by
/// a function) for status `xyz`.
fn status_of(code: &str, anon: bool) -> StatusCode {
    let class = |c: &str| code.starts_with(c);
    match code {
        "42501" if anon => StatusCode::UNAUTHORIZED,
        "42501" => StatusCode::FORBIDDEN,
        "42P01" | "42883" => StatusCode::NOT_FOUND,
        "23505" | "23503" => StatusCode::CONFLICT,
        "25006" => StatusCode::METHOD_NOT_ALLOWED,
        "53400" | "57014" => StatusCode::INTERNAL_SERVER_ERROR,
        "P0001" => StatusCode::BAD_REQUEST,
        _ if class("PT") => code
            .get(2..)
            .and_then(|n| n.parse::<u16>().ok())
            .filter(|n| (100..600).contains(n))
            .and_then(|n| StatusCode::from_u16(n).ok())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        _ if class("08") || class("53") => StatusCode::SERVICE_UNAVAILABLE,
        _ if class("0L") || class("0P") || class("28") => StatusCode::FORBIDDEN,
        _ if class("22") || class("23") || class("42") => StatusCode::BAD_REQUEST,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_take_postgrests_statuses() {
        for (code, status) in [
            ("42501", 403),
            ("42P01", 404),
            ("23505", 409),
            ("25006", 405),
            ("25P02", 500),
            ("08006", 503),
            ("53300", 503),
            ("53400", 500),
            ("28000", 403),
            ("0LP01", 403),
            ("22P02", 400),
            ("P0001", 400),
            ("PT402", 402),
            ("PT999", 500),
            ("PTxyz", 500),
            ("40001", 500),
            ("XX000", 500),
        ] {
            assert_eq!(status_of(code, false).as_u16(), status, "{code}");
        }
        assert_eq!(status_of("42501", true), StatusCode::UNAUTHORIZED);
    }
}
