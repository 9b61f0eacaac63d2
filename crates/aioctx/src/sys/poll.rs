//! The portable poll(2) back end.
//!
//! The descriptor set lives in a vector that is copied for each wait, so registration from other
//! threads never races with the kernel reading it; a registration made during a wait takes effect
//! at the next wait (the context notifies itself after every registration, so that wait ends).
//! Waits use `ppoll` for nanosecond timeouts.
//!
//! poll(2) has no descriptor that becomes readable when the set is ready, which outer loops need
//! (`AsRawFd for AioContext`), so the set is mirrored into an epoll instance used only for that.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, RawFd};

use parking_lot::Mutex;

use super::epoll::Epoll;
use super::{Event, Interest, Poller, Readiness, SourceKind};

#[derive(Default)]
struct PollSet {
    fds: Vec<libc::pollfd>,
    tokens: Vec<u64>,
    index: HashMap<RawFd, usize>,
}

pub(crate) struct Poll {
    set: Mutex<PollSet>,
    mirror: Epoll,
}

fn poll_events(interest: Interest) -> libc::c_short {
    let mut events = 0;
    if interest.read {
        events |= libc::POLLIN;
    }
    if interest.write {
        events |= libc::POLLOUT;
    }
    events
}

impl Poll {
    pub(crate) fn new() -> io::Result<Poll> {
        Ok(Poll {
            set: Mutex::new(PollSet::default()),
            mirror: Epoll::new()?,
        })
    }
}

impl Poller for Poll {
    fn add(&self, fd: RawFd, kind: SourceKind, token: u64, interest: Interest) -> io::Result<()> {
        let mut set = self.set.lock();
        if set.index.contains_key(&fd) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("poll backend: fd {fd} is already registered"),
            ));
        }
        // The mirror only serves outer loops; a descriptor epoll refuses (a regular file) can
        // still be polled here.
        let _ = self.mirror.add(fd, kind, token, interest);
        let i = set.fds.len();
        set.fds.push(libc::pollfd {
            fd,
            events: poll_events(interest),
            revents: 0,
        });
        set.tokens.push(token);
        set.index.insert(fd, i);
        Ok(())
    }

    fn modify(&self, fd: RawFd, token: u64, interest: Interest) -> io::Result<()> {
        let mut set = self.set.lock();
        let Some(&i) = set.index.get(&fd) else {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("poll backend: fd {fd} is not registered"),
            ));
        };
        let _ = self.mirror.modify(fd, token, interest);
        set.fds[i].events = poll_events(interest);
        set.tokens[i] = token;
        Ok(())
    }

    fn delete(&self, fd: RawFd) -> io::Result<()> {
        let mut set = self.set.lock();
        let Some(i) = set.index.remove(&fd) else {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("poll backend: fd {fd} is not registered"),
            ));
        };
        let _ = self.mirror.delete(fd);
        set.fds.swap_remove(i);
        set.tokens.swap_remove(i);
        if let Some(moved) = set.fds.get(i).map(|p| p.fd) {
            set.index.insert(moved, i);
        }
        Ok(())
    }

    fn wait(&self, events: &mut Vec<Event>, timeout_ns: i64) -> io::Result<()> {
        let (mut fds, tokens) = {
            let set = self.set.lock();
            (set.fds.clone(), set.tokens.clone())
        };
        let ts = super::timeout_ns_to_timespec(timeout_ns);
        let ts_ptr = ts.as_ref().map_or(std::ptr::null(), |t| t as *const _);
        // SAFETY: `fds` is a valid writable array of `fds.len()` pollfds; `ts_ptr` is null or
        // points to a timespec that outlives the call; a null sigmask leaves the mask unchanged.
        let n = unsafe {
            libc::ppoll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                ts_ptr,
                std::ptr::null(),
            )
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                return Ok(());
            }
            return Err(super::eventfd::annotate(err, "ppoll"));
        }
        if n == 0 {
            return Ok(());
        }
        // A closed descriptor (POLLNVAL) is reported as an error to its read and write handlers,
        // whose next system call on it then fails with EBADF, rather than spinning silently.
        let read_mask = libc::POLLIN | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL;
        let write_mask = libc::POLLOUT | libc::POLLERR | libc::POLLNVAL;
        events.extend(
            fds.iter()
                .zip(tokens)
                .filter(|(p, _)| p.revents != 0)
                .map(|(p, token)| Event {
                    token,
                    readable: p.revents & read_mask != 0,
                    writable: p.revents & write_mask != 0,
                }),
        );
        Ok(())
    }

    fn outer_fd(&self) -> RawFd {
        self.mirror.as_raw_fd()
    }

    fn readiness(&self) -> Readiness {
        Readiness::Syscall
    }
}

impl AsRawFd for Epoll {
    fn as_raw_fd(&self) -> RawFd {
        self.outer_fd()
    }
}
