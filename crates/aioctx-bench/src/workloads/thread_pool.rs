//! Workload 6: thread-pool round trip of an empty work item.
//!
//! The loop thread submits an empty closure to a worker pool and waits, in
//! its loop, for the completion to come back; one item at a time. Reports ns
//! per round trip.
//!
//! * aioctx: `thread_pool().submit_aio(work, done)`, `done` runs in `poll()`.
//! * tokio: `spawn_blocking(work).await` on a current_thread runtime.
//! * glib: `ThreadPool::push` of a closure that `invoke`s the completion back
//!   onto the loop's `MainContext`, which the loop thread owns.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::harness::{self, ns_per_op, Contender, Scale, System};
use crate::workloads::Report;

const NAME: &str = "6 thread-pool round trip";

/// Runs the workload.
pub fn run(scale: Scale, report: &mut Report) {
    let n = scale.n(100_000, 20_000);
    let contenders = vec![aioctx(n), tokio(n), glib(n)];
    report
        .rows
        .extend(harness::run(NAME, scale.rounds(10, 4), contenders));
}

fn aioctx(n: u64) -> Contender<'static> {
    let ctx = aioctx::AioContext::new().expect("aioctx");
    let pool = ctx.thread_pool();
    Contender::new(System::Aioctx, move || {
        let done = Arc::new(AtomicBool::new(false));
        vec![ns_per_op(n, || {
            for _ in 0..n {
                let d = done.clone();
                // Dropping the AioCb does not cancel the request.
                let _aiocb = pool.submit_aio(|| (), move |_| d.store(true, Ordering::Relaxed));
                while !done.swap(false, Ordering::Relaxed) {
                    ctx.poll(true);
                }
            }
        })]
    })
}

fn tokio(n: u64) -> Contender<'static> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("tokio runtime");
    Contender::new(System::Tokio, move || {
        vec![ns_per_op(n, || {
            rt.block_on(async {
                for _ in 0..n {
                    tokio::task::spawn_blocking(|| ()).await.expect("work");
                }
            })
        })]
    })
}

fn glib(n: u64) -> Contender<'static> {
    let ctx = glib::MainContext::new();
    let pool = glib::ThreadPool::shared(None).expect("glib thread pool");
    Contender::new(System::Glib, move || {
        let _owner = ctx.acquire().expect("acquire glib context");
        let done = Arc::new(AtomicBool::new(false));
        vec![ns_per_op(n, || {
            for _ in 0..n {
                let (ctx2, done2) = (ctx.clone(), done.clone());
                // The ThreadHandle is only needed to join; completion comes
                // back through the main context like a real glib program.
                let _handle = pool
                    .push(move || ctx2.invoke(move || done2.store(true, Ordering::Relaxed)))
                    .expect("push work");
                while !done.swap(false, Ordering::Relaxed) {
                    ctx.iteration(true);
                }
            }
        })]
    })
}
