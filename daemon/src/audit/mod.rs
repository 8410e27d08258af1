//! The audit log: every request the service sees — who, what, which target, the result, when;
//! never a secret value, PIN, share or digest — appended to `audit.log` in the state directory,
//! hash-chained and signed at checkpoints. The format and its verification live in
//! [`keyward_proto::audit`], shared with `keyward audit verify|tail`; this module only writes.
//!
//! **Fail closed.** A record that can't be written fails its request. A secret's put or
//! delete commits its record in the same SQLite transaction as the change, into the store's
//! audit outbox ([`outbox`]): the change and its record are durable together with one commit,
//! or neither is, and the record is appended to `audit.log` (its line carrying its outbox
//! number, `outbox`) before the reply. The log is asked first whether it takes records (no
//! failed sync, damage at its end declared): if not, the change is not made. Any other
//! mutation (a device key's create or delete, an admin verb) writes a `started` record and
//! makes it durable *before* it runs, and its outcome record before the reply: a change the log
//! cannot show is never made, and one whose outcome could not be written is not acknowledged
//! (the caller gets `AuditUnavailable`; the `started` record shows the attempt). Reads, and
//! puts and deletes refused or failed before their transaction committed (nothing changed),
//! write one record after they run and before the reply. A record that can't be written because
//! the state directory's file system is full (`ENOSPC`, `EDQUOT`) fails its request with
//! `StorageFull` instead: the admin's to fix.
//!
//! **Declared losses.** One exception: `Status` (read-only, nothing secret, and how an admin
//! finds out what is wrong) is answered even when its record can't be written
//! ([`AuditLog::request_or_declare_lost`]). The loss is counted, and the next record that does
//! get written carries it (`lost`: how many, first and last time, why), so the gap is declared
//! in the chain, never silent. A count still pending at exit is only in the daemon's log.
//!
//! **Durability.** An acknowledged put or delete and its record are durable (one `fsync`, the
//! store's commit, shared by the writes of its group); its line is in the file (`write(2)`
//! returned) before the reply, and durable within [`SYNC_INTERVAL`]. If the line could not be
//! written, or the daemon stopped (a crash, a power loss) before it was durable, the record is
//! still in the outbox: rows are deleted only once their lines are durable, and at start,
//! before anything is served, the rows the log does not hold are appended, in order, exactly
//! once (the lines name their rows). So the log holds every acknowledged change's record once,
//! in commit order, after the next start at the latest. Device keys' creates and deletes have a
//! durable `started` record and leave their outcome line to the group sync. Admin verbs also
//! `fdatasync` their outcome (with a checkpoint) before the reply. Refusals and reads
//! (`GetSecret`, `Sign`, `PublicKey`, `List*`, `SecretVersions`, `Status`, credential
//! deliveries): the record is in the file (`write(2)` returned) before the reply, so a daemon
//! crash loses nothing; a background flusher makes it durable within [`SYNC_INTERVAL`] (plus
//! the `fdatasync`'s own time). So a power loss can lose the records of reads answered in the
//! last 50 ms or so — the window that keeps the audit from capping read throughput. The window
//! is time, not a count of records: syncing more often under load makes every append wait
//! behind the flush of the page it lands on. If a background sync fails, every request fails
//! until one succeeds.
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
//! **Off the workers.** The vault tells the log about its key ([`AuditKeys`]) holding its own
//! lock, from async code; those hooks checkpoint and sync on a thread of their own while the
//! vault awaits them ([`hooks`]), and synced request records wait for the disk on a blocking
//! thread ([`AuditLog::request_async`]), so no `fdatasync` of theirs runs on a runtime worker.
//!
//! Must not: write anything a client sent as a value (only names, capped in length), call
//! into the vault (the vault calls in here under its own lock), or wait for the disk on a
//! runtime worker on the vault's behalf.

mod checkpoint;
mod counter;
mod flusher;
mod hooks;
mod lost;
mod outbox;
mod recover;
#[cfg(test)]
mod test_support;
mod writer;

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
    self as format, Anchor, Body, CallerRecord, CheckedAnchor, Checkpoint, EventRecord, Lost,
    Record, RequestRecord, Resume,
};

use crate::device::DeviceHandle;
use crate::identity::{Caller, Via};
use crate::vault::audit_key::AuditKeys;

use counter::TpmCounter;
use hooks::HookThread;
use writer::{Prepared, Writer};

pub use outbox::Staged;

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
    /// The thread the vault's hooks run on has stopped.
    #[error("the audit log's hook thread has stopped")]
    HooksStopped,
    /// The records committed with secret changes can't be read from the store.
    #[error("cannot read the audit outbox: {0}")]
    Outbox(#[source] crate::store::StoreError),
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
            Self::Outbox(e) => matches!(e, crate::store::StoreError::DiskFull),
            Self::NotAFile { .. }
            | Self::Unreadable { .. }
            | Self::FlusherStopped
            | Self::HooksStopped => false,
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
    /// The policy rule that allowed the call, if one decided it.
    pub rule: Option<u32>,
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
            rule: None,
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
            rule: self.rule,
            outbox: None,
        })
    }
}

/// The caller as the log shows it.
pub fn caller_record(c: &Caller) -> CallerRecord {
    CallerRecord {
        uid: c.who.uid,
        gid: c.who.gid,
        pid: c.pid,
        unit: c.who.unit.clone(),
        via: match c.via {
            Via::Varlink => "varlink",
            Via::Dbus => "dbus",
            Via::Credentials => "credentials",
            Via::Transit => "transit",
            Via::SshAgent => "ssh-agent",
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
    /// Where the vault's hooks do their disk work (set once, at open).
    hooks: std::sync::OnceLock<HookThread>,
    /// The records of secret changes, committed with them in the store ([`outbox`]).
    outbox: outbox::Outbox,
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

    /// The state directory the log is kept in.
    pub fn dir(&self) -> &Path {
        &self.dir
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

    /// Append a daemon event (`policy-reload`, ...), synced: from async code, so the write
    /// and its `fdatasync` run on a blocking thread, as [`AuditLog::request_async`]'s do.
    ///
    /// # Errors
    /// It could not be written or synced.
    pub async fn event(self: &Arc<Self>, event: &str, detail: &str) -> Result<(), AuditError> {
        let (event, detail) = (event.to_owned(), detail.to_owned());
        let log = Arc::clone(self);
        tokio::task::spawn_blocking(move || log.event_now(&event, &detail))
            .await
            .map_err(|e| AuditError::Write(io::Error::other(e.to_string())))?
    }

    /// [`AuditLog::event`] on this thread, which waits for the disk: for code that runs
    /// outside the runtime (the restore).
    ///
    /// # Errors
    /// It could not be written or synced.
    pub fn event_now(&self, event: &str, detail: &str) -> Result<(), AuditError> {
        let body = Body::Event(EventRecord {
            event: event.to_owned(),
            detail: capped(detail),
        });
        self.append(body, Durability::Synced, None).map(|_| ())
    }

    /// The chain's head: the last record's seq and the SHA-256 of its line; `None` while the
    /// log has no record. A change is committed before its outcome record is written, so
    /// every change recorded up to the head is in a snapshot taken after reading it.
    pub fn head(&self) -> Option<(u64, [u8; 32])> {
        let w = lock(&self.writer);
        w.seq.checked_sub(1).map(|last| (last, w.prev))
    }

    /// At stop: a `stop` event and a last checkpoint, synced; then the flusher ends.
    pub fn shutdown(&self) {
        {
            let mut w = lock(&self.writer);
            let stop = Body::Event(EventRecord {
                event: "stop".into(),
                detail: "SIGTERM: requests drained".into(),
            });
            let written = Prepared::new(now(), &stop).and_then(|line| self.write(&mut w, line));
            if let Err(e) = written {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Start-up and the policy reload write their events from async code: the `fdatasync`
    /// must not run on the runtime's worker. A current-thread runtime has one worker; the test
    /// holds the log's sync lock, as a slow `fdatasync` would, and a task spawned while the
    /// event is in flight must still run.
    #[test]
    fn an_event_waits_for_the_disk_off_the_runtime_worker() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), AuditOptions::default()).unwrap();
        let (ran, probe) = std::sync::mpsc::channel();
        let slow_disk = lock(&log.sync_lock);
        let runtime = {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let probe = tokio::spawn(async move { ran.send(()).unwrap() });
                    let written = log.event("key-sweep", "a line").await;
                    probe.await.unwrap();
                    written
                })
            })
        };
        let progressed = probe.recv_timeout(Duration::from_secs(10));
        drop(slow_disk);
        let written = runtime.join().unwrap();
        assert!(
            progressed.is_ok(),
            "the runtime's worker was blocked while the event waited for the disk"
        );
        written.unwrap();
        log.shutdown();
        let text = std::fs::read_to_string(log.path()).unwrap();
        assert!(text.contains("\"key-sweep\""), "{text}");
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
