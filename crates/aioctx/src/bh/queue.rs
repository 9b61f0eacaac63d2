//! The lock-free stack of scheduled BHs (modern QEMU's `bh_list`, commit 8c6b0356b5), so the
//! cost of a poll grows with the BHs scheduled, never with those created.
//!
//! # The protocol
//!
//! Each node has a flag word. [`PENDING`] means "on the stack"; the other bits belong to the
//! caller (the BH module: scheduled, idle, deleted, one-shot) and say what to do when the
//! consumer takes the node off.
//!
//! * A producer sets its flags with a CAS; the one producer whose CAS turns `PENDING` on pushes
//!   the node (a Treiber push: write `next`, then CAS the head with Release).
//! * The consumer (the poller, which holds the context lock, so there is only ever one) swaps the
//!   whole stack out with Acquire and reverses it into FIFO order; nodes leave it with `PENDING`
//!   still set, and the caller clears it when it handles each one. After the clear, producers
//!   may push the node again.
//!
//! Invariant: a node is on the stack at most once, exactly while `PENDING` is set (and until the
//! consumer clears it after taking it off), and the stack holds one strong reference to each node
//! on it.
//!
//! This module uses only `crate::sync`, so `crates/aioctx-loom/tests/bh_queue.rs` compiles it
//! again with loom's atomics and `Arc` and checks the protocol under every interleaving loom
//! explores.

use std::collections::VecDeque;
use std::ptr;

use crate::sync::atomic::{AtomicPtr, AtomicU32, Ordering};
use crate::sync::Arc;

/// The node is on the stack (or taken off and not yet handled).
pub(crate) const PENDING: u32 = 1 << 0;

/// A schedulable node: a flag word, the stack link, and the caller's value.
pub(crate) struct Node<T> {
    pub(crate) flags: AtomicU32,
    next: AtomicPtr<Node<T>>,
    pub(crate) value: T,
}

impl<T> Node<T> {
    /// A node off the stack with the caller's initial `flags` (without [`PENDING`]).
    pub(crate) fn new(flags: u32, value: T) -> Node<T> {
        debug_assert_eq!(flags & PENDING, 0);
        Node {
            flags: AtomicU32::new(flags),
            next: AtomicPtr::new(ptr::null_mut()),
            value,
        }
    }
}

/// The stack of scheduled nodes: any number of producers, one consumer.
pub(crate) struct Queue<T> {
    head: AtomicPtr<Node<T>>,
}

impl<T> Queue<T> {
    pub(crate) fn new() -> Queue<T> {
        Queue {
            head: AtomicPtr::new(ptr::null_mut()),
        }
    }

    /// Updates `node`'s flags with `update` and pushes the node if that made it pending.
    /// Returns the old flags, or `None` if `update` declined (returned `None`). Any thread.
    pub(crate) fn enqueue(
        &self,
        node: &Arc<Node<T>>,
        update: impl Fn(u32) -> Option<u32>,
    ) -> Option<u32> {
        let old = node
            .flags
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |f| {
                update(f).map(|n| n | PENDING)
            })
            .ok()?;
        if old & PENDING == 0 {
            // This thread turned PENDING on, so it alone pushes, and nobody else touches `next`
            // until the consumer has taken the node off.
            let raw = Arc::into_raw(Arc::clone(node)).cast_mut();
            let mut head = self.head.load(Ordering::Relaxed);
            loop {
                node.next.store(head, Ordering::Relaxed);
                match self.head.compare_exchange_weak(
                    head,
                    raw,
                    Ordering::Release,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => break,
                    Err(now) => head = now,
                }
            }
        }
        Some(old)
    }

    /// Moves everything pushed so far to the back of `run`, oldest first, with `PENDING` still
    /// set. Consumer only.
    pub(crate) fn take_into(&self, run: &mut VecDeque<Arc<Node<T>>>) {
        let mut p = self.head.swap(ptr::null_mut(), Ordering::Acquire);
        // Reverse the newest-first stack in place so nodes come out in the order they were
        // pushed.
        let mut reversed: *mut Node<T> = ptr::null_mut();
        while !p.is_null() {
            // SAFETY: every pointer on the stack came from Arc::into_raw and the stack's strong
            // reference keeps it alive; after the swap this list is ours alone, and producers do
            // not write `next` while PENDING is set, which it is for every node on the list.
            let node = unsafe { &*p };
            let next = node.next.load(Ordering::Relaxed);
            node.next.store(reversed, Ordering::Relaxed);
            reversed = p;
            p = next;
        }
        while !reversed.is_null() {
            // SAFETY: as above; from_raw takes back the stack's strong reference exactly once.
            let node = unsafe { Arc::from_raw(reversed) };
            reversed = node.next.load(Ordering::Relaxed);
            run.push_back(node);
        }
    }

    /// Calls `visit` with the flags of each node on the stack, newest first, until it returns
    /// false. Consumer only.
    pub(crate) fn scan(&self, mut visit: impl FnMut(u32) -> bool) {
        let mut p = self.head.load(Ordering::Acquire);
        while !p.is_null() {
            // SAFETY: only the consumer (us) takes nodes off the stack, so every node reachable
            // from the head stays on it, alive and with a stable `next`, while we walk.
            let node = unsafe { &*p };
            if !visit(node.flags.load(Ordering::Acquire)) {
                return;
            }
            p = node.next.load(Ordering::Relaxed);
        }
    }

    /// Drops everything on the stack (context teardown). Consumer only.
    pub(crate) fn clear(&self) {
        let mut drained = VecDeque::new();
        self.take_into(&mut drained);
        for node in &drained {
            node.flags.fetch_and(!PENDING, Ordering::AcqRel);
        }
    }
}

impl<T> Drop for Queue<T> {
    fn drop(&mut self) {
        self.clear();
    }
}
