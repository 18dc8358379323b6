//! Row changes written straight to a connection's socket.
//!
//! A fan-out woke one task per connection to move each change from a queue
//! into its socket: scheduling, the engine's pass, the queue and the
//! WebSocket library's copy cost ~4.5 µs per delivery, a third of the
//! server's CPU at 10,000 subscribers, where the kernel's write is the rest
//! (aether-bench fan-out against its null server). A connection whose task
//! sleeps with nothing owed can be *claimed*: the router takes the socket
//! for one change and writer tasks, a batch each, write it there. Order holds
//! because a claim needs an empty queue and a claimed connection's next item
//! goes to the queue, which its task reads only once the claim is over.

use std::sync::Arc;

use crate::routed::Routed;

/// A connection's socket as the router may write to it.
pub trait Direct: Send + Sync {
    /// Takes the socket for one write if the connection's task sleeps with
    /// nothing owed; a `true` must be followed by [`deliver`](Self::deliver)
    /// or [`abandon`](Self::abandon).
    fn claim(&self) -> bool;
    /// Writes `change` for `subscription` (a claim is held) and gives the
    /// socket back; what the socket did not take is owed to the connection's
    /// task, which writes it before anything else.
    fn deliver(&self, subscription: &str, change: &Routed);
    /// Gives a claim back without writing its change (a writer task dropped
    /// unrun, a panic while writing). The change counts as sent to the
    /// connection, so the connection must end, and its client resume from
    /// the log, or it would miss the change.
    fn abandon(&self);
}

/// Changes claimed for writing, at most this many per writer task: the
/// first writer starts while the offer loop is still claiming.
pub(crate) const BATCH: usize = 1024;

/// A claim and the change it is for; dropped unwritten (a writer task that
/// never ran), it gives the claim back.
pub(crate) struct Claim {
    to: Arc<dyn Direct>,
    subscription: Arc<str>,
    change: Arc<Routed>,
    written: bool,
}

impl Claim {
    pub(crate) fn new(to: Arc<dyn Direct>, subscription: Arc<str>, change: Arc<Routed>) -> Claim {
        Claim {
            to,
            subscription,
            change,
            written: false,
        }
    }

    fn write(mut self) {
        self.written = true;
        let (to, subscription, change) = (&self.to, &self.subscription, &self.change);
        // A panic in a dialect's encoding must not leave the socket claimed
        // for ever (its task would wait on it).
        let delivered = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            to.deliver(subscription, change)
        }));
        if delivered.is_err() {
            tracing::error!("a direct write panicked; the claim is given back");
            to.abandon();
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if !self.written {
            self.to.abandon();
        }
    }
}

/// A few claims are written by the router itself: a task per change would
/// cost more than the writes (a single subscriber's stream).
const INLINE: usize = 16;

/// Writes `claims`, in order: from a task of their own, or at once if few.
pub(crate) fn write(claims: Vec<Claim>) {
    if claims.len() <= INLINE {
        claims.into_iter().for_each(Claim::write);
        return;
    }
    aether_core::task::spawn_named("direct-writer", async move {
        claims.into_iter().for_each(Claim::write);
    });
}
