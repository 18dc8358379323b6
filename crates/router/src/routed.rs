//! A change as the router hands it to connections.

use std::ops::Deref;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
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
    /// [`RowChange::approx_bytes`], counted once: every queue it enters weighs it.
    bytes: usize,
    frames: [OnceLock<Arc<str>>; FRAME_SLOTS],
    /// The hot tail's count of frame bytes beyond the first slot, while this
    /// change is in the tail ([`RowChange::approx_bytes`] counts one frame).
    counter: Option<Arc<AtomicUsize>>,
    extra: AtomicUsize,
    evicted: AtomicBool,
}

impl Routed {
    pub fn new(change: Arc<RowChange>) -> Self {
        Routed {
            bytes: change.approx_bytes(),
            change,
            frames: Default::default(),
            counter: None,
            extra: AtomicUsize::new(0),
            evicted: AtomicBool::new(false),
        }
    }

    /// A change held by the hot tail: frames made beyond the first slot are
    /// added to `counter` until [`evict`](Self::evict).
    pub(crate) fn counted(change: Arc<RowChange>, counter: Arc<AtomicUsize>) -> Self {
        Routed {
            counter: Some(counter),
            ..Routed::new(change)
        }
    }

    /// Leaves the tail: returns the extra bytes it had added to the counter.
    /// A frame made concurrently may still add itself once (over-counting,
    /// never under-counting).
    pub(crate) fn evict(&self) -> usize {
        self.evicted.store(true, Ordering::Release);
        self.extra.swap(0, Ordering::AcqRel)
    }

    pub fn change(&self) -> &Arc<RowChange> {
        &self.change
    }

    /// The change's [`RowChange::approx_bytes`].
    pub fn approx_bytes(&self) -> usize {
        self.bytes
    }

    /// The encoding in `slot`, made by `encode` the first time it is asked for.
    pub fn frame(&self, slot: FrameSlot, encode: impl FnOnce(&RowChange) -> String) -> &Arc<str> {
        self.frames[slot.0].get_or_init(|| {
            let frame: Arc<str> = Arc::from(encode(&self.change));
            if slot.0 > 0
                && let Some(counter) = &self.counter
                && !self.evicted.load(Ordering::Acquire)
            {
                self.extra.fetch_add(frame.len(), Ordering::AcqRel);
                counter.fetch_add(frame.len(), Ordering::AcqRel);
            }
            frame
        })
    }
}

/// The change a viewer gets when an UPDATE moves a row into (`insert`) or
/// out of their sight: the INSERT of the new row, or the DELETE of the old one,
/// at the same position. Made once per change and shared by its recipients.
pub(crate) fn moved(change: &RowChange, insert: bool) -> Arc<Routed> {
    use aether_core::changes::ChangeKind;
    let (kind, new, old) = if insert {
        (ChangeKind::Insert, change.new.clone(), None)
    } else {
        (ChangeKind::Delete, None, change.old.clone())
    };
    Arc::new(Routed::new(Arc::new(RowChange {
        position: change.position,
        kind,
        relation: Arc::clone(&change.relation),
        new,
        old,
        commit_time_ms: change.commit_time_ms,
        epoch: change.epoch,
    })))
}

impl Deref for Routed {
    type Target = RowChange;

    fn deref(&self) -> &RowChange {
        &self.change
    }
}
