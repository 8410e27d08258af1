//! Checkpoints and the anchor: signing the chain's head with the vault's audit key, the
//! anchor kept in `audit.anchor` (and copied to the journal), checking the log against it
//! when the key comes, setting a log that fails the check aside for a new one, and
//! `audit.pub`.
//!
//! **What the check when the vault opens proves.** The anchor in `audit.anchor` is signed by
//! the vault's audit key (or by the key before it, at a rekey's hand-over) over a record's seq
//! and the hash of its line: normally the newest checkpoint on disk (a new log's first anchor
//! names its head instead). The check reads the log as it was found at start from that record
//! on — from the anchor's `offset` in the file that holds it, confirmed by the line there
//! hashing to the anchor's `head` — and passes when (1) the anchored record is there, unchanged,
//! at its seq, and (2) every record after it, to the end of the log as found, follows in an
//! unbroken chain with seq continuous, damaged bytes only where a resume record accounts for
//! them, and every checkpoint signed by the anchor's key or a key it was handed over to
//! ([`format::verify_from`]). So a log cut short before the anchored record, or rewritten from
//! an earlier point on (which changes the anchored line, or its seq), or edited after it
//! without recomputing the chain, is set aside, and nothing signs over it.
//!
//! It reads nothing before the anchored record, so it costs the records written since the
//! last checkpoint, not the log's length. Records *before* it that were damaged or rewritten
//! without touching the anchored line (which would need the chain broken, since that line's
//! `prev` commits to every record before it) do not stop the log: they are not signed over
//! (they are outside the chain the next checkpoint extends), and `keyward audit verify` of the
//! whole log (every file, every checkpoint's signature, from the genesis record) names the
//! first bad record. Until anchors carried their offset, the check read the files from the
//! start of the one holding the anchored record (the rolled files before it never) and also
//! failed on a broken chain before the anchored record in that file; an anchor without an
//! offset, or whose offset leads elsewhere, is still found by reading those files, but only
//! to locate the record ([`format::find_anchored`]), so the two kinds of anchor prove the
//! same. As before, records after the anchored record are protected only by the chain (an edit
//! among them that recomputes the chain passes), and a log rolled back with its anchor passes
//! unless a TPM counter is kept ([`super::counter`]).
//!
//! Must not: write an anchor before its checkpoint is on disk, sign over a log that did not
//! match its anchor, or keep the signing key anywhere but the writer (zeroized when dropped).

use super::writer::{first_seq, open_live, replace_file, rolled_path, sync_dir};
use super::*;

impl AuditLog {
    /// Sign the chain head, if the vault is open. Returns the record's number when written.
    pub(super) fn checkpoint(
        &self,
        w: &mut Writer,
        reason: &str,
    ) -> Result<Option<u64>, AuditError> {
        if w.key.is_none() {
            return Ok(None);
        }
        if w.damaged.is_some() {
            self.resume(w)?;
        }
        let Some(key) = &w.key else {
            return Ok(None);
        };
        let time = now();
        let public = key.verifying_key();
        let message =
            format::checkpoint_message(w.seq, &w.prev, &time, reason, &public, w.next.as_ref());
        let signature = key.sign(&message);
        let body = Body::Checkpoint(Checkpoint {
            reason: reason.to_owned(),
            public_key: format::encode_key(&public),
            next_public_key: w.next.as_ref().map(format::encode_key),
            signature: B64.encode(signature.to_bytes()),
        });
        // Not through write_line's roll-over: the anchor must name this file's last line.
        let rolling = std::mem::replace(&mut w.rolling, true);
        let written = self.write_line(w, time.clone(), body);
        w.rolling = rolling;
        let seq = written?;
        let Some(key) = &w.key else {
            return Ok(None);
        };
        let counter = w.counter_next;
        let mut anchor = sign_anchor(key, seq, &w.prev, time, w.next.as_ref(), counter);
        anchor.offset = w.last_line;
        w.counter_next = counter.map(|c| c + 1);
        // The second witness: the journal keeps what the state directory may lose.
        tracing::info!(
            target: CHECKPOINT_TARGET,
            seq = anchor.seq,
            head = %anchor.head,
            time = %anchor.time,
            key = %anchor.public_key,
            next_key = anchor.next_public_key.as_deref().unwrap_or(""),
            sig = %anchor.signature,
            reason,
            "audit checkpoint"
        );
        w.since_checkpoint = 0;
        w.last_checkpoint = Instant::now();
        let number = self.written.fetch_add(1, Ordering::AcqRel) + 1;
        *lock(&self.pending_anchor) = Some((number, anchor));
        if w.end >= self.options.max_file_bytes && !w.rolling {
            w.rolling = true;
            if let Err(e) = self.roll_over(w) {
                tracing::error!("audit log: {e}; writing on to {}", self.path.display());
            }
            w.rolling = false;
        }
        Ok(Some(self.written.load(Ordering::Acquire)))
    }

    /// Write a checkpoint now and sync it (the hooks' path: rare, and under the vault's lock).
    /// Write a checkpoint, let `then` change the writer while it is still locked, unlock, and
    /// sync: the hooks' path (rare) must not hold appends up for an `fdatasync`.
    pub(super) fn checkpoint_synced(
        &self,
        mut w: MutexGuard<'_, Writer>,
        reason: &str,
        then: impl FnOnce(&mut Writer),
    ) -> Result<(), AuditError> {
        let written = self.checkpoint(&mut w, reason);
        then(&mut w);
        drop(w);
        match written? {
            Some(n) => {
                self.sync_through(n)?;
                self.publish_anchor();
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Write the pending anchor to `audit.anchor` once its checkpoint is on disk (never
    /// before: the anchor must never be ahead of the log).
    pub(super) fn publish_anchor(&self) {
        let mut published = lock(&self.anchor_lock);
        let anchor = {
            let mut pending = lock(&self.pending_anchor);
            match pending.as_ref() {
                Some((number, _)) if *number <= self.synced.load(Ordering::Acquire) => {
                    pending.take().map(|(_, a)| a)
                }
                _ => None,
            }
        };
        let Some(anchor) = anchor else {
            return;
        };
        if published.is_some_and(|seq| seq >= anchor.seq) {
            return;
        }
        if let Err(e) = self.write_anchor(&mut published, &anchor) {
            tracing::error!("audit log: {e}");
            return;
        }
        drop(published);
        if let Some(c) = anchor.counter {
            self.counter_up_to(c);
        }
    }

    /// Replace `audit.anchor` with `anchor`; `published` is the anchor lock's content.
    pub(super) fn write_anchor(
        &self,
        published: &mut Option<u64>,
        anchor: &Anchor,
    ) -> Result<(), AuditError> {
        let err = |source| AuditError::PublicKey {
            path: self.anchor_path.clone(),
            source,
        };
        let text = serde_json::to_vec(anchor).map_err(|e| err(io::Error::other(e)))?;
        replace_file(&self.anchor_path, &text, 0o644).map_err(err)?;
        *published = Some(anchor.seq);
        Ok(())
    }

    /// A log with no anchor yet (new, or just started after a finding) gets one at its head
    /// before its first checkpoint: so a log that holds a checkpoint always has an anchor, and
    /// a missing one is a finding, not a crash between the two.
    pub(super) fn anchor_head(&self, w: &mut Writer, key: &SigningKey) -> Result<(), AuditError> {
        if self.anchor_path.exists() || w.seq == 0 {
            return Ok(());
        }
        self.sync_through(self.written.load(Ordering::Acquire))?;
        let counter = w.counter_next;
        let mut anchor = sign_anchor(key, w.seq - 1, &w.prev, now(), None, counter);
        anchor.offset = w.last_line;
        self.write_anchor(&mut lock(&self.anchor_lock), &anchor)?;
        if let Some(c) = counter {
            w.counter_next = Some(c + 1);
            self.counter_up_to(c);
        }
        Ok(())
    }

    /// Check the log against `audit.anchor` for the vault whose audit key is `key`. `Err` is
    /// the finding, in words.
    pub(super) fn check_anchor(
        &self,
        w: &Writer,
        key: &VerifyingKey,
    ) -> Result<Option<CheckedAnchor>, String> {
        let text = match std::fs::read(&self.anchor_path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return match self.holds_a_checkpoint(w) {
                    Ok(false) => Ok(None),
                    Ok(true) => Err(format!(
                        "{} is missing, but the log holds checkpoints: the log can't be checked (removed, or the first start of a version that keeps one)",
                        format::ANCHOR_FILE
                    )),
                    Err(e) => Err(format!("cannot read the log to check it: {e}")),
                };
            }
            Err(e) => return Err(format!("cannot read {}: {e}", format::ANCHOR_FILE)),
        };
        let anchor = Anchor::parse(&text)
            .map_err(|e| format!("{} is not an anchor: {e}", format::ANCHOR_FILE))?
            .check()
            .map_err(|p| format!("{}: {p}", format::ANCHOR_FILE))?;
        // Signed by this vault's key, or by the one before it at a rekey's hand-over.
        if anchor.key != *key && anchor.next.as_ref() != Some(key) {
            return Err(format!(
                "{} is not signed by this vault's audit key",
                format::ANCHOR_FILE
            ));
        }
        let mismatch = |f: format::Failure| {
            let at = f.seq.map(|s| format!("seq {s}: ")).unwrap_or_default();
            format!(
                "the log does not match its anchor (checkpoint seq {}): {at}{}",
                anchor.seq, f.problem
            )
        };
        let bytes = self
            .read_anchored(w, &anchor)
            .map_err(|e| format!("cannot read the log to check it: {e}"))?
            .map_err(mismatch)?;
        format::verify_from(&bytes, &anchor)
            .map(|_| Some(anchor.clone()))
            .map_err(mismatch)
    }

    /// The log from the anchored record on, as found at start ([`format::verify_from`]'s
    /// input): read from the anchor's offset when the line there is the anchored one, else
    /// found by reading the files that may hold it ([`format::find_anchored`]: an anchor
    /// written before anchors had an offset, or an offset that leads elsewhere). The inner
    /// `Err` is the record not being found, in the verifier's words.
    pub(super) fn read_anchored(
        &self,
        w: &Writer,
        anchor: &CheckedAnchor,
    ) -> io::Result<Result<Vec<u8>, format::Failure>> {
        let files = self.files_from(w, anchor.seq)?;
        if let Some(offset) = anchor.offset {
            let bytes = read_files(&files, offset)?;
            let first = bytes.split(|&b| b == b'\n').next().unwrap_or_default();
            if bytes.len() > first.len() && format::line_hash(first) == anchor.head {
                return Ok(Ok(bytes));
            }
            tracing::warn!(
                seq = anchor.seq,
                offset,
                "audit log: the anchored record is not at the anchor's offset; reading the log for it"
            );
        }
        let mut bytes = read_files(&files, 0)?;
        Ok(format::find_anchored(&bytes, anchor).map(|at| {
            bytes.drain(..at);
            bytes
        }))
    }

    /// The log's files from the one that holds `seq` on, end to end (see
    /// [`AuditLog::files_from`]).
    pub(super) fn read_from(&self, w: &Writer, seq: u64) -> io::Result<Vec<u8>> {
        read_files(&self.files_from(w, seq)?, 0)
    }

    /// The log's files from the one that holds `seq` on, each with where its bytes end (the
    /// live one at its last good record). The first time, only the log as it was found at
    /// start: what this run wrote since then is ours, and must not hide a cut.
    fn files_from(&self, w: &Writer, seq: u64) -> io::Result<Vec<(PathBuf, Option<u64>)>> {
        let mut files = format::set_in(&self.dir)?;
        let mut live = (
            self.path.clone(),
            w.damaged.as_ref().map_or(w.end, |(at, _)| *at),
        );
        if let Some((rolled, end)) = w.found {
            if rolled < w.rolled {
                // Rolled over since: the file that was live is audit.log.(rolled + 1).
                let was = rolled_path(&self.dir, rolled + 1);
                if let Some(at) = files.iter().position(|p| *p == was) {
                    files.truncate(at + 1);
                }
                live = (was, end);
            } else {
                live.1 = end;
            }
        }
        let mut start = 0;
        for (i, path) in files.iter().enumerate().rev() {
            if first_seq(path)?.is_some_and(|first| first <= seq) {
                start = i;
                break;
            }
        }
        Ok(files
            .split_off(start)
            .into_iter()
            .map(|path| {
                let end = (path == live.0).then_some(live.1);
                (path, end)
            })
            .collect())
    }

    /// Whether any of the log's files holds a checkpoint (newest first: it is found at once).
    pub(super) fn holds_a_checkpoint(&self, w: &Writer) -> io::Result<bool> {
        for path in format::set_in(&self.dir)?.iter().rev() {
            let mut bytes = std::fs::read(path)?;
            if *path == self.path {
                bytes.truncate(usize::try_from(w.end).unwrap_or(usize::MAX));
            }
            let found = format::lines(&bytes).iter().any(|l| {
                matches!(
                    format::parse(l.bytes),
                    Ok(Record {
                        body: Body::Checkpoint(_),
                        ..
                    })
                )
            });
            if found {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Refuse to continue a log that does not match its anchor: move its files and anchor,
    /// untouched, into a directory of their own and start a new log whose first record says
    /// why.
    pub(super) fn start_new_log(
        &self,
        w: &mut Writer,
        finding: &str,
    ) -> Result<PathBuf, AuditError> {
        let stamp: String = now().chars().filter(char::is_ascii_alphanumeric).collect();
        let aside = self.dir.join(format!("audit-set-aside-{stamp}"));
        let files = AuditError::Files;
        // No anchor of the old log may be written while (or after) it is moved.
        let mut published = lock(&self.anchor_lock);
        *lock(&self.pending_anchor) = None;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&aside)
            .map_err(files)?;
        let live = self.live();
        live.sync_data().map_err(AuditError::Sync)?;
        for path in format::set_in(&self.dir).map_err(files)? {
            if let Some(name) = path.file_name() {
                std::fs::rename(&path, aside.join(name)).map_err(files)?;
            }
        }
        if self.anchor_path.exists() {
            std::fs::rename(&self.anchor_path, aside.join(format::ANCHOR_FILE)).map_err(files)?;
        }
        if self.pub_path.exists() {
            std::fs::copy(&self.pub_path, aside.join(format::PUBLIC_KEY_FILE)).map_err(files)?;
        }
        sync_dir(&aside).map_err(files)?;
        let new = open_live(&self.path).map_err(files)?;
        sync_dir(&self.dir).map_err(files)?;
        self.set_live(new);
        *published = None;
        drop(published);
        w.seq = 0;
        w.prev = format::GENESIS;
        w.end = 0;
        w.damaged = None;
        w.rolled = 0;
        w.since_checkpoint = 0;
        let detail = capped(&format!(
            "{finding}; the old log is kept as it was in {}",
            aside.display()
        ));
        let body = Body::Event(EventRecord {
            event: format::NEW_LOG.into(),
            detail,
        });
        self.write_line(w, now(), body)?;
        self.written.fetch_add(1, Ordering::AcqRel);
        Ok(aside)
    }

    /// Replace `audit.pub` with `key` (PEM), atomically and durably.
    pub(super) fn store_public_key(&self, key: &VerifyingKey) -> Result<(), AuditError> {
        let err = |source| AuditError::PublicKey {
            path: self.pub_path.clone(),
            source,
        };
        let encoded = format::encode_key(key);
        if lock(&self.public_key).as_deref() == Some(encoded.as_str()) && self.pub_path.is_file() {
            return Ok(());
        }
        replace_file(&self.pub_path, format::pem(key).as_bytes(), 0o644).map_err(err)?;
        *lock(&self.public_key) = Some(encoded);
        Ok(())
    }
}

/// An anchor for the record `seq` whose line hashes to `head`, signed by `key`.
pub(super) fn sign_anchor(
    key: &SigningKey,
    seq: u64,
    head: &[u8; 32],
    time: String,
    next: Option<&VerifyingKey>,
    counter: Option<u64>,
) -> Anchor {
    let public = key.verifying_key();
    let message = format::anchor_message(seq, head, &time, &public, next, counter);
    let signature = key.sign(&message);
    Anchor {
        seq,
        head: format::hex(head),
        time,
        public_key: format::encode_key(&public),
        next_public_key: next.map(format::encode_key),
        counter,
        signature: B64.encode(signature.to_bytes()),
        offset: None,
    }
}

/// `files` end to end, the first from byte `offset` on, each up to its end (if it has one).
fn read_files(files: &[(PathBuf, Option<u64>)], offset: u64) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    for (i, (path, end)) in files.iter().enumerate() {
        let from = if i == 0 { offset } else { 0 };
        let mut file = File::open(path)?;
        file.seek(SeekFrom::Start(from))?;
        match end {
            Some(end) => file.take(end.saturating_sub(from)).read_to_end(&mut out)?,
            None => file.read_to_end(&mut out)?,
        };
    }
    #[cfg(test)]
    tests::READ.with(|r| r.set(r.get() + out.len() as u64));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::test_support::*;
    use ed25519_dalek::SigningKey;

    thread_local! {
        /// Bytes of the log the anchor check read on this thread ([`read_files`]).
        pub(super) static READ: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    }

    /// A log of `records` reads, signed and stopped: (its length, the bytes the next unseal's
    /// check read).
    fn log_of(dir: &Path, records: usize) -> (u64, u64) {
        let key = SigningKey::from_bytes(&[8; 32]);
        let log = AuditLog::open(dir, AuditOptions::default()).unwrap();
        log.key_opened(key.clone(), "test");
        for n in 0..records {
            log.request(
                entry("GetSecret", &format!("s{n}")),
                Durability::Written,
                None,
            )
            .unwrap();
        }
        log.shutdown();
        let len = std::fs::metadata(dir.join(format::LOG_FILE)).unwrap().len();
        (len, unseal_again(dir, &key))
    }

    /// Open the log in `dir` and unseal: the bytes the check read. It must pass.
    fn unseal_again(dir: &Path, key: &SigningKey) -> u64 {
        let log = AuditLog::open(dir, AuditOptions::default()).unwrap();
        READ.with(|r| r.set(0));
        log.key_opened(key.clone(), "test");
        let read = READ.with(std::cell::Cell::get);
        assert_eq!(log.finding(), None);
        log.shutdown();
        read
    }

    #[test]
    fn the_check_at_unseal_reads_from_the_anchor_on_however_long_the_log() {
        let (small, big) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (small_len, small_read) = log_of(small.path(), 10);
        let (big_len, big_read) = log_of(big.path(), 20_000);
        assert!(big_len > 4 << 20, "{big_len}");
        // The stop checkpoint (anchored) is all there is after the anchor: one line either way
        // (the longer log's has longer seq numbers).
        assert!(
            small_read > 0 && small_read < 1024,
            "{small_read} of {small_len}"
        );
        assert!(big_read <= small_read + 16, "{big_read} of {big_len}");
        // An anchor without an offset (written before anchors had one) is found by reading
        // the file, and passes the same.
        let anchor_path = big.path().join(format::ANCHOR_FILE);
        let mut anchor = Anchor::parse(&std::fs::read(&anchor_path).unwrap()).unwrap();
        assert!(anchor.offset.is_some());
        anchor.offset = None;
        std::fs::write(&anchor_path, serde_json::to_vec(&anchor).unwrap()).unwrap();
        let key = SigningKey::from_bytes(&[8; 32]);
        let read = unseal_again(big.path(), &key);
        assert!(read >= big_len, "{read} of {big_len}");
        // The checkpoints since carry an offset again.
        assert!(unseal_again(big.path(), &key) < 1024);
    }

    #[test]
    fn records_damaged_before_the_anchored_checkpoint_do_not_stop_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKey::from_bytes(&[8; 32]);
        log_of(dir.path(), 20);
        let path = dir.path().join(format::LOG_FILE);
        // As long as before (the anchor's offset still leads to its record), then longer.
        for (from, to) in [("\"s3\"", "\"s4\""), ("\"s5\"", "\"s5-renamed\"")] {
            let text = std::fs::read_to_string(&path).unwrap();
            assert!(text.contains(from));
            std::fs::write(&path, text.replacen(from, to, 1)).unwrap();
            unseal_again(dir.path(), &key);
            // The whole log still says where it was edited.
            let f = format::verify(&whole_set(dir.path()), &key.verifying_key()).unwrap_err();
            assert_eq!(f.problem, format::Problem::Altered, "{f}");
        }
        // Records written while sealed come after the anchor: one of them edited the same
        // way is a finding.
        let log = AuditLog::open(dir.path(), AuditOptions::default()).unwrap();
        for n in 0..3 {
            log.request(
                entry("GetSecret", &format!("sealed{n}")),
                Durability::Written,
                None,
            )
            .unwrap();
        }
        log.shutdown();
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replacen("\"sealed1\"", "\"sealed9\"", 1)).unwrap();
        let log = AuditLog::open(dir.path(), AuditOptions::default()).unwrap();
        log.key_opened(key, "test");
        let finding = log.finding().expect("a finding");
        assert!(
            finding.contains("does not match its anchor") && finding.contains("altered"),
            "{finding}"
        );
        log.shutdown();
    }

    #[test]
    fn the_unsealed_log_signs_every_so_many_records() {
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKey::from_bytes(&[4; 32]);
        let log = AuditLog::open(dir.path(), AuditOptions::default()).unwrap();
        log.key_opened(key.clone(), "test");
        for _ in 0..CHECKPOINT_EVERY + 5 {
            log.request(entry("GetSecret", "x"), Durability::Written, None)
                .unwrap();
        }
        let bytes = std::fs::read(dir.path().join(format::LOG_FILE)).unwrap();
        let r = format::verify(&bytes, &key.verifying_key()).unwrap();
        assert_eq!(
            r.checkpoints, 2,
            "the unseal checkpoint and one periodic one"
        );
        assert!(r.unsigned_tail < CHECKPOINT_EVERY);
        log.shutdown();
    }

    /// Rewrite `path` from the record after `keep` on: the records after it edited, every later
    /// checkpoint dropped, seq renumbered and the chain recomputed — what someone with write
    /// access and no key can do.
    fn forge_after(path: &Path, keep: usize) {
        let bytes = std::fs::read(path).unwrap();
        let lines = format::lines(&bytes);
        let mut out = Vec::new();
        let mut prev = [0u8; 32];
        let mut seq = 0;
        for (i, l) in lines.iter().enumerate() {
            let mut r = format::parse(l.bytes).unwrap();
            if i > keep {
                if matches!(r.body, Body::Checkpoint(_)) {
                    continue;
                }
                if let Body::Request(q) = &mut r.body {
                    q.target = "forged".into();
                }
                r.seq = seq;
                r.prev = format::hex(&prev);
            }
            let line = serde_json::to_vec(&r).unwrap();
            prev = format::line_hash(&line);
            seq = r.seq + 1;
            out.extend_from_slice(&line);
            out.push(b'\n');
        }
        std::fs::write(path, out).unwrap();
    }

    #[test]
    fn a_log_rewritten_after_a_checkpoint_is_set_aside_at_unseal_and_a_new_one_starts() {
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKey::from_bytes(&[2; 32]);
        let log = AuditLog::open(dir.path(), AuditOptions::default()).unwrap();
        log.key_opened(key.clone(), "test");
        log.request(entry("Rotate", "vault"), Durability::Synced, Some("admin"))
            .unwrap();
        for n in 0..4 {
            log.request(
                entry("GetSecret", &format!("s{n}")),
                Durability::Written,
                None,
            )
            .unwrap();
        }
        log.shutdown();
        let path = dir.path().join(format::LOG_FILE);
        let anchor = std::fs::read(dir.path().join(format::ANCHOR_FILE)).unwrap();
        let lines: Vec<Record> = format::lines(&std::fs::read(&path).unwrap())
            .iter()
            .map(|l| format::parse(l.bytes).unwrap())
            .collect();
        // start, checkpoint (unseal), Rotate, checkpoint (admin): keep those.
        let keep = lines
            .iter()
            .position(|r| matches!(&r.body, Body::Checkpoint(c) if c.reason == "admin"))
            .unwrap();
        forge_after(&path, keep);
        let forged = std::fs::read(&path).unwrap();
        // The chain alone can't tell.
        format::verify(&forged, &key.verifying_key()).unwrap();

        let log = AuditLog::open(dir.path(), AuditOptions::default()).unwrap();
        assert_eq!(
            log.finding(),
            None,
            "nothing is known before the key is here"
        );
        log.key_opened(key.clone(), "test");
        let finding = log.finding().expect("a finding");
        assert!(finding.contains("does not match its anchor"), "{finding}");
        log.shutdown();
        // The forged files are kept as they were, with the anchor, in a directory of their own.
        let aside: Vec<PathBuf> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_dir())
            .collect();
        assert_eq!(aside.len(), 1, "{aside:?}");
        // (with the start record this run wrote before the key came)
        let kept = std::fs::read(aside[0].join(format::LOG_FILE)).unwrap();
        assert!(kept.starts_with(&forged));
        assert_eq!(
            std::fs::read(aside[0].join(format::ANCHOR_FILE)).unwrap(),
            anchor
        );
        // The new log starts with the finding and verifies on its own.
        let new = std::fs::read(&path).unwrap();
        let first = format::parse(format::lines(&new)[0].bytes).unwrap();
        assert!(
            matches!(&first.body, Body::Event(e) if e.event == format::NEW_LOG && e.detail.contains("anchor")),
            "{first:?}"
        );
        assert_eq!(first.seq, 0);
        let r = format::verify(&new, &key.verifying_key()).unwrap();
        assert_eq!(r.unsigned_tail, 0);
        // And the next start finds it in order.
        let log = AuditLog::open(dir.path(), AuditOptions::default()).unwrap();
        log.key_opened(key, "test");
        assert_eq!(log.finding(), None);
        log.shutdown();
    }

    #[test]
    fn an_untouched_log_passes_the_check_across_seals_and_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKey::from_bytes(&[1; 32]);
        for _ in 0..3 {
            let log = AuditLog::open(dir.path(), AuditOptions::default()).unwrap();
            log.key_opened(key.clone(), "test");
            log.request(entry("GetSecret", "a"), Durability::Written, None)
                .unwrap();
            log.key_closed("sealed by test");
            // Written while sealed: after the anchor, chained to it.
            log.request(entry("GetSecret", "a"), Durability::Written, None)
                .unwrap();
            log.key_opened(key.clone(), "test");
            assert_eq!(log.finding(), None);
            log.shutdown();
        }
        // A stranger's key never passes.
        let log = AuditLog::open(dir.path(), AuditOptions::default()).unwrap();
        log.key_opened(SigningKey::from_bytes(&[9; 32]), "test");
        assert!(log.finding().unwrap().contains("not signed by this vault"));
        log.shutdown();
    }

    #[test]
    fn an_anchor_that_lags_passes_and_a_missing_one_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKey::from_bytes(&[5; 32]);
        let anchor_path = dir.path().join(format::ANCHOR_FILE);
        let log = AuditLog::open(dir.path(), AuditOptions::default()).unwrap();
        // The first unseal anchors the head before it writes the first checkpoint: the anchor
        // a crash right after that checkpoint would leave.
        log.key_opened(key.clone(), "test");
        let records =
            format::lines(&std::fs::read(dir.path().join(format::LOG_FILE)).unwrap()).len();
        let first = std::fs::read(&anchor_path).unwrap();
        let a = Anchor::parse(&first).unwrap();
        assert_eq!(a.seq, u64::try_from(records).unwrap() - 1);
        log.request(entry("Rotate", "vault"), Durability::Synced, Some("admin"))
            .unwrap();
        log.shutdown();
        // What a crash before the later anchors were written leaves: an older anchor.
        let head = format::lines(&std::fs::read(dir.path().join(format::LOG_FILE)).unwrap())[0]
            .bytes
            .to_vec();
        let oldest = sign_anchor(&key, 0, &format::line_hash(&head), now(), None, None);
        std::fs::write(&anchor_path, serde_json::to_vec(&oldest).unwrap()).unwrap();
        let log = AuditLog::open(dir.path(), AuditOptions::default()).unwrap();
        log.key_opened(key.clone(), "test");
        assert_eq!(log.finding(), None);
        log.shutdown();
        // Removed: the log holds checkpoints, so that is a finding.
        std::fs::remove_file(&anchor_path).unwrap();
        let log = AuditLog::open(dir.path(), AuditOptions::default()).unwrap();
        log.key_opened(key, "test");
        assert!(log.finding().unwrap().contains("missing"));
        log.shutdown();
    }
}
