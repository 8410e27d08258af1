//! The parser of the abstract socket address systemd's `LoadCredential=` connects from
//! (`<random hex>/unit/<unit name>/<credential id>`), on any bytes.
//!
//! Checks, beyond "no panic": an accepted address formats back to itself, and its credential
//! id is a plain file name (no `/`, not `.` or `..`, no control character).
#![no_main]

use keywardd::transport::credentials::parse_peer;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(request) = parse_peer(data) else {
        return;
    };
    let text = std::str::from_utf8(data).expect("only UTF-8 is accepted");
    let nonce = text.split('/').next().unwrap_or_default();
    assert_eq!(
        format!("{nonce}/unit/{}/{}", request.unit, request.id),
        text,
        "the address formats back to itself"
    );
    let id = &request.id;
    assert!(!id.is_empty() && id != "." && id != "..");
    assert!(!id.contains('/') && !id.chars().any(|c| c.is_ascii_control()));
    assert!(!request.unit.contains('/'));
});
