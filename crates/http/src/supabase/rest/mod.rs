//! `/rest/v1`: the PostgREST subset supabase-js's query builder uses.
//!
//! PostgreSQL decides who sees what, as with Supabase: each request runs in one
//! transaction as the role its token names (`anon`, `authenticated`,
//! `service_role`, see migrations/0009_rest_roles.sql) with the token's claims in
//! `request.jwt.claims`, so `auth.uid()` and RLS policies written for Supabase
//! work unchanged. Unlike Supabase, nothing is granted on a new table: a DBA
//! grants what the API should expose. Errors are PostgREST's body
//! `{code, message, details, hint}` with PostgreSQL's SQLSTATE.
//!
//! Here: table reads and writes. `query.rs` parses the query string, `sql.rs`
//! plans the statement, `schema.rs` and `ddl.rs` know the exposed schemas,
//! `caller.rs` runs a request as its role, `rpc.rs` calls functions,
//! `openapi.rs` describes the tables, `errors.rs` answers errors.

mod caller;
mod ddl;
mod errors;
mod openapi;
mod query;
mod rpc;
mod schema;
mod sql;

use axum::body::Bytes;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::{api_key_of, check_api_key};
use crate::AppState;
use crate::extract::bearer_token;
use aether_auth::{Principal, Role};
use caller::RestCaller;
use caller::{as_caller, as_caller_then};
pub use ddl::listen_for_ddl;
use ddl::{reload, table};
use errors::RestError;
use errors::unavailable;
use openapi::openapi;
use rpc::rpc;
pub(crate) use schema::SchemaCache;
use sql::{Conflict, PlanError, Sql, Text};

/// The most rows one read answers (as Supabase's default "max rows"): a
/// response is built whole, so an unbounded `select` on a large table would be
/// unbounded memory. `Content-Range` with `Prefer: count=exact` says how many
/// there are; `offset`/`Range` page through them.
const MAX_ROWS: u64 = 1000;

/// Statements of one request may run this long.
const STATEMENT_TIMEOUT: &str = "8s";

/// `Prefer:` as PostgREST reads it.
#[derive(Debug, Default)]
struct Prefer {
    count: bool,
    /// `count=planned` (the planner's estimate) or `count=estimated` (exact
    /// up to `MAX_ROWS`, the estimate beyond), as PostgREST counts.
    count_kind: CountKind,
    representation: bool,
    merge: bool,
    ignore: bool,
    /// `tx=rollback`.
    rollback: bool,
    /// `missing=default`: a key an inserted row lacks takes the column's
    /// default, not NULL.
    missing_default: bool,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum CountKind {
    #[default]
    Exact,
    Planned,
    Estimated,
}

/// The planner's row estimate for a `SELECT count(*) …` statement's rows.
async fn planned_rows(
    tx: &tokio_postgres::Transaction<'_>,
    count: &sql::Sql,
    anon: bool,
) -> Result<i64, RestError> {
    let row = tx
        .query_one(
            format!(
                "EXPLAIN (FORMAT JSON) {}",
                count.text.replacen("SELECT count(*)", "SELECT 1", 1)
            )
            .as_str(),
            &count.refs(),
        )
        .await
        .map_err(|e| RestError::db(e, anon))?;
    let plan: Value = row.try_get(0).map_err(|e| RestError::db(e, anon))?;
    Ok(plan
        .pointer("/0/Plan/Plan Rows")
        .and_then(Value::as_f64)
        .map_or(0, |r| r.round() as i64))
}

fn prefer(headers: &HeaderMap) -> Prefer {
    let mut p = Prefer::default();
    for v in headers.get_all("prefer") {
        for item in v.to_str().unwrap_or_default().split(',') {
            match item.trim() {
                "count=exact" => {
                    p.count = true;
                    p.count_kind = CountKind::Exact;
                }
                "count=planned" => {
                    p.count = true;
                    p.count_kind = CountKind::Planned;
                }
                "count=estimated" => {
                    p.count = true;
                    p.count_kind = CountKind::Estimated;
                }
                "return=representation" => p.representation = true,
                "resolution=merge-duplicates" => p.merge = true,
                "resolution=ignore-duplicates" => p.ignore = true,
                "tx=rollback" => p.rollback = true,
                "missing=default" => p.missing_default = true,
                _ => {}
            }
        }
    }
    p
}

/// The schema a request names (`Accept-Profile` to read, `Content-Profile` to
/// write), or the first exposed one.
fn profile(state: &AppState, method: &Method, headers: &HeaderMap) -> Result<String, RestError> {
    let exposed = &state.settings.rest_schemas;
    let name = if method == Method::GET || method == Method::HEAD {
        "accept-profile"
    } else {
        "content-profile"
    };
    match headers.get(name).and_then(|v| v.to_str().ok()) {
        None => exposed.first().cloned().ok_or_else(|| {
            RestError::new(StatusCode::NOT_FOUND, "PGRST106", "No schema is exposed")
        }),
        Some(s) if exposed.iter().any(|e| e == s) => Ok(s.to_owned()),
        Some(s) => Err(RestError::new(
            StatusCode::NOT_ACCEPTABLE,
            "PGRST106",
            format!(
                "The schema must be one of the following: {}",
                exposed.join(", ")
            ),
        )
        .details(format!("{s} is not exposed (REST_SCHEMAS)"))),
    }
}

/// Runs a statement that yields `json, count`.
async fn rows(
    tx: &tokio_postgres::Transaction<'_>,
    sql: &Sql,
    anon: bool,
) -> Result<(String, i64), RestError> {
    let row = tx
        .query_one(sql.text.as_str(), &sql.refs())
        .await
        .map_err(|e| RestError::db(e, anon))?;
    let json: Option<String> = row.try_get(0).map_err(|e| RestError::db(e, anon))?;
    let n: i64 = row.try_get(1).map_err(|e| RestError::db(e, anon))?;
    Ok((json.unwrap_or_else(|| "null".to_owned()), n))
}

/// 42703 for a column the table does not have, before any SQL is made: a name
/// PostgreSQL would otherwise read as a function of the whole row
/// (`_t."to_json"`) never reaches it.
fn check_columns(q: &query::Query, t: &schema::Table, table: &str) -> Result<(), RestError> {
    fn conds<'a>(c: &'a query::Cond, out: &mut Vec<&'a str>) {
        match c {
            query::Cond::Filter { column, .. } => out.push(column),
            query::Cond::And(v, _) | query::Cond::Or(v, _) => v.iter().for_each(|c| conds(c, out)),
        }
    }
    let mut names: Vec<&str> = Vec::new();
    q.filters.iter().for_each(|c| conds(c, &mut names));
    names.extend(q.order.iter().map(|o| o.column.as_str()));
    names.extend(q.on_conflict.iter().flatten().map(String::as_str));
    names.extend(q.columns.iter().flatten().map(String::as_str));
    names.extend(q.select.iter().filter_map(|i| match i {
        query::Item::Column { name, .. } => Some(name.as_str()),
        _ => None,
    }));
    // A JSON path names its column first (`data->a`).
    match names
        .into_iter()
        .map(|c| query::json_path(c).0)
        .find(|c| !t.columns.iter().any(|k| k.name == *c))
    {
        Some(c) => Err(RestError::new(
            StatusCode::BAD_REQUEST,
            "42703",
            format!("column {table}.{c} does not exist"),
        )),
        None => Ok(()),
    }
}

fn not_one(n: i64) -> RestError {
    RestError::new(
        StatusCode::NOT_ACCEPTABLE,
        "PGRST116",
        "JSON object requested, multiple (or no) rows returned",
    )
    .details(format!("The result contains {n} rows"))
}

/// `Accept: application/vnd.pgrst.object+json`: exactly one row, as an object.
fn wants_object(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/vnd.pgrst.object+json"))
}

/// `Range: a-b` as offset and limit.
fn range(headers: &HeaderMap) -> Result<Option<(u64, Option<u64>)>, RestError> {
    let Some(v) = headers.get(header::RANGE).and_then(|v| v.to_str().ok()) else {
        return Ok(None);
    };
    let v = v.strip_prefix("items=").unwrap_or(v);
    let Some((a, b)) = v.split_once('-') else {
        return Ok(None);
    };
    let Ok(a) = a.trim().parse::<u64>() else {
        return Ok(None);
    };
    let b: Option<u64> = b.trim().parse().ok();
    if b.is_some_and(|b| b < a) {
        return Err(RestError::new(
            StatusCode::RANGE_NOT_SATISFIABLE,
            "PGRST103",
            "Requested range not satisfiable",
        ));
    }
    Ok(Some((a, b.map(|b| (b - a).saturating_add(1)))))
}

/// The response body: the rows, or the one row for an object request.
fn body(json: String, n: i64, object: bool) -> Result<String, RestError> {
    if !object {
        return Ok(json);
    }
    if n != 1 {
        return Err(not_one(n));
    }
    let mut rows: Vec<Value> = serde_json::from_str(&json).unwrap_or_default();
    Ok(rows.pop().unwrap_or(Value::Null).to_string())
}

fn json_response(status: StatusCode, body: String, content_range: Option<String>) -> Response {
    let mut r = (status, body).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    if let Some(cr) = content_range.and_then(|c| HeaderValue::from_str(&c).ok()) {
        h.insert(header::CONTENT_RANGE, cr);
    }
    r
}

fn content_range(offset: u64, n: i64, total: Option<i64>) -> String {
    let total = total.map_or("*".to_owned(), |t| t.to_string());
    if n <= 0 {
        format!("*/{total}")
    } else {
        let last = offset.saturating_add(u64::try_from(n - 1).unwrap_or(0));
        format!("{offset}-{last}/{total}")
    }
}

/// `GET|HEAD|POST|PATCH|DELETE /rest/v1/{table}`.
pub(crate) async fn table_route(
    State(state): State<AppState>,
    RestCaller(caller): RestCaller,
    Path(name): Path<String>,
    method: Method,
    headers: HeaderMap,
    uri: axum::http::Uri,
    payload: Bytes,
) -> Result<Response, RestError> {
    let schema_name = profile(&state, &method, &headers)?;
    let mut q = query::parse(uri.query().unwrap_or(""))?;
    let (mut schema, key) = table(&state, &schema_name, &name).await?;
    let mut t = schema.tables.get(&key).cloned().unwrap_or_default();
    if check_columns(&q, &t, &key.1).is_err() {
        // A column a DBA just added: look again (at most once a second).
        reload(&state).await?;
        schema = state.rest_schema.get();
        t = schema.tables.get(&key).cloned().unwrap_or_default();
        check_columns(&q, &t, &key.1)?;
    }
    let pref = prefer(&headers);
    let object = wants_object(&headers);
    let anon = caller.role == Role::Anon;
    let role = caller.role;
    if method == Method::GET || method == Method::HEAD {
        if let Some((offset, limit)) = range(&headers)? {
            q.offset = q.offset.or(Some(offset));
            // The smaller of the two, as PostgREST.
            q.limit = match (q.limit, limit) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        q.limit = Some(q.limit.map_or(MAX_ROWS, |l| l.min(MAX_ROWS)));
        let read = sql::read(&schema, &key, &t, &q, role)?;
        let count = match pref.count {
            true => Some(sql::count(&schema, &key, &t, &q, role)?),
            false => None,
        };
        let (json, n, total) = as_caller(&state, &caller, async |tx| {
            let (json, n) = rows(tx, &read, anon).await?;
            let exact = async |c: &sql::Sql| -> Result<i64, RestError> {
                let row = tx
                    .query_one(c.text.as_str(), &c.refs())
                    .await
                    .map_err(|e| RestError::db(e, anon))?;
                Ok(row.get::<_, i64>(0))
            };
            let total = match (&count, pref.count_kind) {
                (None, _) => None,
                (Some(c), CountKind::Exact) => Some(exact(c).await?),
                (Some(c), CountKind::Planned) => Some(planned_rows(tx, c, anon).await?.max(n)),
                // Exact while small; past MAX_ROWS the planner's estimate.
                (Some(c), CountKind::Estimated) => {
                    let planned = planned_rows(tx, c, anon).await?;
                    if planned > MAX_ROWS as i64 {
                        Some(planned.max(n))
                    } else {
                        Some(exact(c).await?)
                    }
                }
            };
            Ok((json, n, total))
        })
        .await?;
        let offset = q.offset.unwrap_or(0);
        let partial = total.is_some_and(|t| t > n) && headers.contains_key(header::RANGE);
        let status = if partial {
            StatusCode::PARTIAL_CONTENT
        } else {
            StatusCode::OK
        };
        let body = body(json, n, object)?;
        let body = if method == Method::HEAD {
            String::new()
        } else {
            body
        };
        return Ok(json_response(
            status,
            body,
            Some(content_range(offset, n, total)),
        ));
    }
    if aether_postgres::store::migrate::is_own_table(&format!("{}.{}", key.0, key.1))
        && !caller.is_service()
    {
        // Granted to users so that the storage routes can run their writes
        // as the caller (RLS decides), never written here: rows and bytes
        // change together only through those routes.
        return Err(RestError::new(
            StatusCode::FORBIDDEN,
            "42501",
            format!("permission denied for table {}", key.1),
        )
        .details("Aether's own tables are read-only through /rest/v1: write through /storage/v1 and /auth/v1"));
    }
    let w = Write {
        state: &state,
        caller: &caller,
        schema: &schema,
        key: &key,
        table: &t,
        q: &q,
        representation: pref.representation,
        object,
        rollback: pref.rollback,
    };
    if method == Method::DELETE {
        let (sql, stmt) = sql::delete(&key, &q);
        return w.run(sql, stmt, StatusCode::OK).await;
    }
    // POST and PATCH carry rows.
    let value: Value = serde_json::from_slice(&payload).map_err(|e| {
        RestError::new(StatusCode::BAD_REQUEST, "PGRST102", "Empty or invalid json")
            .details(e.to_string())
    })?;
    let rows_in: Vec<&serde_json::Map<String, Value>> = match &value {
        Value::Object(o) => vec![o],
        Value::Array(a) => a.iter().filter_map(Value::as_object).collect(),
        _ => Vec::new(),
    };
    if rows_in.is_empty() && !matches!(&value, Value::Array(a) if a.is_empty()) {
        return Err(RestError::new(
            StatusCode::BAD_REQUEST,
            "PGRST102",
            "Empty or invalid json",
        ));
    }
    // Each key is checked as it is read, so a body of many keys costs one
    // lookup each and fails at the first the table does not have.
    let known: std::collections::HashSet<&str> =
        t.columns.iter().map(|c| c.name.as_str()).collect();
    let columns: Vec<String> = match &q.columns {
        // Named twice is named once.
        Some(c) => {
            let mut seen = std::collections::HashSet::new();
            c.iter()
                .filter(|c| seen.insert(c.as_str()))
                .cloned()
                .collect()
        }
        None => {
            let mut seen = std::collections::HashSet::new();
            let mut cols: Vec<String> = Vec::new();
            for r in &rows_in {
                for k in r.keys() {
                    if !known.contains(k.as_str()) {
                        return Err(RestError::new(
                            StatusCode::BAD_REQUEST,
                            "PGRST204",
                            format!(
                                "Could not find the '{k}' column of '{}' in the schema cache",
                                key.1
                            ),
                        ));
                    }
                    if seen.insert(k.as_str()) {
                        cols.push(k.clone());
                    }
                }
            }
            cols
        }
    };
    if method == Method::PATCH {
        let one = match &value {
            Value::Object(_) => value.to_string(),
            _ => {
                return Err(RestError::new(
                    StatusCode::BAD_REQUEST,
                    "PGRST102",
                    "An update takes one JSON object",
                ));
            }
        };
        if columns.is_empty() {
            return written(pref.representation, StatusCode::OK, "[]".into(), 0, object);
        }
        let (sql, stmt) = sql::update(&key, &columns, one, &q);
        return w.run(sql, stmt, StatusCode::OK).await;
    }
    if method != Method::POST {
        return Err(RestError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "PGRST117",
            format!("Unsupported HTTP method: {method}"),
        ));
    }
    let array = match &value {
        Value::Array(_) => value.to_string(),
        other => format!("[{other}]"),
    };
    let conflict = if pref.merge || pref.ignore {
        let on = q
            .on_conflict
            .clone()
            .unwrap_or_else(|| t.primary_key.clone());
        if on.is_empty() {
            return Err(RestError::new(
                StatusCode::BAD_REQUEST,
                "PGRST100",
                "An upsert needs on_conflict or a primary key",
            ));
        }
        if pref.merge {
            Conflict::Merge(on)
        } else {
            Conflict::Ignore(on)
        }
    } else {
        Conflict::None
    };
    if matches!(&value, Value::Array(a) if a.len() != rows_in.len()) {
        return Err(RestError::new(
            StatusCode::BAD_REQUEST,
            "PGRST102",
            "Every element of an inserted array must be an object",
        ));
    }
    let (sql, stmt) = if columns.is_empty() {
        let mut s = Sql::default();
        let n = rows_in.len();
        let _ = s.param_opt(None);
        let stmt = format!(
            "INSERT INTO {} AS _t SELECT FROM generate_series(1, {n}) WHERE $1::text IS NULL",
            sql::table_name(&key.0, &key.1)
        );
        (s, stmt)
    } else if pref.missing_default
        && rows_in
            .iter()
            .any(|r| columns.iter().any(|c| !r.contains_key(c)))
    {
        // A row that lacks one of `columns` takes its default: each row is a
        // parameter of its own, so each is parsed for its own cells only.
        if rows_in.len() > sql::MAX_DEFAULTED_ROWS {
            return Err(RestError::new(
                StatusCode::BAD_REQUEST,
                "PGRST102",
                format!(
                    "missing=default inserts at most {} rows at once",
                    sql::MAX_DEFAULTED_ROWS
                ),
            ));
        }
        let rows: Vec<sql::DefaultedRow> = rows_in
            .iter()
            .map(|r| sql::DefaultedRow {
                json: Value::Object((*r).clone()).to_string(),
                present: columns.iter().map(|c| r.contains_key(c)).collect(),
            })
            .collect();
        sql::insert_with_defaults(&key, &columns, rows, &conflict)
    } else {
        sql::insert(&key, &columns, array, &conflict)
    };
    w.run(sql, stmt, StatusCode::CREATED).await
}

/// One data-changing request.
struct Write<'a> {
    state: &'a AppState,
    caller: &'a Principal,
    schema: &'a schema::Schema,
    key: &'a (String, String),
    table: &'a schema::Table,
    q: &'a query::Query,
    representation: bool,
    object: bool,
    rollback: bool,
}

impl Write<'_> {
    /// Runs `stmt` as the caller. Rows come back (`RETURNING`) only when the
    /// client asked for them, so a table the caller may write but not read
    /// takes `return=minimal` writes, as on PostgREST. An object request that
    /// does not touch exactly one row is refused before the commit.
    async fn run(&self, sql: Sql, stmt: String, status: StatusCode) -> Result<Response, RestError> {
        let anon = self.caller.role == Role::Anon;
        let object = self.object;
        let wants_rows = self.representation || object;
        let (json, n) = if wants_rows {
            let sql = sql::returning(
                self.schema,
                self.key,
                self.table,
                self.q,
                self.caller.role,
                sql,
                &stmt,
            )?;
            as_caller_then(self.state, self.caller, self.rollback, async |tx| {
                let (json, n) = rows(tx, &sql, anon).await?;
                if object && n != 1 {
                    return Err(not_one(n));
                }
                Ok((json, n))
            })
            .await?
        } else {
            let n = as_caller_then(self.state, self.caller, self.rollback, async |tx| {
                tx.execute(stmt.as_str(), &sql.refs())
                    .await
                    .map_err(|e| RestError::db(e, anon))
            })
            .await?;
            ("[]".to_owned(), i64::try_from(n).unwrap_or(i64::MAX))
        };
        let mut r = written(wants_rows, status, json, n, object)?;
        if self.rollback {
            r.headers_mut().insert(
                HeaderName::from_static("preference-applied"),
                HeaderValue::from_static("tx=rollback"),
            );
        }
        Ok(r)
    }
}

/// The answer to a write: the rows with `return=representation`, else nothing.
fn written(
    representation: bool,
    status: StatusCode,
    json: String,
    n: i64,
    object: bool,
) -> Result<Response, RestError> {
    let range = content_range(0, n, None);
    if !representation {
        let mut r = StatusCode::NO_CONTENT.into_response();
        if status == StatusCode::CREATED {
            *r.status_mut() = StatusCode::CREATED;
        }
        if let Ok(v) = HeaderValue::from_str(&range) {
            r.headers_mut().insert(header::CONTENT_RANGE, v);
        }
        return Ok(r);
    }
    Ok(json_response(status, body(json, n, object)?, Some(range)))
}

/// The `/rest/v1` routes.
pub(crate) fn routes() -> axum::Router<AppState> {
    use axum::routing::{any, get};
    axum::Router::new()
        .route("/rest/v1/", get(openapi))
        .route("/rest/v1", get(openapi))
        .route("/rest/v1/rpc/{function}", get(rpc).post(rpc))
        .route("/rest/v1/{table}", any(table_route))
}
