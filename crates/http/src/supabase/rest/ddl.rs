//! What `/rest/v1` knows of the exposed schemas, kept fresh: reloaded when a
//! DDL statement's event trigger says so, and on a miss.

use super::*;

/// Listens for `aether_schema` (migrations/0015: an event trigger after
/// every DDL command) and marks the schema cache stale, so the next request
/// sees a table, column, key or grant changed a moment ago. Reconnects with a
/// backoff; each (re)connection marks the cache stale too (DDL may have been
/// missed). Where the event trigger could not be made, nothing arrives and
/// the cache reloads on a miss.
pub async fn listen_for_ddl(
    pg: tokio_postgres::Config,
    state: AppState,
    shutdown: tokio_util::sync::CancellationToken,
) {
    use futures_util::StreamExt as _;
    let mut backoff = std::time::Duration::from_millis(200);
    loop {
        let connected = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            c = pg.connect(tokio_postgres::NoTls) => c,
        };
        match connected {
            Ok((client, mut conn)) => {
                let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
                let driver = tokio::spawn(async move {
                    let mut messages =
                        futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
                    while let Some(Ok(m)) = messages.next().await {
                        if matches!(m, tokio_postgres::AsyncMessage::Notification(_)) {
                            // One pending wake-up is enough: it reloads everything.
                            let _ = tx.try_send(());
                        }
                    }
                });
                let listening = tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => {
                        driver.abort();
                        return;
                    }
                    r = client.batch_execute("LISTEN aether_schema") => r.is_ok(),
                };
                if listening {
                    let since = std::time::Instant::now();
                    state.rest_schema.invalidate();
                    // A half-open connection hears nothing: ask every 30 s.
                    let mut alive = tokio::time::interval(std::time::Duration::from_secs(30));
                    alive.tick().await;
                    loop {
                        tokio::select! {
                            biased;
                            _ = shutdown.cancelled() => {
                                driver.abort();
                                return;
                            }
                            m = rx.recv() => match m {
                                Some(()) => state.rest_schema.invalidate(),
                                None => break,
                            },
                            _ = alive.tick() => {
                                let ping = tokio::time::timeout(
                                    std::time::Duration::from_secs(10),
                                    client.simple_query("SELECT 1"),
                                );
                                if !matches!(ping.await, Ok(Ok(_))) {
                                    break;
                                }
                            }
                        }
                    }
                    // Only a connection that stayed up a while resets the wait.
                    if since.elapsed() > std::time::Duration::from_secs(10) {
                        backoff = std::time::Duration::from_millis(200);
                    }
                }
                driver.abort();
                tracing::debug!("schema listener: connection ended; reconnecting");
            }
            Err(e) => tracing::debug!(error = %e, "schema listener: cannot connect"),
        }
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(std::time::Duration::from_secs(10));
    }
}

/// Reloads the schema cache, unless it was reloaded less than a second ago.
pub(super) async fn reload(state: &AppState) -> Result<(), RestError> {
    let client = state.pool.get().await.map_err(|_| unavailable())?;
    state
        .rest_schema
        .reload(&client, &state.settings.rest_schemas)
        .await
        .map_err(|e| RestError::db(e, false))?;
    Ok(())
}

/// Finds a table of the exposed schema, reloading the cache once on a miss.
pub(super) async fn table(
    state: &AppState,
    schema: &str,
    name: &str,
) -> Result<(std::sync::Arc<schema::Schema>, (String, String)), RestError> {
    let key = (schema.to_owned(), name.to_owned());
    let cache = &state.rest_schema;
    if cache.is_stale() || !cache.get().tables.contains_key(&key) {
        reload(state).await?;
    }
    let s = cache.get();
    if !s.tables.contains_key(&key) {
        return Err(RestError::new(
            StatusCode::NOT_FOUND,
            "PGRST205",
            format!("Could not find the table '{schema}.{name}' in the schema cache"),
        ));
    }
    Ok((s, key))
}
