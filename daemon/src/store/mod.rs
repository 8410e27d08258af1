//! The embedded database: one SQLite file (WAL, `synchronous=FULL`) holding the vault's metadata,
//! keyslots, encrypted secrets, device-key records and the device-key operations in flight.
//!
//! This module owns the connections and the threads they run on; [`schema`] owns the versioned
//! migrations and [`tables`] the typed rows and their SQL. It knows nothing about cryptography:
//! every blob it stores is opaque, already sealed by the vault, so nothing here is secret and
//! nothing here can leak a secret.
//!
//! Writes go to ONE connection, through a bounded queue: each [`Store::write`] is committed
//! (and, with `synchronous=FULL` in WAL mode, fsynced) before the caller hears `Ok`. The writes
//! queued when a group starts form that group: one `BEGIN IMMEDIATE` transaction in which each
//! write runs inside its own savepoint, and one commit (one fsync) for all of them. A write
//! that fails or panics is rolled back to its savepoint alone; a failed commit fails every
//! write of the group, none of which is kept. Under concurrent writers this is group commit; a
//! lone writer gets a group of one.
//!
//! Who commits: the caller that finds the connection free commits the queue's group itself,
//! on its own thread ([`crate::blocking::here`]), so a lone write costs no thread hand-off
//! (two of them cost more than the write's CPU). Callers that find it busy wait; what was
//! queued behind the group just committed goes to a blocking thread, which commits until the
//! queue is empty. Whatever is queued, someone is committing it or about to: a write, once
//! queued, runs to its end even if its caller stops waiting.
//!
//! Reads use a small pool of read-only connections, so a read never queues behind a write
//! (WAL lets readers and the writer run at once); each read sees one consistent snapshot.
//!
//! A reader keeps its read transaction (its snapshot) open between reads for as long as no
//! write is committed: each commit moves the store's write generation, and a read that finds
//! it moved since its snapshot began ends it and begins a new one, so a read never misses a
//! write acknowledged before it. Why: beginning and ending a read transaction takes SQLite's
//! WAL-index read lock (two `fcntl` calls and a process-wide mutex each time), which cost a
//! point lookup more than the lookup itself and serialised concurrent readers on the mutex.
//! The price is that an open snapshot pins the WAL: it can't be checkpointed past it, nor
//! restarted while any is open. So whoever commits first ends the snapshots of the readers
//! that sit idle in the pool, and a reader in use ends its own at its next read: at a commit,
//! only the reads running at that moment hold the WAL, as when every read was its own
//! transaction.

pub mod schema;
pub mod tables;

pub use tables::now_rfc3339;

use std::fmt;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, OpenFlags, Transaction, TransactionBehavior};
use tokio::sync::{mpsc, oneshot, Semaphore};

/// Read-only connections kept open for [`Store::read`]: reads beyond this many wait.
const READERS: usize = 4;
/// Writes queued for the writer before [`Store::write`] waits for room; also the largest
/// group committed at once.
const WRITE_QUEUE: usize = 64;
/// How long a statement waits for a lock held by another connection (or process).
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// The schema version that added the audit outbox.
const OUTBOX_VERSION: i64 = 6;

/// A store failure. No variant carries a secret: the store holds none, and SQLite's messages
/// name tables and columns, never bound values.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Any other SQLite failure.
    #[error("database error: {0}")]
    Sqlite(#[source] rusqlite::Error),
    /// `SQLITE_FULL`: the disk (or the file-size limit) is full. Nothing was written.
    #[error("the database's disk is full")]
    DiskFull,
    /// The database stayed locked by another connection for longer than the busy timeout.
    #[error("the database is locked by another process")]
    Busy,
    /// The file is not a Keyward database, or a row does not decode.
    #[error("corrupt database: {0}")]
    Corrupt(String),
    /// The file's schema is newer than this build knows: refuse rather than misread it.
    #[error(
        "the database has schema version {found}, newer than the {known} this keywardd knows: \
         run the newer keywardd that wrote it"
    )]
    TooNew { found: i64, known: i64 },
    /// The database already holds a vault.
    #[error("the database already holds a vault")]
    VaultExists,
    /// A row with this unique name already exists.
    #[error("{kind} {name:?} already exists")]
    AlreadyExists { kind: &'static str, name: String },
    /// An update found no row to change.
    #[error("{kind} {name:?} not found")]
    NotFound { kind: &'static str, name: String },
    /// Another constraint failed (SQLite names the table and column, not the values).
    #[error("constraint violated: {0}")]
    Conflict(String),
    /// The writer connection is closed; no write can succeed any more.
    #[error("the database writer has stopped")]
    Closed,
    /// The closure given to [`Store::read`] or [`Store::write`] panicked; a write was rolled back.
    #[error("a database operation panicked and was rolled back")]
    Panicked,
    /// The file could not be created or its permissions set, or a thread could not start.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        use rusqlite::Error as E;
        match &e {
            E::SqliteFailure(f, _) => match f.code {
                ErrorCode::DiskFull => Self::DiskFull,
                ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked => Self::Busy,
                ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase => {
                    Self::Corrupt(e.to_string())
                }
                ErrorCode::ConstraintViolation => Self::Conflict(e.to_string()),
                _ => Self::Sqlite(e),
            },
            E::InvalidColumnType(..)
            | E::IntegralValueOutOfRange(..)
            | E::FromSqlConversionFailure(..)
            | E::Utf8Error(..) => Self::Corrupt(e.to_string()),
            _ => Self::Sqlite(e),
        }
    }
}

/// A write job: runs its closure in the group's transaction (`None`: the
/// group could not start, run nothing) and says whether its changes are to be kept.
type Job = Box<dyn FnOnce(Option<&Transaction<'_>>) -> Ran + Send>;

/// What a job did, and how to answer its caller once the group's commit is known.
struct Ran {
    /// The closure returned `Ok`: release its savepoint rather than roll it back.
    keep: bool,
    /// Called with the group's outcome: `Ok` once committed.
    answer: Box<dyn FnOnce(Result<(), StoreError>) + Send>,
}

/// The database. Cheap to clone (an `Arc` inside); `Send + Sync`. The writer connection closes
/// (checkpointing the WAL) when the last clone is dropped; no write is queued then, as every
/// queued write holds a clone until it is committed.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    /// The queue of writes.
    queue: mpsc::Sender<Job>,
    /// The writer connection and the queue's far end: whoever holds it commits.
    writer: Mutex<Writer>,
    /// One permit per reader connection, so at most [`READERS`] reads run at once.
    permits: Arc<Semaphore>,
    /// Idle readers. Held to push or pop, and by a committer ending their snapshots; never
    /// while running a query.
    idle: Mutex<Vec<Reader>>,
    /// The write generation: moved after every group's commit (or failed commit), before any
    /// of its writers hears the outcome. A reader's snapshot taken at generation `g` has seen
    /// every commit before `g` was read.
    generation: AtomicU64,
}

/// A read-only connection, and the generation at which its open read transaction began.
struct Reader {
    conn: Connection,
    /// `Some(g)`: a read transaction is open, begun at write generation `g`; `None`: none.
    snapshot: Option<u64>,
}

impl Reader {
    fn open(path: &Path) -> Result<Reader, StoreError> {
        Ok(Reader {
            conn: open_reader(path)?,
            snapshot: None,
        })
    }

    /// The connection, inside a read transaction that sees every write committed before now:
    /// the one already open if no write was committed since it began, else a new one.
    fn fresh(&mut self, generation: &AtomicU64) -> Result<&Connection, StoreError> {
        let now = generation.load(Ordering::Acquire);
        if self.snapshot != Some(now) {
            self.end();
            // `BEGIN` takes no snapshot yet: the transaction's first read does, after `now`
            // was read, so it sees every commit that moved the generation up to `now`.
            self.conn.prepare_cached("BEGIN")?.execute([])?;
            self.snapshot = Some(now);
        }
        Ok(&self.conn)
    }

    /// End the open read transaction, if any (nothing was written: a rollback).
    fn end(&mut self) {
        self.snapshot = None;
        if self.conn.is_autocommit() {
            return;
        }
        if let Err(e) = self
            .conn
            .prepare_cached("ROLLBACK")
            .and_then(|mut end| end.execute([]))
        {
            tracing::warn!(error = %StoreError::from(e), "cannot end a read transaction");
        }
    }

    /// Run `f` on a fresh snapshot. A failed read ends the snapshot: the next read begins
    /// anew rather than trust a transaction the failure may have left in doubt.
    fn run<T>(
        &mut self,
        generation: &AtomicU64,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let result = self.fresh(generation).and_then(f);
        if result.is_err() {
            self.end();
        }
        result
    }
}

/// Who commits a queued write.
#[derive(Debug, Clone, Copy)]
enum Commit {
    /// The caller, on its own thread, if no one is committing; else whoever is.
    HereIfFree,
    /// A blocking thread: for a caller that must be able to stop waiting at any moment.
    Elsewhere,
}

/// The writer connection (`None` only while it closes) and the queue it takes writes from.
struct Writer {
    conn: Option<Connection>,
    jobs: mpsc::Receiver<Job>,
}

impl Writer {
    /// Commit the writes queued now, as one group; false if none were. Before the group: the
    /// snapshots of `store`'s idle readers end, so that they don't hold the WAL (its
    /// checkpoint, its restart) at this commit. After it: the store's generation moves, before
    /// any writer of the group is answered, so that a read after the answer begins anew.
    fn commit_queued(&mut self, store: &Inner) -> bool {
        let mut group = Vec::new();
        while group.len() < WRITE_QUEUE {
            match self.jobs.try_recv() {
                Ok(job) => group.push(job),
                Err(_) => break,
            }
        }
        if group.is_empty() {
            return false;
        }
        let Some(conn) = self.conn.as_mut() else {
            for job in group {
                (job(None).answer)(Err(StoreError::Closed));
            }
            return true;
        };
        for reader in store.idle().iter_mut() {
            reader.end();
        }
        run_group(conn, group, &store.generation);
        // A failed COMMIT or ROLLBACK can leave a transaction open: never let it leak into the
        // next group.
        if !conn.is_autocommit() {
            if let Err(e) = conn.execute_batch("ROLLBACK") {
                tracing::error!(error = %StoreError::from(e), "cannot roll back a failed write");
            }
        }
        true
    }
}

impl Drop for Writer {
    /// Close the connection, which checkpoints the WAL into the database file.
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            if let Err((_, e)) = conn.close() {
                tracing::warn!(error = %StoreError::from(e), "closing the database");
            }
        }
    }
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Open the database at `path`, creating it (mode 0600) if it does not exist, and migrate its
    /// schema forward. The parent directory must exist.
    ///
    /// # Errors
    /// [`StoreError::Io`] when the file can't be created or its mode set;
    /// [`StoreError::TooNew`] when a newer keywardd wrote it; [`StoreError::Corrupt`] when it is
    /// not a Keyward database; any SQLite failure while configuring or migrating.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        create_private(path)?;
        let mut writer = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        configure_writer(&writer)?;
        schema::migrate(&mut writer)?;
        let readers = (0..READERS)
            .map(|_| Reader::open(path))
            .collect::<Result<Vec<_>, _>>()?;
        let (queue, jobs) = mpsc::channel(WRITE_QUEUE);
        Ok(Store {
            inner: Arc::new(Inner {
                path: path.to_owned(),
                queue,
                writer: Mutex::new(Writer {
                    conn: Some(writer),
                    jobs,
                }),
                permits: Arc::new(Semaphore::new(READERS)),
                idle: Mutex::new(readers),
                generation: AtomicU64::new(0),
            }),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Run `f` on the writer connection, in the next group's transaction inside a savepoint of
    /// its own, and commit it. `Ok` means committed durably; if `f` returns `Err` (or panics)
    /// nothing it did is kept, and the other writes of its group are not affected.
    ///
    /// Once queued, a write runs to its end even if the caller stops waiting for it.
    ///
    /// # Errors
    /// What `f` returns; [`StoreError::Closed`] when the writer is closed;
    /// [`StoreError::Panicked`] when `f` panicked; a failed `BEGIN` or `COMMIT`
    /// ([`StoreError::DiskFull`], [`StoreError::Busy`], ...).
    pub async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Transaction<'_>) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.try_write(f).await
    }

    /// [`Store::write`] for a transaction that can also fail for a reason of the caller's (an
    /// error type that a [`StoreError`] converts into): its `Err` rolls back the same way.
    ///
    /// # Errors
    /// As [`Store::write`].
    pub async fn try_write<T, E>(
        &self,
        f: impl FnOnce(&Transaction<'_>) -> Result<T, E> + Send + 'static,
    ) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        self.submit(f, Commit::HereIfFree).await
    }

    /// Queue `f`, see that it is committed (`how`), and wait for its outcome.
    async fn submit<T, E>(
        &self,
        f: impl FnOnce(&Transaction<'_>) -> Result<T, E> + Send + 'static,
        how: Commit,
    ) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job: Job = Box::new(move |tx: Option<&Transaction<'_>>| {
            let result = tx.map(|tx| {
                std::panic::catch_unwind(AssertUnwindSafe(|| f(tx))).unwrap_or_else(|_| {
                    tracing::error!("a database write panicked; rolled back");
                    Err(StoreError::Panicked.into())
                })
            });
            Ran {
                keep: matches!(result, Some(Ok(_))),
                answer: Box::new(move |group: Result<(), StoreError>| {
                    let outcome = match (result, group) {
                        (Some(Err(e)), _) => Err(e),
                        (_, Err(e)) => Err(E::from(e)),
                        (Some(Ok(value)), Ok(())) => Ok(value),
                        // A group that did not start reports why; never `Ok` without a run.
                        (None, Ok(())) => Err(E::from(StoreError::Closed)),
                    };
                    // The caller may have stopped waiting; the outcome stands all the same.
                    let _ = reply.send(outcome);
                }),
            }
        });
        self.inner
            .queue
            .send(job)
            .await
            .map_err(|_| StoreError::Closed)?;
        // No await between the send and this: a caller that stops waiting from here on has
        // either committed its write already or left it to the one committing.
        match how {
            Commit::HereIfFree => self.commit_if_free(),
            Commit::Elsewhere => self.commit_elsewhere(),
        }
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// If no one is committing, commit the queued group (this caller's write among them) here;
    /// then leave what was queued meanwhile to [`Store::commit_until_empty`].
    fn commit_if_free(&self) {
        let mut writer = match self.inner.writer.try_lock() {
            Ok(writer) => writer,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            // Busy: whoever holds it checks the queue after letting go.
            Err(std::sync::TryLockError::WouldBlock) => return,
        };
        crate::blocking::here(|| writer.commit_queued(&self.inner));
        drop(writer);
        if self.queued() {
            self.commit_elsewhere();
        }
    }

    /// Have a blocking thread commit what is queued.
    fn commit_elsewhere(&self) {
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.commit_until_empty());
    }

    /// Commit group after group until the queue is empty, then check again after letting go
    /// of the writer (a caller that found it busy left its write to us). Blocks: run it on a
    /// blocking thread.
    fn commit_until_empty(&self) {
        loop {
            {
                let mut writer = self
                    .inner
                    .writer
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                while writer.commit_queued(&self.inner) {}
            }
            if !self.queued() {
                return;
            }
        }
    }

    /// Whether writes wait in the queue (or are being put in it).
    fn queued(&self) -> bool {
        self.inner.queue.capacity() < self.inner.queue.max_capacity()
    }

    /// Run `f` on a read-only connection, inside one read transaction (one consistent
    /// snapshot that has seen every write committed before the call), on the calling thread
    /// ([`crate::blocking::here`]: a read takes about what two thread hand-offs would cost).
    /// Reads don't wait for writes.
    ///
    /// # Errors
    /// What `f` returns; [`StoreError::Panicked`] when `f` panicked; a reader connection that
    /// could not be (re)opened.
    pub async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let _permit = self
            .inner
            .permits
            .acquire()
            .await
            .map_err(|_| StoreError::Closed)?;
        crate::blocking::here(|| {
            let mut reader = self.inner.take_reader()?;
            let generation = &self.inner.generation;
            let result = std::panic::catch_unwind(AssertUnwindSafe(|| reader.run(generation, f)));
            match result {
                Ok(result) => {
                    self.inner.put_reader(reader);
                    result
                }
                // A reader whose closure panicked is dropped; the pool reopens one.
                Err(_panic) => Err(StoreError::Panicked),
            }
        })
    }
}

impl Store {
    /// Whether the store still answers: one `BEGIN IMMEDIATE`, a read of the schema and a
    /// commit of nothing, on the writer connection. It passes only if writes are committed
    /// and the database can take a write right now; it writes nothing to disk.
    ///
    /// For the health check: queued behind real writes, it waits as long as they do. A database
    /// locked by another process holds it for up to the busy timeout, so callers bound the wait
    /// and must not queue a second probe while one is outstanding.
    ///
    /// # Errors
    /// [`StoreError::Busy`] (locked by another process), [`StoreError::Closed`] (the writer
    /// is closed), or what SQLite says about the file.
    pub async fn probe(&self) -> Result<(), StoreError> {
        let probe = |tx: &Transaction<'_>| {
            tx.query_row("SELECT count(*) FROM sqlite_schema", [], |row| {
                row.get::<_, i64>(0)
            })?;
            Ok(())
        };
        // Never on the caller's thread: its caller bounds the wait with a timer, which can't
        // fire while its own task is blocked in SQLite's busy wait.
        self.submit(probe, Commit::Elsewhere).await
    }
}

impl Store {
    /// Copy the whole database, as of one moment, into a new database file at `dest` (created,
    /// or an empty file the caller made), with SQLite's online backup API; returns the copy's schema version.
    ///
    /// The copy is ONE backup step of all pages, on a read-only connection of its own, on a
    /// blocking thread. In WAL mode a reader never blocks the writer, so the writer
    /// goes on committing while this runs, and the one step reads inside one read
    /// transaction: a consistent snapshot. Copying in steps of a few pages instead would end
    /// the read transaction between steps, and every commit by the writer (another
    /// connection) would restart the copy from the first page: under a steady write load it
    /// might never finish. What one step costs is that the WAL can't be checkpointed past
    /// the snapshot while it is copied (it grows by the writes of those milliseconds).
    ///
    /// # Errors
    /// [`StoreError::Busy`] if the source stayed locked past the busy timeout; what SQLite
    /// says about `dest` (a full disk: [`StoreError::DiskFull`]).
    pub async fn snapshot(&self, dest: PathBuf) -> Result<i64, StoreError> {
        let path = self.inner.path.clone();
        let joined = tokio::task::spawn_blocking(move || {
            let source = open_reader(&path)?;
            let mut copy = Connection::open_with_flags(
                &dest,
                OpenFlags::SQLITE_OPEN_READ_WRITE
                    | OpenFlags::SQLITE_OPEN_CREATE
                    | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )?;
            copy.busy_timeout(BUSY_TIMEOUT)?;
            {
                let backup = rusqlite::backup::Backup::new(&source, &mut copy)?;
                match backup.step(-1)? {
                    rusqlite::backup::StepResult::Done => {}
                    // -1 copies every page or fails; anything else is a lock held too long.
                    _ => return Err(StoreError::Busy),
                }
            }
            let version: i64 = copy.pragma_query_value(None, "user_version", |row| row.get(0))?;
            // The audit outbox's rows are this store's records, on their way to this log: a
            // copy restored elsewhere must not append them to another log.
            if version >= OUTBOX_VERSION {
                copy.execute("DELETE FROM audit_outbox", [])?;
            }
            copy.close().map_err(|(_, e)| StoreError::from(e))?;
            Ok(version)
        })
        .await;
        match joined {
            Ok(result) => result,
            Err(e) if e.is_panic() => Err(StoreError::Panicked),
            Err(_) => Err(StoreError::Closed),
        }
    }
}

impl Store {
    /// Run `f` right here, on the caller's thread, on a pooled read-only connection, on a
    /// snapshot that has seen every write committed before the call (as [`Store::read`]).
    ///
    /// For the point lookups of the hot paths (a secret by name): from SQLite's page cache they
    /// take a few microseconds, less than the two thread hand-offs of [`Store::read`]. Anything
    /// that scans (lists, counts, versions) goes through [`Store::read`], so that it never holds
    /// an async worker for long.
    ///
    /// # Errors
    /// What `f` returns; a reader connection that could not be opened.
    pub fn read_now<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut reader = self.inner.take_reader()?;
        let result = reader.run(&self.inner.generation, f);
        self.inner.put_reader(reader);
        result
    }
}

impl Inner {
    fn take_reader(&self) -> Result<Reader, StoreError> {
        let pooled = self.idle().pop();
        match pooled {
            Some(reader) => Ok(reader),
            None => Reader::open(&self.path),
        }
    }

    fn put_reader(&self, reader: Reader) {
        let mut idle = self.idle();
        // `read_now` callers can outnumber the pool for a moment; keep a few, close the rest.
        if idle.len() < 2 * READERS {
            idle.push(reader);
        }
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<Reader>> {
        self.idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Create the file with mode 0600 if it does not exist; tighten an existing file that others
/// can read. SQLite gives the `-wal` and `-shm` files the database file's mode.
fn create_private(path: &Path) -> Result<(), StoreError> {
    let io = |what: &str| {
        let what = format!("{what} {}", path.display());
        move |source| StoreError::Io { what, source }
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(io("cannot create or open"))?;
    let mode = file
        .metadata()
        .map_err(io("cannot stat"))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        tracing::warn!(
            path = %path.display(),
            mode = format_args!("{:o}", mode & 0o777),
            "database file was accessible to others; setting mode 0600"
        );
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(io("cannot set mode 0600 on"))?;
    }
    Ok(())
}

fn configure_writer(conn: &Connection) -> Result<(), StoreError> {
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let mode: String =
        conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Corrupt(format!(
            "the database refused WAL mode (journal_mode is {mode})"
        )));
    }
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    // Freed pages (a deleted secret's ciphertext) are overwritten with zeros.
    conn.pragma_update(None, "secure_delete", "ON")?;
    // After a checkpoint, truncate the WAL back to this size: bounded disk use, and old page
    // images don't linger in it.
    conn.pragma_update(None, "journal_size_limit", 4 * 1024 * 1024)?;
    // The schema is ours; never run functions an altered schema might name.
    conn.pragma_update(None, "trusted_schema", "OFF")?;
    // Every statement of a hot write is prepared once (`prepare_cached`): parsing and planning
    // it again for each write cost as much CPU as the write itself.
    conn.set_prepared_statement_cache_capacity(64);
    Ok(())
}

fn open_reader(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.pragma_update(None, "trusted_schema", "OFF")?;
    Ok(conn)
}

/// One transaction for the whole group, a savepoint per job, one commit; then every caller is
/// answered. Only after the commit: an `Ok` is never sent for a write that is not durable.
fn run_group(conn: &mut Connection, group: Vec<Job>, generation: &AtomicU64) {
    let tx = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(e) => {
            for job in group {
                (job(None).answer)(Err(StoreError::from(again(&e))));
            }
            return;
        }
    };
    let mut answers = Vec::with_capacity(group.len());
    // A savepoint statement that failed: the transaction is in doubt, so nothing is kept.
    let mut broken: Option<rusqlite::Error> = None;
    // A job alone in its group needs no savepoint: if it fails, the whole transaction goes.
    let alone = group.len() == 1;
    let mut kept = 0;
    for job in group {
        if broken.is_some() {
            answers.push(job(None).answer);
            continue;
        }
        if !alone {
            if let Err(e) = savepoint(&tx, "SAVEPOINT job") {
                broken = Some(e);
                answers.push(job(None).answer);
                continue;
            }
        }
        let ran = job(Some(&tx));
        kept += usize::from(ran.keep);
        if !alone {
            let end = match ran.keep {
                true => savepoint(&tx, "RELEASE job"),
                false => {
                    savepoint(&tx, "ROLLBACK TO job").and_then(|()| savepoint(&tx, "RELEASE job"))
                }
            };
            if let Err(e) = end {
                broken = Some(e);
            }
        }
        answers.push(ran.answer);
    }
    let outcome = match broken {
        // Dropping the transaction rolls it back.
        Some(e) => Err(e),
        // Nothing to keep (the one job failed): roll back, no commit, no sync.
        None if kept == 0 => tx.rollback(),
        None => tx.commit(),
    };
    // Whatever the outcome (a failed commit may have kept nothing, or, in doubt, something):
    // reads from now on take a new snapshot.
    generation.fetch_add(1, Ordering::AcqRel);
    for answer in answers {
        answer(
            outcome
                .as_ref()
                .map(|_| ())
                .map_err(|e| StoreError::from(again(e))),
        );
    }
}

/// A savepoint statement, prepared once per connection (each job of a group runs two).
fn savepoint(tx: &Transaction<'_>, sql: &str) -> rusqlite::Result<()> {
    tx.prepare_cached(sql)?.execute([]).map(drop)
}

/// The same SQLite failure again, for each caller of a group that failed: a failed `BEGIN`,
/// `COMMIT` or savepoint statement is a [`rusqlite::Error::SqliteFailure`], which is copied
/// exactly; anything else is reported as a generic SQLite error with its text.
fn again(e: &rusqlite::Error) -> rusqlite::Error {
    match e {
        rusqlite::Error::SqliteFailure(code, message) => {
            rusqlite::Error::SqliteFailure(*code, message.clone())
        }
        other => rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ERROR),
            Some(other.to_string()),
        ),
    }
}

#[cfg(test)]
mod tests;
