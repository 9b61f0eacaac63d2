//! The wake-up protocol between a context's polling thread and the threads that notify it
//! (QEMU's `notify_me`/`notified`, `aio_notify` and `aio_notify_accept`).
//!
//! Modern QEMU's protocol (commits eabc977973 and 601829f88e, checked there with Promela
//! models), plus a `kicked` flag that coalesces the eventfd writes:
//!
//! * `notify`: `notified = true`; full fence; if `notify_me != 0` and `kicked` swaps from false to
//!   true, write the eventfd.
//! * a blocking poll: compute the timeout; if it is not 0, `notify_me += 2`, full fence, and if
//!   `notified` is set do not block. After the wait: `notify_me -= 2`; `notified = false`; full
//!   fence; then look at BHs, descriptors and timers.
//! * when the wait reports the eventfd readable, the poller drains it and only then clears
//!   `kicked`.
//!
//! Invariants:
//! * No lost wake-up: a producer publishes its work, then `notified`, then reads `notify_me`; the
//!   poller publishes `notify_me`, then reads `notified` (and, before that, computed the timeout
//!   from the work). With full fences on both sides, either the producer sees the poller asleep
//!   and writes, or the poller sees `notified` and does not sleep.
//! * `kicked == true` implies an eventfd write has been or is about to be made and not yet
//!   drained, so skipping the write when `kicked` is set never leaves a sleeping poller unwoken;
//!   it also means at most one write per sleep.
//! * No syscall while the loop is awake: `notify_me` is 0 outside the wait.
//!
//! `notify_me` bit 0 is set between [`AioContext::prepare`](crate::AioContext::prepare) and
//! [`AioContext::pending`](crate::AioContext::pending) (an outer loop is about to wait on the
//! context's descriptor), like QEMU's GSource.
//!
//! Busy-polling (the `polling` module) spins before `notify_me += 2`, watching `notified`: a
//! notify during the spin is seen with no eventfd write, and one that races with the end of the
//! spin is caught by the protocol above, unchanged.
//!
//! This module holds only the atomics, no system calls, so that the model check in
//! `crates/aioctx-loom/tests/wakeup.rs` can check the protocol under every interleaving the C++
//! memory model allows: it compiles this very file with `crate::sync` pointing at loom's atomics
//! instead of std's.

use crate::sync::atomic::{fence, AtomicBool, AtomicU32, Ordering};

/// `notify_me`'s count of polls sleeping in the context's own wait (QEMU adds 2 per sleeper).
const IN_WAIT: u32 = 2;
/// `notify_me`'s bit for an outer loop waiting on the context's descriptor.
const IN_OUTER_WAIT: u32 = 1;

/// The flags of the protocol; the eventfd itself belongs to the context.
pub(crate) struct WakeState {
    notify_me: AtomicU32,
    notified: AtomicBool,
    kicked: AtomicBool,
}

impl WakeState {
    pub(crate) fn new() -> WakeState {
        WakeState {
            notify_me: AtomicU32::new(0),
            notified: AtomicBool::new(false),
            kicked: AtomicBool::new(false),
        }
    }

    /// QEMU's `aio_notify`, minus the write: true when the caller must write the eventfd.
    /// Whatever the caller published before this call is seen by the poll it wakes.
    #[must_use]
    pub(crate) fn notify(&self) -> bool {
        // Release (QEMU's smp_wmb before its store): the poll that accepts this flag (its
        // relaxed load, then its fence) must also see the work published before it, or that
        // poll could take the flag, miss the work, and sleep on it. A swap rather than a store
        // only for the model check: loom (0.7) does not apply every C++20 rule for SeqCst
        // fences and reports a lost wake-up with a store that the rules forbid; with a swap it
        // proves the protocol. It costs one locked instruction on the cross-thread path.
        self.notified.swap(true, Ordering::Release);
        fence(Ordering::SeqCst);
        self.notify_me.load(Ordering::Relaxed) != 0 && !self.kicked.swap(true, Ordering::AcqRel)
    }

    /// Announces a blocking wait on the context's own descriptor, after the timeout was
    /// computed from the work in sight. False when a notify came first: the wait must not block
    /// (but [`end_wait`](Self::end_wait) is still due).
    #[must_use]
    pub(crate) fn begin_wait(&self) -> bool {
        self.notify_me.fetch_add(IN_WAIT, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        !self.notified.load(Ordering::Relaxed)
    }

    /// Ends what [`begin_wait`](Self::begin_wait) announced.
    pub(crate) fn end_wait(&self) {
        self.notify_me.fetch_sub(IN_WAIT, Ordering::Release);
    }

    /// An outer loop is about to wait on the context's descriptor. False when a notify came
    /// first (its timeout must then be 0).
    #[must_use]
    pub(crate) fn begin_outer_wait(&self) -> bool {
        self.notify_me.fetch_or(IN_OUTER_WAIT, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        !self.notified.load(Ordering::Relaxed)
    }

    /// Ends what [`begin_outer_wait`](Self::begin_outer_wait) announced.
    pub(crate) fn end_outer_wait(&self) {
        self.notify_me.fetch_and(!IN_OUTER_WAIT, Ordering::Release);
    }

    /// QEMU's `aio_notify_accept`: forgets the notifications so far; work published before them
    /// is visible to what the caller examines next.
    pub(crate) fn accept(&self) {
        // Only a set flag needs clearing and ordering before the work is examined; if it was
        // already clear, a notify racing with us sets it again and the next poll will not sleep.
        // The fence also acquires the work published before the notify that set the flag.
        if self.notified.load(Ordering::Relaxed) {
            self.notified.store(false, Ordering::Relaxed);
            fence(Ordering::SeqCst);
        }
    }

    /// Whether a notify came since the last [`accept`](Self::accept); for the busy-polling spin,
    /// which only needs to see it eventually.
    pub(crate) fn is_notified(&self) -> bool {
        self.notified.load(Ordering::Relaxed)
    }

    /// The poller drained the eventfd: the next notify that finds a sleeper may write again.
    pub(crate) fn drained(&self) {
        // A swap rather than a store only so that loom checks it exactly: loom 0.7 can let a
        // store land inside a concurrent read-modify-write (tokio-rs/loom#254), here the swap
        // in `notify`. It runs once per eventfd wake-up, next to two system calls.
        self.kicked.swap(false, Ordering::Release);
    }
}
