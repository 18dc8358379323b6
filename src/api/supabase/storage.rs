//! `/storage/v1`: the Supabase storage API over [`crate::storage::StorageService`].
//!
//! Aether's paths are per owner; Supabase's are per bucket. The facade writes
//! under the caller's own user id (the service role: owner-less objects,
//! `owner_id` NULL, see [`Owner`]), and resolves a read of `bucket/path` to the
//! caller's own file, else (public bucket, signed URL or service role) to the
//! oldest file at that path. Errors use the storage API's body
//! `{"statusCode": "404", "code": "NoSuchKey", "error": "not_found", "message": …}`
//! (storage-js reads `statusCode`, then `code`, and `message`).

use axum::Json;
use axum::extract::multipart::Multipart;
use axum::extract::{FromRequest, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use uuid::Uuid;

use super::{KeyError, query_param};
use crate::api::auth::timestamp;
use crate::api::extract::ApiPath;
use crate::api::extract::bearer_token;
use crate::api::storage::{MULTIPART_SLACK, content_length, read_response};
use crate::api::validate::{self, Validate};
use crate::auth::{AuthError, Principal, Role};
use crate::server::AppState;
use crate::storage::path::MAX_PATH_BYTES;
use crate::storage::{
    ByteRange, Deleted, FileCursor, FileRecord, FileSort, NewBucket, ObjectPath, PendingUpload,
    PumpError, SortColumn, StorageError, TypeRules, UploadSource, UploadTarget,
};

/// An error in the storage API's shape.
#[derive(Debug)]
pub struct StorageApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub error: &'static str,
    pub message: String,
    /// Answer with `Connection: close` (see [`StorageApiError::closing`]).
    pub close: bool,
}

impl StorageApiError {
    pub fn new(
        status: StatusCode,
        code: &'static str,
        error: &'static str,
        message: impl Into<String>,
    ) -> Self {
        StorageApiError {
            status,
            code,
            error,
            message: message.into(),
            close: false,
        }
    }

    /// For answers given while the request body is still arriving: the rest is
    /// not read (the HTTP edge lingers briefly, then closes the connection).
    pub fn closing(mut self) -> Self {
        self.close = true;
        self
    }

    fn no_such_key() -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "NoSuchKey",
            "not_found",
            "Object not found",
        )
    }

    fn denied(message: &str) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "AccessDenied",
            "Unauthorized",
            message,
        )
    }

    fn invalid(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "InvalidRequest",
            "invalid_request",
            message,
        )
    }
}

impl IntoResponse for StorageApiError {
    fn into_response(self) -> Response {
        let body = json!({
            "statusCode": self.status.as_u16().to_string(),
            "code": self.code,
            "error": self.error,
            "message": self.message,
        });
        let mut res = (self.status, Json(body)).into_response();
        if self.close {
            res.headers_mut().insert(
                header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
        }
        res
    }
}

impl From<StorageError> for StorageApiError {
    fn from(e: StorageError) -> Self {
        let msg = e.to_string();
        use StatusCode as S;
        match e {
            StorageError::NotFound(_) => Self::no_such_key(),
            StorageError::BucketNotFound(_) => Self::new(
                S::NOT_FOUND,
                "NoSuchBucket",
                "Bucket not found",
                "Bucket not found",
            ),
            StorageError::InvalidPath(_) => {
                Self::new(S::BAD_REQUEST, "InvalidKey", "Invalid Input", msg)
            }
            StorageError::AlreadyExists(_) | StorageError::BucketAlreadyExists(_) => Self::new(
                S::CONFLICT,
                "Duplicate",
                "Duplicate",
                "The resource already exists",
            ),
            StorageError::PathConflict(_) | StorageError::FolderNotEmpty(_) => {
                Self::new(S::CONFLICT, "ResourceConflict", "Conflict", msg)
            }
            StorageError::FileTooLarge { .. } | StorageError::QuotaExceeded { .. } => Self::new(
                S::PAYLOAD_TOO_LARGE,
                "EntityTooLarge",
                "Payload too large",
                msg,
            ),
            StorageError::InvalidType { .. } => Self::new(
                S::UNSUPPORTED_MEDIA_TYPE,
                "InvalidMimeType",
                "invalid_mime_type",
                msg,
            ),
            StorageError::RangeNotSatisfiable { .. } => Self::new(
                S::RANGE_NOT_SATISFIABLE,
                "InvalidRange",
                "invalid_range",
                msg,
            ),
            StorageError::AuthRequired => Self::no_such_key(),
            StorageError::Forbidden(m) => Self::denied(&m),
            StorageError::Internal(cause) => {
                tracing::error!(error = %cause, "internal error");
                Self::new(
                    S::INTERNAL_SERVER_ERROR,
                    "InternalError",
                    "internal",
                    "Internal Server Error",
                )
            }
        }
    }
}

impl From<AuthError> for StorageApiError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Internal(cause) => StorageError::Internal(cause).into(),
            AuthError::ExpiredToken => Self::new(
                StatusCode::BAD_REQUEST,
                "InvalidJWT",
                "Unauthorized",
                "\"exp\" claim timestamp check failed",
            ),
            e => Self::new(
                StatusCode::BAD_REQUEST,
                "InvalidJWT",
                "Unauthorized",
                e.to_string(),
            ),
        }
    }
}

impl From<KeyError> for StorageApiError {
    fn from(e: KeyError) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "InvalidJWT",
            "Unauthorized",
            e.message(),
        )
    }
}

impl From<crate::api::error::ApiError> for StorageApiError {
    fn from(e: crate::api::error::ApiError) -> Self {
        // The extractors' checks (`api::validate`) keep their meaning here.
        let (code, error) = code_for_native(e.status, e.code);
        Self::new(e.status, code, error, e.message)
    }
}

impl From<validate::Invalid> for StorageApiError {
    fn from(e: validate::Invalid) -> Self {
        crate::api::error::ApiError::from(e).into()
    }
}

/// Parses a JSON body: the type's own checks ([`Validate`]), then no NUL in any
/// string or key (`InvalidRequest`), before any value reaches SQL.
fn json_body<T: serde::de::DeserializeOwned + Validate>(body: &[u8]) -> Result<T, StorageApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| StorageApiError::invalid(format!("invalid JSON body: {e}")))?;
    let t = T::deserialize(&v)
        .map_err(|e| StorageApiError::invalid(format!("invalid JSON body: {e}")))?;
    t.validate()?;
    validate::json(&v)?;
    Ok(t)
}

/// The storage API's code (and `error`) for an error that a shared layer
/// answered in Aether's own shape (rate limits, extractors, unknown routes):
/// the storage API's own codes only.
pub fn code_for_native(status: StatusCode, native: &str) -> (&'static str, &'static str) {
    match native {
        validate::CODE_BUCKET => ("InvalidBucketName", "Invalid Input"),
        "storage/invalid-path" => ("InvalidKey", "Invalid Input"),
        "rate-limit/exceeded" => ("SlowDown", "Too Many Requests"),
        _ if status == StatusCode::PAYLOAD_TOO_LARGE => ("EntityTooLarge", "Payload too large"),
        _ if status.is_server_error() => ("InternalError", "internal"),
        _ => ("InvalidRequest", "invalid_request"),
    }
}

/// Who calls: a valid `apikey`, and the bearer token's principal (the key's
/// own when there is no `Authorization`).
pub struct Caller(pub Principal);

impl FromRequestParts<AppState> for Caller {
    type Rejection = StorageApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, StorageApiError> {
        let key = super::request_key(state, parts)?;
        match bearer_token(&parts.headers) {
            None => Ok(Caller(key)),
            Some(t) => Ok(Caller(state.auth.authenticate(t).await?)),
        }
    }
}

fn user_of(p: &Principal) -> Option<Uuid> {
    p.user_id.as_deref().and_then(|u| Uuid::parse_str(u).ok())
}

/// Whose object: a user's (`Some`), or no user's (`None`): the service
/// role's own objects, which count against no quota.
type Owner = Option<Uuid>;

/// The object a caller addresses at a path first: a user's own, the service
/// role's owner-less one; `None` for the anon key.
fn own_owner(p: &Principal) -> Option<Owner> {
    match user_of(p) {
        Some(uid) => Some(Some(uid)),
        None if p.is_service() => Some(None),
        None => None,
    }
}

fn object_path(raw: &str) -> Result<ObjectPath, StorageApiError> {
    Ok(ObjectPath::parse(raw.trim_start_matches('/')).map_err(StorageError::from)?)
}

/// The owner whose file at `path` `viewer` reads: their own (the service
/// role's: the owner-less one), else (service role, or a public bucket) the
/// oldest one there, owner-less ones included.
async fn read_owner(
    state: &AppState,
    viewer: &Principal,
    bucket: &str,
    path: &ObjectPath,
) -> Result<Owner, StorageApiError> {
    if let Some(own) = own_owner(viewer)
        && state.storage.file_at(bucket, own, path).await?.is_some()
    {
        return Ok(own);
    }
    let info = state.storage.bucket(bucket).await?;
    if !(viewer.is_service() || info.public) {
        return Err(StorageApiError::no_such_key());
    }
    state
        .storage
        .owners_at(bucket, path)
        .await?
        .into_iter()
        .next()
        .ok_or_else(StorageApiError::no_such_key)
}

/// The owner a write of `path` goes to: the signed-in user; for the service
/// role, its own owner-less object there if there is one, else the one user
/// with an object there, else (a new path) no user: an owner-less object.
/// Refused (400) when several users have an object there and the service
/// role none.
async fn write_owner(
    state: &AppState,
    caller: &Principal,
    bucket: &str,
    path: &ObjectPath,
) -> Result<Owner, StorageApiError> {
    if let Some(uid) = user_of(caller) {
        return Ok(Some(uid));
    }
    if caller.is_service() {
        return service_owner(state, bucket, path, None).await;
    }
    Err(StorageApiError::denied(
        "new row violates row-level security policy",
    ))
}

/// Whose object at `bucket/path` the service role acts on: its own
/// owner-less one, else the one user's there; with none there, `absent`
/// (`None`: a new owner-less object; or an error). Several users' objects
/// (and no owner-less one) are ambiguous: 400.
async fn service_owner(
    state: &AppState,
    bucket: &str,
    path: &ObjectPath,
    absent: Option<StorageApiError>,
) -> Result<Owner, StorageApiError> {
    let owners = state.storage.owners_at(bucket, path).await?;
    if owners.contains(&None) {
        return Ok(None);
    }
    match owners.as_slice() {
        [] => absent.map_or(Ok(None), Err),
        [one] => Ok(*one),
        _ => Err(StorageApiError::invalid(format!(
            "several users have an object at {bucket}/{path}: act on it with its owner's access token"
        ))),
    }
}

fn bucket_json(b: &crate::storage::BucketRecord) -> Value {
    json!({
        "id": b.id,
        "name": b.name,
        "owner": b.owner_id.map(|o| o.hyphenated().to_string()).unwrap_or_default(),
        "public": b.public,
        "file_size_limit": b.file_size_limit,
        "allowed_mime_types": b.allowed_mime_types,
        "created_at": timestamp(&b.created_at),
        "updated_at": timestamp(&b.updated_at),
    })
}

/// `GET /storage/v1/bucket`.
pub async fn list_buckets(
    State(state): State<AppState>,
    Caller(p): Caller,
) -> Result<Json<Value>, StorageApiError> {
    let buckets = state.storage.list_buckets(&p).await?;
    Ok(Json(Value::Array(
        buckets.iter().map(bucket_json).collect(),
    )))
}

/// `GET /storage/v1/bucket/{id}`.
pub async fn get_bucket(
    State(state): State<AppState>,
    Caller(p): Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Value>, StorageApiError> {
    let buckets = state.storage.list_buckets(&p).await?;
    let b = buckets
        .iter()
        .find(|b| b.id == id)
        .ok_or(StorageError::BucketNotFound(id))?;
    Ok(Json(bucket_json(b)))
}

#[derive(Deserialize)]
pub struct CreateBucket {
    id: Option<String>,
    name: Option<String>,
    #[serde(default)]
    public: Option<bool>,
    file_size_limit: Option<Value>,
    allowed_mime_types: Option<Vec<String>>,
}

impl Validate for CreateBucket {
    /// A new bucket's id follows the rule for `UPLOAD_BUCKET`; its own code
    /// (`InvalidBucketName`), not the path's.
    fn validate(&self) -> Result<(), validate::Invalid> {
        for (field, v) in [("id", &self.id), ("name", &self.name)] {
            if let Some(v) = v {
                validate::bucket(field, v)?;
            }
        }
        let id = self.id.as_ref().or(self.name.as_ref());
        match id {
            Some(id) if crate::config::valid_bucket_id(id) => Ok(()),
            _ => Err(validate::Invalid {
                kind: validate::Kind::Bucket,
                field: "id".into(),
                reason: format!(
                    "bucket id {:?} must be 1-63 of A-Za-z0-9._- starting with a letter or digit",
                    id.map(String::as_str).unwrap_or("")
                ),
            }),
        }
    }
}

/// `1048576`, `"1048576"`, `"1MB"`, `"500 KB"`, `"2GB"`.
fn size_limit(v: &Value) -> Result<Option<u64>, StorageApiError> {
    let bad = || StorageApiError::invalid(format!("file_size_limit {v} is not a size"));
    match v {
        Value::Null => Ok(None),
        Value::Number(n) => n.as_u64().map(Some).ok_or_else(bad),
        Value::String(s) => {
            let s = s.trim().to_ascii_uppercase();
            let digits: String = s.chars().take_while(|c| c.is_ascii_digit()).collect();
            let n: u64 = digits.parse().map_err(|_| bad())?;
            let unit = match s[digits.len()..].trim() {
                "" | "B" => 1,
                "KB" => 1 << 10,
                "MB" => 1 << 20,
                "GB" => 1 << 30,
                _ => return Err(bad()),
            };
            Ok(Some(n.saturating_mul(unit)))
        }
        _ => Err(bad()),
    }
}

/// `POST /storage/v1/bucket`: a signed-in user (the bucket's owner) or the
/// service role may create buckets.
pub async fn create_bucket(
    State(state): State<AppState>,
    Caller(p): Caller,
    body: axum::body::Bytes,
) -> Result<Json<Value>, StorageApiError> {
    let b: CreateBucket = json_body(&body)?;
    if p.role == Role::Anon {
        return Err(StorageApiError::denied(
            "new row violates row-level security policy",
        ));
    }
    let id = b.id.or(b.name).unwrap_or_default();
    let new = NewBucket {
        id: id.clone(),
        public: b.public.unwrap_or(false),
        file_size_limit: match &b.file_size_limit {
            Some(v) => size_limit(v)?,
            None => None,
        },
        allowed_mime_types: b.allowed_mime_types,
    };
    state.storage.create_bucket(user_of(&p), &new).await?;
    Ok(Json(json!({ "name": id })))
}

fn file_json(f: &FileRecord) -> Value {
    let updated = timestamp(&f.updated_at);
    json!({
        "name": f.name,
        "id": f.id.hyphenated().to_string(),
        "updated_at": updated,
        "created_at": timestamp(&f.created_at),
        "last_accessed_at": updated,
        "metadata": {
            "eTag": format!("\"{}\"", f.id.simple()),
            "size": f.size,
            "mimetype": f.mime_type,
            "cacheControl": "max-age=3600",
            "lastModified": updated,
            "contentLength": f.size,
            "httpStatusCode": 200,
        },
        "user_metadata": f.user_metadata,
    })
}

#[derive(Deserialize, Default)]
pub struct SortBy {
    column: Option<String>,
    order: Option<String>,
}

#[derive(Deserialize)]
pub struct ListBody {
    prefix: Option<String>,
    limit: Option<usize>,
    offset: Option<usize>,
    #[serde(rename = "sortBy")]
    sort_by: Option<SortBy>,
    search: Option<String>,
}

impl Validate for ListBody {
    fn validate(&self) -> Result<(), validate::Invalid> {
        match &self.prefix {
            Some(p) => validate::path("prefix", p.trim_matches('/')),
            None => Ok(()),
        }
    }
}

/// `POST /storage/v1/object/list/{bucket}`: the folders (entries with a null
/// `id`) and files directly under `prefix`.
pub async fn list(
    State(state): State<AppState>,
    Caller(p): Caller,
    ApiPath(bucket): ApiPath<String>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, StorageApiError> {
    let b: ListBody = json_body(&body)?;
    state.storage.bucket(&bucket).await?;
    let prefix = b.prefix.unwrap_or_default();
    let folder = ObjectPath::parse_any(prefix.trim_matches('/')).map_err(StorageError::from)?;
    let owners: Vec<Owner> = match (user_of(&p), p.is_service()) {
        (_, true) => state.storage.owners_in(&bucket).await?,
        (Some(uid), false) => vec![Some(uid)],
        (None, false) => Vec::new(),
    };
    // (name, is_folder, created, updated, json)
    let mut folders: Vec<String> = Vec::new();
    let mut files: Vec<FileRecord> = Vec::new();
    for owner in owners {
        match state.storage.list(owner, &bucket, &folder).await {
            Ok(l) => {
                folders.extend(l.folders.into_iter().map(|f| f.name));
                files.extend(l.files);
            }
            Err(StorageError::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    folders.sort();
    folders.dedup();
    let search = b.search.unwrap_or_default().to_lowercase();
    let keep = |name: &str| name.to_lowercase().starts_with(&search);
    struct Entry {
        name: String,
        time: Option<String>,
        json: Value,
    }
    let sort = b.sort_by.unwrap_or_default();
    let column = sort.column.unwrap_or_else(|| "name".into());
    let desc = sort
        .order
        .as_deref()
        .is_some_and(|o| o.eq_ignore_ascii_case("desc"));
    let mut entries: Vec<Entry> = folders
        .into_iter()
        .filter(|n| keep(n))
        .map(|name| Entry {
            json: json!({"name": name, "id": null, "updated_at": null, "created_at": null,
                         "last_accessed_at": null, "metadata": null}),
            name,
            time: None,
        })
        .chain(files.iter().filter(|f| keep(&f.name)).map(|f| Entry {
            name: f.name.clone(),
            time: Some(timestamp(if column == "created_at" {
                &f.created_at
            } else {
                &f.updated_at
            })),
            json: file_json(f),
        }))
        .collect();
    entries.sort_by(|a, b| {
        let ord = match column.as_str() {
            "created_at" | "updated_at" | "last_accessed_at" => {
                // Like PostgreSQL: NULLs (folders) last ascending, first descending.
                match (&a.time, &b.time) {
                    (Some(x), Some(y)) => x.cmp(y),
                    (None, Some(_)) => std::cmp::Ordering::Greater,
                    (Some(_), None) => std::cmp::Ordering::Less,
                    (None, None) => std::cmp::Ordering::Equal,
                }
                .then_with(|| a.name.cmp(&b.name))
            }
            _ => a.name.cmp(&b.name),
        };
        if desc { ord.reverse() } else { ord }
    });
    let out: Vec<Value> = entries
        .into_iter()
        .skip(b.offset.unwrap_or(0))
        .take(b.limit.unwrap_or(100))
        .map(|e| e.json)
        .collect();
    Ok(Json(Value::Array(out)))
}

#[derive(Serialize)]
pub struct UploadAnswer {
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

/// Stores the body of `req` (raw, or the file part of a form) as `owner`'s
/// object at `bucket/path`, under the bucket's own rules (any type unless
/// the bucket lists some), with the custom metadata sent along.
async fn do_upload(
    state: AppState,
    owner: Owner,
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
            match state.storage.begin_upload(owner, source, Some(&info)).await {
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
        let stream = req.into_body().into_data_stream();
        match state.storage.begin_upload(owner, source, Some(&info)).await {
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
            },
        )
        .await?;
    Ok(file)
}

fn upload_answer(bucket: &str, f: &FileRecord) -> Json<UploadAnswer> {
    Json(UploadAnswer {
        key: format!("{bucket}/{}", f.path),
        id: f.id.hyphenated().to_string(),
    })
}

fn upsert_header(headers: &HeaderMap) -> bool {
    headers
        .get("x-upsert")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
}

/// `POST /storage/v1/object/{bucket}/{path}`: raw body or multipart; `x-upsert`.
pub async fn upload(
    State(state): State<AppState>,
    Caller(p): Caller,
    ApiPath((bucket, path)): ApiPath<(String, String)>,
    req: Request,
) -> Result<Json<UploadAnswer>, StorageApiError> {
    let upsert = upsert_header(req.headers());
    let path = object_path(&path)?;
    let owner = write_owner(&state, &p, &bucket, &path).await?;
    let f = do_upload(state, owner, bucket.clone(), path, upsert, req).await?;
    Ok(upload_answer(&bucket, &f))
}

/// `PUT /storage/v1/object/{bucket}/{path}`: replaces the object.
pub async fn update(
    State(state): State<AppState>,
    Caller(p): Caller,
    ApiPath((bucket, path)): ApiPath<(String, String)>,
    req: Request,
) -> Result<Json<UploadAnswer>, StorageApiError> {
    let path = object_path(&path)?;
    let owner = write_owner(&state, &p, &bucket, &path).await?;
    let f = do_upload(state, owner, bucket.clone(), path, true, req).await?;
    Ok(upload_answer(&bucket, &f))
}

async fn serve(
    state: &AppState,
    viewer: &Principal,
    bucket: &str,
    owner: Owner,
    path: &ObjectPath,
    headers: &HeaderMap,
    head_only: bool,
) -> Result<Response, StorageApiError> {
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(ByteRange::parse);
    let read = state
        .storage
        .open(Some(viewer), bucket, owner, path, range)
        .await?;
    // A HEAD is not a download: KingShare owners are told of GETs only.
    if !head_only && read.span.is_none_or(|(a, _)| a == 0) {
        crate::api::kingshare::download_started(state, &read.file);
    }
    read_response(read).map_err(StorageApiError::from)
}

/// `GET /storage/v1/object/{bucket}/{path}` (and `/object/authenticated/…`).
pub async fn get_object(
    State(state): State<AppState>,
    Caller(p): Caller,
    ApiPath((bucket, path)): ApiPath<(String, String)>,
    method: axum::http::Method,
    headers: HeaderMap,
) -> Result<Response, StorageApiError> {
    let path = object_path(&path)?;
    let owner = read_owner(&state, &p, &bucket, &path).await?;
    let head_only = method == axum::http::Method::HEAD;
    serve(&state, &p, &bucket, owner, &path, &headers, head_only).await
}

/// `GET /storage/v1/object/info/{bucket}/{path}` (`info`): Supabase's shape,
/// whose `metadata` is the custom metadata given at upload.
pub async fn info(
    State(state): State<AppState>,
    Caller(p): Caller,
    ApiPath((bucket, path)): ApiPath<(String, String)>,
) -> Result<Json<Value>, StorageApiError> {
    let path = object_path(&path)?;
    let owner = read_owner(&state, &p, &bucket, &path).await?;
    let f = state
        .storage
        .file_at(&bucket, owner, &path)
        .await?
        .ok_or_else(StorageApiError::no_such_key)?;
    Ok(Json(json!({
        "id": f.id.hyphenated().to_string(),
        "name": f.path,
        "version": f.version(),
        "bucket_id": bucket,
        "size": f.size,
        "content_type": f.mime_type,
        "cache_control": "max-age=3600",
        "etag": format!("\"{}\"", f.id.simple()),
        "metadata": f.user_metadata,
        "last_modified": timestamp(&f.updated_at),
        "created_at": timestamp(&f.created_at),
    })))
}

/// `GET /storage/v1/object/public/{bucket}/{path}`: public buckets, no key needed.
pub async fn public_get(
    State(state): State<AppState>,
    ApiPath((bucket, path)): ApiPath<(String, String)>,
    method: axum::http::Method,
    headers: HeaderMap,
) -> Result<Response, StorageApiError> {
    let path = object_path(&path)?;
    let anon = Principal::anonymous();
    if !state.storage.bucket(&bucket).await?.public {
        return Err(StorageApiError::no_such_key());
    }
    let owner = read_owner(&state, &anon, &bucket, &path).await?;
    let head_only = method == axum::http::Method::HEAD;
    serve(&state, &anon, &bucket, owner, &path, &headers, head_only).await
}

/// What a signed-URL token allows: download tokens say [`DOWNLOAD`] (or,
/// made before tokens had a scope, nothing), upload tokens [`UPLOAD`]; each
/// route takes its own kind only.
const DOWNLOAD: &str = "download";
const UPLOAD: &str = "upload";

#[derive(Serialize, Deserialize)]
struct SignedClaims {
    /// `bucket/path`, as in Supabase's signed URLs.
    url: String,
    /// Whose file (paths are per owner in Aether); `None` (`null`): the
    /// owner-less one. Tokens made before owner-less objects existed carry a
    /// user's id and verify as before.
    #[serde(default)]
    owner: Owner,
    #[serde(default)]
    scope: Option<String>,
    iat: i64,
    exp: i64,
}

#[derive(Deserialize)]
pub struct SignBody {
    #[serde(rename = "expiresIn")]
    expires_in: Option<i64>,
}

impl Validate for SignBody {}

/// `POST /storage/v1/object/sign/{bucket}/{path}` → `{"signedURL": "/object/sign/…?token=…"}`.
pub async fn sign(
    State(state): State<AppState>,
    Caller(p): Caller,
    ApiPath((bucket, path)): ApiPath<(String, String)>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, StorageApiError> {
    let b: SignBody = json_body(&body)?;
    let expires_in = expires_in(b.expires_in)?;
    let url = signed_url(&state, &p, &bucket, &path, expires_in).await?;
    // Not percent-encoded: storage-js runs `encodeURI` over it.
    Ok(Json(json!({ "signedURL": url })))
}

/// `expiresIn` (default 60 s), which must be positive.
fn expires_in(v: Option<i64>) -> Result<i64, StorageApiError> {
    match v.unwrap_or(60) {
        s if s > 0 => Ok(s),
        _ => Err(StorageApiError::invalid(
            "expiresIn must be a positive number of seconds",
        )),
    }
}

/// `/object/sign/{bucket}/{path}?token=…` for the object `viewer` reads there.
async fn signed_url(
    state: &AppState,
    viewer: &Principal,
    bucket: &str,
    raw: &str,
    expires_in: i64,
) -> Result<String, StorageApiError> {
    let path = object_path(raw)?;
    let owner = read_owner(state, viewer, bucket, &path).await?;
    let now = chrono::Utc::now().timestamp();
    let url = format!("{bucket}/{path}");
    let token = state.jwt.sign_json(&SignedClaims {
        url: url.clone(),
        owner,
        scope: Some(DOWNLOAD.into()),
        iat: now,
        exp: now.saturating_add(expires_in),
    });
    Ok(format!("/object/sign/{url}?token={token}"))
}

fn bad_signature(m: &str) -> StorageApiError {
    StorageApiError::new(
        StatusCode::BAD_REQUEST,
        "InvalidSignature",
        "InvalidSignature",
        m,
    )
}

/// The claims of the `token` query parameter: signed by us, not expired.
fn verify_signed<T: serde::de::DeserializeOwned>(
    state: &AppState,
    uri: &axum::http::Uri,
) -> Result<T, StorageApiError> {
    let token = query_param(uri.query().unwrap_or(""), "token").unwrap_or_default();
    state.jwt.verify_json(&token).map_err(|e| match e {
        crate::auth::TokenError::Expired => bad_signature("jwt expired"),
        crate::auth::TokenError::Invalid(_) => bad_signature("The signature is invalid"),
    })
}

/// `GET /storage/v1/object/sign/{bucket}/{path}?token=…`: no key needed.
pub async fn signed_get(
    State(state): State<AppState>,
    ApiPath((bucket, path)): ApiPath<(String, String)>,
    uri: axum::http::Uri,
    method: axum::http::Method,
    headers: HeaderMap,
) -> Result<Response, StorageApiError> {
    let claims: SignedClaims = verify_signed(&state, &uri)?;
    if claims.scope.as_deref().is_some_and(|s| s != DOWNLOAD) {
        return Err(bad_signature("The token is not for downloads"));
    }
    let path = object_path(&path)?;
    if claims.url != format!("{bucket}/{path}") {
        return Err(bad_signature("The URL does not match the signature"));
    }
    let service = Principal {
        expires_at: Some(claims.exp),
        ..Principal::service()
    };
    let head_only = method == axum::http::Method::HEAD;
    serve(
        &state,
        &service,
        &bucket,
        claims.owner,
        &path,
        &headers,
        head_only,
    )
    .await
}

#[derive(Deserialize)]
pub struct RemoveBody {
    prefixes: Vec<String>,
}

impl Validate for RemoveBody {}

/// `DELETE /storage/v1/object/{bucket}` with `{"prefixes": [paths]}`: removes
/// the caller's objects at those paths (any owner's for the service role) and
/// returns them; folders left empty go too (Supabase folders are implicit).
pub async fn remove(
    State(state): State<AppState>,
    Caller(p): Caller,
    ApiPath(bucket): ApiPath<String>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, StorageApiError> {
    let b: RemoveBody = json_body(&body)?;
    state.storage.bucket(&bucket).await?;
    let mut removed = Vec::new();
    for raw in &b.prefixes {
        let Ok(path) = object_path(raw) else { continue };
        let owners: Vec<Owner> = match (user_of(&p), p.is_service()) {
            (_, true) => state.storage.owners_at(&bucket, &path).await?,
            (Some(uid), false) => vec![Some(uid)],
            (None, false) => Vec::new(),
        };
        for owner in owners {
            let Some(f) = state.storage.file_at(&bucket, owner, &path).await? else {
                continue;
            };
            match state.storage.delete(owner, &bucket, &path).await {
                Ok(Deleted::File) => {
                    let mut v = file_json(&f);
                    v["name"] = json!(f.path);
                    v["bucket_id"] = json!(bucket);
                    v["owner"] = json!(owner.map(|o| o.hyphenated().to_string()));
                    removed.push(v);
                    prune_folders(&state, owner, &bucket, &path).await;
                }
                Ok(Deleted::Folder) | Err(StorageError::NotFound(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(Json(Value::Array(removed)))
}

/// Removes the now-empty folders above a deleted object, deepest first.
async fn prune_folders(state: &AppState, owner: Owner, bucket: &str, path: &ObjectPath) {
    let mut dir = path.parent();
    while !dir.is_root() {
        if state.storage.delete(owner, bucket, &dir).await.is_err() {
            break;
        }
        dir = dir.parent();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_limits() {
        assert_eq!(size_limit(&json!(10)).unwrap(), Some(10));
        assert_eq!(size_limit(&json!("1MB")).unwrap(), Some(1 << 20));
        assert_eq!(size_limit(&json!("500 kb")).unwrap(), Some(500 << 10));
        assert!(size_limit(&json!("lots")).is_err());
        assert_eq!(size_limit(&Value::Null).unwrap(), None);
    }

    #[test]
    fn cursors_round_trip_and_refuse_junk() {
        let c = FileCursor {
            time: chrono::DateTime::from_timestamp_micros(1_700_000_000_123_456),
            path: "a/b ü.txt".into(),
            id: Uuid::new_v4(),
        };
        assert_eq!(decode_cursor(&encode_cursor(&c)).unwrap(), c);
        for junk in ["", "nope", "e30", "!!!"] {
            assert!(decode_cursor(junk).is_err(), "{junk:?}");
        }
    }

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
    fn signed_tokens_name_an_owner_or_none() {
        // A token made before owner-less objects existed still reads as its user's.
        let uid = Uuid::new_v4();
        let old: SignedClaims = serde_json::from_value(
            json!({"url": "b/p", "owner": uid, "scope": "download", "iat": 1, "exp": 2}),
        )
        .unwrap();
        assert_eq!(old.owner, Some(uid));
        let none = SignedClaims {
            url: "b/p".into(),
            owner: None,
            scope: Some(DOWNLOAD.into()),
            iat: 1,
            exp: 2,
        };
        let back: SignedClaims =
            serde_json::from_value(serde_json::to_value(&none).unwrap()).unwrap();
        assert_eq!(back.owner, None);
        let up: UploadClaims = serde_json::from_value(
            json!({"url": "b/p", "owner": null, "upsert": false, "scope": "upload", "iat": 1, "exp": 2}),
        )
        .unwrap();
        assert_eq!(up.owner, None);
    }

    #[test]
    fn list_v2_sorts() {
        assert_eq!(sort_v2(None).unwrap(), FileSort::default());
        let s = sort_v2(Some(SortBy {
            column: Some("created_at".into()),
            order: Some("DESC".into()),
        }))
        .unwrap();
        assert_eq!((s.column, s.desc), (SortColumn::CreatedAt, true));
        assert!(
            sort_v2(Some(SortBy {
                column: Some("size".into()),
                order: None
            }))
            .is_err()
        );
    }
}

#[derive(Deserialize)]
pub struct UpdateBucket {
    public: Option<bool>,
    /// Absent: unchanged; `null`: no limit.
    #[serde(default, deserialize_with = "present")]
    file_size_limit: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    allowed_mime_types: Option<Value>,
}

/// Tells a field sent as `null` (`Some(Null)`) from one not sent (`None`).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

impl Validate for UpdateBucket {}

/// `PUT /storage/v1/bucket/{id}` (`updateBucket`): its owner or the service role.
pub async fn update_bucket(
    State(state): State<AppState>,
    Caller(p): Caller,
    ApiPath(id): ApiPath<String>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, StorageApiError> {
    let b: UpdateBucket = json_body(&body)?;
    let limit = match &b.file_size_limit {
        None => None,
        Some(v) => Some(size_limit(v)?),
    };
    let types = match b.allowed_mime_types {
        None => None,
        Some(Value::Null) => Some(None),
        Some(v) => Some(Some(serde_json::from_value::<Vec<String>>(v).map_err(
            |_| StorageApiError::invalid("allowed_mime_types must be a list of MIME types"),
        )?)),
    };
    state
        .storage
        .update_bucket(&p, &id, b.public, limit, types)
        .await?;
    Ok(Json(json!({ "message": "Successfully updated" })))
}

/// `DELETE /storage/v1/bucket/{id}` (`deleteBucket`): an empty bucket.
pub async fn delete_bucket(
    State(state): State<AppState>,
    Caller(p): Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Value>, StorageApiError> {
    state.storage.delete_bucket(&p, &id).await?;
    Ok(Json(json!({ "message": "Successfully deleted" })))
}

/// `POST /storage/v1/bucket/{id}/empty` (`emptyBucket`).
pub async fn empty_bucket(
    State(state): State<AppState>,
    Caller(p): Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Value>, StorageApiError> {
    state.storage.empty_bucket(&p, &id).await?;
    Ok(Json(json!({ "message": "Successfully emptied" })))
}

#[derive(Deserialize)]
pub struct SignManyBody {
    #[serde(rename = "expiresIn")]
    expires_in: Option<i64>,
    paths: Vec<String>,
}

impl Validate for SignManyBody {}

/// `POST /storage/v1/object/sign/{bucket}` (`createSignedUrls`): one entry per
/// path, with its own error when that path cannot be signed.
pub async fn sign_many(
    State(state): State<AppState>,
    Caller(p): Caller,
    ApiPath(bucket): ApiPath<String>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, StorageApiError> {
    let b: SignManyBody = json_body(&body)?;
    let expires_in = expires_in(b.expires_in)?;
    if b.paths.len() > 1000 {
        return Err(StorageApiError::invalid("at most 1000 paths at once"));
    }
    let mut out = Vec::with_capacity(b.paths.len());
    for raw in b.paths {
        let signed = signed_url(&state, &p, &bucket, &raw, expires_in).await;
        out.push(match signed {
            Ok(u) => json!({"error": null, "path": raw, "signedURL": u}),
            Err(e) => json!({"error": e.message, "path": raw, "signedURL": null}),
        });
    }
    Ok(Json(Value::Array(out)))
}

#[derive(Deserialize)]
pub struct MoveBody {
    #[serde(rename = "bucketId")]
    bucket_id: String,
    #[serde(rename = "sourceKey")]
    source_key: String,
    #[serde(rename = "destinationKey")]
    destination_key: String,
    #[serde(rename = "destinationBucket")]
    destination_bucket: Option<String>,
}

impl Validate for MoveBody {
    fn validate(&self) -> Result<(), validate::Invalid> {
        validate::bucket("bucketId", &self.bucket_id)?;
        if let Some(b) = &self.destination_bucket {
            validate::bucket("destinationBucket", b)?;
        }
        Ok(())
    }
}

/// A bucket and a path in it.
type Place<'a> = (&'a str, ObjectPath);

impl MoveBody {
    /// Source and destination.
    fn ends(&self) -> Result<(Place<'_>, Place<'_>), StorageApiError> {
        let to_bucket = self
            .destination_bucket
            .as_deref()
            .unwrap_or(&self.bucket_id);
        Ok((
            (&self.bucket_id, object_path(&self.source_key)?),
            (to_bucket, object_path(&self.destination_key)?),
        ))
    }
}

/// Whose object at `bucket/path` a move or copy takes: the signed-in user's
/// own; for the service role, its owner-less one there, else the one user's
/// (refused when several users have an object at that path and the service
/// role none: Aether's paths are per owner).
async fn source_owner(
    state: &AppState,
    caller: &Principal,
    bucket: &str,
    path: &ObjectPath,
) -> Result<Owner, StorageApiError> {
    if let Some(uid) = user_of(caller) {
        return Ok(Some(uid));
    }
    if !caller.is_service() {
        return Err(StorageApiError::no_such_key());
    }
    state.storage.bucket(bucket).await?;
    service_owner(state, bucket, path, Some(StorageApiError::no_such_key())).await
}

/// `POST /storage/v1/object/move` (`move`): renames the caller's object (the
/// service role: its owner's), into another bucket with `destinationBucket`.
/// The row keeps its id, owner and bytes; a taken destination is refused (409).
pub async fn move_object(
    State(state): State<AppState>,
    Caller(p): Caller,
    body: axum::body::Bytes,
) -> Result<Json<Value>, StorageApiError> {
    let b: MoveBody = json_body(&body)?;
    let ((from_bucket, from), (to_bucket, to)) = b.ends()?;
    let owner = source_owner(&state, &p, from_bucket, &from).await?;
    let f = state
        .storage
        .move_file(owner, from_bucket, &from, to_bucket, &to)
        .await?;
    if (from_bucket, &from) != (to_bucket, &to) {
        prune_folders(&state, owner, from_bucket, &from).await;
    }
    Ok(Json(json!({
        "message": "Successfully moved",
        "Id": f.id.hyphenated().to_string(),
        "Key": f.path,
    })))
}

/// `POST /storage/v1/object/copy` (`copy`): a new object for the same owner,
/// with a copy of the bytes and the custom metadata; `x-upsert: true`
/// replaces a destination object. Counts against the owner's quota.
pub async fn copy_object(
    State(state): State<AppState>,
    Caller(p): Caller,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<Value>, StorageApiError> {
    let b: MoveBody = json_body(&body)?;
    let ((from_bucket, from), (to_bucket, to)) = b.ends()?;
    let owner = source_owner(&state, &p, from_bucket, &from).await?;
    let f = state
        .storage
        .copy_file(
            owner,
            from_bucket,
            &from,
            to_bucket,
            &to,
            upsert_header(&headers),
        )
        .await?;
    Ok(Json(json!({
        "Id": f.id.hyphenated().to_string(),
        "Key": format!("{to_bucket}/{}", f.path),
        "id": f.id.hyphenated().to_string(),
        "name": f.path,
        "bucket_id": to_bucket,
    })))
}

/// How long a signed upload URL lasts (Supabase's default).
const SIGNED_UPLOAD_SECS: i64 = 2 * 60 * 60;

#[derive(Serialize, Deserialize)]
struct UploadClaims {
    /// `bucket/path`: the one object this token may write.
    url: String,
    /// Who signed: the upload is theirs (`None`: the service role's, an
    /// owner-less object).
    #[serde(default)]
    owner: Owner,
    /// Whether it may replace an object there.
    upsert: bool,
    /// [`UPLOAD`].
    scope: String,
    iat: i64,
    exp: i64,
}

/// `POST /storage/v1/object/upload/sign/{bucket}/{path}` (`createSignedUploadUrl`,
/// `x-upsert` for `{upsert: true}`) → `{"url": "/object/upload/sign/…?token=…",
/// "token"}`: anyone holding the URL may upload that one object, as the
/// signer, for two hours.
pub async fn sign_upload(
    State(state): State<AppState>,
    Caller(p): Caller,
    ApiPath((bucket, path)): ApiPath<(String, String)>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<Value>, StorageApiError> {
    // storage-js sends `{}`; nothing in it is used.
    if !body.iter().all(u8::is_ascii_whitespace) {
        let v: Value = serde_json::from_slice(&body)
            .map_err(|e| StorageApiError::invalid(format!("invalid JSON body: {e}")))?;
        validate::json(&v)?;
    }
    let path = object_path(&path)?;
    let owner = write_owner(&state, &p, &bucket, &path).await?;
    state.storage.bucket(&bucket).await?;
    let upsert = upsert_header(&headers);
    if !upsert
        && state
            .storage
            .file_at(&bucket, owner, &path)
            .await?
            .is_some()
    {
        return Err(StorageError::AlreadyExists(path.to_string()).into());
    }
    let now = chrono::Utc::now().timestamp();
    let url = format!("{bucket}/{path}");
    let token = state.jwt.sign_json(&UploadClaims {
        url: url.clone(),
        owner,
        upsert,
        scope: UPLOAD.into(),
        iat: now,
        exp: now.saturating_add(SIGNED_UPLOAD_SECS),
    });
    // Not percent-encoded, as for `createSignedUrl`.
    Ok(Json(json!({
        "url": format!("/object/upload/sign/{url}?token={token}"),
        "token": token,
    })))
}

/// `PUT /storage/v1/object/upload/sign/{bucket}/{path}?token=…`
/// (`uploadToSignedUrl`): no key needed; the token names the object, its
/// owner and whether it may be replaced.
pub async fn upload_signed(
    State(state): State<AppState>,
    ApiPath((bucket, path)): ApiPath<(String, String)>,
    uri: axum::http::Uri,
    req: Request,
) -> Result<Json<UploadAnswer>, StorageApiError> {
    let claims: UploadClaims = verify_signed(&state, &uri)?;
    if claims.scope != UPLOAD {
        return Err(bad_signature("The token is not for uploads"));
    }
    let path = object_path(&path)?;
    if claims.url != format!("{bucket}/{path}") {
        return Err(bad_signature("The URL does not match the signature"));
    }
    let f = do_upload(
        state,
        claims.owner,
        bucket.clone(),
        path,
        claims.upsert,
        req,
    )
    .await?;
    Ok(upload_answer(&bucket, &f))
}

#[derive(Deserialize)]
pub struct ListV2Body {
    prefix: Option<String>,
    cursor: Option<String>,
    limit: Option<i64>,
    with_delimiter: Option<bool>,
    #[serde(rename = "sortBy")]
    sort_by: Option<SortBy>,
}

impl Validate for ListV2Body {
    fn validate(&self) -> Result<(), validate::Invalid> {
        let too_long = |field: &str, max: usize| validate::Invalid {
            kind: validate::Kind::Text,
            field: field.into(),
            reason: format!("longer than {max} bytes"),
        };
        if self
            .prefix
            .as_ref()
            .is_some_and(|p| p.len() > MAX_PATH_BYTES)
        {
            return Err(too_long("prefix", MAX_PATH_BYTES));
        }
        if self
            .cursor
            .as_ref()
            .is_some_and(|c| c.len() > 4 * MAX_PATH_BYTES)
        {
            return Err(too_long("cursor", 4 * MAX_PATH_BYTES));
        }
        Ok(())
    }
}

/// A list-v2 cursor as sent: base64url of `{"t": µs since the epoch (time
/// sorts), "p": path, "i": id}` of the last entry of the page.
#[derive(Serialize, Deserialize)]
struct CursorText {
    t: Option<i64>,
    p: String,
    i: Uuid,
}

fn encode_cursor(c: &FileCursor) -> String {
    use base64::Engine as _;
    let text = CursorText {
        t: c.time.map(|t| t.timestamp_micros()),
        p: c.path.clone(),
        i: c.id,
    };
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(serde_json::to_vec(&text).unwrap_or_default())
}

fn decode_cursor(s: &str) -> Result<FileCursor, StorageApiError> {
    use base64::Engine as _;
    let bad = || StorageApiError::invalid("cursor is not one this server gave");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s.trim())
        .map_err(|_| bad())?;
    let c: CursorText = serde_json::from_slice(&bytes).map_err(|_| bad())?;
    let time = match c.t {
        Some(t) => Some(chrono::DateTime::from_timestamp_micros(t).ok_or_else(bad)?),
        None => None,
    };
    Ok(FileCursor {
        time,
        path: c.p,
        id: c.i,
    })
}

fn sort_v2(s: Option<SortBy>) -> Result<FileSort, StorageApiError> {
    let s = s.unwrap_or_default();
    let column = match s.column.as_deref().unwrap_or("name") {
        "name" => SortColumn::Name,
        "created_at" => SortColumn::CreatedAt,
        "updated_at" => SortColumn::UpdatedAt,
        c => {
            return Err(StorageApiError::invalid(format!(
                "sortBy.column {c:?} is not name, created_at or updated_at"
            )));
        }
    };
    let desc = match s.order.as_deref().map(str::to_ascii_lowercase).as_deref() {
        None | Some("asc") => false,
        Some("desc") => true,
        Some(o) => {
            return Err(StorageApiError::invalid(format!(
                "sortBy.order {o:?} is not asc or desc"
            )));
        }
    };
    Ok(FileSort { column, desc })
}

/// One entry of a list-v2 page, with its place in the order.
struct V2Entry {
    key: FileCursor,
    folder: bool,
    json: Value,
}

fn v2_object(f: &FileRecord, sort: FileSort) -> V2Entry {
    let mut json = file_json(f);
    json["name"] = json!(f.path);
    json["key"] = json!(f.path);
    V2Entry {
        key: FileCursor {
            time: match sort.column {
                SortColumn::Name => None,
                SortColumn::CreatedAt => Some(f.created_at),
                SortColumn::UpdatedAt => Some(f.updated_at),
            },
            path: f.path.clone(),
            id: f.id,
        },
        folder: false,
        json,
    }
}

/// `(time, path, id)`, folders (no time) first when sorting by time.
fn v2_order(a: &FileCursor, b: &FileCursor) -> std::cmp::Ordering {
    (a.time, &a.path, a.id).cmp(&(b.time, &b.path, b.id))
}

/// `POST /storage/v1/object/list-v2/{bucket}` (`listV2`): `{prefix, cursor,
/// limit, with_delimiter, sortBy}` → `{hasNext, nextCursor, folders, objects}`.
/// Names are full paths (folders end in `/`); `prefix` is a string prefix.
/// Flat (every object under the prefix) unless `with_delimiter`, which lists
/// one level, as `list` does. Pages of at most 1,000.
pub async fn list_v2(
    State(state): State<AppState>,
    Caller(p): Caller,
    ApiPath(bucket): ApiPath<String>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, StorageApiError> {
    let b: ListV2Body = json_body(&body)?;
    state.storage.bucket(&bucket).await?;
    let limit = usize::try_from(b.limit.unwrap_or(1000).clamp(1, 1000)).unwrap_or(1000);
    let sort = sort_v2(b.sort_by)?;
    let after = b.cursor.as_deref().map(decode_cursor).transpose()?;
    let prefix = b.prefix.unwrap_or_default();
    let owners: Option<Vec<Uuid>> = match (user_of(&p), p.is_service()) {
        (_, true) => None,
        (Some(uid), false) => Some(vec![uid]),
        (None, false) => Some(Vec::new()),
    };
    let mut entries: Vec<V2Entry> = if b.with_delimiter.unwrap_or(false) {
        // One level: the folder the prefix is in, through the same listing as
        // `list`, keeping the names that start with the prefix.
        let dir_text = prefix.rsplit_once('/').map_or("", |(d, _)| d);
        let dir = ObjectPath::parse_any(dir_text).map_err(StorageError::from)?;
        let base = if dir.is_root() {
            String::new()
        } else {
            format!("{dir}/")
        };
        let owners: Vec<Owner> = match owners {
            Some(o) => o.into_iter().map(Some).collect(),
            None => state.storage.owners_in(&bucket).await?,
        };
        let mut folders: Vec<String> = Vec::new();
        let mut out = Vec::new();
        for owner in owners {
            match state.storage.list(owner, &bucket, &dir).await {
                Ok(l) => {
                    folders.extend(l.folders.into_iter().map(|f| format!("{base}{}/", f.name)));
                    out.extend(
                        l.files
                            .iter()
                            .filter(|f| f.path.starts_with(&prefix))
                            .map(|f| v2_object(f, sort)),
                    );
                }
                Err(StorageError::NotFound(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        folders.sort();
        folders.dedup();
        out.extend(
            folders
                .into_iter()
                .filter(|f| f.starts_with(&prefix))
                .map(|name| V2Entry {
                    key: FileCursor {
                        time: None,
                        path: name.clone(),
                        id: Uuid::nil(),
                    },
                    folder: true,
                    json: json!({ "name": name, "key": name }),
                }),
        );
        out.sort_by(|a, b| {
            let o = v2_order(&a.key, &b.key);
            if sort.desc { o.reverse() } else { o }
        });
        if let Some(c) = &after {
            out.retain(|e| {
                let o = v2_order(&e.key, c);
                if sort.desc { o.is_lt() } else { o.is_gt() }
            });
        }
        out.truncate(limit + 1);
        out
    } else {
        state
            .storage
            .files_under(
                &bucket,
                owners.as_deref(),
                &prefix,
                sort,
                after.as_ref(),
                limit + 1,
            )
            .await?
            .iter()
            .map(|f| v2_object(f, sort))
            .collect()
    };
    let has_next = entries.len() > limit;
    entries.truncate(limit);
    let next = if has_next {
        entries.last().map(|e| encode_cursor(&e.key))
    } else {
        None
    };
    let (folders, objects): (Vec<V2Entry>, Vec<V2Entry>) =
        entries.into_iter().partition(|e| e.folder);
    let mut out = json!({
        "hasNext": has_next,
        "folders": folders.into_iter().map(|e| e.json).collect::<Vec<_>>(),
        "objects": objects.into_iter().map(|e| e.json).collect::<Vec<_>>(),
    });
    if let Some(c) = next {
        out["nextCursor"] = json!(c);
    }
    Ok(Json(out))
}
