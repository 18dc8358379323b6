//! Files and folders as rows: their records, columns and decoding, and
//! finding the file at a path.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::errors::StorageError;
use super::{ObjectPath, StorageService};

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
    /// `Cache-Control` its uploader asked for (`/storage/v1`'s `cacheControl`).
    pub cache_control: Option<String>,
    pub(super) storage_key: Option<String>,
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

pub(super) const FILE_COLUMNS: &str = "id, bucket_id, owner_id, folder_id, path, name, size, mime_type, created_at, updated_at, storage_key, metadata";

pub(super) fn file_from_row(r: &tokio_postgres::Row) -> FileRecord {
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
        cache_control: r
            .get::<_, Option<serde_json::Value>>("metadata")
            .and_then(|m| m.get("cache_control")?.as_str().map(str::to_owned)),
        storage_key: r.get("storage_key"),
    }
}

/// `files.metadata`: the uploaded file's own name, any custom metadata and
/// the `Cache-Control` asked for.
pub(super) fn file_metadata(
    file_name: &str,
    user: Option<&serde_json::Value>,
    cache_control: Option<&str>,
) -> serde_json::Value {
    let mut m = serde_json::json!({ "original_name": file_name });
    if let Some(u) = user {
        m["user_metadata"] = u.clone();
    }
    if let Some(c) = cache_control {
        m["cache_control"] = serde_json::json!(c);
    }
    m
}

pub(super) fn folder_from_row(r: &tokio_postgres::Row) -> FolderRecord {
    FolderRecord {
        id: r.get("id"),
        parent_id: r.get("parent_id"),
        path: r.get("path"),
        name: r.get("name"),
        created_at: r.get("created_at"),
    }
}

impl StorageService {
    /// The file at `path`, if any, whoever owns it (callers check access).
    pub async fn file_at(
        &self,
        bucket: &str,
        path: &ObjectPath,
    ) -> Result<Option<FileRecord>, StorageError> {
        let client = self.0.pool.get().await?;
        let row = client
            .query_opt(
                &format!(
                    "SELECT {FILE_COLUMNS} FROM public.files WHERE bucket_id = $1 AND path = $2"
                ),
                &[&bucket, &path.to_string()],
            )
            .await?;
        Ok(row.as_ref().map(file_from_row))
    }
}
