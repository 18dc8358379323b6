//! Storage errors: what the core refuses or fails with.

use super::PathError;

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
    /// The object's owner (another user) has no room; their usage is theirs.
    #[error(
        "storage quota exceeded: the object's owner has no room for {needed} more bytes (quota {quota} bytes)"
    )]
    OwnersQuotaExceeded { quota: u64, needed: u64 },
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
        match e.as_db_error() {
            Some(db) => {
                StorageError::internal(format!("database: {} ({})", db.message(), db.code().code()))
            }
            None => StorageError::internal(format!("database: {e}")),
        }
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
