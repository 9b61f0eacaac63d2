//! Helpers shared by the integration tests.
//!
//! Each test binary includes this module with `mod common;` and uses only part of it.
#![allow(dead_code)]

pub mod net;

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aioctx::{AioContext, Backend, Bh, Handler, Timer};

/// How long one test may run before the watchdog declares it hung.
pub const WATCHDOG: Duration = Duration::from_secs(30);

/// Aborts the whole process if it is still alive after its time limit, so that a hang fails the
/// run with a message instead of stalling CI. Dropping it (normally or while unwinding) disarms
/// it.
pub struct Watchdog {
    _disarm: mpsc::Sender<()>,
}

/// Arms a [`Watchdog`] for the calling test with the default limit.
pub fn watchdog(name: &str) -> Watchdog {
    watchdog_for(name, WATCHDOG)
}

/// Arms a [`Watchdog`] with a custom limit.
pub fn watchdog_for(name: &str, limit: Duration) -> Watchdog {
    let (tx, rx) = mpsc::channel::<()>();
    let name = name.to_owned();
    std::thread::Builder::new()
        .name(format!("watchdog {name}"))
        .spawn(move || {
            if let Err(RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
                // Straight to fd 2: eprintln! would go to the test harness's capture buffer,
                // which an abort never prints.
                let msg = format!(
                    "\n*** WATCHDOG: test `{name}` still running after {limit:?}: it hangs; aborting ***\n"
                );
                let _ = std::io::stderr().write_all(msg.as_bytes());
                std::process::abort();
            }
        })
        .expect("spawn watchdog");
    Watchdog { _disarm: tx }
}

/// A context with the back end `AIOCTX_BACKEND` selects.
pub fn ctx() -> AioContext {
    AioContext::new().expect("AioContext::new")
}

/// One context per back end, for the few tests that check both explicitly.
pub fn both_backends() -> Vec<AioContext> {
    [Backend::Epoll, Backend::Poll]
        .into_iter()
        .map(|b| {
            AioContext::builder()
                .backend(b)
                .build()
                .expect("build context")
        })
        .collect()
}

/// A shared counter that callbacks bump.
#[derive(Clone, Default)]
pub struct Counter(pub Arc<AtomicUsize>);

impl Counter {
    pub fn new() -> Counter {
        Counter::default()
    }
    pub fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
    pub fn hit(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
    pub fn set(&self, v: usize) {
        self.0.store(v, Ordering::SeqCst);
    }
    /// A callback that bumps the counter.
    pub fn cb(&self) -> impl FnMut() + Send + 'static {
        let c = self.clone();
        move || c.hit()
    }
    /// A boxed handler that bumps the counter.
    pub fn handler(&self) -> Option<Handler> {
        Some(Box::new(self.cb()))
    }
}

/// Boxes a closure as an fd handler.
pub fn handler(f: impl FnMut() + Send + 'static) -> Option<Handler> {
    Some(Box::new(f))
}

/// Polls without blocking until a poll makes no progress; returns how many made progress.
/// Bounded, so a callback that keeps rescheduling itself fails the test instead of spinning.
pub fn drain(ctx: &AioContext) -> usize {
    let mut n = 0;
    while ctx.poll(false) {
        n += 1;
        assert!(n < 100_000, "drain: the context never went idle");
    }
    n
}

/// Blocking polls until `cond` holds; returns the number of polls.
pub fn poll_until(ctx: &AioContext, mut cond: impl FnMut() -> bool) -> usize {
    let mut n = 0;
    while !cond() {
        ctx.poll(true);
        n += 1;
    }
    n
}

/// A slot holding a BH whose callback can reach its own handle (to reschedule or delete itself).
pub type BhSlot = Arc<Mutex<Option<Bh>>>;

/// Creates a BH whose callback gets its own slot; taking the `Bh` out of the slot and dropping it
/// deletes the BH from inside its callback.
pub fn self_bh(ctx: &AioContext, mut f: impl FnMut(&BhSlot) + Send + 'static) -> BhSlot {
    let slot: BhSlot = Arc::new(Mutex::new(None));
    let s = slot.clone();
    let bh = ctx.bh_new(move || f(&s));
    *slot.lock().unwrap() = Some(bh);
    slot
}

/// Schedules the BH in `slot`, if it is still there.
pub fn schedule_slot(slot: &BhSlot) {
    if let Some(bh) = slot.lock().unwrap().as_ref() {
        bh.schedule();
    }
}

/// A slot holding a timer whose callback can reach its own handle.
pub type TimerSlot = Arc<Mutex<Option<Timer>>>;

/// Creates a timer whose callback gets its own slot.
pub fn self_timer(
    ctx: &AioContext,
    clock: aioctx::ClockType,
    scale: i64,
    mut f: impl FnMut(&TimerSlot) + Send + 'static,
) -> TimerSlot {
    let slot: TimerSlot = Arc::new(Mutex::new(None));
    let s = slot.clone();
    let t = ctx.timer_new(clock, scale, move || f(&s));
    *slot.lock().unwrap() = Some(t);
    slot
}

/// A non-blocking, close-on-exec pipe: (read end, write end).
pub fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
    assert_eq!(rc, 0, "pipe2: {}", io::Error::last_os_error());
    // SAFETY: pipe2 returned two fresh descriptors that nobody else owns.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// Writes `data` to a raw descriptor; returns the bytes written (or the error).
pub fn write_fd(fd: RawFd, data: &[u8]) -> io::Result<usize> {
    // SAFETY: `data` is a valid readable buffer of `data.len()` bytes.
    let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Reads into `buf` from a raw descriptor; returns the bytes read (or the error).
pub fn read_fd(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a valid writable buffer of `buf.len()` bytes.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Reads everything currently in a non-blocking descriptor; returns the byte count.
pub fn drain_fd(fd: RawFd) -> usize {
    let mut buf = [0u8; 4096];
    let mut total = 0;
    loop {
        match read_fd(fd, &mut buf) {
            Ok(0) => return total,
            Ok(n) => total += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return total,
            Err(e) => panic!("read: {e}"),
        }
    }
}

/// A connected pair of non-blocking Unix stream sockets.
pub fn socketpair() -> (
    std::os::unix::net::UnixStream,
    std::os::unix::net::UnixStream,
) {
    let (a, b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    a.set_nonblocking(true).unwrap();
    b.set_nonblocking(true).unwrap();
    (a, b)
}

/// Fills a non-blocking socket's send buffer until it would block; returns the bytes written.
pub fn fill_socket(s: &mut std::os::unix::net::UnixStream) -> usize {
    let chunk = [0x5au8; 65536];
    let mut total = 0;
    loop {
        match s.write(&chunk) {
            Ok(n) => total += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return total,
            Err(e) => panic!("write: {e}"),
        }
    }
}

/// Reads a non-blocking socket until it would block; returns the bytes read.
pub fn drain_socket(s: &mut std::os::unix::net::UnixStream) -> usize {
    let mut buf = [0u8; 65536];
    let mut total = 0;
    loop {
        match s.read(&mut buf) {
            Ok(0) => return total,
            Ok(n) => total += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return total,
            Err(e) => panic!("read: {e}"),
        }
    }
}

/// Whether `fd` is readable right now (a zero-timeout poll(2)).
pub fn is_readable(fd: &impl AsRawFd) -> bool {
    wait_readable(fd, 0)
}

/// Waits up to `timeout_ms` (-1: forever) for `fd` to become readable.
pub fn wait_readable(fd: &impl AsRawFd, timeout_ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: `p` is one valid pollfd.
        let n = unsafe { libc::poll(&mut p, 1, timeout_ms) };
        if n >= 0 {
            return n == 1 && p.revents & libc::POLLIN != 0;
        }
        let err = io::Error::last_os_error();
        assert_eq!(err.kind(), io::ErrorKind::Interrupted, "poll: {err}");
    }
}

/// The number of open descriptors of this process.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .count()
}

/// Waits (without busy-burning the CPU) until the clock has passed `ns`. This is not
/// synchronisation with another thread: the condition is the clock itself.
pub fn wait_clock_past(clock: aioctx::ClockType, ns: i64) {
    loop {
        let now = aioctx::clock_get_ns(clock);
        if now > ns {
            return;
        }
        std::thread::sleep(Duration::from_nanos((ns - now + 1) as u64));
    }
}

/// Silences the default panic message for panics the tests provoke on purpose (the payload
/// starts with "intentional"); other panics still print.
pub fn quiet_intentional_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let msg = info
                .payload()
                .downcast_ref::<&str>()
                .copied()
                .or_else(|| info.payload().downcast_ref::<String>().map(|s| s.as_str()));
            if !msg.is_some_and(|m| m.starts_with("intentional")) {
                default(info);
            }
        }));
    });
}

/// The calling thread's kernel id.
pub fn gettid() -> i32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() }
}

/// Waits until thread `tid` of this process is blocked in the kernel (state `S` in /proc),
/// e.g. parked on a lock; returns false if the thread has exited instead. Used to order
/// threads without sleeping for a guessed time.
pub fn wait_until_thread_blocked(tid: i32) -> bool {
    let path = format!("/proc/self/task/{tid}/stat");
    loop {
        let Ok(stat) = std::fs::read_to_string(&path) else {
            return false;
        };
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .expect("state field");
        // Only interruptible sleep: a short uninterruptible one (`D`, e.g. a page fault) may
        // happen before the thread reached the lock.
        if state == 'S' {
            return true;
        }
        if state == 'Z' || state == 'X' {
            return false;
        }
        std::thread::yield_now();
    }
}
