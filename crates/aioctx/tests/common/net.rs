//! Loopback TCP sockets: the portable stand-in for socketpair(2) and pipes, so that descriptor
//! tests run on Windows too (where `set_fd_handler` takes sockets only).

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use aioctx::RawFd;

/// The raw value `set_fd_handler` takes: a descriptor on Unix, a socket on Windows.
pub trait AsRaw {
    fn raw(&self) -> RawFd;
}

#[cfg(unix)]
impl<T: std::os::fd::AsRawFd> AsRaw for T {
    fn raw(&self) -> RawFd {
        self.as_raw_fd()
    }
}

#[cfg(windows)]
impl<T: std::os::windows::io::AsRawSocket> AsRaw for T {
    fn raw(&self) -> RawFd {
        self.as_raw_socket()
    }
}

/// The raw value an event notifier is registered under, as [`aioctx::AioContext::registered_fds`]
/// lists it: its eventfd on Unix, its event handle's value on Windows.
pub fn notifier_raw(n: &aioctx::EventNotifier) -> RawFd {
    #[cfg(unix)]
    return std::os::fd::AsRawFd::as_raw_fd(n);
    #[cfg(windows)]
    return std::os::windows::io::AsRawHandle::as_raw_handle(n) as usize as RawFd;
}

/// Socket creation is shared ([`creating_sockets`]), and exclusive for a test that closes a
/// socket still registered with a context, a deliberate caller bug, until it has removed the
/// stale registration ([`no_new_sockets`]). The closed socket's value is handed out again at once
/// to the next socket (Windows, and Wine, reuse the lowest free handle value; Unix the lowest
/// free descriptor), and on Windows removing the registration detaches whatever socket has the
/// value by then from *its* context's wake-ups (`WSAEventSelect` is a property of the socket),
/// which would hang a test running alongside.
static SOCKET_CREATION: RwLock<()> = RwLock::new(());

/// Held while a test creates sockets (this module's helpers take it themselves).
pub fn creating_sockets() -> RwLockReadGuard<'static, ()> {
    SOCKET_CREATION.read().unwrap_or_else(|e| e.into_inner())
}

/// Held by a test from closing a registered socket until it removed that registration: no
/// other test of the binary creates a socket meanwhile.
pub fn no_new_sockets() -> RwLockWriteGuard<'static, ()> {
    SOCKET_CREATION.write().unwrap_or_else(|e| e.into_inner())
}

/// A listener on an ephemeral loopback port.
pub fn listener() -> TcpListener {
    let _creating = creating_sockets();
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a loopback listener")
}

/// Two connected, non-blocking loopback TCP sockets, with Nagle off so small writes go out at
/// once.
pub fn tcp_pair() -> (TcpStream, TcpStream) {
    let l = listener();
    let _creating = creating_sockets();
    let a = TcpStream::connect(l.local_addr().unwrap()).expect("connect to the loopback listener");
    let (b, _) = l.accept().expect("accept the loopback connection");
    for s in [&a, &b] {
        s.set_nonblocking(true).unwrap();
        s.set_nodelay(true).unwrap();
    }
    (a, b)
}

/// Reads everything currently available from a non-blocking socket. Returns the bytes and
/// whether the peer has closed (end-of-file).
pub fn read_available(s: &mut TcpStream) -> (Vec<u8>, bool) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (got, true),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return (got, false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => panic!("read: {e}"),
        }
    }
}

/// Writes all of `data` to a non-blocking socket whose buffer is known to have room.
pub fn write_now(s: &mut TcpStream, data: &[u8]) {
    s.write_all(data).expect("write to a socket with room");
}

/// Fills a non-blocking socket's send buffer (and its peer's receive buffer) until a write would
/// block; returns the bytes written.
pub fn fill_socket(s: &mut TcpStream) -> usize {
    let chunk = [0x5au8; 65536];
    let mut total = 0;
    loop {
        match s.write(&chunk) {
            Ok(n) => total += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return total,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => panic!("write: {e}"),
        }
    }
}

/// Waits up to `timeout` for `s` to be readable (data, end-of-file or an error), looking with
/// poll(2) or `WSAPoll` (which does not disturb a socket registered with a context). A test uses
/// it after writing to a peer, so that its next non-blocking poll of the context does not depend
/// on how fast the loopback delivers.
pub fn wait_readable(s: &impl AsRaw, timeout: std::time::Duration) -> bool {
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    #[cfg(unix)]
    {
        let mut p = libc::pollfd {
            fd: s.raw(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `p` is one valid pollfd.
        let n = unsafe { libc::poll(&mut p, 1, ms) };
        assert!(n >= 0, "poll: {}", io::Error::last_os_error());
        n == 1
    }
    #[cfg(windows)]
    {
        use windows_sys::Win32::Networking::WinSock::{
            WSAPoll, POLLRDNORM, SOCKET_ERROR, WSAPOLLFD,
        };
        let mut p = WSAPOLLFD {
            fd: s.raw() as usize,
            events: POLLRDNORM,
            revents: 0,
        };
        // SAFETY: `p` is one valid WSAPOLLFD.
        let n = unsafe { WSAPoll(&mut p, 1, ms) };
        assert!(n != SOCKET_ERROR, "WSAPoll: {}", io::Error::last_os_error());
        n == 1
    }
}

/// [`wait_readable`], bounded by [`LIMIT`]; panics if `s` does not become readable.
pub fn await_readable(s: &impl AsRaw) {
    assert!(
        wait_readable(s, LIMIT),
        "socket still not readable after {LIMIT:?}"
    );
}

/// How long a test may wait for a condition before it fails.
pub const LIMIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Blocking polls until `cond` holds; panics, naming `what`, if that takes longer than
/// [`LIMIT`]. A timer armed at the limit bounds every blocking poll, so even a lost wake-up
/// fails the test instead of hanging it.
pub fn poll_until(ctx: &aioctx::AioContext, what: &str, mut cond: impl FnMut() -> bool) {
    use aioctx::{clock_get_ns, ClockType, SCALE_NS};
    let deadline = std::time::Instant::now() + LIMIT;
    let guard = ctx.timer_new(ClockType::Realtime, SCALE_NS, || {});
    guard.modify_ns(clock_get_ns(ClockType::Realtime) + LIMIT.as_nanos() as i64);
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "still waiting for {what} after {LIMIT:?}"
        );
        ctx.poll(true);
    }
}
