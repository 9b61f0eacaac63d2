//! Operating-system back ends.
//!
//! Everything that talks to the kernel about readiness lives below this module, behind the small
//! [`Poller`] trait, one file per back end (mio and polling are organised the same way). The rest
//! of the crate is platform independent: it registers descriptors with a token, waits with a
//! nanosecond timeout and gets back `(token, readiness)` pairs.
//!
//! This module is the only place that selects code with `cfg`: `unix` gets epoll and poll(2) with
//! eventfd notifiers, `windows` gets one back end over sockets and event objects
//! (`sys/windows.rs` explains its design).

use std::io;

#[cfg(unix)]
mod epoll;
#[cfg(unix)]
mod eventfd;
#[cfg(unix)]
mod poll;
#[cfg(unix)]
mod unix;
#[cfg(target_os = "linux")]
mod uring;

#[cfg(windows)]
mod win_event;
#[cfg(windows)]
mod windows;

#[cfg(unix)]
pub(crate) use eventfd::EventFd as RawNotifier;
#[cfg(unix)]
pub(crate) use unix::prepare_timed_wait;
#[cfg(windows)]
pub(crate) use win_event::WinEvent as RawNotifier;
#[cfg(windows)]
pub(crate) use windows::prepare_timed_wait;

/// The descriptor type `set_fd_handler` takes: a file descriptor on Unix, a socket on Windows.
#[cfg(unix)]
pub type RawFd = std::os::unix::io::RawFd;
/// The descriptor type `set_fd_handler` takes: a file descriptor on Unix, a socket on Windows.
#[cfg(windows)]
pub type RawFd = std::os::windows::io::RawSocket;

/// What a registration's descriptor is. On Unix both are plain descriptors; on Windows an
/// [`EventNotifier`](crate::EventNotifier) is an event object `HANDLE` (carried in a [`RawFd`])
/// that must be waited on, not a socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SourceKind {
    /// A descriptor given to `set_fd_handler`.
    Fd,
    /// An event notifier's kernel object.
    Notifier,
}

/// Which readiness a registration asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Interest {
    pub(crate) read: bool,
    pub(crate) write: bool,
}

impl Interest {
    pub(crate) fn is_empty(self) -> bool {
        !self.read && !self.write
    }
}

/// One readiness report from [`Poller::wait`].
///
/// `readable` covers input, hang-up and error (QEMU's `G_IO_IN | G_IO_HUP | G_IO_ERR`), so that a
/// read handler sees end-of-file and errors; `writable` covers output and error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Event {
    pub(crate) token: u64,
    pub(crate) readable: bool,
    pub(crate) writable: bool,
}

/// The internal back-end interface: a level-triggered readiness monitor (QEMU's `FDMonOps`).
///
/// Implementations are shared between threads: registration may happen from any thread while
/// one thread (the holder of the context lock) is inside [`Poller::wait`].
pub(crate) trait Poller: Send + Sync {
    /// Starts monitoring `fd`, which is a `kind`; events for it carry `token`.
    fn add(&self, fd: RawFd, kind: SourceKind, token: u64, interest: Interest) -> io::Result<()>;
    /// Starts monitoring the context's own wake-up notifier for reading. The context writes it
    /// only after a false-to-true swap of its `kicked` flag and drains it before clearing the
    /// flag, so no write ever lands between a report and the drain: a back end may watch it
    /// edge-triggered (io_uring's multishot poll) where a user descriptor needs a level check.
    fn add_wakeup(&self, fd: RawFd, token: u64) -> io::Result<()> {
        let read = Interest {
            read: true,
            write: false,
        };
        self.add(fd, SourceKind::Notifier, token, read)
    }
    /// Changes the interest or token of a monitored `fd`.
    fn modify(&self, fd: RawFd, token: u64, interest: Interest) -> io::Result<()>;
    /// Stops monitoring `fd`.
    fn delete(&self, fd: RawFd) -> io::Result<()>;
    /// Waits at most `timeout_ns` nanoseconds (-1: forever, 0: just look) and appends what is
    /// ready to `events`. It must never return before the timeout unless something is ready or a
    /// signal interrupted it; where the OS takes milliseconds the timeout is rounded up.
    fn wait(&self, events: &mut Vec<Event>, timeout_ns: i64) -> io::Result<()>;
    /// A descriptor that is readable whenever a wait would report something, for outer loops.
    #[cfg(unix)]
    fn outer_fd(&self) -> RawFd;

    /// How a busy-polling spin can see this back end's readiness (see [`Readiness`]).
    fn readiness(&self) -> Readiness {
        Readiness::Hidden
    }

    /// Without a system call: whether a wait with timeout 0 would report something now. Only
    /// meaningful when [`readiness`](Poller::readiness) is [`Readiness::Free`]; false otherwise.
    fn has_pending(&self) -> bool {
        false
    }

    /// Hands queued registration changes to the kernel, so that what the back end shows (to
    /// `has_pending`, or to an outer loop through `outer_fd`) is current. Back ends that apply
    /// changes at once have nothing to do.
    fn flush(&self) {}
}

/// How a busy-polling spin can learn whether a back end has something to report.
///
/// QEMU spins only while every handler has an `io_poll` callback, because its epoll and poll(2)
/// back ends cannot be asked without a wait. Here the spin makes that wait itself, with timeout
/// 0, so a spin also serves descriptors without `io_poll`, at one system call per round (and a
/// busy loop none extra: what the spin collects is the poll's wait). With io_uring the answer
/// is in the completion ring and costs nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
// The Windows back end keeps the default answer, `Hidden`: it has no zero-timeout probe for
// a spin to ask, so there only handlers with `io_poll` are spun on, as in QEMU.
#[cfg_attr(windows, allow(dead_code))]
pub(crate) enum Readiness {
    /// Only a blocking wait sees readiness: spin only while every handler has an `io_poll`.
    Hidden,
    /// A zero-timeout wait is the question: asked only while some handler lacks an `io_poll`.
    Syscall,
    /// [`Poller::has_pending`] sees readiness without a system call: asked on every round.
    Free,
}

/// The back ends a context can use.
///
/// `AIOCTX_BACKEND=epoll|io_uring|poll|windows` picks one for every context built without an explicit
/// choice. Every variant exists on every platform; building a context with one that this platform
/// lacks fails with [`io::ErrorKind::Unsupported`] (see [`Backend::available`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Backend {
    /// Linux epoll(7) (the default on Linux): cost per wait independent of the number of fds.
    Epoll,
    /// Portable poll(2): the whole descriptor set is passed to the kernel on every wait.
    Poll,
    /// Linux io_uring (5.11+): one-shot `POLL_ADD` requests re-armed after each completion
    /// (multishot for the context's own notifier), readiness visible in user space, so that
    /// busy-polling also covers handlers without `io_poll`. Where io_uring is missing or
    /// forbidden (seccomp, the `kernel.io_uring_disabled` sysctl), choosing it with
    /// [`Builder::backend`](crate::Builder::backend) fails; choosing it with `AIOCTX_BACKEND`
    /// falls back to epoll (and [`AioContext::backend`](crate::AioContext::backend) says so).
    IoUring,
    /// Windows (the only back end there): event objects waited on, sockets checked with
    /// `WSAPoll` and woken through `WSAEventSelect`; no limit of 64 handles or sockets.
    Windows,
}

impl Backend {
    /// The platform default.
    pub const fn platform_default() -> Backend {
        #[cfg(unix)]
        return Backend::Epoll;
        #[cfg(windows)]
        return Backend::Windows;
    }

    /// The back ends this platform has, the default first. io_uring is listed on Linux, where the
    /// kernel may still refuse it at run time.
    pub const fn available() -> &'static [Backend] {
        #[cfg(target_os = "linux")]
        return &[Backend::Epoll, Backend::IoUring, Backend::Poll];
        #[cfg(all(unix, not(target_os = "linux")))]
        return &[Backend::Epoll, Backend::Poll];
        #[cfg(windows)]
        return &[Backend::Windows];
    }

    /// The back end named `name` (`"epoll"`, `"io_uring"`, `"poll"` or `"windows"`),
    /// case-insensitively.
    /// Naming one this platform lacks is not an error here, but building a context with it is.
    pub fn from_name(name: &str) -> io::Result<Backend> {
        match name.trim().to_ascii_lowercase().as_str() {
            "epoll" => Ok(Backend::Epoll),
            "io_uring" | "io-uring" | "iouring" => Ok(Backend::IoUring),
            "poll" => Ok(Backend::Poll),
            "windows" => Ok(Backend::Windows),
            other => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "unknown aioctx backend {other:?}: expected \"epoll\", \"io_uring\", \"poll\" or \"windows\""
                ),
            )),
        }
    }

    /// The name `from_name` accepts.
    pub const fn name(self) -> &'static str {
        match self {
            Backend::Epoll => "epoll",
            Backend::Poll => "poll",
            Backend::IoUring => "io_uring",
            Backend::Windows => "windows",
        }
    }
}

/// Builds the back end `kind`.
pub(crate) fn new_poller(kind: Backend) -> io::Result<Box<dyn Poller>> {
    match kind {
        #[cfg(unix)]
        Backend::Epoll => Ok(Box::new(epoll::Epoll::new()?)),
        #[cfg(unix)]
        Backend::Poll => Ok(Box::new(poll::Poll::new()?)),
        #[cfg(target_os = "linux")]
        Backend::IoUring => Ok(Box::new(uring::IoUringPoller::new()?)),
        #[cfg(windows)]
        Backend::Windows => Ok(Box::new(windows::Win32Poller::new()?)),
        other => Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!(
                "aioctx backend {:?} is not available on this platform (available: {:?})",
                other.name(),
                Backend::available()
            ),
        )),
    }
}

/// Builds `backend`, or, when io_uring was not chosen `explicitly` (it came from
/// `AIOCTX_BACKEND`) and the kernel refuses it, epoll. Returns the back end built.
pub(crate) fn open(backend: Backend, explicitly: bool) -> io::Result<(Backend, Box<dyn Poller>)> {
    open_with(backend, explicitly, new_poller)
}

fn open_with(
    backend: Backend,
    explicitly: bool,
    build: impl Fn(Backend) -> io::Result<Box<dyn Poller>>,
) -> io::Result<(Backend, Box<dyn Poller>)> {
    match build(backend) {
        Ok(poller) => Ok((backend, poller)),
        Err(err) if backend == Backend::IoUring && !explicitly => {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                eprintln!("aioctx: AIOCTX_BACKEND=io_uring: {err}; using epoll instead");
            });
            Ok((Backend::Epoll, build(Backend::Epoll)?))
        }
        Err(err) => Err(err),
    }
}

/// Converts a nanosecond timeout to milliseconds for APIs that take them, rounding up so that a
/// wait never ends before its deadline (QEMU's `qemu_timeout_ns_to_ms`). -1 stays infinite.
pub(crate) fn timeout_ns_to_ms(ns: i64) -> i32 {
    if ns < 0 {
        -1
    } else {
        let ms = (ns as u64).div_ceil(1_000_000);
        ms.min(i32::MAX as u64) as i32
    }
}

/// Converts a nanosecond timeout to a `timespec` (`None` for infinite).
#[cfg(unix)]
pub(crate) fn timeout_ns_to_timespec(ns: i64) -> Option<libc::timespec> {
    (ns >= 0).then_some(libc::timespec {
        tv_sec: (ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (ns % 1_000_000_000) as libc::c_long,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ms_conversion_rounds_up() {
        assert_eq!(timeout_ns_to_ms(-1), -1);
        assert_eq!(timeout_ns_to_ms(0), 0);
        assert_eq!(timeout_ns_to_ms(1), 1);
        assert_eq!(timeout_ns_to_ms(1_000_000), 1);
        assert_eq!(timeout_ns_to_ms(1_000_001), 2);
        assert_eq!(timeout_ns_to_ms(i64::MAX), i32::MAX);
    }

    #[test]
    fn backend_names() {
        assert_eq!(Backend::from_name("EPOLL").unwrap(), Backend::Epoll);
        assert_eq!(Backend::from_name("poll").unwrap(), Backend::Poll);
        assert_eq!(Backend::from_name("io_uring").unwrap(), Backend::IoUring);
        assert_eq!(Backend::from_name("IO-URING").unwrap(), Backend::IoUring);
        assert_eq!(Backend::IoUring.name(), "io_uring");
        assert_eq!(Backend::from_name(" Windows").unwrap(), Backend::Windows);
        let err = Backend::from_name("kqueue").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(err.to_string().contains("kqueue"));
    }

    struct Dummy;
    impl Poller for Dummy {
        fn add(&self, _: RawFd, _: SourceKind, _: u64, _: Interest) -> io::Result<()> {
            Ok(())
        }
        fn modify(&self, _: RawFd, _: u64, _: Interest) -> io::Result<()> {
            Ok(())
        }
        fn delete(&self, _: RawFd) -> io::Result<()> {
            Ok(())
        }
        fn wait(&self, _: &mut Vec<Event>, _: i64) -> io::Result<()> {
            Ok(())
        }
        #[cfg(unix)]
        fn outer_fd(&self) -> RawFd {
            -1
        }
    }

    /// A kernel that refuses io_uring (as `kernel.io_uring_disabled=2` or seccomp do).
    fn refusing_io_uring(b: Backend) -> io::Result<Box<dyn Poller>> {
        match b {
            Backend::IoUring => Err(io::Error::from(io::ErrorKind::PermissionDenied)),
            _ => Ok(Box::new(Dummy)),
        }
    }

    #[test]
    fn io_uring_falls_back_to_epoll_only_when_chosen_implicitly() {
        let (b, _) = open_with(Backend::IoUring, false, refusing_io_uring).unwrap();
        assert_eq!(b, Backend::Epoll);
        let err = open_with(Backend::IoUring, true, refusing_io_uring)
            .err()
            .expect("an explicit choice fails");
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
        let (b, _) = open_with(Backend::Poll, false, refusing_io_uring).unwrap();
        assert_eq!(b, Backend::Poll);
    }

    #[test]
    fn only_this_platforms_backends_build() {
        let available = Backend::available();
        assert_eq!(available[0], Backend::platform_default());
        for b in [
            Backend::Epoll,
            Backend::Poll,
            Backend::Windows,
            Backend::IoUring,
        ] {
            match new_poller(b) {
                Ok(_) => assert!(available.contains(&b), "{b:?} built"),
                Err(e) if b == Backend::IoUring && available.contains(&b) => {
                    eprintln!("SKIPPED: io_uring is listed but refused by this kernel: {e}");
                }
                Err(e) => {
                    assert!(!available.contains(&b), "{b:?}: {e}");
                    assert_eq!(e.kind(), io::ErrorKind::Unsupported);
                    assert!(e.to_string().contains(b.name()), "{e}");
                }
            }
        }
    }
}
