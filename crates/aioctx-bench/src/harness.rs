//! The measurement harness: interleaved rounds, warm-up, median/p99 and ratios.
//!
//! A workload builds one [`Contender`] per system. Each contender owns whatever
//! it needs (a loop thread, sockets, a runtime) and exposes a closure that runs
//! one *round* and returns that round's samples in nanoseconds (one sample per
//! round for throughput workloads, which report ns per operation; one sample
//! per event for latency workloads such as timer lateness).
//!
//! [`run`] interleaves the contenders round by round (A B C, B C A, C A B, ...:
//! the starting system rotates so none always runs right after another), throws
//! away the warm-up rounds and reduces the rest to a median and a p99.

use std::fmt;
use std::time::{Duration, Instant};

/// The systems a workload can run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum System {
    /// The aioctx library, the system under test.
    Aioctx,
    /// A raw eventfd + epoll loop written in this crate: the lower bound.
    Floor,
    /// tokio (current_thread runtime unless the workload says otherwise).
    Tokio,
    /// calloop.
    Calloop,
    /// mio, used directly.
    Mio,
    /// GLib's main loop, through the glib crate.
    Glib,
    /// aioctx with busy-polling on (`--poll-max-ns`).
    AioctxPoll,
    /// A thread spinning on an atomic: the user-space floor of a wake-up.
    Spin,
}

impl System {
    /// The name used in the table, the JSON rows and the chart.
    pub fn name(self) -> &'static str {
        match self {
            System::Aioctx => "aioctx",
            System::Floor => "floor",
            System::Tokio => "tokio",
            System::Calloop => "calloop",
            System::Mio => "mio",
            System::Glib => "glib",
            System::AioctxPoll => "aioctx-poll",
            System::Spin => "spin",
        }
    }

    /// True for the systems aioctx is compared against for "best peer"
    /// (everything but aioctx itself, its polling variant and the floors).
    pub fn is_peer(self) -> bool {
        !matches!(
            self,
            System::Aioctx | System::Floor | System::AioctxPoll | System::Spin
        )
    }
}

impl fmt::Display for System {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One system taking part in a workload.
pub struct Contender<'a> {
    system: System,
    round: Box<dyn FnMut() -> Vec<f64> + 'a>,
}

impl<'a> Contender<'a> {
    /// `round` runs one round and returns its samples in nanoseconds.
    pub fn new(system: System, round: impl FnMut() -> Vec<f64> + 'a) -> Self {
        Contender {
            system,
            round: Box::new(round),
        }
    }
}

/// How many rounds to run.
#[derive(Clone, Copy, Debug)]
pub struct Rounds {
    /// Rounds run and thrown away before measuring.
    pub warmup: usize,
    /// Rounds measured.
    pub measured: usize,
}

/// The result for one (workload, system) pair.
#[derive(Clone, Debug)]
pub struct Row {
    /// Workload name, e.g. `"deferred callback"`.
    pub workload: String,
    /// The system measured.
    pub system: System,
    /// Median of the samples, in ns (per operation, or per event).
    pub median_ns: f64,
    /// 99th percentile (nearest rank) of the samples, in ns.
    pub p99_ns: f64,
    /// How many samples the statistics were computed from.
    pub samples: usize,
}

static ONLY_SYSTEMS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();

/// Restricts every later [`run`] to the systems named in `names` (all when
/// empty): for profiling or tracing one system at a time.
pub fn only_systems(names: Vec<String>) {
    let _ = ONLY_SYSTEMS.set(names);
}

fn selected(system: System) -> bool {
    ONLY_SYSTEMS
        .get()
        .is_none_or(|v| v.is_empty() || v.iter().any(|n| n == system.name()))
}

/// Runs `contenders` interleaved for `rounds` and returns one row per system.
pub fn run(workload: &str, rounds: Rounds, mut contenders: Vec<Contender<'_>>) -> Vec<Row> {
    contenders.retain(|c| selected(c.system));
    let n = contenders.len();
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); n];
    for round in 0..rounds.warmup + rounds.measured {
        for i in 0..n {
            let idx = (i + round) % n;
            let s = (contenders[idx].round)();
            if round >= rounds.warmup {
                samples[idx].extend(s);
            }
        }
    }
    contenders
        .iter()
        .zip(samples)
        .map(|(c, s)| {
            let (median_ns, p99_ns) = median_p99(s.clone());
            Row {
                workload: workload.to_string(),
                system: c.system,
                median_ns,
                p99_ns,
                samples: s.len(),
            }
        })
        .collect()
}

/// Median and nearest-rank 99th percentile; NaN for no samples.
pub fn median_p99(mut s: Vec<f64>) -> (f64, f64) {
    if s.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    s.sort_by(f64::total_cmp);
    let median = if s.len() % 2 == 1 {
        s[s.len() / 2]
    } else {
        (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2.0
    };
    let rank = ((s.len() as f64) * 0.99).ceil() as usize;
    (median, s[rank.clamp(1, s.len()) - 1])
}

/// Median of a list of counters (used for the side statistics of workload 3).
pub fn median_u64(mut v: Vec<u64>) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    v[v.len() / 2]
}

/// Times `f` and returns nanoseconds per operation for `ops` operations.
pub fn ns_per_op(ops: u64, f: impl FnOnce()) -> f64 {
    let start = Instant::now();
    f();
    nanos(start.elapsed()) / ops.max(1) as f64
}

/// A duration in nanoseconds as f64.
pub fn nanos(d: Duration) -> f64 {
    d.as_secs_f64() * 1e9
}

/// CPU time consumed so far by the calling thread.
pub fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec and CLOCK_THREAD_CPUTIME_ID is
    // always supported on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID) failed");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// The CPU-time clock of the calling thread, readable from any thread with
/// [`cpu_time_of`]: to measure what a loop thread burns while another thread
/// measures latency.
pub fn current_thread_cpu_clock() -> libc::clockid_t {
    let mut clock: libc::clockid_t = 0;
    // SAFETY: pthread_self() is the calling thread, alive for the call;
    // `clock` is a valid place for the result.
    let rc = unsafe { libc::pthread_getcpuclockid(libc::pthread_self(), &mut clock) };
    assert_eq!(rc, 0, "pthread_getcpuclockid failed: {rc}");
    clock
}

/// CPU time consumed so far by the thread whose clock is `clock` (from
/// [`current_thread_cpu_clock`]; the thread must still be alive).
pub fn cpu_time_of(clock: libc::clockid_t) -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(thread CPU clock) failed");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Restricts the calling thread to the CPUs in `cpus` (all online CPUs when
/// empty). Threads spawned afterwards inherit the mask.
pub fn pin_current_thread(cpus: &[usize]) {
    // Not `online_cpus()`: that follows the current mask, so after pinning to
    // one CPU, "all" would mean that CPU alone.
    // SAFETY: sysconf takes no pointers.
    let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as usize;
    let all: Vec<usize> = (0..online).collect();
    let cpus = if cpus.is_empty() { &all[..] } else { cpus };
    // SAFETY: cpu_set_t is plain data for which all-zeroes is the empty set;
    // CPU_SET only writes inside `set` (it bounds-checks the index) and
    // sched_setaffinity reads `size_of::<cpu_set_t>()` bytes from it.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in cpus {
            libc::CPU_SET(c, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    assert_eq!(
        rc,
        0,
        "sched_setaffinity: {}",
        std::io::Error::last_os_error()
    );
}

/// Number of CPUs the process may use.
pub fn online_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Chooses the quick or the full size of a parameter.
#[derive(Clone, Copy, Debug)]
pub struct Scale {
    /// `--quick`: the whole run must finish in under a minute.
    pub quick: bool,
    /// Divides every size further (used by the smoke test: `--tiny`).
    pub shrink: u64,
}

impl Scale {
    /// `full` in full mode, `quick` in quick mode, divided by `shrink`
    /// (never below 1).
    pub fn n(&self, full: u64, quick: u64) -> u64 {
        let base = if self.quick { quick } else { full };
        (base / self.shrink.max(1)).max(1)
    }

    /// The number of rounds: `full` or `quick`, and a single warm-up round.
    pub fn rounds(&self, full: usize, quick: usize) -> Rounds {
        let measured = if self.shrink > 1 {
            2
        } else if self.quick {
            quick
        } else {
            full
        };
        Rounds {
            warmup: 1,
            measured,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_p99() {
        assert_eq!(median_p99(vec![3.0, 1.0, 2.0]), (2.0, 3.0));
        assert_eq!(median_p99(vec![4.0, 1.0, 2.0, 3.0]), (2.5, 4.0));
        let v: Vec<f64> = (1..=1000).map(f64::from).collect();
        assert_eq!(median_p99(v), (500.5, 990.0));
        assert!(median_p99(vec![]).0.is_nan());
    }

    #[test]
    fn rounds_are_interleaved_and_warmup_dropped() {
        use std::cell::RefCell;
        let order = RefCell::new(Vec::new());
        let mk = |sys: System| {
            let order = &order;
            let mut k = 0.0;
            Contender::new(sys, move || {
                order.borrow_mut().push(sys);
                k += 1.0;
                vec![k]
            })
        };
        let rows = run(
            "w",
            Rounds {
                warmup: 1,
                measured: 3,
            },
            vec![mk(System::Aioctx), mk(System::Tokio)],
        );
        use System::*;
        assert_eq!(
            *order.borrow(),
            [Aioctx, Tokio, Tokio, Aioctx, Aioctx, Tokio, Tokio, Aioctx]
        );
        assert_eq!(rows[0].samples, 3);
        assert_eq!(rows[0].median_ns, 3.0); // samples 2, 3, 4
    }
}
