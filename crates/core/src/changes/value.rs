//! PostgreSQL text output → JSON, by type OID.
//!
//! The walsender's text format is pinned by the replication connection's startup
//! settings (DateStyle ISO, TimeZone UTC, extra_float_digits 3), so the parsing here
//! does not depend on server defaults. Anything not understood becomes a JSON string
//! holding the text exactly as PostgreSQL printed it: a value is never dropped.

use serde_json::{Map, Number, Value};

pub mod oid {
    pub const BOOL: u32 = 16;
    pub const BYTEA: u32 = 17;
    pub const INT8: u32 = 20;
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const OID: u32 = 26;
    pub const JSON: u32 = 114;
    pub const FLOAT4: u32 = 700;
    pub const FLOAT8: u32 = 701;
    pub const DATE: u32 = 1082;
    pub const TIMESTAMP: u32 = 1114;
    pub const TIMESTAMPTZ: u32 = 1184;
    pub const NUMERIC: u32 = 1700;
    pub const UUID: u32 = 2950;
    pub const JSONB: u32 = 3802;
}

/// The element type of a built-in array type, if `type_oid` is one.
pub fn array_element(type_oid: u32) -> Option<u32> {
    Some(match type_oid {
        1000 => oid::BOOL,
        1001 => oid::BYTEA,
        1005 => oid::INT2,
        1007 => oid::INT4,
        1016 => oid::INT8,
        1028 => oid::OID,
        1021 => oid::FLOAT4,
        1022 => oid::FLOAT8,
        1231 => oid::NUMERIC,
        1182 => oid::DATE,
        1115 => oid::TIMESTAMP,
        1185 => oid::TIMESTAMPTZ,
        2951 => oid::UUID,
        199 => oid::JSON,
        3807 => oid::JSONB,
        // text[], varchar[], bpchar[], name[], char[], time[], interval[] … : strings
        1009 | 1015 | 1014 | 1003 | 1002 | 1183 | 1187 | 1270 => 25,
        _ => return None,
    })
}

/// Converts one text-format value of type `type_oid` to JSON.
pub fn text_to_json(type_oid: u32, raw: &[u8]) -> Value {
    let Ok(text) = std::str::from_utf8(raw) else {
        // The connection asks for UTF8, so this is unreachable in practice; keep the
        // bytes visible rather than failing the stream.
        return Value::String(String::from_utf8_lossy(raw).into_owned());
    };
    if let Some(elem) = array_element(type_oid) {
        return match parse_array(text, elem) {
            Some(v) => v,
            None => Value::String(text.to_owned()),
        };
    }
    scalar(type_oid, text)
}

fn scalar(type_oid: u32, text: &str) -> Value {
    match type_oid {
        oid::BOOL => match text {
            "t" => Value::Bool(true),
            "f" => Value::Bool(false),
            _ => Value::String(text.to_owned()),
        },
        oid::INT2 | oid::INT4 | oid::INT8 | oid::OID => match text.parse::<i64>() {
            Ok(i) => Value::Number(i.into()),
            Err(_) => Value::String(text.to_owned()),
        },
        oid::FLOAT4 | oid::FLOAT8 => match text.parse::<f64>().ok().and_then(Number::from_f64) {
            Some(n) => Value::Number(n),
            // NaN and ±Infinity have no JSON number.
            None => Value::String(text.to_owned()),
        },
        oid::NUMERIC => numeric(text),
        oid::JSON | oid::JSONB => {
            serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_owned()))
        }
        oid::TIMESTAMPTZ => Value::String(timestamptz_iso(text)),
        oid::TIMESTAMP => Value::String(text.replacen(' ', "T", 1)),
        _ => Value::String(text.to_owned()),
    }
}

/// A numeric stays a JSON number only when an IEEE double holds it exactly
/// (JavaScript clients parse JSON numbers as doubles); otherwise its exact text.
fn numeric(text: &str) -> Value {
    let digits = text.bytes().filter(u8::is_ascii_digit).count();
    let plain = text
        .bytes()
        .all(|b| b.is_ascii_digit() || b == b'-' || b == b'.');
    if plain && digits <= 15 {
        if let Ok(i) = text.parse::<i64>() {
            return Value::Number(i.into());
        }
        if let Some(n) = text.parse::<f64>().ok().and_then(Number::from_f64) {
            return Value::Number(n);
        }
    }
    Value::String(text.to_owned())
}

/// `2026-11-21 23:39:14.123+00` → `2026-11-21T23:39:14.123Z`; `+05:30` offsets kept.
fn timestamptz_iso(text: &str) -> String {
    // PostgreSQL with TimeZone UTC (the embedded cluster's and most servers')
    // prints `+00`: rewrite the text without a parse, which was a visible share
    // of catch-up CPU. Anything else takes chrono's path.
    if let Some(iso) = utc_iso_fast(text) {
        return iso;
    }
    timestamptz_iso_chrono(text)
}

/// `YYYY-MM-DD HH:MM:SS[.f{1,6}]+00` → RFC 3339 with chrono's `AutoSi`
/// fraction (none, 3 or 6 digits), or `None` for any other shape.
fn utc_iso_fast(text: &str) -> Option<String> {
    let b = text.as_bytes();
    let body = b.strip_suffix(b"+00")?;
    if body.len() < 19 {
        return None;
    }
    let (date_time, frac) = body.split_at(19);
    let shape_ok = date_time.iter().enumerate().all(|(i, &c)| match i {
        4 | 7 => c == b'-',
        10 => c == b' ',
        13 | 16 => c == b':',
        _ => c.is_ascii_digit(),
    });
    if !shape_ok {
        return None;
    }
    let digits = match frac {
        [] => &[][..],
        [b'.', rest @ ..] if !rest.is_empty() && rest.len() <= 6 => rest,
        _ => return None,
    };
    if !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    // Field ranges chrono would refuse (month 13, 24:00:00, Feb 30) go to chrono,
    // which keeps PostgreSQL's text for them.
    let num = |r: std::ops::Range<usize>| {
        date_time[r]
            .iter()
            .fold(0u32, |n, &c| n * 10 + u32::from(c - b'0'))
    };
    let (month, day) = (num(5..7), num(8..10));
    if !(1..=12).contains(&month) || !(1..=28).contains(&day) {
        return None;
    }
    if num(11..13) > 23 || num(14..16) > 59 || num(17..19) > 59 {
        return None;
    }
    let significant = digits.len() - digits.iter().rev().take_while(|&&c| c == b'0').count();
    let width = match significant {
        0 => 0,
        1..=3 => 3,
        _ => 6,
    };
    let mut out = String::with_capacity(19 + 1 + width + 1);
    // The prefix was checked to be ASCII above.
    out.push_str(&text[..10]);
    out.push('T');
    out.push_str(&text[11..19]);
    if width > 0 {
        out.push('.');
        for i in 0..width {
            out.push(char::from(*digits.get(i).unwrap_or(&b'0')));
        }
    }
    out.push('Z');
    Some(out)
}

fn timestamptz_iso_chrono(text: &str) -> String {
    match chrono::DateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f%#z") {
        Ok(dt) => dt
            .with_timezone(&chrono::Utc)
            .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
        // infinity, BC dates, years past 9999: keep PostgreSQL's own text.
        Err(_) => text.to_owned(),
    }
}

/// Parses PostgreSQL's array text form (`{1,2,NULL}`, `{"a b","c\"d"}`, nested).
fn parse_array(text: &str, elem: u32) -> Option<Value> {
    // Arrays with explicit bounds look like `[0:1]={…}`: drop the bounds.
    let body = match text.find('=') {
        Some(i) if text.starts_with('[') => &text[i + 1..],
        _ => text,
    };
    let bytes = body.as_bytes();
    let mut pos = 0;
    let v = parse_array_level(bytes, &mut pos, elem)?;
    (pos == bytes.len()).then_some(v)
}

fn parse_array_level(b: &[u8], pos: &mut usize, elem: u32) -> Option<Value> {
    if b.get(*pos) != Some(&b'{') {
        return None;
    }
    *pos += 1;
    let mut out = Vec::new();
    if b.get(*pos) == Some(&b'}') {
        *pos += 1;
        return Some(Value::Array(out));
    }
    loop {
        match b.get(*pos)? {
            b'{' => out.push(parse_array_level(b, pos, elem)?),
            b'"' => {
                *pos += 1;
                let mut s = Vec::new();
                loop {
                    match *b.get(*pos)? {
                        b'\\' => {
                            s.push(*b.get(*pos + 1)?);
                            *pos += 2;
                        }
                        b'"' => {
                            *pos += 1;
                            break;
                        }
                        c => {
                            s.push(c);
                            *pos += 1;
                        }
                    }
                }
                out.push(scalar(elem, std::str::from_utf8(&s).ok()?));
            }
            _ => {
                let start = *pos;
                while !matches!(b.get(*pos)?, b',' | b'}') {
                    *pos += 1;
                }
                let item = std::str::from_utf8(&b[start..*pos]).ok()?;
                out.push(if item.eq_ignore_ascii_case("NULL") {
                    Value::Null
                } else {
                    scalar(elem, item)
                });
            }
        }
        match b.get(*pos)? {
            b',' => *pos += 1,
            b'}' => {
                *pos += 1;
                return Some(Value::Array(out));
            }
            _ => return None,
        }
    }
}

/// Builds a JSON object from column names and values, in column order.
pub fn object<'a>(pairs: impl Iterator<Item = (&'a str, &'a Value)>) -> Value {
    let mut m = Map::new();
    for (k, v) in pairs {
        m.insert(k.to_owned(), v.clone());
    }
    Value::Object(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn scalars() {
        assert_eq!(text_to_json(oid::BOOL, b"t"), json!(true));
        assert_eq!(
            text_to_json(oid::INT8, b"-9223372036854775808"),
            json!(i64::MIN)
        );
        assert_eq!(text_to_json(oid::FLOAT8, b"1.5"), json!(1.5));
        assert_eq!(text_to_json(oid::FLOAT8, b"NaN"), json!("NaN"));
        assert_eq!(text_to_json(oid::NUMERIC, b"12.25"), json!(12.25));
        assert_eq!(
            text_to_json(oid::NUMERIC, b"12345678901234567890.123"),
            json!("12345678901234567890.123")
        );
        assert_eq!(text_to_json(oid::NUMERIC, b"NaN"), json!("NaN"));
        assert_eq!(
            text_to_json(oid::JSONB, br#"{"a":[1,2]}"#),
            json!({"a":[1,2]})
        );
        assert_eq!(
            text_to_json(oid::TIMESTAMPTZ, b"2026-11-21 23:39:14.123+00"),
            json!("2026-11-21T23:39:14.123Z")
        );
        assert_eq!(
            text_to_json(oid::TIMESTAMPTZ, b"2026-11-21 23:39:14+05:30"),
            json!("2026-11-21T18:09:14Z")
        );
        assert_eq!(
            text_to_json(oid::TIMESTAMPTZ, b"infinity"),
            json!("infinity")
        );
        assert_eq!(
            text_to_json(oid::TIMESTAMP, b"2026-11-21 23:39:14"),
            json!("2026-11-21T23:39:14")
        );
        assert_eq!(text_to_json(oid::BYTEA, b"\\x0102"), json!("\\x0102"));
    }

    #[test]
    fn utc_timestamps_fast_path_matches_chrono() {
        let cases = [
            "2026-11-21 23:39:14+00",
            "2026-11-21 23:39:14.1+00",
            "2026-11-21 23:39:14.12+00",
            "2026-11-21 23:39:14.123+00",
            "2026-11-21 23:39:14.1234+00",
            "2026-11-21 23:39:14.12345+00",
            "2026-11-21 23:39:14.123456+00",
            "2026-11-21 23:39:14.100+00",
            "2026-11-21 23:39:14.000+00",
            "2026-11-21 23:39:14.120000+00",
            "2026-02-28 00:00:00.000001+00",
            "0001-01-01 00:00:00+00",
            "9999-12-28 23:59:59.999999+00",
        ];
        for text in cases {
            assert_eq!(
                utc_iso_fast(text).as_deref(),
                Some(timestamptz_iso_chrono(text).as_str()),
                "{text}"
            );
        }
        // Shapes the fast path leaves to chrono.
        for text in [
            "2026-11-21 23:39:14+05:30",
            "2026-11-21 23:39:14.1234567+00",
            "2026-13-21 23:39:14+00",
            "2026-02-30 23:39:14+00",
            "2026-11-21 24:00:00+00",
            "infinity",
            "12026-11-21 23:39:14+00",
            "2026-11-21 23:39:14.+00",
            "2026-11-21 23:39:14.12a+00",
            "2026-11-21 23:39:14 BC+00",
        ] {
            assert_eq!(utc_iso_fast(text), None, "{text}");
        }
        assert_eq!(
            timestamptz_iso("2026-11-21 23:39:14.5+00"),
            "2026-11-21T23:39:14.500Z"
        );
        assert_eq!(
            timestamptz_iso("2026-11-21 23:39:14+05:30"),
            "2026-11-21T18:09:14Z"
        );
    }

    #[test]
    fn arrays() {
        assert_eq!(text_to_json(1007, b"{1,2,NULL}"), json!([1, 2, null]));
        assert_eq!(
            text_to_json(1009, br#"{"a b","c\"d",NULL,"NULL",x}"#),
            json!(["a b", "c\"d", null, "NULL", "x"])
        );
        assert_eq!(
            text_to_json(1007, b"{{1,2},{3,4}}"),
            json!([[1, 2], [3, 4]])
        );
        assert_eq!(text_to_json(1007, b"{}"), json!([]));
        assert_eq!(text_to_json(1007, b"[0:1]={5,6}"), json!([5, 6]));
        assert_eq!(text_to_json(3807, br#"{"{\"a\":1}"}"#), json!([{"a": 1}]));
        // Malformed: kept as text, no panic.
        assert_eq!(text_to_json(1007, b"{1,2"), json!("{1,2"));
        assert_eq!(text_to_json(1007, b"{\"1"), json!("{\"1"));
    }
}
