//! The application's own table rules, wired into the router as a policy and
//! taps: the router knows no table name, this module knows them all.
//!
//! - [`visibility::TableRules`]: who may see a row of which table.
//! - [`ChannelSettings`]: `aether.channels` rows → the live channel settings of
//!   the WebSocket API.
//! - [`SessionRevocation`]: a signed-out `auth.sessions` row → its connections close.
//! - [`KingShareEvents`]: file and share changes → KingShare notifications to
//!   the users concerned.
//! - [`presence::SharesDirectory`]: who hears of a user's presence.

pub mod presence;
pub mod visibility;

use std::sync::Arc;

use aether_core::changes::{ChangeKind, Row, RowChange};
use serde_json::Value;

use aether_realtime::hub::{ChannelConfig, ChannelConfigs};
use aether_realtime::kingshare::{self, Notifier};
use aether_router::tap::{Effects, Tap};

/// The value of `col` in `row`, if the relation has that column.
fn at<'r>(change: &RowChange, row: &'r Row, col: &str) -> Option<&'r Value> {
    change.relation.value(row, col)
}

/// Keeps the WebSocket API's channel settings current from `aether.channels`.
pub struct ChannelSettings(pub ChannelConfigs);

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
pub struct SessionRevocation;

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
pub struct KingShareEvents(pub Arc<Notifier>);

impl Tap for KingShareEvents {
    fn change(&mut self, change: &RowChange, _: &mut Effects) {
        for (user, frame) in kingshare::events_for(change) {
            self.0.to_user(&user, &frame);
        }
    }
}
