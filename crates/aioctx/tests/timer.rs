//! Timers: QEMU's /aio/timer/schedule, "never early", expired timers never block, FIFO order for
//! equal deadlines, re-arming from the callback, del/drop, cross-thread modify, and the virtual
//! clock (global to the process: every test that touches it holds `VIRTUAL_CLOCK`).

mod common;

use std::sync::{Arc, Barrier, Mutex, MutexGuard};

use aioctx::{clock_get_ns, virtual_clock, AioContext, ClockType, SCALE_MS, SCALE_NS, SCALE_US};
use common::net::{tcp_pair, AsRaw};
use common::{ctx, drain, handler, poll_until, self_timer, wait_clock_past, watchdog, Counter};

/// Serialises the tests that drive the process-global virtual clock.
static VIRTUAL_CLOCK: Mutex<()> = Mutex::new(());

fn virtual_clock_lock() -> MutexGuard<'static, ()> {
    VIRTUAL_CLOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn now(clock: ClockType) -> i64 {
    clock_get_ns(clock)
}

/// /aio/timer/schedule (QEMU waits 750 ms twice; 100 ms keeps the suite fast and tests the same).
///
/// Its "not run yet" checks need the thread to get there within 100 ms of arming the timer. A
/// thread descheduled for longer (a loaded machine, Wine) finds the deadline passed when it
/// checks; the attempt then starts over rather than fail. Everything else, and "never early", is
/// checked on every attempt.
#[test]
fn timer_schedule() {
    let _w = watchdog("timer_schedule");
    let ctx = ctx();
    let (r, _w_end) = tcp_pair();
    ctx.set_fd_handler(r.raw(), handler(|| {}), None).unwrap();
    let done = (1..=5).any(|attempt| {
        let done = timer_schedule_attempt(&ctx);
        if !done {
            eprintln!("timer_schedule: attempt {attempt} was descheduled past a 100 ms deadline");
        }
        done
    });
    assert!(done, "descheduled past a 100 ms deadline in 5 attempts");
    ctx.set_fd_handler(r.raw(), None, None).unwrap();
}

/// One attempt of [`timer_schedule`] on a context with an fd handler; false if the thread came
/// too late to check.
fn timer_schedule_attempt(ctx: &AioContext) -> bool {
    const NS: i64 = 100 * SCALE_MS;
    ctx.poll(false);

    let n = Counter::new();
    let deadlines = Arc::new(Mutex::new(Vec::new()));
    let (c, d) = (n.clone(), deadlines.clone());
    let timer = self_timer(ctx, ClockType::Realtime, SCALE_NS, move |slot| {
        c.hit();
        if c.get() < 2 {
            let next = now(ClockType::Realtime) + NS;
            d.lock().unwrap().push(next);
            slot.lock().unwrap().as_ref().unwrap().modify(next);
        }
    });
    // Breaks the timer's cycle through its slot when the attempt ends, early or not.
    struct Release(common::TimerSlot);
    impl Drop for Release {
        fn drop(&mut self) {
            self.0.lock().unwrap().take();
        }
    }
    let _release = Release(timer.clone());
    let first = now(ClockType::Realtime) + NS;
    deadlines.lock().unwrap().push(first);
    timer.lock().unwrap().as_ref().unwrap().modify(first);
    assert_eq!(n.get(), 0);

    // timer_mod may have notified the context; consume that.
    drain(ctx);
    let progress = ctx.poll(false);
    let runs = n.get();
    if now(ClockType::Realtime) >= first {
        return false;
    }
    assert!(!progress);
    assert_eq!(runs, 0);

    wait_clock_past(ClockType::Realtime, first);
    assert_eq!(n.get(), 0, "timers only run inside poll");

    assert!(ctx.poll(false));
    assert_eq!(n.get(), 1);

    // timer_mod called by our callback.
    let second = deadlines.lock().unwrap()[1];
    drain(ctx);
    let progress = ctx.poll(false);
    let runs = n.get();
    if now(ClockType::Realtime) >= second {
        return false;
    }
    assert!(!progress);
    assert_eq!(runs, 1);

    assert!(
        ctx.poll(true),
        "a blocking poll waits for the timer and runs it"
    );
    assert_eq!(n.get(), 2);
    assert!(
        now(ClockType::Realtime) >= second,
        "returned before the deadline"
    );

    assert!(!ctx.poll(false));
    assert_eq!(n.get(), 2);
    true
}

/// A blocking poll never returns before the earliest deadline, and runs that timer in the same
/// call, for deadlines that are not whole milliseconds, in every scale, with and without fd
/// handlers registered.
#[test]
fn blocking_poll_is_never_early() {
    let _w = watchdog("blocking_poll_is_never_early");
    let ctx = ctx();
    let (r, _w_end) = tcp_pair();
    for with_fd in [false, true] {
        if with_fd {
            ctx.set_fd_handler(r.raw(), handler(|| {}), None).unwrap();
        }
        let cases: &[(i64, i64)] = &[
            (SCALE_NS, 1),
            (SCALE_NS, 999_999),
            (SCALE_NS, 1_000_001),
            (SCALE_NS, 1_500_007),
            (SCALE_NS, 2_300_000),
            (SCALE_US, 1_700),
            (SCALE_US, 3),
            (SCALE_MS, 2),
            (SCALE_MS, 1),
        ];
        for &(scale, delta) in cases {
            let n = Counter::new();
            let t = ctx.timer_new(ClockType::Realtime, scale, n.cb());
            let deadline = now(ClockType::Realtime) / scale + delta;
            t.modify(deadline);
            assert_eq!(t.expire_time_ns(), deadline * scale);
            // Consume the wake-up that arming the earliest timer sends.
            while n.get() == 0 && ctx.poll(false) {}
            if n.get() == 0 {
                assert!(
                    ctx.poll(true),
                    "blocking poll returned without running the timer"
                );
            }
            assert_eq!(n.get(), 1);
            let t_now = now(ClockType::Realtime);
            assert!(
                t_now >= deadline * scale,
                "timer ran {} ns early (scale {scale}, delta {delta})",
                deadline * scale - t_now
            );
            assert!(!t.pending());
        }
        ctx.set_fd_handler(r.raw(), None, None).unwrap();
    }
}

/// An expired timer never lets poll(true) block: it runs and the poll returns true.
#[test]
fn expired_timer_does_not_block() {
    let _w = watchdog("expired_timer_does_not_block");
    let ctx = ctx();
    let n = Counter::new();
    let t = ctx.timer_new(ClockType::Realtime, SCALE_NS, n.cb());
    drain(&ctx);
    for i in 1..=5 {
        let deadline = if i % 2 == 0 {
            0
        } else {
            now(ClockType::Realtime) - 1
        };
        t.modify(deadline);
        assert_eq!(ctx.compute_timeout(), 0);
        assert!(ctx.poll(true));
        assert_eq!(n.get(), i);
    }
    // A negative time counts as 0 (the clock's epoch): already expired.
    t.modify(-5);
    assert_eq!(t.expire_time_ns(), 0);
    assert!(ctx.poll(true));
    assert_eq!(n.get(), 6);
}

/// Timers with equal deadlines fire in the order they were armed; re-arming moves a timer to
/// the back of its deadline's queue.
#[test]
fn equal_deadlines_fire_in_fifo_order() {
    let _w = watchdog("equal_deadlines_fire_in_fifo_order");
    let ctx = ctx();
    let order = Arc::new(Mutex::new(Vec::new()));
    let timers: Vec<_> = (0..16)
        .map(|i| {
            let o = order.clone();
            ctx.timer_new(ClockType::Realtime, SCALE_NS, move || {
                o.lock().unwrap().push(i)
            })
        })
        .collect();
    let deadline = now(ClockType::Realtime) + 2 * SCALE_MS;
    let arm_order = [9, 3, 14, 0, 7, 12, 1, 5, 15, 2, 10, 4, 8, 13, 6, 11];
    for &i in &arm_order {
        timers[i].modify(deadline);
    }
    // Re-arm the first one at the same deadline: it goes last.
    timers[9].modify(deadline);
    // An earlier and a later timer around the group.
    timers[0].modify(deadline - 1);
    timers[11].modify(deadline + 1);
    poll_until(&ctx, || order.lock().unwrap().len() == 16);
    let mut expected = vec![0];
    expected.extend(
        arm_order
            .iter()
            .copied()
            .filter(|&i| i != 9 && i != 0 && i != 11),
    );
    expected.push(9);
    expected.push(11);
    assert_eq!(*order.lock().unwrap(), expected);
}

/// A callback may re-arm its own timer; it runs at most once per poll, never early.
#[test]
fn callback_rearms_own_timer() {
    let _w = watchdog("callback_rearms_own_timer");
    let ctx = ctx();
    const PERIOD: i64 = 300_000;
    let runs = Arc::new(Mutex::new(Vec::<(i64, i64)>::new()));
    let r = runs.clone();
    let t = self_timer(&ctx, ClockType::Realtime, SCALE_NS, move |slot| {
        let guard = slot.lock().unwrap();
        let me = guard.as_ref().unwrap();
        let t_now = now(ClockType::Realtime);
        let mut runs = r.lock().unwrap();
        runs.push((t_now, 0));
        assert!(!me.pending(), "a firing timer is no longer pending");
        if runs.len() < 10 {
            let next = t_now + PERIOD;
            runs.last_mut().unwrap().1 = next;
            me.modify(next);
            assert!(me.pending());
        }
    });
    let first = now(ClockType::Realtime) + PERIOD;
    t.lock().unwrap().as_ref().unwrap().modify(first);
    let mut polls = 0;
    while runs.lock().unwrap().len() < 10 {
        let before = runs.lock().unwrap().len();
        ctx.poll(true);
        polls += 1;
        assert!(
            runs.lock().unwrap().len() <= before + 1,
            "ran twice in one poll"
        );
    }
    let runs = runs.lock().unwrap().clone();
    assert!(runs[0].0 >= first);
    for w in runs.windows(2) {
        assert!(w[1].0 >= w[0].1, "re-armed timer ran early");
    }
    assert!(polls >= 10);
    assert!(!t.lock().unwrap().as_ref().unwrap().pending());
    t.lock().unwrap().take();
}

/// del() and dropping the handle both stop a pending timer; drop frees its callback.
#[test]
fn del_and_drop_stop_pending_timer() {
    let _w = watchdog("del_and_drop_stop_pending_timer");
    let ctx = ctx();
    let n = Counter::new();
    let t = ctx.timer_new(ClockType::Realtime, SCALE_NS, n.cb());
    assert!(!t.pending());
    assert_eq!(t.expire_time_ns(), -1);
    t.modify(0);
    assert!(t.pending());
    t.del();
    assert!(!t.pending());
    assert_eq!(t.expire_time_ns(), -1);
    assert_eq!(ctx.compute_timeout(), -1);
    assert!(!ctx.poll(false));
    assert_eq!(n.get(), 0);
    t.del(); // deleting twice is harmless

    let token = Arc::new(());
    let (tk, c) = (token.clone(), n.clone());
    let t2 = ctx.timer_new(ClockType::Realtime, SCALE_NS, move || {
        let _ = &tk;
        c.hit();
    });
    t2.modify(0);
    drop(t2);
    assert_eq!(
        Arc::strong_count(&token),
        1,
        "dropped timer's callback not freed"
    );
    assert!(!ctx.poll(false));
    assert_eq!(n.get(), 0);

    // Re-arming after del works.
    t.modify(0);
    assert!(ctx.poll(false));
    assert_eq!(n.get(), 1);
}

/// A timer callback that deletes another expired timer stops it; one that drops another's handle
/// too. Timers created from a callback work.
#[test]
fn callback_deletes_other_expired_timers() {
    let _w = watchdog("callback_deletes_other_expired_timers");
    let ctx = ctx();
    let (na, nb, nc, nd) = (
        Counter::new(),
        Counter::new(),
        Counter::new(),
        Counter::new(),
    );
    let b = Arc::new(ctx.timer_new(ClockType::Realtime, SCALE_NS, nb.cb()));
    let c_slot: Arc<Mutex<Option<aioctx::Timer>>> = Arc::new(Mutex::new(Some(ctx.timer_new(
        ClockType::Realtime,
        SCALE_NS,
        nc.cb(),
    ))));
    let made: Arc<Mutex<Option<aioctx::Timer>>> = Arc::new(Mutex::new(None));
    let (b2, cs, ca, w, m, nd2) = (
        b.clone(),
        c_slot.clone(),
        na.clone(),
        ctx.downgrade(),
        made.clone(),
        nd.clone(),
    );
    let a = ctx.timer_new(ClockType::Realtime, SCALE_NS, move || {
        ca.hit();
        b2.del();
        drop(cs.lock().unwrap().take());
        let t = w
            .upgrade()
            .unwrap()
            .timer_new(ClockType::Realtime, SCALE_NS, nd2.cb());
        t.modify(0);
        *m.lock().unwrap() = Some(t);
    });
    a.modify(0);
    b.modify(0);
    c_slot.lock().unwrap().as_ref().unwrap().modify(0);
    poll_until(&ctx, || nd.get() == 1);
    assert_eq!((na.get(), nb.get(), nc.get(), nd.get()), (1, 0, 0, 1));
    assert!(!ctx.poll(false));
}

/// Arming a timer from another thread wakes the loop when it becomes the earliest one.
#[test]
fn modify_from_other_thread_wakes_loop() {
    let _w = watchdog("modify_from_other_thread_wakes_loop");
    let ctx = ctx();
    let far = Counter::new();
    let far_timer = Arc::new(ctx.timer_new(ClockType::Realtime, SCALE_MS, far.cb()));
    far_timer.modify(now(ClockType::Realtime) / SCALE_MS + 3_600_000);
    let n = Counter::new();
    let near = Arc::new(ctx.timer_new(ClockType::Realtime, SCALE_NS, n.cb()));
    for round in 1..=20usize {
        drain(&ctx);
        let barrier = Arc::new(Barrier::new(2));
        let (b, near2, far2) = (barrier.clone(), near.clone(), far_timer.clone());
        let t = std::thread::spawn(move || {
            b.wait();
            if round % 2 == 0 {
                // A second timer becomes the earliest.
                near2.modify(now(ClockType::Realtime) + 200_000);
            } else {
                // The earliest timer moves earlier.
                far2.modify(0);
            }
        });
        barrier.wait();
        let expected_far = round.div_ceil(2);
        poll_until(&ctx, || n.get() == round / 2 && far.get() == expected_far);
        t.join().unwrap();
        if round % 2 == 1 {
            far_timer.modify(now(ClockType::Realtime) / SCALE_MS + 3_600_000);
        }
    }
}

/// modify_anticipate_ns only ever moves a timer earlier.
#[test]
fn modify_anticipate_only_moves_earlier() {
    let _w = watchdog("modify_anticipate_only_moves_earlier");
    let ctx = ctx();
    let t = ctx.timer_new(ClockType::Realtime, SCALE_MS, || {});
    let base = now(ClockType::Realtime) + 3_600 * 1_000 * SCALE_MS;
    t.modify_anticipate_ns(base);
    assert_eq!(t.expire_time_ns(), base, "arms an idle timer");
    t.modify_anticipate_ns(base + 5);
    assert_eq!(t.expire_time_ns(), base, "does not move later");
    t.modify_anticipate_ns(base - 5);
    assert_eq!(t.expire_time_ns(), base - 5);
    t.modify_ns(base + 10);
    assert_eq!(t.expire_time_ns(), base + 10, "modify_ns moves either way");
}

/// expired(), pending(), clock() and scale conversions.
#[test]
fn timer_accessors() {
    let _w = watchdog("timer_accessors");
    let ctx = ctx();
    let t = ctx.timer_new(ClockType::Host, SCALE_US, || {});
    assert_eq!(t.clock(), ClockType::Host);
    assert!(!t.expired(i64::MAX / SCALE_US));
    t.modify(1_000);
    assert_eq!(t.expire_time_ns(), 1_000 * SCALE_US);
    assert!(!t.expired(999));
    assert!(t.expired(1_000));
    assert!(t.expired(1_001));
    // Saturating scale conversion.
    t.modify(i64::MAX);
    assert_eq!(t.expire_time_ns(), i64::MAX);
    assert!(!t.expired(0));
}

/// Host-clock timers fire too (and are not early on the host clock).
#[test]
fn host_clock_timer() {
    let _w = watchdog("host_clock_timer");
    let ctx = ctx();
    let n = Counter::new();
    let t = ctx.timer_new(ClockType::Host, SCALE_NS, n.cb());
    let deadline = now(ClockType::Host) + 2 * SCALE_MS;
    t.modify(deadline);
    poll_until(&ctx, || n.get() == 1);
    assert!(now(ClockType::Host) >= deadline);
}

/// compute_timeout reports the time left to the earliest deadline.
#[test]
fn compute_timeout_follows_earliest_timer() {
    let _w = watchdog("compute_timeout_follows_earliest_timer");
    let ctx = ctx();
    assert_eq!(ctx.compute_timeout(), -1);
    let t1 = ctx.timer_new(ClockType::Realtime, SCALE_MS, || {});
    let t2 = ctx.timer_new(ClockType::Realtime, SCALE_MS, || {});
    t1.modify(now(ClockType::Realtime) / SCALE_MS + 60_000);
    let timeout = ctx.compute_timeout();
    assert!(
        timeout > 59_000 * SCALE_MS && timeout <= 60_000 * SCALE_MS,
        "{timeout}"
    );
    t2.modify(now(ClockType::Realtime) / SCALE_MS + 1_000);
    let timeout = ctx.compute_timeout();
    assert!(timeout > 0 && timeout <= 1_000 * SCALE_MS, "{timeout}");
    t2.del();
    assert!(ctx.compute_timeout() > 59_000 * SCALE_MS);
    t1.modify(0);
    assert_eq!(ctx.compute_timeout(), 0);
}

/// Timers of a dropped context: arming does nothing, and the callback never runs.
#[test]
fn timer_outliving_its_context() {
    let _w = watchdog("timer_outliving_its_context");
    let ctx = ctx();
    let n = Counter::new();
    let t = ctx.timer_new(ClockType::Realtime, SCALE_NS, n.cb());
    t.modify(now(ClockType::Realtime) + 3_600 * 1_000 * SCALE_MS);
    drop(ctx);
    assert!(!t.pending(), "dropping the context disarms its timers");
    t.modify(0);
    assert!(
        !t.pending(),
        "arming a timer of a dropped context does nothing"
    );
    assert_eq!(t.expire_time_ns(), -1);
    t.del();
    assert_eq!(n.get(), 0);
}

// ---- virtual clock ----

fn vnow() -> i64 {
    now(ClockType::Virtual)
}

/// Blocks on `ctx` until a real-time delay has passed, proving time went by for the test.
fn let_real_time_pass(ctx: &AioContext, ns: i64) {
    let n = Counter::new();
    let t = ctx.timer_new(ClockType::Realtime, SCALE_NS, n.cb());
    t.modify(now(ClockType::Realtime) + ns);
    poll_until(ctx, || n.get() == 1);
}

/// The running virtual clock: timers fire no earlier than their virtual deadline; advancing it
/// from another thread wakes a blocked loop; stopping it freezes time and its timers; starting it
/// again lets them fire; VirtualRt reads the same clock; set() never goes backwards.
#[test]
fn virtual_clock_running() {
    let _w = watchdog("virtual_clock_running");
    let _lock = virtual_clock_lock();
    let ctx = ctx();

    virtual_clock::start();
    assert!(virtual_clock::is_running());
    let a = vnow();
    let b = vnow();
    assert!(b >= a, "the virtual clock is monotonic");

    // 1. A timer on the running clock fires, not early.
    let n = Counter::new();
    let t = ctx.timer_new(ClockType::Virtual, SCALE_NS, n.cb());
    let deadline = vnow() + 2 * SCALE_MS;
    t.modify(deadline);
    poll_until(&ctx, || n.get() == 1);
    assert!(vnow() >= deadline);

    // 2. advance() from another thread wakes a loop blocked on a far virtual deadline.
    let deadline = vnow() + 3_600 * 1_000 * SCALE_MS;
    t.modify(deadline);
    drain(&ctx);
    let barrier = Arc::new(Barrier::new(2));
    let b2 = barrier.clone();
    let th = std::thread::spawn(move || {
        b2.wait();
        virtual_clock::advance(2 * 3_600 * 1_000 * SCALE_MS);
    });
    barrier.wait();
    poll_until(&ctx, || n.get() == 2);
    th.join().unwrap();
    assert!(vnow() >= deadline);

    // 3. Stopping freezes the clock; timers do not fire while real time passes.
    let deadline = vnow() + 20 * SCALE_MS;
    t.modify(deadline);
    virtual_clock::stop();
    assert!(!virtual_clock::is_running());
    let frozen = vnow();
    let_real_time_pass(&ctx, 30 * SCALE_MS);
    assert_eq!(vnow(), frozen, "a stopped virtual clock does not move");
    assert_eq!(
        now(ClockType::VirtualRt),
        frozen,
        "VirtualRt reads the virtual clock"
    );
    if frozen < deadline {
        assert_eq!(n.get(), 2, "a timer fired on a stopped virtual clock");
        assert!(t.pending());
    }

    // 4. set() never moves the clock back.
    virtual_clock::set(0);
    assert_eq!(vnow(), frozen);

    // 5. Starting it again lets the timer fire (it wakes the loop).
    virtual_clock::start();
    poll_until(&ctx, || n.get() == 3);
    assert!(vnow() >= deadline);

    // 6. VirtualRt timers run on the same clock.
    let nrt = Counter::new();
    let trt = ctx.timer_new(ClockType::VirtualRt, SCALE_NS, nrt.cb());
    trt.modify(vnow() + SCALE_MS);
    poll_until(&ctx, || nrt.get() == 1);
    virtual_clock::stop();
}

/// A stopped virtual clock is driven by the program alone: its timers do not fire while real time
/// passes, and advancing (or setting) the clock past their deadline makes them fire — the point of
/// a program-controlled clock (QEMU's qtest_clock_warp runs the virtual timers it warps past).
#[test]
fn virtual_clock_stopped_advance_fires_timers() {
    let _w = watchdog("virtual_clock_stopped_advance_fires_timers");
    let _lock = virtual_clock_lock();
    let ctx = ctx();
    virtual_clock::stop();
    let v0 = vnow();
    let n = Counter::new();
    let t = ctx.timer_new(ClockType::Virtual, SCALE_NS, n.cb());
    t.modify(v0 + SCALE_MS);
    drain(&ctx);

    // Real time passes; virtual time does not; the timer does not fire.
    let_real_time_pass(&ctx, 5 * SCALE_MS);
    assert_eq!(vnow(), v0);
    assert_eq!(n.get(), 0);

    // Advancing short of the deadline: still nothing.
    virtual_clock::advance(SCALE_MS / 2);
    drain(&ctx);
    assert_eq!(n.get(), 0);

    // Advancing past the deadline, with the clock still stopped: it fires.
    virtual_clock::advance(SCALE_MS);
    assert_eq!(vnow(), v0 + SCALE_MS + SCALE_MS / 2);
    assert!(ctx.poll(false), "the due virtual timer did not run");
    assert_eq!(n.get(), 1);

    // set() too, and a blocked loop is woken by it from another thread.
    t.modify(vnow() + 3_600 * 1_000 * SCALE_MS);
    drain(&ctx);
    let target = vnow() + 3_601 * 1_000 * SCALE_MS;
    let th = std::thread::spawn(move || virtual_clock::set(target));
    poll_until(&ctx, || n.get() == 2);
    th.join().unwrap();
    assert_eq!(vnow(), target);
}

/// A timer callback may delete its own timer (drop its own handle); it is freed and never runs
/// again, even when it had re-armed itself first.
#[test]
fn callback_deletes_own_timer() {
    let _w = watchdog("callback_deletes_own_timer");
    let ctx = ctx();
    let n = Counter::new();
    let c = n.clone();
    let slot = self_timer(&ctx, ClockType::Realtime, SCALE_NS, move |slot| {
        c.hit();
        let me = slot
            .lock()
            .unwrap()
            .take()
            .expect("deleted timer ran again");
        me.modify(0);
        drop(me);
    });
    slot.lock().unwrap().as_ref().unwrap().modify(0);
    assert!(ctx.poll(true));
    assert_eq!(n.get(), 1);
    assert!(slot.lock().unwrap().is_none());
    assert!(!ctx.poll(false));
    assert_eq!(
        ctx.compute_timeout(),
        -1,
        "the deleted timer is no longer armed"
    );
    assert_eq!(
        Arc::strong_count(&slot),
        1,
        "the deleted timer's callback was not freed"
    );
}
