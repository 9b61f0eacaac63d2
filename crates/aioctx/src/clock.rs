//! Clocks (QEMU's `QEMUClockType` and `qemu_clock_get_ns`).
//!
//! * [`ClockType::Realtime`]: a monotonic clock that always runs (QEMU's `QEMU_CLOCK_REALTIME`).
//! * [`ClockType::Host`]: wall-clock time since the Unix epoch; it may jump when the system time
//!   is set (QEMU's `QEMU_CLOCK_HOST`).
//! * [`ClockType::Virtual`]: the program's own clock. It runs at the monotonic rate while
//!   started, stands still while stopped, and can be advanced or set by the program, so timer
//!   code can be tested deterministically (QEMU's `QEMU_CLOCK_VIRTUAL`, the guest clock).
//!   It starts stopped at 0 unless started with [`virtual_clock::start`].
//! * [`ClockType::VirtualRt`]: equal to `Virtual` (QEMU's `QEMU_CLOCK_VIRTUAL_RT` outside icount
//!   mode).
//!
//! A stopped virtual clock's timers fire only when the program advances the clock past their
//! deadlines; starting or advancing the clock wakes every context that has timers on it.

use std::sync::{Arc, OnceLock, Weak};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;

/// One nanosecond in timer units (QEMU's `SCALE_NS`).
pub const SCALE_NS: i64 = 1;
/// One microsecond in nanoseconds (QEMU's `SCALE_US`).
pub const SCALE_US: i64 = 1_000;
/// One millisecond in nanoseconds (QEMU's `SCALE_MS`).
pub const SCALE_MS: i64 = 1_000_000;

/// A clock that timers can run on (QEMU's `QEMUClockType`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ClockType {
    /// Monotonic time that always runs (`QEMU_CLOCK_REALTIME`).
    Realtime,
    /// The program-controlled clock (`QEMU_CLOCK_VIRTUAL`); see [`virtual_clock`].
    Virtual,
    /// Wall-clock time in ns since the Unix epoch (`QEMU_CLOCK_HOST`).
    Host,
    /// Same as `Virtual` (`QEMU_CLOCK_VIRTUAL_RT` outside icount mode).
    VirtualRt,
}

impl ClockType {
    /// Every clock, in the order of QEMU's enum.
    pub const ALL: [ClockType; 4] = [
        ClockType::Realtime,
        ClockType::Virtual,
        ClockType::Host,
        ClockType::VirtualRt,
    ];

    pub(crate) const fn index(self) -> usize {
        match self {
            ClockType::Realtime => 0,
            ClockType::Virtual => 1,
            ClockType::Host => 2,
            ClockType::VirtualRt => 3,
        }
    }

    /// Whether the clock moves by itself (a stopped virtual clock moves only when the program
    /// advances it), i.e. whether waiting for one of its deadlines makes sense.
    pub(crate) fn is_running(self) -> bool {
        match self {
            ClockType::Realtime | ClockType::Host => true,
            ClockType::Virtual | ClockType::VirtualRt => VIRTUAL.lock().running,
        }
    }
}

/// The current time of `clock` in nanoseconds (QEMU's `qemu_clock_get_ns`).
///
/// ```
/// use aioctx::{clock_get_ns, ClockType};
/// let a = clock_get_ns(ClockType::Realtime);
/// let b = clock_get_ns(ClockType::Realtime);
/// assert!(b >= a);
/// ```
pub fn clock_get_ns(clock: ClockType) -> i64 {
    match clock {
        ClockType::Realtime => monotonic_ns(),
        ClockType::Host => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i64),
        ClockType::Virtual | ClockType::VirtualRt => VIRTUAL.lock().now(),
    }
}

/// Nanoseconds on the monotonic clock since an arbitrary point fixed at first use.
pub(crate) fn monotonic_ns() -> i64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    // Instant is CLOCK_MONOTONIC on Linux and QueryPerformanceCounter on Windows: the clocks the
    // kernels' own wait timeouts are measured against, so a wait never ends early by our clock.
    epoch.elapsed().as_nanos() as i64
}

struct VirtualClock {
    running: bool,
    /// While running: the virtual time is `monotonic_ns() + offset`.
    /// While stopped: the virtual time is `offset`.
    offset: i64,
    /// Wakers of contexts with timers on the virtual clocks.
    watchers: Vec<Weak<dyn Fn() + Send + Sync>>,
}

impl VirtualClock {
    fn now(&self) -> i64 {
        if self.running {
            monotonic_ns() + self.offset
        } else {
            self.offset
        }
    }
}

static VIRTUAL: Mutex<VirtualClock> = Mutex::new(VirtualClock {
    running: false,
    offset: 0,
    watchers: Vec::new(),
});

/// Registers a waker called whenever the virtual clock starts or jumps.
pub(crate) fn watch_virtual(waker: &Arc<dyn Fn() + Send + Sync>) {
    let mut clock = VIRTUAL.lock();
    clock.watchers.retain(|w| w.strong_count() > 0);
    clock.watchers.push(Arc::downgrade(waker));
}

fn changed(clock: parking_lot::MutexGuard<'_, VirtualClock>) {
    let wakers: Vec<_> = clock.watchers.iter().filter_map(Weak::upgrade).collect();
    drop(clock);
    for wake in wakers {
        wake();
    }
}

/// Control of the program's virtual clock ([`ClockType::Virtual`] and [`ClockType::VirtualRt`]),
/// QEMU's `cpu_enable_ticks`/`cpu_disable_ticks`/`qtest_clock_warp`.
///
/// The clock is global to the process, like QEMU's: tests that drive it must not run in
/// parallel with each other.
pub mod virtual_clock {
    use super::{changed, monotonic_ns, VIRTUAL};

    /// Starts the clock from its current value (QEMU's `cpu_enable_ticks`).
    pub fn start() {
        let mut clock = VIRTUAL.lock();
        if !clock.running {
            clock.offset -= monotonic_ns();
            clock.running = true;
        }
        changed(clock);
    }

    /// Freezes the clock at its current value (QEMU's `cpu_disable_ticks`).
    pub fn stop() {
        let mut clock = VIRTUAL.lock();
        if clock.running {
            clock.offset += monotonic_ns();
            clock.running = false;
        }
    }

    /// Whether the clock is running.
    pub fn is_running() -> bool {
        VIRTUAL.lock().running
    }

    /// Moves the clock forward by `ns` (negative values are ignored: the clock never goes back),
    /// waking the contexts whose virtual timers may now be due (QEMU's `qtest_clock_warp`).
    pub fn advance(ns: i64) {
        let mut clock = VIRTUAL.lock();
        clock.offset += ns.max(0);
        changed(clock);
    }

    /// Sets the clock to `ns` if that is later than now (the clock is monotonic).
    pub fn set(ns: i64) {
        let mut clock = VIRTUAL.lock();
        let now = clock.now();
        if ns > now {
            clock.offset += ns - now;
        }
        changed(clock);
    }
}
