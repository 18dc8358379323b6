//! Object paths: `docs/2024/report.pdf`, the name of an object in a bucket.
//!
//! Paths are checked, never repaired: a leading `/`, a `.` or `..` segment, an empty
//! segment (`a//b`), a backslash, NUL or any control character is refused with a
//! reason. One trailing `/` is allowed and means the same path (a folder). Paths
//! never name bytes on disk (blobs have generated keys), so this is about clean,
//! unambiguous names rather than the only line of defence.

use std::fmt;

/// An object's whole name: 1,024 bytes and 32 levels, plus a user's folder
/// (`<user id>/`, 37 bytes, one level), so that a seed path of the old
/// limits still fits once it is under its owner's folder, plus the 11 bytes
/// of the ` (1a2b3c4d)` that migration 0016 gives a name it had to rename.
pub const MAX_PATH_BYTES: usize = 1024 + 37 + 11;
/// A name of 255 bytes, plus that suffix.
pub const MAX_SEGMENT_BYTES: usize = 255 + 11;
pub const MAX_DEPTH: usize = 32 + 1;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PathError(pub String);

/// A checked path; the empty path is the root of a bucket.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ObjectPath {
    segments: Vec<String>,
}

fn bad(reason: impl Into<String>) -> PathError {
    PathError(reason.into())
}

/// Checks one path segment (a file or folder name).
pub fn check_segment(s: &str) -> Result<(), PathError> {
    if s.is_empty() {
        return Err(bad("empty path segment ('//' or a leading or doubled '/')"));
    }
    if s == "." || s == ".." {
        return Err(bad("'.' and '..' segments are not allowed"));
    }
    if s.len() > MAX_SEGMENT_BYTES {
        return Err(bad(format!(
            "a name is longer than {MAX_SEGMENT_BYTES} bytes"
        )));
    }
    if s.contains('\\') {
        return Err(bad("backslashes are not allowed in paths"));
    }
    if s.contains('/') {
        return Err(bad("a name cannot contain '/'"));
    }
    if s.chars().any(char::is_control) {
        return Err(bad("NUL and control characters are not allowed in paths"));
    }
    if s.trim().is_empty() {
        return Err(bad("a name cannot be only spaces"));
    }
    Ok(())
}

impl ObjectPath {
    pub fn root() -> Self {
        ObjectPath {
            segments: Vec::new(),
        }
    }

    /// A user's home folder: `<user id>`, where the seed routes keep the
    /// user's files.
    pub fn home(user: uuid::Uuid) -> Self {
        ObjectPath {
            segments: vec![user.hyphenated().to_string()],
        }
    }

    /// Any path, the root (`""`) included.
    pub fn parse_any(raw: &str) -> Result<Self, PathError> {
        if raw.len() > MAX_PATH_BYTES {
            return Err(bad(format!("path is longer than {MAX_PATH_BYTES} bytes")));
        }
        if raw.starts_with('/') {
            return Err(bad("absolute paths are not allowed: drop the leading '/'"));
        }
        if raw.contains('\0') {
            return Err(bad("NUL and control characters are not allowed in paths"));
        }
        let body = raw.strip_suffix('/').unwrap_or(raw);
        if body.is_empty() {
            return Ok(Self::root());
        }
        let segments: Vec<String> = body.split('/').map(str::to_owned).collect();
        if segments.len() > MAX_DEPTH {
            return Err(bad(format!("path is deeper than {MAX_DEPTH} levels")));
        }
        for s in &segments {
            check_segment(s)?;
        }
        Ok(ObjectPath { segments })
    }

    /// A path that names something (not the root).
    pub fn parse(raw: &str) -> Result<Self, PathError> {
        let p = Self::parse_any(raw)?;
        if p.is_root() {
            return Err(bad("path is empty"));
        }
        Ok(p)
    }

    pub fn is_root(&self) -> bool {
        self.segments.is_empty()
    }

    /// The last segment; `""` for the root.
    pub fn name(&self) -> &str {
        self.segments.last().map(String::as_str).unwrap_or("")
    }

    pub fn parent(&self) -> ObjectPath {
        let n = self.segments.len().saturating_sub(1);
        ObjectPath {
            segments: self.segments[..n].to_vec(),
        }
    }

    pub fn join(&self, name: &str) -> Result<ObjectPath, PathError> {
        check_segment(name)?;
        let mut segments = self.segments.clone();
        segments.push(name.to_owned());
        Self::bounded(segments)
    }

    /// Checked segments as a path, if within the depth and length limits.
    fn bounded(segments: Vec<String>) -> Result<ObjectPath, PathError> {
        if segments.len() > MAX_DEPTH {
            return Err(bad(format!("path is deeper than {MAX_DEPTH} levels")));
        }
        let p = ObjectPath { segments };
        if p.to_string().len() > MAX_PATH_BYTES {
            return Err(bad(format!("path is longer than {MAX_PATH_BYTES} bytes")));
        }
        Ok(p)
    }

    /// This path inside `dir` (`dir/self`), checked against the limits as a
    /// whole.
    pub fn within(&self, dir: &ObjectPath) -> Result<ObjectPath, PathError> {
        let mut segments = dir.segments.clone();
        segments.extend(self.segments.iter().cloned());
        Self::bounded(segments)
    }

    /// What is left of this path below `dir`, if it is inside it (`dir`
    /// itself: the root).
    pub fn relative_to(&self, dir: &ObjectPath) -> Option<ObjectPath> {
        self.segments
            .strip_prefix(dir.segments.as_slice())
            .map(|rest| ObjectPath {
                segments: rest.to_vec(),
            })
    }

    /// Every non-root prefix, shortest first: `a/b/c` → `a`, `a/b`, `a/b/c`.
    pub fn prefixes(&self) -> impl Iterator<Item = ObjectPath> + '_ {
        (1..=self.segments.len()).map(|n| ObjectPath {
            segments: self.segments[..n].to_vec(),
        })
    }
}

impl fmt::Display for ObjectPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.segments.join("/"))
    }
}

/// The name part of a client-supplied file name (browsers of old sent full paths).
pub fn base_name(file_name: &str) -> &str {
    file_name.rsplit(['/', '\\']).next().unwrap_or(file_name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_clean_paths_and_one_trailing_slash() {
        let p = ObjectPath::parse("docs/2024/report.pdf").unwrap();
        assert_eq!(p.to_string(), "docs/2024/report.pdf");
        assert_eq!(p.name(), "report.pdf");
        assert_eq!(p.parent().to_string(), "docs/2024");
        let prefixes: Vec<String> = p.parent().prefixes().map(|p| p.to_string()).collect();
        assert_eq!(prefixes, ["docs", "docs/2024"]);
        assert_eq!(ObjectPath::parse("docs/").unwrap().to_string(), "docs");
        assert!(ObjectPath::parse_any("").unwrap().is_root());
        assert!(
            ObjectPath::parse_any("/").is_err(),
            "a lone '/' is absolute"
        );
        assert_eq!(
            ObjectPath::parse("résumé 1.pdf").unwrap().name(),
            "résumé 1.pdf"
        );
        assert_eq!(ObjectPath::root().join("a").unwrap().to_string(), "a");
        let home = ObjectPath::parse("u1").unwrap();
        let inside = p.within(&home).unwrap();
        assert_eq!(inside.to_string(), "u1/docs/2024/report.pdf");
        assert_eq!(inside.relative_to(&home), Some(p.clone()));
        assert_eq!(home.relative_to(&home), Some(ObjectPath::root()));
        assert_eq!(p.relative_to(&home), None);
        assert!(
            ObjectPath::parse(&"a/".repeat(32))
                .unwrap()
                .within(&home)
                .is_ok(),
            "a path of 32 levels fits in a user's folder"
        );
        assert!(
            ObjectPath::parse(&"a/".repeat(33))
                .unwrap()
                .within(&home)
                .is_err()
        );
    }

    #[test]
    fn refuses_traversal_and_tricks() {
        for bad in [
            "",
            "../etc/passwd",
            "a/../../b",
            "a/./b",
            "..",
            ".",
            "/etc/passwd",
            "a//b",
            "a///",
            "a\\..\\b",
            "C:\\x",
            "a\0b",
            "a/\u{1b}[31m",
            "a\nb",
            "a/\u{7f}",
            "  /x",
        ] {
            assert!(ObjectPath::parse(bad).is_err(), "{bad:?} must be refused");
        }
        assert!(ObjectPath::parse(&"a/".repeat(40)).is_err(), "too deep");
        assert!(
            ObjectPath::parse(&"x".repeat(267)).is_err(),
            "name too long"
        );
        assert!(
            ObjectPath::parse(&"abcdefgh/".repeat(120)).is_err(),
            "path too long"
        );
        assert!(ObjectPath::root().join("..").is_err());
        assert_eq!(base_name("C:\\Users\\me\\a.pdf"), "a.pdf");
        assert_eq!(base_name("dir/b.png"), "b.png");
        assert_eq!(base_name("c.txt"), "c.txt");
    }
}
