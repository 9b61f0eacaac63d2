//! Workload 2: cross-thread post round trip.
//!
//! The measuring thread posts work to a loop running on another thread,
//! the loop runs it, and the work wakes the measuring thread through the
//! same [`Reply`] (park/unpark) for every system, so systems differ only in
//! how work gets onto the loop and how the loop wakes up. One round trip at a
//! time; reports ns per round trip.
//!
//! Where the two threads run dominates on a small VM: on one CPU a round trip
//! is two context switches; on two CPUs it is two cross-CPU wake-ups, whose
//! cost depends on the idle state of the other CPU (and the hypervisor).
//! Unpinned, the scheduler picks one or the other at random, which makes the
//! numbers bimodal, so the workload pins both placements explicitly.
//!
//! * aioctx: `bh_schedule_oneshot` from the other thread; the loop thread spins
//!   on `poll(true)`.
//! * floor: [`crate::floor`], a queue + eventfd + epoll_wait.
//! * tokio: `Handle::spawn` onto a current_thread runtime blocked in `block_on`
//!   (no IO driver: tokio then parks on a futex, its fastest configuration).
//! * calloop: a `calloop::channel` carrying the reply handle.
//! * glib: `MainContext::invoke` on a context its loop thread has acquired.
//!
//! # 2c: wake-up latency with a spinning waiter (busy-polling)
//!
//! The other-CPU placement again, but the measuring thread *spins* on the
//! reply flag instead of parking, so each sample is one post → run → reply
//! as seen by the loop side alone, timed individually (p50/p99 are per round
//! trip). Systems: the floor (eventfd + epoll), aioctx with polling off,
//! `aioctx-poll` (aioctx with `--poll-max-ns`, default 32768, QEMU's IOThread
//! default) and `spin`, a loop thread spinning on an atomic: the user-space
//! floor. The notes under the table give each loop thread's CPU time per
//! wake-up and its CPU time / wall time over the rounds (getrusage-style,
//! through the thread's CPU clock): what polling costs.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aioctx::AioContext;

use crate::floor::FloorLoop;
use crate::harness::{
    self, cpu_time_of, current_thread_cpu_clock, ns_per_op, Contender, Scale, System,
};
use crate::workloads::{LoopThread, Reply, Report};

/// Runs the workload twice: with the loop threads and the measuring thread on
/// the same CPU, and on two different CPUs.
pub fn run(scale: Scale, report: &mut Report) {
    let cpus = harness::online_cpus();
    // A cross-CPU wake-up costs tens of microseconds on a VM: fewer of those.
    let mut placements = vec![(
        "2a cross-thread round trip, same CPU",
        0,
        scale.n(100_000, 20_000),
    )];
    if cpus > 1 {
        placements.push((
            "2b cross-thread round trip, other CPU",
            1,
            scale.n(20_000, 2_000),
        ));
    }
    for (name, loop_cpu, n) in placements {
        // Loop threads inherit the creator's CPU mask.
        harness::pin_current_thread(&[loop_cpu]);
        let contenders = vec![aioctx(n), floor(n), tokio(n), calloop(n), glib(n)];
        harness::pin_current_thread(&[0]);
        report
            .rows
            .extend(harness::run(name, scale.rounds(15, 4), contenders));
        harness::pin_current_thread(&[]);
    }
    if cpus > 1 {
        spinning_waiter(scale, report);
    }
}

/// The window of the `aioctx-poll` system, in ns (`--poll-max-ns`).
static POLL_MAX_NS: AtomicU64 = AtomicU64::new(32_768);

/// Sets the polling window of the `aioctx-poll` system.
pub fn set_poll_max_ns(ns: u64) {
    POLL_MAX_NS.store(ns, Ordering::Relaxed);
}

/// A loop thread's CPU time and the wall time and wake-ups it served,
/// summed over the measured rounds.
#[derive(Default)]
struct Burn {
    cpu: Cell<Duration>,
    wall: Cell<Duration>,
    wakeups: Cell<u64>,
}

/// 2c: see the module docs.
fn spinning_waiter(scale: Scale, report: &mut Report) {
    const NAME: &str = "2c wake-up, other CPU, spinning waiter";
    let n = scale.n(20_000, 3_000);
    harness::pin_current_thread(&[1]);
    let poll_ns = POLL_MAX_NS.load(Ordering::Relaxed);
    let systems = [
        (System::Floor, None),
        (System::Aioctx, Some(0)),
        (System::AioctxPoll, Some(poll_ns)),
        (System::Spin, None),
    ];
    let mut burns = Vec::new();
    let mut contenders = Vec::new();
    for (system, poll) in systems {
        let burn = Rc::new(Burn::default());
        burns.push((system, burn.clone()));
        let target: Box<dyn Target> = match (system, poll) {
            (System::Floor, _) => Box::new(FloorTarget::new()),
            (System::Spin, _) => Box::new(SpinTarget::new()),
            (_, Some(ns)) => Box::new(AioctxTarget::new(ns)),
            _ => unreachable!(),
        };
        contenders.push(Contender::new(system, move || {
            timed_round_trips(n, &*target, &burn)
        }));
    }
    harness::pin_current_thread(&[0]);
    report
        .rows
        .extend(harness::run(NAME, scale.rounds(10, 4), contenders));
    harness::pin_current_thread(&[]);
    for (system, burn) in burns {
        let (cpu, wall, k) = (burn.cpu.get(), burn.wall.get(), burn.wakeups.get());
        if k == 0 {
            continue;
        }
        report.notes.push(format!(
            "{NAME}: {:<11} loop thread CPU {:>7.0} ns per wake-up, CPU/wall {:>5.1}%{}",
            system.name(),
            cpu.as_nanos() as f64 / k as f64,
            100.0 * cpu.as_secs_f64() / wall.as_secs_f64().max(1e-9),
            if system == System::AioctxPoll {
                format!(" (poll-max-ns {poll_ns})")
            } else {
                String::new()
            }
        ));
    }
}

/// A loop on its own thread that runs posted work.
trait Target {
    /// Gets `reply` set on the loop thread.
    fn post(&self, reply: Arc<AtomicBool>);
    /// The loop thread's CPU clock.
    fn cpu_clock(&self) -> libc::clockid_t;
    /// Called before and after each round.
    fn active(&self, _on: bool) {}
}

/// One round: `n` round trips, each timed, the waiter spinning on the reply.
fn timed_round_trips(n: u64, target: &dyn Target, burn: &Burn) -> Vec<f64> {
    let reply = Arc::new(AtomicBool::new(false));
    let mut samples = Vec::with_capacity(n as usize);
    target.active(true);
    let (cpu0, wall0) = (cpu_time_of(target.cpu_clock()), Instant::now());
    for _ in 0..n {
        let t = Instant::now();
        target.post(reply.clone());
        while !reply.swap(false, Ordering::Acquire) {
            std::hint::spin_loop();
        }
        samples.push(harness::nanos(t.elapsed()));
    }
    let (cpu, wall) = (cpu_time_of(target.cpu_clock()) - cpu0, wall0.elapsed());
    target.active(false);
    burn.cpu.set(burn.cpu.get() + cpu);
    burn.wall.set(burn.wall.get() + wall);
    burn.wakeups.set(burn.wakeups.get() + n);
    samples
}

struct AioctxTarget {
    ctx: AioContext,
    clock: libc::clockid_t,
    _lp: LoopThread,
}

impl AioctxTarget {
    fn new(poll_max_ns: u64) -> AioctxTarget {
        let ctx = AioContext::builder()
            .poll_max_ns(poll_max_ns)
            .build()
            .expect("aioctx");
        let (clock, lp) = LoopThread::spawn_aioctx(&ctx, current_thread_cpu_clock);
        AioctxTarget {
            ctx,
            clock,
            _lp: lp,
        }
    }
}

impl Target for AioctxTarget {
    fn post(&self, reply: Arc<AtomicBool>) {
        self.ctx
            .bh_schedule_oneshot(move || reply.store(true, Ordering::Release));
    }
    fn cpu_clock(&self) -> libc::clockid_t {
        self.clock
    }
}

struct FloorTarget {
    lp: FloorLoop,
    clock: libc::clockid_t,
}

impl FloorTarget {
    fn new() -> FloorTarget {
        let lp = FloorLoop::start(|| {}).expect("floor loop");
        let (tx, rx) = std::sync::mpsc::channel();
        lp.handle().post(Box::new(move || {
            tx.send(current_thread_cpu_clock()).unwrap();
        }));
        let clock = rx.recv().expect("floor loop clock");
        FloorTarget { lp, clock }
    }
}

impl Target for FloorTarget {
    fn post(&self, reply: Arc<AtomicBool>) {
        self.lp
            .handle()
            .post(Box::new(move || reply.store(true, Ordering::Release)));
    }
    fn cpu_clock(&self) -> libc::clockid_t {
        self.clock
    }
}

/// The user-space floor: the loop thread spins on a request flag while a
/// round runs (and parks between rounds, so it does not steal the CPU from
/// the other systems' rounds).
struct SpinTarget {
    shared: Arc<SpinShared>,
    clock: libc::clockid_t,
    thread: std::thread::Thread,
    _lp: LoopThread,
}

struct SpinShared {
    request: std::sync::Mutex<Option<Arc<AtomicBool>>>,
    pending: AtomicBool,
    active: AtomicBool,
    stop: AtomicBool,
}

impl SpinTarget {
    fn new() -> SpinTarget {
        let shared = Arc::new(SpinShared {
            request: std::sync::Mutex::new(None),
            pending: AtomicBool::new(false),
            active: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        });
        let s = shared.clone();
        let ((clock, thread), lp) = LoopThread::spawn("spin-loop", move |tx| {
            tx.send((current_thread_cpu_clock(), std::thread::current()))
                .unwrap();
            while !s.stop.load(Ordering::Acquire) {
                if s.pending.swap(false, Ordering::Acquire) {
                    if let Some(reply) = s.request.lock().unwrap().take() {
                        reply.store(true, Ordering::Release);
                    }
                } else if s.active.load(Ordering::Relaxed) {
                    std::hint::spin_loop();
                } else {
                    std::thread::park();
                }
            }
        });
        let (s, t) = (shared.clone(), thread.clone());
        let lp = lp.stop_with(move || {
            s.stop.store(true, Ordering::Release);
            t.unpark();
        });
        SpinTarget {
            shared,
            clock,
            thread,
            _lp: lp,
        }
    }
}

impl Target for SpinTarget {
    fn post(&self, reply: Arc<AtomicBool>) {
        *self.shared.request.lock().unwrap() = Some(reply);
        self.shared.pending.store(true, Ordering::Release);
    }
    fn cpu_clock(&self) -> libc::clockid_t {
        self.clock
    }
    fn active(&self, on: bool) {
        self.shared.active.store(on, Ordering::Relaxed);
        if on {
            self.thread.unpark();
        }
    }
}

/// One round: `n` sequential round trips. `post` must get `reply.signal()`
/// called on the loop thread, in whatever way is natural for the system.
fn round_trips(n: u64, post: &dyn Fn(Arc<Reply>)) -> Vec<f64> {
    let reply = Reply::new();
    vec![ns_per_op(n, || {
        for _ in 0..n {
            post(reply.clone());
            reply.wait();
        }
    })]
}

fn aioctx(n: u64) -> Contender<'static> {
    let ctx = AioContext::new().expect("aioctx");
    let ((), lp) = LoopThread::spawn_aioctx(&ctx, || ());
    Contender::new(System::Aioctx, move || {
        let _keep = &lp;
        round_trips(n, &|r| ctx.bh_schedule_oneshot(move || r.signal()))
    })
}

fn floor(n: u64) -> Contender<'static> {
    let lp = FloorLoop::start(|| {}).expect("floor loop");
    let h = lp.handle();
    Contender::new(System::Floor, move || {
        let _keep = &lp;
        round_trips(n, &|r| h.post(Box::new(move || r.signal())))
    })
}

fn tokio(n: u64) -> Contender<'static> {
    let (handle, lp) = LoopThread::spawn("tokio-loop", |tx| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("tokio runtime");
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        tx.send((rt.handle().clone(), stop_tx)).unwrap();
        rt.block_on(async {
            let _ = stop_rx.await;
        });
    });
    let (handle, stop_tx) = handle;
    let lp = lp.stop_with(move || {
        let _ = stop_tx.send(());
    });
    Contender::new(System::Tokio, move || {
        let _keep = &lp;
        round_trips(n, &|r| {
            handle.spawn(async move { r.signal() });
        })
    })
}

fn calloop(n: u64) -> Contender<'static> {
    let ((sender, signal), lp) = LoopThread::spawn("calloop-loop", |tx| {
        let mut el = calloop::EventLoop::<()>::try_new().expect("calloop loop");
        let (sender, chan) = calloop::channel::channel::<Arc<Reply>>();
        el.handle()
            .insert_source(chan, |ev, _, _| {
                if let calloop::channel::Event::Msg(r) = ev {
                    r.signal();
                }
            })
            .expect("insert channel");
        tx.send((sender, el.get_signal())).unwrap();
        el.run(None, &mut (), |_| {}).expect("calloop run");
    });
    let lp = lp.stop_with(move || {
        signal.stop();
        signal.wakeup();
    });
    Contender::new(System::Calloop, move || {
        let _keep = &lp;
        round_trips(n, &|r| sender.send(r).expect("calloop send"))
    })
}

fn glib(n: u64) -> Contender<'static> {
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let (ctx, lp) = LoopThread::spawn("glib-loop", move |tx| {
        let ctx = glib::MainContext::new();
        // Own the context for the thread's whole life: otherwise `invoke`
        // from another thread may run the closure on the caller's thread.
        let _owner = ctx.acquire().expect("acquire glib context");
        tx.send(ctx.clone()).unwrap();
        while !stop2.load(Ordering::SeqCst) {
            ctx.iteration(true);
        }
    });
    let waker = ctx.clone();
    let lp = lp.stop_with(move || {
        stop.store(true, Ordering::SeqCst);
        waker.wakeup();
    });
    Contender::new(System::Glib, move || {
        let _keep = &lp;
        round_trips(n, &|r| ctx.invoke(move || r.signal()))
    })
}
