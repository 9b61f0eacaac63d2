//! The NBD wire format: constants, and pure functions that parse client
//! messages and encode server messages.
//!
//! Nothing here does I/O or keeps state; the connection state machines in
//! [`crate::handshake`] and [`crate::conn`] are built on top of it. All
//! integers on the wire are big-endian ("network byte order").
//!
//! The names follow the NBD protocol document (`doc/proto.md` of the
//! NetworkBlockDevice project) with the `NBD_` prefix dropped and grouped
//! into modules, e.g. `NBD_OPT_GO` is [`opt::GO`].

use std::fmt;

/// `NBDMAGIC`, the first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: second magic of the greeting, and prefix of every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic at the start of every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic at the start of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic at the start of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic at the start of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Size of the server greeting: NBDMAGIC, IHAVEOPT, handshake flags.
pub const GREETING_LEN: usize = 18;
/// Size of an option request header: IHAVEOPT, option, length.
pub const OPTION_HEADER_LEN: usize = 16;
/// Size of a transmission request header.
pub const REQUEST_LEN: usize = 28;
/// Size of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Size of a structured reply chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;

/// Largest option payload we accept; bigger ones get `REP_ERR_TOO_BIG`.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Largest READ/WRITE/CACHE length we accept (and advertise) per request.
pub const MAX_REQUEST_LEN: u32 = 32 * 1024 * 1024;
/// Longest string (export name, query) the protocol allows.
pub const MAX_STRING_LEN: usize = 4096;
/// Preferred block size we advertise.
pub const PREFERRED_BLOCK_SIZE: u32 = 4096;

/// The name of the one metadata context we implement.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// Handshake flags (server, 16 bits) and client flags (32 bits).
pub mod handshake_flags {
    /// Server supports fixed newstyle negotiation.
    pub const FIXED_NEWSTYLE: u16 = 1 << 0;
    /// Server can omit the 124 zero bytes after `OPT_EXPORT_NAME`.
    pub const NO_ZEROES: u16 = 1 << 1;
    /// Client: speaks fixed newstyle.
    pub const C_FIXED_NEWSTYLE: u32 = 1 << 0;
    /// Client: wants the 124 zero bytes omitted.
    pub const C_NO_ZEROES: u32 = 1 << 1;
}

/// Option numbers (`NBD_OPT_*`).
pub mod opt {
    /// Pick an export and enter transmission (cannot fail gracefully).
    pub const EXPORT_NAME: u32 = 1;
    /// Client wants to end the session.
    pub const ABORT: u32 = 2;
    /// List exports.
    pub const LIST: u32 = 3;
    /// Upgrade to TLS (unsupported here).
    pub const STARTTLS: u32 = 5;
    /// Describe an export.
    pub const INFO: u32 = 6;
    /// Describe an export and enter transmission.
    pub const GO: u32 = 7;
    /// Enable structured replies.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// List metadata contexts.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// Select metadata contexts.
    pub const SET_META_CONTEXT: u32 = 10;
}

/// Option reply types (`NBD_REP_*`).
pub mod rep {
    /// Success / end of a list.
    pub const ACK: u32 = 1;
    /// One export in a `LIST` reply.
    pub const SERVER: u32 = 2;
    /// One information item in an `INFO`/`GO` reply.
    pub const INFO: u32 = 3;
    /// One metadata context.
    pub const META_CONTEXT: u32 = 4;
    /// Bit 31 marks errors.
    pub const ERR: u32 = 1 << 31;
    /// Unknown option.
    pub const ERR_UNSUP: u32 = ERR | 1;
    /// Forbidden by policy.
    pub const ERR_POLICY: u32 = ERR | 2;
    /// Syntactically or semantically invalid.
    pub const ERR_INVALID: u32 = ERR | 3;
    /// Not supported on this platform.
    pub const ERR_PLATFORM: u32 = ERR | 4;
    /// TLS required.
    pub const ERR_TLS_REQD: u32 = ERR | 5;
    /// No such export.
    pub const ERR_UNKNOWN: u32 = ERR | 6;
    /// Server shutting down.
    pub const ERR_SHUTDOWN: u32 = ERR | 7;
    /// Client must ask for block sizes.
    pub const ERR_BLOCK_SIZE_REQD: u32 = ERR | 8;
    /// Request or reply too large.
    pub const ERR_TOO_BIG: u32 = ERR | 9;
}

/// Information types in `REP_INFO` (`NBD_INFO_*`).
pub mod info {
    /// Size and transmission flags (mandatory).
    pub const EXPORT: u16 = 0;
    /// Canonical export name.
    pub const NAME: u16 = 1;
    /// Human readable description.
    pub const DESCRIPTION: u16 = 2;
    /// Minimum, preferred and maximum block sizes.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Transmission flags (`NBD_FLAG_*`, 16 bits).
pub mod tflags {
    /// Always set.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// Export is read-only.
    pub const READ_ONLY: u16 = 1 << 1;
    /// `CMD_FLUSH` supported.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// `CMD_FLAG_FUA` supported.
    pub const SEND_FUA: u16 = 1 << 3;
    /// Rotational medium.
    pub const ROTATIONAL: u16 = 1 << 4;
    /// `CMD_TRIM` supported.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// `CMD_WRITE_ZEROES` (and `CMD_FLAG_NO_HOLE`) supported.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// `CMD_FLAG_DF` supported.
    pub const SEND_DF: u16 = 1 << 7;
    /// Flush and FUA are visible across all connections.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// `CMD_CACHE` supported.
    pub const SEND_CACHE: u16 = 1 << 10;
    /// `CMD_FLAG_FAST_ZERO` supported.
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Command types (`NBD_CMD_*`).
pub mod cmd {
    /// Read.
    pub const READ: u16 = 0;
    /// Write (payload follows the header).
    pub const WRITE: u16 = 1;
    /// Disconnect (no reply).
    pub const DISC: u16 = 2;
    /// Flush to stable storage.
    pub const FLUSH: u16 = 3;
    /// Discard.
    pub const TRIM: u16 = 4;
    /// Prefetch.
    pub const CACHE: u16 = 5;
    /// Write zeroes.
    pub const WRITE_ZEROES: u16 = 6;
    /// Query metadata.
    pub const BLOCK_STATUS: u16 = 7;
}

/// Command flags (`NBD_CMD_FLAG_*`).
pub mod cmd_flags {
    /// Force unit access.
    pub const FUA: u16 = 1 << 0;
    /// Write zeroes must not punch a hole.
    pub const NO_HOLE: u16 = 1 << 1;
    /// Don't fragment the read reply.
    pub const DF: u16 = 1 << 2;
    /// Block status: one extent only.
    pub const REQ_ONE: u16 = 1 << 3;
    /// Write zeroes: fail with `ENOTSUP` unless fast.
    pub const FAST_ZERO: u16 = 1 << 4;
}

/// Structured reply chunk types (`NBD_REPLY_TYPE_*`).
pub mod reply_type {
    /// Empty final chunk.
    pub const NONE: u16 = 0;
    /// Offset + data.
    pub const OFFSET_DATA: u16 = 1;
    /// Offset + length of zeroes.
    pub const OFFSET_HOLE: u16 = 2;
    /// Block status extents.
    pub const BLOCK_STATUS: u16 = 5;
    /// Error.
    pub const ERROR: u16 = (1 << 15) | 1;
    /// Error at an offset.
    pub const ERROR_OFFSET: u16 = (1 << 15) | 2;
}

/// Structured reply flag: last chunk of this reply.
pub const REPLY_FLAG_DONE: u16 = 1;

/// Error values in replies (`NBD_E*`).
pub mod errno {
    /// Operation not permitted.
    pub const EPERM: u32 = 1;
    /// Input/output error.
    pub const EIO: u32 = 5;
    /// Out of memory.
    pub const ENOMEM: u32 = 12;
    /// Invalid argument.
    pub const EINVAL: u32 = 22;
    /// No space left.
    pub const ENOSPC: u32 = 28;
    /// Value too large.
    pub const EOVERFLOW: u32 = 75;
    /// Not supported (fast zero).
    pub const ENOTSUP: u32 = 95;
    /// Server shutting down.
    pub const ESHUTDOWN: u32 = 108;
}

/// `base:allocation` status flags.
pub mod state {
    /// Not allocated.
    pub const HOLE: u32 = 1 << 0;
    /// Reads as zeroes.
    pub const ZERO: u32 = 1 << 1;
}

/// A message did not start with the magic number it must start with.
/// The stream cannot be resynchronised: the connection must be dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadMagic {
    /// What the client sent instead.
    pub got: u64,
}

impl fmt::Display for BadMagic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "bad magic {:#x}", self.got)
    }
}

impl std::error::Error for BadMagic {}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

// ---------------------------------------------------------------------------
// Handshake
// ---------------------------------------------------------------------------

/// The 18-byte greeting the server sends on connect.
pub fn greeting() -> [u8; GREETING_LEN] {
    let mut g = [0u8; GREETING_LEN];
    g[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    g[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    let flags = handshake_flags::FIXED_NEWSTYLE | handshake_flags::NO_ZEROES;
    g[16..18].copy_from_slice(&flags.to_be_bytes());
    g
}

/// Parses the client's 32-bit flags. Unknown bits are an error: the spec
/// requires the server to drop the connection.
pub fn parse_client_flags(buf: &[u8; 4]) -> Result<u32, u32> {
    let flags = u32::from_be_bytes(*buf);
    let known = handshake_flags::C_FIXED_NEWSTYLE | handshake_flags::C_NO_ZEROES;
    if flags & !known != 0 {
        Err(flags)
    } else {
        Ok(flags)
    }
}

/// The fixed part of an option request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// Option number (`opt::*`).
    pub option: u32,
    /// Length of the data that follows.
    pub length: u32,
}

/// Parses an option request header.
pub fn parse_option_header(buf: &[u8; OPTION_HEADER_LEN]) -> Result<OptionHeader, BadMagic> {
    let magic = be64(&buf[0..8]);
    if magic != IHAVEOPT {
        return Err(BadMagic { got: magic });
    }
    Ok(OptionHeader {
        option: be32(&buf[8..12]),
        length: be32(&buf[12..16]),
    })
}

/// An option's data did not have the shape the protocol requires
/// (answered with `REP_ERR_INVALID`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidOption(pub &'static str);

impl fmt::Display for InvalidOption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for InvalidOption {}

/// A cursor over option data that fails instead of panicking.
struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], InvalidOption> {
        if self.data.len() < n {
            return Err(InvalidOption("option data too short"));
        }
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        Ok(head)
    }
    fn u16(&mut self) -> Result<u16, InvalidOption> {
        self.take(2).map(be16)
    }
    fn u32(&mut self) -> Result<u32, InvalidOption> {
        self.take(4).map(be32)
    }
    fn string(&mut self, len: usize) -> Result<String, InvalidOption> {
        if len > MAX_STRING_LEN {
            return Err(InvalidOption("string longer than 4096 bytes"));
        }
        let bytes = self.take(len)?;
        parse_string(bytes)
    }
    fn finish(&self) -> Result<(), InvalidOption> {
        if self.data.is_empty() {
            Ok(())
        } else {
            Err(InvalidOption("trailing bytes in option data"))
        }
    }
}

/// Validates a protocol string: UTF-8, no NUL, at most 4096 bytes.
pub fn parse_string(bytes: &[u8]) -> Result<String, InvalidOption> {
    if bytes.len() > MAX_STRING_LEN {
        return Err(InvalidOption("string longer than 4096 bytes"));
    }
    if bytes.contains(&0) {
        return Err(InvalidOption("string contains NUL"));
    }
    String::from_utf8(bytes.to_vec()).map_err(|_| InvalidOption("string is not UTF-8"))
}

/// Data of `OPT_INFO` and `OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// Export name ("" is the default export).
    pub name: String,
    /// Information items the client asked for (`info::*`).
    pub requests: Vec<u16>,
}

/// Parses the data of `OPT_INFO` / `OPT_GO`.
pub fn parse_info_request(data: &[u8]) -> Result<InfoRequest, InvalidOption> {
    let mut r = Reader { data };
    let name_len = r.u32()? as usize;
    let name = r.string(name_len)?;
    let n = r.u16()? as usize;
    let mut requests = Vec::with_capacity(n.min(16));
    for _ in 0..n {
        requests.push(r.u16()?);
    }
    r.finish()?;
    Ok(InfoRequest { name, requests })
}

/// Data of `OPT_LIST_META_CONTEXT` and `OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    /// Export the contexts are for.
    pub export: String,
    /// Queries, e.g. `base:allocation`.
    pub queries: Vec<String>,
}

/// Parses the data of the two meta context options.
pub fn parse_meta_context_request(data: &[u8]) -> Result<MetaContextRequest, InvalidOption> {
    let mut r = Reader { data };
    let export_len = r.u32()? as usize;
    let export = r.string(export_len)?;
    let n = r.u32()?;
    let mut queries = Vec::new();
    for _ in 0..n {
        let len = r.u32()? as usize;
        queries.push(r.string(len)?);
    }
    r.finish()?;
    Ok(MetaContextRequest { export, queries })
}

/// Appends an option reply to `out`.
pub fn put_option_reply(out: &mut Vec<u8>, option: u32, reply: u32, data: &[u8]) {
    out.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// Appends a `REP_SERVER` reply naming one export.
pub fn put_rep_server(out: &mut Vec<u8>, option: u32, name: &str) {
    let mut data = Vec::with_capacity(4 + name.len());
    data.extend_from_slice(&(name.len() as u32).to_be_bytes());
    data.extend_from_slice(name.as_bytes());
    put_option_reply(out, option, rep::SERVER, &data);
}

/// Appends a `REP_INFO` / `INFO_EXPORT` reply.
pub fn put_info_export(out: &mut Vec<u8>, option: u32, size: u64, flags: u16) {
    let mut data = [0u8; 12];
    data[0..2].copy_from_slice(&info::EXPORT.to_be_bytes());
    data[2..10].copy_from_slice(&size.to_be_bytes());
    data[10..12].copy_from_slice(&flags.to_be_bytes());
    put_option_reply(out, option, rep::INFO, &data);
}

/// Appends a `REP_INFO` / `INFO_BLOCK_SIZE` reply.
pub fn put_info_block_size(out: &mut Vec<u8>, option: u32, min: u32, preferred: u32, max: u32) {
    let mut data = [0u8; 14];
    data[0..2].copy_from_slice(&info::BLOCK_SIZE.to_be_bytes());
    data[2..6].copy_from_slice(&min.to_be_bytes());
    data[6..10].copy_from_slice(&preferred.to_be_bytes());
    data[10..14].copy_from_slice(&max.to_be_bytes());
    put_option_reply(out, option, rep::INFO, &data);
}

/// Appends a `REP_INFO` reply carrying a string (`INFO_NAME`,
/// `INFO_DESCRIPTION`).
pub fn put_info_string(out: &mut Vec<u8>, option: u32, info_type: u16, s: &str) {
    let mut data = Vec::with_capacity(2 + s.len());
    data.extend_from_slice(&info_type.to_be_bytes());
    data.extend_from_slice(s.as_bytes());
    put_option_reply(out, option, rep::INFO, &data);
}

/// Appends a `REP_META_CONTEXT` reply.
pub fn put_meta_context(out: &mut Vec<u8>, option: u32, id: u32, name: &str) {
    let mut data = Vec::with_capacity(4 + name.len());
    data.extend_from_slice(&id.to_be_bytes());
    data.extend_from_slice(name.as_bytes());
    put_option_reply(out, option, rep::META_CONTEXT, &data);
}

/// Appends the reply to `OPT_EXPORT_NAME`: size, flags and (unless the
/// client negotiated `NO_ZEROES`) 124 zero bytes.
pub fn put_export_name_reply(out: &mut Vec<u8>, size: u64, flags: u16, no_zeroes: bool) {
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0u8; 124]);
    }
}

// ---------------------------------------------------------------------------
// Transmission
// ---------------------------------------------------------------------------

/// A transmission request header, as sent by the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags (`cmd_flags::*`).
    pub flags: u16,
    /// Command type (`cmd::*`).
    pub kind: u16,
    /// Opaque handle echoed in the reply.
    pub handle: u64,
    /// Byte offset into the export.
    pub offset: u64,
    /// Length in bytes.
    pub length: u32,
}

/// Parses a request header.
pub fn parse_request(buf: &[u8; REQUEST_LEN]) -> Result<Request, BadMagic> {
    let magic = be32(&buf[0..4]);
    if magic != REQUEST_MAGIC {
        return Err(BadMagic { got: magic as u64 });
    }
    Ok(Request {
        flags: be16(&buf[4..6]),
        kind: be16(&buf[6..8]),
        handle: be64(&buf[8..16]),
        offset: be64(&buf[16..24]),
        length: be32(&buf[24..28]),
    })
}

/// Encodes a request header (used by tests and clients).
pub fn encode_request(req: &Request) -> [u8; REQUEST_LEN] {
    let mut b = [0u8; REQUEST_LEN];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&req.flags.to_be_bytes());
    b[6..8].copy_from_slice(&req.kind.to_be_bytes());
    b[8..16].copy_from_slice(&req.handle.to_be_bytes());
    b[16..24].copy_from_slice(&req.offset.to_be_bytes());
    b[24..28].copy_from_slice(&req.length.to_be_bytes());
    b
}

/// What was negotiated for a connection, as far as request validation
/// is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Session {
    /// Export size in bytes.
    pub size: u64,
    /// Export is read-only.
    pub read_only: bool,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// `base:allocation` was selected (its context id).
    pub meta_context: Option<u32>,
}

/// A validated transmission request. Offsets and lengths are in bytes and
/// lie inside the export; `fua` asks for the data to be durable before the
/// reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)] // the fields are described above
pub enum Command {
    /// Read `length` bytes at `offset`.
    Read { offset: u64, length: u32 },
    /// Write the `length`-byte payload that follows at `offset`.
    Write { offset: u64, length: u32, fua: bool },
    /// Client is leaving.
    Disconnect,
    /// Make all completed writes durable.
    Flush,
    /// Discard a range.
    Trim { offset: u64, length: u32, fua: bool },
    /// Prefetch a range.
    Cache { offset: u64, length: u32 },
    /// Zero a range; `no_hole`: keep it allocated; `fast`: fail with
    /// `ENOTSUP` rather than write zero buffers.
    WriteZeroes {
        offset: u64,
        length: u32,
        fua: bool,
        no_hole: bool,
        fast: bool,
    },
    /// Report allocation status of a range for metadata `context`;
    /// `req_one`: a single extent.
    BlockStatus {
        offset: u64,
        length: u32,
        req_one: bool,
        context: u32,
    },
}

/// Why a request is refused; the error goes back in the reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestError {
    /// NBD error value (`errno::*`).
    pub errno: u32,
    /// Human-readable reason (for structured replies and logs).
    pub message: &'static str,
    /// Bytes of write payload that follow the header and must be skipped.
    pub discard: u32,
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (error {})", self.message, self.errno)
    }
}

impl std::error::Error for RequestError {}

/// Checks a request against what the session allows and turns it into a
/// [`Command`].
///
/// A WRITE's payload always follows its header, even when the write is
/// refused; [`RequestError::discard`] then tells the caller how many bytes
/// to skip so the stream stays in sync.
pub fn validate(req: &Request, s: &Session) -> Result<Command, RequestError> {
    use cmd_flags::*;
    let payload = if req.kind == cmd::WRITE {
        req.length
    } else {
        0
    };
    let err = |errno, message| RequestError {
        errno,
        message,
        discard: payload,
    };
    let allowed = match req.kind {
        cmd::READ => FUA | if s.structured { DF } else { 0 },
        cmd::WRITE | cmd::DISC | cmd::FLUSH | cmd::TRIM | cmd::CACHE => FUA,
        cmd::WRITE_ZEROES => FUA | NO_HOLE | FAST_ZERO,
        cmd::BLOCK_STATUS => FUA | REQ_ONE,
        _ => return Err(err(errno::EINVAL, "unknown command")),
    };
    if req.flags & !allowed != 0 {
        return Err(err(errno::EINVAL, "unsupported command flags"));
    }
    let fua = req.flags & FUA != 0;
    let end = req.offset.checked_add(req.length as u64);
    let in_bounds = end.is_some_and(|e| e <= s.size);
    let (offset, length) = (req.offset, req.length);
    let writes = matches!(req.kind, cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES);
    if writes && s.read_only {
        return Err(err(errno::EPERM, "export is read-only"));
    }
    let bounded = matches!(req.kind, cmd::READ | cmd::WRITE | cmd::CACHE);
    if bounded && length > MAX_REQUEST_LEN {
        return Err(err(errno::EINVAL, "request longer than 32 MiB"));
    }
    if !in_bounds && !matches!(req.kind, cmd::DISC | cmd::FLUSH) {
        let errno = match req.kind {
            cmd::WRITE | cmd::WRITE_ZEROES => errno::ENOSPC,
            _ => errno::EINVAL,
        };
        return Err(err(errno, "request beyond end of export"));
    }
    Ok(match req.kind {
        cmd::READ => Command::Read { offset, length },
        cmd::WRITE => Command::Write {
            offset,
            length,
            fua,
        },
        cmd::DISC => Command::Disconnect,
        cmd::FLUSH => Command::Flush,
        cmd::TRIM => Command::Trim {
            offset,
            length,
            fua,
        },
        cmd::CACHE => Command::Cache { offset, length },
        cmd::WRITE_ZEROES => Command::WriteZeroes {
            offset,
            length,
            fua,
            no_hole: req.flags & NO_HOLE != 0,
            fast: req.flags & FAST_ZERO != 0,
        },
        cmd::BLOCK_STATUS => match s.meta_context {
            Some(context) => Command::BlockStatus {
                offset,
                length,
                req_one: req.flags & REQ_ONE != 0,
                context,
            },
            None => return Err(err(errno::EINVAL, "no metadata context negotiated")),
        },
        _ => unreachable!("filtered above"),
    })
}

/// A simple reply header (magic, error, handle).
pub fn simple_reply(handle: u64, error: u32) -> [u8; SIMPLE_REPLY_LEN] {
    let mut b = [0u8; SIMPLE_REPLY_LEN];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&handle.to_be_bytes());
    b
}

/// A structured reply chunk header; `length` is the payload length.
pub fn chunk_header(flags: u16, kind: u16, handle: u64, length: u32) -> [u8; CHUNK_HEADER_LEN] {
    let mut b = [0u8; CHUNK_HEADER_LEN];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&handle.to_be_bytes());
    b[16..20].copy_from_slice(&length.to_be_bytes());
    b
}

/// Header of a final `OFFSET_DATA` chunk carrying `data_len` bytes read
/// at `offset`; the data itself follows separately.
pub fn offset_data_header(handle: u64, offset: u64, data_len: u32) -> [u8; CHUNK_HEADER_LEN + 8] {
    let mut b = [0u8; CHUNK_HEADER_LEN + 8];
    b[..CHUNK_HEADER_LEN].copy_from_slice(&chunk_header(
        REPLY_FLAG_DONE,
        reply_type::OFFSET_DATA,
        handle,
        data_len + 8,
    ));
    b[CHUNK_HEADER_LEN..].copy_from_slice(&offset.to_be_bytes());
    b
}

/// Appends a final `NONE` chunk.
pub fn put_none_chunk(out: &mut Vec<u8>, handle: u64) {
    out.extend_from_slice(&chunk_header(REPLY_FLAG_DONE, reply_type::NONE, handle, 0));
}

/// Appends a final `ERROR` chunk with a message.
pub fn put_error_chunk(out: &mut Vec<u8>, handle: u64, error: u32, message: &str) {
    let msg = &message.as_bytes()[..message.len().min(MAX_STRING_LEN)];
    let len = 6 + msg.len() as u32;
    out.extend_from_slice(&chunk_header(
        REPLY_FLAG_DONE,
        reply_type::ERROR,
        handle,
        len,
    ));
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg);
}

/// One block status descriptor: `length` bytes with `flags` (`state::*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes (non-zero).
    pub length: u32,
    /// Status flags.
    pub flags: u32,
}

/// Appends a final `BLOCK_STATUS` chunk for one context.
pub fn put_block_status_chunk(out: &mut Vec<u8>, handle: u64, context: u32, extents: &[Extent]) {
    let len = 4 + 8 * extents.len() as u32;
    out.extend_from_slice(&chunk_header(
        REPLY_FLAG_DONE,
        reply_type::BLOCK_STATUS,
        handle,
        len,
    ));
    out.extend_from_slice(&context.to_be_bytes());
    for e in extents {
        out.extend_from_slice(&e.length.to_be_bytes());
        out.extend_from_slice(&e.flags.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session() -> Session {
        Session {
            size: 1 << 20,
            read_only: false,
            structured: true,
            meta_context: Some(1),
        }
    }

    fn req(kind: u16, flags: u16, offset: u64, length: u32) -> Request {
        Request {
            flags,
            kind,
            handle: 7,
            offset,
            length,
        }
    }

    #[test]
    fn greeting_bytes() {
        let g = greeting();
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(&g[16..], &[0, 3]);
    }

    #[test]
    fn request_roundtrip() {
        let r = req(cmd::WRITE, cmd_flags::FUA, 4096, 512);
        assert_eq!(parse_request(&encode_request(&r)), Ok(r));
        let mut bad = encode_request(&r);
        bad[0] = 0;
        assert!(parse_request(&bad).is_err());
    }

    #[test]
    fn option_header() {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(b"IHAVEOPT");
        b[8..12].copy_from_slice(&7u32.to_be_bytes());
        b[12..16].copy_from_slice(&9u32.to_be_bytes());
        assert_eq!(
            parse_option_header(&b),
            Ok(OptionHeader {
                option: 7,
                length: 9
            })
        );
        b[0] = b'X';
        assert!(parse_option_header(&b).is_err());
    }

    #[test]
    fn client_flags() {
        assert_eq!(parse_client_flags(&[0, 0, 0, 3]), Ok(3));
        assert_eq!(parse_client_flags(&[0, 0, 0, 4]), Err(4));
    }

    #[test]
    fn info_request() {
        let mut d = Vec::new();
        d.extend_from_slice(&3u32.to_be_bytes());
        d.extend_from_slice(b"abc");
        d.extend_from_slice(&2u16.to_be_bytes());
        d.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
        d.extend_from_slice(&info::NAME.to_be_bytes());
        let r = parse_info_request(&d).unwrap();
        assert_eq!(r.name, "abc");
        assert_eq!(r.requests, vec![info::BLOCK_SIZE, info::NAME]);
        assert!(parse_info_request(&d[..d.len() - 1]).is_err());
        d.push(0);
        assert!(parse_info_request(&d).is_err());
    }

    #[test]
    fn meta_context_request() {
        let mut d = Vec::new();
        d.extend_from_slice(&0u32.to_be_bytes());
        d.extend_from_slice(&1u32.to_be_bytes());
        d.extend_from_slice(&15u32.to_be_bytes());
        d.extend_from_slice(b"base:allocation");
        let r = parse_meta_context_request(&d).unwrap();
        assert_eq!(r.export, "");
        assert_eq!(r.queries, vec!["base:allocation".to_string()]);
        // Query count larger than the data: invalid, not a panic or a
        // huge allocation.
        d[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_meta_context_request(&d).is_err());
    }

    #[test]
    fn validate_bounds_and_permissions() {
        let s = session();
        assert_eq!(
            validate(&req(cmd::READ, 0, 0, 512), &s),
            Ok(Command::Read {
                offset: 0,
                length: 512
            })
        );
        let e = validate(&req(cmd::READ, 0, (1 << 20) - 1, 2), &s).unwrap_err();
        assert_eq!((e.errno, e.discard), (errno::EINVAL, 0));
        let e = validate(&req(cmd::WRITE, 0, 1 << 20, 1), &s).unwrap_err();
        assert_eq!((e.errno, e.discard), (errno::ENOSPC, 1));
        let e = validate(&req(cmd::READ, 0, u64::MAX, 1), &s).unwrap_err();
        assert_eq!(e.errno, errno::EINVAL);
        let big = Session { size: 1 << 40, ..s };
        let e = validate(&req(cmd::WRITE, 0, 0, MAX_REQUEST_LEN + 1), &big).unwrap_err();
        assert_eq!((e.errno, e.discard), (errno::EINVAL, MAX_REQUEST_LEN + 1));
        let ro = Session {
            read_only: true,
            ..s
        };
        let e = validate(&req(cmd::WRITE, 0, 0, 10), &ro).unwrap_err();
        assert_eq!((e.errno, e.discard), (errno::EPERM, 10));
        let e = validate(&req(cmd::TRIM, 0, 0, 10), &ro).unwrap_err();
        assert_eq!((e.errno, e.discard), (errno::EPERM, 0));
        let e = validate(&req(99, 0, 0, 0), &s).unwrap_err();
        assert_eq!(e.errno, errno::EINVAL);
        let e = validate(&req(cmd::READ, cmd_flags::NO_HOLE, 0, 1), &s).unwrap_err();
        assert_eq!(e.errno, errno::EINVAL);
        let plain = Session {
            structured: false,
            meta_context: None,
            ..s
        };
        assert!(validate(&req(cmd::READ, cmd_flags::DF, 0, 1), &plain).is_err());
        assert!(validate(&req(cmd::BLOCK_STATUS, 0, 0, 1), &plain).is_err());
        assert_eq!(
            validate(&req(cmd::FLUSH, cmd_flags::FUA, 0, 0), &s),
            Ok(Command::Flush)
        );
    }

    #[test]
    fn encoders() {
        let mut out = Vec::new();
        put_error_chunk(&mut out, 9, errno::EINVAL, "no");
        assert_eq!(out.len(), 20 + 6 + 2);
        assert_eq!(&out[0..4], &STRUCTURED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&out[4..8], &[0, 1, 0x80, 1]);
        assert_eq!(&out[16..20], &8u32.to_be_bytes());
        let h = offset_data_header(1, 4096, 512);
        assert_eq!(&h[16..20], &520u32.to_be_bytes());
        assert_eq!(&h[20..28], &4096u64.to_be_bytes());
    }
}
