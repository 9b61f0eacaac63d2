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

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use aioctx::AioContext;

use crate::floor::FloorLoop;
use crate::harness::{self, ns_per_op, Contender, Scale, System};
use crate::workloads::{LoopThread, Reply, Report};

/// Runs the workload twice: with the loop threads and the measuring thread on
/// the same CPU, and on two different CPUs.
pub fn run(scale: Scale, report: &mut Report) {
    // A cross-CPU wake-up costs tens of microseconds on a VM: fewer of those.
    let mut placements = vec![(
        "2a cross-thread round trip, same CPU",
        0,
        scale.n(100_000, 20_000),
    )];
    if harness::online_cpus() > 1 {
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
    let stop = Arc::new(AtomicBool::new(false));
    let (c, s) = (ctx.clone(), stop.clone());
    let ((), lp) = LoopThread::spawn("aioctx-loop", move |tx| {
        tx.send(()).unwrap();
        while !s.load(Ordering::SeqCst) {
            c.poll(true);
        }
    });
    let c = ctx.clone();
    let lp = lp.stop_with(move || {
        stop.store(true, Ordering::SeqCst);
        c.notify();
    });
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
