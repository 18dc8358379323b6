//! `ALLOWED_FILE_TYPES`: which uploads are accepted, by MIME type or file name.
//!
//! A comma-separated list of rules, any of which admits a file:
//! - `image/*`: any subtype of a type (matched against the MIME type);
//! - `application/pdf`: one exact MIME type;
//! - `.docx`: a file-name ending (case-insensitive; `.tar.gz` works too);
//! - `*` or `*/*`: anything.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Rule {
    Any,
    /// `image/*`, stored as `image`.
    TypeWildcard(String),
    /// `application/pdf`.
    Exact(String),
    /// `.docx`, stored lower-case with its dot.
    Extension(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedTypes {
    rules: Vec<Rule>,
    /// The list as configured, for messages.
    text: String,
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'!' | b'#' | b'$' | b'&' | b'^' | b'_' | b'.' | b'+' | b'-'
                )
        })
}

/// `Type/Subtype; charset=x` → `type/subtype`; `None` when it is not a MIME type.
pub fn normalize_mime(raw: &str) -> Option<String> {
    let essence = raw.split(';').next()?.trim().to_ascii_lowercase();
    let (t, sub) = essence.split_once('/')?;
    (is_token(t) && is_token(sub)).then_some(essence)
}

impl AllowedTypes {
    pub fn parse(list: &str) -> Result<Self, String> {
        let mut rules = Vec::new();
        let mut shown = Vec::new();
        for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let lower = item.to_ascii_lowercase();
            let rule = if lower == "*" || lower == "*/*" {
                Rule::Any
            } else if let Some(ext) = lower.strip_prefix('.') {
                let ok = !ext.is_empty()
                    && ext.bytes().all(|b| {
                        b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'+')
                    });
                if !ok {
                    return Err(format!("{item:?} is not a file extension like .docx"));
                }
                Rule::Extension(lower.clone())
            } else if let Some((t, sub)) = lower.split_once('/') {
                if !is_token(t) || !(sub == "*" || is_token(sub)) {
                    return Err(format!(
                        "{item:?} is not a MIME type like image/png or image/*"
                    ));
                }
                if sub == "*" {
                    Rule::TypeWildcard(t.to_owned())
                } else {
                    Rule::Exact(lower.clone())
                }
            } else {
                return Err(format!(
                    "{item:?} is neither a MIME type (image/png, image/*) nor an extension (.docx)"
                ));
            };
            rules.push(rule);
            shown.push(lower);
        }
        if rules.is_empty() {
            return Err("names no file type (example: image/*,application/pdf,.docx)".into());
        }
        Ok(AllowedTypes {
            rules,
            text: shown.join(","),
        })
    }

    /// Whether a file of MIME type `mime` named `file_name` may be stored.
    pub fn allows(&self, mime: &str, file_name: &str) -> bool {
        let mime = normalize_mime(mime).unwrap_or_default();
        let name = file_name.to_lowercase();
        self.rules.iter().any(|r| match r {
            Rule::Any => true,
            Rule::TypeWildcard(t) => mime.split_once('/').is_some_and(|(mt, _)| mt == t.as_str()),
            Rule::Exact(m) => mime == *m,
            Rule::Extension(ext) => name.len() > ext.len() && name.ends_with(ext.as_str()),
        })
    }

    /// Exact MIME types and wildcards only (bucket-level `allowed_mime_types`).
    pub fn from_mime_list(list: &[String]) -> Option<Self> {
        let joined = list.join(",");
        Self::parse(&joined).ok()
    }
}

impl fmt::Display for AllowedTypes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_exact_types_and_extensions() {
        let a = AllowedTypes::parse(" image/* , application/PDF,.doc,.DOCX ,").unwrap();
        assert!(a.allows("image/png", "x"));
        assert!(a.allows("IMAGE/JPEG; foo=bar", "x"));
        assert!(a.allows("application/pdf", "x.bin"));
        assert!(a.allows("application/octet-stream", "Report.Docx"));
        assert!(a.allows("", "old.doc"));
        assert!(!a.allows("application/octet-stream", "x.docm"));
        assert!(!a.allows("text/html", "index.html"));
        assert!(!a.allows("imagex/png", "x"));
        assert!(!a.allows("application/pdfx", "x"));
        assert!(
            !a.allows("text/plain", ".doc"),
            "a bare extension is no name"
        );
        assert_eq!(a.to_string(), "image/*,application/pdf,.doc,.docx");
        assert!(AllowedTypes::parse("*").unwrap().allows("x/y", "z"));
        assert!(AllowedTypes::parse("image").is_err());
        assert!(AllowedTypes::parse("./x").is_err());
        assert!(AllowedTypes::parse("a b/c").is_err());
        assert!(AllowedTypes::parse(" , ").is_err());
        assert_eq!(
            normalize_mime("Text/Plain; charset=utf-8").as_deref(),
            Some("text/plain")
        );
        assert_eq!(normalize_mime("nonsense"), None);
    }
}
