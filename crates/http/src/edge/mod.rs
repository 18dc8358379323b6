//! The HTTP edge: the accept loop and what every connection gets before a route
//! sees it. hyper (through hyper-util's auto builder, with upgrades and graceful
//! shutdown) drives each connection; this module adds what they lack:
//!
//! - connection caps at `accept`, in all and per client address ([`limits`]), so
//!   one address cannot take every file descriptor;
//! - a header timeout and an idle keep-alive timeout ([`conn::Activity`]);
//! - a bounded lingering close after a request body was left unread (refused
//!   uploads), so the client reads the answer instead of a reset;
//! - `accept` errors (out of descriptors) back off instead of spinning;
//! - the client address ([`ClientIp`]), from `X-Forwarded-For` only behind a
//!   trusted proxy.

pub(crate) mod client_ip;
pub(crate) mod conn;
mod limits;

use std::convert::Infallible;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use http_body::Body as _;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

pub use client_ip::{ClientIp, TrustedProxies};
use conn::{Activity, EdgeIo, RequestBody, ResponseBody};
pub use limits::ConnLimits;
use limits::Refusal;

/// `accept` failing for a reason other than one connection (EMFILE, ENFILE,
/// ENOBUFS) waits this long at first, doubling up to [`ACCEPT_BACKOFF_MAX`]:
/// long enough not to spin, short enough to serve again as soon as a
/// descriptor is free.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_millis(100);
/// How long open connections get to finish at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The edge's settings (`HTTP_*`, `TRUSTED_PROXIES`).
#[derive(Debug, Clone)]
pub struct EdgeSettings {
    /// A request head must arrive in full within this long of the connection
    /// opening or of its first byte; `None`: no limit.
    pub header_timeout: Option<Duration>,
    /// A connection with no request in flight is closed after this long.
    pub idle_timeout: Option<Duration>,
    /// `0`: no cap.
    pub max_connections: usize,
    /// `0`: no cap. Trusted proxies are not capped per address.
    pub max_connections_per_addr: usize,
    pub trusted_proxies: Arc<TrustedProxies>,
}

/// The process's soft open-files limit, if it has one.
pub fn open_files_limit() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    (rc == 0 && lim.rlim_cur != libc::RLIM_INFINITY).then_some(lim.rlim_cur)
}

/// `HTTP_MAX_CONNECTIONS=auto`: three quarters of the open-files limit, leaving
/// the rest for PostgreSQL connections, stored files and logs (`0`, no cap,
/// when there is no limit).
pub fn auto_max_connections() -> usize {
    open_files_limit()
        .map(|n| usize::try_from(n / 4 * 3).unwrap_or(usize::MAX))
        .unwrap_or(0)
}

/// Logs at most once a second, counting what it left out.
#[derive(Default)]
struct LogThrottle {
    last: Option<Instant>,
    suppressed: u64,
}

impl LogThrottle {
    /// `Some(left out since the last line)` when a line may be written now.
    fn ready(&mut self) -> Option<u64> {
        self.ready_at(Instant::now())
    }

    fn ready_at(&mut self, now: Instant) -> Option<u64> {
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// Errors that concern one connection (it went away before `accept`), not the
/// listener: accept again at once.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// Answers a connection over a cap without reading it, then closes it. The
/// write is one non-blocking attempt into a fresh socket's empty buffer.
fn refuse(tcp: &TcpStream, r: Refusal) {
    let (status, reason, code, message) = match r {
        Refusal::PerAddress(n) => (
            429,
            "Too Many Requests",
            "rate-limit/connections",
            format!("too many open connections from this address (limit {n})"),
        ),
        Refusal::Total(n) => (
            503,
            "Service Unavailable",
            "server/connection-limit",
            format!("the server is at its connection limit ({n})"),
        ),
    };
    let body = serde_json::json!({"error": {"message": message, "code": code, "status": status}})
        .to_string();
    let answer = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tcp.try_write(answer.as_bytes());
}

/// The connection a request came on, for a WebSocket upgraded from HTTP/1.1:
/// its row changes may then be written to it directly
/// (`aether_router::direct`). Over HTTP/2 the socket carries other streams
/// too, so only the WebSocket route takes it, and only over HTTP/1.1.
#[derive(Clone)]
pub(crate) struct Socket(pub(crate) Arc<TcpStream>);

/// Serves `app` on `listener` until `shutdown`, then gives open connections
/// [`SHUTDOWN_GRACE`] to finish. `limits` counts (and caps) the connections.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    edge: EdgeSettings,
    limits: Arc<ConnLimits>,
    shutdown: CancellationToken,
) {
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // As axum::serve: WebSockets over HTTP/2 (extended CONNECT) for h2c clients.
    builder.http2().enable_connect_protocol();
    let mut backoff = Duration::ZERO;
    let mut accept_log = LogThrottle::default();
    let mut refusal_log = LogThrottle::default();
    tracing::info!(
        header_timeout_s = edge.header_timeout.map(|d| d.as_secs()),
        idle_timeout_s = edge.idle_timeout.map(|d| d.as_secs()),
        max_connections = edge.max_connections,
        max_connections_per_addr = edge.max_connections_per_addr,
        "http edge"
    );
    loop {
        let accepted = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            r = listener.accept() => r,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => {
                backoff = Duration::ZERO;
                a
            }
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                backoff = (backoff * 2).clamp(ACCEPT_BACKOFF_MIN, ACCEPT_BACKOFF_MAX);
                metrics::counter!("aether_http_accept_errors_total").increment(1);
                if let Some(suppressed) = accept_log.ready() {
                    tracing::warn!(error = %e, suppressed, pause_ms = backoff.as_millis() as u64,
                        open = limits.open(), "accept failed; backing off");
                }
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => continue,
                }
            }
        };
        // Change frames are small and a connection may get many in a row: without
        // TCP_NODELAY, Nagle holds each frame until the client's (delayed, up to
        // 40 ms) ACK of the previous one.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY");
        }
        let ip = peer.ip().to_canonical();
        let place = match limits.admit(ip, edge.trusted_proxies.contains(ip)) {
            Ok(p) => p,
            Err(r) => {
                let reason = match r {
                    Refusal::PerAddress(_) => "per_address",
                    Refusal::Total(_) => "total",
                };
                metrics::counter!("aether_http_connections_refused_total", "reason" => reason)
                    .increment(1);
                if let Some(suppressed) = refusal_log.ready() {
                    tracing::warn!(%ip, reason, suppressed, "connection refused: over a connection cap");
                }
                refuse(&tcp, r);
                continue;
            }
        };
        let tcp = Arc::new(tcp);
        let activity = Activity::new();
        let io = TokioIo::new(EdgeIo::new(Arc::clone(&tcp), Arc::clone(&activity), place));
        let service = {
            let activity = Arc::clone(&activity);
            let tcp = Arc::clone(&tcp);
            let trusted = Arc::clone(&edge.trusted_proxies);
            let app = app.clone();
            hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                let in_flight = activity.start_request(!req.body().is_end_stream());
                let body_activity = Arc::clone(&activity);
                let mut req =
                    req.map(|b| axum::body::Body::new(RequestBody::new(b, body_activity)));
                let client = trusted.client_ip(peer.ip(), req.headers());
                req.extensions_mut().insert(ConnectInfo(peer));
                req.extensions_mut().insert(ClientIp(client));
                req.extensions_mut().insert(Socket(Arc::clone(&tcp)));
                let app = app.clone();
                async move {
                    let res = match app.oneshot(req).await {
                        Ok(r) => r,
                        Err(never) => match never {},
                    };
                    Ok::<_, Infallible>(res.map(|b| ResponseBody::new(b, in_flight)))
                }
            })
        };
        let conn = graceful.watch(
            builder
                .serve_connection_with_upgrades(io, service)
                .into_owned(),
        );
        let (header, idle) = (edge.header_timeout, edge.idle_timeout);
        tokio::spawn(async move {
            tokio::select! {
                biased;
                why = activity.expired(header, idle) => {
                    // Dropping the connection closes the socket: nothing is in
                    // flight, so nothing is cut short.
                    metrics::counter!("aether_http_connections_timed_out_total", "reason" => why.as_str())
                        .increment(1);
                    tracing::debug!(%peer, reason = why.as_str(), "connection closed");
                }
                r = conn => {
                    if let Err(e) = r {
                        tracing::trace!(%peer, error = %e, "connection ended with an error");
                    }
                }
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::debug!("connections still open after the shutdown grace period");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_throttle_lets_one_line_a_second_through_and_counts_the_rest() {
        let mut t = LogThrottle::default();
        let t0 = Instant::now();
        assert_eq!(t.ready_at(t0), Some(0));
        assert_eq!(t.ready_at(t0 + Duration::from_millis(10)), None);
        assert_eq!(t.ready_at(t0 + Duration::from_millis(999)), None);
        assert_eq!(t.ready_at(t0 + Duration::from_millis(1000)), Some(2));
        assert_eq!(t.ready_at(t0 + Duration::from_millis(1500)), None);
    }

    #[test]
    fn auto_cap_is_below_the_open_files_limit() {
        if let Some(n) = open_files_limit() {
            let cap = auto_max_connections() as u64;
            assert!(cap > 0 && cap < n, "{cap} of {n}");
        }
    }
}
