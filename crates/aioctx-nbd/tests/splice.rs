//! Large page-aligned write payloads move from the socket into the image
//! with splice(2): exact contents for payloads on both sides of every
//! limit (size, alignment, FUA), whole or in pieces, at depth, over TCP and
//! Unix sockets; the same with `--no-splice`; and a write that fails
//! half-way through its payload.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use aioctx_nbd::proto::{cmd, cmd_flags, encode_request, Request};
use common::{path_str, Client, Reply, Server};

/// Logged at trace level for every write whose payload is spliced.
const SPLICED_LOG: &str = "write payload spliced";

/// Server options for tests that need their writes spliced: a write that takes over 1 ms (as
/// one may on a loaded machine) would otherwise send writes to workers for 100 ms.
const NEVER_SLOW: [&str; 2] = ["--inline-write-slow-ns", "100000000000"];

const IMAGE_SIZE: usize = 12 << 20;

#[derive(Clone, Copy, Debug)]
enum Transport {
    Tcp,
    Unix,
}

/// A zeroed, sparse image of `size` bytes in `dir`.
fn blank_image(dir: &tempfile::TempDir, size: usize) -> PathBuf {
    let img = dir.path().join("disk.img");
    common::make_image(&img, size as u64, |_| None);
    img
}

/// A server on `img` (persistent, logging at trace level, with `options`) and a client in the
/// transmission phase.
fn serve(
    transport: Transport,
    dir: &tempfile::TempDir,
    img: &Path,
    options: &[&str],
) -> (Server, Client) {
    let mut args = vec!["-t", "-vv"];
    args.extend_from_slice(options);
    args.push(path_str(img));
    let args = &args;
    let sock = dir.path().join("nbd.sock");
    let server = match transport {
        Transport::Tcp => Server::start(args),
        Transport::Unix => Server::start_unix(&sock, args),
    };
    let mut c = match transport {
        Transport::Tcp => Client::connect(server.port),
        Transport::Unix => Client::connect_unix(&sock),
    };
    c.go("", false);
    (server, c)
}

/// A payload no other write in the test has.
fn pattern(handle: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|j| (handle as usize * 131 + j * 7 + (j >> 12)) as u8)
        .collect()
}

fn write_request(handle: u64, flags: u16, offset: u64, len: usize) -> Vec<u8> {
    encode_request(&Request {
        flags,
        kind: cmd::WRITE,
        handle,
        offset,
        length: len as u32,
    })
    .to_vec()
}

fn expect_ok(c: &mut Client, n: usize) {
    for _ in 0..n {
        match c.reply() {
            Reply::Simple { error: 0, .. } => {}
            other => panic!("bad write reply {other:?}"),
        }
    }
}

fn read_back(c: &mut Client, handle: u64, offset: u64, len: usize) -> Vec<u8> {
    c.request(cmd::READ, 0, handle, offset, len as u32);
    assert_eq!(c.reply(), Reply::Simple { error: 0, handle });
    c.read_n(len)
}

/// Sends writes of every shape, in bursts and in pieces, and checks every
/// byte of the image afterwards, through the server and in the file.
/// Returns the server's log.
fn writes_land_exactly(transport: Transport, extra_args: &[&str]) -> String {
    let dir = common::scratch();
    let img = blank_image(&dir, IMAGE_SIZE);
    let options = [&NEVER_SLOW[..], extra_args].concat();
    let (server, mut c) = serve(transport, &dir, &img, &options);
    let mut model = vec![0u8; IMAGE_SIZE];
    let mut handle = 0u64;
    let mut write = |model: &mut Vec<u8>, flags: u16, off: u64, len: usize| {
        handle += 1;
        let data = pattern(handle, len);
        model[off as usize..off as usize + len].copy_from_slice(&data);
        let mut b = write_request(handle, flags, off, len);
        b.extend_from_slice(&data);
        b
    };

    // One burst of every shape, disjoint ranges (writes in flight together may land in any
    // order). Spliced: 32 KiB, 48 KiB, 64 KiB, 68 KiB and 1 MiB at page offsets (1 MiB takes
    // several pipefuls). Copied: one byte short of 32 KiB, 1 MiB + 4 KiB, 64 KiB at an odd
    // offset, 64 KiB with FUA, and small writes.
    let shapes: &[(u16, u64, usize)] = &[
        (0, 0, 64 << 10),
        (0, 64 << 10, 32 << 10),
        (0, 96 << 10, (32 << 10) - 1),
        (0, 128 << 10, 48 << 10),
        (0, 192 << 10, 4096),
        (0, 200 << 10, (64 << 10) + 4096),
        (0, (280 << 10) + 3, 64 << 10),
        (cmd_flags::FUA, 352 << 10, 64 << 10),
        (0, 416 << 10, 64 << 10),
        (0, 480 << 10, 100),
        (0, 8 << 20, (1 << 20) + 4096),
        (0, 10 << 20, 1 << 20),
    ];
    let mut burst = Vec::new();
    for &(flags, off, len) in shapes {
        burst.extend(write(&mut model, flags, off, len));
    }
    c.send(&burst);
    expect_ok(&mut c, shapes.len());

    // 64 writes of 64 KiB in one go: most payloads wait in the socket behind the others.
    let base = 1u64 << 20;
    let mut burst = Vec::new();
    for i in 0..64u64 {
        burst.extend(write(&mut model, 0, base + i * 65536, 65536));
    }
    c.send(&burst);
    expect_ok(&mut c, 64);

    // Payloads in pieces: header alone, then the payload in uneven parts, one write at a
    // time, so the server sees payloads arrive after their header.
    for i in 0..8u64 {
        let off = (6 << 20) + i * 65536;
        let b = write(&mut model, 0, off, 65536);
        let cuts = [0, 28, 28 + 1, 28 + 4096 + 7, 28 + 40_000, b.len()];
        for w in cuts.windows(2) {
            c.send(&b[w[0]..w[1]]);
        }
        expect_ok(&mut c, 1);
    }

    // 1 MiB payloads one at a time, after spliced writes: each takes several pipefuls.
    for (h, off) in [(1001u64, 10usize << 20), (1002, 11 << 20)] {
        let data = pattern(h, 1 << 20);
        model[off..off + data.len()].copy_from_slice(&data);
        let mut b = write_request(h, 0, off as u64, data.len());
        b.extend_from_slice(&data);
        c.send(&b);
        expect_ok(&mut c, 1);
    }

    let got = read_back(&mut c, 9999, 0, IMAGE_SIZE);
    let first_diff = got.iter().zip(&model).position(|(a, b)| a != b);
    assert_eq!(
        first_diff, None,
        "{transport:?}: read back differs from the writes"
    );
    c.request(cmd::FLUSH, 0, 10_000, 0, 0);
    assert_eq!(
        c.reply(),
        Reply::Simple {
            error: 0,
            handle: 10_000
        }
    );
    c.request(cmd::DISC, 0, 0, 0, 0);
    c.expect_closed();
    let log = server.kill();
    let file = std::fs::read(&img).unwrap();
    let first_diff = file.iter().zip(&model).position(|(a, b)| a != b);
    assert_eq!(
        first_diff, None,
        "{transport:?}: the file differs from the writes"
    );
    log
}

/// Whether the log says the write `handle` was spliced.
fn spliced(log: &str, handle: u64) -> bool {
    let h = format!("handle={handle}");
    log.lines()
        .any(|l| l.contains(SPLICED_LOG) && l.contains(&h))
}

#[test]
fn spliced_writes_land_exactly_tcp() {
    let log = writes_land_exactly(Transport::Tcp, &[]);
    assert!(
        spliced(&log, 1001) && spliced(&log, 1002),
        "1 MiB writes not spliced:\n{log}"
    );
}

#[test]
fn spliced_writes_land_exactly_unix() {
    let log = writes_land_exactly(Transport::Unix, &[]);
    assert!(
        spliced(&log, 1001) && spliced(&log, 1002),
        "1 MiB writes not spliced:\n{log}"
    );
}

#[test]
fn no_splice_copies_every_payload() {
    let log = writes_land_exactly(Transport::Tcp, &["--no-splice"]);
    assert!(!log.contains(SPLICED_LOG), "{log}");
}

/// Clears the immutable attribute on drop, so the scratch directory can be removed even if
/// the test fails.
struct Immutable<'a>(&'a Path);

impl<'a> Immutable<'a> {
    /// `chattr +i`, or `None` where that is not allowed (not root, a file system without
    /// the attribute).
    fn set(path: &'a Path) -> Option<Immutable<'a>> {
        let ok = Command::new("chattr")
            .arg("+i")
            .arg(path)
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(Immutable(path))
    }
}

impl Drop for Immutable<'_> {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-i").arg(self.0).status();
    }
}

/// The image turns immutable under the server, so splicing into it fails with EPERM. One
/// write fails half-way through its payload (the test sends the rest only after the failure),
/// the next one whole: each gets an error reply, the rest of a payload is not taken for a
/// request, and the writes after them work once the file is writable again.
#[test]
fn failed_spliced_write_gets_an_error_and_the_stream_stays_in_sync() {
    let dir = common::scratch();
    let img = blank_image(&dir, 1 << 20);
    let (server, mut c) = serve(Transport::Tcp, &dir, &img, &NEVER_SLOW);
    let data = pattern(1, 65536);
    // Three good writes: from the second on, payloads are spliced.
    for h in 1..=3u64 {
        let mut b = write_request(h, 0, 0, 65536);
        b.extend_from_slice(&data);
        c.send(&b);
        expect_ok(&mut c, 1);
    }
    let Some(immutable) = Immutable::set(&img) else {
        eprintln!("skipped: chattr +i is not allowed here");
        return;
    };
    for h in [10u64, 11] {
        let mut b = write_request(h, 0, 0, 65536);
        b.extend_from_slice(&pattern(h, 65536));
        c.send(&b[..28 + 16384]);
        if h == 10 {
            // The first part fails on its own, with the rest still to come.
            server.wait_for_log(|l| {
                l.contains("skipping the rest of its payload") && l.contains("handle=10")
            });
        }
        c.send(&b[28 + 16384..]);
        match c.reply() {
            Reply::Simple { error, handle } => {
                assert_eq!(handle, h);
                assert_ne!(error, 0, "a write into an immutable file succeeded");
            }
            other => panic!("{other:?}"),
        }
    }
    drop(immutable);
    let good = pattern(12, 65536);
    let mut b = write_request(12, 0, 131_072, 65536);
    b.extend_from_slice(&good);
    c.send(&b);
    expect_ok(&mut c, 1);
    assert!(read_back(&mut c, 13, 131_072, 65536) == good);
    assert!(
        read_back(&mut c, 14, 0, 65536) == data,
        "a failed write changed the data"
    );
    c.request(cmd::DISC, 0, 0, 0, 0);
    c.expect_closed();
    let log = server.kill();
    assert!(
        spliced(&log, 10),
        "the failing write was not spliced:\n{log}"
    );
}

/// Bytes the server process has made the kernel read from storage so far.
fn storage_reads(server: &Server) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{}/io", server.child.id())).unwrap();
    io.lines()
        .find_map(|l| l.strip_prefix("read_bytes: "))
        .expect("read_bytes in /proc/PID/io")
        .parse()
        .unwrap()
}

/// Payloads that arrive in pieces ending mid-page, over a region of the image that is on disk
/// but not in the page cache: only whole pages go to the file, so the kernel never has to read
/// a page to merge a partial write into it (which the loop thread would wait for).
#[test]
fn pieces_ending_mid_page_read_nothing_from_disk() {
    let dir = common::scratch();
    let img = dir.path().join("disk.img");
    let size = 4usize << 20;
    let mut model: Vec<u8> = (0..size).map(|i| (i * 7 + (i >> 13)) as u8).collect();
    std::fs::write(&img, &model).unwrap();
    {
        let f = std::fs::File::open(&img).unwrap();
        f.sync_all().unwrap();
        rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed).unwrap();
    }
    let (server, mut c) = serve(Transport::Tcp, &dir, &img, &NEVER_SLOW);
    // Turns exact header reads on; a whole aligned page range, nothing to read.
    let mut b = write_request(1, 0, 0, 65536);
    b.extend_from_slice(&pattern(1, 65536));
    model[..65536].copy_from_slice(&pattern(1, 65536));
    c.send(&b);
    expect_ok(&mut c, 1);

    let before = storage_reads(&server);
    for i in 0..8u64 {
        let h = 10 + i;
        let off = (1 << 20) + i as usize * 65536;
        let data = pattern(h, 65536);
        model[off..off + 65536].copy_from_slice(&data);
        c.send(&write_request(h, 0, off as u64, 65536));
        // Each piece is in before the next leaves, so pieces end where the cuts are.
        for (from, to) in [(0, 1000), (1000, 20_000), (20_000, 65_536)] {
            c.send(&data[from..to]);
            if to < 65_536 {
                let want = format!("received={to}");
                server.wait_for_log(|l| {
                    l.contains("payload piece spliced")
                        && l.contains(&format!("handle={h}"))
                        && l.contains(&want)
                });
            }
        }
        expect_ok(&mut c, 1);
    }
    let read = storage_reads(&server) - before;
    // Merging the pieces page by page in the file would read 2 pages per write (64 KiB in
    // all); allow for a stray page fault in the server's own code.
    assert!(read < 16_384, "the server read {read} bytes from disk");
    assert!(
        read_back(&mut c, 99, 0, size) == model,
        "read back differs from the writes"
    );
    c.request(cmd::DISC, 0, 0, 0, 0);
    c.expect_closed();
}

/// While a payload is incomplete the server's loop does not busy-poll, but a client that stops
/// half-way gives polling back after a millisecond, and can still finish its write later.
#[test]
fn stalled_payload_gives_busy_polling_back() {
    let dir = common::scratch();
    let img = blank_image(&dir, 1 << 20);
    let (server, mut c) = serve(Transport::Tcp, &dir, &img, &NEVER_SLOW);
    let data = pattern(1, 65536);
    let mut b = write_request(1, 0, 65536, 65536);
    b.extend_from_slice(&data);
    c.send(&b[..28 + 1000]);
    server.wait_for_log(|l| l.contains("payload stalled, busy-polling allowed again"));
    c.send(&b[28 + 1000..]);
    expect_ok(&mut c, 1);
    assert!(read_back(&mut c, 2, 65536, 65536) == data);
    c.request(cmd::DISC, 0, 0, 0, 0);
    c.expect_closed();
}

/// A piece of a spliced payload that is slow to reach the file (here every inline write counts
/// as slow) sends the rest of that payload to a worker, as a write of its own under the same
/// handle: one reply, and every byte where it belongs.
#[test]
fn slow_piece_sends_the_rest_of_the_payload_to_a_worker() {
    let dir = common::scratch();
    let img = blank_image(&dir, 16 << 20);
    let (server, mut c) = serve(Transport::Tcp, &dir, &img, &["--inline-write-slow-ns", "0"]);
    // The first write's payload comes in with its header and is copied (through a worker: it
    // is too big to write inline, so nothing is timed); the second one's header is read alone
    // and its payload spliced, until the first piece in the file turns out "slow".
    let len = 4 << 20;
    let mut model = vec![0u8; 16 << 20];
    let mut burst = Vec::new();
    for (h, off) in [(1u64, 0usize), (2, 8 << 20)] {
        let data = pattern(h, len);
        model[off..off + len].copy_from_slice(&data);
        burst.extend(write_request(h, 0, off as u64, len));
        burst.extend(&data);
    }
    c.send(&burst);
    let mut handles = Vec::new();
    for _ in 0..2 {
        match c.reply() {
            Reply::Simple { error: 0, handle } => handles.push(handle),
            other => panic!("bad write reply {other:?}"),
        }
    }
    handles.sort();
    assert_eq!(handles, [1, 2], "one reply per write");
    assert!(read_back(&mut c, 3, 0, 16 << 20) == model);
    c.request(cmd::DISC, 0, 0, 0, 0);
    c.expect_closed();
    let log = server.kill();
    assert!(spliced(&log, 2), "the second write was not spliced:\n{log}");
    assert!(
        log.lines()
            .any(|l| l.contains("the rest of the payload goes to a worker")
                && l.contains("handle=2")),
        "no switch to a worker:\n{log}"
    );
}
