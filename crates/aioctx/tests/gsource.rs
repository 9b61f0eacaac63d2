//! The context as a GLib source (`AioContext::g_source`, feature `glib`), driven by real
//! `glib::MainContext::iteration` calls.
//!
//! The first group follows the behaviour QEMU's `/aio-gsource/*` cases check (flush; BH
//! schedule, schedule10, cancel, delete, callback-delete one and many, flush; event add-remove,
//! wait, wait/no-flush-cb, flush; timer schedule), written afresh. As in QEMU, a pure wake-up
//! counts as a dispatch in GSource mode, so `iteration` may return true once after a notify
//! with no callback run; "drain" below is QEMU's `while (g_main_context_iteration(NULL, false));`.
//! The second group covers what the issue adds: the timeout GLib is given, cross-thread wake-ups,
//! recursion, direct polls of an attached context, socket handlers and the source's lifetime.
//!
//! Every test runs on every back end this platform has. A watchdog source on each main context
//! ends a blocking iteration that would otherwise hang, and the test then fails.
#![cfg(unix)]

mod common;

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread;
use std::time::{Duration, Instant};

use aioctx::glib::{self, ControlFlow, MainContext, Priority};
use aioctx::{clock_get_ns, AioContext, Backend, Bh, ClockType, EventNotifier, Timer, SCALE_MS};
use aioctx::{SCALE_NS, SCALE_US};
use common::net::{read_available, tcp_pair, AsRaw};

/// How long one blocking iteration may wait before the watchdog ends it.
const WATCHDOG: Duration = Duration::from_secs(20);

/// How many non-blocking iterations a drain may take before the test calls it a livelock.
const DRAIN_LIMIT: usize = 100;

/// A context attached to a main context of its own, plus a watchdog.
struct Loop {
    ctx: AioContext,
    mc: MainContext,
    source: glib::Source,
    watchdog: glib::Source,
    stalled: Arc<AtomicBool>,
}

impl Loop {
    fn new(backend: Backend) -> Loop {
        let ctx = AioContext::builder().backend(backend).build().unwrap();
        let mc = MainContext::new();
        let source = ctx.g_source();
        source.attach(Some(&mc));
        let stalled = Arc::new(AtomicBool::new(false));
        let s = stalled.clone();
        let watchdog = glib::timeout_source_new(WATCHDOG, None, Priority::DEFAULT, move || {
            s.store(true, Ordering::SeqCst);
            ControlFlow::Continue
        });
        watchdog.attach(Some(&mc));
        let l = Loop {
            ctx,
            mc,
            source,
            watchdog,
            stalled,
        };
        l.drain();
        assert!(!l.iterate(false), "{backend:?}: a fresh context is idle");
        l
    }

    /// One `g_main_context_iteration`; fails the test if the watchdog had to end it.
    fn iterate(&self, may_block: bool) -> bool {
        let dispatched = self.mc.iteration(may_block);
        assert!(
            !self.stalled.load(Ordering::SeqCst),
            "a blocking iteration waited {WATCHDOG:?} for nothing"
        );
        dispatched
    }

    /// QEMU's `while (g_main_context_iteration(NULL, false));`. Returns how many iterations
    /// reported a dispatch.
    fn drain(&self) -> usize {
        for busy in 0..DRAIN_LIMIT {
            if !self.iterate(false) {
                return busy;
            }
        }
        panic!("the main context was still busy after {DRAIN_LIMIT} iterations");
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        self.source.destroy();
        self.watchdog.destroy();
    }
}

fn each_backend(test: impl Fn(Backend)) {
    for &backend in Backend::available() {
        test(backend);
    }
}

/// QEMU's `BHTestData`: a BH that counts its runs and reschedules itself until it has run `max`
/// times (`bh_test_cb`), then, if `delete` is set, deletes itself (`bh_delete_cb`).
struct BhTest {
    n: AtomicUsize,
    max: usize,
    delete: bool,
    bh: Mutex<Option<Bh>>,
}

impl BhTest {
    fn new(ctx: &AioContext, max: usize, delete: bool) -> Arc<BhTest> {
        let data = Arc::new(BhTest {
            n: AtomicUsize::new(0),
            max,
            delete,
            bh: Mutex::new(None),
        });
        // Weak: the BH's callback must not keep the BH (through `data`) alive.
        let weak: Weak<BhTest> = Arc::downgrade(&data);
        let bh = ctx.bh_new(move || {
            let Some(d) = weak.upgrade() else { return };
            let n = d.n.fetch_add(1, Ordering::SeqCst) + 1;
            let mut slot = d.bh.lock().unwrap();
            if n < d.max {
                slot.as_ref().expect("a running BH exists").schedule();
            } else if d.delete {
                let me = slot.take();
                drop(slot);
                drop(me); // QEMU's qemu_bh_delete from the BH's own callback
            }
        });
        *data.bh.lock().unwrap() = Some(bh);
        data
    }

    fn n(&self) -> usize {
        self.n.load(Ordering::SeqCst)
    }

    fn schedule(&self) {
        self.bh.lock().unwrap().as_ref().unwrap().schedule();
    }

    fn cancel(&self) {
        self.bh.lock().unwrap().as_ref().unwrap().cancel();
    }

    fn delete(&self) {
        let bh = self.bh.lock().unwrap().take();
        drop(bh);
    }

    fn deleted(&self) -> bool {
        self.bh.lock().unwrap().is_none()
    }
}

/// The rule QEMU's tests state for a BH that deleted itself: at most one more iteration may
/// report work (GLib may see the wake-up its scheduling left), and the next must be idle.
fn assert_settles(l: &Loop) {
    let _maybe_one_more = l.iterate(false);
    assert!(
        !l.iterate(false),
        "two iterations after the BH deleted itself"
    );
}

// --- /aio-gsource/flush ---------------------------------------------------------------------

#[test]
fn flush() {
    each_backend(|b| {
        let l = Loop::new(b);
        assert!(!l.iterate(false));
        l.ctx.notify();
        // A pure wake-up counts as a dispatch in GSource mode, once.
        assert!(l.iterate(false), "{b:?}: the notify is dispatched");
        assert_eq!(l.drain(), 0, "{b:?}");
        assert!(!l.iterate(false));
    });
}

// --- /aio-gsource/bh/* ----------------------------------------------------------------------

#[test]
fn bh_schedule() {
    each_backend(|b| {
        let l = Loop::new(b);
        let data = BhTest::new(&l.ctx, 0, false);
        data.schedule();
        assert_eq!(data.n(), 0);
        // Work is pending: a blocking iteration must not block.
        assert!(l.iterate(true), "{b:?}");
        assert_eq!(data.n(), 1);
        assert!(!l.iterate(false), "{b:?}");
        assert_eq!(data.n(), 1);
        data.delete();
    });
}

#[test]
fn bh_schedule10() {
    each_backend(|b| {
        let l = Loop::new(b);
        let data = BhTest::new(&l.ctx, 10, false);
        data.schedule();
        assert_eq!(data.n(), 0);
        assert!(l.iterate(false));
        assert_eq!(data.n(), 1);
        assert!(l.iterate(true));
        assert_eq!(data.n(), 2);
        // A BH that reschedules itself runs exactly once per iteration.
        for expected in 3..=10 {
            assert!(l.iterate(false), "{b:?}");
            assert_eq!(data.n(), expected, "{b:?}");
        }
        assert_eq!(l.drain(), 0, "{b:?}: nothing left after the tenth run");
        assert_eq!(data.n(), 10);
        assert!(!l.iterate(false));
        data.delete();
    });
}

#[test]
fn bh_cancel() {
    each_backend(|b| {
        let l = Loop::new(b);
        let data = BhTest::new(&l.ctx, 0, false);
        data.schedule();
        data.cancel();
        assert_eq!(data.n(), 0);
        // The schedule's wake-up may still be seen once; the callback never runs.
        assert!(l.drain() <= 1, "{b:?}");
        assert_eq!(data.n(), 0);
        assert!(!l.iterate(false));
        data.delete();
    });
}

#[test]
fn bh_delete() {
    each_backend(|b| {
        let l = Loop::new(b);
        let data = BhTest::new(&l.ctx, 0, false);
        data.schedule();
        data.delete();
        assert_eq!(data.n(), 0);
        assert!(l.drain() <= 1, "{b:?}");
        assert_eq!(data.n(), 0);
        assert!(!l.iterate(false));
    });
}

#[test]
fn bh_callback_delete_one() {
    each_backend(|b| {
        let l = Loop::new(b);
        let data = BhTest::new(&l.ctx, 1, true);
        data.schedule();
        assert_eq!(data.n(), 0);
        assert!(l.iterate(true), "{b:?}");
        assert_eq!(data.n(), 1);
        assert!(data.deleted());
        assert_settles(&l);
        assert_eq!(data.n(), 1);
    });
}

#[test]
fn bh_callback_delete_many() {
    each_backend(|b| {
        let l = Loop::new(b);
        let all: Vec<_> = [1, 3, 2, 4]
            .into_iter()
            .map(|max| BhTest::new(&l.ctx, max, true))
            .collect();
        for d in &all {
            d.schedule();
        }
        assert!(all.iter().all(|d| d.n() == 0));
        // Every BH scheduled before the iteration runs in it.
        assert!(l.iterate(false), "{b:?}");
        assert!(all.iter().all(|d| d.n() == 1), "{b:?}");
        assert!(all[0].deleted());
        // Then one run each per iteration: the one with max 4 needs three more.
        for round in 2..=4 {
            assert!(l.iterate(false), "{b:?}: round {round}");
            for d in &all {
                assert_eq!(d.n(), round.min(d.max), "{b:?}: round {round}");
            }
        }
        assert!(all.iter().all(|d| d.n() == d.max && d.deleted()));
        assert_settles(&l);
    });
}

#[test]
fn bh_flush() {
    each_backend(|b| {
        let l = Loop::new(b);
        let data = BhTest::new(&l.ctx, 0, false);
        data.schedule();
        assert_eq!(data.n(), 0);
        assert_eq!(l.drain(), 1, "{b:?}: one iteration runs the BH, then idle");
        assert_eq!(data.n(), 1);
        assert!(!l.iterate(false));
        data.delete();
    });
}

// --- /aio-gsource/event/* -------------------------------------------------------------------

/// QEMU's `EventNotifierTestData` and `event_ready_cb`: counts runs, counts down `active`, and
/// sets the notifier again while `active` is positive if `auto_set`.
struct EventTest {
    e: EventNotifier,
    n: AtomicUsize,
    active: AtomicUsize,
    auto_set: bool,
    /// Runs that found the notifier clear: level-triggered handlers must never see one.
    spurious: AtomicUsize,
}

impl EventTest {
    fn new(active: usize, auto_set: bool) -> Arc<EventTest> {
        Arc::new(EventTest {
            e: EventNotifier::new().unwrap(),
            n: AtomicUsize::new(0),
            active: AtomicUsize::new(active),
            auto_set,
            spurious: AtomicUsize::new(0),
        })
    }

    fn register(self: &Arc<Self>, ctx: &AioContext) {
        let d = self.clone();
        let handler = move || {
            if !d.e.test_and_clear() {
                d.spurious.fetch_add(1, Ordering::SeqCst);
            }
            d.n.fetch_add(1, Ordering::SeqCst);
            let active = d.active.load(Ordering::SeqCst);
            if active > 0 {
                d.active.store(active - 1, Ordering::SeqCst);
                if d.auto_set && active > 1 {
                    d.e.set().unwrap();
                }
            }
        };
        ctx.set_event_notifier(&self.e, Some(Box::new(handler)))
            .unwrap();
    }

    fn unregister(&self, ctx: &AioContext) {
        ctx.set_event_notifier(&self.e, None).unwrap();
    }

    fn n(&self) -> usize {
        self.n.load(Ordering::SeqCst)
    }

    fn active(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    fn assert_no_spurious_runs(&self) {
        assert_eq!(
            self.spurious.load(Ordering::SeqCst),
            0,
            "spurious handler runs"
        );
    }
}

#[test]
fn event_add_remove() {
    each_backend(|b| {
        let l = Loop::new(b);
        let data = EventTest::new(0, false);
        data.register(&l.ctx);
        // Registration notifies; that wake-up is all there is.
        assert!(l.drain() <= 1, "{b:?}");
        assert_eq!(data.n(), 0);
        data.unregister(&l.ctx);
        assert!(l.drain() <= 1, "{b:?}");
        assert_eq!(data.n(), 0);
        assert!(!l.iterate(false));
    });
}

#[test]
fn event_wait() {
    each_backend(|b| {
        let l = Loop::new(b);
        let data = EventTest::new(1, false);
        data.register(&l.ctx);
        l.drain();
        assert_eq!((data.n(), data.active()), (0, 1));

        data.e.set().unwrap();
        assert!(l.iterate(false), "{b:?}");
        assert_eq!((data.n(), data.active()), (1, 0));
        assert_eq!(l.drain(), 0, "{b:?}");
        assert_eq!((data.n(), data.active()), (1, 0));

        data.unregister(&l.ctx);
        l.drain();
        assert_eq!(data.n(), 1);
        data.assert_no_spurious_runs();
    });
}

#[test]
fn event_wait_no_flush_cb() {
    each_backend(|b| {
        let l = Loop::new(b);
        let data = EventTest::new(0, false);
        data.register(&l.ctx);
        l.drain();
        assert_eq!(data.n(), 0);

        // A ready notifier must not let a blocking iteration block.
        data.e.set().unwrap();
        assert!(l.iterate(true), "{b:?}");
        assert_eq!(data.n(), 1);
        data.n.store(0, Ordering::SeqCst);

        let dummy = EventTest::new(1, false);
        dummy.register(&l.ctx);

        for round in 1..=2 {
            data.e.set().unwrap();
            assert!(l.iterate(false), "{b:?}: round {round}");
            assert_eq!(data.n(), round);
            assert!(!l.iterate(false), "{b:?}: round {round}");
            assert_eq!(data.n(), round);
        }

        dummy.e.set().unwrap();
        l.drain();
        assert_eq!(data.n(), 2);
        assert_eq!((dummy.n(), dummy.active()), (1, 0));

        dummy.unregister(&l.ctx);
        data.unregister(&l.ctx);
        l.drain();
        assert_eq!(data.n(), 2);
        data.assert_no_spurious_runs();
        dummy.assert_no_spurious_runs();
    });
}

#[test]
fn event_flush() {
    each_backend(|b| {
        let l = Loop::new(b);
        let data = EventTest::new(10, true);
        data.register(&l.ctx);
        l.drain();
        assert_eq!((data.n(), data.active()), (0, 10));

        data.e.set().unwrap();
        assert!(l.iterate(false), "{b:?}");
        assert_eq!((data.n(), data.active()), (1, 9));
        // The handler set the notifier again: the next iteration runs it again.
        assert!(l.iterate(false), "{b:?}");
        assert_eq!((data.n(), data.active()), (2, 8));

        assert_eq!(l.drain(), 8, "{b:?}: one run per iteration");
        assert_eq!((data.n(), data.active()), (10, 0));
        assert!(!l.iterate(false));

        data.unregister(&l.ctx);
        l.drain();
        assert_eq!(data.n(), 10);
        data.assert_no_spurious_runs();
    });
}

// --- /aio-gsource/timer/schedule ------------------------------------------------------------

/// QEMU's `TimerTestData` and `timer_test_cb`: counts runs and rearms itself `ns` later until it
/// has run `max` times.
struct TimerTest {
    n: AtomicUsize,
    max: usize,
    ns: i64,
    timer: Mutex<Option<Timer>>,
}

impl TimerTest {
    fn new(ctx: &AioContext, max: usize, ns: i64) -> Arc<TimerTest> {
        let data = Arc::new(TimerTest {
            n: AtomicUsize::new(0),
            max,
            ns,
            timer: Mutex::new(None),
        });
        let weak = Arc::downgrade(&data);
        let timer = ctx.timer_new(ClockType::Realtime, SCALE_NS, move || {
            let Some(d) = weak.upgrade() else { return };
            if d.n.fetch_add(1, Ordering::SeqCst) + 1 < d.max {
                let slot = d.timer.lock().unwrap();
                let timer = slot.as_ref().expect("a running timer exists");
                timer.modify(clock_get_ns(ClockType::Realtime) + d.ns);
            }
        });
        *data.timer.lock().unwrap() = Some(timer);
        data
    }

    fn n(&self) -> usize {
        self.n.load(Ordering::SeqCst)
    }
}

#[test]
fn timer_schedule() {
    each_backend(|b| {
        let l = Loop::new(b);
        let data = TimerTest::new(&l.ctx, 2, 750 * SCALE_MS);
        let mut expiry = clock_get_ns(ClockType::Realtime) + data.ns;
        data.timer.lock().unwrap().as_ref().unwrap().modify(expiry);
        assert_eq!(data.n(), 0);

        // Nobody iterates while the deadline passes (this sleep is the point of the test, not
        // a synchronisation): the timer only runs when the loop does.
        thread::sleep(Duration::from_secs(1));
        assert_eq!(data.n(), 0);

        // An expired timer must not let a blocking iteration block.
        assert!(l.iterate(true), "{b:?}");
        assert_eq!(data.n(), 1);
        expiry += data.ns;

        // At most one pure wake-up (QEMU's rearm notifies; aioctx skips that on the loop's own
        // thread), then GLib blocks until the deadline (rounded up to ms, so never before it):
        // no busy loop and no early wake-up. (A source that may not
        // recurse would fail here: GLib blocks it while it dispatches, and unblocking it wakes
        // the main context once more.)
        let mut iterations = Vec::new();
        while data.n() < 2 {
            let start = Instant::now();
            let dispatched = l.iterate(true);
            iterations.push((dispatched, start.elapsed()));
        }
        assert_eq!(data.n(), 2);
        assert!(
            iterations.len() <= 2,
            "{b:?}: iterations (dispatched, duration) for one timer: {iterations:?}"
        );
        assert!(
            clock_get_ns(ClockType::Realtime) >= expiry,
            "{b:?}: the timer fired before its deadline"
        );
        assert_eq!(l.drain(), 0, "{b:?}: max reached, nothing rearmed");
        data.timer.lock().unwrap().take();
    });
}

// --- Beyond QEMU's cases ----------------------------------------------------------------------

/// Runs one GLib iteration by hand (`g_main_context_prepare`, `query`, `check`, `dispatch`,
/// without polling) and returns what `prepare` reported: whether a source was ready, and the
/// timeout GLib would have blocked for, in ms.
fn prepare_and_query(mc: &MainContext) -> (bool, i32) {
    use glib::ffi;
    use glib::translate::ToGlibPtr;

    let _owner = mc.acquire().expect("this thread owns the main context");
    let raw: *mut ffi::GMainContext = mc.to_glib_none().0;
    let mut fds = [ffi::GPollFD {
        fd: -1,
        events: 0,
        revents: 0,
    }; 8];
    let (ready, priority) = mc.prepare();
    let mut timeout = 0;
    // SAFETY: `raw` is a live main context this thread owns (acquired above), in the state
    // `g_main_context_prepare` left it; `timeout` is writable and `fds` has room for `fds.len()`
    // entries, the count passed.
    let n_fds = unsafe {
        ffi::g_main_context_query(
            raw,
            priority,
            &mut timeout,
            fds.as_mut_ptr(),
            fds.len() as i32,
        )
    };
    assert!(
        n_fds as usize <= fds.len(),
        "more descriptors than expected"
    );
    // SAFETY: as above; `check` reads the `n_fds` entries `query` filled in (all with revents 0:
    // we did not poll), then `dispatch` finishes the iteration that `prepare` began.
    unsafe {
        ffi::g_main_context_check(raw, priority, fds.as_mut_ptr(), n_fds);
        ffi::g_main_context_dispatch(raw);
    }
    (ready, timeout)
}

#[test]
fn prepare_reports_the_context_timeout_in_ms_rounded_up() {
    each_backend(|b| {
        // No `Loop`: its watchdog would bound GLib's timeout, and nothing here blocks.
        let ctx = AioContext::builder().backend(b).build().unwrap();
        let mc = MainContext::new();
        let source = ctx.g_source();
        source.attach(Some(&mc));
        let drain = || (0..DRAIN_LIMIT).take_while(|_| mc.iteration(false)).count();
        drain();
        // Nothing to do: GLib may block forever.
        assert_eq!(prepare_and_query(&mc), (false, -1), "{b:?}");

        // A timer 2.5 ms away: GLib is told 3 ms (or less, as the deadline nears), never a
        // timeout that would end before the deadline.
        let timer = ctx.timer_new(ClockType::Realtime, SCALE_NS, || {});
        let deadline = clock_get_ns(ClockType::Realtime) + 2 * SCALE_MS + 500 * SCALE_US;
        timer.modify(deadline);
        drain(); // the notify of the new deadline
        let before = clock_get_ns(ClockType::Realtime);
        let (ready, ms) = prepare_and_query(&mc);
        if before < deadline - SCALE_MS {
            assert!(!ready, "{b:?}");
            assert!((1..=3).contains(&ms), "{b:?}: {ms} ms");
            let left = deadline - clock_get_ns(ClockType::Realtime);
            assert!(
                i64::from(ms) * SCALE_MS >= left,
                "{b:?}: {ms} ms would wake GLib {left} ns before the deadline"
            );
        }
        timer.del();
        drain();

        // A scheduled BH: ready at once, timeout 0.
        let ran = Arc::new(AtomicUsize::new(0));
        let r = ran.clone();
        ctx.bh_schedule_oneshot(move || {
            r.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(prepare_and_query(&mc), (true, 0), "{b:?}");
        assert_eq!(ran.load(Ordering::SeqCst), 1, "{b:?}: dispatched by hand");
        assert!(!mc.iteration(false));
        source.destroy();
    });
}

#[test]
fn bh_from_another_thread_wakes_a_blocking_iteration() {
    each_backend(|b| {
        let l = Loop::new(b);
        for round in 1..=50 {
            let data = BhTest::new(&l.ctx, 0, false);
            let d = data.clone();
            let scheduler = thread::spawn(move || d.schedule());
            // Whether the schedule lands before `prepare` or during GLib's poll, one blocking
            // iteration sees it and runs the BH.
            assert!(l.iterate(true), "{b:?}: round {round}");
            assert_eq!(data.n(), 1, "{b:?}: round {round}");
            scheduler.join().unwrap();
            // The schedule publishes the BH before it notifies, so the BH may have run before
            // the notify landed: that wake-up may still be dispatched once, then idle.
            assert!(l.drain() <= 1, "{b:?}: round {round}");
            data.delete();
        }
    });
}

#[test]
fn notify_from_another_thread_wakes_a_blocking_iteration() {
    each_backend(|b| {
        let l = Loop::new(b);
        for round in 1..=50 {
            let ctx = l.ctx.clone();
            let notifier = thread::spawn(move || ctx.notify());
            // A pure wake-up is a dispatch in GSource mode.
            assert!(l.iterate(true), "{b:?}: round {round}");
            notifier.join().unwrap();
            // The notify may have landed after prepare and before GLib's poll saw it.
            assert!(l.drain() <= 1, "{b:?}: round {round}");
        }
    });
}

#[test]
fn the_source_recurses_into_nested_iterations() {
    each_backend(|b| {
        let l = Loop::new(b);
        assert!(l.source.can_recurse());
        let inner_ran = Arc::new(AtomicUsize::new(0));
        let seen_inside = Arc::new(AtomicUsize::new(usize::MAX));
        let nested_dispatched = Arc::new(AtomicBool::new(false));

        let ctx = l.ctx.downgrade();
        let mc = l.mc.clone();
        let (ir, si, nd) = (
            inner_ran.clone(),
            seen_inside.clone(),
            nested_dispatched.clone(),
        );
        l.ctx.bh_schedule_oneshot(move || {
            let ctx = ctx.upgrade().unwrap();
            let ir2 = ir.clone();
            ctx.bh_schedule_oneshot(move || {
                ir2.fetch_add(1, Ordering::SeqCst);
            });
            // A nested GLib loop inside a callback dispatches this context again.
            nd.store(mc.iteration(false), Ordering::SeqCst);
            si.store(ir.load(Ordering::SeqCst), Ordering::SeqCst);
        });
        assert!(l.iterate(false), "{b:?}");
        assert!(nested_dispatched.load(Ordering::SeqCst), "{b:?}");
        assert_eq!(seen_inside.load(Ordering::SeqCst), 1, "{b:?}: ran nested");
        assert_eq!(inner_ran.load(Ordering::SeqCst), 1, "{b:?}: and only once");
        assert!(l.drain() <= 1, "{b:?}");
    });
}

#[test]
fn a_callback_dispatched_by_glib_may_poll_the_context() {
    each_backend(|b| {
        let l = Loop::new(b);
        let inner_ran = Arc::new(AtomicUsize::new(0));
        let nested = Arc::new(AtomicBool::new(false));
        let ctx = l.ctx.downgrade();
        let (ir, n) = (inner_ran.clone(), nested.clone());
        l.ctx.bh_schedule_oneshot(move || {
            let ctx = ctx.upgrade().unwrap();
            let ir2 = ir.clone();
            ctx.bh_schedule_oneshot(move || {
                ir2.fetch_add(1, Ordering::SeqCst);
            });
            // QEMU's aio_poll inside a main-loop callback (a synchronous drain, say).
            n.store(ctx.poll(true), Ordering::SeqCst);
        });
        assert!(l.iterate(false), "{b:?}");
        assert!(
            nested.load(Ordering::SeqCst),
            "{b:?}: the nested poll ran the BH"
        );
        assert_eq!(inner_ran.load(Ordering::SeqCst), 1);
        assert!(l.drain() <= 1, "{b:?}");
    });
}

#[test]
fn an_attached_context_can_still_be_polled_directly() {
    each_backend(|b| {
        let l = Loop::new(b);
        let data = BhTest::new(&l.ctx, 0, false);

        // poll() runs the BH; GLib then has nothing left.
        data.schedule();
        assert!(l.ctx.poll(true), "{b:?}");
        assert_eq!(data.n(), 1);
        assert!(!l.iterate(false), "{b:?}");

        // And the other way round.
        data.schedule();
        assert!(l.iterate(true), "{b:?}");
        assert_eq!(data.n(), 2);
        assert!(!l.ctx.poll(false), "{b:?}");

        // A prepare that GLib never finished (no check) does not confuse a direct poll: a
        // timer still fires through a blocking poll, not before its deadline.
        let _ = l.mc.prepare();
        let fired = Arc::new(AtomicUsize::new(0));
        let f = fired.clone();
        let timer = l.ctx.timer_new(ClockType::Realtime, SCALE_NS, move || {
            f.fetch_add(1, Ordering::SeqCst);
        });
        let deadline = clock_get_ns(ClockType::Realtime) + 20 * SCALE_MS;
        timer.modify(deadline);
        while fired.load(Ordering::SeqCst) == 0 {
            l.ctx.poll(true);
        }
        assert!(clock_get_ns(ClockType::Realtime) >= deadline, "{b:?}");
        l.drain();
        assert!(!l.iterate(false));
        assert!(!l.ctx.poll(false));
        data.delete();
    });
}

#[test]
fn socket_handler_runs_from_glib() {
    each_backend(|b| {
        let l = Loop::new(b);
        let (mut client, server) = tcp_pair();
        let server = Arc::new(Mutex::new(server));
        let received = Arc::new(Mutex::new(Vec::new()));
        let (s, r) = (server.clone(), received.clone());
        l.ctx
            .set_fd_handler(
                server.lock().unwrap().raw(),
                Some(Box::new(move || {
                    let (got, _eof) = read_available(&mut s.lock().unwrap());
                    r.lock().unwrap().extend_from_slice(&got);
                })),
                None,
            )
            .unwrap();
        l.drain();

        let writer = thread::spawn(move || {
            for chunk in [&b"hello "[..], b"from ", b"glib"] {
                client.write_all(chunk).unwrap();
            }
            client
        });
        let start = Instant::now();
        while received.lock().unwrap().len() < b"hello from glib".len() {
            assert!(start.elapsed() < WATCHDOG, "{b:?}: data never arrived");
            l.iterate(true);
        }
        assert_eq!(&received.lock().unwrap()[..], b"hello from glib");
        let client = writer.join().unwrap();
        l.ctx
            .set_fd_handler(server.lock().unwrap().raw(), None, None)
            .unwrap();
        l.drain();
        assert!(!l.iterate(false));
        drop(client);
    });
}

#[test]
fn the_source_keeps_the_context_alive_until_finalized() {
    each_backend(|b| {
        let ctx = AioContext::builder().backend(b).build().unwrap();
        let weak = ctx.downgrade();
        let mc = MainContext::new();
        let source = ctx.g_source();
        source.attach(Some(&mc));
        drop(ctx);

        // Only the source holds the context now, and GLib still drives it.
        let ran = Arc::new(AtomicUsize::new(0));
        let r = ran.clone();
        weak.upgrade()
            .expect("the source holds the context")
            .bh_schedule_oneshot(move || {
                r.fetch_add(1, Ordering::SeqCst);
            });
        assert!(mc.iteration(false));
        assert_eq!(ran.load(Ordering::SeqCst), 1);

        // Destroying detaches it; the last reference's drop finalizes it.
        source.destroy();
        assert!(
            weak.upgrade().is_some(),
            "our handle still holds the source"
        );
        drop(source);
        assert!(
            weak.upgrade().is_none(),
            "{b:?}: finalize released the context"
        );

        // Dropping a main context with the source attached releases it too.
        let ctx = AioContext::builder().backend(b).build().unwrap();
        let weak = ctx.downgrade();
        let mc = MainContext::new();
        ctx.g_source().attach(Some(&mc));
        drop(ctx);
        assert!(weak.upgrade().is_some());
        drop(mc);
        assert!(
            weak.upgrade().is_none(),
            "{b:?}: the main context released it"
        );
    });
}
