//! The per-context worker pool (QEMU's `util/thread-pool.c`: `thread_pool_submit`,
//! `thread_pool_submit_aio`, `thread_pool_submit_co`, `aio_context_set_thread_pool_params`).
//!
//! Work runs on worker threads; each completion runs back on the context as a one-shot BH, so a
//! completion callback may itself wait (a nested poll) for another completion.
//!
//! A request is either still in the queue or taken out of it, by a worker (which runs it) or by
//! a cancellation (which completes it with `Canceled`). Both take it out under the pool mutex,
//! so exactly one of them wins, and "queued" needs no state of its own.

use std::any::Any;
use std::collections::VecDeque;
use std::future::Future;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Waker};
use std::thread;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use crate::aiocb::{AioCb, AioCbOps, Canceled, Completion};
use crate::context::{Core, Inner};
use crate::AioContext;

/// QEMU's `THREAD_POOL_MAX_THREADS_DEFAULT`.
pub(crate) const DEFAULT_MAX_THREADS: usize = 64;
/// How long a worker above the minimum waits for work before exiting (QEMU's 10 s).
pub(crate) const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// A type-erased piece of work and its completion.
trait Job: Send {
    /// Runs the work on a worker thread, keeping its result (or its panic) for `complete`.
    fn run(&mut self);
    /// Runs the completion on the context's thread.
    fn complete(self: Box<Self>, canceled: bool);
}

struct TypedJob<T, W, D> {
    work: Option<W>,
    result: Option<Result<T, Box<dyn Any + Send>>>,
    done: D,
}

impl<T, W, D> Job for TypedJob<T, W, D>
where
    T: Send + 'static,
    W: FnOnce() -> T + Send + 'static,
    D: FnOnce(Result<T, Canceled>) + Send + 'static,
{
    fn run(&mut self) {
        if let Some(work) = self.work.take() {
            self.result = Some(catch_unwind(AssertUnwindSafe(work)));
        }
    }

    fn complete(self: Box<Self>, canceled: bool) {
        let TypedJob { result, done, .. } = *self;
        match (canceled, result) {
            (false, Some(Ok(value))) => done(Ok(value)),
            // The work panicked: the panic surfaces on the context's thread, out of poll(),
            // like a panic in any other callback.
            (false, Some(Err(panic))) => resume_unwind(panic),
            _ => done(Err(Canceled)),
        }
    }
}

struct Request {
    job: Mutex<Option<Box<dyn Job>>>,
    completion: Completion,
    pool: Weak<PoolShared>,
}

impl Request {
    /// Queues the completion onto the context (or, for fire-and-forget work, just records it).
    fn finish(self: Arc<Self>, pool: &PoolShared, canceled: bool) {
        let Some(job) = self.job.lock().take() else {
            self.completion.complete();
            return;
        };
        // Completes the request when the callback has run, or when it is dropped unrun because
        // the context is gone, so that `AioCb::cancel` never waits forever.
        let completed = CompleteOnDrop(Arc::clone(&self));
        crate::bh::schedule_oneshot(
            &pool.core,
            crate::callback::once(move || {
                let _completed = completed;
                job.complete(canceled);
            }),
        );
    }
}

struct CompleteOnDrop(Arc<Request>);

impl Drop for CompleteOnDrop {
    fn drop(&mut self) {
        self.0.completion.complete();
    }
}

struct PoolState {
    queue: VecDeque<Arc<Request>>,
    threads: usize,
    idle: usize,
    min: usize,
    max: usize,
    idle_timeout: Duration,
    stopping: bool,
    workers: Vec<thread::JoinHandle<()>>,
}

pub(crate) struct PoolShared {
    core: Arc<Core>,
    /// The context, to poll from `AioCb::cancel`; weak so the pool never keeps it alive.
    ctx: Weak<Inner>,
    state: Mutex<PoolState>,
    work_ready: Condvar,
}

/// Sizing options, from the context's builder.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PoolConfig {
    pub(crate) min: usize,
    pub(crate) max: usize,
    pub(crate) idle_timeout: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            min: 0,
            max: DEFAULT_MAX_THREADS,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
        }
    }
}

impl PoolShared {
    pub(crate) fn new(core: Arc<Core>, ctx: Weak<Inner>, config: PoolConfig) -> Arc<PoolShared> {
        let pool = Arc::new(PoolShared {
            core,
            ctx,
            state: Mutex::new(PoolState {
                queue: VecDeque::new(),
                threads: 0,
                idle: 0,
                min: config.min,
                max: config.max.max(1),
                idle_timeout: config.idle_timeout,
                stopping: false,
                workers: Vec::new(),
            }),
            work_ready: Condvar::new(),
        });
        let mut state = pool.state.lock();
        while state.threads < state.min {
            pool.spawn_worker(&mut state);
        }
        drop(state);
        pool
    }

    fn spawn_worker(self: &Arc<Self>, state: &mut PoolState) {
        let pool = Arc::clone(self);
        let spawned = thread::Builder::new()
            .name("aioctx-worker".into())
            .spawn(move || pool.worker());
        // Out of threads: the work waits for an existing worker.
        if let Ok(handle) = spawned {
            state.threads += 1;
            state.workers.retain(|w| !w.is_finished());
            state.workers.push(handle);
        }
    }

    fn worker(self: Arc<Self>) {
        let mut state = self.state.lock();
        loop {
            if state.stopping || state.threads > state.max {
                break;
            }
            let Some(req) = state.queue.pop_front() else {
                state.idle += 1;
                let timeout = state.idle_timeout;
                let timed_out = self.work_ready.wait_for(&mut state, timeout).timed_out();
                state.idle -= 1;
                if timed_out && state.queue.is_empty() && state.threads > state.min {
                    break;
                }
                continue;
            };
            drop(state);
            if let Some(job) = req.job.lock().as_mut() {
                job.run();
            }
            req.clone().finish(&self, false);
            state = self.state.lock();
        }
        state.threads -= 1;
    }

    fn submit(self: &Arc<Self>, job: Option<Box<dyn Job>>) -> Arc<Request> {
        let req = Arc::new(Request {
            job: Mutex::new(job),
            completion: Completion::new(),
            pool: Arc::downgrade(self),
        });
        let mut state = self.state.lock();
        if state.stopping {
            // The context is gone: nothing will ever poll a completion.
            drop(state);
            drop(req.job.lock().take());
            req.completion.complete();
            return req;
        }
        state.queue.push_back(Arc::clone(&req));
        if state.idle < state.queue.len() && state.threads < state.max {
            self.spawn_worker(&mut state);
        }
        drop(state);
        self.work_ready.notify_one();
        req
    }

    /// Steals `req` from the queue if no worker has taken it yet.
    fn cancel(&self, req: &Arc<Request>) {
        let mut state = self.state.lock();
        let Some(i) = state.queue.iter().position(|r| Arc::ptr_eq(r, req)) else {
            // Running, done, or cancelled already.
            return;
        };
        state.queue.remove(i);
        drop(state);
        Arc::clone(req).finish(self, true);
    }

    fn set_limits(self: &Arc<Self>, min: Option<usize>, max: Option<usize>) {
        let mut state = self.state.lock();
        if let Some(max) = max {
            state.max = max.max(1);
        }
        if let Some(min) = min {
            state.min = min;
        }
        state.min = state.min.min(state.max);
        while state.threads < state.min {
            self.spawn_worker(&mut state);
        }
        drop(state);
        // Workers above the new maximum, or idle above the new minimum, re-check and exit.
        self.work_ready.notify_all();
    }

    /// Stops and joins every worker (QEMU's `thread_pool_free`). Queued work is dropped; running
    /// work finishes first.
    pub(crate) fn shutdown(&self) {
        let (workers, queued) = {
            let mut state = self.state.lock();
            state.stopping = true;
            (
                std::mem::take(&mut state.workers),
                std::mem::take(&mut state.queue),
            )
        };
        self.work_ready.notify_all();
        for req in &queued {
            drop(req.job.lock().take());
            req.completion.complete();
        }
        let me = thread::current().id();
        for worker in workers {
            // The last handle may be dropped by work running on a worker: it cannot join itself.
            if worker.thread().id() != me {
                let _ = worker.join();
            }
        }
    }
}

struct PoolAioCb {
    req: Arc<Request>,
}

impl AioCbOps for PoolAioCb {
    fn cancel_async(&self) {
        if let Some(pool) = self.req.pool.upgrade() {
            pool.cancel(&self.req);
        }
    }

    fn context(&self) -> Option<AioContext> {
        let pool = self.req.pool.upgrade()?;
        pool.ctx.upgrade().map(|inner| AioContext { inner })
    }

    fn completion(&self) -> &Completion {
        &self.req.completion
    }
}

/// A context's worker pool (QEMU's `ThreadPool`, from [`AioContext::thread_pool`]).
///
/// Blocking work (file I/O, compression, anything slow) runs on worker threads; completions run
/// back on the context's thread during its poll. Workers start lazily, up to the maximum (64 by
/// default); a worker idle for 10 s exits unless the pool is at its minimum (0 by default).
/// Dropping the context joins every worker.
///
/// ```
/// # fn main() -> std::io::Result<()> {
/// use std::sync::{Arc, Mutex};
///
/// let ctx = aioctx::AioContext::new()?;
/// let result = Arc::new(Mutex::new(None));
/// let r = result.clone();
/// ctx.thread_pool().submit_aio(|| 6 * 7, move |v| *r.lock().unwrap() = Some(v));
/// while result.lock().unwrap().is_none() {
///     ctx.poll(true);
/// }
/// assert_eq!(*result.lock().unwrap(), Some(Ok(42)));
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct ThreadPool {
    pub(crate) shared: Arc<PoolShared>,
}

impl ThreadPool {
    /// Runs `work` on a worker and forgets it (QEMU's `thread_pool_submit`).
    pub fn submit<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) {
        let job = TypedJob {
            work: Some(work),
            result: None,
            done: |_: Result<T, Canceled>| {},
        };
        let job: Box<dyn Job> = Box::new(job);
        // Fire-and-forget work still goes through the completion so a panic in it surfaces.
        self.shared.submit(Some(job));
    }

    /// Runs `work` on a worker, then `done` with its result on the context's thread during a
    /// poll (QEMU's `thread_pool_submit_aio`). `done` runs exactly once, never inside this call:
    /// with `Err(Canceled)` if the request was cancelled before a worker took it.
    ///
    /// If `work` panics, the panic resurfaces out of the context's `poll` instead of `done`.
    pub fn submit_aio<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
        done: impl FnOnce(Result<T, Canceled>) + Send + 'static,
    ) -> AioCb {
        let job = TypedJob {
            work: Some(work),
            result: None,
            done,
        };
        let req = self.shared.submit(Some(Box::new(job)));
        AioCb::new(Arc::new(PoolAioCb { req }))
    }

    /// Runs `work` on a worker; the future resolves to its result (QEMU's
    /// `thread_pool_submit_co`). Dropping the future before it resolves cancels work that has not
    /// started.
    pub fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> RunFuture<T> {
        let slot: Arc<Mutex<RunSlot<T>>> = Arc::new(Mutex::new(RunSlot {
            result: None,
            waker: None,
        }));
        let s = Arc::clone(&slot);
        let aiocb = self.submit_aio(work, move |r| {
            let waker = {
                let mut slot = s.lock();
                slot.result = Some(r);
                slot.waker.take()
            };
            if let Some(w) = waker {
                w.wake();
            }
        });
        RunFuture { slot, aiocb }
    }

    /// Changes the pool's size at run time (QEMU's `aio_context_set_thread_pool_params`):
    /// workers are spawned up to `min`, and workers above `max` exit once their current item is
    /// done. `max` is at least 1; `min` is clamped to `max`.
    pub fn set_limits(&self, min: usize, max: usize) {
        self.shared.set_limits(Some(min), Some(max));
    }

    /// The current number of worker threads.
    pub fn threads(&self) -> usize {
        self.shared.state.lock().threads
    }

    /// Requests queued and not yet taken by a worker.
    pub fn queued(&self) -> usize {
        self.shared.state.lock().queue.len()
    }
}

impl std::fmt::Debug for ThreadPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.shared.state.lock();
        f.debug_struct("ThreadPool")
            .field("threads", &state.threads)
            .field("min", &state.min)
            .field("max", &state.max)
            .field("queued", &state.queue.len())
            .finish()
    }
}

struct RunSlot<T> {
    result: Option<Result<T, Canceled>>,
    waker: Option<Waker>,
}

/// The future of [`ThreadPool::run`].
pub struct RunFuture<T> {
    slot: Arc<Mutex<RunSlot<T>>>,
    aiocb: AioCb,
}

impl<T> Future for RunFuture<T> {
    type Output = T;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let mut slot = self.slot.lock();
        match slot.result.take() {
            Some(Ok(value)) => Poll::Ready(value),
            // Only dropping this future cancels the request, and then nobody polls it.
            Some(Err(Canceled)) => unreachable!("a pool request was cancelled under its future"),
            None => {
                slot.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

impl<T> Drop for RunFuture<T> {
    fn drop(&mut self) {
        if !self.aiocb.is_done() {
            self.aiocb.cancel_async();
        }
    }
}

impl<T> std::fmt::Debug for RunFuture<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunFuture")
            .field("done", &self.aiocb.is_done())
            .finish()
    }
}
