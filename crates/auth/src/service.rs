//! The auth core: sign-up, sign-in, sign-out and token checks with revocation.
//! HTTP shapes live in `aether-http`; this crate knows users, sessions and tokens.
//!
//! Each sign-up and sign-in opens an `auth.sessions` row named by the token's
//! `session_id`; sign-out sets its `revoked_at`, after which that token is refused
//! everywhere (REST and WebSocket) although its signature and `exp` are still good.
//! Tokens without a `session_id` (minted by an operator with the JWT secret) cannot
//! be revoked and are accepted until they expire. Every sign-up, sign-in and
//! sign-out writes a `public.auth_events` row (no secrets), which realtime `auth`
//! subscribers see through the WAL.

use chrono::{DateTime, TimeZone as _, Utc};
use uuid::Uuid;

use super::{Claims, JwtKeys, Principal, TokenError, password};

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("invalid email or password")]
    InvalidCredentials,
    #[error("an account with this email already exists")]
    EmailAlreadyExists,
    #[error("password is too weak: {0}")]
    WeakPassword(String),
    #[error("{0}")]
    InvalidEmail(String),
    #[error("the access token has expired")]
    ExpiredToken,
    #[error("the session of this access token has been signed out")]
    RevokedToken,
    #[error("invalid access token: {0}")]
    InvalidToken(String),
    /// A refresh token that does not exist, or whose session was signed out.
    #[error("Invalid Refresh Token: Refresh Token Not Found")]
    RefreshTokenNotFound,
    /// A refresh token presented again after it was rotated: its session is
    /// signed out (reuse suggests the token was stolen).
    #[error("Invalid Refresh Token: Already Used")]
    RefreshTokenReused,
    #[error("internal auth failure: {0}")]
    Internal(String),
}

impl From<TokenError> for AuthError {
    fn from(e: TokenError) -> Self {
        match e {
            TokenError::Expired => AuthError::ExpiredToken,
            TokenError::Invalid(why) => AuthError::InvalidToken(why),
        }
    }
}

impl From<tokio_postgres::Error> for AuthError {
    fn from(e: tokio_postgres::Error) -> Self {
        AuthError::Internal(format!("database: {e}"))
    }
}

impl From<deadpool_postgres::PoolError> for AuthError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        AuthError::Internal(format!("database pool: {e}"))
    }
}

impl AuthError {
    /// The error code clients see (`auth/…`).
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::InvalidCredentials => "auth/invalid-credentials",
            AuthError::EmailAlreadyExists => "auth/email-already-exists",
            AuthError::WeakPassword(_) => "auth/weak-password",
            AuthError::InvalidEmail(_) => "auth/invalid-email",
            AuthError::ExpiredToken => "auth/expired-token",
            AuthError::RevokedToken => "auth/revoked-token",
            AuthError::InvalidToken(_) => "auth/invalid-token",
            AuthError::RefreshTokenNotFound => "auth/refresh-token-not-found",
            AuthError::RefreshTokenReused => "auth/refresh-token-reused",
            AuthError::Internal(_) => "internal_error",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub id: Uuid,
    pub email: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone)]
pub struct Session {
    pub id: Uuid,
    pub access_token: String,
    /// Seconds since the epoch.
    pub expires_at: i64,
    /// Opaque, single use: exchanging it (`refresh`) revokes it and returns a new one.
    pub refresh_token: String,
}

/// Everything about a user that may be shown to that user (no password hash).
#[derive(Debug, Clone)]
pub struct UserProfile {
    pub id: Uuid,
    pub email: String,
    pub role: String,
    pub user_metadata: serde_json::Value,
    pub app_metadata: serde_json::Value,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub last_sign_in_at: Option<DateTime<Utc>>,
    /// Signed in anonymously and not given an email yet (`email` is empty).
    pub is_anonymous: bool,
}

/// Which sessions a sign-out ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignOutScope {
    /// The token's own session.
    Local,
    /// Every session of the user.
    Global,
    /// Every session of the user but the token's own.
    Others,
}

/// SHA-256, hex: how refresh tokens are stored.
fn token_hash(token: &str) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(token.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// 244 random bits (two v4 UUIDs from the OS generator) as 64 hex digits:
/// refresh tokens and share tokens.
pub fn new_refresh_token() -> String {
    format!("{}{}", Uuid::new_v4().simple(), Uuid::new_v4().simple())
}

/// Where a request came from, recorded on sessions and auth events.
#[derive(Debug, Clone, Default)]
pub struct ClientMeta {
    pub ip: Option<String>,
    pub user_agent: Option<String>,
}

#[derive(Clone)]
pub struct AuthService {
    pool: deadpool_postgres::Pool,
    jwt: JwtKeys,
    policy: password::PasswordPolicy,
}

/// Runs password hashing on the blocking pool, at most one hash per core at a time.
///
/// Each argon2 call allocates its whole memory cost (19 MiB). Unbounded, N
/// concurrent sign-ins held N × 19 MiB (1.5 GiB at 8 clients in aether-bench rest)
/// and were no faster: the cores were already busy. Callers wait their turn here.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, AuthError> {
    static HASHING: std::sync::OnceLock<tokio::sync::Semaphore> = std::sync::OnceLock::new();
    let slots = HASHING.get_or_init(|| {
        tokio::sync::Semaphore::new(std::thread::available_parallelism().map_or(2, |n| n.get()))
    });
    let slot = slots
        .acquire()
        .await
        .map_err(|e| AuthError::Internal(format!("hashing slots: {e}")))?;
    // The slot goes with the job: a caller that gives up (the client hung up) does
    // not free it while the hash still runs.
    tokio::task::spawn_blocking(move || {
        let _slot = slot;
        f()
    })
    .await
    .map_err(|e| AuthError::Internal(format!("hashing task: {e}")))
}

impl AuthService {
    pub fn new(
        pool: deadpool_postgres::Pool,
        jwt: JwtKeys,
        policy: password::PasswordPolicy,
    ) -> Self {
        AuthService { pool, jwt, policy }
    }

    /// The hash of a new password that passes the policy.
    async fn checked_hash(&self, new_password: &str) -> Result<String, AuthError> {
        password::check_strength(new_password, self.policy).map_err(AuthError::WeakPassword)?;
        let pw = new_password.to_owned();
        blocking(move || password::hash(&pw))
            .await?
            .map_err(AuthError::Internal)
    }

    /// Changes a user's email, password and `user_metadata` (merged key by key,
    /// as GoTrue does); a changed password ends no session. `None` when the user
    /// no longer exists.
    pub async fn update_user(
        &self,
        id: Uuid,
        email: Option<&str>,
        new_password: Option<&str>,
        user_metadata: Option<&serde_json::Value>,
        app_metadata: Option<&serde_json::Value>,
        meta: &ClientMeta,
    ) -> Result<Option<UserProfile>, AuthError> {
        let email = email
            .map(password::normalize_email)
            .transpose()
            .map_err(AuthError::InvalidEmail)?;
        let hash = match new_password {
            Some(p) => Some(self.checked_hash(p).await?),
            None => None,
        };
        let user_metadata = &json_object(user_metadata);
        let app_metadata = &json_object(app_metadata);
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let updated = tx
            .execute(
                "UPDATE auth.users SET
                     email = coalesce($2, email),
                     is_anonymous = is_anonymous AND $2::text IS NULL,
                     encrypted_password = coalesce($3, encrypted_password),
                     user_metadata = user_metadata || $4,
                     app_metadata = app_metadata || $5
                 WHERE id = $1",
                &[&id, &email, &hash, user_metadata, app_metadata],
            )
            .await;
        match updated {
            Ok(0) => return Ok(None),
            Ok(_) => {}
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => {
                return Err(AuthError::EmailAlreadyExists);
            }
            Err(e) => return Err(e.into()),
        }
        record_event(&tx, id, "user_updated", None, meta).await?;
        tx.commit().await?;
        self.profile(id).await
    }

    /// Creates an anonymous user (no email, no password) and signs them in.
    pub async fn sign_up_anonymously(
        &self,
        user_metadata: Option<&serde_json::Value>,
        meta: &ClientMeta,
    ) -> Result<(User, Session), AuthError> {
        let user_metadata = &json_object(user_metadata);
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let row = tx
            .query_one(
                "INSERT INTO auth.users (email, is_anonymous, last_sign_in_at, user_metadata, app_metadata)
                 VALUES (NULL, true, now(), $1, '{\"provider\":\"anonymous\",\"providers\":[\"anonymous\"]}')
                 RETURNING id, created_at",
                &[user_metadata],
            )
            .await?;
        let user = User {
            id: row.get(0),
            email: String::new(),
            created_at: row.get(1),
        };
        let session = self.open_session(&tx, &user, meta).await?;
        record_event(&tx, user.id, "sign_up", Some(session.id), meta).await?;
        tx.commit().await?;
        tracing::info!(user_id = %user.id, "anonymous user signed up");
        Ok((user, session))
    }

    /// Creates a user without signing them in (the admin API).
    pub async fn create_user(
        &self,
        email: &str,
        new_password: Option<&str>,
        user_metadata: Option<&serde_json::Value>,
        app_metadata: Option<&serde_json::Value>,
    ) -> Result<UserProfile, AuthError> {
        let email = password::normalize_email(email).map_err(AuthError::InvalidEmail)?;
        let hash = match new_password {
            Some(p) => Some(self.checked_hash(p).await?),
            None => None,
        };
        let user_metadata = &json_object(user_metadata);
        let app_metadata = &json_object(app_metadata);
        let client = self.pool.get().await?;
        let row = client
            .query_opt(
                "INSERT INTO auth.users (email, encrypted_password, user_metadata, app_metadata)
                 VALUES ($1, $2, $3, '{\"provider\":\"email\",\"providers\":[\"email\"]}'::jsonb || $4)
                 ON CONFLICT (email) DO NOTHING
                 RETURNING id",
                &[&email, &hash, user_metadata, app_metadata],
            )
            .await?
            .ok_or(AuthError::EmailAlreadyExists)?;
        let id: Uuid = row.get(0);
        drop(client);
        self.profile(id)
            .await?
            .ok_or_else(|| AuthError::Internal("a created user vanished".into()))
    }

    /// A page of users, oldest first, and how many there are (the admin API).
    pub async fn list_users(
        &self,
        page: i64,
        per_page: i64,
    ) -> Result<(Vec<UserProfile>, i64), AuthError> {
        let client = self.pool.get().await?;
        let total: i64 = client
            .query_one("SELECT count(*) FROM auth.users", &[])
            .await?
            .get(0);
        let rows = client
            .query(
                &format!(
                    "SELECT {PROFILE_COLUMNS} FROM auth.users
                     ORDER BY created_at, id LIMIT $1 OFFSET $2"
                ),
                &[&per_page, &((page - 1).max(0) * per_page)],
            )
            .await?;
        Ok((rows.iter().map(profile_from_row).collect(), total))
    }

    /// Deletes a user: sessions, refresh tokens, files and shares go with the
    /// row (foreign keys), and the sessions' deletion reaches the realtime
    /// router through the WAL, which closes the user's sockets. `false` when
    /// there was no such user.
    pub async fn delete_user(&self, id: Uuid) -> Result<bool, AuthError> {
        let client = self.pool.get().await?;
        Ok(client
            .execute("DELETE FROM auth.users WHERE id = $1", &[&id])
            .await?
            == 1)
    }

    /// Creates a user and signs them in.
    pub async fn sign_up(
        &self,
        email: &str,
        password: &str,
        meta: &ClientMeta,
    ) -> Result<(User, Session), AuthError> {
        self.sign_up_with_metadata(email, password, None, meta)
            .await
    }

    /// [`AuthService::sign_up`] that also stores `user_metadata` (a JSON object).
    pub async fn sign_up_with_metadata(
        &self,
        email: &str,
        password: &str,
        user_metadata: Option<&serde_json::Value>,
        meta: &ClientMeta,
    ) -> Result<(User, Session), AuthError> {
        let user_metadata = &json_object(user_metadata);
        let email = password::normalize_email(email).map_err(AuthError::InvalidEmail)?;
        password::check_strength(password, self.policy).map_err(AuthError::WeakPassword)?;
        let pw = password.to_owned();
        let hash = blocking(move || password::hash(&pw))
            .await?
            .map_err(AuthError::Internal)?;
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let row = tx
            .query_opt(
                "INSERT INTO auth.users (email, encrypted_password, last_sign_in_at, user_metadata)
                 VALUES ($1, $2, now(), $3)
                 ON CONFLICT (email) DO NOTHING
                 RETURNING id, email, created_at",
                &[&email, &hash, user_metadata],
            )
            .await?
            .ok_or(AuthError::EmailAlreadyExists)?;
        let user = User {
            id: row.get(0),
            email: row.get(1),
            created_at: row.get(2),
        };
        let session = self.open_session(&tx, &user, meta).await?;
        record_event(&tx, user.id, "sign_up", Some(session.id), meta).await?;
        tx.commit().await?;
        tracing::info!(user_id = %user.id, "user signed up");
        Ok((user, session))
    }

    /// Checks an email and password and opens a session. Unknown emails and wrong
    /// passwords fail alike, in about the same time.
    pub async fn sign_in(
        &self,
        email: &str,
        password: &str,
        meta: &ClientMeta,
    ) -> Result<(User, Session), AuthError> {
        let pw = password.to_owned();
        let Ok(email) = password::normalize_email(email) else {
            blocking(move || password::dummy_verify(&pw)).await?;
            return Err(AuthError::InvalidCredentials);
        };
        if password.len() > password::MAX_PASSWORD_BYTES {
            return Err(AuthError::InvalidCredentials);
        }
        let client = self.pool.get().await?;
        let row = client
            .query_opt(
                "SELECT id, email, created_at, encrypted_password FROM auth.users WHERE email = $1",
                &[&email],
            )
            .await?;
        drop(client);
        let found = row.map(|r| {
            (
                User {
                    id: r.get(0),
                    email: r.get(1),
                    created_at: r.get(2),
                },
                r.get::<_, Option<String>>(3),
            )
        });
        let (user, ok) = match found {
            Some((user, Some(hash))) => {
                let ok = blocking(move || password::verify(&pw, &hash)).await?;
                (Some(user), ok)
            }
            _ => {
                blocking(move || password::dummy_verify(&pw)).await?;
                (None, false)
            }
        };
        let user = match (user, ok) {
            (Some(u), true) => u,
            _ => return Err(AuthError::InvalidCredentials),
        };
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        tx.execute(
            "UPDATE auth.users SET last_sign_in_at = now() WHERE id = $1",
            &[&user.id],
        )
        .await?;
        let session = self.open_session(&tx, &user, meta).await?;
        record_event(&tx, user.id, "sign_in", Some(session.id), meta).await?;
        tx.commit().await?;
        Ok((user, session))
    }

    /// Revokes the principal's session (when its token has one) and records the
    /// sign-out.
    pub async fn sign_out(
        &self,
        principal: &Principal,
        meta: &ClientMeta,
    ) -> Result<(), AuthError> {
        self.sign_out_scoped(principal, SignOutScope::Local, meta)
            .await
    }

    /// Sign-out of the token's session, of all the user's sessions, or of all
    /// the others. Refresh tokens of revoked sessions stop working with them.
    pub async fn sign_out_scoped(
        &self,
        principal: &Principal,
        scope: SignOutScope,
        meta: &ClientMeta,
    ) -> Result<(), AuthError> {
        let user_id = principal_user(principal)?;
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let sid = principal.session_id;
        match scope {
            SignOutScope::Local => {
                if let Some(sid) = sid {
                    tx.execute(
                        "UPDATE auth.sessions SET revoked_at = now()
                         WHERE id = $1 AND user_id = $2 AND revoked_at IS NULL",
                        &[&sid, &user_id],
                    )
                    .await?;
                }
            }
            SignOutScope::Global | SignOutScope::Others => {
                let keep = if scope == SignOutScope::Others {
                    sid
                } else {
                    None
                };
                tx.execute(
                    "UPDATE auth.sessions SET revoked_at = now()
                     WHERE user_id = $1 AND revoked_at IS NULL
                       AND ($2::uuid IS NULL OR id <> $2)",
                    &[&user_id, &keep],
                )
                .await?;
            }
        }
        record_event(&tx, user_id, "sign_out", principal.session_id, meta).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Exchanges a refresh token for a new access token and a new refresh token
    /// (rotation). A revoked token presented again signs its session out.
    pub async fn refresh(
        &self,
        refresh_token: &str,
        meta: &ClientMeta,
    ) -> Result<(User, Session), AuthError> {
        let hash = token_hash(refresh_token);
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let row = tx
            .query_opt(
                "SELECT rt.id, rt.session_id, rt.revoked_at IS NOT NULL, s.revoked_at IS NOT NULL,
                        u.id, u.email, u.created_at
                 FROM auth.refresh_tokens rt
                 JOIN auth.sessions s ON s.id = rt.session_id
                 JOIN auth.users u ON u.id = rt.user_id
                 WHERE rt.token_hash = $1
                 FOR UPDATE OF rt, s",
                &[&hash],
            )
            .await?
            .ok_or(AuthError::RefreshTokenNotFound)?;
        let (token_id, session_id): (i64, Uuid) = (row.get(0), row.get(1));
        let (token_revoked, session_revoked): (bool, bool) = (row.get(2), row.get(3));
        let user = User {
            id: row.get(4),
            email: row.get(5),
            created_at: row.get(6),
        };
        if session_revoked {
            return Err(AuthError::RefreshTokenNotFound);
        }
        if token_revoked {
            tx.execute(
                "UPDATE auth.sessions SET revoked_at = now() WHERE id = $1",
                &[&session_id],
            )
            .await?;
            record_event(&tx, user.id, "sign_out", Some(session_id), meta).await?;
            tx.commit().await?;
            tracing::warn!(user_id = %user.id, session_id = %session_id, "refresh token reused: session signed out");
            return Err(AuthError::RefreshTokenReused);
        }
        tx.execute(
            "UPDATE auth.refresh_tokens SET revoked_at = now() WHERE id = $1",
            &[&token_id],
        )
        .await?;
        let (access_token, exp) = self.access_token(&user, session_id)?;
        let expires = Utc
            .timestamp_opt(exp, 0)
            .single()
            .ok_or_else(|| AuthError::Internal("token expiry out of range".into()))?;
        tx.execute(
            "UPDATE auth.sessions SET expires_at = $2 WHERE id = $1",
            &[&session_id, &expires],
        )
        .await?;
        let refresh_token = insert_refresh_token(&tx, user.id, session_id, Some(token_id)).await?;
        record_event(&tx, user.id, "token_refreshed", Some(session_id), meta).await?;
        tx.commit().await?;
        Ok((
            user,
            Session {
                id: session_id,
                access_token,
                expires_at: exp,
                refresh_token,
            },
        ))
    }

    /// The user's profile; `None` when the user no longer exists.
    pub async fn profile(&self, id: Uuid) -> Result<Option<UserProfile>, AuthError> {
        let client = self.pool.get().await?;
        let row = client
            .query_opt(
                &format!("SELECT {PROFILE_COLUMNS} FROM auth.users WHERE id = $1"),
                &[&id],
            )
            .await?;
        Ok(row.as_ref().map(profile_from_row))
    }

    /// The one way a token becomes a principal, for every route and socket:
    /// signature and expiry always; for a token that names a session, that
    /// session is live; for a user token, the user exists. API-key tokens (anon,
    /// service_role) carry no user and need no query. Sockets call it again for
    /// an in-band renewal.
    pub async fn authenticate(&self, token: &str) -> Result<Principal, AuthError> {
        let p = self.jwt.verify(token)?;
        self.check(&p).await?;
        Ok(p)
    }

    async fn check(&self, p: &Principal) -> Result<(), AuthError> {
        let user = p
            .user_id
            .as_deref()
            .map(Uuid::parse_str)
            .transpose()
            .map_err(|_| AuthError::InvalidToken("sub is not a UUID".into()))?;
        if p.session_id.is_some() && user.is_none() {
            return Err(AuthError::InvalidToken("session_id without sub".into()));
        }
        let check_user = user.is_some();
        if p.session_id.is_none() && !check_user {
            return Ok(());
        }
        let client = self.pool.get().await?;
        let row = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM auth.users WHERE id = $1),
                        (SELECT revoked_at IS NULL FROM auth.sessions WHERE id = $2 AND user_id = $1)",
                &[&user, &p.session_id],
            )
            .await?;
        let (user_exists, live): (bool, Option<bool>) = (row.get(0), row.get(1));
        if p.session_id.is_some() && live != Some(true) {
            return Err(AuthError::RevokedToken);
        }
        if check_user && !user_exists {
            return Err(AuthError::InvalidToken("the user no longer exists".into()));
        }
        Ok(())
    }

    async fn open_session(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        user: &User,
        meta: &ClientMeta,
    ) -> Result<Session, AuthError> {
        let id = Uuid::new_v4();
        let (access_token, exp) = self.access_token(user, id)?;
        let expires = Utc
            .timestamp_opt(exp, 0)
            .single()
            .ok_or_else(|| AuthError::Internal("token expiry out of range".into()))?;
        tx.execute(
            "INSERT INTO auth.sessions (id, user_id, expires_at, user_agent, ip)
             VALUES ($1, $2, $3, $4, $5)",
            &[&id, &user.id, &expires, &meta.user_agent, &meta.ip],
        )
        .await?;
        let refresh_token = insert_refresh_token(tx, user.id, id, None).await?;
        Ok(Session {
            id,
            access_token,
            expires_at: exp,
            refresh_token,
        })
    }

    /// A fresh access token of `session`; returns it with its `exp`.
    fn access_token(&self, user: &User, session: Uuid) -> Result<(String, i64), AuthError> {
        let now = Utc::now().timestamp();
        let exp = now + i64::try_from(self.jwt.expires_s).unwrap_or(i64::MAX / 2);
        let token = self.jwt.sign(&Claims {
            sub: Some(user.id.hyphenated().to_string()),
            email: Some(user.email.clone()),
            role: Some("authenticated".into()),
            exp,
            iat: Some(now),
            session_id: Some(session.hyphenated().to_string()),
            aud: Some("authenticated".into()),
        });
        Ok((token, exp))
    }
}

async fn insert_refresh_token(
    tx: &tokio_postgres::Transaction<'_>,
    user_id: Uuid,
    session_id: Uuid,
    parent: Option<i64>,
) -> Result<String, AuthError> {
    let token = new_refresh_token();
    tx.execute(
        "INSERT INTO auth.refresh_tokens (token_hash, user_id, session_id, parent_id)
         VALUES ($1, $2, $3, $4)",
        &[&token_hash(&token), &user_id, &session_id, &parent],
    )
    .await?;
    Ok(token)
}

/// The user a principal acts for; service or anonymous tokens without `sub` have none.
pub fn principal_user(p: &Principal) -> Result<Uuid, AuthError> {
    p.user_id
        .as_deref()
        .and_then(|s| Uuid::parse_str(s).ok())
        .ok_or_else(|| AuthError::InvalidToken("this token names no user".into()))
}

/// What a [`UserProfile`] is read from, in [`profile_from_row`]'s order.
const PROFILE_COLUMNS: &str = "id, coalesce(email, ''), role, user_metadata, app_metadata, \
     created_at, updated_at, last_sign_in_at, is_anonymous";

fn profile_from_row(r: &tokio_postgres::Row) -> UserProfile {
    UserProfile {
        id: r.get(0),
        email: r.get(1),
        role: r.get(2),
        user_metadata: r.get(3),
        app_metadata: r.get(4),
        created_at: r.get(5),
        updated_at: r.get(6),
        last_sign_in_at: r.get(7),
        is_anonymous: r.get(8),
    }
}

/// A JSON object given by a client for metadata, or `{}`.
fn json_object(v: Option<&serde_json::Value>) -> serde_json::Value {
    v.filter(|m| m.is_object())
        .cloned()
        .unwrap_or_else(|| serde_json::json!({}))
}

async fn record_event(
    tx: &tokio_postgres::Transaction<'_>,
    user_id: Uuid,
    event_type: &str,
    session_id: Option<Uuid>,
    meta: &ClientMeta,
) -> Result<(), AuthError> {
    tx.execute(
        "INSERT INTO public.auth_events (user_id, event_type, session_id, ip, user_agent)
         VALUES ($1, $2, $3, $4, $5)",
        &[
            &user_id,
            &event_type,
            &session_id,
            &meta.ip,
            &meta.user_agent,
        ],
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hashing_runs_at_most_one_job_per_core_even_for_callers_that_give_up() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static NOW: AtomicUsize = AtomicUsize::new(0);
        static PEAK: AtomicUsize = AtomicUsize::new(0);
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let jobs: Vec<_> = (0..4 * cores)
            .map(|_| {
                tokio::spawn(super::blocking(|| {
                    let n = NOW.fetch_add(1, Ordering::SeqCst) + 1;
                    PEAK.fetch_max(n, Ordering::SeqCst);
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    NOW.fetch_sub(1, Ordering::SeqCst);
                }))
            })
            .collect();
        // Half the callers give up at once: their jobs still hold their slots.
        for (i, j) in jobs.into_iter().enumerate() {
            if i % 2 == 0 {
                j.abort();
            } else {
                j.await.unwrap().unwrap();
            }
        }
        // Wait for the abandoned jobs too.
        let _all = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            while NOW.load(Ordering::SeqCst) > 0 {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        })
        .await;
        let peak = PEAK.load(Ordering::SeqCst);
        assert!(peak >= 1 && peak <= cores, "peak {peak} > {cores} cores");
    }
}
