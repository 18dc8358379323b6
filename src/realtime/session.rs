//! One WebSocket connection: a reader that parses client frames and a writer that
//! drains the connection's bounded queue. The router never waits on either.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::protocol::{self, ClientFrame, FrameError, SubscribeRequest};
use crate::auth::Principal;
use crate::router::catalog::Catalog;
use crate::router::filter::Filter;
use crate::router::{Command, EventMask, Outbound, SessionHandle, SubscriptionSpec};
use crate::server::AppState;

/// Close codes (4000–4999 are application codes).
pub const CLOSE_AUTH: u16 = 4001;
pub const CLOSE_SLOW: u16 = 4008;
pub const CLOSE_GOING_AWAY: u16 = 1001;

/// Frames written before one flush when the queue holds a burst.
const MAX_FRAMES_PER_FLUSH: usize = 64;

/// Refuses a connection whose token failed: an error frame, then close.
pub async fn reject(mut socket: WebSocket, code: &str, message: String) {
    let frame = protocol::error_frame("auth", code, &message, None);
    let _ = socket.send(Message::Text(frame.into())).await;
    let _ = socket
        .send(Message::Close(Some(CloseFrame {
            code: CLOSE_AUTH,
            reason: Utf8Bytes::from(code.to_owned()),
        })))
        .await;
}

pub async fn run(socket: WebSocket, state: AppState, principal: Principal) {
    let session = state.next_session.fetch_add(1, Ordering::Relaxed);
    let (tx, mut rx) = mpsc::channel::<Outbound>(state.config.ws_queue_capacity);
    let overflowed = CancellationToken::new();
    let principal = Arc::new(principal);
    let expires_at = principal.expires_at;
    let handle = SessionHandle {
        tx: tx.clone(),
        overflowed: overflowed.clone(),
        principal,
    };
    if state
        .router
        .send(Command::Attach { session, handle })
        .await
        .is_err()
    {
        return;
    }
    let (mut sink, mut stream) = socket.split();
    let done = CancellationToken::new();
    let shutdown = state.shutdown.clone();

    let writer_done = done.clone();
    let writer = async move {
        let expiry = async {
            match expires_at {
                Some(exp) => {
                    let left = exp - chrono::Utc::now().timestamp();
                    tokio::time::sleep(Duration::from_secs(u64::try_from(left).unwrap_or(0))).await
                }
                None => std::future::pending().await,
            }
        };
        tokio::pin!(expiry);
        let mut frames = Vec::new();
        let close = loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break Some((CLOSE_GOING_AWAY, "server shutting down".to_owned(), None)),
                _ = overflowed.cancelled() => break Some((
                    CLOSE_SLOW,
                    "slow consumer".to_owned(),
                    Some(protocol::error_frame(
                        "realtime",
                        "slow_consumer",
                        "outbound queue full: this connection is closed; reconnect and resubscribe with `since` set to the last change id received",
                        None,
                    )),
                )),
                _ = &mut expiry => break Some((
                    CLOSE_AUTH,
                    "auth/expired-token".to_owned(),
                    Some(protocol::error_frame("auth", "auth/expired-token", "the access token has expired", None)),
                )),
                _ = writer_done.cancelled() => break None,
                out = rx.recv() => {
                    let Some(out) = out else { break None };
                    protocol::encode(out, &mut frames);
                    // What is already queued goes out in the same write: one flush
                    // (one syscall) per burst instead of one per frame.
                    while frames.len() < MAX_FRAMES_PER_FLUSH {
                        match rx.try_recv() {
                            Ok(more) => protocol::encode(more, &mut frames),
                            Err(_) => break,
                        }
                    }
                    let mut failed = false;
                    for f in frames.drain(..) {
                        if sink.feed(Message::Text(f.into())).await.is_err() {
                            failed = true;
                            break;
                        }
                    }
                    if failed || sink.flush().await.is_err() {
                        break None;
                    }
                }
            }
        };
        if let Some((code, reason, frame)) = close {
            if let Some(f) = frame {
                let _ = sink.send(Message::Text(f.into())).await;
            }
            let _ = sink
                .send(Message::Close(Some(CloseFrame {
                    code,
                    reason: reason.into(),
                })))
                .await;
        }
        writer_done.cancel();
    };

    let reader_state = state.clone();
    let reader_done = done.clone();
    let reader = async move {
        loop {
            let msg = tokio::select! {
                _ = reader_done.cancelled() => break,
                msg = stream.next() => msg,
            };
            match msg {
                Some(Ok(Message::Text(text))) => {
                    if let Err(e) = handle_text(&reader_state, session, &text).await {
                        let frame = Outbound::Error {
                            subscription: e.subscription.map(Arc::from),
                            code: e.code,
                            message: e.message,
                        };
                        if tx.send(frame).await.is_err() {
                            break;
                        }
                    }
                }
                Some(Ok(Message::Binary(_))) => {
                    let frame = Outbound::Error {
                        subscription: None,
                        code: "invalid_message",
                        message: "binary frames are not supported; send JSON text frames".into(),
                    };
                    if tx.send(frame).await.is_err() {
                        break;
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {} // ping/pong are answered by the library
            }
        }
        reader_done.cancel();
    };

    tokio::join!(writer, reader);
    let _ = state.router.send(Command::Detach { session }).await;
}

async fn handle_text(state: &AppState, session: u64, text: &str) -> Result<(), FrameError> {
    match protocol::parse(text)? {
        ClientFrame::Subscribe(req) => {
            let spec = resolve(state, &req).await?;
            let _ = state
                .router
                .send(Command::Subscribe { session, spec })
                .await;
        }
        ClientFrame::Unsubscribe { id } => {
            let _ = state
                .router
                .send(Command::Unsubscribe {
                    session,
                    id: Arc::from(id),
                })
                .await;
        }
    }
    Ok(())
}

/// Validates a subscription against the published tables.
async fn resolve(state: &AppState, req: &SubscribeRequest) -> Result<SubscriptionSpec, FrameError> {
    let err = |code, message: String| FrameError {
        code,
        message,
        subscription: Some(req.id.clone()),
    };
    let events = EventMask::parse(&req.event).ok_or_else(|| {
        err(
            "invalid_event",
            format!(
                "event {:?} is not INSERT, UPDATE, DELETE, TRUNCATE or *",
                req.event
            ),
        )
    })?;
    let since = req
        .since
        .as_deref()
        .map(|s| {
            s.parse()
                .map_err(|e: crate::replication::lsn::ParsePositionError| {
                    err("invalid_since", e.to_string())
                })
        })
        .transpose()?;
    let lookup = |c: &Catalog| c.get(&req.schema, &req.table);
    let mut table = state.catalog.read().ok().and_then(|c| lookup(&c));
    if table.is_none() {
        // A DBA may have added the table to the publication since we last looked.
        if let Ok(client) = state.pool.get().await
            && let Ok(fresh) = Catalog::load(&client, &state.config.publication).await
            && let Ok(mut c) = state.catalog.write()
        {
            c.replace_with(fresh);
            table = lookup(&c);
        }
    }
    let table = table.ok_or_else(|| {
        err(
            "unknown_table",
            format!(
                "table {}.{} does not exist or is not published for realtime",
                req.schema, req.table
            ),
        )
    })?;
    let filter = match &req.filter {
        Some(f) => Filter::parse(f, &table).map_err(|e| err("invalid_filter", e.to_string()))?,
        None => Filter::default(),
    };
    Ok(SubscriptionSpec {
        id: Arc::from(req.id.as_str()),
        table: Arc::clone(&table.qualified),
        events,
        filter,
        since,
    })
}
