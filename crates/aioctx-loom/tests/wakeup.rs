//! Model-checks the wake-up protocol (crates/aioctx/src/wakeup.rs) with loom: every
//! interleaving, and every value a relaxed load may return under the C++ memory model, of a
//! poll against threads that publish work and notify.
//!
//! The file under test is compiled here a second time with `crate::sync` pointing at loom's
//! atomics; the eventfd is an `AtomicBool` (`set` by a notify that must write, cleared by the
//! poller's drain). A poll "sleeps" when `begin_wait` lets it: the model then checks that the
//! eventfd is set once every notifier is done, for otherwise that sleep would never end.
//!
//! Each model fails when a fence of the protocol is removed (checked by hand). Two things in
//! `wakeup.rs` are read-modify-writes only because of loom's limits, documented there: the
//! swap in `notify` (loom does not apply every C++20 rule for SeqCst fences) and the one in
//! `drained` (tokio-rs/loom#254). Loom does not explore every relaxed execution C++ allows, so
//! a pass is strong evidence, not a proof; the argument itself is in `wakeup.rs`.
//!
//! Unix only: loom's coroutines cannot unwind on windows-gnu; the atomics are the same there.
#![cfg(unix)]

#[allow(dead_code)]
#[path = "../../aioctx/src/wakeup.rs"]
mod wakeup;

/// What `wakeup.rs` expects at `crate::sync`.
mod sync {
    pub(crate) use loom::sync::atomic;
}

use loom::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use loom::sync::Arc;
use loom::thread;

use wakeup::WakeState;

/// A context reduced to the protocol: its flags, its eventfd, one work item per producer.
struct Ctx {
    wake: WakeState,
    eventfd: AtomicBool,
    writes: AtomicUsize,
    work: Vec<AtomicBool>,
}

impl Ctx {
    fn new(producers: usize) -> Arc<Ctx> {
        Arc::new(Ctx {
            wake: WakeState::new(),
            eventfd: AtomicBool::new(false),
            writes: AtomicUsize::new(0),
            work: (0..producers).map(|_| AtomicBool::new(false)).collect(),
        })
    }

    /// A BH schedule from another thread: publish (the BH queue's CAS is a release), then
    /// notify, writing the eventfd when told to.
    fn produce(&self, i: usize) {
        self.work[i].store(true, Ordering::Release);
        if self.wake.notify() {
            self.writes.fetch_add(1, Ordering::Relaxed);
            // A swap, like the kernel's add to the counter: loom 0.7 lets a plain store land
            // inside a concurrent swap (tokio-rs/loom#254), which would fake lost wake-ups.
            self.eventfd.swap(true, Ordering::Release);
        }
    }

    fn work_in_sight(&self) -> bool {
        self.work.iter().any(|w| w.load(Ordering::Acquire))
    }

    /// The poller's drain after a wait reported the eventfd: clear it, then `drained`.
    fn drain(&self) {
        if self.eventfd.swap(false, Ordering::Acquire) {
            self.wake.drained();
        }
    }
}

fn spawn_producers(ctx: &Arc<Ctx>) -> Vec<thread::JoinHandle<()>> {
    (0..ctx.work.len())
        .map(|i| {
            let c = ctx.clone();
            thread::spawn(move || c.produce(i))
        })
        .collect()
}

/// One blocking poll against one producer: if the poll sleeps, the producer writes the eventfd;
/// if it does not, the work is visible once it has accepted the notification.
#[test]
fn no_lost_wakeup() {
    loom::model(|| {
        let ctx = Ctx::new(1);
        let producers = spawn_producers(&ctx);
        let mut slept = false;
        if !ctx.work_in_sight() {
            if ctx.wake.begin_wait() {
                slept = true;
            } else {
                ctx.wake.end_wait();
                ctx.wake.accept();
                assert!(ctx.work_in_sight(), "notified without visible work");
            }
        }
        for p in producers {
            p.join().unwrap();
        }
        if slept {
            assert!(ctx.eventfd.load(Ordering::Acquire), "lost wake-up");
        }
    });
}

/// The same for an outer loop between `prepare` and `pending` (bit 0 of `notify_me`).
#[test]
fn no_lost_wakeup_for_an_outer_loop() {
    loom::model(|| {
        let ctx = Ctx::new(1);
        let producers = spawn_producers(&ctx);
        let timeout_zero = ctx.work_in_sight() || !ctx.wake.begin_outer_wait();
        for p in producers {
            p.join().unwrap();
        }
        if !timeout_zero {
            assert!(ctx.eventfd.load(Ordering::Acquire), "lost wake-up");
        }
        ctx.wake.end_outer_wait();
        ctx.wake.accept();
        assert!(ctx.work_in_sight());
    });
}

/// Two producers against one sleep: the eventfd is written exactly once if the poll slept
/// (coalescing), and never if it did not sleep.
#[test]
fn at_most_one_write_per_sleep() {
    loom::model(|| {
        let ctx = Ctx::new(2);
        let producers = spawn_producers(&ctx);
        let slept = !ctx.work_in_sight() && ctx.wake.begin_wait();
        for p in producers {
            p.join().unwrap();
        }
        let writes = ctx.writes.load(Ordering::Relaxed);
        assert!(writes <= 1, "{writes} eventfd writes for one sleep");
        if slept {
            assert_eq!(writes, 1, "lost wake-up");
        }
    });
}

/// Two polls in a row against two producers: after the first sleep is woken and the eventfd
/// drained, a second sleep is woken again (`kicked` is cleared at the right time), and every
/// item of work is eventually seen.
#[test]
fn second_sleep_after_drain_is_woken() {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(3);
    builder.check(|| {
        let ctx = Ctx::new(2);
        let producers = spawn_producers(&ctx);
        let mut seen = [false; 2];
        for round in 0..2 {
            let look = |seen: &mut [bool; 2]| {
                for (i, w) in ctx.work.iter().enumerate() {
                    seen[i] |= w.load(Ordering::Acquire);
                }
            };
            look(&mut seen);
            if seen.iter().all(|s| *s) {
                break;
            }
            if ctx.wake.begin_wait() {
                if round == 1 {
                    // Last round: the producers must leave the eventfd set for this sleep.
                    for p in producers {
                        p.join().unwrap();
                    }
                    assert!(ctx.eventfd.load(Ordering::Acquire), "lost wake-up");
                    return;
                }
                // Sleep until the eventfd is written (a lost wake-up never gets past here,
                // which loom reports).
                while !ctx.eventfd.load(Ordering::Acquire) {
                    thread::yield_now();
                }
            }
            ctx.drain();
            ctx.wake.end_wait();
            ctx.wake.accept();
            look(&mut seen);
        }
        for p in producers {
            p.join().unwrap();
        }
        assert_eq!(seen, [true, true], "work never seen");
    });
}
