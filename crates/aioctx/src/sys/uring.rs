//! The io_uring back end (Linux 5.11+; QEMU's `util/fdmon-io_uring.c`).
//!
//! Readiness comes from `IORING_OP_POLL_ADD` requests, one per registered descriptor; waits are
//! `io_uring_enter` with a relative timeout (`IORING_ENTER_EXT_ARG`: nanosecond precision).
//! Completions land in a ring shared with user space, so a busy-polling loop sees readiness
//! without a system call ([`Poller::has_pending`]) and a wait with timeout 0 and nothing to submit
//! costs none either.
//!
//! # Level-triggered, exactly
//!
//! A handler must run on every wait while its descriptor is ready, and never when it is not
//! (the tests assert both). Each user descriptor therefore gets a **one-shot** poll:
//!
//! * its completion is reported once and the poll is re-armed at the *next* submission, which
//!   happens at the start of the next wait (or [`flush`](Poller::flush)), after the handler ran;
//! * arming a poll checks readiness at once (`vfs_poll`), so a descriptor the handler did not
//!   drain completes again straight away and is reported by that wait: readiness that persists is
//!   never lost, and readiness the handler consumed is never reported.
//!
//! A **multishot** poll (`IORING_POLL_ADD_MULTI`, 5.13+) cannot give that for an arbitrary
//! descriptor: it posts a completion per wake-up, carrying the mask of that wake-up, so data that
//! arrives between our reading the completion and the handler draining it leaves a stale
//! completion behind (the handler would run on an empty descriptor), while data the handler
//! leaves behind posts nothing (readiness lost). It is exact for the context's own wake-up
//! eventfd ([`Poller::add_wakeup`]): the context writes it only when its `kicked` flag goes from
//! false to true, drains it before clearing `kicked`, and so never writes between a completion
//! and the drain. That descriptor, the hottest one (every cross-thread wake-up), uses a multishot
//! poll where the kernel has it (probed at start-up) and saves a re-arm per wake-up.
//!
//! # Threads
//!
//! Registration may happen on any thread while the loop's thread waits. Additions and changes
//! are queued and submitted by the next wait or flush, on the loop's thread; removals are
//! submitted at once (`IORING_OP_POLL_REMOVE`), so that the kernel drops its reference to the
//! file promptly (a closed socket's peer sees the close). A poll request is tied to the thread
//! that submitted it: if that thread exits, the kernel cancels the poll (`-ECANCELED`), and the
//! next wait re-arms it from the current thread. Nothing is lost: re-arming checks readiness.
//!
//! Completion user data is a registration id, never reused, so completions of a removed or
//! replaced registration are recognised and dropped. A removal's cancelled poll completes at
//! once when its thread removes it (the common case): `delete` reads that completion off the ring
//! straight away (keeping any readiness it finds for the next wait), so that an outer loop
//! watching the ring's descriptor is not woken for nothing.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, squeue, types, IoUring, Probe};
use parking_lot::Mutex;

use super::{Event, Interest, Poller, Readiness, SourceKind};

/// Submission queue entries; the completion queue gets twice as many (the kernel's default).
const RING_ENTRIES: u32 = 256;

/// User data of requests whose completions carry nothing for us (removals).
const IGNORED: u64 = 0;
/// User data of the start-up probe's poll; registrations start above it.
const PROBE_ID: u64 = 1;

struct Registration {
    fd: RawFd,
    token: u64,
    /// `poll(2)` events to ask for.
    events: u32,
    multishot: bool,
    /// A poll request for this id is in the kernel (submitted and not yet completed for good).
    armed: bool,
}

#[derive(Default)]
struct State {
    regs: HashMap<u64, Registration>,
    by_fd: HashMap<RawFd, u64>,
    /// Ids to arm at the next submission: new registrations, polls the kernel cancelled.
    to_arm: Vec<u64>,
    /// Ids with readiness not yet handed out by a wait.
    unreported: Vec<u64>,
    /// Ids whose readiness the last wait handed out: re-armed by the next wait, after the
    /// handlers ran (the level check).
    reported: Vec<u64>,
    /// Readiness read from the ring outside a wait, handed out by the next wait.
    ready: Vec<Event>,
    next_id: u64,
}

pub(crate) struct IoUringPoller {
    ring: IoUring,
    /// Registrations, and the right to write the submission queue.
    state: Mutex<State>,
    /// The right to read the completion queue.
    cq: Mutex<()>,
    /// The kernel supports multishot polls (probed).
    multishot: bool,
    /// The kernel supports `IOSQE_CQE_SKIP_SUCCESS`.
    skip_success: bool,
}

/// The events to ask `poll` for, like the epoll back end (`EPOLLRDHUP` with read interest).
fn poll_events(interest: Interest) -> u32 {
    let mut events = 0;
    if interest.read {
        events |= (libc::POLLIN | libc::POLLRDHUP) as u32;
    }
    if interest.write {
        events |= libc::POLLOUT as u32;
    }
    events
}

fn unsupported(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        format!("io_uring back end: the kernel lacks {what}"),
    )
}

impl IoUringPoller {
    /// Sets up a ring, or fails if io_uring is missing (`ENOSYS`), forbidden (`EPERM`: the
    /// `kernel.io_uring_disabled` sysctl, a seccomp filter) or too old (`Unsupported`).
    pub(crate) fn new() -> io::Result<IoUringPoller> {
        Self::with_multishot(true)
    }

    /// `multishot: false` forces one-shot polls everywhere (tests of the fallback path).
    pub(crate) fn with_multishot(multishot: bool) -> io::Result<IoUringPoller> {
        let ring = IoUring::new(RING_ENTRIES)
            .map_err(|e| super::eventfd::annotate(e, "io_uring_setup"))?;
        let params = ring.params();
        if !params.is_feature_ext_arg() {
            return Err(unsupported("IORING_FEAT_EXT_ARG (Linux 5.11)"));
        }
        if !params.is_feature_nodrop() {
            return Err(unsupported("IORING_FEAT_NODROP (Linux 5.5)"));
        }
        let mut probe = Probe::new();
        ring.submitter()
            .register_probe(&mut probe)
            .map_err(|e| super::eventfd::annotate(e, "io_uring_register(REGISTER_PROBE)"))?;
        for (code, name) in [
            (opcode::PollAdd::CODE, "IORING_OP_POLL_ADD"),
            (opcode::PollRemove::CODE, "IORING_OP_POLL_REMOVE"),
        ] {
            if !probe.is_supported(code) {
                return Err(unsupported(name));
            }
        }
        let mut poller = IoUringPoller {
            skip_success: params.is_feature_skip_cqe_on_success(),
            ring,
            state: Mutex::new(State {
                next_id: PROBE_ID + 1,
                ..State::default()
            }),
            cq: Mutex::new(()),
            multishot: false,
        };
        poller.multishot = multishot && poller.probe_multishot()?;
        Ok(poller)
    }

    /// Whether a multishot poll on a readable eventfd completes with `IORING_CQE_F_MORE` (kernels
    /// before 5.13 refuse the flag with `EINVAL`). Leaves the ring empty.
    fn probe_multishot(&self) -> io::Result<bool> {
        let efd = super::eventfd::EventFd::new()?;
        efd.set()?;
        let add = opcode::PollAdd::new(types::Fd(efd.as_raw_fd()), libc::POLLIN as u32)
            .multi(true)
            .build()
            .user_data(PROBE_ID);
        self.push(&add)?;
        self.ring.submitter().submit_and_wait(1)?;
        let (res, flags) = {
            let _cq = self.cq.lock();
            // SAFETY: the `cq` lock makes this the only completion queue handle.
            let mut cq = unsafe { self.ring.completion_shared() };
            let cqe = cq.next().ok_or_else(|| unsupported("a poll completion"))?;
            (cqe.result(), cqe.flags())
        };
        let supported = res > 0 && cqueue::more(flags);
        if supported {
            // Cancel it and wait for both completions (the poll's and the removal's).
            self.push(&opcode::PollRemove::new(PROBE_ID).build().user_data(IGNORED))?;
            self.ring.submitter().submit_and_wait(2)?;
            let _cq = self.cq.lock();
            // SAFETY: as above.
            unsafe { self.ring.completion_shared() }.for_each(drop);
        }
        Ok(supported)
    }

    /// Pushes one entry, submitting first if the queue is full. Holds the state lock, which
    /// owns the submission queue.
    fn push(&self, entry: &squeue::Entry) -> io::Result<()> {
        let _state = self.state.lock();
        self.push_locked(entry)
    }

    /// [`push`](Self::push) with the state lock already held.
    fn push_locked(&self, entry: &squeue::Entry) -> io::Result<()> {
        loop {
            {
                // SAFETY: the caller holds the state lock, so this is the only submission queue
                // handle; dropping it publishes the new tail to the kernel.
                let mut sq = unsafe { self.ring.submission_shared() };
                // SAFETY: the entry's only pointer-like field is a descriptor; the kernel reads
                // nothing from our memory for POLL_ADD or POLL_REMOVE.
                if unsafe { sq.push(entry) }.is_ok() {
                    return Ok(());
                }
            }
            // Full: hand the queue to the kernel and retry.
            self.ring.submitter().submit()?;
        }
    }

    /// Queues the arms that are due: new and cancelled registrations, and the polls whose
    /// readiness an earlier wait handed out (whoever calls this, a wait or a flush, comes after
    /// the handlers of that wait ran). State lock held.
    fn queue_pending(&self, state: &mut State) -> io::Result<()> {
        let reported = std::mem::take(&mut state.reported);
        state.to_arm.extend(reported);
        let to_arm = std::mem::take(&mut state.to_arm);
        for id in to_arm {
            let Some(reg) = state.regs.get_mut(&id) else {
                continue; // removed meanwhile
            };
            if reg.armed {
                continue;
            }
            reg.armed = true;
            let entry = opcode::PollAdd::new(types::Fd(reg.fd), reg.events)
                .multi(reg.multishot)
                .build()
                .user_data(id);
            self.push_locked(&entry)?;
        }
        Ok(())
    }

    fn remove_entry(&self, id: u64) -> squeue::Entry {
        let entry = opcode::PollRemove::new(id).build().user_data(IGNORED);
        if self.skip_success {
            entry.flags(squeue::Flags::SKIP_SUCCESS)
        } else {
            entry
        }
    }

    /// Removes the kernel's poll for `id` now, from whichever thread asks. The state lock (the
    /// submission queue's) is held: `_state` proves it.
    fn remove_now(&self, _state: &mut State, id: u64) -> io::Result<()> {
        self.push_locked(&self.remove_entry(id))?;
        self.ring.submitter().submit()?;
        Ok(())
    }

    fn register(&self, state: &mut State, fd: RawFd, token: u64, interest: Interest, wakeup: bool) {
        let id = state.next_id;
        state.next_id += 1;
        state.regs.insert(
            id,
            Registration {
                fd,
                token,
                events: poll_events(interest),
                multishot: wakeup && self.multishot,
                armed: false,
            },
        );
        state.by_fd.insert(fd, id);
        state.to_arm.push(id);
    }

    fn add_impl(&self, fd: RawFd, token: u64, interest: Interest, wakeup: bool) -> io::Result<()> {
        let mut state = self.state.lock();
        if state.by_fd.contains_key(&fd) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("io_uring backend: fd {fd} is already registered"),
            ));
        }
        self.register(&mut state, fd, token, interest, wakeup);
        Ok(())
    }

    /// Reads every completion, appending readiness to `events` (one event per token), after
    /// what earlier reads outside a wait kept. Returns whether any event was added.
    fn reap(&self, events: &mut Vec<Event>) -> bool {
        let before = events.len();
        let _cq = self.cq.lock();
        let mut state = self.state.lock();
        for e in std::mem::take(&mut state.ready) {
            merge_event(events, e);
        }
        self.reap_locked(&mut state, events);
        events.len() > before
    }

    /// Reads the completions that are there now, keeping readiness for the next wait.
    fn reap_to_stash(&self) {
        let _cq = self.cq.lock();
        let mut state = self.state.lock();
        let mut ready = std::mem::take(&mut state.ready);
        self.reap_locked(&mut state, &mut ready);
        state.ready = ready;
    }

    /// Reads every completion into `events`. Both locks held (`cq` first).
    fn reap_locked(&self, state: &mut State, events: &mut Vec<Event>) {
        // SAFETY: the `cq` lock makes this the only completion queue handle.
        let cq = unsafe { self.ring.completion_shared() };
        for cqe in cq {
            let id = cqe.user_data();
            let Some(reg) = state.regs.get_mut(&id) else {
                continue; // a removal, or a poll of a registration that is gone
            };
            if !cqueue::more(cqe.flags()) {
                // The poll is over (one-shot, or a multishot the kernel ended).
                reg.armed = false;
                let token = reg.token;
                if cqe.result() == -libc::ECANCELED {
                    // Its thread exited. Re-arm at once, unless readiness of it waits to be
                    // handed out: then after that, like any other (see below).
                    if !state.unreported.contains(&id) {
                        state.to_arm.push(id);
                    }
                    continue;
                }
                // Re-armed only once a wait has handed this out and returned, i.e. after the
                // handler ran: that re-arm is the level check.
                state.unreported.push(id);
                push_event(events, token, cqe.result());
            } else {
                let token = reg.token;
                state.unreported.push(id);
                push_event(events, token, cqe.result());
            }
        }
    }
}

fn merge_event(events: &mut Vec<Event>, e: Event) {
    match events.iter_mut().find(|x| x.token == e.token) {
        Some(x) => {
            x.readable |= e.readable;
            x.writable |= e.writable;
        }
        None => events.push(e),
    }
}

/// Adds the readiness of one completion to `events`, merging with an earlier one of `token`.
/// A negative result (an error arming the poll) is reported as an error condition, which wakes
/// both handlers, like `EPOLLERR`.
fn push_event(events: &mut Vec<Event>, token: u64, res: i32) {
    let mask = if res < 0 {
        libc::POLLERR as u32
    } else {
        res as u32
    };
    let read_mask = (libc::POLLIN | libc::POLLHUP | libc::POLLERR | libc::POLLRDHUP) as u32;
    let write_mask = (libc::POLLOUT | libc::POLLERR) as u32;
    let (readable, writable) = (mask & read_mask != 0, mask & write_mask != 0);
    if readable || writable {
        merge_event(
            events,
            Event {
                token,
                readable,
                writable,
            },
        );
    }
}

impl Poller for IoUringPoller {
    fn add(&self, fd: RawFd, _kind: SourceKind, token: u64, interest: Interest) -> io::Result<()> {
        self.add_impl(fd, token, interest, false)
    }

    fn add_wakeup(&self, fd: RawFd, token: u64) -> io::Result<()> {
        let read = Interest {
            read: true,
            write: false,
        };
        self.add_impl(fd, token, read, true)
    }

    fn modify(&self, fd: RawFd, token: u64, interest: Interest) -> io::Result<()> {
        let mut state = self.state.lock();
        let Some(id) = state.by_fd.get(&fd).copied() else {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("io_uring backend: fd {fd} is not registered"),
            ));
        };
        // A new registration (new id) replaces the old one, whose late completions are dropped.
        let old = state.regs.remove(&id).expect("by_fd and regs agree");
        self.register(&mut state, fd, token, interest, old.multishot);
        if old.armed {
            self.remove_now(&mut state, id)?;
            drop(state);
            self.reap_to_stash();
        }
        Ok(())
    }

    fn delete(&self, fd: RawFd) -> io::Result<()> {
        let mut state = self.state.lock();
        let Some(id) = state.by_fd.remove(&fd) else {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("io_uring backend: fd {fd} is not registered"),
            ));
        };
        let reg = state.regs.remove(&id).expect("by_fd and regs agree");
        if reg.armed {
            self.remove_now(&mut state, id)?;
            drop(state);
            self.reap_to_stash();
        }
        Ok(())
    }

    fn wait(&self, events: &mut Vec<Event>, timeout_ns: i64) -> io::Result<()> {
        let deadline = u64::try_from(timeout_ns)
            .ok()
            .map(|ns| Instant::now() + Duration::from_nanos(ns));
        loop {
            let (pending, stashed) = {
                let mut state = self.state.lock();
                self.queue_pending(&mut state)?;
                // SAFETY: the state lock is held: the only submission queue handle.
                let sq = unsafe { self.ring.submission_shared() };
                (!sq.is_empty() || sq.cq_overflow(), !state.ready.is_empty())
            };
            let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            let block = !stashed && remaining.is_none_or(|r| !r.is_zero());
            let result = match remaining {
                _ if !block => {
                    if pending {
                        self.ring.submitter().submit().map(drop)
                    } else {
                        Ok(())
                    }
                }
                Some(r) => {
                    let ts = types::Timespec::new()
                        .sec(r.as_secs())
                        .nsec(r.subsec_nanos());
                    let args = types::SubmitArgs::new().timespec(&ts);
                    self.ring.submitter().submit_with_args(1, &args).map(drop)
                }
                None => self.ring.submitter().submit_and_wait(1).map(drop),
            };
            let interrupted = match result {
                Ok(()) => false,
                Err(e) if e.raw_os_error() == Some(libc::ETIME) => false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => true,
                // Completions are waiting to be read (an overflowing queue): read them.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => false,
                Err(e) => return Err(super::eventfd::annotate(e, "io_uring_enter")),
            };
            // Only completions for live registrations count: removals and stale polls wake the
            // wait too, and must not end it before its deadline.
            if self.reap(events)
                || !block
                || interrupted
                || deadline.is_some_and(|d| Instant::now() >= d)
            {
                let mut state = self.state.lock();
                let handed_out = std::mem::take(&mut state.unreported);
                state.reported.extend(handed_out);
                return Ok(());
            }
        }
    }

    fn outer_fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }

    fn readiness(&self) -> Readiness {
        Readiness::Free
    }

    /// Reads new completions off the ring (no system call), so that only readiness counts:
    /// the completions of removed polls, or of polls the kernel cancelled because their thread
    /// exited, must not end a spin. The latter are re-armed at once, unless readiness was found
    /// (then a re-arm could report what a handler is about to consume: it waits for the wait).
    fn has_pending(&self) -> bool {
        let completions = {
            let _cq = self.cq.lock();
            // SAFETY: the `cq` lock makes this the only completion queue handle; it only reads
            // the indices.
            !unsafe { self.ring.completion_shared() }.is_empty()
        };
        if completions {
            self.reap_to_stash();
        }
        let state = self.state.lock();
        if !state.ready.is_empty() {
            return true;
        }
        // SAFETY: the state lock is held: the only submission queue handle.
        let overflow = unsafe { self.ring.submission_shared() }.cq_overflow();
        drop(state);
        if completions {
            self.flush();
        }
        overflow
    }

    fn flush(&self) {
        let mut state = self.state.lock();
        if state.to_arm.is_empty() && state.reported.is_empty() {
            return;
        }
        // An error here (ENOMEM, say) is met again, and reported, by the next wait.
        if self.queue_pending(&mut state).is_ok() {
            let _ = self.ring.submitter().submit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    const READ: Interest = Interest {
        read: true,
        write: false,
    };
    const WRITE: Interest = Interest {
        read: false,
        write: true,
    };

    /// Both modes, or none (with the reason printed) where the kernel refuses io_uring.
    fn pollers() -> Vec<IoUringPoller> {
        match (
            IoUringPoller::with_multishot(true),
            IoUringPoller::with_multishot(false),
        ) {
            (Ok(a), Ok(b)) => {
                assert!(!b.multishot);
                vec![a, b]
            }
            (Err(e), _) | (_, Err(e)) => {
                eprintln!("SKIPPED: io_uring is not available here: {e}");
                Vec::new()
            }
        }
    }

    fn wait(p: &IoUringPoller, timeout_ns: i64) -> Vec<Event> {
        let mut events = Vec::new();
        p.wait(&mut events, timeout_ns).unwrap();
        events
    }

    fn pair() -> (UnixStream, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        b.set_nonblocking(true).unwrap();
        (a, b)
    }

    fn drain(s: &mut UnixStream) {
        let mut buf = [0u8; 64];
        while s.read(&mut buf).is_ok_and(|n| n > 0) {}
    }

    #[test]
    fn reports_readiness_on_every_wait_until_drained() {
        for p in pollers() {
            let (mut a, mut b) = pair();
            p.add(a.as_raw_fd(), SourceKind::Fd, 7, READ).unwrap();
            assert!(wait(&p, 0).is_empty());
            b.write_all(b"x").unwrap();
            for _ in 0..3 {
                // Not drained: level-triggered, so every wait reports it.
                let ev = wait(&p, -1);
                assert_eq!(ev.len(), 1, "multishot {}: {ev:?}", p.multishot);
                assert!(ev[0].readable && !ev[0].writable && ev[0].token == 7);
            }
            drain(&mut a);
            assert!(wait(&p, 0).is_empty(), "drained: not reported");
            let start = Instant::now();
            assert!(wait(&p, 2_000_000).is_empty());
            assert!(start.elapsed() >= Duration::from_millis(2), "never early");
            p.delete(a.as_raw_fd()).unwrap();
        }
    }

    /// Data that arrives after the completion was read but before the handler drained it must
    /// not leave a stale report behind (what a multishot poll would do).
    #[test]
    fn no_stale_report_after_drain() {
        for p in pollers() {
            let (mut a, mut b) = pair();
            p.add(a.as_raw_fd(), SourceKind::Fd, 1, READ).unwrap();
            b.write_all(b"x").unwrap();
            assert_eq!(wait(&p, -1).len(), 1);
            b.write_all(b"y").unwrap(); // a second wake-up, before the "handler" runs
            drain(&mut a);
            assert!(wait(&p, 0).is_empty());
            assert!(wait(&p, 1_000_000).is_empty());
        }
    }

    /// The wake-up notifier: multishot where the kernel has it, reported once per write+drain.
    #[test]
    fn wakeup_notifier_reports_each_kick() {
        for p in pollers() {
            let efd = super::super::eventfd::EventFd::new().unwrap();
            p.add_wakeup(efd.raw_fd(), 99).unwrap();
            assert!(wait(&p, 0).is_empty());
            for _ in 0..3 {
                efd.set().unwrap();
                let ev = wait(&p, -1);
                assert_eq!(ev.len(), 1);
                assert_eq!(ev[0].token, 99);
                assert!(efd.test_and_clear());
                assert!(wait(&p, 0).is_empty());
            }
            let id = p.state.lock().by_fd[&efd.raw_fd()];
            let multishot = p.state.lock().regs[&id].multishot;
            assert_eq!(multishot, p.multishot);
            println!("io_uring multishot wake-up poll: {multishot}");
        }
    }

    /// A poll submitted by a thread that exits is cancelled by the kernel; the next wait re-arms
    /// it and readiness is not lost.
    #[test]
    fn poll_of_an_exited_thread_is_rearmed() {
        for p in pollers() {
            let (a, mut b) = pair();
            p.add(a.as_raw_fd(), SourceKind::Fd, 5, READ).unwrap();
            std::thread::scope(|s| {
                s.spawn(|| assert!(wait(&p, 0).is_empty()));
            });
            b.write_all(b"x").unwrap();
            let ev = wait(&p, 5_000_000_000);
            assert_eq!(ev.len(), 1, "multishot {}", p.multishot);
            assert_eq!(ev[0].token, 5);
        }
    }

    /// After `delete`, the kernel holds no reference: closing the socket closes it for the peer.
    #[test]
    fn delete_then_close_is_seen_by_the_peer() {
        for p in pollers() {
            let (a, mut b) = pair();
            p.add(a.as_raw_fd(), SourceKind::Fd, 3, READ).unwrap();
            assert!(wait(&p, 0).is_empty()); // armed
            p.delete(a.as_raw_fd()).unwrap();
            drop(a);
            let mut buf = [0u8; 1];
            assert_eq!(b.read(&mut buf).unwrap(), 0, "EOF, not EAGAIN");
            assert!(wait(&p, 0).is_empty());
        }
    }

    #[test]
    fn modify_changes_interest_and_token() {
        for p in pollers() {
            let (a, _b) = pair();
            p.add(a.as_raw_fd(), SourceKind::Fd, 1, READ).unwrap();
            assert!(wait(&p, 0).is_empty());
            p.modify(a.as_raw_fd(), 2, WRITE).unwrap();
            let ev = wait(&p, -1);
            assert_eq!(ev.len(), 1);
            assert!(ev[0].writable && !ev[0].readable && ev[0].token == 2);
            let err = p.add(a.as_raw_fd(), SourceKind::Fd, 3, READ).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
            p.delete(a.as_raw_fd()).unwrap();
            assert_eq!(
                p.delete(a.as_raw_fd()).unwrap_err().kind(),
                io::ErrorKind::NotFound
            );
        }
    }

    /// Readiness shows in the completion ring without a system call once the poll is armed.
    #[test]
    fn has_pending_sees_readiness_in_user_space() {
        for p in pollers() {
            let (_a, mut b) = pair();
            p.add(_a.as_raw_fd(), SourceKind::Fd, 1, READ).unwrap();
            p.flush();
            assert!(!p.has_pending());
            b.write_all(b"x").unwrap();
            let start = Instant::now();
            while !p.has_pending() {
                assert!(start.elapsed() < Duration::from_secs(5), "no completion");
                std::hint::spin_loop();
            }
            assert_eq!(wait(&p, 0).len(), 1);
        }
    }
}
