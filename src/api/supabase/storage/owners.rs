//! Who calls, and whose object a request addresses: the caller's own, the
//! one a read resolves to, the one a write or the service role acts on.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use uuid::Uuid;

use super::errors::StorageApiError;
use crate::api::extract::bearer_token;
use crate::auth::Principal;
use crate::server::AppState;
use crate::storage::{ObjectPath, StorageError};

/// Who calls: a valid `apikey`, and the bearer token's principal (the key's
/// own when there is no `Authorization`).
pub struct Caller(pub Principal);

impl FromRequestParts<AppState> for Caller {
    type Rejection = StorageApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, StorageApiError> {
        let key = crate::api::supabase::request_key(state, parts)?;
        match bearer_token(&parts.headers) {
            None => Ok(Caller(key)),
            Some(t) => Ok(Caller(state.auth.authenticate(t).await?)),
        }
    }
}

pub(super) fn user_of(p: &Principal) -> Option<Uuid> {
    p.user_id.as_deref().and_then(|u| Uuid::parse_str(u).ok())
}

/// Whose object: a user's (`Some`), or no user's (`None`): the service
/// role's own objects, which count against no quota.
pub(super) type Owner = Option<Uuid>;

/// The object a caller addresses at a path first: a user's own, the service
/// role's owner-less one; `None` for the anon key.
fn own_owner(p: &Principal) -> Option<Owner> {
    match user_of(p) {
        Some(uid) => Some(Some(uid)),
        None if p.is_service() => Some(None),
        None => None,
    }
}

pub(super) fn object_path(raw: &str) -> Result<ObjectPath, StorageApiError> {
    Ok(ObjectPath::parse(raw.trim_start_matches('/')).map_err(StorageError::from)?)
}

/// The owner whose file at `path` `viewer` reads: their own (the service
/// role's: the owner-less one), else (service role, or a public bucket) the
/// oldest one there, owner-less ones included.
pub(super) async fn read_owner(
    state: &AppState,
    viewer: &Principal,
    bucket: &str,
    path: &ObjectPath,
) -> Result<Owner, StorageApiError> {
    if let Some(own) = own_owner(viewer)
        && state.storage.file_at(bucket, own, path).await?.is_some()
    {
        return Ok(own);
    }
    let info = state.storage.bucket(bucket).await?;
    if !(viewer.is_service() || info.public) {
        return Err(StorageApiError::no_such_key());
    }
    state
        .storage
        .owners_at(bucket, path)
        .await?
        .into_iter()
        .next()
        .ok_or_else(StorageApiError::no_such_key)
}

/// The owner a write of `path` goes to: the signed-in user; for the service
/// role, its own owner-less object there if there is one, else the one user
/// with an object there, else (a new path) no user: an owner-less object.
/// Refused (400) when several users have an object there and the service
/// role none.
pub(super) async fn write_owner(
    state: &AppState,
    caller: &Principal,
    bucket: &str,
    path: &ObjectPath,
) -> Result<Owner, StorageApiError> {
    if let Some(uid) = user_of(caller) {
        return Ok(Some(uid));
    }
    if caller.is_service() {
        return service_owner(state, bucket, path, None).await;
    }
    Err(StorageApiError::denied(
        "new row violates row-level security policy",
    ))
}

/// Whose object at `bucket/path` the service role acts on: its own
/// owner-less one, else the one user's there; with none there, `absent`
/// (`None`: a new owner-less object; or an error). Several users' objects
/// (and no owner-less one) are ambiguous: 400.
pub(super) async fn service_owner(
    state: &AppState,
    bucket: &str,
    path: &ObjectPath,
    absent: Option<StorageApiError>,
) -> Result<Owner, StorageApiError> {
    let owners = state.storage.owners_at(bucket, path).await?;
    if owners.contains(&None) {
        return Ok(None);
    }
    match owners.as_slice() {
        [] => absent.map_or(Ok(None), Err),
        [one] => Ok(*one),
        _ => Err(StorageApiError::invalid(format!(
            "several users have an object at {bucket}/{path}: act on it with its owner's access token"
        ))),
    }
}
