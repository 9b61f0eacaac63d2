//! The Linux event notifier: an `eventfd(2)` counter (QEMU's `util/event_notifier-posix.c`).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// A non-blocking, close-on-exec eventfd.
#[derive(Debug)]
pub(crate) struct EventFd {
    fd: OwnedFd,
}

impl EventFd {
    pub(crate) fn new() -> io::Result<EventFd> {
        // SAFETY: eventfd takes no pointers; the flags are valid constants.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(os_error("eventfd"));
        }
        // SAFETY: `fd` was just returned by eventfd and is owned by nobody else.
        Ok(EventFd {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Adds one to the counter, making the descriptor readable.
    pub(crate) fn set(&self) -> io::Result<()> {
        let one: u64 = 1;
        loop {
            // SAFETY: writes 8 bytes from a live, properly aligned u64 to a descriptor we own.
            let n = unsafe {
                libc::write(
                    self.fd.as_raw_fd(),
                    (&one as *const u64).cast(),
                    std::mem::size_of::<u64>(),
                )
            };
            if n >= 0 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            match err.kind() {
                io::ErrorKind::Interrupted => continue,
                // The counter is saturated: it is readable already, which is all `set` promises.
                io::ErrorKind::WouldBlock => return Ok(()),
                _ => return Err(annotate(err, "write(eventfd)")),
            }
        }
    }

    /// Resets the counter; returns whether it was set.
    pub(crate) fn test_and_clear(&self) -> bool {
        let mut value: u64 = 0;
        loop {
            // SAFETY: reads 8 bytes into a live, properly aligned u64 from a descriptor we own.
            let n = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    (&mut value as *mut u64).cast(),
                    std::mem::size_of::<u64>(),
                )
            };
            if n >= 0 {
                return value != 0;
            }
            if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                // EAGAIN: nothing was pending.
                return false;
            }
        }
    }
}

impl AsRawFd for EventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// The last OS error, with the failing call named.
pub(crate) fn os_error(call: &str) -> io::Error {
    annotate(io::Error::last_os_error(), call)
}

pub(crate) fn annotate(err: io::Error, call: &str) -> io::Error {
    io::Error::new(err.kind(), format!("{call} failed: {err}"))
}

impl EventFd {
    pub(crate) fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}
