//! Property tests: the parsers and the handshake state machine never
//! panic, whatever the client sends, and what they accept round-trips.

use aioctx_nbd::handshake::{ExportInfo, Handshake, Step};
use aioctx_nbd::proto::{self, Command, Request, Session};
use proptest::prelude::*;

fn export() -> ExportInfo {
    ExportInfo {
        name: "disk".into(),
        description: "test".into(),
        size: 1 << 30,
        read_only: false,
    }
}

/// Option data that is often almost valid: a length-prefixed name
/// followed by random bytes.
fn option_data() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..64),
        (any::<u32>(), prop::collection::vec(any::<u8>(), 0..64)).prop_map(|(n, rest)| {
            let mut d = (n % 16).to_be_bytes().to_vec();
            d.extend_from_slice(b"disk");
            d.extend(rest);
            d
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn option_parsers_never_panic(data in option_data()) {
        let _ = proto::parse_info_request(&data);
        let _ = proto::parse_meta_context_request(&data);
        let _ = proto::parse_string(&data);
    }

    #[test]
    fn headers_never_panic(h in any::<[u8; 16]>(), r in any::<[u8; 28]>(), f in any::<[u8; 4]>()) {
        let _ = proto::parse_option_header(&h);
        let _ = proto::parse_client_flags(&f);
        if let Ok(req) = proto::parse_request(&r) {
            prop_assert_eq!(proto::encode_request(&req), r);
        }
    }

    #[test]
    fn handshake_never_panics(opts in prop::collection::vec((0u32..16, option_data()), 1..12)) {
        let mut h = Handshake::new(export());
        for (option, data) in opts {
            let mut out = Vec::new();
            match h.option(option, &data, &mut out) {
                Step::Continue => {}
                _ => break,
            }
        }
    }

    #[test]
    fn validate_accepts_only_in_bounds_requests(
        flags in any::<u16>(), kind in 0u16..10, offset in any::<u64>(), length in any::<u32>(),
        structured in any::<bool>(), read_only in any::<bool>(),
    ) {
        let s = Session {
            size: 1 << 30,
            read_only,
            structured,
            meta_context: structured.then_some(1),
        };
        let req = Request { flags, kind, handle: 1, offset, length };
        match proto::validate(&req, &s) {
            Ok(Command::Disconnect | Command::Flush) => {}
            Ok(cmd) => {
                prop_assert!(offset.checked_add(length as u64).is_some_and(|e| e <= s.size));
                if matches!(cmd, Command::Write { .. } | Command::Trim { .. } | Command::WriteZeroes { .. }) {
                    prop_assert!(!read_only);
                }
                if matches!(cmd, Command::Read { .. } | Command::Write { .. }) {
                    prop_assert!(length <= proto::MAX_REQUEST_LEN);
                }
            }
            Err(e) => {
                prop_assert!(e.errno != 0);
                let payload = if kind == proto::cmd::WRITE { length } else { 0 };
                prop_assert_eq!(e.discard, payload);
            }
        }
    }
}
