//! One client connection: a state machine driven by aioctx fd handlers.
//!
//! The socket is non-blocking. Its read handler pulls as many bytes as are
//! available into a buffer and decodes every complete message in it
//! (handshake options, then transmission requests); its write handler is
//! installed only while replies are queued. Replies are appended to an
//! output queue and sent with `writev`, many per system call.
//!
//! Large page-aligned write payloads skip the buffer: they move from the
//! socket into the file with `splice` through a pipe (one copy instead of
//! two, see [`Export::spliceable`]). That needs the payload still in the
//! socket, so after such a write the connection reads exactly one request
//! header at a time until a request comes that is not such a write. A spliced
//! payload reaches the file piece by piece as it arrives, so a client that
//! vanishes half-way leaves the first part of its write in the image: the
//! write was never acknowledged, and NBD, like a disk, promises nothing
//! for it. While a payload is incomplete the connection keeps its context
//! from busy-polling ([`aioctx::AioContext::disable_polling`]).
//!
//! Requests run concurrently: large reads whose range is in the page cache
//! are queued as file ranges and sent with `sendfile` (no copy on this
//! thread); other reads are first tried on the loop thread with
//! `RWF_NOWAIT` (page-cache hits finish at once), small non-FUA writes are
//! written into the page cache inline ([`Export::write_inline`]);
//! everything that may block goes to the context's thread pool, and its completion, which runs back on
//! the loop thread, queues the reply. Replies therefore leave in completion
//! order, not request order, which the protocol allows.
//!
//! Ownership: an open connection owns itself (`keepalive`); its fd
//! handlers, timer and bottom half hold weak references, and each in-flight
//! completion a strong one. Closing removes the fd handlers and drops the
//! self-reference, so the connection is freed once its last in-flight
//! request has completed.

use std::io::{self, IoSlice, Read};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Weak};
use std::time::Duration;

use aioctx::{
    clock_get_ns, AioContext, Bh, ClockType, Handler, PollingDisabled, Timer, SCALE_MS, SCALE_NS,
};
use parking_lot::Mutex;
use rustix::io::Errno;
use rustix::net::{SendAncillaryBuffer, SendFlags};
use rustix::pipe::SpliceFlags;
use tracing::{debug, info, trace, warn};

use crate::export::{nbd_errno, read_from_pipe, Export, ZeroError};
use crate::handshake::{ExportInfo, Handshake, Step};
use crate::proto::{self, errno, Command, Extent, Request, Session};
use crate::server::Shared;

mod input;
mod output;

use input::{InBuf, PayloadPipe, Pull};
use output::OutQueue;

/// Payloads at least this large are read straight into their own buffer.
const DIRECT_READ_MIN: usize = 16 * 1024;
/// Start no new request while this many are in flight...
const MAX_INFLIGHT: usize = 128;
/// ...or while request buffers and unsent replies hold this many bytes
/// (more than the largest request, so an idle connection can always
/// start one). Queued file ranges count at their length though they hold
/// no memory: the limit also stops a client that does not read its replies
/// from queueing up work without end.
const MAX_BUFFERED: usize = 2 * proto::MAX_REQUEST_LEN as usize;
/// At most this many `read` calls per readiness event, to stay fair to
/// other connections on the same loop.
const READS_PER_EVENT: usize = 4;
/// Block status replies list at most this many extents.
const MAX_EXTENTS: usize = 1024;
/// A connection waiting for the rest of a payload stops its loop from
/// busy-polling, but no longer than this without a read event: a client
/// that stops half-way must not keep the loop's other clients from it.
const PAYLOAD_STALL_NS: i64 = 1_000_000;

/// A connected client socket.
#[derive(Debug)]
pub enum Stream {
    /// TCP.
    Tcp(TcpStream),
    /// Unix domain socket.
    Unix(UnixStream),
}

impl Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
    /// `sendmsg` of `bufs`; with `more`, tells TCP more data follows at
    /// once (`MSG_MORE`), so it holds a partial segment back instead of
    /// sending it on its own. Unix sockets have no segments to hold.
    fn send_vectored(&mut self, bufs: &[IoSlice<'_>], more: bool) -> Result<usize, Errno> {
        // No SIGPIPE for a client that went away: the EPIPE closes the
        // connection.
        let mut flags = SendFlags::NOSIGNAL;
        if more && matches!(self, Stream::Tcp(_)) {
            flags |= SendFlags::MORE;
        }
        rustix::net::sendmsg(self.fd(), bufs, &mut SendAncillaryBuffer::default(), flags)
    }
    fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }
    fn raw_fd(&self) -> RawFd {
        self.fd().as_raw_fd()
    }
    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Tcp(s) => s.as_fd(),
            Stream::Unix(s) => s.as_fd(),
        }
    }
}

/// What the next bytes from the client are.
#[derive(Debug)]
enum Phase {
    /// The 32-bit client flags.
    ClientFlags,
    /// An option header.
    OptionHeader,
    /// `len` bytes of data for `option`.
    OptionData { option: u32, len: usize },
    /// Skipping the data of an oversized option.
    SkipOption { option: u32, remaining: u64 },
    /// A request header.
    Request,
    /// The payload of a write.
    Payload {
        req: Request,
        fua: bool,
        buf: Vec<u8>,
        filled: usize,
    },
    /// The payload of a write moving from the socket into the file with
    /// `splice` (see [`Export::spliceable`]): `received` bytes have left
    /// the socket, `written` of them are in the file, the rest in the pipe.
    SplicePayload {
        req: Request,
        received: usize,
        written: usize,
    },
    /// Skipping the payload of a refused write, then sending its error.
    SkipPayload {
        handle: u64,
        remaining: u64,
        error: u32,
        message: &'static str,
    },
}

/// The result of a request, turned into a reply by [`Conn::queue_reply`].
enum Outcome {
    Done,
    Data {
        offset: u64,
        data: Vec<u8>,
    },
    /// Read data to send from the file at send time.
    FileRange {
        offset: u64,
        len: u32,
    },
    Extents {
        context: u32,
        extents: Vec<Extent>,
    },
    Error {
        errno: u32,
        message: String,
    },
}

impl Outcome {
    fn from_io(r: io::Result<()>) -> Outcome {
        match r {
            Ok(()) => Outcome::Done,
            Err(e) => Outcome::io_error(&e),
        }
    }

    fn io_error(e: &io::Error) -> Outcome {
        Outcome::Error {
            errno: nbd_errno(e),
            message: e.to_string(),
        }
    }
}

/// Per-connection state; lives in an `Arc<Mutex<_>>` because aioctx
/// callbacks must be `Send`. All access happens on the owning context's
/// thread, so the mutex is never contended.
pub struct Conn {
    ctx: AioContext,
    me: Weak<Mutex<Conn>>,
    /// The connection's own strong reference, dropped by [`Conn::close`].
    keepalive: Option<Arc<Mutex<Conn>>>,
    stream: Stream,
    fd: RawFd,
    peer: String,
    export: Arc<Export>,
    shared: Arc<Shared>,
    phase: Phase,
    handshake: Option<Handshake>,
    session: Option<Session>,
    inbuf: InBuf,
    out: OutQueue,
    inflight: usize,
    /// Bytes of read buffers and write payloads of unanswered requests.
    held_bytes: usize,
    /// Client sent DISC, or the server is shutting down: read no more.
    draining: bool,
    closed: bool,
    /// Handlers currently installed (read, write).
    registered: (bool, bool),
    timer: Option<Timer>,
    flush_bh: Option<Bh>,
    /// The last write payload buffer freed, for the next payload of the same size.
    spare_payload: Option<Vec<u8>>,
    /// The pipe for spliced payloads, made on the first one.
    pipe: Option<PayloadPipe>,
    /// No pipe could be made, or this socket cannot splice: payloads are
    /// read into buffers.
    no_splice: bool,
    /// The last request was a write whose payload could be spliced, so
    /// the next one probably is too: read exactly one request header at a
    /// time, leaving its payload in the socket for `splice`.
    exact_headers: bool,
    /// Held while the connection waits for the rest of a payload (see
    /// [`Conn::update_spin_guard`]).
    no_spin: Option<PollingDisabled>,
    /// Drops `no_spin` after `PAYLOAD_STALL_NS` without a read event.
    stall_timer: Option<Timer>,
    /// Read events so far, and their count when `stall_timer` was armed.
    read_events: u64,
    stall_mark: u64,
}

impl Conn {
    /// Starts serving `stream` on `ctx`; must run on `ctx`'s thread.
    pub fn start(
        ctx: AioContext,
        stream: Stream,
        peer: String,
        export: Arc<Export>,
        info: ExportInfo,
        shared: Arc<Shared>,
        handshake_timeout: Duration,
    ) {
        let fd = stream.raw_fd();
        let conn = Arc::new_cyclic(|me: &Weak<Mutex<Conn>>| {
            Mutex::new(Conn {
                ctx: ctx.clone(),
                me: me.clone(),
                keepalive: None,
                stream,
                fd,
                peer,
                export,
                shared: shared.clone(),
                phase: Phase::ClientFlags,
                handshake: Some(Handshake::new(info)),
                session: None,
                inbuf: InBuf::new(),
                out: OutQueue::default(),
                inflight: 0,
                held_bytes: 0,
                draining: false,
                closed: false,
                registered: (false, false),
                timer: None,
                flush_bh: None,
                spare_payload: None,
                pipe: None,
                no_splice: false,
                exact_headers: false,
                no_spin: None,
                stall_timer: None,
                read_events: 0,
                stall_mark: 0,
            })
        });
        shared.register(&ctx, Arc::downgrade(&conn));
        let mut c = conn.lock();
        c.keepalive = Some(conn.clone());
        info!(peer = %c.peer, "client connected");
        if shared.is_shutting_down() {
            c.close();
            return;
        }

        let timer = ctx.timer_new(
            ClockType::Realtime,
            SCALE_MS,
            c.callback(|c| {
                if c.handshake.is_some() {
                    warn!(peer = %c.peer, "handshake not finished in time, disconnecting");
                    c.close();
                }
            }),
        );
        let now_ms = aioctx::clock_get_ns(ClockType::Realtime) / SCALE_MS;
        timer.modify(now_ms + handshake_timeout.as_millis() as i64);
        c.timer = Some(timer);

        c.flush_bh = Some(ctx.bh_new(c.callback(Conn::flush_output)));

        c.out.push_small(&proto::greeting());
        c.flush_output();
    }

    /// Stops taking requests because the server is shutting down; the
    /// connection closes once its in-flight requests are answered.
    pub fn begin_shutdown(&mut self) {
        if self.handshake.is_some() {
            debug!(peer = %self.peer, "closing connection in handshake for shutdown");
            self.close();
        } else {
            self.draining = true;
            self.maybe_finish();
            self.update_handlers();
        }
    }

    /// A callback for the context that runs `f` on this connection while it is alive (it holds
    /// only a weak reference, so a registered callback never keeps a closed connection).
    fn callback(&self, f: impl Fn(&mut Conn) + Send + 'static) -> impl FnMut() + Send + 'static {
        let weak = self.me.clone();
        move || {
            if let Some(conn) = weak.upgrade() {
                f(&mut conn.lock());
            }
        }
    }

    fn arc(&self) -> Arc<Mutex<Conn>> {
        self.me.upgrade().expect("connection used after free")
    }

    // -- socket events -----------------------------------------------------

    fn on_readable(&mut self) {
        self.read_events += 1;
        let mut reads = 0;
        while reads < READS_PER_EVENT {
            if !self.wants_read() {
                break;
            }
            // Reading one request header costs little; the payload after
            // it is what counts towards the budget.
            let mut header_only = false;
            let pull = match &mut self.phase {
                Phase::SplicePayload { .. } => self.splice_payload(),
                // Large payloads go straight into their own buffer.
                Phase::Payload { buf, filled, .. }
                    if self.inbuf.len() == 0 && buf.len() - *filled >= DIRECT_READ_MIN =>
                {
                    let asked = buf.len() - *filled;
                    let res = self.stream.read(&mut buf[*filled..]);
                    if let Ok(n) = res {
                        *filled += n;
                    }
                    Pull::from_read(asked, res)
                }
                _ => {
                    let header_left = if self.exact_headers && matches!(self.phase, Phase::Request)
                    {
                        proto::REQUEST_LEN.saturating_sub(self.inbuf.len())
                    } else {
                        0
                    };
                    let mut spare = self.inbuf.spare();
                    if spare.is_empty() {
                        // Only reachable with requests held back by the
                        // limits; completions will resume them.
                        break;
                    }
                    if header_left > 0 {
                        header_only = true;
                        let len = header_left.min(spare.len());
                        spare = &mut spare[..len];
                    }
                    let asked = spare.len();
                    let res = self.stream.read(spare);
                    if let Ok(n) = res {
                        self.inbuf.tail += n;
                    }
                    Pull::from_read(asked, res)
                }
            };
            if !header_only {
                reads += 1;
            }
            match pull {
                Pull::Data { got, asked } => {
                    self.process_input();
                    // A short read drained the socket: another would only
                    // return EAGAIN.
                    if got < asked {
                        break;
                    }
                }
                Pull::Again => {}
                Pull::WouldBlock => break,
                Pull::Eof => {
                    if self.inflight > 0 || self.inbuf.len() > 0 || !self.is_idle_phase() {
                        info!(peer = %self.peer, "client vanished mid-request");
                    } else {
                        info!(peer = %self.peer, "client disconnected");
                    }
                    self.close();
                    return;
                }
                Pull::Failed(e) => {
                    info!(peer = %self.peer, error = %e, "read error, closing");
                    self.close();
                    return;
                }
                Pull::Closed => return,
            }
        }
        if !self.closed {
            self.flush_output();
        }
    }

    /// Holds a [`PollingDisabled`] guard while a write payload is
    /// incomplete. The rest is on its way at the rate the client can send
    /// it: sleeping until it has piled up beats spinning to take it piece
    /// by piece as it arrives. With 64 KiB writes at depth 32, spinning
    /// through payloads cost the client (on the other CPU) 32-42 µs per
    /// request instead of 23-29 µs. A client that stops half-way must not
    /// keep the other connections on this loop from polling, so a timer
    /// drops the guard after `PAYLOAD_STALL_NS` without a read event; the
    /// next one takes it again.
    fn update_spin_guard(&mut self) {
        let mid_payload = !self.closed
            && matches!(
                self.phase,
                Phase::Payload { .. } | Phase::SplicePayload { .. }
            );
        if mid_payload == self.no_spin.is_some() {
            return;
        }
        if !mid_payload {
            // The stall timer may stay armed: it finds no guard to drop.
            self.no_spin = None;
            return;
        }
        self.no_spin = Some(self.ctx.disable_polling());
        if self.stall_timer.is_none() {
            let cb = self.callback(Conn::on_payload_stall_timer);
            self.stall_timer = Some(self.ctx.timer_new(ClockType::Realtime, SCALE_NS, cb));
        }
        if let Some(t) = self.stall_timer.as_ref().filter(|t| !t.pending()) {
            t.modify_ns(clock_get_ns(ClockType::Realtime) + PAYLOAD_STALL_NS);
            self.stall_mark = self.read_events;
        }
    }

    fn on_payload_stall_timer(&mut self) {
        if self.no_spin.is_none() {
            return;
        }
        if self.read_events == self.stall_mark {
            debug!(peer = %self.peer, "payload stalled, busy-polling allowed again");
            self.no_spin = None;
        } else if let Some(t) = &self.stall_timer {
            t.modify_ns(clock_get_ns(ClockType::Realtime) + PAYLOAD_STALL_NS);
            self.stall_mark = self.read_events;
        }
    }

    fn is_idle_phase(&self) -> bool {
        matches!(
            self.phase,
            Phase::Request | Phase::OptionHeader | Phase::ClientFlags
        )
    }

    fn flush_output(&mut self) {
        loop {
            if self.closed {
                return;
            }
            if let Err(e) = self.out.flush(&mut self.stream, &self.export) {
                info!(peer = %self.peer, error = %e, "write error, closing");
                self.close();
                return;
            }
            // Sending replies may have lifted the limits that held back
            // requests already in the input buffer.
            let pending = self.inbuf.len();
            self.process_input();
            if self.inbuf.len() == pending || self.out.is_empty() {
                break;
            }
        }
        self.maybe_finish();
        self.update_handlers();
        self.update_spin_guard();
    }

    /// Whether a new request may start (limits memory and concurrency
    /// per connection).
    fn can_start_request(&self) -> bool {
        self.inflight < MAX_INFLIGHT && self.held_bytes + self.out.bytes < MAX_BUFFERED
    }

    fn wants_read(&self) -> bool {
        !self.closed
            && !self.draining
            && (!matches!(self.phase, Phase::Request) || self.can_start_request())
    }

    /// Installs the fd handlers matching what the connection waits for.
    fn update_handlers(&mut self) {
        if self.closed {
            return;
        }
        let want = (self.wants_read(), !self.out.is_empty());
        if want == self.registered {
            return;
        }
        let read = want
            .0
            .then(|| Box::new(self.callback(Conn::on_readable)) as Handler);
        let write = want
            .1
            .then(|| Box::new(self.callback(Conn::flush_output)) as Handler);
        match self.ctx.set_fd_handler(self.fd, read, write) {
            Ok(()) => self.registered = want,
            Err(e) => {
                warn!(peer = %self.peer, error = %e, "cannot watch socket, closing");
                self.close();
            }
        }
    }

    /// Closes a draining connection once nothing is left to do.
    fn maybe_finish(&mut self) {
        if self.draining && self.inflight == 0 && self.out.is_empty() && !self.closed {
            debug!(peer = %self.peer, "all requests answered, closing");
            self.close();
        }
    }

    /// Hard close: stop watching the socket and shut it down. In-flight
    /// requests still complete (writes reach the file) but their replies
    /// are dropped.
    fn close(&mut self) {
        if self.closed {
            return;
        }
        self.closed = true;
        if self.registered != (false, false) {
            let _ = self.ctx.set_fd_handler(self.fd, None, None);
            self.registered = (false, false);
        }
        if let Some(t) = &self.timer {
            t.del();
        }
        self.stream.shutdown();
        self.out = OutQueue::default();
        self.no_spin = None;
        self.stall_timer = None;
        info!(peer = %self.peer, "connection closed");
        if self.inflight == 0 {
            self.shared.connection_finished();
        }
        // Whoever called us holds a strong reference (every callback
        // upgrades or owns one before locking), so this is never the last.
        self.keepalive = None;
    }

    // -- decoding ----------------------------------------------------------

    /// Decodes every complete message in the input buffer.
    fn process_input(&mut self) {
        while !self.closed && !self.draining {
            let avail = self.inbuf.len();
            match &mut self.phase {
                Phase::ClientFlags => {
                    if avail < 4 {
                        return;
                    }
                    let b: [u8; 4] = self.inbuf.data()[..4].try_into().unwrap();
                    self.inbuf.consume(4);
                    match proto::parse_client_flags(&b) {
                        Ok(flags) => {
                            if let Some(h) = &mut self.handshake {
                                h.set_client_flags(flags);
                            }
                            self.phase = Phase::OptionHeader;
                        }
                        Err(flags) => {
                            warn!(peer = %self.peer, flags, "unknown client flags, closing");
                            self.close();
                        }
                    }
                }
                Phase::OptionHeader => {
                    if avail < proto::OPTION_HEADER_LEN {
                        return;
                    }
                    let b = self.inbuf.data()[..proto::OPTION_HEADER_LEN]
                        .try_into()
                        .unwrap();
                    self.inbuf.consume(proto::OPTION_HEADER_LEN);
                    match proto::parse_option_header(&b) {
                        Ok(h) if h.length > proto::MAX_OPTION_LEN => {
                            warn!(peer = %self.peer, option = h.option, length = h.length,
                                  "option data too large");
                            self.phase = Phase::SkipOption {
                                option: h.option,
                                remaining: h.length as u64,
                            };
                        }
                        Ok(h) => {
                            self.phase = Phase::OptionData {
                                option: h.option,
                                len: h.length as usize,
                            }
                        }
                        Err(e) => {
                            warn!(peer = %self.peer, "handshake: {e}, closing");
                            self.close();
                        }
                    }
                }
                Phase::OptionData { option, len } => {
                    let (option, len) = (*option, *len);
                    if avail < len {
                        return;
                    }
                    let mut out = Vec::new();
                    let h = self.handshake.as_mut().expect("handshake state");
                    let step = h.option(option, &self.inbuf.data()[..len], &mut out);
                    self.inbuf.consume(len);
                    debug!(peer = %self.peer, option, ?step, "option");
                    self.out.push_small(&out);
                    self.after_option(step);
                }
                Phase::SkipOption { option, remaining } => {
                    let n = (*remaining).min(avail as u64);
                    *remaining -= n;
                    let (option, done) = (*option, *remaining == 0);
                    self.inbuf.consume(n as usize);
                    if !done {
                        return;
                    }
                    let mut out = Vec::new();
                    let h = self.handshake.as_mut().expect("handshake state");
                    let step = h.option_too_big(option, &mut out);
                    self.out.push_small(&out);
                    self.after_option(step);
                }
                Phase::Request => {
                    if avail < proto::REQUEST_LEN || !self.can_start_request() {
                        return;
                    }
                    let b = self.inbuf.data()[..proto::REQUEST_LEN].try_into().unwrap();
                    self.inbuf.consume(proto::REQUEST_LEN);
                    match proto::parse_request(&b) {
                        Ok(req) => self.handle_request(req),
                        Err(e) => {
                            warn!(peer = %self.peer, "request with {e}, closing");
                            self.close();
                        }
                    }
                }
                Phase::Payload { buf, filled, .. } => {
                    let n = (buf.len() - *filled).min(avail);
                    buf[*filled..*filled + n].copy_from_slice(&self.inbuf.data()[..n]);
                    *filled += n;
                    let done = *filled == buf.len();
                    self.inbuf.consume(n);
                    if !done {
                        return;
                    }
                    let Phase::Payload { req, fua, buf, .. } =
                        std::mem::replace(&mut self.phase, Phase::Request)
                    else {
                        unreachable!()
                    };
                    self.start_write(req, fua, buf);
                }
                // Its bytes are in the socket, not in the input buffer.
                Phase::SplicePayload { .. } => return,
                Phase::SkipPayload {
                    handle,
                    remaining,
                    error,
                    message,
                } => {
                    let n = (*remaining).min(avail as u64);
                    *remaining -= n;
                    let (handle, done, error, message) =
                        (*handle, *remaining == 0, *error, *message);
                    self.inbuf.consume(n as usize);
                    if !done {
                        return;
                    }
                    self.phase = Phase::Request;
                    self.queue_reply(
                        handle,
                        proto::cmd::WRITE,
                        Outcome::Error {
                            errno: error,
                            message: message.into(),
                        },
                    );
                }
            }
        }
    }

    fn after_option(&mut self, step: Step) {
        match step {
            Step::Continue => self.phase = Phase::OptionHeader,
            Step::Close => {
                info!(peer = %self.peer, "client aborted the handshake");
                self.handshake = None;
                self.draining = true;
            }
            Step::Drop(why) => {
                warn!(peer = %self.peer, "{why}, closing");
                self.close();
            }
            Step::Transmission(session) => {
                info!(peer = %self.peer, structured = session.structured,
                      block_status = session.meta_context.is_some(), "handshake done");
                self.handshake = None;
                self.session = Some(session);
                self.phase = Phase::Request;
                if let Some(t) = &self.timer {
                    t.del();
                }
                if self.shared.is_shutting_down() {
                    self.begin_shutdown();
                }
            }
        }
    }

    // -- requests ----------------------------------------------------------

    fn handle_request(&mut self, req: Request) {
        let session = self.session.expect("transmission phase");
        trace!(peer = %self.peer, ?req, "request");
        self.exact_headers = false;
        let cmd = match proto::validate(&req, &session) {
            Ok(cmd) => cmd,
            Err(e) => {
                warn!(peer = %self.peer, handle = req.handle, kind = req.kind,
                      offset = req.offset, length = req.length, "refusing request: {e}");
                if e.discard > 0 {
                    self.phase = Phase::SkipPayload {
                        handle: req.handle,
                        remaining: e.discard as u64,
                        error: e.errno,
                        message: e.message,
                    };
                } else {
                    self.queue_reply(
                        req.handle,
                        req.kind,
                        Outcome::Error {
                            errno: e.errno,
                            message: e.message.into(),
                        },
                    );
                }
                return;
            }
        };
        if self.shared.is_shutting_down() && cmd != Command::Disconnect {
            let outcome = Outcome::Error {
                errno: errno::ESHUTDOWN,
                message: "server is shutting down".into(),
            };
            if let Command::Write { length, .. } = cmd {
                self.phase = Phase::SkipPayload {
                    handle: req.handle,
                    remaining: length as u64,
                    error: errno::ESHUTDOWN,
                    message: "server is shutting down",
                };
            } else {
                self.queue_reply(req.handle, req.kind, outcome);
            }
            return;
        }
        let export = self.export.clone();
        match cmd {
            Command::Disconnect => {
                info!(peer = %self.peer, "client sent disconnect");
                self.draining = true;
                self.maybe_finish();
            }
            Command::Read { offset, length } if export.sendable(offset, length as usize) => {
                // Large and cached: queue the reply with a file range in
                // place of data, sent with sendfile when the socket takes
                // it, so this thread copies nothing.
                //
                // The data is read when it is sent, possibly well after
                // this, with other replies queued ahead. That is still
                // correct: a write acknowledged before this read arrived
                // went through the page cache before its reply was
                // queued, so sendfile sees it; a write that arrives while
                // this reply is unsent, or even after sendfile has
                // returned but before the client has received the bytes
                // (the socket holds page references, not copies), is one
                // the client sent without waiting for this read, and as
                // requests may be processed in any order, a read
                // overlapping such a write may return old or new data.
                // Nothing is held but the queued range, which counts in
                // the output bytes.
                trace!(peer = %self.peer, handle = req.handle, "read sent from the file");
                self.queue_reply(
                    req.handle,
                    req.kind,
                    Outcome::FileRange {
                        offset,
                        len: length,
                    },
                );
            }
            Command::Read { offset, length } => {
                self.held_bytes += length as usize;
                let mut buf = vec![0u8; length as usize];
                let n = if length > 0 {
                    export.read_nowait(&mut buf, offset)
                } else {
                    0
                };
                if n == buf.len() {
                    self.complete(req, Outcome::Data { offset, data: buf });
                } else {
                    self.offload(req, move || {
                        match export.read_at(&mut buf[n..], offset + n as u64) {
                            Ok(()) => Outcome::Data { offset, data: buf },
                            Err(e) => Outcome::io_error(&e),
                        }
                    });
                }
            }
            Command::Write { length, fua, .. } => {
                let len = length as usize;
                let splice = !fua && export.spliceable(req.offset, len) && self.has_pipe();
                self.exact_headers = splice;
                if length == 0 {
                    self.start_write(req, fua, Vec::new());
                } else if self.inbuf.len() >= len {
                    // The payload came with the header (many small or mid-sized writes per
                    // read): write it from the input buffer, with no copy and no allocation,
                    // when that can be done here; copy it only for a worker.
                    self.held_bytes += len;
                    let result = write_here(&export, &self.inbuf.data()[..len], req.offset, fua)
                        .map_err(|done| (done, self.inbuf.data()[done..len].to_vec()));
                    self.inbuf.consume(len);
                    match result {
                        Ok(outcome) => self.complete(req, outcome),
                        Err((done, rest)) => {
                            let offset = req.offset + done as u64;
                            self.offload(req, move || {
                                Outcome::from_io(export.write_at(&rest, offset, fua))
                            });
                        }
                    }
                } else if splice && self.inbuf.len() == 0 {
                    trace!(peer = %self.peer, handle = req.handle, "write payload spliced");
                    self.held_bytes += len;
                    self.phase = Phase::SplicePayload {
                        req,
                        received: 0,
                        written: 0,
                    };
                } else {
                    self.held_bytes += len;
                    self.phase = Phase::Payload {
                        req,
                        fua,
                        buf: self.payload_buffer(len),
                        filled: 0,
                    };
                }
            }
            Command::Flush => self.offload(req, move || Outcome::from_io(export.flush())),
            Command::Trim {
                offset,
                length,
                fua,
            } => self.offload(req, move || {
                Outcome::from_io(export.trim(offset, length as u64, fua))
            }),
            Command::Cache { offset, length } => self.offload(req, move || {
                Outcome::from_io(export.cache(offset, length as u64))
            }),
            Command::WriteZeroes {
                offset,
                length,
                fua,
                no_hole,
                fast,
            } => self.offload(req, move || {
                match export.write_zeroes(offset, length as u64, no_hole, fast, fua) {
                    Ok(()) => Outcome::Done,
                    Err(ZeroError::NotFast) => Outcome::Error {
                        errno: errno::ENOTSUP,
                        message: "zeroing would not be faster than writing".into(),
                    },
                    Err(ZeroError::Io(e)) => Outcome::io_error(&e),
                }
            }),
            Command::BlockStatus {
                offset,
                length,
                req_one,
                context,
            } => self.offload(req, move || {
                let max = if req_one { 1 } else { MAX_EXTENTS };
                let extents = export.block_status(offset, length, max);
                if extents.is_empty() {
                    // Only for length 0: a reply needs at least one extent.
                    return Outcome::Error {
                        errno: errno::EINVAL,
                        message: "block status of an empty range".into(),
                    };
                }
                Outcome::Extents { context, extents }
            }),
        }
    }

    /// Whether the pipe for spliced payloads is there, making it if this is
    /// the first time it is needed.
    fn has_pipe(&mut self) -> bool {
        if self.pipe.is_none() && !self.no_splice {
            match PayloadPipe::new() {
                Ok(pipe) => self.pipe = Some(pipe),
                Err(e) => {
                    warn!(peer = %self.peer, error = %e, "no pipe to splice write payloads, copying them");
                    self.no_splice = true;
                }
            }
        }
        self.pipe.is_some()
    }

    /// Moves what the socket has of a spliced write payload into the pipe,
    /// and every whole page of it on into the file; queues the reply once
    /// the whole payload is in the file.
    ///
    /// Only whole pages go to the file. The payload starts on a page
    /// boundary and is whole pages long, but a piece of it usually ends
    /// mid-page, and writing part of a page that is on disk but not in the
    /// page cache makes the kernel read it first, on this thread. So the
    /// tail of a piece waits in the pipe for the rest of its page. Should
    /// the pipe fill up with less than a page in it (a client sending tiny
    /// segments: one pipe slot each), the tail is written anyway.
    fn splice_payload(&mut self) -> Pull {
        let Phase::SplicePayload {
            req,
            received,
            written,
        } = &mut self.phase
        else {
            unreachable!("splice_payload outside a spliced payload")
        };
        let pipe = self.pipe.as_ref().expect("pipe of a spliced payload");
        let len = req.length as usize;
        let in_pipe = *received - *written;
        // Less than a page waits in the pipe, which holds at least 64 KiB.
        let asked = (len - *received).min(pipe.capacity - in_pipe);
        let mut pipe_full = false;
        let got = match rustix::pipe::splice(
            self.stream.fd(),
            None,
            &pipe.write,
            None,
            asked,
            SpliceFlags::NONBLOCK,
        ) {
            Ok(0) => return Pull::Eof,
            Ok(n) => n,
            // EAGAIN says "socket empty" and "pipe full" alike.
            Err(Errno::AGAIN)
                if in_pipe > 0
                    && rustix::io::ioctl_fionread(self.stream.fd()).is_ok_and(|n| n > 0) =>
            {
                pipe_full = true;
                0
            }
            Err(Errno::INTR) => return Pull::Again,
            Err(Errno::INVAL) if *received == 0 => return self.payload_without_splice(),
            Err(e) => return Pull::from_read(asked, Err(e.into())),
        };
        trace!(peer = %self.peer, handle = req.handle, got, received = *received + got,
               "payload piece spliced");
        *received += got;
        let complete = *received == len;
        let page = rustix::param::page_size();
        let upto = if complete || pipe_full {
            *received
        } else {
            *received / page * page
        };
        let result = if upto > *written {
            let offset = req.offset + *written as u64;
            let res = self
                .export
                .write_from_pipe(pipe.read.as_fd(), offset, upto - *written);
            *written = upto;
            res
        } else {
            Ok(())
        };
        let left = len - *received;
        if let Err(e) = &result {
            if let Err(discard) = pipe.discard() {
                // What stays in the pipe would go into the next payload.
                warn!(peer = %self.peer, error = %e, %discard, "closing");
                self.close();
                return Pull::Closed;
            }
        }
        let pulled = if pipe_full {
            Pull::Again
        } else {
            Pull::Data { got, asked }
        };
        if result.is_ok() && !complete {
            if self.export.inline_writes_backed_off() {
                // A piece was slow to reach the file (the disk throttles writers, most
                // likely): the rest goes the way of writes that may block, to a worker.
                debug!(peer = %self.peer, handle = req.handle, written = *written,
                       "a spliced piece was slow, the rest of the payload goes to a worker");
                let (received, written) = (*received, *written);
                if !self.rest_of_payload_to_buffer(received, written) {
                    return Pull::Closed;
                }
            }
            return pulled;
        }
        let Phase::SplicePayload { req, .. } = std::mem::replace(&mut self.phase, Phase::Request)
        else {
            unreachable!()
        };
        match result {
            Ok(()) => self.complete(req, Outcome::Done),
            Err(e) if left == 0 => self.complete(req, Outcome::io_error(&e)),
            Err(e) => {
                warn!(peer = %self.peer, handle = req.handle, error = %e,
                      "write failed, skipping the rest of its payload");
                self.held_bytes -= req.length as usize;
                self.phase = Phase::SkipPayload {
                    handle: req.handle,
                    remaining: left as u64,
                    error: nbd_errno(&e),
                    message: "write failed",
                };
            }
        }
        pulled
    }

    /// Stops splicing the current payload: what is not in the file yet
    /// (`written` bytes are) is read into a buffer like any other payload,
    /// as a write of its own under the same handle. What the pipe holds
    /// (`received - written` bytes, less than a page) starts the buffer.
    /// False if the pipe failed and the connection is closed.
    fn rest_of_payload_to_buffer(&mut self, received: usize, written: usize) -> bool {
        let Phase::SplicePayload { mut req, .. } =
            std::mem::replace(&mut self.phase, Phase::Request)
        else {
            unreachable!("not a spliced payload")
        };
        let in_pipe = received - written;
        let mut buf = self.payload_buffer(req.length as usize - written);
        if in_pipe > 0 {
            let pipe = self.pipe.as_ref().expect("pipe of a spliced payload");
            if let Err(e) = read_from_pipe(pipe.read.as_fd(), &mut buf[..in_pipe]) {
                warn!(peer = %self.peer, error = %e, "closing");
                self.close();
                return false;
            }
        }
        // `complete` releases the new length.
        self.held_bytes -= written;
        req.offset += written as u64;
        req.length -= written as u32;
        self.phase = Phase::Payload {
            req,
            fua: false,
            buf,
            filled: in_pipe,
        };
        true
    }

    /// This kind of socket cannot splice: read the payload that was to be
    /// spliced (none of it has left the socket) into a buffer instead, as
    /// all later ones.
    fn payload_without_splice(&mut self) -> Pull {
        info!(peer = %self.peer, "socket cannot splice, copying write payloads");
        self.rest_of_payload_to_buffer(0, 0);
        self.no_splice = true;
        self.pipe = None;
        self.exact_headers = false;
        Pull::Again
    }

    fn start_write(&mut self, req: Request, fua: bool, buf: Vec<u8>) {
        let export = self.export.clone();
        let offset = req.offset;
        match write_here(&export, &buf, offset, fua) {
            Ok(outcome) => {
                self.complete(req, outcome);
                self.recycle_payload_buffer(buf);
            }
            Err(done) => self.offload(req, move || {
                Outcome::from_io(export.write_at(&buf[done..], offset + done as u64, fua))
            }),
        }
    }

    /// A buffer of `len` bytes for a write payload, reusing the last one freed if it has that
    /// length: its stale contents are overwritten before use, and zeroing 64 KiB per request
    /// showed up in profiles.
    fn payload_buffer(&mut self, len: usize) -> Vec<u8> {
        match self.spare_payload.take() {
            Some(buf) if buf.len() == len => buf,
            _ => vec![0u8; len],
        }
    }

    fn recycle_payload_buffer(&mut self, buf: Vec<u8>) {
        if buf.len() >= DIRECT_READ_MIN {
            self.spare_payload = Some(buf);
        }
    }

    /// Runs `work` on the context's thread pool; its outcome is queued as
    /// the reply to `req` back on this connection's thread.
    fn offload(&mut self, req: Request, work: impl FnOnce() -> Outcome + Send + 'static) {
        self.inflight += 1;
        self.shared.request_started();
        let conn = self.arc();
        crate::server::offload(&self.ctx, work, move |outcome| {
            let mut c = conn.lock();
            c.inflight -= 1;
            c.shared.request_finished();
            if c.closed {
                if c.inflight == 0 {
                    c.shared.connection_finished();
                }
                return;
            }
            c.complete(req, outcome);
            // Requests held back by the limits may start now.
            c.process_input();
            // Coalesce the replies of all completions of this loop
            // iteration into one writev.
            if let Some(bh) = &c.flush_bh {
                bh.schedule();
            }
        });
    }

    /// Queues the reply of a request that passed validation, releasing its
    /// buffer accounting.
    fn complete(&mut self, req: Request, outcome: Outcome) {
        if matches!(req.kind, proto::cmd::READ | proto::cmd::WRITE) {
            self.held_bytes -= req.length as usize;
        }
        self.queue_reply(req.handle, req.kind, outcome);
    }

    /// Encodes the reply to request `handle` and queues it.
    fn queue_reply(&mut self, handle: u64, kind: u16, outcome: Outcome) {
        if self.closed {
            return;
        }
        let structured = self.session.is_some_and(|s| s.structured);
        match outcome {
            Outcome::Done if kind == proto::cmd::READ && structured => {
                let mut b = Vec::with_capacity(proto::CHUNK_HEADER_LEN);
                proto::put_none_chunk(&mut b, handle);
                self.out.push_small(&b);
            }
            Outcome::Done => self.out.push_small(&proto::simple_reply(handle, 0)),
            Outcome::Data { offset, data } => {
                if data.is_empty() {
                    return self.queue_reply(handle, kind, Outcome::Done);
                }
                if structured {
                    let h = proto::offset_data_header(handle, offset, data.len() as u32);
                    self.out.push_small(&h);
                } else {
                    self.out.push_small(&proto::simple_reply(handle, 0));
                }
                self.out.push_data(data);
            }
            Outcome::FileRange { offset, len } => {
                if structured {
                    self.out
                        .push_small(&proto::offset_data_header(handle, offset, len));
                } else {
                    self.out.push_small(&proto::simple_reply(handle, 0));
                }
                self.out.push_file(offset, len as usize);
            }
            Outcome::Extents { context, extents } => {
                let mut b = Vec::with_capacity(proto::CHUNK_HEADER_LEN + 4 + 8 * extents.len());
                proto::put_block_status_chunk(&mut b, handle, context, &extents);
                self.out.push_small(&b);
            }
            Outcome::Error { errno, message } => {
                debug!(peer = %self.peer, handle, errno, %message, "error reply");
                if structured {
                    let mut b = Vec::with_capacity(proto::CHUNK_HEADER_LEN + 6 + message.len());
                    proto::put_error_chunk(&mut b, handle, errno, &message);
                    self.out.push_small(&b);
                } else {
                    self.out.push_small(&proto::simple_reply(handle, errno));
                }
            }
        }
    }
}

/// Writes `buf` at `offset` on the loop's thread if that cannot block for long: like reads, in
/// the page cache without blocking (RWF_NOWAIT where the file system has it, else the
/// inline-write heuristic of [`Export::write_inline`]). FUA writes always wait for the disk,
/// so they go to a worker. `Ok` is the write's outcome; `Err(done)` means "finish
/// `buf[done..]` on a worker".
fn write_here(export: &Export, buf: &[u8], offset: u64, fua: bool) -> Result<Outcome, usize> {
    let done = if fua || buf.is_empty() {
        0
    } else {
        export.write_nowait(buf, offset)
    };
    if done == buf.len() {
        return Ok(Outcome::Done);
    }
    if done == 0 && !fua {
        if let Some(res) = export.write_inline(buf, offset) {
            return Ok(Outcome::from_io(res));
        }
    }
    Err(done)
}

impl Drop for Conn {
    fn drop(&mut self) {
        trace!(peer = %self.peer, "connection freed");
    }
}
