//! Passwords: the strength rule, argon2id hashing and verification, and email
//! normalization. Hashing is CPU-bound: callers run it on the blocking pool.

use std::sync::OnceLock;

use argon2::Argon2;
use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher as _, PasswordVerifier as _};

/// Longer input is refused before hashing so nobody can make us hash megabytes.
pub const MAX_PASSWORD_BYTES: usize = 1024;

/// The one password rule of both APIs (`PASSWORD_MIN_LENGTH`,
/// `PASSWORD_REQUIRE_LETTER_AND_DIGIT`). By default a length only, as current
/// NIST guidance advises; GoTrue's default minimum is 6.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PasswordPolicy {
    pub min_chars: usize,
    pub letter_and_digit: bool,
}

impl Default for PasswordPolicy {
    fn default() -> Self {
        PasswordPolicy {
            min_chars: 8,
            letter_and_digit: false,
        }
    }
}

/// The password rule: at least `min_chars` characters, at most 1024 bytes, and a
/// letter and a digit if the policy asks. `Err` carries every reason the
/// password fails, for the client to show.
pub fn check_strength(password: &str, policy: PasswordPolicy) -> Result<(), String> {
    let mut reasons = Vec::new();
    let min = policy.min_chars;
    if password.chars().count() < min {
        reasons.push(format!("use at least {min} characters"));
    }
    if password.len() > MAX_PASSWORD_BYTES {
        reasons.push(format!("use at most {MAX_PASSWORD_BYTES} bytes"));
    }
    if policy.letter_and_digit && !password.chars().any(char::is_alphabetic) {
        reasons.push("include a letter".to_owned());
    }
    if policy.letter_and_digit && !password.chars().any(|c| c.is_ascii_digit()) {
        reasons.push("include a digit".to_owned());
    }
    if reasons.is_empty() {
        Ok(())
    } else {
        Err(reasons.join(", "))
    }
}

/// An argon2id PHC string (`$argon2id$v=19$…`) with a random salt.
pub fn hash(password: &str) -> Result<String, String> {
    Argon2::default()
        .hash_password(password.as_bytes())
        .map(|h| h.to_string())
        .map_err(|e| format!("argon2: {e}"))
}

/// Whether `password` matches the PHC string `hash`; `false` for malformed hashes.
pub fn verify(password: &str, hash: &str) -> bool {
    match PasswordHash::new(hash) {
        Ok(parsed) => Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok(),
        Err(_) => false,
    }
}

/// Burns the time of one verification, for unknown emails, so a wrong email and a
/// wrong password take as long.
pub fn dummy_verify(password: &str) {
    static DUMMY: OnceLock<String> = OnceLock::new();
    let hash = DUMMY.get_or_init(|| hash("dummy-password-0").unwrap_or_default());
    let _ = verify(password, hash);
}

/// Trims and lower-cases an email and checks its shape: `local@domain.tld`, ASCII,
/// 3–320 bytes (local part ≤ 64), no spaces or control characters.
pub fn normalize_email(raw: &str) -> Result<String, String> {
    let email = raw.trim().to_ascii_lowercase();
    let invalid = || format!("{:?} is not a valid email address", raw.trim());
    if email.len() < 3 || email.len() > 320 || !email.is_ascii() {
        return Err(invalid());
    }
    if email
        .chars()
        .any(|c| c.is_ascii_whitespace() || c.is_ascii_control() || "<>()[],;:\\\"".contains(c))
    {
        return Err(invalid());
    }
    let (local, domain) = email.split_once('@').ok_or_else(invalid)?;
    if local.is_empty() || local.len() > 64 || domain.contains('@') {
        return Err(invalid());
    }
    let labels: Vec<&str> = domain.split('.').collect();
    let label_ok = |l: &&str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if labels.len() < 2 || !labels.iter().all(label_ok) {
        return Err(invalid());
    }
    if local.starts_with('.') || local.ends_with('.') || local.contains("..") {
        return Err(invalid());
    }
    Ok(email)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strength_rule_gives_reasons() {
        let classes = PasswordPolicy {
            min_chars: 8,
            letter_and_digit: true,
        };
        assert!(check_strength("abcdefg1", classes).is_ok());
        assert!(check_strength("pässwörd9", classes).is_ok());
        let e = check_strength("short", classes).unwrap_err();
        assert!(e.contains("8 characters") && e.contains("digit"), "{e}");
        assert_eq!(
            check_strength("12345678", classes).unwrap_err(),
            "include a letter"
        );
        assert_eq!(
            check_strength("abcdefgh", classes).unwrap_err(),
            "include a digit"
        );
        assert!(check_strength(&format!("a1{}", "x".repeat(2000)), classes).is_err());
        // The default: a length only.
        let default = PasswordPolicy::default();
        assert!(check_strength("abcdefgh", default).is_ok());
        assert_eq!(
            check_strength("abcdefg", default).unwrap_err(),
            "use at least 8 characters"
        );
        let six = PasswordPolicy {
            min_chars: 6,
            ..default
        };
        assert!(check_strength("abcdef", six).is_ok());
    }

    #[test]
    fn hashes_are_argon2id_and_verify() {
        let h = hash("correct horse 1").unwrap();
        assert!(h.starts_with("$argon2id$"), "{h}");
        assert!(verify("correct horse 1", &h));
        assert!(!verify("correct horse 2", &h));
        assert!(!verify("x", "not a hash"));
        assert_ne!(h, hash("correct horse 1").unwrap(), "salted");
    }

    #[test]
    fn emails_are_trimmed_lowercased_and_checked() {
        assert_eq!(
            normalize_email("  Alice@Example.COM ").unwrap(),
            "alice@example.com"
        );
        assert_eq!(
            normalize_email("a.b+tag@sub.example.co").unwrap(),
            "a.b+tag@sub.example.co"
        );
        for bad in [
            "",
            "a",
            "a@",
            "@b.c",
            "a@b",
            "a@@b.c",
            "a b@c.d",
            "a@b..c",
            "a@-b.c",
            "a@b.c-",
            "ä@b.cd",
            "a@b_c.d",
            ".a@b.cd",
            "a..b@c.de",
            "a\n@b.cd",
        ] {
            assert!(normalize_email(bad).is_err(), "{bad:?}");
        }
    }
}
