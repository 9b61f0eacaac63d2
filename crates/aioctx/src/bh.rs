//! Bottom halves (QEMU's `QEMUBH`, `aio_bh_new`, `qemu_bh_schedule`, `aio_bh_poll`).
//!
//! Scheduled BHs sit on a lock-free multi-producer stack (the `queue` submodule, with its
//! protocol and invariant); this module gives the flag bits their meaning.

mod queue;

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use crate::callback::{Call, CallbackCell, Handler};
use crate::context::Core;
use crate::registry::Release;

use queue::{Node, Queue, PENDING};

const SCHEDULED: u32 = 1 << 1;
const IDLE: u32 = 1 << 2;
const DELETED: u32 = 1 << 3;
const ONESHOT: u32 = 1 << 4;

/// A BH: its flags and its callback, schedulable on a [`BhQueue`].
pub(crate) type BhNode = Node<CallbackCell>;

/// The lock-free stack of scheduled BHs.
pub(crate) type BhQueue = Queue<CallbackCell>;

impl Release for BhNode {
    fn release(&self) -> Option<Handler> {
        self.value.release()
    }
}

fn new_node(cb: Handler, oneshot: bool) -> Arc<BhNode> {
    Arc::new(Node::new(
        if oneshot { ONESHOT } else { 0 },
        CallbackCell::new(cb),
    ))
}

/// A node whose callback gets a weak reference to the node itself (async tasks use it to build
/// their waker).
fn new_cyclic_node(make_cb: impl FnOnce(&Weak<BhNode>) -> Handler) -> Arc<BhNode> {
    Arc::new_cyclic(|weak| Node::new(0, CallbackCell::new(make_cb(weak))))
}

/// What the scheduled BHs ask of the next wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum BhWork {
    /// Nothing scheduled.
    None,
    /// Only idle BHs: wait at most 10 ms.
    Idle,
    /// A BH must run: do not block.
    Now,
}

fn work_of(flags: u32) -> BhWork {
    if flags & (SCHEDULED | DELETED) != SCHEDULED {
        BhWork::None
    } else if flags & IDLE != 0 {
        BhWork::Idle
    } else {
        BhWork::Now
    }
}

/// The most urgent work among the scheduled BHs. Consumer only (context lock held).
pub(crate) fn scan(queue: &BhQueue) -> BhWork {
    let mut work = BhWork::None;
    queue.scan(|flags| {
        work = work.max(work_of(flags));
        work != BhWork::Now
    });
    work
}

/// The most urgent work among BHs already taken off the stack.
pub(crate) fn scan_taken(run: &VecDeque<Arc<BhNode>>) -> BhWork {
    run.iter()
        .map(|n| work_of(n.flags.load(Ordering::Acquire)))
        .max()
        .unwrap_or(BhWork::None)
}

/// Runs one BH taken off the stack. Returns whether it counted as progress (a non-idle BH ran).
pub(crate) fn run_one(core: &Core, node: Arc<BhNode>) -> bool {
    let old = node
        .flags
        .fetch_and(!(PENDING | SCHEDULED | IDLE), Ordering::AcqRel);
    if old & (SCHEDULED | DELETED) != SCHEDULED {
        return false;
    }
    // Deleted after the flags were read: `Bh::drop` synchronises with this check.
    match node
        .value
        .call_unless(|| node.flags.load(Ordering::Acquire) & DELETED != 0)
    {
        // A one-shot BH is owned by the queue alone: dropping `node` below frees it.
        Call::Ran => old & IDLE == 0,
        Call::Busy => {
            // It is running further up the stack (a nested poll): run it after that returns.
            core.bhs
                .enqueue(&node, |f| Some(f | (old & (SCHEDULED | IDLE))));
            false
        }
        Call::Gone => false,
    }
}

/// A bottom half: a callback that runs on its context's thread, soon, once per schedule (QEMU's
/// `QEMUBH`, made by [`AioContext::bh_new`]).
///
/// Scheduling is lock-free and may happen from any thread. Scheduling a BH that is already
/// scheduled does nothing: it runs once. A BH that reschedules itself from its callback runs
/// once per [`AioContext::poll`]. Dropping the handle deletes the BH (QEMU's `qemu_bh_delete`).
///
/// ```
/// # fn main() -> std::io::Result<()> {
/// use std::sync::atomic::{AtomicUsize, Ordering};
/// use std::sync::Arc;
///
/// let ctx = aioctx::AioContext::new()?;
/// let runs = Arc::new(AtomicUsize::new(0));
/// let r = runs.clone();
/// let bh = ctx.bh_new(move || {
///     r.fetch_add(1, Ordering::Relaxed);
/// });
/// bh.schedule();
/// bh.schedule(); // already scheduled: still one run
/// assert!(ctx.poll(false));
/// assert_eq!(runs.load(Ordering::Relaxed), 1);
/// assert!(!ctx.poll(false));
/// # Ok(()) }
/// ```
///
/// [`AioContext::bh_new`]: crate::AioContext::bh_new
/// [`AioContext::poll`]: crate::AioContext::poll
pub struct Bh {
    pub(crate) node: Arc<BhNode>,
    core: Arc<Core>,
    key: Option<usize>,
}

impl Bh {
    pub(crate) fn new(core: Arc<Core>, cb: Handler) -> Bh {
        Bh::register(core, new_node(cb, false))
    }

    /// A BH whose callback gets a weak reference to its own node (see [`schedule_node`]).
    pub(crate) fn new_cyclic(
        core: Arc<Core>,
        make_cb: impl FnOnce(&Weak<BhNode>) -> Handler,
    ) -> Bh {
        Bh::register(core, new_cyclic_node(make_cb))
    }

    fn register(core: Arc<Core>, node: Arc<BhNode>) -> Bh {
        let key = core.bh_registry.insert(node.clone());
        Bh { node, core, key }
    }

    /// Schedules the BH: its callback runs during the context's next poll, and a poll blocked in
    /// another thread wakes up (QEMU's `qemu_bh_schedule`). Clears a pending idle schedule's
    /// idleness.
    pub fn schedule(&self) {
        schedule_node(&self.core, &self.node);
    }

    /// Schedules the BH as idle work (QEMU's `qemu_bh_schedule_idle`): it runs within about
    /// 10 ms even if nothing else happens, and running it is not progress for
    /// [`AioContext::poll`]'s return value. A BH that is already scheduled stays as it is.
    ///
    /// [`AioContext::poll`]: crate::AioContext::poll
    pub fn schedule_idle(&self) {
        self.core.bh_enqueue(&self.node, |f| {
            (f & SCHEDULED == 0).then_some(f | SCHEDULED | IDLE)
        });
    }

    /// Cancels a pending schedule (QEMU's `qemu_bh_cancel`). From another thread, a callback the
    /// loop has already started still finishes.
    pub fn cancel(&self) {
        self.node
            .flags
            .fetch_and(!(SCHEDULED | IDLE), Ordering::AcqRel);
    }

    /// Deletes the BH (QEMU's `qemu_bh_delete`): it never runs again, and its callback is freed
    /// once it is not running. The same as dropping the handle.
    ///
    /// From a thread other than the one running the loop, this waits for a callback that is
    /// running at that moment to return (so do not hold a lock that callback takes). From inside
    /// the BH's own callback it returns at once.
    pub fn delete(self) {
        drop(self)
    }

    /// Whether the BH is scheduled and has not run yet.
    pub fn is_scheduled(&self) -> bool {
        self.node.flags.load(Ordering::Acquire) & SCHEDULED != 0
    }
}

impl Drop for Bh {
    fn drop(&mut self) {
        self.node.flags.fetch_or(DELETED, Ordering::AcqRel);
        // If the loop is running the callback on another thread, wait for it: once `delete`
        // returns, the callback is neither running nor ever called again.
        self.node.value.quiesce();
        self.core.bh_registry.remove(self.key);
    }
}

impl std::fmt::Debug for Bh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bh")
            .field("scheduled", &self.is_scheduled())
            .finish()
    }
}

/// [`Bh::schedule`] for a node known only by reference.
pub(crate) fn schedule_node(core: &Core, node: &Arc<BhNode>) {
    core.bh_enqueue(node, |f| {
        (f & (SCHEDULED | IDLE) != SCHEDULED).then_some((f | SCHEDULED) & !IDLE)
    });
}

pub(crate) fn schedule_oneshot(core: &Core, cb: Handler) {
    let node = new_node(cb, true);
    core.bh_enqueue(&node, |f| Some(f | SCHEDULED));
}

impl Core {
    /// Enqueues `node` with `update` and wakes the loop if that scheduled it.
    fn bh_enqueue(&self, node: &Arc<BhNode>, update: impl Fn(u32) -> Option<u32>) {
        if self.is_closed() {
            return;
        }
        if self.bhs.enqueue(node, update).is_some() {
            self.notify_changed();
        }
    }
}
