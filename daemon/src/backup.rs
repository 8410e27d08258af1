//! Backups of the vault and their restore: the file that `Backup`/`BackupChunk` hand to
//! `keyward backup`, and `keywardd --restore`, which lays one out as a new state directory.
//!
//! **Made by the daemon.** The daemon owns the database and runs as its own user, so a backup
//! is taken here, over the API (admin only, audited), not by reading the state directory: a
//! snapshot with SQLite's online backup API ([`Store::snapshot`]) while writes go on, into an
//! unlinked temporary file in the state directory, handed out in bounded pieces
//! ([`api::BACKUP_CHUNK_LEN`] each, so every reply fits the Varlink frame limit). The daemon
//! keeps one backup at a time: the newest, until its last piece was read; a new `Backup`
//! replaces it. So at most one snapshot's worth of disk is held, whatever clients do.
//!
//! **What it holds** is described in [`keyward_proto::backup`]: only sealed blobs and
//! ciphertext, nothing that opens without a keyslot, plus the audit log's head. The audit log
//! itself lives beside the database, not in it, and stays behind: it is this host's history.
//!
//! **Restore is offline.** `keywardd --restore FILE` runs before the daemon starts, reading the
//! state directory from the same config: as root (into an existing empty directory the files
//! get its owner; an absent one is root's until systemd's `StateDirectory=` hands it to the
//! service user), or as the daemon's user where it may write the state directory's parent
//! (the temporary directory is made beside the state directory, so that the final rename
//! stays on one file system). It is the daemon's
//! binary because only the daemon knows the schema it can open. It refuses a state directory
//! that holds anything at all (an entry of any name, hidden ones included): a restore never
//! merges into or replaces a vault. It checks the file's checksum and opens the database
//! (integrity check, a schema version this build knows, a vault in it) in a temporary
//! directory beside the state directory, starts a new audit log there whose first record
//! says which backup (and which audit head) it came from, and only then renames the whole
//! directory into place: a restore is complete or absent, never half done.
//!
//! Must not: hand out anything but the snapshot's bytes, write into a state directory in
//! place, or take a backup by any path other than the store's read side.

use std::fs::{File, OpenOptions};
use std::io::{self, Read as _, Seek as _, SeekFrom, Write as _};
use std::os::unix::fs::{FileExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use chacha20poly1305::aead::{rand_core::RngCore as _, OsRng};
use keyward_proto::api::{self, ApiError, BackupReply};
use keyward_proto::backup::{self as format, AuditHead, BackupFormatError, Checker, Manifest};
use keyward_proto::text::hex;
use sha2::{Digest as _, Sha256};

use crate::audit::{AuditError, AuditLog, AuditOptions};
use crate::store::{self, schema, Store, StoreError};

/// The name of a snapshot file while it is made (in the state directory).
const SNAPSHOT_PREFIX: &str = ".backup-";

/// The backup the daemon holds for `BackupChunk`.
struct Held {
    id: String,
    /// The magic line and the manifest.
    header: Vec<u8>,
    /// The database snapshot (already unlinked).
    database: Arc<File>,
    size: u64,
}

/// The one backup being handed out.
pub struct Backups {
    /// Where the snapshot's temporary file is made: the state directory (the daemon can write
    /// there, and it is private).
    dir: PathBuf,
    held: Mutex<Option<Held>>,
}

impl std::fmt::Debug for Backups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backups")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

fn internal(what: &str) -> impl Fn(io::Error) -> ApiError + '_ {
    move |e| {
        tracing::error!("backup: {what}: {e}");
        if crate::audit::no_space(&e) {
            ApiError::StorageFull {
                what: "backup snapshot".into(),
            }
        } else {
            ApiError::Internal {
                reason: format!("backup: {what}: {e}"),
            }
        }
    }
}

fn store_error(e: StoreError) -> ApiError {
    ApiError::from(crate::error::Error::from(e))
}

impl Backups {
    /// Backups whose snapshots are made in `dir`. A snapshot file left there by a daemon that
    /// stopped in the middle of a `Backup` (its name exists only while the copy is made) is
    /// removed now.
    pub fn new(dir: &Path) -> Self {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with(SNAPSHOT_PREFIX)
            {
                match std::fs::remove_file(entry.path()) {
                    Ok(()) => {
                        tracing::info!(path = %entry.path().display(), "removed a backup snapshot left by an earlier run")
                    }
                    Err(e) => {
                        tracing::warn!(path = %entry.path().display(), "cannot remove a backup snapshot left by an earlier run: {e}")
                    }
                }
            }
        }
        Self {
            dir: dir.to_owned(),
            held: Mutex::new(None),
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Option<Held>> {
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Take a snapshot of `store` and hold it as a backup file, replacing any held before.
    ///
    /// # Errors
    /// The snapshot could not be made or read back (`Internal`, `StorageFull`, a store error).
    pub async fn make(&self, store: &Store, audit: &AuditLog) -> Result<BackupReply, ApiError> {
        // A backup restores a vault; an empty database would restore nothing.
        if store
            .read(store::tables::get_meta)
            .await
            .map_err(store_error)?
            .is_none()
        {
            return Err(ApiError::NotInitialized);
        }
        // Only one snapshot on disk at a time: the old one goes before the new one is made.
        self.held().take();
        let temp = tempfile::Builder::new()
            .prefix(SNAPSHOT_PREFIX)
            .tempfile_in(&self.dir)
            .map_err(internal("cannot create the snapshot file"))?;
        // The head before the copy: every change recorded up to it is in the snapshot.
        let head = audit.head().map(|(seq, hash)| AuditHead {
            seq,
            hash: hex(&hash),
        });
        let schema_version = store
            .snapshot(temp.path().to_owned())
            .await
            .map_err(store_error)?;
        let database = temp
            .reopen()
            .map_err(internal("cannot reopen the snapshot"))?;
        // The name goes now; the open file stays until the backup is replaced or read out.
        drop(temp);
        let (manifest, database) = tokio::task::spawn_blocking(move || {
            let mut hash = Sha256::new();
            let mut len = 0u64;
            let mut buf = vec![0u8; 64 * 1024];
            let mut f = &database;
            loop {
                let n = f.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                hash.update(&buf[..n]);
                len += n as u64;
            }
            let manifest = Manifest {
                keyward_version: env!("CARGO_PKG_VERSION").into(),
                schema_version,
                created: store::now_rfc3339(),
                audit_head: head,
                database_len: len,
                database_sha256: hex(&hash.finalize()),
            };
            io::Result::Ok((manifest, database))
        })
        .await
        .map_err(|e| internal("snapshot checksum")(io::Error::other(e.to_string())))?
        .map_err(internal("cannot read the snapshot"))?;
        let header = manifest.header();
        let database = Arc::new(database);
        let reply = {
            let file = Arc::clone(&database);
            let header = header.clone();
            tokio::task::spawn_blocking(move || whole_file_sha256(&header, &file))
                .await
                .map_err(|e| internal("snapshot checksum")(io::Error::other(e.to_string())))?
                .map_err(internal("cannot read the snapshot"))?
        };
        let mut id = [0u8; 16];
        OsRng.fill_bytes(&mut id);
        let id = hex(&id);
        let size = header.len() as u64 + manifest.database_len;
        tracing::info!(
            size,
            schema_version,
            audit_seq = manifest.audit_head.as_ref().map(|h| h.seq),
            "backup snapshot taken"
        );
        *self.held() = Some(Held {
            id: id.clone(),
            header,
            database,
            size,
        });
        Ok(BackupReply {
            id,
            size,
            sha256: reply,
        })
    }

    /// Up to [`api::BACKUP_CHUNK_LEN`] bytes of the held backup `id` from `offset`. The
    /// backup is let go once a piece reaching its end has been read.
    ///
    /// # Errors
    /// `NotFound` when `id` is not the backup held (replaced, read out, or never made);
    /// `InvalidArgument` for an offset past its end.
    pub async fn chunk(&self, id: &str, offset: u64) -> Result<Vec<u8>, ApiError> {
        let (header, database, size) = match &*self.held() {
            Some(h) if h.id == id => (h.header.clone(), Arc::clone(&h.database), h.size),
            _ => {
                return Err(ApiError::NotFound {
                    kind: "backup".into(),
                    name: id.chars().take(64).collect(),
                })
            }
        };
        if offset > size {
            return Err(ApiError::InvalidArgument {
                parameter: "offset".into(),
                reason: format!("past the end of the backup ({size} bytes)"),
            });
        }
        let len = (size - offset).min(api::BACKUP_CHUNK_LEN as u64) as usize;
        let data = tokio::task::spawn_blocking(move || read_at(&header, &database, offset, len))
            .await
            .map_err(|e| internal("reading the snapshot")(io::Error::other(e.to_string())))?
            .map_err(internal("cannot read the snapshot"))?;
        if offset + len as u64 == size {
            let mut held = self.held();
            if held.as_ref().is_some_and(|h| h.id == id) {
                held.take();
            }
        }
        Ok(data)
    }
}

/// `len` bytes at `offset` of the file `header` followed by `database`.
fn read_at(header: &[u8], database: &File, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(len);
    let mut at = offset;
    if let Some(from_header) = header.get(usize::try_from(at).unwrap_or(usize::MAX)..) {
        let take = from_header.len().min(len);
        out.extend_from_slice(&from_header[..take]);
        at += take as u64;
    }
    let rest = len - out.len();
    if rest > 0 {
        let start = out.len();
        out.resize(len, 0);
        database.read_exact_at(&mut out[start..], at - header.len() as u64)?;
    }
    Ok(out)
}

fn whole_file_sha256(header: &[u8], database: &File) -> io::Result<String> {
    let mut hash = Sha256::new();
    hash.update(header);
    let mut buf = vec![0u8; 64 * 1024];
    let mut at = 0u64;
    loop {
        let n = database.read_at(&mut buf, at)?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
        at += n as u64;
    }
    Ok(hex(&hash.finalize()))
}

/// Why a restore was refused or failed. Nothing was written to the state directory.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The state directory holds something.
    #[error("{} is not empty (it holds {entry:?}): restore only into an empty or missing state directory; move the old one away first", path.display())]
    NotEmpty { path: PathBuf, entry: String },
    /// The state directory path exists and is not a directory.
    #[error("{} exists and is not a directory", .0.display())]
    NotADirectory(PathBuf),
    /// The file is not a backup, or is damaged.
    #[error("{}: {source}", path.display())]
    Format {
        path: PathBuf,
        #[source]
        source: BackupFormatError,
    },
    /// A newer keywardd made the backup.
    #[error("the backup's database has schema version {found}, newer than the {known} this keywardd knows: restore it with a keywardd at least as new as the one that made it ({made_by})")]
    TooNew {
        found: i64,
        known: i64,
        made_by: String,
    },
    /// The database in the backup does not open as a vault.
    #[error("the backup's database is not usable: {0}")]
    Database(String),
    /// The new audit log could not be started.
    #[error("cannot start the restored audit log: {0}")]
    Audit(#[from] AuditError),
    /// Reading the backup or writing the new directory failed.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

fn io_err(what: impl std::fmt::Display) -> impl FnOnce(io::Error) -> RestoreError {
    let what = what.to_string();
    move |source| RestoreError::Io { what, source }
}

/// Whether `dir` is a state directory a restore may fill: absent, or a directory without a
/// single entry. Returns its owner when it exists.
fn check_empty(dir: &Path) -> Result<Option<(u32, u32)>, RestoreError> {
    match std::fs::metadata(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(format!("cannot stat {}", dir.display()))(e)),
        Ok(m) if !m.is_dir() => Err(RestoreError::NotADirectory(dir.to_owned())),
        Ok(m) => {
            let mut entries =
                std::fs::read_dir(dir).map_err(io_err(format!("cannot read {}", dir.display())))?;
            match entries.next() {
                None => Ok(Some((m.uid(), m.gid()))),
                Some(entry) => Err(RestoreError::NotEmpty {
                    path: dir.to_owned(),
                    entry: entry
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .unwrap_or_default(),
                }),
            }
        }
    }
}

/// Lay the backup `file` out as the new state directory `state_dir` (see the module docs);
/// returns its manifest.
///
/// # Errors
/// [`RestoreError`]: nothing was written to `state_dir` (a temporary directory beside it is
/// removed again).
pub fn restore(
    file: &Path,
    state_dir: &Path,
    audit: AuditOptions,
) -> Result<Manifest, RestoreError> {
    let owner = check_empty(state_dir)?;
    let parent = match state_dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let format_err = |source| RestoreError::Format {
        path: file.to_owned(),
        source,
    };
    let mut input = File::open(file).map_err(io_err(format!("cannot open {}", file.display())))?;
    let mut head = Vec::with_capacity(format::MAGIC.len() + format::MAX_MANIFEST_LEN + 1);
    (&mut input)
        .take((format::MAGIC.len() + format::MAX_MANIFEST_LEN + 1) as u64)
        .read_to_end(&mut head)
        .map_err(io_err(format!("cannot read {}", file.display())))?;
    let (manifest, start) = format::decode_header(&head).map_err(format_err)?;
    let known = schema::current_version();
    if manifest.schema_version > known {
        return Err(RestoreError::TooNew {
            found: manifest.schema_version,
            known,
            made_by: manifest.keyward_version.clone(),
        });
    }
    input
        .seek(SeekFrom::Start(start as u64))
        .map_err(io_err(format!("cannot read {}", file.display())))?;

    let temp = tempfile::Builder::new()
        .prefix(".keyward-restore-")
        .tempdir_in(parent)
        .map_err(io_err(format!(
            "cannot create a temporary directory in {}",
            parent.display()
        )))?;
    std::fs::set_permissions(temp.path(), std::fs::Permissions::from_mode(0o700))
        .map_err(io_err("cannot set mode 0700 on the temporary directory"))?;
    let db_path = temp.path().join("keyward.db");
    copy_checked(&mut input, &db_path, &manifest).map_err(|e| match e {
        Copy::Format(source) => format_err(source),
        Copy::Io(source) => io_err(format!("cannot write {}", db_path.display()))(source),
    })?;
    check_database(&db_path, &manifest)?;

    let log = AuditLog::open(temp.path(), audit)?;
    let detail = format!(
        "from a backup taken {} by keywardd {} (schema {}); its audit log then ended at {}",
        manifest.created,
        manifest.keyward_version,
        manifest.schema_version,
        match &manifest.audit_head {
            Some(h) => format!("seq {} hash {}", h.seq, h.hash),
            None => "no record".into(),
        }
    );
    let written = log.event_now("restored", &detail);
    log.shutdown();
    drop(log);
    written?;

    if let Some((uid, gid)) = owner.filter(|_| nix::unistd::geteuid().is_root()) {
        chown_tree(temp.path(), uid, gid)?;
    }
    sync_dir(temp.path())?;
    let kept = temp.keep();
    if let Err(e) = std::fs::rename(&kept, state_dir) {
        let _ = std::fs::remove_dir_all(&kept);
        return Err(if e.kind() == io::ErrorKind::DirectoryNotEmpty {
            // Something appeared in it meanwhile: still refused, nothing replaced.
            RestoreError::NotEmpty {
                path: state_dir.to_owned(),
                entry: "(written during the restore)".into(),
            }
        } else {
            io_err(format!(
                "cannot rename the restored directory to {}",
                state_dir.display()
            ))(e)
        });
    }
    sync_dir(parent)?;
    Ok(manifest)
}

enum Copy {
    Format(BackupFormatError),
    Io(io::Error),
}

/// Copy the database from `input` to `dest` (mode 0600, synced), checking it against the
/// manifest on the way.
fn copy_checked(input: &mut File, dest: &Path, manifest: &Manifest) -> Result<(), Copy> {
    let mut out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dest)
        .map_err(Copy::Io)?;
    let mut checker = Checker::new(manifest);
    let mut buf = vec![0u8; 64 * 1024];
    // Never more than the manifest says plus one byte: a longer file is damaged, and
    // reading on would only fill the disk.
    let mut limited = input.take(manifest.database_len.saturating_add(1));
    loop {
        let n = limited.read(&mut buf).map_err(Copy::Io)?;
        if n == 0 {
            break;
        }
        checker.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(Copy::Io)?;
    }
    checker.finish().map_err(Copy::Format)?;
    out.sync_all().map_err(Copy::Io)
}

/// The restored database opens as the daemon will open it: intact, a schema this build
/// knows, a vault in it.
fn check_database(path: &Path, manifest: &Manifest) -> Result<(), RestoreError> {
    let bad = |e: rusqlite::Error| RestoreError::Database(StoreError::from(e).to_string());
    let conn = rusqlite::Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(bad)?;
    conn.pragma_update(None, "trusted_schema", "OFF")
        .map_err(bad)?;
    let check: String = conn
        .pragma_query_value(None, "integrity_check", |row| row.get(0))
        .map_err(bad)?;
    if check != "ok" {
        return Err(RestoreError::Database(format!("integrity check: {check}")));
    }
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(bad)?;
    if version != manifest.schema_version || version < 1 {
        return Err(RestoreError::Database(format!(
            "schema version {version}, the manifest says {}",
            manifest.schema_version
        )));
    }
    match store::tables::get_meta(&conn) {
        Ok(Some(_)) => {}
        Ok(None) => return Err(RestoreError::Database("it holds no vault".into())),
        Err(e) => return Err(RestoreError::Database(e.to_string())),
    }
    // Closing the last connection removes the -wal and -shm files it made.
    conn.close().map_err(|(_, e)| bad(e))
}

fn chown_tree(dir: &Path, uid: u32, gid: u32) -> Result<(), RestoreError> {
    let chown = |p: &Path| {
        std::os::unix::fs::chown(p, Some(uid), Some(gid))
            .map_err(io_err(format!("cannot chown {}", p.display())))
    };
    for entry in std::fs::read_dir(dir).map_err(io_err(format!("cannot read {}", dir.display())))? {
        let entry = entry.map_err(io_err(format!("cannot read {}", dir.display())))?;
        chown(&entry.path())?;
    }
    chown(dir)
}

fn sync_dir(dir: &Path) -> Result<(), RestoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(format!("cannot sync {}", dir.display())))
}
