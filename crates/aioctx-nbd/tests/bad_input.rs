//! Our own client sends each kind of bad input and checks the exact reply,
//! while another client stays connected and keeps being served.

mod common;

use aioctx_nbd::proto::{self, cmd, cmd_flags, errno, opt, rep, tflags};
use common::{error_chunk, Client, Reply, Server};

const SIZE: u64 = 8 << 20;

fn server(extra: &[&str]) -> (Server, tempfile::TempDir) {
    let dir = common::scratch();
    let img = common::join(&dir, "disk.img");
    common::make_image(&img, SIZE, |_| None);
    let mut args = vec!["-t", "-x", "disk", "--handshake-timeout", "1"];
    args.extend_from_slice(extra);
    args.push(common::path_str(&img));
    let s = Server::start(&args);
    (s, dir)
}

/// A client in transmission phase that must keep working throughout.
fn bystander(port: u16) -> Client {
    let mut c = Client::connect(port);
    c.go("disk", true);
    c
}

fn check_bystander(c: &mut Client, n: u64) {
    let data = vec![n as u8; 4096];
    c.write(0, 100 + n, 4096 * n, &data);
    assert_eq!(
        c.reply(),
        Reply::Simple {
            error: 0,
            handle: 100 + n
        }
    );
    c.request(cmd::READ, 0, 200 + n, 4096 * n, 4096);
    let (h, off, got) = c.read_data_chunk();
    assert_eq!((h, off), (200 + n, 4096 * n));
    assert_eq!(got, data);
}

#[test]
fn handshake_errors() {
    let (s, _dir) = server(&[]);
    let mut other = bystander(s.port);

    // Wrong option magic: the connection is dropped.
    let mut c = Client::connect(s.port);
    c.send(b"IHAVEOPX\0\0\0\x07\0\0\0\0");
    c.expect_closed();
    check_bystander(&mut other, 1);

    // Unknown client flags: dropped.
    let mut c = Client::connect_raw(s.port);
    c.send(&0x80u32.to_be_bytes());
    c.expect_closed();

    // Unknown option: ERR_UNSUP, and the next option still works.
    let mut c = Client::connect(s.port);
    c.send_option(0x4242, b"junk");
    let (o, t, msg) = c.option_reply();
    assert_eq!((o, t), (0x4242, rep::ERR_UNSUP));
    assert_eq!(msg, b"unknown option");
    c.send_option(opt::LIST, &[]);
    let (o, t, data) = c.option_reply();
    assert_eq!((o, t), (opt::LIST, rep::SERVER));
    assert_eq!(data, b"\0\0\0\x04disk");
    assert_eq!(c.option_reply(), (opt::LIST, rep::ACK, vec![]));

    // Option data over 64 KiB: skipped and answered with ERR_TOO_BIG.
    let big = vec![0u8; 64 * 1024 + 1];
    c.send_option(opt::INFO, &big);
    let (o, t, _) = c.option_reply();
    assert_eq!((o, t), (opt::INFO, rep::ERR_TOO_BIG));

    // Malformed INFO: ERR_INVALID; unknown export: ERR_UNKNOWN.
    c.send_option(opt::INFO, &[0, 0, 0, 9, b'x']);
    assert_eq!(c.option_reply().1, rep::ERR_INVALID);
    c.send_option(opt::INFO, b"\0\0\0\x04nope\0\0");
    assert_eq!(c.option_reply().1, rep::ERR_UNKNOWN);

    // Meta context before structured replies: ERR_INVALID.
    c.send_option(
        opt::SET_META_CONTEXT,
        b"\0\0\0\x04disk\0\0\0\x01\0\0\0\x0fbase:allocation",
    );
    assert_eq!(c.option_reply().1, rep::ERR_INVALID);

    // TLS is not offered.
    c.send_option(opt::STARTTLS, &[]);
    assert_eq!(c.option_reply().1, rep::ERR_UNSUP);

    // ABORT is acknowledged, then the server closes.
    c.send_option(opt::ABORT, &[]);
    assert_eq!(c.option_reply(), (opt::ABORT, rep::ACK, vec![]));
    c.expect_closed();

    // EXPORT_NAME with an unknown name cannot be answered: dropped.
    let mut c = Client::connect(s.port);
    c.send_option(opt::EXPORT_NAME, b"nope");
    c.expect_closed();

    // EXPORT_NAME with the right name: size, flags, no zeroes (we asked).
    let mut c = Client::connect(s.port);
    c.send_option(opt::EXPORT_NAME, b"disk");
    let r = c.read_n(10);
    assert_eq!(&r[..8], &SIZE.to_be_bytes());
    let flags = u16::from_be_bytes([r[8], r[9]]);
    assert_eq!(flags & tflags::SEND_DF, 0);
    c.request(cmd::DISC, 0, 1, 0, 0);
    c.expect_closed();

    // A client that never finishes its handshake is dropped by the timer
    // (1 s here).
    let mut c = Client::connect(s.port);
    let start = std::time::Instant::now();
    c.expect_closed();
    assert!(start.elapsed() >= std::time::Duration::from_millis(900));

    check_bystander(&mut other, 2);
    let log = s.kill();
    assert!(log.contains("handshake not finished in time"), "{log}");
}

#[test]
fn transmission_errors_simple_replies() {
    let (s, _dir) = server(&[]);
    let mut other = bystander(s.port);
    let mut c = Client::connect(s.port);
    let (size, flags) = c.go("disk", false);
    assert_eq!(size, SIZE);
    for f in [
        tflags::HAS_FLAGS,
        tflags::SEND_FLUSH,
        tflags::SEND_FUA,
        tflags::SEND_TRIM,
        tflags::SEND_WRITE_ZEROES,
        tflags::CAN_MULTI_CONN,
        tflags::SEND_FAST_ZERO,
        tflags::SEND_CACHE,
    ] {
        assert_ne!(flags & f, 0, "flag {f:#x} missing from {flags:#x}");
    }
    assert_eq!(flags & (tflags::READ_ONLY | tflags::SEND_DF), 0);

    let simple = |error, handle| Reply::Simple { error, handle };

    // Read beyond the end: EINVAL, no payload.
    c.request(cmd::READ, 0, 1, SIZE - 512, 1024);
    assert_eq!(c.reply(), simple(errno::EINVAL, 1));
    // Offset + length overflowing u64.
    c.request(cmd::READ, 0, 2, u64::MAX - 10, 512);
    assert_eq!(c.reply(), simple(errno::EINVAL, 2));
    // Write beyond the end: ENOSPC; the payload is skipped, so the next
    // request is understood.
    c.write(0, 3, SIZE - 100, &[1u8; 200]);
    assert_eq!(c.reply(), simple(errno::ENOSPC, 3));
    // Read over 32 MiB.
    c.request(cmd::READ, 0, 4, 0, proto::MAX_REQUEST_LEN + 1);
    assert_eq!(c.reply(), simple(errno::EINVAL, 4));
    // Unknown command.
    c.request(42, 0, 5, 0, 0);
    assert_eq!(c.reply(), simple(errno::EINVAL, 5));
    // Flag not valid for the command.
    c.request(cmd::READ, cmd_flags::REQ_ONE, 6, 0, 512);
    assert_eq!(c.reply(), simple(errno::EINVAL, 6));
    // BLOCK_STATUS without a negotiated context.
    c.request(cmd::BLOCK_STATUS, 0, 7, 0, 512);
    assert_eq!(c.reply(), simple(errno::EINVAL, 7));
    // DF without structured replies.
    c.request(cmd::READ, cmd_flags::DF, 8, 0, 512);
    assert_eq!(c.reply(), simple(errno::EINVAL, 8));
    // Still in sync: a good write and read.
    c.write(cmd_flags::FUA, 9, 0, &[9u8; 512]);
    assert_eq!(c.reply(), simple(0, 9));
    c.request(cmd::READ, 0, 10, 0, 512);
    assert_eq!(c.reply(), simple(0, 10));
    assert_eq!(c.read_n(512), vec![9u8; 512]);

    // Write over 32 MiB: the payload is skipped, EINVAL.
    let big = vec![0u8; proto::MAX_REQUEST_LEN as usize + 4096];
    c.write(0, 11, 0, &big);
    assert_eq!(c.reply(), simple(errno::EINVAL, 11));
    c.request(cmd::FLUSH, 0, 12, 0, 0);
    assert_eq!(c.reply(), simple(0, 12));

    // Bad request magic: the stream cannot be resynchronised; dropped.
    let mut bad = proto::encode_request(&proto::Request {
        flags: 0,
        kind: cmd::READ,
        handle: 13,
        offset: 0,
        length: 512,
    });
    bad[0] ^= 0xff;
    c.send(&bad);
    c.expect_closed();

    // A client vanishing mid-write, and one vanishing with requests in
    // flight.
    let mut v = Client::connect(s.port);
    v.go("disk", false);
    let mut partial = proto::encode_request(&proto::Request {
        flags: 0,
        kind: cmd::WRITE,
        handle: 1,
        offset: 0,
        length: 65536,
    })
    .to_vec();
    partial.extend_from_slice(&[0u8; 1000]);
    v.send(&partial);
    drop(v);
    let mut v = Client::connect(s.port);
    v.go("disk", false);
    for h in 0..16 {
        v.request(cmd::READ, 0, h, 0, 65536);
    }
    drop(v);

    check_bystander(&mut other, 3);
    let log = s.kill();
    assert!(log.contains("request with bad magic"), "{log}");
    assert!(log.contains("client vanished mid-request"), "{log}");
}

#[test]
fn transmission_errors_structured_and_read_only() {
    let (s, _dir) = server(&["-r"]);
    let mut c = Client::connect(s.port);
    let (_, flags) = c.go("disk", true);
    assert_ne!(flags & tflags::READ_ONLY, 0);
    assert_ne!(flags & tflags::SEND_DF, 0);
    assert_eq!(flags & (tflags::SEND_TRIM | tflags::SEND_WRITE_ZEROES), 0);

    // Write to a read-only export: EPERM as a structured error chunk, and
    // the payload is skipped.
    c.write(0, 1, 0, &[1u8; 4096]);
    let (h, e, msg) = error_chunk(&c.reply());
    assert_eq!(
        (h, e, msg.as_str()),
        (1, errno::EPERM, "export is read-only")
    );
    c.request(cmd::TRIM, 0, 2, 0, 4096);
    let (h, e, _) = error_chunk(&c.reply());
    assert_eq!((h, e), (2, errno::EPERM));
    // Read beyond the end: an error chunk, never a simple reply.
    c.request(cmd::READ, 0, 3, SIZE, 1);
    let (h, e, _) = error_chunk(&c.reply());
    assert_eq!((h, e), (3, errno::EINVAL));
    // Reads still work, DF is accepted.
    c.request(cmd::READ, cmd_flags::DF, 4, 4096, 4096);
    let (h, off, data) = c.read_data_chunk();
    assert_eq!((h, off), (4, 4096));
    assert_eq!(data, vec![0u8; 4096]);
    // Zero-length read: a lone NONE chunk.
    c.request(cmd::READ, 0, 5, 0, 0);
    assert_eq!(
        c.reply(),
        Reply::Chunk {
            flags: proto::REPLY_FLAG_DONE,
            kind: proto::reply_type::NONE,
            handle: 5,
            payload: vec![]
        }
    );
    // Block status on an empty image: one hole|zero extent.
    c.request(cmd::BLOCK_STATUS, 0, 6, 0, SIZE as u32);
    match c.reply() {
        Reply::Chunk {
            kind,
            handle,
            payload,
            ..
        } => {
            assert_eq!((kind, handle), (proto::reply_type::BLOCK_STATUS, 6));
            assert_eq!(&payload[..4], &1u32.to_be_bytes());
            assert_eq!(&payload[4..8], &(SIZE as u32).to_be_bytes());
            assert_eq!(&payload[8..12], &3u32.to_be_bytes());
        }
        other => panic!("{other:?}"),
    }
    // Block status of an empty range: EINVAL, not an empty extent list.
    c.request(cmd::BLOCK_STATUS, 0, 7, 0, 0);
    let (h, e, _) = error_chunk(&c.reply());
    assert_eq!((h, e), (7, errno::EINVAL));
    c.request(cmd::DISC, 0, 8, 0, 0);
    c.expect_closed();
}

#[test]
fn unix_socket_and_info() {
    let dir = common::scratch();
    let img = common::join(&dir, "disk.img");
    common::make_image(&img, SIZE, |_| Some(5));
    let sock = common::join(&dir, "nbd.sock");
    let s = {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_aioctx-nbd"))
            .args(["-t", "-k", common::path_str(&sock), common::path_str(&img)])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::BufRead;
        let mut line = String::new();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        out.read_line(&mut line).unwrap();
        assert!(line.contains("nbd+unix:///?socket="), "{line}");
        (child, out)
    };
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let out = common::run("qemu-img", &["info", "--output=json", &uri]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("\"virtual-size\": {SIZE}")),
        "{text}"
    );
    let (mut child, _stdout) = s;
    let _ = child.kill();
    let _ = child.wait();
}
