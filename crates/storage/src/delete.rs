//! Deleting files and folders: one, an owner's, or a bucket's.

use uuid::Uuid;

use super::buckets::bucket_in;
use super::errors::StorageError;
use super::owners::{Actor, lock_names, lock_owner};
use super::policy;
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
                // The owner's folders go when nothing is left in them;
                // others' files in them keep them, owner-less from then on.
                Of::Owner(o) => (
                    "DELETE FROM public.files WHERE owner_id = $1 RETURNING storage_key",
                    "WITH gone AS (
                         DELETE FROM public.folders f WHERE owner_id = $1
                           AND NOT EXISTS (SELECT 1 FROM public.files x
                                           WHERE x.bucket_id = f.bucket_id
                                             AND x.path COLLATE \"C\" >= f.path || '/'
                                             AND x.path COLLATE \"C\" < f.path || '0'
                                             AND starts_with(x.path, f.path || '/'))
                           AND NOT EXISTS (SELECT 1 FROM public.folders y
                                           WHERE y.bucket_id = f.bucket_id
                                             AND (y.owner_id IS DISTINCT FROM $1)
                                             AND y.path COLLATE \"C\" >= f.path || '/'
                                             AND y.path COLLATE \"C\" < f.path || '0'
                                             AND starts_with(y.path, f.path || '/'))
                         RETURNING id)
                     UPDATE public.folders SET owner_id = NULL
                     WHERE owner_id = $1 AND id NOT IN (SELECT id FROM gone)",
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

    /// Deletes the file at `path` (row, then bytes), or an empty folder, if
    /// `actor` may: the owner or the service role. Another user's file is
    /// not found in a private bucket and forbidden in a public one.
    pub async fn delete(
        &self,
        actor: Actor,
        bucket: &str,
        path: &ObjectPath,
    ) -> Result<Deleted, StorageError> {
        let svc = self.clone();
        let (bucket, path) = (bucket.to_owned(), path.clone());
        tokio::spawn(async move { svc.delete_owned(actor, &bucket, &path).await })
            .await
            .map_err(StorageError::internal)?
    }

    async fn delete_owned(
        &self,
        actor: Actor,
        bucket: &str,
        object: &ObjectPath,
    ) -> Result<Deleted, StorageError> {
        let path = object.to_string();
        let not_found = || StorageError::NotFound(format!("no file or folder at {path:?}"));
        let judged = self.judged(actor).await?;
        let mut client = self.0.pool.get().await?;
        let tx = client.transaction().await?;
        lock_names(&*tx, &[(bucket, object)]).await?;
        let info = bucket_in(&*tx, bucket).await?;
        let refuse = || {
            StorageError::Forbidden(format!(
                "{path:?} is not yours to delete (by default only its owner or the service role may)"
            ))
        };
        let file = tx
            .query_opt(
                "SELECT id, owner_id, storage_key FROM public.files
                 WHERE bucket_id = $1 AND path = $2 FOR UPDATE",
                &[&bucket, &path],
            )
            .await?;
        if let Some(row) = file {
            let (id, owner): (Uuid, Option<Uuid>) = (row.get(0), row.get(1));
            let sql = "DELETE FROM public.files WHERE id = $1";
            match judged {
                Some(who) => {
                    if policy::write_as(&*tx, who, sql, &[&id]).await? == 0 {
                        return Err(if policy::may_read(&*tx, who, id).await? {
                            refuse()
                        } else {
                            not_found()
                        });
                    }
                }
                None if !actor.may_change(owner) => {
                    return Err(if actor.may_read(owner, info.public) {
                        refuse()
                    } else {
                        not_found()
                    });
                }
                None => {
                    tx.execute(sql, &[&id]).await?;
                }
            }
            tx.commit().await?;
            if let Some(key) = row.get::<_, Option<String>>(2) {
                self.0.blobs.delete_quietly(&key).await;
            }
            return Ok(Deleted::File);
        }
        let folder = tx
            .query_opt(
                "SELECT id, owner_id FROM public.folders WHERE bucket_id = $1 AND path = $2 FOR UPDATE",
                &[&bucket, &path],
            )
            .await?
            .ok_or_else(not_found)?;
        // Folders are structure, not objects: their owner (who made them)
        // or the service role removes an empty one.
        let owner = folder.get(1);
        if !actor.may_change(owner) {
            return Err(if actor.may_read(owner, info.public) {
                refuse()
            } else {
                not_found()
            });
        }
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
            return Err(StorageError::FolderNotEmpty(path));
        }
        tx.execute("DELETE FROM public.folders WHERE id = $1", &[&id])
            .await?;
        tx.commit().await?;
        Ok(Deleted::Folder)
    }

    /// Removes the folder at `dir` if nothing is in it, and never a file:
    /// what Supabase's implicit folders do when their last object goes.
    /// Returns whether one went.
    pub async fn prune_folder(&self, bucket: &str, dir: &ObjectPath) -> Result<bool, StorageError> {
        let mut client = self.0.pool.get().await?;
        let tx = client.transaction().await?;
        lock_names(&*tx, &[(bucket, dir)]).await?;
        let n = tx
            .execute(
                "DELETE FROM public.folders f WHERE bucket_id = $1 AND path = $2
                   AND NOT EXISTS (SELECT 1 FROM public.folders c WHERE c.parent_id = f.id)
                   AND NOT EXISTS (SELECT 1 FROM public.files x WHERE x.folder_id = f.id)",
                &[&bucket, &dir.to_string()],
            )
            .await?;
        tx.commit().await?;
        Ok(n > 0)
    }
}
