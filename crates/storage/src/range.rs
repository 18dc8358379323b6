//! Byte ranges (`Range: bytes=…`, RFC 9110 §14) for partial reads.
//!
//! One range is served as asked. A header that does not parse, or asks for several
//! ranges, is ignored and the whole file is served (which RFC 9110 allows).

/// One requested range, before the file size is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteRange {
    /// `bytes=first-last` (inclusive).
    FromTo(u64, u64),
    /// `bytes=first-`.
    From(u64),
    /// `bytes=-n`: the last n bytes.
    Suffix(u64),
}

/// The range cannot be served from a file of this size (answer 416).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unsatisfiable {
    pub size: u64,
}

impl ByteRange {
    /// Parses a `Range` header value; `None` means "ignore it, send everything".
    pub fn parse(header: &str) -> Option<ByteRange> {
        let spec = header.trim().strip_prefix("bytes=")?.trim();
        if spec.contains(',') {
            return None;
        }
        let (first, last) = spec.split_once('-')?;
        let (first, last) = (first.trim(), last.trim());
        let num = |s: &str| -> Option<u64> {
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            s.parse().ok()
        };
        match (first.is_empty(), last.is_empty()) {
            (true, true) => None,
            (true, false) => Some(ByteRange::Suffix(num(last)?)),
            (false, true) => Some(ByteRange::From(num(first)?)),
            (false, false) => {
                let (a, b) = (num(first)?, num(last)?);
                (a <= b).then_some(ByteRange::FromTo(a, b))
            }
        }
    }

    /// The half-open byte span `[start, end)` to send from a file of `size` bytes.
    pub fn resolve(self, size: u64) -> Result<(u64, u64), Unsatisfiable> {
        let no = Unsatisfiable { size };
        match self {
            ByteRange::FromTo(a, b) if a < size => Ok((a, b.saturating_add(1).min(size))),
            ByteRange::From(a) if a < size => Ok((a, size)),
            ByteRange::Suffix(n) if n > 0 && size > 0 => Ok((size.saturating_sub(n), size)),
            _ => Err(no),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_resolve() {
        assert_eq!(ByteRange::parse("bytes=0-9"), Some(ByteRange::FromTo(0, 9)));
        assert_eq!(ByteRange::parse("bytes=5-"), Some(ByteRange::From(5)));
        assert_eq!(ByteRange::parse("bytes=-3"), Some(ByteRange::Suffix(3)));
        assert_eq!(ByteRange::parse("bytes=9-0"), None);
        assert_eq!(ByteRange::parse("bytes=0-1,4-5"), None);
        assert_eq!(ByteRange::parse("items=0-1"), None);
        assert_eq!(ByteRange::parse("bytes=-"), None);
        assert_eq!(ByteRange::parse("bytes=+1-2"), None);

        assert_eq!(ByteRange::FromTo(0, 9).resolve(100), Ok((0, 10)));
        assert_eq!(ByteRange::FromTo(90, 200).resolve(100), Ok((90, 100)));
        assert_eq!(ByteRange::From(99).resolve(100), Ok((99, 100)));
        assert_eq!(ByteRange::Suffix(10).resolve(100), Ok((90, 100)));
        assert_eq!(ByteRange::Suffix(500).resolve(100), Ok((0, 100)));
        assert!(ByteRange::From(100).resolve(100).is_err());
        assert!(ByteRange::FromTo(0, 0).resolve(0).is_err());
        assert!(ByteRange::Suffix(0).resolve(100).is_err());
        assert!(ByteRange::Suffix(5).resolve(0).is_err());
    }
}
