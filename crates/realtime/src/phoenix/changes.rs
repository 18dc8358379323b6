//! Row changes as Supabase Realtime's `postgres_changes` payloads, and the
//! stable ids of a join's bindings.

use aether_core::changes::{ChangeKind, RowChange, RowJson};
use serde_json::{Value, json};

/// Where a change's Phoenix `data` encoding is kept beside it.
pub(super) const PHOENIX_DATA: aether_router::routed::FrameSlot =
    aether_router::routed::FrameSlot::new(1);

/// A stable, non-zero id for a binding (FNV-1a over its parameters).
pub fn binding_id(
    event: &str,
    schema: &str,
    table: &str,
    filter: Option<&str>,
    select: Option<&str>,
) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    // A `select` makes a binding of its own (its frames differ); without
    // one the id is what it always was.
    let select = select.map(|s| format!("\u{1}{s}"));
    for part in [
        event,
        schema,
        table,
        filter.unwrap_or(""),
        select.as_deref().unwrap_or(""),
    ]
    .into_iter()
    .take(if select.is_some() { 5 } else { 4 })
    {
        for b in part.bytes().chain([0u8]) {
            h ^= u32::from(b);
            h = h.wrapping_mul(0x0100_0193);
        }
    }
    (h & 0x7fff_ffff).max(1)
}

fn type_name(oid: u32) -> &'static str {
    match oid {
        16 => "bool",
        17 => "bytea",
        18 => "char",
        19 => "name",
        20 => "int8",
        21 => "int2",
        23 => "int4",
        25 => "text",
        26 => "oid",
        114 => "json",
        700 => "float4",
        701 => "float8",
        1000 => "_bool",
        1005 => "_int2",
        1007 => "_int4",
        1009 => "_text",
        1015 => "_varchar",
        1016 => "_int8",
        1021 => "_float4",
        1022 => "_float8",
        1042 => "bpchar",
        1043 => "varchar",
        1082 => "date",
        1083 => "time",
        1114 => "timestamp",
        1184 => "timestamptz",
        1186 => "interval",
        1266 => "timetz",
        1700 => "numeric",
        2950 => "uuid",
        2951 => "_uuid",
        3802 => "jsonb",
        3807 => "_jsonb",
        _ => "unknown",
    }
}

/// The `data` of a `postgres_changes` message.
pub fn change_data(c: &RowChange) -> Value {
    let rel = &c.relation;
    let columns: Vec<Value> = rel
        .columns
        .iter()
        .filter(|col| !col.secret)
        .map(|col| json!({"name": col.name, "type": type_name(col.type_oid)}))
        .collect();
    let row = |r: Option<&aether_core::changes::Row>| match r {
        Some(values) => serde_json::to_value(RowJson {
            relation: rel,
            values,
        })
        .unwrap_or(Value::Null),
        None => json!({}),
    };
    let ts = chrono::DateTime::from_timestamp_millis(c.commit_time_ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let mut data = json!({
        "schema": rel.schema,
        "table": rel.name,
        "commit_timestamp": ts,
        "type": c.kind.as_str(),
        "columns": columns,
        "errors": null,
    });
    match c.kind {
        ChangeKind::Insert => data["record"] = row(c.new.as_ref()),
        ChangeKind::Update => {
            data["record"] = row(c.new.as_ref());
            data["old_record"] = row(c.old.as_ref());
        }
        ChangeKind::Delete => data["old_record"] = row(c.old.as_ref()),
        ChangeKind::Truncate => {}
    }
    data
}

/// `data` with only the `select`ed columns in `columns`, `record` and
/// `old_record`.
pub(super) fn selected(mut data: Value, cols: &[String]) -> Value {
    let keep = |name: &str| cols.iter().any(|c| c == name);
    if let Some(Value::Array(columns)) = data.get_mut("columns") {
        columns.retain(|c| c.get("name").and_then(Value::as_str).is_some_and(keep));
    }
    for key in ["record", "old_record"] {
        if let Some(Value::Object(row)) = data.get_mut(key) {
            row.retain(|k, _| keep(k));
        }
    }
    data
}
