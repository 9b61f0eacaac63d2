//! The floor: the smallest event loop that can run work posted from another
//! thread, written directly on eventfd(2) and epoll(7).
//!
//! It has no timers, no fd handlers, no priorities: a mutex-protected queue of
//! boxed closures plus an eventfd. A poster writes the eventfd only when it
//! finds the queue empty (the loop reads the eventfd *before* taking the queue,
//! so a non-empty queue always has a wake-up on its way). For workload 3 it also
//! offers a coalesced "ping": an atomic flag whose false -> true transition is
//! the only thing that writes the eventfd.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// A unit of work posted to the floor loop.
pub type Job = Box<dyn FnOnce() + Send + 'static>;

struct Shared {
    epfd: OwnedFd,
    efd: OwnedFd,
    queue: Mutex<Vec<Job>>,
    /// Set by [`FloorHandle::ping`], cleared by the loop before it calls the
    /// ping callback.
    pinged: AtomicBool,
    stop: AtomicBool,
}

/// A cloneable, thread-safe handle that posts work to a [`FloorLoop`].
#[derive(Clone)]
pub struct FloorHandle(Arc<Shared>);

/// A raw eventfd + epoll loop running on its own thread.
pub struct FloorLoop {
    handle: FloorHandle,
    thread: Option<JoinHandle<()>>,
}

fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

impl FloorLoop {
    /// Starts the loop thread. `on_ping` runs on the loop thread after one or
    /// more [`FloorHandle::ping`] calls.
    pub fn start(mut on_ping: impl FnMut() + Send + 'static) -> io::Result<FloorLoop> {
        // SAFETY: plain syscalls with valid flags; the returned descriptors are
        // checked and then owned by exactly one OwnedFd each.
        let (epfd, efd) = unsafe {
            let epfd = OwnedFd::from_raw_fd(cvt(libc::epoll_create1(libc::EPOLL_CLOEXEC))?);
            let efd = OwnedFd::from_raw_fd(cvt(libc::eventfd(
                0,
                libc::EFD_CLOEXEC | libc::EFD_NONBLOCK,
            ))?);
            (epfd, efd)
        };
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: 0,
        };
        // SAFETY: both descriptors are open and `ev` is a valid epoll_event.
        cvt(unsafe {
            libc::epoll_ctl(
                epfd.as_raw_fd(),
                libc::EPOLL_CTL_ADD,
                efd.as_raw_fd(),
                &mut ev,
            )
        })?;
        let shared = Arc::new(Shared {
            epfd,
            efd,
            queue: Mutex::new(Vec::new()),
            pinged: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("floor-loop".into())
            .spawn(move || run(&s, &mut on_ping))?;
        Ok(FloorLoop {
            handle: FloorHandle(shared),
            thread: Some(thread),
        })
    }

    /// A handle to post work with.
    pub fn handle(&self) -> FloorHandle {
        self.handle.clone()
    }
}

impl Drop for FloorLoop {
    fn drop(&mut self) {
        self.handle.0.stop.store(true, Ordering::SeqCst);
        self.handle.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(s: &Shared, on_ping: &mut dyn FnMut()) {
    let mut events = [libc::epoll_event { events: 0, u64: 0 }; 8];
    let mut batch = Vec::new();
    while !s.stop.load(Ordering::SeqCst) {
        // SAFETY: `events` is a valid buffer of `events.len()` entries and
        // epfd stays open for as long as `s` lives.
        let n = unsafe {
            libc::epoll_wait(
                s.epfd.as_raw_fd(),
                events.as_mut_ptr(),
                events.len() as libc::c_int,
                -1,
            )
        };
        if n <= 0 {
            continue; // EINTR
        }
        let mut buf = 0u64;
        // SAFETY: reads 8 bytes into `buf`, which is 8 bytes long; EAGAIN is fine.
        unsafe { libc::read(s.efd.as_raw_fd(), (&raw mut buf).cast(), 8) };
        std::mem::swap(&mut batch, &mut *s.queue.lock().unwrap());
        for job in batch.drain(..) {
            job();
        }
        if s.pinged.swap(false, Ordering::AcqRel) {
            on_ping();
        }
    }
}

impl FloorHandle {
    /// Posts `job` to run on the loop thread.
    pub fn post(&self, job: Job) {
        let was_empty = {
            let mut q = self.0.queue.lock().unwrap();
            q.push(job);
            q.len() == 1
        };
        if was_empty {
            self.wake();
        }
    }

    /// Requests one run of the loop's ping callback; pings made before the
    /// callback runs are coalesced into one run and one eventfd write.
    pub fn ping(&self) {
        if !self.0.pinged.swap(true, Ordering::AcqRel) {
            self.wake();
        }
    }

    fn wake(&self) {
        let one = 1u64;
        // SAFETY: writes 8 bytes from `one`, which is 8 bytes long, to an open
        // eventfd. It can only fail with EAGAIN at a counter of u64::MAX - 1,
        // which still leaves the eventfd readable, so the result is ignored.
        unsafe { libc::write(self.0.efd.as_raw_fd(), (&raw const one).cast(), 8) };
    }
}
