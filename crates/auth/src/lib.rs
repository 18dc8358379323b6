//! Who is asking: JWT verification and the resulting [`Principal`], and the auth
//! core ([`service`]): sign-up, sign-in, sign-out, revocation.
//!
//! Shared by the WebSocket server and the HTTP routes, so one token means the same
//! thing everywhere.

pub mod password;
pub mod service;

pub use service::{AuthError, AuthService, ClientMeta, Session, SignOutScope, User, UserProfile};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// The HMAC algorithm tokens are signed with (`JWT_ALGORITHM`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JwtAlgorithm {
    HS256,
    HS384,
    HS512,
}

pub use aether_core::principal::{Principal, Role};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    #[serde(default)]
    pub role: Option<String>,
    pub exp: i64,
    #[serde(default)]
    pub iat: Option<i64>,
    /// The auth session this token belongs to; revoked sessions are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("token has expired")]
    Expired,
    #[error("invalid token: {0}")]
    Invalid(String),
}

#[derive(Clone)]
pub struct JwtKeys {
    algorithm: Algorithm,
    encoding: EncodingKey,
    decoding: DecodingKey,
    pub expires_s: u64,
}

impl JwtKeys {
    pub fn new(secret: &str, algorithm: JwtAlgorithm, expires_s: u64) -> Self {
        JwtKeys {
            algorithm: match algorithm {
                JwtAlgorithm::HS256 => Algorithm::HS256,
                JwtAlgorithm::HS384 => Algorithm::HS384,
                JwtAlgorithm::HS512 => Algorithm::HS512,
            },
            encoding: EncodingKey::from_secret(secret.as_bytes()),
            decoding: DecodingKey::from_secret(secret.as_bytes()),
            expires_s,
        }
    }

    pub fn sign(&self, claims: &Claims) -> String {
        // Signing with an HMAC key cannot fail for serializable claims.
        jsonwebtoken::encode(&Header::new(self.algorithm), claims, &self.encoding)
            .unwrap_or_default()
    }

    /// Signs any claims (signed-URL tokens, API keys) with the same key.
    pub fn sign_json<T: Serialize>(&self, claims: &T) -> String {
        jsonwebtoken::encode(&Header::new(self.algorithm), claims, &self.encoding)
            .unwrap_or_default()
    }

    /// Verifies signature and `exp` of a token with claims of any shape.
    pub fn verify_json<T: serde::de::DeserializeOwned>(
        &self,
        token: &str,
    ) -> Result<T, TokenError> {
        let mut v = Validation::new(self.algorithm);
        v.leeway = 0;
        v.validate_aud = false;
        v.set_required_spec_claims(&["exp"]);
        jsonwebtoken::decode::<T>(token, &self.decoding, &v)
            .map(|d| d.claims)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => TokenError::Expired,
                kind => TokenError::Invalid(format!("{kind:?}")),
            })
    }

    /// A Supabase-style API key: a JWT with `role` `anon` or `service_role`, no
    /// user, valid until 2035. Deterministic for a given secret (fixed `iat` and
    /// `exp`), so the keys printed at start stay the same across restarts.
    pub fn api_key(&self, role: &str) -> String {
        self.sign_json(&serde_json::json!({
            "iss": "aether",
            "role": role,
            "iat": 1_735_689_600_i64,
            "exp": 2_051_222_400_i64,
        }))
    }

    /// Verifies signature and expiry (no leeway: an expired token is expired).
    pub fn verify(&self, token: &str) -> Result<Principal, TokenError> {
        let mut v = Validation::new(self.algorithm);
        v.leeway = 0;
        v.validate_aud = false;
        v.set_required_spec_claims(&["exp"]);
        let data =
            jsonwebtoken::decode::<Claims>(token, &self.decoding, &v).map_err(|e| {
                match e.kind() {
                    jsonwebtoken::errors::ErrorKind::ExpiredSignature => TokenError::Expired,
                    kind => TokenError::Invalid(format!("{kind:?}")),
                }
            })?;
        principal_from_claims(data.claims)
    }
}

fn principal_from_claims(c: Claims) -> Result<Principal, TokenError> {
    let role = match c.role.as_deref() {
        Some("service_role") => Role::Service,
        Some("anon") => Role::Anon,
        _ => Role::Authenticated,
    };
    let user_id = match (role, c.sub) {
        (Role::Authenticated, None) => return Err(TokenError::Invalid("no sub claim".into())),
        (_, Some(sub)) => Some(
            uuid::Uuid::parse_str(&sub)
                .map_err(|_| TokenError::Invalid("sub is not a UUID".into()))?
                .hyphenated()
                .to_string(),
        ),
        (_, None) => None,
    };
    let session_id = c
        .session_id
        .map(|s| {
            uuid::Uuid::parse_str(&s)
                .map_err(|_| TokenError::Invalid("session_id is not a UUID".into()))
        })
        .transpose()?;
    Ok(Principal {
        role,
        user_id: if role == Role::Anon { None } else { user_id },
        session_id,
        email: c.email,
        expires_at: Some(c.exp),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_roles_and_expiry() {
        let keys = JwtKeys::new("0123456789abcdef0123456789abcdef", JwtAlgorithm::HS256, 60);
        let now = chrono::Utc::now().timestamp();
        let uid = uuid::Uuid::new_v4().to_string();
        let tok = keys.sign(&Claims {
            sub: Some(uid.to_uppercase()),
            email: None,
            role: Some("authenticated".into()),
            exp: now + 60,
            iat: Some(now),
            session_id: None,
            aud: None,
        });
        let p = keys.verify(&tok).unwrap();
        assert_eq!(p.user_id.as_deref(), Some(uid.as_str()));
        assert_eq!(p.role, Role::Authenticated);

        let expired = keys.sign(&Claims {
            sub: Some(uid.clone()),
            email: None,
            role: None,
            exp: now - 5,
            iat: None,
            session_id: None,
            aud: None,
        });
        assert_eq!(keys.verify(&expired), Err(TokenError::Expired));
        let other = JwtKeys::new("another-secret-another-secret-xx", JwtAlgorithm::HS256, 60);
        assert!(matches!(other.verify(&tok), Err(TokenError::Invalid(_))));
        assert!(matches!(
            keys.verify("garbage"),
            Err(TokenError::Invalid(_))
        ));
        let svc = keys.sign(&Claims {
            sub: None,
            email: None,
            role: Some("service_role".into()),
            exp: now + 60,
            iat: None,
            session_id: None,
            aud: None,
        });
        assert!(keys.verify(&svc).unwrap().is_service());
    }
}
