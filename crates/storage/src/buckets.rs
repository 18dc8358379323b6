//! Buckets: their records, and creating, changing, emptying, deleting and
//! listing them.

use chrono::{DateTime, Utc};
use tokio_postgres::GenericClient;
use uuid::Uuid;

use super::delete::Of;
use super::errors::StorageError;
use super::{AllowedTypes, PathError, StorageService, as_i64};
use aether_core::principal::Principal;

#[derive(Debug, Clone)]
pub struct BucketInfo {
    pub id: String,
    pub public: bool,
    pub file_size_limit: Option<u64>,
    pub allowed_mime_types: Option<AllowedTypes>,
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

pub(super) async fn bucket_in(
    c: &impl GenericClient,
    id: &str,
) -> Result<BucketInfo, StorageError> {
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

impl StorageService {
    /// Creates a bucket owned by `owner` (`None`: by no user, e.g. service role).
    pub async fn create_bucket(
        &self,
        owner: Option<Uuid>,
        b: &NewBucket,
    ) -> Result<BucketRecord, StorageError> {
        if !valid_bucket_id(&b.id) {
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

    pub async fn bucket(&self, id: &str) -> Result<BucketInfo, StorageError> {
        let client = self.0.pool.get().await?;
        bucket_in(&**client, id).await
    }
}

/// Bucket ids as `public.buckets` accepts them.
pub fn valid_bucket_id(id: &str) -> bool {
    let b = id.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
}
