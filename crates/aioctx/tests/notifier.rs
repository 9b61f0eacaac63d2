//! Event notifiers (QEMU's EventNotifier): set/test_and_clear semantics, the descriptor, and
//! setting from other threads waking a context.

mod common;

use std::os::fd::AsRawFd;
use std::sync::Arc;

use aioctx::EventNotifier;
use common::{ctx, drain, handler, is_readable, watchdog, Counter};

#[test]
fn set_and_test_and_clear() {
    let _w = watchdog("set_and_test_and_clear");
    let n = EventNotifier::new().unwrap();
    assert!(!is_readable(&n), "a new notifier is clear");
    assert!(!n.test_and_clear());
    n.set().unwrap();
    assert!(is_readable(&n));
    n.set().unwrap();
    n.set().unwrap();
    assert!(n.test_and_clear(), "set is level, not counted");
    assert!(!is_readable(&n));
    assert!(!n.test_and_clear());
}

#[test]
fn notifiers_are_independent() {
    let _w = watchdog("notifiers_are_independent");
    let a = EventNotifier::new().unwrap();
    let b = EventNotifier::new().unwrap();
    assert_ne!(a.as_raw_fd(), b.as_raw_fd());
    a.set().unwrap();
    assert!(!b.test_and_clear());
    assert!(a.test_and_clear());
}

/// The descriptor is non-blocking: test_and_clear on a clear notifier returns at once, and a
/// very large number of sets never blocks the setter.
#[test]
fn never_blocks() {
    let _w = watchdog("never_blocks");
    let n = EventNotifier::new().unwrap();
    for _ in 0..100_000 {
        n.set().unwrap();
    }
    assert!(n.test_and_clear());
    for _ in 0..1000 {
        assert!(!n.test_and_clear());
    }
}

/// A notifier set by another thread wakes a context blocked in poll and runs its handler, once
/// per set-then-clear cycle.
#[test]
fn set_from_other_thread_wakes_context() {
    let _w = watchdog("set_from_other_thread_wakes_context");
    let ctx = ctx();
    let e = Arc::new(EventNotifier::new().unwrap());
    let n = Counter::new();
    let (e2, c) = (e.clone(), n.clone());
    ctx.set_event_notifier(
        &e,
        handler(move || {
            assert!(e2.test_and_clear());
            c.hit();
        }),
    )
    .unwrap();
    drain(&ctx);
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let setter = {
        let e = e.clone();
        std::thread::spawn(move || {
            for () in rx {
                e.set().unwrap();
            }
        })
    };
    for round in 1..=200 {
        tx.send(()).unwrap();
        while n.get() < round {
            ctx.poll(true);
        }
        assert_eq!(n.get(), round);
    }
    drop(tx);
    setter.join().unwrap();
    ctx.set_event_notifier(&e, None).unwrap();
}
