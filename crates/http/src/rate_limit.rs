//! Request rate limits (GCRA, through `governor`): `/auth/*` per client address,
//! `/storage/*` per user (per address for requests without a valid token).
//! Over the limit: 429 `rate-limit/exceeded` with `Retry-After` (seconds).
//!
//! The client address is [`client_ip`]: the TCP peer, or behind one of
//! `TRUSTED_PROXIES` the client its `X-Forwarded-For` names.

use std::net::{IpAddr, Ipv4Addr};
use std::num::NonZeroU32;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

use super::error::ApiError;
use super::extract::client_ip;
use crate::AppState;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum StorageKey {
    User(String),
    Addr(IpAddr),
}

/// Per-address sign-in and per-user storage budgets (`RATE_LIMIT_*_PER_MIN`).
pub struct RateLimits {
    auth: DefaultKeyedRateLimiter<IpAddr>,
    storage: DefaultKeyedRateLimiter<StorageKey>,
    clock: DefaultClock,
}

/// Forgets the keys whose budget is full again, once a minute, until shutdown.
pub async fn janitor(state: AppState, shutdown: tokio_util::sync::CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => state.limits.retain_recent(),
        }
    }
}

fn per_minute(n: u32) -> Quota {
    Quota::per_minute(NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN))
}

impl RateLimits {
    pub fn new(auth_per_min: u32, storage_per_min: u32) -> Self {
        RateLimits {
            auth: DefaultKeyedRateLimiter::keyed(per_minute(auth_per_min)),
            storage: DefaultKeyedRateLimiter::keyed(per_minute(storage_per_min)),
            clock: DefaultClock::default(),
        }
    }

    /// Forgets keys whose budget is full again (keeps memory bounded).
    fn retain_recent(&self) {
        self.auth.retain_recent();
        self.storage.retain_recent();
        self.auth.shrink_to_fit();
        self.storage.shrink_to_fit();
    }

    fn check_auth(&self, ip: IpAddr) -> Result<(), Duration> {
        self.auth
            .check_key(&ip)
            .map_err(|n| n.wait_time_from(self.clock.now()))
    }

    fn check_storage(&self, key: &StorageKey) -> Result<(), Duration> {
        self.storage
            .check_key(key)
            .map_err(|n| n.wait_time_from(self.clock.now()))
    }
}

fn too_many(wait: Duration) -> Response {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    let secs = secs.max(1);
    ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "rate-limit/exceeded",
        format!("too many requests: retry in {secs} s"),
    )
    .with_header(header::RETRY_AFTER, secs.to_string())
    .into_response()
}

fn peer_ip(req: &Request) -> IpAddr {
    client_ip(req.extensions()).unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
}

/// Middleware for `/auth/*`.
pub(crate) async fn auth(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if let Err(wait) = state.limits.check_auth(peer_ip(&req)) {
        return too_many(wait);
    }
    next.run(req).await
}

/// Middleware for `/storage/*`: keyed by the token's user (signature checked, no
/// database query), else by address.
pub(crate) async fn storage(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let user = super::extract::bearer_token(req.headers())
        .and_then(|token| state.jwt.verify(token).ok())
        .and_then(|p| p.user_id);
    let key = match user {
        Some(u) => StorageKey::User(u),
        None => StorageKey::Addr(peer_ip(&req)),
    };
    if let Err(wait) = state.limits.check_storage(&key) {
        return too_many(wait);
    }
    next.run(req).await
}
