//! The server: a listening socket, I/O threads each running an
//! [`AioContext`], and orderly shutdown.
//!
//! Thread 0 is the main thread. Its context watches the listener and the
//! shutdown notifier, and also serves connections like every other I/O
//! thread. Accepted sockets are handed round-robin to the I/O threads with
//! a one-shot bottom half on the chosen context, so each connection lives
//! entirely on one thread.
//!
//! Shutdown (SIGINT/SIGTERM, or the last client leaving without
//! `--persistent`): stop accepting, let every connection answer what it has
//! in flight, wait for outstanding file I/O, `fdatasync` the image, exit.

use std::io;
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use aioctx::{AioContext, Canceled, ClockType, EventNotifier, Handler, SCALE_MS};
use parking_lot::Mutex;
use tracing::{debug, error, info, warn};

use crate::conn::{Conn, Stream};
use crate::export::Export;
use crate::handshake::ExportInfo;

/// How long connections get to drain after a shutdown signal.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Connections accepted per listener event before going back to the loop.
const ACCEPTS_PER_EVENT: usize = 16;

/// Where the server listens.
#[derive(Debug)]
pub enum Listener {
    /// TCP socket.
    Tcp(TcpListener),
    /// Unix socket, removed on exit.
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Binds a TCP listener to `addr:port` (port 0 picks a free one).
    pub fn tcp(addr: &str, port: u16) -> io::Result<Listener> {
        let addrs: Vec<SocketAddr> = (addr, port).to_socket_addrs()?.collect();
        let l = TcpListener::bind(&addrs[..])?;
        l.set_nonblocking(true)?;
        Ok(Listener::Tcp(l))
    }

    /// Binds a Unix socket listener at `path`.
    pub fn unix(path: PathBuf) -> io::Result<Listener> {
        let l = UnixListener::bind(&path)?;
        l.set_nonblocking(true)?;
        Ok(Listener::Unix(l, path))
    }

    /// The NBD URI clients connect to.
    pub fn uri(&self, export_name: &str) -> io::Result<String> {
        Ok(match self {
            Listener::Tcp(l) => {
                let a = l.local_addr()?;
                let host = match a {
                    SocketAddr::V4(v4) => v4.ip().to_string(),
                    SocketAddr::V6(v6) => format!("[{}]", v6.ip()),
                };
                let name = if export_name.is_empty() {
                    String::new()
                } else {
                    format!("/{export_name}")
                };
                format!("nbd://{host}:{}{name}", a.port())
            }
            Listener::Unix(_, path) => {
                format!("nbd+unix:///{export_name}?socket={}", path.display())
            }
        })
    }

    fn raw_fd(&self) -> RawFd {
        match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix(l, _) => l.as_raw_fd(),
        }
    }

    fn accept(&self) -> io::Result<(Stream, String)> {
        match self {
            Listener::Tcp(l) => {
                let (s, addr) = l.accept()?;
                s.set_nonblocking(true)?;
                s.set_nodelay(true)?;
                Ok((Stream::Tcp(s), addr.to_string()))
            }
            Listener::Unix(l, _) => {
                let (s, _) = l.accept()?;
                s.set_nonblocking(true)?;
                Ok((Stream::Unix(s), "unix".to_string()))
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Server settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Export name, description, size, read-only.
    pub info: ExportInfo,
    /// Number of I/O threads (at least 1; the main thread is one of them).
    pub threads: usize,
    /// Maximum clients connected at once.
    pub max_clients: usize,
    /// Keep running when the last client leaves.
    pub persistent: bool,
    /// Time allowed for the handshake.
    pub handshake_timeout: Duration,
    /// Busy-polling window of each I/O thread's context, in ns (0: off).
    pub poll_max_ns: u64,
}

/// State shared by all threads.
pub struct Shared {
    main: AioContext,
    active: AtomicUsize,
    inflight: AtomicUsize,
    shutting_down: AtomicBool,
    conns: Mutex<Vec<(AioContext, Weak<Mutex<Conn>>)>>,
}

impl Shared {
    /// Records a live connection so shutdown can reach it.
    pub(crate) fn register(&self, ctx: &AioContext, conn: Weak<Mutex<Conn>>) {
        let mut conns = self.conns.lock();
        conns.retain(|(_, w)| w.strong_count() > 0);
        conns.push((ctx.clone(), conn));
    }

    /// A connection is closed and has nothing in flight.
    pub(crate) fn connection_finished(&self) {
        self.active.fetch_sub(1, Ordering::AcqRel);
        self.main.notify();
    }

    pub(crate) fn request_started(&self) {
        self.inflight.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn request_finished(&self) {
        if self.inflight.fetch_sub(1, Ordering::AcqRel) == 1 && self.is_shutting_down() {
            self.main.notify();
        }
    }

    /// Whether a shutdown has begun.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }
}

/// Runs `work` on `ctx`'s thread pool and then `done` with its result on
/// `ctx`'s own thread. We never cancel, so `done` always gets the result.
pub(crate) fn offload<T: Send + 'static>(
    ctx: &AioContext,
    work: impl FnOnce() -> T + Send + 'static,
    done: impl FnOnce(T) + Send + 'static,
) {
    // Dropping the AioCb does not cancel the request.
    let _ = ctx
        .thread_pool()
        .submit_aio(work, move |result| match result {
            Ok(value) => done(value),
            Err(Canceled) => unreachable!("thread-pool requests are never cancelled"),
        });
}

/// Accepts connections on the main thread.
struct Acceptor {
    listener: Option<Listener>,
    listening: bool,
    me: Weak<Mutex<Acceptor>>,
    ctxs: Vec<AioContext>,
    next: usize,
    export: Arc<Export>,
    config: Config,
    shared: Arc<Shared>,
    ever_connected: bool,
}

impl Acceptor {
    fn on_readable(&mut self) {
        for _ in 0..ACCEPTS_PER_EVENT {
            if self.shared.active.load(Ordering::Acquire) >= self.config.max_clients {
                break;
            }
            let Some(listener) = &self.listener else {
                return;
            };
            let (stream, peer) = match listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // ECONNABORTED, EMFILE, ...: log and keep serving.
                    warn!(error = %e, "accept failed");
                    break;
                }
            };
            self.shared.active.fetch_add(1, Ordering::AcqRel);
            self.ever_connected = true;
            let ctx = self.ctxs[self.next % self.ctxs.len()].clone();
            self.next += 1;
            debug!(%peer, thread = (self.next - 1) % self.ctxs.len(), "accepted");
            let (export, info, shared) = (
                self.export.clone(),
                self.config.info.clone(),
                self.shared.clone(),
            );
            let timeout = self.config.handshake_timeout;
            let target = ctx.clone();
            target.bh_schedule_oneshot(move || {
                Conn::start(ctx, stream, peer, export, info, shared, timeout)
            });
        }
        self.update_listening();
    }

    /// Watches the listener only while more clients may connect.
    fn update_listening(&mut self) {
        let Some(listener) = &self.listener else {
            return;
        };
        let want = !self.shared.is_shutting_down()
            && self.shared.active.load(Ordering::Acquire) < self.config.max_clients;
        if want == self.listening {
            return;
        }
        let main = &self.ctxs[0];
        let handler = want.then(|| {
            let me = self.me.upgrade().expect("acceptor alive");
            Box::new(move || me.lock().on_readable()) as Handler
        });
        match main.set_fd_handler(listener.raw_fd(), handler, None) {
            Ok(()) => self.listening = want,
            Err(e) => error!(error = %e, "cannot watch the listening socket"),
        }
        if !want {
            debug!("not accepting connections for now");
        }
    }

    fn stop_listening(&mut self) {
        if let Some(l) = &self.listener {
            if self.listening {
                let _ = self.ctxs[0].set_fd_handler(l.raw_fd(), None, None);
                self.listening = false;
            }
        }
        self.listener = None;
    }
}

/// A configured server, ready to run.
pub struct Server {
    config: Config,
    export: Arc<Export>,
    listener: Listener,
}

impl Server {
    /// Prepares a server for `export` on `listener`.
    pub fn new(config: Config, export: Arc<Export>, listener: Listener) -> Server {
        Server {
            config,
            export,
            listener,
        }
    }

    /// Serves until a shutdown signal, or (without `persistent`) until the
    /// last client has left. On return every acknowledged write has been
    /// flushed to stable storage.
    pub fn run(self) -> io::Result<()> {
        let Server {
            config,
            export,
            listener,
        } = self;
        let threads = config.threads.max(1);
        let mut ctxs = Vec::with_capacity(threads);
        for _ in 0..threads {
            ctxs.push(
                AioContext::builder()
                    .poll_max_ns(config.poll_max_ns)
                    .build()?,
            );
        }
        let main = ctxs[0].clone();
        let shared = Arc::new(Shared {
            main: main.clone(),
            active: AtomicUsize::new(0),
            inflight: AtomicUsize::new(0),
            shutting_down: AtomicBool::new(false),
            conns: Mutex::new(Vec::new()),
        });

        let stop_workers = Arc::new(AtomicBool::new(false));
        let workers: Vec<JoinHandle<()>> = ctxs[1..]
            .iter()
            .enumerate()
            .map(|(i, ctx)| {
                let (ctx, stop) = (ctx.clone(), stop_workers.clone());
                std::thread::Builder::new()
                    .name(format!("nbd-io-{}", i + 1))
                    .spawn(move || {
                        while !stop.load(Ordering::Acquire) {
                            ctx.poll(true);
                        }
                    })
            })
            .collect::<io::Result<_>>()?;

        let persistent = config.persistent;
        let acceptor = Arc::new_cyclic(|me| {
            Mutex::new(Acceptor {
                listener: Some(listener),
                listening: false,
                me: me.clone(),
                ctxs: ctxs.clone(),
                next: 0,
                export: export.clone(),
                config,
                shared: shared.clone(),
                ever_connected: false,
            })
        });
        acceptor.lock().update_listening();

        // SIGINT/SIGTERM: a signal thread sets a notifier the main loop
        // watches. A second signal exits at once.
        let signalled = Arc::new(EventNotifier::new()?);
        let shutdown_requested = Arc::new(AtomicBool::new(false));
        {
            let n = signalled.clone();
            let flag = shutdown_requested.clone();
            main.set_event_notifier(
                &signalled,
                Some(Box::new(move || {
                    if n.test_and_clear() {
                        flag.store(true, Ordering::Release);
                    }
                })),
            )?;
        }
        spawn_signal_thread(signalled.clone())?;

        let deadline_timer = main.timer_new(ClockType::Realtime, SCALE_MS, || {});
        let mut deadline: Option<i64> = None;
        loop {
            main.poll(true);
            let active = shared.active.load(Ordering::Acquire);
            if shutdown_requested.load(Ordering::Acquire) && deadline.is_none() {
                info!(active, "shutting down");
                begin_shutdown(&shared, &acceptor);
                let at = now_ms() + SHUTDOWN_GRACE.as_millis() as i64;
                deadline_timer.modify(at);
                deadline = Some(at);
            }
            if let Some(at) = deadline {
                if active == 0 {
                    break;
                }
                if now_ms() >= at && shared.inflight.load(Ordering::Acquire) == 0 {
                    warn!(active, "clients did not finish in time, exiting anyway");
                    break;
                }
                if now_ms() >= at {
                    // Wait for file I/O to finish; poll wakes on completions.
                    deadline_timer.modify(now_ms() + 100);
                }
                continue;
            }
            let mut acc = acceptor.lock();
            if !persistent && acc.ever_connected && active == 0 {
                info!("last client left, exiting (use --persistent to keep serving)");
                shared.shutting_down.store(true, Ordering::Release);
                acc.stop_listening();
                break;
            }
            acc.update_listening();
        }

        let _ = main.set_event_notifier(&signalled, None);
        acceptor.lock().stop_listening();
        stop_workers.store(true, Ordering::Release);
        for ctx in &ctxs[1..] {
            ctx.notify();
        }
        for w in workers {
            let _ = w.join();
        }
        export.flush()?;
        info!("image flushed, bye");
        Ok(())
    }
}

fn now_ms() -> i64 {
    aioctx::clock_get_ns(ClockType::Realtime) / SCALE_MS
}

/// Stops accepting and asks every connection, on its own thread, to finish.
fn begin_shutdown(shared: &Arc<Shared>, acceptor: &Arc<Mutex<Acceptor>>) {
    shared.shutting_down.store(true, Ordering::Release);
    acceptor.lock().stop_listening();
    let conns = shared.conns.lock().clone();
    for (ctx, weak) in conns {
        ctx.bh_schedule_oneshot(move || {
            if let Some(conn) = weak.upgrade() {
                conn.lock().begin_shutdown();
            }
        });
    }
}

fn spawn_signal_thread(notifier: Arc<EventNotifier>) -> io::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])?;
    std::thread::Builder::new()
        .name("nbd-signals".into())
        .spawn(move || {
            let mut seen = false;
            for sig in signals.forever() {
                if seen {
                    eprintln!("aioctx-nbd: second signal {sig}, exiting now");
                    std::process::exit(1);
                }
                seen = true;
                if let Err(e) = notifier.set() {
                    eprintln!("aioctx-nbd: cannot signal the main loop: {e}");
                    std::process::exit(1);
                }
            }
        })?;
    Ok(())
}
