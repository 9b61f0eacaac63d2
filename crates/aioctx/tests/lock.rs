//! The context lock (QEMU's RFifoLock, aio_context_acquire/release): recursion (test-rfifolock
//! /nesting), the contention kick out of a blocking poll (/callback and test-aio /aio/acquire),
//! FIFO fairness and mutual exclusion across threads.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Barrier, Mutex};

use aioctx::EventNotifier;
use common::{ctx, handler, watchdog, Counter};

/// test-rfifolock /nesting: the lock is recursive; fully released after the last guard.
#[test]
fn nesting() {
    let _w = watchdog("nesting");
    let ctx = ctx();
    let g1 = ctx.acquire();
    let g2 = ctx.acquire();
    let g3 = ctx.acquire();
    // poll takes the lock too: it nests inside ours.
    assert!(!ctx.poll(false));
    drop(g3);
    drop(g2);

    // Still held: another thread cannot get it until the last guard goes.
    let got = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let t = {
        let (ctx, got) = (ctx.clone(), got.clone());
        std::thread::spawn(move || {
            tx.send(()).unwrap();
            let _g = ctx.acquire();
            got.store(true, Ordering::SeqCst);
        })
    };
    rx.recv().unwrap();
    // The other thread's contention notify kicks this poll; it must still not have the lock.
    ctx.poll(true);
    assert!(
        !got.load(Ordering::SeqCst),
        "lock taken while still held (nested)"
    );
    drop(g1);
    t.join().unwrap();
    assert!(got.load(Ordering::SeqCst));
    // And the lock is free again here.
    let _g = ctx.acquire();
}

/// /aio/acquire and test-rfifolock /callback: a thread blocked in acquire kicks the holder out of
/// a blocking poll (which returns false: nothing ran), and gets the lock after release.
#[test]
fn acquire_kicks_owner_out_of_blocking_poll() {
    let _w = watchdog("acquire_kicks_owner_out_of_blocking_poll");
    let ctx = ctx();
    // A dummy notifier makes the poll really wait on descriptors; it must never fire.
    let e = EventNotifier::new().unwrap();
    ctx.set_event_notifier(&e, handler(|| panic!("dummy notifier must not fire")))
        .unwrap();
    assert!(!ctx.poll(false), "consume the registration's notify");

    let start = Arc::new(Mutex::new(()));
    let start_guard = start.lock().unwrap();
    let acquired = Arc::new(AtomicBool::new(false));
    let t = {
        let (ctx, start, acquired) = (ctx.clone(), start.clone(), acquired.clone());
        std::thread::spawn(move || {
            drop(start.lock().unwrap());
            let g = ctx.acquire();
            drop(g);
            acquired.store(true, Ordering::SeqCst);
        })
    };
    {
        let _g = ctx.acquire();
        drop(start_guard);
        assert!(
            !ctx.poll(true),
            "kicked out by the waiting thread; nothing ran"
        );
        assert!(!acquired.load(Ordering::SeqCst));
    }
    t.join().unwrap();
    assert!(acquired.load(Ordering::SeqCst));
    ctx.set_event_notifier(&e, None).unwrap();
}

/// A loop thread blocked in poll(true) (which holds the lock while it waits) is kicked out by
/// acquire() from another thread, every time.
#[test]
fn acquire_from_other_thread_preempts_polling_loop() {
    let _w = watchdog("acquire_from_other_thread_preempts_polling_loop");
    let ctx = ctx();
    let stop = Arc::new(AtomicBool::new(false));
    let polls = Counter::new();
    let ready = Arc::new(Barrier::new(2));
    let looper = {
        let (ctx, stop, polls, ready) = (ctx.clone(), stop.clone(), polls.clone(), ready.clone());
        std::thread::spawn(move || {
            ready.wait();
            while !stop.load(Ordering::SeqCst) {
                // Counted under the lock, so the count cannot move while another thread holds it.
                let _g = ctx.acquire();
                ctx.poll(true);
                polls.hit();
            }
        })
    };
    ready.wait();
    for _ in 0..200 {
        let g = ctx.acquire();
        // While we hold it, polls from the loop thread cannot complete.
        let p = polls.get();
        assert!(!ctx.poll(false));
        assert_eq!(polls.get(), p);
        drop(g);
    }
    stop.store(true, Ordering::SeqCst);
    ctx.notify();
    looper.join().unwrap();
}

/// Waits, without blocking, until another thread's contention kick reaches the context, and
/// consumes it. The caller holds the lock and nobody polls meanwhile, so `prepare` (which reports
/// a pending notify and, unlike `poll`, does not consume it) sees exactly the kicks sent since the
/// last `pending`. A waiter kicks once, after it took its ticket, then sleeps; so when this
/// returns, that waiter is queued.
fn wait_for_kick(ctx: &aioctx::AioContext) {
    while !ctx.prepare() {
        std::thread::yield_now();
    }
    // Consume it: clears the notify and ends the outer-loop wait `prepare` announced.
    ctx.pending();
}

/// FIFO fairness: threads get the lock in the order they started waiting for it. The order is
/// established without sleeping: each waiter's contention kick (sent after it took its ticket)
/// is seen by the holder before the next waiter starts.
#[test]
fn fifo_fairness() {
    let _w = watchdog("fifo_fairness");
    let ctx = ctx();
    const WAITERS: usize = 6;
    let order = Arc::new(Mutex::new(Vec::new()));
    let guard = ctx.acquire();
    assert!(!ctx.poll(false));
    assert!(!ctx.prepare(), "no stale notify before the first waiter");
    ctx.pending();
    let mut threads = Vec::new();
    for i in 0..WAITERS {
        let (c, o) = (ctx.clone(), order.clone());
        threads.push(std::thread::spawn(move || {
            let _g = c.acquire();
            o.lock().unwrap().push(i);
        }));
        // Returns once thread i kicked us from inside acquire(), i.e. holds a ticket.
        wait_for_kick(&ctx);
    }
    assert!(order.lock().unwrap().is_empty(), "a waiter got a held lock");
    drop(guard);
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(*order.lock().unwrap(), (0..WAITERS).collect::<Vec<_>>());
}

/// Mutual exclusion across threads, with nested acquisition and polls inside: a plain
/// load-then-store counter loses no update and no two threads are ever inside at once.
#[test]
fn mutual_exclusion_multithread() {
    let _w = watchdog("mutual_exclusion_multithread");
    let ctx = ctx();
    const THREADS: usize = 4;
    let iters = 20_000;
    let inside = Arc::new(AtomicBool::new(false));
    let counter = Arc::new(AtomicUsize::new(0));
    let start = Arc::new(Barrier::new(THREADS));
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let (ctx, inside, counter, start) =
                (ctx.clone(), inside.clone(), counter.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                for i in 0..iters {
                    let _g = ctx.acquire();
                    assert!(!inside.swap(true, Ordering::SeqCst), "two holders at once");
                    let depth = (i + t) % 3;
                    let nested: Vec<_> = (0..depth).map(|_| ctx.acquire()).collect();
                    if i % 64 == 0 {
                        ctx.poll(false);
                    }
                    let v = counter.load(Ordering::Relaxed);
                    std::hint::spin_loop();
                    counter.store(v + 1, Ordering::Relaxed);
                    drop(nested);
                    inside.store(false, Ordering::SeqCst);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(counter.load(Ordering::SeqCst), THREADS * iters);
}

/// No barging: a thread that re-acquires in a tight loop cannot overtake a waiter. Once the
/// waiter holds its ticket (the holder sees its contention kick, sent after the ticket was taken),
/// the spinning holder gets the lock at most twice more (the turn it holds and one ticket it may
/// have taken earlier) before the waiter.
#[test]
fn holder_cannot_overtake_waiter() {
    let _w = watchdog("holder_cannot_overtake_waiter");
    let ctx = ctx();
    let mut contended = 0;
    for _ in 0..50 {
        // No notify left over from the previous round (the hog's own kicks while the waiter
        // held the lock).
        ctx.pending();
        let stop = Arc::new(AtomicBool::new(false));
        let turns = Arc::new(AtomicUsize::new(0));
        let hog = {
            let (ctx, stop, turns) = (ctx.clone(), stop.clone(), turns.clone());
            std::thread::spawn(move || {
                // The turn in which the hog first saw the waiter's kick.
                let mut kicked_at = None;
                while !stop.load(Ordering::SeqCst) {
                    let _g = ctx.acquire();
                    let turn = turns.fetch_add(1, Ordering::SeqCst) + 1;
                    // `prepare` reports a pending notify without consuming it. Nothing else
                    // notifies this context, and the hog never waits while alone.
                    if kicked_at.is_none() && ctx.prepare() {
                        kicked_at = Some(turn);
                    }
                }
                kicked_at
            })
        };
        while turns.load(Ordering::SeqCst) < 10 {
            std::thread::yield_now();
        }
        let waiter = {
            let (ctx, turns) = (ctx.clone(), turns.clone());
            std::thread::spawn(move || {
                let _g = ctx.acquire();
                turns.load(Ordering::SeqCst)
            })
        };
        let at_grant = waiter.join().unwrap();
        stop.store(true, Ordering::SeqCst);
        // None: the waiter found the lock free between two turns and never waited.
        if let Some(before) = hog.join().unwrap() {
            contended += 1;
            assert!(
                at_grant <= before + 2,
                "the holder re-acquired {} times ahead of a waiting thread",
                at_grant - before
            );
        }
    }
    eprintln!("holder_cannot_overtake_waiter: the waiter had to wait in {contended} of 50 rounds");
    assert!(
        contended > 0,
        "no round was contended: fairness was never checked"
    );
}
