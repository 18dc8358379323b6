//! Moving and copying files, within a bucket or into another.

use super::buckets::bucket_in;
use super::errors::StorageError;
use super::files::{FILE_COLUMNS, FileRecord, file_from_row};
use super::owners::{Account, Actor, blob_key, lock_names};
use super::policy::{self, WriteFacts};
use super::record::{Recording, ensure_folders, is_folder};
use super::upload::{TypeRules, UploadTarget};
use super::{ObjectPath, StorageService};

/// What a copy takes from its source, and how it lands.
#[derive(Debug, Clone)]
pub struct CopyOptions {
    /// Replace an object at the destination.
    pub upsert: bool,
    /// Copy the source's custom metadata (otherwise the copy has none).
    pub copy_metadata: bool,
    /// `Cache-Control` for the copy (otherwise the source's).
    pub cache_control: Option<String>,
    /// The copy's content type (otherwise the source's).
    pub content_type: Option<String>,
}

impl StorageService {
    /// Moves the file at `from` (in `from_bucket`) to `to` in `to_bucket`,
    /// keeping its row (id, owner, bytes): one transaction that updates the
    /// row's bucket, path and folder. Only its owner or the service role may;
    /// refused when a file or folder is at `to`; into another bucket, that
    /// bucket's size limit and types apply.
    pub async fn move_file(
        &self,
        actor: Actor,
        from_bucket: &str,
        from: &ObjectPath,
        to_bucket: &str,
        to: &ObjectPath,
    ) -> Result<FileRecord, StorageError> {
        let (src, dst) = (from.to_string(), to.to_string());
        let judged = self.judged(actor).await?;
        let mut client = self.0.pool.get().await?;
        let tx = client.transaction().await?;
        lock_names(&*tx, &[(from_bucket, from), (to_bucket, to)]).await?;
        let source_bucket = bucket_in(&*tx, from_bucket).await?;
        let bucket = bucket_in(&*tx, to_bucket).await?;
        let not_found = || StorageError::NotFound(format!("no file at {src:?}"));
        let row = tx
            .query_opt(
                &format!(
                    "SELECT {FILE_COLUMNS} FROM public.files
                     WHERE bucket_id = $1 AND path = $2 FOR UPDATE"
                ),
                &[&from_bucket, &src],
            )
            .await?
            .ok_or_else(not_found)?;
        let file = file_from_row(&row);
        let refused = || {
            StorageError::Forbidden(format!(
                "{src:?} is not yours to move there (by default only its owner or the service role may move it, and not into another user's folder)"
            ))
        };
        match judged {
            Some(who) if !policy::may_read(&*tx, who, file.id).await? => return Err(not_found()),
            Some(_) => {}
            None if !actor.may_change(file.owner_id) => {
                return Err(if actor.may_read(file.owner_id, source_bucket.public) {
                    refused()
                } else {
                    not_found()
                });
            }
            None => {}
        }
        if from_bucket == to_bucket && src == dst {
            return Ok(file);
        }
        // The new name is judged as a new row would be (the policies'
        // INSERT checks: a bucket closed to new objects stays closed to
        // moves), before anything about what is there is told.
        match judged {
            Some(who) => {
                let facts = WriteFacts {
                    mime: Some(file.mime_type.clone()),
                    size: file.size,
                    user_metadata: file.user_metadata.clone(),
                };
                let probe = policy::Probe {
                    bucket: to_bucket,
                    path: to,
                    owner: file.owner_id,
                    facts: &facts,
                };
                policy::probe_insert(&*tx, who, &probe).await?;
            }
            None => actor.check_create(to)?,
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
        if is_folder(&*tx, to_bucket, to).await? {
            return Err(StorageError::PathConflict(format!(
                "{dst:?} is a folder; a file cannot take its place"
            )));
        }
        let taken: bool = tx
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM public.files WHERE bucket_id = $1 AND path = $2)",
                &[&to_bucket, &dst],
            )
            .await?
            .get(0);
        if taken {
            return Err(StorageError::AlreadyExists(dst));
        }
        let folder_id = ensure_folders(&*tx, to_bucket, file.owner_id, &to.parent()).await?;
        let sql = "UPDATE public.files SET bucket_id = $2, folder_id = $3, path = $4, name = $5
                   WHERE id = $1";
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 5] =
            [&file.id, &to_bucket, &folder_id, &dst, &to.name()];
        let n = match judged {
            Some(who) => policy::write_as(&*tx, who, sql, &params).await?,
            None => tx.execute(sql, &params).await?,
        };
        if n == 0 {
            return Err(refused());
        }
        let row = tx
            .query_one(
                &format!("SELECT {FILE_COLUMNS} FROM public.files WHERE id = $1"),
                &[&file.id],
            )
            .await?;
        tx.commit().await?;
        Ok(file_from_row(&row))
    }

    /// Copies the file at `from` (in `from_bucket`), which `actor` may read,
    /// to `to` in `to_bucket` as a new object of `actor`'s (as on Supabase),
    /// with its custom metadata: the bytes are copied under a fresh key, then
    /// recorded as an upload is (the destination bucket's rules, the actor's
    /// quota; `upsert` replaces a file at `to`). Copying a file onto itself
    /// changes nothing. Runs to the end even if the caller goes away.
    pub async fn copy_file(
        &self,
        actor: Actor,
        from_bucket: &str,
        from: &ObjectPath,
        to_bucket: &str,
        to: &ObjectPath,
        opts: CopyOptions,
    ) -> Result<FileRecord, StorageError> {
        let svc = self.clone();
        let (from_bucket, from, to_bucket, to) = (
            from_bucket.to_owned(),
            from.clone(),
            to_bucket.to_owned(),
            to.clone(),
        );
        tokio::spawn(async move {
            svc.copy_owned(actor, &from_bucket, &from, &to_bucket, &to, opts)
                .await
        })
        .await
        .map_err(StorageError::internal)?
    }

    async fn copy_owned(
        &self,
        actor: Actor,
        from_bucket: &str,
        from: &ObjectPath,
        to_bucket: &str,
        to: &ObjectPath,
        opts: CopyOptions,
    ) -> Result<FileRecord, StorageError> {
        let not_found = || StorageError::NotFound(format!("no file at {:?}", from.to_string()));
        let src = self
            .file_at(from_bucket, from)
            .await?
            .ok_or_else(not_found)?;
        let public = self.bucket(from_bucket).await?.public;
        if let Actor::User(u) = actor
            && !self.may_read(Some(u), &src, public).await?
        {
            return Err(not_found());
        }
        if from_bucket == to_bucket && from == to {
            return Ok(src);
        }
        let src_key = src.storage_key.clone().ok_or_else(not_found)?;
        let mime = opts
            .content_type
            .clone()
            .unwrap_or_else(|| src.mime_type.clone());
        // What `record` refuses, refused before the bytes are copied: a copy
        // that cannot be kept must not cost a full read and write.
        self.copy_allowed(actor, &src, &mime, to_bucket, to, opts.upsert)
            .await?;
        let key = blob_key(actor.owner());
        // An empty file's blob may not exist: it is never read.
        let from_key = (src.size > 0).then_some(src_key.as_str());
        let copied = self.0.blobs.copy(from_key, &key).await;
        copied.map_err(|e| match e {
            object_store::Error::NotFound { .. } => not_found(),
            e => e.into(),
        })?;
        let facts = Recording {
            actor,
            size: src.size,
            mime,
            file_name: to.name().to_owned(),
            key: key.clone(),
            types: TypeRules::BucketOnly,
        };
        let target = UploadTarget {
            bucket: to_bucket.to_owned(),
            path: to.clone(),
            upsert: opts.upsert,
            id: None,
            user_metadata: src.user_metadata.clone().filter(|_| opts.copy_metadata),
            cache_control: opts
                .cache_control
                .clone()
                .or_else(|| src.cache_control.clone()),
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
        actor: Actor,
        src: &FileRecord,
        mime: &str,
        to_bucket: &str,
        to: &ObjectPath,
        upsert: bool,
    ) -> Result<(), StorageError> {
        let bucket = self.bucket(to_bucket).await?;
        self.check_type(mime, to.name(), Some(&bucket), TypeRules::BucketOnly)?;
        let limit = self.size_limit(Some(&bucket));
        if src.size > limit {
            return Err(StorageError::FileTooLarge { limit });
        }
        let facts = WriteFacts {
            mime: Some(mime.to_owned()),
            size: src.size,
            user_metadata: src.user_metadata.clone(),
        };
        let charge = self
            .check_write(actor, to_bucket, to, upsert, &facts)
            .await?;
        let client = self.0.pool.get().await?;
        if let Some(account) = Account::of(&**client, actor, charge, self.0.quota).await? {
            account.check(src.size)?;
        }
        Ok(())
    }
}
