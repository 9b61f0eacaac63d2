//! Adaptive busy-polling (QEMU 2.9's `poll-max-ns`, `try_poll_mode`, `run_poll_handlers` and
//! `adjust_polling_time`), and the context's statistics.
//!
//! Waking a thread that sleeps in the kernel costs tens of microseconds on a VM; a thread that
//! spins in user space sees the same event in about one. So, when enabled, a blocking
//! [`AioContext::poll`](crate::AioContext::poll) first spins for up to the current *poll window*,
//! asking every `io_poll` callback whether it has work, watching `notified` (the context's own
//! notifier is pollable: a [`notify`](crate::AioContext::notify) or a BH scheduled from another
//! thread shows up there with no system call) and the back end: on every round with io_uring
//! (its completion ring is in user space), and with epoll or poll(2) only while some handler has
//! no `io_poll`, with a zero-timeout wait per round whose events, once there are some, are the
//! poll's wait. (QEMU does not spin at all then; here a socket without `io_poll` is served from
//! the spin like any other event, which is what makes polling pay off for a network server.)
//! Handlers do not run while
//! spinning: the spin only finds work, the poll then runs it as usual, so handler time never
//! counts as polling.
//!
//! # Wake-up invariant
//!
//! Spinning happens *before* the poll announces a sleep (`notify_me += 2`): while it spins,
//! `notify_me` is 0, so a concurrent notify sets `notified` and writes nothing. If the spin ends
//! empty-handed, the poll goes on exactly as without polling: `notify_me += 2`, full fence, read
//! `notified`. A notify that raced with the end of the spin is then either seen there or sees
//! `notify_me != 0` and writes the eventfd (the Dekker argument of the context module). Spinning
//! only ever *adds* checks before that protocol, so it cannot lose a wake-up.
//!
//! # The window
//!
//! One window per context (QEMU before 2025 had one per context; since then one per handler),
//! adjusted after every blocking poll from `block_ns`, the time from the start of the spin to
//! the end of the wait (QEMU's `adjust_polling_time`):
//!
//! * `block_ns <= window`: the spin found the work; keep the window.
//! * `block_ns > poll_max_ns`: the work came too late for any allowed window; shrink it (divide
//!   by `poll_shrink`, or reset it to 0 when `poll_shrink` is 0, the default).
//! * otherwise a longer window would have caught it: grow it (multiply by `poll_grow`, 2 when
//!   `poll_grow` is 0, the default; from 0 it starts at 4 µs), capped at `poll_max_ns`.
//!
//! Non-blocking polls neither spin nor adjust the window. With `poll_max_ns == 0` (the default)
//! nothing here runs: no clock reads, no spinning.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use crate::handlers::HandlerCell;
use crate::sys::Event;

/// An `io_poll` callback (QEMU's `AioPollFn`): returns true when its handler has work, without
/// making a system call (it typically looks at a ring or a flag in shared memory). When it does,
/// the poll runs the handler's `io_read`. It runs on the polling thread, possibly many times per
/// microsecond, so it must be cheap and must not block.
pub type PollHandler = Box<dyn FnMut() -> bool + Send + 'static>;

/// Where a window starts (QEMU's 4 µs).
const INITIAL_WINDOW_NS: u64 = 4_000;

/// The busy-polling parameters of a context (QEMU's IOThread properties `poll-max-ns`,
/// `poll-grow`, `poll-shrink`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PollParams {
    /// The longest window, in ns; 0 (the default) disables polling.
    pub max_ns: u64,
    /// The factor a window grows by; 0 means 2.
    pub grow: u64,
    /// The divisor a window shrinks by; 0 means "reset to 0".
    pub shrink: u64,
}

impl PollParams {
    /// `AIOCTX_POLL_MAX_NS` as the default window of every context (0 when unset or empty).
    pub(crate) fn from_env() -> std::io::Result<PollParams> {
        let max_ns = match std::env::var("AIOCTX_POLL_MAX_NS") {
            Ok(v) if !v.trim().is_empty() => v.trim().parse().map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("AIOCTX_POLL_MAX_NS={v:?}: {e} (expected nanoseconds)"),
                )
            })?,
            _ => 0,
        };
        Ok(PollParams {
            max_ns,
            ..PollParams::default()
        })
    }
}

/// A context's polling state. The parameters may be changed from any thread; the window is
/// only written by the polling thread (or reset by a parameter change: QEMU too tolerates one
/// poll using a stale value).
pub(crate) struct Polling {
    max_ns: AtomicU64,
    grow: AtomicU64,
    shrink: AtomicU64,
    window_ns: AtomicU64,
    /// Live [`PollingDisabled`](crate::PollingDisabled) guards (QEMU's `poll_disable_cnt`):
    /// no spinning while it is not 0.
    disabled: AtomicUsize,
}

impl Polling {
    pub(crate) fn new(params: PollParams) -> Polling {
        Polling {
            max_ns: AtomicU64::new(params.max_ns),
            grow: AtomicU64::new(params.grow),
            shrink: AtomicU64::new(params.shrink),
            window_ns: AtomicU64::new(0),
            disabled: AtomicUsize::new(0),
        }
    }

    /// Whether a blocking poll should spin. A disabled poll neither spins nor adjusts the
    /// window, so the window is where it was when polling resumes. The counter is a hint, not
    /// a lock: a guard taken on another thread while a spin runs shortens no window, it only
    /// stops the next one.
    pub(crate) fn enabled(&self) -> bool {
        self.max_ns.load(Ordering::Relaxed) != 0 && self.disabled.load(Ordering::Relaxed) == 0
    }

    pub(crate) fn disable(&self) {
        self.disabled.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn enable(&self) {
        let before = self.disabled.fetch_sub(1, Ordering::Relaxed);
        debug_assert_ne!(before, 0, "polling enabled more often than disabled");
    }

    pub(crate) fn params(&self) -> PollParams {
        PollParams {
            max_ns: self.max_ns.load(Ordering::Relaxed),
            grow: self.grow.load(Ordering::Relaxed),
            shrink: self.shrink.load(Ordering::Relaxed),
        }
    }

    /// QEMU's `aio_context_set_poll_params`: new parameters, window back to 0.
    pub(crate) fn set_params(&self, params: PollParams) {
        self.max_ns.store(params.max_ns, Ordering::Relaxed);
        self.grow.store(params.grow, Ordering::Relaxed);
        self.shrink.store(params.shrink, Ordering::Relaxed);
        self.window_ns.store(0, Ordering::Relaxed);
    }

    pub(crate) fn window_ns(&self) -> u64 {
        self.window_ns.load(Ordering::Relaxed)
    }

    /// QEMU's `adjust_polling_time` (see the module docs).
    pub(crate) fn adjust(&self, block_ns: u64) {
        let PollParams {
            max_ns,
            grow,
            shrink,
        } = self.params();
        let window = self.window_ns();
        let new = if block_ns <= window {
            window
        } else if block_ns > max_ns {
            window.checked_div(shrink).unwrap_or(0)
        } else if window < max_ns {
            let grown = if window == 0 {
                INITIAL_WINDOW_NS
            } else {
                window.saturating_mul(if grow == 0 { 2 } else { grow })
            };
            grown.min(max_ns)
        } else {
            window
        };
        if new != window {
            self.window_ns.store(new, Ordering::Relaxed);
        }
    }
}

/// What a spin found.
#[derive(Debug, Default)]
pub(crate) struct Found {
    /// Something is ready: `notified`, an `io_poll` callback, or the back end.
    pub(crate) any: bool,
    /// Tokens whose `io_poll` reported work, to dispatch as readable.
    pub(crate) tokens: Vec<u64>,
    /// The back end has readiness to report: the poll must call its wait.
    pub(crate) backend: bool,
}

/// One blocking poll's polling phase.
pub(crate) struct Spin {
    /// When the phase began: `block_ns` is measured from here to the end of the wait.
    pub(crate) start: Instant,
    /// What the poll's wait has left to do.
    pub(crate) then: AfterSpin,
    /// Tokens whose `io_poll` reported work.
    pub(crate) tokens: Vec<u64>,
}

/// What a poll's wait has left to do after its spin.
pub(crate) enum AfterSpin {
    /// As without polling: the spin found nothing, or found work while some descriptor went
    /// unasked.
    Wait,
    /// The spin found work after asking every handler's `io_poll`, and the back end has
    /// nothing: no wait can find more, so it may be skipped.
    Skip,
    /// The back end has readiness to report: the wait (timeout 0) must collect it.
    Collect,
    /// The spin's own zero-timeout wait collected these events (with the wait epoch it
    /// started): they are the poll's wait.
    Collected(u64, Vec<Event>),
}

impl Spin {
    /// A phase that did not spin (work was ready, the window is 0, or spinning is not allowed):
    /// it still measures `block_ns` for the window.
    pub(crate) fn idle(start: Instant) -> Spin {
        Spin {
            start,
            then: AfterSpin::Wait,
            tokens: Vec::new(),
        }
    }
}

/// Adds `tokens` to `events` as readable, once each.
pub(crate) fn merge_readable(events: &mut Vec<Event>, tokens: &[u64]) {
    for &token in tokens {
        match events.iter_mut().find(|e| e.token == token) {
            Some(e) => e.readable = true,
            None => events.push(Event {
                token,
                readable: true,
                writable: false,
            }),
        }
    }
}

/// Spins for at most `max_ns` (QEMU's `run_poll_handlers`), until `notified()` is set, an
/// `io_poll` callback reports work or the back end has something to report.
pub(crate) fn spin(
    start: Instant,
    max_ns: u64,
    notified: impl Fn() -> bool,
    pollable: &[(u64, std::sync::Arc<HandlerCell>)],
    mut backend: Option<BackendCheck<'_>>,
) -> Found {
    let mut found = Found::default();
    let mut next_backend_ns = 0;
    loop {
        for (token, cell) in pollable {
            if cell.poll() {
                found.tokens.push(*token);
            }
        }
        if !found.tokens.is_empty() || notified() {
            found.any = true;
            return found;
        }
        let now_ns = start.elapsed().as_nanos().min(u128::from(u64::MAX)) as u64;
        if let Some(check) = backend.as_mut() {
            if now_ns >= next_backend_ns {
                next_backend_ns = now_ns + check.every_ns;
                if (check.ready)() {
                    found.any = true;
                    found.backend = true;
                    return found;
                }
            }
        }
        if now_ns >= max_ns {
            return found;
        }
        std::hint::spin_loop();
    }
}

/// How a spin asks the back end whether it has something to report.
pub(crate) struct BackendCheck<'a> {
    /// The question (true: ready).
    pub(crate) ready: &'a mut dyn FnMut() -> bool,
    /// The least time between two questions, in ns (0: every round).
    pub(crate) every_ns: u64,
}

/// How often a spin may ask a back end whose question is a system call (a zero-timeout wait).
/// Asking in a tight loop takes the epoll instance's lock every few hundred ns, the lock a
/// producer on another CPU needs to report readiness: measured with 64 KiB NBD writes on two
/// CPUs, that contention cost the client more than the spin saved. Every 2 µs keeps the
/// detection delay far below the wake-up it replaces (tens of µs on a VM).
pub(crate) const SYSCALL_CHECK_EVERY_NS: u64 = 2_000;

/// Counters of a context's slow paths, for tests and benchmarks (see [`Stats`]). Each is a
/// relaxed atomic bumped only where the loop already pays for a system call or a whole
/// polling window, never on the fast path of `notify` or of a BH schedule.
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) notify_writes: AtomicU64,
    pub(crate) blocking_waits: AtomicU64,
    pub(crate) poll_hits: AtomicU64,
    pub(crate) poll_misses: AtomicU64,
}

impl Counters {
    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// A snapshot of a context's counters ([`AioContext::stats`](crate::AioContext::stats)).
///
/// The counters only grow; compare two snapshots to measure an interval.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Wake-up writes to the context's own notifier (an eventfd on Linux) made by
    /// [`notify`](crate::AioContext::notify) and everything that notifies (BH schedules, timers,
    /// registrations from other threads). Coalesced: at most one per sleep.
    pub notify_writes: u64,
    /// Waits in the back end that could block (timeout not 0): the loop announced a sleep.
    pub blocking_waits: u64,
    /// Polling windows that found work before they ran out.
    pub poll_hits: u64,
    /// Polling windows that ran out without finding work (the poll then waited in the kernel).
    pub poll_misses: u64,
    /// The current polling window in ns (0 when `poll_max_ns` is 0 or the window has shrunk to
    /// nothing; a [`PollingDisabled`](crate::PollingDisabled) guard leaves it as it was).
    pub poll_window_ns: u64,
}

impl Counters {
    pub(crate) fn snapshot(&self, polling: &Polling) -> Stats {
        Stats {
            notify_writes: self.notify_writes.load(Ordering::Relaxed),
            blocking_waits: self.blocking_waits.load(Ordering::Relaxed),
            poll_hits: self.poll_hits.load(Ordering::Relaxed),
            poll_misses: self.poll_misses.load(Ordering::Relaxed),
            poll_window_ns: polling.window_ns(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn polling(max_ns: u64, grow: u64, shrink: u64) -> Polling {
        Polling::new(PollParams {
            max_ns,
            grow,
            shrink,
        })
    }

    #[test]
    fn window_grows_from_4us_doubling_up_to_max() {
        let p = polling(32_768, 0, 0);
        let mut seen = Vec::new();
        for _ in 0..5 {
            // Work arrived just after the window ended, within the maximum: grow.
            p.adjust(p.window_ns() + 1);
            seen.push(p.window_ns());
        }
        assert_eq!(seen, [4_000, 8_000, 16_000, 32_000, 32_768]);
        p.adjust(32_768);
        assert_eq!(p.window_ns(), 32_768, "work within the window: kept");
    }

    #[test]
    fn window_kept_when_spin_found_work() {
        let p = polling(32_768, 0, 0);
        p.adjust(1);
        assert_eq!(p.window_ns(), 4_000);
        p.adjust(3_999);
        assert_eq!(p.window_ns(), 4_000);
    }

    #[test]
    fn window_shrinks_past_max() {
        let p = polling(32_768, 0, 0);
        p.adjust(1);
        p.adjust(5_000);
        assert_eq!(p.window_ns(), 8_000);
        p.adjust(40_000);
        assert_eq!(p.window_ns(), 0, "shrink 0 resets");

        let p = polling(100_000, 4, 2);
        p.adjust(1);
        p.adjust(5_000);
        assert_eq!(p.window_ns(), 16_000, "grow 4");
        p.adjust(200_000);
        assert_eq!(p.window_ns(), 8_000, "shrink 2");
    }

    #[test]
    fn set_params_resets_window() {
        let p = polling(32_768, 0, 0);
        p.adjust(1);
        assert_ne!(p.window_ns(), 0);
        p.set_params(PollParams::default());
        assert_eq!(p.window_ns(), 0);
        assert!(!p.enabled());
    }
}
