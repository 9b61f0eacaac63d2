//! The context as a GLib `GSource` (QEMU's `aio_get_g_source` and the `aio_ctx_prepare`,
//! `aio_ctx_check`, `aio_ctx_dispatch` and `aio_ctx_finalize` source functions of
//! `util/async.c`). Built with the `glib` feature, on Unix.
//!
//! The source waits on the context's outer-loop descriptor ([`AsRawFd`] for [`AioContext`]) and
//! maps GLib's three phases onto [`AioContext::prepare`], [`AioContext::pending`] and
//! [`AioContext::dispatch`]:
//!
//! * `prepare` announces the wait (sets `notify_me` bit 0, so that a BH scheduled or a notify
//!   made from another thread writes the context's eventfd and so makes the descriptor
//!   readable), and gives GLib [`AioContext::prepare_timeout`] rounded up to milliseconds, 0 and
//!   "ready" if work is pending already;
//! * `check` ends the wait and reports a scheduled BH, a ready handler or an expired timer;
//! * `dispatch` runs them. GLib also dispatches a source whose descriptor polled readable when
//!   `check` said no, so a pure wake-up (a [`notify`](AioContext::notify)) counts as a dispatch
//!   for `MainContext::iteration`'s return value, as in QEMU.
//!
//! All the unsafe code of the integration is in this file: the source is a C `GSource` header
//! followed by a handle on the context, created by `g_source_new` and released in `finalize`.

use std::ffi::c_int;
use std::mem::{self, ManuallyDrop};
use std::os::fd::AsRawFd;
use std::ptr;

use glib::ffi;
use glib::translate::from_glib_full;

use crate::AioContext;

/// The memory `g_source_new` allocates for each source: GLib's header, then our data.
#[repr(C)]
struct AioSource {
    /// Must be the first field: GLib hands the callbacks a `*mut GSource` that is the start of
    /// this struct.
    base: ffi::GSource,
    /// Written right after `g_source_new`, dropped in `finalize`.
    ctx: ManuallyDrop<AioContext>,
}

/// GLib only reads this table (it keeps the pointer for the source's lifetime), so one
/// immutable static serves every source.
static AIO_SOURCE_FUNCS: ffi::GSourceFuncs = ffi::GSourceFuncs {
    prepare: Some(aio_source_prepare),
    check: Some(aio_source_check),
    dispatch: Some(aio_source_dispatch),
    finalize: Some(aio_source_finalize),
    closure_callback: None,
    closure_marshal: None,
};

// The source is `Send + Sync` (`glib::Source` is), and its callbacks and `finalize` run on
// whichever thread iterates its `MainContext` or drops the last reference.
const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<AioContext>();
};

impl AioContext {
    /// A GLib source that runs this context's BHs, handlers and timers from a
    /// [`glib::MainContext`] (QEMU's `aio_get_g_source`). Requires the `glib` feature (Unix).
    ///
    /// Attach it with [`glib::Source::attach`]; every iteration of that main context then does
    /// what one [`poll`](Self::poll) does: it waits for the context's descriptor, bounded by the
    /// earliest timer (rounded up to milliseconds, so a timer never fires early), and runs the
    /// scheduled BHs, the ready handlers and the expired timers. A BH scheduled or a
    /// [`notify`](Self::notify) made from another thread wakes the GLib loop.
    ///
    /// The source holds a handle on the context (QEMU's `aio_context_ref`), released when GLib
    /// finalizes the source: when it has been destroyed ([`glib::Source::destroy`] or
    /// [`glib::SourceId::remove`]) and the last reference to it is gone.
    ///
    /// The source may recurse (`g_source_set_can_recurse`): a callback may run a nested
    /// `MainContext::iteration`, which dispatches this context again, or call
    /// [`poll`](Self::poll) directly. Callbacks are never re-entered, as with nested polls.
    /// The same context may also still be polled directly, by the thread that iterates the
    /// main context, between iterations.
    ///
    /// Unlike QEMU, where the context *is* its source, each call makes a new source on the same
    /// context; attach only one at a time. A callback that panics while GLib dispatches aborts
    /// the process: a panic cannot unwind through GLib's C frames.
    ///
    /// ```
    /// # fn main() -> std::io::Result<()> {
    /// use std::sync::atomic::{AtomicUsize, Ordering};
    /// use std::sync::Arc;
    ///
    /// let ctx = aioctx::AioContext::new()?;
    /// let main_context = glib::MainContext::new();
    /// let source = ctx.g_source();
    /// source.attach(Some(&main_context));
    ///
    /// let ran = Arc::new(AtomicUsize::new(0));
    /// let r = ran.clone();
    /// ctx.bh_schedule_oneshot(move || {
    ///     r.fetch_add(1, Ordering::Relaxed);
    /// });
    /// assert!(main_context.iteration(true)); // runs the BH, does not block
    /// assert_eq!(ran.load(Ordering::Relaxed), 1);
    /// source.destroy();
    /// # Ok(()) }
    /// ```
    pub fn g_source(&self) -> glib::Source {
        let size = u32::try_from(mem::size_of::<AioSource>()).expect("AioSource fits in a u32");
        // SAFETY: `AIO_SOURCE_FUNCS` lives forever and GLib never writes through the pointer
        // (the C API merely predates `const`). `g_source_new` returns a zeroed allocation of
        // `size` bytes that starts with an initialized `GSource`, so it is a valid, aligned
        // `AioSource` once `ctx` is written; nothing reads `ctx` before that (the source is not
        // attached yet). The name is copied by GLib. The descriptor stays open as long as the
        // context does, which the source keeps alive until `finalize`. `from_glib_full` takes
        // over the one reference `g_source_new` returned.
        unsafe {
            let raw = ffi::g_source_new(ptr::addr_of!(AIO_SOURCE_FUNCS).cast_mut(), size);
            ptr::addr_of_mut!((*raw.cast::<AioSource>()).ctx)
                .write(ManuallyDrop::new(self.clone()));
            ffi::g_source_set_name(raw, c"aio-context".as_ptr());
            ffi::g_source_set_can_recurse(raw, ffi::GTRUE);
            ffi::g_source_add_unix_fd(raw, self.as_raw_fd(), ffi::G_IO_IN);
            from_glib_full(raw)
        }
    }
}

/// The context inside a source made by [`AioContext::g_source`].
///
/// # Safety
///
/// `source` must come from [`AioContext::g_source`] and not be finalized yet, which holds for
/// the `GSource` GLib passes to `prepare`, `check` and `dispatch`.
unsafe fn context<'a>(source: *mut ffi::GSource) -> &'a AioContext {
    // SAFETY: per the contract, `source` points to a live `AioSource` whose `ctx` was written
    // in `g_source` and is only dropped in `finalize`.
    unsafe { &(*source.cast::<AioSource>()).ctx }
}

/// What `prepare` tells GLib: whether the source is ready now, and how long GLib may block in
/// milliseconds (-1: no limit).
fn prepare(ctx: &AioContext) -> (bool, c_int) {
    // Announces the wait before computing the timeout, so that work scheduled from now on
    // wakes GLib's poll through the descriptor.
    let ns = ctx.prepare_timeout();
    (ns == 0, crate::sys::timeout_ns_to_ms(ns))
}

/// QEMU's `aio_ctx_prepare`.
unsafe extern "C" fn aio_source_prepare(
    source: *mut ffi::GSource,
    timeout: *mut c_int,
) -> ffi::gboolean {
    // SAFETY: GLib calls `prepare` on a live source of ours, with `timeout` pointing to a
    // writable `gint`.
    unsafe {
        let (ready, ms) = prepare(context(source));
        *timeout = ms;
        ready.into()
    }
}

/// QEMU's `aio_ctx_check`.
unsafe extern "C" fn aio_source_check(source: *mut ffi::GSource) -> ffi::gboolean {
    // SAFETY: GLib calls `check` on a live source of ours.
    let ctx = unsafe { context(source) };
    ctx.pending().into()
}

/// QEMU's `aio_ctx_dispatch`. The source has no GLib callback (none can be set through
/// [`glib::Source`]), so `callback` is ignored.
unsafe extern "C" fn aio_source_dispatch(
    source: *mut ffi::GSource,
    _callback: ffi::GSourceFunc,
    _user_data: ffi::gpointer,
) -> ffi::gboolean {
    // SAFETY: GLib calls `dispatch` on a live source of ours.
    let ctx = unsafe { context(source) };
    ctx.dispatch();
    ffi::G_SOURCE_CONTINUE
}

/// QEMU's `aio_ctx_finalize`, which here only drops the source's handle on the context; the
/// context itself goes when its last handle does.
unsafe extern "C" fn aio_source_finalize(source: *mut ffi::GSource) {
    // SAFETY: GLib calls `finalize` exactly once, after the last reference is gone and after
    // which no other callback runs, so `ctx` is initialized, unaliased and never used again.
    unsafe { ManuallyDrop::drop(&mut (*source.cast::<AioSource>()).ctx) }
}
