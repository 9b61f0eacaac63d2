//! The output side of a connection: replies queued in order, small ones
//! packed together, read data in its own buffers or still in the file, all
//! sent with as few system calls as the socket takes.

use std::collections::VecDeque;
use std::io::{self, IoSlice};

use rustix::io::Errno;
use tracing::debug;

use super::Stream;
use crate::export::{errno_error, Export};

/// Slices per `writev` (well under `IOV_MAX`).
const IOV_BATCH: usize = 128;

/// One piece of queued output.
enum Seg {
    /// Bytes in memory. `packable` buffers take further small replies.
    Bytes { buf: Vec<u8>, packable: bool },
    /// `len` bytes of the export from `offset`, sent with `sendfile`
    /// straight from the page cache when their turn comes.
    File { offset: u64, len: usize },
}

impl Seg {
    fn len(&self) -> usize {
        match self {
            Seg::Bytes { buf, .. } => buf.len(),
            Seg::File { len, .. } => *len,
        }
    }
}

/// Replies waiting to be written. Small replies are packed into shared
/// buffers so one `writev` slice carries many of them; read data keeps its
/// own buffer (no copy), or stays in the file until it is sent.
#[derive(Default)]
pub(super) struct OutQueue {
    segs: VecDeque<Seg>,
    /// Bytes of the front segment already written.
    front_sent: usize,
    /// Unsent bytes, file ranges included: with the request buffers this
    /// bounds what a connection may have queued (see
    /// [`Conn::can_start_request`](super::Conn::can_start_request)).
    pub(super) bytes: usize,
}

impl OutQueue {
    pub(super) fn push_small(&mut self, b: &[u8]) {
        self.bytes += b.len();
        match self.segs.back_mut() {
            Some(Seg::Bytes {
                buf,
                packable: true,
            }) if buf.len() < 4096 => buf.extend_from_slice(b),
            _ => self.segs.push_back(Seg::Bytes {
                buf: b.to_vec(),
                packable: true,
            }),
        }
    }
    pub(super) fn push_data(&mut self, data: Vec<u8>) {
        if !data.is_empty() {
            self.bytes += data.len();
            self.segs.push_back(Seg::Bytes {
                buf: data,
                packable: false,
            });
        }
    }
    pub(super) fn push_file(&mut self, offset: u64, len: usize) {
        if len > 0 {
            self.bytes += len;
            self.segs.push_back(Seg::File { offset, len });
        }
    }
    pub(super) fn is_empty(&self) -> bool {
        self.segs.is_empty()
    }

    /// Marks `n` more bytes as written.
    fn advance(&mut self, mut n: usize) {
        self.bytes -= n;
        while n > 0 {
            let left = self.segs[0].len() - self.front_sent;
            if n >= left {
                n -= left;
                self.segs.pop_front();
                self.front_sent = 0;
            } else {
                self.front_sent += n;
                n = 0;
            }
        }
    }

    /// Replaces the unsent rest of the front segment, a file range, with
    /// `data` of the same length.
    fn replace_front(&mut self, data: Vec<u8>) {
        debug_assert_eq!(data.len(), self.segs[0].len() - self.front_sent);
        self.segs[0] = Seg::Bytes {
            buf: data,
            packable: false,
        };
        self.front_sent = 0;
    }

    /// Writes as much as the socket takes. Returns `Ok(true)` when the
    /// queue is empty.
    ///
    /// Consecutive byte segments go out in one `sendmsg` (a `writev`);
    /// file ranges with one `sendfile` each. A byte batch followed by a
    /// file range is sent with `MSG_MORE` on TCP: it ends with that
    /// range's reply header, which on its own would leave as a separate
    /// segment (`TCP_NODELAY`) and wake the client once for 16 or 28 bytes
    /// and again for the data. `sendfile` pushes what it corked when it
    /// sends its last page, and if it cannot send at all (socket full),
    /// the corked bytes leave with the data once the socket drains.
    pub(super) fn flush(&mut self, stream: &mut Stream, export: &Export) -> io::Result<bool> {
        while let Some(front) = self.segs.front() {
            if let Seg::File { offset, len } = *front {
                let sent = self.front_sent;
                match export.send_to(stream.fd(), offset + sent as u64, len - sent) {
                    Ok(0) => {
                        // The file is shorter than when the read was
                        // checked (truncated behind our back). The header
                        // promised `len` bytes, so send zeroes for the
                        // rest, as the copy path reads past the end of the
                        // file.
                        debug!(
                            offset,
                            len, sent, "file ends inside a queued read, sending zeroes"
                        );
                        self.replace_front(vec![0; len - sent]);
                    }
                    Ok(n) => self.advance(n),
                    Err(Errno::AGAIN) => return Ok(false),
                    Err(Errno::INTR) => {}
                    Err(e @ (Errno::PIPE | Errno::CONNRESET)) => {
                        return Err(errno_error("sendfile", e))
                    }
                    Err(e) => {
                        // The file side failed: a file system without
                        // splice support, or a read error. The header is
                        // out, so either the data follows or the
                        // connection must close; read it the ordinary
                        // way (it was cached moments ago), and close only
                        // if that fails too.
                        if matches!(e, Errno::INVAL | Errno::NOSYS | Errno::OPNOTSUPP) {
                            export.disable_sendfile(&e);
                        }
                        let mut buf = vec![0; len - sent];
                        export
                            .read_at(&mut buf, offset + sent as u64)
                            .map_err(|re| {
                                io::Error::new(
                                    re.kind(),
                                    format!("sendfile: {e}, then pread: {re}"),
                                )
                            })?;
                        self.replace_front(buf);
                    }
                }
                continue;
            }
            let mut slices = Vec::with_capacity(IOV_BATCH.min(self.segs.len()));
            let mut more = false;
            for (i, seg) in self.segs.iter().enumerate() {
                match seg {
                    Seg::Bytes { buf, .. } if slices.len() < IOV_BATCH => {
                        let start = if i == 0 { self.front_sent } else { 0 };
                        slices.push(IoSlice::new(&buf[start..]));
                    }
                    Seg::Bytes { .. } => break,
                    Seg::File { .. } => {
                        more = true;
                        break;
                    }
                }
            }
            match stream.send_vectored(&slices, more) {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "sendmsg: wrote 0")),
                Ok(n) => self.advance(n),
                Err(Errno::AGAIN) => return Ok(false),
                Err(Errno::INTR) => {}
                Err(e) => return Err(errno_error("sendmsg", e)),
            }
        }
        Ok(true)
    }
}
