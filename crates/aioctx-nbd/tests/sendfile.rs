//! Large cached reads are sent straight from the file with sendfile(2):
//! exact contents around the size threshold and up to the largest request,
//! with simple and structured replies, at depth, over TCP and Unix sockets,
//! and a file truncated under queued replies.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use aioctx_nbd::export::SENDFILE_MIN_DEFAULT as MIN;
use aioctx_nbd::proto::{cmd, MAX_REQUEST_LEN};
use common::{path_str, Client, Reply, Server};

/// Logged at trace level for every read queued as a file range.
const FILE_PATH_LOG: &str = "read sent from the file";

#[derive(Clone, Copy, Debug)]
enum Transport {
    Tcp,
    Unix,
}

/// A server on `transport` and how to reach it.
struct Setup {
    server: Server,
    sock: PathBuf,
}

impl Setup {
    fn start(transport: Transport, dir: &tempfile::TempDir, args: &[&str]) -> Setup {
        let sock = dir.path().join("nbd.sock");
        let server = match transport {
            Transport::Tcp => Server::start(args),
            Transport::Unix => Server::start_unix(&sock, args),
        };
        Setup { server, sock }
    }

    /// A client in the transmission phase.
    fn client(&self, structured: bool) -> Client {
        let mut c = if self.server.port != 0 {
            Client::connect(self.server.port)
        } else {
            Client::connect_unix(&self.sock)
        };
        c.go("", structured);
        c
    }
}

/// Deterministic pseudo-random bytes (xorshift64*), no dependency needed.
fn random_bytes(len: usize, mut seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    seed |= 1;
    while out.len() < len {
        seed ^= seed >> 12;
        seed ^= seed << 25;
        seed ^= seed >> 27;
        out.extend_from_slice(&seed.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Writes a random image; it stays in the page cache (the test just
/// wrote it), which is what the sendfile path needs.
fn random_image(path: &Path, len: usize, seed: u64) -> Vec<u8> {
    let data = random_bytes(len, seed);
    std::fs::write(path, &data).unwrap();
    data
}

/// Reads the next read reply. `pending` maps the handles of unanswered
/// reads to their (offset, length), which a simple reply does not repeat.
fn read_reply(
    c: &mut Client,
    structured: bool,
    pending: &mut HashMap<u64, (u64, u32)>,
) -> (u64, u64, Vec<u8>) {
    if structured {
        let (h, off, data) = c.read_data_chunk();
        let (want_off, len) = pending.remove(&h).expect("reply to a pending read");
        assert_eq!((off, data.len()), (want_off, len as usize), "handle {h}");
        (h, off, data)
    } else {
        match c.reply() {
            Reply::Simple { error: 0, handle } => {
                let (off, len) = pending.remove(&handle).expect("reply to a pending read");
                (handle, off, c.read_n(len as usize))
            }
            other => panic!("expected a successful simple reply, got {other:?}"),
        }
    }
}

fn read(c: &mut Client, structured: bool, handle: u64, off: u64, len: u32) -> Vec<u8> {
    c.request(cmd::READ, 0, handle, off, len);
    let mut pending = HashMap::from([(handle, (off, len))]);
    read_reply(c, structured, &mut pending).2
}

fn exact_contents(transport: Transport) {
    let dir = common::scratch();
    let img = dir.path().join("disk.img");
    let size = 48usize << 20;
    let data = random_image(&img, size, 7);
    // Trace level (-v plus -vv) logs each read that takes the file path.
    let s = Setup::start(transport, &dir, &["-t", "-vv", path_str(&img)]);
    let max = MAX_REQUEST_LEN as usize;
    let lens = [
        1,
        4096,
        MIN - 1,
        MIN,
        MIN + 1,
        65536 + 7,
        (1 << 20) + 4093,
        max,
    ];
    let mut handle = 0;
    for structured in [false, true] {
        let mut c = s.client(structured);
        for len in lens {
            for off in [0, 1, 4095, 3 * 4096 + 17, 12345, size - len] {
                handle += 1;
                let got = read(&mut c, structured, handle, off as u64, len as u32);
                assert!(
                    got == data[off..off + len],
                    "{transport:?} structured={structured}: wrong data for {len} bytes at {off}"
                );
            }
        }
        c.request(cmd::DISC, 0, 0, 0, 0);
        c.expect_closed();
    }
    let log = s.server.kill();
    assert!(log.contains(FILE_PATH_LOG), "no read used sendfile:\n{log}");
}

#[test]
fn exact_contents_tcp() {
    exact_contents(Transport::Tcp);
}

#[test]
fn exact_contents_unix() {
    exact_contents(Transport::Unix);
}

#[test]
fn no_sendfile_copies_and_returns_the_same() {
    let dir = common::scratch();
    let img = dir.path().join("disk.img");
    let data = random_image(&img, 4 << 20, 8);
    let s = Setup::start(
        Transport::Tcp,
        &dir,
        &["-t", "-vv", "--no-sendfile", path_str(&img)],
    );
    let mut c = s.client(true);
    for (h, (off, len)) in [(0, 1 << 20), (4097, MIN), (1, 3 << 20)]
        .into_iter()
        .enumerate()
    {
        let got = read(&mut c, true, h as u64, off as u64, len as u32);
        assert!(got == data[off..off + len]);
    }
    let log = s.server.kill();
    assert!(!log.contains(FILE_PATH_LOG), "{log}");
}

/// Two clients (simple and structured replies), each keeping 32 reads of
/// random sizes around and above the threshold in flight.
fn depth_32(transport: Transport) {
    let dir = common::scratch();
    let img = dir.path().join("disk.img");
    let size = 64usize << 20;
    let data = std::sync::Arc::new(random_image(&img, size, 9));
    let s = Setup::start(transport, &dir, &["-t", path_str(&img)]);
    let clients: Vec<_> = [false, true]
        .into_iter()
        .map(|structured| {
            let mut c = s.client(structured);
            let data = data.clone();
            std::thread::spawn(move || {
                let total = 300u64;
                let depth = 32;
                let mut rng = random_bytes(total as usize * 16, structured as u64 + 11);
                let mut pending = HashMap::new();
                let (mut sent, mut done) = (0u64, 0u64);
                while done < total {
                    while sent < total && pending.len() < depth {
                        let r = &mut rng[sent as usize * 16..][..16];
                        let word = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap());
                        // Sizes from just under the threshold to 2 MiB,
                        // at any byte offset.
                        let len = (MIN as u64 - 1 + word(&r[..8]) % (2 << 20)) as u32;
                        let off = word(&r[8..]) % (size as u64 - len as u64);
                        c.request(cmd::READ, 0, sent, off, len);
                        pending.insert(sent, (off, len));
                        sent += 1;
                    }
                    let (h, off, got) = read_reply(&mut c, structured, &mut pending);
                    let off = off as usize;
                    assert!(
                        got == data[off..off + got.len()],
                        "structured={structured}: wrong data for handle {h} at {off}"
                    );
                    done += 1;
                }
                c.request(cmd::DISC, 0, 0, 0, 0);
                c.expect_closed();
            })
        })
        .collect();
    for c in clients {
        c.join().expect("client thread");
    }
}

#[test]
fn depth_32_tcp() {
    depth_32(Transport::Tcp);
}

#[test]
fn depth_32_unix() {
    depth_32(Transport::Unix);
}

/// The client queues 64 MiB of reads without reading replies; the file is
/// then truncated to 24 MiB while most of them wait in the server's output
/// queue as file ranges. Every reply must still be complete (zeroes past
/// the new end of file, as the copy path reads there), and the stream
/// must stay in sync for the requests that follow. Simple replies: they do
/// not repeat their length, so a short one would desynchronise the next.
fn truncated_under_queued_replies(transport: Transport) {
    let dir = common::scratch();
    let img = dir.path().join("disk.img");
    let mib = 1usize << 20;
    let data = random_image(&img, 64 * mib, 10);
    // Debug level shows the file path's zero fill, trace level each read queued as a file range.
    let s = Setup::start(transport, &dir, &["-t", "-vv", path_str(&img)]);
    let mut c = s.client(false);
    if let common::Sock::Tcp(t) = &c.s {
        // A small receive buffer (no autotuning) so that at most a few MiB
        // can have left the server before the truncation.
        rustix::net::sockopt::set_socket_recv_buffer_size(t, 64 * 1024).unwrap();
    }
    let mut pending = HashMap::new();
    for i in 0..64u64 {
        c.request(cmd::READ, 0, i, i * mib as u64, mib as u32);
        pending.insert(i, (i * mib as u64, mib as u32));
    }
    // All 64 fit in what a connection may queue: wait until the last is queued as a file range
    // before the file shrinks.
    s.server
        .wait_for_log(|l| l.contains("read sent from the file") && l.contains("handle=63"));
    let eof = 24 * mib;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(eof as u64)
        .unwrap();
    for _ in 0..64 {
        let (h, off, got) = read_reply(&mut c, false, &mut pending);
        let off = off as usize;
        let want = &data[off..off + mib];
        // Below the new end of file: unchanged. Past it: what had been
        // sent before the truncation, then zeroes.
        let keep = eof.saturating_sub(off).min(mib);
        assert!(got[..keep] == want[..keep], "handle {h}: data below EOF");
        let first_diff = (keep..mib).find(|&i| got[i] != want[i]).unwrap_or(mib);
        assert!(
            got[first_diff..].iter().all(|&b| b == 0),
            "handle {h} at {off}: neither the old data nor zeroes past EOF"
        );
        if off >= 32 * mib {
            // Far behind anything the socket buffers could hold.
            assert!(got.iter().all(|&b| b == 0), "handle {h} at {off}: not zero");
        }
    }
    // The stream is still in sync.
    assert!(read(&mut c, false, 100, 4096, 65536) == data[4096..4096 + 65536]);
    assert!(read(&mut c, false, 101, 40 << 20, 65536)
        .iter()
        .all(|&b| b == 0));
    c.request(cmd::FLUSH, 0, 102, 0, 0);
    assert_eq!(
        c.reply(),
        Reply::Simple {
            error: 0,
            handle: 102
        }
    );
    c.request(cmd::DISC, 0, 0, 0, 0);
    c.expect_closed();
    let log = s.server.kill();
    assert!(
        log.contains("file ends inside a queued read"),
        "the truncation did not reach a queued file range:\n{log}"
    );
}

#[test]
fn truncated_under_queued_replies_tcp() {
    truncated_under_queued_replies(Transport::Tcp);
}

#[test]
fn truncated_under_queued_replies_unix() {
    truncated_under_queued_replies(Transport::Unix);
}
