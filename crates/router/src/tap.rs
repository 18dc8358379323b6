//! Taps: what the application does with each logged change besides routing it
//! to subscriptions (keep channel settings current, tell KingShare users of
//! their files, close connections of a signed-out session).
//!
//! The router calls every tap for every change, in log order, before routing it,
//! on its own task: a tap must not block. What a tap needs the router itself to
//! do, it asks through [`Effects`].

use aether_core::changes::RowChange;

/// "This change happened."
pub trait Tap: Send {
    fn change(&mut self, change: &RowChange, effects: &mut Effects);
}

/// Requests a tap makes of the router.
#[derive(Debug, Default)]
pub struct Effects {
    pub(crate) revoked_sessions: Vec<uuid::Uuid>,
}

impl Effects {
    /// The auth session `id` was signed out: its connections close now, not when
    /// their token expires.
    pub fn revoke_session(&mut self, id: uuid::Uuid) {
        self.revoked_sessions.push(id);
    }
}
