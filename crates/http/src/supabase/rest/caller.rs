//! Who a request acts as (its token, or the API key alone), and running a
//! request's statements in one transaction as that role with its claims.

use super::*;

/// Who a request acts as: its bearer token (a user's, or an API key), else its
/// `apikey`. A valid bearer token is enough without an `apikey`, as on Supabase.
pub(crate) struct RestCaller(pub(super) Principal);

impl FromRequestParts<AppState> for RestCaller {
    type Rejection = RestError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, RestError> {
        let unauthorized =
            |m: &str| RestError::new(StatusCode::UNAUTHORIZED, "PGRST301", m.to_owned());
        if let Some(token) = bearer_token(&parts.headers) {
            // An API key as the bearer (supabase-js sends the anon key when no
            // one is signed in), else a user's token with its live session.
            if let Ok(key) = check_api_key(state, Some(token)) {
                return Ok(RestCaller(key));
            }
            return match state.auth.authenticate(token).await {
                Ok(p) => Ok(RestCaller(p)),
                Err(aether_auth::AuthError::Internal(cause)) => {
                    tracing::error!(error = %cause, "rest: token check failed");
                    Err(unavailable())
                }
                Err(e) => Err(unauthorized(&e.to_string())),
            };
        }
        check_api_key(state, api_key_of(parts).as_deref())
            .map(RestCaller)
            .map_err(|e| unauthorized(e.message()))
    }
}

/// Runs `f` in one transaction as the caller's role, with its claims set.
pub(super) async fn as_caller<T>(
    state: &AppState,
    caller: &Principal,
    f: impl AsyncFnOnce(&tokio_postgres::Transaction<'_>) -> Result<T, RestError>,
) -> Result<T, RestError> {
    as_caller_then(state, caller, false, f).await
}

/// [`as_caller`], rolled back instead of committed with `rollback`
/// (`Prefer: tx=rollback`): the answer is what the request would have done;
/// nothing stays, and no change reaches the WAL.
pub(super) async fn as_caller_then<T>(
    state: &AppState,
    caller: &Principal,
    rollback: bool,
    f: impl AsyncFnOnce(&tokio_postgres::Transaction<'_>) -> Result<T, RestError>,
) -> Result<T, RestError> {
    let anon = caller.role == Role::Anon;
    let mut client = state.pool.get().await.map_err(|e| {
        tracing::error!(error = %e, "rest: no database connection");
        unavailable()
    })?;
    let tx = client
        .transaction()
        .await
        .map_err(|e| RestError::db(e, anon))?;
    // One round trip: `set_config('role', …, true)` is `SET LOCAL ROLE`.
    let sub = Text(caller.user_id.clone());
    tx.execute(
        "SELECT set_config('role', $3, true), set_config('statement_timeout', $4, true),
                set_config('request.jwt.claims', $1, true),
                set_config('request.jwt.claim.sub', coalesce($2, ''), true),
                set_config('request.jwt.claim.role', $3, true)",
        &[
            &caller.jwt_claims(),
            &sub,
            &caller.role.database_role(),
            &STATEMENT_TIMEOUT,
        ],
    )
    .await
    .map_err(|e| RestError::db(e, anon))?;
    let out = f(&tx).await?;
    if rollback {
        tx.rollback().await.map_err(|e| RestError::db(e, anon))?;
    } else {
        tx.commit().await.map_err(|e| RestError::db(e, anon))?;
    }
    Ok(out)
}
