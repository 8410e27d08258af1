//! What the vault tells the audit log ([`AuditKeys`]): the vault opened (check the log
//! against its anchor, checkpoint), closed (last checkpoint, key dropped), a rekey's hand-over
//! to the next key and its end.
//!
//! Must not: call into the vault (it calls here under its own lock).

use super::*;

impl AuditKeys for AuditLog {
    fn opened(&self, key: SigningKey, by: &str) {
        let public = key.verifying_key();
        let mut w = lock(&self.writer);
        if w.key.as_ref().map(SigningKey::verifying_key) == Some(public) {
            return;
        }
        if w.key.is_none() {
            // The key is here: check what was written while it was not, before signing it.
            let checked = self.check_anchor(&w, &public);
            w.found = None;
            let checked = match checked {
                Ok(anchor) => self.check_counter(&mut w, anchor.as_ref()),
                Err(finding) => {
                    // Anchors of the new log go on from the counter as it is.
                    let _ = self.check_counter(&mut w, None);
                    Err(finding)
                }
            };
            if let Err(finding) = checked {
                tracing::error!("audit log: {finding}: not continuing it");
                match self.start_new_log(&mut w, &finding) {
                    Ok(aside) => {
                        *lock(&self.finding) = Some(format!(
                            "{finding}; a new log was started, the old one is in {}",
                            aside.display()
                        ));
                    }
                    Err(e) => {
                        // Never sign over it: no checkpoints until someone looks.
                        tracing::error!("audit log: {e}; checkpoints are off");
                        *lock(&self.finding) = Some(format!(
                            "{finding}; no new log could be started ({e}): checkpoints are off"
                        ));
                        return;
                    }
                }
            }
        }
        if let Err(e) = self.anchor_head(&mut w, &key) {
            // Without it, a crash before the next anchor would look like a removed one.
            tracing::error!("audit log: {e}");
        }
        w.key = Some(key);
        w.next = None;
        if let Err(e) = self.checkpoint_synced(w, &format!("unsealed: {by}"), |_| {}) {
            tracing::error!("audit log: checkpoint at unseal: {e}");
        }
        if let Err(e) = self.store_public_key(&public) {
            tracing::error!("audit log: {e}");
        }
    }

    fn closed(&self, why: &str) {
        let w = lock(&self.writer);
        if w.key.is_none() {
            return;
        }
        // The key goes (zeroized) right after the last checkpoint it signs.
        let forget = |w: &mut Writer| {
            w.key = None;
            w.next = None;
        };
        if let Err(e) = self.checkpoint_synced(w, why, forget) {
            tracing::error!("audit log: checkpoint at seal: {e}");
        }
    }

    fn rekeying(&self, next: &VerifyingKey) -> Result<(), AuditError> {
        let mut w = lock(&self.writer);
        w.next = Some(*next);
        let handed = self.checkpoint_synced(w, "rekey: handing over to the next key", |_| {});
        if handed.is_err() {
            // The rekey is refused: no later checkpoint may keep naming this key.
            lock(&self.writer).next = None;
        }
        handed
    }

    fn rekeyed(&self, key: Option<SigningKey>) {
        let mut w = lock(&self.writer);
        w.next = None;
        let public = key.as_ref().map(SigningKey::verifying_key);
        let reason = match key {
            Some(k) => {
                w.key = Some(k);
                "rekeyed: the new key signs from here"
            }
            None => "rekey failed: the hand-over is called off",
        };
        if let Err(e) = self.checkpoint_synced(w, reason, |_| {}) {
            tracing::error!("audit log: checkpoint after rekey: {e}");
        }
        if let Some(public) = public {
            if let Err(e) = self.store_public_key(&public) {
                tracing::error!("audit log: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::test_support::*;
    use ed25519_dalek::SigningKey;

    #[test]
    fn a_rekey_hands_over_and_verifies_from_either_key() {
        let dir = tempfile::tempdir().unwrap();
        let old = SigningKey::from_bytes(&[8; 32]);
        let new = SigningKey::from_bytes(&[9; 32]);
        let log = AuditLog::open(dir.path(), AuditOptions::default()).unwrap();
        log.opened(old.clone(), "test");
        log.rekeying(&new.verifying_key()).unwrap();
        log.request(entry("Status", "vault"), Durability::Written, None)
            .unwrap();
        log.rekeyed(Some(new.clone()));
        log.request(entry("GetSecret", "x"), Durability::Written, None)
            .unwrap();
        log.closed("sealed by test");
        assert_eq!(
            log.public_key(),
            Some(format::encode_key(&new.verifying_key()))
        );
        log.shutdown();
        let r = verify(dir.path(), &old.verifying_key());
        assert_eq!(r.keys.len(), 2);
        verify(dir.path(), &new.verifying_key());
    }
}
