//! Interoperability with real clients: qemu-img, qemu-io, nbdinfo, nbdcopy.

mod common;

use common::{path_str, run, Server};

#[test]
fn qemu_img_info_reports_default_image() {
    // No FILE: the embedded 1 GiB temporary image.
    let s = Server::start(&["-t"]);
    let out = run("qemu-img", &["info", "--output=json", &s.uri]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("\"virtual-size\": 1073741824"), "{text}");
}

#[test]
fn qemu_img_convert_to_and_from_and_compare() {
    let dir = common::scratch();
    let src = dir.path().join("src.img");
    let served = dir.path().join("served.img");
    let back = dir.path().join("back.img");
    let size = 32u64 << 20;
    // Data with holes every third MiB.
    common::make_image(&src, size, |off| ((off >> 20) % 3 != 0).then_some(0x5a));
    common::make_image(&served, size, |_| None);
    let s = Server::start(&["-t", path_str(&served)]);

    run(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            path_str(&src),
            &s.uri,
        ],
    );
    run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", path_str(&src), &s.uri],
    );
    run(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "raw", &s.uri, path_str(&back)],
    );
    run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            path_str(&src),
            path_str(&back),
        ],
    );
    assert_eq!(common::checksum(&src), common::checksum(&served));
}

#[test]
fn qemu_io_patterns_fua_and_flush() {
    let dir = common::scratch();
    let img = dir.path().join("disk.img");
    common::make_image(&img, 16 << 20, |_| None);
    let s = Server::start(&["-t", path_str(&img)]);
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            &s.uri,
            "-c",
            "write -P 0xa5 0 1M",
            "-c",
            "write -f -P 0x3c 1M 64k",
            "-c",
            "aio_write -P 0x11 2M 4k",
            "-c",
            "aio_write -P 0x22 3M 4k",
            "-c",
            "aio_flush",
            "-c",
            "flush",
        ],
    );
    let out = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-r",
            &s.uri,
            "-c",
            "read -P 0xa5 0 1M",
            "-c",
            "read -P 0x3c 1M 64k",
            "-c",
            "read -P 0x11 2M 4k",
            "-c",
            "read -P 0x22 3M 4k",
            "-c",
            "read -P 0 4M 1M",
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("Pattern verification failed"), "{text}");
    // And on disk.
    let data = std::fs::read(&img).unwrap();
    assert!(data[..1 << 20].iter().all(|&b| b == 0xa5));
    assert!(data[1 << 20..(1 << 20) + 65536].iter().all(|&b| b == 0x3c));
    assert!(data[2 << 20..(2 << 20) + 4096].iter().all(|&b| b == 0x11));
}

#[test]
fn nbdinfo_map_shows_holes_after_trim_and_write_zeroes() {
    let dir = common::scratch();
    let img = dir.path().join("disk.img");
    let size = 8u64 << 20;
    common::make_image(&img, size, |_| Some(1));
    let s = Server::start(&["-t", path_str(&img)]);
    let map = |s: &Server| {
        let out = run("nbdinfo", &["--map", &s.uri]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let before = map(&s);
    assert!(!before.contains("hole"), "{before}");
    // TRIM 1 MiB at 1 MiB, WRITE_ZEROES (may punch) 1 MiB at 4 MiB,
    // WRITE_ZEROES with NO_HOLE at 6 MiB.
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            &s.uri,
            "-c",
            "discard 1M 1M",
            "-c",
            "write -z -u 4M 1M",
            "-c",
            "write -z 6M 1M",
        ],
    );
    let after = map(&s);
    let lines: Vec<&str> = after.lines().collect();
    let hole_at = |off: u64| {
        lines.iter().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() >= 4
                && f[0].parse::<u64>() == Ok(off)
                && f[1].parse::<u64>() == Ok(1 << 20)
                && l.contains("hole,zero")
        })
    };
    assert!(hole_at(1 << 20), "trimmed range not a hole:\n{after}");
    assert!(hole_at(4 << 20), "zeroed range not a hole:\n{after}");
    let out = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-r",
            &s.uri,
            "-c",
            "read -P 0 4M 1M",
            "-c",
            "read -P 0 6M 1M",
        ],
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("failed"));
}

#[test]
fn nbdcopy_256m_roundtrip_checksums_match() {
    let dir = common::scratch();
    let src = dir.path().join("src.img");
    let served = dir.path().join("served.img");
    let dst = dir.path().join("dst.img");
    let size = 256u64 << 20;
    common::make_image(&src, size, |off| {
        ((off >> 20) % 4 != 1).then_some((off >> 20) as u8)
    });
    common::make_image(&served, size, |_| None);
    common::make_image(&dst, size, |_| None);
    let s = Server::start(&["-t", "--threads", "2", path_str(&served)]);
    run("nbdcopy", &[path_str(&src), &s.uri]);
    run("nbdcopy", &[&s.uri, path_str(&dst)]);
    let want = common::checksum(&src);
    assert_eq!(common::checksum(&served), want, "served image differs");
    assert_eq!(common::checksum(&dst), want, "copy back differs");
}

#[test]
fn uncached_reads_are_served_by_the_thread_pool() {
    let dir = common::scratch();
    let img = dir.path().join("disk.img");
    common::make_image(&img, 8 << 20, |_| Some(0x77));
    // Push the image out of the page cache so RWF_NOWAIT reads miss and
    // the reads are finished by workers.
    let f = std::fs::File::open(&img).unwrap();
    f.sync_all().unwrap();
    rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed).unwrap();
    let s = Server::start(&["-t", path_str(&img)]);
    let copy = dir.path().join("copy.img");
    run(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "raw", &s.uri, path_str(&copy)],
    );
    assert_eq!(common::checksum(&copy), common::checksum(&img));
}
