//! The audit log: every request the service sees — who, what, which target, the result, when;
//! never a secret value, PIN, share or digest — appended to `audit.log` in the state directory,
//! hash-chained and signed at checkpoints. The format and its verification live in
//! [`keyward_proto::audit`], shared with `keyward audit verify|tail`; this module only writes.
//!
//! **Fail closed.** A record that can't be written fails its request. A mutation (a write or
//! an admin verb) writes a `started` record and makes it durable *before* it runs, and its
//! outcome record before the reply: a change the log cannot show is never made, and one whose
//! outcome could not be written is not acknowledged (the caller gets `AuditUnavailable`; the
//! `started` record shows the attempt). Reads write one record after they run and before the
//! reply. A record that can't be written because the state directory's file system is full
//! (`ENOSPC`, `EDQUOT`) fails its request with `StorageFull` instead: the admin's to fix.
//!
//! **Declared losses.** One exception: `Status` (read-only, nothing secret, and how an admin
//! finds out what is wrong) is answered even when its record can't be written
//! ([`AuditLog::request_or_declare_lost`]). The loss is counted, and the next record that does
//! get written carries it (`lost`: how many, first and last time, why), so the gap is declared
//! in the chain, never silent. A count still pending at exit is only in the daemon's log.
//!
//! **Durability.** Every change that reaches the disk has a durable `started` record. Admin
//! verbs also `fdatasync` their outcome (with a checkpoint) before the reply; a secret's put or
//! delete leaves its outcome line to the group sync below (its commit in the store shows what
//! happened), which saves one `fdatasync` per write. Refusals and reads (`GetSecret`,
//! `Sign`, `PublicKey`, `List*`, `SecretVersions`, `Status`, credential deliveries): the record
//! is in the file (`write(2)` returned) before the reply, so a daemon crash loses nothing; a
//! background flusher makes it durable within [`SYNC_INTERVAL`] (plus the `fdatasync`'s own
//! time). So a power loss can lose the records of reads answered in the last 50 ms or so — the
//! window that keeps the audit from capping read throughput. The window is time, not a count
//! of records: syncing more often under load makes every append wait behind the flush of the
//! page it lands on. If a background sync fails, every request fails until one succeeds.
//!
//! **Checkpoints** are signed with the vault's audit key ([`crate::vault::audit_key`]), which
//! exists only while the vault is open: at unseal, at seal, at stop, after every admin call,
//! and every [`CHECKPOINT_EVERY`] records or [`CHECKPOINT_INTERVAL`] while unsealed. Records
//! written while sealed are chained and covered by the next checkpoint. A rekey hands the log
//! over to the new key with a checkpoint of the old key that names it. `audit.pub` beside the
//! log holds the current key (PEM); `Status` shows it.
//!
//! **Anchor.** Each checkpoint also yields an anchor (its seq and the hash of its line, signed
//! with the same key; [`keyward_proto::audit::Anchor`]), kept in `audit.anchor` once the checkpoint is
//! on disk, and copied to the daemon's log (the journal under systemd) as an event of target
//! `keyward::audit::checkpoint`: a second witness off the state directory. When the vault opens
//! (the key exists only then) the log is checked against the anchor: the anchored checkpoint
//! must be there, unchanged, and every record after it must follow in an unbroken chain. If it
//! does not — the log was cut short, or rewritten from an earlier checkpoint on, or the anchor
//! is gone while the log holds checkpoints — the daemon does not sign over it: the old files
//! and anchor are moved, untouched, into an `audit-set-aside-TIME` directory, a new log starts
//! whose first record (`new-log`) says what was found, and `Status` and `STATUS=` say so until
//! the daemon restarts. Records written after the last checkpoint (while sealed) are covered by
//! the chain only. With a TPM configured for it ([`AuditLog::set_counter`]) every anchor also
//! carries the value of a TPM NV counter, incremented once the anchor is on disk: an anchor put
//! back (with the log it matches) after a newer one was written is older than the counter, and
//! that is a finding too. Without one, a rollback of the log and the anchor together to an
//! older pair is not detectable here (the journal copy, or an anchor kept elsewhere, is the
//! witness then).
//!
//! **Files.** When `audit.log` passes [`AuditOptions::max_file_bytes`] it is signed (if the
//! vault is open), renamed to `audit.log.N` (the next number) and a new `audit.log` starts with
//! a `continued` record that carries the seq and the chain on. Nothing is ever deleted.
//!
//! **Damage.** At start the daemon continues the chain from the last readable record. Bytes
//! after it (a line torn by a crash) are kept as they are, never repaired or removed: a
//! `resume` record gives their length and hash and continues the chain, and `verify` reports
//! them. The same happens after a write that failed halfway (a full disk). If the last MiB of
//! the log holds no readable record at all, the daemon refuses to start: that is not a torn
//! write, and someone should look before a new chain is started.
//!
//! Must not: write anything a client sent as a value (only names, capped in length), or call
//! into the vault (the vault calls in here under its own lock).

use std::fs::{File, OpenOptions};
use std::io::{self, Read as _, Seek as _, SeekFrom, Write as _};
use std::os::unix::fs::{
    DirBuilderExt as _, FileExt as _, OpenOptionsExt as _, PermissionsExt as _,
};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant, SystemTime};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use keyward_proto::audit::{
    self as format, Anchor, Body, CallerRecord, CheckedAnchor, Checkpoint, EventRecord, Expect,
    Lost, Record, RequestRecord, Resume,
};

use crate::device::DeviceHandle;
use crate::identity::{Caller, Via};
use crate::vault::audit_key::AuditKeys;

/// How long a read's record may wait for `fdatasync`.
pub const SYNC_INTERVAL: Duration = Duration::from_millis(50);
/// Records between periodic checkpoints while unsealed.
pub const CHECKPOINT_EVERY: u64 = 1024;
/// Longest time between a record and a checkpoint covering it while unsealed.
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(30);
/// How much of the log's end is read at start to find the chain's head.
const TAIL_WINDOW: u64 = 1 << 20;
/// The default size at which `audit.log` rolls over.
pub const DEFAULT_MAX_FILE_BYTES: u64 = 16 << 20;

/// How the log is kept.
#[derive(Clone, Copy, Debug)]
pub struct AuditOptions {
    /// `audit.log` rolls over to `audit.log.N` once it is this long.
    pub max_file_bytes: u64,
}

impl Default for AuditOptions {
    fn default() -> Self {
        Self {
            max_file_bytes: DEFAULT_MAX_FILE_BYTES,
        }
    }
}

/// The tracing target of the checkpoints' copy (the journal, under systemd).
pub const CHECKPOINT_TARGET: &str = "keyward::audit::checkpoint";

/// Longest target or detail written (names are shorter; this bounds what a client can make
/// the log hold).
const MAX_FIELD: usize = 512;

/// Why the audit log can't be opened or written.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot open {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("{path} is not a regular file")]
    NotAFile { path: PathBuf },
    #[error("{path}: its last {TAIL_WINDOW} bytes hold no readable record (not a torn write): inspect it, and move it aside to start a new log")]
    Unreadable { path: PathBuf },
    #[error("cannot write the audit log: {0}")]
    Write(io::Error),
    #[error("cannot sync the audit log: {0}")]
    Sync(io::Error),
    #[error("the audit log failed to reach the disk and has not recovered{}", if *.storage_full { " (its file system is full)" } else { "" })]
    Degraded { storage_full: bool },
    #[error("cannot write {path}: {source}")]
    PublicKey { path: PathBuf, source: io::Error },
    #[error("cannot roll the log over or start a new one: {0}")]
    Files(io::Error),
    /// The thread that syncs read records and writes periodic checkpoints has stopped.
    #[error("the audit log's background flusher has stopped")]
    FlusherStopped,
}

/// Whether `e` says the file system is full: no space (`ENOSPC`) or the quota (`EDQUOT`).
pub fn no_space(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    )
}

impl AuditError {
    /// Whether it failed because the state directory's file system is full.
    pub fn storage_full(&self) -> bool {
        match self {
            Self::Open { source, .. } | Self::PublicKey { source, .. } => no_space(source),
            Self::Write(e) | Self::Sync(e) | Self::Files(e) => no_space(e),
            Self::Degraded { storage_full } => *storage_full,
            Self::NotAFile { .. } | Self::Unreadable { .. } | Self::FlusherStopped => false,
        }
    }
}

/// When a record must be on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// In the file before the reply; on disk within [`SYNC_INTERVAL`].
    Written,
    /// On disk (`fdatasync`) before the reply.
    Synced,
}

/// A request's record, before it gets its place in the chain.
#[derive(Clone, Debug)]
pub struct Entry {
    pub caller: CallerRecord,
    pub op: &'static str,
    pub target: String,
    pub result: String,
    pub intent: Option<u64>,
    pub detail: Option<String>,
}

impl Entry {
    /// A record of `op` on `target` by `caller` with `result`. Long names are cut.
    pub fn new(caller: &Caller, op: &'static str, target: &str, result: &str) -> Self {
        Self {
            caller: caller_record(caller),
            op,
            target: capped(target),
            result: result.to_owned(),
            intent: None,
            detail: None,
        }
    }

    fn into_body(self) -> Body {
        Body::Request(RequestRecord {
            caller: self.caller,
            op: self.op.to_owned(),
            target: self.target,
            result: self.result,
            intent: self.intent,
            detail: self.detail,
        })
    }
}

/// The caller as the log shows it.
pub fn caller_record(c: &Caller) -> CallerRecord {
    CallerRecord {
        uid: c.uid,
        gid: c.gid,
        pid: c.pid,
        unit: c.unit.clone(),
        via: match c.via {
            Via::Varlink => "varlink",
            Via::Dbus => "dbus",
            Via::Credentials => "credentials",
            Via::Daemon => "daemon",
        }
        .to_owned(),
    }
}

fn capped(s: &str) -> String {
    if s.len() <= MAX_FIELD {
        return s.to_owned();
    }
    let mut end = MAX_FIELD;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

/// The head of the chain and what is needed to extend it. One writer at a time (the mutex).
struct Writer {
    /// The next record's seq.
    seq: u64,
    /// Hash of the last record's line.
    prev: [u8; 32],
    /// File length as written by us.
    end: u64,
    /// Bytes from this offset to the end of the file are damaged: a resume record must come
    /// before the next record. With why.
    damaged: Option<(u64, String)>,
    /// The audit signing key, while the vault is open.
    key: Option<SigningKey>,
    /// The key a rekey is handing the log over to.
    next: Option<VerifyingKey>,
    since_checkpoint: u64,
    last_checkpoint: Instant,
    /// The highest N of the `audit.log.N` files.
    rolled: u64,
    /// The log as found at start, until it has been checked against the anchor: the highest
    /// N then, and where the last good record of the live file ended.
    found: Option<(u64, u64)>,
    /// The TPM counter value the next anchor carries (with a counter, once it has been read).
    counter_next: Option<u64>,
    /// True while rolling over (its own records must not roll it over again).
    rolling: bool,
    /// `Status` records answered without being written, until a record declares them.
    lost: Option<Lost>,
    /// Reused for every line: no allocation per record once warm.
    buf: Vec<u8>,
}

/// The audit log. Cheap to call from async code on the read path: one short mutex hold for
/// `write(2)`, no thread hop.
pub struct AuditLog {
    dir: PathBuf,
    path: PathBuf,
    pub_path: PathBuf,
    anchor_path: PathBuf,
    options: AuditOptions,
    /// The live file. Replaced only with the writer locked (roll-over, new log); read for
    /// writes under the writer lock and for syncs.
    file: RwLock<Arc<File>>,
    writer: Mutex<Writer>,
    /// Records written, ever (this run). A record's number is the value after its write.
    written: AtomicU64,
    /// Records known durable; only changed under `sync_lock`.
    synced: AtomicU64,
    sync_lock: Mutex<()>,
    /// Set when a background sync failed; cleared when one succeeds.
    degraded: AtomicBool,
    /// Whether that failure was a full file system.
    degraded_full: AtomicBool,
    /// The flusher's wake-up: `true` when woken early.
    wake: Mutex<bool>,
    wake_cv: Condvar,
    stop: AtomicBool,
    flusher: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// The current public key (base64 SPKI), for `Status`.
    public_key: Mutex<Option<String>>,
    /// The newest checkpoint's anchor and its record number, until it is on disk and written
    /// to `audit.anchor`.
    pending_anchor: Mutex<Option<(u64, Anchor)>>,
    /// Held while `audit.anchor` is replaced; the seq of the one there.
    anchor_lock: Mutex<Option<u64>>,
    /// What the check against the anchor found this run, for `Status` and `STATUS=`.
    finding: Mutex<Option<String>>,
    /// The TPM counter anchors are bound to, if one is configured.
    counter: std::sync::OnceLock<TpmCounter>,
}

/// A TPM NV counter on a device actor, reached from code that is not async.
struct TpmCounter {
    device: DeviceHandle,
    index: u32,
    /// For calls from threads outside the runtime (the flusher).
    runtime: tokio::runtime::Handle,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding it leaves a consistent head: the writer updates it only after
    // a complete write.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn now() -> String {
    format::rfc3339_millis(SystemTime::now())
}

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
        });
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

    /// The path of the log.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The current signing key (base64 DER SPKI), if the log has had one.
    pub fn public_key(&self) -> Option<String> {
        lock(&self.public_key).clone()
    }

    /// What the check against the anchor found this run, if the log did not match it.
    pub fn finding(&self) -> Option<String> {
        lock(&self.finding).clone()
    }

    /// Bind the anchors to the NV counter at `index` on the TPM `device` (once, before the
    /// first unseal, from inside the runtime).
    ///
    /// # Errors
    /// Called outside a Tokio runtime.
    pub fn set_counter(&self, device: DeviceHandle, index: u32) -> Result<(), String> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|e| e.to_string())?;
        let _ = self.counter.set(TpmCounter {
            device,
            index,
            runtime,
        });
        Ok(())
    }

    /// The TPM counter, incremented first if `increment`; `None` when none is configured.
    /// Blocks the calling thread (at most the device timeout): the hooks and the flusher are
    /// not async, and this happens once per anchor.
    fn tpm_counter(&self, increment: bool) -> Option<Result<hsm_shim::Counter, String>> {
        let c = self.counter.get()?;
        let (device, index) = (c.device.clone(), c.index);
        let call = async move { device.call(move |d| d.counter(index, increment)).await };
        let result = match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(|| h.block_on(call))
            }
            Ok(_) => {
                return Some(Err(
                    "the TPM counter can't be reached from a current-thread runtime".into(),
                ))
            }
            Err(_) => c.runtime.block_on(call),
        };
        Some(result.map_err(|e| e.to_string()))
    }

    /// Increment the TPM counter until it reaches `value` (the counter of an anchor now on
    /// disk). Several anchors may have been written since the last increment.
    fn counter_up_to(&self, value: u64) {
        for _ in 0..64 {
            match self.tpm_counter(true) {
                None => return,
                Some(Ok(c)) if c.value >= value => return,
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    tracing::error!("audit log: cannot increment the TPM counter: {e}");
                    return;
                }
            }
        }
        tracing::error!("audit log: the TPM counter did not reach {value}");
    }

    /// Check the TPM counter against the anchor's and set the counter the next anchor carries.
    /// `Err` is the finding.
    fn check_counter(&self, w: &mut Writer, anchor: Option<&CheckedAnchor>) -> Result<(), String> {
        let anchored = anchor.and_then(|a| a.counter);
        let Some(read) = self.tpm_counter(false) else {
            return Ok(());
        };
        let tpm = match read {
            Ok(c) => c,
            Err(e) => {
                // A TPM that is away must not stop the log; the check waits for the next start.
                tracing::error!("audit log: cannot read the TPM counter ({e}): the anchor is not checked against it");
                w.counter_next = anchored.map(|c| c + 1);
                return Ok(());
            }
        };
        w.counter_next = Some(anchored.unwrap_or(0).max(tpm.value) + 1);
        match (anchor, anchored) {
            (Some(_), Some(a)) if a < tpm.value => Err(format!(
                "{} is older than the TPM counter (anchor counter {a}, TPM counter {}): the log and its anchor were rolled back",
                format::ANCHOR_FILE,
                tpm.value
            )),
            (Some(_), None) if !tpm.created => Err(format!(
                "{} carries no TPM counter, but the TPM counter exists: an older anchor was put back",
                format::ANCHOR_FILE
            )),
            (_, Some(a)) => {
                // Written, but the daemon stopped before the increment.
                self.counter_up_to(a);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn live(&self) -> Arc<File> {
        Arc::clone(
            &self
                .file
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    fn set_live(&self, file: File) {
        *self
            .file
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(file);
    }

    /// Append a request record with `durability`, then a checkpoint (`checkpoint` is its
    /// reason) if the vault is open. Returns the record's seq.
    ///
    /// # Errors
    /// The record could not be written (or synced, for [`Durability::Synced`]).
    pub fn request(
        &self,
        entry: Entry,
        durability: Durability,
        checkpoint: Option<&str>,
    ) -> Result<u64, AuditError> {
        self.append(entry.into_body(), durability, checkpoint)
    }

    /// [`AuditLog::request`] from async code: a synced record waits for the disk on a
    /// blocking thread; a written one costs no thread hop.
    ///
    /// # Errors
    /// As [`AuditLog::request`].
    pub async fn request_async(
        self: &Arc<Self>,
        entry: Entry,
        durability: Durability,
        checkpoint: Option<&'static str>,
    ) -> Result<u64, AuditError> {
        match durability {
            Durability::Written => self.request(entry, durability, checkpoint),
            Durability::Synced => {
                let log = Arc::clone(self);
                tokio::task::spawn_blocking(move || log.request(entry, durability, checkpoint))
                    .await
                    .map_err(|e| AuditError::Write(io::Error::other(e.to_string())))?
            }
        }
    }

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

    /// The state directory the log is kept in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn append(
        &self,
        body: Body,
        durability: Durability,
        checkpoint: Option<&str>,
    ) -> Result<u64, AuditError> {
        self.append_as(body, durability, checkpoint, false)
    }

    /// [`AuditLog::append`]; with `lossy`, a record that can't be written is counted as lost
    /// (under the writer's lock, so the next record written declares it).
    fn append_as(
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
        let (seq, number) = {
            let mut w = lock(&self.writer);
            let seq = match self.write(&mut w, body) {
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
    fn write(&self, w: &mut Writer, body: Body) -> Result<u64, AuditError> {
        if w.damaged.is_some() {
            self.resume(w)?;
        }
        self.write_line(w, now(), body)
    }

    /// Serialise and write one line at the end; the head moves only if all of it was written.
    fn write_line(&self, w: &mut Writer, time: String, body: Body) -> Result<u64, AuditError> {
        // A checkpoint's signature would not cover a declaration: the next record carries it.
        let lost = if matches!(body, Body::Checkpoint(_)) {
            None
        } else {
            w.lost.clone()
        };
        let declares = lost.is_some();
        let record = Record {
            seq: w.seq,
            time,
            body,
            lost,
            prev: format::hex(&w.prev),
        };
        w.buf.clear();
        serde_json::to_writer(&mut w.buf, &record)
            .map_err(|e| AuditError::Write(io::Error::other(e)))?;
        let hash = format::line_hash(&w.buf);
        w.buf.push(b'\n');
        if let Err(e) = (&*self.live()).write_all(&w.buf) {
            // Part of the line may be in the file: the next write notes it first.
            w.damaged = Some((w.end, format!("a write failed: {e}")));
            return Err(AuditError::Write(e));
        }
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
    fn roll_over(&self, w: &mut Writer) -> Result<(), AuditError> {
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

    /// Note the damaged bytes at the end of the file in a resume record that continues the
    /// chain from the last good record. The bytes stay.
    fn resume(&self, w: &mut Writer) -> Result<(), AuditError> {
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

    /// Sign the chain head, if the vault is open. Returns the record's number when written.
    fn checkpoint(&self, w: &mut Writer, reason: &str) -> Result<Option<u64>, AuditError> {
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
        let anchor = sign_anchor(key, seq, &w.prev, time, w.next.as_ref(), counter);
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

    /// Write the pending anchor to `audit.anchor` once its checkpoint is on disk (never
    /// before: the anchor must never be ahead of the log).
    fn publish_anchor(&self) {
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
    fn write_anchor(&self, published: &mut Option<u64>, anchor: &Anchor) -> Result<(), AuditError> {
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
    fn anchor_head(&self, w: &mut Writer, key: &SigningKey) -> Result<(), AuditError> {
        if self.anchor_path.exists() || w.seq == 0 {
            return Ok(());
        }
        self.sync_through(self.written.load(Ordering::Acquire))?;
        let counter = w.counter_next;
        let anchor = sign_anchor(key, w.seq - 1, &w.prev, now(), None, counter);
        self.write_anchor(&mut lock(&self.anchor_lock), &anchor)?;
        if let Some(c) = counter {
            w.counter_next = Some(c + 1);
            self.counter_up_to(c);
        }
        Ok(())
    }

    /// Check the log against `audit.anchor` for the vault whose audit key is `key`. `Err` is
    /// the finding, in words.
    fn check_anchor(
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
        let bytes = self
            .read_from(w, anchor.seq)
            .map_err(|e| format!("cannot read the log to check it: {e}"))?;
        let expect = Expect {
            anchor: Some(&anchor),
            last_seq: None,
        };
        format::verify_against(&bytes, &anchor.key, expect)
            .map(|_| Some(anchor.clone()))
            .map_err(|f| {
                let at = f.seq.map(|s| format!("seq {s}: ")).unwrap_or_default();
                format!(
                    "the log does not match its anchor (checkpoint seq {}): {at}{}",
                    anchor.seq, f.problem
                )
            })
    }

    /// The log's files from the one that holds `seq` on, end to end (the live one up to its
    /// last good record). The first time, only the log as it was found at start: what this run
    /// wrote since then is ours, and must not hide a cut.
    fn read_from(&self, w: &Writer, seq: u64) -> io::Result<Vec<u8>> {
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
        let mut out = Vec::new();
        for path in &files[start..] {
            let mut bytes = std::fs::read(path)?;
            if *path == live.0 {
                bytes.truncate(usize::try_from(live.1).unwrap_or(usize::MAX));
            }
            out.extend_from_slice(&bytes);
        }
        Ok(out)
    }

    /// Whether any of the log's files holds a checkpoint (newest first: it is found at once).
    fn holds_a_checkpoint(&self, w: &Writer) -> io::Result<bool> {
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
    fn start_new_log(&self, w: &mut Writer, finding: &str) -> Result<PathBuf, AuditError> {
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

    /// Make every record up to number `through` durable (one `fdatasync` serves every caller
    /// waiting at the time: group commit).
    fn sync_through(&self, through: u64) -> Result<(), AuditError> {
        let _one = lock(&self.sync_lock);
        if self.synced.load(Ordering::Acquire) >= through && !self.degraded.load(Ordering::Acquire)
        {
            return Ok(());
        }
        let upto = self.written.load(Ordering::Acquire);
        // Read after `upto`: a record counted there went to this file or one synced before.
        match self.live().sync_data() {
            Ok(()) => {
                self.synced.store(upto, Ordering::Release);
                self.degraded.store(false, Ordering::Release);
                Ok(())
            }
            Err(e) => {
                self.degraded_full.store(no_space(&e), Ordering::Release);
                self.degraded.store(true, Ordering::Release);
                Err(AuditError::Sync(e))
            }
        }
    }

    fn wake_flusher(&self) {
        *lock(&self.wake) = true;
        self.wake_cv.notify_one();
    }

    /// The background flusher: syncs what reads wrote, and writes the periodic checkpoint
    /// when the log has been quiet for [`CHECKPOINT_INTERVAL`].
    fn flush_loop(&self) {
        loop {
            {
                let woken = lock(&self.wake);
                let (mut woken, _) = self
                    .wake_cv
                    .wait_timeout_while(woken, SYNC_INTERVAL, |w| {
                        !*w && !self.stop.load(Ordering::Acquire)
                    })
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                *woken = false;
            }
            if self.stop.load(Ordering::Acquire) {
                return;
            }
            let written = self.written.load(Ordering::Acquire);
            if written > self.synced.load(Ordering::Acquire)
                || self.degraded.load(Ordering::Acquire)
            {
                if let Err(e) = self.sync_through(written) {
                    tracing::error!("audit log: {e}; requests fail until a sync succeeds");
                }
            }
            self.publish_anchor();
            let mut w = lock(&self.writer);
            if w.key.is_some()
                && w.since_checkpoint > 0
                && w.last_checkpoint.elapsed() >= CHECKPOINT_INTERVAL
            {
                if let Err(e) = self.checkpoint(&mut w, "periodic") {
                    tracing::error!("audit log: periodic checkpoint: {e}");
                }
            }
        }
    }

    /// Write a checkpoint now and sync it (the hooks' path: rare, and under the vault's lock).
    /// Write a checkpoint, let `then` change the writer while it is still locked, unlock, and
    /// sync: the hooks' path (rare) must not hold appends up for an `fdatasync`.
    fn checkpoint_synced(
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

    /// Whether the log still takes records, without writing one: the last background sync
    /// did not fail, the writer's lock can be taken (no append is stuck inside `write(2)`), and
    /// the background flusher is running.
    ///
    /// Blocks while an append holds the lock: call it on a blocking thread, with a bound.
    ///
    /// # Errors
    /// [`AuditError::Degraded`] after a failed sync; [`AuditError::FlusherStopped`].
    pub fn probe(&self) -> Result<(), AuditError> {
        if self.degraded.load(Ordering::Acquire) {
            return Err(AuditError::Degraded {
                storage_full: self.degraded_full.load(Ordering::Acquire),
            });
        }
        drop(lock(&self.writer));
        let stopped = lock(&self.flusher)
            .as_ref()
            .is_some_and(std::thread::JoinHandle::is_finished);
        if stopped && !self.stop.load(Ordering::Acquire) {
            return Err(AuditError::FlusherStopped);
        }
        Ok(())
    }

    /// Append a daemon event (`policy-reload`, ...), synced.
    ///
    /// # Errors
    /// It could not be written or synced.
    pub fn event(&self, event: &str, detail: &str) -> Result<(), AuditError> {
        let body = Body::Event(EventRecord {
            event: event.to_owned(),
            detail: capped(detail),
        });
        self.append(body, Durability::Synced, None).map(|_| ())
    }

    /// Replace `audit.pub` with `key` (PEM), atomically and durably.
    fn store_public_key(&self, key: &VerifyingKey) -> Result<(), AuditError> {
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

    /// At stop: a `stop` event and a last checkpoint, synced; then the flusher ends.
    pub fn shutdown(&self) {
        {
            let mut w = lock(&self.writer);
            let stop = Body::Event(EventRecord {
                event: "stop".into(),
                detail: "SIGTERM: requests drained".into(),
            });
            if let Err(e) = self.write(&mut w, stop) {
                tracing::error!("audit log: at stop: {e}");
            }
            self.written.fetch_add(1, Ordering::AcqRel);
            // The key is not needed any more: zeroized now rather than at exit.
            if let Err(e) = self.checkpoint_synced(w, "stop", |w| w.key = None) {
                tracing::error!("audit log: at stop: {e}");
            }
        }
        let number = self.written.load(Ordering::Acquire);
        if let Err(e) = self.sync_through(number) {
            tracing::error!("audit log: at stop: {e}");
        }
        self.publish_anchor();
        self.stop.store(true, Ordering::Release);
        self.wake_flusher();
        if let Some(t) = lock(&self.flusher).take() {
            let _ = t.join();
        }
    }
}

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

/// Count one record lost to `e`, to be declared by the next record written.
fn count_lost(w: &mut Writer, e: &AuditError) {
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

/// An anchor for the record `seq` whose line hashes to `head`, signed by `key`.
fn sign_anchor(
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
    }
}

/// Open (or create) the live file for appending.
fn open_live(path: &Path) -> io::Result<File> {
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

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir).and_then(|d| d.sync_all())
}

/// Replace `path` with `bytes` (mode `mode`), atomically and durably.
fn replace_file(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
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

fn rolled_name(n: u64) -> String {
    format!("{}.{n}", format::LOG_FILE)
}

fn rolled_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(rolled_name(n))
}

/// N of an `audit.log.N` path.
fn rolled_number(path: &Path) -> Option<u64> {
    path.file_name()?
        .to_str()?
        .strip_prefix(format::LOG_FILE)?
        .strip_prefix('.')?
        .parse()
        .ok()
}

/// The first record of a file the log rolled over to from `audit.log.N`.
fn continued_from(n: u64) -> Body {
    Body::Event(EventRecord {
        event: format::CONTINUED.into(),
        detail: format!("from {}", rolled_name(n)),
    })
}

/// The seq of a file's first record, if it has a readable one.
fn first_seq(path: &Path) -> io::Result<Option<u64>> {
    let mut head = Vec::new();
    File::open(path)?.take(64 * 1024).read_to_end(&mut head)?;
    Ok(format::lines(&head)
        .first()
        .filter(|l| l.complete)
        .and_then(|l| format::parse(l.bytes).ok())
        .map(|r| r.seq))
}

/// Where the chain stands at the end of an existing file.
enum Head {
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

/// Find the last readable, newline-terminated record in the last [`TAIL_WINDOW`] bytes.
fn read_head(file: &mut File, len: u64) -> io::Result<Head> {
    if len == 0 {
        return Ok(Head::Empty);
    }
    let from = len.saturating_sub(TAIL_WINDOW);
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
    Ok(Head::NoRecord)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;

    fn entry(op: &'static str, target: &str) -> Entry {
        Entry::new(&Caller::daemon(), op, target, format::OK)
    }

    fn verify(dir: &Path, key: &VerifyingKey) -> format::Report {
        let log = std::fs::read(dir.join(format::LOG_FILE)).unwrap();
        format::verify(&log, key).unwrap_or_else(|f| panic!("{f}"))
    }

    #[test]
    fn a_log_that_is_written_verifies_and_continues_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKey::from_bytes(&[5; 32]);
        let public = key.verifying_key();
        let log = AuditLog::open(dir.path(), AuditOptions::default()).unwrap();
        log.request(entry("Status", "vault"), Durability::Written, None)
            .unwrap();
        log.opened(key.clone(), "test");
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
        log.opened(key, "test");
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
        log.opened(key.clone(), "test");
        log.request(entry("GetSecret", "a"), Durability::Synced, None)
            .unwrap();
        log.shutdown();
        let path = dir.path().join(format::LOG_FILE);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(br#"{"seq":6,"time":"2025-"#).unwrap();
        drop(f);
        let before = std::fs::read(&path).unwrap();

        let log = AuditLog::open(dir.path(), AuditOptions::default()).unwrap();
        log.opened(key.clone(), "test");
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
        log.opened(key.clone(), "test");
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
    fn a_symlink_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join(format::LOG_FILE)).unwrap();
        assert!(matches!(
            AuditLog::open(dir.path(), AuditOptions::default()),
            Err(AuditError::Open { .. })
        ));
    }

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

    #[test]
    fn the_unsealed_log_signs_every_so_many_records() {
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKey::from_bytes(&[4; 32]);
        let log = AuditLog::open(dir.path(), AuditOptions::default()).unwrap();
        log.opened(key.clone(), "test");
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

    /// Every file of the log in `dir`, end to end.
    fn whole_set(dir: &Path) -> Vec<u8> {
        let mut all = Vec::new();
        for f in format::set_in(dir).unwrap() {
            all.extend(std::fs::read(f).unwrap());
        }
        all
    }

    #[test]
    fn the_log_rolls_over_and_the_set_verifies_as_one_chain() {
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKey::from_bytes(&[3; 32]);
        let small = AuditOptions {
            max_file_bytes: 4096,
        };
        let log = AuditLog::open(dir.path(), small).unwrap();
        log.opened(key.clone(), "test");
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
        log.opened(key.clone(), "test");
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
        log.opened(key.clone(), "test");
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
        log.opened(key.clone(), "test");
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
        log.opened(key, "test");
        assert_eq!(log.finding(), None);
        log.shutdown();
    }

    #[test]
    fn an_untouched_log_passes_the_check_across_seals_and_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKey::from_bytes(&[1; 32]);
        for _ in 0..3 {
            let log = AuditLog::open(dir.path(), AuditOptions::default()).unwrap();
            log.opened(key.clone(), "test");
            log.request(entry("GetSecret", "a"), Durability::Written, None)
                .unwrap();
            log.closed("sealed by test");
            // Written while sealed: after the anchor, chained to it.
            log.request(entry("GetSecret", "a"), Durability::Written, None)
                .unwrap();
            log.opened(key.clone(), "test");
            assert_eq!(log.finding(), None);
            log.shutdown();
        }
        // A stranger's key never passes.
        let log = AuditLog::open(dir.path(), AuditOptions::default()).unwrap();
        log.opened(SigningKey::from_bytes(&[9; 32]), "test");
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
        log.opened(key.clone(), "test");
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
        log.opened(key.clone(), "test");
        assert_eq!(log.finding(), None);
        log.shutdown();
        // Removed: the log holds checkpoints, so that is a finding.
        std::fs::remove_file(&anchor_path).unwrap();
        let log = AuditLog::open(dir.path(), AuditOptions::default()).unwrap();
        log.opened(key, "test");
        assert!(log.finding().unwrap().contains("missing"));
        log.shutdown();
    }

    #[test]
    fn a_roll_over_cut_short_goes_on_from_the_last_file() {
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKey::from_bytes(&[6; 32]);
        let log = AuditLog::open(dir.path(), AuditOptions::default()).unwrap();
        log.opened(key.clone(), "test");
        log.shutdown();
        // Renamed, and the new file got only part of its first record before the crash.
        let live = dir.path().join(format::LOG_FILE);
        std::fs::rename(&live, rolled_path(dir.path(), 1)).unwrap();
        std::fs::write(&live, br#"{"seq":5,"time":"20"#).unwrap();
        let log = AuditLog::open(dir.path(), AuditOptions::default()).unwrap();
        log.opened(key.clone(), "test");
        log.shutdown();
        let r = format::verify(&whole_set(dir.path()), &key.verifying_key()).unwrap();
        assert_eq!(r.damage.len(), 1);
        assert_eq!(log.finding(), None);
    }

    #[test]
    fn a_status_record_that_cannot_be_written_is_declared_by_the_next_one() {
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKey::from_bytes(&[7; 32]);
        let log = AuditLog::open(dir.path(), AuditOptions::default()).unwrap();
        log.opened(key.clone(), "test");
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

    #[test]
    fn long_targets_are_cut() {
        let e = entry("GetSecret", &"é".repeat(400));
        assert!(e.target.len() <= MAX_FIELD + 3);
        assert!(e.target.ends_with("..."));
    }

    #[test]
    fn the_probe_writes_nothing_and_waits_for_a_stuck_writer() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), AuditOptions::default()).unwrap();
        let len = || {
            std::fs::metadata(dir.path().join(format::LOG_FILE))
                .unwrap()
                .len()
        };
        let before = len();
        log.probe().unwrap();
        assert_eq!(len(), before, "a probe wrote a record");

        // An append stuck inside write(2) holds the writer: the probe waits for it.
        let held = lock(&log.writer);
        let (tx, rx) = std::sync::mpsc::channel();
        let probing = Arc::clone(&log);
        let t = std::thread::spawn(move || tx.send(probing.probe().is_ok()));
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
        drop(held);
        assert!(rx.recv_timeout(Duration::from_secs(10)).unwrap());
        t.join().unwrap().unwrap();

        // A failed background sync fails it until a sync succeeds.
        log.degraded.store(true, Ordering::Release);
        assert!(matches!(log.probe(), Err(AuditError::Degraded { .. })));
        log.shutdown();
    }
}
