//! The audit log's verifier on any bytes: whole (`keyward audit verify`), and from an anchored
//! record on (the daemon's check when the vault opens): the record is found by reading the
//! lines, and the log verified from there. The input's first byte picks the anchored line.
//!
//! Checks, beyond "no panic": the anchored record found is the line the anchor names, a log
//! verified from it starts at its seq and never counts more unsigned records than it read, and
//! a log that starts with a line other than the anchored one never verifies from it.
#![no_main]

use keyward_proto::audit::{
    decode_key, find_anchored, line_hash, lines, parse, verify, verify_from, CheckedAnchor,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, log)) = data.split_first() else {
        return;
    };
    // Any fixed key (the curve's base point): nothing made from arbitrary bytes is signed by it.
    let Ok(key) = decode_key("WGZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmZmY=") else {
        return;
    };
    if let Ok(report) = verify(log, &key) {
        assert!(report.unsigned_tail <= report.records);
    }
    let all = lines(log);
    let Some(line) = all.get(usize::from(pick) % all.len().max(1)) else {
        return;
    };
    let anchor = CheckedAnchor {
        seq: parse(line.bytes).map_or(u64::from(pick), |r| r.seq),
        head: line_hash(line.bytes),
        key,
        next: None,
        counter: None,
        offset: Some(line.start as u64),
    };
    if let Ok(at) = find_anchored(log, &anchor) {
        let found = lines(&log[at..]);
        assert_eq!(found.first().map(|l| line_hash(l.bytes)), Some(anchor.head));
    }
    match verify_from(&log[line.start..], &anchor) {
        Ok(r) => {
            assert_eq!(r.first_seq, anchor.seq);
            assert!(r.records >= 1 && r.last_seq >= r.first_seq);
            assert!(r.unsigned_tail < r.records);
        }
        Err(f) => {
            let _ = f.to_string();
        }
    }
    // The line after it is not the anchored record (unless it is the same bytes again).
    if let Some(next) = all.iter().find(|l| l.start > line.start) {
        if next.bytes != line.bytes {
            assert!(verify_from(&log[next.start..], &anchor).is_err());
        }
    }
});
