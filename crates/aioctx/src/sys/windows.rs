//! The Windows back end: event objects and sockets, with no 64-handle ceiling.
//!
//! # What it waits on
//!
//! * **Event notifiers** are manual-reset event objects (`win_event.rs`), waited on directly.
//!   `WaitForMultipleObjects` takes at most 64 handles, so only the first [`DIRECT_SLOTS`]
//!   registered notifiers (the context's own, registered first, is always among them) go into
//!   the blocking wait itself. Each notifier beyond those gets a thread-pool wait
//!   (`SetThreadpoolWait`), armed only while the loop is about to block, whose callback signals
//!   one shared *overflow event* that is in the blocking wait. Any number of notifiers is thus
//!   one wait, at the price of a pool-thread hop for the overflow ones.
//! * **Sockets** all share one *socket event*, attached with `WSAEventSelect` (QEMU's
//!   scheme). `WSAEventSelect` is edge-triggered (a network event is recorded once, then not
//!   again until the matching call, `recv`, `accept` or a `send` that would block, re-enables
//!   it), so it only serves to end a blocking wait; which sockets are ready is always found by
//!   a zero-timeout `WSAPoll`, which has no `FD_SETSIZE` limit, on every socket. That makes
//!   readiness level-triggered like on Linux: a handler that leaves data unread runs again.
//! * **Timeouts** use a high-resolution waitable timer (`CREATE_WAITABLE_TIMER_HIGH_RESOLUTION`,
//!   Windows 10 1803+) set to the timeout rounded up to 100 ns, in the same blocking wait. Where
//!   that timer cannot be created, the timeout is rounded up to whole milliseconds.
//!
//! # One wait
//!
//! 1. Reset the socket and overflow events, *then* look: a zero-timeout check of every notifier
//!    (64 handles per `WaitForMultipleObjects`) and one `WSAPoll` of every socket. Resetting
//!    first means that anything happening after the look signals an event again, so no
//!    readiness is lost between the look and the block.
//! 2. If something is ready, or the timeout is 0, report it and return.
//! 3. Otherwise arm the overflow notifiers' pool waits and block on the direct notifiers, the
//!    two shared events and the timer.
//! 4. Whatever woke it, go back to 1: the look decides what is reported. A wake-up that finds
//!    nothing ready (a stale network event, a socket another handler drained) blocks again for
//!    the time left, so a wait never returns early and never reports a socket that is not ready.
//!
//! Registration may happen from any thread during a wait; the wait works on a copy of the set
//! taken at step 1, and the context notifies itself after every registration so that a blocked
//! wait starts over with the new set.

use std::collections::HashMap;
use std::ffi::c_void;
use std::io;
use std::os::windows::io::{AsRawHandle, FromRawHandle, OwnedHandle, RawHandle};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use windows_sys::Win32::Foundation::{
    ERROR_INVALID_HANDLE, HANDLE, WAIT_ABANDONED_0, WAIT_FAILED, WAIT_OBJECT_0, WAIT_TIMEOUT,
};
use windows_sys::Win32::Networking::WinSock::{
    WSACleanup, WSAEventSelect, WSAGetLastError, WSAPoll, WSAStartup, FD_ACCEPT, FD_CLOSE,
    FD_CONNECT, FD_OOB, FD_READ, FD_WRITE, POLLERR, POLLHUP, POLLNVAL, POLLRDBAND, POLLRDNORM,
    POLLWRNORM, SOCKET, SOCKET_ERROR, WSADATA, WSAPOLLFD,
};
use windows_sys::Win32::System::Threading::{
    CloseThreadpoolWait, CreateThreadpoolWait, CreateWaitableTimerExW, SetEvent, SetThreadpoolWait,
    SetWaitableTimer, WaitForMultipleObjects, WaitForSingleObject, WaitForThreadpoolWaitCallbacks,
    CREATE_WAITABLE_TIMER_HIGH_RESOLUTION, INFINITE, PTP_CALLBACK_INSTANCE, PTP_WAIT,
};

use super::win_event::WinEvent;
use super::{Event, Interest, Poller, RawFd, SourceKind};

/// `WaitForMultipleObjects`' limit (`MAXIMUM_WAIT_OBJECTS`).
const MAX_WAIT: usize = 64;
/// Notifiers waited on directly: the limit less the socket event, the overflow event and the
/// timer.
const DIRECT_SLOTS: usize = MAX_WAIT - 3;
/// `TIMER_ALL_ACCESS`, spelled out to avoid pulling in another windows-sys feature for it.
const TIMER_ALL_ACCESS: u32 = 0x001F_0003;

/// The last OS error, with the failing call named.
pub(crate) fn os_error(call: &str) -> io::Error {
    annotate(io::Error::last_os_error(), call)
}

/// The calling thread's last Winsock error, with the failing call named.
fn wsa_error(call: &str) -> io::Error {
    // SAFETY: WSAGetLastError takes no arguments and only reads thread-local state.
    let code = unsafe { WSAGetLastError() };
    annotate(io::Error::from_raw_os_error(code), call)
}

fn annotate(err: io::Error, call: &str) -> io::Error {
    io::Error::new(err.kind(), format!("{call} failed: {err}"))
}

/// What a thread-pool wait's callback reaches: its own "armed" flag and the event to signal.
/// Boxed so its address stays put while the pool holds it.
struct OverflowShared {
    armed: AtomicBool,
    /// The poller's overflow event, as a value: HANDLE is a raw pointer and not `Send`.
    overflow_event: usize,
}

/// A thread-pool wait on one overflow notifier.
struct OverflowWait {
    wait: PTP_WAIT,
    shared: Box<OverflowShared>,
}

unsafe extern "system" fn overflow_fired(
    _instance: PTP_CALLBACK_INSTANCE,
    context: *mut c_void,
    _wait: PTP_WAIT,
    _result: u32,
) {
    // SAFETY: `context` is the address of the `OverflowShared` boxed in the `OverflowWait` that
    // owns this pool wait; its Drop waits for every callback before freeing it.
    let shared = unsafe { &*(context as *const OverflowShared) };
    // A one-shot wait: the pool disarmed it before calling us.
    shared.armed.store(false, Ordering::Release);
    // SAFETY: the overflow event outlives every pool wait (see `Win32Poller`'s field order).
    unsafe { SetEvent(shared.overflow_event as HANDLE) };
}

impl OverflowWait {
    fn new(overflow_event: HANDLE) -> io::Result<OverflowWait> {
        let shared = Box::new(OverflowShared {
            armed: AtomicBool::new(false),
            overflow_event: overflow_event as usize,
        });
        let context = &*shared as *const OverflowShared as *mut c_void;
        // SAFETY: the callback has the PTP_WAIT_CALLBACK signature; `context` stays valid until
        // Drop, which closes the wait after its callbacks finished; a null environment means the
        // process's default pool.
        let wait = unsafe { CreateThreadpoolWait(Some(overflow_fired), context, std::ptr::null()) };
        if wait == 0 {
            return Err(os_error("CreateThreadpoolWait"));
        }
        Ok(OverflowWait { wait, shared })
    }

    /// Arms the wait on `handle` unless it is armed already.
    fn arm(&self, handle: HANDLE) {
        if !self.shared.armed.swap(true, Ordering::AcqRel) {
            // SAFETY: `wait` is a live pool wait and `handle` a live waitable handle (the
            // registration holding it is alive); no timeout means wait indefinitely.
            unsafe { SetThreadpoolWait(self.wait, handle, std::ptr::null()) };
        }
    }
}

impl Drop for OverflowWait {
    fn drop(&mut self) {
        // SAFETY: `wait` is a live pool wait. Setting a null handle disarms it; waiting for its
        // callbacks (cancelling those not started) means none runs after `shared` is freed.
        unsafe {
            SetThreadpoolWait(self.wait, std::ptr::null_mut(), std::ptr::null());
            WaitForThreadpoolWaitCallbacks(self.wait, 1);
            CloseThreadpoolWait(self.wait);
        }
    }
}

struct HandleReg {
    /// The event object's value (HANDLE is a raw pointer and not `Send`).
    handle: usize,
    token: u64,
    /// Created the first time the notifier is beyond the direct slots when the loop blocks.
    overflow: Option<OverflowWait>,
}

#[derive(Default)]
struct Registrations {
    handles: Vec<HandleReg>,
    handle_index: HashMap<RawFd, usize>,
    /// `WSAPoll`'s array itself, so a wait copies it in one go.
    sockets: Vec<WSAPOLLFD>,
    socket_tokens: Vec<u64>,
    socket_index: HashMap<RawFd, usize>,
}

/// The per-wait copy of the registrations, kept to reuse its allocations.
#[derive(Default)]
struct Scratch {
    handles: Vec<usize>,
    handle_tokens: Vec<u64>,
    /// Handles a wait refused (closed while still registered): left out of the blocking wait,
    /// or it would fail at once, forever. Like a closed descriptor under epoll, they are never
    /// reported.
    broken: Vec<bool>,
    sockets: Vec<WSAPOLLFD>,
    socket_tokens: Vec<u64>,
    /// The blocking wait's handle array.
    wait_set: Vec<HANDLE>,
    /// One 64-handle group of the zero-timeout look, and its handles' indexes.
    group: Vec<HANDLE>,
    group_index: Vec<usize>,
}

// SAFETY: the raw HANDLEs in `wait_set` and `group` are plain values only passed to wait calls
// by the thread holding the scratch mutex; nothing is dereferenced.
unsafe impl Send for Scratch {}

/// Keeps Winsock initialised while a poller exists (`WSAStartup` is reference counted).
struct Winsock;

impl Winsock {
    fn start() -> io::Result<Winsock> {
        // SAFETY: WSADATA is plain data that WSAStartup fills in.
        let mut data: WSADATA = unsafe { std::mem::zeroed() };
        // SAFETY: `data` is a valid, writable WSADATA.
        let rc = unsafe { WSAStartup(0x0202, &mut data) };
        if rc != 0 {
            return Err(annotate(io::Error::from_raw_os_error(rc), "WSAStartup"));
        }
        Ok(Winsock)
    }
}

impl Drop for Winsock {
    fn drop(&mut self) {
        // SAFETY: balances the successful WSAStartup in `start`.
        unsafe { WSACleanup() };
    }
}

pub(crate) struct Win32Poller {
    // Field order is drop order: the registrations' pool waits must be gone before the overflow
    // event they signal is closed.
    regs: Mutex<Registrations>,
    scratch: Mutex<Scratch>,
    socket_event: WinEvent,
    overflow_event: WinEvent,
    /// The high-resolution timer, if this Windows has them.
    timer: Option<OwnedHandle>,
    _winsock: Winsock,
}

impl Win32Poller {
    pub(crate) fn new() -> io::Result<Win32Poller> {
        let winsock = Winsock::start()?;
        // SAFETY: null attributes and name are allowed. An auto-reset ("synchronization") timer
        // is consumed by the wait it ends, and setting it clears it.
        let timer = unsafe {
            CreateWaitableTimerExW(
                std::ptr::null(),
                std::ptr::null(),
                CREATE_WAITABLE_TIMER_HIGH_RESOLUTION,
                TIMER_ALL_ACCESS,
            )
        };
        // No high-resolution timers (before Windows 10 1803): millisecond timeouts instead.
        let timer = (!timer.is_null()).then(|| {
            // SAFETY: `timer` was just returned by CreateWaitableTimerExW and is owned by nobody.
            unsafe { OwnedHandle::from_raw_handle(timer as RawHandle) }
        });
        Ok(Win32Poller {
            regs: Mutex::new(Registrations::default()),
            scratch: Mutex::new(Scratch::default()),
            socket_event: WinEvent::new()?,
            overflow_event: WinEvent::new()?,
            timer,
            _winsock: winsock,
        })
    }

    /// Attaches `socket` to the socket event for the network events `interest` needs (none:
    /// detaches it).
    fn event_select(&self, socket: RawFd, interest: Interest) -> io::Result<()> {
        let mut mask = 0;
        if interest.read {
            mask |= FD_READ | FD_ACCEPT | FD_CLOSE | FD_OOB;
        }
        if interest.write {
            mask |= FD_WRITE | FD_CONNECT | FD_CLOSE;
        }
        // WSAEVENT is an event HANDLE's value.
        let event = if mask == 0 {
            0
        } else {
            self.socket_event.handle() as isize
        };
        // SAFETY: WSAEventSelect takes plain values; Winsock checks that `socket` is a socket.
        if unsafe { WSAEventSelect(socket as SOCKET, event, mask as i32) } == SOCKET_ERROR {
            return Err(wsa_error("WSAEventSelect"));
        }
        Ok(())
    }

    /// Copies the registrations into the scratch space.
    fn snapshot(&self, scratch: &mut Scratch) {
        let regs = self.regs.lock();
        scratch.handles.clear();
        scratch
            .handles
            .extend(regs.handles.iter().map(|h| h.handle));
        scratch.handle_tokens.clear();
        scratch
            .handle_tokens
            .extend(regs.handles.iter().map(|h| h.token));
        scratch.sockets.clone_from(&regs.sockets);
        scratch.socket_tokens.clone_from(&regs.socket_tokens);
        scratch.broken.clear();
        scratch.broken.resize(scratch.handles.len(), false);
    }

    /// The zero-timeout look at everything; appends what is ready to `events`.
    fn scan(&self, scratch: &mut Scratch, events: &mut Vec<Event>) -> io::Result<()> {
        let s = scratch;
        for start in (0..s.handles.len()).step_by(MAX_WAIT) {
            let end = (start + MAX_WAIT).min(s.handles.len());
            s.group.clear();
            s.group_index.clear();
            for i in start..end {
                s.group.push(s.handles[i] as HANDLE);
                s.group_index.push(i);
            }
            // The wait reports only the lowest signalled handle: take it out and look again.
            while !s.group.is_empty() {
                // SAFETY: `group` holds at most 64 handle values; a zero timeout never blocks.
                let r =
                    unsafe { WaitForMultipleObjects(s.group.len() as u32, s.group.as_ptr(), 0, 0) };
                let n = s.group.len() as u32;
                let hit = if (WAIT_OBJECT_0..WAIT_OBJECT_0 + n).contains(&r) {
                    (r - WAIT_OBJECT_0) as usize
                } else if (WAIT_ABANDONED_0..WAIT_ABANDONED_0 + n).contains(&r) {
                    (r - WAIT_ABANDONED_0) as usize
                } else if r == WAIT_TIMEOUT {
                    break;
                } else {
                    // A handle in the group is no longer valid: look at each on its own.
                    self.scan_one_by_one(s, events);
                    break;
                };
                let i = s.group_index.swap_remove(hit);
                s.group.swap_remove(hit);
                events.push(Event {
                    token: s.handle_tokens[i],
                    readable: true,
                    writable: false,
                });
            }
        }

        if s.sockets.is_empty() {
            return Ok(());
        }
        // SAFETY: `sockets` is a valid writable array of that many WSAPOLLFDs; a zero timeout
        // never blocks.
        let n = unsafe { WSAPoll(s.sockets.as_mut_ptr(), s.sockets.len() as u32, 0) };
        if n == SOCKET_ERROR {
            return Err(wsa_error("WSAPoll"));
        }
        if n == 0 {
            return Ok(());
        }
        // As on Linux, a read handler also runs on hang-up and error (to see end-of-file and
        // the error), and a socket closed while registered (POLLNVAL) fails its handlers' next
        // call rather than being forgotten silently.
        let read_mask = POLLRDNORM | POLLRDBAND | POLLHUP | POLLERR | POLLNVAL;
        let write_mask = POLLWRNORM | POLLERR | POLLNVAL;
        events.extend(
            s.sockets
                .iter()
                .zip(&s.socket_tokens)
                .filter(|(p, _)| p.revents != 0)
                .map(|(p, &token)| Event {
                    token,
                    readable: p.revents & read_mask != 0,
                    writable: p.revents & write_mask != 0,
                }),
        );
        Ok(())
    }

    /// The rest of a group after a failed group wait, one handle at a time.
    fn scan_one_by_one(&self, s: &mut Scratch, events: &mut Vec<Event>) {
        for (&h, &i) in s.group.iter().zip(&s.group_index) {
            // SAFETY: a zero timeout never blocks; an invalid handle just fails.
            match unsafe { WaitForSingleObject(h, 0) } {
                WAIT_OBJECT_0 | WAIT_ABANDONED_0 => events.push(Event {
                    token: s.handle_tokens[i],
                    readable: true,
                    writable: false,
                }),
                WAIT_FAILED => s.broken[i] = true,
                _ => {}
            }
        }
    }

    /// Arms the pool waits of the notifiers beyond the direct slots, except the broken ones
    /// the last look found: a pool wait on a closed handle could end every wait at once.
    fn arm_overflow(&self, s: &Scratch) -> io::Result<()> {
        let broken: Vec<usize> = (0..s.handles.len())
            .filter(|&i| s.broken[i])
            .map(|i| s.handles[i])
            .collect();
        let mut regs = self.regs.lock();
        for reg in regs.handles.iter_mut().skip(DIRECT_SLOTS) {
            if broken.contains(&reg.handle) {
                continue;
            }
            let wait = match &mut reg.overflow {
                Some(wait) => wait,
                None => reg
                    .overflow
                    .insert(OverflowWait::new(self.overflow_event.handle())?),
            };
            wait.arm(reg.handle as HANDLE);
        }
        Ok(())
    }

    /// Blocks until a direct notifier, a shared event or the timer is signalled, or `left`
    /// (`None`: forever) has passed.
    fn block(&self, s: &mut Scratch, left: Option<Duration>) -> io::Result<()> {
        s.wait_set.clear();
        let direct = s.handles.len().min(DIRECT_SLOTS);
        for i in 0..direct {
            if !s.broken[i] {
                s.wait_set.push(s.handles[i] as HANDLE);
            }
        }
        s.wait_set.push(self.socket_event.handle());
        s.wait_set.push(self.overflow_event.handle());
        let mut ms = INFINITE;
        if let Some(left) = left {
            match &self.timer {
                Some(timer) => {
                    // Relative due times are negative, in 100 ns units: round up, never early.
                    let ticks = left.as_nanos().div_ceil(100).min(i64::MAX as u128) as i64;
                    let due = -ticks.max(1);
                    // SAFETY: `timer` is a live waitable timer; `due` outlives the call; no
                    // period and no completion routine.
                    let ok = unsafe {
                        SetWaitableTimer(timer.as_raw_handle(), &due, 0, None, std::ptr::null(), 0)
                    };
                    if ok == 0 {
                        return Err(os_error("SetWaitableTimer"));
                    }
                    s.wait_set.push(timer.as_raw_handle());
                }
                None => {
                    let ns = i64::try_from(left.as_nanos()).unwrap_or(i64::MAX);
                    ms = super::timeout_ns_to_ms(ns) as u32;
                }
            }
        }
        // SAFETY: `wait_set` holds at most DIRECT_SLOTS + 3 = 64 handle values.
        let r =
            unsafe { WaitForMultipleObjects(s.wait_set.len() as u32, s.wait_set.as_ptr(), 0, ms) };
        if r == WAIT_FAILED {
            let err = io::Error::last_os_error();
            // A direct notifier was closed while registered (or removed and closed since the
            // snapshot): the next look finds it and leaves it out. Anything else is a bug here.
            if err.raw_os_error() != Some(ERROR_INVALID_HANDLE as i32) {
                return Err(annotate(err, "WaitForMultipleObjects"));
            }
        }
        Ok(())
    }
}

impl Poller for Win32Poller {
    fn add(&self, fd: RawFd, kind: SourceKind, token: u64, interest: Interest) -> io::Result<()> {
        let mut regs = self.regs.lock();
        if regs.socket_index.contains_key(&fd) || regs.handle_index.contains_key(&fd) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("windows backend: {fd} is already registered"),
            ));
        }
        match kind {
            SourceKind::Notifier => {
                let i = regs.handles.len();
                regs.handles.push(HandleReg {
                    handle: fd as usize,
                    token,
                    overflow: None,
                });
                regs.handle_index.insert(fd, i);
            }
            SourceKind::Fd => {
                self.event_select(fd, interest)?;
                let i = regs.sockets.len();
                regs.sockets.push(WSAPOLLFD {
                    fd: fd as SOCKET,
                    events: poll_events(interest),
                    revents: 0,
                });
                regs.socket_tokens.push(token);
                regs.socket_index.insert(fd, i);
            }
        }
        Ok(())
    }

    fn modify(&self, fd: RawFd, token: u64, interest: Interest) -> io::Result<()> {
        let mut regs = self.regs.lock();
        if let Some(&i) = regs.handle_index.get(&fd) {
            regs.handles[i].token = token;
            return Ok(());
        }
        let Some(&i) = regs.socket_index.get(&fd) else {
            return Err(not_registered(fd));
        };
        self.event_select(fd, interest)?;
        regs.sockets[i].events = poll_events(interest);
        regs.socket_tokens[i] = token;
        Ok(())
    }

    fn delete(&self, fd: RawFd) -> io::Result<()> {
        let mut regs = self.regs.lock();
        if let Some(i) = regs.handle_index.remove(&fd) {
            // Dropping the registration cancels its pool wait.
            regs.handles.swap_remove(i);
            if let Some(moved) = regs.handles.get(i).map(|h| h.handle as RawFd) {
                regs.handle_index.insert(moved, i);
            }
            return Ok(());
        }
        let Some(i) = regs.socket_index.remove(&fd) else {
            return Err(not_registered(fd));
        };
        regs.sockets.swap_remove(i);
        regs.socket_tokens.swap_remove(i);
        if let Some(moved) = regs.sockets.get(i).map(|p| p.fd as RawFd) {
            regs.socket_index.insert(moved, i);
        }
        // The socket may be closed already, which detached it.
        let _ = self.event_select(fd, Interest::default());
        Ok(())
    }

    fn wait(&self, events: &mut Vec<Event>, timeout_ns: i64) -> io::Result<()> {
        let start = Instant::now();
        let mut scratch = self.scratch.lock();
        let s = &mut *scratch;
        loop {
            self.socket_event.reset();
            self.overflow_event.reset();
            self.snapshot(s);
            let before = events.len();
            self.scan(s, events)?;
            if events.len() > before || timeout_ns == 0 {
                return Ok(());
            }
            let left = if timeout_ns < 0 {
                None
            } else {
                let elapsed = start.elapsed();
                let timeout = Duration::from_nanos(timeout_ns as u64);
                if elapsed >= timeout {
                    return Ok(());
                }
                Some(timeout - elapsed)
            };
            if s.handles.len() > DIRECT_SLOTS {
                self.arm_overflow(s)?;
            }
            self.block(s, left)?;
        }
    }
}

fn poll_events(interest: Interest) -> i16 {
    let mut events = 0;
    if interest.read {
        events |= POLLRDNORM;
    }
    if interest.write {
        events |= POLLWRNORM;
    }
    events
}

fn not_registered(fd: RawFd) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("windows backend: {fd} is not registered"),
    )
}

/// Makes the calling thread's timed waits precise (see the Unix version, which sets the timer
/// slack). Nothing to do here: the precision comes from the high-resolution timer each wait sets,
/// and where there is none, raising the system-wide tick rate (`timeBeginPeriod`) for every
/// polling thread would cost the whole machine power for a fallback.
pub(crate) fn prepare_timed_wait() {}

impl AsRawHandle for crate::EventNotifier {
    /// The event object (QEMU's `event_notifier_get_handle`).
    fn as_raw_handle(&self) -> RawHandle {
        self.raw_fd() as usize as RawHandle
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn read() -> Interest {
        Interest {
            read: true,
            write: false,
        }
    }

    #[test]
    fn sub_millisecond_waits_are_never_early() {
        let poller = Win32Poller::new().unwrap();
        // Tell the log which path this Windows (or Wine) takes.
        eprintln!("high-resolution timer: {}", poller.timer.is_some());
        let mut events = Vec::new();
        for ns in [1, 50_000, 300_000, 1_000_000, 2_500_000] {
            let start = Instant::now();
            poller.wait(&mut events, ns).unwrap();
            let took = start.elapsed();
            assert!(events.is_empty());
            assert!(
                took >= Duration::from_nanos(ns as u64),
                "{ns} ns took {took:?}"
            );
        }
    }

    /// 100 notifiers: those beyond the direct slots end a blocked wait through their pool waits,
    /// and only the one that was set is reported, for as long as it stays set.
    #[test]
    fn overflow_notifiers_end_a_blocked_wait() {
        let poller = Win32Poller::new().unwrap();
        let events: Vec<Arc<WinEvent>> = (0..100)
            .map(|_| Arc::new(WinEvent::new().unwrap()))
            .collect();
        for (i, e) in events.iter().enumerate() {
            poller
                .add(e.raw_fd(), SourceKind::Notifier, i as u64, read())
                .unwrap();
        }
        for target in [99, DIRECT_SLOTS, DIRECT_SLOTS - 1, 0] {
            let e = events[target].clone();
            let setter = std::thread::spawn(move || e.set().unwrap());
            let mut got = Vec::new();
            poller.wait(&mut got, -1).unwrap();
            setter.join().unwrap();
            let tokens: Vec<u64> = got.iter().map(|e| e.token).collect();
            assert_eq!(tokens, vec![target as u64]);
            // Level-triggered: still set, still reported, without blocking.
            got.clear();
            poller.wait(&mut got, 1_000_000_000).unwrap();
            assert_eq!(got.len(), 1);
            assert!(events[target].test_and_clear());
            got.clear();
            poller.wait(&mut got, 0).unwrap();
            assert!(got.is_empty());
        }
        // Removing them all cancels their pool waits (dropping the poller would too).
        for e in &events {
            poller.delete(e.raw_fd()).unwrap();
        }
        assert!(poller.delete(events[0].raw_fd()).is_err());
    }

    /// Notifiers closed while registered (a caller bug), direct and overflow: never reported,
    /// and the others still work.
    ///
    /// A closed handle is stood for by a value no handle ever gets (far beyond the handle
    /// table): a really closed one's value is handed out again at once to whichever thread
    /// creates a handle next, and the test harness's threads do (a finished test's thread handle
    /// is signalled), which made this test report the newcomer now and then.
    #[test]
    fn closed_notifiers_are_left_out() {
        let poller = Win32Poller::new().unwrap();
        let mut events: Vec<Option<WinEvent>> =
            (0..70).map(|_| Some(WinEvent::new().unwrap())).collect();
        for i in [1, 65] {
            events[i] = None;
        }
        for (i, e) in events.iter().enumerate() {
            let fd = match e {
                Some(e) => e.raw_fd(),
                None => {
                    let closed = (0x4000_0000 + 4 * i) as RawFd;
                    // SAFETY: a zero timeout never blocks; an invalid handle just fails.
                    let r = unsafe { WaitForSingleObject(closed as usize as HANDLE, 0) };
                    assert_eq!(
                        r, WAIT_FAILED,
                        "the stand-in is refused like a closed handle"
                    );
                    closed
                }
            };
            poller
                .add(fd, SourceKind::Notifier, i as u64, read())
                .unwrap();
        }
        let mut got = Vec::new();
        let start = Instant::now();
        poller.wait(&mut got, 20_000_000).unwrap();
        assert!(got.is_empty(), "{got:?}");
        assert!(start.elapsed() >= Duration::from_millis(20));
        events[69].as_ref().unwrap().set().unwrap();
        poller.wait(&mut got, -1).unwrap();
        assert_eq!(got.iter().map(|e| e.token).collect::<Vec<_>>(), vec![69]);
    }
}
