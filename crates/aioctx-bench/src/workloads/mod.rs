//! The six workloads of the benchmark, one module each.
//!
//! Every module exposes `run(scale, report)`, which builds one
//! [`Contender`](crate::harness::Contender) per system that has the feature,
//! runs them interleaved through [`harness::run`](crate::harness::run) and
//! appends the rows (and any side statistics) to the [`Report`].

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
