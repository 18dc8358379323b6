//! The blob store (through `object_store`) and the life of one upload's bytes.
//!
//! Every upload gets a fresh key (`<owner>/<uuid>`), so bytes never overwrite bytes
//! that a row points to. Bytes are streamed into a multipart upload; nothing is
//! visible at the key until it completes, and an upload that fails, is refused or is
//! dropped half-way (client gone) is aborted, which removes what was written.

use std::path::Path as FsPath;
use std::sync::Arc;

use bytes::Bytes;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt as _, WriteMultipart};

/// Parts in flight per upload (each `part_size` bytes at most).
const CONCURRENCY: usize = 2;

/// A blob store and the part size its multipart uploads use.
#[derive(Clone, Debug)]
pub struct Blobs {
    pub store: Arc<dyn ObjectStore>,
    pub part_size: usize,
}

impl Blobs {
    /// `LocalFileSystem` under `DATA_DIR/storage`, or S3 when configured.
    pub fn open(backend: &StorageBackend, data_dir: &FsPath) -> anyhow::Result<Blobs> {
        use anyhow::Context as _;
        match backend {
            StorageBackend::Local => {
                let dir = data_dir.join("storage");
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                let store = object_store::local::LocalFileSystem::new_with_prefix(&dir)
                    .with_context(|| format!("opening {}", dir.display()))?
                    .with_automatic_cleanup(true)
                    // The row that points to the bytes is committed (and fsynced by
                    // PostgreSQL) after this returns: the bytes must be as durable.
                    .with_fsync(true);
                // No minimum part size on disk: keep little in memory per upload.
                Ok(Blobs {
                    store: Arc::new(store),
                    part_size: 256 * 1024,
                })
            }
            StorageBackend::S3(s3) => {
                let mut b = object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(&s3.bucket)
                    .with_region(&s3.region);
                if let Some(ep) = &s3.endpoint {
                    b = b
                        .with_endpoint(ep)
                        .with_allow_http(ep.starts_with("http://"));
                }
                if let (Some(k), Some(s)) = (&s3.access_key_id, &s3.secret_access_key) {
                    b = b.with_access_key_id(k).with_secret_access_key(s);
                }
                let store = b.build().context("S3 storage settings")?;
                // S3 refuses parts under 5 MiB (except the last one).
                Ok(Blobs {
                    store: Arc::new(store),
                    part_size: 5 * 1024 * 1024,
                })
            }
        }
    }

    /// Copies the blob at `from` to the fresh key `to` (`None`: creates an
    /// empty blob there). The bytes at `to` are complete when this returns.
    pub async fn copy(&self, from: Option<&str>, to: &str) -> object_store::Result<()> {
        let to = Path::from(to);
        match from {
            Some(from) => self.store.copy(&Path::from(from), &to).await,
            None => self
                .store
                .put(&to, object_store::PutPayload::default())
                .await
                .map(|_| ()),
        }
    }

    /// Deletes a blob, logging (not returning) failures: used after the row that
    /// pointed to it is gone, so a failure leaves unreferenced bytes, never a
    /// dangling row.
    pub async fn delete_quietly(&self, key: &str) {
        match self.store.delete(&Path::from(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => tracing::warn!(key, error = %e, "could not delete blob"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Parts are being written; nothing is visible at the key yet.
    Writing,
    /// The bytes are complete at the key; no row points to them yet.
    Stored,
    /// A committed row points to the bytes: keep them.
    Kept,
    /// Cleaned up.
    Gone,
}

/// The bytes of one upload on their way in.
pub struct BlobWriter {
    blobs: Blobs,
    key: String,
    writer: Option<WriteMultipart>,
    stage: Stage,
    written: u64,
}

impl std::fmt::Debug for BlobWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobWriter")
            .field("key", &self.key)
            .field("stage", &self.stage)
            .field("written", &self.written)
            .finish()
    }
}

impl BlobWriter {
    pub async fn start(blobs: &Blobs, key: String) -> object_store::Result<BlobWriter> {
        let upload = blobs.store.put_multipart(&Path::from(key.as_str())).await?;
        Ok(BlobWriter {
            writer: Some(WriteMultipart::new_with_chunk_size(upload, blobs.part_size)),
            blobs: blobs.clone(),
            key,
            stage: Stage::Writing,
            written: 0,
        })
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn written(&self) -> u64 {
        self.written
    }

    /// Buffers `chunk`, first waiting while `CONCURRENCY` parts are in flight.
    pub async fn write(&mut self, chunk: Bytes) -> object_store::Result<()> {
        let w = self
            .writer
            .as_mut()
            .ok_or(object_store::Error::NotImplemented {
                operation: "write after finish".into(),
                implementer: "BlobWriter".into(),
            })?;
        w.wait_for_capacity(CONCURRENCY).await?;
        self.written += chunk.len() as u64;
        w.put(chunk);
        Ok(())
    }

    /// Flushes and completes the upload: the bytes are now at the key.
    pub async fn finish(&mut self) -> object_store::Result<()> {
        if let Some(w) = self.writer.take() {
            w.finish().await?;
            self.stage = Stage::Stored;
        }
        Ok(())
    }

    /// A row now points to these bytes: dropping no longer deletes them.
    pub fn keep(&mut self) {
        if self.stage == Stage::Stored {
            self.stage = Stage::Kept;
        }
    }

    /// Removes whatever was written (aborts the upload or deletes the blob).
    pub async fn discard(&mut self) {
        let stage = std::mem::replace(&mut self.stage, Stage::Gone);
        if stage == Stage::Kept {
            self.stage = Stage::Kept;
            return;
        }
        cleanup(&self.blobs, &self.key, self.writer.take(), stage).await;
    }
}

async fn cleanup(blobs: &Blobs, key: &str, writer: Option<WriteMultipart>, stage: Stage) {
    if let Some(w) = writer
        && let Err(e) = w.abort().await
    {
        tracing::warn!(key, error = %e, "could not abort upload");
    }
    if stage == Stage::Stored {
        blobs.delete_quietly(key).await;
    }
}

impl Drop for BlobWriter {
    /// A writer dropped before its row was committed (the request was cancelled)
    /// cleans up in the background.
    fn drop(&mut self) {
        if matches!(self.stage, Stage::Writing | Stage::Stored)
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            let (blobs, key, writer, stage) = (
                self.blobs.clone(),
                std::mem::take(&mut self.key),
                self.writer.take(),
                self.stage,
            );
            self.stage = Stage::Gone;
            tracing::debug!(key, "upload dropped before commit: cleaning up");
            rt.spawn(async move { cleanup(&blobs, &key, writer, stage).await });
        }
    }
}

/// Where uploaded bytes live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageBackend {
    /// `DATA_DIR/storage` on the local file system.
    Local,
    /// An S3 (or S3-compatible) bucket.
    S3(S3Config),
}

#[derive(Clone, PartialEq, Eq)]
pub struct S3Config {
    pub bucket: String,
    pub region: String,
    /// `None`: AWS itself; set for MinIO, R2, … (`http://` endpoints are allowed).
    pub endpoint: Option<String>,
    /// `None` (both): credentials from the rest of the AWS environment (session
    /// token, web identity, instance metadata).
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
}

impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Config")
            .field("bucket", &self.bucket)
            .field("region", &self.region)
            .field("endpoint", &self.endpoint)
            .field(
                "access_key_id",
                &self.access_key_id.as_ref().map(|_| "<set>"),
            )
            .finish_non_exhaustive()
    }
}
