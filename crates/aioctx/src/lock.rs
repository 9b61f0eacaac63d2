//! The context lock: recursive and FIFO-fair across threads (QEMU's `RFifoLock`,
//! `aio_context_acquire`/`aio_context_release`).
//!
//! A ticket lock with an owner fast path:
//!
//! * `next_ticket` hands out tickets; `now_serving` is the ticket that owns the lock. Threads get
//!   the lock strictly in ticket order, which is the fairness QEMU's RFifoLock gives.
//! * The owner re-enters without a ticket (`nesting` counts its depth).
//! * A thread that must wait calls the contention callback (the context's `notify`, kicking the
//!   owner out of a blocking poll) and sleeps on a condition variable.
//!
//! Invariants:
//! * `owner` is non-zero exactly while some thread holds the lock; only that thread writes
//!   `nesting` and clears `owner`.
//! * Release publishes `now_serving + 1` before it reads `waiters`, and a waiter publishes
//!   `waiters + 1` before it reads `now_serving` (both SeqCst), so either the releaser sees the
//!   waiter and broadcasts, or the waiter sees its turn has come: no lost wake-up. The waiter
//!   re-checks `now_serving` under `sleep_lock`, which the releaser takes to broadcast.

use std::cell::Cell;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

use parking_lot::{Condvar, Mutex};

/// A process-unique, never reused, non-zero id for the calling thread.
pub(crate) fn thread_token() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(1);
    thread_local! {
        static TOKEN: Cell<usize> = const { Cell::new(0) };
    }
    TOKEN.with(|t| {
        if t.get() == 0 {
            t.set(NEXT.fetch_add(1, Ordering::Relaxed));
        }
        t.get()
    })
}

pub(crate) struct RFifoLock {
    next_ticket: AtomicU32,
    now_serving: AtomicU32,
    owner: AtomicUsize,
    nesting: AtomicUsize,
    waiters: AtomicUsize,
    sleep_lock: Mutex<()>,
    turn_changed: Condvar,
}

impl RFifoLock {
    pub(crate) fn new() -> RFifoLock {
        RFifoLock {
            next_ticket: AtomicU32::new(0),
            now_serving: AtomicU32::new(0),
            owner: AtomicUsize::new(0),
            nesting: AtomicUsize::new(0),
            waiters: AtomicUsize::new(0),
            sleep_lock: Mutex::new(()),
            turn_changed: Condvar::new(),
        }
    }

    /// Whether the calling thread holds the lock.
    pub(crate) fn is_owner(&self) -> bool {
        self.owner.load(Ordering::Relaxed) == thread_token()
    }

    /// Takes the lock, calling `on_contention` while another thread holds it.
    pub(crate) fn lock(&self, on_contention: impl Fn()) -> RFifoGuard<'_> {
        let me = thread_token();
        if self.owner.load(Ordering::Relaxed) == me {
            // Only the owner can observe its own token here, and only it changes `nesting`.
            let n = self.nesting.load(Ordering::Relaxed);
            self.nesting.store(n + 1, Ordering::Relaxed);
            return RFifoGuard::new(self);
        }
        let ticket = self.next_ticket.fetch_add(1, Ordering::Relaxed);
        if self.now_serving.load(Ordering::Acquire) != ticket {
            self.wait_for_turn(ticket, on_contention);
        }
        self.owner.store(me, Ordering::Relaxed);
        self.nesting.store(1, Ordering::Relaxed);
        RFifoGuard::new(self)
    }

    #[cold]
    fn wait_for_turn(&self, ticket: u32, on_contention: impl Fn()) {
        self.waiters.fetch_add(1, Ordering::SeqCst);
        while self.now_serving.load(Ordering::SeqCst) != ticket {
            // Kick whoever owns the lock now: it may be blocked in poll.
            on_contention();
            let mut sleep = self.sleep_lock.lock();
            if self.now_serving.load(Ordering::SeqCst) != ticket {
                self.turn_changed.wait(&mut sleep);
            }
        }
        self.waiters.fetch_sub(1, Ordering::Relaxed);
        // Pairs with the Release increment in `unlock`: the previous owner's writes are visible.
        std::sync::atomic::fence(Ordering::Acquire);
    }

    fn unlock(&self) {
        // Only the owner runs this, and only it writes `nesting`.
        let n = self.nesting.load(Ordering::Relaxed);
        self.nesting.store(n - 1, Ordering::Relaxed);
        if n != 1 {
            return;
        }
        self.owner.store(0, Ordering::Relaxed);
        self.now_serving.fetch_add(1, Ordering::SeqCst);
        if self.waiters.load(Ordering::SeqCst) != 0 {
            let _sleep = self.sleep_lock.lock();
            self.turn_changed.notify_all();
        }
    }
}

/// Holds the lock; dropping it releases one level. Not `Send`: it must be released on the thread
/// that took it.
pub(crate) struct RFifoGuard<'a> {
    lock: &'a RFifoLock,
    _not_send: PhantomData<*const ()>,
}

impl<'a> RFifoGuard<'a> {
    fn new(lock: &'a RFifoLock) -> Self {
        RFifoGuard {
            lock,
            _not_send: PhantomData,
        }
    }
}

impl Drop for RFifoGuard<'_> {
    fn drop(&mut self) {
        self.lock.unlock();
    }
}

/// Data that only the holder of a context lock touches, so it needs no lock of its own.
///
/// Invariant: `with` runs only on the thread that owns `lock` (checked), and never inside another
/// `with` on the same cell (checked), so at most one `&mut T` exists at a time. The closures
/// passed to it are the crate's own short critical sections, which never run user callbacks:
/// a nested poll inside a callback therefore sees the data consistent, between two `with`s.
pub(crate) struct OwnerOnly<T> {
    value: std::cell::UnsafeCell<T>,
    in_use: std::sync::atomic::AtomicBool,
}

// SAFETY: the value is reached only through `with`, by the one thread that owns the context lock,
// one borrow at a time (see the invariant above); `T: Send` lets it move between the successive
// owners of the lock, whose hand-over the lock's acquire/release orderings synchronise.
unsafe impl<T: Send> Sync for OwnerOnly<T> {}

impl<T> OwnerOnly<T> {
    pub(crate) fn new(value: T) -> OwnerOnly<T> {
        OwnerOnly {
            value: std::cell::UnsafeCell::new(value),
            in_use: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Runs `f` on the value. Panics if the caller does not own `lock` or is already inside
    /// `with` on this cell: both would be bugs in this crate.
    pub(crate) fn with<R>(&self, lock: &RFifoLock, f: impl FnOnce(&mut T) -> R) -> R {
        assert!(lock.is_owner(), "OwnerOnly used without the context lock");
        assert!(
            !self.in_use.swap(true, Ordering::Relaxed),
            "OwnerOnly borrowed twice"
        );
        struct Release<'a>(&'a std::sync::atomic::AtomicBool);
        impl Drop for Release<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::Relaxed);
            }
        }
        let _release = Release(&self.in_use);
        // SAFETY: the assertions above establish the invariant: this thread owns the context
        // lock and holds no other borrow of the value.
        f(unsafe { &mut *self.value.get() })
    }

    /// The value, when nobody else can reach the cell any more.
    pub(crate) fn get_mut(&mut self) -> &mut T {
        self.value.get_mut()
    }
}
