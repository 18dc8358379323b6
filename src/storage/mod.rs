//! The storage core: buckets, folders and files in PostgreSQL, bytes in a blob
//! store. HTTP shapes live in `api::storage`; this module knows owners, paths and
//! bytes only, so other front ends (a Supabase-style facade) can share it.
//!
//! Invariants:
//! - a row never points to bytes that are not (yet) stored: bytes are completed
//!   before the transaction that inserts their row commits, and deleted only after
//!   the transaction that removed their row committed;
//! - a refused, failed or abandoned upload leaves neither a row nor bytes;
//! - paths are per owner: users see and change only their own files and folders;
//!   files in public buckets can be read by anyone;
//! - the owner is `Option<Uuid>`: `None` is the service role's owner-less
//!   objects (`owner_id` NULL), which count against no quota and whose bytes
//!   live under the blob prefix `service/`.
//!
//! Each owner's uploads and deletes take a per-owner advisory lock (one for all
//! owner-less objects) for the length of their transaction, which keeps the
//! quota sum and folder creation race-free.

pub mod blob;
pub mod path;
pub mod range;
pub mod types;

use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures_util::StreamExt as _;
use futures_util::TryStreamExt as _;
use futures_util::stream::BoxStream;
use object_store::{GetOptions, GetRange};
use tokio_postgres::GenericClient;
use uuid::Uuid;

use crate::auth::Principal;
use crate::config::Config;
pub use blob::{BlobWriter, Blobs};
pub use path::{ObjectPath, PathError};
pub use range::ByteRange;
pub use types::AllowedTypes;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("file exceeds the size limit of {limit} bytes")]
    FileTooLarge { limit: u64 },
    #[error("file type {mime} is not allowed (allowed: {allowed})")]
    InvalidType { mime: String, allowed: String },
    #[error(
        "storage quota exceeded: {used} of {quota} bytes in use, and this file needs {needed} more"
    )]
    QuotaExceeded { quota: u64, used: u64, needed: u64 },
    #[error("{0}")]
    NotFound(String),
    #[error("bucket {0:?} does not exist")]
    BucketNotFound(String),
    #[error("invalid path: {0}")]
    InvalidPath(#[from] PathError),
    /// A file already exists at the path (and overwriting was not asked for).
    #[error("a file already exists at {0:?}: delete it first, or ask to overwrite it")]
    AlreadyExists(String),
    /// A file where a folder is needed, or a folder where a file would go.
    #[error("{0}")]
    PathConflict(String),
    #[error("folder {0:?} is not empty")]
    FolderNotEmpty(String),
    #[error("bucket {0:?} already exists")]
    BucketAlreadyExists(String),
    #[error("the requested range is not satisfiable: the file has {size} bytes")]
    RangeNotSatisfiable { size: u64 },
    /// Reading a private bucket's file without credentials.
    #[error("sign in to read files in private buckets")]
    AuthRequired,
    /// Changing a bucket that is neither the caller's nor asked for by the
    /// service role.
    #[error("{0}")]
    Forbidden(String),
    #[error("storage backend failure: {0}")]
    Internal(String),
}

impl StorageError {
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        StorageError::Internal(cause.to_string())
    }
}

impl From<tokio_postgres::Error> for StorageError {
    fn from(e: tokio_postgres::Error) -> Self {
        StorageError::internal(format!("database: {e}"))
    }
}

impl From<deadpool_postgres::PoolError> for StorageError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        StorageError::internal(format!("database pool: {e}"))
    }
}

impl From<object_store::Error> for StorageError {
    fn from(e: object_store::Error) -> Self {
        StorageError::internal(format!("blob store: {e}"))
    }
}

#[derive(Debug, Clone)]
pub struct BucketInfo {
    pub id: String,
    pub public: bool,
    pub file_size_limit: Option<u64>,
    pub allowed_mime_types: Option<AllowedTypes>,
}

#[derive(Debug, Clone)]
pub struct FileRecord {
    pub id: Uuid,
    pub bucket: String,
    pub owner_id: Option<Uuid>,
    pub folder_id: Option<Uuid>,
    pub path: String,
    pub name: String,
    pub size: u64,
    pub mime_type: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The custom metadata its uploader gave (`/storage/v1`'s `metadata`).
    pub user_metadata: Option<serde_json::Value>,
    storage_key: Option<String>,
}

impl FileRecord {
    /// Which upload of the file this is: it changes whenever the bytes do
    /// (every upload gets a fresh blob key).
    pub fn version(&self) -> Option<&str> {
        self.storage_key
            .as_deref()
            .and_then(|k| k.rsplit('/').next())
    }
}

#[derive(Debug, Clone)]
pub struct FolderRecord {
    pub id: Uuid,
    pub parent_id: Option<Uuid>,
    pub path: String,
    pub name: String,
    pub created_at: DateTime<Utc>,
}

/// What is directly inside a folder (or a bucket's root) for one owner.
#[derive(Debug, Clone)]
pub struct Listing {
    /// `None` for the root.
    pub folder_id: Option<Uuid>,
    pub folders: Vec<FolderRecord>,
    pub files: Vec<FileRecord>,
}

/// The order of [`StorageService::files_under`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SortColumn {
    #[default]
    Name,
    CreatedAt,
    UpdatedAt,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FileSort {
    pub column: SortColumn,
    pub desc: bool,
}

/// Where a page of [`StorageService::files_under`] ended: the last file's
/// sort time (when sorting by time), path and id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileCursor {
    pub time: Option<DateTime<Utc>>,
    pub path: String,
    pub id: Uuid,
}

/// What was removed by [`StorageService::delete`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Deleted {
    File,
    Folder,
}

/// Which type rules an upload answers to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TypeRules {
    /// `ALLOWED_FILE_TYPES` and the bucket's `allowed_mime_types`: the seed
    /// routes (`POST /storage/upload`).
    #[default]
    Server,
    /// The bucket's `allowed_mime_types` only: `/storage/v1`, where (as on
    /// Supabase) any type is allowed unless the bucket says otherwise.
    BucketOnly,
}

/// What the client said about the file it is sending.
#[derive(Debug, Clone, Default)]
pub struct UploadSource {
    /// The file's own name (no directories), possibly empty.
    pub file_name: String,
    /// The declared `Content-Type`, if any.
    pub content_type: Option<String>,
    /// Which type rules apply.
    pub types: TypeRules,
}

/// Where an upload goes.
#[derive(Debug, Clone)]
pub struct UploadTarget {
    pub bucket: String,
    pub path: ObjectPath,
    /// Replace a file already at `path` instead of refusing.
    pub upsert: bool,
    /// The id a new file row gets (announced early, e.g. in upload progress);
    /// `None`: generated by PostgreSQL. An overwrite keeps the existing row's id.
    pub id: Option<Uuid>,
    /// Custom metadata (a JSON object) to record with the file; an overwrite
    /// replaces the old file's.
    pub user_metadata: Option<serde_json::Value>,
}

/// An upload whose bytes are arriving: size, type and quota are enforced as they
/// come. Dropping it (or [`PendingUpload::discard`]) removes what was written.
#[derive(Debug)]
pub struct PendingUpload {
    owner: Option<Uuid>,
    blob: BlobWriter,
    limit: u64,
    quota: u64,
    used: u64,
    mime: String,
    file_name: String,
    types: TypeRules,
}

impl PendingUpload {
    pub fn file_name(&self) -> &str {
        &self.file_name
    }

    pub fn size(&self) -> u64 {
        self.blob.written()
    }

    /// Appends a chunk; refuses (and cleans up) as soon as the file is too large
    /// or the owner's quota would be exceeded.
    pub async fn write(&mut self, chunk: Bytes) -> Result<(), StorageError> {
        let size = self.blob.written() + chunk.len() as u64;
        let refusal = if size > self.limit {
            Some(StorageError::FileTooLarge { limit: self.limit })
        } else if self.used.saturating_add(size) > self.quota {
            Some(StorageError::QuotaExceeded {
                quota: self.quota,
                used: self.used,
                needed: size,
            })
        } else {
            None
        };
        if let Some(e) = refusal {
            self.discard().await;
            return Err(e);
        }
        if let Err(e) = self.blob.write(chunk).await {
            self.discard().await;
            return Err(e.into());
        }
        Ok(())
    }

    /// The one upload pump, for every route: writes `body` chunk by chunk until
    /// it ends, telling `progress` the bytes written after each chunk. A refusal
    /// (size, quota, storage) cleans up as [`write`](Self::write) does; an error
    /// reading the body is the caller's to describe.
    pub async fn pump<S, E>(
        &mut self,
        mut body: S,
        mut progress: impl FnMut(u64),
    ) -> Result<(), PumpError<E>>
    where
        S: futures_util::Stream<Item = Result<Bytes, E>> + Unpin,
    {
        use futures_util::StreamExt as _;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(PumpError::Body)?;
            self.write(chunk).await.map_err(PumpError::Storage)?;
            progress(self.size());
        }
        Ok(())
    }

    /// Removes the bytes written so far.
    pub async fn discard(&mut self) {
        self.blob.discard().await;
    }
}

/// Why [`PendingUpload::pump`] stopped.
#[derive(Debug)]
pub enum PumpError<E> {
    /// The upload was refused (too large, over quota) or could not be stored.
    Storage(StorageError),
    /// The request body could not be read.
    Body(E),
}

/// What a commit records about a completed upload (or a copy).
struct Recording {
    owner: Option<Uuid>,
    size: u64,
    mime: String,
    file_name: String,
    key: String,
    types: TypeRules,
}

/// A bucket as listed.
#[derive(Debug, Clone)]
pub struct BucketRecord {
    pub id: String,
    pub name: String,
    pub owner_id: Option<Uuid>,
    pub public: bool,
    pub file_size_limit: Option<i64>,
    pub allowed_mime_types: Option<Vec<String>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// What a new bucket is.
#[derive(Debug, Clone, Default)]
pub struct NewBucket {
    pub id: String,
    pub public: bool,
    pub file_size_limit: Option<u64>,
    pub allowed_mime_types: Option<Vec<String>>,
}

const BUCKET_COLUMNS: &str =
    "id, name, owner_id, public, file_size_limit, allowed_mime_types, created_at, updated_at";

fn bucket_from_row(r: &tokio_postgres::Row) -> BucketRecord {
    BucketRecord {
        id: r.get(0),
        name: r.get(1),
        owner_id: r.get(2),
        public: r.get(3),
        file_size_limit: r.get(4),
        allowed_mime_types: r.get(5),
        created_at: r.get(6),
        updated_at: r.get(7),
    }
}

/// A file opened for reading.
pub struct ObjectRead {
    pub file: FileRecord,
    pub bucket_public: bool,
    /// `[start, end)` when a range was asked for.
    pub span: Option<(u64, u64)>,
    pub body: BoxStream<'static, Result<Bytes, StorageError>>,
}

const FILE_COLUMNS: &str = "id, bucket_id, owner_id, folder_id, path, name, size, mime_type, created_at, updated_at, storage_key, metadata";

fn file_from_row(r: &tokio_postgres::Row) -> FileRecord {
    FileRecord {
        id: r.get("id"),
        bucket: r.get("bucket_id"),
        owner_id: r.get("owner_id"),
        folder_id: r.get("folder_id"),
        path: r.get("path"),
        name: r.get("name"),
        size: u64::try_from(r.get::<_, i64>("size")).unwrap_or(0),
        mime_type: r
            .get::<_, Option<String>>("mime_type")
            .unwrap_or_else(|| "application/octet-stream".into()),
        created_at: r.get("created_at"),
        updated_at: r.get("updated_at"),
        user_metadata: r
            .get::<_, Option<serde_json::Value>>("metadata")
            .and_then(|mut m| m.get_mut("user_metadata").map(serde_json::Value::take))
            .filter(|m| !m.is_null()),
        storage_key: r.get("storage_key"),
    }
}

/// `files.metadata`: the uploaded file's own name and any custom metadata.
fn file_metadata(file_name: &str, user: Option<&serde_json::Value>) -> serde_json::Value {
    let mut m = serde_json::json!({ "original_name": file_name });
    if let Some(u) = user {
        m["user_metadata"] = u.clone();
    }
    m
}

fn folder_from_row(r: &tokio_postgres::Row) -> FolderRecord {
    FolderRecord {
        id: r.get("id"),
        parent_id: r.get("parent_id"),
        path: r.get("path"),
        name: r.get("name"),
        created_at: r.get("created_at"),
    }
}

fn as_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The MIME type to record: the declared one, or a guess from the name when the
/// client sent none (or only `application/octet-stream`).
pub fn resolve_mime(declared: Option<&str>, file_name: &str) -> String {
    declared
        .and_then(types::normalize_mime)
        .filter(|m| m != "application/octet-stream")
        .or_else(|| {
            mime_guess::from_path(file_name)
                .first_raw()
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "application/octet-stream".into())
}

/// Creates the bucket `id` unless it exists (used at start for `UPLOAD_BUCKET`).
pub async fn ensure_bucket(
    client: &tokio_postgres::Client,
    id: &str,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "INSERT INTO public.buckets (id, name) VALUES ($1, $1) ON CONFLICT (id) DO NOTHING",
            &[&id],
        )
        .await?;
    Ok(())
}

async fn bucket_in(c: &impl GenericClient, id: &str) -> Result<BucketInfo, StorageError> {
    let row = c
        .query_opt(
            "SELECT public, file_size_limit, allowed_mime_types FROM public.buckets WHERE id = $1",
            &[&id],
        )
        .await?
        .ok_or_else(|| StorageError::BucketNotFound(id.to_owned()))?;
    let types: Option<Vec<String>> = row.get(2);
    Ok(BucketInfo {
        id: id.to_owned(),
        public: row.get(0),
        file_size_limit: row
            .get::<_, Option<i64>>(1)
            .and_then(|n| u64::try_from(n).ok()),
        allowed_mime_types: types
            .filter(|t| !t.is_empty())
            .and_then(|t| AllowedTypes::from_mime_list(&t)),
    })
}

async fn used_bytes(c: &impl GenericClient, owner: Uuid) -> Result<u64, StorageError> {
    let used: i64 = c
        .query_one(
            "SELECT COALESCE(SUM(size), 0)::bigint FROM public.files WHERE owner_id = $1",
            &[&owner],
        )
        .await?
        .get(0);
    Ok(u64::try_from(used).unwrap_or(0))
}

/// The first segment of the blob keys of owner-less (service-role) objects;
/// a user's keys start with their id.
const SERVICE_PREFIX: &str = "service";

/// A fresh blob key for `owner`'s bytes: `<owner>/<uuid>`, or
/// `service/<uuid>` for an owner-less object.
fn blob_key(owner: Option<Uuid>) -> String {
    let id = Uuid::new_v4().simple();
    match owner {
        Some(o) => format!("{o}/{id}"),
        None => format!("{SERVICE_PREFIX}/{id}"),
    }
}

/// The SQL test that column `col` (an `owner_id`) is `owner`, given as
/// parameter `$n`: `=` for a user, `IS NULL` for the owner-less (which keeps
/// the `(bucket_id, owner_id, path)` index usable, as `IS NOT DISTINCT FROM`
/// would not; `$n` is still mentioned so that its type is known).
fn owner_is(col: &str, owner: Option<Uuid>, n: u8) -> String {
    match owner {
        Some(_) => format!("{col} = ${n}"),
        None => format!("({col} IS NULL AND ${n}::uuid IS NULL)"),
    }
}

/// Serializes one owner's writes (all owner-less ones together) until the
/// transaction ends.
async fn lock_owner(c: &impl GenericClient, owner: Option<Uuid>) -> Result<(), StorageError> {
    let key = owner.map_or_else(|| SERVICE_PREFIX.to_owned(), |o| o.to_string());
    c.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended($1, 7489))",
        &[&key],
    )
    .await?;
    Ok(())
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
}

/// Whose files [`StorageService::delete_all`] deletes.
enum Of<'a> {
    Owner(Uuid),
    Bucket(&'a str),
}

impl StorageService {
    pub fn new(pool: deadpool_postgres::Pool, blobs: Blobs, config: &Config) -> Self {
        StorageService(Arc::new(Inner {
            pool,
            blobs,
            default_bucket: config.upload_bucket.clone(),
            max_file_size: config.max_file_size,
            allowed: config.allowed_file_types.clone(),
            quota: config.storage_quota_bytes,
        }))
    }

    pub fn default_bucket(&self) -> &str {
        &self.0.default_bucket
    }

    /// Creates a bucket owned by `owner` (`None`: by no user, e.g. service role).
    pub async fn create_bucket(
        &self,
        owner: Option<Uuid>,
        b: &NewBucket,
    ) -> Result<BucketRecord, StorageError> {
        if !crate::config::valid_bucket_id(&b.id) {
            return Err(StorageError::InvalidPath(PathError(format!(
                "bucket id {:?} must be 1-63 of A-Za-z0-9._- starting with a letter or digit",
                b.id
            ))));
        }
        if let Some(types) = &b.allowed_mime_types
            && !types.is_empty()
            && AllowedTypes::from_mime_list(types).is_none()
        {
            return Err(StorageError::InvalidPath(PathError(format!(
                "allowed_mime_types {types:?} is not a list of MIME types"
            ))));
        }
        let limit = b.file_size_limit.map(as_i64);
        let client = self.0.pool.get().await?;
        let row = client
            .query_opt(
                &format!(
                    "INSERT INTO public.buckets (id, name, owner_id, public, file_size_limit, allowed_mime_types)
                     VALUES ($1, $1, $2, $3, $4, $5)
                     ON CONFLICT (id) DO NOTHING
                     RETURNING {BUCKET_COLUMNS}"
                ),
                &[&b.id, &owner, &b.public, &limit, &b.allowed_mime_types],
            )
            .await?
            .ok_or_else(|| StorageError::BucketAlreadyExists(b.id.clone()))?;
        Ok(bucket_from_row(&row))
    }

    /// Locks bucket `id` for a change only its owner or the service role may make.
    async fn bucket_for_change(
        tx: &tokio_postgres::Transaction<'_>,
        viewer: &Principal,
        id: &str,
    ) -> Result<(), StorageError> {
        let row = tx
            .query_opt(
                "SELECT owner_id FROM public.buckets WHERE id = $1 FOR UPDATE",
                &[&id],
            )
            .await?
            .ok_or_else(|| StorageError::BucketNotFound(id.to_owned()))?;
        let owner: Option<Uuid> = row.get(0);
        let uid = viewer
            .user_id
            .as_deref()
            .and_then(|u| Uuid::parse_str(u).ok());
        if viewer.is_service() || (owner.is_some() && owner == uid) {
            Ok(())
        } else {
            Err(StorageError::Forbidden(format!(
                "only the owner of bucket {id:?} or the service role may change it"
            )))
        }
    }

    /// Changes a bucket's settings (`None`: leave as is; `Some(None)`: clear).
    pub async fn update_bucket(
        &self,
        viewer: &Principal,
        id: &str,
        public: Option<bool>,
        file_size_limit: Option<Option<u64>>,
        allowed_mime_types: Option<Option<Vec<String>>>,
    ) -> Result<(), StorageError> {
        if let Some(Some(types)) = &allowed_mime_types
            && !types.is_empty()
            && AllowedTypes::from_mime_list(types).is_none()
        {
            return Err(StorageError::InvalidPath(PathError(format!(
                "allowed_mime_types {types:?} is not a list of MIME types"
            ))));
        }
        let mut client = self.0.pool.get().await?;
        let tx = client.transaction().await?;
        Self::bucket_for_change(&tx, viewer, id).await?;
        let limit = file_size_limit.map(|l| l.map(as_i64));
        tx.execute(
            "UPDATE public.buckets SET
                 public = coalesce($2, public),
                 file_size_limit = CASE WHEN $3 THEN $4 ELSE file_size_limit END,
                 allowed_mime_types = CASE WHEN $5 THEN $6 ELSE allowed_mime_types END,
                 updated_at = now()
             WHERE id = $1",
            &[
                &id,
                &public,
                &limit.is_some(),
                &limit.flatten(),
                &allowed_mime_types.is_some(),
                &allowed_mime_types.flatten(),
            ],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Deletes an empty bucket (never the seed routes' `UPLOAD_BUCKET`).
    pub async fn delete_bucket(&self, viewer: &Principal, id: &str) -> Result<(), StorageError> {
        if id == self.0.default_bucket {
            return Err(StorageError::Forbidden(format!(
                "bucket {id:?} is UPLOAD_BUCKET, which the seed routes need"
            )));
        }
        let mut client = self.0.pool.get().await?;
        let tx = client.transaction().await?;
        Self::bucket_for_change(&tx, viewer, id).await?;
        let busy: bool = tx
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM public.files WHERE bucket_id = $1)
                     OR EXISTS (SELECT 1 FROM public.folders WHERE bucket_id = $1)",
                &[&id],
            )
            .await?
            .get(0);
        if busy {
            return Err(StorageError::PathConflict(format!(
                "bucket {id:?} is not empty: empty it first"
            )));
        }
        tx.execute("DELETE FROM public.buckets WHERE id = $1", &[&id])
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Deletes every file and folder in a bucket (rows, then bytes); returns
    /// how many files went.
    pub async fn empty_bucket(&self, viewer: &Principal, id: &str) -> Result<usize, StorageError> {
        let mut client = self.0.pool.get().await?;
        let tx = client.transaction().await?;
        Self::bucket_for_change(&tx, viewer, id).await?;
        self.delete_all(tx, Of::Bucket(id)).await
    }

    /// Buckets `viewer` may see: public ones and their own; all for service role.
    pub async fn list_buckets(
        &self,
        viewer: &Principal,
    ) -> Result<Vec<BucketRecord>, StorageError> {
        let client = self.0.pool.get().await?;
        let uid = viewer
            .user_id
            .as_deref()
            .and_then(|u| Uuid::parse_str(u).ok());
        let rows = client
            .query(
                &format!(
                    "SELECT {BUCKET_COLUMNS} FROM public.buckets
                     WHERE $1 OR public OR owner_id = $2 ORDER BY id"
                ),
                &[&viewer.is_service(), &uid],
            )
            .await?;
        Ok(rows.iter().map(bucket_from_row).collect())
    }

    /// The owners of files at `path` in `bucket`: the owner-less file (`None`,
    /// the service role's) first, then the oldest first (paths are per owner,
    /// so there may be several). Owner-less first so that a user who uploads at
    /// a path before the service role publishes there cannot take over what
    /// anonymous readers of a public bucket get.
    pub async fn owners_at(
        &self,
        bucket: &str,
        path: &ObjectPath,
    ) -> Result<Vec<Option<Uuid>>, StorageError> {
        let client = self.0.pool.get().await?;
        let rows = client
            .query(
                "SELECT owner_id FROM public.files
                 WHERE bucket_id = $1 AND path = $2
                 ORDER BY owner_id IS NOT NULL, created_at, id",
                &[&bucket, &path.to_string()],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// `owner`'s file at `path`, if any (`None`: the owner-less one).
    pub async fn file_at(
        &self,
        bucket: &str,
        owner: Option<Uuid>,
        path: &ObjectPath,
    ) -> Result<Option<FileRecord>, StorageError> {
        let client = self.0.pool.get().await?;
        let row = client
            .query_opt(
                &format!(
                    "SELECT {FILE_COLUMNS} FROM public.files
                     WHERE bucket_id = $1 AND {} AND path = $3",
                    owner_is("owner_id", owner, 2)
                ),
                &[&bucket, &owner, &path.to_string()],
            )
            .await?;
        Ok(row.as_ref().map(file_from_row))
    }

    /// Every owner with files or folders in `bucket` (`None`: owner-less ones).
    pub async fn owners_in(&self, bucket: &str) -> Result<Vec<Option<Uuid>>, StorageError> {
        let client = self.0.pool.get().await?;
        let rows = client
            .query(
                "SELECT owner_id FROM public.files WHERE bucket_id = $1
                 UNION
                 SELECT owner_id FROM public.folders WHERE bucket_id = $1",
                &[&bucket],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    pub async fn bucket(&self, id: &str) -> Result<BucketInfo, StorageError> {
        let client = self.0.pool.get().await?;
        bucket_in(&**client, id).await
    }

    fn check_type(
        &self,
        mime: &str,
        name: &str,
        bucket: Option<&BucketInfo>,
        types: TypeRules,
    ) -> Result<(), StorageError> {
        let refuse = |allowed: &AllowedTypes| StorageError::InvalidType {
            mime: mime.to_owned(),
            allowed: allowed.to_string(),
        };
        if types == TypeRules::Server && !self.0.allowed.allows(mime, name) {
            return Err(refuse(&self.0.allowed));
        }
        if let Some(types) = bucket.and_then(|b| b.allowed_mime_types.as_ref())
            && !types.allows(mime, name)
        {
            return Err(refuse(types));
        }
        Ok(())
    }

    /// The largest file an upload may have: `MAX_FILE_SIZE`, or the bucket's
    /// `file_size_limit` when smaller.
    pub fn size_limit(&self, bucket: Option<&BucketInfo>) -> u64 {
        let own = bucket.and_then(|b| b.file_size_limit).unwrap_or(u64::MAX);
        self.0.max_file_size.min(own)
    }

    /// Starts an upload for `owner`: checks the type and that some quota is left,
    /// and opens the blob. `bucket`, when already known, tightens the limits.
    /// An owner-less upload (`None`, the service role's) has no quota.
    pub async fn begin_upload(
        &self,
        owner: Option<Uuid>,
        source: UploadSource,
        bucket: Option<&BucketInfo>,
    ) -> Result<PendingUpload, StorageError> {
        let mime = resolve_mime(source.content_type.as_deref(), &source.file_name);
        self.check_type(&mime, &source.file_name, bucket, source.types)?;
        let (used, quota) = match owner {
            Some(o) => {
                let client = self.0.pool.get().await?;
                (used_bytes(&**client, o).await?, self.0.quota)
            }
            None => (0, u64::MAX),
        };
        if used >= quota {
            return Err(StorageError::QuotaExceeded {
                quota,
                used,
                needed: 1,
            });
        }
        let blob = BlobWriter::start(&self.0.blobs, blob_key(owner)).await?;
        Ok(PendingUpload {
            owner,
            blob,
            limit: self.size_limit(bucket),
            quota,
            used,
            mime,
            file_name: source.file_name,
            types: source.types,
        })
    }

    /// Completes the bytes, then records the file (and any missing folders) in one
    /// transaction. Runs to the end even if the caller goes away, so it never
    /// leaves bytes and row out of step.
    pub async fn commit(
        &self,
        upload: PendingUpload,
        target: UploadTarget,
    ) -> Result<FileRecord, StorageError> {
        let svc = self.clone();
        tokio::spawn(async move { svc.commit_owned(upload, target).await })
            .await
            .map_err(StorageError::internal)?
    }

    async fn commit_owned(
        &self,
        mut up: PendingUpload,
        target: UploadTarget,
    ) -> Result<FileRecord, StorageError> {
        if let Err(e) = up.blob.finish().await {
            up.discard().await;
            return Err(e.into());
        }
        let facts = Recording {
            owner: up.owner,
            size: up.size(),
            mime: up.mime.clone(),
            file_name: up.file_name.clone(),
            key: up.blob.key().to_owned(),
            types: up.types,
        };
        match self.record(&facts, &target).await {
            Ok((file, replaced)) => {
                up.blob.keep();
                if let Some(old) = replaced {
                    self.0.blobs.delete_quietly(&old).await;
                }
                Ok(file)
            }
            Err(e) => {
                if matches!(e, StorageError::Internal(_)) && self.row_exists(up.blob.key()).await {
                    // The commit may have gone through after all: keep the bytes.
                    up.blob.keep();
                } else {
                    up.discard().await;
                }
                Err(e)
            }
        }
    }

    /// Whether a row points to `key`; `true` when that cannot be told.
    async fn row_exists(&self, key: &str) -> bool {
        let Ok(client) = self.0.pool.get().await else {
            return true;
        };
        client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM public.files WHERE storage_key = $1)",
                &[&key],
            )
            .await
            .map(|r| r.get::<_, bool>(0))
            .unwrap_or(true)
    }

    /// The transaction of a commit; returns the file and the blob key it replaced.
    async fn record(
        &self,
        up: &Recording,
        target: &UploadTarget,
    ) -> Result<(FileRecord, Option<String>), StorageError> {
        let owner = up.owner;
        let size = up.size;
        let path = target.path.to_string();
        let mut client = self.0.pool.get().await?;
        let tx = client.transaction().await?;
        lock_owner(&*tx, owner).await?;
        let bucket = bucket_in(&*tx, &target.bucket).await?;
        if size > self.size_limit(Some(&bucket)) {
            return Err(StorageError::FileTooLarge {
                limit: self.size_limit(Some(&bucket)),
            });
        }
        self.check_type(&up.mime, &up.file_name, Some(&bucket), up.types)?;
        let owned = owner_is("owner_id", owner, 2);
        let is_folder = tx
            .query_opt(
                &format!(
                    "SELECT 1 FROM public.folders WHERE bucket_id = $1 AND {owned} AND path = $3"
                ),
                &[&target.bucket, &owner, &path],
            )
            .await?
            .is_some();
        if is_folder {
            return Err(StorageError::PathConflict(format!(
                "{path:?} is a folder; a file cannot take its place"
            )));
        }
        let folder_id = ensure_folders(&*tx, &target.bucket, owner, &target.path.parent()).await?;
        let existing = tx
            .query_opt(
                &format!(
                    "SELECT id, size, storage_key FROM public.files
                     WHERE bucket_id = $1 AND {owned} AND path = $3 FOR UPDATE"
                ),
                &[&target.bucket, &owner, &path],
            )
            .await?;
        if existing.is_some() && !target.upsert {
            return Err(StorageError::AlreadyExists(path));
        }
        let replaced_size = existing
            .as_ref()
            .map(|r| u64::try_from(r.get::<_, i64>(1)).unwrap_or(0))
            .unwrap_or(0);
        // Owner-less (service-role) objects count against no quota.
        if let Some(user) = owner {
            let used = used_bytes(&*tx, user).await?.saturating_sub(replaced_size);
            if used.saturating_add(size) > self.0.quota {
                return Err(StorageError::QuotaExceeded {
                    quota: self.0.quota,
                    used,
                    needed: size,
                });
            }
        }
        let metadata = file_metadata(&up.file_name, target.user_metadata.as_ref());
        let (row, replaced) = match &existing {
            Some(old) => {
                let id: Uuid = old.get(0);
                let row = tx
                    .query_one(
                        &format!(
                            "UPDATE public.files SET folder_id = $2, name = $3, size = $4, mime_type = $5,
                                 storage_key = $6, metadata = $7
                             WHERE id = $1 RETURNING {FILE_COLUMNS}"
                        ),
                        &[
                            &id,
                            &folder_id,
                            &target.path.name(),
                            &as_i64(size),
                            &up.mime,
                            &up.key,
                            &metadata,
                        ],
                    )
                    .await?;
                (row, old.get::<_, Option<String>>(2))
            }
            None => {
                let row = tx
                    .query_one(
                        &format!(
                            "INSERT INTO public.files
                                 (id, bucket_id, folder_id, path, name, size, mime_type, owner_id, storage_key, metadata)
                             VALUES (coalesce($10, gen_random_uuid()), $1, $2, $3, $4, $5, $6, $7, $8, $9)
                             RETURNING {FILE_COLUMNS}"
                        ),
                        &[
                            &target.bucket,
                            &folder_id,
                            &path,
                            &target.path.name(),
                            &as_i64(size),
                            &up.mime,
                            &owner,
                            &up.key,
                            &metadata,
                            &target.id,
                        ],
                    )
                    .await?;
                (row, None)
            }
        };
        tx.commit().await?;
        Ok((file_from_row(&row), replaced))
    }

    /// `owner`'s files and folders directly under `folder` (the root when
    /// empty; `None`: the owner-less ones).
    pub async fn list(
        &self,
        owner: Option<Uuid>,
        bucket: &str,
        folder: &ObjectPath,
    ) -> Result<Listing, StorageError> {
        let client = self.0.pool.get().await?;
        bucket_in(&**client, bucket).await?;
        let owned = owner_is("owner_id", owner, 2);
        let folder_id: Option<Uuid> = if folder.is_root() {
            None
        } else {
            let row = client
                .query_opt(
                    &format!("SELECT id FROM public.folders WHERE bucket_id = $1 AND {owned} AND path = $3"),
                    &[&bucket, &owner, &folder.to_string()],
                )
                .await?
                .ok_or_else(|| StorageError::NotFound(format!("folder {:?} not found", folder.to_string())))?;
            Some(row.get(0))
        };
        // `= $3` under a folder (served by the parent/folder indexes), `IS NULL` at
        // the root (served by the (bucket_id, owner_id, path) index prefix).
        let (parent_cond, folder_cond) = match folder_id {
            Some(_) => ("parent_id = $3", "folder_id = $3"),
            None => ("parent_id IS NULL", "folder_id IS NULL"),
        };
        let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![&bucket, &owner];
        if let Some(id) = &folder_id {
            params.push(id);
        }
        let folders = client
            .query(
                &format!(
                    "SELECT id, parent_id, path, name, created_at FROM public.folders
                     WHERE bucket_id = $1 AND {owned} AND {parent_cond}
                     ORDER BY name"
                ),
                &params,
            )
            .await?
            .iter()
            .map(folder_from_row)
            .collect();
        let files = client
            .query(
                &format!(
                    "SELECT {FILE_COLUMNS} FROM public.files
                     WHERE bucket_id = $1 AND {owned} AND {folder_cond}
                     ORDER BY name"
                ),
                &params,
            )
            .await?
            .iter()
            .map(file_from_row)
            .collect();
        Ok(Listing {
            folder_id,
            folders,
            files,
        })
    }

    /// Moves `owner`'s file at `from` (in `from_bucket`) to `to` in `to_bucket`,
    /// keeping its row (id, owner, bytes): one transaction that updates the
    /// row's bucket, path and folder. Refused when a file or folder is at `to`;
    /// into another bucket, that bucket's size limit and types apply.
    pub async fn move_file(
        &self,
        owner: Option<Uuid>,
        from_bucket: &str,
        from: &ObjectPath,
        to_bucket: &str,
        to: &ObjectPath,
    ) -> Result<FileRecord, StorageError> {
        let (src, dst) = (from.to_string(), to.to_string());
        let mut client = self.0.pool.get().await?;
        let tx = client.transaction().await?;
        lock_owner(&*tx, owner).await?;
        bucket_in(&*tx, from_bucket).await?;
        let bucket = bucket_in(&*tx, to_bucket).await?;
        let owned = owner_is("owner_id", owner, 2);
        let row = tx
            .query_opt(
                &format!(
                    "SELECT {FILE_COLUMNS} FROM public.files
                     WHERE bucket_id = $1 AND {owned} AND path = $3 FOR UPDATE"
                ),
                &[&from_bucket, &owner, &src],
            )
            .await?
            .ok_or_else(|| StorageError::NotFound(format!("no file at {src:?}")))?;
        let file = file_from_row(&row);
        if from_bucket == to_bucket && src == dst {
            return Ok(file);
        }
        if from_bucket != to_bucket {
            let limit = self.size_limit(Some(&bucket));
            if file.size > limit {
                return Err(StorageError::FileTooLarge { limit });
            }
            self.check_type(
                &file.mime_type,
                to.name(),
                Some(&bucket),
                TypeRules::BucketOnly,
            )?;
        }
        let taken = tx
            .query_one(
                &format!(
                    "SELECT EXISTS (SELECT 1 FROM public.folders
                                    WHERE bucket_id = $1 AND {owned} AND path = $3),
                            EXISTS (SELECT 1 FROM public.files
                                    WHERE bucket_id = $1 AND {owned} AND path = $3)"
                ),
                &[&to_bucket, &owner, &dst],
            )
            .await?;
        if taken.get::<_, bool>(0) {
            return Err(StorageError::PathConflict(format!(
                "{dst:?} is a folder; a file cannot take its place"
            )));
        }
        if taken.get::<_, bool>(1) {
            return Err(StorageError::AlreadyExists(dst));
        }
        let folder_id = ensure_folders(&*tx, to_bucket, owner, &to.parent()).await?;
        let row = tx
            .query_one(
                &format!(
                    "UPDATE public.files SET bucket_id = $2, folder_id = $3, path = $4, name = $5
                     WHERE id = $1 RETURNING {FILE_COLUMNS}"
                ),
                &[&file.id, &to_bucket, &folder_id, &dst, &to.name()],
            )
            .await?;
        tx.commit().await?;
        Ok(file_from_row(&row))
    }

    /// Copies `owner`'s file at `from` (in `from_bucket`) to `to` in `to_bucket`,
    /// for the same owner, with its custom metadata: the bytes are copied under
    /// a fresh key, then recorded as an upload is (the destination bucket's
    /// rules, the owner's quota; `upsert` replaces a file at `to`). Copying a
    /// file onto itself changes nothing. Runs to the end even if the caller
    /// goes away.
    pub async fn copy_file(
        &self,
        owner: Option<Uuid>,
        from_bucket: &str,
        from: &ObjectPath,
        to_bucket: &str,
        to: &ObjectPath,
        upsert: bool,
    ) -> Result<FileRecord, StorageError> {
        let svc = self.clone();
        let (from_bucket, from, to_bucket, to) = (
            from_bucket.to_owned(),
            from.clone(),
            to_bucket.to_owned(),
            to.clone(),
        );
        tokio::spawn(async move {
            svc.copy_owned(owner, &from_bucket, &from, &to_bucket, &to, upsert)
                .await
        })
        .await
        .map_err(StorageError::internal)?
    }

    async fn copy_owned(
        &self,
        owner: Option<Uuid>,
        from_bucket: &str,
        from: &ObjectPath,
        to_bucket: &str,
        to: &ObjectPath,
        upsert: bool,
    ) -> Result<FileRecord, StorageError> {
        let not_found = || StorageError::NotFound(format!("no file at {:?}", from.to_string()));
        let src = self
            .file_at(from_bucket, owner, from)
            .await?
            .ok_or_else(not_found)?;
        if from_bucket == to_bucket && from == to {
            return Ok(src);
        }
        let src_key = src.storage_key.clone().ok_or_else(not_found)?;
        // What `record` refuses, refused before the bytes are copied: a copy
        // that cannot be kept must not cost a full read and write.
        self.copy_allowed(owner, &src, to_bucket, to, upsert)
            .await?;
        let key = blob_key(owner);
        // An empty file's blob may not exist: it is never read.
        let from_key = (src.size > 0).then_some(src_key.as_str());
        let copied = self.0.blobs.copy(from_key, &key).await;
        copied.map_err(|e| match e {
            object_store::Error::NotFound { .. } => not_found(),
            e => e.into(),
        })?;
        let facts = Recording {
            owner,
            size: src.size,
            mime: src.mime_type.clone(),
            file_name: to.name().to_owned(),
            key: key.clone(),
            types: TypeRules::BucketOnly,
        };
        let target = UploadTarget {
            bucket: to_bucket.to_owned(),
            path: to.clone(),
            upsert,
            id: None,
            user_metadata: src.user_metadata.clone(),
        };
        match self.record(&facts, &target).await {
            Ok((file, replaced)) => {
                if let Some(old) = replaced {
                    self.0.blobs.delete_quietly(&old).await;
                }
                Ok(file)
            }
            Err(e) => {
                if !(matches!(e, StorageError::Internal(_)) && self.row_exists(&key).await) {
                    self.0.blobs.delete_quietly(&key).await;
                }
                Err(e)
            }
        }
    }

    /// The checks `record` makes of a copy of `src` to `to`, made before any
    /// byte is copied (`record` makes them again, in its transaction).
    async fn copy_allowed(
        &self,
        owner: Option<Uuid>,
        src: &FileRecord,
        to_bucket: &str,
        to: &ObjectPath,
        upsert: bool,
    ) -> Result<(), StorageError> {
        let bucket = self.bucket(to_bucket).await?;
        self.check_type(
            &src.mime_type,
            to.name(),
            Some(&bucket),
            TypeRules::BucketOnly,
        )?;
        let limit = self.size_limit(Some(&bucket));
        if src.size > limit {
            return Err(StorageError::FileTooLarge { limit });
        }
        let replaced = match self.file_at(to_bucket, owner, to).await? {
            Some(_) if !upsert => return Err(StorageError::AlreadyExists(to.to_string())),
            Some(f) => f.size,
            None => 0,
        };
        if let Some(owner) = owner {
            let client = self.0.pool.get().await?;
            let used = used_bytes(&**client, owner).await?.saturating_sub(replaced);
            if used.saturating_add(src.size) > self.0.quota {
                return Err(StorageError::QuotaExceeded {
                    quota: self.0.quota,
                    used,
                    needed: src.size,
                });
            }
        }
        Ok(())
    }

    /// Files of `owners` (`None`: every owner's) in `bucket` whose path starts
    /// with `prefix` (a plain string prefix, not only a folder), in `sort`
    /// order, after `after` when given; at most `limit`. Paths compare
    /// bytewise (`COLLATE "C"`), as Rust strings do.
    pub async fn files_under(
        &self,
        bucket: &str,
        owners: Option<&[Uuid]>,
        prefix: &str,
        sort: FileSort,
        after: Option<&FileCursor>,
        limit: usize,
    ) -> Result<Vec<FileRecord>, StorageError> {
        let client = self.0.pool.get().await?;
        bucket_in(&**client, bucket).await?;
        let owners: Option<Vec<Uuid>> = owners.map(<[Uuid]>::to_vec);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let (dir, op) = if sort.desc {
            ("DESC", "<")
        } else {
            ("ASC", ">")
        };
        let time = match sort.column {
            SortColumn::Name => None,
            SortColumn::CreatedAt => Some("created_at"),
            SortColumn::UpdatedAt => Some("updated_at"),
        };
        let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
            vec![&bucket, &owners, &prefix, &limit];
        let mut keyset = String::new();
        let after_time = after.and_then(|c| c.time);
        if let Some(c) = after {
            params.push(&c.path);
            params.push(&c.id);
            keyset = match time {
                None => format!("AND (path COLLATE \"C\", id) {op} ($5 COLLATE \"C\", $6)"),
                Some(col) => {
                    params.push(&after_time);
                    format!("AND ({col}, path COLLATE \"C\", id) {op} ($7, $5 COLLATE \"C\", $6)")
                }
            };
        }
        let order = match time {
            None => format!("path COLLATE \"C\" {dir}, id {dir}"),
            Some(col) => format!("{col} {dir}, path COLLATE \"C\" {dir}, id {dir}"),
        };
        let rows = client
            .query(
                &format!(
                    "SELECT {FILE_COLUMNS} FROM public.files
                     WHERE bucket_id = $1 AND ($2::uuid[] IS NULL OR owner_id = ANY($2))
                       AND starts_with(path, $3) {keyset}
                     ORDER BY {order} LIMIT $4"
                ),
                &params,
            )
            .await?;
        Ok(rows.iter().map(file_from_row).collect())
    }

    /// Deletes every file and folder `of` selects in `tx`, commits, then deletes
    /// the files' bytes; returns how many files went.
    async fn delete_all(
        &self,
        tx: deadpool_postgres::Transaction<'_>,
        of: Of<'_>,
    ) -> Result<usize, StorageError> {
        let (files, folders, arg): (&str, &str, &(dyn tokio_postgres::types::ToSql + Sync)) =
            match &of {
                Of::Owner(o) => (
                    "DELETE FROM public.files WHERE owner_id = $1 RETURNING storage_key",
                    "DELETE FROM public.folders WHERE owner_id = $1",
                    o,
                ),
                Of::Bucket(b) => (
                    "DELETE FROM public.files WHERE bucket_id = $1 RETURNING storage_key",
                    "DELETE FROM public.folders WHERE bucket_id = $1",
                    b,
                ),
            };
        let keys: Vec<String> = tx
            .query(files, &[arg])
            .await?
            .iter()
            .filter_map(|r| r.get::<_, Option<String>>(0))
            .collect();
        tx.execute(folders, &[arg]).await?;
        tx.commit().await?;
        for key in &keys {
            self.0.blobs.delete_quietly(key).await;
        }
        Ok(keys.len())
    }

    /// Deletes every file and folder of `owner` (rows, then bytes): a user being
    /// deleted. Returns how many files went.
    pub async fn remove_owner(&self, owner: Uuid) -> Result<usize, StorageError> {
        let mut client = self.0.pool.get().await?;
        let tx = client.transaction().await?;
        lock_owner(&*tx, Some(owner)).await?;
        self.delete_all(tx, Of::Owner(owner)).await
    }

    /// Deletes `owner`'s file at `path` (row, then bytes), or an empty folder
    /// (`None`: the owner-less ones).
    pub async fn delete(
        &self,
        owner: Option<Uuid>,
        bucket: &str,
        path: &ObjectPath,
    ) -> Result<Deleted, StorageError> {
        let svc = self.clone();
        let (bucket, path) = (bucket.to_owned(), path.to_string());
        tokio::spawn(async move { svc.delete_owned(owner, &bucket, &path).await })
            .await
            .map_err(StorageError::internal)?
    }

    async fn delete_owned(
        &self,
        owner: Option<Uuid>,
        bucket: &str,
        path: &str,
    ) -> Result<Deleted, StorageError> {
        let mut client = self.0.pool.get().await?;
        let tx = client.transaction().await?;
        lock_owner(&*tx, owner).await?;
        bucket_in(&*tx, bucket).await?;
        let owned = owner_is("owner_id", owner, 2);
        let file = tx
            .query_opt(
                &format!(
                    "DELETE FROM public.files WHERE bucket_id = $1 AND {owned} AND path = $3
                     RETURNING storage_key"
                ),
                &[&bucket, &owner, &path],
            )
            .await?;
        if let Some(row) = file {
            tx.commit().await?;
            if let Some(key) = row.get::<_, Option<String>>(0) {
                self.0.blobs.delete_quietly(&key).await;
            }
            return Ok(Deleted::File);
        }
        let folder = tx
            .query_opt(
                &format!(
                    "SELECT id FROM public.folders WHERE bucket_id = $1 AND {owned} AND path = $3 FOR UPDATE"
                ),
                &[&bucket, &owner, &path],
            )
            .await?
            .ok_or_else(|| StorageError::NotFound(format!("no file or folder at {path:?}")))?;
        let id: Uuid = folder.get(0);
        let busy: bool = tx
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM public.folders WHERE parent_id = $1)
                     OR EXISTS (SELECT 1 FROM public.files WHERE folder_id = $1)",
                &[&id],
            )
            .await?
            .get(0);
        if busy {
            return Err(StorageError::FolderNotEmpty(path.to_owned()));
        }
        tx.execute("DELETE FROM public.folders WHERE id = $1", &[&id])
            .await?;
        tx.commit().await?;
        Ok(Deleted::Folder)
    }

    /// Opens `owner`'s file at `path` for `viewer` (anyone when the bucket is
    /// public; otherwise the owner or a service token; an owner-less file
    /// (`None`): a service token only).
    pub async fn open(
        &self,
        viewer: Option<&Principal>,
        bucket: &str,
        owner: Option<Uuid>,
        path: &ObjectPath,
        range: Option<ByteRange>,
    ) -> Result<ObjectRead, StorageError> {
        let not_found = || StorageError::NotFound(format!("no file at {:?}", path.to_string()));
        let row = {
            let client = self.0.pool.get().await?;
            client
                .query_opt(
                    &format!(
                        "SELECT {cols}, b.public AS bucket_public
                         FROM public.files f JOIN public.buckets b ON b.id = f.bucket_id
                         WHERE f.bucket_id = $1 AND {owned} AND f.path = $3",
                        owned = owner_is("f.owner_id", owner, 2),
                        cols = FILE_COLUMNS
                            .split(", ")
                            .map(|c| format!("f.{c}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    &[&bucket, &owner, &path.to_string()],
                )
                .await?
                .ok_or_else(not_found)?
        };
        let file = file_from_row(&row);
        let bucket_public: bool = row.get("bucket_public");
        let owner_text = owner.map(|o| o.hyphenated().to_string());
        let allowed = bucket_public
            || viewer.is_some_and(|p| {
                p.is_service() || (owner_text.is_some() && p.user_id == owner_text)
            });
        if !allowed {
            return Err(if viewer.is_none() {
                StorageError::AuthRequired
            } else {
                not_found()
            });
        }
        let key = file.storage_key.clone().ok_or_else(not_found)?;
        let span = range
            .map(|r| r.resolve(file.size))
            .transpose()
            .map_err(|u| StorageError::RangeNotSatisfiable { size: u.size })?;
        let body = if file.size == 0 {
            futures_util::stream::empty().boxed()
        } else {
            let opts = GetOptions {
                range: span.map(|(a, b)| GetRange::Bounded(a..b)),
                ..GetOptions::default()
            };
            let got = self
                .0
                .blobs
                .store
                .get_opts(&object_store::path::Path::from(key.as_str()), opts)
                .await
                .map_err(|e| match e {
                    object_store::Error::NotFound { .. } => {
                        tracing::error!(key, "a file row points to missing bytes");
                        not_found()
                    }
                    e => e.into(),
                })?;
            read_stream(got)
        };
        Ok(ObjectRead {
            file,
            bucket_public,
            span,
            body,
        })
    }
}

/// A local file is read in 256 KiB chunks: object_store's own stream reads 8 KiB
/// per blocking-pool hop, which cost 3 s of CPU per GiB downloaded (aether-bench
/// rest). Other backends stream as they come.
fn read_stream(got: object_store::GetResult) -> BoxStream<'static, Result<Bytes, StorageError>> {
    const CHUNK: usize = 256 * 1024;
    match got.payload {
        object_store::GetResultPayload::File(file, _) => {
            use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};
            let range = got.range;
            futures_util::stream::once(async move {
                let mut file = tokio::fs::File::from_std(file);
                file.set_max_buf_size(CHUNK);
                file.seek(std::io::SeekFrom::Start(range.start)).await?;
                let body = file.take(range.end.saturating_sub(range.start));
                Ok::<_, std::io::Error>(tokio_util::io::ReaderStream::with_capacity(body, CHUNK))
            })
            .try_flatten()
            .map(|r| r.map_err(|e| StorageError::Internal(format!("reading a stored file: {e}"))))
            .boxed()
        }
        object_store::GetResultPayload::Stream(s) => {
            s.map(|r| r.map_err(StorageError::from)).boxed()
        }
    }
}

/// Creates the folders of `dir` that are missing, parents first; returns the id of
/// `dir` itself (`None` for the root).
async fn ensure_folders(
    tx: &impl GenericClient,
    bucket: &str,
    owner: Option<Uuid>,
    dir: &ObjectPath,
) -> Result<Option<Uuid>, StorageError> {
    let mut parent: Option<Uuid> = None;
    let owned = owner_is("owner_id", owner, 2);
    for prefix in dir.prefixes() {
        let p = prefix.to_string();
        let clash = tx
            .query_opt(
                &format!(
                    "SELECT 1 FROM public.files WHERE bucket_id = $1 AND {owned} AND path = $3"
                ),
                &[&bucket, &owner, &p],
            )
            .await?
            .is_some();
        if clash {
            return Err(StorageError::PathConflict(format!(
                "{p:?} is a file, so it cannot be a folder"
            )));
        }
        let inserted = tx
            .query_opt(
                "INSERT INTO public.folders (bucket_id, parent_id, path, name, owner_id)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (bucket_id, owner_id, path) DO NOTHING
                 RETURNING id",
                &[&bucket, &parent, &p, &prefix.name(), &owner],
            )
            .await?;
        let id: Uuid = match inserted {
            Some(r) => r.get(0),
            None => tx
                .query_one(
                    &format!("SELECT id FROM public.folders WHERE bucket_id = $1 AND {owned} AND path = $3"),
                    &[&bucket, &owner, &p],
                )
                .await?
                .get(0),
        };
        parent = Some(id);
    }
    Ok(parent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_less_objects_have_their_own_sql_and_keys() {
        let uid = Uuid::new_v4();
        assert_eq!(owner_is("owner_id", Some(uid), 2), "owner_id = $2");
        assert_eq!(
            owner_is("f.owner_id", None, 2),
            "(f.owner_id IS NULL AND $2::uuid IS NULL)"
        );
        assert!(blob_key(None).starts_with("service/"));
        assert!(blob_key(Some(uid)).starts_with(&format!("{uid}/")));
    }

    #[test]
    fn mime_is_declared_or_guessed() {
        assert_eq!(resolve_mime(Some("image/PNG"), "x.bin"), "image/png");
        assert_eq!(
            resolve_mime(Some("application/octet-stream"), "a.pdf"),
            "application/pdf"
        );
        assert_eq!(
            resolve_mime(None, "a.docx"),
            "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
        );
        assert_eq!(
            resolve_mime(Some("garbage"), "noext"),
            "application/octet-stream"
        );
    }
}
