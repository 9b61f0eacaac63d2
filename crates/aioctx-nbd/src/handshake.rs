//! Option negotiation (the fixed newstyle handshake) as a pure state
//! machine: feed it one option at a time, it appends the replies to an
//! output buffer and says what happens next.
//!
//! The byte-level framing (reading the client flags, option headers and
//! option data off the socket) lives in [`crate::conn`].

use crate::proto::{self, handshake_flags, info, opt, rep, tflags, Session};

/// The id we give `base:allocation` when a client selects it.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// The export as the handshake describes it to clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// Export name clients must ask for ("" by default).
    pub name: String,
    /// Human-readable description (may be empty).
    pub description: String,
    /// Size in bytes.
    pub size: u64,
    /// Writes are refused.
    pub read_only: bool,
}

impl ExportInfo {
    /// The transmission flags we advertise. Every flag is backed by an
    /// implementation; `CAN_MULTI_CONN` is true because all connections
    /// share one file, so a flush on any of them covers writes from all.
    pub fn transmission_flags(&self, structured: bool) -> u16 {
        let mut f = tflags::HAS_FLAGS
            | tflags::SEND_FLUSH
            | tflags::SEND_FUA
            | tflags::SEND_CACHE
            | tflags::CAN_MULTI_CONN;
        if self.read_only {
            f |= tflags::READ_ONLY;
        } else {
            f |= tflags::SEND_TRIM | tflags::SEND_WRITE_ZEROES | tflags::SEND_FAST_ZERO;
        }
        if structured {
            // We always answer a read with a single data chunk.
            f |= tflags::SEND_DF;
        }
        f
    }
}

/// What the connection should do after an option was handled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Send the queued replies and wait for the next option.
    Continue,
    /// Send the queued replies, then close (the client sent `OPT_ABORT`).
    Close,
    /// Send the queued replies, then enter the transmission phase.
    Transmission(Session),
    /// Close at once without replying; the reason is for the log.
    Drop(&'static str),
}

/// Negotiation state of one connection.
#[derive(Debug)]
pub struct Handshake {
    export: ExportInfo,
    no_zeroes: bool,
    structured: bool,
    meta_context: Option<u32>,
}

impl Handshake {
    /// A fresh negotiation for `export`.
    pub fn new(export: ExportInfo) -> Self {
        Handshake {
            export,
            no_zeroes: false,
            structured: false,
            meta_context: None,
        }
    }

    /// Records the client flags (already checked by
    /// [`proto::parse_client_flags`]).
    pub fn set_client_flags(&mut self, flags: u32) {
        self.no_zeroes = flags & handshake_flags::C_NO_ZEROES != 0;
    }

    fn session(&self) -> Session {
        Session {
            size: self.export.size,
            read_only: self.export.read_only,
            structured: self.structured,
            meta_context: self.meta_context,
        }
    }

    /// Answers an option whose data exceeded [`proto::MAX_OPTION_LEN`]
    /// (the data has been skipped by the caller).
    pub fn option_too_big(&mut self, option: u32, out: &mut Vec<u8>) -> Step {
        if option == opt::EXPORT_NAME {
            // No way to report an error to EXPORT_NAME.
            return Step::Drop("export name too long");
        }
        proto::put_option_reply(out, option, rep::ERR_TOO_BIG, b"option data too large");
        Step::Continue
    }

    /// Handles one complete option.
    pub fn option(&mut self, option: u32, data: &[u8], out: &mut Vec<u8>) -> Step {
        let err = |out: &mut Vec<u8>, reply: u32, msg: &str| {
            proto::put_option_reply(out, option, reply, msg.as_bytes());
            Step::Continue
        };
        match option {
            opt::EXPORT_NAME => match proto::parse_string(data) {
                Ok(name) if name == self.export.name => {
                    let flags = self.export.transmission_flags(self.structured);
                    proto::put_export_name_reply(out, self.export.size, flags, self.no_zeroes);
                    Step::Transmission(self.session())
                }
                _ => Step::Drop("unknown export requested with OPT_EXPORT_NAME"),
            },
            opt::ABORT => {
                proto::put_option_reply(out, option, rep::ACK, &[]);
                Step::Close
            }
            opt::LIST => {
                if !data.is_empty() {
                    return err(out, rep::ERR_INVALID, "OPT_LIST takes no data");
                }
                proto::put_rep_server(out, option, &self.export.name);
                proto::put_option_reply(out, option, rep::ACK, &[]);
                Step::Continue
            }
            opt::INFO | opt::GO => {
                let req = match proto::parse_info_request(data) {
                    Ok(r) => r,
                    Err(e) => return err(out, rep::ERR_INVALID, e.0),
                };
                if req.name != self.export.name {
                    return err(out, rep::ERR_UNKNOWN, "no such export");
                }
                let flags = self.export.transmission_flags(self.structured);
                proto::put_info_export(out, option, self.export.size, flags);
                if req.requests.contains(&info::NAME) {
                    proto::put_info_string(out, option, info::NAME, &self.export.name);
                }
                if req.requests.contains(&info::DESCRIPTION) && !self.export.description.is_empty()
                {
                    proto::put_info_string(
                        out,
                        option,
                        info::DESCRIPTION,
                        &self.export.description,
                    );
                }
                // We limit requests to 32 MiB, which is not the default
                // "unlimited", so always tell the client.
                proto::put_info_block_size(
                    out,
                    option,
                    1,
                    proto::PREFERRED_BLOCK_SIZE,
                    proto::MAX_REQUEST_LEN,
                );
                proto::put_option_reply(out, option, rep::ACK, &[]);
                if option == opt::GO {
                    Step::Transmission(self.session())
                } else {
                    Step::Continue
                }
            }
            opt::STRUCTURED_REPLY => {
                if !data.is_empty() {
                    return err(out, rep::ERR_INVALID, "OPT_STRUCTURED_REPLY takes no data");
                }
                self.structured = true;
                proto::put_option_reply(out, option, rep::ACK, &[]);
                Step::Continue
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => self.meta_context(option, data, out),
            opt::STARTTLS => err(out, rep::ERR_UNSUP, "TLS is not supported"),
            _ => err(out, rep::ERR_UNSUP, "unknown option"),
        }
    }

    fn meta_context(&mut self, option: u32, data: &[u8], out: &mut Vec<u8>) -> Step {
        let set = option == opt::SET_META_CONTEXT;
        if set {
            // SET replaces the selection, even when it fails.
            self.meta_context = None;
        }
        let fail = |out: &mut Vec<u8>, reply: u32, msg: &str| {
            proto::put_option_reply(out, option, reply, msg.as_bytes());
            Step::Continue
        };
        if !self.structured {
            return fail(out, rep::ERR_INVALID, "negotiate structured replies first");
        }
        let req = match proto::parse_meta_context_request(data) {
            Ok(r) => r,
            Err(e) => return fail(out, rep::ERR_INVALID, e.0),
        };
        if req.export != self.export.name {
            return fail(out, rep::ERR_UNKNOWN, "no such export");
        }
        let matches = if req.queries.is_empty() {
            // An empty LIST asks for everything; an empty SET selects nothing.
            !set
        } else {
            req.queries
                .iter()
                .any(|q| q == proto::BASE_ALLOCATION || (!set && q == "base:"))
        };
        if matches {
            let id = if set { BASE_ALLOCATION_ID } else { 0 };
            proto::put_meta_context(out, option, id, proto::BASE_ALLOCATION);
            if set {
                self.meta_context = Some(BASE_ALLOCATION_ID);
            }
        }
        proto::put_option_reply(out, option, rep::ACK, &[]);
        Step::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hs() -> Handshake {
        Handshake::new(ExportInfo {
            name: "disk".into(),
            description: String::new(),
            size: 1 << 30,
            read_only: false,
        })
    }

    /// Splits a buffer of option replies into (option, type, data).
    fn replies(mut b: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut v = Vec::new();
        while !b.is_empty() {
            assert_eq!(&b[..8], &proto::OPT_REPLY_MAGIC.to_be_bytes());
            let o = u32::from_be_bytes(b[8..12].try_into().unwrap());
            let t = u32::from_be_bytes(b[12..16].try_into().unwrap());
            let l = u32::from_be_bytes(b[16..20].try_into().unwrap()) as usize;
            v.push((o, t, b[20..20 + l].to_vec()));
            b = &b[20 + l..];
        }
        v
    }

    fn info_data(name: &str, reqs: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(reqs.len() as u16).to_be_bytes());
        for r in reqs {
            d.extend_from_slice(&r.to_be_bytes());
        }
        d
    }

    fn meta_data(export: &str, queries: &[&str]) -> Vec<u8> {
        let mut d = (export.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        d
    }

    #[test]
    fn go_reports_size_flags_and_block_size() {
        let mut h = hs();
        let mut out = Vec::new();
        let step = h.option(opt::GO, &info_data("disk", &[info::BLOCK_SIZE]), &mut out);
        let Step::Transmission(s) = step else {
            panic!("{step:?}")
        };
        assert!(!s.structured && s.meta_context.is_none());
        let r = replies(&out);
        assert_eq!(r.len(), 3);
        assert_eq!((r[0].0, r[0].1), (opt::GO, rep::INFO));
        assert_eq!(&r[0].2[2..10], &(1u64 << 30).to_be_bytes());
        let flags = u16::from_be_bytes([r[0].2[10], r[0].2[11]]);
        assert_eq!(flags & tflags::SEND_DF, 0, "DF needs structured replies");
        assert_ne!(flags & tflags::CAN_MULTI_CONN, 0);
        assert_eq!(r[1].2.len(), 14);
        assert_eq!(r[2].1, rep::ACK);
    }

    #[test]
    fn unknown_export_and_option() {
        let mut h = hs();
        let mut out = Vec::new();
        assert_eq!(
            h.option(opt::INFO, &info_data("nope", &[]), &mut out),
            Step::Continue
        );
        assert_eq!(replies(&out)[0].1, rep::ERR_UNKNOWN);
        out.clear();
        assert_eq!(h.option(1234, b"xyz", &mut out), Step::Continue);
        assert_eq!(replies(&out)[0].1, rep::ERR_UNSUP);
        assert!(matches!(
            h.option(opt::EXPORT_NAME, b"nope", &mut out),
            Step::Drop(_)
        ));
    }

    #[test]
    fn meta_context_needs_structured_and_selects_base_allocation() {
        let mut h = hs();
        let mut out = Vec::new();
        let d = meta_data("disk", &["base:allocation", "qemu:dirty-bitmap:x"]);
        h.option(opt::SET_META_CONTEXT, &d, &mut out);
        assert_eq!(replies(&out)[0].1, rep::ERR_INVALID);
        out.clear();
        h.option(opt::STRUCTURED_REPLY, &[], &mut out);
        out.clear();
        h.option(opt::SET_META_CONTEXT, &d, &mut out);
        let r = replies(&out);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].1, rep::META_CONTEXT);
        assert_eq!(&r[0].2[..4], &BASE_ALLOCATION_ID.to_be_bytes());
        assert_eq!(&r[0].2[4..], b"base:allocation");
        assert_eq!(r[1].1, rep::ACK);
        out.clear();
        let Step::Transmission(s) = h.option(opt::GO, &info_data("disk", &[]), &mut out) else {
            panic!()
        };
        assert_eq!(s.meta_context, Some(BASE_ALLOCATION_ID));
        assert!(s.structured);
    }

    #[test]
    fn list_meta_context_wildcard() {
        let mut h = hs();
        let mut out = Vec::new();
        h.option(opt::STRUCTURED_REPLY, &[], &mut out);
        out.clear();
        h.option(
            opt::LIST_META_CONTEXT,
            &meta_data("disk", &["base:"]),
            &mut out,
        );
        let r = replies(&out);
        assert_eq!(r.len(), 2);
        assert_eq!(&r[0].2[4..], b"base:allocation");
        out.clear();
        // "base:" must not select anything.
        h.option(
            opt::SET_META_CONTEXT,
            &meta_data("disk", &["base:"]),
            &mut out,
        );
        assert_eq!(replies(&out).len(), 1);
    }

    #[test]
    fn export_name_zeroes() {
        let mut h = hs();
        let mut out = Vec::new();
        assert!(matches!(
            h.option(opt::EXPORT_NAME, b"disk", &mut out),
            Step::Transmission(_)
        ));
        assert_eq!(out.len(), 8 + 2 + 124);
        let mut h = hs();
        h.set_client_flags(handshake_flags::C_FIXED_NEWSTYLE | handshake_flags::C_NO_ZEROES);
        out.clear();
        h.option(opt::EXPORT_NAME, b"disk", &mut out);
        assert_eq!(out.len(), 10);
    }
}
