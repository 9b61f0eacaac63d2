//! Bottom halves: QEMU's /aio/bh/* cases and the BH rules of the issue (§1.2, §2.2 of the
//! semantics notes): one run per schedule, one run per poll for a self-rescheduling BH, cancel and
//! delete, deletion from inside callbacks, idle BHs, one-shot BHs, O(scheduled) polls.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use aioctx::{AioContext, Bh};
use common::{ctx, drain, schedule_slot, self_bh, watchdog, BhSlot, Counter};

/// QEMU's `bh_test_cb`: counts, and reschedules itself while the count is below `max`.
fn counting_bh(ctx: &AioContext, max: usize) -> (BhSlot, Counter) {
    let n = Counter::new();
    let c = n.clone();
    let slot = self_bh(ctx, move |slot| {
        c.hit();
        if c.get() < max {
            schedule_slot(slot);
        }
    });
    (slot, n)
}

/// QEMU's `bh_delete_cb`: like `counting_bh`, but deletes itself when the count reaches `max`.
fn deleting_bh(ctx: &AioContext, max: usize) -> (BhSlot, Counter) {
    let n = Counter::new();
    let c = n.clone();
    let slot = self_bh(ctx, move |slot| {
        c.hit();
        if c.get() < max {
            schedule_slot(slot);
        } else {
            let me = slot.lock().unwrap().take();
            assert!(me.is_some(), "deleted BH ran again");
            drop(me);
        }
    });
    (slot, n)
}

/// /aio/bh/schedule
#[test]
fn schedule_runs_once() {
    let _w = watchdog("schedule_runs_once");
    let ctx = ctx();
    let n = Counter::new();
    let bh = ctx.bh_new(n.cb());

    assert!(!bh.is_scheduled());
    bh.schedule();
    assert!(bh.is_scheduled());
    assert_eq!(n.get(), 0, "schedule must not run the callback");

    assert!(ctx.poll(true), "running a BH is progress");
    assert_eq!(n.get(), 1);
    assert!(!bh.is_scheduled());

    assert!(!ctx.poll(false));
    assert_eq!(n.get(), 1);
    bh.delete();
}

/// Scheduling an already scheduled BH does nothing: it runs once.
#[test]
fn schedule_twice_runs_once() {
    let _w = watchdog("schedule_twice_runs_once");
    let ctx = ctx();
    let n = Counter::new();
    let bh = ctx.bh_new(n.cb());
    for _ in 0..5 {
        bh.schedule();
    }
    assert!(ctx.poll(false));
    assert_eq!(n.get(), 1);
    assert!(!ctx.poll(false));
    assert_eq!(n.get(), 1);
    // And it can be scheduled again after running.
    bh.schedule();
    assert!(ctx.poll(false));
    assert_eq!(n.get(), 2);
}

/// /aio/bh/schedule10: a BH that reschedules itself runs exactly once per poll.
#[test]
fn schedule10_one_run_per_poll() {
    let _w = watchdog("schedule10_one_run_per_poll");
    let ctx = ctx();
    let (slot, n) = counting_bh(&ctx, 10);

    schedule_slot(&slot);
    assert_eq!(n.get(), 0);

    assert!(ctx.poll(false));
    assert_eq!(n.get(), 1);

    assert!(ctx.poll(true));
    assert_eq!(n.get(), 2);

    // Every further poll runs it exactly once, blocking or not, until it stops rescheduling.
    let mut polls = 0;
    while n.get() < 10 {
        let before = n.get();
        assert!(ctx.poll(polls % 2 == 0));
        assert_eq!(
            n.get(),
            before + 1,
            "a self-rescheduling BH ran more than once in a poll"
        );
        polls += 1;
    }
    assert_eq!(polls, 8);
    assert_eq!(n.get(), 10);

    assert!(!ctx.poll(false));
    assert_eq!(n.get(), 10);
}

/// A BH that always reschedules itself neither starves the loop nor runs twice per poll.
#[test]
fn self_rescheduling_forever_runs_once_per_poll() {
    let _w = watchdog("self_rescheduling_forever_runs_once_per_poll");
    let ctx = ctx();
    let (slot, n) = counting_bh(&ctx, usize::MAX);
    schedule_slot(&slot);
    for i in 1..=1000 {
        assert!(ctx.poll(i % 3 == 0));
        assert_eq!(n.get(), i);
    }
    // Deleting it stops it, even though it is scheduled.
    drop(slot.lock().unwrap().take());
    assert!(!ctx.poll(false));
    assert_eq!(n.get(), 1000);
}

/// /aio/bh/cancel
#[test]
fn cancel_stops_pending_run() {
    let _w = watchdog("cancel_stops_pending_run");
    let ctx = ctx();
    let n = Counter::new();
    let bh = ctx.bh_new(n.cb());

    bh.schedule();
    assert_eq!(n.get(), 0);
    bh.cancel();
    assert!(!bh.is_scheduled());
    assert_eq!(n.get(), 0);

    assert!(!ctx.poll(false), "a cancelled BH is not progress");
    assert_eq!(n.get(), 0);

    // A cancelled BH can be scheduled again.
    bh.schedule();
    assert!(ctx.poll(false));
    assert_eq!(n.get(), 1);
    // Cancelling an idle BH (not scheduled) is harmless.
    bh.cancel();
    assert!(!ctx.poll(false));
    assert_eq!(n.get(), 1);
}

/// A cancelled BH's wake-up does not make a blocking poll report progress, nor block it.
#[test]
fn cancelled_bh_blocking_poll_returns_false() {
    let _w = watchdog("cancelled_bh_blocking_poll_returns_false");
    let ctx = ctx();
    let n = Counter::new();
    let bh = ctx.bh_new(n.cb());
    bh.schedule();
    bh.cancel();
    // The schedule's notify is pending, so this does not block; nothing ran, so it is false.
    assert!(!ctx.poll(true));
    assert_eq!(n.get(), 0);
}

/// /aio/bh/delete: deleting a scheduled BH stops it and frees its callback without running it.
#[test]
fn delete_stops_pending_run_and_frees() {
    let _w = watchdog("delete_stops_pending_run_and_frees");
    let ctx = ctx();
    let n = Counter::new();
    let token = Arc::new(());
    let t = token.clone();
    let c = n.clone();
    let bh = ctx.bh_new(move || {
        let _ = &t;
        c.hit();
    });

    bh.schedule();
    assert_eq!(n.get(), 0);
    bh.delete();
    assert_eq!(n.get(), 0);

    assert!(!ctx.poll(false), "a deleted BH is not progress");
    assert_eq!(n.get(), 0);
    assert_eq!(
        Arc::strong_count(&token),
        1,
        "a deleted BH's callback must be freed once the loop has run"
    );
}

/// Deleting a BH that is not scheduled frees its callback at once.
#[test]
fn delete_unscheduled_frees_immediately() {
    let _w = watchdog("delete_unscheduled_frees_immediately");
    let ctx = ctx();
    let token = Arc::new(());
    let t = token.clone();
    let bh = ctx.bh_new(move || {
        let _ = &t;
    });
    assert_eq!(Arc::strong_count(&token), 2);
    drop(bh);
    assert_eq!(Arc::strong_count(&token), 1);
    assert!(!ctx.poll(false));
}

/// /aio/bh/callback-delete/one
#[test]
fn callback_delete_one() {
    let _w = watchdog("callback_delete_one");
    let ctx = ctx();
    let (slot, n) = deleting_bh(&ctx, 1);
    schedule_slot(&slot);
    assert_eq!(n.get(), 0);

    while n.get() < 1 {
        ctx.poll(true);
    }
    assert_eq!(n.get(), 1);
    assert!(slot.lock().unwrap().is_none());
    assert!(!ctx.poll(false));
    // The callback owned a clone of the slot; it was freed with the BH.
    assert_eq!(
        Arc::strong_count(&slot),
        1,
        "self-deleted BH's callback not freed"
    );
}

/// /aio/bh/callback-delete/many: every BH pending when a poll starts runs in that poll, even
/// if some of them delete themselves.
#[test]
fn callback_delete_many() {
    let _w = watchdog("callback_delete_many");
    let ctx = ctx();
    let maxes = [1, 3, 2, 4];
    let bhs: Vec<_> = maxes.iter().map(|&m| deleting_bh(&ctx, m)).collect();
    for (slot, _) in &bhs {
        schedule_slot(slot);
    }
    for (_, n) in &bhs {
        assert_eq!(n.get(), 0);
    }

    assert!(ctx.poll(false));
    for (_, n) in &bhs {
        assert_eq!(n.get(), 1, "every pending BH runs in the first poll");
    }
    assert!(bhs[0].0.lock().unwrap().is_none());

    let mut polls = 0;
    while bhs.iter().zip(maxes).any(|((_, n), m)| n.get() < m) {
        ctx.poll(true);
        polls += 1;
    }
    // One run per poll: the longest-lived BH needs max - 1 further polls.
    assert_eq!(polls, 3);
    for ((slot, n), m) in bhs.iter().zip(maxes) {
        assert_eq!(n.get(), m);
        assert!(slot.lock().unwrap().is_none());
    }
    assert!(!ctx.poll(false));
}

/// Every BH pending when a poll starts runs in that poll, even when callbacks delete themselves
/// or other BHs; the BHs deleted before their turn never run.
#[test]
fn pending_bhs_survive_deletions_in_the_same_poll() {
    let _w = watchdog("pending_bhs_survive_deletions_in_the_same_poll");
    let ctx = ctx();
    const N: usize = 12;
    let runs: Arc<Vec<AtomicUsize>> = Arc::new((0..N).map(|_| AtomicUsize::new(0)).collect());
    let deleted: Arc<Vec<AtomicBool>> = Arc::new((0..N).map(|_| AtomicBool::new(false)).collect());
    let slots: Arc<Vec<BhSlot>> = Arc::new((0..N).map(|_| Arc::new(Mutex::new(None))).collect());
    let ran_after_delete = Arc::new(AtomicBool::new(false));

    // Who deletes whom: 2 deletes itself; 4 deletes 9 (still pending at its turn if FIFO);
    // 7 deletes 1 (already ran); 10 deletes itself and 11.
    let plan: Vec<Vec<usize>> = (0..N)
        .map(|i| match i {
            2 => vec![2],
            4 => vec![9],
            7 => vec![1],
            10 => vec![10, 11],
            _ => vec![],
        })
        .collect();

    for (i, victims) in plan.into_iter().enumerate() {
        let (runs, deleted, weak_slots, bad) = (
            runs.clone(),
            deleted.clone(),
            Arc::downgrade(&slots),
            ran_after_delete.clone(),
        );
        let bh = ctx.bh_new(move || {
            if deleted[i].load(Ordering::SeqCst) {
                bad.store(true, Ordering::SeqCst);
            }
            runs[i].fetch_add(1, Ordering::SeqCst);
            let slots = weak_slots.upgrade().unwrap();
            for &v in &victims {
                let bh = slots[v].lock().unwrap().take();
                drop(bh);
                deleted[v].store(true, Ordering::SeqCst);
            }
        });
        *slots[i].lock().unwrap() = Some(bh);
    }
    for s in slots.iter() {
        schedule_slot(s);
    }

    assert!(ctx.poll(false));
    assert!(!ran_after_delete.load(Ordering::SeqCst), "a deleted BH ran");
    for i in 0..N {
        let r = runs[i].load(Ordering::SeqCst);
        if i == 9 || i == 11 {
            assert!(r <= 1, "BH {i} ran {r} times");
        } else {
            assert_eq!(
                r, 1,
                "BH {i} was pending at the start of the poll but ran {r} times"
            );
        }
    }
    assert!(!ctx.poll(false));
    for i in [1, 2, 9, 10, 11] {
        assert!(slots[i].lock().unwrap().is_none());
    }
}

/// /aio/bh/flush: a blocking poll runs the pending BH without blocking, then nothing is left.
#[test]
fn flush() {
    let _w = watchdog("flush");
    let ctx = ctx();
    let n = Counter::new();
    let bh = ctx.bh_new(n.cb());
    bh.schedule();
    assert_eq!(n.get(), 0);
    assert!(ctx.poll(true));
    assert_eq!(n.get(), 1);
    assert_eq!(drain(&ctx), 0);
    assert_eq!(n.get(), 1);
}

/// A BH scheduled by another BH runs soon (this poll or the next) and never blocks the loop.
#[test]
fn bh_scheduled_from_bh() {
    let _w = watchdog("bh_scheduled_from_bh");
    let ctx = ctx();
    let nb = Counter::new();
    let b = Arc::new(ctx.bh_new(nb.cb()));
    let na = Counter::new();
    let (b2, c) = (b.clone(), na.clone());
    let a = ctx.bh_new(move || {
        c.hit();
        b2.schedule();
    });
    a.schedule();
    let mut polls = 0;
    while nb.get() == 0 {
        assert!(ctx.poll(true), "each poll here runs a BH");
        polls += 1;
    }
    assert!(polls <= 2, "the scheduled BH waited {polls} polls");
    assert_eq!(na.get(), 1);
    assert_eq!(nb.get(), 1);
    assert!(!ctx.poll(false));
}

/// Idle BHs run, but are not progress; the first schedule wins over a later schedule_idle, and
/// schedule() upgrades a pending idle schedule.
#[test]
fn idle_bh_is_not_progress() {
    let _w = watchdog("idle_bh_is_not_progress");
    let ctx = ctx();
    let n = Counter::new();
    let bh = ctx.bh_new(n.cb());

    bh.schedule_idle();
    assert!(bh.is_scheduled());
    assert_eq!(
        ctx.compute_timeout(),
        10_000_000,
        "idle BHs cap the wait at 10 ms"
    );
    assert!(!ctx.poll(true), "an idle BH is not progress");
    assert_eq!(n.get(), 1, "the idle BH ran");
    assert!(!ctx.poll(false));
    assert_eq!(n.get(), 1);

    // schedule() after schedule_idle(): a normal schedule, which is progress.
    bh.schedule_idle();
    bh.schedule();
    assert_eq!(ctx.compute_timeout(), 0);
    assert!(ctx.poll(false));
    assert_eq!(n.get(), 2);

    // schedule_idle() after schedule(): stays a normal schedule.
    bh.schedule();
    bh.schedule_idle();
    assert!(ctx.poll(false));
    assert_eq!(n.get(), 3);

    // A cancelled idle BH does not run.
    bh.schedule_idle();
    bh.cancel();
    assert!(!ctx.poll(false));
    assert_eq!(n.get(), 3);
}

/// An idle BH that keeps rescheduling itself never makes poll report progress, while a normal
/// BH next to it does.
#[test]
fn idle_bh_mixed_with_normal_bh() {
    let _w = watchdog("idle_bh_mixed_with_normal_bh");
    let ctx = ctx();
    let ni = Counter::new();
    let c = ni.clone();
    let idle = self_bh(&ctx, move |slot| {
        c.hit();
        if let Some(bh) = slot.lock().unwrap().as_ref() {
            bh.schedule_idle();
        }
    });
    let nn = Counter::new();
    let normal = ctx.bh_new(nn.cb());
    idle.lock().unwrap().as_ref().unwrap().schedule_idle();
    for i in 1..=20 {
        if i % 4 == 0 {
            normal.schedule();
            assert!(ctx.poll(false));
        } else {
            assert!(!ctx.poll(i % 2 == 0));
        }
        assert_eq!(ni.get(), i, "the idle BH runs once per poll");
    }
    assert_eq!(nn.get(), 5);
    drop(idle.lock().unwrap().take());
}

/// One-shot BHs run exactly once, count as progress, and are freed after running.
#[test]
fn oneshot_runs_once_and_is_freed() {
    let _w = watchdog("oneshot_runs_once_and_is_freed");
    let ctx = ctx();
    let n = Counter::new();
    let token = Arc::new(());
    for _ in 0..3 {
        let (c, t) = (n.clone(), token.clone());
        ctx.bh_schedule_oneshot(move || {
            let _ = &t;
            c.hit();
        });
    }
    assert_eq!(n.get(), 0);
    assert_eq!(ctx.compute_timeout(), 0);
    assert!(ctx.poll(true));
    assert_eq!(n.get(), 3, "every pending one-shot BH runs in one poll");
    assert_eq!(
        Arc::strong_count(&token),
        1,
        "one-shot callbacks freed after running"
    );
    assert!(!ctx.poll(false));
    assert_eq!(n.get(), 3);
}

/// The cost of a poll grows with the BHs scheduled, not with those created: with 1,000,000
/// created and idle BHs, a poll with one scheduled BH runs exactly that one and the context is
/// idle again after one poll. (Structural check: the other callbacks are never looked at, since
/// none runs and no extra poll is needed; nothing is timed.)
#[test]
fn million_idle_bhs_do_not_disturb_poll() {
    let _w = watchdog("million_idle_bhs_do_not_disturb_poll");
    let ctx = ctx();
    const CREATED: usize = 1_000_000;
    let others = Counter::new();
    let mut bhs: Vec<Bh> = Vec::with_capacity(CREATED);
    for _ in 0..CREATED {
        bhs.push(ctx.bh_new(others.cb()));
    }
    assert_eq!(ctx.compute_timeout(), -1, "no BH is scheduled");
    assert!(!ctx.poll(false));

    let n = Counter::new();
    let one = ctx.bh_new(n.cb());
    one.schedule();
    assert_eq!(ctx.compute_timeout(), 0);
    assert!(ctx.poll(true));
    assert_eq!(n.get(), 1);
    assert_eq!(others.get(), 0);
    assert_eq!(drain(&ctx), 0, "one poll was enough");

    // Scheduling one of the million works the same way.
    bhs[CREATED / 2].schedule();
    assert!(ctx.poll(true));
    assert_eq!(others.get(), 1);
    assert!(!ctx.poll(false));
    drop(bhs);
    assert!(!ctx.poll(false));
}

/// Scheduling from other threads wakes a blocked poll (here each thread's BH is waited for).
#[test]
fn schedule_from_other_thread_wakes_poll() {
    let _w = watchdog("schedule_from_other_thread_wakes_poll");
    let ctx = ctx();
    let n = Counter::new();
    let bh = Arc::new(ctx.bh_new(n.cb()));
    for round in 1..=50 {
        let bh = bh.clone();
        let t = std::thread::spawn(move || bh.schedule());
        while n.get() < round {
            ctx.poll(true);
        }
        t.join().unwrap();
        assert_eq!(n.get(), round);
    }
}

/// A BH callback may remove a handler and delete a timer that are both ready in the same poll:
/// neither runs afterwards.
#[test]
fn bh_removes_ready_handler_and_timer() {
    let _w = watchdog("bh_removes_ready_handler_and_timer");
    let ctx = ctx();
    let e = Arc::new(aioctx::EventNotifier::new().unwrap());
    let (nh, nt) = (Counter::new(), Counter::new());
    ctx.set_event_notifier(&e, nh.handler()).unwrap();
    let timer: Arc<Mutex<Option<aioctx::Timer>>> = Arc::new(Mutex::new(Some(ctx.timer_new(
        aioctx::ClockType::Realtime,
        1,
        nt.cb(),
    ))));
    drain(&ctx);
    let (w, e2, t2) = (ctx.downgrade(), e.clone(), timer.clone());
    let bh = ctx.bh_new(move || {
        w.upgrade().unwrap().set_event_notifier(&e2, None).unwrap();
        drop(t2.lock().unwrap().take());
    });
    e.set().unwrap();
    timer.lock().unwrap().as_ref().unwrap().modify(0);
    bh.schedule();
    // BHs run before handlers and timers within a poll.
    assert!(ctx.poll(false));
    assert!(!ctx.poll(false));
    assert_eq!((nh.get(), nt.get()), (0, 0));
    assert!(ctx.registered_fds().is_empty());
}

/// Deleting a BH from another thread while its callback runs on the loop waits for the callback
/// to return: once `delete` returns, the callback is neither running nor ever called again.
/// The callback keeps running for a while after the deleter announces itself, so a `delete`
/// that did not wait would return first and see `finished == false`.
#[test]
fn delete_from_another_thread_waits_for_the_running_callback() {
    let _w = watchdog("delete_from_another_thread_waits_for_the_running_callback");
    let ctx = ctx();
    let deleting = Arc::new(AtomicBool::new(false));
    let finished = Arc::new(AtomicBool::new(false));
    let runs = Counter::new();
    let (entered_tx, entered_rx) = std::sync::mpsc::channel();
    let (d, f, c) = (deleting.clone(), finished.clone(), runs.clone());
    let bh = ctx.bh_new(move || {
        c.hit();
        let _ = entered_tx.send(());
        while !d.load(Ordering::SeqCst) {
            std::hint::spin_loop();
        }
        // Stay busy well after the deleter has called delete.
        let until = std::time::Instant::now() + std::time::Duration::from_millis(20);
        while std::time::Instant::now() < until {
            std::hint::spin_loop();
        }
        f.store(true, Ordering::SeqCst);
    });
    bh.schedule();
    let c2 = ctx.clone();
    let looper = std::thread::spawn(move || {
        c2.poll(true);
    });
    entered_rx.recv().unwrap();
    let bh = Arc::new(Mutex::new(Some(bh)));
    let deleter = {
        let (bh, deleting, finished) = (bh.clone(), deleting.clone(), finished.clone());
        std::thread::spawn(move || {
            let doomed = bh.lock().unwrap().take().unwrap();
            deleting.store(true, Ordering::SeqCst);
            doomed.delete();
            finished.load(Ordering::SeqCst)
        })
    };
    assert!(
        deleter.join().unwrap(),
        "delete returned while the callback was running"
    );
    looper.join().unwrap();
    assert!(!ctx.poll(false));
    assert_eq!(runs.get(), 1);
}
