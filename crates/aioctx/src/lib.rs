//! # aioctx: QEMU's AioContext event loop in Rust
//!
//! A small event loop a thread can wait on synchronously, with QEMU's semantics
//! (`include/block/aio.h`):
//!
//! * bottom halves ([`Bh`]): lock-free, thread-safe deferred callbacks;
//! * fd handlers and [`EventNotifier`]s, level-triggered;
//! * [`Timer`]s on several clocks ([`ClockType`]), including a virtual clock the program
//!   controls ([`virtual_clock`]);
//! * [`AioContext::poll`] with coalesced cross-thread wake-ups, nested loops, and
//!   [`prepare`](AioContext::prepare)/[`pending`](AioContext::pending)/
//!   [`dispatch`](AioContext::dispatch) for outer loops;
//! * a recursive, FIFO-fair context lock ([`AioContext::acquire`]);
//! * with the `glib` feature (Unix), the context as a GLib source for a `glib::MainContext`
//!   (`AioContext::g_source`, QEMU's `aio_get_g_source`).
//!
//! Platforms ([`Backend`]): Linux and other Unixes (epoll or poll(2); [`RawFd`] is a file
//! descriptor), and Windows (event objects and sockets with no 64-handle limit; [`RawFd`] is a
//! `RawSocket`, the only kind of descriptor `set_fd_handler` takes there, and an
//! [`EventNotifier`] is an event object). Readiness is level-triggered on both.
//!
//! ```
//! # fn main() -> std::io::Result<()> {
//! use aioctx::{AioContext, ClockType, SCALE_MS};
//! use std::sync::atomic::{AtomicUsize, Ordering};
//! use std::sync::Arc;
//!
//! let ctx = AioContext::new()?;
//! let hits = Arc::new(AtomicUsize::new(0));
//!
//! let h = hits.clone();
//! let bh = ctx.bh_new(move || {
//!     h.fetch_add(1, Ordering::Relaxed);
//! });
//! let h = hits.clone();
//! let timer = ctx.timer_new(ClockType::Realtime, SCALE_MS, move || {
//!     h.fetch_add(10, Ordering::Relaxed);
//! });
//!
//! bh.schedule();
//! timer.modify(aioctx::clock_get_ns(ClockType::Realtime) / SCALE_MS + 1);
//! while hits.load(Ordering::Relaxed) < 11 {
//!     ctx.poll(true);
//! }
//! # Ok(()) }
//! ```
#![warn(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

mod aiocb;
mod bh;
mod callback;
pub mod clock;
mod context;
#[cfg(all(unix, feature = "glib"))]
mod gsource;
mod handlers;
mod lock;
mod notifier;
mod polling;
mod registry;
mod sys;
mod task;
mod thread_pool;
mod timer;
mod wakeup;

/// What the lock-free modules (`wakeup`, `bh::queue`) are written against: std's atomics and
/// `Arc` here; the tests of `crates/aioctx-loom` compile those modules again with loom's, to
/// model-check them.
mod sync {
    pub(crate) use std::sync::atomic;
    pub(crate) use std::sync::Arc;
}

pub use aiocb::{AioCb, AioCbOps, Canceled, Completion};
pub use bh::Bh;
pub use callback::Handler;
pub use clock::{clock_get_ns, virtual_clock, ClockType, SCALE_MS, SCALE_NS, SCALE_US};
pub use context::{AioContext, AioContextGuard, Builder, PollingDisabled, WeakAioContext};
pub use notifier::EventNotifier;
pub use polling::{PollHandler, PollParams, Stats};
pub use sys::{Backend, RawFd};
pub use task::{sleep, sleep_on, sleep_until, JoinHandle, Readiness, Sleep};
pub use thread_pool::{RunFuture, ThreadPool};
pub use timer::Timer;

/// The `glib` crate this crate's [`AioContext::g_source`] is built against, so that callers
/// use the same version.
#[cfg(all(unix, feature = "glib"))]
pub use glib;
