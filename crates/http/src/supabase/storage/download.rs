//! Serving objects: authenticated and public downloads, and `info`.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::response::Response;
use serde_json::{Value, json};

use super::errors::StorageApiError;
use super::owners::{Caller, object_path, readable};
use crate::AppState;
use crate::auth::timestamp;
use crate::extract::ApiPath;
use crate::storage::read_response;
use aether_auth::Principal;
use aether_storage::{ByteRange, ObjectPath};

pub(super) async fn serve(
    state: &AppState,
    viewer: &Principal,
    bucket: &str,
    path: &ObjectPath,
    headers: &HeaderMap,
    head_only: bool,
    expect: Option<uuid::Uuid>,
) -> Result<Response, StorageApiError> {
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(ByteRange::parse);
    let read = state
        .storage
        .open(Some(viewer), bucket, path, range)
        .await?;
    // A signed URL serves the object it was made for, not whatever has its
    // name since.
    if expect.is_some_and(|id| id != read.file.id) {
        return Err(StorageApiError::no_such_key());
    }
    // A HEAD is not a download: KingShare owners are told of GETs only.
    if !head_only && read.span.is_none_or(|(a, _)| a == 0) {
        crate::kingshare::download_started(state, &read.file);
    }
    read_response(read).map_err(StorageApiError::from)
}

/// `GET /storage/v1/object/{bucket}/{path}` (and `/object/authenticated/…`).
pub(crate) async fn get_object(
    State(state): State<AppState>,
    Caller(p): Caller,
    ApiPath((bucket, path)): ApiPath<(String, String)>,
    method: axum::http::Method,
    headers: HeaderMap,
) -> Result<Response, StorageApiError> {
    let path = object_path(&path)?;
    let head_only = method == axum::http::Method::HEAD;
    serve(&state, &p, &bucket, &path, &headers, head_only, None).await
}

/// `GET /storage/v1/object/info/{bucket}/{path}` (`info`): Supabase's shape,
/// whose `metadata` is the custom metadata given at upload.
pub(crate) async fn info(
    State(state): State<AppState>,
    Caller(p): Caller,
    ApiPath((bucket, path)): ApiPath<(String, String)>,
) -> Result<Json<Value>, StorageApiError> {
    let path = object_path(&path)?;
    let f = readable(&state, &p, &bucket, &path).await?;
    Ok(Json(json!({
        "id": f.id.hyphenated().to_string(),
        "name": f.path,
        "version": f.version(),
        "bucket_id": bucket,
        "size": f.size,
        "content_type": f.mime_type,
        "cache_control": f.cache_control.as_deref().unwrap_or("max-age=3600"),
        "etag": format!("\"{}\"", f.id.simple()),
        "metadata": f.user_metadata,
        "last_modified": timestamp(&f.updated_at),
        "created_at": timestamp(&f.created_at),
    })))
}

/// `GET /storage/v1/object/public/{bucket}/{path}`: public buckets, no key needed.
pub(crate) async fn public_get(
    State(state): State<AppState>,
    ApiPath((bucket, path)): ApiPath<(String, String)>,
    method: axum::http::Method,
    headers: HeaderMap,
) -> Result<Response, StorageApiError> {
    let path = object_path(&path)?;
    let anon = Principal::anonymous();
    if !state.storage.bucket(&bucket).await?.public {
        return Err(StorageApiError::no_such_key());
    }
    let head_only = method == axum::http::Method::HEAD;
    serve(&state, &anon, &bucket, &path, &headers, head_only, None).await
}
