//! Checks on values from requests, made before they reach SQL.
//!
//! PostgreSQL `text` (and `jsonb`) cannot hold a NUL byte: a query given one
//! fails, which used to surface as a 500. So a NUL anywhere in a request value
//! (JSON body, query string, URL segment) is refused with a 400 in the route's
//! own error format, and identifiers (bucket names) refuse every control
//! character too, since no legitimate name has one. Free text keeps tabs and
//! newlines. The extractors in [`super::extract`] run these checks, so a handler
//! never sees an unchecked value; the WebSocket frames have theirs in
//! `realtime::protocol`.

use serde_json::Value;

use super::error::ApiError;
use aether_storage::StorageError;
use aether_storage::path::{ObjectPath, PathError};

/// What kind of value was refused: each front end has its own code for each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Any other value: only NUL is refused.
    Text,
    /// A bucket id (native `storage/invalid-bucket`, Supabase `InvalidBucketName`).
    Bucket,
    /// An object path (native `storage/invalid-path`, Supabase `InvalidKey`).
    Path,
}

/// A refused request value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Invalid {
    pub kind: Kind,
    /// Where the value was: a field name, query parameter or JSON pointer.
    pub field: String,
    pub reason: String,
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

/// The native code of each kind (docs/auth-files.md).
pub(crate) const CODE_TEXT: &str = "invalid_characters";
pub(crate) const CODE_BUCKET: &str = "storage/invalid-bucket";

impl From<Invalid> for ApiError {
    fn from(e: Invalid) -> Self {
        match e.kind {
            Kind::Text => ApiError::bad_request(CODE_TEXT, e.to_string()),
            Kind::Bucket => ApiError::bad_request(CODE_BUCKET, e.to_string()),
            Kind::Path => StorageError::InvalidPath(PathError(e.reason)).into(),
        }
    }
}

fn nul(kind: Kind, field: &str) -> Invalid {
    Invalid {
        kind,
        field: field.to_owned(),
        reason: "contains a NUL byte, which cannot be stored".to_owned(),
    }
}

/// Free text: anything but NUL.
pub(crate) fn text(field: &str, value: &str) -> Result<(), Invalid> {
    if value.contains('\0') {
        return Err(nul(Kind::Text, field));
    }
    Ok(())
}

/// A bucket id: no NUL and no control character. Whether such a bucket exists
/// is the storage core's question (operators may create buckets with SQL, so
/// the stricter rule for new ids is not applied to lookups).
pub(crate) fn bucket(field: &str, value: &str) -> Result<(), Invalid> {
    if let Some(c) = value.chars().find(|c| c.is_control()) {
        return Err(Invalid {
            kind: Kind::Bucket,
            field: field.to_owned(),
            reason: if c == '\0' {
                "a bucket id cannot contain a NUL byte".to_owned()
            } else {
                format!(
                    "a bucket id cannot contain control characters (found U+{:04X})",
                    c as u32
                )
            },
        });
    }
    Ok(())
}

/// An object path, checked by the storage core's own rules.
pub(crate) fn path(field: &str, value: &str) -> Result<(), Invalid> {
    ObjectPath::parse_any(value)
        .map(|_| ())
        .map_err(|e| Invalid {
            kind: Kind::Path,
            field: field.to_owned(),
            reason: e.0,
        })
}

/// Every string and key of a JSON document, at any depth (serde_json bounds the
/// depth at 128 when parsing). The field is the value's JSON pointer.
pub(crate) fn json(value: &Value) -> Result<(), Invalid> {
    fn walk(v: &Value, at: &mut String) -> Result<(), Invalid> {
        match v {
            Value::String(s) => text(pointer(at), s),
            Value::Array(items) => items.iter().enumerate().try_for_each(|(i, item)| {
                let len = at.len();
                at.push('/');
                at.push_str(&i.to_string());
                let r = walk(item, at);
                at.truncate(len);
                r
            }),
            Value::Object(map) => map.iter().try_for_each(|(k, item)| {
                let len = at.len();
                at.push('/');
                at.push_str(&k.replace('\0', "\\u0000"));
                if k.contains('\0') {
                    return Err(nul(Kind::Text, pointer(at)));
                }
                let r = walk(item, at);
                at.truncate(len);
                r
            }),
            _ => Ok(()),
        }
    }
    fn pointer(at: &str) -> &str {
        if at.is_empty() { "body" } else { at }
    }
    walk(value, &mut String::new())
}

/// Decoded query-string pairs: keys and values.
pub(crate) fn pairs<'a>(
    pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<(), Invalid> {
    for (k, v) in pairs {
        if k.contains('\0') {
            return Err(nul(Kind::Text, "query parameter name"));
        }
        text(k, v)?;
    }
    Ok(())
}

/// URL path parameters (percent-decoded). The name says what a value is: a
/// `bucket` is an identifier, a `path` an object path, anything else text.
pub(crate) fn path_params<'a>(
    params: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<(), Invalid> {
    for (name, value) in params {
        match name {
            "bucket" => bucket(name, value)?,
            "path" if value.contains('\0') => path(name, value)?,
            _ => text(name, value)?,
        }
    }
    Ok(())
}

/// Field checks a request type makes before the generic NUL check, so that a
/// bad bucket or path gets its own code rather than `invalid_characters`.
pub(crate) trait Validate {
    fn validate(&self) -> Result<(), Invalid> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn nul_anywhere_in_json_is_found_with_its_pointer() {
        assert!(json(&json!({"a": ["x", {"b": "tab\there\nnewline"}]})).is_ok());
        let e = json(&json!({"a": ["x", {"b": "a\u{0}b"}]})).unwrap_err();
        assert_eq!((e.kind, e.field.as_str()), (Kind::Text, "/a/1/b"));
        let e = json(&json!({"k\u{0}": 1})).unwrap_err();
        assert_eq!(e.kind, Kind::Text);
        assert!(json(&json!("\u{0}")).is_err());
    }

    #[test]
    fn identifiers_refuse_control_characters_text_only_nul() {
        assert!(bucket("bucket", "files").is_ok());
        assert!(bucket("bucket", "é-ü.x").is_ok());
        for bad in ["\u{0}x", "a\tb", "a\nb", "\u{7f}", "\u{85}"] {
            assert_eq!(
                bucket("bucket", bad).unwrap_err().kind,
                Kind::Bucket,
                "{bad:?}"
            );
        }
        assert!(text("t", "a\tb\r\nc").is_ok());
        assert!(text("t", "a\u{0}").is_err());
        assert!(pairs([("a", "b\t")]).is_ok());
        assert!(pairs([("a\u{0}", "b")]).is_err());
        let e = path_params([("bucket", "files"), ("path", "a\u{0}b")]).unwrap_err();
        assert_eq!(e.kind, Kind::Path);
        // Other path problems are the handler's (it parses the path itself).
        assert!(path_params([("path", "../x")]).is_ok());
        assert_eq!(
            path_params([("token", "\u{0}")]).unwrap_err().kind,
            Kind::Text
        );
    }

    #[test]
    fn native_codes() {
        let e: ApiError = bucket("bucket", "\u{0}").unwrap_err().into();
        assert_eq!((e.status.as_u16(), e.code), (400, CODE_BUCKET));
        let e: ApiError = text("q", "\u{0}").unwrap_err().into();
        assert_eq!((e.status.as_u16(), e.code), (400, CODE_TEXT));
        let e: ApiError = path("path", "a\u{0}").unwrap_err().into();
        assert_eq!((e.status.as_u16(), e.code), (400, "storage/invalid-path"));
    }
}
