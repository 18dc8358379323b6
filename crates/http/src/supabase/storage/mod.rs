//! `/storage/v1`: the Supabase storage API over [`aether_storage::StorageService`].
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

pub(crate) use buckets::{
    create_bucket, delete_bucket, empty_bucket, get_bucket, list_buckets, update_bucket,
};
pub(crate) use download::{get_object, info, public_get};
pub(crate) use errors::{StorageApiError, code_for_native};
pub(crate) use listing::{list, list_v2};
pub(crate) use remove::remove;
pub(crate) use render::{render_authenticated, render_public};
pub(crate) use signed::{render_signed, sign, sign_many, sign_upload, signed_get, upload_signed};
pub(crate) use transfer::{copy_object, move_object};
pub(crate) use upload::{update, upload};

use serde_json::Value;

use crate::validate::{self, Validate};

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
