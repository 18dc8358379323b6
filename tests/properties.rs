//! Property tests of what parses network input: the pgoutput decoder, the row
//! filter parser, the Aether and Phoenix frame codecs, and object paths. Each
//! property has a fixed case budget; proptest keeps failing seeds in
//! `tests/proptest-regressions/properties.txt`, replayed first on every run.
//!
//! Arbitrary input never panics; where an encoder exists (here or in `src/`)
//! values round-trip through it.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)] // a test may panic; its helpers are `pub` for the other test files

use aether_core::changes::{Column, Relation, TableId};
use aether_core::lsn::PgLsn;
use aether_postgres::replication::pgoutput::{
    LogicalMessage, RelationBody, RelationColumn, TupleValue, decode,
};
use aether_realtime::phoenix::{PhxMessage, Vsn};
use aether_realtime::phoenix_hub::{
    BroadcastPayload, decode_user_broadcast_push, encode_user_broadcast,
};
use aether_realtime::protocol::{self, ClientFrame, SubscribeRequest};
use aether_router::catalog::{ColumnInfo, TableInfo};
use aether_router::filter::{Filter, Op};
use aether_storage::path::{MAX_DEPTH, MAX_PATH_BYTES, ObjectPath};
use bytes::Bytes;
use proptest::prelude::*;
use serde_json::{Value, json};
use std::sync::Arc;

const CASES: u32 = 256;

/// The case budget, and failing seeds kept in one committed file (proptest's
/// default looks for a `lib.rs` beside the test, which `tests/` has not).
fn config() -> ProptestConfig {
    ProptestConfig {
        failure_persistence: Some(Box::new(
            proptest::test_runner::FileFailurePersistence::Direct(
                "tests/proptest-regressions/properties.txt",
            ),
        )),
        ..ProptestConfig::with_cases(CASES)
    }
}

/// Strings a hostile client sends: printable text, control characters and the
/// separators the parsers split on.
fn nasty() -> impl Strategy<Value = String> {
    prop_oneof![
        "\\PC{0,16}",
        "[\\x00-\\x1f\\x7f&=.,()/\\\\\"' a-z0-9]{0,16}",
        ".{0,8}",
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        // Quarters are exact in binary, so they survive printing and parsing.
        (-4000i32..4000).prop_map(|n| json!(f64::from(n) / 4.0)),
        nasty().prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(nasty(), inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

// ---- pgoutput ------------------------------------------------------------

/// A C string for pgoutput: UTF-8 without NUL.
fn cstr() -> impl Strategy<Value = String> {
    "[^\\x00]{0,12}"
}

fn tuple() -> impl Strategy<Value = Vec<TupleValue>> {
    let value = prop_oneof![
        Just(TupleValue::Null),
        Just(TupleValue::UnchangedToast),
        prop::collection::vec(any::<u8>(), 0..24).prop_map(|b| TupleValue::Text(Bytes::from(b))),
        prop::collection::vec(any::<u8>(), 0..24).prop_map(|b| TupleValue::Binary(Bytes::from(b))),
    ];
    prop::collection::vec(value, 0..8)
}

fn logical_message() -> impl Strategy<Value = LogicalMessage> {
    let lsn = any::<u64>().prop_map(PgLsn);
    let rel = any::<u32>().prop_map(TableId);
    prop_oneof![
        (lsn.clone(), any::<i64>(), any::<u32>()).prop_map(|(final_lsn, timestamp, xid)| {
            LogicalMessage::Begin {
                final_lsn,
                timestamp,
                xid,
            }
        }),
        (any::<u8>(), lsn.clone(), lsn.clone(), any::<i64>()).prop_map(
            |(flags, commit_lsn, end_lsn, timestamp)| LogicalMessage::Commit {
                flags,
                commit_lsn,
                end_lsn,
                timestamp,
            }
        ),
        (lsn.clone(), cstr())
            .prop_map(|(commit_lsn, name)| LogicalMessage::Origin { commit_lsn, name }),
        (
            rel.clone(),
            cstr(),
            cstr(),
            any::<u8>(),
            prop::collection::vec((any::<bool>(), cstr(), any::<u32>(), any::<i32>()), 0..6)
        )
            .prop_map(|(id, namespace, name, replica_identity, cols)| {
                LogicalMessage::Relation(RelationBody {
                    id,
                    namespace,
                    name,
                    replica_identity,
                    columns: cols
                        .into_iter()
                        .map(|(is_key, name, type_oid, type_modifier)| RelationColumn {
                            is_key,
                            name,
                            type_oid,
                            type_modifier,
                        })
                        .collect(),
                })
            }),
        (any::<u32>(), cstr(), cstr()).prop_map(|(id, namespace, name)| LogicalMessage::Type {
            id,
            namespace,
            name
        }),
        (rel.clone(), tuple()).prop_map(|(relation, new)| LogicalMessage::Insert { relation, new }),
        (rel.clone(), prop::option::of(tuple()), tuple())
            .prop_map(|(relation, old, new)| LogicalMessage::Update { relation, old, new }),
        (rel.clone(), tuple()).prop_map(|(relation, old)| LogicalMessage::Delete { relation, old }),
        (any::<u8>(), prop::collection::vec(rel, 0..6))
            .prop_map(|(options, relations)| LogicalMessage::Truncate { options, relations }),
        (
            any::<bool>(),
            lsn,
            cstr(),
            prop::collection::vec(any::<u8>(), 0..32)
        )
            .prop_map(
                |(transactional, lsn, prefix, content)| LogicalMessage::Message {
                    transactional,
                    lsn,
                    prefix,
                    content: Bytes::from(content),
                }
            ),
    ]
}

/// pgoutput's wire format (protocol version 1), written from the PostgreSQL
/// documentation independently of the decoder.
fn encode(m: &LogicalMessage, old_kind: u8) -> Vec<u8> {
    fn cstr(b: &mut Vec<u8>, s: &str) {
        b.extend(s.as_bytes());
        b.push(0);
    }
    fn tuple(b: &mut Vec<u8>, t: &[TupleValue]) {
        b.extend((t.len() as i16).to_be_bytes());
        for v in t {
            match v {
                TupleValue::Null => b.push(b'n'),
                TupleValue::UnchangedToast => b.push(b'u'),
                TupleValue::Text(x) | TupleValue::Binary(x) => {
                    b.push(if matches!(v, TupleValue::Text(_)) {
                        b't'
                    } else {
                        b'b'
                    });
                    b.extend((x.len() as i32).to_be_bytes());
                    b.extend(x.iter());
                }
            }
        }
    }
    let mut b = Vec::new();
    match m {
        LogicalMessage::Begin {
            final_lsn,
            timestamp,
            xid,
        } => {
            b.push(b'B');
            b.extend(final_lsn.0.to_be_bytes());
            b.extend(timestamp.to_be_bytes());
            b.extend(xid.to_be_bytes());
        }
        LogicalMessage::Commit {
            flags,
            commit_lsn,
            end_lsn,
            timestamp,
        } => {
            b.push(b'C');
            b.push(*flags);
            b.extend(commit_lsn.0.to_be_bytes());
            b.extend(end_lsn.0.to_be_bytes());
            b.extend(timestamp.to_be_bytes());
        }
        LogicalMessage::Origin { commit_lsn, name } => {
            b.push(b'O');
            b.extend(commit_lsn.0.to_be_bytes());
            cstr(&mut b, name);
        }
        LogicalMessage::Relation(r) => {
            b.push(b'R');
            b.extend(r.id.0.to_be_bytes());
            cstr(&mut b, &r.namespace);
            cstr(&mut b, &r.name);
            b.push(r.replica_identity);
            b.extend((r.columns.len() as i16).to_be_bytes());
            for c in &r.columns {
                b.push(u8::from(c.is_key));
                cstr(&mut b, &c.name);
                b.extend(c.type_oid.to_be_bytes());
                b.extend(c.type_modifier.to_be_bytes());
            }
        }
        LogicalMessage::Type {
            id,
            namespace,
            name,
        } => {
            b.push(b'Y');
            b.extend(id.to_be_bytes());
            cstr(&mut b, namespace);
            cstr(&mut b, name);
        }
        LogicalMessage::Insert { relation, new } => {
            b.push(b'I');
            b.extend(relation.0.to_be_bytes());
            b.push(b'N');
            tuple(&mut b, new);
        }
        LogicalMessage::Update { relation, old, new } => {
            b.push(b'U');
            b.extend(relation.0.to_be_bytes());
            if let Some(old) = old {
                b.push(old_kind);
                tuple(&mut b, old);
            }
            b.push(b'N');
            tuple(&mut b, new);
        }
        LogicalMessage::Delete { relation, old } => {
            b.push(b'D');
            b.extend(relation.0.to_be_bytes());
            b.push(old_kind);
            tuple(&mut b, old);
        }
        LogicalMessage::Truncate { options, relations } => {
            b.push(b'T');
            b.extend((relations.len() as i32).to_be_bytes());
            b.push(*options);
            for r in relations {
                b.extend(r.0.to_be_bytes());
            }
        }
        LogicalMessage::Message {
            transactional,
            lsn,
            prefix,
            content,
        } => {
            b.push(b'M');
            b.push(u8::from(*transactional));
            b.extend(lsn.0.to_be_bytes());
            cstr(&mut b, prefix);
            b.extend((content.len() as i32).to_be_bytes());
            b.extend(content.iter());
        }
    }
    b
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn pgoutput_arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = decode(Bytes::from(bytes));
    }

    #[test]
    fn pgoutput_messages_round_trip(m in logical_message(), full in any::<bool>()) {
        let wire = encode(&m, if full { b'O' } else { b'K' });
        prop_assert_eq!(decode(Bytes::from(wire)), Ok(m));
    }

    /// A valid message cut short, or with one byte changed, is a value or an
    /// error; never a panic, and a cut one is never read as the whole.
    #[test]
    fn pgoutput_damaged_messages_never_panic(
        m in logical_message(),
        cut in any::<prop::sample::Index>(),
        at in any::<prop::sample::Index>(),
        byte in any::<u8>(),
    ) {
        let wire = encode(&m, b'O');
        let n = cut.index(wire.len());
        prop_assert_ne!(decode(Bytes::copy_from_slice(&wire[..n])), Ok(m.clone()));
        let mut bad = wire.clone();
        let i = at.index(bad.len());
        bad[i] = byte;
        let _ = decode(Bytes::from(bad));
    }
}

// ---- row filters -----------------------------------------------------------

const INT8: u32 = 20;
const TEXT: u32 = 25;
const BOOL: u32 = 16;
const UUID: u32 = 2950;
const TIMESTAMPTZ: u32 = 1184;
const NUMERIC: u32 = 1700;

fn table() -> TableInfo {
    let columns = [
        ("id", UUID),
        ("size", INT8),
        ("name", TEXT),
        ("public", BOOL),
        ("created_at", TIMESTAMPTZ),
        ("price", NUMERIC),
    ];
    TableInfo {
        schema: "public".into(),
        name: "t".into(),
        qualified: Arc::from("public.t"),
        columns: columns
            .iter()
            .map(|(n, t)| ColumnInfo {
                name: (*n).into(),
                type_oid: *t,
            })
            .collect(),
    }
}

fn relation() -> Relation {
    let t = table();
    Relation {
        id: TableId(1),
        schema: t.schema,
        name: t.name,
        qualified: t.qualified,
        replica_identity: b'f',
        columns: t
            .columns
            .into_iter()
            .map(|c| Column {
                name: c.name,
                type_oid: c.type_oid,
                is_key: false,
                secret: false,
            })
            .collect(),
    }
}

/// A literal of the column's type, as a client writes it.
fn literal(type_oid: u32) -> BoxedStrategy<String> {
    match type_oid {
        INT8 => any::<i64>().prop_map(|n| n.to_string()).boxed(),
        BOOL => prop::sample::select(vec!["true", "false", "t", "f"])
            .prop_map(str::to_owned)
            .boxed(),
        UUID => any::<u128>()
            .prop_map(|n| uuid::Uuid::from_u128(n).to_string())
            .boxed(),
        TIMESTAMPTZ => (0i64..4_000_000_000)
            .prop_map(|s| chrono::DateTime::from_timestamp(s, 0).unwrap().to_rfc3339())
            .boxed(),
        NUMERIC => (-1_000_000i64..1_000_000)
            .prop_map(|n| format!("{}.{:02}", n / 100, (n % 100).abs()))
            .boxed(),
        // Text: anything but the separators of the syntax.
        _ => "[a-zA-Z0-9 _:\\-\\t]{1,12}".boxed(),
    }
}

/// A well-formed condition: (text, column, op).
fn condition() -> impl Strategy<Value = (String, String, Op)> {
    let cols = table().columns;
    prop::sample::select(cols).prop_flat_map(|c| {
        let name = c.name.clone();
        let ops = prop::sample::select(vec![
            ("eq", Op::Eq),
            ("neq", Op::Neq),
            ("lt", Op::Lt),
            ("lte", Op::Lte),
            ("gt", Op::Gt),
            ("gte", Op::Gte),
            ("in", Op::In),
            ("is", Op::IsNull),
            ("is", Op::IsNotNull),
        ]);
        (ops, prop::collection::vec(literal(c.type_oid), 1..4)).prop_map(
            move |((op_text, op), values)| {
                let lit = match op {
                    Op::In => format!("({})", values.join(",")),
                    Op::IsNull => "null".into(),
                    Op::IsNotNull => "notnull".into(),
                    _ => values[0].clone(),
                };
                (format!("{name}={op_text}.{lit}"), name.clone(), op)
            },
        )
    })
}

fn row() -> impl Strategy<Value = Vec<Option<Value>>> {
    prop::collection::vec(prop::option::of(json_value()), 6)
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn filter_parse_and_match_never_panic(text in nasty(), row in row()) {
        if let Ok(f) = Filter::parse(&text, &table()) {
            let _ = f.matches(&relation(), &row);
            let _ = f.index_key();
        }
    }

    #[test]
    fn well_formed_filters_parse_to_their_conditions(
        conds in prop::collection::vec(condition(), 1..4),
        row in row(),
    ) {
        let text = conds.iter().map(|c| c.0.as_str()).collect::<Vec<_>>().join("&");
        prop_assert!(protocol::filter_text(&text).is_ok(), "{}", text);
        let f = Filter::parse(&text, &table()).map_err(|e| TestCaseError::fail(format!("{text}: {e}")))?;
        prop_assert_eq!(f.conditions.len(), conds.len());
        for (c, (_, column, op)) in f.conditions.iter().zip(&conds) {
            prop_assert_eq!(&c.column, column);
            prop_assert_eq!(c.op, *op);
        }
        let _ = f.matches(&relation(), &row);
    }

    /// An empty condition anywhere (`&&`, a leading or trailing `&`) is refused
    /// before parsing: never read as fewer conditions.
    #[test]
    fn filters_with_an_empty_condition_are_refused(
        conds in prop::collection::vec(condition(), 0..3),
        at in any::<prop::sample::Index>(),
    ) {
        let mut parts: Vec<String> = conds.into_iter().map(|c| c.0).collect();
        let i = at.index(parts.len() + 1);
        parts.insert(i, String::new());
        let text = parts.join("&");
        prop_assert!(protocol::filter_text(&text).is_err(), "{:?} accepted", text);
    }

    #[test]
    fn filter_text_refuses_nul_and_control_characters_but_tabs(
        a in "[a-z=.]{0,6}",
        c in prop::char::range('\u{0}', '\u{1f}'),
        b in "[a-z]{0,6}",
    ) {
        let text = format!("x{a}{c}{b}");
        prop_assert_eq!(
            protocol::filter_text(&text).is_ok(),
            matches!(c, '\t' | '\n' | '\r'),
            "{:?}", text
        );
    }
}

// ---- Aether frames ---------------------------------------------------------

const FRAME_CODES: &[&str] = &[
    "invalid_json",
    "invalid_message",
    "unknown_type",
    "unknown_action",
    "invalid_subscription",
];

fn subscribe_request() -> impl Strategy<Value = SubscribeRequest> {
    (
        "[a-zA-Z0-9_:-]{1,32}",
        "[a-z_]{1,12}",
        "[a-z_]{1,12}",
        prop::sample::select(vec!["*", "INSERT", "UPDATE", "DELETE", "TRUNCATE"]),
        prop::option::of("[a-z_]{1,8}=eq\\.[a-z0-9]{1,8}"),
        prop::option::of("[0-9A-F]{16}-[0-9A-F]{8}"),
    )
        .prop_map(
            |(id, schema, table, event, filter, since)| SubscribeRequest {
                id,
                schema,
                table,
                event: event.into(),
                filter,
                since,
            },
        )
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn aether_frames_never_panic_and_errors_have_documented_codes(text in nasty(), v in json_value()) {
        for input in [text, v.to_string()] {
            if let Err(e) = protocol::parse(&input) {
                prop_assert!(FRAME_CODES.contains(&e.code), "{} → {:?}", input, e);
            }
        }
    }

    /// Any frame of the subscription type whose action is not subscribe or
    /// unsubscribe is `unknown_action`, whatever its data holds.
    #[test]
    fn unknown_subscription_actions_are_unknown_action(action in "\\PC{0,12}", data in json_value()) {
        prop_assume!(action != "subscribe" && action != "unsubscribe");
        let frame = json!({"type": "subscription", "action": action, "data": data}).to_string();
        prop_assert_eq!(protocol::parse(&frame).unwrap_err().code, "unknown_action");
    }

    #[test]
    fn subscribe_frames_round_trip(req in subscribe_request()) {
        let frame = json!({"type": "subscription", "action": "subscribe", "data": {
            "id": req.id, "schema": req.schema, "table": req.table, "event": req.event,
            "filter": req.filter, "since": req.since,
        }});
        prop_assert_eq!(protocol::parse(&frame.to_string()), Ok(ClientFrame::Subscribe(req.clone())));
        prop_assert!(protocol::check_subscription(&req).is_ok());
        let frame = json!({"type": "subscription", "action": "unsubscribe", "data": {"id": req.id}});
        prop_assert_eq!(protocol::parse(&frame.to_string()), Ok(ClientFrame::Unsubscribe { id: req.id }));
    }

    #[test]
    fn error_frames_are_json_with_their_fields(
        component in nasty(), code in nasty(), message in nasty(), sub in prop::option::of(nasty()),
    ) {
        let v: Value = serde_json::from_str(&protocol::error_frame(&component, &code, &message, sub.as_deref())).unwrap();
        prop_assert_eq!(&v["type"], "error");
        prop_assert_eq!(v["code"].as_str(), Some(code.as_str()));
        prop_assert_eq!(v["message"].as_str(), Some(message.as_str()));
        prop_assert_eq!(v["details"]["component"].as_str(), Some(component.as_str()));
        prop_assert_eq!(v.get("subscription").and_then(Value::as_str), sub.as_deref());
    }
}

// ---- Phoenix frames --------------------------------------------------------

fn phx_message() -> impl Strategy<Value = PhxMessage> {
    (
        prop::option::of(nasty()),
        prop::option::of(nasty()),
        nasty(),
        nasty(),
        json_value(),
    )
        .prop_map(|(join_ref, msg_ref, topic, event, payload)| PhxMessage {
            join_ref,
            msg_ref,
            topic,
            event,
            payload,
        })
}

/// realtime-js's binary push (kind 3), as `lib/serializer.js` writes it.
fn push_frame(
    join_ref: &str,
    msg_ref: &str,
    topic: &str,
    event: &str,
    payload: &BroadcastPayload,
) -> Vec<u8> {
    let (encoding, body) = match payload {
        BroadcastPayload::Json(v) => (1u8, v.to_string().into_bytes()),
        BroadcastPayload::Binary(b) => (0u8, b.to_vec()),
    };
    let mut f = vec![
        3,
        join_ref.len() as u8,
        msg_ref.len() as u8,
        topic.len() as u8,
        event.len() as u8,
        0,
        encoding,
    ];
    for s in [join_ref, msg_ref, topic, event] {
        f.extend(s.as_bytes());
    }
    f.extend(body);
    f
}

fn broadcast_payload() -> impl Strategy<Value = BroadcastPayload> {
    prop_oneof![
        json_value().prop_map(BroadcastPayload::Json),
        prop::collection::vec(any::<u8>(), 0..64)
            .prop_map(|b| BroadcastPayload::Binary(Bytes::from(b))),
    ]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn phoenix_messages_round_trip_in_both_framings(m in phx_message()) {
        for vsn in [Vsn::V1, Vsn::V2] {
            prop_assert_eq!(Vsn::parse_or_garbage(&vsn.encode(&m)), Ok(m.clone()));
        }
    }

    /// Garbage is answered on a topic (its own when readable, else `phoenix`)
    /// with a reason; it never panics.
    #[test]
    fn phoenix_garbage_gets_a_topic_and_a_reason(text in nasty(), v in json_value()) {
        for input in [text, v.to_string()] {
            if let Err(g) = Vsn::parse_or_garbage(&input) {
                prop_assert!(!g.topic.is_empty() && !g.reason.is_empty());
            }
        }
    }

    #[test]
    fn binary_pushes_decode_what_realtime_js_encodes(
        join_ref in "[0-9]{0,4}", msg_ref in "[0-9]{0,4}",
        topic in "\\PC{0,40}", event in "\\PC{0,40}", payload in broadcast_payload(),
        junk in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        prop_assume!(topic.len() < 256 && event.len() < 256);
        let _ = decode_user_broadcast_push(&junk);
        let p = decode_user_broadcast_push(&push_frame(&join_ref, &msg_ref, &topic, &event, &payload))
            .expect("a well-formed push decodes");
        prop_assert_eq!(p.join_ref, (!join_ref.is_empty()).then_some(join_ref));
        prop_assert_eq!(p.msg_ref, (!msg_ref.is_empty()).then_some(msg_ref));
        prop_assert_eq!((p.topic, p.event, p.payload), (topic, event, payload));
    }

    /// The server's binary broadcast (kind 4) carries what it was given, as
    /// realtime-js's decoder reads it; names over 255 bytes are refused.
    #[test]
    fn binary_broadcasts_carry_topic_event_and_payload(
        topic in "\\PC{0,300}", event in "\\PC{0,40}", payload in broadcast_payload(),
    ) {
        let Some(f) = encode_user_broadcast(&topic, &event, &payload) else {
            prop_assert!(topic.len() > 255);
            return Ok(());
        };
        prop_assert_eq!((f[0], f[3]), (4, 0));
        let (tl, el) = (usize::from(f[1]), usize::from(f[2]));
        prop_assert_eq!(&f[5..5 + tl], topic.as_bytes());
        prop_assert_eq!(&f[5 + tl..5 + tl + el], event.as_bytes());
        let body = &f[5 + tl + el..];
        match (&payload, f[4]) {
            (BroadcastPayload::Json(v), 1) => prop_assert_eq!(&serde_json::from_slice::<Value>(body).unwrap(), v),
            (BroadcastPayload::Binary(b), 0) => prop_assert_eq!(body, &b[..]),
            _ => prop_assert!(false, "wrong encoding byte {}", f[4]),
        }
    }
}

// ---- object paths ----------------------------------------------------------

fn segment() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9äöü _.\\-]{1,16}".prop_filter("not a dot segment or blank", |s| {
        s != "." && s != ".." && !s.trim().is_empty()
    })
}

proptest! {
    #![proptest_config(config())]

    /// Whatever is accepted is clean, and its text parses back to itself.
    #[test]
    fn accepted_paths_are_clean_and_stable(raw in prop_oneof![nasty(), "[a./\\\\\\x00 ]{0,12}"]) {
        if let Ok(p) = ObjectPath::parse_any(&raw) {
            let text = p.to_string();
            prop_assert!(text.len() <= MAX_PATH_BYTES);
            prop_assert!(!text.starts_with('/') && !text.contains('\\') && !text.contains("//"));
            prop_assert!(!text.chars().any(char::is_control), "{:?}", text);
            prop_assert!(text.split('/').count() <= MAX_DEPTH);
            if !p.is_root() {
                prop_assert!(text.split('/').all(|s| s != "." && s != ".." && !s.is_empty()));
                prop_assert_eq!(ObjectPath::parse(&format!("{text}/")), Ok(p.clone()));
            }
            prop_assert_eq!(ObjectPath::parse_any(&text), Ok(p));
        }
    }

    #[test]
    fn well_formed_paths_are_kept_as_written(segs in prop::collection::vec(segment(), 1..6)) {
        let raw = segs.join("/");
        let p = ObjectPath::parse(&raw).map_err(|e| TestCaseError::fail(format!("{raw:?}: {e}")))?;
        prop_assert_eq!(p.to_string(), raw.clone());
        prop_assert_eq!(p.name(), segs.last().unwrap().as_str());
        prop_assert_eq!(p.parent().join(p.name()), Ok(p.clone()));
        let last = p.prefixes().last().map(|q| q.to_string());
        prop_assert_eq!(last.as_deref(), Some(raw.as_str()));
    }
}
