//! Polling a connection's quiet branches only when they woke it.
//!
//! A connection's task sleeps on its queue, its socket, its timers and the
//! shutdown, and a `select!` polls every branch each time the task wakes. A
//! fan-out wakes it for a row change, and the socket read (tungstenite, hyper,
//! tokio's readiness), the ping timer and the shutdown token (two mutexes)
//! were polled anyway, twice per delivery: about a tenth of the server's CPU
//! in a 10,000-subscriber fan-out (perf). A [`Gate`] hands those branches its
//! own waker, which raises a flag before it wakes the task: a pass polls them
//! only when the flag says one of them may be ready.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

use crate::wire::Wire;

/// The flag and the task to wake, shared with the waker handed out.
struct Latch {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Latch {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // The flag before the wake: the woken task must see it.
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

/// Stands between a task and what a group of its branches wait on. Every poll
/// of those branches must go through the gate (either method), or a wake
/// would reach the task without raising the flag and the next gated pass
/// would skip the branch that is ready.
pub(crate) struct Gate {
    latch: Arc<Latch>,
    waker: Waker,
}

impl Gate {
    /// A gate that is open: the first pass polls everything behind it.
    pub(crate) fn new() -> Self {
        let latch = Arc::new(Latch {
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        let waker = Waker::from(Arc::clone(&latch));
        Gate { latch, waker }
    }

    /// The waker that raises this gate's flag.
    pub(crate) fn waker(&self) -> &Waker {
        &self.waker
    }

    /// Has the next gated pass poll what is behind the gate: for a future
    /// changed without a poll (a timer reset), which has no waker yet.
    pub(crate) fn open(&self) {
        self.latch.woken.store(true, Ordering::Release);
    }

    /// Polls `poll` with the gate's waker, whether or not anything woke.
    pub(crate) fn poll_through<T>(
        &self,
        cx: &mut Context<'_>,
        poll: impl FnOnce(&mut Context<'_>) -> Poll<T>,
    ) -> Poll<T> {
        self.latch.task.register(cx.waker());
        poll(&mut Context::from_waker(&self.waker))
    }

    /// Polls `poll` only if something behind the gate woke the task since it
    /// was last found pending. A ready result leaves the gate open: what is
    /// behind it may be ready again without another wake (a second frame in
    /// a read buffer, another timer).
    pub(crate) fn poll_if_woken<T>(
        &self,
        cx: &mut Context<'_>,
        poll: impl FnOnce(&mut Context<'_>) -> Poll<T>,
    ) -> Poll<T> {
        self.latch.task.register(cx.waker());
        // Lowered before the poll: a wake during it raises it again.
        if !self.latch.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let ready = poll(&mut Context::from_waker(&self.waker));
        if ready.is_ready() {
            self.latch.woken.store(true, Ordering::Release);
        }
        ready
    }
}

/// A socket whose reads are polled only when the socket woke the task.
/// Writes go through the same gate (tungstenite wakes a writer and a reader
/// alike on either readiness), but are always polled.
///
/// With a [`Wire`], every use of the socket first takes it from the router's
/// direct writers (and writes what one of them left), and the wire is told
/// whether the library holds unwritten bytes.
pub(crate) struct GatedSocket<'a, S> {
    socket: &'a mut S,
    gate: Gate,
    wire: Option<Arc<Wire>>,
}

impl<'a, S> GatedSocket<'a, S> {
    pub(crate) fn new(socket: &'a mut S, wire: Option<Arc<Wire>>) -> Self {
        let gate = Gate::new();
        if let Some(w) = &wire {
            w.wake_through(gate.waker());
        }
        GatedSocket { socket, gate, wire }
    }

    /// Takes the socket from the router's writers for good (waiting out a
    /// write in flight): the task is ending, and no change may reach the
    /// socket after it stopped reading its queue.
    pub(crate) fn poll_take(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(w) = &self.wire else {
            return Poll::Ready(());
        };
        self.gate.poll_through(cx, |_| w.poll_take())
    }

    /// Whether the socket must be flushed before the task sleeps.
    pub(crate) fn needs_write(&self) -> bool {
        self.wire.as_ref().is_some_and(|w| w.needs_write())
    }

    /// Polls the socket through the gate, whether or not it woke the task.
    fn write<T>(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        poll: impl FnOnce(std::pin::Pin<&mut S>, &mut Context<'_>) -> Poll<T>,
    ) -> Poll<T>
    where
        S: Unpin,
    {
        let this = self.get_mut();
        let socket = std::pin::Pin::new(&mut *this.socket);
        let wire = this.wire.as_deref();
        this.gate.poll_through(cx, |cx| {
            if let Some(w) = wire {
                std::task::ready!(w.poll_own(cx));
            }
            poll(socket, cx)
        })
    }
}

impl<S> Drop for GatedSocket<'_, S> {
    fn drop(&mut self) {
        // However the task ends, no direct write after it.
        if let Some(w) = &self.wire {
            w.seal();
        }
    }
}

impl<S: futures_util::Stream + Unpin> futures_util::Stream for GatedSocket<'_, S> {
    type Item = S::Item;

    fn poll_next(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        let this = self.get_mut();
        let socket = &mut *this.socket;
        let wire = this.wire.as_deref();
        this.gate.poll_if_woken(cx, |cx| {
            if let Some(w) = wire {
                std::task::ready!(w.poll_own(cx));
            }
            let read = std::pin::Pin::new(socket).poll_next(cx);
            if let (Some(w), Poll::Ready(_)) = (wire, &read) {
                // A frame read may have had the library answer a ping.
                w.set_dirty(true);
            }
            read
        })
    }
}

impl<M, S: futures_util::Sink<M> + Unpin> futures_util::Sink<M> for GatedSocket<'_, S> {
    type Error = S::Error;

    fn poll_ready(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), S::Error>> {
        self.write(cx, |s, cx| s.poll_ready(cx))
    }

    fn start_send(self: std::pin::Pin<&mut Self>, item: M) -> Result<(), S::Error> {
        let this = self.get_mut();
        if let Some(w) = &this.wire {
            w.set_dirty(true);
        }
        std::pin::Pin::new(&mut *this.socket).start_send(item)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), S::Error>> {
        let flushed = self.as_mut().write(cx, |s, cx| s.poll_flush(cx));
        if let (Some(w), Poll::Ready(Ok(()))) = (&self.wire, &flushed) {
            w.set_dirty(false);
        }
        flushed
    }

    fn poll_close(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), S::Error>> {
        self.write(cx, |s, cx| s.poll_close(cx))
    }
}

/// Which alarm rang, in the order they are asked.
pub(crate) enum Alarm {
    Shutdown,
    Expired,
    Ping,
}

/// What a connection waits on besides its socket and queue: the shutdown, the
/// token's expiry and the ping timer, behind one gate. It owns them (the two
/// futures pinned by the caller, who cannot reach them after), so no poll can
/// take one of their wakes without the gate seeing it.
pub(crate) struct Alarms<'a, F> {
    gate: Gate,
    shutdown: std::pin::Pin<&'a mut F>,
    expiry: std::pin::Pin<&'a mut tokio::time::Sleep>,
    /// Whether the expiry is a deadline (a token that expires) or unset.
    armed: bool,
    ping: tokio::time::Interval,
}

impl<'a, F: std::future::Future<Output = ()>> Alarms<'a, F> {
    pub(crate) fn new(
        shutdown: std::pin::Pin<&'a mut F>,
        expiry: std::pin::Pin<&'a mut tokio::time::Sleep>,
        armed: bool,
        ping: tokio::time::Interval,
    ) -> Self {
        Alarms {
            gate: Gate::new(),
            shutdown,
            expiry,
            armed,
            ping,
        }
    }

    /// The shutdown alone, polled whatever woke the task (while a write waits).
    pub(crate) fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Alarms { gate, shutdown, .. } = self;
        gate.poll_through(cx, |cx| shutdown.as_mut().poll(cx))
    }

    /// The first alarm ringing, asked only if one of them woke the task.
    pub(crate) fn poll_rung(&mut self, cx: &mut Context<'_>) -> Poll<Alarm> {
        let Alarms {
            gate,
            shutdown,
            expiry,
            armed,
            ping,
        } = self;
        gate.poll_if_woken(cx, |cx| {
            if shutdown.as_mut().poll(cx).is_ready() {
                Poll::Ready(Alarm::Shutdown)
            } else if *armed && expiry.as_mut().poll(cx).is_ready() {
                Poll::Ready(Alarm::Expired)
            } else if ping.poll_tick(cx).is_ready() {
                Poll::Ready(Alarm::Ping)
            } else {
                Poll::Pending
            }
        })
    }

    /// Moves the expiry to `at`, or unsets it. The gate opens: a deadline
    /// never polled (there was none) has no waker yet, so the next pass must
    /// poll it or it never wakes the task.
    pub(crate) fn rearm(&mut self, at: Option<tokio::time::Instant>) {
        self.armed = at.is_some();
        if let Some(at) = at {
            self.expiry.as_mut().reset(at);
        }
        self.gate.open();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use std::sync::atomic::AtomicUsize;

    /// Counts the wakes that reach the task.
    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_gated_poll_runs_only_after_a_wake_through_the_gate() {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let task = Waker::from(Arc::clone(&count));
        let mut cx = Context::from_waker(&task);
        let gate = Gate::new();
        let stored: std::cell::RefCell<Option<Waker>> = Default::default();
        let polls = std::cell::Cell::new(0);
        let poll = |cx: &mut Context<'_>| {
            polls.set(polls.get() + 1);
            *stored.borrow_mut() = Some(cx.waker().clone());
            Poll::<()>::Pending
        };
        let wake_kept = || stored.borrow_mut().take().expect("a waker kept").wake();
        // Open at first: polled, and the waker it keeps is the gate's.
        assert!(gate.poll_if_woken(&mut cx, poll).is_pending());
        assert!(gate.poll_if_woken(&mut cx, poll).is_pending());
        assert_eq!(polls.get(), 1, "nothing woke it: not polled again");
        wake_kept();
        assert_eq!(count.0.load(Ordering::SeqCst), 1, "the task was woken");
        assert!(gate.poll_if_woken(&mut cx, poll).is_pending());
        assert_eq!(polls.get(), 2, "woken through the gate: polled");
        // A poll through the gate does not take the flag another branch raised.
        wake_kept();
        assert!(
            gate.poll_through(&mut cx, |_| Poll::<()>::Pending)
                .is_pending()
        );
        assert!(gate.poll_if_woken(&mut cx, poll).is_pending());
        assert_eq!(polls.get(), 3);
    }

    #[test]
    fn a_ready_poll_leaves_the_gate_open() {
        let task = Waker::from(Arc::new(Count(AtomicUsize::new(0))));
        let mut cx = Context::from_waker(&task);
        let gate = Gate::new();
        assert!(gate.poll_if_woken(&mut cx, |_| Poll::Ready(())).is_ready());
        assert!(gate.poll_if_woken(&mut cx, |_| Poll::Ready(())).is_ready());
    }

    #[tokio::test]
    async fn a_socket_read_behind_the_gate_still_sees_every_frame() {
        // Frames that arrive while the reader sleeps, and frames already
        // buffered when one is read, are all read.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<u32>(8);
        let mut stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
        let mut gated = GatedSocket::new(&mut stream, None);
        let reader = async {
            let mut got = Vec::new();
            while let Some(n) = gated.next().await {
                got.push(n);
            }
            got
        };
        let writer = async move {
            for n in 0..5 {
                tx.send(n).await.expect("the reader is there");
                tokio::task::yield_now().await;
            }
            tx.send(5).await.expect("the reader is there");
            tx.send(6).await.expect("the reader is there");
        };
        let (got, ()) = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            tokio::join!(reader, writer)
        })
        .await
        .expect("every frame read");
        assert_eq!(got, (0..7).collect::<Vec<_>>());
    }
}
