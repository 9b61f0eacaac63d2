//! The six workloads of the benchmark, one module each.
//!
//! Every module exposes `run(scale, report)`, which builds one
//! [`Contender`](crate::harness::Contender) per system that has the feature,
//! runs them interleaved through [`harness::run`](crate::harness::run) and
//! appends the rows (and any side statistics) to the [`Report`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use crate::harness::{Row, Scale};

pub mod coalescing;
pub mod cross_thread;
pub mod deferred;
pub mod fd_io;
pub mod thread_pool;
pub mod timers;

/// Everything a run produces: the rows and free-form notes for the table.
#[derive(Default)]
pub struct Report {
    /// One row per (workload, system).
    pub rows: Vec<Row>,
    /// Side statistics printed under the table (not part of the JSON rows).
    pub notes: Vec<String>,
}

/// A workload: its name (matched by `--only`) and its entry point.
pub struct Workload {
    /// Short name, e.g. `"deferred"`.
    pub name: &'static str,
    /// Runs the workload and appends to the report.
    pub run: fn(Scale, &mut Report),
}

/// All workloads, in the order of the issue.
pub const ALL: &[Workload] = &[
    Workload {
        name: "deferred",
        run: deferred::run,
    },
    Workload {
        name: "cross-thread",
        run: cross_thread::run,
    },
    Workload {
        name: "coalescing",
        run: coalescing::run,
    },
    Workload {
        name: "timers",
        run: timers::run,
    },
    Workload {
        name: "fd",
        run: fd_io::run,
    },
    Workload {
        name: "thread-pool",
        run: thread_pool::run,
    },
];

/// A completion flag the measuring thread sleeps on and a loop thread sets:
/// `thread::park`/`unpark` (one futex each way), identical for every system so
/// that round trips differ only by the system's own posting path.
pub struct Reply {
    done: std::sync::atomic::AtomicBool,
    waiter: std::thread::Thread,
}

impl Reply {
    /// A reply whose waiter is the calling thread.
    pub fn new() -> std::sync::Arc<Reply> {
        std::sync::Arc::new(Reply {
            done: std::sync::atomic::AtomicBool::new(false),
            waiter: std::thread::current(),
        })
    }

    /// Marks the reply done and wakes the waiter.
    pub fn signal(&self) {
        self.done.store(true, std::sync::atomic::Ordering::Release);
        self.waiter.unpark();
    }

    /// Waits (on the thread that created the reply) until [`Reply::signal`],
    /// then re-arms it.
    pub fn wait(&self) {
        while !self.done.swap(false, std::sync::atomic::Ordering::Acquire) {
            std::thread::park();
        }
    }
}

/// A loop running on its own thread, stopped and joined on drop.
pub struct LoopThread {
    stop: Option<Box<dyn FnOnce()>>,
    thread: Option<JoinHandle<()>>,
}

impl LoopThread {
    /// Spawns `body`, which sends back whatever the poster needs through its
    /// sender and then runs the loop. Returns that value and the thread; give
    /// the thread its stop function with [`LoopThread::stop_with`].
    pub fn spawn<T: Send + 'static>(
        name: &str,
        body: impl FnOnce(mpsc::Sender<T>) + Send + 'static,
    ) -> (T, LoopThread) {
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || body(tx))
            .expect("spawn loop thread");
        let v = rx.recv().expect("loop thread started");
        let lp = LoopThread {
            stop: None,
            thread: Some(thread),
        };
        (v, lp)
    }

    /// Sets the function called on drop, which must make the loop return.
    pub fn stop_with(mut self, stop: impl FnOnce() + 'static) -> LoopThread {
        self.stop = Some(Box::new(stop));
        self
    }

    /// A thread running `ctx.poll(true)` until the returned handle is dropped; `first` runs on
    /// that thread before the loop starts, and its value is returned.
    pub fn spawn_aioctx<T: Send + 'static>(
        ctx: &aioctx::AioContext,
        first: impl FnOnce() -> T + Send + 'static,
    ) -> (T, LoopThread) {
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (ctx.clone(), stop.clone());
        let (value, lp) = LoopThread::spawn("aioctx-loop", move |tx| {
            tx.send(first()).unwrap();
            while !s.load(Ordering::SeqCst) {
                c.poll(true);
            }
        });
        let c = ctx.clone();
        let lp = lp.stop_with(move || {
            stop.store(true, Ordering::SeqCst);
            c.notify();
        });
        (value, lp)
    }
}

impl Drop for LoopThread {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            stop();
        }
        if let Some(t) = self.thread.take() {
            t.join().expect("loop thread panicked");
        }
    }
}
