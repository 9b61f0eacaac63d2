//! Helpers shared by the integration tests: start the server binary, run
//! external tools with a time limit, and a minimal NBD client that speaks
//! the protocol byte by byte so tests can check exact replies.

#![allow(dead_code)] // each test binary uses a different subset

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use aioctx_nbd::proto::{self, Request};

/// Time limit for anything a test waits on.
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// A running `aioctx-nbd`, killed when dropped.
pub struct Server {
    pub child: Child,
    /// e.g. `nbd://127.0.0.1:34567`
    pub uri: String,
    pub port: u16,
    /// Each line the server logs, as it logs it.
    log_lines: mpsc::Receiver<String>,
    /// The whole log, sent once the server has closed its stderr (it exited).
    log_at_exit: mpsc::Receiver<String>,
}

impl Server {
    /// Starts the server on a free loopback port with extra `args` and
    /// waits for it to print its URI.
    pub fn start(args: &[&str]) -> Server {
        Server::spawn(&["-b", "127.0.0.1", "-p", "0"], args)
    }

    /// Starts the server on the Unix socket `path` with extra `args`;
    /// `port` is 0, connect with [`Client::connect_unix`].
    pub fn start_unix(path: &Path, args: &[&str]) -> Server {
        Server::spawn(&["-k", path_str(path)], args)
    }

    fn spawn(listen: &[&str], args: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_aioctx-nbd"))
            .args(listen)
            .arg("-v")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn aioctx-nbd");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            while let Some(Ok(line)) = lines.next() {
                if let Some(uri) = line
                    .split_whitespace()
                    .find(|w| w.starts_with("nbd://") || w.starts_with("nbd+unix://"))
                {
                    let _ = tx.send(uri.to_string());
                    break;
                }
            }
            // Keep draining so the server never blocks on a full pipe.
            for _ in lines {}
        });
        let stderr = child.stderr.take().unwrap();
        let (line_tx, log_lines) = mpsc::channel();
        let (exit_tx, log_at_exit) = mpsc::channel();
        std::thread::spawn(move || {
            let mut log = String::new();
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                log.push_str(&line);
                log.push('\n');
                let _ = line_tx.send(line);
            }
            let _ = exit_tx.send(log);
        });
        let uri = match rx.recv_timeout(TIMEOUT) {
            Ok(uri) => uri,
            Err(_) => {
                let _ = child.kill();
                panic!("server did not print its URI");
            }
        };
        let port = match uri.strip_prefix("nbd://127.0.0.1:") {
            Some(rest) => rest
                .split('/')
                .next()
                .unwrap()
                .parse()
                .expect("port in URI"),
            None => 0,
        };
        Server {
            child,
            uri,
            port,
            log_lines,
            log_at_exit,
        }
    }

    /// Sends `sig` to the server.
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Waits (bounded) until the server logs a line for which `what` is true.
    pub fn wait_for_log(&self, what: impl Fn(&str) -> bool) {
        let deadline = std::time::Instant::now() + TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.log_lines.recv_timeout(left) {
                Ok(line) if what(&line) => return,
                Ok(_) => {}
                Err(e) => panic!("the awaited log line never came: {e}"),
            }
        }
    }

    /// Waits (bounded) for the server to exit; returns its exit code and
    /// its log.
    pub fn wait(mut self) -> (Option<i32>, String) {
        // Its stderr closes when it exits.
        let log = self
            .log_at_exit
            .recv_timeout(TIMEOUT)
            .expect("server did not exit in time");
        let status = self.child.wait().unwrap();
        (status.code(), log)
    }

    /// SIGKILLs the server and returns its log.
    pub fn kill(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.log_at_exit.recv_timeout(TIMEOUT).expect("server log")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs an external tool with a time limit; panics with its output if it
/// fails.
pub fn run(prog: &str, args: &[&str]) -> Output {
    let out = run_status(prog, args);
    assert!(
        out.status.success(),
        "{prog} {args:?} failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Like [`run`] but returns the output whatever the exit status.
pub fn run_status(prog: &str, args: &[&str]) -> Output {
    Command::new("timeout")
        .arg("--kill-after=5")
        .arg(TIMEOUT.as_secs().to_string())
        .arg(prog)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"))
}

/// Creates a file of `size` bytes filled by `fill(offset) -> byte` in
/// 1 MiB blocks; blocks where `fill` returns `None` are left as holes.
pub fn make_image(path: &Path, size: u64, fill: impl Fn(u64) -> Option<u8>) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let block = 1u64 << 20;
    let mut off = 0;
    while off < size {
        let n = block.min(size - off) as usize;
        if let Some(b) = fill(off) {
            let buf: Vec<u8> = (0..n)
                .map(|i| b ^ ((off as usize + i) as u8).wrapping_mul(31))
                .collect();
            f.write_all_at(&buf, off).unwrap();
        }
        off += block;
    }
}

/// A cheap content checksum (FNV-1a over 64-bit words).
pub fn checksum(path: &Path) -> u64 {
    let data = std::fs::read(path).unwrap();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for chunk in data.chunks(8) {
        let mut w = [0u8; 8];
        w[..chunk.len()].copy_from_slice(chunk);
        h ^= u64::from_le_bytes(w);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// A scratch directory removed at the end of the test.
pub fn scratch() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

pub fn join(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    dir.path().join(name)
}

/// One reply from the server in the transmission phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Simple reply: error, handle (payload, if any, read separately).
    Simple { error: u32, handle: u64 },
    /// Structured chunk: flags, type, handle, payload.
    Chunk {
        flags: u16,
        kind: u16,
        handle: u64,
        payload: Vec<u8>,
    },
}

/// The client's socket.
pub enum Sock {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Sock {
    pub fn peek(&self, b: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.peek(b),
            // std's UnixStream::peek is not stable yet.
            Sock::Unix(s) => {
                let fd = std::os::fd::AsFd::as_fd(s);
                rustix::net::recv(fd, b, rustix::net::RecvFlags::PEEK)
                    .map(|(n, _)| n)
                    .map_err(Into::into)
            }
        }
    }
}

impl Read for Sock {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.read(b),
            Sock::Unix(s) => s.read(b),
        }
    }
}

impl Write for Sock {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.write(b),
            Sock::Unix(s) => s.write(b),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A bare-bones blocking NBD client with read timeouts.
pub struct Client {
    pub s: Sock,
}

impl Client {
    /// Connects and reads the greeting; does not send client flags.
    pub fn connect_raw(port: u16) -> Client {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
        s.set_nodelay(true).unwrap();
        Client::greeted(Sock::Tcp(s))
    }

    /// [`Client::connect_raw`] on a Unix socket.
    pub fn connect_unix_raw(path: &Path) -> Client {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
        Client::greeted(Sock::Unix(s))
    }

    fn greeted(s: Sock) -> Client {
        let mut c = Client { s };
        let g = c.read_n(18);
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(&g[16..], &[0, 3], "handshake flags");
        c
    }

    /// Connects and sends fixed-newstyle + no-zeroes client flags.
    pub fn connect(port: u16) -> Client {
        let mut c = Client::connect_raw(port);
        c.send(&3u32.to_be_bytes());
        c
    }

    /// [`Client::connect`] on a Unix socket.
    pub fn connect_unix(path: &Path) -> Client {
        let mut c = Client::connect_unix_raw(path);
        c.send(&3u32.to_be_bytes());
        c
    }

    pub fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).unwrap();
    }

    pub fn read_n(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.s.read_exact(&mut b).unwrap();
        b
    }

    /// Asserts the server closed the connection (EOF or reset).
    pub fn expect_closed(&mut self) {
        let mut b = [0u8; 1];
        match self.s.read(&mut b) {
            Ok(0) => {}
            Ok(_) => panic!("expected the connection to be closed, got data"),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("expected the connection to be closed: {e}"),
        }
    }

    pub fn send_option(&mut self, option: u32, data: &[u8]) {
        let mut b = Vec::new();
        b.extend_from_slice(b"IHAVEOPT");
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.send(&b);
    }

    /// Reads one option reply: (option, reply type, data).
    pub fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let h = self.read_n(20);
        assert_eq!(&h[..8], &proto::OPT_REPLY_MAGIC.to_be_bytes());
        let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let typ = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        (opt, typ, self.read_n(len as usize))
    }

    /// Negotiates structured replies and base:allocation if asked, then
    /// `OPT_GO`; returns (size, transmission flags).
    pub fn go(&mut self, name: &str, structured: bool) -> (u64, u16) {
        if structured {
            self.send_option(proto::opt::STRUCTURED_REPLY, &[]);
            assert_eq!(self.option_reply().1, proto::rep::ACK);
            let mut meta = (name.len() as u32).to_be_bytes().to_vec();
            meta.extend_from_slice(name.as_bytes());
            meta.extend_from_slice(&1u32.to_be_bytes());
            meta.extend_from_slice(&15u32.to_be_bytes());
            meta.extend_from_slice(b"base:allocation");
            self.send_option(proto::opt::SET_META_CONTEXT, &meta);
            let (_, t, data) = self.option_reply();
            assert_eq!(t, proto::rep::META_CONTEXT);
            assert_eq!(&data[4..], b"base:allocation");
            assert_eq!(self.option_reply().1, proto::rep::ACK);
        }
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        self.send_option(proto::opt::GO, &d);
        let mut size_flags = None;
        loop {
            let (opt, t, data) = self.option_reply();
            assert_eq!(opt, proto::opt::GO);
            match t {
                proto::rep::INFO => {
                    if data[..2] == [0, 0] {
                        let size = u64::from_be_bytes(data[2..10].try_into().unwrap());
                        let flags = u16::from_be_bytes(data[10..12].try_into().unwrap());
                        size_flags = Some((size, flags));
                    }
                }
                proto::rep::ACK => return size_flags.expect("INFO_EXPORT before ACK"),
                other => panic!("GO failed with reply {other:#x}"),
            }
        }
    }

    /// Sends a request (and its payload).
    pub fn request(&mut self, kind: u16, flags: u16, handle: u64, offset: u64, length: u32) {
        let r = Request {
            flags,
            kind,
            handle,
            offset,
            length,
        };
        self.send(&proto::encode_request(&r));
    }

    pub fn write(&mut self, flags: u16, handle: u64, offset: u64, data: &[u8]) {
        let r = Request {
            flags,
            kind: proto::cmd::WRITE,
            handle,
            offset,
            length: data.len() as u32,
        };
        let mut b = proto::encode_request(&r).to_vec();
        b.extend_from_slice(data);
        self.send(&b);
    }

    /// Reads one reply header (and a structured chunk's payload).
    pub fn reply(&mut self) -> Reply {
        let m = self.read_n(4);
        let magic = u32::from_be_bytes(m[..4].try_into().unwrap());
        if magic == proto::SIMPLE_REPLY_MAGIC {
            let r = self.read_n(12);
            Reply::Simple {
                error: u32::from_be_bytes(r[..4].try_into().unwrap()),
                handle: u64::from_be_bytes(r[4..12].try_into().unwrap()),
            }
        } else {
            assert_eq!(magic, proto::STRUCTURED_REPLY_MAGIC, "reply magic");
            let r = self.read_n(16);
            let len = u32::from_be_bytes(r[12..16].try_into().unwrap());
            Reply::Chunk {
                flags: u16::from_be_bytes(r[..2].try_into().unwrap()),
                kind: u16::from_be_bytes(r[2..4].try_into().unwrap()),
                handle: u64::from_be_bytes(r[4..12].try_into().unwrap()),
                payload: self.read_n(len as usize),
            }
        }
    }

    /// Reads a structured read reply that must be one final data chunk;
    /// returns (handle, offset, data).
    pub fn read_data_chunk(&mut self) -> (u64, u64, Vec<u8>) {
        match self.reply() {
            Reply::Chunk {
                flags,
                kind,
                handle,
                payload,
            } => {
                assert_eq!(kind, proto::reply_type::OFFSET_DATA, "{payload:?}");
                assert_eq!(flags, proto::REPLY_FLAG_DONE);
                let off = u64::from_be_bytes(payload[..8].try_into().unwrap());
                (handle, off, payload[8..].to_vec())
            }
            other => panic!("expected a data chunk, got {other:?}"),
        }
    }
}

/// The error value and message of a final structured error chunk.
pub fn error_chunk(r: &Reply) -> (u64, u32, String) {
    match r {
        Reply::Chunk {
            flags,
            kind,
            handle,
            payload,
        } => {
            assert_eq!(*flags, proto::REPLY_FLAG_DONE);
            assert_eq!(*kind, proto::reply_type::ERROR);
            let err = u32::from_be_bytes(payload[..4].try_into().unwrap());
            let len = u16::from_be_bytes(payload[4..6].try_into().unwrap()) as usize;
            assert_eq!(payload.len(), 6 + len);
            (
                *handle,
                err,
                String::from_utf8(payload[6..].to_vec()).unwrap(),
            )
        }
        other => panic!("expected an error chunk, got {other:?}"),
    }
}
