//! Owners: the SQL test for an owner (owner-less objects included), the
//! per-owner write lock, blob keys, the bytes an owner uses, and who owns
//! files at a path or in a bucket.

use tokio_postgres::GenericClient;
use uuid::Uuid;

use super::errors::StorageError;
use super::{ObjectPath, StorageService};

pub(super) async fn used_bytes(c: &impl GenericClient, owner: Uuid) -> Result<u64, StorageError> {
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
pub(super) fn blob_key(owner: Option<Uuid>) -> String {
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
pub(super) fn owner_is(col: &str, owner: Option<Uuid>, n: u8) -> String {
    match owner {
        Some(_) => format!("{col} = ${n}"),
        None => format!("({col} IS NULL AND ${n}::uuid IS NULL)"),
    }
}

/// Serializes one owner's writes (all owner-less ones together) until the
/// transaction ends.
pub(super) async fn lock_owner(
    c: &impl GenericClient,
    owner: Option<Uuid>,
) -> Result<(), StorageError> {
    let key = owner.map_or_else(|| SERVICE_PREFIX.to_owned(), |o| o.to_string());
    c.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended($1, 7489))",
        &[&key],
    )
    .await?;
    Ok(())
}

impl StorageService {
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
}
