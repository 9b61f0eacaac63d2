//! Model-checks the BH queue (crates/aioctx/src/bh/queue.rs) with loom: producers scheduling
//! from other threads while the consumer takes nodes off and runs them, under every interleaving
//! loom explores.
//!
//! The file under test is compiled here a second time with `crate::sync` pointing at loom's
//! atomics and `Arc` (whose leak check also proves that the stack gives back every reference it
//! takes). A "run" is what `bh::run_one` does to the flags: clear `PENDING` and `SCHEDULED`, and
//! count a run if `SCHEDULED` was set.
//!
//! Unix only: loom's coroutines cannot unwind on windows-gnu; the atomics are the same there.
#![cfg(unix)]

#[allow(dead_code)]
#[path = "../../aioctx/src/bh/queue.rs"]
mod queue;

/// What `queue.rs` expects at `crate::sync`.
mod sync {
    pub(crate) use loom::sync::atomic;
    pub(crate) use loom::sync::Arc;
}

use std::collections::VecDeque;

use loom::sync::atomic::Ordering;
use loom::sync::Arc;
use loom::thread;

use queue::{Node, Queue, PENDING};

const SCHEDULED: u32 = 1 << 1;

type TestNode = Node<usize>;

/// `Bh::schedule`: set SCHEDULED unless it is set already.
fn schedule(q: &Queue<usize>, node: &Arc<TestNode>) {
    q.enqueue(node, |f| (f & SCHEDULED == 0).then_some(f | SCHEDULED));
}

/// Takes everything off the stack and runs it; returns how many runs each node id got. Panics if
/// a node comes off twice in one take (it would be on the stack twice).
fn take_and_run(q: &Queue<usize>, runs: &mut [usize]) {
    let mut taken = VecDeque::new();
    q.take_into(&mut taken);
    let mut seen = vec![false; runs.len()];
    for node in taken {
        assert!(!seen[node.value], "node {} on the stack twice", node.value);
        seen[node.value] = true;
        let old = node
            .flags
            .fetch_and(!(PENDING | SCHEDULED), Ordering::AcqRel);
        assert_ne!(old & PENDING, 0, "taken off without PENDING");
        if old & SCHEDULED != 0 {
            runs[node.value] += 1;
        }
    }
}

/// Two BHs scheduled from two threads while the loop takes and runs: each runs exactly once, and
/// the stack gives back both references.
#[test]
fn every_schedule_runs_once() {
    loom::model(|| {
        let q = Arc::new(Queue::new());
        let nodes: Vec<_> = (0..2).map(|i| Arc::new(Node::new(0, i))).collect();
        let producers: Vec<_> = nodes
            .iter()
            .map(|n| {
                let (q, n) = (q.clone(), n.clone());
                thread::spawn(move || schedule(&q, &n))
            })
            .collect();
        let mut runs = [0; 2];
        take_and_run(&q, &mut runs);
        for p in producers {
            p.join().unwrap();
        }
        take_and_run(&q, &mut runs);
        assert_eq!(runs, [1, 1]);
        for n in &nodes {
            assert_eq!(n.flags.load(Ordering::Relaxed), 0);
        }
    });
}

/// One BH scheduled by two threads at once while the loop runs it: it is never on the stack
/// twice, runs once or twice (coalesced or not), and no schedule is left without a run after
/// it.
#[test]
fn concurrent_schedules_of_one_bh() {
    loom::model(|| {
        let q = Arc::new(Queue::new());
        let node = Arc::new(Node::new(0, 0));
        let producers: Vec<_> = (0..2)
            .map(|_| {
                let (q, n) = (q.clone(), node.clone());
                thread::spawn(move || schedule(&q, &n))
            })
            .collect();
        let mut runs = [0];
        take_and_run(&q, &mut runs);
        for p in producers {
            p.join().unwrap();
        }
        take_and_run(&q, &mut runs);
        assert!((1..=2).contains(&runs[0]), "{} runs", runs[0]);
        assert_eq!(
            node.flags.load(Ordering::Relaxed),
            0,
            "a schedule was not run"
        );
    });
}

/// A BH rescheduled by a producer while the loop runs it, and a scan (the timeout computation)
/// walking the stack while another producer pushes: the scan sees only nodes that are on the
/// stack, and the teardown (`Drop`, which clears) gives back every reference.
#[test]
fn scan_and_teardown_while_pushing() {
    loom::model(|| {
        let q = Arc::new(Queue::new());
        let nodes: Vec<_> = (0..2).map(|i| Arc::new(Node::new(0, i))).collect();
        schedule(&q, &nodes[0]);
        let producer = {
            let (q, n) = (q.clone(), nodes[1].clone());
            thread::spawn(move || schedule(&q, &n))
        };
        let mut scheduled = 0;
        q.scan(|flags| {
            assert_ne!(flags & PENDING, 0, "a node on the stack without PENDING");
            scheduled += usize::from(flags & SCHEDULED != 0);
            true
        });
        assert!((1..=2).contains(&scheduled));
        producer.join().unwrap();
        drop(q);
        for n in &nodes {
            assert_eq!(n.flags.load(Ordering::Relaxed) & PENDING, 0);
            assert_eq!(Arc::strong_count(n), 1);
        }
    });
}

/// Schedule, cancel (`Bh::cancel` clears only SCHEDULED) and schedule again from one thread while
/// the loop takes and runs: the node stays on the stack once (PENDING keeps the second schedule
/// from pushing it again) and the last schedule runs.
#[test]
fn cancel_and_reschedule_while_on_the_stack() {
    loom::model(|| {
        let q = Arc::new(Queue::new());
        let node = Arc::new(Node::new(0, 0));
        let producer = {
            let (q, n) = (q.clone(), node.clone());
            thread::spawn(move || {
                schedule(&q, &n);
                n.flags.fetch_and(!SCHEDULED, Ordering::AcqRel);
                schedule(&q, &n);
            })
        };
        let mut runs = [0];
        take_and_run(&q, &mut runs);
        producer.join().unwrap();
        take_and_run(&q, &mut runs);
        assert!((1..=2).contains(&runs[0]), "{} runs", runs[0]);
        assert_eq!(
            node.flags.load(Ordering::Relaxed),
            0,
            "a schedule was not run"
        );
    });
}
