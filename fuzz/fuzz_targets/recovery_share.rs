//! The recovery share reader (the contract crate's, which the daemon and the CLI both use) and
//! the daemon's recovery keyslot blob reader, on any bytes.
//!
//! Checks, beyond "no panic": an accepted share's canonical text reads back to the same
//! share; an error never quotes the input; a blob that loads stores and loads again the same.
#![no_main]

use keyward_proto::recovery_share::parse;
use keywardd::vault::recovery::RecoverySlotData;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        match parse(text) {
            Ok(share) => {
                let canonical = share.to_text();
                let back = parse(&canonical).expect("the canonical text parses");
                assert_eq!(
                    (back.set_id, back.threshold, back.index, back.expose_data()),
                    (share.set_id, share.threshold, share.index, share.expose_data())
                );
                assert_eq!(*back.to_text(), *canonical);
            }
            Err(e) => {
                let shown = e.to_string();
                // No run of the input's data characters is echoed (the messages are fixed
                // text and numbers: no word of letters and digits mixed).
                let data_like = |w: &&str| {
                    w.len() >= 6
                        && w.bytes().any(|b| b.is_ascii_digit())
                        && w.bytes().any(|b| b.is_ascii_alphabetic())
                };
                for word in text.split(['-', ' ']).filter(data_like) {
                    assert!(!shown.contains(word), "{shown:?} quotes the input");
                }
            }
        }
    }
    if let Ok(slot) = RecoverySlotData::from_blob(data) {
        let blob = slot.to_blob().expect("a loaded slot stores");
        assert_eq!(RecoverySlotData::from_blob(&blob).expect("and loads"), slot);
    }
});
