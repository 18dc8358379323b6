//! Listing a bucket's objects: `list` (one folder) and `listV2` (pages
//! with cursors).

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use uuid::Uuid;

use super::errors::StorageApiError;
use super::json_body;
use super::owners::{Caller, actor_of};
use crate::AppState;
use crate::auth::timestamp;
use crate::extract::ApiPath;
use crate::validate::{self, Validate};
use aether_storage::path::MAX_PATH_BYTES;
use aether_storage::{
    FileCursor, FileRecord, FileSort, ListScope, ObjectPath, SortColumn, StorageError,
};

pub(super) fn file_json(f: &FileRecord) -> Value {
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
            "cacheControl": f.cache_control.as_deref().unwrap_or("max-age=3600"),
            "lastModified": updated,
            "contentLength": f.size,
            "httpStatusCode": 200,
        },
        "user_metadata": f.user_metadata,
    })
}

#[derive(Deserialize, Default)]
pub(crate) struct SortBy {
    column: Option<String>,
    order: Option<String>,
}

#[derive(Deserialize)]
pub(crate) struct ListBody {
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

/// Whose objects a caller lists: what they may read (the anon key: none).
fn lister(p: &aether_auth::Principal) -> Option<ListScope> {
    actor_of(p).map(ListScope::Readable)
}

/// `POST /storage/v1/object/list/{bucket}`: the folders (entries with a null
/// `id`) and files directly under `prefix`.
pub(crate) async fn list(
    State(state): State<AppState>,
    Caller(p): Caller,
    ApiPath(bucket): ApiPath<String>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, StorageApiError> {
    let b: ListBody = json_body(&body)?;
    state.storage.bucket(&bucket).await?;
    let prefix = b.prefix.unwrap_or_default();
    let folder = ObjectPath::parse_any(prefix.trim_matches('/')).map_err(StorageError::from)?;
    let mut folders: Vec<String> = Vec::new();
    let mut files: Vec<FileRecord> = Vec::new();
    if let Some(scope) = lister(&p) {
        match state.storage.list(&bucket, &folder, scope).await {
            Ok(l) => {
                folders.extend(l.folders.into_iter().map(|f| f.name));
                folders.extend(l.homes);
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

#[derive(Deserialize)]
pub(crate) struct ListV2Body {
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
    // PostgreSQL text cannot hold NUL: refused here, not a 500 there.
    if c.p.contains('\0') {
        return Err(bad());
    }
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
pub(crate) async fn list_v2(
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
        let mut folders: Vec<String> = Vec::new();
        let mut out = Vec::new();
        if let Some(scope) = lister(&p) {
            match state.storage.list(&bucket, &dir, scope).await {
                Ok(l) => {
                    folders.extend(l.folders.into_iter().map(|f| format!("{base}{}/", f.name)));
                    folders.extend(l.homes.into_iter().map(|h| format!("{h}/")));
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
        let Some(scope) = lister(&p) else {
            return Ok(Json(
                json!({"hasNext": false, "folders": [], "objects": []}),
            ));
        };
        state
            .storage
            .files_under(&bucket, scope, &prefix, sort, after.as_ref(), limit + 1)
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

#[cfg(test)]
mod tests {
    use super::*;

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
        // A path PostgreSQL cannot hold is refused, not sent to it.
        let nul = FileCursor {
            path: "a\0b".into(),
            ..c
        };
        assert!(decode_cursor(&encode_cursor(&nul)).is_err());
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
