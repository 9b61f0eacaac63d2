//! Event notifiers (QEMU's `EventNotifier`): a flag one thread sets and another waits for.

use std::io;

use crate::sys::{RawFd, RawNotifier};

/// A level-triggered wake-up flag backed by a kernel object (an eventfd on Linux, an event
/// object on Windows), so a context can wait on it with [`AioContext::set_event_notifier`].
///
/// QEMU's `EventNotifier` (`event_notifier_init`, `event_notifier_set`,
/// `event_notifier_test_and_clear`).
///
/// ```
/// # fn main() -> std::io::Result<()> {
/// let n = aioctx::EventNotifier::new()?;
/// assert!(!n.test_and_clear());
/// n.set()?;
/// n.set()?;
/// assert!(n.test_and_clear());
/// assert!(!n.test_and_clear());
/// # Ok(()) }
/// ```
///
/// [`AioContext::set_event_notifier`]: crate::AioContext::set_event_notifier
#[derive(Debug)]
pub struct EventNotifier {
    raw: RawNotifier,
}

impl EventNotifier {
    /// Creates a cleared notifier (QEMU's `event_notifier_init(e, false)`).
    pub fn new() -> io::Result<EventNotifier> {
        Ok(EventNotifier {
            raw: RawNotifier::new()?,
        })
    }

    /// Sets the notifier; it stays set until [`test_and_clear`](Self::test_and_clear)
    /// (QEMU's `event_notifier_set`). Setting a set notifier is harmless.
    pub fn set(&self) -> io::Result<()> {
        self.raw.set()
    }

    /// Clears the notifier and returns whether it was set (QEMU's
    /// `event_notifier_test_and_clear`).
    pub fn test_and_clear(&self) -> bool {
        self.raw.test_and_clear()
    }

    /// The descriptor a context waits on.
    pub(crate) fn raw_fd(&self) -> RawFd {
        self.raw.raw_fd()
    }
}
