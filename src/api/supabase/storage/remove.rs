//! Removing objects (`remove`), and the folders they leave empty.

use axum::Json;
use axum::extract::State;
use serde::Deserialize;
use serde_json::{Value, json};

use super::errors::StorageApiError;
use super::json_body;
use super::listing::file_json;
use super::owners::{Caller, Owner, object_path, user_of};
use crate::api::extract::ApiPath;
use crate::api::validate::Validate;
use crate::server::AppState;
use crate::storage::{Deleted, ObjectPath, StorageError};

#[derive(Deserialize)]
pub struct RemoveBody {
    prefixes: Vec<String>,
}

impl Validate for RemoveBody {}

/// `DELETE /storage/v1/object/{bucket}` with `{"prefixes": [paths]}`: removes
/// the caller's objects at those paths (any owner's for the service role) and
/// returns them; folders left empty go too (Supabase folders are implicit).
pub async fn remove(
    State(state): State<AppState>,
    Caller(p): Caller,
    ApiPath(bucket): ApiPath<String>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, StorageApiError> {
    let b: RemoveBody = json_body(&body)?;
    state.storage.bucket(&bucket).await?;
    let mut removed = Vec::new();
    for raw in &b.prefixes {
        let Ok(path) = object_path(raw) else { continue };
        let owners: Vec<Owner> = match (user_of(&p), p.is_service()) {
            (_, true) => state.storage.owners_at(&bucket, &path).await?,
            (Some(uid), false) => vec![Some(uid)],
            (None, false) => Vec::new(),
        };
        for owner in owners {
            let Some(f) = state.storage.file_at(&bucket, owner, &path).await? else {
                continue;
            };
            match state.storage.delete(owner, &bucket, &path).await {
                Ok(Deleted::File) => {
                    let mut v = file_json(&f);
                    v["name"] = json!(f.path);
                    v["bucket_id"] = json!(bucket);
                    v["owner"] = json!(owner.map(|o| o.hyphenated().to_string()));
                    removed.push(v);
                    prune_folders(&state, owner, &bucket, &path).await;
                }
                Ok(Deleted::Folder) | Err(StorageError::NotFound(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(Json(Value::Array(removed)))
}

/// Removes the now-empty folders above a deleted object, deepest first.
pub(super) async fn prune_folders(state: &AppState, owner: Owner, bucket: &str, path: &ObjectPath) {
    let mut dir = path.parent();
    while !dir.is_root() {
        if state.storage.delete(owner, bucket, &dir).await.is_err() {
            break;
        }
        dir = dir.parent();
    }
}
