//! The worker pool and AIO control blocks: QEMU's tests/test-thread-pool.c, written afresh.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::Duration;

use aioctx::{AioContext, Canceled};

/// A gate that work items wait on, so "long" items are controlled by the test, not by sleeps.
#[derive(Default)]
struct Gate {
    open: Mutex<bool>,
    cond: Condvar,
    waiting: AtomicUsize,
}

impl Gate {
    fn wait(&self) {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let mut open = self.open.lock().unwrap();
        self.cond.notify_all();
        while !*open {
            open = self.cond.wait(open).unwrap();
        }
    }

    /// Blocks until `n` items are waiting at the gate.
    fn until_waiting(&self, n: usize) {
        let mut open = self.open.lock().unwrap();
        while self.waiting.load(Ordering::SeqCst) < n {
            open = self.cond.wait(open).unwrap();
        }
    }

    fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.cond.notify_all();
    }
}

#[test]
fn submit_runs_work_without_completion() {
    let ctx = AioContext::new().unwrap();
    let pool = ctx.thread_pool();
    let done = Arc::new(AtomicUsize::new(0));
    for _ in 0..100 {
        let d = done.clone();
        pool.submit(move || {
            d.fetch_add(1, Ordering::SeqCst);
        });
    }
    while done.load(Ordering::SeqCst) < 100 {
        ctx.poll(true);
    }
    assert_eq!(done.load(Ordering::SeqCst), 100);
}

#[test]
fn submit_aio_completes_once_on_the_polling_thread() {
    let ctx = AioContext::new().unwrap();
    let pool = ctx.thread_pool();
    let results = Arc::new(Mutex::new(Vec::new()));
    let me = thread::current().id();
    for i in 0..100u64 {
        let r = results.clone();
        pool.submit_aio(
            move || {
                assert_ne!(thread::current().id(), me, "work runs on a worker");
                i * 2
            },
            move |v| {
                assert_eq!(
                    thread::current().id(),
                    me,
                    "done runs on the polling thread"
                );
                r.lock().unwrap().push((i, v));
            },
        );
    }
    // Nothing completes inside submit_aio or before a poll.
    assert!(results.lock().unwrap().is_empty());
    while results.lock().unwrap().len() < 100 {
        ctx.poll(true);
    }
    let mut got = results.lock().unwrap().clone();
    got.sort();
    let want: Vec<_> = (0..100u64).map(|i| (i, Ok(i * 2))).collect();
    assert_eq!(got, want);
    // Each completion ran once: nothing more arrives.
    assert!(!ctx.poll(false));
    assert_eq!(results.lock().unwrap().len(), 100);
}

#[test]
fn run_as_a_future() {
    let ctx = AioContext::new().unwrap();
    let pool = ctx.thread_pool();
    let sum = ctx.block_on(async {
        let mut sum = 0u64;
        for i in 0..10u64 {
            sum += pool.run(move || i * i).await;
        }
        sum
    });
    assert_eq!(sum, (0..10u64).map(|i| i * i).sum::<u64>());
}

#[test]
fn more_items_than_threads() {
    let ctx = AioContext::builder().thread_pool_max(3).build().unwrap();
    let pool = ctx.thread_pool();
    let gate = Arc::new(Gate::default());
    let completed = Arc::new(AtomicUsize::new(0));
    for _ in 0..100 {
        let g = gate.clone();
        let c = completed.clone();
        pool.submit_aio(
            move || g.wait(),
            move |r| {
                assert_eq!(r, Ok(()));
                c.fetch_add(1, Ordering::SeqCst);
            },
        );
    }
    gate.until_waiting(3);
    assert_eq!(pool.threads(), 3, "never more workers than the maximum");
    assert_eq!(pool.queued(), 97);
    gate.open();
    while completed.load(Ordering::SeqCst) < 100 {
        ctx.poll(true);
    }
    assert!(pool.threads() <= 3);
}

/// 100 long items on 4 workers: 4 start, 96 wait. Every item ends exactly once, either
/// cancelled before it started or completed with its real result.
fn cancel_variant(sync: bool) {
    const ITEMS: usize = 100;
    const WORKERS: usize = 4;
    let ctx = AioContext::builder()
        .thread_pool_max(WORKERS)
        .build()
        .unwrap();
    let pool = ctx.thread_pool();
    let gate = Arc::new(Gate::default());
    let started: Arc<Vec<AtomicBool>> =
        Arc::new((0..ITEMS).map(|_| AtomicBool::new(false)).collect());
    type Outcomes = Vec<Vec<Result<usize, Canceled>>>;
    let outcome: Arc<Mutex<Outcomes>> = Arc::new(Mutex::new(vec![Vec::new(); ITEMS]));
    let mut aiocbs = Vec::new();
    for i in 0..ITEMS {
        let (g, s, o) = (gate.clone(), started.clone(), outcome.clone());
        aiocbs.push(pool.submit_aio(
            move || {
                s[i].store(true, Ordering::SeqCst);
                g.wait();
                i
            },
            move |r| o.lock().unwrap()[i].push(r),
        ));
    }
    gate.until_waiting(WORKERS);
    let running: Vec<usize> = (0..ITEMS)
        .filter(|&i| started[i].load(Ordering::SeqCst))
        .collect();
    assert_eq!(running.len(), WORKERS);

    // Cancel the queued ones first: they cannot have started, since every worker is busy.
    for (i, aiocb) in aiocbs.iter().enumerate() {
        if running.contains(&i) {
            continue;
        }
        if sync {
            aiocb.cancel();
            assert!(aiocb.is_done());
            assert_eq!(outcome.lock().unwrap()[i], vec![Err(Canceled)]);
        } else {
            aiocb.cancel_async();
        }
    }
    gate.open();
    for &i in &running {
        if sync {
            // A running item is never interrupted: cancel waits for its real result.
            aiocbs[i].cancel();
            assert_eq!(outcome.lock().unwrap()[i], vec![Ok(i)]);
        } else {
            aiocbs[i].cancel_async();
        }
    }
    while !aiocbs.iter().all(|a| a.is_done()) {
        ctx.poll(true);
    }
    let outcome = outcome.lock().unwrap();
    for i in 0..ITEMS {
        let want = if running.contains(&i) {
            Ok(i)
        } else {
            Err(Canceled)
        };
        assert_eq!(outcome[i], vec![want], "item {i}");
        assert_eq!(started[i].load(Ordering::SeqCst), running.contains(&i));
    }
}

#[test]
fn cancel_sync() {
    cancel_variant(true);
}

#[test]
fn cancel_async() {
    cancel_variant(false);
}

#[test]
fn cancel_from_another_thread_waits_for_the_loop() {
    let ctx = AioContext::builder().thread_pool_max(1).build().unwrap();
    let pool = ctx.thread_pool();
    let gate = Arc::new(Gate::default());
    let g = gate.clone();
    let blocker_done = Arc::new(AtomicBool::new(false));
    let b = blocker_done.clone();
    pool.submit_aio(move || g.wait(), move |_| b.store(true, Ordering::SeqCst));
    gate.until_waiting(1);
    let result = Arc::new(Mutex::new(None));
    let r = result.clone();
    let queued = pool.submit_aio(|| 7, move |v| *r.lock().unwrap() = Some(v));

    let canceller = thread::spawn(move || {
        queued.cancel();
        // `done` has run (on the polling thread) by the time cancel returns.
        queued.is_done()
    });
    while result.lock().unwrap().is_none() {
        ctx.poll(true);
    }
    assert!(canceller.join().unwrap());
    assert_eq!(*result.lock().unwrap(), Some(Err(Canceled)));
    gate.open();
    while !blocker_done.load(Ordering::SeqCst) {
        ctx.poll(true);
    }
}

#[test]
fn pool_limits_and_idle_exit() {
    let ctx = AioContext::builder()
        .thread_pool_min(2)
        .thread_pool_max(4)
        .thread_pool_idle_timeout(Duration::from_millis(20))
        .build()
        .unwrap();
    let pool = ctx.thread_pool();
    assert_eq!(pool.threads(), 2, "the minimum is spawned up front");

    let gate = Arc::new(Gate::default());
    let completed = Arc::new(AtomicUsize::new(0));
    for _ in 0..4 {
        let (g, c) = (gate.clone(), completed.clone());
        pool.submit_aio(
            move || g.wait(),
            move |_| {
                c.fetch_add(1, Ordering::SeqCst);
            },
        );
    }
    gate.until_waiting(4);
    assert_eq!(pool.threads(), 4);
    gate.open();
    while completed.load(Ordering::SeqCst) < 4 {
        ctx.poll(true);
    }
    // Idle workers above the minimum exit after the idle timeout; the minimum stays. Thread exit
    // has no signal to wait on, so look again for a bounded time.
    for _ in 0..500 {
        if pool.threads() == 2 {
            break;
        }
        thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(pool.threads(), 2);

    pool.set_limits(3, 8);
    assert_eq!(pool.threads(), 3);
    pool.set_limits(0, 1);
    for _ in 0..500 {
        if pool.threads() == 0 {
            break;
        }
        thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(pool.threads(), 0);
}

#[test]
fn invalid_limits_are_an_error() {
    let err = AioContext::builder()
        .thread_pool_min(5)
        .thread_pool_max(2)
        .build()
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    assert!(AioContext::builder().thread_pool_max(0).build().is_err());
}

/// Counts its drops and lets another thread wait for a number of them.
#[derive(Clone, Default)]
struct DropCounter(Arc<(Mutex<usize>, Condvar)>);

impl DropCounter {
    fn token(&self) -> DropToken {
        DropToken(self.clone())
    }

    fn wait_for(&self, n: usize) {
        let (count, cond) = &*self.0;
        let mut c = count.lock().unwrap();
        while *c < n {
            c = cond.wait(c).unwrap();
        }
    }
}

struct DropToken(DropCounter);

impl Drop for DropToken {
    fn drop(&mut self) {
        let (count, cond) = &*(self.0).0;
        *count.lock().unwrap() += 1;
        cond.notify_all();
    }
}

#[test]
fn dropping_the_context_joins_workers_and_drops_queued_work() {
    let ctx = AioContext::builder().thread_pool_max(2).build().unwrap();
    let pool = ctx.thread_pool();
    let gate = Arc::new(Gate::default());
    let finished = Arc::new(AtomicUsize::new(0));
    let completions = Arc::new(AtomicUsize::new(0));
    let dropped = DropCounter::default();
    for _ in 0..10 {
        let (g, f, c, t) = (
            gate.clone(),
            finished.clone(),
            completions.clone(),
            dropped.token(),
        );
        pool.submit_aio(
            move || {
                g.wait();
                f.fetch_add(1, Ordering::SeqCst);
                drop(t);
            },
            move |_| {
                c.fetch_add(1, Ordering::SeqCst);
            },
        );
    }
    gate.until_waiting(2);
    // Opens the gate once the context's teardown has dropped the eight queued items, while the
    // teardown is joining the two running workers.
    let opener = {
        let (gate, dropped) = (gate.clone(), dropped.clone());
        thread::spawn(move || {
            dropped.wait_for(8);
            gate.open();
        })
    };
    drop(pool);
    drop(ctx);
    opener.join().unwrap();
    assert_eq!(
        finished.load(Ordering::SeqCst),
        2,
        "running work finished, queued never ran"
    );
    assert_eq!(
        completions.load(Ordering::SeqCst),
        0,
        "no callback runs after the context is gone"
    );
    dropped.wait_for(10);
}

#[test]
fn panicking_work_surfaces_in_poll_and_the_pool_keeps_working() {
    let ctx = AioContext::new().unwrap();
    let pool = ctx.thread_pool();
    pool.submit_aio(|| -> u32 { panic!("work failed") }, |_| unreachable!());
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| loop {
        ctx.poll(true);
    }));
    let msg = panicked.unwrap_err();
    assert_eq!(msg.downcast_ref::<&str>(), Some(&"work failed"));
    let v = ctx.block_on(pool.run(|| 5));
    assert_eq!(v, 5);
}
