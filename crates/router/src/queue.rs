//! A connection's queue: bounded in items like a tokio `mpsc` channel, but it
//! holds memory only while it holds items.
//!
//! A tokio bounded channel allocates a block of 32 slots when it is made and
//! keeps two once it has been used: about 4 KiB per connection with 56-byte
//! items, most of an idle connection's heap (aether-bench fan-out, heaptrack).
//! Here the items live in a `VecDeque` that is given back (down to a few slots)
//! whenever the reader empties it; an idle connection's queue is a few words.
//! One reader (the connection) and many writers (router, hubs) that never wait:
//! writers `try_send`, and a full queue is the writer's decision (lag or close).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;
pub use tokio::sync::mpsc::error::{TryRecvError, TrySendError};

/// Slots kept when the queue empties: what one burst of a quiet connection uses.
const KEEP: usize = 4;

struct Shared<T> {
    items: Mutex<VecDeque<T>>,
    cap: usize,
    /// Wakes the reader: an item arrived, or the last writer went.
    ready: Notify,
    writers: AtomicUsize,
    reader_gone: AtomicBool,
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, VecDeque<T>> {
        // No code runs under this lock that can panic halfway through a change.
        self.items.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A queue of at most `cap` items (at least one).
pub fn channel<T>(cap: usize) -> (QueueTx<T>, QueueRx<T>) {
    let shared = Arc::new(Shared {
        items: Mutex::new(VecDeque::new()),
        cap: cap.max(1),
        ready: Notify::new(),
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
    /// Queues `item` unless the queue is full or its reader is gone.
    pub fn try_send(&self, item: T) -> Result<(), TrySendError<T>> {
        {
            // The flag is read under the lock the reader sets it under, so no
            // item lands after the reader emptied the queue on its way out.
            let mut q = self.0.lock();
            if self.0.reader_gone.load(Ordering::Acquire) {
                return Err(TrySendError::Closed(item));
            }
            if q.len() >= self.0.cap {
                return Err(TrySendError::Full(item));
            }
            q.push_back(item);
        }
        self.0.ready.notify_one();
        Ok(())
    }

    /// Free slots now.
    pub fn capacity(&self) -> usize {
        self.0.cap.saturating_sub(self.0.lock().len())
    }
}

/// The reading end: the connection.
pub struct QueueRx<T>(Arc<Shared<T>>);

impl<T> Drop for QueueRx<T> {
    fn drop(&mut self) {
        // Items still queued go now, not when the last writer does.
        let items = {
            let mut q = self.0.lock();
            self.0.reader_gone.store(true, Ordering::Release);
            std::mem::take(&mut *q)
        };
        drop(items);
    }
}

impl<T> QueueRx<T> {
    /// The next item, or `Err` when the queue is empty (and, with
    /// `Disconnected`, every writer is gone).
    pub fn try_recv(&mut self) -> Result<T, TryRecvError> {
        let mut q = self.0.lock();
        match q.pop_front() {
            Some(item) => {
                if q.is_empty() && q.capacity() > KEEP {
                    q.shrink_to(KEEP);
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

    /// Items queued now.
    pub fn len(&self) -> usize {
        self.0.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The most items the queue holds.
    pub fn max_capacity(&self) -> usize {
        self.0.cap
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
        assert_eq!((rx.len(), tx.capacity()), (2, 0));
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
    async fn an_emptied_queue_gives_its_memory_back() {
        let (tx, mut rx) = channel(1024);
        for i in 0..1000 {
            tx.try_send(i).unwrap();
        }
        assert!(rx.0.lock().capacity() >= 1000);
        while rx.try_recv().is_ok() {}
        assert!(rx.0.lock().capacity() <= KEEP, "{}", rx.0.lock().capacity());
    }
}
