//! Appending to the log: the chain's head ([`Writer`]), one record at a time serialised,
//! hash-chained and written with one `write(2)`; rolling `audit.log` over to `audit.log.N` at
//! its size limit; and the file helpers the other parts share (opening the live file,
//! replacing a small file durably, naming the rolled files).
//!
//! Must not: move the head unless the whole line was written, truncate or rewrite bytes
//! already in a file, or wait for the disk here except where a roll-over must (the sync
//! policy is [`super::flusher`]'s and the callers').

use super::lost::count_lost;
use super::*;

/// A line's time and body, serialised: everything of a record but its place in the chain.
pub(super) struct Prepared {
    time: String,
    /// The body's JSON object (`{"kind":…}`), whose fields the line takes in.
    body: Vec<u8>,
    checkpoint: bool,
}

impl Prepared {
    pub(super) fn new(time: String, body: &Body) -> Result<Self, AuditError> {
        let json = serde_json::to_vec(body).map_err(|e| AuditError::Write(io::Error::other(e)))?;
        if json.len() < 2 || json.first() != Some(&b'{') || json.last() != Some(&b'}') {
            return Err(AuditError::Write(io::Error::other(
                "an audit record body is not a JSON object",
            )));
        }
        Ok(Self {
            time,
            body: json,
            checkpoint: matches!(body, Body::Checkpoint(_)),
        })
    }

    /// The line, as `serde_json` writes the [`Record`] (its body flattened), into `out`.
    fn render(
        &self,
        seq: u64,
        lost: Option<&Lost>,
        prev: &str,
        out: &mut Vec<u8>,
    ) -> Result<(), AuditError> {
        let json = |e: serde_json::Error| AuditError::Write(io::Error::other(e));
        out.clear();
        out.extend_from_slice(b"{\"seq\":");
        out.extend_from_slice(seq.to_string().as_bytes());
        out.extend_from_slice(b",\"time\":");
        serde_json::to_writer(&mut *out, &self.time).map_err(json)?;
        out.push(b',');
        out.extend_from_slice(&self.body[1..self.body.len() - 1]);
        if let Some(lost) = lost {
            out.extend_from_slice(b",\"lost\":");
            serde_json::to_writer(&mut *out, lost).map_err(json)?;
        }
        out.extend_from_slice(b",\"prev\":");
        serde_json::to_writer(&mut *out, prev).map_err(json)?;
        out.push(b'}');
        Ok(())
    }
}

impl AuditLog {
    pub(super) fn live(&self) -> Arc<File> {
        Arc::clone(
            &self
                .file
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    pub(super) fn set_live(&self, file: File) {
        *self
            .file
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(file);
    }

    pub(super) fn append(
        &self,
        body: Body,
        durability: Durability,
        checkpoint: Option<&str>,
    ) -> Result<u64, AuditError> {
        self.append_as(body, durability, checkpoint, false)
    }

    /// [`AuditLog::append`]; with `lossy`, a record that can't be written is counted as lost
    /// (under the writer's lock, so the next record written declares it).
    pub(super) fn append_as(
        &self,
        body: Body,
        durability: Durability,
        checkpoint: Option<&str>,
        lossy: bool,
    ) -> Result<u64, AuditError> {
        if self.degraded.load(Ordering::Acquire) {
            let e = AuditError::Degraded {
                storage_full: self.degraded_full.load(Ordering::Acquire),
            };
            if lossy {
                count_lost(&mut lock(&self.writer), &e);
            }
            return Err(e);
        }
        // The bulk of the line, made before the lock: concurrent requests wait for each
        // other only for the chain's part (seq, hash, the write).
        let line = Prepared::new(now(), &body)?;
        let (seq, number) = {
            let mut w = lock(&self.writer);
            let seq = match self.write(&mut w, line) {
                Ok(seq) => seq,
                Err(e) => {
                    if lossy {
                        count_lost(&mut w, &e);
                    }
                    return Err(e);
                }
            };
            let mut number = self.written.fetch_add(1, Ordering::AcqRel) + 1;
            let due = w.since_checkpoint >= CHECKPOINT_EVERY
                || w.last_checkpoint.elapsed() >= CHECKPOINT_INTERVAL;
            match checkpoint {
                Some(reason) => number = self.checkpoint(&mut w, reason)?.unwrap_or(number),
                None if due => {
                    // A periodic checkpoint that fails costs this record nothing: it is written.
                    if let Ok(Some(n)) = self.checkpoint(&mut w, "periodic") {
                        number = n;
                    }
                }
                None => {}
            }
            (seq, number)
        };
        if durability == Durability::Synced {
            self.sync_through(number)?;
        }
        Ok(seq)
    }

    /// Write one record (after a resume record if damage is pending) and advance the head.
    pub(super) fn write(&self, w: &mut Writer, line: Prepared) -> Result<u64, AuditError> {
        if w.damaged.is_some() {
            self.resume(w)?;
        }
        self.write_prepared(w, line)
    }

    /// Serialise and write one line at the end; the head moves only if all of it was written.
    pub(super) fn write_line(
        &self,
        w: &mut Writer,
        time: String,
        body: Body,
    ) -> Result<u64, AuditError> {
        let line = Prepared::new(time, &body)?;
        self.write_prepared(w, line)
    }

    /// [`AuditLog::write_line`] of a body serialised already.
    fn write_prepared(&self, w: &mut Writer, line: Prepared) -> Result<u64, AuditError> {
        // A checkpoint's signature would not cover a declaration: the next record carries it.
        let lost = if line.checkpoint {
            None
        } else {
            w.lost.clone()
        };
        let declares = lost.is_some();
        let prev = format::hex(&w.prev);
        line.render(w.seq, lost.as_ref(), &prev, &mut w.buf)?;
        let hash = format::line_hash(&w.buf);
        w.buf.push(b'\n');
        if let Err(e) = (&*self.live()).write_all(&w.buf) {
            // Part of the line may be in the file: the next write notes it first.
            w.damaged = Some((w.end, format!("a write failed: {e}")));
            return Err(AuditError::Write(e));
        }
        w.last_line = Some(w.end);
        w.end += w.buf.len() as u64;
        w.prev = hash;
        w.since_checkpoint += 1;
        if declares {
            if let Some(l) = w.lost.take() {
                tracing::warn!(
                    seq = w.seq,
                    records = l.records,
                    "audit log: writes again; the record at this seq declares the lost records"
                );
            }
        }
        let seq = w.seq;
        w.seq += 1;
        if w.end >= self.options.max_file_bytes && !w.rolling {
            w.rolling = true;
            if let Err(e) = self.roll_over(w) {
                tracing::error!("audit log: {e}; writing on to {}", self.path.display());
            }
            w.rolling = false;
        }
        Ok(seq)
    }

    /// Sign the full file (if the vault is open), rename it to the next `audit.log.N`, and
    /// start `audit.log` with a record that carries the chain on.
    pub(super) fn roll_over(&self, w: &mut Writer) -> Result<(), AuditError> {
        // A file that ends with a checkpoint verifies on its own.
        if w.since_checkpoint > 0 {
            self.checkpoint(w, "roll-over")?;
        }
        let old = self.live();
        old.sync_data().map_err(AuditError::Sync)?;
        let n = w.rolled + 1;
        let to = rolled_path(&self.dir, n);
        if to.exists() {
            return Err(AuditError::Files(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists", to.display()),
            )));
        }
        std::fs::rename(&self.path, &to).map_err(AuditError::Files)?;
        let new = match open_live(&self.path).and_then(|f| sync_dir(&self.dir).map(|()| f)) {
            Ok(f) => f,
            Err(e) => {
                // Back as it was: the open handle still writes to the renamed file.
                let _ = std::fs::rename(&to, &self.path);
                return Err(AuditError::Files(e));
            }
        };
        self.set_live(new);
        w.rolled = n;
        w.end = 0;
        self.write_line(w, now(), continued_from(n))?;
        self.written.fetch_add(1, Ordering::AcqRel);
        tracing::info!(to = %to.display(), "audit log: rolled over");
        Ok(())
    }
}

/// The head of the chain and what is needed to extend it. One writer at a time (the mutex).
pub(super) struct Writer {
    /// The next record's seq.
    pub(super) seq: u64,
    /// Hash of the last record's line.
    pub(super) prev: [u8; 32],
    /// File length as written by us.
    pub(super) end: u64,
    /// Where the last line this run wrote starts in the live file (an anchor's offset).
    pub(super) last_line: Option<u64>,
    /// Bytes from this offset to the end of the file are damaged: a resume record must come
    /// before the next record. With why.
    pub(super) damaged: Option<(u64, String)>,
    /// The audit signing key, while the vault is open.
    pub(super) key: Option<SigningKey>,
    /// The key a rekey is handing the log over to.
    pub(super) next: Option<VerifyingKey>,
    pub(super) since_checkpoint: u64,
    pub(super) last_checkpoint: Instant,
    /// The highest N of the `audit.log.N` files.
    pub(super) rolled: u64,
    /// The log as found at start, until it has been checked against the anchor: the highest
    /// N then, and where the last good record of the live file ended.
    pub(super) found: Option<(u64, u64)>,
    /// The TPM counter value the next anchor carries (with a counter, once it has been read).
    pub(super) counter_next: Option<u64>,
    /// True while rolling over (its own records must not roll it over again).
    pub(super) rolling: bool,
    /// `Status` records answered without being written, until a record declares them.
    pub(super) lost: Option<Lost>,
    /// Reused for every line: no allocation per record once warm.
    pub(super) buf: Vec<u8>,
}

/// Open (or create) the live file for appending.
pub(super) fn open_live(path: &Path) -> io::Result<File> {
    // O_APPEND: every write lands at the end, whoever else has the file open.
    // O_NOFOLLOW: a symlink planted in the state dir is refused, not followed.
    OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .open(path)
}

pub(super) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir).and_then(|d| d.sync_all())
}

/// Replace `path` with `bytes` (mode `mode`), atomically and durably.
pub(super) fn replace_file(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    match path.parent() {
        Some(dir) => sync_dir(dir),
        None => Ok(()),
    }
}

pub(super) fn rolled_name(n: u64) -> String {
    format!("{}.{n}", format::LOG_FILE)
}

pub(super) fn rolled_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(rolled_name(n))
}

/// N of an `audit.log.N` path.
pub(super) fn rolled_number(path: &Path) -> Option<u64> {
    path.file_name()?
        .to_str()?
        .strip_prefix(format::LOG_FILE)?
        .strip_prefix('.')?
        .parse()
        .ok()
}

/// The first record of a file the log rolled over to from `audit.log.N`.
pub(super) fn continued_from(n: u64) -> Body {
    Body::Event(EventRecord {
        event: format::CONTINUED.into(),
        detail: format!("from {}", rolled_name(n)),
    })
}

/// The seq of a file's first record, if it has a readable one.
pub(super) fn first_seq(path: &Path) -> io::Result<Option<u64>> {
    let mut head = Vec::new();
    File::open(path)?.take(64 * 1024).read_to_end(&mut head)?;
    Ok(format::lines(&head)
        .first()
        .filter(|l| l.complete)
        .and_then(|l| format::parse(l.bytes).ok())
        .map(|r| r.seq))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::test_support::*;
    use ed25519_dalek::SigningKey;

    /// A line made from a body serialised before the lock is, byte for byte, what
    /// `serde_json` makes of the whole record: with and without a declaration of lost records,
    /// for a request and an event, and with characters that JSON escapes.
    #[test]
    fn a_prepared_line_is_the_record_as_serde_writes_it() {
        let lost = Lost {
            records: 3,
            first: "2026-01-01T00:00:00.000Z".into(),
            last: "2026-01-01T00:00:01.000Z".into(),
            reason: "disk \"full\"\n".into(),
        };
        let bodies = [
            entry("GetSecret", "app/\"db\"\u{1}é").into_body(),
            Body::Event(EventRecord {
                event: "start".into(),
                detail: "a\tb".into(),
            }),
        ];
        for body in bodies {
            for lost in [None, Some(lost.clone())] {
                let record = Record {
                    seq: 42,
                    time: "2026-12-05T01:02:03.456Z".into(),
                    body: body.clone(),
                    lost: lost.clone(),
                    prev: "ab".repeat(32),
                };
                let mut out = Vec::new();
                Prepared::new(record.time.clone(), &body)
                    .unwrap()
                    .render(42, lost.as_ref(), &record.prev, &mut out)
                    .unwrap();
                assert_eq!(
                    String::from_utf8(out).unwrap(),
                    serde_json::to_string(&record).unwrap()
                );
            }
        }
    }

    #[test]
    fn the_log_rolls_over_and_the_set_verifies_as_one_chain() {
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKey::from_bytes(&[3; 32]);
        let small = AuditOptions {
            max_file_bytes: 4096,
        };
        let log = AuditLog::open(dir.path(), small).unwrap();
        log.key_opened(key.clone(), "test");
        for n in 0..60 {
            log.request(
                entry("GetSecret", &format!("s{n}")),
                Durability::Written,
                None,
            )
            .unwrap();
        }
        log.shutdown();
        // Reopened: it finds the numbering and goes on.
        let log = AuditLog::open(dir.path(), small).unwrap();
        log.key_opened(key.clone(), "test");
        for _ in 0..30 {
            log.request(entry("Status", "vault"), Durability::Written, None)
                .unwrap();
        }
        log.shutdown();
        let set = format::set_in(dir.path()).unwrap();
        assert!(set.len() >= 4, "{set:?}");
        for f in &set {
            assert!(std::fs::metadata(f).unwrap().len() < 4096 + 1024, "{f:?}");
        }
        let r = format::verify(&whole_set(dir.path()), &key.verifying_key()).unwrap();
        assert_eq!(r.unsigned_tail, 0);
        assert_eq!(log.finding(), None);
        // Each rolled file ends signed and verifies from where it starts.
        let second = std::fs::read(&set[1]).unwrap();
        let r = format::verify(&second, &key.verifying_key()).unwrap();
        assert!(r.first_seq > 0);
        assert_eq!(r.unsigned_tail, 0);
    }

    #[test]
    fn long_targets_are_cut() {
        let e = entry("GetSecret", &"é".repeat(400));
        assert!(e.target.len() <= MAX_FIELD + 3);
        assert!(e.target.ends_with("..."));
    }
}
