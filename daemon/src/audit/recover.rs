//! Opening the log: finding the chain's head at the end of the live file (or of the last
//! rolled one, after a roll-over cut short), noting damaged bytes after it, and the `resume`
//! record that declares them and continues the chain.
//!
//! Must not: repair, remove or overwrite damaged bytes (they are kept and declared), or start
//! a new chain over a file whose end holds no readable record when it is too large to be a
//! torn write.

use super::writer::{continued_from, open_live, rolled_name, rolled_number, rolled_path};
use super::*;

impl AuditLog {
    /// Open (or create) `audit.log` in `state_dir`, continue its chain, note any damage at its
    /// end, write a `start` event and start the background flusher.
    ///
    /// # Errors
    /// The file can't be opened or read, is not a regular file, or its end holds no readable
    /// record at all.
    pub fn open(state_dir: &Path, options: AuditOptions) -> Result<Arc<Self>, AuditError> {
        let path = state_dir.join(format::LOG_FILE);
        let pub_path = state_dir.join(format::PUBLIC_KEY_FILE);
        let shown = path.clone();
        let open_err = |source| AuditError::Open {
            path: shown.clone(),
            source,
        };
        let mut file = open_live(&path).map_err(open_err)?;
        let meta = file.metadata().map_err(open_err)?;
        if !meta.is_file() {
            return Err(AuditError::NotAFile { path });
        }
        if meta.permissions().mode() & 0o077 != 0 {
            file.set_permissions(std::fs::Permissions::from_mode(0o600))
                .map_err(open_err)?;
        }
        let end = meta.len();
        let rolled = format::set_in(state_dir)
            .map_err(open_err)?
            .iter()
            .filter_map(|p| rolled_number(p))
            .max()
            .unwrap_or(0);
        let mut head = read_head(&mut file, end).map_err(open_err)?;
        // A roll-over cut short after the rename (the new file empty, or holding only part of
        // its first record): the chain goes on from the last file.
        let mut continued = None;
        if matches!(head, Head::Empty | Head::NoRecord) && rolled > 0 && end <= TAIL_WINDOW {
            let last = rolled_path(state_dir, rolled);
            let mut f = File::open(&last).map_err(open_err)?;
            let len = f.metadata().map_err(open_err)?.len();
            if let Head::At { seq, prev, .. } = read_head(&mut f, len).map_err(open_err)? {
                head = Head::At {
                    seq,
                    prev,
                    good_end: 0,
                };
                continued = Some(rolled);
            }
        }
        let (seq, prev, damaged) = match head {
            Head::Empty => (0, format::GENESIS, None),
            Head::At {
                seq,
                prev,
                good_end,
            } => {
                let damaged = (good_end < end).then(|| {
                    (
                        good_end,
                        "found at start: the last write before was cut short (a crash?)".to_owned(),
                    )
                });
                (seq, prev, damaged)
            }
            Head::NoRecord => {
                if end > TAIL_WINDOW {
                    return Err(AuditError::Unreadable { path });
                }
                (
                    0,
                    format::GENESIS,
                    Some((
                        0,
                        "found at start: the log held no readable record".to_owned(),
                    )),
                )
            }
        };
        if let Some((at, why)) = &damaged {
            tracing::warn!(path = %path.display(), offset = at, bytes = end - at, "audit log: damaged bytes at its end are kept and noted: {why}");
        }
        let public_key = std::fs::read_to_string(&pub_path)
            .ok()
            .and_then(|t| format::decode_key(&t).ok())
            .map(|k| format::encode_key(&k));
        let found_end = damaged.as_ref().map_or(end, |(at, _)| *at);
        let log = Arc::new(Self {
            dir: state_dir.to_owned(),
            path,
            pub_path,
            anchor_path: state_dir.join(format::ANCHOR_FILE),
            options,
            file: RwLock::new(Arc::new(file)),
            writer: Mutex::new(Writer {
                seq,
                prev,
                end,
                last_line: None,
                damaged,
                key: None,
                next: None,
                since_checkpoint: 0,
                last_checkpoint: Instant::now(),
                rolled,
                found: Some((rolled, found_end)),
                counter_next: None,
                rolling: false,
                lost: None,
                buf: Vec::with_capacity(512),
            }),
            written: AtomicU64::new(0),
            synced: AtomicU64::new(0),
            sync_lock: Mutex::new(()),
            degraded: AtomicBool::new(false),
            degraded_full: AtomicBool::new(false),
            wake: Mutex::new(false),
            wake_cv: Condvar::new(),
            stop: AtomicBool::new(false),
            flusher: Mutex::new(None),
            public_key: Mutex::new(public_key),
            pending_anchor: Mutex::new(None),
            anchor_lock: Mutex::new(None),
            finding: Mutex::new(None),
            counter: std::sync::OnceLock::new(),
            hooks: std::sync::OnceLock::new(),
            outbox: Default::default(),
        });
        let hooks = HookThread::start(Arc::downgrade(&log)).map_err(open_err)?;
        let _ = log.hooks.set(hooks);
        if let Some(n) = continued {
            if let Err(e) = log.append(continued_from(n), Durability::Synced, None) {
                tracing::error!("audit log: cannot continue from {}: {e}", rolled_name(n));
            }
        }
        let start = Body::Event(EventRecord {
            event: "start".into(),
            detail: format!("keywardd {}", env!("CARGO_PKG_VERSION")),
        });
        // A full disk at start must not keep the daemon down: requests fail closed until the
        // log takes records again.
        if let Err(e) = log.append(start, Durability::Synced, None) {
            tracing::error!("audit log: cannot write the start record: {e}");
        }
        let flusher = {
            let log = Arc::clone(&log);
            std::thread::Builder::new()
                .name("audit-flush".into())
                .spawn(move || log.flush_loop())
                .map_err(open_err)?
        };
        *lock(&log.flusher) = Some(flusher);
        Ok(log)
    }

    /// Note the damaged bytes at the end of the file in a resume record that continues the
    /// chain from the last good record. The bytes stay.
    pub(super) fn resume(&self, w: &mut Writer) -> Result<(), AuditError> {
        let Some((from, why)) = w.damaged.clone() else {
            return Ok(());
        };
        let file = self.live();
        let len = file.metadata().map_err(AuditError::Write)?.len();
        if len <= from {
            // The failed write left nothing behind.
            w.end = len;
            w.damaged = None;
            return Ok(());
        }
        let mut bytes = vec![0u8; usize::try_from(len - from).unwrap_or(0)];
        file.read_exact_at(&mut bytes, from)
            .map_err(AuditError::Write)?;
        // The damaged bytes end with a newline of their own, or get one from us first.
        let terminated = bytes.last() == Some(&b'\n');
        if terminated {
            bytes.pop();
        } else {
            (&*file).write_all(b"\n").map_err(AuditError::Write)?;
        }
        let end = len + u64::from(!terminated);
        w.end = end;
        let body = Body::Resume(Resume {
            damaged_bytes: bytes.len() as u64,
            damaged_sha256: format::hex(&format::line_hash(&bytes)),
            reason: why.clone(),
        });
        w.damaged = None;
        match self.write_line(w, now(), body) {
            Ok(_) => {
                tracing::warn!(
                    offset = from,
                    bytes = bytes.len(),
                    "audit log: damaged bytes noted in a resume record"
                );
                Ok(())
            }
            Err(e) => {
                // Still damaged from the same place: the region now includes this attempt.
                w.damaged = Some((from, why));
                Err(e)
            }
        }
    }
}

/// Where the chain stands at the end of an existing file.
pub(super) enum Head {
    /// A new log.
    Empty,
    /// The last readable record: the next seq, its line's hash, and where its line ends.
    At {
        seq: u64,
        prev: [u8; 32],
        good_end: u64,
    },
    /// No readable record in the tail window.
    NoRecord,
}

/// Find the last readable, newline-terminated record in the last [`TAIL_WINDOW`] bytes. The
/// end of the file is read first ([`FIRST_WINDOW`]: a record is a few hundred bytes), the
/// whole window only when that holds no readable record: start-up reads what it needs of a
/// long log, not a MiB of it.
pub(super) fn read_head(file: &mut File, len: u64) -> io::Result<Head> {
    if len == 0 {
        return Ok(Head::Empty);
    }
    for window in [FIRST_WINDOW, TAIL_WINDOW] {
        let from = len.saturating_sub(window);
        file.seek(SeekFrom::Start(from))?;
        let mut tail = Vec::with_capacity(usize::try_from(len - from).unwrap_or(0));
        file.take(len - from).read_to_end(&mut tail)?;
        let lines = format::lines(&tail);
        // Mid-file, the window's first line is most likely cut: it can't be the head anyway
        // unless it is the only line, and then it is not readable.
        let skip = usize::from(from > 0);
        for line in lines.iter().skip(skip).rev() {
            if !line.complete {
                continue;
            }
            if let Ok(record) = format::parse(line.bytes) {
                return Ok(Head::At {
                    seq: record.seq.saturating_add(1),
                    prev: format::line_hash(line.bytes),
                    good_end: from + (line.start + line.bytes.len() + 1) as u64,
                });
            }
        }
        if from == 0 {
            break;
        }
    }
    Ok(Head::NoRecord)
}

/// How much of the log's end [`read_head`] reads first.
const FIRST_WINDOW: u64 = 64 << 10;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::test_support::*;
    use ed25519_dalek::SigningKey;

    #[test]
    fn a_log_that_is_written_verifies_and_continues_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKey::from_bytes(&[5; 32]);
        let public = key.verifying_key();
        let log = AuditLog::open(dir.path(), AuditOptions::default()).unwrap();
        log.request(entry("Status", "vault"), Durability::Written, None)
            .unwrap();
        log.key_opened(key.clone(), "test");
        for n in 0..3 {
            log.request(
                entry("GetSecret", &format!("s{n}")),
                Durability::Written,
                None,
            )
            .unwrap();
        }
        log.request(entry("Rotate", "vault"), Durability::Synced, Some("admin"))
            .unwrap();
        log.shutdown();
        let r = verify(dir.path(), &public);
        // start, Status, checkpoint, 3 reads, Rotate, checkpoint, stop, checkpoint
        assert_eq!((r.records, r.checkpoints, r.unsigned_tail), (10, 3, 0));
        let pem = std::fs::read_to_string(dir.path().join(format::PUBLIC_KEY_FILE)).unwrap();
        assert_eq!(format::decode_key(&pem).unwrap(), public);

        let log = AuditLog::open(dir.path(), AuditOptions::default()).unwrap();
        assert_eq!(log.public_key(), Some(format::encode_key(&public)));
        log.key_opened(key, "test");
        log.shutdown();
        let r = verify(dir.path(), &public);
        assert_eq!(r.records, 14);
        assert!(r.damage.is_empty());
    }

    #[test]
    fn a_torn_last_line_is_kept_and_noted_and_the_chain_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKey::from_bytes(&[6; 32]);
        let log = AuditLog::open(dir.path(), AuditOptions::default()).unwrap();
        log.key_opened(key.clone(), "test");
        log.request(entry("GetSecret", "a"), Durability::Synced, None)
            .unwrap();
        log.shutdown();
        let path = dir.path().join(format::LOG_FILE);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(br#"{"seq":6,"time":"2025-"#).unwrap();
        drop(f);
        let before = std::fs::read(&path).unwrap();

        let log = AuditLog::open(dir.path(), AuditOptions::default()).unwrap();
        log.key_opened(key.clone(), "test");
        log.shutdown();
        let after = std::fs::read(&path).unwrap();
        assert!(after.starts_with(&before), "history is never rewritten");
        let r = verify(dir.path(), &key.verifying_key());
        assert_eq!(r.damage.len(), 1);
        assert_eq!(r.damage[0].bytes, 22);
    }

    #[test]
    fn a_log_with_no_readable_tail_refuses_when_large_and_restarts_when_small() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(format::LOG_FILE);
        std::fs::write(&path, b"garbage\nmore garbage\n").unwrap();
        let log = AuditLog::open(dir.path(), AuditOptions::default()).unwrap();
        let key = SigningKey::from_bytes(&[7; 32]);
        log.key_opened(key.clone(), "test");
        log.shutdown();
        let r = verify(dir.path(), &key.verifying_key());
        assert_eq!(r.damage[0].bytes, 20);
        std::fs::write(&path, vec![b'x'; (TAIL_WINDOW + 10) as usize]).unwrap();
        assert!(matches!(
            AuditLog::open(dir.path(), AuditOptions::default()),
            Err(AuditError::Unreadable { .. })
        ));
    }

    #[test]
    fn the_head_is_found_past_the_first_window_of_damage() {
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKey::from_bytes(&[6; 32]);
        let log = AuditLog::open(dir.path(), AuditOptions::default()).unwrap();
        log.key_opened(key.clone(), "test");
        log.shutdown();
        let path = dir.path().join(format::LOG_FILE);
        let before = std::fs::read(&path).unwrap();
        // More damaged bytes (no newline) than the first window: the head is still found.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&vec![b'x'; usize::try_from(FIRST_WINDOW).unwrap() + 100])
            .unwrap();
        drop(f);
        let log = AuditLog::open(dir.path(), AuditOptions::default()).unwrap();
        log.key_opened(key.clone(), "test");
        assert_eq!(log.finding(), None);
        log.shutdown();
        let r = verify(dir.path(), &key.verifying_key());
        assert_eq!(r.damage.len(), 1);
        assert_eq!(r.damage[0].bytes, FIRST_WINDOW + 100);
        assert!(std::fs::read(&path).unwrap().starts_with(&before));
    }

    #[test]
    fn a_symlink_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join(format::LOG_FILE)).unwrap();
        assert!(matches!(
            AuditLog::open(dir.path(), AuditOptions::default()),
            Err(AuditError::Open { .. })
        ));
    }

    #[test]
    fn a_roll_over_cut_short_goes_on_from_the_last_file() {
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKey::from_bytes(&[6; 32]);
        let log = AuditLog::open(dir.path(), AuditOptions::default()).unwrap();
        log.key_opened(key.clone(), "test");
        log.shutdown();
        // Renamed, and the new file got only part of its first record before the crash.
        let live = dir.path().join(format::LOG_FILE);
        std::fs::rename(&live, rolled_path(dir.path(), 1)).unwrap();
        std::fs::write(&live, br#"{"seq":5,"time":"20"#).unwrap();
        let log = AuditLog::open(dir.path(), AuditOptions::default()).unwrap();
        log.key_opened(key.clone(), "test");
        log.shutdown();
        let r = format::verify(&whole_set(dir.path()), &key.verifying_key()).unwrap();
        assert_eq!(r.damage.len(), 1);
        assert_eq!(log.finding(), None);
    }
}
