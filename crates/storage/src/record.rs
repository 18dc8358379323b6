//! Recording a file: a completed upload's (or copy's) bytes and row, with
//! any missing folders, in one transaction.

use tokio_postgres::GenericClient;
use uuid::Uuid;

use super::buckets::bucket_in;
use super::errors::StorageError;
use super::files::{FILE_COLUMNS, FileRecord, file_from_row, file_metadata};
use super::owners::{Account, Actor, Charge, is_home, lock_names, lock_owner, lock_owners};
use super::policy::{INSERT_FILE, Probe, WriteFacts, probe_insert, write_as};
use super::upload::{PendingUpload, TypeRules, UploadTarget};
use super::{ObjectPath, StorageService, as_i64};
use tokio_postgres::types::ToSql;

/// What a commit records about a completed upload (or a copy).
pub(super) struct Recording {
    pub(super) actor: Actor,
    pub(super) size: u64,
    pub(super) mime: String,
    pub(super) file_name: String,
    pub(super) key: String,
    pub(super) types: TypeRules,
}

/// What one try of a commit's transaction came to.
enum Attempt {
    Done(Box<FileRecord>, Option<String>),
    /// The name's owner changed before its lock: try again with this
    /// owner's account locked in order.
    Relock(Option<Uuid>),
}

/// Tries that start again for an owner who took the name in between.
const MAX_RELOCKS: usize = 3;

impl StorageService {
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
            actor: up.actor,
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
    pub(super) async fn row_exists(&self, key: &str) -> bool {
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
    /// A new object is the actor's (owner-less for the service role); a
    /// replaced one keeps its owner. The row is written as the actor, so the
    /// storage policies decide whether it may (by default: its own objects,
    /// not in another user's folder).
    pub(super) async fn record(
        &self,
        up: &Recording,
        target: &UploadTarget,
    ) -> Result<(FileRecord, Option<String>), StorageError> {
        let mut also = Vec::new();
        loop {
            match self.record_once(up, target, &also).await? {
                Attempt::Done(file, replaced) => return Ok((*file, replaced)),
                Attempt::Relock(owner) => also.push(owner),
            }
        }
    }

    /// One try of [`record`](Self::record), locking the accounts of `also`
    /// besides the caller's and the name's owner.
    async fn record_once(
        &self,
        up: &Recording,
        target: &UploadTarget,
        also: &[Option<Uuid>],
    ) -> Result<Attempt, StorageError> {
        let actor = up.actor;
        let judged = self.judged(actor).await?;
        let size = up.size;
        let path = target.path.to_string();
        let mut client = self.0.pool.get().await?;
        let tx = client.transaction().await?;
        // The accounts this write may count against: the caller's, and the
        // owner of what is at the name now (read before the locks, so both
        // are taken in one order; checked again below under the name lock).
        let prior_owner: Option<Option<Uuid>> = tx
            .query_opt(
                "SELECT owner_id FROM public.files WHERE bucket_id = $1 AND path = $2",
                &[&target.bucket, &path],
            )
            .await?
            .map(|r| r.get(0));
        let mut accounts = vec![actor.owner()];
        accounts.extend(prior_owner);
        accounts.extend_from_slice(also);
        lock_owners(&*tx, accounts.clone()).await?;
        lock_names(&*tx, &[(&target.bucket, &target.path)]).await?;
        let bucket = bucket_in(&*tx, &target.bucket).await?;
        if size > self.size_limit(Some(&bucket)) {
            return Err(StorageError::FileTooLarge {
                limit: self.size_limit(Some(&bucket)),
            });
        }
        self.check_type(&up.mime, &up.file_name, Some(&bucket), up.types)?;
        // Whether the caller may write this name at all, before anything
        // about what is there is told.
        // (An upsert is judged by the write itself: the UPDATE of a taken
        // name, or the INSERT of a free one, as PostgreSQL judges `INSERT …
        // ON CONFLICT DO UPDATE`.)
        match judged {
            Some(_) if target.upsert => {}
            Some(who) => {
                let facts = WriteFacts {
                    mime: Some(up.mime.clone()),
                    size,
                    user_metadata: target.user_metadata.clone(),
                };
                let probe = Probe {
                    bucket: &target.bucket,
                    path: &target.path,
                    owner: actor.owner(),
                    facts: &facts,
                };
                probe_insert(&*tx, who, &probe).await?;
            }
            None => actor.check_create(&target.path)?,
        }
        if is_folder(&*tx, &target.bucket, &target.path).await? {
            return Err(StorageError::PathConflict(format!(
                "{path:?} is a folder; a file cannot take its place"
            )));
        }
        let existing = tx
            .query_opt(
                "SELECT id, size, storage_key, owner_id FROM public.files
                 WHERE bucket_id = $1 AND path = $2 FOR UPDATE",
                &[&target.bucket, &path],
            )
            .await?;
        // The name changed hands between the first read and the name lock (a
        // DBA's UPDATE, or a delete and someone else's new object, in that
        // instant): its owner's quota needs its account's lock. Taken here it
        // would be out of order, so the transaction starts again with it
        // (rolled back as `tx` drops); after a few such turns, out of order
        // after all (PostgreSQL breaks a deadlock, 40P01). Owner-less objects
        // count against no quota.
        if let Some(old) = &existing {
            let owner: Option<Uuid> = old.get(3);
            if owner.is_some() && !accounts.contains(&owner) {
                if also.len() < MAX_RELOCKS {
                    return Ok(Attempt::Relock(owner));
                }
                lock_owner(&*tx, owner).await?;
            }
        }
        match &existing {
            Some(_) if !target.upsert => return Err(StorageError::AlreadyExists(path)),
            // Without policies (the service role, or no roles), Aether's rules.
            Some(old) if judged.is_none() && !actor.may_change(old.get(3)) => {
                return Err(replace_refused(&target.path));
            }
            Some(_) | None => {}
        }
        let folder_id =
            ensure_folders(&*tx, &target.bucket, actor.owner(), &target.path.parent()).await?;
        let replaced_size = existing
            .as_ref()
            .map(|r| u64::try_from(r.get::<_, i64>(1)).unwrap_or(0))
            .unwrap_or(0);
        // The bytes count against the object's owner: the caller for a new
        // object, the owner it keeps when replaced. Its account is locked.
        let charge = match &existing {
            Some(old) => Charge::replacing(old.get(3), replaced_size),
            None => Charge::new_object(actor),
        };
        if let Some(account) = Account::of(&*tx, actor, charge, self.0.quota).await? {
            account.check(size)?;
        }
        let metadata = file_metadata(
            &up.file_name,
            target.user_metadata.as_ref(),
            target.cache_control.as_deref(),
        );
        let (id, replaced) = match &existing {
            Some(old) => {
                let id: Uuid = old.get(0);
                let sql =
                    "UPDATE public.files SET folder_id = $2, name = $3, size = $4, mime_type = $5,
                               storage_key = $6, metadata = $7
                           WHERE id = $1";
                let params: [&(dyn ToSql + Sync); 7] = [
                    &id,
                    &folder_id,
                    &target.path.name(),
                    &as_i64(size),
                    &up.mime,
                    &up.key,
                    &metadata,
                ];
                let n = match judged {
                    Some(who) => write_as(&*tx, who, sql, &params).await?,
                    None => tx.execute(sql, &params).await?,
                };
                if n == 0 {
                    return Err(replace_refused(&target.path));
                }
                (id, old.get::<_, Option<String>>(2))
            }
            None => {
                let id = target.id.unwrap_or_else(Uuid::new_v4);
                let params: [&(dyn ToSql + Sync); 10] = [
                    &id,
                    &target.bucket,
                    &folder_id,
                    &path,
                    &target.path.name(),
                    &as_i64(size),
                    &up.mime,
                    &actor.owner(),
                    &up.key,
                    &metadata,
                ];
                match judged {
                    Some(who) => write_as(&*tx, who, INSERT_FILE, &params).await?,
                    None => tx.execute(INSERT_FILE, &params).await?,
                };
                (id, None)
            }
        };
        let row = tx
            .query_one(
                &format!("SELECT {FILE_COLUMNS} FROM public.files WHERE id = $1"),
                &[&id],
            )
            .await?;
        tx.commit().await?;
        Ok(Attempt::Done(Box::new(file_from_row(&row)), replaced))
    }
}

impl StorageService {
    /// What [`StorageService::record`] will refuse of `actor`'s write at
    /// `bucket/path` with `facts`, checked before any byte is read (`record`
    /// checks again, in its transaction): first whether the caller may write
    /// that name at all (so another user's names are 403 whether or not they
    /// are taken), then a taken name without `upsert`, another user's object.
    /// Returns the account the write would count against.
    pub async fn check_write(
        &self,
        actor: Actor,
        bucket: &str,
        path: &ObjectPath,
        upsert: bool,
        facts: &WriteFacts,
    ) -> Result<Charge, StorageError> {
        self.bucket(bucket).await?;
        let charge = |f: Option<FileRecord>| match f {
            Some(f) => Charge::replacing(f.owner_id, f.size),
            None => Charge::new_object(actor),
        };
        if let Some(who) = self.judged(actor).await? {
            self.dry_write(who, bucket, path, upsert, facts).await?;
            return Ok(charge(self.file_at(bucket, path).await?));
        }
        actor.check_create(path)?;
        match self.file_at(bucket, path).await? {
            Some(_) if !upsert => Err(StorageError::AlreadyExists(path.to_string())),
            Some(f) if !actor.may_change(f.owner_id) => Err(replace_refused(path)),
            f => Ok(charge(f)),
        }
    }
}

fn replace_refused(path: &ObjectPath) -> StorageError {
    StorageError::Forbidden(format!(
        "the object at {:?} is not yours to replace (by default only its owner or the service role may)",
        path.to_string()
    ))
}

/// Whether `path` is a folder: a `folders` row, or a home folder (which has
/// no row) with something in it.
pub(super) async fn is_folder(
    tx: &impl GenericClient,
    bucket: &str,
    path: &ObjectPath,
) -> Result<bool, StorageError> {
    let p = path.to_string();
    let sql = if is_home(path) {
        "SELECT EXISTS (SELECT 1 FROM public.files WHERE bucket_id = $1
                AND path COLLATE \"C\" >= $2 || '/' AND path COLLATE \"C\" < $2 || '0'
                AND starts_with(path, $2 || '/'))
             OR EXISTS (SELECT 1 FROM public.folders WHERE bucket_id = $1
                AND path COLLATE \"C\" >= $2 || '/' AND path COLLATE \"C\" < $2 || '0'
                AND starts_with(path, $2 || '/'))"
    } else {
        "SELECT EXISTS (SELECT 1 FROM public.folders WHERE bucket_id = $1 AND path = $2)"
    };
    Ok(tx.query_one(sql, &[&bucket, &p]).await?.get(0))
}

/// Creates the folders of `dir` that are missing, parents first, for
/// `owner` (folders are shared by whoever writes in them; the owner is who
/// made it); returns the id of `dir` itself (`None` for the root, and for a
/// home folder, which has no row).
pub(super) async fn ensure_folders(
    tx: &impl GenericClient,
    bucket: &str,
    owner: Option<Uuid>,
    dir: &ObjectPath,
) -> Result<Option<Uuid>, StorageError> {
    let mut parent: Option<Uuid> = None;
    for prefix in dir.prefixes() {
        let p = prefix.to_string();
        let clash = tx
            .query_opt(
                "SELECT 1 FROM public.files WHERE bucket_id = $1 AND path = $2",
                &[&bucket, &p],
            )
            .await?
            .is_some();
        if clash {
            return Err(StorageError::PathConflict(format!(
                "{p:?} is a file, so it cannot be a folder"
            )));
        }
        if is_home(&prefix) {
            continue;
        }
        let inserted = tx
            .query_opt(
                "INSERT INTO public.folders (bucket_id, parent_id, path, name, owner_id)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (bucket_id, path) DO NOTHING
                 RETURNING id",
                &[&bucket, &parent, &p, &prefix.name(), &owner],
            )
            .await?;
        let id: Uuid = match inserted {
            Some(r) => r.get(0),
            None => tx
                .query_one(
                    "SELECT id FROM public.folders WHERE bucket_id = $1 AND path = $2",
                    &[&bucket, &p],
                )
                .await?
                .get(0),
        };
        parent = Some(id);
    }
    Ok(parent)
}
