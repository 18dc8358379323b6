//! `/storage/*`: thin handlers over [`aether_storage::StorageService`].
//!
//! A user's paths here are relative to their home folder: the object's name
//! in the bucket is `<user id>/<path>`, and its URL
//! `/storage/object/{bucket}/{user id}/{path}` (prefixed with `PUBLIC_URL`
//! when set).

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::extract::multipart::{Field, Multipart, MultipartRejection};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::auth::{SuccessBody, timestamp};
use super::error::{ApiError, ErrorBody};
use super::extract::{ApiJson, ApiPath, ApiQuery, AuthUser, MaybeUser};
use super::validate::{self, Invalid, Validate};
use crate::AppState;
use aether_storage::path::{MAX_PATH_BYTES, base_name};
use aether_storage::{
    Actor, BucketInfo, ByteRange, Charge, FileRecord, ListScope, ObjectPath, PendingUpload,
    PumpError, StorageError, TypeRules, UploadSource, UploadTarget,
};

/// Everything but unreserved characters and sub-delims is escaped in a segment.
const SEGMENT: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'/')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'[')
    .add(b'\\')
    .add(b']')
    .add(b'^')
    .add(b'`')
    .add(b'{')
    .add(b'|')
    .add(b'}');

/// Bytes of form fields other than `file` accepted per upload.
const FORM_OVERHEAD: usize = 16 * 1024;

/// What a multipart body may hold besides the file's bytes: the other fields
/// (`FORM_OVERHEAD`, `bucket`, `path`), part headers and boundaries. A
/// `Content-Length` above the size limit plus this is refused before reading.
pub(crate) const MULTIPART_SLACK: u64 = 64 * 1024;

/// The request's `Content-Length`, when it sent a valid one.
pub(crate) fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
}

/// The URL at which the object `name` can be read.
pub(crate) fn object_url(public_url: Option<&str>, bucket: &str, name: &str) -> String {
    let mut url = public_url.unwrap_or("").to_owned();
    url.push_str("/storage/object/");
    url.extend(utf8_percent_encode(bucket, SEGMENT));
    for seg in name.split('/') {
        url.push('/');
        url.extend(utf8_percent_encode(seg, SEGMENT));
    }
    url
}

fn file_url(state: &AppState, f: &FileRecord) -> String {
    object_url(state.settings.public_url.as_deref(), &f.bucket, &f.path)
}

/// Where `user`'s `path` is in the bucket: in their home folder,
/// `<user id>/<path>` (the seed routes' requests and answers keep the path
/// relative to it).
fn in_home(user: Uuid, path: &ObjectPath) -> Result<ObjectPath, StorageError> {
    Ok(path.within(&ObjectPath::home(user))?)
}

/// A name in `user`'s home folder as the seed routes show it: relative.
fn relative(user: Uuid, name: &str) -> String {
    let home = user.hyphenated().to_string();
    name.strip_prefix(home.as_str())
        .and_then(|rest| rest.strip_prefix('/'))
        .unwrap_or(name)
        .to_owned()
}

/// The multipart form of an upload (for the OpenAPI document).
#[derive(ToSchema)]
#[allow(dead_code)]
pub(crate) struct UploadForm {
    /// The file (its part's `Content-Type` and file name are used for the type check).
    #[schema(value_type = String, format = Binary)]
    file: Vec<u8>,
    /// Bucket id; `UPLOAD_BUCKET` when omitted.
    bucket: Option<String>,
    /// Where to store it, e.g. `docs/report.pdf`. Empty or ending in `/`: the
    /// file's own name is appended. Send it before `file` for early checks.
    path: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct UploadResponse {
    #[schema(example = "docs/report.pdf")]
    pub path: String,
    pub url: String,
    pub size: u64,
    #[schema(example = "application/pdf")]
    pub mime_type: String,
    pub created_at: String,
    /// Addition to the documented shape: the file's id.
    #[schema(format = Uuid)]
    pub id: String,
    /// Addition: the bucket the file went to.
    pub bucket: String,
    /// Addition: the folder's id (what a realtime `files` subscription takes);
    /// `null` at the root.
    #[schema(format = Uuid)]
    pub folder_id: Option<String>,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct ListQuery {
    /// Bucket id; `UPLOAD_BUCKET` when omitted.
    pub bucket: Option<String>,
    /// Folder to list; the root when omitted or empty.
    pub path: Option<String>,
}

impl Validate for ListQuery {
    fn validate(&self) -> Result<(), Invalid> {
        check_bucket_and_path(self.bucket.as_deref(), self.path.as_deref())
    }
}

/// A bucket names an identifier and a path an object path: their own codes
/// (`storage/invalid-bucket`, `storage/invalid-path`) before the generic check.
fn check_bucket_and_path(bucket: Option<&str>, path: Option<&str>) -> Result<(), Invalid> {
    if let Some(b) = bucket {
        validate::bucket("bucket", b)?;
    }
    if let Some(p) = path {
        validate::path("path", p)?;
    }
    Ok(())
}

#[derive(Serialize, ToSchema)]
pub(crate) struct ListedFile {
    pub name: String,
    pub path: String,
    pub size: u64,
    pub mime_type: String,
    pub created_at: String,
    pub url: String,
    /// Addition to the documented shape.
    #[schema(format = Uuid)]
    pub id: String,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct ListedFolder {
    pub name: String,
    pub path: String,
    /// Addition to the documented shape: subscribe to `{"files": id}` for its files.
    #[schema(format = Uuid)]
    pub id: String,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct ListResponse {
    pub files: Vec<ListedFile>,
    pub folders: Vec<ListedFolder>,
}

#[derive(Deserialize, ToSchema)]
pub(crate) struct DeleteRequest {
    /// Bucket id; `UPLOAD_BUCKET` when omitted.
    pub bucket: Option<String>,
    /// A file, or an empty folder.
    pub path: String,
}

impl Validate for DeleteRequest {
    fn validate(&self) -> Result<(), Invalid> {
        check_bucket_and_path(self.bucket.as_deref(), Some(&self.path))
    }
}

fn bucket_or_default<'a>(state: &'a AppState, bucket: &'a Option<String>) -> &'a str {
    match bucket.as_deref().map(str::trim) {
        Some(b) if !b.is_empty() => b,
        _ => state.storage.default_bucket(),
    }
}

fn invalid_form(message: impl Into<String>) -> ApiError {
    ApiError::bad_request("storage/invalid-request", message)
}

/// Reads a small text field, refusing more than `max` bytes.
async fn small_text(field: &mut Field<'_>, name: &str, max: usize) -> Result<String, ApiError> {
    let mut buf = Vec::new();
    while let Some(chunk) = field.chunk().await? {
        buf.extend_from_slice(&chunk);
        if buf.len() > max {
            return Err(invalid_form(format!(
                "form field {name:?} is longer than {max} bytes"
            )));
        }
    }
    String::from_utf8(buf).map_err(|_| invalid_form(format!("form field {name:?} is not UTF-8")))
}

#[derive(Default)]
struct Form {
    bucket: Option<BucketInfo>,
    path: Option<String>,
}

/// KingShare `UploadProgress` for the uploader's connections: at every tenth of
/// the request's `Content-Length` (every MiB when it is unknown), and at the end.
struct Progress<'a> {
    state: &'a AppState,
    user: Uuid,
    upload_id: Uuid,
    /// The request's Content-Length: the file plus a little form overhead.
    total: Option<u64>,
    reported: u64,
}

impl Progress<'_> {
    fn report(&mut self, uploaded: u64, done: bool) {
        let step = match self.total {
            Some(t) => (t / 10).max(64 * 1024),
            None => 1024 * 1024,
        };
        if !done && uploaded < self.reported + step {
            return;
        }
        self.reported = uploaded;
        let total = if done {
            uploaded
        } else {
            self.total.unwrap_or(0).max(uploaded)
        };
        let fraction = if total == 0 {
            1.0
        } else {
            (uploaded as f64 / total as f64).min(1.0)
        };
        let frame = aether_realtime::kingshare::message(
            "UploadProgress",
            serde_json::json!({
                "file_id": self.upload_id.hyphenated().to_string(),
                "progress": fraction,
                "bytes_uploaded": uploaded,
                "total_bytes": total,
            }),
        );
        self.state
            .realtime
            .kingshare
            .to_user(&self.user.hyphenated().to_string(), &frame);
    }
}

/// Reads the form, streaming `file` into `pending` as it arrives.
async fn read_form(
    state: &AppState,
    owner: Uuid,
    mp: &mut Multipart,
    pending: &mut Option<PendingUpload>,
    mut progress: Progress<'_>,
) -> Result<Form, ApiError> {
    let mut form = Form::default();
    let mut overhead = 0usize;
    while let Some(mut field) = mp.next_field().await? {
        let name = field.name().unwrap_or("").to_owned();
        match name.as_str() {
            "bucket" => {
                if form.bucket.is_some() {
                    return Err(invalid_form("send one `bucket` field"));
                }
                let v = small_text(&mut field, "bucket", 256).await?;
                validate::bucket("bucket", &v)?;
                let id = match v.trim() {
                    "" => state.storage.default_bucket().to_owned(),
                    v => v.to_owned(),
                };
                form.bucket = Some(state.storage.bucket(&id).await?);
            }
            "path" => {
                if form.path.is_some() {
                    return Err(invalid_form("send one `path` field"));
                }
                let v = small_text(&mut field, "path", MAX_PATH_BYTES + 1).await?;
                ObjectPath::parse_any(&v).map_err(StorageError::from)?;
                form.path = Some(v);
            }
            "file" => {
                if pending.is_some() {
                    return Err(invalid_form("send one `file` per request"));
                }
                let mut file_name = base_name(field.file_name().unwrap_or("")).to_owned();
                if file_name.is_empty()
                    && let Some(p) = form.path.as_deref().filter(|p| !p.ends_with('/'))
                {
                    file_name = base_name(p).to_owned();
                }
                let source = UploadSource {
                    file_name,
                    content_type: field.content_type().map(str::to_owned),
                    // The seed route answers to ALLOWED_FILE_TYPES too.
                    types: TypeRules::Server,
                };
                // The seed route writes in the caller's own folder.
                let actor = Actor::User(owner);
                let up = state
                    .storage
                    .begin_upload(
                        actor,
                        source,
                        form.bucket.as_ref(),
                        Charge::new_object(actor),
                    )
                    .await?;
                let up = pending.insert(up);
                up.pump(&mut field, |n| progress.report(n, false))
                    .await
                    .map_err(|e| match e {
                        PumpError::Storage(e) => ApiError::from(e),
                        PumpError::Body(e) => ApiError::from(e),
                    })?;
                progress.report(up.size(), true);
            }
            _ => {
                while let Some(chunk) = field.chunk().await? {
                    overhead += chunk.len();
                    if overhead > FORM_OVERHEAD {
                        return Err(invalid_form(format!(
                            "unexpected form field {name:?} (expected file, bucket, path)"
                        )));
                    }
                }
            }
        }
    }
    Ok(form)
}

fn target_path(raw: Option<&str>, file_name: &str) -> Result<ObjectPath, ApiError> {
    let raw = raw.unwrap_or("");
    if raw.is_empty() || raw.ends_with('/') {
        let dir = ObjectPath::parse_any(raw).map_err(StorageError::from)?;
        if file_name.is_empty() {
            return Err(ApiError::bad_request(
                "storage/invalid-path",
                "invalid path: `path` names a folder and the file has no name; give the full path",
            ));
        }
        Ok(dir.join(file_name).map_err(StorageError::from)?)
    } else {
        Ok(ObjectPath::parse(raw).map_err(StorageError::from)?)
    }
}

/// Upload a file (multipart, streamed; size, type and quota enforced as it arrives).
#[utoipa::path(
    post, path = "/storage/upload", tag = "storage",
    security(("bearer" = [])),
    request_body(content = UploadForm, content_type = "multipart/form-data"),
    params(("x-upsert" = Option<String>, Header, description = "`true` replaces a file already at the path (otherwise 409 `storage/already-exists`)")),
    responses(
        (status = 201, description = "Stored", body = UploadResponse),
        (status = 400, description = "`storage/invalid-path`, `storage/invalid-bucket`, `storage/invalid-request`, `invalid_body`", body = ErrorBody),
        (status = 401, description = "`auth/*` token errors", body = ErrorBody),
        (status = 404, description = "`storage/bucket-not-found`", body = ErrorBody),
        (status = 409, description = "`storage/already-exists`, `storage/conflict`", body = ErrorBody),
        (status = 413, description = "`storage/file-too-large`, `storage/quota-exceeded`", body = ErrorBody),
        (status = 415, description = "`storage/invalid-type`; `unsupported_media_type` when not multipart", body = ErrorBody),
        (status = 429, description = "`rate-limit/exceeded`", body = ErrorBody),
    )
)]
pub(crate) async fn upload(
    State(state): State<AppState>,
    user: AuthUser,
    headers: HeaderMap,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<(StatusCode, Json<UploadResponse>), ApiError> {
    let mut mp = multipart?;
    // Too large by its own account: refused before a byte of the body is read.
    let limit = state.storage.size_limit(None);
    if content_length(&headers).is_some_and(|n| n > limit.saturating_add(MULTIPART_SLACK)) {
        return Err(ApiError::from(StorageError::FileTooLarge { limit }).closing());
    }
    let upsert = headers
        .get("x-upsert")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
    let mut pending = None;
    // Announced in KingShare UploadProgress; the new row gets this id.
    let upload_id = Uuid::new_v4();
    let total = content_length(&headers);
    let progress = Progress {
        state: &state,
        user: user.id,
        upload_id,
        total,
        reported: 0,
    };
    let form = match read_form(&state, user.id, &mut mp, &mut pending, progress).await {
        Ok(form) => form,
        Err(e) => {
            if let Some(mut p) = pending.take() {
                p.discard().await;
            }
            // Answered now, while the body may still be arriving: the rest is
            // not read (the edge lingers briefly, then closes).
            return Err(e.closing());
        }
    };
    let Some(mut up) = pending else {
        return Err(invalid_form("the form has no `file` field"));
    };
    let path = match target_path(form.path.as_deref(), up.file_name())
        .and_then(|p| Ok(in_home(user.id, &p)?))
    {
        Ok(p) => p,
        Err(e) => {
            up.discard().await;
            return Err(e);
        }
    };
    let bucket = form
        .bucket
        .map(|b| b.id)
        .unwrap_or_else(|| state.storage.default_bucket().to_owned());
    let file = state
        .storage
        .commit(
            up,
            UploadTarget {
                bucket,
                path,
                upsert,
                id: Some(upload_id),
                user_metadata: None,
                cache_control: None,
            },
        )
        .await?;
    let body = UploadResponse {
        url: file_url(&state, &file),
        path: relative(user.id, &file.path),
        size: file.size,
        mime_type: file.mime_type,
        created_at: timestamp(&file.created_at),
        id: file.id.hyphenated().to_string(),
        bucket: file.bucket,
        folder_id: file.folder_id.map(|f| f.hyphenated().to_string()),
    };
    Ok((StatusCode::CREATED, Json(body)))
}

/// List your files and folders directly under a folder.
#[utoipa::path(
    get, path = "/storage/list", tag = "storage",
    security(("bearer" = [])),
    params(ListQuery),
    responses(
        (status = 200, description = "The folder's content (yours only)", body = ListResponse),
        (status = 400, description = "`storage/invalid-path`, `storage/invalid-bucket`, `invalid_characters`, `invalid_query`", body = ErrorBody),
        (status = 401, description = "`auth/*` token errors", body = ErrorBody),
        (status = 404, description = "`storage/not-found` (no such folder), `storage/bucket-not-found`", body = ErrorBody),
        (status = 429, description = "`rate-limit/exceeded`", body = ErrorBody),
    )
)]
pub(crate) async fn list(
    State(state): State<AppState>,
    user: AuthUser,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<Json<ListResponse>, ApiError> {
    let bucket = bucket_or_default(&state, &q.bucket);
    let folder =
        ObjectPath::parse_any(q.path.as_deref().unwrap_or("")).map_err(StorageError::from)?;
    let folder = in_home(user.id, &folder)?;
    let listing = state
        .storage
        .list(bucket, &folder, ListScope::Own(user.id))
        .await?;
    Ok(Json(ListResponse {
        files: listing
            .files
            .iter()
            .map(|f| ListedFile {
                name: f.name.clone(),
                path: relative(user.id, &f.path),
                size: f.size,
                mime_type: f.mime_type.clone(),
                created_at: timestamp(&f.created_at),
                url: file_url(&state, f),
                id: f.id.hyphenated().to_string(),
            })
            .collect(),
        folders: listing
            .folders
            .into_iter()
            .map(|f| ListedFolder {
                path: relative(user.id, &f.path),
                name: f.name,
                id: f.id.hyphenated().to_string(),
            })
            .collect(),
    }))
}

/// Delete one of your files (row and bytes), or an empty folder.
#[utoipa::path(
    delete, path = "/storage/delete", tag = "storage",
    security(("bearer" = [])),
    request_body = DeleteRequest,
    responses(
        (status = 200, description = "Deleted", body = SuccessBody),
        (status = 400, description = "`storage/invalid-path`, `storage/invalid-bucket`, `invalid_json`, `invalid_body`, `invalid_characters`", body = ErrorBody),
        (status = 401, description = "`auth/*` token errors", body = ErrorBody),
        (status = 404, description = "`storage/not-found`, `storage/bucket-not-found`", body = ErrorBody),
        (status = 409, description = "`storage/folder-not-empty`", body = ErrorBody),
        (status = 413, description = "`payload_too_large`: a body over 2 MB", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`: not JSON", body = ErrorBody),
        (status = 429, description = "`rate-limit/exceeded`", body = ErrorBody),
    )
)]
pub(crate) async fn delete(
    State(state): State<AppState>,
    user: AuthUser,
    ApiJson(body): ApiJson<DeleteRequest>,
) -> Result<Json<SuccessBody>, ApiError> {
    let bucket = bucket_or_default(&state, &body.bucket);
    let path = ObjectPath::parse(&body.path).map_err(StorageError::from)?;
    state
        .storage
        .delete(Actor::User(user.id), bucket, &in_home(user.id, &path)?)
        .await?;
    Ok(Json(SuccessBody { success: true }))
}

/// Types a browser may show inline; anything else is served as an attachment so a
/// stored HTML or SVG file cannot run script on this origin.
fn inline_safe(mime: &str) -> bool {
    let (t, sub) = mime.split_once('/').unwrap_or((mime, ""));
    matches!(t, "audio" | "video")
        || (t == "image" && sub != "svg+xml")
        || mime == "application/pdf"
        || mime == "text/plain"
}

/// Read a file's bytes (`Range` supported). Public buckets: anyone. Private
/// buckets: the owner (Bearer token) or a `service_role` token. The object's
/// name is `{owner}/{path}`: a seed upload's is under its owner's home folder.
#[utoipa::path(
    get, path = "/storage/object/{bucket}/{owner}/{path}", tag = "storage",
    params(
        ("bucket" = String, Path, description = "Bucket id"),
        ("owner" = String, Path, description = "The first segment of the object's name: the owner's user id for the seed routes' files"),
        ("path" = String, Path, description = "The file's path (may contain `/`)"),
        ("Range" = Option<String>, Header, description = "`bytes=first-last`, `bytes=first-` or `bytes=-suffix`"),
    ),
    security((), ("bearer" = [])),
    responses(
        (status = 200, description = "The bytes, with their stored content type", content_type = "*/*", body = inline(super::openapi::FileBytes)),
        (status = 206, description = "The requested range, with the stored content type", content_type = "*/*", body = inline(super::openapi::FileBytes)),
        (status = 400, description = "`storage/invalid-path`, `storage/invalid-bucket`, `invalid_characters`", body = ErrorBody),
        (status = 401, description = "`auth/missing-token` (private bucket) or a token error", body = ErrorBody),
        (status = 404, description = "`storage/not-found`", body = ErrorBody),
        (status = 416, description = "`storage/range-not-satisfiable`", body = ErrorBody),
        (status = 429, description = "`rate-limit/exceeded`", body = ErrorBody),
    )
)]
pub(crate) async fn object(
    State(state): State<AppState>,
    ApiPath((bucket, owner, path)): ApiPath<(String, String, String)>,
    MaybeUser(viewer): MaybeUser,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let object_path = ObjectPath::parse(&format!("{owner}/{path}")).map_err(StorageError::from)?;
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(ByteRange::parse);
    let read = state
        .storage
        .open(viewer.as_ref(), &bucket, &object_path, range)
        .await?;
    if read.span.is_none_or(|(a, _)| a == 0) {
        crate::kingshare::download_started(&state, &read.file);
    }
    read_response(read)
}

/// The response for a file opened for reading: its bytes (or range) with
/// content type, length, disposition and caching headers.
pub(crate) fn read_response(read: aether_storage::ObjectRead) -> Result<Response, ApiError> {
    let f = &read.file;
    let disposition = format!(
        "{}; filename*=UTF-8''{}",
        if inline_safe(&f.mime_type) {
            "inline"
        } else {
            "attachment"
        },
        utf8_percent_encode(&f.name, SEGMENT)
    );
    let mut res = Response::builder()
        .header(header::CONTENT_TYPE, &f.mime_type)
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::CONTENT_DISPOSITION, disposition)
        .header(header::X_CONTENT_TYPE_OPTIONS, "nosniff")
        .header(
            header::CACHE_CONTROL,
            match (&f.cache_control, read.bucket_public) {
                // What the uploader asked for (`/storage/v1`'s `cacheControl`),
                // kept out of shared caches unless the bucket is public.
                (Some(c), true) => format!("public, {c}"),
                (Some(c), false) => format!("private, {c}"),
                (None, true) => "public, max-age=60".to_owned(),
                (None, false) => "private, no-cache".to_owned(),
            },
        );
    res = match read.span {
        Some((a, b)) => res
            .status(StatusCode::PARTIAL_CONTENT)
            .header(header::CONTENT_LENGTH, b - a)
            .header(
                header::CONTENT_RANGE,
                format!("bytes {a}-{}/{}", b - 1, f.size),
            ),
        None => res
            .status(StatusCode::OK)
            .header(header::CONTENT_LENGTH, f.size),
    };
    res.body(Body::from_stream(read.body))
        .map_err(ApiError::internal)
        .map(IntoResponse::into_response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_escape_each_segment() {
        let owner = Uuid::nil();
        assert_eq!(
            object_url(None, "files", &format!("{owner}/docs/a b#1.pdf")),
            "/storage/object/files/00000000-0000-0000-0000-000000000000/docs/a%20b%231.pdf"
        );
        assert_eq!(
            object_url(Some("https://api.example.com"), "b", &format!("{owner}/x")),
            "https://api.example.com/storage/object/b/00000000-0000-0000-0000-000000000000/x"
        );
        assert_eq!(relative(owner, &format!("{owner}/docs/a")), "docs/a");
        assert_eq!(relative(owner, "shared/a"), "shared/a");
        assert!(
            inline_safe("image/png") && !inline_safe("image/svg+xml") && !inline_safe("text/html")
        );
    }
}
