//! The input side of a connection: the buffer requests are decoded from,
//! the pipe spliced write payloads pass through, and what one read gave.

use std::io;
use std::os::fd::OwnedFd;

use rustix::io::Errno;
use rustix::pipe::PipeFlags;

use crate::export::errno_error;

/// Size of the input buffer; a full option (64 KiB) always fits.
const INBUF_SIZE: usize = 256 * 1024;
/// Size asked for the pipe that spliced payloads pass through. A payload
/// that arrived in many small pieces takes one pipe slot (a page's worth
/// of capacity) per piece, so 16 slots can hold less than 64 KiB; 32 give
/// room. Each pipe counts against the user's pipe budget
/// (fs.pipe-user-pages-soft, 64 MiB by default: 512 connections).
const PAYLOAD_PIPE_SIZE: usize = 128 * 1024;
/// A smaller pipe than this (what the kernel gives a user past the budget)
/// is not used: payloads are copied instead.
const PAYLOAD_PIPE_MIN: usize = 64 * 1024;

/// What one `read` (or `splice`) from the socket gave.
pub(super) enum Pull {
    /// `got` bytes of the `asked`: fewer means the socket is drained for now.
    Data { got: usize, asked: usize },
    /// Nothing there: wait for the socket to be readable again.
    WouldBlock,
    /// Nothing this time, but try again at once (a signal, or the payload
    /// changed paths).
    Again,
    /// The client closed its end.
    Eof,
    /// The socket failed.
    Failed(io::Error),
    /// The connection was closed while the bytes were handled.
    Closed,
}

impl Pull {
    pub(super) fn from_read(asked: usize, res: io::Result<usize>) -> Pull {
        match res {
            Ok(0) => Pull::Eof,
            Ok(got) => Pull::Data { got, asked },
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Pull::WouldBlock,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Pull::Again,
            Err(e) => Pull::Failed(e),
        }
    }
}

/// The pipe that spliced write payloads pass through on their way from
/// the socket into the file. It is empty between `splice` calls.
pub(super) struct PayloadPipe {
    pub(super) read: OwnedFd,
    pub(super) write: OwnedFd,
    pub(super) capacity: usize,
}

impl PayloadPipe {
    pub(super) fn new() -> io::Result<PayloadPipe> {
        let (read, write) = rustix::pipe::pipe_with(PipeFlags::NONBLOCK | PipeFlags::CLOEXEC)
            .map_err(|e| errno_error("pipe2", e))?;
        // Past the per-user pipe budget (fs.pipe-user-pages-soft) the
        // kernel refuses to grow pipes, and new ones get two slots.
        let capacity = rustix::pipe::fcntl_setpipe_size(&write, PAYLOAD_PIPE_SIZE)
            .or_else(|_| rustix::pipe::fcntl_getpipe_size(&write))
            .map_err(|e| errno_error("F_GETPIPE_SZ", e))?;
        if capacity < PAYLOAD_PIPE_MIN {
            return Err(io::Error::other(format!(
                "a pipe of {capacity} bytes (the user's pipe budget is spent)"
            )));
        }
        Ok(PayloadPipe {
            read,
            write,
            capacity,
        })
    }

    /// Throws away what a failed `splice` into the file left in the pipe,
    /// so it cannot end up in the next payload.
    pub(super) fn discard(&self) -> io::Result<()> {
        let mut scratch = [0u8; 4096];
        loop {
            match rustix::io::read(&self.read, &mut scratch) {
                Ok(0) | Err(Errno::AGAIN) => return Ok(()),
                Ok(_) | Err(Errno::INTR) => {}
                Err(e) => return Err(errno_error("read from the payload pipe", e)),
            }
        }
    }
}

/// Input bytes received but not yet decoded: `buf[head..tail]`.
pub(super) struct InBuf {
    buf: Box<[u8]>,
    head: usize,
    pub(super) tail: usize,
}

impl InBuf {
    pub(super) fn new() -> Self {
        InBuf {
            buf: vec![0u8; INBUF_SIZE].into_boxed_slice(),
            head: 0,
            tail: 0,
        }
    }
    pub(super) fn len(&self) -> usize {
        self.tail - self.head
    }
    pub(super) fn data(&self) -> &[u8] {
        &self.buf[self.head..self.tail]
    }
    pub(super) fn consume(&mut self, n: usize) {
        self.head += n;
        if self.head == self.tail {
            self.head = 0;
            self.tail = 0;
        }
    }
    /// Space to read into, moving pending bytes to the front if needed.
    pub(super) fn spare(&mut self) -> &mut [u8] {
        if self.tail == self.buf.len() && self.head > 0 {
            self.buf.copy_within(self.head..self.tail, 0);
            self.tail -= self.head;
            self.head = 0;
        }
        &mut self.buf[self.tail..]
    }
}
