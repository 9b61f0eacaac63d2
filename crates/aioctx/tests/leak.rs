//! Dropping the last handle of a context frees everything still registered (QEMU's
//! aio_ctx_finalize): handlers, armed timers, scheduled BHs (normal, idle, one-shot, and those a
//! panic left half-run), including a BH whose callback owns its own Bh and a timer whose callback
//! owns its own Timer. No callback runs after the drop, and handles that outlive the context are
//! harmless.
//!
//! A counting global allocator checks that the heap returns to its baseline, and the process's
//! descriptor count (/proc/self/fd; on Windows its kernel handle count) that none leaks. This
//! binary holds a single #[test], and the allocator counts only the test's own thread (the
//! scenario spawns no thread), so the watchdog's and the harness's threads, which start and
//! allocate at unpredictable times, cannot disturb the count.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicIsize, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use aioctx::{clock_get_ns, AioContext, Bh, ClockType, EventNotifier, Timer, SCALE_MS, SCALE_NS};
use common::net::{tcp_pair, AsRaw};
use common::{handler, self_bh, self_timer, watchdog};

struct Counting;

static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);
static LIVE_BLOCKS: AtomicIsize = AtomicIsize::new(0);

thread_local! {
    /// Whether this thread's allocations are counted (a const, destructor-free thread-local, so
    /// the allocator may read it).
    static TRACKED: Cell<bool> = const { Cell::new(false) };
}

fn tracked() -> bool {
    TRACKED.try_with(Cell::get).unwrap_or(false)
}

// SAFETY: defers to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's layout.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() && tracked() {
            LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
            LIVE_BLOCKS.fetch_add(1, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if tracked() {
            LIVE_BYTES.fetch_sub(layout.size() as isize, Ordering::Relaxed);
            LIVE_BLOCKS.fetch_sub(1, Ordering::Relaxed);
        }
        // SAFETY: forwarded with the caller's pointer and layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded with the caller's arguments.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() && tracked() {
            LIVE_BYTES.fetch_add(
                new_size as isize - layout.size() as isize,
                Ordering::Relaxed,
            );
        }
        p
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn live() -> (isize, isize) {
    (
        LIVE_BYTES.load(Ordering::SeqCst),
        LIVE_BLOCKS.load(Ordering::SeqCst),
    )
}

/// Counts how many of the captured guards were dropped, and whether any callback ran after the
/// context was gone.
#[derive(Clone)]
struct Probe {
    dropped: Arc<AtomicUsize>,
    created: Arc<AtomicUsize>,
    ctx_gone: Arc<AtomicBool>,
    ran_after_drop: Arc<AtomicUsize>,
    runs: Arc<AtomicUsize>,
}

struct Guard(Arc<AtomicUsize>);

impl Drop for Guard {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

impl Probe {
    fn new() -> Probe {
        Probe {
            dropped: Arc::new(AtomicUsize::new(0)),
            created: Arc::new(AtomicUsize::new(0)),
            ctx_gone: Arc::new(AtomicBool::new(false)),
            ran_after_drop: Arc::new(AtomicUsize::new(0)),
            runs: Arc::new(AtomicUsize::new(0)),
        }
    }
    /// Something for a callback to own: its drop is counted.
    fn guard(&self) -> Guard {
        self.created.fetch_add(1, Ordering::SeqCst);
        Guard(self.dropped.clone())
    }
    /// Call at the start of every callback.
    fn ran(&self) {
        self.runs.fetch_add(1, Ordering::SeqCst);
        if self.ctx_gone.load(Ordering::SeqCst) {
            self.ran_after_drop.fetch_add(1, Ordering::SeqCst);
        }
    }
    fn cb(&self) -> impl FnMut() + Send + 'static {
        let (p, g) = (self.clone(), self.guard());
        move || {
            let _ = &g;
            p.ran();
        }
    }
}

/// Handles kept past the context's drop.
struct Survivors {
    _bh: Bh,
    timer: Timer,
    self_bh: common::BhSlot,
    _self_timer: common::TimerSlot,
}

/// Builds a context full of registered work, runs a little of it, and drops the context.
fn scenario(probe: &Probe) -> Survivors {
    common::quiet_intentional_panics();
    let ctx = AioContext::new().unwrap();
    let e = Arc::new(EventNotifier::new().unwrap());
    let (r, w) = tcp_pair();
    let (sa, _sb) = tcp_pair();

    // Handlers: a ready notifier, a socket pair's ends with a read and a write handler, a socket
    // with both.
    let (p, g, e2) = (probe.clone(), probe.guard(), e.clone());
    ctx.set_event_notifier(
        &e,
        handler(move || {
            let _ = &g;
            p.ran();
            e2.test_and_clear();
        }),
    )
    .unwrap();
    ctx.set_fd_handler(r.raw(), handler(probe.cb()), None)
        .unwrap();
    ctx.set_fd_handler(w.raw(), None, handler(probe.cb()))
        .unwrap();
    ctx.set_fd_handler(sa.raw(), handler(probe.cb()), handler(probe.cb()))
        .unwrap();

    // Timers: far in the future, expired, on the (stopped) virtual clock, and one owning itself.
    let far = ctx.timer_new(ClockType::Realtime, SCALE_MS, probe.cb());
    far.modify(clock_get_ns(ClockType::Realtime) / SCALE_MS + 3_600_000);
    let expired = ctx.timer_new(ClockType::Realtime, SCALE_NS, probe.cb());
    expired.modify(0);
    let virt = ctx.timer_new(ClockType::Virtual, SCALE_NS, probe.cb());
    virt.modify(clock_get_ns(ClockType::Virtual) + 1);
    let (p, g) = (probe.clone(), probe.guard());
    let self_timer = self_timer(&ctx, ClockType::Realtime, SCALE_MS, move |slot| {
        let _ = &g;
        p.ran();
        slot.lock().unwrap().as_ref().unwrap().modify(0);
    });
    self_timer
        .lock()
        .unwrap()
        .as_ref()
        .unwrap()
        .modify(clock_get_ns(ClockType::Realtime) / SCALE_MS + 3_600_000);
    // A timer whose callback owns its handle directly (no slot kept outside): a pure cycle.
    {
        let cell: Arc<Mutex<Option<Timer>>> = Arc::new(Mutex::new(None));
        let (p, g, c) = (probe.clone(), probe.guard(), cell.clone());
        let t = ctx.timer_new(ClockType::Realtime, SCALE_MS, move || {
            let _ = (&g, &c);
            p.ran();
        });
        t.modify(clock_get_ns(ClockType::Realtime) / SCALE_MS + 3_600_000);
        *cell.lock().unwrap() = Some(t);
    }

    // BHs: scheduled, idle, one-shot, one owning itself (scheduled), one pure cycle.
    let bh = ctx.bh_new(probe.cb());
    bh.schedule();
    let idle = ctx.bh_new(probe.cb());
    idle.schedule_idle();
    ctx.bh_schedule_oneshot(probe.cb());
    let (p, g) = (probe.clone(), probe.guard());
    let self_bh = self_bh(&ctx, move |slot| {
        let _ = &g;
        p.ran();
        common::schedule_slot(slot);
    });
    common::schedule_slot(&self_bh);
    {
        let cell: Arc<Mutex<Option<Bh>>> = Arc::new(Mutex::new(None));
        let (p, g, c) = (probe.clone(), probe.guard(), cell.clone());
        let b = ctx.bh_new(move || {
            let _ = (&g, &c);
            p.ran();
        });
        b.schedule();
        *cell.lock().unwrap() = Some(b);
    }
    // A callback capturing a weak handle to its own context.
    let (p, g, wctx) = (probe.clone(), probe.guard(), ctx.downgrade());
    let weak_user = ctx.bh_new(move || {
        let _ = &g;
        p.ran();
        assert!(wctx.upgrade().is_some());
    });
    weak_user.schedule();

    // A panic halfway through the BH run leaves BHs taken off the queue but not yet run.
    let boom = ctx.bh_new(|| panic!("intentional panic (leak scenario)"));
    let late: Vec<Bh> = (0..3).map(|_| ctx.bh_new(probe.cb())).collect();
    boom.schedule();
    for b in &late {
        b.schedule();
    }
    e.set().unwrap();
    assert!(catch_unwind(AssertUnwindSafe(|| ctx.poll(false))).is_err());
    // Re-arm what ran, so that everything is pending again at the drop.
    for b in late.iter().chain([&bh, &weak_user]) {
        b.schedule();
    }
    expired.modify(0);
    e.set().unwrap();
    ctx.bh_schedule_oneshot(probe.cb());

    // Drop the context with all of it registered; keep some handles past it.
    let runs_before = probe.runs.load(Ordering::SeqCst);
    drop(ctx);
    probe.ctx_gone.store(true, Ordering::SeqCst);
    assert_eq!(
        probe.runs.load(Ordering::SeqCst),
        runs_before,
        "callbacks ran during the drop"
    );

    // Handles that outlive the context: using them is harmless and runs nothing.
    bh.schedule();
    bh.schedule_idle();
    bh.cancel();
    far.modify(0);
    assert!(
        !far.pending(),
        "arming a timer of a dropped context does nothing"
    );
    far.del();
    common::schedule_slot(&self_bh);
    e.set().unwrap();

    drop((idle, expired, virt, late, boom, weak_user, e, r, w, sa));
    Survivors {
        _bh: bh,
        timer: far,
        self_bh,
        _self_timer: self_timer,
    }
}

#[test]
fn dropping_the_context_frees_everything() {
    let _w = watchdog("dropping_the_context_frees_everything");
    TRACKED.with(|t| t.set(true));
    // Warm up lazily initialised statics (clocks, the virtual-clock watcher list, thread ids,
    // panic machinery) so they do not count as leaks.
    for _ in 0..2 {
        let probe = Probe::new();
        drop(scenario(&probe));
    }

    let fds_before = common::open_descriptors();
    let (bytes_before, blocks_before) = live();
    for _ in 0..3 {
        let probe = Probe::new();
        let survivors = scenario(&probe);
        // Every callback was released at the drop, even those whose handles survive it and those
        // that own their own handle.
        assert_eq!(
            probe.dropped.load(Ordering::SeqCst),
            probe.created.load(Ordering::SeqCst),
            "callbacks still alive after the context was dropped"
        );
        assert_eq!(probe.ran_after_drop.load(Ordering::SeqCst), 0);
        assert!(survivors.self_bh.lock().unwrap().is_some());
        assert!(!survivors.timer.pending());
        drop(survivors);
        assert_eq!(probe.ran_after_drop.load(Ordering::SeqCst), 0);
    }
    let (bytes_after, blocks_after) = live();
    assert_eq!(common::open_descriptors(), fds_before, "descriptors leaked");
    assert_eq!(
        (bytes_after - bytes_before, blocks_after - blocks_before),
        (0, 0),
        "heap did not return to its baseline (bytes, blocks)"
    );
}
