//! Removing objects (`remove`), and the folders they leave empty.

use axum::Json;
use axum::extract::State;
use serde::Deserialize;
use serde_json::{Value, json};

use super::errors::StorageApiError;
use super::json_body;
use super::listing::file_json;
use super::owners::{Caller, actor_of, object_path};
use crate::AppState;
use crate::extract::ApiPath;
use crate::validate::Validate;
use aether_storage::{Deleted, ObjectPath, StorageError};

#[derive(Deserialize)]
pub(crate) struct RemoveBody {
    prefixes: Vec<String>,
}

impl Validate for RemoveBody {}

/// `DELETE /storage/v1/object/{bucket}` with `{"prefixes": [paths]}`: removes
/// the objects at those paths the caller may (their own; any for the service
/// role) and returns them, skipping the rest as Supabase's RLS does; folders
/// left empty go too (Supabase folders are implicit).
pub(crate) async fn remove(
    State(state): State<AppState>,
    Caller(p): Caller,
    ApiPath(bucket): ApiPath<String>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, StorageApiError> {
    let b: RemoveBody = json_body(&body)?;
    state.storage.bucket(&bucket).await?;
    let mut removed = Vec::new();
    let Some(actor) = actor_of(&p) else {
        return Ok(Json(Value::Array(removed)));
    };
    for raw in &b.prefixes {
        let Ok(path) = object_path(raw) else { continue };
        let Some(f) = state.storage.file_at(&bucket, &path).await? else {
            continue;
        };
        match state.storage.delete(actor, &bucket, &path).await {
            Ok(Deleted::File) => {
                let mut v = file_json(&f);
                v["name"] = json!(f.path);
                v["bucket_id"] = json!(bucket);
                v["owner"] = json!(f.owner_id.map(|o| o.hyphenated().to_string()));
                removed.push(v);
                prune_folders(&state, &bucket, &path).await;
            }
            Ok(Deleted::Folder) | Err(StorageError::NotFound(_) | StorageError::Forbidden(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Json(Value::Array(removed)))
}

/// Removes the now-empty folders above a deleted object, deepest first,
/// whoever made them: Supabase's folders are implicit, there while something
/// is in them.
pub(super) async fn prune_folders(state: &AppState, bucket: &str, path: &ObjectPath) {
    let mut dir = path.parent();
    while !dir.is_root() {
        if !state
            .storage
            .prune_folder(bucket, &dir)
            .await
            .unwrap_or(false)
        {
            break;
        }
        dir = dir.parent();
    }
}
