//! Moving and copying objects (`move`, `copy`).

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use serde::Deserialize;
use serde_json::{Value, json};

use super::errors::StorageApiError;
use super::json_body;
use super::owners::{Caller, actor_of, object_path};
use super::remove::prune_folders;
use super::upload::{cache_control_value, upsert_header};
use crate::AppState;
use crate::validate::{self, Validate};
use aether_storage::{CopyOptions, ObjectPath};

#[derive(Deserialize)]
pub(crate) struct MoveBody {
    #[serde(rename = "bucketId")]
    bucket_id: String,
    #[serde(rename = "sourceKey")]
    source_key: String,
    #[serde(rename = "destinationKey")]
    destination_key: String,
    #[serde(rename = "destinationBucket")]
    destination_bucket: Option<String>,
    /// `copy` only: the copy's own `cacheControl` and `mimetype`.
    metadata: Option<CopyMetadata>,
    /// `copy` only: whether the copy takes the source's custom metadata
    /// (default true).
    #[serde(rename = "copyMetadata")]
    copy_metadata: Option<bool>,
}

/// What Supabase's `copy` lets a caller set on the copy.
#[derive(Deserialize)]
struct CopyMetadata {
    #[serde(rename = "cacheControl")]
    cache_control: Option<String>,
    mimetype: Option<String>,
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

/// `POST /storage/v1/object/move` (`move`): renames an object the caller
/// owns (the service role: any), into another bucket with
/// `destinationBucket`. The row keeps its id, owner and bytes; a taken
/// destination is refused (409).
pub(crate) async fn move_object(
    State(state): State<AppState>,
    Caller(p): Caller,
    body: axum::body::Bytes,
) -> Result<Json<Value>, StorageApiError> {
    let b: MoveBody = json_body(&body)?;
    let ((from_bucket, from), (to_bucket, to)) = b.ends()?;
    let actor = actor_of(&p).ok_or_else(StorageApiError::no_such_key)?;
    let f = state
        .storage
        .move_file(actor, from_bucket, &from, to_bucket, &to)
        .await?;
    if (from_bucket, &from) != (to_bucket, &to) {
        prune_folders(&state, from_bucket, &from).await;
    }
    Ok(Json(json!({
        "message": "Successfully moved",
        "Id": f.id.hyphenated().to_string(),
        "Key": f.path,
    })))
}

/// A content type given for a copy: `type/subtype`, as an upload's
/// `Content-Type` would be stored.
fn content_type_value(v: &str) -> Result<String, StorageApiError> {
    let v = v.trim().to_ascii_lowercase();
    let token = |t: &str| {
        !t.is_empty()
            && t.len() <= 127
            && t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
    };
    match v.split_once('/') {
        Some((t, sub)) if token(t) && token(sub) => Ok(v),
        _ => Err(StorageApiError::invalid(
            "metadata.mimetype must be a media type such as image/png",
        )),
    }
}

/// `POST /storage/v1/object/copy` (`copy`): a new object of the caller's
/// (owner-less for the service role), from one they may read, with a copy
/// of the bytes and (unless `copyMetadata` is false) the custom metadata;
/// `metadata.cacheControl` and `metadata.mimetype` set the copy's own;
/// `x-upsert: true` replaces a destination object they may replace. Counts
/// against the caller's quota.
pub(crate) async fn copy_object(
    State(state): State<AppState>,
    Caller(p): Caller,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<Value>, StorageApiError> {
    let b: MoveBody = json_body(&body)?;
    let ((from_bucket, from), (to_bucket, to)) = b.ends()?;
    let actor = actor_of(&p).ok_or_else(StorageApiError::no_such_key)?;
    let own = b.metadata.as_ref();
    let opts = CopyOptions {
        upsert: upsert_header(&headers),
        copy_metadata: b.copy_metadata.unwrap_or(true),
        cache_control: own
            .and_then(|m| m.cache_control.as_deref())
            .map(cache_control_value)
            .transpose()?,
        content_type: own
            .and_then(|m| m.mimetype.as_deref())
            .map(content_type_value)
            .transpose()?,
    };
    let f = state
        .storage
        .copy_file(actor, from_bucket, &from, to_bucket, &to, opts)
        .await?;
    Ok(Json(json!({
        "Id": f.id.hyphenated().to_string(),
        "Key": format!("{to_bucket}/{}", f.path),
        "id": f.id.hyphenated().to_string(),
        "name": f.path,
        "bucket_id": to_bucket,
    })))
}
