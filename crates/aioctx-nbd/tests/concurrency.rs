//! Many clients at once, many requests in flight per client.

mod common;

use std::collections::HashMap;

use aioctx_nbd::proto::{cmd, cmd_flags};
use common::{path_str, Client, Reply, Server};

const CLIENTS: u64 = 8;
const RANGE: u64 = 4 << 20; // per client
const CHUNK: usize = 64 * 1024;

fn pattern(client: u64, offset: u64) -> Vec<u8> {
    (0..CHUNK as u64)
        .map(|i| (client.wrapping_mul(131) ^ (offset + i).wrapping_mul(7) ^ (i >> 9)) as u8)
        .collect()
}

/// Pipelines every write of one client's range, then every read, and
/// checks each reply matches its request whatever order replies come in.
fn client_job(port: u16, id: u64) {
    let mut c = Client::connect(port);
    c.go("", true);
    let base = id * RANGE;
    let chunks = RANGE / CHUNK as u64;
    for i in 0..chunks {
        let off = base + i * CHUNK as u64;
        let flags = if i % 16 == 0 { cmd_flags::FUA } else { 0 };
        c.write(flags, i, off, &pattern(id, off));
    }
    let mut seen = vec![false; chunks as usize];
    for _ in 0..chunks {
        match c.reply() {
            Reply::Simple { error: 0, handle } => {
                assert!(!seen[handle as usize], "duplicate reply {handle}");
                seen[handle as usize] = true;
            }
            other => panic!("client {id}: bad write reply {other:?}"),
        }
    }
    c.request(cmd::FLUSH, 0, 9999, 0, 0);
    assert_eq!(
        c.reply(),
        Reply::Simple {
            error: 0,
            handle: 9999
        }
    );
    let mut expect = HashMap::new();
    for i in 0..chunks {
        let off = base + i * CHUNK as u64;
        c.request(cmd::READ, 0, 1000 + i, off, CHUNK as u32);
        expect.insert(1000 + i, off);
    }
    for _ in 0..chunks {
        let (h, off, data) = c.read_data_chunk();
        assert_eq!(expect.remove(&h), Some(off), "reply for unexpected handle");
        assert!(data == pattern(id, off), "client {id}: wrong data at {off}");
    }
    c.request(cmd::DISC, 0, 0, 0, 0);
    c.expect_closed();
}

#[test]
fn eight_clients_disjoint_ranges() {
    let dir = common::scratch();
    let img = dir.path().join("disk.img");
    let size = CLIENTS * RANGE;
    common::make_image(&img, size, |_| None);
    let s = Server::start(&["-e", "8", "--threads", "3", path_str(&img)]);
    let port = s.port;
    let jobs: Vec<_> = (0..CLIENTS)
        .map(|id| std::thread::spawn(move || client_job(port, id)))
        .collect();
    for j in jobs {
        j.join().expect("client thread");
    }
    // Without -t the server exits once the last client has gone, after
    // flushing the image.
    let (code, log) = s.wait();
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("last client left"), "{log}");
    let data = std::fs::read(&img).unwrap();
    for id in 0..CLIENTS {
        for i in 0..RANGE / CHUNK as u64 {
            let off = id * RANGE + i * CHUNK as u64;
            let got = &data[off as usize..off as usize + CHUNK];
            assert!(got == pattern(id, off), "byte mismatch on disk at {off}");
        }
    }
}

#[test]
fn clients_beyond_shared_limit_wait_their_turn() {
    let s = Server::start(&["-t", "-e", "1"]);
    let mut first = Client::connect(s.port);
    first.go("", false);
    // The second connection is accepted by the kernel but not served yet.
    let mut second = std::net::TcpStream::connect(("127.0.0.1", s.port)).unwrap();
    second
        .set_read_timeout(Some(std::time::Duration::from_millis(300)))
        .unwrap();
    let mut b = [0u8; 18];
    use std::io::Read;
    assert!(second.read(&mut b).is_err(), "served beyond the limit");
    first.request(cmd::DISC, 0, 0, 0, 0);
    first.expect_closed();
    second
        .set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    second.read_exact(&mut b).unwrap();
    assert_eq!(&b[..8], b"NBDMAGIC");
}

#[test]
fn pipelined_requests_beyond_the_per_connection_limits() {
    // 256 reads of 1 MiB = 256 MiB requested at once: more requests and
    // bytes than a connection may hold, so the server must hold some back
    // and resume them as replies drain.
    let dir = common::scratch();
    let img = dir.path().join("disk.img");
    common::make_image(&img, 16 << 20, |off| Some((off >> 20) as u8));
    let expected = std::fs::read(&img).unwrap();
    let s = Server::start(&["-t", path_str(&img)]);
    let mut c = Client::connect(s.port);
    c.go("", true);
    let n = 256u64;
    for h in 0..n {
        c.request(cmd::READ, 0, h, (h % 16) << 20, 1 << 20);
    }
    let mut seen = vec![false; n as usize];
    for _ in 0..n {
        let (h, off, data) = c.read_data_chunk();
        assert_eq!(off, (h % 16) << 20);
        assert!(data == expected[off as usize..off as usize + (1 << 20)]);
        assert!(!std::mem::replace(&mut seen[h as usize], true));
    }
}

/// Writes of every shape sent in one burst (so many arrive whole in one read, some straddle
/// reads, some are larger than what is buffered): tiny, unaligned, page-sized, just over a page,
/// 64 KiB and just over, some with FUA. The server writes a payload from its input buffer, from
/// a reused payload buffer, or on a worker; whichever, every byte must read back. A second burst
/// overwrites parts of the first.
#[test]
fn bursts_of_writes_of_every_shape_read_back() {
    let dir = common::scratch();
    let img = dir.path().join("disk.img");
    const SIZE: usize = 8 << 20;
    common::make_image(&img, SIZE as u64, |_| None);
    let s = Server::start(&["-t", path_str(&img)]);
    let mut c = Client::connect(s.port);
    c.go("", true);
    // Disjoint within a burst (writes in flight together may complete in any order).
    let first: &[(u64, usize)] = &[
        (0, 1),
        (4094, 2),
        (4096, 4096),
        (12_288, 4097),
        (65_536, 65_536),
        (131_073, 65_537),
        (262_144, 16_384),
        (300_001, 123_457),
        (1 << 20, 1 << 20),
    ];
    let second: &[(u64, usize)] = &[(4000, 8192), (65_536 + 512, 100_000)];
    let mut model = vec![0u8; SIZE];
    let mut handle = 0u64;
    for burst_shapes in [first, second] {
        let mut burst = Vec::new();
        let mut sent = 0;
        for round in 0..3u64 {
            for (i, &(off, len)) in burst_shapes.iter().enumerate() {
                handle += 1;
                let data: Vec<u8> = (0..len)
                    .map(|j| (handle as usize * 31 + j * 7 + (j >> 11)) as u8)
                    .collect();
                let off = off + round * (2 << 20);
                let req = aioctx_nbd::proto::Request {
                    flags: if i % 3 == 1 { cmd_flags::FUA } else { 0 },
                    kind: cmd::WRITE,
                    handle,
                    offset: off,
                    length: len as u32,
                };
                burst.extend_from_slice(&aioctx_nbd::proto::encode_request(&req));
                burst.extend_from_slice(&data);
                model[off as usize..off as usize + len].copy_from_slice(&data);
                sent += 1;
            }
        }
        c.send(&burst);
        for _ in 0..sent {
            match c.reply() {
                Reply::Simple { error: 0, .. } => {}
                other => panic!("bad write reply {other:?}"),
            }
        }
    }
    c.request(cmd::READ, 0, 7, 0, SIZE as u32);
    let (h, off, data) = c.read_data_chunk();
    assert_eq!((h, off), (7, 0));
    let first_diff = data.iter().zip(&model).position(|(a, b)| a != b);
    assert_eq!(first_diff, None, "read-back differs from the writes");
    c.request(cmd::DISC, 0, 0, 0, 0);
    c.expect_closed();
}
