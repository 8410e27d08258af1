//! Helpers shared by the audit log's unit tests.
//!
//! Must not: be compiled outside tests, or hold a test of its own.

use super::*;

pub(super) fn entry(op: &'static str, target: &str) -> Entry {
    Entry::new(&Caller::daemon(), op, target, format::OK)
}

pub(super) fn verify(dir: &Path, key: &VerifyingKey) -> format::Report {
    let log = std::fs::read(dir.join(format::LOG_FILE)).unwrap();
    format::verify(&log, key).unwrap_or_else(|f| panic!("{f}"))
}

/// Every file of the log in `dir`, end to end.
pub(super) fn whole_set(dir: &Path) -> Vec<u8> {
    let mut all = Vec::new();
    for f in format::set_in(dir).unwrap() {
        all.extend(std::fs::read(f).unwrap());
    }
    all
}
