//! Timers (QEMU's `QEMUTimer`, `QEMUTimerList`, `timer_mod`, `timerlist_run_timers`).
//!
//! Each context has one timer list per clock: a binary min-heap ordered by
//! `(expire_ns, sequence)`, with lazy deletion (see [`TimerList`]). The sequence number makes
//! timers with equal deadlines fire in the order they were armed (QEMU inserts after every timer
//! with an equal deadline). A heap in one vector with O(1) deletion cost about a third of a
//! `BTreeMap` per insert+cancel.
//!
//! A timer's `expire` and `seq` fields are written only under its list's mutex.

use std::collections::BinaryHeap;
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

/// A heap entry. The key is kept inline so comparisons do not chase pointers. An entry whose key
/// no longer matches its timer's `(expire, seq)` is a tombstone: the timer was deleted or re-armed
/// since, and the entry is skipped when it reaches the top.
struct Entry {
    key: (i64, u64),
    node: Arc<TimerNode>,
}

impl Entry {
    fn is_live(&self) -> bool {
        self.node.expire.load(Ordering::Relaxed) == self.key.0
            && self.node.seq.load(Ordering::Relaxed) == self.key.1
    }
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key
    }
}

impl Eq for Entry {}

impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Entry {
    /// Reversed, so that std's max-heap yields the earliest deadline first.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        other.key.cmp(&self.key)
    }
}

/// One clock's timers: a min-heap with lazy deletion. Deleting is O(1) (the entry becomes a
/// tombstone); arming is one push; tombstones are dropped as they surface, or all at once when
/// they outnumber the live timers, which bounds the heap to twice the pending timers.
#[derive(Default)]
struct TimerList {
    heap: BinaryHeap<Entry>,
    tombstones: usize,
    next_seq: u64,
}

impl TimerList {
    /// Gives `node` the key `(ns, next seq)`; returns whether it is now the earliest.
    fn arm(&mut self, node: &Arc<TimerNode>, ns: i64) -> bool {
        if node.expire.load(Ordering::Relaxed) >= 0 {
            self.tombstones += 1;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        node.expire.store(ns, Ordering::Relaxed);
        node.seq.store(seq, Ordering::Relaxed);
        self.heap.push(Entry {
            key: (ns, seq),
            node: Arc::clone(node),
        });
        self.compact_if_sparse();
        self.first().is_some_and(|e| Arc::ptr_eq(&e.node, node))
    }

    /// Marks a pending `node` not pending; its entry becomes a tombstone.
    fn remove(&mut self, node: &TimerNode) {
        node.expire.store(-1, Ordering::Relaxed);
        self.tombstones += 1;
        self.compact_if_sparse();
    }

    fn compact_if_sparse(&mut self) {
        if self.tombstones > 64 && self.tombstones * 2 > self.heap.len() {
            self.heap.retain(Entry::is_live);
            self.tombstones = 0;
        }
    }

    /// The earliest live entry, dropping the tombstones above it.
    fn first(&mut self) -> Option<&Entry> {
        while self.heap.peek().is_some_and(|e| !e.is_live()) {
            self.heap.pop();
            self.tombstones -= 1;
        }
        self.heap.peek()
    }

    fn first_expire(&mut self) -> Option<i64> {
        self.first().map(|e| e.key.0)
    }

    /// Takes the earliest timer out if its deadline is at or before `now`.
    fn pop_expired(&mut self, now: i64) -> Option<Arc<TimerNode>> {
        if self.first_expire()? > now {
            return None;
        }
        let node = self.heap.pop()?.node;
        node.expire.store(-1, Ordering::Relaxed);
        Some(node)
    }

    fn is_empty(&self) -> bool {
        self.heap.len() == self.tombstones
    }
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
        let mut list = self.lists[node.clock.index()].lock();
        if node.expire.load(Ordering::Relaxed) < 0 {
            self.armed.fetch_add(1, Ordering::Relaxed);
        }
        list.arm(node, ns.max(0))
    }

    fn del(&self, node: &TimerNode) {
        let mut list = self.lists[node.clock.index()].lock();
        if node.expire.load(Ordering::Relaxed) >= 0 {
            list.remove(node);
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
            let first = self.lists[clock.index()].lock().first_expire();
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
        if list.lock().is_empty() {
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
                match list.pop_expired(now) {
                    Some(node) => {
                        self.armed.fetch_sub(1, Ordering::Relaxed);
                        node
                    }
                    None => break,
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
            for entry in std::mem::take(&mut list.heap) {
                entry.node.expire.store(-1, Ordering::Relaxed);
                all.push(entry.node);
            }
            list.tombstones = 0;
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
        // A tombstone may keep the node alive in the heap for a while; its callback (and what
        // that captured) goes now.
        drop(self.node.cb.release());
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn node() -> Arc<TimerNode> {
        Arc::new(TimerNode {
            clock: ClockType::Realtime,
            scale: 1,
            expire: AtomicI64::new(-1),
            seq: AtomicU64::new(0),
            cb: CallbackCell::new(Box::new(|| {})),
        })
    }

    /// The heap against a BTreeMap model, under random arm / re-arm / delete / pop.
    #[test]
    fn heap_matches_an_ordered_map() {
        let mut list = TimerList::default();
        let nodes: Vec<_> = (0..300).map(|_| node()).collect();
        let mut model: BTreeMap<(i64, u64), usize> = BTreeMap::new();
        let key = |n: &TimerNode| {
            (
                n.expire.load(Ordering::Relaxed),
                n.seq.load(Ordering::Relaxed),
            )
        };
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..50_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let i = (x % nodes.len() as u64) as usize;
            let n = &nodes[i];
            let pending = n.expire.load(Ordering::Relaxed) >= 0;
            match (x >> 9) % 4 {
                0 | 1 => {
                    if pending {
                        model.remove(&key(n));
                    }
                    // Few distinct deadlines, so equal keys (FIFO order) are common.
                    let first = list.arm(n, ((x >> 16) % 16) as i64);
                    model.insert(key(n), i);
                    assert_eq!(first, model.keys().next() == Some(&key(n)));
                }
                2 => {
                    if pending {
                        model.remove(&key(n));
                        list.remove(n);
                    }
                }
                _ => {
                    let now = ((x >> 20) % 16) as i64;
                    let want = model.iter().next().filter(|(k, _)| k.0 <= now);
                    let want = want.map(|(&k, &j)| (k, j));
                    let got = list.pop_expired(now);
                    match want {
                        Some((k, j)) => {
                            assert!(Arc::ptr_eq(&got.unwrap(), &nodes[j]));
                            model.remove(&k);
                        }
                        None => assert!(got.is_none()),
                    }
                }
            }
            assert_eq!(list.heap.len() - list.tombstones, model.len());
            assert!(
                list.heap.len() <= 2 * model.len() + 65,
                "tombstones are bounded"
            );
            assert_eq!(list.first_expire(), model.keys().next().map(|k| k.0));
        }
    }
}
