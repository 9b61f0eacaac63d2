//! Unix-only public trait implementations.

use std::os::fd::{AsRawFd, RawFd};

impl AsRawFd for crate::AioContext {
    /// A descriptor that is readable whenever the context has work: a ready handler, or (after
    /// [`prepare`](crate::AioContext::prepare)) a scheduled BH or a notify. Outer loops (tokio,
    /// mio, calloop, GLib) wait on it, bounded by
    /// [`compute_timeout`](crate::AioContext::compute_timeout), then call
    /// [`pending`](crate::AioContext::pending) and [`dispatch`](crate::AioContext::dispatch).
    fn as_raw_fd(&self) -> RawFd {
        self.outer_fd()
    }
}

impl AsRawFd for crate::EventNotifier {
    /// The eventfd (QEMU's `event_notifier_get_fd`).
    fn as_raw_fd(&self) -> RawFd {
        self.raw_fd()
    }
}
