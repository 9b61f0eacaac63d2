//! Data safety: acknowledged FUA writes and flushed writes survive a
//! SIGKILL; SIGTERM finishes in-flight writes before exiting.

mod common;

use aioctx_nbd::proto::{cmd, cmd_flags};
use common::{path_str, Client, Reply, Server};

fn ok(handle: u64) -> Reply {
    Reply::Simple { error: 0, handle }
}

#[test]
fn acknowledged_writes_survive_sigkill() {
    let dir = common::scratch();
    let img = dir.path().join("disk.img");
    common::make_image(&img, 4 << 20, |_| None);

    let s = Server::start(&["-t", path_str(&img)]);
    let mut c = Client::connect(s.port);
    c.go("", false);
    c.write(cmd_flags::FUA, 1, 0, &[0xf1; 65536]);
    assert_eq!(c.reply(), ok(1));
    c.write(0, 2, 1 << 20, &[0xf2; 65536]);
    assert_eq!(c.reply(), ok(2));
    c.request(cmd::FLUSH, 0, 3, 0, 0);
    assert_eq!(c.reply(), ok(3));
    s.kill();

    // Restart on the same image and read through the server.
    let s = Server::start(&["-t", path_str(&img)]);
    let mut c = Client::connect(s.port);
    c.go("", false);
    for (h, off, byte) in [(4, 0, 0xf1), (5, 1 << 20, 0xf2)] {
        c.request(cmd::READ, 0, h, off, 65536);
        assert_eq!(c.reply(), ok(h));
        assert_eq!(c.read_n(65536), vec![byte; 65536]);
    }
}

#[test]
fn sigterm_finishes_in_flight_writes_then_exits() {
    let dir = common::scratch();
    let img = dir.path().join("disk.img");
    common::make_image(&img, 16 << 20, |_| None);
    let s = Server::start(&["-t", "-vv", path_str(&img)]);
    let mut c = Client::connect(s.port);
    c.go("", false);
    // Queue a burst of writes, then ask the server to stop before reading
    // any reply. Every write it acknowledges must be on disk.
    let n = 64u64;
    for i in 0..n {
        c.write(0, i, i * 65536, &[(i as u8) | 1; 65536]);
    }
    // Wait until the first reply shows the server is processing the burst.
    let first = c.reply();
    s.signal("TERM");
    let mut acked = vec![first];
    loop {
        let mut b = [0u8; 1];
        match c.s.peek(&mut b) {
            Ok(0) => break,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            // A read timeout: the server went silent without closing.
            Err(e) => panic!("waiting for replies after SIGTERM: {e}"),
            Ok(_) => acked.push(c.reply()),
        }
    }
    let (code, log) = s.wait();
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("shutting down"), "{log}");
    assert!(log.contains("image flushed"), "{log}");
    assert!(!log.contains("did not finish in time"), "{log}");
    let data = std::fs::read(&img).unwrap();
    for r in &acked {
        match r {
            Reply::Simple { error: 0, handle } => {
                let off = (*handle * 65536) as usize;
                let want = (*handle as u8) | 1;
                assert!(data[off..off + 65536].iter().all(|&b| b == want));
            }
            // Requests that arrived after the signal are refused.
            Reply::Simple { error: 108, .. } => {}
            other => panic!("unexpected reply {other:?}"),
        }
    }
}
