//! The cell that holds one user callback.
//!
//! A callback is `FnMut`, so it can never run twice at once. The cell's mutex is held while it
//! runs: a second call that finds it locked (a nested poll reaching a callback that is already
//! running further up the stack) is refused instead of re-entering it, and nothing else ever
//! blocks on that mutex. The lock is parking_lot's, which does not poison: a callback that panics
//! leaves the cell usable.

use parking_lot::Mutex;

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

pub(crate) struct CallbackCell(Mutex<Option<Handler>>);

impl CallbackCell {
    pub(crate) fn new(cb: Handler) -> CallbackCell {
        CallbackCell(Mutex::new(Some(cb)))
    }

    /// Runs the callback unless it is running already or gone.
    pub(crate) fn call(&self) -> Call {
        let Some(mut slot) = self.0.try_lock() else {
            return Call::Busy;
        };
        match slot.as_mut() {
            Some(cb) => {
                cb();
                Call::Ran
            }
            None => Call::Gone,
        }
    }

    /// Takes the callback out so the caller can drop it outside its own locks. Returns `None` if
    /// it is running (whoever runs it keeps the cell alive and frees it later) or already gone.
    pub(crate) fn release(&self) -> Option<Handler> {
        self.0.try_lock().and_then(|mut slot| slot.take())
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
