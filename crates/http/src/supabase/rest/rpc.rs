//! `/rest/v1/rpc/{function}`: a function of an exposed schema, called with
//! named arguments as the caller.

use super::*;

/// `POST|GET /rest/v1/rpc/{function}`: named arguments from the JSON body or
/// the query string.
pub(crate) async fn rpc(
    State(state): State<AppState>,
    RestCaller(caller): RestCaller,
    Path(function): Path<String>,
    method: Method,
    headers: HeaderMap,
    uri: axum::http::Uri,
    payload: Bytes,
) -> Result<Response, RestError> {
    let schema_name = profile(&state, &method, &headers)?;
    let args: Vec<(String, Option<String>)> = if method == Method::GET {
        uri.query()
            .unwrap_or("")
            .split('&')
            .filter(|p| !p.is_empty())
            .filter(|p| {
                let k = p.split_once('=').map_or(*p, |(k, _)| k);
                !matches!(
                    k,
                    "select" | "order" | "limit" | "offset" | "apikey" | "columns"
                )
            })
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                (
                    crate::supabase::decode_component(k),
                    Some(crate::supabase::decode_component(v)),
                )
            })
            .collect()
    } else if payload.is_empty() {
        Vec::new()
    } else {
        let v: Value = serde_json::from_slice(&payload).map_err(|e| {
            RestError::new(StatusCode::BAD_REQUEST, "PGRST102", "Empty or invalid json")
                .details(e.to_string())
        })?;
        let Value::Object(o) = v else {
            return Err(RestError::new(
                StatusCode::BAD_REQUEST,
                "PGRST102",
                "rpc arguments must be a JSON object",
            ));
        };
        o.into_iter()
            .map(|(k, v)| {
                let text = match v {
                    Value::Null => None,
                    Value::String(s) => Some(s),
                    other => Some(other.to_string()),
                };
                (k, text)
            })
            .collect()
    };
    let anon = caller.role == Role::Anon;
    let object = wants_object(&headers);
    let fname = sql::table_name(&schema_name, &function);
    let (json, n) = as_caller(&state, &caller, async |tx| {
        let found = tx
            .query_opt(
                "SELECT p.proretset, p.prorettype = 'void'::regtype
                   FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                  WHERE n.nspname = $1 AND p.proname = $2 LIMIT 1",
                &[&schema_name, &function],
            )
            .await
            .map_err(|e| RestError::db(e, anon))?;
        let Some(found) = found else {
            return Err(RestError::new(
                StatusCode::NOT_FOUND,
                "PGRST202",
                format!("Could not find the function {schema_name}.{function} in the schema cache"),
            ));
        };
        let (set, void): (bool, bool) = (found.get(0), found.get(1));
        let mut s = Sql::default();
        let named: Vec<String> = args
            .iter()
            .map(|(k, v)| format!("{} => {}", sql::quote(k), s.param_opt(v.clone())))
            .collect();
        let call = format!("{fname}({})", named.join(", "));
        s.text = if set {
            format!(
                "SELECT coalesce(json_agg(_r), '[]')::text, count(*) FROM (SELECT * FROM {call} LIMIT {MAX_ROWS}) _r"
            )
        } else if void {
            format!("SELECT 'null'::text, 1::bigint FROM (SELECT {call}) _r")
        } else {
            format!("SELECT to_json({call})::text, 1::bigint")
        };
        rows(tx, &s, anon).await
    })
    .await?;
    Ok(json_response(StatusCode::OK, body(json, n, object)?, None))
}
