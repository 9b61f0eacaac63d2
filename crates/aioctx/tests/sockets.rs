//! Sockets through fd handlers, on every platform (on Windows, sockets are what `set_fd_handler`
//! takes): echo, connect and accept readiness, a peer closing, hundreds of sockets and notifiers
//! in one context, and removal from inside another socket's handler.

mod common;

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

use aioctx::{AioContext, EventNotifier, Handler, WeakAioContext};
use common::net::{
    creating_sockets, listener, no_new_sockets, poll_until, read_available, tcp_pair, write_now,
    AsRaw,
};

fn boxed(f: impl FnMut() + Send + 'static) -> Option<Handler> {
    Some(Box::new(f))
}

/// One end of the echo test: a socket, what is still to be written, and what was read.
struct Peer {
    sock: TcpStream,
    out: Vec<u8>,
    received: Vec<u8>,
    /// Echo everything read back into `out` (the server) or keep it (the client).
    echo: bool,
    write_armed: bool,
}

impl Peer {
    /// Writes as much of `out` as the socket takes now.
    fn flush(&mut self) {
        while !self.out.is_empty() {
            match self.sock.write(&self.out) {
                Ok(n) => {
                    self.out.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => panic!("write: {e}"),
            }
        }
    }
}

/// Installs `peer`'s handlers: always a reader, and a writer only while there is something to
/// write (a writer on a writable socket would run on every poll: readiness is level-triggered).
fn arm(ctx: &AioContext, peer: &Arc<Mutex<Peer>>, want_write: bool) {
    let fd = peer.lock().unwrap().sock.raw();
    peer.lock().unwrap().write_armed = want_write;
    let weak = ctx.downgrade();
    let reader = {
        let (peer, weak) = (peer.clone(), weak.clone());
        boxed(move || on_readable(&weak, &peer))
    };
    let writer = if want_write {
        let peer = peer.clone();
        boxed(move || on_writable(&weak, &peer))
    } else {
        None
    };
    ctx.set_fd_handler(fd, reader, writer).unwrap();
}

fn on_readable(weak: &WeakAioContext, peer: &Arc<Mutex<Peer>>) {
    let mut p = peer.lock().unwrap();
    let (data, eof) = read_available(&mut p.sock);
    assert!(!eof, "neither side closes during the echo");
    if p.echo {
        p.out.extend_from_slice(&data);
        p.flush();
    } else {
        p.received.extend_from_slice(&data);
    }
    let need_write = !p.out.is_empty();
    if need_write != p.write_armed {
        drop(p);
        arm(&weak.upgrade().unwrap(), peer, need_write);
    }
}

fn on_writable(weak: &WeakAioContext, peer: &Arc<Mutex<Peer>>) {
    let mut p = peer.lock().unwrap();
    p.flush();
    if p.out.is_empty() {
        drop(p);
        arm(&weak.upgrade().unwrap(), peer, false);
    }
}

/// A client streams 1 MiB through an echo server, both driven by fd handlers on one context.
/// More than the socket buffers hold, so both sides see writes that would block and must be
/// woken when there is room again (on Windows, the edge-triggered FD_WRITE re-arming).
#[test]
fn echo_through_fd_handlers() {
    const LEN: usize = 1 << 20;
    let ctx = AioContext::new().unwrap();
    let (client, server) = tcp_pair();
    let data: Vec<u8> = (0..LEN).map(|i| (i * 7 + i / 251) as u8).collect();
    let client = Arc::new(Mutex::new(Peer {
        sock: client,
        out: data.clone(),
        received: Vec::new(),
        echo: false,
        write_armed: false,
    }));
    let server = Arc::new(Mutex::new(Peer {
        sock: server,
        out: Vec::new(),
        received: Vec::new(),
        echo: true,
        write_armed: false,
    }));
    arm(&ctx, &server, false);
    arm(&ctx, &client, true);
    poll_until(&ctx, "the whole echo", || {
        client.lock().unwrap().received.len() >= LEN
    });
    let c = client.lock().unwrap();
    assert_eq!(c.received.len(), LEN);
    assert!(c.received == data, "the echo came back intact and in order");
    assert!(c.out.is_empty() && server.lock().unwrap().out.is_empty());
    assert!(!c.write_armed && !server.lock().unwrap().write_armed);
    let fds = [c.sock.raw(), server.lock().unwrap().sock.raw()];
    drop(c);
    for fd in fds {
        ctx.set_fd_handler(fd, None, None).unwrap();
    }
    assert!(ctx.registered_fds().is_empty());
    // Handlers only reach the context weakly: nothing keeps it or the peers alive.
    assert_eq!(Arc::strong_count(&client), 1);
    assert_eq!(Arc::strong_count(&server), 1);
}

/// Starts a non-blocking connect to `addr`; it is still in progress when this returns (or, on a
/// fast loopback, already done: both are fine for readiness).
fn connect_nonblocking(addr: SocketAddr) -> TcpStream {
    let _creating = creating_sockets();
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_nonblocking(true).unwrap();
    match sock.connect(&addr.into()) {
        Ok(()) => {}
        // EINPROGRESS on Unix (not yet an ErrorKind on stable Rust), WSAEWOULDBLOCK on Windows.
        Err(e)
            if e.kind() == io::ErrorKind::WouldBlock || e.raw_os_error() == Some(EINPROGRESS) => {}
        Err(e) => panic!("connect: {e}"),
    }
    sock.into()
}

#[cfg(target_os = "linux")]
const EINPROGRESS: i32 = 115;
#[cfg(not(target_os = "linux"))]
const EINPROGRESS: i32 = 36; // the BSDs and macOS; unused on Windows

/// A listener's read handler runs when a connection is waiting to be accepted; a connecting
/// socket's write handler runs once the connection is established.
#[test]
fn nonblocking_connect_and_accept_readiness() {
    let ctx = AioContext::new().unwrap();
    let l = listener();
    l.set_nonblocking(true).unwrap();
    let addr = l.local_addr().unwrap();
    let accepted: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
    let l = Arc::new(l);
    {
        let (l, accepted) = (l.clone(), accepted.clone());
        ctx.set_fd_handler(
            l.raw(),
            boxed(move || {
                let accept = {
                    let _creating = creating_sockets();
                    l.accept()
                };
                match accept {
                    Ok((s, _)) => accepted.lock().unwrap().push(s),
                    // Another poll may have taken it already; level-triggered means "try again".
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("accept: {e}"),
                }
            }),
            None,
        )
        .unwrap();
    }
    assert!(
        !ctx.poll(false),
        "no connection waits: the accept handler does not run"
    );

    let client = Arc::new(connect_nonblocking(addr));
    let connected = Arc::new(AtomicUsize::new(0));
    {
        let (client, connected, weak) = (client.clone(), connected.clone(), ctx.downgrade());
        ctx.set_fd_handler(
            client.raw(),
            None,
            boxed(move || {
                assert!(
                    client.take_error().unwrap().is_none(),
                    "the connect succeeded"
                );
                client.peer_addr().expect("writable means connected");
                connected.fetch_add(1, Ordering::SeqCst);
                weak.upgrade()
                    .unwrap()
                    .set_fd_handler(client.raw(), None, None)
                    .unwrap();
            }),
        )
        .unwrap();
    }
    poll_until(&ctx, "connect and accept", || {
        connected.load(Ordering::SeqCst) == 1 && accepted.lock().unwrap().len() == 1
    });
    assert_eq!(
        accepted.lock().unwrap()[0].peer_addr().unwrap(),
        client.local_addr().unwrap()
    );
    // Both sides work: the accepted socket reads what the client writes.
    (&*client).write_all(b"ping").unwrap();
    let server = accepted.lock().unwrap().pop().unwrap();
    server.set_nonblocking(true).unwrap();
    let got = Arc::new(Mutex::new(Vec::new()));
    let server_fd = server.raw();
    let s = Arc::new(Mutex::new(server));
    {
        let (s, got) = (s.clone(), got.clone());
        let read = move || {
            got.lock()
                .unwrap()
                .extend(read_available(&mut s.lock().unwrap()).0)
        };
        ctx.set_fd_handler(server_fd, boxed(read), None).unwrap();
    }
    poll_until(&ctx, "the ping", || got.lock().unwrap().len() == 4);
    assert_eq!(&got.lock().unwrap()[..], b"ping");
    assert_eq!(
        connected.load(Ordering::SeqCst),
        1,
        "the removed handler never ran again"
    );
    ctx.set_fd_handler(s.lock().unwrap().raw(), None, None)
        .unwrap();
    ctx.set_fd_handler(l.raw(), None, None).unwrap();
    assert!(ctx.registered_fds().is_empty());
}

/// A connect that fails (nobody listens) makes the socket ready with an error.
#[test]
fn failed_connect_is_reported() {
    let ctx = AioContext::new().unwrap();
    let addr = {
        // A port that was just free: nothing listens on it any more.
        let l = listener();
        l.local_addr().unwrap()
    };
    let client = Arc::new(connect_nonblocking(addr));
    let error: Arc<Mutex<Option<io::Error>>> = Arc::default();
    {
        let (c, error, weak) = (client.clone(), error.clone(), ctx.downgrade());
        let handler = move || {
            if let Some(e) = c.take_error().unwrap() {
                *error.lock().unwrap() = Some(e);
                let ctx = weak.upgrade().unwrap();
                ctx.set_fd_handler(c.raw(), None, None).unwrap();
            }
        };
        // A failed connect is an error: both handlers run for it.
        let h2 = handler.clone();
        ctx.set_fd_handler(client.raw(), boxed(handler), boxed(h2))
            .unwrap();
    }
    poll_until(&ctx, "the connect to fail", || {
        error.lock().unwrap().is_some()
    });
    let e = error.lock().unwrap().take().unwrap();
    assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused, "{e}");
    assert!(ctx.registered_fds().is_empty());
}

/// The peer closes: the read handler gets the last data, then end-of-file, and removes itself.
#[test]
fn peer_close_read_handler_sees_eof_and_removes_itself() {
    let ctx = AioContext::new().unwrap();
    let (mut a, b) = tcp_pair();
    let fd = b.raw();
    let got = Arc::new(Mutex::new(Vec::new()));
    let runs = Arc::new(AtomicUsize::new(0));
    let eof = Arc::new(AtomicUsize::new(0));
    {
        let (got, runs, eof, weak) = (got.clone(), runs.clone(), eof.clone(), ctx.downgrade());
        let mut b = b;
        ctx.set_fd_handler(
            fd,
            boxed(move || {
                runs.fetch_add(1, Ordering::SeqCst);
                let (data, closed) = read_available(&mut b);
                got.lock().unwrap().extend(data);
                if closed {
                    eof.fetch_add(1, Ordering::SeqCst);
                    // Removing itself drops this closure, and with it (after it returns) `b`.
                    weak.upgrade()
                        .unwrap()
                        .set_fd_handler(fd, None, None)
                        .unwrap();
                }
            }),
            None,
        )
        .unwrap();
    }
    assert!(!ctx.poll(false));
    write_now(&mut a, b"last words");
    drop(a);
    poll_until(&ctx, "end-of-file", || eof.load(Ordering::SeqCst) > 0);
    assert_eq!(&got.lock().unwrap()[..], b"last words");
    assert_eq!(eof.load(Ordering::SeqCst), 1);
    assert!(ctx.registered_fds().is_empty());
    let before = runs.load(Ordering::SeqCst);
    assert!(!ctx.poll(false), "a removed handler does not run");
    assert_eq!(runs.load(Ordering::SeqCst), before);
}

/// 200 sockets and 100 event notifiers in one context: far beyond Windows' 64 handles per wait
/// and 64 sockets per select(). Each is reported exactly when ready, including a notifier set and
/// a socket written from another thread while the loop is blocked.
#[test]
fn two_hundred_sockets_and_a_hundred_notifiers() {
    const PAIRS: usize = 100;
    const NOTIFIERS: usize = 100;
    let ctx = AioContext::new().unwrap();
    let mut socks = Vec::new();
    for _ in 0..PAIRS {
        let (a, b) = tcp_pair();
        socks.push(a);
        socks.push(b);
    }
    let socks: Vec<Arc<Mutex<TcpStream>>> =
        socks.into_iter().map(|s| Arc::new(Mutex::new(s))).collect();
    let sock_bytes: Arc<Vec<AtomicUsize>> =
        Arc::new((0..socks.len()).map(|_| AtomicUsize::new(0)).collect());
    for (i, s) in socks.iter().enumerate() {
        let (s2, counts) = (s.clone(), sock_bytes.clone());
        ctx.set_fd_handler(
            s.lock().unwrap().raw(),
            boxed(move || {
                let (data, eof) = read_available(&mut s2.lock().unwrap());
                assert!(!eof);
                counts[i].fetch_add(data.len(), Ordering::SeqCst);
            }),
            None,
        )
        .unwrap();
    }
    let notifiers: Vec<Arc<EventNotifier>> = (0..NOTIFIERS)
        .map(|_| Arc::new(EventNotifier::new().unwrap()))
        .collect();
    let notified: Arc<Vec<AtomicUsize>> =
        Arc::new((0..NOTIFIERS).map(|_| AtomicUsize::new(0)).collect());
    for (i, n) in notifiers.iter().enumerate() {
        let (n2, counts) = (n.clone(), notified.clone());
        ctx.set_event_notifier(
            n,
            boxed(move || {
                if n2.test_and_clear() {
                    counts[i].fetch_add(1, Ordering::SeqCst);
                }
            }),
        )
        .unwrap();
    }
    assert_eq!(ctx.registered_fds().len(), 2 * PAIRS + NOTIFIERS);
    let counts = |v: &[AtomicUsize]| {
        v.iter()
            .map(|c| c.load(Ordering::SeqCst))
            .collect::<Vec<_>>()
    };
    assert!(!ctx.poll(false), "nothing is ready yet");

    // Everything at once: each pair writes one byte each way, every notifier is set.
    for s in &socks {
        write_now(&mut s.lock().unwrap(), b"x");
    }
    for n in &notifiers {
        n.set().unwrap();
    }
    poll_until(&ctx, "every socket and notifier", || {
        counts(&sock_bytes).iter().all(|&c| c == 1) && counts(&notified).iter().all(|&c| c == 1)
    });
    assert!(!ctx.poll(false), "all consumed: nothing is reported twice");
    assert_eq!(counts(&sock_bytes), vec![1; 2 * PAIRS]);
    assert_eq!(counts(&notified), vec![1; NOTIFIERS]);

    // One at a time, from another thread while the loop blocks: the last registered of each
    // (beyond any 64-handle group), then the first.
    for (sock, notifier) in [(2 * PAIRS - 1, NOTIFIERS - 1), (0, 0)] {
        let peer = socks[sock ^ 1].clone();
        let n = notifiers[notifier].clone();
        let t = thread::spawn(move || {
            n.set().unwrap();
            write_now(&mut peer.lock().unwrap(), b"yz");
        });
        poll_until(&ctx, "the cross-thread wake-ups", || {
            sock_bytes[sock].load(Ordering::SeqCst) == 3
                && notified[notifier].load(Ordering::SeqCst) == 2
        });
        t.join().unwrap();
    }
    let mut want_bytes = vec![1; 2 * PAIRS];
    want_bytes[0] = 3;
    want_bytes[2 * PAIRS - 1] = 3;
    let mut want_notified = vec![1; NOTIFIERS];
    want_notified[0] = 2;
    want_notified[NOTIFIERS - 1] = 2;
    assert_eq!(
        counts(&sock_bytes),
        want_bytes,
        "no other socket was reported"
    );
    assert_eq!(
        counts(&notified),
        want_notified,
        "no other notifier was reported"
    );

    for s in &socks {
        ctx.set_fd_handler(s.lock().unwrap().raw(), None, None)
            .unwrap();
    }
    for n in &notifiers {
        ctx.set_event_notifier(n, None).unwrap();
    }
    assert!(ctx.registered_fds().is_empty());
    assert!(!ctx.poll(false));
}

/// Two sockets ready in the same wait; whichever handler runs first removes the other and closes
/// its socket. The removed handler never runs, although its socket was reported ready, and the
/// loop goes on working with the remaining one.
#[test]
fn socket_removed_from_inside_another_sockets_handler() {
    let ctx = AioContext::new().unwrap();
    let (mut a1, b1) = tcp_pair();
    let (mut a2, b2) = tcp_pair();
    let fds = [b1.raw(), b2.raw()];
    let socks: Arc<Mutex<[Option<TcpStream>; 2]>> = Arc::new(Mutex::new([Some(b1), Some(b2)]));
    let runs: Arc<[AtomicUsize; 2]> = Arc::default();
    for me in 0..2 {
        let (socks, runs, weak) = (socks.clone(), runs.clone(), ctx.downgrade());
        let other = 1 - me;
        ctx.set_fd_handler(
            fds[me],
            boxed(move || {
                runs[me].fetch_add(1, Ordering::SeqCst);
                let mut socks = socks.lock().unwrap();
                if let Some(doomed) = socks[other].take() {
                    weak.upgrade()
                        .unwrap()
                        .set_fd_handler(fds[other], None, None)
                        .unwrap();
                    drop(doomed);
                }
                if let Some(mine) = socks[me].as_mut() {
                    read_available(mine);
                }
            }),
            None,
        )
        .unwrap();
    }
    write_now(&mut a1, b"1");
    write_now(&mut a2, b"2");
    // Both are ready before the poll looks.
    poll_until(&ctx, "the first handler", || {
        runs.iter().map(|r| r.load(Ordering::SeqCst)).sum::<usize>() > 0
    });
    let survivor = if runs[0].load(Ordering::SeqCst) > 0 {
        0
    } else {
        1
    };
    let removed = 1 - survivor;
    assert_eq!(
        runs[removed].load(Ordering::SeqCst),
        0,
        "the removed handler never ran"
    );
    assert_eq!(ctx.registered_fds(), vec![fds[survivor]]);
    assert!(
        socks.lock().unwrap()[removed].is_none(),
        "and its socket is closed"
    );

    // The survivor keeps working; the closed one's peer sees the close.
    let (survivor_peer, removed_peer) = if survivor == 0 {
        (&mut a1, &mut a2)
    } else {
        (&mut a2, &mut a1)
    };
    write_now(survivor_peer, b"again");
    let before = runs[survivor].load(Ordering::SeqCst);
    poll_until(&ctx, "the survivor", || {
        runs[survivor].load(Ordering::SeqCst) > before
    });
    removed_peer.set_nonblocking(false).unwrap();
    let mut rest = Vec::new();
    match removed_peer.read_to_end(&mut rest) {
        Ok(_) => {}
        // Closing with unread data may reset the connection instead of a clean end-of-file.
        Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}"),
    }
    assert_eq!(runs[removed].load(Ordering::SeqCst), 0);
    ctx.set_fd_handler(fds[survivor], None, None).unwrap();
}

/// A socket closed while its handler is still registered (a caller bug) does not break the
/// loop: other sockets keep being served, and removing the stale handler afterwards works.
/// (What the stale handler sees differs: epoll forgets a closed descriptor, poll(2) and Windows
/// report it as an error.)
#[test]
fn a_socket_closed_while_registered_does_not_break_the_loop() {
    let ctx = AioContext::new().unwrap();
    let (doomed, _doomed_peer) = tcp_pair();
    let (mut a, mut b) = tcp_pair();
    let doomed_fd = doomed.raw();
    ctx.set_fd_handler(doomed_fd, boxed(|| {}), None).unwrap();
    let got = Arc::new(AtomicUsize::new(0));
    let b_fd = b.raw();
    {
        let got = got.clone();
        ctx.set_fd_handler(
            b_fd,
            boxed(move || {
                got.fetch_add(read_available(&mut b).0.len(), Ordering::SeqCst);
            }),
            None,
        )
        .unwrap();
    }
    // Until the stale registration is gone, no other test may get the closed socket's value.
    let no_new_sockets = no_new_sockets();
    drop(doomed);
    write_now(&mut a, b"still here");
    poll_until(&ctx, "the live socket", || got.load(Ordering::SeqCst) == 10);
    ctx.set_fd_handler(doomed_fd, None, None).unwrap();
    drop(no_new_sockets);
    ctx.set_fd_handler(b_fd, None, None).unwrap();
    assert!(ctx.registered_fds().is_empty());
    assert!(!ctx.poll(false));
}
