//! Workload 4: timers, in three parts.
//!
//! * **4a insert + cancel**: arm N timers (1,000,000 in full mode) with
//!   deadlines 1-11 s away in random order, then cancel them all, earliest
//!   deadline first. Reports ns per timer (one insert plus one cancel,
//!   including creating the timer object each system needs). Cancelling in
//!   deadline order is the best case for calloop, whose `TimerWheel::cancel`
//!   is a linear `BinaryHeap::retain` unless the timer is at the top.
//! * **4b fire**: arm 100,000 timers with deadlines spread over 50 ms (random
//!   order) and run the loop until all have fired. Reports the loop thread's
//!   CPU time per timer (arming + firing), since wall time is the spread.
//! * **4c lateness**: arm one 1 ms timer, run the loop until it fires, and
//!   record how late it fired against `Instant` (CLOCK_MONOTONIC). One sample
//!   per timer; the row's median is the p50.
//!
//! calloop runs fewer timers in 4a and 4b (see the note the run prints): each
//! `insert_source` scans calloop's source list for a free slot, which makes
//! N timers O(N^2) for it.
//!
//! Peers: tokio `sleep_until`/`sleep` (current_thread runtime, timers
//! enabled), calloop `Timer` sources, glib `timeout_source_new` (glib's
//! timeouts have millisecond granularity: that shows in 4c).

use std::future::Future;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use aioctx::{clock_get_ns, AioContext, ClockType, SCALE_NS};

use crate::harness::{self, nanos, ns_per_op, thread_cpu_time, Contender, Scale, System};
use crate::workloads::Report;

/// Runs the three timer workloads.
pub fn run(scale: Scale, report: &mut Report) {
    // calloop gets fewer timers: every calloop `insert_source` scans the
    // source list for a free slot (`SourceList::vacant_entry`), so N timers
    // cost it O(N^2) and the full N would not finish.
    let n = scale.n(1_000_000, 200_000);
    let n_calloop = n.min(scale.n(20_000, 5_000));
    let secs = |s| Duration::from_secs(s);
    let plan = Rc::new(Plan::new(n, secs(1), secs(10)));
    let contenders = vec![
        insert_cancel_aioctx(plan.clone()),
        insert_cancel_tokio(plan.clone()),
        insert_cancel_calloop(Rc::new(Plan::new(n_calloop, secs(1), secs(10)))),
        insert_cancel_glib(plan.clone()),
    ];
    report.rows.extend(harness::run(
        "4a timers insert+cancel (per timer)",
        scale.rounds(7, 3),
        contenders,
    ));

    let m = scale.n(100_000, 100_000);
    let m_calloop = m.min(scale.n(10_000, 5_000));
    let ms = |s| Duration::from_millis(s);
    let plan = Rc::new(Plan::new(m, ms(1), ms(50)));
    let contenders = vec![
        fire_aioctx(plan.clone()),
        fire_tokio(plan.clone()),
        fire_calloop(Rc::new(Plan::new(m_calloop, ms(1), ms(50)))),
        fire_glib(plan.clone()),
    ];
    report.rows.extend(harness::run(
        "4b timers fire 100k spread (loop CPU per timer)",
        scale.rounds(7, 3),
        contenders,
    ));
    report.notes.push(format!(
        "4a/4b: calloop ran {n_calloop} and {m_calloop} timers instead of {n} and {m}: \
         each calloop insert_source scans the source list for a free slot \
         (SourceList::vacant_entry), so N timers cost O(N^2); its per-timer \
         cost only grows with more"
    ));

    let k = scale.n(200, 40) as usize;
    let contenders = vec![
        lateness_aioctx(k),
        lateness_tokio(k),
        lateness_calloop(k),
        lateness_glib(k),
    ];
    report.rows.extend(harness::run(
        "4c 1 ms timer lateness",
        scale.rounds(10, 4),
        contenders,
    ));
}

/// Deadlines (offsets from "now") in random order, and the order to cancel
/// them in (earliest first).
pub struct Plan {
    /// Offset of timer `i` from the moment the round starts arming.
    pub offsets: Vec<Duration>,
    /// Indices into `offsets`, earliest deadline first.
    pub cancel_order: Vec<usize>,
}

impl Plan {
    /// `n` offsets uniformly spread over `[from, from + spread)`, shuffled by
    /// a fixed-seed xorshift so every system gets the same sequence.
    pub fn new(n: u64, from: Duration, spread: Duration) -> Plan {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let offsets: Vec<Duration> = (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                from + Duration::from_nanos(x % spread.as_nanos() as u64)
            })
            .collect();
        let mut cancel_order: Vec<usize> = (0..offsets.len()).collect();
        cancel_order.sort_by_key(|&i| offsets[i]);
        Plan {
            offsets,
            cancel_order,
        }
    }

    fn len(&self) -> u64 {
        self.offsets.len() as u64
    }
}

fn tokio_rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("tokio runtime")
}

// ---- 4a: insert + cancel -------------------------------------------------

fn insert_cancel_aioctx(plan: Rc<Plan>) -> Contender<'static> {
    let ctx = AioContext::new().expect("aioctx");
    Contender::new(System::Aioctx, move || {
        vec![ns_per_op(plan.len(), || {
            let base = clock_get_ns(ClockType::Realtime);
            let mut timers: Vec<_> = plan
                .offsets
                .iter()
                .map(|off| {
                    let t = ctx.timer_new(ClockType::Realtime, SCALE_NS, || {});
                    t.modify_ns(base + off.as_nanos() as i64);
                    Some(t)
                })
                .collect();
            for &i in &plan.cancel_order {
                drop(timers[i].take()); // drop = timer_del + free
            }
        })]
    })
}

fn insert_cancel_tokio(plan: Rc<Plan>) -> Contender<'static> {
    let rt = tokio_rt();
    Contender::new(System::Tokio, move || {
        vec![ns_per_op(plan.len(), || {
            rt.block_on(async {
                let base = tokio::time::Instant::now();
                let mut sleeps = Vec::with_capacity(plan.offsets.len());
                for off in &plan.offsets {
                    let mut s = Box::pin(tokio::time::sleep_until(base + *off));
                    // Sleep registers with the timer wheel on its first poll.
                    std::future::poll_fn(|cx| {
                        let _ = s.as_mut().poll(cx);
                        Poll::Ready(())
                    })
                    .await;
                    sleeps.push(Some(s));
                }
                for &i in &plan.cancel_order {
                    drop(sleeps[i].take());
                }
            })
        })]
    })
}

fn insert_cancel_calloop(plan: Rc<Plan>) -> Contender<'static> {
    use calloop::timer::{TimeoutAction, Timer};
    let el = calloop::EventLoop::<()>::try_new().expect("calloop loop");
    Contender::new(System::Calloop, move || {
        let h = el.handle();
        vec![ns_per_op(plan.len(), || {
            let base = Instant::now();
            let mut tokens: Vec<_> = plan
                .offsets
                .iter()
                .map(|off| {
                    let t = Timer::from_deadline(base + *off);
                    Some(
                        h.insert_source(t, |_, _, _| TimeoutAction::Drop)
                            .expect("insert timer"),
                    )
                })
                .collect();
            for &i in &plan.cancel_order {
                h.remove(tokens[i].take().unwrap());
            }
        })]
    })
}

fn insert_cancel_glib(plan: Rc<Plan>) -> Contender<'static> {
    let ctx = glib::MainContext::new();
    Contender::new(System::Glib, move || {
        vec![ns_per_op(plan.len(), || {
            let mut sources: Vec<_> = plan
                .offsets
                .iter()
                .map(|off| {
                    let s = glib::timeout_source_new(*off, None, glib::Priority::DEFAULT, || {
                        glib::ControlFlow::Break
                    });
                    s.attach(Some(&ctx));
                    Some(s)
                })
                .collect();
            for &i in &plan.cancel_order {
                sources[i].take().unwrap().destroy();
            }
        })]
    })
}

// ---- 4b: fire -------------------------------------------------------------

/// CPU time of the calling thread per timer while running `f`.
fn cpu_per_timer(n: u64, f: impl FnOnce()) -> Vec<f64> {
    let start = thread_cpu_time();
    f();
    vec![nanos(thread_cpu_time() - start) / n as f64]
}

fn fire_aioctx(plan: Rc<Plan>) -> Contender<'static> {
    let ctx = AioContext::new().expect("aioctx");
    Contender::new(System::Aioctx, move || {
        let n = plan.len();
        cpu_per_timer(n, || {
            let fired = Arc::new(AtomicU64::new(0));
            let base = clock_get_ns(ClockType::Realtime);
            let timers: Vec<_> = plan
                .offsets
                .iter()
                .map(|off| {
                    let fired = fired.clone();
                    let t = ctx.timer_new(ClockType::Realtime, SCALE_NS, move || {
                        fired.fetch_add(1, Ordering::Relaxed);
                    });
                    t.modify_ns(base + off.as_nanos() as i64);
                    t
                })
                .collect();
            while fired.load(Ordering::Relaxed) < n {
                ctx.poll(true);
            }
            drop(timers); // the peers free theirs as they fire
        })
    })
}

fn fire_tokio(plan: Rc<Plan>) -> Contender<'static> {
    let rt = tokio_rt();
    Contender::new(System::Tokio, move || {
        let n = plan.len();
        cpu_per_timer(n, || {
            rt.block_on(async {
                let fired = Arc::new(AtomicU64::new(0));
                let all = Arc::new(tokio::sync::Notify::new());
                let base = tokio::time::Instant::now();
                for off in &plan.offsets {
                    let (fired, all, at) = (fired.clone(), all.clone(), base + *off);
                    tokio::spawn(async move {
                        tokio::time::sleep_until(at).await;
                        if fired.fetch_add(1, Ordering::Relaxed) + 1 == n {
                            all.notify_one();
                        }
                    });
                }
                all.notified().await;
            })
        })
    })
}

fn fire_calloop(plan: Rc<Plan>) -> Contender<'static> {
    use calloop::timer::{TimeoutAction, Timer};
    let mut el = calloop::EventLoop::<u64>::try_new().expect("calloop loop");
    Contender::new(System::Calloop, move || {
        let n = plan.len();
        cpu_per_timer(n, || {
            let h = el.handle();
            let base = Instant::now();
            for off in &plan.offsets {
                h.insert_source(Timer::from_deadline(base + *off), |_, _, fired| {
                    *fired += 1;
                    TimeoutAction::Drop
                })
                .expect("insert timer");
            }
            let mut fired = 0;
            while fired < n {
                el.dispatch(None, &mut fired).expect("dispatch");
            }
        })
    })
}

fn fire_glib(plan: Rc<Plan>) -> Contender<'static> {
    let ctx = glib::MainContext::new();
    Contender::new(System::Glib, move || {
        let n = plan.len();
        cpu_per_timer(n, || {
            let fired = Arc::new(AtomicU64::new(0));
            for off in &plan.offsets {
                let fired = fired.clone();
                glib::timeout_source_new(*off, None, glib::Priority::DEFAULT, move || {
                    fired.fetch_add(1, Ordering::Relaxed);
                    glib::ControlFlow::Break
                })
                .attach(Some(&ctx));
            }
            while fired.load(Ordering::Relaxed) < n {
                ctx.iteration(true);
            }
        })
    })
}

// ---- 4c: lateness -----------------------------------------------------------

const ONE_MS: Duration = Duration::from_millis(1);

/// Lateness in ns of a timer armed at `armed` for 1 ms that fired at `fired`.
fn lateness(armed: Instant, fired: Instant) -> f64 {
    nanos(fired.saturating_duration_since(armed + ONE_MS))
}

fn lateness_aioctx(k: usize) -> Contender<'static> {
    let ctx = AioContext::new().expect("aioctx");
    let at = Arc::new(std::sync::Mutex::new(None));
    let at2 = at.clone();
    let timer = ctx.timer_new(ClockType::Realtime, SCALE_NS, move || {
        *at2.lock().unwrap() = Some(Instant::now());
    });
    Contender::new(System::Aioctx, move || {
        let mut v = Vec::with_capacity(k);
        for _ in 0..k {
            let armed = Instant::now();
            timer.modify_ns(clock_get_ns(ClockType::Realtime) + ONE_MS.as_nanos() as i64);
            let fired = loop {
                if let Some(t) = at.lock().unwrap().take() {
                    break t;
                }
                ctx.poll(true);
            };
            v.push(lateness(armed, fired));
        }
        v
    })
}

fn lateness_tokio(k: usize) -> Contender<'static> {
    let rt = tokio_rt();
    Contender::new(System::Tokio, move || {
        rt.block_on(async {
            let mut v = Vec::with_capacity(k);
            for _ in 0..k {
                let armed = Instant::now();
                tokio::time::sleep(ONE_MS).await;
                v.push(lateness(armed, Instant::now()));
            }
            v
        })
    })
}

fn lateness_calloop(k: usize) -> Contender<'static> {
    use calloop::timer::{TimeoutAction, Timer};
    let mut el = calloop::EventLoop::<Option<Instant>>::try_new().expect("calloop loop");
    Contender::new(System::Calloop, move || {
        let mut v = Vec::with_capacity(k);
        for _ in 0..k {
            let armed = Instant::now();
            el.handle()
                .insert_source(Timer::from_duration(ONE_MS), |_, _, at| {
                    *at = Some(Instant::now());
                    TimeoutAction::Drop
                })
                .expect("insert timer");
            let mut at = None;
            while at.is_none() {
                el.dispatch(None, &mut at).expect("dispatch");
            }
            v.push(lateness(armed, at.unwrap()));
        }
        v
    })
}

fn lateness_glib(k: usize) -> Contender<'static> {
    let ctx = glib::MainContext::new();
    Contender::new(System::Glib, move || {
        let mut v = Vec::with_capacity(k);
        for _ in 0..k {
            let at = Arc::new(std::sync::Mutex::new(None));
            let at2 = at.clone();
            let armed = Instant::now();
            glib::timeout_source_new(ONE_MS, None, glib::Priority::DEFAULT, move || {
                *at2.lock().unwrap() = Some(Instant::now());
                glib::ControlFlow::Break
            })
            .attach(Some(&ctx));
            while at.lock().unwrap().is_none() {
                ctx.iteration(true);
            }
            let fired = at.lock().unwrap().unwrap();
            v.push(lateness(armed, fired));
        }
        v
    })
}
