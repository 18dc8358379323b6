//! A connection's queue: bounded in items like a tokio `mpsc` channel, and in
//! the bytes its items weigh, but it holds memory only while it holds items.
//!
//! A tokio bounded channel allocates a block of 32 slots when it is made and
//! keeps two once it has been used: about 4 KiB per connection with 56-byte
//! items, most of an idle connection's heap (aether-bench fan-out, heaptrack).
//! Here the items live in a `VecDeque` that is given back (down to a few slots)
//! whenever the reader empties it; an idle connection's queue is a few words.
//! One reader (the connection) and many writers (router, hubs) that never wait:
//! writers `try_send`, and a full queue is the writer's decision (lag or close).
//!
//! Writers also raise [`Signal`]s: bits beside the items, woken through the
//! same `Notify`. A connection used to watch a cancellation token per reason
//! and a `Notify` for lag: four heap nodes and four futures in every
//! connection's task, each polled (and its node's mutex taken) on every wake.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;
pub use tokio::sync::mpsc::error::{TryRecvError, TrySendError};

/// Slots kept when the queue empties: what one burst of a quiet connection uses.
const KEEP: usize = 4;

/// What a connection's writers tell it besides items. Each is a bit that stays
/// raised (`Lagging` until the reader takes it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// It cannot keep up at all: close it.
    Overflowed,
    /// The auth session of its token was signed out: close it.
    Revoked,
    /// The idle reaper found it silent: close it.
    Reaped,
    /// It started lagging: once its queue is half drained it asks for more.
    Lagging,
}

impl Signal {
    const fn bit(self) -> u8 {
        1 << self as u8
    }
}

/// The signals that close a connection, first the one that wins when several are raised.
const CLOSING: [Signal; 3] = [Signal::Overflowed, Signal::Revoked, Signal::Reaped];

/// The items and what they weigh together, by `weigh`.
struct Items<T> {
    q: VecDeque<T>,
    bytes: usize,
}

struct Shared<T> {
    items: Mutex<Items<T>>,
    cap: usize,
    cap_bytes: usize,
    /// The bounds for what can be fetched again: seven eighths of the others.
    bulk_cap: usize,
    bulk_cap_bytes: usize,
    /// An item's weight: the same every time it is asked.
    weigh: fn(&T) -> usize,
    /// Wakes the reader: an item arrived, a signal was raised, or the last writer went.
    ready: Notify,
    signals: AtomicU8,
    writers: AtomicUsize,
    reader_gone: AtomicBool,
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, Items<T>> {
        // No code runs under this lock that can panic halfway through a change.
        self.items.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn raise(&self, signal: Signal) -> bool {
        let before = self.signals.fetch_or(signal.bit(), Ordering::AcqRel);
        let new = before & signal.bit() == 0;
        if new {
            self.ready.notify_one();
        }
        new
    }
}

/// A queue of at most `cap` items (at least one).
pub fn channel<T>(cap: usize) -> (QueueTx<T>, QueueRx<T>) {
    weighed(cap, usize::MAX, |_| 0)
}

/// A queue of at most `cap` items that together weigh at most `cap_bytes` by
/// `weigh` (one item, however heavy, always fits an empty queue).
pub fn weighed<T>(
    cap: usize,
    cap_bytes: usize,
    weigh: fn(&T) -> usize,
) -> (QueueTx<T>, QueueRx<T>) {
    let cap = cap.max(1);
    let shared = Arc::new(Shared {
        items: Mutex::new(Items {
            q: VecDeque::new(),
            bytes: 0,
        }),
        cap,
        cap_bytes,
        bulk_cap: cap - cap / 8,
        bulk_cap_bytes: cap_bytes - cap_bytes / 8,
        weigh,
        ready: Notify::new(),
        signals: AtomicU8::new(0),
        writers: AtomicUsize::new(1),
        reader_gone: AtomicBool::new(false),
    });
    (QueueTx(Arc::clone(&shared)), QueueRx(shared))
}

/// The writing end; clones share the queue.
pub struct QueueTx<T>(Arc<Shared<T>>);

impl<T> Clone for QueueTx<T> {
    fn clone(&self) -> Self {
        self.0.writers.fetch_add(1, Ordering::Relaxed);
        QueueTx(Arc::clone(&self.0))
    }
}

impl<T> Drop for QueueTx<T> {
    fn drop(&mut self) {
        if self.0.writers.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.ready.notify_one();
        }
    }
}

impl<T> QueueTx<T> {
    /// Whether nothing is queued now and the reader is still there (a queue
    /// whose reader is gone is not "empty": what it held was dropped).
    pub fn is_empty(&self) -> bool {
        !self.0.reader_gone.load(Ordering::Acquire) && self.0.lock().q.is_empty()
    }

    /// Queues `item` unless the queue is full or its reader is gone.
    pub fn try_send(&self, item: T) -> Result<(), TrySendError<T>> {
        self.send_within(item, self.0.cap, self.0.cap_bytes)
    }

    /// [`try_send`](Self::try_send) for what can wait and be fetched again
    /// (row changes, paged from the log by a lagging connection): it leaves
    /// an eighth of the item and byte bounds to what cannot (replies, channel
    /// and presence frames), which a full queue would close the connection for.
    pub fn try_send_bulk(&self, item: T) -> Result<(), TrySendError<T>> {
        self.send_within(item, self.0.bulk_cap, self.0.bulk_cap_bytes)
    }

    fn send_within(&self, item: T, cap: usize, cap_bytes: usize) -> Result<(), TrySendError<T>> {
        {
            // The flag is read under the lock the reader sets it under, so no
            // item lands after the reader emptied the queue on its way out.
            let mut items = self.0.lock();
            if self.0.reader_gone.load(Ordering::Acquire) {
                return Err(TrySendError::Closed(item));
            }
            let bytes = items.bytes.saturating_add((self.0.weigh)(&item));
            if items.q.len() >= cap || (!items.q.is_empty() && bytes > cap_bytes) {
                return Err(TrySendError::Full(item));
            }
            items.bytes = bytes;
            items.q.push_back(item);
        }
        self.0.ready.notify_one();
        Ok(())
    }

    /// Free slots now for [`try_send_bulk`](Self::try_send_bulk).
    pub fn bulk_capacity(&self) -> usize {
        self.0.bulk_cap.saturating_sub(self.0.lock().q.len())
    }

    /// Raises `signal` and wakes the reader; `false` if it was raised already.
    pub fn raise(&self, signal: Signal) -> bool {
        self.0.raise(signal)
    }

    /// A handle that raises signals but writes nothing, so it does not keep
    /// the queue open (the idle reaper's).
    pub fn signaller(&self) -> Signaller<T> {
        Signaller(Arc::clone(&self.0))
    }
}

/// Raises signals on a queue without being one of its writers.
pub struct Signaller<T>(Arc<Shared<T>>);

impl<T> Signaller<T> {
    /// Raises `signal` and wakes the reader; `false` if it was raised already.
    pub fn raise(&self, signal: Signal) -> bool {
        self.0.raise(signal)
    }
}

/// What [`QueueRx::next`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Next<T> {
    Item(T),
    /// A signal is raised: see [`QueueRx::closing`] and [`QueueRx::take_lagging`].
    Signalled,
    /// Empty, and every writer is gone.
    Closed,
}

/// The reading end: the connection.
pub struct QueueRx<T>(Arc<Shared<T>>);

impl<T> Drop for QueueRx<T> {
    fn drop(&mut self) {
        // Items still queued go now, not when the last writer does.
        let items = {
            let mut items = self.0.lock();
            self.0.reader_gone.store(true, Ordering::Release);
            items.bytes = 0;
            std::mem::take(&mut items.q)
        };
        drop(items);
    }
}

impl<T> QueueRx<T> {
    /// The next item, or `Err` when the queue is empty (and, with
    /// `Disconnected`, every writer is gone).
    pub fn try_recv(&mut self) -> Result<T, TryRecvError> {
        let mut items = self.0.lock();
        match items.q.pop_front() {
            Some(item) => {
                items.bytes = items.bytes.saturating_sub((self.0.weigh)(&item));
                if items.q.is_empty() && items.q.capacity() > KEEP {
                    items.q.shrink_to(KEEP);
                }
                Ok(item)
            }
            None if self.0.writers.load(Ordering::Acquire) == 0 => Err(TryRecvError::Disconnected),
            None => Err(TryRecvError::Empty),
        }
    }

    /// The next item; `None` once the queue is empty and every writer is gone.
    pub async fn recv(&mut self) -> Option<T> {
        loop {
            match self.try_recv() {
                Ok(item) => return Some(item),
                Err(TryRecvError::Disconnected) => return None,
                // A permit stored by a `notify_one` since the check wakes this
                // at once, so no item or last goodbye is missed.
                Err(TryRecvError::Empty) => self.0.ready.notified().await,
            }
        }
    }

    /// A signal raised, else the next item; waits for either, or for the last
    /// writer to go. A reader that loops on this must clear what it is told
    /// (take the lag, or stop on a close), or it is told again at once.
    pub async fn next(&mut self) -> Next<T> {
        loop {
            if self.0.signals.load(Ordering::Acquire) != 0 {
                return Next::Signalled;
            }
            match self.try_recv() {
                Ok(item) => return Next::Item(item),
                Err(TryRecvError::Disconnected) => return Next::Closed,
                // As in `recv`: a raise or an item since the checks left a permit.
                Err(TryRecvError::Empty) => self.0.ready.notified().await,
            }
        }
    }

    /// The signal to close on, if one is raised ([`Signal::Lagging`] is not one).
    pub fn closing(&self) -> Option<Signal> {
        let bits = self.0.signals.load(Ordering::Acquire);
        CLOSING.into_iter().find(|s| bits & s.bit() != 0)
    }

    /// Waits until a signal to close on is raised. Items arriving meanwhile
    /// stay queued; [`QueueRx::next`] still finds them.
    pub async fn closed_by_writer(&self) -> Signal {
        loop {
            if let Some(signal) = self.closing() {
                return signal;
            }
            self.0.ready.notified().await;
        }
    }

    /// Whether [`Signal::Lagging`] was raised since the last call; lowers it.
    pub fn take_lagging(&mut self) -> bool {
        let bit = Signal::Lagging.bit();
        // A load first: asked on every turn, it writes only when there is lag.
        self.0.signals.load(Ordering::Acquire) & bit != 0
            && self.0.signals.fetch_and(!bit, Ordering::AcqRel) & bit != 0
    }

    /// Items queued now.
    pub fn len(&self) -> usize {
        self.0.lock().q.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether at most half the items and half the bytes are queued: one
    /// look under the lock.
    pub fn half_drained(&self) -> bool {
        let items = self.0.lock();
        items.q.len() <= self.0.cap / 2 && items.bytes <= self.0.cap_bytes / 2
    }

    /// The most items the queue holds.
    pub fn max_capacity(&self) -> usize {
        self.0.cap
    }

    /// What the items queued now weigh.
    #[cfg(test)]
    fn bytes(&self) -> usize {
        self.0.lock().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn bounded_in_order_and_closed_from_either_end() {
        let (tx, mut rx) = channel(2);
        tx.try_send(1).unwrap();
        tx.try_send(2).unwrap();
        assert!(matches!(tx.try_send(3), Err(TrySendError::Full(3))));
        assert_eq!((rx.len(), tx.bulk_capacity()), (2, 0));
        assert_eq!(rx.recv().await, Some(1));
        assert_eq!(rx.try_recv(), Ok(2));
        assert_eq!(rx.try_recv(), Err(TryRecvError::Empty));

        // A reader waiting is woken by an item from another task.
        let tx2 = tx.clone();
        let writer = tokio::spawn(async move {
            tokio::task::yield_now().await;
            tx2.try_send(4).unwrap();
        });
        let got = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
        assert_eq!(got.unwrap(), Some(4));
        writer.await.unwrap();

        // Every writer gone: what is queued is still read, then the end.
        tx.try_send(5).unwrap();
        drop(tx);
        assert_eq!(rx.recv().await, Some(5));
        assert_eq!(rx.recv().await, None);

        // The reader gone: writers are told at once.
        let (tx, rx) = channel(2);
        drop(rx);
        assert!(matches!(tx.try_send(1), Err(TrySendError::Closed(1))));
    }

    #[tokio::test]
    async fn signals_wake_the_reader_before_items_and_close_in_order() {
        let (tx, mut rx) = channel(4);
        let reaper = tx.signaller();
        tx.try_send(1).unwrap();
        // Lag is told before the item, once per raise.
        assert!(tx.raise(Signal::Lagging));
        assert_eq!(rx.next().await, Next::Signalled);
        assert!(rx.take_lagging());
        assert!(!rx.take_lagging());
        assert_eq!(rx.next().await, Next::Item(1));

        // A reader waiting is woken by a raise from another task, and one
        // waiting only for a close is not ended by items.
        let writer = tx.clone();
        let raise = tokio::spawn(async move {
            tokio::task::yield_now().await;
            writer.try_send(2).unwrap();
            tokio::task::yield_now().await;
            assert!(reaper.raise(Signal::Reaped));
            assert!(!reaper.raise(Signal::Reaped), "raised once");
        });
        let closed = tokio::time::timeout(Duration::from_secs(5), rx.closed_by_writer()).await;
        assert_eq!(closed.unwrap(), Signal::Reaped);
        raise.await.unwrap();
        assert_eq!(rx.closing(), Some(Signal::Reaped));
        // Overflow wins over the others, whatever came first.
        tx.raise(Signal::Overflowed);
        assert_eq!(rx.closing(), Some(Signal::Overflowed));
        assert_eq!(rx.next().await, Next::Signalled);
        assert_eq!(rx.try_recv(), Ok(2));

        // A signaller is not a writer: the last writer gone still ends the queue.
        let (tx, mut rx) = channel::<u8>(1);
        let reaper = tx.signaller();
        drop(tx);
        assert_eq!(rx.next().await, Next::Closed);
        reaper.raise(Signal::Revoked);
        assert_eq!(rx.closing(), Some(Signal::Revoked));
    }

    #[tokio::test]
    async fn a_queue_is_full_by_weight_too_and_one_heavy_item_still_fits() {
        let (tx, mut rx) = weighed::<Vec<u8>>(100, 1000, Vec::len);
        tx.try_send(vec![0; 600]).unwrap();
        tx.try_send(vec![0; 300]).unwrap();
        assert!(matches!(
            tx.try_send(vec![0; 200]),
            Err(TrySendError::Full(_))
        ));
        tx.try_send(vec![0; 100]).unwrap();
        assert_eq!((rx.len(), rx.bytes()), (3, 1000));
        assert_eq!(rx.try_recv().map(|v| v.len()), Ok(600));
        assert_eq!(rx.bytes(), 400);
        tx.try_send(vec![0; 600]).unwrap();
        while rx.try_recv().is_ok() {}
        assert_eq!(rx.bytes(), 0);
        // Bulk items leave an eighth of the bytes to the rest.
        while rx.try_recv().is_ok() {}
        tx.try_send_bulk(vec![0; 800]).unwrap();
        assert!(matches!(
            tx.try_send_bulk(vec![0; 100]),
            Err(TrySendError::Full(_))
        ));
        tx.try_send(vec![0; 100]).unwrap();
        while rx.try_recv().is_ok() {}
        // And an eighth of the items: 88 of 100 for bulk, the last 12 for the rest.
        for _ in 0..88 {
            tx.try_send_bulk(Vec::new()).unwrap();
        }
        assert_eq!(tx.bulk_capacity(), 0);
        assert!(matches!(
            tx.try_send_bulk(Vec::new()),
            Err(TrySendError::Full(_))
        ));
        for _ in 0..12 {
            tx.try_send(Vec::new()).unwrap();
        }
        assert!(matches!(
            tx.try_send(Vec::new()),
            Err(TrySendError::Full(_))
        ));
        while rx.try_recv().is_ok() {}
        // Heavier than the whole bound: it waits for an empty queue, then goes.
        tx.try_send(vec![0; 10]).unwrap();
        assert!(matches!(
            tx.try_send(vec![0; 5000]),
            Err(TrySendError::Full(_))
        ));
        rx.try_recv().unwrap();
        tx.try_send(vec![0; 5000]).unwrap();
        assert_eq!(rx.bytes(), 5000);
    }

    #[tokio::test]
    async fn an_emptied_queue_gives_its_memory_back() {
        let (tx, mut rx) = channel(1024);
        for i in 0..1000 {
            tx.try_send(i).unwrap();
        }
        assert!(rx.0.lock().q.capacity() >= 1000);
        while rx.try_recv().is_ok() {}
        assert!(
            rx.0.lock().q.capacity() <= KEEP,
            "{}",
            rx.0.lock().q.capacity()
        );
    }
}
