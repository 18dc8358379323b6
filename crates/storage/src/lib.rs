//! The storage core: buckets, folders and files in PostgreSQL, bytes in a blob
//! store. HTTP shapes live in `aether-http` (the seed routes and the Supabase
//! facade both use this crate); it knows owners, paths and bytes only.
//!
//! Invariants:
//! - a row never points to bytes that are not (yet) stored: bytes are completed
//!   before the transaction that inserts their row commits, and deleted only after
//!   the transaction that removed their row committed;
//! - a refused, failed or abandoned upload leaves neither a row nor bytes;
//! - an object is named by its bucket and path, as on Supabase and S3; its
//!   owner is recorded, not part of the name. Who may read and write it is
//!   the RLS policies on `public.files`, evaluated by PostgreSQL as the
//!   caller ([`policy`]); by default any signed-in user may create objects
//!   (not under another user's home folder, `<user id>/…`), and only the
//!   owner or the service role reads them (unless the bucket is public),
//!   replaces, moves or deletes them ([`Actor`]);
//! - the owner is `Option<Uuid>`: `None` is the service role's owner-less
//!   objects (`owner_id` NULL), which count against no quota and whose bytes
//!   live under the blob prefix `service/`;
//! - a home folder has no `folders` row: what is directly in it has
//!   `folder_id` NULL, as a user's files at their root in the seed routes.
//!
//! Uploads take a per-owner advisory lock (one for all owner-less objects)
//! for the length of their transaction (and the prior owner's when replacing
//! another's object, both in one order; a transaction that finds the name
//! changed hands before its lock starts again with the new owner's), which
//! keeps the quota sum race-free;
//! every write also locks the first segment of the names it touches, which
//! keeps files and folders of one name apart.

pub mod blob;
pub mod path;
pub mod range;
pub mod types;

mod buckets;
mod delete;
mod errors;
mod files;
mod listing;
mod owners;
mod policy;
mod read;
mod record;
mod transfer;
mod upload;

use std::sync::Arc;

pub use blob::{BlobWriter, Blobs, S3Config, StorageBackend};
pub use buckets::{BucketInfo, BucketRecord, NewBucket, ensure_bucket, valid_bucket_id};
pub use delete::Deleted;
pub use errors::StorageError;
pub use files::{FileRecord, FolderRecord};
pub use listing::{FileCursor, FileSort, ListScope, Listing, SortColumn};
pub use owners::{Actor, Charge};
pub use path::{ObjectPath, PathError};
pub use policy::WriteFacts;
pub use range::ByteRange;
pub use read::ObjectRead;
pub use transfer::CopyOptions;
pub use types::AllowedTypes;
pub use upload::{PendingUpload, PumpError, TypeRules, UploadSource, UploadTarget, resolve_mime};

fn as_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// What the service enforces on uploads (`UPLOAD_BUCKET`, `MAX_FILE_SIZE`,
/// `ALLOWED_FILE_TYPES`, `STORAGE_QUOTA_BYTES`).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Where the seed API's uploads go when they name no bucket.
    pub default_bucket: String,
    pub max_file_size: u64,
    pub allowed_types: AllowedTypes,
    /// Bytes each user may store in all buckets together.
    pub quota_bytes: u64,
}

#[derive(Clone)]
pub struct StorageService(Arc<Inner>);

struct Inner {
    pool: deadpool_postgres::Pool,
    blobs: Blobs,
    default_bucket: String,
    max_file_size: u64,
    allowed: AllowedTypes,
    quota: u64,
    /// Whether the storage policies are in place, and when that was asked.
    policies: std::sync::Mutex<Option<(std::time::Instant, bool)>>,
}

impl StorageService {
    pub fn new(pool: deadpool_postgres::Pool, blobs: Blobs, limits: Limits) -> Self {
        StorageService(Arc::new(Inner {
            pool,
            blobs,
            default_bucket: limits.default_bucket,
            max_file_size: limits.max_file_size,
            allowed: limits.allowed_types,
            quota: limits.quota_bytes,
            policies: std::sync::Mutex::new(None),
        }))
    }

    pub fn default_bucket(&self) -> &str {
        &self.0.default_bucket
    }
}
