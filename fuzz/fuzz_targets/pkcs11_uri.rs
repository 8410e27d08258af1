//! The PKCS#11 URI parser (RFC 7512) on any text.
//!
//! Checks, beyond "no panic": what parses prints to a canonical form that parses back to the
//! same URI and prints the same again, within the length bound; a PIN is refused without being
//! quoted.
#![no_main]

use hsm_shim::uri::{Pkcs11Uri, TokenFields, UriError, MAX_URI_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match text.parse::<Pkcs11Uri>() {
        Ok(uri) => {
            let printed = uri.to_string();
            assert!(printed.len() <= MAX_URI_LEN, "{} bytes", printed.len());
            let back: Pkcs11Uri = printed.parse().expect("the canonical form parses");
            assert_eq!(back, uri, "round trip through {printed:?}");
            assert_eq!(back.to_string(), printed, "canonical");
            let label = uri.token.as_deref().unwrap_or("any");
            let token = TokenFields {
                label,
                manufacturer: uri.manufacturer.as_deref().unwrap_or(""),
                serial: uri.serial.as_deref().unwrap_or(""),
                model: uri.model.as_deref().unwrap_or(""),
            };
            assert!(
                uri.matches_token(&token),
                "a URI matches the token it describes"
            );
        }
        Err(UriError::PinValueRefused) => {}
        Err(e) => {
            // Building the message must not panic either.
            let _ = e.to_string();
        }
    }
});
