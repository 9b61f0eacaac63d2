//! Multi-threaded stress: no schedule is ever lost, nothing runs after its BH or handler was
//! deleted, handlers churn from other threads under load, and cross-thread wake-ups (notify,
//! schedule, timer modify, lock contention) never leave a blocking poll hanging. A hang is
//! caught by the watchdog.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Barrier, Mutex};

use aioctx::{clock_get_ns, AioContext, Bh, ClockType, EventNotifier, SCALE_NS};
use common::{ctx, drain, handler, watchdog, watchdog_for, Counter};

/// A small deterministic PRNG (xorshift), so the threads' choices differ without extra crates.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// Runs `ctx.poll(true)` on the calling thread until `stop` is set (the setter then notifies),
/// counting completed polls in `polls`.
fn run_loop(ctx: &AioContext, stop: &AtomicBool, polls: &AtomicUsize) {
    while !stop.load(Ordering::SeqCst) {
        ctx.poll(true);
        polls.fetch_add(1, Ordering::SeqCst);
    }
}

/// Waits until the loop thread has completed two polls that started after this call (so any
/// callback it had already started has returned, and any later poll saw our changes).
fn wait_two_polls(ctx: &AioContext, polls: &AtomicUsize) {
    let p0 = polls.load(Ordering::SeqCst);
    for k in 1..=2 {
        ctx.notify();
        while polls.load(Ordering::SeqCst) < p0 + k {
            ctx.notify();
            std::thread::yield_now();
        }
    }
}

/// 4 threads schedule a shared set of BHs 1,000,000 times in total while the loop polls. Every
/// schedule is followed by a run after it: each callback records the newest request it has seen,
/// and after the last schedule every BH's record equals its request count. Along the way every
/// 256th schedule is waited for, which checks that it woke the (usually blocked) loop.
#[test]
fn million_schedules_none_lost() {
    let _w = watchdog_for(
        "million_schedules_none_lost",
        std::time::Duration::from_secs(60),
    );
    let ctx = ctx();
    const BHS: usize = 64;
    const THREADS: usize = 4;
    const TOTAL: usize = 1_000_000;
    let requested: Arc<Vec<AtomicUsize>> =
        Arc::new((0..BHS).map(|_| AtomicUsize::new(0)).collect());
    let observed: Arc<Vec<AtomicUsize>> = Arc::new((0..BHS).map(|_| AtomicUsize::new(0)).collect());
    let runs: Arc<Vec<AtomicUsize>> = Arc::new((0..BHS).map(|_| AtomicUsize::new(0)).collect());
    let bhs: Arc<Vec<Bh>> = Arc::new(
        (0..BHS)
            .map(|k| {
                let (req, obs, runs) = (requested.clone(), observed.clone(), runs.clone());
                ctx.bh_new(move || {
                    let seen = req[k].load(Ordering::SeqCst);
                    obs[k].fetch_max(seen, Ordering::SeqCst);
                    runs[k].fetch_add(1, Ordering::SeqCst);
                })
            })
            .collect(),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let polls = Arc::new(AtomicUsize::new(0));
    let start = Arc::new(Barrier::new(THREADS));
    let producers: Vec<_> = (0..THREADS)
        .map(|t| {
            let (bhs, req, obs, start) = (
                bhs.clone(),
                requested.clone(),
                observed.clone(),
                start.clone(),
            );
            std::thread::spawn(move || {
                let mut rng = Rng::new(t as u64 + 1);
                start.wait();
                for i in 0..TOTAL / THREADS {
                    let k = rng.below(BHS);
                    let r = req[k].fetch_add(1, Ordering::SeqCst) + 1;
                    bhs[k].schedule();
                    if i % 256 == 0 {
                        while obs[k].load(Ordering::SeqCst) < r {
                            std::thread::yield_now();
                        }
                    }
                }
            })
        })
        .collect();
    let joiner = {
        let (ctx, stop) = (ctx.clone(), stop.clone());
        std::thread::spawn(move || {
            for p in producers {
                p.join().unwrap();
            }
            stop.store(true, Ordering::SeqCst);
            ctx.notify();
        })
    };
    run_loop(&ctx, &stop, &polls);
    joiner.join().unwrap();
    drain(&ctx);

    let total: usize = requested.iter().map(|r| r.load(Ordering::SeqCst)).sum();
    assert_eq!(total, TOTAL);
    for k in 0..BHS {
        let (req, obs, run) = (
            requested[k].load(Ordering::SeqCst),
            observed[k].load(Ordering::SeqCst),
            runs[k].load(Ordering::SeqCst),
        );
        assert_eq!(obs, req, "BH {k}: a schedule was lost ({run} runs)");
        assert!(
            run >= 1 && run <= req,
            "BH {k}: {run} runs for {req} schedules"
        );
    }
    assert!(!ctx.poll(false));
    eprintln!(
        "million_schedules_none_lost: {} polls, {} runs",
        polls.load(Ordering::SeqCst),
        runs.iter().map(|r| r.load(Ordering::SeqCst)).sum::<usize>()
    );
}

struct Generation {
    /// Set once the BH's handle has been dropped (delete returned).
    dropped: AtomicBool,
    /// Set once the loop has also completed two polls after the drop.
    dead: AtomicBool,
}

/// BHs are deleted (their handles dropped) from another thread while producers schedule them
/// and the loop runs them. No callback ever runs once delete has returned and the loop has moved
/// on (two further polls), and every callback of a deleted BH is freed.
#[test]
fn deleted_bhs_never_run() {
    let _w = watchdog("deleted_bhs_never_run");
    let ctx = ctx();
    const SLOTS: usize = 16;
    let rounds = 5_000;
    let slots: Arc<Vec<Mutex<Option<Bh>>>> =
        Arc::new((0..SLOTS).map(|_| Mutex::new(None)).collect());
    let ran_dead = Arc::new(AtomicUsize::new(0));
    let ran_after_drop = Arc::new(AtomicUsize::new(0));
    let runs = Counter::new();
    let tokens = Arc::new(Mutex::new(Vec::new()));
    let make = |ctx: &AioContext| {
        let g = Arc::new(Generation {
            dropped: AtomicBool::new(false),
            dead: AtomicBool::new(false),
        });
        let token = Arc::new(());
        tokens.lock().unwrap().push(Arc::downgrade(&token));
        let (g2, rd, rad, runs) = (
            g.clone(),
            ran_dead.clone(),
            ran_after_drop.clone(),
            runs.clone(),
        );
        let bh = ctx.bh_new(move || {
            let _ = &token;
            if g2.dead.load(Ordering::SeqCst) {
                rd.fetch_add(1, Ordering::SeqCst);
            }
            if g2.dropped.load(Ordering::SeqCst) {
                rad.fetch_add(1, Ordering::SeqCst);
            }
            runs.hit();
        });
        (bh, g)
    };
    let mut gens: Vec<Arc<Generation>> = Vec::new();
    for slot in slots.iter() {
        let (bh, g) = make(&ctx);
        *slot.lock().unwrap() = Some(bh);
        gens.push(g);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let polls = Arc::new(AtomicUsize::new(0));
    let producers_stop = Arc::new(AtomicBool::new(false));
    let producers: Vec<_> = (0..2)
        .map(|t| {
            let (slots, ps) = (slots.clone(), producers_stop.clone());
            std::thread::spawn(move || {
                let mut rng = Rng::new(100 + t);
                let mut n = 0u32;
                while !ps.load(Ordering::SeqCst) {
                    if let Some(bh) = slots[rng.below(SLOTS)].lock().unwrap().as_ref() {
                        bh.schedule();
                    }
                    // Leave the loop and deleter threads CPU time on a 2-core machine.
                    n += 1;
                    if n.is_multiple_of(16) {
                        std::thread::yield_now();
                    }
                }
            })
        })
        .collect();
    let looper = {
        let (ctx, stop, polls) = (ctx.clone(), stop.clone(), polls.clone());
        std::thread::spawn(move || run_loop(&ctx, &stop, &polls))
    };

    let mut rng = Rng::new(7);
    for _ in 0..rounds {
        let k = rng.below(SLOTS);
        let old = slots[k].lock().unwrap().take();
        drop(old);
        gens[k].dropped.store(true, Ordering::SeqCst);
        wait_two_polls(&ctx, &polls);
        gens[k].dead.store(true, Ordering::SeqCst);
        let (bh, g) = make(&ctx);
        *slots[k].lock().unwrap() = Some(bh);
        gens[k] = g;
    }
    producers_stop.store(true, Ordering::SeqCst);
    for p in producers {
        p.join().unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    ctx.notify();
    looper.join().unwrap();
    for slot in slots.iter() {
        slot.lock().unwrap().take();
    }
    drain(&ctx);
    assert_eq!(
        ran_dead.load(Ordering::SeqCst),
        0,
        "a deleted BH ran after the loop moved on"
    );
    assert!(runs.get() > 0);
    let leaked = tokens
        .lock()
        .unwrap()
        .iter()
        .filter(|w| w.strong_count() > 0)
        .count();
    assert_eq!(
        leaked, 0,
        "{leaked} deleted BHs' callbacks were never freed"
    );
    let late = ran_after_drop.load(Ordering::SeqCst);
    if late > 0 {
        eprintln!(
            "deleted_bhs_never_run: {late} callbacks started after delete() returned \
             (already dequeued by the running poll)"
        );
    }
}

/// fd handlers are registered and removed from another thread while a third thread keeps their
/// notifiers set and the loop dispatches: a handler only ever runs with its notifier really set,
/// never once its removal returned and the loop moved on, and every final registration works.
#[test]
fn handler_churn_from_other_threads() {
    let _w = watchdog("handler_churn_from_other_threads");
    let ctx = ctx();
    const FDS: usize = 8;
    let rounds = 4_000;
    let notifiers: Arc<Vec<EventNotifier>> =
        Arc::new((0..FDS).map(|_| EventNotifier::new().unwrap()).collect());
    let ran_dead = Arc::new(AtomicUsize::new(0));
    let not_ready = Arc::new(AtomicUsize::new(0));
    let register = |ctx: &AioContext, k: usize| -> (Arc<AtomicBool>, Counter) {
        let dead = Arc::new(AtomicBool::new(false));
        let runs = Counter::new();
        let (d, r, n, rd, nr) = (
            dead.clone(),
            runs.clone(),
            notifiers.clone(),
            ran_dead.clone(),
            not_ready.clone(),
        );
        ctx.set_event_notifier(
            &notifiers[k],
            handler(move || {
                if d.load(Ordering::SeqCst) {
                    rd.fetch_add(1, Ordering::SeqCst);
                }
                if !n[k].test_and_clear() {
                    nr.fetch_add(1, Ordering::SeqCst);
                }
                r.hit();
            }),
        )
        .unwrap();
        (dead, runs)
    };
    let mut live: Vec<Option<(Arc<AtomicBool>, Counter)>> = (0..FDS).map(|_| None).collect();

    let stop = Arc::new(AtomicBool::new(false));
    let polls = Arc::new(AtomicUsize::new(0));
    let setter_stop = Arc::new(AtomicBool::new(false));
    let setter = {
        let (n, s) = (notifiers.clone(), setter_stop.clone());
        std::thread::spawn(move || {
            let mut rng = Rng::new(3);
            let mut i = 0u32;
            while !s.load(Ordering::SeqCst) {
                n[rng.below(FDS)].set().unwrap();
                i += 1;
                if i.is_multiple_of(16) {
                    std::thread::yield_now();
                }
            }
        })
    };
    let looper = {
        let (ctx, stop, polls) = (ctx.clone(), stop.clone(), polls.clone());
        std::thread::spawn(move || run_loop(&ctx, &stop, &polls))
    };
    let mut rng = Rng::new(11);
    for _ in 0..rounds {
        let k = rng.below(FDS);
        match live[k].take() {
            Some((dead, _)) => {
                ctx.set_event_notifier(&notifiers[k], None).unwrap();
                wait_two_polls(&ctx, &polls);
                dead.store(true, Ordering::SeqCst);
            }
            None => live[k] = Some(register(&ctx, k)),
        }
    }
    setter_stop.store(true, Ordering::SeqCst);
    setter.join().unwrap();
    // Final registrations: each must fire once its notifier is set.
    for (k, slot) in live.iter_mut().enumerate() {
        if let Some((dead, _)) = slot.take() {
            ctx.set_event_notifier(&notifiers[k], None).unwrap();
            wait_two_polls(&ctx, &polls);
            dead.store(true, Ordering::SeqCst);
        }
        *slot = Some(register(&ctx, k));
        notifiers[k].set().unwrap();
    }
    for (k, slot) in live.iter().enumerate() {
        let runs = &slot.as_ref().unwrap().1;
        let end = std::time::Instant::now() + common::net::LIMIT;
        while runs.get() == 0 {
            assert!(
                std::time::Instant::now() < end,
                "fd {k}: the final registration never ran"
            );
            std::thread::yield_now();
        }
    }
    stop.store(true, Ordering::SeqCst);
    ctx.notify();
    looper.join().unwrap();
    assert_eq!(ran_dead.load(Ordering::SeqCst), 0, "a removed handler ran");
    assert_eq!(
        not_ready.load(Ordering::SeqCst),
        0,
        "a handler ran with its fd not ready"
    );
    for n in notifiers.iter() {
        ctx.set_event_notifier(n, None).unwrap();
    }
    assert!(ctx.registered_fds().is_empty());
}

/// Cross-thread wake-up storm: while noise threads hammer notify(), a pinger hands the loop
/// work by a flag + notify, a BH schedule or a timer modify, one round at a time, and waits for
/// each round to be seen. A lost wake-up leaves the loop's poll(true) blocked and the pinger
/// waiting: the watchdog then fails the test.
#[test]
fn wakeup_storm_never_hangs() {
    let _w = watchdog("wakeup_storm_never_hangs");
    let ctx = ctx();
    let rounds = 60_000;
    let flag_round = Arc::new(AtomicUsize::new(0));
    let bh_runs = Counter::new();
    let timer_runs = Counter::new();
    let bh = Arc::new(ctx.bh_new(bh_runs.cb()));
    let timer = Arc::new(ctx.timer_new(ClockType::Realtime, SCALE_NS, timer_runs.cb()));
    let noise_stop = Arc::new(AtomicBool::new(false));
    let noise: Vec<_> = (0..2)
        .map(|_| {
            let (ctx, s) = (ctx.clone(), noise_stop.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !s.load(Ordering::SeqCst) {
                    ctx.notify();
                    n += 1;
                    if n.is_multiple_of(64) {
                        std::thread::yield_now();
                    }
                }
            })
        })
        .collect();
    let (ack_tx, ack_rx) = mpsc::channel::<usize>();
    let (go_tx, go_rx) = mpsc::channel::<usize>();
    let looper = {
        let (ctx, fr, br, tr) = (
            ctx.clone(),
            flag_round.clone(),
            bh_runs.clone(),
            timer_runs.clone(),
        );
        std::thread::spawn(move || {
            for r in go_rx {
                let (want_flag, want_bh, want_timer) = expected(r);
                while fr.load(Ordering::SeqCst) < want_flag
                    || br.get() < want_bh
                    || tr.get() < want_timer
                {
                    ctx.poll(true);
                }
                ack_tx.send(r).unwrap();
            }
        })
    };
    /// What the counters must reach once round `r` is done: rounds cycle flag, BH, timer.
    fn expected(r: usize) -> (usize, usize, usize) {
        (r, (r + 1) / 3, r / 3)
    }
    for r in 1..=rounds {
        go_tx.send(r).unwrap();
        match r % 3 {
            1 => {
                flag_round.store(r, Ordering::SeqCst);
                ctx.notify();
            }
            2 => {
                flag_round.store(r, Ordering::SeqCst);
                bh.schedule();
            }
            _ => {
                flag_round.store(r, Ordering::SeqCst);
                timer.modify(clock_get_ns(ClockType::Realtime));
            }
        }
        assert_eq!(ack_rx.recv().unwrap(), r);
    }
    drop(go_tx);
    looper.join().unwrap();
    noise_stop.store(true, Ordering::SeqCst);
    for t in noise {
        t.join().unwrap();
    }
    let (_, b, t) = expected(rounds);
    assert_eq!(bh_runs.get(), b);
    assert_eq!(timer_runs.get(), t);
}

/// Many threads call notify() while the loop blocks: every storm ends with the loop responsive
/// (one more notify after the storm always wakes it), and afterwards no stale wake-up is left.
#[test]
fn notify_storm_then_quiet() {
    let _w = watchdog("notify_storm_then_quiet");
    let ctx = ctx();
    let per_thread = 200_000;
    let stop = Arc::new(AtomicBool::new(false));
    let polls = Arc::new(AtomicUsize::new(0));
    let looper = {
        let (ctx, stop, polls) = (ctx.clone(), stop.clone(), polls.clone());
        std::thread::spawn(move || run_loop(&ctx, &stop, &polls))
    };
    let storm: Vec<_> = (0..4)
        .map(|_| {
            let ctx = ctx.clone();
            std::thread::spawn(move || {
                for _ in 0..per_thread {
                    ctx.notify();
                }
            })
        })
        .collect();
    for t in storm {
        t.join().unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    ctx.notify();
    looper.join().unwrap();
    assert!(polls.load(Ordering::SeqCst) >= 1);

    // Quiet: at most one leftover wake-up (the storm's coalesced eventfd write) is consumed, then
    // a blocking poll waits for the timer and runs it.
    let n = Counter::new();
    let t = ctx.timer_new(ClockType::Realtime, SCALE_NS, n.cb());
    t.modify(clock_get_ns(ClockType::Realtime) + 2_000_000);
    let mut spurious = 0;
    while !ctx.poll(true) {
        spurious += 1;
        assert!(
            spurious <= 2,
            "stale wake-ups keep a blocking poll from blocking"
        );
    }
    assert_eq!(n.get(), 1);
}

/// One-shot BHs from many threads: each runs exactly once.
#[test]
fn oneshots_from_many_threads() {
    let _w = watchdog("oneshots_from_many_threads");
    let ctx = ctx();
    const THREADS: usize = 4;
    let per_thread = 50_000;
    let n = Counter::new();
    let producers: Vec<_> = (0..THREADS)
        .map(|_| {
            let (ctx, n) = (ctx.clone(), n.clone());
            std::thread::spawn(move || {
                for _ in 0..per_thread {
                    let n = n.clone();
                    ctx.bh_schedule_oneshot(move || n.hit());
                }
            })
        })
        .collect();
    let total = THREADS * per_thread;
    while n.get() < total {
        ctx.poll(true);
    }
    for p in producers {
        p.join().unwrap();
    }
    drain(&ctx);
    assert_eq!(n.get(), total);
}

/// Threads take the lock and poll while the loop thread blocks in poll(true): the contention
/// kicks never deadlock, and callbacks never run concurrently.
#[test]
fn acquire_and_poll_storm() {
    let _w = watchdog("acquire_and_poll_storm");
    let ctx = ctx();
    let iters = 5_000;
    let inside = Arc::new(AtomicBool::new(false));
    let overlap = Arc::new(AtomicBool::new(false));
    let bh = {
        let (i, o) = (inside.clone(), overlap.clone());
        Arc::new(ctx.bh_new(move || {
            if i.swap(true, Ordering::SeqCst) {
                o.store(true, Ordering::SeqCst);
            }
            std::hint::spin_loop();
            i.store(false, Ordering::SeqCst);
        }))
    };
    let stop = Arc::new(AtomicBool::new(false));
    let polls = Arc::new(AtomicUsize::new(0));
    let looper = {
        let (ctx, stop, polls) = (ctx.clone(), stop.clone(), polls.clone());
        std::thread::spawn(move || run_loop(&ctx, &stop, &polls))
    };
    let workers: Vec<_> = (0..3)
        .map(|t| {
            let (ctx, bh) = (ctx.clone(), bh.clone());
            std::thread::spawn(move || {
                for i in 0..iters {
                    if (i + t) % 2 == 0 {
                        let _g = ctx.acquire();
                        bh.schedule();
                        ctx.poll(false);
                    } else {
                        bh.schedule();
                        ctx.poll(false);
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    ctx.notify();
    looper.join().unwrap();
    assert!(!overlap.load(Ordering::SeqCst), "two callbacks ran at once");
}

/// Several loops on several contexts, cross-scheduling each other's BHs (a ring of ping-pongs).
#[test]
fn ring_of_contexts() {
    let _w = watchdog("ring_of_contexts");
    const N: usize = 4;
    let hops = 20_000;
    let ctxs: Vec<AioContext> = (0..N).map(|_| ctx()).collect();
    let count = Arc::new(AtomicUsize::new(0));
    let bhs: Arc<Mutex<Vec<Arc<Bh>>>> = Arc::new(Mutex::new(Vec::new()));
    for (i, c) in ctxs.iter().enumerate() {
        let (count, weak_bhs) = (count.clone(), Arc::downgrade(&bhs));
        let bh = c.bh_new(move || {
            let n = count.fetch_add(1, Ordering::SeqCst) + 1;
            if n < hops {
                let all = weak_bhs.upgrade().unwrap();
                let next = all.lock().unwrap()[(i + 1) % N].clone();
                next.schedule();
            }
        });
        bhs.lock().unwrap().push(Arc::new(bh));
    }
    let threads: Vec<_> = ctxs
        .iter()
        .map(|c| {
            let (c, count) = (c.clone(), count.clone());
            std::thread::spawn(move || {
                while count.load(Ordering::SeqCst) < hops {
                    c.poll(true);
                }
            })
        })
        .collect();
    let first = bhs.lock().unwrap()[0].clone();
    first.schedule();
    // The loops that are still blocked when the last hop lands need a final kick.
    while count.load(Ordering::SeqCst) < hops {
        std::thread::yield_now();
    }
    for c in &ctxs {
        c.notify();
    }
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(count.load(Ordering::SeqCst), hops);
}
