//! The ssh-agent message parser (`keyward_proto::ssh::parse_request`), on any bytes: what a
//! client of the ssh-agent socket sends after the length field.
//!
//! Checks, beyond "no panic": a parsed `SIGN_REQUEST` encodes back to exactly the input (no
//! byte ignored, none invented), `REQUEST_IDENTITIES` is the bare type byte, and every other
//! type is reported unread with its own type byte.
#![no_main]

use keyward_proto::ssh::{parse_request, AgentRequest, REQUEST_IDENTITIES, SIGN_REQUEST};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(request) = parse_request(data) else {
        return;
    };
    match request {
        AgentRequest::Identities => assert_eq!(data, [REQUEST_IDENTITIES]),
        AgentRequest::Sign(sign) => {
            assert_eq!(
                sign.encode().unwrap(),
                data,
                "the request encodes back to its input"
            );
        }
        AgentRequest::Unsupported(kind) => {
            assert_eq!(Some(&kind), data.first());
            assert!(kind != REQUEST_IDENTITIES && kind != SIGN_REQUEST);
        }
    }
});
