//! async/await on the context: tasks, block_on, timer and readiness futures, and
//! test-aio-multithread's cases (tasks moving between contexts polled by their own threads).

use std::future::Future;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::thread;
use std::time::{Duration, Instant};

use aioctx::{clock_get_ns, AioContext, Canceled, ClockType};

/// A one-shot value that can be completed from any thread.
struct Slot<T> {
    inner: Mutex<(Option<T>, Option<Waker>)>,
}

impl<T> Slot<T> {
    fn new() -> Arc<Self> {
        Arc::new(Slot {
            inner: Mutex::new((None, None)),
        })
    }

    fn put(&self, v: T) {
        let waker = {
            let mut g = self.inner.lock().unwrap();
            g.0 = Some(v);
            g.1.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }

    fn get(self: &Arc<Self>) -> SlotFuture<T> {
        SlotFuture(self.clone())
    }
}

struct SlotFuture<T>(Arc<Slot<T>>);

impl<T> Future for SlotFuture<T> {
    type Output = T;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let mut g = self.0.inner.lock().unwrap();
        match g.0.take() {
            Some(v) => Poll::Ready(v),
            None => {
                g.1 = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

#[test]
fn spawned_task_runs_during_poll_on_the_polling_thread() {
    let ctx = AioContext::new().unwrap();
    let ran_on = Arc::new(Mutex::new(None));
    let r = ran_on.clone();
    let handle = ctx.spawn(async move {
        *r.lock().unwrap() = Some(thread::current().id());
        5
    });
    assert!(
        ran_on.lock().unwrap().is_none(),
        "spawn does not run the task"
    );
    assert!(ctx.poll(false));
    assert_eq!(*ran_on.lock().unwrap(), Some(thread::current().id()));
    assert!(handle.is_finished());
    assert_eq!(ctx.block_on(handle), Ok(5));
}

#[test]
fn wake_from_another_thread_resumes_on_the_context_thread() {
    let ctx = AioContext::new().unwrap();
    let slot = Slot::new();
    let s = slot.clone();
    let me = thread::current().id();
    let handle = ctx.spawn(async move {
        let v = s.get().await;
        assert_eq!(thread::current().id(), me);
        v + 1
    });
    assert!(ctx.poll(false)); // first poll: the task waits on the slot
    let waker_thread = thread::spawn(move || slot.put(41));
    assert_eq!(ctx.block_on(handle), Ok(42));
    waker_thread.join().unwrap();
}

/// Two tasks waking each other 50,000 times: each wake must queue the other task, not enter it,
/// so the stack does not grow. Run on a thread with a small stack to make any recursion fatal.
#[test]
fn ping_pong_does_not_grow_the_stack() {
    const ROUNDS: usize = 50_000;
    let t = thread::Builder::new()
        .stack_size(256 * 1024)
        .spawn(|| {
            let ctx = AioContext::new().unwrap();
            // turn: 0 = ping's turn, 1 = pong's turn.
            let state = Arc::new(Mutex::new((0usize, [None::<Waker>, None::<Waker>], 0usize)));
            let make = |me: usize| {
                let state = state.clone();
                std::future::poll_fn(move |cx| {
                    let mut s = state.lock().unwrap();
                    loop {
                        if s.2 >= ROUNDS {
                            if let Some(w) = s.1[1 - me].take() {
                                w.wake();
                            }
                            return Poll::Ready(());
                        }
                        if s.0 != me {
                            s.1[me] = Some(cx.waker().clone());
                            return Poll::Pending;
                        }
                        s.0 = 1 - me;
                        s.2 += 1;
                        if let Some(w) = s.1[1 - me].take() {
                            w.wake();
                        }
                    }
                })
            };
            let a = ctx.spawn(make(0));
            let b = ctx.spawn(make(1));
            assert_eq!(ctx.block_on(a), Ok(()));
            assert_eq!(ctx.block_on(b), Ok(()));
            assert!(state.lock().unwrap().2 >= ROUNDS);
        })
        .unwrap();
    t.join().unwrap();
}

#[test]
fn abort_cancels_and_drops_the_future() {
    let ctx = AioContext::new().unwrap();
    let payload = Arc::new(());
    let p = payload.clone();
    let handle = ctx.spawn(async move {
        let _keep = p;
        std::future::pending::<()>().await;
    });
    assert!(ctx.poll(false));
    assert_eq!(Arc::strong_count(&payload), 2);
    handle.abort();
    ctx.poll(false);
    assert_eq!(Arc::strong_count(&payload), 1, "the future was dropped");
    assert_eq!(ctx.block_on(handle), Err(Canceled));
}

#[test]
fn dropping_the_handle_detaches() {
    let ctx = AioContext::new().unwrap();
    let slot = Slot::new();
    let done = Arc::new(AtomicBool::new(false));
    let (s, d) = (slot.clone(), done.clone());
    drop(ctx.spawn(async move {
        s.get().await;
        d.store(true, Ordering::SeqCst);
    }));
    ctx.poll(false);
    slot.put(());
    while !done.load(Ordering::SeqCst) {
        ctx.poll(true);
    }
}

#[test]
fn a_panicking_task_unwinds_out_of_poll_and_finishes_canceled() {
    let ctx = AioContext::new().unwrap();
    let handle = ctx.spawn(async { panic!("task failed") });
    let err = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| ctx.poll(false)));
    assert!(err.is_err());
    assert_eq!(ctx.block_on(handle), Err(Canceled));
    assert_eq!(ctx.block_on(ctx.spawn(async { 3 })), Ok(3));
}

#[test]
fn sleep_is_never_early() {
    let ctx = AioContext::new().unwrap();
    for ms in [0u64, 1, 3] {
        let start = Instant::now();
        let t0 = clock_get_ns(ClockType::Realtime);
        ctx.block_on(aioctx::sleep(Duration::from_millis(ms)));
        assert!(start.elapsed() >= Duration::from_millis(ms));
        assert!(clock_get_ns(ClockType::Realtime) - t0 >= ms as i64 * 1_000_000);
    }
    // The explicit form, inside a spawned task.
    let c = ctx.clone();
    let start = Instant::now();
    let h = ctx.spawn(async move { c.sleep(ClockType::Realtime, Duration::from_millis(2)).await });
    ctx.block_on(h).unwrap();
    assert!(start.elapsed() >= Duration::from_millis(2));
}

#[test]
fn virtual_clock_sleep_fires_when_advanced() {
    aioctx::virtual_clock::stop();
    let ctx = AioContext::new().unwrap();
    let deadline = clock_get_ns(ClockType::Virtual) + 1_000_000_000;
    let fired = Arc::new(AtomicBool::new(false));
    let f = fired.clone();
    let c = ctx.clone();
    let h = ctx.spawn(async move {
        c.sleep_until(ClockType::Virtual, deadline).await;
        f.store(true, Ordering::SeqCst);
    });
    assert!(ctx.poll(false));
    assert!(!ctx.poll(false));
    assert!(
        !fired.load(Ordering::SeqCst),
        "a stopped virtual clock never fires"
    );
    aioctx::virtual_clock::advance(999_999_999);
    ctx.poll(false);
    assert!(!fired.load(Ordering::SeqCst), "not early");
    aioctx::virtual_clock::advance(1);
    ctx.block_on(h).unwrap();
    assert!(fired.load(Ordering::SeqCst));
    assert!(clock_get_ns(ClockType::Virtual) >= deadline);
}

#[test]
fn readiness_futures() {
    let ctx = AioContext::new().unwrap();
    let (mut a, b) = UnixStream::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    b.set_nonblocking(true).unwrap();
    let fd = b.as_raw_fd();
    let c = ctx.clone();
    let reader = ctx.spawn(async move {
        let mut b = b;
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        while got.len() < 10 {
            c.readable(fd).await.unwrap();
            match b.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => panic!("{e}"),
            }
        }
        got
    });
    assert!(ctx.poll(false));
    assert!(
        !ctx.poll(false),
        "nothing to read yet: the reader does not run"
    );
    let c = ctx.clone();
    let afd = a.as_raw_fd();
    let writer = ctx.spawn(async move {
        for chunk in [&b"hello"[..], b"world"] {
            c.writable(afd).await.unwrap();
            a.write_all(chunk).unwrap();
        }
    });
    ctx.block_on(writer).unwrap();
    assert_eq!(ctx.block_on(reader).unwrap(), b"helloworld");
    assert!(
        ctx.registered_fds().is_empty(),
        "readiness handlers are removed when satisfied"
    );
}

#[test]
fn readiness_on_a_regular_file_is_an_error_under_epoll() {
    let ctx = AioContext::builder()
        .backend(aioctx::Backend::Epoll)
        .build()
        .unwrap();
    let file = std::fs::File::open("/proc/self/exe").unwrap();
    let r = ctx.block_on(ctx.readable(file.as_raw_fd()));
    let err = r.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied);
    assert!(
        err.to_string().contains("epoll_ctl"),
        "the failing call is named: {err}"
    );
    assert!(ctx.registered_fds().is_empty());
}

#[test]
fn current_context() {
    assert!(AioContext::current().is_none());
    let ctx = AioContext::new().unwrap();
    let c = ctx.clone();
    ctx.bh_schedule_oneshot(move || {
        assert!(AioContext::current().unwrap().ptr_eq(&c));
    });
    assert!(ctx.poll(false));
    assert!(AioContext::current().is_none());
}

/// test-aio-multithread: 5 contexts, each polled by its own thread; tasks hop between them at
/// random for a second. Every hop must land on the target context's thread, no task may run in
/// two places at once, and no wake-up may be lost (a lost one would hang: the watchdog fails it).
#[test]
fn tasks_hop_between_contexts() {
    const CONTEXTS: usize = 5;
    const TASKS: usize = 20;
    let contexts: Vec<AioContext> = (0..CONTEXTS).map(|_| AioContext::new().unwrap()).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let (tid_tx, tid_rx) = mpsc::channel();
    let loops: Vec<_> = contexts
        .iter()
        .enumerate()
        .map(|(i, ctx)| {
            let (ctx, stop, tx) = (ctx.clone(), stop.clone(), tid_tx.clone());
            thread::spawn(move || {
                tx.send((i, thread::current().id())).unwrap();
                while !stop.load(Ordering::SeqCst) {
                    ctx.poll(true);
                }
                // Drain what is left so every hop in flight completes.
                while ctx.poll(false) {}
            })
        })
        .collect();
    let mut tids = vec![None; CONTEXTS];
    for _ in 0..CONTEXTS {
        let (i, t) = tid_rx.recv().unwrap();
        tids[i] = Some(t);
    }
    let tids: Arc<Vec<_>> = Arc::new(tids.into_iter().map(Option::unwrap).collect());

    let hops = Arc::new(AtomicUsize::new(0));
    let busy: Arc<Vec<AtomicBool>> = Arc::new((0..TASKS).map(|_| AtomicBool::new(false)).collect());
    let deadline = Instant::now() + Duration::from_secs(1);
    let (done_tx, done_rx) = mpsc::channel();

    /// What every hop shares.
    struct World {
        ctxs: Vec<AioContext>,
        tids: Arc<Vec<thread::ThreadId>>,
        busy: Arc<Vec<AtomicBool>>,
        hops: Arc<AtomicUsize>,
        deadline: Instant,
        done: Mutex<mpsc::Sender<usize>>,
    }

    /// One hop: run on `ctxs[at]`, then spawn the continuation onto a random context.
    fn hop(world: Arc<World>, task: usize, at: usize, seed: u64) {
        let ctx = world.ctxs[at].clone();
        drop(ctx.spawn(async move {
            let w = &*world;
            assert_eq!(
                thread::current().id(),
                w.tids[at],
                "resumed on its own context's thread"
            );
            assert!(
                !w.busy[task].swap(true, Ordering::SeqCst),
                "task {task} running twice"
            );
            w.hops.fetch_add(1, Ordering::Relaxed);
            // xorshift: a cheap deterministic random next context.
            let mut x = seed;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let next = (x % w.ctxs.len() as u64) as usize;
            w.busy[task].store(false, Ordering::SeqCst);
            if Instant::now() < w.deadline {
                hop(world, task, next, x);
            } else {
                w.done.lock().unwrap().send(task).unwrap();
            }
        }));
    }

    let world = Arc::new(World {
        ctxs: contexts.clone(),
        tids,
        busy,
        hops: hops.clone(),
        deadline,
        done: Mutex::new(done_tx),
    });
    for task in 0..TASKS {
        hop(world.clone(), task, task % CONTEXTS, task as u64 * 7919 + 1);
    }
    let mut finished = [false; TASKS];
    for _ in 0..TASKS {
        let t = done_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("a hop was lost");
        assert!(!finished[t], "task {t} finished twice");
        finished[t] = true;
    }
    stop.store(true, Ordering::SeqCst);
    for ctx in &contexts {
        ctx.notify();
    }
    for l in loops {
        l.join().unwrap();
    }
    assert!(hops.load(Ordering::Relaxed) > TASKS);
}

/// test-aio-multithread's lifecycle case: contexts created, polled by their own threads, and torn
/// down, repeatedly.
#[test]
fn context_lifecycle_with_polling_threads() {
    for _ in 0..20 {
        let ctx = AioContext::new().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (ctx.clone(), stop.clone());
        let t = thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                c.poll(true);
            }
        });
        let pool_result = Slot::new();
        let pr = pool_result.clone();
        ctx.thread_pool().submit_aio(|| 1, move |r| pr.put(r));
        let h = ctx.spawn(async move { pool_result.get().await });
        // Wait for the task from this thread: poll happens on the loop thread.
        let (tx, rx) = mpsc::channel();
        ctx.spawn(async move {
            tx.send(h.await).unwrap();
        });
        ctx.notify();
        assert_eq!(rx.recv_timeout(Duration::from_secs(30)).unwrap(), Ok(Ok(1)));
        stop.store(true, Ordering::SeqCst);
        ctx.notify();
        t.join().unwrap();
    }
}
