//! The exported image: blocking file I/O primitives.
//!
//! Everything here is synchronous and meant to run on a thread-pool worker,
//! except [`Export::read_nowait`], which never blocks and is what lets the
//! event-loop thread serve page-cache hits itself, and
//! [`Export::sendable`]/[`Export::send_to`], which let it send cached
//! ranges straight from the page cache to a socket.

use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, IoSliceMut};
use std::num::NonZeroU64;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rustix::fs::{Advice, FallocateFlags, SeekFrom};
use rustix::io::{Errno, ReadWriteFlags};
use rustix::pipe::SpliceFlags;

use crate::proto::{errno, state, Extent};

/// A raw image file being served.
#[derive(Debug)]
pub struct Export {
    file: File,
    size: u64,
    read_only: bool,
    /// Cleared once the file system turns down `RWF_NOWAIT` writes.
    nowait_writes: AtomicBool,
    /// Inline writes are declined until this instant (ns since `epoch`),
    /// set when one took long enough to show it blocked.
    inline_writes_after: AtomicU64,
    /// An inline write that took longer than this (ns) counts as blocked.
    inline_write_slow_ns: AtomicU64,
    epoch: Instant,
    /// Reads of at least this many bytes may be sent with `sendfile`;
    /// `usize::MAX` turns that off (by choice, or because the kernel or
    /// file system lacks `cachestat` or `sendfile`).
    sendfile_min: AtomicUsize,
    /// Whether large write payloads may be spliced from the socket into the
    /// file ([`Export::spliceable`]).
    splice_writes: AtomicBool,
}

/// Default for [`Export::set_sendfile_min`]. Below this, copying through a
/// buffer costs less server CPU than the extra system calls of the sendfile
/// path (a `cachestat` per read, and a `sendmsg` plus a `sendfile` per
/// reply where copied replies share one `writev`). `qemu-img bench` at
/// depth 32 on a cached image (2-vCPU VM, Linux 6.18), server CPU per read
/// with sendfile / copied: 4 KiB 4.5 / 3.1 µs, 8 KiB 4.7 / 4.2 µs,
/// 16 KiB 4.9 / 6.6 µs, 32 KiB 5.7 / 11.3 µs.
pub const SENDFILE_MIN_DEFAULT: usize = 16 * 1024;

/// `cachestat(2)`'s system call number. System calls added since Linux 5.1
/// have the same number on every architecture (alpha aside), and the libc
/// crate does not define this one for x86_64 yet.
const SYS_CACHESTAT: libc::c_long = 451;

/// `struct cachestat_range` of the Linux UAPI.
#[repr(C)]
struct CachestatRange {
    off: u64,
    len: u64,
}

/// `struct cachestat` of the Linux UAPI; only `nr_cache` is used.
#[repr(C)]
#[derive(Default)]
struct Cachestat {
    nr_cache: u64,
    nr_dirty: u64,
    nr_writeback: u64,
    nr_evicted: u64,
    nr_recently_evicted: u64,
}

/// Largest write [`Export::write_inline`] takes: the page cache absorbs
/// it in a few microseconds; bigger ones are worth a worker.
const INLINE_WRITE_MAX: usize = 64 * 1024;
/// An inline write slower than this has blocked (dirty-page throttling,
/// most likely) ...
const INLINE_WRITE_SLOW: Duration = Duration::from_millis(1);
/// ... and writes go to workers for this long before inlining is tried
/// again.
const INLINE_WRITE_BACKOFF: Duration = Duration::from_millis(100);

/// Smallest write payload [`Export::spliceable`] accepts. Splicing costs two
/// system calls per piece of payload that arrives, plus a read of exactly
/// one request header before it, where a copied payload shares its `read`
/// with its neighbours; from 32 KiB the copy it saves costs more. `qemu-img bench
/// -d 32 -w`, 3 interleaved runs (2-vCPU VM, Linux 6.18, ext4), IOPS spliced
/// / copied: 16 KiB 100-114k / 107-110k, 32 KiB 68-73k / 54-61k; at 64 KiB
/// the server's CPU per write fell from 30 to 23 µs. Above 64 KiB it wins
/// too: `qemu-img bench -w`, 3 interleaved rounds, medians, spliced /
/// through a worker / nbdkit file: 128 KiB d32 17,452 / 13,071 / 17,035;
/// 1 MiB d8 3,340 / 1,960 / 3,296.
const SPLICE_MIN: usize = 32 * 1024;

/// Fills `buf` from the non-blocking `pipe`, which must hold that much.
pub(crate) fn read_from_pipe(pipe: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match rustix::io::read(pipe, &mut buf[done..]) {
            Ok(0) | Err(Errno::AGAIN) => return Err(pipe_empty()),
            Ok(n) => done += n,
            Err(Errno::INTR) => {}
            Err(e) => return Err(errno_error("read from the payload pipe", e)),
        }
    }
    Ok(())
}

/// An error from the system call `call`, named in its message.
pub(crate) fn errno_error(call: &str, e: Errno) -> io::Error {
    io::Error::new(io::Error::from(e).kind(), format!("{call}: {e}"))
}

fn pipe_empty() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "the payload pipe holds fewer bytes than expected",
    )
}

/// Why a write-zeroes request failed.
#[derive(Debug)]
pub enum ZeroError {
    /// `FAST_ZERO` was asked for but zeroing would be as slow as writing.
    NotFast,
    /// The I/O failed.
    Io(io::Error),
}

impl Export {
    /// Opens an existing raw image (regular file or block device).
    pub fn open(path: &Path, read_only: bool) -> io::Result<Export> {
        let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        let size = rustix::fs::seek(&file, SeekFrom::End(0))?;
        Ok(Export::with_file(file, size, read_only))
    }

    /// An export of `size` bytes of `file`, with every setting at its default.
    fn with_file(file: File, size: u64, read_only: bool) -> Export {
        Export {
            file,
            size,
            read_only,
            nowait_writes: AtomicBool::new(!read_only),
            inline_writes_after: AtomicU64::new(0),
            inline_write_slow_ns: AtomicU64::new(INLINE_WRITE_SLOW.as_nanos() as u64),
            epoch: Instant::now(),
            sendfile_min: AtomicUsize::new(SENDFILE_MIN_DEFAULT),
            splice_writes: AtomicBool::new(!read_only),
        }
    }

    /// Creates a sparse temporary image of `size` bytes in `dir`. The file
    /// is unlinked immediately, so it disappears when the server exits,
    /// however it exits.
    pub fn temporary(dir: &Path, size: u64) -> io::Result<(Export, PathBuf)> {
        let pid = std::process::id();
        for attempt in 0..100u32 {
            let path = dir.join(format!("aioctx-nbd-{pid}-{attempt}.img"));
            match OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(file) => {
                    let res = file.set_len(size);
                    std::fs::remove_file(&path)?;
                    res?;
                    return Ok((Export::with_file(file, size, false), path));
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "could not create a temporary image",
        ))
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Reads from the page cache without blocking (`preadv2` with
    /// `RWF_NOWAIT`). Returns how many bytes were read; 0 means "would
    /// block" (or end of file), and the caller should finish the read on
    /// a worker with [`Export::read_at`].
    pub fn read_nowait(&self, buf: &mut [u8], offset: u64) -> usize {
        // EAGAIN: not cached; EOPNOTSUPP/EINVAL: kernel or file system
        // without RWF_NOWAIT. Either way a worker does the read.
        rustix::io::preadv2(
            &self.file,
            &mut [IoSliceMut::new(buf)],
            offset,
            ReadWriteFlags::NOWAIT,
        )
        .unwrap_or_default()
    }

    /// Sends reads of at least `min` bytes with `sendfile` when their
    /// range is in the page cache (see [`Export::sendable`]); `None` never
    /// does.
    pub fn set_sendfile_min(&self, min: Option<usize>) {
        self.sendfile_min
            .store(min.unwrap_or(usize::MAX), Ordering::Relaxed);
    }

    /// Whether a read of `len` bytes at `offset` should be sent straight
    /// from the file with [`Export::send_to`] instead of being copied
    /// through a buffer: it is large enough to be worth it, and every page
    /// of the range is in the page cache right now (`cachestat(2)`), so
    /// that `sendfile` on the event-loop thread will not wait for the disk.
    ///
    /// That is a snapshot: a page evicted between this check and the
    /// `sendfile` (which, behind a slow client's queued output, may come
    /// much later) is read from the disk by that `sendfile`, which blocks
    /// the loop thread for one read. That takes memory pressure severe
    /// enough to evict a page that was just found cached, and costs one
    /// disk read's latency, not a wrong answer. `sendfile` cannot be told
    /// not to wait for the disk, so closing the window would take a worker
    /// round trip per read, which costs more than the copy this avoids.
    pub fn sendable(&self, offset: u64, len: usize) -> bool {
        let min = self.sendfile_min.load(Ordering::Relaxed);
        if len == 0 || len < min {
            return false;
        }
        let range = CachestatRange {
            off: offset,
            len: len as u64,
        };
        let mut stat = Cachestat::default();
        // SAFETY: cachestat(2) reads `range` and writes `stat`, which are
        // live, exclusively borrowed and laid out like the kernel's
        // `struct cachestat_range` and `struct cachestat`; the descriptor
        // is owned by `self.file`, open for the whole call; flags must be 0.
        let r = unsafe {
            libc::syscall(
                SYS_CACHESTAT,
                self.file.as_raw_fd(),
                &range as *const CachestatRange,
                &mut stat as *mut Cachestat,
                0 as libc::c_uint,
            )
        };
        if r != 0 {
            let e = io::Error::last_os_error();
            // ENOSYS: kernel before 6.5 or built without it; EPERM: a
            // seccomp filter, or (recent kernels, which hide the page cache
            // of files one could not write) a read-only image of another
            // user; EINVAL/EOPNOTSUPP: a file cachestat cannot describe
            // (hugetlbfs). None of these change while we run, so use the
            // copy path from now on.
            if matches!(
                Errno::from_io_error(&e),
                Some(Errno::NOSYS | Errno::PERM | Errno::INVAL | Errno::OPNOTSUPP)
            ) {
                tracing::info!(error = %e, "cachestat failed, reads are copied from now on");
                self.set_sendfile_min(None);
            }
            return false;
        }
        // cachestat counts whole pages touching the range.
        let page = rustix::param::page_size() as u64;
        let pages = (offset + len as u64 - 1) / page - offset / page + 1;
        stat.nr_cache >= pages
    }

    /// Sends up to `len` bytes of the file from `offset` to the socket
    /// `sock` with `sendfile(2)`: the kernel hands the page-cache pages to
    /// the socket, nothing is copied in user space. Returns how many bytes
    /// went; 0 means end of file (the file shrank behind our back). Errors
    /// are `sendfile`'s, e.g. `EAGAIN` when the socket is full.
    pub fn send_to(&self, sock: BorrowedFd<'_>, offset: u64, len: usize) -> Result<usize, Errno> {
        let mut pos = offset;
        rustix::fs::sendfile(sock, &self.file, Some(&mut pos), len)
    }

    /// Stops using `sendfile` after it failed in a way that will not get
    /// better (a file system that cannot splice).
    pub fn disable_sendfile(&self, why: &Errno) {
        tracing::warn!(error = %why, "sendfile failed, reads are copied from now on");
        self.set_sendfile_min(None);
    }

    /// Writes into the page cache without blocking (`pwritev2` with
    /// `RWF_NOWAIT`). Returns how many bytes were written; the caller
    /// finishes the rest on a worker with [`Export::write_at`]. File systems
    /// without non-blocking buffered writes (ext4 today) are detected on the
    /// first try and not asked again.
    pub fn write_nowait(&self, buf: &[u8], offset: u64) -> usize {
        if !self.nowait_writes.load(Ordering::Relaxed) {
            return 0;
        }
        match rustix::io::pwritev2(
            &self.file,
            &[IoSlice::new(buf)],
            offset,
            ReadWriteFlags::NOWAIT,
        ) {
            Ok(n) => n,
            // Not supported by this file system: do not ask again.
            Err(Errno::OPNOTSUPP | Errno::INVAL) => {
                self.nowait_writes.store(false, Ordering::Relaxed);
                0
            }
            // Would block, or a real error (EPERM, ENOSPC, EIO...): the worker's write
            // reports it, and the next write asks again.
            Err(_) => 0,
        }
    }

    /// Writes `buf` at `offset` on the calling (event-loop) thread when the
    /// write will very likely just copy into the page cache; `None` means
    /// "declined, use a worker".
    ///
    /// `RWF_NOWAIT` would say so exactly, but ext4 refuses it for buffered
    /// writes, and a hop to the thread pool costs more than the copy (two
    /// thread wake-ups per request on a small machine). So small,
    /// page-aligned writes (no read-modify-write of a partial page) are
    /// written inline with a plain `pwrite`. That can still block, when the
    /// kernel throttles a writer with too many dirty pages; a write that
    /// took over `INLINE_WRITE_SLOW` (1 ms) sends writes to the workers for
    /// `INLINE_WRITE_BACKOFF` (100 ms), so a slow disk costs the loop at most one
    /// stall per backoff period (and connection, for spliced payloads, see
    /// [`Export::spliceable`]). Not for FUA writes (those wait for the
    /// disk). The write is complete when this returns, so a later flush
    /// covers it like any other.
    pub fn write_inline(&self, buf: &[u8], offset: u64) -> Option<io::Result<()>> {
        if !self.inline_write_ok(offset, buf.len()) {
            return None;
        }
        Some(self.timed_inline_write(|| self.write_at(buf, offset, false)))
    }

    /// Whether a non-FUA write of `len` bytes at `offset` may be done on
    /// the loop thread (see [`Export::write_inline`]).
    fn inline_write_ok(&self, offset: u64, len: usize) -> bool {
        len > 0 && len <= INLINE_WRITE_MAX && self.page_aligned_write_ok(offset, len)
    }

    /// Whether a write of `len` bytes at `offset` covers whole pages (no
    /// read-modify-write) and inline writes are not backed off.
    fn page_aligned_write_ok(&self, offset: u64, len: usize) -> bool {
        let page = rustix::param::page_size() as u64;
        offset.is_multiple_of(page)
            && (len as u64).is_multiple_of(page)
            && !self.inline_writes_backed_off()
    }

    /// Whether an inline write (or a piece of a spliced payload) was slow
    /// recently enough that writes should go to workers for now.
    pub fn inline_writes_backed_off(&self) -> bool {
        (self.epoch.elapsed().as_nanos() as u64) < self.inline_writes_after.load(Ordering::Relaxed)
    }

    /// How long an inline write may take before it counts as blocked
    /// (default 1 ms). Tests set 0, to make every inline write "slow".
    pub fn set_inline_write_slow(&self, slow: Duration) {
        self.inline_write_slow_ns
            .store(slow.as_nanos() as u64, Ordering::Relaxed);
    }

    /// Runs an inline write, and sends writes to the workers for a while if
    /// it took long enough to show it blocked.
    fn timed_inline_write<T>(&self, write: impl FnOnce() -> T) -> T {
        let start = self.epoch.elapsed();
        let res = write();
        let took = self.epoch.elapsed() - start;
        if took.as_nanos() as u64 > self.inline_write_slow_ns.load(Ordering::Relaxed) {
            let until = (start + took + INLINE_WRITE_BACKOFF).as_nanos() as u64;
            self.inline_writes_after.store(until, Ordering::Relaxed);
        }
        res
    }

    /// Turns splicing of write payloads on or off (see
    /// [`Export::spliceable`]). A read-only export never splices.
    pub fn set_splice_writes(&self, on: bool) {
        self.splice_writes
            .store(on && !self.read_only, Ordering::Relaxed);
    }

    /// Whether the payload of a non-FUA write of `len` bytes at `offset`
    /// should move from the socket into the file with `splice(2)` (socket
    /// to pipe, which takes references to the socket's pages, then pipe to
    /// file, the one copy) instead of being read into a buffer and written
    /// from it (two copies). Such writes run on the loop thread, so this
    /// takes only payloads of at least `SPLICE_MIN` bytes that cover whole
    /// pages, while inline writes are not backed off (see
    /// [`Export::write_inline`]). The payload reaches the file in pieces as
    /// it arrives, at most a pipe's worth each, so other connections on the
    /// loop get their turn between them. Each piece is timed like an inline
    /// write, and once one was slow (see
    /// [`Export::inline_writes_backed_off`]) the connection sends the rest
    /// of that payload to a worker: a stalling disk costs the loop one
    /// stall per backoff period and connection.
    pub fn spliceable(&self, offset: u64, len: usize) -> bool {
        len >= SPLICE_MIN
            && self.splice_writes.load(Ordering::Relaxed)
            && self.page_aligned_write_ok(offset, len)
    }

    /// Moves exactly `len` bytes from the pipe `pipe` into the file at
    /// `offset` with `splice(2)`. On an error the pipe may still hold some
    /// of them; the caller discards them.
    ///
    /// A file system without splice support (`EINVAL`) gets these bytes
    /// copied through a buffer instead, and no more payloads are spliced.
    pub fn write_from_pipe(&self, pipe: BorrowedFd<'_>, offset: u64, len: usize) -> io::Result<()> {
        self.timed_inline_write(|| {
            let mut pos = offset;
            let end = offset + len as u64;
            while pos < end {
                let left = (end - pos) as usize;
                match rustix::pipe::splice(pipe, None, &self.file, Some(&mut pos), left, SpliceFlags::empty()) {
                    // The pipe holds the bytes already, so it cannot be
                    // empty unless something else read it.
                    Ok(0) => return Err(pipe_empty()),
                    Ok(_) | Err(Errno::INTR) => {}
                    Err(Errno::INVAL) => {
                        tracing::warn!("the image's file system cannot splice, write payloads are copied from now on");
                        self.set_splice_writes(false);
                        return self.copy_from_pipe(pipe, pos, left);
                    }
                    Err(e) => {
                        return Err(errno_error("splice from the payload pipe into the image", e))
                    }
                }
            }
            Ok(())
        })
    }

    /// Reads `len` bytes out of `pipe` and writes them at `offset`.
    fn copy_from_pipe(&self, pipe: BorrowedFd<'_>, offset: u64, len: usize) -> io::Result<()> {
        let mut buf = vec![0u8; len];
        read_from_pipe(pipe, &mut buf)?;
        self.write_at(&buf, offset, false)
    }

    /// Fills `buf` from `offset`. Bytes past the end of the file read as
    /// zeroes (the file may have been truncated behind our back).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Writes all of `buf` at `offset`; with `fua` the data is on stable
    /// storage when this returns.
    pub fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        let flags = if fua {
            ReadWriteFlags::DSYNC
        } else {
            ReadWriteFlags::empty()
        };
        let mut done = 0;
        while done < buf.len() {
            let slice = [IoSlice::new(&buf[done..])];
            match rustix::io::pwritev2(&self.file, &slice, offset + done as u64, flags) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => done += n,
                Err(Errno::INTR) => {}
                Err(Errno::OPNOTSUPP | Errno::NOSYS) if fua => {
                    // No RWF_DSYNC: write, then sync.
                    self.file.write_all_at(&buf[done..], offset + done as u64)?;
                    return self.flush();
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Makes every completed write durable.
    pub fn flush(&self) -> io::Result<()> {
        rustix::fs::fdatasync(&self.file).map_err(Into::into)
    }

    /// Discards a range (punches a hole). Trim is a hint, so a file system
    /// that cannot punch holes is not an error.
    pub fn trim(&self, offset: u64, length: u64, fua: bool) -> io::Result<()> {
        if length == 0 {
            return Ok(());
        }
        match self.punch_hole(offset, length) {
            Ok(()) => {}
            Err(Errno::OPNOTSUPP | Errno::NOSYS) => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    fn punch_hole(&self, offset: u64, length: u64) -> Result<(), Errno> {
        rustix::fs::fallocate(
            &self.file,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            offset,
            length,
        )
    }

    /// Makes a range read as zeroes. Without `no_hole` a hole is punched
    /// (the blocks are freed); with it the blocks stay allocated. With
    /// `fast`, fails with [`ZeroError::NotFast`] instead of falling back
    /// to writing zero buffers.
    pub fn write_zeroes(
        &self,
        offset: u64,
        length: u64,
        no_hole: bool,
        fast: bool,
        fua: bool,
    ) -> Result<(), ZeroError> {
        if length == 0 {
            return Ok(());
        }
        let mut res = if no_hole {
            Err(Errno::OPNOTSUPP)
        } else {
            self.punch_hole(offset, length)
        };
        if res.is_err() {
            res = rustix::fs::fallocate(&self.file, FallocateFlags::ZERO_RANGE, offset, length);
        }
        match res {
            Ok(()) => {}
            Err(Errno::OPNOTSUPP | Errno::NOSYS | Errno::INVAL) if fast => {
                return Err(ZeroError::NotFast)
            }
            Err(Errno::OPNOTSUPP | Errno::NOSYS | Errno::INVAL) => {
                self.write_zero_buffers(offset, length)
                    .map_err(ZeroError::Io)?;
            }
            Err(e) => return Err(ZeroError::Io(e.into())),
        }
        if fua {
            self.flush().map_err(ZeroError::Io)?;
        }
        Ok(())
    }

    fn write_zero_buffers(&self, offset: u64, length: u64) -> io::Result<()> {
        let zeroes = vec![0u8; length.min(1 << 20) as usize];
        let mut done = 0u64;
        while done < length {
            let n = (length - done).min(zeroes.len() as u64) as usize;
            self.file.write_all_at(&zeroes[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    /// Hints that a range will be read soon.
    pub fn cache(&self, offset: u64, length: u64) -> io::Result<()> {
        rustix::fs::fadvise(
            &self.file,
            offset,
            NonZeroU64::new(length),
            Advice::WillNeed,
        )
        .map_err(Into::into)
    }

    /// Describes the allocation of `[offset, offset + length)` using
    /// `SEEK_DATA`/`SEEK_HOLE`, in at most `max_extents` extents (the last
    /// one may stop short of the end of the range).
    pub fn block_status(&self, offset: u64, length: u32, max_extents: usize) -> Vec<Extent> {
        let end = offset + length as u64;
        let mut extents: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < end && extents.len() < max_extents {
            let Some((is_hole, next)) = self.probe(pos) else {
                // No SEEK_DATA support: claim "allocated" for the rest.
                extents.push(Extent {
                    length: (end - pos) as u32,
                    flags: 0,
                });
                break;
            };
            let next = next.clamp(pos + 1, end);
            let flags = if is_hole {
                state::HOLE | state::ZERO
            } else {
                0
            };
            let len = (next - pos) as u32;
            match extents.last_mut() {
                Some(last) if last.flags == flags => last.length += len,
                _ => extents.push(Extent { length: len, flags }),
            }
            pos = next;
        }
        extents
    }

    /// Is `pos` in a hole, and where does that hole or data run end?
    fn probe(&self, pos: u64) -> Option<(bool, u64)> {
        match rustix::fs::seek(&self.file, SeekFrom::Data(pos)) {
            Ok(data) if data > pos => Some((true, data)),
            Ok(_) => match rustix::fs::seek(&self.file, SeekFrom::Hole(pos)) {
                Ok(hole) => Some((false, hole)),
                Err(_) => None,
            },
            // ENXIO: no data after pos, the rest of the file is a hole.
            Err(Errno::NXIO) => Some((true, self.size.max(pos + 1))),
            Err(_) => None,
        }
    }
}

/// Maps an I/O error to the NBD error value sent to the client.
pub fn nbd_errno(e: &io::Error) -> u32 {
    match Errno::from_io_error(e) {
        Some(Errno::PERM | Errno::ACCESS | Errno::ROFS) => errno::EPERM,
        Some(Errno::NOSPC | Errno::DQUOT | Errno::FBIG) => errno::ENOSPC,
        Some(Errno::NOMEM) => errno::ENOMEM,
        Some(Errno::INVAL) => errno::EINVAL,
        Some(Errno::OVERFLOW) => errno::EOVERFLOW,
        _ => errno::EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn tmp() -> Export {
        Export::temporary(&std::env::temp_dir(), 1 << 20).unwrap().0
    }

    #[test]
    fn write_read_roundtrip() {
        let e = tmp();
        e.write_at(&[7u8; 4096], 8192, true).unwrap();
        let mut buf = vec![0u8; 4096];
        e.read_at(&mut buf, 8192).unwrap();
        assert!(buf.iter().all(|&b| b == 7));
        // Just written, so it is in the page cache.
        let mut buf2 = vec![0u8; 4096];
        let n = e.read_nowait(&mut buf2, 8192);
        assert!(buf2[..n].iter().all(|&b| b == 7));
    }

    #[test]
    fn inline_writes_only_small_and_aligned() {
        let e = tmp();
        assert!(e.write_inline(&[3u8; 4096], 4096).unwrap().is_ok());
        let mut buf = vec![0u8; 4096];
        e.read_at(&mut buf, 4096).unwrap();
        assert!(buf.iter().all(|&b| b == 3));
        // Partial pages and large writes are left to a worker.
        assert!(e.write_inline(&[3u8; 512], 4096).is_none());
        assert!(e.write_inline(&[3u8; 4096], 512).is_none());
        assert!(e
            .write_inline(&vec![3u8; 2 * INLINE_WRITE_MAX], 0)
            .is_none());
    }

    #[test]
    fn zeroes_and_block_status() {
        let e = tmp();
        let all = e.block_status(0, 1 << 20, 64);
        assert_eq!(
            all,
            vec![Extent {
                length: 1 << 20,
                flags: state::HOLE | state::ZERO
            }]
        );
        e.write_at(&vec![1u8; 65536], 65536, false).unwrap();
        let ext = e.block_status(0, 1 << 20, 64);
        assert_eq!(ext.iter().map(|x| x.length as u64).sum::<u64>(), 1 << 20);
        assert_eq!(ext[1].flags, 0, "{ext:?}");
        e.write_zeroes(65536, 65536, false, false, false).unwrap();
        let mut buf = vec![1u8; 65536];
        e.read_at(&mut buf, 65536).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        assert_eq!(e.block_status(0, 1 << 20, 64).len(), 1);
        assert_eq!(e.block_status(0, 1 << 20, 1).len(), 1);
    }

    #[test]
    fn sendable_needs_size_and_cached_pages() {
        let e = tmp();
        let len = 2 * SENDFILE_MIN_DEFAULT;
        e.write_at(&vec![9u8; len], 0, false).unwrap();
        // Just written: every page is in the page cache, whatever the
        // alignment of the range.
        assert!(e.sendable(0, len));
        assert!(e.sendable(100, len - 200));
        assert!(
            !e.sendable(0, SENDFILE_MIN_DEFAULT - 1),
            "below the threshold"
        );
        assert!(!e.sendable(0, 0));
        // Never written nor read: a hole with no pages in the cache, and
        // a range that is only partly cached.
        assert!(!e.sendable(512 * 1024, len));
        assert!(!e.sendable(len as u64 / 2, len));
        e.set_sendfile_min(Some(1));
        assert!(e.sendable(4095, 2));
        e.set_sendfile_min(None);
        assert!(!e.sendable(0, len), "turned off");
    }

    #[test]
    fn send_to_sends_the_range_and_stops_at_eof() {
        use std::io::Read;
        let e = tmp();
        let data: Vec<u8> = (0..65536u32).map(|i| (i * 7 + i / 251) as u8).collect();
        e.write_at(&data, 4096, false).unwrap();
        let (mut rx, tx) = std::os::unix::net::UnixStream::pair().unwrap();
        let n = e.send_to(tx.as_fd(), 4096 + 3, 1000).unwrap();
        assert_eq!(n, 1000);
        let mut got = vec![0u8; n];
        rx.read_exact(&mut got).unwrap();
        assert_eq!(got, data[3..1003]);
        // At and past the end of the file: nothing to send.
        assert_eq!(e.send_to(tx.as_fd(), e.size(), 10).unwrap(), 0);
    }

    #[test]
    fn errno_mapping() {
        assert_eq!(nbd_errno(&Errno::NOSPC.into()), errno::ENOSPC);
        assert_eq!(nbd_errno(&Errno::ROFS.into()), errno::EPERM);
        assert_eq!(nbd_errno(&Errno::BADF.into()), errno::EIO);
    }
}
