//! Reading a file: opening it (whole or a range) for a viewer, and
//! streaming its bytes.

use bytes::Bytes;
use futures_util::StreamExt as _;
use futures_util::TryStreamExt as _;
use futures_util::stream::BoxStream;
use object_store::{GetOptions, GetRange};

use super::errors::StorageError;
use super::files::{FILE_COLUMNS, FileRecord, file_from_row};
use super::owners::Actor;
use super::policy::{self, Who};
use super::{ByteRange, ObjectPath, StorageService};
use aether_core::principal::Principal;

/// A file opened for reading.
pub struct ObjectRead {
    pub file: FileRecord,
    pub bucket_public: bool,
    /// `[start, end)` when a range was asked for.
    pub span: Option<(u64, u64)>,
    pub body: BoxStream<'static, Result<Bytes, StorageError>>,
}

impl StorageService {
    /// Opens the file at `path` for `viewer` (anyone when the bucket is
    /// public; otherwise its owner or a service token; an owner-less file: a
    /// service token only). Another user's private file is not found.
    pub async fn open(
        &self,
        viewer: Option<&Principal>,
        bucket: &str,
        path: &ObjectPath,
        range: Option<ByteRange>,
    ) -> Result<ObjectRead, StorageError> {
        let not_found = || StorageError::NotFound(format!("no file at {:?}", path.to_string()));
        let user = viewer
            .and_then(|p| p.user_id.as_deref())
            .and_then(|u| uuid::Uuid::parse_str(u).ok());
        // Whom the policies judge, in the same round trip as the row.
        let judged = match viewer {
            Some(p) if p.is_service() => None,
            _ if self.policies().await? => Some(user.map_or(Who::Anon, Who::User)),
            _ => None,
        };
        let settings = judged.map(Who::settings);
        let role = settings.as_ref().map(|s| s.0);
        // The claims of the caller's own token (no lookup on this hot path).
        let claims = judged.map(|w| w.token_claims(viewer.and_then(|p| p.email.as_deref())));
        let sub = settings.map(|s| s.1);
        let row = {
            let client = self.0.pool.get().await?;
            client
                .query_opt(
                    &format!(
                        "SELECT {cols}, b.public AS bucket_public,
                                CASE WHEN $3::text IS NULL THEN true
                                     ELSE aether.storage_may_read(f.id, $3, $4, $5) END AS may
                         FROM public.files f JOIN public.buckets b ON b.id = f.bucket_id
                         WHERE f.bucket_id = $1 AND f.path = $2",
                        cols = FILE_COLUMNS
                            .split(", ")
                            .map(|c| format!("f.{c}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    &[&bucket, &path.to_string(), &role, &claims, &sub],
                )
                .await
                .map_err(policy::refused)?
                .ok_or_else(not_found)?
        };
        let file = file_from_row(&row);
        let bucket_public: bool = row.get("bucket_public");
        let allowed = match viewer {
            Some(p) if p.is_service() => true,
            _ if judged.is_some() => row.get("may"),
            _ => bucket_public || (user.is_some() && user == file.owner_id),
        };
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

impl StorageService {
    /// The file at `path` if `viewer` (`None`: an anonymous reader) may read
    /// it; another user's private file is `None`, as if it were not there.
    pub async fn readable(
        &self,
        viewer: Option<Actor>,
        bucket: &str,
        path: &ObjectPath,
    ) -> Result<Option<FileRecord>, StorageError> {
        let public = self.bucket(bucket).await?.public;
        let Some(file) = self.file_at(bucket, path).await? else {
            return Ok(None);
        };
        let user = match viewer {
            Some(Actor::Service) => return Ok(Some(file)),
            Some(Actor::User(u)) => Some(u),
            None => None,
        };
        Ok(self.may_read(user, &file, public).await?.then_some(file))
    }

    /// Whether `user` (`None`: an anonymous reader; never the service role)
    /// may read `file`: the storage policies decide, or without them Aether's
    /// rules (its owner; anyone in a public bucket).
    pub(super) async fn may_read(
        &self,
        user: Option<uuid::Uuid>,
        file: &FileRecord,
        bucket_public: bool,
    ) -> Result<bool, StorageError> {
        if self.policies().await? {
            let who = user.map_or(Who::Anon, Who::User);
            let client = self.0.pool.get().await?;
            return policy::may_read(&**client, who, file.id).await;
        }
        Ok(bucket_public || (user.is_some() && user == file.owner_id))
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
