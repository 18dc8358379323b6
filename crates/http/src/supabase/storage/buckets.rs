//! Bucket routes: list, get, create, update, empty and delete.

use axum::Json;
use axum::extract::State;
use serde::Deserialize;
use serde_json::{Value, json};

use super::errors::StorageApiError;
use super::json_body;
use super::owners::{Caller, user_of};
use crate::AppState;
use crate::auth::timestamp;
use crate::extract::ApiPath;
use crate::validate::{self, Validate};
use aether_auth::Role;
use aether_storage::{NewBucket, StorageError};

fn bucket_json(b: &aether_storage::BucketRecord) -> Value {
    json!({
        "id": b.id,
        "name": b.name,
        "owner": b.owner_id.map(|o| o.hyphenated().to_string()).unwrap_or_default(),
        "public": b.public,
        "file_size_limit": b.file_size_limit,
        "allowed_mime_types": b.allowed_mime_types,
        "created_at": timestamp(&b.created_at),
        "updated_at": timestamp(&b.updated_at),
    })
}

/// `GET /storage/v1/bucket`.
pub(crate) async fn list_buckets(
    State(state): State<AppState>,
    Caller(p): Caller,
) -> Result<Json<Value>, StorageApiError> {
    let buckets = state.storage.list_buckets(&p).await?;
    Ok(Json(Value::Array(
        buckets.iter().map(bucket_json).collect(),
    )))
}

/// `GET /storage/v1/bucket/{id}`.
pub(crate) async fn get_bucket(
    State(state): State<AppState>,
    Caller(p): Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Value>, StorageApiError> {
    let buckets = state.storage.list_buckets(&p).await?;
    let b = buckets
        .iter()
        .find(|b| b.id == id)
        .ok_or(StorageError::BucketNotFound(id))?;
    Ok(Json(bucket_json(b)))
}

#[derive(Deserialize)]
pub(crate) struct CreateBucket {
    id: Option<String>,
    name: Option<String>,
    #[serde(default)]
    public: Option<bool>,
    file_size_limit: Option<Value>,
    allowed_mime_types: Option<Vec<String>>,
}

impl Validate for CreateBucket {
    /// A new bucket's id follows the rule for `UPLOAD_BUCKET`; its own code
    /// (`InvalidBucketName`), not the path's.
    fn validate(&self) -> Result<(), validate::Invalid> {
        for (field, v) in [("id", &self.id), ("name", &self.name)] {
            if let Some(v) = v {
                validate::bucket(field, v)?;
            }
        }
        let id = self.id.as_ref().or(self.name.as_ref());
        match id {
            Some(id) if aether_storage::valid_bucket_id(id) => Ok(()),
            _ => Err(validate::Invalid {
                kind: validate::Kind::Bucket,
                field: "id".into(),
                reason: format!(
                    "bucket id {:?} must be 1-63 of A-Za-z0-9._- starting with a letter or digit",
                    id.map(String::as_str).unwrap_or("")
                ),
            }),
        }
    }
}

/// `1048576`, `"1048576"`, `"1MB"`, `"500 KB"`, `"2GB"`.
fn size_limit(v: &Value) -> Result<Option<u64>, StorageApiError> {
    let bad = || StorageApiError::invalid(format!("file_size_limit {v} is not a size"));
    match v {
        Value::Null => Ok(None),
        Value::Number(n) => n.as_u64().map(Some).ok_or_else(bad),
        Value::String(s) => {
            let s = s.trim().to_ascii_uppercase();
            let digits: String = s.chars().take_while(|c| c.is_ascii_digit()).collect();
            let n: u64 = digits.parse().map_err(|_| bad())?;
            let unit = match s[digits.len()..].trim() {
                "" | "B" => 1,
                "KB" => 1 << 10,
                "MB" => 1 << 20,
                "GB" => 1 << 30,
                _ => return Err(bad()),
            };
            Ok(Some(n.saturating_mul(unit)))
        }
        _ => Err(bad()),
    }
}

/// `POST /storage/v1/bucket`: a signed-in user (the bucket's owner) or the
/// service role may create buckets.
pub(crate) async fn create_bucket(
    State(state): State<AppState>,
    Caller(p): Caller,
    body: axum::body::Bytes,
) -> Result<Json<Value>, StorageApiError> {
    let b: CreateBucket = json_body(&body)?;
    if p.role == Role::Anon {
        return Err(StorageApiError::denied(
            "new row violates row-level security policy",
        ));
    }
    let id = b.id.or(b.name).unwrap_or_default();
    let new = NewBucket {
        id: id.clone(),
        public: b.public.unwrap_or(false),
        file_size_limit: match &b.file_size_limit {
            Some(v) => size_limit(v)?,
            None => None,
        },
        allowed_mime_types: b.allowed_mime_types,
    };
    state.storage.create_bucket(user_of(&p), &new).await?;
    Ok(Json(json!({ "name": id })))
}

#[derive(Deserialize)]
pub(crate) struct UpdateBucket {
    public: Option<bool>,
    /// Absent: unchanged; `null`: no limit.
    #[serde(default, deserialize_with = "present")]
    file_size_limit: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    allowed_mime_types: Option<Value>,
}

/// Tells a field sent as `null` (`Some(Null)`) from one not sent (`None`).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

impl Validate for UpdateBucket {}

/// `PUT /storage/v1/bucket/{id}` (`updateBucket`): its owner or the service role.
pub(crate) async fn update_bucket(
    State(state): State<AppState>,
    Caller(p): Caller,
    ApiPath(id): ApiPath<String>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, StorageApiError> {
    let b: UpdateBucket = json_body(&body)?;
    let limit = match &b.file_size_limit {
        None => None,
        Some(v) => Some(size_limit(v)?),
    };
    let types = match b.allowed_mime_types {
        None => None,
        Some(Value::Null) => Some(None),
        Some(v) => Some(Some(serde_json::from_value::<Vec<String>>(v).map_err(
            |_| StorageApiError::invalid("allowed_mime_types must be a list of MIME types"),
        )?)),
    };
    state
        .storage
        .update_bucket(&p, &id, b.public, limit, types)
        .await?;
    Ok(Json(json!({ "message": "Successfully updated" })))
}

/// `DELETE /storage/v1/bucket/{id}` (`deleteBucket`): an empty bucket.
pub(crate) async fn delete_bucket(
    State(state): State<AppState>,
    Caller(p): Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Value>, StorageApiError> {
    state.storage.delete_bucket(&p, &id).await?;
    Ok(Json(json!({ "message": "Successfully deleted" })))
}

/// `POST /storage/v1/bucket/{id}/empty` (`emptyBucket`).
pub(crate) async fn empty_bucket(
    State(state): State<AppState>,
    Caller(p): Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Value>, StorageApiError> {
    state.storage.empty_bucket(&p, &id).await?;
    Ok(Json(json!({ "message": "Successfully emptied" })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_limits() {
        assert_eq!(size_limit(&json!(10)).unwrap(), Some(10));
        assert_eq!(size_limit(&json!("1MB")).unwrap(), Some(1 << 20));
        assert_eq!(size_limit(&json!("500 kb")).unwrap(), Some(500 << 10));
        assert!(size_limit(&json!("lots")).is_err());
        assert_eq!(size_limit(&Value::Null).unwrap(), None);
    }
}
