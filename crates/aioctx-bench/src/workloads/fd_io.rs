//! Workload 5: fd readiness.
//!
//! Both ends of every connection live on the same loop, on one thread, so the
//! workload measures readiness dispatch and nothing else:
//!
//! * **5a socketpair ping-pong**: a 1-byte message bounced across a Unix
//!   socketpair.
//! * **5b/5c loopback TCP echo** with 1 and with 100 connections: each client
//!   end sends a 64-byte message, the server end echoes it, the client counts
//!   the round trip and sends the next. With 100 connections, 100 messages are
//!   in flight at once.
//!
//! Reports ns per round trip. Every socket end is a non-blocking fd wrapped in
//! a `File`; the per-end logic ([`ClientEnd`], [`ServerEnd`]) is shared:
//!
//! * aioctx: `set_fd_handler` read handlers (level-triggered: one read per
//!   callback).
//! * calloop: `Generic` sources in `Mode::Level` (one read per callback).
//! * mio: `SourceFd` registrations (edge-triggered: read until `WouldBlock`).
//! * tokio: `AsyncFd` in tasks on a current_thread runtime (read until
//!   `WouldBlock`, then `clear_ready`, as tokio's own sockets do).

use std::cell::RefCell;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::rc::Rc;
use std::sync::Arc;

use crate::harness::{self, ns_per_op, Contender, Scale, System};
use crate::workloads::Report;

/// Which connections a sub-workload uses.
#[derive(Clone, Copy)]
enum Kind {
    SocketPair,
    Tcp { conns: usize },
}

impl Kind {
    fn msg_len(self) -> usize {
        match self {
            Kind::SocketPair => 1,
            Kind::Tcp { .. } => 64,
        }
    }

    /// Fresh connected (client, server) pairs, non-blocking.
    fn connect(self) -> Vec<(Arc<File>, Arc<File>)> {
        let to_file = |fd: OwnedFd| Arc::new(File::from(fd));
        match self {
            Kind::SocketPair => {
                let (a, b) = UnixStream::pair().expect("socketpair");
                a.set_nonblocking(true).unwrap();
                b.set_nonblocking(true).unwrap();
                vec![(to_file(a.into()), to_file(b.into()))]
            }
            Kind::Tcp { conns } => {
                let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
                let addr = listener.local_addr().unwrap();
                (0..conns)
                    .map(|_| {
                        let c = TcpStream::connect(addr).expect("connect loopback");
                        let (s, _) = listener.accept().expect("accept");
                        for t in [&c, &s] {
                            t.set_nodelay(true).unwrap();
                            t.set_nonblocking(true).unwrap();
                        }
                        (to_file(c.into()), to_file(s.into()))
                    })
                    .collect()
            }
        }
    }
}

/// Runs the three fd workloads.
pub fn run(scale: Scale, report: &mut Report) {
    let subs = [
        (
            "5a fd ping-pong socketpair",
            Kind::SocketPair,
            scale.n(200_000, 40_000),
        ),
        (
            "5b TCP echo 1 conn",
            Kind::Tcp { conns: 1 },
            scale.n(100_000, 20_000),
        ),
        (
            "5c TCP echo 100 conns",
            Kind::Tcp { conns: 100 },
            scale.n(200_000, 40_000),
        ),
    ];
    for (name, kind, n) in subs {
        let contenders = vec![
            aioctx(kind, n),
            tokio(kind, n),
            calloop(kind, n),
            mio(kind, n),
        ];
        report
            .rows
            .extend(harness::run(name, scale.rounds(10, 4), contenders));
    }
}

/// The client end: sends a message, counts the echo, sends the next.
pub struct ClientEnd {
    sock: Arc<File>,
    msg_len: usize,
    /// Bytes of the current echo received so far.
    received: usize,
    /// Round trips still to make this round.
    left: u64,
}

impl ClientEnd {
    fn new(sock: Arc<File>, msg_len: usize) -> Self {
        ClientEnd {
            sock,
            msg_len,
            received: 0,
            left: 0,
        }
    }

    /// Starts a round of `quota` round trips (`quota` must be at least 1).
    fn begin(&mut self, quota: u64) {
        self.left = quota;
        self.send();
    }

    fn send(&mut self) {
        let buf = [0x5au8; 64];
        (&*self.sock)
            .write_all(&buf[..self.msg_len])
            .expect("client write");
    }

    /// Handles readability; reads once, or until `WouldBlock` if `drain`.
    /// Returns the number of round trips completed.
    fn on_readable(&mut self, drain: bool) -> u64 {
        let mut done = 0;
        let mut buf = [0u8; 256];
        loop {
            match (&*self.sock).read(&mut buf) {
                Ok(0) => break,
                Ok(k) => {
                    self.received += k;
                    while self.received >= self.msg_len {
                        self.received -= self.msg_len;
                        self.left -= 1;
                        done += 1;
                        if self.left > 0 {
                            self.send();
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("client read: {e}"),
            }
            if !drain {
                break;
            }
        }
        done
    }
}

/// The server end: echoes whatever it reads.
pub struct ServerEnd {
    sock: Arc<File>,
}

impl ServerEnd {
    /// Handles readability; reads once, or until `WouldBlock` if `drain`.
    fn on_readable(&mut self, drain: bool) {
        let mut buf = [0u8; 4096];
        loop {
            match (&*self.sock).read(&mut buf) {
                Ok(0) => break,
                // At most one 64-byte message per connection is in flight, so
                // the echo always fits in the socket buffer.
                Ok(k) => (&*self.sock).write_all(&buf[..k]).expect("echo write"),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("server read: {e}"),
            }
            if !drain {
                break;
            }
        }
    }
}

/// Round trips per connection so that the round makes about `n` in total.
fn quota(n: u64, conns: usize) -> u64 {
    (n / conns as u64).max(1)
}

fn aioctx(kind: Kind, n: u64) -> Contender<'static> {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Mutex;
    let ctx = aioctx::AioContext::new().expect("aioctx");
    let conns = kind.connect();
    let q = quota(n, conns.len());
    let total = q * conns.len() as u64;
    let done = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    // The handlers own their sockets, so the descriptors stay open until the
    // context (and with it every handler) is dropped.
    for (c, s) in conns {
        let fd = s.as_raw_fd();
        let mut server = ServerEnd { sock: s };
        ctx.set_fd_handler(fd, Some(Box::new(move || server.on_readable(false))), None)
            .expect("set server handler");
        let fd = c.as_raw_fd();
        let client = Arc::new(Mutex::new(ClientEnd::new(c, kind.msg_len())));
        let (cl, d) = (client.clone(), done.clone());
        let on_read = move || {
            let k = cl.lock().unwrap().on_readable(false);
            d.fetch_add(k, Ordering::Relaxed);
        };
        ctx.set_fd_handler(fd, Some(Box::new(on_read)), None)
            .expect("set client handler");
        clients.push(client);
    }
    Contender::new(System::Aioctx, move || {
        vec![ns_per_op(total, || {
            done.store(0, Ordering::Relaxed);
            for c in &clients {
                c.lock().unwrap().begin(q);
            }
            while done.load(Ordering::Relaxed) < total {
                ctx.poll(true);
            }
        })]
    })
}

fn tokio(kind: Kind, n: u64) -> Contender<'static> {
    use tokio::io::unix::AsyncFd;
    fn register(sock: Arc<File>) -> AsyncFd<Arc<File>> {
        // SAFETY: the Arc<File> inside the AsyncFd keeps the descriptor open
        // and always returns the same fd for as long as the AsyncFd lives.
        unsafe { AsyncFd::register_with_interest(sock, tokio::io::Interest::READABLE) }
            .map_err(|e| e.into_parts().1)
            .expect("AsyncFd register")
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .expect("tokio runtime");
    let conns = kind.connect();
    let q = quota(n, conns.len());
    let total = q * conns.len() as u64;
    let mut clients = Vec::new();
    rt.block_on(async {
        for (c, s) in conns {
            let afd = register(s.clone());
            let mut server = ServerEnd { sock: s };
            tokio::spawn(async move {
                loop {
                    let mut g = afd.readable().await.expect("readable");
                    server.on_readable(true);
                    g.clear_ready();
                }
            });
            let afd = register(c.clone());
            clients.push((afd, ClientEnd::new(c, kind.msg_len())));
        }
    });
    Contender::new(System::Tokio, move || {
        vec![ns_per_op(total, || {
            rt.block_on(async {
                let tasks: Vec<_> = clients
                    .drain(..)
                    .map(|(afd, mut end)| {
                        tokio::spawn(async move {
                            end.begin(q);
                            while end.left > 0 {
                                let mut g = afd.readable().await.expect("readable");
                                end.on_readable(true);
                                g.clear_ready();
                            }
                            (afd, end)
                        })
                    })
                    .collect();
                for t in tasks {
                    clients.push(t.await.expect("client task"));
                }
            })
        })]
    })
}

fn calloop(kind: Kind, n: u64) -> Contender<'static> {
    use calloop::generic::Generic;
    use calloop::{Interest, Mode, PostAction};
    let mut el = calloop::EventLoop::<u64>::try_new().expect("calloop loop");
    let h = el.handle();
    let conns = kind.connect();
    let q = quota(n, conns.len());
    let total = q * conns.len() as u64;
    let mut clients = Vec::new();
    for (c, s) in conns {
        let mut server = ServerEnd { sock: s.clone() };
        h.insert_source(
            Generic::new(s, Interest::READ, Mode::Level),
            move |_, _, _| {
                server.on_readable(false);
                Ok(PostAction::Continue)
            },
        )
        .expect("insert server");
        let client = Rc::new(RefCell::new(ClientEnd::new(c.clone(), kind.msg_len())));
        let cl = client.clone();
        h.insert_source(
            Generic::new(c, Interest::READ, Mode::Level),
            move |_, _, done: &mut u64| {
                *done += cl.borrow_mut().on_readable(false);
                Ok(PostAction::Continue)
            },
        )
        .expect("insert client");
        clients.push(client);
    }
    Contender::new(System::Calloop, move || {
        vec![ns_per_op(total, || {
            let mut done = 0;
            for c in &clients {
                c.borrow_mut().begin(q);
            }
            while done < total {
                el.dispatch(None, &mut done).expect("dispatch");
            }
        })]
    })
}

fn mio(kind: Kind, n: u64) -> Contender<'static> {
    use mio::unix::SourceFd;
    use mio::{Events, Interest, Poll, Token};
    let mut poll = Poll::new().expect("mio poll");
    let conns = kind.connect();
    let q = quota(n, conns.len());
    let total = q * conns.len() as u64;
    let mut clients = Vec::new();
    let mut servers = Vec::new();
    for (i, (c, s)) in conns.into_iter().enumerate() {
        let reg = poll.registry();
        reg.register(
            &mut SourceFd(&c.as_raw_fd()),
            Token(2 * i),
            Interest::READABLE,
        )
        .expect("register client");
        reg.register(
            &mut SourceFd(&s.as_raw_fd()),
            Token(2 * i + 1),
            Interest::READABLE,
        )
        .expect("register server");
        clients.push(ClientEnd::new(c, kind.msg_len()));
        servers.push(ServerEnd { sock: s });
    }
    let mut events = Events::with_capacity(256);
    Contender::new(System::Mio, move || {
        vec![ns_per_op(total, || {
            let mut done = 0;
            for c in &mut clients {
                c.begin(q);
            }
            while done < total {
                poll.poll(&mut events, None).expect("mio poll");
                for ev in &events {
                    let i = ev.token().0;
                    if i % 2 == 0 {
                        done += clients[i / 2].on_readable(true);
                    } else {
                        servers[i / 2].on_readable(true);
                    }
                }
            }
        })]
    })
}
