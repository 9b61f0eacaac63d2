//! async/await on the context (QEMU's coroutines: `aio_co_schedule`, `aio_co_wake`,
//! `AIO_WAIT_WHILE`, `thread_pool_submit_co`).
//!
//! Each spawned task is a BH whose callback polls the future, and its waker schedules that BH.
//! So a task always runs on its own context's thread during a poll: a wake from another thread
//! queues it there, and a wake from inside another task queues it for the next poll instead of
//! entering it, which keeps ping-pong between tasks off the stack (QEMU's "chaining, not
//! nesting" rule for `aio_co_enter`).

use std::cell::Cell;
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use parking_lot::Mutex;

use crate::aiocb::Canceled;
use crate::bh::{self, Bh, BhNode};
use crate::clock::{clock_get_ns, ClockType};
use crate::context::{Core, Inner};
use crate::sys::RawFd;
use crate::{AioContext, Timer};

thread_local! {
    /// The context whose poll (or `block_on`) is running on this thread, innermost first.
    static CURRENT: Cell<*const Inner> = const { Cell::new(std::ptr::null()) };
}

/// Marks `ctx` as the thread's current context until dropped.
pub(crate) struct Enter {
    previous: *const Inner,
}

pub(crate) fn enter(ctx: &AioContext) -> Enter {
    let previous = CURRENT.with(|c| c.replace(Arc::as_ptr(&ctx.inner)));
    Enter { previous }
}

impl Drop for Enter {
    fn drop(&mut self) {
        CURRENT.with(|c| c.set(self.previous));
    }
}

impl AioContext {
    /// The context running on this thread: the one whose [`poll`](Self::poll) or
    /// [`block_on`](Self::block_on) is on the stack, innermost first (QEMU's
    /// `qemu_get_current_aio_context`).
    pub fn current() -> Option<AioContext> {
        let ptr = CURRENT.with(Cell::get);
        if ptr.is_null() {
            return None;
        }
        // SAFETY: a non-null CURRENT was set by `enter` from a live `&AioContext` whose frame is
        // still on this thread's stack (the guard restores the previous value before that frame
        // returns), so `ptr` came from `Arc::as_ptr` of an Arc that is alive now; taking one more
        // strong reference and adopting it is sound.
        let inner = unsafe {
            Arc::increment_strong_count(ptr);
            Arc::from_raw(ptr)
        };
        Some(AioContext { inner })
    }

    /// Runs `future` as a task on this context (QEMU's `aio_co_schedule` of a new coroutine).
    /// It is first polled during the context's next poll, and then each time it is woken, always
    /// on the thread polling the context. Dropping the handle detaches the task;
    /// [`JoinHandle::abort`] cancels it.
    ///
    /// ```
    /// # fn main() -> std::io::Result<()> {
    /// let ctx = aioctx::AioContext::new()?;
    /// let task = ctx.spawn(async { 6 * 7 });
    /// assert_eq!(ctx.block_on(task), Ok(42));
    /// # Ok(()) }
    /// ```
    pub fn spawn<F>(&self, future: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let shared = Arc::new(JoinShared {
            state: Mutex::new(JoinState {
                output: None,
                waker: None,
            }),
            aborted: AtomicBool::new(false),
        });
        let core = self.inner.core.clone();
        // The task owns its BH and drops it (deleting it) when it finishes.
        let own_bh: Arc<Mutex<Option<Bh>>> = Arc::new(Mutex::new(None));
        let task = Task {
            future: Some(Box::pin(future)),
            shared: Arc::clone(&shared),
            waker: None,
            own_bh: Arc::clone(&own_bh),
            node: Weak::new(),
            core: core.clone(),
        };
        let bh = Bh::new_cyclic(core.clone(), move |node| {
            let mut task = task;
            task.node = node.clone();
            Box::new(move || task.run())
        });
        let waker = Waker::from(Arc::new(TaskWaker {
            node: Arc::clone(&bh.node),
            core,
        }));
        *own_bh.lock() = Some(bh);
        waker.wake_by_ref();
        JoinHandle { shared, waker }
    }

    /// Polls the context until `future` completes and returns its output (QEMU's
    /// `AIO_WAIT_WHILE`). The future runs on the calling thread; tasks, BHs, handlers and timers
    /// of this context run meanwhile. The calling thread holds the context lock throughout.
    pub fn block_on<F: Future>(&self, future: F) -> F::Output {
        let _guard = self.acquire();
        let _enter = enter(self);
        let flag = Arc::new(BlockOnWaker {
            woken: AtomicBool::new(true),
            core: Arc::clone(&self.inner.core),
        });
        let waker = Waker::from(Arc::clone(&flag));
        let mut cx = Context::from_waker(&waker);
        let mut future = pin!(future);
        loop {
            if flag.woken.swap(false, Ordering::AcqRel) {
                if let Poll::Ready(out) = future.as_mut().poll(&mut cx) {
                    return out;
                }
                continue;
            }
            self.poll(true);
        }
    }

    /// A future that resolves when `clock` reaches `deadline_ns`, using a timer of this context.
    pub fn sleep_until(&self, clock: ClockType, deadline_ns: i64) -> Sleep {
        Sleep {
            ctx: Some(self.downgrade()),
            clock,
            deadline_ns,
            timer: None,
            waker: Arc::new(Mutex::new(None)),
        }
    }

    /// A future that resolves after `duration` on `clock` (Realtime for wall-time delays).
    pub fn sleep(&self, clock: ClockType, duration: Duration) -> Sleep {
        self.sleep_until(clock, deadline_after(clock, duration))
    }

    /// A future that resolves once `fd` is readable (or has hung up or failed).
    ///
    /// It installs the fd's handlers on this context while it waits, so do not also give `fd`
    /// handlers of your own with [`set_fd_handler`](Self::set_fd_handler).
    pub fn readable(&self, fd: RawFd) -> Readiness {
        Readiness::new(self, fd, Direction::Read)
    }

    /// A future that resolves once `fd` is writable (or has failed). See
    /// [`readable`](Self::readable).
    pub fn writable(&self, fd: RawFd) -> Readiness {
        Readiness::new(self, fd, Direction::Write)
    }
}

fn deadline_after(clock: ClockType, duration: Duration) -> i64 {
    let ns = i64::try_from(duration.as_nanos()).unwrap_or(i64::MAX);
    clock_get_ns(clock).saturating_add(ns)
}

/// A future that resolves after `duration` on the realtime clock of the current context.
///
/// # Panics
///
/// When first polled outside any context's poll or `block_on`; use [`AioContext::sleep`] to name
/// the context explicitly.
pub fn sleep(duration: Duration) -> Sleep {
    sleep_on(ClockType::Realtime, duration)
}

/// A future that resolves after `duration` on `clock`, using the current context. See [`sleep`].
pub fn sleep_on(clock: ClockType, duration: Duration) -> Sleep {
    sleep_until(clock, deadline_after(clock, duration))
}

/// A future that resolves when `clock` reaches `deadline_ns`, using the current context. See
/// [`sleep`].
pub fn sleep_until(clock: ClockType, deadline_ns: i64) -> Sleep {
    Sleep {
        ctx: None,
        clock,
        deadline_ns,
        timer: None,
        waker: Arc::new(Mutex::new(None)),
    }
}

struct JoinState<T> {
    output: Option<Result<T, Canceled>>,
    waker: Option<Waker>,
}

struct JoinShared<T> {
    state: Mutex<JoinState<T>>,
    aborted: AtomicBool,
}

impl<T> JoinShared<T> {
    fn finish(&self, output: Result<T, Canceled>) {
        let waker = {
            let mut state = self.state.lock();
            state.output = Some(output);
            state.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

struct TaskWaker {
    node: Arc<BhNode>,
    core: Arc<Core>,
}

impl Wake for TaskWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        bh::schedule_node(&self.core, &self.node);
    }
}

struct Task<F: Future> {
    future: Option<Pin<Box<F>>>,
    shared: Arc<JoinShared<F::Output>>,
    waker: Option<Waker>,
    own_bh: Arc<Mutex<Option<Bh>>>,
    node: Weak<BhNode>,
    core: Arc<Core>,
}

impl<F: Future> Task<F> {
    fn waker(&mut self) -> Waker {
        self.waker
            .get_or_insert_with(|| {
                let node = self.node.upgrade().expect("a running task's node is alive");
                Waker::from(Arc::new(TaskWaker {
                    node,
                    core: Arc::clone(&self.core),
                }))
            })
            .clone()
    }

    fn run(&mut self) {
        if self.future.is_none() {
            return;
        }
        if self.shared.aborted.load(Ordering::Acquire) {
            self.finish(Err(Canceled));
            return;
        }
        let waker = self.waker();
        let mut cx = Context::from_waker(&waker);
        // The future is out of `self` while it runs: if it panics, it is dropped by the unwind
        // and the guard finishes the task as canceled, so it is never polled again.
        let Some(mut future) = self.future.take() else {
            return;
        };
        let guard = PanicFinish {
            shared: &self.shared,
            own_bh: &self.own_bh,
        };
        let poll = future.as_mut().poll(&mut cx);
        std::mem::forget(guard);
        match poll {
            Poll::Ready(out) => self.finish(Ok(out)),
            Poll::Pending => self.future = Some(future),
        }
    }

    fn finish(&mut self, output: Result<F::Output, Canceled>) {
        // Dropping the future, our waker and our BH breaks the node -> callback -> node cycle.
        self.future = None;
        self.waker = None;
        drop(self.own_bh.lock().take());
        self.shared.finish(output);
    }
}

struct PanicFinish<'a, T> {
    shared: &'a JoinShared<T>,
    own_bh: &'a Mutex<Option<Bh>>,
}

impl<T> Drop for PanicFinish<'_, T> {
    fn drop(&mut self) {
        drop(self.own_bh.lock().take());
        self.shared.finish(Err(Canceled));
    }
}

/// The handle of a task made by [`AioContext::spawn`]; a future of the task's output.
///
/// It resolves to `Err(Canceled)` if the task was aborted, panicked, or its context was dropped
/// first (in which case it never resolves if nothing polls it). Dropping the handle detaches the
/// task, which keeps running.
pub struct JoinHandle<T> {
    shared: Arc<JoinShared<T>>,
    waker: Waker,
}

impl<T> JoinHandle<T> {
    /// Cancels the task: it is dropped at its context's next poll without being polled again,
    /// and the handle resolves to `Err(Canceled)` (unless it had already finished).
    pub fn abort(&self) {
        self.shared.aborted.store(true, Ordering::Release);
        self.waker.wake_by_ref();
    }

    /// Whether the task has finished (completed, aborted or panicked).
    pub fn is_finished(&self) -> bool {
        self.shared.state.lock().output.is_some()
    }
}

impl<T> Future for JoinHandle<T> {
    type Output = Result<T, Canceled>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.shared.state.lock();
        match state.output.take() {
            Some(out) => Poll::Ready(out),
            None => {
                state.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

impl<T> std::fmt::Debug for JoinHandle<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinHandle")
            .field("finished", &self.is_finished())
            .finish()
    }
}

struct BlockOnWaker {
    woken: AtomicBool,
    core: Arc<Core>,
}

impl Wake for BlockOnWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.core.notify();
    }
}

/// A timer future: [`sleep`], [`AioContext::sleep`] and friends (QEMU's `qemu_co_sleep_ns`).
pub struct Sleep {
    ctx: Option<crate::WeakAioContext>,
    clock: ClockType,
    deadline_ns: i64,
    timer: Option<Timer>,
    waker: Arc<Mutex<Option<Waker>>>,
}

impl Sleep {
    /// The deadline in ns on the sleep's clock.
    pub fn deadline_ns(&self) -> i64 {
        self.deadline_ns
    }
}

impl Future for Sleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.clock.is_enabled() && clock_get_ns(self.clock) >= self.deadline_ns {
            self.timer = None;
            return Poll::Ready(());
        }
        *self.waker.lock() = Some(cx.waker().clone());
        if self.timer.is_none() {
            let ctx = match &self.ctx {
                Some(weak) => weak.upgrade(),
                None => Some(AioContext::current().expect(
                    "aioctx::sleep polled outside an AioContext; use AioContext::sleep instead",
                )),
            };
            // A context that is gone can never fire the timer: the sleep stays pending, like a
            // task on a dropped context.
            let Some(ctx) = ctx else {
                return Poll::Pending;
            };
            let slot = Arc::clone(&self.waker);
            let timer = ctx.timer_new(self.clock, crate::SCALE_NS, move || {
                if let Some(w) = slot.lock().take() {
                    w.wake();
                }
            });
            timer.modify_ns(self.deadline_ns);
            self.timer = Some(timer);
        }
        Poll::Pending
    }
}

impl std::fmt::Debug for Sleep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sleep")
            .field("clock", &self.clock)
            .field("deadline_ns", &self.deadline_ns)
            .finish()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Direction {
    Read,
    Write,
}

struct Waiter {
    ready: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

#[derive(Default)]
struct FdWaiters {
    read: Vec<Arc<Waiter>>,
    write: Vec<Arc<Waiter>>,
}

/// The readiness waiters of one context, by descriptor.
#[derive(Default)]
pub(crate) struct IoWaiters {
    fds: Mutex<HashMap<RawFd, FdWaiters>>,
}

impl IoWaiters {
    /// Installs handlers for `fd` matching its waiters (none: removes them).
    fn sync_handlers(ctx: &AioContext, fd: RawFd) -> io::Result<()> {
        let (read, write) = {
            let fds = ctx.inner.io_waiters.fds.lock();
            fds.get(&fd).map_or((false, false), |w| {
                (!w.read.is_empty(), !w.write.is_empty())
            })
        };
        let handler = |dir: Direction| -> crate::Handler {
            let weak = ctx.downgrade();
            Box::new(move || {
                if let Some(ctx) = weak.upgrade() {
                    IoWaiters::fire(&ctx, fd, dir);
                }
            })
        };
        ctx.set_fd_handler(
            fd,
            read.then(|| handler(Direction::Read)),
            write.then(|| handler(Direction::Write)),
        )
    }

    fn fire(ctx: &AioContext, fd: RawFd, dir: Direction) {
        let woken = {
            let mut fds = ctx.inner.io_waiters.fds.lock();
            let Some(w) = fds.get_mut(&fd) else { return };
            let woken = std::mem::take(match dir {
                Direction::Read => &mut w.read,
                Direction::Write => &mut w.write,
            });
            if w.read.is_empty() && w.write.is_empty() {
                fds.remove(&fd);
            }
            woken
        };
        // The descriptor stays ready until someone consumes it: stop watching this direction
        // until a future asks again, or the handler would run on every poll.
        let _ = IoWaiters::sync_handlers(ctx, fd);
        for waiter in woken {
            waiter.ready.store(true, Ordering::Release);
            if let Some(w) = waiter.waker.lock().take() {
                w.wake();
            }
        }
    }
}

/// A readiness future: [`AioContext::readable`] and [`AioContext::writable`]. Resolves to an
/// error if the descriptor cannot be watched (for example a regular file under epoll).
pub struct Readiness {
    ctx: crate::WeakAioContext,
    fd: RawFd,
    dir: Direction,
    waiter: Option<Arc<Waiter>>,
}

impl Readiness {
    fn new(ctx: &AioContext, fd: RawFd, dir: Direction) -> Readiness {
        Readiness {
            ctx: ctx.downgrade(),
            fd,
            dir,
            waiter: None,
        }
    }
}

impl Future for Readiness {
    type Output = io::Result<()>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(waiter) = &self.waiter {
            if waiter.ready.load(Ordering::Acquire) {
                self.waiter = None;
                return Poll::Ready(Ok(()));
            }
            *waiter.waker.lock() = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let Some(ctx) = self.ctx.upgrade() else {
            return Poll::Ready(Err(io::Error::other("the AioContext was dropped")));
        };
        let waiter = Arc::new(Waiter {
            ready: AtomicBool::new(false),
            waker: Mutex::new(Some(cx.waker().clone())),
        });
        {
            let mut fds = ctx.inner.io_waiters.fds.lock();
            let entry = fds.entry(self.fd).or_default();
            match self.dir {
                Direction::Read => entry.read.push(Arc::clone(&waiter)),
                Direction::Write => entry.write.push(Arc::clone(&waiter)),
            }
        }
        self.waiter = Some(waiter);
        if let Err(err) = IoWaiters::sync_handlers(&ctx, self.fd) {
            self.unregister(&ctx);
            return Poll::Ready(Err(err));
        }
        Poll::Pending
    }
}

impl Readiness {
    fn unregister(&mut self, ctx: &AioContext) {
        let Some(waiter) = self.waiter.take() else {
            return;
        };
        let changed = {
            let mut fds = ctx.inner.io_waiters.fds.lock();
            let Some(w) = fds.get_mut(&self.fd) else {
                return;
            };
            let list = match self.dir {
                Direction::Read => &mut w.read,
                Direction::Write => &mut w.write,
            };
            let before = list.len();
            list.retain(|x| !Arc::ptr_eq(x, &waiter));
            let changed = list.is_empty() && before > 0;
            if w.read.is_empty() && w.write.is_empty() {
                fds.remove(&self.fd);
            }
            changed
        };
        if changed {
            let _ = IoWaiters::sync_handlers(ctx, self.fd);
        }
    }
}

impl Drop for Readiness {
    fn drop(&mut self) {
        if self.waiter.is_some() {
            if let Some(ctx) = self.ctx.upgrade() {
                self.unregister(&ctx);
            }
        }
    }
}

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Readiness")
            .field("fd", &self.fd)
            .field("dir", &self.dir)
            .finish()
    }
}
