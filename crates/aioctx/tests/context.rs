//! The context: poll's return value and blocking rules, notify (QEMU's /aio/notify), the
//! prepare/pending/dispatch protocol for outer loops, nested loops, panicking callbacks, weak
//! handles, back-end selection, and polls from several threads.

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};

use aioctx::{clock_get_ns, AioContext, Backend, Bh, ClockType, EventNotifier, SCALE_MS, SCALE_NS};
use common::net::{tcp_pair, AsRaw};
use common::{
    ctx, drain, handler, poll_until, quiet_intentional_panics, schedule_slot, self_bh, watchdog,
    Counter,
};

/// /aio/notify: a notify wakes the next blocking poll, which returns false; it is consumed.
#[test]
fn notify_wakes_next_poll_and_is_not_progress() {
    let _w = watchdog("notify_wakes_next_poll_and_is_not_progress");
    let ctx = ctx();
    assert!(!ctx.poll(false));
    ctx.notify();
    assert!(
        !ctx.poll(true),
        "a notify is not progress (and must not block)"
    );
    assert!(!ctx.poll(false));

    // Many notifies before a poll are one wake-up.
    for _ in 0..10_000 {
        ctx.notify();
    }
    assert!(!ctx.poll(true));
    // Nothing stale is left: arming the earliest timer notifies (a wake-up, no progress), then
    // the next blocking poll waits for the timer and runs it. A thread descheduled past the
    // deadline before its first poll finds the timer expired instead and arms it again; a
    // missing notify would fail every attempt the same way.
    let n = Counter::new();
    let t = ctx.timer_new(ClockType::Realtime, SCALE_NS, n.cb());
    let mut late = 0;
    let deadline = loop {
        let deadline = clock_get_ns(ClockType::Realtime) + 2 * SCALE_MS;
        t.modify(deadline);
        if !ctx.poll(true) {
            break deadline;
        }
        assert!(clock_get_ns(ClockType::Realtime) >= deadline, "ran early");
        late += 1;
        assert!(
            late < 10,
            "arming the earliest timer did not notify (or this thread was descheduled for \
             2 ms before each of {late} polls)"
        );
    };
    assert!(ctx.poll(true), "a stale wake-up was left behind");
    assert_eq!(n.get(), late + 1);
    assert!(clock_get_ns(ClockType::Realtime) >= deadline);
}

/// A notify from another thread that lands before the poll starts still makes that poll
/// return promptly, with false.
#[test]
fn notify_before_poll_from_other_thread() {
    let _w = watchdog("notify_before_poll_from_other_thread");
    let ctx = ctx();
    let (r, _w_end) = tcp_pair();
    for with_fd in [false, true] {
        if with_fd {
            ctx.set_fd_handler(r.raw(), handler(|| {}), None).unwrap();
            drain(&ctx);
        }
        for _ in 0..100 {
            let c = ctx.clone();
            std::thread::spawn(move || c.notify()).join().unwrap();
            assert!(!ctx.poll(true));
        }
    }
    ctx.set_fd_handler(r.raw(), None, None).unwrap();
}

/// notify() from another thread wakes a blocked poll, every time.
#[test]
fn notify_from_other_thread_wakes_blocked_poll() {
    let _w = watchdog("notify_from_other_thread_wakes_blocked_poll");
    let ctx = ctx();
    let round = Arc::new(AtomicUsize::new(0));
    let (tx, rx) = std::sync::mpsc::channel::<usize>();
    let t = {
        let (ctx, round) = (ctx.clone(), round.clone());
        std::thread::spawn(move || {
            for r in rx {
                round.store(r, Ordering::SeqCst);
                ctx.notify();
            }
        })
    };
    for r in 1..=500 {
        tx.send(r).unwrap();
        while round.load(Ordering::SeqCst) != r {
            assert!(!ctx.poll(true), "only notifies here: never progress");
        }
    }
    drop(tx);
    t.join().unwrap();
}

/// poll's return value: true exactly when a non-idle BH, a handler or a timer ran.
#[test]
fn poll_return_value_matrix() {
    let _w = watchdog("poll_return_value_matrix");
    let ctx = ctx();
    let n = Counter::new();

    // Nothing at all.
    assert!(!ctx.poll(false));

    // Non-idle BH: progress.
    let bh = ctx.bh_new(n.cb());
    bh.schedule();
    assert!(ctx.poll(false));
    // Idle BH: runs, not progress.
    bh.schedule_idle();
    assert!(!ctx.poll(false));
    assert_eq!(n.get(), 2);
    // Cancelled BH: not progress.
    bh.schedule();
    bh.cancel();
    assert!(!ctx.poll(false));
    // Deleted BH: not progress.
    bh.schedule();
    drop(bh);
    assert!(!ctx.poll(false));
    assert_eq!(n.get(), 2);

    // Handler registration: not progress; ready handler: progress.
    let e = EventNotifier::new().unwrap();
    ctx.set_event_notifier(&e, n.handler()).unwrap();
    assert!(!ctx.poll(false));
    e.set().unwrap();
    assert!(ctx.poll(false));
    assert_eq!(n.get(), 3);
    e.test_and_clear();
    ctx.set_event_notifier(&e, None).unwrap();
    assert!(!ctx.poll(false));

    // Timer: progress; a deleted timer: not.
    let t = ctx.timer_new(ClockType::Realtime, SCALE_NS, n.cb());
    t.modify(0);
    assert!(ctx.poll(false));
    assert_eq!(n.get(), 4);
    t.modify(0);
    t.del();
    assert!(!ctx.poll(false));

    // notify: not progress.
    ctx.notify();
    assert!(!ctx.poll(false));
    assert_eq!(n.get(), 4);
}

/// poll(true) never blocks while a non-idle BH is pending or a timer has expired.
#[test]
fn blocking_poll_does_not_block_with_work_pending() {
    let _w = watchdog("blocking_poll_does_not_block_with_work_pending");
    let ctx = ctx();
    let (r, _w_end) = tcp_pair();
    ctx.set_fd_handler(r.raw(), handler(|| {}), None).unwrap();
    let n = Counter::new();
    let bh = ctx.bh_new(n.cb());
    let t = ctx.timer_new(ClockType::Realtime, SCALE_NS, n.cb());
    for i in 0..100 {
        drain(&ctx);
        if i % 2 == 0 {
            bh.schedule();
        } else {
            t.modify(clock_get_ns(ClockType::Realtime));
        }
        assert_eq!(ctx.compute_timeout(), 0);
        assert!(ctx.poll(true));
        assert_eq!(n.get(), i + 1);
    }
    ctx.set_fd_handler(r.raw(), None, None).unwrap();
}

/// Arms `t` 3 ms ahead, then does an outer loop's prepare (with pending and dispatch while it
/// says not to block) and asks compute_timeout how long to wait, which must be the time left to
/// the deadline, measured around the call. Returns the deadline, that timeout, and how many times
/// the timer ran early in the prepare loop's dispatch: only a thread descheduled past the
/// deadline sees that (and arms it again), so every run is checked to be after the deadline.
fn arm_before_outer_wait(ctx: &AioContext, t: &aioctx::Timer) -> (i64, i64, usize) {
    let mut late = 0;
    loop {
        let deadline = clock_get_ns(ClockType::Realtime) + 3 * SCALE_MS;
        t.modify(deadline);
        while ctx.prepare() {
            ctx.pending();
            ctx.dispatch();
        }
        let before = clock_get_ns(ClockType::Realtime);
        let timeout = ctx.compute_timeout();
        let after = clock_get_ns(ClockType::Realtime);
        if t.pending() {
            assert!(
                timeout >= (deadline - after).max(0) && timeout <= (deadline - before).max(0),
                "compute_timeout said {timeout} ns with {} to {} ns left",
                deadline - after,
                deadline - before
            );
            assert!(timeout <= 3 * SCALE_MS);
            return (deadline, timeout, late);
        }
        // The prepare loop's dispatch ran the timer.
        assert!(before >= deadline, "the timer ran before its deadline");
        late += 1;
        assert!(late < 10, "descheduled past a 3 ms deadline {late} times");
    }
}

/// The outer-loop protocol (QEMU's GSource prepare/check/dispatch): prepare says whether work is
/// ready; otherwise the context's descriptor becomes readable when a BH is scheduled, a handler's
/// fd is ready or the context is notified; pending and dispatch then find and run the work.
/// Unix only: on Windows a context has no descriptor for an outer loop to wait on
/// (`prepare_pending_dispatch_without_descriptor` is the part that applies there).
#[cfg(unix)]
#[test]
fn prepare_pending_dispatch() {
    use common::outer_fd_readable;
    let _w = watchdog("prepare_pending_dispatch");
    let ctx = ctx();
    let n = Counter::new();
    drain(&ctx);

    // Nothing to do.
    assert!(!ctx.prepare());
    assert!(!outer_fd_readable(&ctx, 0));
    assert!(!ctx.pending());
    assert!(!ctx.dispatch());

    // A BH scheduled before prepare: prepare says "do not block".
    let bh = Arc::new(ctx.bh_new(n.cb()));
    bh.schedule();
    assert!(ctx.prepare());
    assert!(ctx.pending());
    assert!(ctx.dispatch());
    assert_eq!(n.get(), 1);

    // A BH scheduled from another thread while the outer loop waits on the descriptor.
    for round in 2..=20 {
        assert!(!ctx.prepare());
        let b = bh.clone();
        let th = std::thread::spawn(move || b.schedule());
        assert!(outer_fd_readable(&ctx, -1));
        th.join().unwrap();
        assert!(ctx.pending());
        assert!(ctx.dispatch());
        assert_eq!(n.get(), round);
    }
    assert!(!ctx.prepare());
    assert!(!outer_fd_readable(&ctx, 0), "the wake-up was consumed");
    assert!(!ctx.pending());
    assert!(!ctx.dispatch());

    // A ready fd handler.
    let e = EventNotifier::new().unwrap();
    let e = Arc::new(e);
    let e2 = e.clone();
    let c = n.clone();
    ctx.set_event_notifier(
        &e,
        handler(move || {
            assert!(e2.test_and_clear());
            c.hit();
        }),
    )
    .unwrap();
    assert!(ctx.prepare(), "the registration's notify is pending");
    ctx.pending();
    assert!(!ctx.dispatch());
    assert!(!ctx.prepare());
    let e3 = e.clone();
    let th = std::thread::spawn(move || e3.set().unwrap());
    assert!(outer_fd_readable(&ctx, -1));
    th.join().unwrap();
    assert!(ctx.pending());
    assert!(ctx.dispatch());
    assert_eq!(n.get(), 21);

    // A notify from another thread wakes the outer loop but is no work.
    assert!(!ctx.prepare());
    let c2 = ctx.clone();
    let th = std::thread::spawn(move || c2.notify());
    assert!(outer_fd_readable(&ctx, -1));
    th.join().unwrap();
    assert!(!ctx.pending());
    assert!(!ctx.dispatch());

    // A timer: prepare does not block past it, compute_timeout bounds the wait.
    let t = ctx.timer_new(ClockType::Realtime, SCALE_NS, n.cb());
    let (deadline, timeout, late) = arm_before_outer_wait(&ctx, &t);
    let ms = ((timeout + SCALE_MS - 1) / SCALE_MS) as i32;
    outer_fd_readable(&ctx, ms);
    common::wait_clock_past(ClockType::Realtime, deadline);
    assert!(ctx.pending(), "an expired timer is pending work");
    assert!(ctx.dispatch());
    assert_eq!(n.get(), 22 + late);
    ctx.set_event_notifier(&e, None).unwrap();
}

/// The outer-loop protocol as an outer loop without the context's descriptor uses it (the only
/// way on Windows): prepare says whether to block; work that arrives from another thread while
/// the outer loop waits (here: until that thread is done) is found by pending and run by
/// dispatch; a notify alone is no work; an expired timer is.
#[test]
fn prepare_pending_dispatch_without_descriptor() {
    let _w = watchdog("prepare_pending_dispatch_without_descriptor");
    let ctx = ctx();
    let n = Counter::new();
    drain(&ctx);

    assert!(!ctx.prepare());
    assert!(!ctx.pending());
    assert!(!ctx.dispatch());

    // A BH scheduled before prepare, then BHs scheduled from another thread during the wait.
    let bh = Arc::new(ctx.bh_new(n.cb()));
    bh.schedule();
    assert!(ctx.prepare());
    assert!(ctx.pending());
    assert!(ctx.dispatch());
    assert_eq!(n.get(), 1);
    for round in 2..=20 {
        assert!(!ctx.prepare());
        let b = bh.clone();
        std::thread::spawn(move || b.schedule()).join().unwrap();
        assert!(ctx.pending());
        assert!(ctx.dispatch());
        assert_eq!(n.get(), round);
    }
    assert!(!ctx.prepare());
    assert!(!ctx.pending());
    assert!(!ctx.dispatch());

    // A notifier set from another thread.
    let e = Arc::new(EventNotifier::new().unwrap());
    let (e2, c) = (e.clone(), n.clone());
    ctx.set_event_notifier(
        &e,
        handler(move || {
            assert!(e2.test_and_clear());
            c.hit();
        }),
    )
    .unwrap();
    assert!(ctx.prepare(), "the registration's notify is pending");
    ctx.pending();
    assert!(!ctx.dispatch());
    assert!(!ctx.prepare());
    let e3 = e.clone();
    std::thread::spawn(move || e3.set().unwrap())
        .join()
        .unwrap();
    assert!(ctx.pending());
    assert!(ctx.dispatch());
    assert_eq!(n.get(), 21);

    // A notify from another thread is no work.
    assert!(!ctx.prepare());
    let c2 = ctx.clone();
    std::thread::spawn(move || c2.notify()).join().unwrap();
    assert!(!ctx.pending());
    assert!(!ctx.dispatch());

    // A timer: compute_timeout bounds the wait; once it has passed, the timer is pending work.
    let t = ctx.timer_new(ClockType::Realtime, SCALE_NS, n.cb());
    let (deadline, _timeout, late) = arm_before_outer_wait(&ctx, &t);
    common::wait_clock_past(ClockType::Realtime, deadline);
    assert!(ctx.pending(), "an expired timer is pending work");
    assert!(ctx.dispatch());
    assert_eq!(n.get(), 22 + late);
    ctx.set_event_notifier(&e, None).unwrap();
}

/// dispatch() without pending() runs what is ready now.
#[test]
fn dispatch_without_pending() {
    let _w = watchdog("dispatch_without_pending");
    let ctx = ctx();
    let e = EventNotifier::new().unwrap();
    let n = Counter::new();
    ctx.set_event_notifier(&e, n.handler()).unwrap();
    e.set().unwrap();
    assert!(ctx.dispatch());
    assert_eq!(n.get(), 1);
    e.test_and_clear();
    assert!(!ctx.dispatch());
    ctx.set_event_notifier(&e, None).unwrap();
}

/// A BH may run a nested blocking poll that waits for another BH it schedules.
#[test]
fn nested_poll_in_bh_runs_other_bh() {
    let _w = watchdog("nested_poll_in_bh_runs_other_bh");
    let ctx = ctx();
    let nb = Counter::new();
    let b = Arc::new(ctx.bh_new(nb.cb()));
    let nested_polls = Counter::new();
    let (w, b2, nb2, np) = (ctx.downgrade(), b.clone(), nb.clone(), nested_polls.clone());
    let a = ctx.bh_new(move || {
        let ctx = w.upgrade().unwrap();
        b2.schedule();
        while nb2.get() == 0 {
            ctx.poll(true);
            np.hit();
        }
    });
    a.schedule();
    assert!(ctx.poll(false));
    assert_eq!(nb.get(), 1);
    assert_eq!(nested_polls.get(), 1, "the nested poll ran the BH at once");
    assert!(!ctx.poll(false));
}

/// A nested poll never re-enters the running callback: a BH that reschedules itself and polls
/// runs again only after it returned, in the next outer poll.
#[test]
fn nested_poll_does_not_reenter_running_bh() {
    let _w = watchdog("nested_poll_does_not_reenter_running_bh");
    let ctx = ctx();
    let depth = Arc::new(AtomicUsize::new(0));
    let max_depth = Arc::new(AtomicUsize::new(0));
    let runs = Counter::new();
    let (w, d, md, r) = (
        ctx.downgrade(),
        depth.clone(),
        max_depth.clone(),
        runs.clone(),
    );
    let slot = self_bh(&ctx, move |slot| {
        let now = d.fetch_add(1, Ordering::SeqCst) + 1;
        md.fetch_max(now, Ordering::SeqCst);
        r.hit();
        schedule_slot(slot);
        let ctx = w.upgrade().unwrap();
        for _ in 0..3 {
            ctx.poll(false);
        }
        d.fetch_sub(1, Ordering::SeqCst);
    });
    schedule_slot(&slot);
    for i in 1..=5 {
        assert!(ctx.poll(false));
        assert_eq!(runs.get(), i, "ran more than once per outer poll");
    }
    assert_eq!(max_depth.load(Ordering::SeqCst), 1, "the BH was re-entered");
    drop(slot.lock().unwrap().take());
    assert!(!ctx.poll(false));
}

/// Every BH pending when the outer poll starts runs exactly once in it, whether the outer poll
/// or a nested one (started by one of them) runs it.
#[test]
fn nested_poll_runs_parents_pending_bhs_once() {
    let _w = watchdog("nested_poll_runs_parents_pending_bhs_once");
    let ctx = ctx();
    let runs: Arc<Vec<AtomicUsize>> = Arc::new((0..6).map(|_| AtomicUsize::new(0)).collect());
    let depth = Arc::new(AtomicUsize::new(0));
    let bhs: Vec<Bh> = (0..6)
        .map(|i| {
            let (w, runs, depth) = (ctx.downgrade(), runs.clone(), depth.clone());
            ctx.bh_new(move || {
                runs[i].fetch_add(1, Ordering::SeqCst);
                if depth.fetch_add(1, Ordering::SeqCst) < 2 {
                    w.upgrade().unwrap().poll(false);
                }
                depth.fetch_sub(1, Ordering::SeqCst);
            })
        })
        .collect();
    for bh in &bhs {
        bh.schedule();
    }
    assert!(ctx.poll(false));
    for (i, r) in runs.iter().enumerate() {
        assert_eq!(r.load(Ordering::SeqCst), 1, "BH {i}");
    }
    assert!(!ctx.poll(false));
}

/// A handler runs a nested blocking poll that waits for a timer; a timer callback runs a nested
/// poll that waits for a handler.
#[test]
fn nested_blocking_polls_across_kinds() {
    let _w = watchdog("nested_blocking_polls_across_kinds");
    let ctx = ctx();
    let e = Arc::new(EventNotifier::new().unwrap());
    let fired = Counter::new();
    let timer = Arc::new(ctx.timer_new(ClockType::Realtime, SCALE_NS, fired.cb()));
    let handled = Counter::new();
    {
        let (w, e2, t, f, h) = (
            ctx.downgrade(),
            e.clone(),
            timer.clone(),
            fired.clone(),
            handled.clone(),
        );
        ctx.set_event_notifier(
            &e,
            handler(move || {
                assert!(e2.test_and_clear());
                h.hit();
                let ctx = w.upgrade().unwrap();
                let deadline = clock_get_ns(ClockType::Realtime) + SCALE_MS;
                let before = f.get();
                t.modify(deadline);
                while f.get() == before {
                    ctx.poll(true);
                }
                assert!(clock_get_ns(ClockType::Realtime) >= deadline);
            }),
        )
        .unwrap();
    }
    drain(&ctx);
    e.set().unwrap();
    assert!(ctx.poll(false));
    assert_eq!((handled.get(), fired.get()), (1, 1));

    // Now from a timer callback, waiting for the handler.
    let (w, e2, h) = (ctx.downgrade(), e.clone(), handled.clone());
    let t2 = ctx.timer_new(ClockType::Realtime, SCALE_NS, move || {
        let ctx = w.upgrade().unwrap();
        let e3 = e2.clone();
        let setter = std::thread::spawn(move || e3.set().unwrap());
        while h.get() == 1 {
            ctx.poll(true);
        }
        setter.join().unwrap();
    });
    t2.modify(0);
    poll_until(&ctx, || handled.get() == 2 && fired.get() == 2);
    ctx.set_event_notifier(&e, None).unwrap();
}

/// A panicking BH unwinds out of poll; the context stays usable: the other pending BHs still run
/// (once), the BH can run again, a handler still fires, and the lock is free for other threads.
#[test]
fn panicking_bh_leaves_context_usable() {
    let _w = watchdog("panicking_bh_leaves_context_usable");
    quiet_intentional_panics();
    let ctx = ctx();
    let armed = Arc::new(AtomicBool::new(true));
    let np = Counter::new();
    let (a, c) = (armed.clone(), np.clone());
    let p = ctx.bh_new(move || {
        c.hit();
        if a.swap(false, Ordering::SeqCst) {
            panic!("intentional panic in a BH");
        }
    });
    let others: Vec<Counter> = (0..4).map(|_| Counter::new()).collect();
    let other_bhs: Vec<Bh> = others.iter().map(|c| ctx.bh_new(c.cb())).collect();
    let e = EventNotifier::new().unwrap();
    let nh = Counter::new();
    ctx.set_event_notifier(&e, nh.handler()).unwrap();
    drain(&ctx);

    other_bhs[0].schedule();
    p.schedule();
    for bh in &other_bhs[1..] {
        bh.schedule();
    }
    let res = catch_unwind(AssertUnwindSafe(|| ctx.poll(false)));
    let msg = res.expect_err("the panic propagates out of poll");
    assert_eq!(
        msg.downcast_ref::<&str>(),
        Some(&"intentional panic in a BH")
    );
    assert_eq!(np.get(), 1);

    // The BHs the panic skipped are still pending: poll(true) must not block and runs them.
    assert!(ctx.poll(true));
    for (i, c) in others.iter().enumerate() {
        assert_eq!(
            c.get(),
            1,
            "BH {i} pending at the panic ran {} times",
            c.get()
        );
    }
    drain(&ctx);

    // The panicking BH works again.
    p.schedule();
    assert!(ctx.poll(true));
    assert_eq!(np.get(), 2);

    // The handler is still registered and fires.
    e.set().unwrap();
    assert!(ctx.poll(true));
    assert!(nh.get() >= 1);
    e.test_and_clear();

    // The lock is not stuck: another thread acquires it and polls.
    let c2 = ctx.clone();
    let p2 = Arc::new(p);
    let p3 = p2.clone();
    std::thread::spawn(move || {
        let _g = c2.acquire();
        p3.schedule();
        assert!(c2.poll(true));
    })
    .join()
    .unwrap();
    assert_eq!(np.get(), 3);
    ctx.set_event_notifier(&e, None).unwrap();
}

/// A panicking handler or timer unwinds out of poll and leaves the context usable.
#[test]
fn panicking_handler_and_timer() {
    let _w = watchdog("panicking_handler_and_timer");
    quiet_intentional_panics();
    let ctx = ctx();
    let e = Arc::new(EventNotifier::new().unwrap());
    let calls = Counter::new();
    let (e2, c) = (e.clone(), calls.clone());
    ctx.set_event_notifier(
        &e,
        handler(move || {
            c.hit();
            if c.get() == 1 {
                panic!("intentional panic in a handler");
            }
            assert!(e2.test_and_clear());
        }),
    )
    .unwrap();
    drain(&ctx);
    e.set().unwrap();
    assert!(catch_unwind(AssertUnwindSafe(|| ctx.poll(true))).is_err());
    // Still registered, still readable: it runs again (and clears the notifier this time).
    assert!(ctx.poll(true));
    assert_eq!(calls.get(), 2);
    assert!(!ctx.poll(false));
    ctx.set_event_notifier(&e, None).unwrap();

    // Timers: t1 panics, t2 (same deadline, armed after) runs in the next poll.
    let n2 = Counter::new();
    let armed = Arc::new(AtomicBool::new(true));
    let n1 = Counter::new();
    let (a, c1) = (armed.clone(), n1.clone());
    let t1 = ctx.timer_new(ClockType::Realtime, SCALE_NS, move || {
        c1.hit();
        if a.swap(false, Ordering::SeqCst) {
            panic!("intentional panic in a timer");
        }
    });
    let t2 = ctx.timer_new(ClockType::Realtime, SCALE_NS, n2.cb());
    t1.modify(5);
    t2.modify(5);
    assert!(catch_unwind(AssertUnwindSafe(|| ctx.poll(false))).is_err());
    assert_eq!((n1.get(), n2.get()), (1, 0));
    assert!(!t1.pending());
    assert!(t2.pending());
    assert!(ctx.poll(true));
    assert_eq!(n2.get(), 1);
    t1.modify(0);
    assert!(ctx.poll(true));
    assert_eq!(n1.get(), 2);
}

/// A panic in a nested poll propagates through the outer callback and out of the outer poll; a
/// panic on another thread's poll leaves the context usable from this one.
#[test]
fn panics_in_nested_polls_and_other_threads() {
    let _w = watchdog("panics_in_nested_polls_and_other_threads");
    quiet_intentional_panics();
    let ctx = ctx();
    let boom = Arc::new(ctx.bh_new(|| panic!("intentional panic in a nested BH")));
    let outer_runs = Counter::new();
    let (w, b, r) = (ctx.downgrade(), boom.clone(), outer_runs.clone());
    let outer = ctx.bh_new(move || {
        r.hit();
        b.schedule();
        w.upgrade().unwrap().poll(false);
        unreachable!("the nested poll panicked");
    });
    outer.schedule();
    assert!(catch_unwind(AssertUnwindSafe(|| ctx.poll(false))).is_err());
    assert_eq!(outer_runs.get(), 1);
    assert!(!ctx.poll(false));
    drop(boom);

    // Other BHs still run.
    let fine = Counter::new();
    let f = ctx.bh_new(fine.cb());
    f.schedule();
    assert!(ctx.poll(false));
    assert_eq!(fine.get(), 1);

    // Panic on another thread's poll.
    let c2 = ctx.clone();
    let bad = Arc::new(ctx.bh_new(|| panic!("intentional panic on another thread")));
    let bad2 = bad.clone();
    let res = std::thread::spawn(move || {
        bad2.schedule();
        c2.poll(true)
    })
    .join();
    assert!(res.is_err());
    // This thread can take the lock and poll, with handlers working.
    let e = EventNotifier::new().unwrap();
    let nh = Counter::new();
    ctx.set_event_notifier(&e, nh.handler()).unwrap();
    e.set().unwrap();
    {
        let _g = ctx.acquire();
        assert!(ctx.poll(true));
    }
    assert!(nh.get() >= 1);
    ctx.set_event_notifier(&e, None).unwrap();
}

/// Weak handles do not keep the context alive.
#[test]
fn weak_handles() {
    let _w = watchdog("weak_handles");
    let ctx = ctx();
    let weak = ctx.downgrade();
    let strong = weak.upgrade().unwrap();
    assert!(strong.ptr_eq(&ctx));
    assert!(!strong.ptr_eq(&common::ctx()));
    drop(strong);
    drop(ctx);
    assert!(weak.upgrade().is_none());
}

/// AioContext::new honours AIOCTX_BACKEND; the builder's explicit choice wins; a back end this
/// platform lacks is an error.
#[test]
fn backend_selection() {
    let _w = watchdog("backend_selection");
    let mut expected = match std::env::var("AIOCTX_BACKEND") {
        Ok(name) if !name.is_empty() => Backend::from_name(&name).unwrap(),
        _ => Backend::platform_default(),
    };
    let io_uring = AioContext::builder().backend(Backend::IoUring).build();
    match &io_uring {
        Ok(c) => assert_eq!(c.backend(), Backend::IoUring),
        Err(e) => {
            eprintln!("SKIPPED io_uring checks: the kernel refuses io_uring here: {e}");
            if expected == Backend::IoUring {
                expected = Backend::Epoll; // AIOCTX_BACKEND's choice falls back
            }
        }
    }
    assert_eq!(ctx().backend(), expected);
    for &b in Backend::available() {
        let c = AioContext::builder().backend(b).build().unwrap();
        assert_eq!(c.backend(), b);
        assert_eq!(Backend::from_name(b.name()).unwrap(), b);
    }
    // Another platform's back end is refused, not substituted.
    for b in [Backend::Epoll, Backend::Poll, Backend::Windows] {
        if !Backend::available().contains(&b) {
            let err = AioContext::builder().backend(b).build().unwrap_err();
            assert_eq!(err.kind(), std::io::ErrorKind::Unsupported, "{b:?}: {err}");
        }
    }
}

/// Two threads polling the same context: callbacks never run concurrently, none is lost.
#[test]
fn concurrent_pollers_never_overlap() {
    let _w = watchdog("concurrent_pollers_never_overlap");
    let ctx = ctx();
    const RUNS: usize = 2000;
    let inside = Arc::new(AtomicBool::new(false));
    let runs = Counter::new();
    let (i2, r2) = (inside.clone(), runs.clone());
    let slot = self_bh(&ctx, move |slot| {
        assert!(
            !i2.swap(true, Ordering::SeqCst),
            "two callbacks ran at once"
        );
        r2.hit();
        if r2.get() < RUNS {
            schedule_slot(slot);
        }
        i2.store(false, Ordering::SeqCst);
    });
    schedule_slot(&slot);
    let barrier = Arc::new(Barrier::new(3));
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let (ctx, runs, barrier) = (ctx.clone(), runs.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                let mut progress = 0;
                while runs.get() < RUNS {
                    if ctx.poll(false) {
                        progress += 1;
                    }
                }
                progress
            })
        })
        .collect();
    barrier.wait();
    let total: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(runs.get(), RUNS);
    assert_eq!(total, RUNS, "each run is one progress-making poll");
    drop(slot.lock().unwrap().take());
}

/// Callbacks from one context may drive a second context (nested loops across contexts).
#[test]
fn callbacks_may_poll_another_context() {
    let _w = watchdog("callbacks_may_poll_another_context");
    let a = ctx();
    let b = ctx();
    let nb = Counter::new();
    let b_bh = Arc::new(b.bh_new(nb.cb()));
    let (bc, bb, nb2) = (b.clone(), b_bh.clone(), nb.clone());
    let a_bh = a.bh_new(move || {
        bb.schedule();
        while nb2.get() == 0 {
            bc.poll(true);
        }
    });
    a_bh.schedule();
    assert!(a.poll(true));
    assert_eq!(nb.get(), 1);
}
