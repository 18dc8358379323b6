//! Deleting files and folders: one, an owner's, or a bucket's.

use uuid::Uuid;

use super::buckets::bucket_in;
use super::errors::StorageError;
use super::owners::{lock_owner, owner_is};
use super::{ObjectPath, StorageService};

/// What was removed by [`StorageService::delete`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Deleted {
    File,
    Folder,
}

/// Whose files [`StorageService::delete_all`] deletes.
pub(super) enum Of<'a> {
    Owner(Uuid),
    Bucket(&'a str),
}

impl StorageService {
    /// Deletes every file and folder `of` selects in `tx`, commits, then deletes
    /// the files' bytes; returns how many files went.
    pub(super) async fn delete_all(
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
}
