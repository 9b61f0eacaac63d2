//! Workload 1: a deferred callback on the loop's own thread.
//!
//! A chain of N callbacks, each scheduling the next from inside the loop, so
//! every step is one schedule -> dispatch -> run. Reports ns per step.
//!
//! * aioctx: `bh_schedule_oneshot`, driven by `poll(true)`.
//! * calloop: `insert_idle`, driven by `dispatch(Some(0))` (calloop runs the
//!   idles queued before the dispatch, one generation per dispatch).
//! * glib: `idle_add_local_once` on the default `MainContext`, `iteration(true)`.
//! * tokio: `spawn_local` on a `LocalSet` over a current_thread runtime.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aioctx::AioContext;

use crate::harness::{self, ns_per_op, Contender, Scale, System};
use crate::workloads::Report;

const NAME: &str = "1 deferred callback (same thread)";

/// Runs the workload.
pub fn run(scale: Scale, report: &mut Report) {
    let n = scale.n(1_000_000, 200_000);
    let contenders = vec![aioctx(n), calloop(n), glib(n), tokio(n)];
    report
        .rows
        .extend(harness::run(NAME, scale.rounds(15, 5), contenders));
}

fn aioctx(n: u64) -> Contender<'static> {
    fn chain(ctx: &'static AioContext, left: Arc<AtomicU64>) {
        ctx.bh_schedule_oneshot(move || {
            if left.fetch_sub(1, Ordering::Relaxed) > 1 {
                chain(ctx, left);
            }
        });
    }
    // Leaked once so that each step captures a plain reference: the step then
    // costs the BH alone, not also an atomic refcount on a context clone (the
    // peers' steps capture an `Rc` or nothing).
    let ctx: &'static AioContext = Box::leak(Box::new(AioContext::new().expect("aioctx")));
    Contender::new(System::Aioctx, move || {
        vec![ns_per_op(n, || {
            let left = Arc::new(AtomicU64::new(n));
            chain(ctx, left.clone());
            while left.load(Ordering::Relaxed) > 0 {
                ctx.poll(true);
            }
        })]
    })
}

fn calloop(n: u64) -> Contender<'static> {
    fn chain(h: calloop::LoopHandle<'static, u64>) {
        let next = h.clone();
        h.insert_idle(move |left: &mut u64| {
            *left -= 1;
            if *left > 0 {
                chain(next);
            }
        });
    }
    let mut el = calloop::EventLoop::<u64>::try_new().expect("calloop loop");
    Contender::new(System::Calloop, move || {
        vec![ns_per_op(n, || {
            let mut left = n;
            chain(el.handle());
            while left > 0 {
                el.dispatch(Some(Duration::ZERO), &mut left)
                    .expect("calloop dispatch");
            }
        })]
    })
}

fn glib(n: u64) -> Contender<'static> {
    fn chain(left: Rc<Cell<u64>>) {
        glib::idle_add_local_once(move || {
            left.set(left.get() - 1);
            if left.get() > 0 {
                chain(left);
            }
        });
    }
    // `idle_add_local_once` attaches to the global default context (not the
    // thread-default one), which this thread then owns and iterates.
    let ctx = glib::MainContext::default();
    Contender::new(System::Glib, move || {
        let _owner = ctx.acquire().expect("acquire glib default context");
        vec![ns_per_op(n, || {
            let left = Rc::new(Cell::new(n));
            chain(left.clone());
            while left.get() > 0 {
                ctx.iteration(true);
            }
        })]
    })
}

fn tokio(n: u64) -> Contender<'static> {
    fn chain(left: u64, done: tokio::sync::oneshot::Sender<()>) {
        if left == 0 {
            let _ = done.send(());
        } else {
            tokio::task::spawn_local(async move { chain(left - 1, done) });
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("tokio runtime");
    let local = tokio::task::LocalSet::new();
    Contender::new(System::Tokio, move || {
        vec![ns_per_op(n, || {
            local.block_on(&rt, async {
                let (tx, rx) = tokio::sync::oneshot::channel();
                chain(n, tx);
                rx.await.expect("chain finished");
            })
        })]
    })
}
