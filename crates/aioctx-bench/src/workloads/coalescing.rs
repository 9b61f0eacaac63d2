//! Workload 3: wake-up coalescing.
//!
//! Two producer threads make 1,000,000 schedules (500,000 each) of one
//! coalescing event while the loop runs on a third thread. The round ends
//! when the loop's callback has seen the last schedule. Reports ns per
//! schedule, and as side statistics (medians over rounds):
//!
//! * **callbacks run** on the loop;
//! * **eventfd writes**: the process's `syscw` counter from `/proc/self/io`
//!   (write(2)-family syscalls), read before and after the round. Nothing else
//!   in the process writes during a round, so this is the number of eventfd
//!   writes (cross-checked with `strace -c -f`, see the crate README);
//! * **loop sleeps**: the loop thread's `voluntary_ctxt_switches` from
//!   `/proc/self/task/TID/status`. Every time the loop blocks in the kernel it
//!   switches out voluntarily; blocking on a contended lock does too, so this
//!   is an upper bound on the number of sleeps.
//!
//! The goal for aioctx is at most one eventfd write per loop sleep.
//!
//! * aioctx: one `Bh` (from `bh_new`), `Bh::schedule` from both producers.
//! * floor: an atomic flag whose false -> true transition writes the eventfd.
//! * tokio: `Notify::notify_one` (a permit coalesces notifications) waking a
//!   task on a current_thread runtime with the IO driver enabled.
//! * calloop: a `Ping` source (calloop writes the eventfd on every ping and
//!   coalesces on the reading side).
//! * glib has no coalescing wake-up primitive (`invoke`/`idle_add` queue one
//!   source per call), so it does not take part.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Instant;

use crate::floor::FloorLoop;
use crate::harness::{self, median_u64, nanos, Contender, Scale, System};
use crate::workloads::{LoopThread, Reply, Report};

const NAME: &str = "3 wake-up coalescing (2 threads, per schedule)";
const PRODUCERS: u64 = 2;

/// Runs the workload.
pub fn run(scale: Scale, report: &mut Report) {
    let total = scale.n(1_000_000, 1_000_000);
    let stats: Vec<(System, Arc<Stats>)> = [
        System::Aioctx,
        System::Floor,
        System::Tokio,
        System::Calloop,
    ]
    .into_iter()
    .map(|s| (s, Arc::new(Stats::default())))
    .collect();
    let contenders = stats
        .iter()
        .map(|(sys, st)| contender(*sys, total, st.clone()))
        .collect();
    report
        .rows
        .extend(harness::run(NAME, scale.rounds(7, 3), contenders));
    report.notes.push(format!(
        "workload 3: {total} schedules per round from {PRODUCERS} threads; \
         medians over rounds; eventfd writes = /proc/self/io syscw delta, \
         loop sleeps = loop thread voluntary_ctxt_switches delta (upper bound)"
    ));
    for (sys, st) in &stats {
        if let Some(exact) = st.exact_ratio() {
            report.notes.push(format!(
                "  {:<8} exact, from AioContext::stats(): eventfd writes per announced sleep {exact:.2} (median over rounds)",
                sys.name()
            ));
        }
        let runs = median_u64(st.runs.lock().unwrap().clone());
        let writes = median_u64(st.writes.lock().unwrap().clone());
        let sleeps = median_u64(st.sleeps.lock().unwrap().clone());
        report.notes.push(format!(
            "  {:<8} callbacks run {:>9}  eventfd writes {:>9}  loop sleeps {:>9}  writes/sleep {:.2}",
            sys.name(),
            runs,
            writes,
            sleeps,
            writes as f64 / sleeps.max(1) as f64
        ));
    }
    report.notes.push(
        "  glib: not measured (no coalescing wake-up primitive; invoke queues a source per call)"
            .into(),
    );
}

/// Per-round side statistics of one system.
#[derive(Default)]
struct Stats {
    runs: std::sync::Mutex<Vec<u64>>,
    writes: std::sync::Mutex<Vec<u64>>,
    sleeps: std::sync::Mutex<Vec<u64>>,
    /// aioctx only: (eventfd writes, blocking waits) per round, from `AioContext::stats()`.
    exact: std::sync::Mutex<Vec<(u64, u64)>>,
}

impl Stats {
    /// The median over rounds of eventfd writes per blocking wait, where the system counts both.
    fn exact_ratio(&self) -> Option<f64> {
        let rounds = self.exact.lock().unwrap();
        if rounds.is_empty() {
            return None;
        }
        let mut ratios: Vec<f64> = rounds
            .iter()
            .map(|&(w, s)| w as f64 / s.max(1) as f64)
            .collect();
        ratios.sort_by(f64::total_cmp);
        Some(ratios[ratios.len() / 2])
    }
}

/// Reads a loop's own (eventfd writes, blocking waits) counters, where it has them.
type Counters = Option<Arc<dyn Fn() -> (u64, u64) + Send + Sync>>;

/// What the loop's callback shares with the producers and the measurer.
struct Probe {
    /// Schedules made so far this round (incremented *before* scheduling).
    scheduled: AtomicU64,
    /// Schedules in a round.
    total: u64,
    /// Callback runs this round.
    runs: AtomicU64,
    /// Set once the callback has seen `scheduled == total`.
    finished: AtomicBool,
    reply: Arc<Reply>,
    /// The loop thread's kernel thread id, for its context-switch counter.
    loop_tid: AtomicU64,
}

impl Probe {
    /// The loop-side callback.
    fn on_run(&self) {
        self.runs.fetch_add(1, Ordering::Relaxed);
        if self.loop_tid.load(Ordering::Relaxed) == 0 {
            self.loop_tid.store(gettid(), Ordering::Relaxed);
        }
        if self.scheduled.load(Ordering::SeqCst) == self.total
            && !self.finished.swap(true, Ordering::AcqRel)
        {
            self.reply.signal();
        }
    }
}

fn gettid() -> u64 {
    // SAFETY: gettid has no preconditions and cannot fail.
    unsafe { libc::gettid() as u64 }
}

/// Builds the contender for `sys`: its loop thread and the per-round driver.
fn contender(sys: System, total: u64, stats: Arc<Stats>) -> Contender<'static> {
    let probe = Arc::new(Probe {
        scheduled: AtomicU64::new(0),
        total,
        runs: AtomicU64::new(0),
        finished: AtomicBool::new(false),
        reply: Reply::new(),
        loop_tid: AtomicU64::new(0),
    });
    let (schedule, keep, counters) = start_loop(sys, probe.clone());
    // One schedule so the callback has run once and recorded the loop's tid.
    probe.scheduled.store(total, Ordering::SeqCst);
    schedule();
    probe.reply.wait();
    Contender::new(sys, move || {
        let _keep = &keep;
        one_round(&probe, &schedule, &stats, &counters)
    })
}

fn one_round(
    probe: &Arc<Probe>,
    schedule: &Scheduler,
    stats: &Stats,
    counters: &Counters,
) -> Vec<f64> {
    probe.scheduled.store(0, Ordering::SeqCst);
    probe.runs.store(0, Ordering::SeqCst);
    probe.finished.store(false, Ordering::SeqCst);
    let tid = probe.loop_tid.load(Ordering::Relaxed);
    let start_gate = Arc::new(Barrier::new(PRODUCERS as usize + 1));
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|_| {
            let (probe, schedule, gate) = (probe.clone(), schedule.clone(), start_gate.clone());
            std::thread::spawn(move || {
                gate.wait();
                for _ in 0..probe.total / PRODUCERS {
                    probe.scheduled.fetch_add(1, Ordering::SeqCst);
                    schedule();
                }
            })
        })
        .collect();
    let (w0, s0) = (syscw(), voluntary_switches(tid));
    let exact0 = counters.as_ref().map(|c| c());
    start_gate.wait();
    let start = Instant::now();
    probe.reply.wait();
    let elapsed = start.elapsed();
    let (w1, s1) = (syscw(), voluntary_switches(tid));
    if let (Some(c), Some((ew0, es0))) = (counters, exact0) {
        let (ew1, es1) = c();
        stats.exact.lock().unwrap().push((ew1 - ew0, es1 - es0));
    }
    for p in producers {
        p.join().expect("producer panicked");
    }
    stats
        .runs
        .lock()
        .unwrap()
        .push(probe.runs.load(Ordering::SeqCst));
    stats.writes.lock().unwrap().push(w1 - w0);
    stats.sleeps.lock().unwrap().push(s1 - s0);
    vec![nanos(elapsed) / probe.total as f64]
}

/// Schedules the coalescing event; callable from any thread.
type Scheduler = Arc<dyn Fn() + Send + Sync>;

/// Starts `sys`'s loop with `probe.on_run` as the coalesced callback.
fn start_loop(sys: System, probe: Arc<Probe>) -> (Scheduler, Box<dyn std::any::Any>, Counters) {
    match sys {
        System::Aioctx => aioctx_loop(probe),
        System::Floor => {
            let lp = FloorLoop::start(move || probe.on_run()).expect("floor loop");
            let h = lp.handle();
            (Arc::new(move || h.ping()), Box::new(lp), None)
        }
        System::Tokio => {
            let notify = Arc::new(tokio::sync::Notify::new());
            let n2 = notify.clone();
            let (stop_tx, lp) = LoopThread::spawn("tokio-loop", move |tx| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("tokio runtime");
                let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
                tx.send(stop_tx).unwrap();
                rt.block_on(async move {
                    loop {
                        tokio::select! {
                            _ = n2.notified() => probe.on_run(),
                            _ = &mut stop_rx => break,
                        }
                    }
                });
            });
            let lp = lp.stop_with(move || {
                let _ = stop_tx.send(());
            });
            (Arc::new(move || notify.notify_one()), Box::new(lp), None)
        }
        System::Calloop => {
            let ((ping, signal), lp) = LoopThread::spawn("calloop-loop", move |tx| {
                let mut el = calloop::EventLoop::<()>::try_new().expect("calloop loop");
                let (ping, source) = calloop::ping::make_ping().expect("calloop ping");
                el.handle()
                    .insert_source(source, move |_, _, _| probe.on_run())
                    .expect("insert ping");
                tx.send((ping, el.get_signal())).unwrap();
                el.run(None, &mut (), |_| {}).expect("calloop run");
            });
            let lp = lp.stop_with(move || {
                signal.stop();
                signal.wakeup();
            });
            (Arc::new(move || ping.ping()), Box::new(lp), None)
        }
        System::Mio | System::Glib | System::AioctxPoll | System::Spin => {
            unreachable!("{sys} does not take part")
        }
    }
}

fn aioctx_loop(probe: Arc<Probe>) -> (Scheduler, Box<dyn std::any::Any>, Counters) {
    let ctx = aioctx::AioContext::new().expect("aioctx");
    let c = ctx.clone();
    let counters: Counters = Some(Arc::new(move || {
        let st = c.stats();
        (st.notify_writes, st.blocking_waits)
    }));
    let bh = ctx.bh_new(move || probe.on_run());
    let ((), lp) = LoopThread::spawn_aioctx(&ctx, || ());
    (Arc::new(move || bh.schedule()), Box::new(lp), counters)
}

/// The process's count of write(2)-family syscalls so far.
fn syscw() -> u64 {
    proc_field("/proc/self/io", "syscw:")
}

/// Voluntary context switches of thread `tid` of this process so far.
fn voluntary_switches(tid: u64) -> u64 {
    proc_field(
        &format!("/proc/self/task/{tid}/status"),
        "voluntary_ctxt_switches:",
    )
}

fn proc_field(path: &str, key: &str) -> u64 {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}
