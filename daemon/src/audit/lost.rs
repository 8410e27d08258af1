//! Declared losses: the `Status` records answered without being written (a full disk), counted
//! until the next record written declares them.
//!
//! Must not: drop a record of any other request (those fail closed), or declare a loss in a
//! checkpoint (its signature would not cover it).

use super::*;

impl AuditLog {
    /// Append a request record that may be lost: a `Status` call, answered even when its
    /// record can't be written. Written as [`Durability::Written`]; if it can't be, the loss is
    /// counted and the next record written declares it.
    ///
    /// # Errors
    /// Why it was not written (it is counted as lost).
    pub fn request_or_declare_lost(&self, entry: Entry) -> Result<u64, AuditError> {
        self.append_as(entry.into_body(), Durability::Written, None, true)
    }

    /// Records answered without being written and not declared yet (none once one is).
    pub fn lost(&self) -> Option<Lost> {
        lock(&self.writer).lost.clone()
    }
}

/// Count one record lost to `e`, to be declared by the next record written.
pub(super) fn count_lost(w: &mut Writer, e: &AuditError) {
    let time = now();
    let lost = w.lost.get_or_insert_with(|| Lost {
        records: 0,
        first: time.clone(),
        last: time.clone(),
        reason: capped(&e.to_string()),
    });
    lost.records += 1;
    lost.last = time;
    tracing::warn!(
        records = lost.records,
        since = %lost.first,
        "audit record of a Status call not written ({e}); answered all the same: the next record written declares the loss"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::test_support::*;
    use ed25519_dalek::SigningKey;

    #[test]
    fn a_status_record_that_cannot_be_written_is_declared_by_the_next_one() {
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKey::from_bytes(&[7; 32]);
        let log = AuditLog::open(dir.path(), AuditOptions::default()).unwrap();
        log.key_opened(key.clone(), "test");
        // /dev/full: every write fails with ENOSPC, as on a full file system.
        let real = log.live();
        log.set_live(OpenOptions::new().write(true).open("/dev/full").unwrap());
        let e = log
            .request_or_declare_lost(entry("Status", "vault"))
            .unwrap_err();
        assert!(e.storage_full(), "{e}");
        let lost = log.lost().expect("counted");
        assert_eq!(lost.records, 1);
        *log.file.write().unwrap() = real;
        let seq = log
            .request(entry("GetSecret", "a"), Durability::Written, None)
            .unwrap();
        assert_eq!(log.lost(), None, "declared");
        log.shutdown();
        let r = verify(dir.path(), &key.verifying_key());
        assert_eq!(r.lost.len(), 1);
        assert_eq!(r.lost[0].declared_at_seq, seq);
        assert_eq!(r.lost[0].records, 1);
        assert_eq!(r.lost[0].first, lost.first);
    }
}
