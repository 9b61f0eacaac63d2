//! AIO control blocks: the handle of an asynchronous operation in flight (QEMU's
//! `BlockDriverAIOCB`/`BlockAIOCB` with its `AIOCBInfo`, and `bdrv_aio_cancel[_async]`).

use std::fmt;
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

use crate::AioContext;

/// The error a cancelled operation completes with (QEMU's `-ECANCELED`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Canceled;

impl fmt::Display for Canceled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("operation canceled")
    }
}

impl std::error::Error for Canceled {}

/// What a provider of asynchronous operations implements so its operations can be handled
/// through an [`AioCb`] (QEMU's `AIOCBInfo`).
pub trait AioCbOps: Send + Sync {
    /// Requests cancellation and returns at once (QEMU's `AIOCBInfo.cancel_async`). The
    /// operation's completion must still run exactly once, later, on its context: with
    /// [`Canceled`] if it was stopped in time, otherwise with its real result.
    fn cancel_async(&self);

    /// The context the completion runs on; [`AioCb::cancel`] polls it while waiting when called
    /// on that context's thread.
    fn context(&self) -> Option<AioContext>;

    /// The completion state the operation shares with its [`AioCb`]; the provider calls
    /// [`Completion::complete`] right after its completion callback has run.
    fn completion(&self) -> &Completion;
}

/// Whether an operation's completion callback has run; lets [`AioCb::cancel`] wait for it from
/// any thread.
#[derive(Debug, Default)]
pub struct Completion {
    done: Mutex<bool>,
    cond: Condvar,
}

impl Completion {
    /// A completion that has not happened yet.
    pub fn new() -> Completion {
        Completion::default()
    }

    /// Records that the completion callback has run, waking any [`AioCb::cancel`] waiting.
    pub fn complete(&self) {
        *self.done.lock() = true;
        self.cond.notify_all();
    }

    /// Whether [`complete`](Self::complete) was called.
    pub fn is_complete(&self) -> bool {
        *self.done.lock()
    }

    fn wait(&self) {
        let mut done = self.done.lock();
        while !*done {
            self.cond.wait(&mut done);
        }
    }
}

/// The handle of an asynchronous operation (QEMU's `BlockAIOCB`), returned by
/// [`ThreadPool::submit_aio`](crate::ThreadPool::submit_aio) and by any provider implementing
/// [`AioCbOps`]. Dropping it does not cancel the operation.
#[derive(Clone)]
pub struct AioCb {
    ops: Arc<dyn AioCbOps>,
}

impl AioCb {
    /// Wraps a provider's operation.
    pub fn new(ops: Arc<dyn AioCbOps>) -> AioCb {
        AioCb { ops }
    }

    /// Cancels the operation and returns once its completion has run (QEMU's
    /// `bdrv_aio_cancel`). The completion gets [`Canceled`] if the operation had not started;
    /// a running operation is never interrupted and completes with its real result.
    ///
    /// On the context's own thread (inside its poll, or holding [`AioContext::acquire`]) this
    /// polls the context while it waits, so the completion runs here. On any other thread it
    /// sleeps until the thread polling the context has run the completion.
    pub fn cancel(&self) {
        self.ops.cancel_async();
        let completion = self.ops.completion();
        match self.ops.context() {
            Some(ctx) if ctx.is_owned_by_current_thread() => {
                while !completion.is_complete() {
                    ctx.poll(true);
                }
            }
            _ => completion.wait(),
        }
    }

    /// Requests cancellation and returns at once (QEMU's `bdrv_aio_cancel_async`): an operation
    /// that has not started is dropped and its completion later gets [`Canceled`], on the
    /// context.
    pub fn cancel_async(&self) {
        self.ops.cancel_async();
    }

    /// Whether the completion has run.
    pub fn is_done(&self) -> bool {
        self.ops.completion().is_complete()
    }
}

impl fmt::Debug for AioCb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AioCb")
            .field("done", &self.is_done())
            .finish()
    }
}
