//! The context itself (QEMU's `AioContext`, `aio_poll`, `aio_notify`, the GSource callbacks).
//!
//! # Wake-ups
//!
//! A poll announces its sleeps and notifiers write the context's eventfd only for a sleeping
//! poll, at most once per sleep: the protocol and its invariants are in the `wakeup` module.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Instant;

use parking_lot::Mutex;

use crate::bh::{self, Bh, BhNode, BhQueue, BhWork};
use crate::callback::{self, Handler};
use crate::clock::{self, ClockType};
use crate::handlers::{Handlers, NOTIFY_TOKEN};
use crate::lock::{thread_token, OwnerOnly, RFifoGuard, RFifoLock};
use crate::notifier::EventNotifier;
use crate::polling::{self, AfterSpin, Counters, PollHandler, PollParams, Polling, Stats};
use crate::registry::Registry;
use crate::sys::{self, Backend, Event, Poller, RawFd, RawNotifier, Readiness, SourceKind};
use crate::task::{self, IoWaiters};
use crate::thread_pool::{PoolConfig, PoolShared, ThreadPool};
use crate::timer::{Timer, TimerLists};
use crate::wakeup::WakeState;

/// How long a poll with only idle BHs scheduled may block (QEMU's 10 ms).
const IDLE_BH_TIMEOUT_NS: i64 = 10_000_000;

/// The part of a context that its BHs and timers share: everything needed to schedule work and
/// wake the loop, and nothing that keeps the loop's descriptors alive.
pub(crate) struct Core {
    pub(crate) bhs: BhQueue,
    pub(crate) timers: TimerLists,
    pub(crate) bh_registry: Registry,
    pub(crate) timer_registry: Registry,
    wake: WakeState,
    event: RawNotifier,
    closed: AtomicBool,
    /// The context lock (QEMU's `RFifoLock`). It lives here so that BHs and timers can tell
    /// whether they are armed from the thread that owns the loop.
    pub(crate) lock: RFifoLock,
    /// Kept alive here so the virtual clock can wake this context (it holds a weak reference).
    virtual_waker: OnceLock<Arc<dyn Fn() + Send + Sync>>,
    pub(crate) counters: Counters,
}

impl Core {
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    /// QEMU's `aio_notify`.
    pub(crate) fn notify(&self) {
        if self.wake.notify() {
            // Failing to write an eventfd means the descriptor is gone, which cannot happen
            // while `self` is alive; there is nobody to report it to.
            let _ = self.event.set();
            Counters::bump(&self.counters.notify_writes);
        }
    }

    /// Wakes the loop after this thread changed what it waits for (a BH scheduled, a timer
    /// armed, a handler set), unless this thread owns the loop: then no poll can be sleeping on
    /// the old state, and the next one recomputes its timeout anyway. QEMU notifies
    /// unconditionally, which makes the owner's next blocking poll return at once, empty-handed.
    pub(crate) fn notify_changed(&self) {
        if !self.lock.is_owner() {
            self.notify();
        }
    }

    /// QEMU's `aio_notify_accept`.
    fn notify_accept(&self) {
        self.wake.accept();
    }

    pub(crate) fn watch_virtual_clock(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        self.virtual_waker.get_or_init(|| {
            let waker: Arc<dyn Fn() + Send + Sync> = Arc::new(move || {
                if let Some(core) = weak.upgrade() {
                    core.notify();
                }
            });
            clock::watch_virtual(&waker);
            waker
        });
    }
}

/// Everything a context owns. Dropped when the last [`AioContext`] handle goes.
pub(crate) struct Inner {
    pub(crate) core: Arc<Core>,
    pub(crate) poller: Box<dyn Poller>,
    backend: Backend,
    handlers: Handlers,
    /// BHs taken off the queue and not yet run: the current poll's slice, plus the remaining
    /// slices of polls further up the stack, which a nested poll runs first.
    run_queue: OwnerOnly<VecDeque<Arc<BhNode>>>,
    /// The thread that polled last (a `lock::thread_token`, 0 before the first poll): QEMU's
    /// home thread, for `AioCb::cancel`.
    home: AtomicUsize,
    /// Completed waits; events of an older wait are stale once a newer (nested) wait has run.
    wait_epoch: AtomicU64,
    /// Events collected by `pending` for the next `dispatch` (outer-loop driving).
    stashed: Mutex<Option<(u64, Vec<Event>)>>,
    /// Spare event buffers, so polls do not allocate.
    buffers: OwnerOnly<Vec<Vec<Event>>>,
    /// The worker pool, created on first use (QEMU's `aio_get_thread_pool`).
    pool: OnceLock<Arc<PoolShared>>,
    pool_config: PoolConfig,
    polling: Polling,
    /// Readiness futures waiting on descriptors.
    pub(crate) io_waiters: IoWaiters,
}

/// The event loop (QEMU's `AioContext`).
///
/// A context owns bottom halves, fd and event-notifier handlers and timers; [`poll`](Self::poll)
/// waits for them and runs their callbacks on the calling thread. The handle is cheap to clone
/// (QEMU's `aio_context_ref`) and may be used from any thread; dropping the last handle
/// (`aio_context_unref`) releases every callback still registered without running it.
///
/// Callbacks run on whichever thread polls, one poll at a time: [`poll`](Self::poll) takes the
/// context lock ([`acquire`](Self::acquire)) for its duration. A callback may register or remove
/// any handler, timer or BH (its own included) and may call `poll` again (a nested loop); a
/// callback that is already running is never re-entered by a nested poll: it runs again once it
/// has returned.
///
/// A callback that captures a clone of its own context keeps that context alive until the
/// callback is removed; capture [`AioContext::downgrade`] instead.
///
/// ```
/// # fn main() -> std::io::Result<()> {
/// use std::sync::atomic::{AtomicUsize, Ordering};
/// use std::sync::Arc;
///
/// let ctx = aioctx::AioContext::new()?;
/// let ran = Arc::new(AtomicUsize::new(0));
/// let r = ran.clone();
/// ctx.bh_schedule_oneshot(move || {
///     r.fetch_add(1, Ordering::Relaxed);
/// });
/// assert!(ctx.poll(true)); // runs the BH, does not block
/// assert_eq!(ran.load(Ordering::Relaxed), 1);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct AioContext {
    pub(crate) inner: Arc<Inner>,
}

/// A weak reference to a context, which does not keep it alive (for callbacks that need their
/// own context).
#[derive(Clone)]
pub struct WeakAioContext {
    inner: Weak<Inner>,
}

impl WeakAioContext {
    /// The context, if it is still alive.
    pub fn upgrade(&self) -> Option<AioContext> {
        self.inner.upgrade().map(|inner| AioContext { inner })
    }
}

impl std::fmt::Debug for WeakAioContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeakAioContext").finish_non_exhaustive()
    }
}

/// Options for a new context (QEMU's `aio_context_new` and the IOThread properties).
///
/// ```
/// # fn main() -> std::io::Result<()> {
/// use aioctx::Backend;
///
/// // The last back end this platform has: poll(2) on Unix, the only one on Windows.
/// let backend = *Backend::available().last().unwrap();
/// let ctx = aioctx::AioContext::builder()
///     .backend(backend)
///     .thread_pool_max(8)
///     .build()?;
/// assert_eq!(ctx.backend(), backend);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug, Default)]
pub struct Builder {
    backend: Option<Backend>,
    pool: PoolConfig,
    /// `None`: `AIOCTX_POLL_MAX_NS`, or 0.
    poll_max_ns: Option<u64>,
    poll_grow: u64,
    poll_shrink: u64,
}

impl Builder {
    /// Chooses the back end. Without this, `AIOCTX_BACKEND` (`epoll`, `io_uring`, `poll` or
    /// `windows`) decides, and without that the platform default ([`Backend::platform_default`]).
    /// An io_uring the kernel refuses is an error here, but falls back to epoll when it comes
    /// from `AIOCTX_BACKEND`.
    pub fn backend(mut self, backend: Backend) -> Self {
        self.backend = Some(backend);
        self
    }

    /// Worker threads the thread pool keeps even when idle (QEMU's `thread-pool-min`, default 0).
    pub fn thread_pool_min(mut self, n: usize) -> Self {
        self.pool.min = n;
        self
    }

    /// Most worker threads the thread pool runs at once (QEMU's `thread-pool-max`, default 64).
    pub fn thread_pool_max(mut self, n: usize) -> Self {
        self.pool.max = n;
        self
    }

    /// How long a worker above the minimum waits for work before it exits (QEMU's 10 s).
    pub fn thread_pool_idle_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.pool.idle_timeout = timeout;
        self
    }

    /// The longest busy-polling window in ns (QEMU's `poll-max-ns`); 0 disables polling.
    /// Without this, `AIOCTX_POLL_MAX_NS` decides, and without that polling is off. See
    /// [`AioContext::set_poll_params`].
    pub fn poll_max_ns(mut self, ns: u64) -> Self {
        self.poll_max_ns = Some(ns);
        self
    }

    /// The factor the polling window grows by (QEMU's `poll-grow`); 0, the default, means 2.
    pub fn poll_grow(mut self, factor: u64) -> Self {
        self.poll_grow = factor;
        self
    }

    /// The divisor the polling window shrinks by (QEMU's `poll-shrink`); 0, the default,
    /// resets it to 0.
    pub fn poll_shrink(mut self, divisor: u64) -> Self {
        self.poll_shrink = divisor;
        self
    }

    /// Creates the context (QEMU's `aio_context_new`).
    ///
    /// Fails if the back end cannot be created, if `AIOCTX_BACKEND` names no back end or
    /// `AIOCTX_POLL_MAX_NS` is not a number, or if the pool's minimum exceeds its maximum.
    pub fn build(self) -> io::Result<AioContext> {
        let poll = PollParams {
            max_ns: match self.poll_max_ns {
                Some(ns) => ns,
                None => PollParams::from_env()?.max_ns,
            },
            grow: self.poll_grow,
            shrink: self.poll_shrink,
        };
        let explicitly = self.backend.is_some();
        let backend = match self.backend {
            Some(b) => b,
            None => match std::env::var("AIOCTX_BACKEND") {
                Ok(name) if !name.is_empty() => Backend::from_name(&name)
                    .map_err(|e| io::Error::new(e.kind(), format!("AIOCTX_BACKEND: {e}")))?,
                _ => Backend::platform_default(),
            },
        };
        if self.pool.max == 0 || self.pool.min > self.pool.max {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "thread pool limits: min {} must not exceed max {}, and max must be at least 1",
                    self.pool.min, self.pool.max
                ),
            ));
        }
        let (backend, poller) = sys::open(backend, explicitly)?;
        let event = RawNotifier::new()?;
        poller.add_wakeup(event.raw_fd(), NOTIFY_TOKEN)?;
        let core = Arc::new(Core {
            bhs: BhQueue::new(),
            timers: TimerLists::new(),
            bh_registry: Registry::new(),
            timer_registry: Registry::new(),
            wake: WakeState::new(),
            event,
            closed: AtomicBool::new(false),
            lock: RFifoLock::new(),
            virtual_waker: OnceLock::new(),
            counters: Counters::default(),
        });
        Ok(AioContext {
            inner: Arc::new(Inner {
                core,
                poller,
                backend,
                handlers: Handlers::new(),
                run_queue: OwnerOnly::new(VecDeque::new()),
                home: AtomicUsize::new(0),
                wait_epoch: AtomicU64::new(0),
                stashed: Mutex::new(None),
                buffers: OwnerOnly::new(Vec::new()),
                pool: OnceLock::new(),
                pool_config: self.pool,
                polling: Polling::new(poll),
                io_waiters: IoWaiters::default(),
            }),
        })
    }
}

/// Holds the context lock (QEMU's `aio_context_acquire`); dropping it is `aio_context_release`.
///
/// The lock is recursive and FIFO-fair: threads get it in the order they asked. A thread that
/// waits for it wakes the holder out of a blocking [`AioContext::poll`].
pub struct AioContextGuard<'a> {
    _guard: RFifoGuard<'a>,
}

impl std::fmt::Debug for AioContextGuard<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AioContextGuard").finish_non_exhaustive()
    }
}

/// Keeps a context from busy-polling while it lives ([`AioContext::disable_polling`]).
#[must_use = "polling resumes as soon as the guard is dropped"]
pub struct PollingDisabled {
    ctx: AioContext,
}

impl Drop for PollingDisabled {
    fn drop(&mut self) {
        self.ctx.inner.polling.enable();
    }
}

impl std::fmt::Debug for PollingDisabled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PollingDisabled").finish_non_exhaustive()
    }
}

impl AioContext {
    /// Creates a context with default options (QEMU's `aio_context_new`).
    pub fn new() -> io::Result<AioContext> {
        Builder::default().build()
    }

    /// Options for a new context.
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// The back end this context waits with.
    pub fn backend(&self) -> Backend {
        self.inner.backend
    }

    /// A weak handle that does not keep the context alive.
    pub fn downgrade(&self) -> WeakAioContext {
        WeakAioContext {
            inner: Arc::downgrade(&self.inner),
        }
    }

    /// Whether two handles refer to the same context.
    pub fn ptr_eq(&self, other: &AioContext) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// Takes the context lock (QEMU's `aio_context_acquire`); the guard's drop releases it.
    ///
    /// Recursive: the holder may take it again. Fair: waiting threads get it in FIFO order. While
    /// it waits, the calling thread kicks the holder out of a blocking poll.
    pub fn acquire(&self) -> AioContextGuard<'_> {
        AioContextGuard {
            _guard: self.inner.core.lock.lock(|| self.notify()),
        }
    }

    /// Wakes a blocked [`poll`](Self::poll), from any thread (QEMU's `aio_notify`). A notify made
    /// before the poll starts makes it return at once. Coalesced: while the loop is awake this
    /// costs no system call, and one sleep costs at most one wake-up write.
    pub fn notify(&self) {
        self.inner.core.notify();
    }

    /// Creates a BH that runs `cb` on this context each time it is scheduled (QEMU's
    /// `aio_bh_new`). It is not scheduled yet.
    pub fn bh_new(&self, cb: impl FnMut() + Send + 'static) -> Bh {
        Bh::new(self.inner.core.clone(), Box::new(cb))
    }

    /// Runs `cb` once, soon, on this context (QEMU's `aio_bh_schedule_oneshot`). May be called
    /// from any thread.
    pub fn bh_schedule_oneshot(&self, cb: impl FnOnce() + Send + 'static) {
        bh::schedule_oneshot(&self.inner.core, callback::once(cb));
    }

    /// Sets, replaces or removes the handlers of descriptor `fd` (QEMU's `aio_set_fd_handler`).
    ///
    /// `io_read` runs while `fd` is readable, has hung up or has an error; `io_write` runs while
    /// it is writable or has an error (level-triggered, like poll(2)). Passing `None` for both
    /// removes the handlers; setting them again replaces both. The context does not own `fd`:
    /// remove the handlers before closing it.
    ///
    /// Once this returns, replaced or removed callbacks are neither running nor ever called
    /// again: called from another thread while the loop runs one of them, it waits for that call
    /// to return (so do not hold a lock that the callback takes).
    ///
    /// Errors are the kernel's error kinds, with the failing call named in the message: for
    /// example epoll refuses regular files (`PermissionDenied`); use the `Poll` back end for
    /// those. Windows refuses anything but a socket (`WSAENOTSOCK`).
    ///
    /// On Windows `fd` is a socket (a `RawSocket`), and registering it switches it to
    /// non-blocking mode for good (`WSAEventSelect` does, as in QEMU).
    pub fn set_fd_handler(
        &self,
        fd: RawFd,
        io_read: Option<Handler>,
        io_write: Option<Handler>,
    ) -> io::Result<()> {
        self.set_handlers(fd, SourceKind::Fd, io_read, io_write, None)
    }

    /// [`set_fd_handler`](Self::set_fd_handler) with an `io_poll` callback (QEMU's
    /// `aio_set_fd_handler` with `io_poll`): while the context busy-polls (see
    /// [`set_poll_params`](Self::set_poll_params)), it calls `io_poll` instead of asking the
    /// kernel, and runs `io_read` when `io_poll` returns true, whether or not `fd` is readable
    /// (so `fd` should be non-blocking). `io_poll` requires `io_read` (`InvalidInput` otherwise).
    /// Without polling, `io_poll` is never called and this is `set_fd_handler`.
    pub fn set_fd_handler_poll(
        &self,
        fd: RawFd,
        io_read: Option<Handler>,
        io_write: Option<Handler>,
        io_poll: Option<PollHandler>,
    ) -> io::Result<()> {
        self.set_handlers(fd, SourceKind::Fd, io_read, io_write, io_poll)
    }

    fn set_handlers(
        &self,
        fd: RawFd,
        kind: SourceKind,
        io_read: Option<Handler>,
        io_write: Option<Handler>,
        io_poll: Option<PollHandler>,
    ) -> io::Result<()> {
        let retired =
            self.inner
                .handlers
                .set(&*self.inner.poller, fd, kind, io_read, io_write, io_poll)?;
        // A blocked poll must see the new set (the poll(2) back end copies it per wait).
        self.inner.core.notify_changed();
        // From another thread, a replaced callback may be running right now: wait for it, so
        // that once this returns the old callbacks are neither running nor ever called again.
        for cell in &retired {
            cell.quiesce();
        }
        drop(retired);
        Ok(())
    }

    /// Sets or (with `None`) removes the handler of an event notifier (QEMU's
    /// `aio_set_event_notifier`). `io_read` runs while the notifier is set; it should call
    /// [`EventNotifier::test_and_clear`].
    pub fn set_event_notifier(
        &self,
        notifier: &EventNotifier,
        io_read: Option<Handler>,
    ) -> io::Result<()> {
        self.set_handlers(notifier.raw_fd(), SourceKind::Notifier, io_read, None, None)
    }

    /// [`set_event_notifier`](Self::set_event_notifier) with an `io_poll` callback (QEMU's
    /// `aio_set_event_notifier` with `io_poll`); see
    /// [`set_fd_handler_poll`](Self::set_fd_handler_poll). When `io_poll` reports work, `io_read`
    /// runs even if the notifier is not set ([`EventNotifier::test_and_clear`] returns false).
    pub fn set_event_notifier_poll(
        &self,
        notifier: &EventNotifier,
        io_read: Option<Handler>,
        io_poll: Option<PollHandler>,
    ) -> io::Result<()> {
        self.set_handlers(
            notifier.raw_fd(),
            SourceKind::Notifier,
            io_read,
            None,
            io_poll,
        )
    }

    /// Sets the busy-polling parameters (QEMU's `aio_context_set_poll_params`): the longest
    /// window in ns (0 turns polling off), the factor it grows by (0: 2) and the divisor it
    /// shrinks by (0: reset to 0). The window restarts from 0. Any thread may call this.
    ///
    /// While polling is on, a blocking [`poll`](Self::poll) with nothing ready first spins for
    /// up to the current window, checking `io_poll` callbacks, [`notify`](Self::notify) and BH
    /// schedules from other threads, and every descriptor (for free on io_uring; on epoll and
    /// poll(2) with a zero-timeout wait per round, and only while some handler lacks
    /// `io_poll`), before it sleeps in the kernel. Spinning burns the CPU it runs on: see the
    /// crate's README for when it pays. (QEMU does not spin on epoll while a handler lacks
    /// `io_poll`; here such a descriptor ends the spin as soon as it is ready.)
    pub fn set_poll_params(&self, max_ns: u64, grow: u64, shrink: u64) {
        self.inner.polling.set_params(PollParams {
            max_ns,
            grow,
            shrink,
        });
        // A sleeping loop picks the new parameters up at its next poll.
        self.notify();
    }

    /// Stops busy-polling until the returned guard is dropped. Guards count, like QEMU's
    /// `poll_disable_cnt` (which QEMU raises for each handler without `io_poll`): polling
    /// resumes when the last one is gone, with the window it had, where
    /// [`set_poll_params`](Self::set_poll_params) would start it again from 0. Cheap enough to
    /// take and drop per message: the counter and the context's reference count, two atomic
    /// operations each way. Any thread may call this; a
    /// spin already running finishes its window.
    ///
    /// For a caller who knows a spin would not pay right now, such as a server in the middle
    /// of receiving a large message: spinning takes its bytes in small pieces as they arrive,
    /// which costs both ends more than one wake-up once many have arrived.
    ///
    /// ```
    /// # fn main() -> std::io::Result<()> {
    /// let ctx = aioctx::AioContext::new()?;
    /// ctx.set_poll_params(32_768, 0, 0);
    /// let no_spin = ctx.disable_polling();
    /// ctx.poll(false); // a blocking poll would not spin either
    /// drop(no_spin);
    /// # Ok(())
    /// # }
    /// ```
    pub fn disable_polling(&self) -> PollingDisabled {
        self.inner.polling.disable();
        PollingDisabled { ctx: self.clone() }
    }

    /// The busy-polling parameters.
    pub fn poll_params(&self) -> PollParams {
        self.inner.polling.params()
    }

    /// A snapshot of the context's counters: eventfd writes, blocking waits, polling windows.
    pub fn stats(&self) -> Stats {
        self.inner.core.counters.snapshot(&self.inner.polling)
    }

    /// Creates a timer on `clock` whose deadlines are in units of `scale` ns (QEMU's
    /// `aio_timer_new`). It is not armed yet.
    pub fn timer_new(
        &self,
        clock: ClockType,
        scale: i64,
        cb: impl FnMut() + Send + 'static,
    ) -> Timer {
        Timer::new(self.inner.core.clone(), clock, scale, Box::new(cb))
    }

    /// How long a poll may block, in ns: 0 if work is ready, -1 for no limit (QEMU's
    /// `aio_compute_timeout`).
    pub fn compute_timeout(&self) -> i64 {
        let _guard = self.acquire();
        self.inner.compute_timeout()
    }

    /// Waits for and runs ready callbacks (QEMU's `aio_poll`).
    ///
    /// One iteration: compute how long to wait (0 if `blocking` is false, or if a BH is scheduled
    /// or a timer has expired), wait for descriptors, then run the scheduled BHs, the ready
    /// handlers and the expired timers, in that order.
    ///
    /// Returns true exactly when a user callback ran: a non-idle BH, an fd or notifier handler,
    /// or a timer. A wake-up by [`notify`](Self::notify) returns false, so callers that wait for
    /// a condition loop: `while !done { ctx.poll(true); }`.
    ///
    /// A blocking poll never returns before the earliest timer's deadline (timeouts are kept in
    /// nanoseconds and rounded up wherever the OS takes milliseconds), and runs that timer.
    ///
    /// A callback that panics unwinds out of `poll`; the context stays usable.
    pub fn poll(&self, blocking: bool) -> bool {
        let _guard = self.acquire();
        let _current = task::enter(self);
        let inner = &*self.inner;
        let core = &*inner.core;
        inner.home.store(thread_token(), Ordering::Relaxed);

        let mut timeout = if blocking { inner.compute_timeout() } else { 0 };
        // Busy-polling, strictly before the sleep is announced (see the polling module).
        let spin = if blocking && inner.polling.enabled() {
            Some(inner.try_poll_mode(&mut timeout))
        } else {
            None
        };
        let announced = timeout != 0;
        // A notify that came before the announcement means "do not sleep".
        if announced && !core.wake.begin_wait() {
            timeout = 0;
        }
        // With nothing to wait for and no reason to block, skip the system call: BHs and
        // timers are checked below anyway, and the notifier is drained at the next real wait.
        // The same goes for a spin that found work after asking every handler's io_poll, but
        // not for one that found readiness in the back end (it must be collected), and a spin
        // whose own wait collected events has done this poll's wait.
        let (then, spun) = match spin {
            Some(polling::Spin {
                start,
                then,
                tokens,
            }) => (then, Some((start, tokens))),
            None => (AfterSpin::Wait, None),
        };
        let must_wait = match &then {
            AfterSpin::Collected(..) => false,
            AfterSpin::Collect => true,
            AfterSpin::Skip => timeout != 0,
            AfterSpin::Wait => timeout != 0 || inner.handlers.count() != 0,
        };
        let mut waited = if let AfterSpin::Collected(epoch, events) = then {
            Some((epoch, events))
        } else {
            must_wait.then(|| {
                if timeout > 0 {
                    sys::prepare_timed_wait();
                }
                if timeout != 0 {
                    Counters::bump(&core.counters.blocking_waits);
                }
                let mut events = inner.take_buffer();
                let epoch = inner.wait(&mut events, timeout);
                (epoch, events)
            })
        };
        if announced {
            core.wake.end_wait();
        }
        core.notify_accept();

        if let Some((start, tokens)) = spun {
            // Before any callback runs: handler time is not polling time.
            let block_ns = start.elapsed().as_nanos().min(u128::from(u64::MAX));
            inner.polling.adjust(block_ns as u64);
            if !tokens.is_empty() {
                let (_, events) = waited.get_or_insert_with(|| {
                    (
                        inner.wait_epoch.load(Ordering::Relaxed),
                        inner.take_buffer(),
                    )
                });
                polling::merge_readable(events, &tokens);
            }
        }

        let mut progress = inner.run_bhs();
        if let Some((epoch, events)) = waited {
            progress |= inner.dispatch_events(&events, epoch);
            inner.give_buffer(events);
        }
        progress |= core.timers.run();
        progress
    }

    /// Prepares for an outer loop's wait (QEMU's `aio_ctx_prepare`): returns true if callbacks
    /// are ready to run now, so the outer loop should not block. Otherwise the outer loop waits
    /// for this context's descriptor (its `AsRawFd`, on Unix) to become readable, at most
    /// [`compute_timeout`](Self::compute_timeout) ns, then calls [`pending`](Self::pending) and
    /// [`dispatch`](Self::dispatch). Windows has no such single handle yet: an outer loop there
    /// can only wait for the timeout (bounded, say, to a few ms) before `pending`.
    pub fn prepare(&self) -> bool {
        self.prepare_timeout() == 0
    }

    /// [`prepare`](Self::prepare) that also returns how long the outer loop may block, in ns
    /// (0: callbacks are ready now; -1: no limit), so an outer loop needs one call, not two.
    pub fn prepare_timeout(&self) -> i64 {
        let _guard = self.acquire();
        let core = &*self.inner.core;
        // The outer loop will wait on `outer_fd`: it must reflect every registration.
        self.inner.poller.flush();
        if core.wake.begin_outer_wait() {
            self.inner.compute_timeout()
        } else {
            0
        }
    }

    /// Checks for work after an outer loop's wait (QEMU's `aio_ctx_check`): true if a BH is
    /// scheduled, a handler's descriptor is ready or a timer has expired. Ends the wait that
    /// [`prepare`](Self::prepare) announced.
    pub fn pending(&self) -> bool {
        let _guard = self.acquire();
        let inner = &*self.inner;
        inner.core.wake.end_outer_wait();
        inner.core.notify_accept();
        let mut events = inner.take_buffer();
        let epoch = inner.wait(&mut events, 0);
        let ready = events.iter().any(|e| inner.handlers.wants(e));
        let previous = inner.stashed.lock().replace((epoch, events));
        if let Some((_, buf)) = previous {
            inner.give_buffer(buf);
        }
        ready || inner.bh_work() == BhWork::Now || inner.core.timers.deadline_ns() == 0
    }

    /// Runs what is ready (QEMU's `aio_dispatch`): scheduled BHs, handlers whose descriptors
    /// [`pending`](Self::pending) found ready (or that are ready now), and expired timers.
    /// Returns true if a user callback ran.
    pub fn dispatch(&self) -> bool {
        let _guard = self.acquire();
        let _current = task::enter(self);
        let inner = &*self.inner;
        inner.core.wake.end_outer_wait();
        inner.core.notify_accept();
        let stashed = inner.stashed.lock().take();
        let (epoch, events) = match stashed {
            Some(s) => s,
            None => {
                let mut events = inner.take_buffer();
                let epoch = inner.wait(&mut events, 0);
                (epoch, events)
            }
        };
        let mut progress = inner.run_bhs();
        progress |= inner.dispatch_events(&events, epoch);
        progress |= inner.core.timers.run();
        inner.give_buffer(events);
        progress
    }

    /// The context's worker pool, created on first use (QEMU's `aio_get_thread_pool`).
    pub fn thread_pool(&self) -> ThreadPool {
        let shared = self.inner.pool.get_or_init(|| {
            PoolShared::new(
                self.inner.core.clone(),
                Arc::downgrade(&self.inner),
                self.inner.pool_config,
            )
        });
        ThreadPool {
            shared: Arc::clone(shared),
        }
    }

    /// Whether the calling thread is the context's home thread (QEMU's
    /// `in_aio_context_home_thread`): it holds the context lock (inside a poll, or through
    /// [`acquire`](Self::acquire)), or it was the last thread to poll the context, or nobody has
    /// polled it yet.
    pub fn in_home_thread(&self) -> bool {
        if self.inner.core.lock.is_owner() {
            return true;
        }
        let home = self.inner.home.load(Ordering::Relaxed);
        home == 0 || home == thread_token()
    }

    /// The descriptors that currently have handlers (not counting the context's own notifier).
    pub fn registered_fds(&self) -> Vec<RawFd> {
        self.inner.handlers.fds()
    }
}

impl Inner {
    fn bh_work(&self) -> BhWork {
        let queued = bh::scan(&self.core.bhs);
        if queued == BhWork::Now {
            return queued;
        }
        let taken = self
            .run_queue
            .with(&self.core.lock, |run| bh::scan_taken(run));
        queued.max(taken)
    }

    /// QEMU's `aio_compute_timeout`. Caller holds the context lock.
    fn compute_timeout(&self) -> i64 {
        let work = self.bh_work();
        if work == BhWork::Now {
            return 0;
        }
        let deadline = self.core.timers.deadline_ns();
        match work {
            BhWork::Idle if deadline < 0 => IDLE_BH_TIMEOUT_NS,
            BhWork::Idle => deadline.min(IDLE_BH_TIMEOUT_NS),
            _ => deadline,
        }
    }

    /// QEMU's `try_poll_mode`: spins before a blocking wait (see the polling module). `timeout`
    /// becomes 0 if the spin found work, or loses the time spent, keeping its deadline.
    fn try_poll_mode(&self, timeout: &mut i64) -> polling::Spin {
        let start = Instant::now();
        let window = self.polling.window_ns();
        let all_pollable = self.handlers.unpollable() == 0;
        let readiness = self.poller.readiness();
        if *timeout == 0 || window == 0 || (readiness == Readiness::Hidden && !all_pollable) {
            return polling::Spin::idle(start);
        }
        self.poller.flush();
        let max_ns = match u64::try_from(*timeout) {
            Ok(t) => window.min(t),
            Err(_) => window, // -1: no deadline
        };
        let pollable = self.handlers.pollable();
        let notified = || self.core.wake.is_notified();
        // Where asking the back end costs a system call, ask only for descriptors that have no
        // io_poll of their own, and make that call the wait itself (timeout 0), so that a busy
        // loop pays one system call per iteration, not a question and then a wait.
        let mut collected: Option<(u64, Vec<Event>)> = None;
        let found = match readiness {
            Readiness::Free => {
                let mut ready = || self.poller.has_pending();
                let check = polling::BackendCheck {
                    ready: &mut ready,
                    every_ns: 0,
                };
                polling::spin(start, max_ns, notified, &pollable, Some(check))
            }
            Readiness::Syscall if !all_pollable => {
                let mut ready = || {
                    let (epoch, events) = collected.get_or_insert_with(|| (0, self.take_buffer()));
                    *epoch = self.wait(events, 0);
                    !events.is_empty()
                };
                let check = polling::BackendCheck {
                    ready: &mut ready,
                    every_ns: polling::SYSCALL_CHECK_EVERY_NS,
                };
                polling::spin(start, max_ns, notified, &pollable, Some(check))
            }
            _ => polling::spin(start, max_ns, notified, &pollable, None),
        };
        if found.any {
            *timeout = 0;
            Counters::bump(&self.core.counters.poll_hits);
        } else {
            Counters::bump(&self.core.counters.poll_misses);
            if *timeout > 0 {
                let spent = start.elapsed().as_nanos().min(i64::MAX as u128) as i64;
                *timeout -= spent.min(*timeout);
            }
        }
        let then = match collected {
            // Only what the last round collected is current (each round waited anew).
            Some((epoch, events)) if !events.is_empty() => AfterSpin::Collected(epoch, events),
            collected => {
                if let Some((_, buf)) = collected {
                    self.give_buffer(buf);
                }
                if found.backend {
                    AfterSpin::Collect
                } else if found.any && all_pollable && !self.poller.has_pending() {
                    // Every handler was asked, and a back end that shows readiness has
                    // nothing.
                    AfterSpin::Skip
                } else {
                    AfterSpin::Wait
                }
            }
        };
        polling::Spin {
            start,
            then,
            tokens: found.tokens,
        }
    }

    /// Waits on the back end, drains the context's own notifier if it fired, and returns the
    /// new wait epoch.
    fn wait(&self, events: &mut Vec<Event>, timeout: i64) -> u64 {
        if let Err(err) = self.poller.wait(events, timeout) {
            // Only a broken invariant (a closed epoll descriptor, a bad buffer) gets here.
            panic!("aioctx: {err}");
        }
        if let Some(i) = events.iter().position(|e| e.token == NOTIFY_TOKEN) {
            events.swap_remove(i);
            self.core.event.test_and_clear();
            // Only now may another notify write again (see the wakeup module).
            self.core.wake.drained();
        }
        // Only the lock holder writes it: no read-modify-write needed.
        let epoch = self.wait_epoch.load(Ordering::Relaxed) + 1;
        self.wait_epoch.store(epoch, Ordering::Relaxed);
        epoch
    }

    /// QEMU's `aio_bh_poll`: runs the BHs scheduled before this call. Caller holds the lock.
    fn run_bhs(&self) -> bool {
        let lock = &self.core.lock;
        let mut next = self.run_queue.with(lock, |run| {
            self.core.bhs.take_into(run);
            run.pop_front()
        });
        let mut progress = false;
        // The queue is not borrowed while a callback runs: a nested poll in it runs the rest.
        while let Some(node) = next {
            progress |= bh::run_one(&self.core, node);
            next = self.run_queue.with(lock, VecDeque::pop_front);
        }
        progress
    }

    /// Runs the handlers of `events`, which the wait numbered `epoch` collected.
    fn dispatch_events(&self, events: &[Event], epoch: u64) -> bool {
        let mut progress = false;
        for event in events {
            // A nested poll inside a handler waited again: its fresher readiness superseded
            // ours (and it ran what was ready), so the rest of our list may be stale.
            if self.wait_epoch.load(Ordering::Relaxed) != epoch {
                break;
            }
            progress |= self.handlers.dispatch(event);
        }
        progress
    }

    fn take_buffer(&self) -> Vec<Event> {
        self.buffers
            .with(&self.core.lock, |spare| spare.pop())
            .unwrap_or_default()
    }

    fn give_buffer(&self, mut buf: Vec<Event>) {
        buf.clear();
        self.buffers.with(&self.core.lock, |spare| spare.push(buf));
    }
}

impl Drop for Inner {
    /// QEMU's `aio_ctx_finalize`: everything still registered is released without running.
    fn drop(&mut self) {
        if let Some(pool) = self.pool.get() {
            pool.shutdown();
        }
        let core = &*self.core;
        core.closed.store(true, Ordering::SeqCst);
        // Collect every callback first and drop them after: dropping user closures may drop
        // handles (BHs, timers) that reach back into the context.
        let mut doomed: Vec<Handler> = self.handlers.clear(&*self.poller);
        doomed.extend(core.bh_registry.close());
        doomed.extend(core.timer_registry.close());
        let timers = core.timers.clear();
        core.bhs.clear();
        let queued = std::mem::take(self.run_queue.get_mut());
        // One-shot BHs are owned by the queue alone.
        doomed.extend(
            queued
                .iter()
                .filter_map(|n| crate::registry::Release::release(&**n)),
        );
        drop(queued);
        drop(timers);
        drop(doomed);
    }
}

impl std::fmt::Debug for AioContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AioContext")
            .field("backend", &self.inner.backend)
            .field("handlers", &self.inner.handlers.count())
            .finish_non_exhaustive()
    }
}
