//! The cell that holds one user callback.
//!
//! A callback is `FnMut`, so it can never run twice at once. The cell's mutex is held while it
//! runs: a second call that finds it locked (a nested poll reaching a callback that is already
//! running further up the stack) is refused instead of re-entering it, and nothing else ever
//! blocks on that mutex. The lock is parking_lot's, which does not poison: a callback that panics
//! leaves the cell usable.

use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::Mutex;

use crate::lock::thread_token;

/// A user callback in its boxed form.
pub type Handler = Box<dyn FnMut() + Send + 'static>;

/// What happened when a cell was asked to run its callback.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Call {
    /// The callback ran.
    Ran,
    /// The callback is running further up the stack; it was not re-entered.
    Busy,
    /// The callback was released (its owner was deleted or the context dropped).
    Gone,
}

pub(crate) struct CallbackCell {
    slot: Mutex<Option<Handler>>,
    /// The thread running the callback (a `lock::thread_token`), 0 when it is not running.
    runner: AtomicUsize,
}

impl CallbackCell {
    pub(crate) fn new(cb: Handler) -> CallbackCell {
        CallbackCell {
            slot: Mutex::new(Some(cb)),
            runner: AtomicUsize::new(0),
        }
    }

    /// Runs the callback unless it is running already, gone, or `cancelled()` says so once the
    /// cell is locked. Whoever cancels sets its flag and then calls [`quiesce`](Self::quiesce):
    /// either that waits for this call, or this call sees the flag.
    pub(crate) fn call_unless(&self, cancelled: impl FnOnce() -> bool) -> Call {
        let Some(mut slot) = self.slot.try_lock() else {
            return Call::Busy;
        };
        if cancelled() {
            return Call::Gone;
        }
        let Some(cb) = slot.as_mut() else {
            return Call::Gone;
        };
        self.runner.store(thread_token(), Ordering::Relaxed);
        // Cleared even if the callback panics.
        struct Running<'a>(&'a AtomicUsize);
        impl Drop for Running<'_> {
            fn drop(&mut self) {
                self.0.store(0, Ordering::Relaxed);
            }
        }
        let _running = Running(&self.runner);
        cb();
        Call::Ran
    }

    /// Runs the callback unless it is running already or gone.
    pub(crate) fn call(&self) -> Call {
        self.call_unless(|| false)
    }

    /// Returns once no other thread is running the callback. Returns at once on the thread that
    /// is running it (a callback deleting itself, or a nested poll's callback deleting it).
    pub(crate) fn quiesce(&self) {
        if self.runner.load(Ordering::Relaxed) != thread_token() {
            drop(self.slot.lock());
        }
    }

    /// Takes the callback out so the caller can drop it outside its own locks. Returns `None` if
    /// it is running (whoever runs it keeps the cell alive and frees it later) or already gone.
    pub(crate) fn release(&self) -> Option<Handler> {
        self.slot.try_lock().and_then(|mut slot| slot.take())
    }
}

/// Wraps a one-shot callback so it can live in a [`CallbackCell`].
pub(crate) fn once(cb: impl FnOnce() + Send + 'static) -> Handler {
    let mut cb = Some(cb);
    Box::new(move || {
        if let Some(cb) = cb.take() {
            cb()
        }
    })
}
