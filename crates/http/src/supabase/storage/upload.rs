//! Uploads: raw and multipart bodies, with their custom metadata (`upload`,
//! `update`).

use axum::Json;
use axum::extract::multipart::Multipart;
use axum::extract::{FromRequest, Request, State};
use axum::http::{HeaderMap, header};
use serde::Serialize;
use serde_json::Value;

use super::errors::StorageApiError;
use super::owners::{Caller, object_path, writer};
use crate::AppState;
use crate::extract::ApiPath;
use crate::storage::{MULTIPART_SLACK, content_length};
use crate::validate;
use aether_storage::{
    Actor, BucketInfo, FileRecord, ObjectPath, PendingUpload, PumpError, StorageError, TypeRules,
    UploadSource, UploadTarget, WriteFacts, resolve_mime,
};

#[derive(Serialize)]
pub(crate) struct UploadAnswer {
    #[serde(rename = "Key")]
    key: String,
    #[serde(rename = "Id")]
    id: String,
}

/// Custom metadata (`metadata` of `upload`) is a JSON object of at most this
/// many bytes.
const MAX_METADATA_BYTES: usize = 8 * 1024;

/// A JSON object of custom metadata, checked like any JSON body.
fn parse_metadata(text: &[u8]) -> Result<Value, StorageApiError> {
    if text.len() > MAX_METADATA_BYTES {
        return Err(StorageApiError::invalid(format!(
            "metadata is larger than {MAX_METADATA_BYTES} bytes"
        )));
    }
    let v: Value = serde_json::from_slice(text)
        .map_err(|e| StorageApiError::invalid(format!("metadata is not JSON: {e}")))?;
    if !v.is_object() {
        return Err(StorageApiError::invalid("metadata must be a JSON object"));
    }
    validate::json(&v)?;
    Ok(v)
}

const MAX_CACHE_CONTROL_BYTES: usize = 256;

/// `cacheControl`: seconds (`3600`, as storage-js sends it in a form) become
/// `max-age=3600`; otherwise a list of the directives an object's owner may
/// choose (`max-age=N`, `no-cache`, `no-store`, `must-revalidate`,
/// `immutable`, `stale-while-revalidate=N`). Whether shared caches may keep
/// it (`public`/`private`) is the bucket's to say, not the uploader's.
pub(super) fn cache_control_value(v: &str) -> Result<String, StorageApiError> {
    let v = v.trim();
    let bad = || {
        StorageApiError::invalid(
            "cacheControl must be seconds, or of max-age=N, no-cache, no-store, \
             must-revalidate, immutable, stale-while-revalidate=N",
        )
    };
    if v.is_empty() || v.len() > MAX_CACHE_CONTROL_BYTES {
        return Err(bad());
    }
    if v.bytes().all(|b| b.is_ascii_digit()) {
        return Ok(format!("max-age={v}"));
    }
    let seconds = |n: &str| !n.is_empty() && n.len() <= 10 && n.bytes().all(|b| b.is_ascii_digit());
    let mut out = Vec::new();
    for d in v.split(',').map(str::trim) {
        let d = d.to_ascii_lowercase();
        let ok = match d.split_once('=') {
            Some(("max-age" | "stale-while-revalidate", n)) => seconds(n),
            Some(_) => false,
            None => matches!(
                d.as_str(),
                "no-cache" | "no-store" | "must-revalidate" | "immutable"
            ),
        };
        if !ok {
            return Err(bad());
        }
        out.push(d);
    }
    Ok(out.join(", "))
}

/// `x-metadata`: base64 of the metadata's JSON (storage-js, raw bodies).
fn header_metadata(headers: &HeaderMap) -> Result<Option<Value>, StorageApiError> {
    use base64::Engine as _;
    let Some(raw) = headers.get("x-metadata") else {
        return Ok(None);
    };
    let bad = || StorageApiError::invalid("x-metadata must be base64 of a JSON object");
    let text = raw.to_str().map_err(|_| bad())?.trim();
    if text.len() > MAX_METADATA_BYTES.div_ceil(3) * 4 {
        return Err(StorageApiError::invalid(format!(
            "metadata is larger than {MAX_METADATA_BYTES} bytes"
        )));
    }
    let json = base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|_| bad())?;
    parse_metadata(&json).map(Some)
}

/// Stores the body of `req` (raw, or the file part of a form) as `actor`'s
/// write at `bucket/path`, under the bucket's own rules (any type unless
/// the bucket lists some), with the custom metadata sent along.
pub(super) async fn do_upload(
    state: AppState,
    actor: Actor,
    bucket: String,
    path: ObjectPath,
    upsert: bool,
    req: Request,
) -> Result<FileRecord, StorageApiError> {
    let info = state.storage.bucket(&bucket).await?;
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let is_form = content_type
        .as_deref()
        .is_some_and(|c| c.to_ascii_lowercase().starts_with("multipart/form-data"));
    let limit = state.storage.size_limit(Some(&info));
    let too_large = || StorageApiError::from(StorageError::FileTooLarge { limit }).closing();
    // Too large by its own account: refused before a byte of the body is read.
    let slack = if is_form { MULTIPART_SLACK } else { 0 };
    if content_length(req.headers()).is_some_and(|n| n > limit.saturating_add(slack)) {
        return Err(too_large());
    }
    let mut metadata = header_metadata(req.headers()).map_err(StorageApiError::closing)?;
    // storage-js: `cache-control: max-age=N` on a raw body, a `cacheControl`
    // field (`N`) in a form.
    let mut cache_control = match req.headers().get(header::CACHE_CONTROL) {
        Some(v) => Some(
            cache_control_value(v.to_str().unwrap_or("\u{0}")).map_err(StorageApiError::closing)?,
        ),
        None => None,
    };
    let mut pending: Option<PendingUpload> = None;
    // Every refusal below is answered at once, while the body may still be
    // arriving: what is left of it is not read.
    let result: Result<(), StorageApiError> = if is_form {
        // storage-js sends a Blob as the form part named "" (plus `cacheControl`
        // and `metadata` fields).
        let mut mp = Multipart::from_request(req, &state)
            .await
            .map_err(|e| StorageApiError::invalid(e.body_text()))?;
        let mut r = Ok(());
        // Fields other than the file (and any second file) are skipped, but count
        // against the same bound as the file.
        let mut skipped = 0u64;
        loop {
            let field = match mp.next_field().await {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    r = Err(StorageApiError::invalid(e.body_text()));
                    break;
                }
            };
            let name = field.name().unwrap_or("").to_owned();
            let is_file = field.file_name().is_some() || name.is_empty() || name == "file";
            let mut field = field;
            if !is_file && name == "cacheControl" {
                let mut text = Vec::new();
                while let Ok(Some(c)) = field.chunk().await {
                    text.extend_from_slice(&c);
                    if text.len() > MAX_CACHE_CONTROL_BYTES {
                        break;
                    }
                }
                match cache_control_value(&String::from_utf8_lossy(&text)) {
                    Ok(v) => cache_control = Some(v),
                    Err(e) => {
                        r = Err(e);
                        break;
                    }
                }
                continue;
            }
            if !is_file && name == "metadata" {
                if metadata.is_some() {
                    // One is all storage-js sends; more would be read for ever.
                    r = Err(StorageApiError::invalid("more than one metadata field"));
                    break;
                }
                let mut text = Vec::new();
                while let Ok(Some(c)) = field.chunk().await {
                    text.extend_from_slice(&c);
                    if text.len() > MAX_METADATA_BYTES {
                        break;
                    }
                }
                match parse_metadata(&text) {
                    Ok(v) => metadata = Some(v),
                    Err(e) => {
                        r = Err(e);
                        break;
                    }
                }
                continue;
            }
            if !is_file || pending.is_some() {
                while let Ok(Some(c)) = field.chunk().await {
                    skipped += c.len() as u64;
                    if skipped > limit.saturating_add(MULTIPART_SLACK) {
                        r = Err(too_large());
                        break;
                    }
                }
                if r.is_err() {
                    break;
                }
                continue;
            }
            let source = UploadSource {
                file_name: path.name().to_owned(),
                content_type: field.content_type().map(str::to_owned),
                types: TypeRules::BucketOnly,
            };
            let target = (bucket.as_str(), &path, upsert, &info);
            match begin(&state, actor, target, source, 0, &metadata).await {
                Ok(up) => {
                    let up = pending.insert(up);
                    if let Err(e) = up.pump(&mut field, |_| {}).await {
                        r = Err(match e {
                            PumpError::Storage(e) => e.into(),
                            PumpError::Body(e) => StorageApiError::invalid(e.body_text()),
                        });
                    }
                }
                Err(e) => r = Err(e.into()),
            }
            if r.is_err() {
                break;
            }
        }
        r
    } else {
        let source = UploadSource {
            file_name: path.name().to_owned(),
            content_type,
            types: TypeRules::BucketOnly,
        };
        let announced = content_length(req.headers()).unwrap_or(0);
        let stream = req.into_body().into_data_stream();
        let target = (bucket.as_str(), &path, upsert, &info);
        match begin(&state, actor, target, source, announced, &metadata).await {
            Ok(up) => pending
                .insert(up)
                .pump(stream, |_| {})
                .await
                .map_err(|e| match e {
                    PumpError::Storage(e) => e.into(),
                    PumpError::Body(e) => {
                        StorageApiError::invalid(format!("reading the body: {e}"))
                    }
                }),
            Err(e) => Err(e.into()),
        }
    };
    if let Err(e) = result {
        if let Some(mut up) = pending {
            up.discard().await;
        }
        return Err(e.closing());
    }
    let up = pending.ok_or_else(|| StorageApiError::invalid("the form has no file"))?;
    let file = state
        .storage
        .commit(
            up,
            UploadTarget {
                bucket,
                path,
                upsert,
                id: None,
                user_metadata: metadata,
                cache_control,
            },
        )
        .await?;
    Ok(file)
}

/// Checks the write as far as it is known (the declared type, the size the
/// client announced: 0 for a form, the custom metadata read so far), then
/// opens the upload.
async fn begin(
    state: &AppState,
    actor: Actor,
    (bucket, path, upsert, info): (&str, &ObjectPath, bool, &BucketInfo),
    source: UploadSource,
    announced: u64,
    metadata: &Option<Value>,
) -> Result<PendingUpload, StorageError> {
    let facts = WriteFacts {
        mime: Some(resolve_mime(
            source.content_type.as_deref(),
            &source.file_name,
        )),
        size: announced,
        user_metadata: metadata.clone(),
    };
    let charge = state
        .storage
        .check_write(actor, bucket, path, upsert, &facts)
        .await?;
    state
        .storage
        .begin_upload(actor, source, Some(info), charge)
        .await
}

pub(super) fn upload_answer(bucket: &str, f: &FileRecord) -> Json<UploadAnswer> {
    Json(UploadAnswer {
        key: format!("{bucket}/{}", f.path),
        id: f.id.hyphenated().to_string(),
    })
}

pub(super) fn upsert_header(headers: &HeaderMap) -> bool {
    headers
        .get("x-upsert")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
}

/// `POST /storage/v1/object/{bucket}/{path}`: raw body or multipart; `x-upsert`.
pub(crate) async fn upload(
    State(state): State<AppState>,
    Caller(p): Caller,
    ApiPath((bucket, path)): ApiPath<(String, String)>,
    req: Request,
) -> Result<Json<UploadAnswer>, StorageApiError> {
    let upsert = upsert_header(req.headers());
    let path = object_path(&path)?;
    let actor = writer(&p)?;
    let f = do_upload(state, actor, bucket.clone(), path, upsert, req).await?;
    Ok(upload_answer(&bucket, &f))
}

/// `PUT /storage/v1/object/{bucket}/{path}`: replaces the object.
pub(crate) async fn update(
    State(state): State<AppState>,
    Caller(p): Caller,
    ApiPath((bucket, path)): ApiPath<(String, String)>,
    req: Request,
) -> Result<Json<UploadAnswer>, StorageApiError> {
    let path = object_path(&path)?;
    let actor = writer(&p)?;
    let f = do_upload(state, actor, bucket.clone(), path, true, req).await?;
    Ok(upload_answer(&bucket, &f))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn metadata_is_a_small_json_object() {
        use base64::Engine as _;
        let mut h = HeaderMap::new();
        assert_eq!(header_metadata(&h).unwrap(), None);
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        h.insert("x-metadata", b64(r#"{"a":1}"#).parse().unwrap());
        assert_eq!(header_metadata(&h).unwrap(), Some(json!({"a": 1})));
        for bad in [b64("[1]"), b64("{"), "***".into(), b64(r#"{"a":"\u0000"}"#)] {
            h.insert("x-metadata", bad.parse().unwrap());
            assert!(header_metadata(&h).is_err(), "{bad}");
        }
        let big = format!(r#"{{"a":"{}"}}"#, "x".repeat(MAX_METADATA_BYTES));
        assert!(parse_metadata(big.as_bytes()).is_err());
    }

    #[test]
    fn cache_control_takes_seconds_or_the_owners_directives() {
        assert_eq!(cache_control_value("3600").unwrap(), "max-age=3600");
        assert_eq!(
            cache_control_value(" max-age=3600 ").unwrap(),
            "max-age=3600"
        );
        assert_eq!(
            cache_control_value("Max-Age=60, Immutable").unwrap(),
            "max-age=60, immutable"
        );
        for bad in [
            "",
            "public, max-age=1",
            "s-maxage=9",
            "max-age=",
            "max-age=1x",
            "private",
            "no-cache\r\nx: y",
        ] {
            assert!(cache_control_value(bad).is_err(), "{bad:?}");
        }
    }
}
