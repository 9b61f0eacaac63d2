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
fn thread_token() -> usize {
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
            self.nesting.fetch_add(1, Ordering::Relaxed);
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
        if self.nesting.fetch_sub(1, Ordering::Relaxed) != 1 {
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
