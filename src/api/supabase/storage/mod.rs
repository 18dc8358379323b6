//! `/storage/v1`: the Supabase storage API over [`crate::storage::StorageService`].
//!
//! Aether's paths are per owner; Supabase's are per bucket. The facade writes
//! under the caller's own user id (the service role: owner-less objects,
//! `owner_id` NULL, see [`Owner`](owners::Owner)), and resolves a read of `bucket/path` to the
//! caller's own file, else (public bucket, signed URL or service role) to the
//! oldest file at that path. Errors use the storage API's body
//! `{"statusCode": "404", "code": "NoSuchKey", "error": "not_found", "message": …}`
//! (storage-js reads `statusCode`, then `code`, and `message`).

mod buckets;
mod download;
mod errors;
mod listing;
mod owners;
mod remove;
mod render;
mod signed;
mod transfer;
mod upload;

pub use buckets::{
    CreateBucket, UpdateBucket, create_bucket, delete_bucket, empty_bucket, get_bucket,
    list_buckets, update_bucket,
};
pub use download::{get_object, info, public_get};
pub use errors::{StorageApiError, code_for_native};
pub use listing::{ListBody, ListV2Body, SortBy, list, list_v2};
pub use owners::Caller;
pub use remove::{RemoveBody, remove};
pub use render::{render_authenticated, render_public};
pub use signed::{
    SignBody, SignManyBody, render_signed, sign, sign_many, sign_upload, signed_get, upload_signed,
};
pub use transfer::{MoveBody, copy_object, move_object};
pub use upload::{UploadAnswer, update, upload};

use serde_json::Value;

use crate::api::validate::{self, Validate};

/// Parses a JSON body: the type's own checks ([`Validate`]), then no NUL in any
/// string or key (`InvalidRequest`), before any value reaches SQL.
fn json_body<T: serde::de::DeserializeOwned + Validate>(body: &[u8]) -> Result<T, StorageApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| StorageApiError::invalid(format!("invalid JSON body: {e}")))?;
    let t = T::deserialize(&v)
        .map_err(|e| StorageApiError::invalid(format!("invalid JSON body: {e}")))?;
    t.validate()?;
    validate::json(&v)?;
    Ok(t)
}
