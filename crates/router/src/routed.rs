//! A change as the router hands it to connections.

use std::ops::Deref;
use std::sync::{Arc, OnceLock};

use aether_core::changes::RowChange;

/// Encodings of one change the edge may keep beside it.
pub const FRAME_SLOTS: usize = 4;

/// Which of a [`Routed`]'s encodings: each dialect of the edge picks its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameSlot(usize);

impl FrameSlot {
    /// Panics at compile time (in a `const`) for a slot past [`FRAME_SLOTS`].
    pub const fn new(i: usize) -> Self {
        assert!(i < FRAME_SLOTS, "frame slot out of range");
        FrameSlot(i)
    }
}

/// The change, and room for the edge to keep each wire encoding of it, made
/// once by the first connection that sends it and shared by every other
/// recipient of that dialect. The router does not know what the encodings are;
/// the change itself carries data only.
#[derive(Debug)]
pub struct Routed {
    change: Arc<RowChange>,
    frames: [OnceLock<Arc<str>>; FRAME_SLOTS],
}

impl Routed {
    pub fn new(change: Arc<RowChange>) -> Self {
        Routed {
            change,
            frames: Default::default(),
        }
    }

    pub fn change(&self) -> &Arc<RowChange> {
        &self.change
    }

    /// The encoding in `slot`, made by `encode` the first time it is asked for.
    pub fn frame(&self, slot: FrameSlot, encode: impl FnOnce(&RowChange) -> String) -> &Arc<str> {
        self.frames[slot.0].get_or_init(|| Arc::from(encode(&self.change)))
    }
}

impl Deref for Routed {
    type Target = RowChange;

    fn deref(&self) -> &RowChange {
        &self.change
    }
}
