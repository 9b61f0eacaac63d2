//! fd and event-notifier handlers: QEMU's /aio/event/* cases, level triggering, readiness,
//! replacement and removal (from callbacks and other threads), hang-up, write handlers.

mod common;

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};

use aioctx::{AioContext, EventNotifier, Handler};
use common::{
    ctx, drain, drain_fd, drain_socket, fill_socket, handler, pipe, read_fd, socketpair, watchdog,
    write_fd, Counter,
};

/// QEMU's `EventNotifierTestData` + `event_ready_cb`: the handler asserts that the notifier is
/// really set (handlers are never called when their fd is not ready), counts, decrements
/// `active`, and with `auto_set` sets the notifier again while still active.
#[derive(Clone)]
struct EventData {
    e: Arc<EventNotifier>,
    n: Arc<AtomicUsize>,
    active: Arc<AtomicUsize>,
    auto_set: bool,
}

impl EventData {
    fn new(active: usize, auto_set: bool) -> EventData {
        EventData {
            e: Arc::new(EventNotifier::new().unwrap()),
            n: Arc::new(AtomicUsize::new(0)),
            active: Arc::new(AtomicUsize::new(active)),
            auto_set,
        }
    }
    fn n(&self) -> usize {
        self.n.load(Ordering::SeqCst)
    }
    fn active(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }
    fn ready_cb(&self) -> Option<Handler> {
        let d = self.clone();
        handler(move || {
            assert!(
                d.e.test_and_clear(),
                "handler called while its notifier was not set"
            );
            d.n.fetch_add(1, Ordering::SeqCst);
            let a = d.active.load(Ordering::SeqCst);
            if a > 0 {
                d.active.store(a - 1, Ordering::SeqCst);
            }
            if d.auto_set && d.active.load(Ordering::SeqCst) > 0 {
                d.e.set().unwrap();
            }
        })
    }
    fn register(&self, ctx: &AioContext) {
        ctx.set_event_notifier(&self.e, self.ready_cb()).unwrap();
    }
    fn unregister(&self, ctx: &AioContext) {
        ctx.set_event_notifier(&self.e, None).unwrap();
    }
}

fn wait_until_inactive(ctx: &AioContext, d: &EventData) {
    while d.active() > 0 {
        ctx.poll(true);
    }
}

/// /aio/event/add-remove: registering and removing wake the loop but are not progress.
#[test]
fn event_add_remove() {
    let _w = watchdog("event_add_remove");
    let ctx = ctx();
    let d = EventData::new(0, false);
    d.register(&ctx);
    assert_eq!(ctx.registered_fds(), vec![d.e.as_raw_fd()]);
    assert!(!ctx.poll(false));
    assert_eq!(d.n(), 0);

    d.unregister(&ctx);
    assert!(ctx.registered_fds().is_empty());
    assert!(!ctx.poll(false));
    assert_eq!(d.n(), 0);
}

/// Registration's wake-up makes a blocking poll return (false) rather than block.
#[test]
fn registration_wakeup_is_not_progress() {
    let _w = watchdog("registration_wakeup_is_not_progress");
    let ctx = ctx();
    let d = EventData::new(0, false);
    d.register(&ctx);
    assert!(!ctx.poll(true));
    d.unregister(&ctx);
    assert!(!ctx.poll(true));
    assert_eq!(d.n(), 0);
}

/// /aio/event/wait
#[test]
fn event_wait() {
    let _w = watchdog("event_wait");
    let ctx = ctx();
    let d = EventData::new(1, false);
    d.register(&ctx);
    assert_eq!(drain(&ctx), 0);
    assert_eq!(d.n(), 0);
    assert_eq!(d.active(), 1);

    d.e.set().unwrap();
    assert!(ctx.poll(false));
    assert_eq!(d.n(), 1);
    assert_eq!(d.active(), 0);

    assert!(!ctx.poll(false));
    assert_eq!(d.n(), 1);

    d.unregister(&ctx);
    assert!(!ctx.poll(false));
    assert_eq!(d.n(), 1);
}

/// /aio/event/flush: a handler that re-arms its notifier runs once per poll until done.
#[test]
fn event_flush() {
    let _w = watchdog("event_flush");
    let ctx = ctx();
    let d = EventData::new(10, true);
    d.register(&ctx);
    assert_eq!(drain(&ctx), 0);
    assert_eq!(d.n(), 0);
    assert_eq!(d.active(), 10);

    d.e.set().unwrap();
    assert!(ctx.poll(false));
    assert_eq!(d.n(), 1);
    assert_eq!(d.active(), 9);
    assert!(ctx.poll(false));
    assert_eq!(d.n(), 2);

    wait_until_inactive(&ctx, &d);
    assert_eq!(d.n(), 10);
    assert_eq!(d.active(), 0);
    assert!(!ctx.poll(false));

    d.unregister(&ctx);
    assert!(!ctx.poll(false));
}

/// /aio/event/wait/no-flush-cb
#[test]
fn event_wait_no_flush_cb() {
    let _w = watchdog("event_wait_no_flush_cb");
    let ctx = ctx();
    let data = EventData::new(0, false);
    let dummy = EventData::new(1, false);
    data.register(&ctx);
    assert!(!ctx.poll(false));
    assert_eq!(data.n(), 0);

    data.e.set().unwrap();
    assert!(ctx.poll(true), "a ready handler must not block the poll");
    assert_eq!(data.n(), 1);
    data.n.store(0, Ordering::SeqCst);

    dummy.register(&ctx);
    assert!(!ctx.poll(false));

    data.e.set().unwrap();
    assert!(ctx.poll(false));
    assert_eq!(data.n(), 1);
    assert!(!ctx.poll(false));
    assert_eq!(data.n(), 1);

    data.e.set().unwrap();
    assert!(ctx.poll(false));
    assert_eq!(data.n(), 2);
    assert!(!ctx.poll(false));
    assert_eq!(data.n(), 2);

    dummy.e.set().unwrap();
    wait_until_inactive(&ctx, &dummy);
    assert_eq!(data.n(), 2);
    assert_eq!(dummy.n(), 1);
    assert_eq!(dummy.active(), 0);

    dummy.unregister(&ctx);
    data.unregister(&ctx);
    assert!(!ctx.poll(false));
    assert_eq!(data.n(), 2);
}

/// Handlers are level-triggered: a readable fd whose handler does not read runs every poll.
#[test]
fn read_handler_is_level_triggered() {
    let _w = watchdog("read_handler_is_level_triggered");
    let ctx = ctx();
    let (r, w) = pipe();
    let n = Counter::new();
    ctx.set_fd_handler(r.as_raw_fd(), n.handler(), None)
        .unwrap();
    assert!(!ctx.poll(false));
    assert_eq!(n.get(), 0, "not called before the fd is ready");

    write_fd(w.as_raw_fd(), b"x").unwrap();
    for i in 1..=10 {
        assert!(ctx.poll(i % 2 == 0));
        assert_eq!(n.get(), i, "called once per poll while readable");
    }
    assert_eq!(drain_fd(r.as_raw_fd()), 1);
    assert!(!ctx.poll(false));
    assert_eq!(n.get(), 10);
    ctx.set_fd_handler(r.as_raw_fd(), None, None).unwrap();
}

/// Handlers never run when their fd is not ready, over many polls with random readiness.
#[test]
fn handler_never_called_when_not_ready() {
    let _w = watchdog("handler_never_called_when_not_ready");
    let ctx = ctx();
    let (r, w) = pipe();
    let fd = r.as_raw_fd();
    let n = Counter::new();
    let c = n.clone();
    ctx.set_fd_handler(
        fd,
        handler(move || {
            let mut b = [0u8; 1];
            assert_eq!(
                read_fd(fd, &mut b).expect("read handler called, fd not ready"),
                1
            );
            c.hit();
        }),
        None,
    )
    .unwrap();
    drain(&ctx);
    let mut expected = 0;
    let mut x: u32 = 12345;
    for _ in 0..2000 {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        let ready = (x >> 16).is_multiple_of(3);
        if ready {
            write_fd(w.as_raw_fd(), b"y").unwrap();
            expected += 1;
        }
        assert_eq!(ctx.poll(false), ready);
        assert_eq!(n.get(), expected);
    }
    ctx.set_fd_handler(fd, None, None).unwrap();
}

/// A write handler runs while the socket is writable and not while its buffer is full.
#[test]
fn write_handler_follows_writability() {
    let _w = watchdog("write_handler_follows_writability");
    let ctx = ctx();
    let (mut a, mut b) = socketpair();
    let nw = Counter::new();
    let nr = Counter::new();
    ctx.set_fd_handler(a.as_raw_fd(), nr.handler(), nw.handler())
        .unwrap();
    assert!(ctx.poll(false), "an empty socket is writable");
    assert_eq!(nw.get(), 1);
    assert_eq!(nr.get(), 0, "read handler not called: nothing to read");
    assert!(ctx.poll(true));
    assert_eq!(nw.get(), 2);

    assert!(fill_socket(&mut a) > 0);
    drain(&ctx);
    let before = nw.get();
    for _ in 0..5 {
        assert!(!ctx.poll(false));
    }
    assert_eq!(nw.get(), before, "write handler called on a full socket");

    // Make room: writable again. Poll until it shows (the kernel frees space in chunks).
    drain_socket(&mut b);
    while nw.get() == before {
        ctx.poll(true);
    }
    // Read and write handlers of one fd: data arriving runs the read handler too.
    let nr0 = nr.get();
    std::io::Write::write_all(&mut b, b"ping").unwrap();
    while nr.get() == nr0 {
        ctx.poll(true);
    }
    ctx.set_fd_handler(a.as_raw_fd(), None, None).unwrap();
    assert!(!ctx.poll(false));
}

/// Hang-up is reported to the read handler (it sees end-of-file).
#[test]
fn hangup_runs_read_handler() {
    let _w = watchdog("hangup_runs_read_handler");
    let ctx = ctx();
    let (r, w) = pipe();
    let fd = r.as_raw_fd();
    let eof = Arc::new(AtomicBool::new(false));
    let e = eof.clone();
    let ctx2 = ctx.downgrade();
    ctx.set_fd_handler(
        fd,
        handler(move || {
            let mut b = [0u8; 16];
            if read_fd(fd, &mut b).unwrap() == 0 {
                e.store(true, Ordering::SeqCst);
                // Stop watching a descriptor at EOF, from inside its own handler.
                ctx2.upgrade()
                    .unwrap()
                    .set_fd_handler(fd, None, None)
                    .unwrap();
            }
        }),
        None,
    )
    .unwrap();
    drain(&ctx);
    drop(w);
    assert!(ctx.poll(true));
    assert!(eof.load(Ordering::SeqCst));
    assert!(ctx.registered_fds().is_empty());
    assert!(!ctx.poll(false));
}

/// Setting handlers again replaces both of them; the old ones never run again.
#[test]
fn replace_handler() {
    let _w = watchdog("replace_handler");
    let ctx = ctx();
    let (mut a, mut b) = socketpair();
    let (r1, w1, r2) = (Counter::new(), Counter::new(), Counter::new());
    ctx.set_fd_handler(a.as_raw_fd(), r1.handler(), w1.handler())
        .unwrap();
    std::io::Write::write_all(&mut b, b"data").unwrap();
    assert!(ctx.poll(false));
    assert_eq!((r1.get(), w1.get()), (1, 1));

    // Replace with a read handler only: the write handler goes too.
    ctx.set_fd_handler(a.as_raw_fd(), r2.handler(), None)
        .unwrap();
    assert!(ctx.poll(false));
    assert_eq!((r1.get(), w1.get(), r2.get()), (1, 1, 1));
    assert_eq!(ctx.registered_fds(), vec![a.as_raw_fd()]);

    drain_socket(&mut a);
    assert!(!ctx.poll(false));
    assert_eq!(r2.get(), 1);
    ctx.set_fd_handler(a.as_raw_fd(), None, None).unwrap();
    // Removing an fd that has no handlers is a no-op.
    ctx.set_fd_handler(a.as_raw_fd(), None, None).unwrap();
    assert!(ctx.registered_fds().is_empty());
}

/// A handler may remove itself; it is not called again although its fd stays readable.
#[test]
fn handler_removes_itself() {
    let _w = watchdog("handler_removes_itself");
    let ctx = ctx();
    let e = Arc::new(EventNotifier::new().unwrap());
    let n = Counter::new();
    let (c, w, e2) = (n.clone(), ctx.downgrade(), e.clone());
    let token = Arc::new(());
    let t = token.clone();
    ctx.set_event_notifier(
        &e,
        handler(move || {
            let _ = &t;
            c.hit();
            w.upgrade().unwrap().set_event_notifier(&e2, None).unwrap();
        }),
    )
    .unwrap();
    e.set().unwrap();
    assert!(ctx.poll(false));
    assert_eq!(n.get(), 1);
    for _ in 0..3 {
        assert!(!ctx.poll(false));
    }
    assert_eq!(n.get(), 1);
    assert_eq!(
        Arc::strong_count(&token),
        1,
        "removed handler's closure not freed"
    );
    assert!(
        e.test_and_clear(),
        "the notifier stayed set: nobody read it"
    );
}

/// A handler may replace itself; the replacement runs from the next dispatch on.
#[test]
fn handler_replaces_itself() {
    let _w = watchdog("handler_replaces_itself");
    let ctx = ctx();
    let e = Arc::new(EventNotifier::new().unwrap());
    let (first, second) = (Counter::new(), Counter::new());
    let (c1, c2, w, e2) = (first.clone(), second.clone(), ctx.downgrade(), e.clone());
    ctx.set_event_notifier(
        &e,
        handler(move || {
            c1.hit();
            let c2 = c2.clone();
            w.upgrade()
                .unwrap()
                .set_event_notifier(&e2, handler(move || c2.hit()))
                .unwrap();
        }),
    )
    .unwrap();
    e.set().unwrap();
    assert!(ctx.poll(false));
    assert_eq!((first.get(), second.get()), (1, 0));
    assert!(ctx.poll(false));
    assert!(ctx.poll(false));
    assert_eq!((first.get(), second.get()), (1, 2));
    ctx.set_event_notifier(&e, None).unwrap();
}

/// A handler that removes another ready handler: the removed one is not called afterwards,
/// even though its fd was reported ready by the same wait.
#[test]
fn handler_removes_other_ready_handler() {
    let _w = watchdog("handler_removes_other_ready_handler");
    let ctx = ctx();
    let a = Arc::new(EventNotifier::new().unwrap());
    let b = Arc::new(EventNotifier::new().unwrap());
    let calls = Arc::new(Mutex::new(Vec::new()));
    for (me, other, name) in [(a.clone(), b.clone(), "a"), (b.clone(), a.clone(), "b")] {
        let (calls, w, me2) = (calls.clone(), ctx.downgrade(), me.clone());
        ctx.set_event_notifier(
            &me,
            handler(move || {
                assert!(me2.test_and_clear());
                calls.lock().unwrap().push(name);
                w.upgrade()
                    .unwrap()
                    .set_event_notifier(&other, None)
                    .unwrap();
            }),
        )
        .unwrap();
    }
    drain(&ctx);
    a.set().unwrap();
    b.set().unwrap();
    assert!(ctx.poll(false));
    for _ in 0..3 {
        ctx.poll(false);
    }
    let calls = calls.lock().unwrap().clone();
    assert_eq!(
        calls.len(),
        1,
        "both ran although the first removed the second: {calls:?}"
    );
    assert_eq!(ctx.registered_fds().len(), 1);
}

/// A handler may add handlers, BHs and timers; they run (in this poll or the next).
#[test]
fn handler_adds_handler_bh_and_timer() {
    let _w = watchdog("handler_adds_handler_bh_and_timer");
    let ctx = ctx();
    let a = Arc::new(EventNotifier::new().unwrap());
    let b = Arc::new(EventNotifier::new().unwrap());
    let (nb, nbh, nt) = (Counter::new(), Counter::new(), Counter::new());
    let keep: Arc<Mutex<Vec<Box<dyn Send>>>> = Arc::new(Mutex::new(Vec::new()));
    {
        let (w, b, nb, nbh, nt, keep, a2) = (
            ctx.downgrade(),
            b.clone(),
            nb.clone(),
            nbh.clone(),
            nt.clone(),
            keep.clone(),
            a.clone(),
        );
        ctx.set_event_notifier(
            &a,
            handler(move || {
                assert!(a2.test_and_clear());
                let ctx = w.upgrade().unwrap();
                let b2 = b.clone();
                let nb = nb.clone();
                ctx.set_event_notifier(
                    &b,
                    handler(move || {
                        assert!(b2.test_and_clear());
                        nb.hit();
                    }),
                )
                .unwrap();
                let bh = ctx.bh_new(nbh.cb());
                bh.schedule();
                let t = ctx.timer_new(aioctx::ClockType::Realtime, 1, nt.cb());
                t.modify(0);
                keep.lock().unwrap().push(Box::new(bh));
                keep.lock().unwrap().push(Box::new(t));
            }),
        )
        .unwrap();
    }
    drain(&ctx);
    a.set().unwrap();
    b.set().unwrap();
    let mut polls = 0;
    while nb.get() == 0 || nbh.get() == 0 || nt.get() == 0 {
        assert!(ctx.poll(true));
        polls += 1;
        assert!(polls <= 3);
    }
    assert_eq!((nb.get(), nbh.get(), nt.get()), (1, 1, 1));
    assert_eq!(drain(&ctx), 0);
    ctx.set_event_notifier(&a, None).unwrap();
    ctx.set_event_notifier(&b, None).unwrap();
}

/// Registering a handler from another thread wakes a blocked poll, which then sees it.
#[test]
fn register_from_other_thread_wakes_poll() {
    let _w = watchdog("register_from_other_thread_wakes_poll");
    let ctx = ctx();
    let e = Arc::new(EventNotifier::new().unwrap());
    e.set().unwrap();
    let n = Counter::new();
    let barrier = Arc::new(Barrier::new(2));
    let t = {
        let (ctx, e, n, barrier) = (ctx.clone(), e.clone(), n.clone(), barrier.clone());
        std::thread::spawn(move || {
            barrier.wait();
            ctx.set_event_notifier(&e, n.handler()).unwrap();
        })
    };
    drain(&ctx);
    barrier.wait();
    while n.get() == 0 {
        ctx.poll(true);
    }
    t.join().unwrap();
    ctx.set_event_notifier(&e, None).unwrap();
}

/// A handler removed from another thread while the loop is blocked is not called afterwards.
#[test]
fn remove_from_other_thread() {
    let _w = watchdog("remove_from_other_thread");
    let ctx = ctx();
    let e = Arc::new(EventNotifier::new().unwrap());
    let n = Counter::new();
    ctx.set_event_notifier(&e, n.handler()).unwrap();
    drain(&ctx);
    let done = Arc::new(AtomicBool::new(false));
    let t = {
        let (ctx, e, done) = (ctx.clone(), e.clone(), done.clone());
        std::thread::spawn(move || {
            ctx.set_event_notifier(&e, None).unwrap();
            done.store(true, Ordering::SeqCst);
            ctx.notify();
        })
    };
    while !done.load(Ordering::SeqCst) {
        ctx.poll(true);
    }
    t.join().unwrap();
    e.set().unwrap();
    for _ in 0..3 {
        assert!(!ctx.poll(false));
    }
    assert_eq!(n.get(), 0);
}

/// A handler may run a nested poll; it is not re-entered by it although its fd is still ready.
#[test]
fn nested_poll_in_handler_does_not_reenter() {
    let _w = watchdog("nested_poll_in_handler_does_not_reenter");
    let ctx = ctx();
    let (r, w) = pipe();
    let depth = Arc::new(AtomicUsize::new(0));
    let max_depth = Arc::new(AtomicUsize::new(0));
    let n = Counter::new();
    let nested_results = Arc::new(Mutex::new(Vec::new()));
    {
        let (depth, max_depth, n, wctx, res) = (
            depth.clone(),
            max_depth.clone(),
            n.clone(),
            ctx.downgrade(),
            nested_results.clone(),
        );
        ctx.set_fd_handler(
            r.as_raw_fd(),
            handler(move || {
                let d = depth.fetch_add(1, Ordering::SeqCst) + 1;
                max_depth.fetch_max(d, Ordering::SeqCst);
                n.hit();
                let ctx = wctx.upgrade().unwrap();
                let r = ctx.poll(false);
                res.lock().unwrap().push(r);
                depth.fetch_sub(1, Ordering::SeqCst);
            }),
            None,
        )
        .unwrap();
    }
    drain(&ctx);
    write_fd(w.as_raw_fd(), b"z").unwrap();
    for i in 1..=5 {
        assert!(ctx.poll(false));
        assert_eq!(n.get(), i);
    }
    assert_eq!(max_depth.load(Ordering::SeqCst), 1, "handler re-entered");
    assert!(
        nested_results.lock().unwrap().iter().all(|r| !r),
        "the nested polls had nothing else to run"
    );
    ctx.set_fd_handler(r.as_raw_fd(), None, None).unwrap();
}

/// With the poll(2) back end any descriptor can be watched, including ones epoll refuses;
/// epoll reports the kernel's refusal as an error instead.
#[test]
fn regular_files_per_backend() {
    let _w = watchdog("regular_files_per_backend");
    let f = std::fs::File::open("/proc/self/status").unwrap();
    for ctx in common::both_backends() {
        let n = Counter::new();
        let res = ctx.set_fd_handler(f.as_raw_fd(), n.handler(), None);
        match ctx.backend() {
            aioctx::Backend::Epoll => {
                let err = res.expect_err("epoll accepts no regular file");
                // The kernel's EPERM. (The library re-wraps OS errors with the call's name, so
                // `raw_os_error()` is None; only the kind survives.)
                assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied, "{err}");
                assert!(ctx.registered_fds().is_empty());
                assert!(!ctx.poll(false));
            }
            _ => {
                res.unwrap();
                assert!(ctx.poll(false), "a regular file is always readable");
                assert_eq!(n.get(), 1);
                ctx.set_fd_handler(f.as_raw_fd(), None, None).unwrap();
            }
        }
    }
}

/// Many descriptors at once: exactly the ready ones run, on both back ends.
#[test]
fn many_fds_only_ready_ones_run() {
    let _w = watchdog("many_fds_only_ready_ones_run");
    for ctx in common::both_backends() {
        const N: usize = 300;
        let notifiers: Vec<Arc<EventNotifier>> = (0..N)
            .map(|_| Arc::new(EventNotifier::new().unwrap()))
            .collect();
        let hits: Arc<Vec<AtomicUsize>> = Arc::new((0..N).map(|_| AtomicUsize::new(0)).collect());
        for (i, e) in notifiers.iter().enumerate() {
            let (e2, hits) = (e.clone(), hits.clone());
            ctx.set_event_notifier(
                e,
                handler(move || {
                    assert!(e2.test_and_clear());
                    hits[i].fetch_add(1, Ordering::SeqCst);
                }),
            )
            .unwrap();
        }
        drain(&ctx);
        for round in 0..3 {
            let ready: Vec<usize> = (0..N).filter(|i| (i * 7 + round) % 5 == 0).collect();
            for &i in &ready {
                notifiers[i].set().unwrap();
            }
            // The epoll back end reports at most 256 descriptors per wait; the rest stay ready.
            while ctx.poll(false) {}
            for i in 0..N {
                let want = (0..=round).filter(|r| (i * 7 + r) % 5 == 0).count();
                assert_eq!(
                    hits[i].load(Ordering::SeqCst),
                    want,
                    "fd #{i} round {round}"
                );
            }
        }
        for e in &notifiers {
            ctx.set_event_notifier(e, None).unwrap();
        }
        assert!(ctx.registered_fds().is_empty());
    }
}
