//! Who calls, as what [`Actor`], and the objects they may read.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use uuid::Uuid;

use super::errors::StorageApiError;
use crate::AppState;
use crate::extract::bearer_token;
use aether_auth::Principal;
use aether_storage::{Actor, FileRecord, ObjectPath, StorageError};

/// Who calls: a valid `apikey`, and the bearer token's principal (the key's
/// own when there is no `Authorization`).
pub(crate) struct Caller(pub Principal);

impl FromRequestParts<AppState> for Caller {
    type Rejection = StorageApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, StorageApiError> {
        let key = crate::supabase::request_key(state, parts)?;
        match bearer_token(&parts.headers) {
            None => Ok(Caller(key)),
            Some(t) => Ok(Caller(state.auth.authenticate(t).await?)),
        }
    }
}

pub(super) fn user_of(p: &Principal) -> Option<Uuid> {
    p.user_id.as_deref().and_then(|u| Uuid::parse_str(u).ok())
}

/// Who acts: a signed-in user or the service role; `None` for the anon key,
/// which may read public buckets only.
pub(super) fn actor_of(p: &Principal) -> Option<Actor> {
    match user_of(p) {
        Some(uid) => Some(Actor::User(uid)),
        None if p.is_service() => Some(Actor::Service),
        None => None,
    }
}

/// Who writes: the anon key may not (403, as an RLS refusal on Supabase).
pub(super) fn writer(p: &Principal) -> Result<Actor, StorageApiError> {
    actor_of(p).ok_or_else(|| StorageApiError::denied("new row violates row-level security policy"))
}

pub(super) fn object_path(raw: &str) -> Result<ObjectPath, StorageApiError> {
    Ok(ObjectPath::parse(raw.trim_start_matches('/')).map_err(StorageError::from)?)
}

/// The file at `bucket/path` if `viewer` may read it (the storage policies
/// decide); another user's private file is not found.
pub(super) async fn readable(
    state: &AppState,
    viewer: &Principal,
    bucket: &str,
    path: &ObjectPath,
) -> Result<FileRecord, StorageApiError> {
    state
        .storage
        .readable(actor_of(viewer), bucket, path)
        .await?
        .ok_or_else(StorageApiError::no_such_key)
}
