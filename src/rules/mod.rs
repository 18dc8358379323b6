//! The application's own table rules, wired into the router as a policy and
//! taps: the router knows no table name, this module knows them all.
//!
//! - [`visibility::TableRules`]: who may see a row of which table.
//! - [`ChannelSettings`]: `aether.channels` rows → the live channel settings of
//!   the WebSocket API.
//! - [`SessionRevocation`]: a signed-out `auth.sessions` row → its connections close.
//! - [`KingShareEvents`]: file and share changes → KingShare notifications to
//!   the users concerned.
//! - [`DatabaseBroadcast`]: `realtime.messages` rows (`realtime.send`,
//!   `realtime.broadcast_changes`) → broadcasts on `/realtime/v1`.
//! - [`presence::SharesDirectory`]: who hears of a user's presence.

pub(crate) mod channels;
pub(crate) mod history;
pub(crate) mod presence;
pub(crate) mod visibility;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use aether_core::changes::{ChangeKind, Row, RowChange};
use serde_json::Value;

use aether_realtime::hub::{ChannelConfig, ChannelConfigs, HubCommand};
use aether_realtime::kingshare::{self, Notifier};
use aether_realtime::phoenix_hub::{BroadcastPayload, PhxCommand};
use aether_router::tap::{Effects, Tap};

/// The value of `col` in `row`, if the relation has that column.
fn at<'r>(change: &RowChange, row: &'r Row, col: &str) -> Option<&'r Value> {
    change.relation.value(row, col)
}

/// Keeps the WebSocket API's channel settings current from `aether.channels`.
pub(crate) struct ChannelSettings(pub ChannelConfigs);

impl Tap for ChannelSettings {
    fn change(&mut self, change: &RowChange, _: &mut Effects) {
        let rel = &change.relation;
        if rel.schema != "aether" || rel.name != "channels" {
            return;
        }
        let Ok(mut map) = self.0.write() else { return };
        match change.kind {
            ChangeKind::Truncate => map.clear(),
            ChangeKind::Delete => {
                if let Some(Value::String(name)) =
                    change.old.as_ref().and_then(|o| at(change, o, "name"))
                {
                    map.remove(name);
                }
            }
            ChangeKind::Insert | ChangeKind::Update => {
                let Some(new) = &change.new else { return };
                if let Some(Value::String(old)) =
                    change.old.as_ref().and_then(|o| at(change, o, "name"))
                {
                    map.remove(old);
                }
                let Some(Value::String(name)) = at(change, new, "name") else {
                    return;
                };
                let num = |col: &str| {
                    at(change, new, col)
                        .and_then(|v| v.as_u64())
                        .and_then(|n| u32::try_from(n).ok())
                };
                let config = ChannelConfig {
                    max_connections: num("max_connections"),
                    message_rate_limit: num("message_rate_limit"),
                    require_auth: at(change, new, "require_auth")
                        .and_then(|v| v.as_bool())
                        .unwrap_or(false),
                };
                map.insert(name.clone(), config);
            }
        }
    }
}

/// A signed-out auth session (`auth.sessions.revoked_at` set, or the row gone):
/// its connections are closed now, not when their token expires.
pub(crate) struct SessionRevocation;

impl Tap for SessionRevocation {
    fn change(&mut self, change: &RowChange, effects: &mut Effects) {
        let rel = &change.relation;
        if rel.schema != "auth" || rel.name != "sessions" {
            return;
        }
        let revoked = match (change.kind, &change.new, &change.old) {
            (ChangeKind::Update | ChangeKind::Insert, Some(new), _) => {
                at(change, new, "revoked_at")
                    .is_some_and(|v| !v.is_null())
                    .then(|| at(change, new, "id"))
                    .flatten()
            }
            (ChangeKind::Delete, _, Some(old)) => at(change, old, "id"),
            _ => None,
        };
        if let Some(Value::String(id)) = revoked
            && let Ok(id) = uuid::Uuid::parse_str(id)
        {
            effects.revoke_session(id);
        }
    }
}

/// Tells KingShare connections of file and share events derived from changes.
pub(crate) struct KingShareEvents(pub Arc<Notifier>);

impl Tap for KingShareEvents {
    fn change(&mut self, change: &RowChange, _: &mut Effects) {
        // Every node derives these from the change stream itself.
        for (user, frame) in kingshare::events_for(change) {
            self.0.to_user_here(&user, &frame);
        }
    }
}

/// Broadcast from the database: a `realtime.messages` row (written by
/// `realtime.send` or `realtime.broadcast_changes`) goes to its topic's members
/// on `/realtime/v1`, as a `broadcast` with the row's event and payload, and to
/// the members of the Aether channel of that name on `/ws`. A private message
/// goes to the members of the private channel of that topic on `/realtime/v1`
/// only (its `realtime.messages` policies let them in).
pub(crate) struct DatabaseBroadcast {
    pub phoenix: tokio::sync::mpsc::Sender<PhxCommand>,
    /// The Aether channels of `/ws`: a message to topic `x` also reaches the
    /// members of channel `x`.
    pub hub: tokio::sync::mpsc::Sender<HubCommand>,
    /// The newest message relayed: rows up to it are in the change log, so
    /// [`prune_broadcasts`] may delete them.
    pub relayed: Arc<AtomicI64>,
}

impl Tap for DatabaseBroadcast {
    fn change(&mut self, change: &RowChange, _: &mut Effects) {
        let rel = &change.relation;
        if rel.schema != "realtime" || rel.name != "messages" || change.kind != ChangeKind::Insert {
            return;
        }
        let Some(row) = change.new.as_ref() else {
            return;
        };
        if let Some(id) = at(change, row, "id").and_then(Value::as_i64) {
            self.relayed.fetch_max(id, Ordering::Relaxed);
        }
        let text = |col| at(change, row, col).and_then(Value::as_str);
        // Authorization probes (src/rules/channels.rs) are rolled back and never
        // decoded; the event name keeps them out should one ever commit.
        if text("extension") != Some("broadcast") || text("event") == Some(channels::PROBE_EVENT) {
            return;
        }
        let private = match at(change, row, "private") {
            Some(Value::Bool(b)) => *b,
            _ => return,
        };
        let Some(topic) = text("topic") else { return };
        let payload = match at(change, row, "payload") {
            Some(Value::Null) | None => Value::Object(Default::default()),
            Some(v) => v.clone(),
        };
        let event = text("event").unwrap_or_default().to_owned();
        let to_phoenix = PhxCommand::Broadcast {
            from: aether_realtime::phoenix_hub::Sender::Database,
            // A private message goes to the private channel's members, whom
            // its policies let in.
            topic: aether_realtime::phoenix_hub::hub_topic(&format!("realtime:{topic}"), private),
            event: event.clone(),
            payload: BroadcastPayload::Json(payload.clone()),
        };
        // `/ws` channels have no private kind: only public messages go there.
        let to_ws = (!private).then(|| HubCommand::FromDatabase {
            channel: topic.to_owned(),
            event,
            content: payload,
            id: format!("{}/{}", change.epoch, change.position),
            committed_ms: change.commit_time_ms,
        });
        if let Some(to_ws) = to_ws
            && self.hub.try_send(to_ws).is_err()
        {
            tracing::warn!(topic, "channel hub busy: database broadcast dropped");
            metrics::counter!("aether_database_broadcasts_dropped_total").increment(1);
        }
        if self.phoenix.try_send(to_phoenix).is_err() {
            // As a client's broadcast to a hub that cannot keep up: dropped,
            // counted, never waited for on the router task.
            tracing::warn!(topic, "phoenix hub busy: database broadcast dropped");
            metrics::counter!("aether_database_broadcasts_dropped_total").increment(1);
        }
    }
}

/// Deletes the `realtime.messages` rows the change log already holds, every
/// few seconds, so the table stays small, and rows older than a minute (left
/// from before a restart, when nothing was relayed yet). Deleting early loses
/// nothing: a message is decoded from the WAL, which the slot keeps until the
/// log holds it, not from the table.
pub(crate) async fn prune_broadcasts(
    pool: deadpool_postgres::Pool,
    relayed: Arc<AtomicI64>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
    // Also at the first tick: what an earlier run left.
    let mut pruned = -1;
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let upto = relayed.load(Ordering::Relaxed);
        if upto <= pruned {
            continue;
        }
        let Ok(client) = pool.get().await else {
            continue;
        };
        // Tried again once more is relayed, not on every tick: a table of
        // another shape (Supabase's, which Aether leaves alone) is told once.
        pruned = upto;
        if let Err(e) = client
            .execute(
                "DELETE FROM realtime.messages
                  WHERE id <= $1 OR inserted_at < now() - interval '1 minute'",
                &[&upto],
            )
            .await
        {
            tracing::warn!(error = %e, "pruning realtime.messages failed");
        }
    }
}
