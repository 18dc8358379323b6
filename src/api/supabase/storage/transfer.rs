//! Moving and copying objects (`move`, `copy`).

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use serde::Deserialize;
use serde_json::{Value, json};

use super::errors::StorageApiError;
use super::json_body;
use super::owners::{Caller, Owner, object_path, service_owner, user_of};
use super::remove::prune_folders;
use super::upload::upsert_header;
use crate::api::validate::{self, Validate};
use crate::auth::Principal;
use crate::server::AppState;
use crate::storage::ObjectPath;

#[derive(Deserialize)]
pub struct MoveBody {
    #[serde(rename = "bucketId")]
    bucket_id: String,
    #[serde(rename = "sourceKey")]
    source_key: String,
    #[serde(rename = "destinationKey")]
    destination_key: String,
    #[serde(rename = "destinationBucket")]
    destination_bucket: Option<String>,
}

impl Validate for MoveBody {
    fn validate(&self) -> Result<(), validate::Invalid> {
        validate::bucket("bucketId", &self.bucket_id)?;
        if let Some(b) = &self.destination_bucket {
            validate::bucket("destinationBucket", b)?;
        }
        Ok(())
    }
}

/// A bucket and a path in it.
type Place<'a> = (&'a str, ObjectPath);

impl MoveBody {
    /// Source and destination.
    fn ends(&self) -> Result<(Place<'_>, Place<'_>), StorageApiError> {
        let to_bucket = self
            .destination_bucket
            .as_deref()
            .unwrap_or(&self.bucket_id);
        Ok((
            (&self.bucket_id, object_path(&self.source_key)?),
            (to_bucket, object_path(&self.destination_key)?),
        ))
    }
}

/// Whose object at `bucket/path` a move or copy takes: the signed-in user's
/// own; for the service role, its owner-less one there, else the one user's
/// (refused when several users have an object at that path and the service
/// role none: Aether's paths are per owner).
async fn source_owner(
    state: &AppState,
    caller: &Principal,
    bucket: &str,
    path: &ObjectPath,
) -> Result<Owner, StorageApiError> {
    if let Some(uid) = user_of(caller) {
        return Ok(Some(uid));
    }
    if !caller.is_service() {
        return Err(StorageApiError::no_such_key());
    }
    state.storage.bucket(bucket).await?;
    service_owner(state, bucket, path, Some(StorageApiError::no_such_key())).await
}

/// `POST /storage/v1/object/move` (`move`): renames the caller's object (the
/// service role: its owner's), into another bucket with `destinationBucket`.
/// The row keeps its id, owner and bytes; a taken destination is refused (409).
pub async fn move_object(
    State(state): State<AppState>,
    Caller(p): Caller,
    body: axum::body::Bytes,
) -> Result<Json<Value>, StorageApiError> {
    let b: MoveBody = json_body(&body)?;
    let ((from_bucket, from), (to_bucket, to)) = b.ends()?;
    let owner = source_owner(&state, &p, from_bucket, &from).await?;
    let f = state
        .storage
        .move_file(owner, from_bucket, &from, to_bucket, &to)
        .await?;
    if (from_bucket, &from) != (to_bucket, &to) {
        prune_folders(&state, owner, from_bucket, &from).await;
    }
    Ok(Json(json!({
        "message": "Successfully moved",
        "Id": f.id.hyphenated().to_string(),
        "Key": f.path,
    })))
}

/// `POST /storage/v1/object/copy` (`copy`): a new object for the same owner,
/// with a copy of the bytes and the custom metadata; `x-upsert: true`
/// replaces a destination object. Counts against the owner's quota.
pub async fn copy_object(
    State(state): State<AppState>,
    Caller(p): Caller,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<Value>, StorageApiError> {
    let b: MoveBody = json_body(&body)?;
    let ((from_bucket, from), (to_bucket, to)) = b.ends()?;
    let owner = source_owner(&state, &p, from_bucket, &from).await?;
    let f = state
        .storage
        .copy_file(
            owner,
            from_bucket,
            &from,
            to_bucket,
            &to,
            upsert_header(&headers),
        )
        .await?;
    Ok(Json(json!({
        "Id": f.id.hyphenated().to_string(),
        "Key": format!("{to_bucket}/{}", f.path),
        "id": f.id.hyphenated().to_string(),
        "name": f.path,
        "bucket_id": to_bucket,
    })))
}
