//! `/storage/v1`: the Supabase storage API over [`crate::storage::StorageService`].
//!
//! Aether's paths are per owner; Supabase's are per bucket. The facade writes
//! under the caller's own user id, and resolves a read of `bucket/path` to the
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
use crate::storage::{
    ByteRange, Deleted, FileRecord, NewBucket, ObjectPath, PendingUpload, PumpError, StorageError,
    UploadSource, UploadTarget,
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

fn object_path(raw: &str) -> Result<ObjectPath, StorageApiError> {
    Ok(ObjectPath::parse(raw.trim_start_matches('/')).map_err(StorageError::from)?)
}

/// The owner whose file at `path` `viewer` reads: their own, else (service
/// role, or a public bucket) the oldest one there.
async fn read_owner(
    state: &AppState,
    viewer: &Principal,
    bucket: &str,
    path: &ObjectPath,
) -> Result<Uuid, StorageApiError> {
    if let Some(uid) = user_of(viewer)
        && state.storage.file_at(bucket, uid, path).await?.is_some()
    {
        return Ok(uid);
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
/// role, the one owner already at that path.
async fn write_owner(
    state: &AppState,
    caller: &Principal,
    bucket: &str,
    path: &ObjectPath,
) -> Result<Uuid, StorageApiError> {
    if let Some(uid) = user_of(caller) {
        return Ok(uid);
    }
    if caller.is_service() {
        let owners = state.storage.owners_at(bucket, path).await?;
        if let [one] = owners.as_slice() {
            return Ok(*one);
        }
        return Err(StorageApiError::invalid(
            "Aether stores every object under a user: upload new objects with a user's access token",
        ));
    }
    Err(StorageApiError::denied(
        "new row violates row-level security policy",
    ))
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
    let owners = match (user_of(&p), p.is_service()) {
        (_, true) => state.storage.owners_in(&bucket).await?,
        (Some(uid), false) => vec![uid],
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

async fn do_upload(
    state: AppState,
    p: Principal,
    bucket: String,
    raw_path: String,
    upsert: bool,
    req: Request,
) -> Result<Json<UploadAnswer>, StorageApiError> {
    let path = object_path(&raw_path)?;
    let owner = write_owner(&state, &p, &bucket, &path).await?;
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
                bucket: bucket.clone(),
                path: path.clone(),
                upsert,
                id: None,
            },
        )
        .await?;
    Ok(Json(UploadAnswer {
        key: format!("{bucket}/{path}"),
        id: file.id.hyphenated().to_string(),
    }))
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
    do_upload(state, p, bucket, path, upsert, req).await
}

/// `PUT /storage/v1/object/{bucket}/{path}`: replaces the object.
pub async fn update(
    State(state): State<AppState>,
    Caller(p): Caller,
    ApiPath((bucket, path)): ApiPath<(String, String)>,
    req: Request,
) -> Result<Json<UploadAnswer>, StorageApiError> {
    do_upload(state, p, bucket, path, true, req).await
}

async fn serve(
    state: &AppState,
    viewer: &Principal,
    bucket: &str,
    owner: Uuid,
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

/// `GET /storage/v1/object/info/{bucket}/{path}`.
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
    let mut v = file_json(&f);
    v["bucket_id"] = json!(bucket);
    v["name"] = json!(f.path);
    v["size"] = json!(f.size);
    v["content_type"] = json!(f.mime_type);
    v["last_modified"] = v["updated_at"].clone();
    v["etag"] = v["metadata"]["eTag"].clone();
    Ok(Json(v))
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

#[derive(Serialize, Deserialize)]
struct SignedClaims {
    /// `bucket/path`, as in Supabase's signed URLs.
    url: String,
    /// Whose file (paths are per owner in Aether).
    owner: Uuid,
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
        iat: now,
        exp: now.saturating_add(expires_in),
    });
    Ok(format!("/object/sign/{url}?token={token}"))
}

/// `GET /storage/v1/object/sign/{bucket}/{path}?token=…`: no key needed.
pub async fn signed_get(
    State(state): State<AppState>,
    ApiPath((bucket, path)): ApiPath<(String, String)>,
    uri: axum::http::Uri,
    method: axum::http::Method,
    headers: HeaderMap,
) -> Result<Response, StorageApiError> {
    let token = query_param(uri.query().unwrap_or(""), "token").unwrap_or_default();
    let invalid = |m: &str| {
        StorageApiError::new(
            StatusCode::BAD_REQUEST,
            "InvalidSignature",
            "InvalidSignature",
            m,
        )
    };
    let claims: SignedClaims = state.jwt.verify_json(&token).map_err(|e| match e {
        crate::auth::TokenError::Expired => invalid("jwt expired"),
        crate::auth::TokenError::Invalid(_) => invalid("The signature is invalid"),
    })?;
    let path = object_path(&path)?;
    if claims.url != format!("{bucket}/{path}") {
        return Err(invalid("The URL does not match the signature"));
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
        let owners = match (user_of(&p), p.is_service()) {
            (_, true) => state.storage.owners_at(&bucket, &path).await?,
            (Some(uid), false) => vec![uid],
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
                    v["owner"] = json!(owner.hyphenated().to_string());
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
async fn prune_folders(state: &AppState, owner: Uuid, bucket: &str, path: &ObjectPath) {
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
