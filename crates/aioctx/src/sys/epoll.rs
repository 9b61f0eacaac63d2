//! The epoll(7) back end, the default on Linux.
//!
//! Waits use `epoll_pwait2` for nanosecond timeouts where the kernel has it (Linux 5.11+) and
//! fall back to `epoll_wait` with the timeout rounded up to whole milliseconds.

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

use super::eventfd::os_error;
use super::{Event, Interest, Poller, Readiness, SourceKind};

/// How many events one wait collects; more stay pending for the next wait (level-triggered).
const MAX_EVENTS: usize = 256;

pub(crate) struct Epoll {
    epfd: OwnedFd,
    /// Cleared the first time `epoll_pwait2` answers ENOSYS.
    has_pwait2: AtomicBool,
}

impl Epoll {
    pub(crate) fn new() -> io::Result<Epoll> {
        // SAFETY: epoll_create1 takes no pointers.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(os_error("epoll_create1"));
        }
        Ok(Epoll {
            // SAFETY: `fd` was just returned by epoll_create1 and is owned by nobody else.
            epfd: unsafe { OwnedFd::from_raw_fd(fd) },
            has_pwait2: AtomicBool::new(true),
        })
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, token: u64, interest: Interest) -> io::Result<()> {
        let mut flags = 0u32;
        if interest.read {
            flags |= (libc::EPOLLIN | libc::EPOLLRDHUP) as u32;
        }
        if interest.write {
            flags |= libc::EPOLLOUT as u32;
        }
        let mut ev = libc::epoll_event {
            events: flags,
            u64: token,
        };
        // SAFETY: `ev` is a valid epoll_event that outlives the call; the kernel copies it.
        let rc = unsafe { libc::epoll_ctl(self.epfd.as_raw_fd(), op, fd, &mut ev) };
        if rc < 0 {
            let name = match op {
                libc::EPOLL_CTL_ADD => "epoll_ctl(EPOLL_CTL_ADD)",
                libc::EPOLL_CTL_MOD => "epoll_ctl(EPOLL_CTL_MOD)",
                _ => "epoll_ctl(EPOLL_CTL_DEL)",
            };
            return Err(os_error(name));
        }
        Ok(())
    }

    fn raw_wait(&self, buf: &mut [MaybeUninit<libc::epoll_event>], timeout_ns: i64) -> libc::c_int {
        let epfd = self.epfd.as_raw_fd();
        let len = buf.len() as libc::c_int;
        if timeout_ns > 0 && self.has_pwait2.load(Ordering::Relaxed) {
            let ts = super::timeout_ns_to_timespec(timeout_ns);
            let ts_ptr = ts.as_ref().map_or(std::ptr::null(), |t| t as *const _);
            // SAFETY: `buf` is a valid writable array of `len` events; `ts_ptr` is null or points
            // to a timespec that outlives the call; a null sigmask means "do not change it".
            let n = unsafe {
                libc::epoll_pwait2(epfd, buf.as_mut_ptr().cast(), len, ts_ptr, std::ptr::null())
            };
            if n >= 0 || io::Error::last_os_error().raw_os_error() != Some(libc::ENOSYS) {
                return n;
            }
            self.has_pwait2.store(false, Ordering::Relaxed);
        }
        let ms = super::timeout_ns_to_ms(timeout_ns);
        // SAFETY: `buf` is a valid writable array of `len` events.
        unsafe { libc::epoll_wait(epfd, buf.as_mut_ptr().cast(), len, ms) }
    }
}

impl Poller for Epoll {
    fn add(&self, fd: RawFd, _kind: SourceKind, token: u64, interest: Interest) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, token, interest)
    }

    fn modify(&self, fd: RawFd, token: u64, interest: Interest) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_MOD, fd, token, interest)
    }

    fn delete(&self, fd: RawFd) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_DEL, fd, 0, Interest::default())
    }

    fn wait(&self, events: &mut Vec<Event>, timeout_ns: i64) -> io::Result<()> {
        // Uninitialised: zeroing 3 KiB on every wait showed up in profiles.
        let mut buf = [const { MaybeUninit::<libc::epoll_event>::uninit() }; MAX_EVENTS];
        let n = self.raw_wait(&mut buf, timeout_ns);
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                return Ok(());
            }
            return Err(super::eventfd::annotate(err, "epoll_wait"));
        }
        let read_mask = (libc::EPOLLIN | libc::EPOLLHUP | libc::EPOLLERR | libc::EPOLLRDHUP) as u32;
        let write_mask = (libc::EPOLLOUT | libc::EPOLLERR) as u32;
        events.extend(buf[..n as usize].iter().map(|ev| {
            // SAFETY: the kernel initialised the first `n` entries, and `n` is what it returned.
            let ev = unsafe { ev.assume_init_read() };
            let flags = ev.events;
            Event {
                token: ev.u64,
                readable: flags & read_mask != 0,
                writable: flags & write_mask != 0,
            }
        }));
        Ok(())
    }

    fn outer_fd(&self) -> RawFd {
        self.epfd.as_raw_fd()
    }

    fn readiness(&self) -> Readiness {
        Readiness::Syscall
    }
}
