//! Timers (QEMU's `QEMUTimer`, `QEMUTimerList`, `timer_mod`, `timerlist_run_timers`).
//!
//! Each context has one ordered list per clock. A list is a `BTreeMap` keyed by
//! `(expire_ns, sequence)`: the sequence number makes timers with equal deadlines fire in the
//! order they were armed (QEMU inserts after every timer with an equal deadline), and makes
//! insertion, removal and "earliest" all O(log n).
//!
//! A timer's `expire` and `seq` fields are written only under its list's mutex.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::callback::{Call, CallbackCell, Handler};
use crate::clock::{clock_get_ns, ClockType};
use crate::context::Core;
use crate::registry::Release;

pub(crate) struct TimerNode {
    clock: ClockType,
    scale: i64,
    /// Deadline in ns on `clock`, or -1 when not pending.
    expire: AtomicI64,
    seq: AtomicU64,
    cb: CallbackCell,
}

impl Release for TimerNode {
    fn release(&self) -> Option<Handler> {
        self.cb.release()
    }
}

#[derive(Default)]
struct TimerList {
    queue: BTreeMap<(i64, u64), Arc<TimerNode>>,
    next_seq: u64,
}

/// The per-clock timer lists of one context (QEMU's `QEMUTimerListGroup`).
pub(crate) struct TimerLists {
    lists: [Mutex<TimerList>; 4],
    /// Timers pending over all lists, so a poll with no timers skips the lists entirely.
    armed: AtomicUsize,
}

impl TimerLists {
    pub(crate) fn new() -> TimerLists {
        TimerLists {
            lists: Default::default(),
            armed: AtomicUsize::new(0),
        }
    }

    /// Arms `node` at `ns`; returns whether it became the earliest timer of its list.
    fn modify(&self, node: &Arc<TimerNode>, ns: i64) -> bool {
        let ns = ns.max(0);
        let mut list = self.lists[node.clock.index()].lock();
        let old = node.expire.load(Ordering::Relaxed);
        if old >= 0 {
            list.queue.remove(&(old, node.seq.load(Ordering::Relaxed)));
        } else {
            self.armed.fetch_add(1, Ordering::Relaxed);
        }
        let seq = list.next_seq;
        list.next_seq += 1;
        node.expire.store(ns, Ordering::Relaxed);
        node.seq.store(seq, Ordering::Relaxed);
        list.queue.insert((ns, seq), Arc::clone(node));
        list.queue.first_key_value().map(|(k, _)| *k) == Some((ns, seq))
    }

    fn del(&self, node: &TimerNode) {
        let mut list = self.lists[node.clock.index()].lock();
        let old = node.expire.load(Ordering::Relaxed);
        if old >= 0 {
            list.queue.remove(&(old, node.seq.load(Ordering::Relaxed)));
            node.expire.store(-1, Ordering::Relaxed);
            self.armed.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Nanoseconds until the earliest deadline: 0 if one has passed, -1 if there is none (a
    /// stopped virtual clock's deadlines count as none: advancing it notifies the context) (QEMU's `timerlistgroup_deadline_ns`).
    pub(crate) fn deadline_ns(&self) -> i64 {
        if self.armed.load(Ordering::Relaxed) == 0 {
            return -1;
        }
        let mut deadline = -1i64;
        for clock in ClockType::ALL {
            let first = self.lists[clock.index()]
                .lock()
                .queue
                .first_key_value()
                .map(|(k, _)| k.0);
            let Some(expire) = first else { continue };
            let left = (expire - clock_get_ns(clock)).max(0);
            if left == 0 {
                return 0;
            }
            if !clock.is_running() {
                // Only the program moves it, and advancing it notifies us.
                continue;
            }
            if deadline < 0 || left < deadline {
                deadline = left;
            }
        }
        deadline
    }

    /// Runs every expired timer; returns whether a callback ran (QEMU's
    /// `timerlistgroup_run_timers`).
    pub(crate) fn run(&self) -> bool {
        if self.armed.load(Ordering::Relaxed) == 0 {
            return false;
        }
        let mut progress = false;
        for clock in ClockType::ALL {
            progress |= self.run_clock(clock);
        }
        progress
    }

    fn run_clock(&self, clock: ClockType) -> bool {
        let list = &self.lists[clock.index()];
        if list.lock().queue.is_empty() {
            return false;
        }
        // Read the clock once: a callback that re-arms its timer in the future does not run
        // again in this pass.
        let now = clock_get_ns(clock);
        let mut busy = Requeue {
            lists: self,
            nodes: Vec::new(),
        };
        let mut progress = false;
        loop {
            let node = {
                let mut list = list.lock();
                match list.queue.first_entry() {
                    Some(e) if e.key().0 <= now => {
                        let node = e.remove();
                        node.expire.store(-1, Ordering::Relaxed);
                        self.armed.fetch_sub(1, Ordering::Relaxed);
                        node
                    }
                    _ => break,
                }
            };
            match node.cb.call() {
                Call::Ran => progress = true,
                // Running further up the stack (a nested poll): fire it again after that.
                Call::Busy => busy.nodes.push((now, node)),
                Call::Gone => {}
            }
        }
        progress
    }

    /// Empties every list (context teardown).
    pub(crate) fn clear(&self) -> Vec<Arc<TimerNode>> {
        let mut all = Vec::new();
        for list in &self.lists {
            let mut list = list.lock();
            for node in list.queue.values() {
                node.expire.store(-1, Ordering::Relaxed);
            }
            all.extend(std::mem::take(&mut list.queue).into_values());
        }
        self.armed.store(0, Ordering::Relaxed);
        all
    }
}

/// Re-arms timers whose callbacks were busy, even if a later callback panics.
struct Requeue<'a> {
    lists: &'a TimerLists,
    nodes: Vec<(i64, Arc<TimerNode>)>,
}

impl Drop for Requeue<'_> {
    fn drop(&mut self) {
        for (expire, node) in self.nodes.drain(..) {
            // Unless something re-armed it meanwhile.
            if node.expire.load(Ordering::Relaxed) < 0 {
                self.lists.modify(&node, expire);
            }
        }
    }
}

/// A timer: a callback that runs on its context's thread once its clock reaches the deadline
/// (QEMU's `QEMUTimer`, made by [`AioContext::timer_new`]).
///
/// Deadlines are in the timer's scale ([`SCALE_NS`], [`SCALE_US`] or [`SCALE_MS`]) on its clock.
/// A timer never fires early; timers with equal deadlines fire in the order they were armed; a
/// callback may re-arm its own timer. Arming from another thread wakes the loop when the timer
/// becomes its clock's earliest. Dropping the handle deletes the timer (QEMU's `timer_del` +
/// `timer_free`).
///
/// ```
/// # fn main() -> std::io::Result<()> {
/// use aioctx::{clock_get_ns, ClockType, SCALE_MS};
/// use std::sync::atomic::{AtomicBool, Ordering};
/// use std::sync::Arc;
///
/// let ctx = aioctx::AioContext::new()?;
/// let fired = Arc::new(AtomicBool::new(false));
/// let f = fired.clone();
/// let timer = ctx.timer_new(ClockType::Realtime, SCALE_MS, move || f.store(true, Ordering::Relaxed));
/// let deadline = clock_get_ns(ClockType::Realtime) / SCALE_MS + 2;
/// timer.modify(deadline);
/// while !fired.load(Ordering::Relaxed) {
///     ctx.poll(true);
/// }
/// assert!(clock_get_ns(ClockType::Realtime) >= deadline * SCALE_MS);
/// assert!(!timer.pending());
/// # Ok(()) }
/// ```
///
/// [`AioContext::timer_new`]: crate::AioContext::timer_new
/// [`SCALE_NS`]: crate::SCALE_NS
/// [`SCALE_US`]: crate::SCALE_US
/// [`SCALE_MS`]: crate::SCALE_MS
pub struct Timer {
    node: Arc<TimerNode>,
    core: Arc<Core>,
    key: Option<usize>,
}

impl Timer {
    pub(crate) fn new(core: Arc<Core>, clock: ClockType, scale: i64, cb: Handler) -> Timer {
        let node = Arc::new(TimerNode {
            clock,
            scale: scale.max(1),
            expire: AtomicI64::new(-1),
            seq: AtomicU64::new(0),
            cb: CallbackCell::new(cb),
        });
        let key = core.timer_registry.insert(node.clone());
        if matches!(clock, ClockType::Virtual | ClockType::VirtualRt) {
            core.watch_virtual_clock();
        }
        Timer { node, core, key }
    }

    /// Arms the timer to fire at `expire_time`, in the timer's scale (QEMU's `timer_mod`).
    /// Re-arming a pending timer moves it. Times before the clock's epoch count as 0.
    pub fn modify(&self, expire_time: i64) {
        self.modify_ns(expire_time.saturating_mul(self.node.scale));
    }

    /// Arms the timer to fire at `ns` nanoseconds on its clock (QEMU's `timer_mod_ns`).
    pub fn modify_ns(&self, ns: i64) {
        if self.core.is_closed() {
            return;
        }
        if self.core.timers.modify(&self.node, ns) {
            self.core.notify_changed();
        }
    }

    /// Arms the timer at `ns` unless it is already pending at an earlier time (QEMU's
    /// `timer_mod_anticipate_ns`).
    pub fn modify_anticipate_ns(&self, ns: i64) {
        let current = self.expire_time_ns();
        if current < 0 || ns < current {
            self.modify_ns(ns);
        }
    }

    /// Disarms the timer (QEMU's `timer_del`). Its callback will not run until it is re-armed.
    pub fn del(&self) {
        self.core.timers.del(&self.node);
    }

    /// Whether the timer is armed (QEMU's `timer_pending`).
    pub fn pending(&self) -> bool {
        self.node.expire.load(Ordering::Relaxed) >= 0
    }

    /// The deadline in ns, or -1 when not pending (QEMU's `timer_expire_time_ns`).
    pub fn expire_time_ns(&self) -> i64 {
        self.node.expire.load(Ordering::Relaxed)
    }

    /// Whether the deadline has passed on the timer's clock (QEMU's `timer_expired`).
    pub fn expired(&self, current_time: i64) -> bool {
        let expire = self.expire_time_ns();
        expire >= 0 && expire <= current_time.saturating_mul(self.node.scale)
    }

    /// The clock the timer runs on.
    pub fn clock(&self) -> ClockType {
        self.node.clock
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        self.del();
        // Like `Bh`: a callback running on another thread finishes before the drop returns.
        self.node.cb.quiesce();
        self.core.timer_registry.remove(self.key);
    }
}

impl std::fmt::Debug for Timer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Timer")
            .field("clock", &self.node.clock)
            .field("expire_time_ns", &self.expire_time_ns())
            .finish()
    }
}
