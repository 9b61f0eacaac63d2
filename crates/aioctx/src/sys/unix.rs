//! Unix-only public trait implementations.

use std::os::fd::{AsRawFd, RawFd};

impl AsRawFd for crate::AioContext {
    /// A descriptor that is readable whenever the context has work: a ready handler, or (after
    /// [`prepare`](crate::AioContext::prepare)) a scheduled BH or a notify. Outer loops (tokio,
    /// mio, calloop, GLib) wait on it, bounded by
    /// [`compute_timeout`](crate::AioContext::compute_timeout), then call
    /// [`pending`](crate::AioContext::pending) and [`dispatch`](crate::AioContext::dispatch).
    fn as_raw_fd(&self) -> RawFd {
        self.inner.poller.outer_fd()
    }
}

impl AsRawFd for crate::EventNotifier {
    /// The eventfd (QEMU's `event_notifier_get_fd`).
    fn as_raw_fd(&self) -> RawFd {
        self.raw_fd()
    }
}

/// Makes the calling thread's timed waits precise, once per thread.
///
/// Linux lets a sleeping thread's timeout slip by its "timer slack", 50 µs by default, to batch
/// wake-ups. A loop whose timers promise nanosecond deadlines wants none of that, so (like QEMU's
/// `init_clocks`) the polling thread's slack is set to 1 ns. It only affects this thread.
pub(crate) fn prepare_timed_wait() {
    use std::cell::Cell;
    thread_local! {
        static TUNED: Cell<bool> = const { Cell::new(false) };
    }
    TUNED.with(|tuned| {
        if !tuned.replace(true) {
            // SAFETY: PR_SET_TIMERSLACK takes an integer argument and touches no memory. Failure
            // (an old kernel) only leaves the default slack, which delays but never hastens.
            unsafe {
                libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong);
            }
        }
    });
}
