//! `GET /rest/v1/`: the exposed tables as an OpenAPI 2.0 document, as
//! PostgREST serves it.

use super::*;

/// `GET /rest/v1/`: the OpenAPI (Swagger 2.0) description PostgREST serves,
/// of the tables of the exposed schema (`Accept-Profile`) the caller may
/// read a column of, and of those columns, from the schema cache.
pub(crate) async fn openapi(
    State(state): State<AppState>,
    RestCaller(caller): RestCaller,
    headers: HeaderMap,
) -> Result<Response, RestError> {
    let schema_name = profile(&state, &Method::GET, &headers)?;
    reload(&state).await?;
    let s = state.rest_schema.get();
    let role = schema::role_index(caller.role);
    let mut paths = serde_json::Map::new();
    let mut definitions = serde_json::Map::new();
    let mut names: Vec<&(String, String)> = s
        .tables
        .keys()
        .filter(|(sc, _)| *sc == schema_name)
        .collect();
    names.sort();
    for key in names {
        let t = &s.tables[key];
        let cols: Vec<&schema::Column> = t.columns.iter().filter(|c| c.readable[role]).collect();
        if cols.is_empty() {
            continue;
        }
        let properties: serde_json::Map<String, Value> = cols
            .iter()
            .map(|c| {
                let ty = openapi_type(&c.type_name);
                let mut p = json!({"type": ty, "format": c.type_name});
                if ty == "array" {
                    p["items"] = json!({"type": openapi_type(c.type_name.trim_end_matches("[]"))});
                }
                if t.primary_key.contains(&c.name) {
                    p["description"] = json!("Note:\nThis is a Primary Key.<pk/>");
                }
                (c.name.clone(), p)
            })
            .collect();
        let required: Vec<&str> = cols
            .iter()
            .filter(|c| c.required)
            .map(|c| c.name.as_str())
            .collect();
        definitions.insert(
            key.1.clone(),
            json!({"type": "object", "required": required, "properties": properties}),
        );
        let reference = json!({"$ref": format!("#/definitions/{}", key.1)});
        let ok = |what: &str| json!({"description": what});
        paths.insert(
            format!("/{}", key.1),
            json!({
                "get": {"tags": [key.1], "responses": {"200": {"description": "OK",
                        "schema": {"type": "array", "items": reference}}, "206": ok("Partial Content")}},
                "post": {"tags": [key.1], "responses": {"201": ok("Created")}},
                "patch": {"tags": [key.1], "responses": {"204": ok("No Content")}},
                "delete": {"tags": [key.1], "responses": {"204": ok("No Content")}},
            }),
        );
    }
    paths.insert(
        "/".into(),
        json!({"get": {"tags": ["Introspection"], "summary": "OpenAPI description (this document)",
                        "responses": {"200": {"description": "OK"}}}}),
    );
    let doc = json!({
        "swagger": "2.0",
        "info": {"title": "Aether data API (PostgREST-compatible)", "version": env!("CARGO_PKG_VERSION"),
                 "description": format!("The tables of schema {schema_name} the caller may read")},
        "basePath": "/rest/v1",
        "schemes": ["http", "https"],
        "consumes": ["application/json", "application/vnd.pgrst.object+json"],
        "produces": ["application/json", "application/vnd.pgrst.object+json"],
        "paths": paths,
        "definitions": definitions,
    });
    let mut r = json_response(StatusCode::OK, doc.to_string(), None);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openapi+json; charset=utf-8"),
    );
    Ok(r)
}

/// A PostgreSQL type as an OpenAPI 2.0 type (its name goes in `format`).
pub(super) fn openapi_type(t: &str) -> &'static str {
    match t {
        "smallint" | "integer" | "bigint" => "integer",
        "real" | "double precision" | "numeric" => "number",
        "boolean" => "boolean",
        t if t.ends_with("[]") => "array",
        "json" | "jsonb" => "object",
        _ => "string",
    }
}
